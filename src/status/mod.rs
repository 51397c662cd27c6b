//! Status and Events: conditions as typed values, the status of each ExternalCatalog and
//! ExternalRegistration (pure), Warning Events, and the loop that writes them while this
//! replica leads, only when something changed.

pub mod catalog;
pub mod conditions;
pub mod connection;
pub mod events;
pub mod registration;
pub mod run;

pub use run::{Views, run};
