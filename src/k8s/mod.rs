//! Kubernetes at the edge: the watches and the stores they fill, the Secrets an ExternalCatalog
//! references, the Secret that keeps ZooKeeper sessions, and the building of a catalog's
//! backend from its ExternalCatalog.

pub mod catalogs;
pub mod secrets;
pub mod sessions;
pub mod stores;
