//! Kubernetes at the edge: the watches and the stores they fill (objects pruned to what is read), the Secrets an ExternalCatalog
//! references, the Secret that keeps ZooKeeper sessions, the building of a catalog's backend
//! from its ExternalCatalog, and the finalizer that holds a deleted one until it is emptied.

pub mod cached;
pub mod catalogs;
pub mod finalizers;
pub mod prune;
pub mod secrets;
pub mod sessions;
pub mod stores;
