//! etcd v3: every exported instance is one key under the layout's prefix, attached to one lease
//! shared by all the keys of this controller's (owner id, catalog) pair, so a dead controller's
//! entries disappear after the lease TTL. docs/architecture.md ("etcd layouts and liveness")
//! tells the story; each part is here, with the invariants it keeps:
//!
//! - `layout`: the keys and values of `plain`, `naming` and `coredns`, and their parsers (pure);
//! - `client`: one connection per endpoint, failover between them, what etcd's errors mean;
//! - `lease`: the lease and its marker: reuse, grant, keep-alive, replacement, TTL change;
//! - `write`: guarded transactions (only keys on our lease change) and what this owner holds;
//! - `import`: the watch of one name, read and watched from one revision.

mod client;
mod import;
mod layout;
mod lease;
mod owner;
mod write;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use async_trait::async_trait;
use tokio::sync::watch;

use super::{Backend, BackendError, ClientCert, ImportSnapshot, Record};
use crate::api::crd::{EtcdLayout, ServerInfo};
use crate::model::{Instance, Op};
use client::Connections;
use layout::{Layout, coredns_host_port, names_label, naming_addr, prefix_end, record_of};
use lease::LeaseState;

pub use layout::{COREDNS_TTL, DEFAULT_ZONE, coredns_id, dns_label};
pub use lease::MARKER_PREFIX;
pub use owner::OWNERS_PREFIX;
pub use write::{MAX_GUARD_DEPTH, MAX_PLAN_OPS_PER_TXN, MAX_TXN_BYTES, MAX_TXN_OPS, batches};

/// Default lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

/// How to reach etcd and where to write.
#[derive(Clone)]
pub struct EtcdConfig {
    /// `host:port` or `http(s)://host:port` of etcd members.
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TTL of the lease every exported key is attached to (whole seconds, at least 1).
    pub lease_ttl: Duration,
    pub layout: EtcdLayout,
    /// Key prefix; `None` is the layout's default: `/services`, empty (naming), `/skydns`.
    pub base_path: Option<String>,
    /// DNS zone of the `coredns` layout; default [`DEFAULT_ZONE`].
    pub zone: Option<String>,
    /// This controller's owner id (the cluster id). Empty: a client that can only look up and
    /// probe (`catalog-bridge query`).
    pub owner: String,
    /// The ExternalCatalog name (part of the lease marker key).
    pub catalog: String,
    /// PEM bundle of the CA(s) to trust; endpoints without a scheme then use TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// Not supported by the etcd client (tonic verifies every certificate): `new` refuses it.
    pub insecure_skip_verify: bool,
    /// Certificate and key presented to etcd (`--client-cert-auth`); needs `ca_pem`.
    pub client_cert: Option<ClientCert>,
    /// Reads only (`--dry-run`, `cleanup --dry-run`): never grants a lease, claims the marker or
    /// keeps a lease alive; owns what the marker's live lease holds, nothing without one.
    pub read_only: bool,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            username: None,
            password: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            layout: EtcdLayout::Plain,
            base_path: None,
            zone: None,
            owner: String::new(),
            catalog: String::new(),
            ca_pem: None,
            insecure_skip_verify: false,
            client_cert: None,
            read_only: false,
        }
    }
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("lease_ttl", &self.lease_ttl)
            .field("layout", &self.layout)
            .field("base_path", &self.base_path)
            .field("zone", &self.zone)
            .field("owner", &self.owner)
            .field("catalog", &self.catalog)
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| p.len()))
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

/// What every part of the backend shares; the keep-alive task holds it weakly.
struct Inner {
    conn: Connections,
    layout: Layout,
    owner: String,
    catalog: String,
    /// The key that holds the lease id: `<MARKER_PREFIX><owner>/<catalog>`.
    marker: String,
    ttl_secs: i64,
    /// [`EtcdConfig::read_only`].
    read_only: bool,
    lease: tokio::sync::Mutex<LeaseState>,
    invalidations: watch::Sender<u64>,
    keeper: Mutex<Option<tokio::task::AbortHandle>>,
}

/// An etcd catalog. Dropping it stops the lease keep-alive: the keys expire after the TTL.
pub struct Etcd {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.inner.conn.endpoints())
            .field("layout", &self.inner.layout.name())
            .field("prefix", &self.inner.layout.prefix)
            .field("owner", &self.inner.owner)
            .field("catalog", &self.inner.catalog)
            .finish_non_exhaustive()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let handle = self
            .inner
            .keeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            h.abort();
        }
    }
}

impl Etcd {
    /// Checks the configuration and prepares the clients; contacts nothing.
    pub fn new(cfg: EtcdConfig) -> anyhow::Result<Etcd> {
        if cfg.endpoints.is_empty() {
            bail!("an etcd catalog needs at least one endpoint");
        }
        for (what, v) in [("owner id", &cfg.owner), ("catalog name", &cfg.catalog)] {
            if v.trim() != v || v.contains('/') {
                bail!("etcd {what} {v:?} must not contain '/' or start or end with spaces");
            }
        }
        if cfg.insecure_skip_verify {
            bail!(
                "insecureSkipVerify is not supported for etcd (its gRPC client always verifies \
                 certificates): give the CA with tls.caSecretRef instead"
            );
        }
        let ttl_secs = i64::try_from(cfg.lease_ttl.as_secs()).unwrap_or(i64::MAX)
            + i64::from(cfg.lease_ttl.subsec_nanos() > 0);
        if !(1..=9_000_000_000).contains(&ttl_secs) {
            bail!(
                "etcd lease TTL {:?} is out of range (1 s and more)",
                cfg.lease_ttl
            );
        }
        let conn = Connections::new(&cfg)?;
        let layout = Layout::new(
            cfg.layout,
            cfg.base_path.as_deref(),
            cfg.zone.as_deref(),
            &cfg.owner,
        )?;
        let marker = format!("{MARKER_PREFIX}{}/{}", cfg.owner, cfg.catalog);
        Ok(Etcd {
            inner: Arc::new(Inner {
                conn,
                layout,
                owner: cfg.owner,
                catalog: cfg.catalog,
                marker,
                ttl_secs,
                read_only: cfg.read_only,
                lease: tokio::sync::Mutex::default(),
                invalidations: watch::channel(0).0,
                keeper: Mutex::new(None),
            }),
        })
    }

    /// The key that holds this (owner, catalog)'s lease id.
    pub fn marker_key(&self) -> &str {
        &self.inner.marker
    }

    /// Every key this backend writes starts with it (empty for `naming` without a base path).
    pub fn prefix(&self) -> &str {
        &self.inner.layout.prefix
    }

    /// The lease in use now, if one was established (no network).
    pub async fn lease_id(&self) -> Option<i64> {
        self.inner.lease.lock().await.current.map(|h| h.id)
    }

    /// The key and value an instance becomes.
    pub fn entry(&self, instance: &Instance) -> (String, String) {
        (
            self.inner.layout.key(instance),
            self.inner.layout.value(instance),
        )
    }

    fn require_owner(&self) -> Result<(), BackendError> {
        if self.inner.owner.is_empty() || self.inner.catalog.is_empty() {
            return Err(BackendError::Rejected(format!(
                "this etcd client ({}) has no owner id or catalog name: it can look up \
                 services but not read or write exported entries",
                self.inner.conn.endpoints().join(",")
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for Etcd {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn describe(&self) -> String {
        let l = &self.inner.layout;
        let prefix = if l.prefix.is_empty() {
            "(no base path)".to_string()
        } else {
            l.prefix.clone()
        };
        format!(
            "etcd {} layout {} prefix {prefix}",
            self.inner.conn.endpoints().join(","),
            l.name()
        )
    }

    fn render(&self, instances: &[Instance]) -> BTreeMap<String, Record> {
        instances
            .iter()
            .map(|i| {
                let (key, value) = self.entry(i);
                (key, record_of(&value, false))
            })
            .collect()
    }

    /// Nothing is sized by the number of entries.
    async fn expect(&self, _: &[Instance]) -> Result<(), BackendError> {
        Ok(())
    }

    async fn read_owned(&self) -> Result<BTreeMap<String, Record>, BackendError> {
        self.owned().await
    }

    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError> {
        self.write(ops).await
    }

    async fn retire(&self) -> Result<Option<String>, BackendError> {
        self.inner.retire_lease().await
    }

    async fn probe(&self) -> Result<ServerInfo, BackendError> {
        self.inner.conn.status().await
    }

    async fn location(&self) -> Result<String, BackendError> {
        let cluster = self.probe().await?.cluster_id.unwrap_or_default();
        let l = &self.inner.layout;
        Ok(format!(
            "etcd cluster {cluster} layout {} prefix {:?}",
            l.name(),
            l.prefix
        ))
    }

    fn invalidations(&self) -> Option<watch::Receiver<u64>> {
        Some(self.inner.invalidations.subscribe())
    }

    async fn watch_service(
        &self,
        name: &str,
        tx: watch::Sender<ImportSnapshot>,
    ) -> Result<(), BackendError> {
        self.follow(name, tx).await
    }

    async fn lookup(&self, name: &str) -> Result<Vec<String>, BackendError> {
        let layout = &self.inner.layout;
        let (prefix, name_label) = layout.lookup_prefix(name);
        let kvs = self
            .inner
            .conn
            .range(
                &format!("looking up {name}"),
                prefix.as_bytes().to_vec(),
                prefix_end(prefix.as_bytes()),
            )
            .await?;
        let mut out = BTreeSet::new();
        for kv in &kvs {
            let found = match layout.kind {
                EtcdLayout::Plain => Some(String::from_utf8_lossy(kv.value()).trim().to_string())
                    .filter(|v| !v.is_empty()),
                EtcdLayout::Naming => naming_addr(kv.value()),
                EtcdLayout::Coredns => {
                    if let Some(label) = &name_label
                        && !names_label(kv.key(), &prefix, label)
                    {
                        continue;
                    }
                    coredns_host_port(kv.value())
                }
            };
            out.extend(found);
        }
        Ok(out.into_iter().collect())
    }
}
