//! The application: the command line, and `run`, which wires every part of the controller
//! together and supervises it — options, leader election, the gate, the desired-state loop and
//! the HTTP endpoints.

pub mod cli;
pub mod desired_loop;
pub mod gate;
pub mod health;
pub mod http;
pub mod leader;
pub mod options;
pub mod run;

pub use options::Options;
