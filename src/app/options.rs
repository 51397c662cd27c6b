//! The options of `catalog-bridge run`, as the command line gives them.

use std::time::Duration;

/// Options of `catalog-bridge run`.
#[derive(Clone, Debug)]
pub struct Options {
    /// The owner id written into every entry (the cluster id).
    pub owner: String,
    /// This cluster's `kube-system` namespace UID (the default owner id), recorded in the
    /// owner marker of each catalog written to.
    pub cluster: String,
    pub dry_run: bool,
    pub drift_interval: Duration,
    /// Namespace and name of the leader Lease.
    pub lease_namespace: String,
    pub lease_name: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    pub lease_duration: Duration,
    /// The Secret (in `lease_namespace`) that keeps ZooKeeper sessions between processes.
    pub session_secret: String,
    pub metrics_addr: std::net::SocketAddr,
}
