//! Catalog backends: one trait, one module per catalog, and an in-memory one for fast tests of
//! the parts above them.
//!
//! A backend turns instances into *records* (the exact form it stores, keyed by the entry's
//! identity in the catalog), reads back the records this owner holds, and applies puts and
//! deletes in batches. Because reading and rendering give the same form, the plan can compare
//! them and write only what differs.

pub mod claim;
pub mod consul;
pub mod etcd;
pub mod failover;
pub mod memory;
pub mod tls;
pub mod transport;
pub mod zookeeper;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::api::crd::{ExternalCatalogSpec, ServerInfo};
use crate::model::Instance;
pub use crate::model::{BackendError, Op, Record};

/// A client certificate and its private key (PEM), for mutual TLS with a catalog.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert_pem", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// One instance of an external service as a catalog reports it, for import.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct External {
    /// An IPv4 or IPv6 address, or a host name.
    pub address: String,
    pub port: u16,
    /// The catalog's own identity of the entry (Consul service ID, etcd key, znode path).
    pub id: String,
}

/// What an import watch currently knows of one external service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportSnapshot {
    /// The healthy instances, sorted, without this controller's own entries. While the
    /// catalog is unreachable this keeps the last known set.
    pub instances: Vec<External>,
    /// Instances the catalog still lists but reports unhealthy (Consul: a check not passing),
    /// sorted: a health answer, which the import's empty-hold never holds. Always empty for
    /// catalogs without health checks (etcd, ZooKeeper: an entry lives while its key does).
    pub failing: Vec<External>,
    /// Entries that could not be parsed: (id, why). They are left out; the rest import.
    pub skipped: Vec<(String, String)>,
    /// The last read failed with this (the instances are then the last known ones).
    pub error: Option<BackendError>,
    /// At least one read has succeeded.
    pub synced: bool,
}

/// Publishes a successful read of an import watch: the instances and the skipped entries,
/// no error. Only a change is published (compared in place: nothing is copied).
pub fn publish_read(
    tx: &tokio::sync::watch::Sender<ImportSnapshot>,
    instances: Vec<External>,
    skipped: Vec<(String, String)>,
) {
    publish_health_read(tx, instances, Vec::new(), skipped);
}

/// [`publish_read`] from a catalog with health checks: also the instances it lists as failing.
pub fn publish_health_read(
    tx: &tokio::sync::watch::Sender<ImportSnapshot>,
    instances: Vec<External>,
    failing: Vec<External>,
    skipped: Vec<(String, String)>,
) {
    let next = ImportSnapshot {
        instances,
        failing,
        skipped,
        error: None,
        synced: true,
    };
    tx.send_if_modified(|s| {
        let changed = *s != next;
        if changed {
            *s = next;
        }
        changed
    });
}

/// Publishes a failed read of an import watch: the last instances stay, with the error. Only
/// a change is published.
pub fn publish_error(tx: &tokio::sync::watch::Sender<ImportSnapshot>, e: BackendError) {
    tx.send_if_modified(|s| {
        let changed = s.error.as_ref() != Some(&e);
        if changed {
            s.error = Some(e);
        }
        changed
    });
}

/// What the layout of `catalog` leaves out of an instance with `meta`, and why (Consul refuses
/// some keys, and more than 64 pairs). Pure: for the desired state, which reports it where the
/// user wrote the meta.
pub fn meta_left_out(
    catalog: &ExternalCatalogSpec,
    meta: &BTreeMap<String, String>,
) -> Vec<String> {
    if catalog.consul.is_some() {
        consul::dropped_meta(meta)
    } else {
        Vec::new()
    }
}

/// `consul`, `etcd` or `zookeeper`: the kind of catalog `spec` describes.
pub fn kind_of(spec: &ExternalCatalogSpec) -> &'static str {
    if spec.consul.is_some() {
        "consul"
    } else if spec.etcd.is_some() {
        "etcd"
    } else {
        "zookeeper"
    }
}

/// One catalog, as the writer and `catalog-bridge query` use it.
#[async_trait]
pub trait Backend: claim::MarkerStore + Send + Sync {
    /// `consul`, `etcd`, `zookeeper` or `memory`.
    fn kind(&self) -> &'static str;

    /// Where it writes, for logs and messages (`consul http://a:8500,http://b:8500 node k8s-x`).
    fn describe(&self) -> String;

    /// The records these instances become, keyed by identity. Pure.
    fn render(&self, instances: &[Instance]) -> BTreeMap<String, Record>;

    /// Gets ready for a large addition of `instances`, about to be written over several
    /// applies: what is sized by the entries a catalog holds (ZooKeeper's sessions) is sized
    /// for all of them now, rather than grown apply by apply. (No default: a wrapper that
    /// forgot to pass it on would size nothing.)
    async fn expect(&self, instances: &[Instance]) -> Result<(), BackendError>;

    /// The records this controller's owner id holds in the catalog now, nothing else.
    async fn read_owned(&self) -> Result<BTreeMap<String, Record>, BackendError>;

    /// Writes `ops` in as few round trips as the catalog's batch limit allows, in order.
    /// Returns the number of round trips. On error, batches before the failing one may have
    /// been committed: callers re-read before planning again.
    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError>;

    /// Contacts the catalog and reports what it says about itself.
    async fn probe(&self) -> Result<ServerInfo, BackendError>;

    /// Where this backend's entries live, as a text two configurations share exactly when they
    /// own the same entries: Consul's datacenter and node, etcd's cluster, layout and prefix,
    /// ZooKeeper's layout and path from the root. May ask the catalog (Consul's datacenter when
    /// not configured, etcd's cluster id). When an ExternalCatalog is changed to write
    /// elsewhere, the entries at its old location are removed.
    async fn location(&self) -> Result<String, BackendError>;

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

    /// Stops using the catalog but keeps what holds this controller's entries alive (a
    /// ZooKeeper session) for as long as nobody else takes it: for a replica whose leadership
    /// is in doubt or lost. Default: [`Self::release`].
    async fn pause(&self) {
        self.release().await
    }

    /// After every owned entry was deleted (`catalog-bridge cleanup`): removes what this owner
    /// created only to hold its entries, if nothing else uses it now — Consul's synthetic node
    /// once no service of any owner is left on it. Returns what was removed, for the user.
    /// Default: nothing to remove (etcd revokes its lease with the lease's marker; a
    /// ZooKeeper session expires on its own; parent directories may be shared with other
    /// registrants and stay).
    async fn retire(&self) -> Result<Option<String>, BackendError> {
        Ok(None)
    }

    /// Something about this catalog that works now but needs the operator's attention (a
    /// ZooKeeper session that holds so many entries that closing it may fail), read after
    /// every write. Default: nothing.
    fn warning(&self) -> Option<String> {
        None
    }

    /// Follows external service `name` for import, until `tx` is closed: reads the healthy
    /// instances, publishes them on `tx`, waits for the catalog to report a change (Consul
    /// blocking query, etcd watch from the revision read, ZooKeeper child and data watches,
    /// re-armed with nothing lost between read and watch), and repeats. Entries this
    /// controller's owner id wrote are left out (no loops). A failed read keeps the last
    /// instances and sets `error`; the watch retries with backoff and never ends on its own.
    async fn watch_service(
        &self,
        name: &str,
        tx: tokio::sync::watch::Sender<ImportSnapshot>,
    ) -> Result<(), BackendError> {
        let _ = (name, tx);
        Err(BackendError::Rejected(format!(
            "{} does not support import",
            self.kind()
        )))
    }

    /// What a discovery client asking for `name` gets: `host:port` of every healthy instance,
    /// whoever registered it, sorted.
    async fn lookup(&self, name: &str) -> Result<Vec<String>, BackendError>;
}
