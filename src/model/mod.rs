//! The domain, free of Kubernetes clients and catalog clients: what an exported instance is,
//! the changes a plan is made of, why something failed, and the rules every layer shares about
//! addresses. Every other module may use it; it uses none of them.

pub mod address;
pub mod change;
pub mod error;
pub mod instance;
pub mod problem;

pub use change::{Digest, Digested, Known, Op, Record, Unit};
pub use error::BackendError;
pub use instance::{DesiredCatalog, Difference, Instance, Origin, fnv1a64};
pub use problem::{Problem, Reason};
