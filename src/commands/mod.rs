//! The subcommands besides `run`: `query` (ask a catalog what a discovery client gets) and
//! `cleanup` (remove every entry this owner id wrote to a catalog).

pub mod cleanup;
pub mod query;
