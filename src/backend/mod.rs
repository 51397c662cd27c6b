//! Catalog backends: one trait, one module per catalog, and an in-memory one for fast tests of
//! the parts above them.
//!
//! A backend turns instances into *records* (the exact form it stores, keyed by the entry's
//! identity in the catalog), reads back the records this owner holds, and applies puts and
//! deletes in batches. Because reading and rendering give the same form, the plan can compare
//! them and write only what differs.

pub mod consul;
pub mod etcd;
pub mod memory;
pub mod zookeeper;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::crd::ServerInfo;
use crate::model::Instance;
use crate::plan::Op;

/// An entry as a backend stores it, in a canonical form that compares equal when the catalog
/// holds what would be written.
pub type Record = serde_json::Value;

/// Why a catalog operation failed; the variant is a bounded category for metrics and
/// condition reasons, the text the real error.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// No address answered (connection refused, timeout, DNS).
    #[error("{0}")]
    Unreachable(String),
    /// The catalog answered, with an error.
    #[error("{0}")]
    Rejected(String),
    /// Credentials were refused.
    #[error("{0}")]
    Unauthorized(String),
    /// What the catalog returned could not be understood.
    #[error("{0}")]
    Protocol(String),
}

impl BackendError {
    /// A CamelCase reason for conditions and a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::Unreachable(_) => "Unreachable",
            BackendError::Rejected(_) => "Rejected",
            BackendError::Unauthorized(_) => "Unauthorized",
            BackendError::Protocol(_) => "ProtocolError",
        }
    }
}

/// One catalog, as the writer and `catalog-bridge query` use it.
#[async_trait]
pub trait Backend: Send + Sync {
    /// `consul`, `etcd`, `zookeeper` or `memory`.
    fn kind(&self) -> &'static str;

    /// Where it writes, for logs and messages (`consul http://a:8500,http://b:8500 node k8s-x`).
    fn describe(&self) -> String;

    /// The records these instances become, keyed by identity. Pure.
    fn render(&self, instances: &[Instance]) -> BTreeMap<String, Record>;

    /// The records this controller's owner id holds in the catalog now, nothing else.
    async fn read_owned(&self) -> Result<BTreeMap<String, Record>, BackendError>;

    /// Writes `ops` in as few round trips as the catalog's batch limit allows, in order.
    /// Returns the number of round trips. On error, batches before the failing one may have
    /// been committed: callers re-read before planning again.
    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError>;

    /// Contacts the catalog and reports what it says about itself.
    async fn probe(&self) -> Result<ServerInfo, BackendError>;

    /// A counter that moves when the catalog lost what this controller wrote through no write
    /// of its own — an etcd lease that expired, a ZooKeeper session that expired — and the
    /// backend has re-established its liveness (new lease, new session). The writer re-reads
    /// the owned state (now empty) and puts every entry again. `None` for catalogs without
    /// such liveness (Consul).
    fn invalidations(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Lets go of whatever ties this replica to its entries' liveness without ending it (a
    /// ZooKeeper session is disconnected but kept, so the next leader can re-attach). Called
    /// when this replica stops leading. Default: nothing to do.
    async fn release(&self) {}

    /// What a discovery client asking for `name` gets: `host:port` of every healthy instance,
    /// whoever registered it, sorted.
    async fn lookup(&self, name: &str) -> Result<Vec<String>, BackendError>;
}
