//! The subcommands besides `run`: `query` (ask a catalog what a discovery client gets),
//! `cleanup` (remove every entry this owner id wrote to a catalog), `delete-catalogs` (the
//! chart's pre-delete hook: delete catalogs and wait until the controller has emptied them).

pub mod cleanup;
pub mod delete_catalogs;
pub mod query;
