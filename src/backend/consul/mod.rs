//! Consul: exported instances live on one synthetic node, written through the catalog API in
//! `/v1/txn` batches, never through the agent API (an agent's anti-entropy would remove
//! services that do not run on it). Ownership is the service meta `catalog-bridge-owner`;
//! import follows the passing instances of a service with blocking queries.
//!
//! One concern per file: `layout` (what an instance becomes, how owned entries read back; no
//! HTTP), `client` (requests to the addresses in turn), `txn` (batched writes), `import` (the
//! watch, and lookups). Here: the configuration, [`Consul`] and its [`Backend`] methods over
//! them. docs/architecture.md tells the whole story.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::bail;
use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::failover::Failover;
use super::{Backend, BackendError, ClientCert, ImportSnapshot, Record};
use crate::api::crd::ServerInfo;
use crate::model::{Instance, Op};

mod client;
mod identity;
mod import;
mod layout;
mod owner;
#[cfg(test)]
mod tests;
mod txn;

pub use identity::MARKER_KEY;
pub use import::{WATCH_BACKOFF_MAX, WATCH_BACKOFF_MIN, WATCH_NO_INDEX_PAUSE, WATCH_WAIT};
pub use layout::{
    CATALOG_META, CHECK_NAME, MAX_META_PAIRS, NODE_ADDRESS, NODE_CHECK_ID, OWNER_META, SOURCE_META,
    SOURCE_VALUE, dropped_meta, meta_problem,
};
pub use owner::OWNERS_PREFIX;
pub use txn::{MAX_TXN_BYTES, MAX_TXN_OPS};

/// How to reach Consul and where to write.
#[derive(Clone, Default)]
pub struct ConsulConfig {
    /// `http(s)://host:port`, tried in order; the next on a connection failure.
    pub addresses: Vec<String>,
    /// Datacenter to read and write (`?dc=`); default the agent's own.
    pub datacenter: Option<String>,
    /// ACL token, sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// The synthetic node that holds the exported instances.
    pub node_name: String,
    /// This controller's owner id (the cluster id).
    pub owner: String,
    /// The ExternalCatalog's name, written into every entry ([`CATALOG_META`]).
    pub catalog: String,
    pub insecure_skip_verify: bool,
    /// PEM bundle of the CA(s) to trust instead of the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Certificate and key presented to Consul (`verify_incoming`).
    pub client_cert: Option<ClientCert>,
    /// Only read, never write (dry runs, import watches): the cluster marker is not created.
    pub read_only: bool,
}

impl std::fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("addresses", &self.addresses)
            .field("datacenter", &self.datacenter)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("node_name", &self.node_name)
            .field("owner", &self.owner)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| p.len()))
            .field("client_cert", &self.client_cert)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// A Consul catalog reached over HTTP.
pub struct Consul {
    /// A client certificate is presented (for messages about refused handshakes).
    client_cert: bool,
    /// The addresses as configured (trailing `/` removed), named in messages, and which one
    /// answered last: requests start there.
    failover: Failover,
    /// The URL of each address, in the same order.
    urls: Vec<Url>,
    datacenter: Option<String>,
    token: Option<String>,
    node: String,
    owner: String,
    catalog: String,
    http: reqwest::Client,
    /// The node is known to exist with our address and meta; when false the next txn
    /// (re)registers it.
    node_ok: AtomicBool,
    /// Service ID → service name of the entries we own: a txn `delete` needs a name.
    names: Mutex<HashMap<String, String>>,
    /// `wait=` of the import watch's blocking queries.
    watch_wait: Duration,
    /// Writes nothing that is not an export (the cluster marker).
    read_only: bool,
    /// Entries this owner wrote under the service IDs of before they named the owner: the
    /// key (the ID now) → the ID in Consul. Each is replaced in the transaction that writes it
    /// ([`layout`]).
    legacy: Mutex<HashMap<String, String>>,
    /// Service IDs of the owned entries that still carry a check of their own, as the layout
    /// of before had: each is deleted in the transaction that puts its service ([`layout`]).
    legacy_checks: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Consul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consul")
            .field("addresses", &self.failover.addresses())
            .field("datacenter", &self.datacenter)
            .field("node", &self.node)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Consul {
    /// Checks the configuration and builds the HTTP client; contacts nothing.
    pub fn new(cfg: ConsulConfig) -> anyhow::Result<Consul> {
        if cfg.addresses.is_empty() {
            bail!("a Consul catalog needs at least one address");
        }
        // An empty node name or owner makes a client that can only look up and probe
        // (`catalog-bridge query`); reading owned entries and writing then refuse to run.
        if cfg.node_name.trim() != cfg.node_name || cfg.owner.trim() != cfg.owner {
            bail!(
                "Consul node name {:?} and owner id {:?} must not start or end with spaces",
                cfg.node_name,
                cfg.owner
            );
        }
        let (addresses, urls) = client::parse_addresses(&cfg.addresses)?;
        let http = client::http_client(&cfg)?;
        Ok(Consul {
            failover: Failover::new(addresses),
            urls,
            datacenter: cfg.datacenter.filter(|d| !d.is_empty()),
            token: cfg.token.filter(|t| !t.is_empty()),
            node: cfg.node_name,
            owner: cfg.owner,
            catalog: cfg.catalog,
            http,
            node_ok: AtomicBool::new(false),
            names: Mutex::default(),
            client_cert: cfg.client_cert.is_some(),
            watch_wait: WATCH_WAIT,
            read_only: cfg.read_only,
            legacy: Mutex::default(),
            legacy_checks: Mutex::default(),
        })
    }

    /// Refuses to read or write entries without a node and an owner: with an empty owner,
    /// everything unmarked would look like ours.
    fn require_owner(&self) -> Result<(), BackendError> {
        if self.node.is_empty() || self.owner.is_empty() {
            return Err(BackendError::Rejected(format!(
                "this Consul client ({}) has no node name or owner id: it can look up \
                 services but not read or write exported entries",
                self.failover.addresses().join(",")
            )));
        }
        Ok(())
    }

    /// The synthetic node the instances live on.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }
}

#[async_trait]
impl Backend for Consul {
    fn kind(&self) -> &'static str {
        "consul"
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "consul {} node {}",
            self.failover.addresses().join(","),
            self.node
        );
        if let Some(dc) = &self.datacenter {
            s.push_str(&format!(" dc {dc}"));
        }
        s
    }

    fn render(&self, instances: &[Instance]) -> BTreeMap<String, Record> {
        instances
            .iter()
            .map(|i| (self.service_id(i), self.record(i)))
            .collect()
    }

    /// Nothing is sized by the number of entries.
    async fn expect(&self, _: &[Instance]) -> Result<(), BackendError> {
        Ok(())
    }

    async fn read_owned(&self) -> Result<BTreeMap<String, Record>, BackendError> {
        self.require_owner()?;
        let what = format!("GET /v1/catalog/node-services/{}", self.node);
        let reply = self
            .call(
                Method::GET,
                &["catalog", "node-services", &self.node],
                &[],
                true,
                None,
            )
            .await?;
        let node_services = match reply.status {
            StatusCode::NOT_FOUND => Value::Null,
            // Only the fields a record holds: at 100,000 instances the whole answer, parsed,
            // would take hundreds of MiB for a moment, and the allocator keeps them.
            s if s.is_success() => reply.json_as::<layout::NodeServices>(&what)?.into_value(),
            _ => return Err(reply.status_error(&what)),
        };
        // The node's checks: its own, and the per-instance ones of before until they are gone.
        let checks = if node_services.get("Node").is_some_and(Value::is_object) {
            let what = format!("GET /v1/health/node/{}", self.node);
            self.get_json(&what, &["health", "node", &self.node], &[])
                .await?
        } else {
            Value::Null
        };
        let read = self.owned_records(&node_services, &checks)?;
        self.node_ok.store(read.node_ok, Ordering::SeqCst);
        let owned = read.records;
        if !read.legacy_checks.is_empty() {
            tracing::info!(node = %self.node, entries = read.legacy_checks.len(), "entries with a check of their own: the next write puts each again without it, in one transaction with the check's removal; the node's check stands for them all");
        }
        *self.legacy_checks.lock().unwrap_or_else(|e| e.into_inner()) = read.legacy_checks;
        self.remember_names(&owned);
        let (owned, legacy) = self.adopt_legacy(owned);
        if !legacy.is_empty() {
            tracing::info!(node = %self.node, entries = legacy.len(), "entries under service IDs without the owner id: each is replaced, in one transaction, by the next write");
        }
        *self.legacy.lock().unwrap_or_else(|e| e.into_inner()) = legacy;
        Ok(owned)
    }

    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError> {
        self.write(ops).await
    }

    async fn retire(&self) -> Result<Option<String>, BackendError> {
        self.retire_node().await
    }

    async fn probe(&self) -> Result<ServerInfo, BackendError> {
        let leader = self
            .get_json("GET /v1/status/leader", &["status", "leader"], &[])
            .await?;
        let leader = leader.as_str().unwrap_or_default().to_string();
        let reply = self
            .call(Method::GET, &["agent", "self"], &[], false, None)
            .await?;
        // agent/self needs `agent:read`, which a catalog token need not have: without it the
        // probe still reports the leader.
        let (datacenter, version) = if reply.status.is_success() {
            let agent = reply.json("GET /v1/agent/self")?;
            let s = |p: &str| agent.pointer(p).and_then(Value::as_str).map(str::to_string);
            (s("/Config/Datacenter"), s("/Config/Version"))
        } else if matches!(
            reply.status,
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED
        ) {
            (None, None)
        } else {
            return Err(reply.status_error("GET /v1/agent/self"));
        };
        if leader.is_empty() {
            return Err(BackendError::Unreachable(format!(
                "Consul at {} answers but has no cluster leader",
                reply.address
            )));
        }
        // The raft peers (`host:port` of each server's RPC): the cluster's members.
        let peers = self
            .get_json("GET /v1/status/peers", &["status", "peers"], &[])
            .await?;
        let mut members: Vec<String> = (peers.as_array().into_iter().flatten())
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect();
        members.sort();
        Ok(ServerInfo {
            address: Some(reply.address),
            leader: Some(leader),
            members,
            datacenter: self.datacenter.clone().or(datacenter),
            version,
            ..Default::default()
        })
    }

    /// `consul datacenter <dc> cluster <identity> node <node>`: the datacenter's name alone
    /// does not tell two clusters apart (`dc1` everywhere); see [`identity`].
    async fn location(&self) -> Result<String, BackendError> {
        let dc = match &self.datacenter {
            Some(dc) => dc.clone(),
            None => match self.probe().await?.datacenter {
                Some(dc) => dc,
                // Without `agent:read`: the agent's own datacenter comes first in the list
                // (sorted by round-trip time), which needs no ACL.
                None => self
                    .get_json(
                        "GET /v1/catalog/datacenters",
                        &["catalog", "datacenters"],
                        &[],
                    )
                    .await?
                    .get(0)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        BackendError::Protocol(
                            "GET /v1/catalog/datacenters named no datacenter".into(),
                        )
                    })?,
            },
        };
        let cluster = self.cluster_identity().await?;
        Ok(format!(
            "consul datacenter {dc} cluster {cluster} node {}",
            self.node
        ))
    }

    async fn watch_service(
        &self,
        name: &str,
        tx: tokio::sync::watch::Sender<ImportSnapshot>,
    ) -> Result<(), BackendError> {
        self.watch(name, tx).await
    }

    async fn lookup(&self, name: &str) -> Result<Vec<String>, BackendError> {
        let entries = self
            .get_json(
                &format!("GET /v1/health/service/{name}?passing"),
                &["health", "service", name],
                &[("passing", "")],
            )
            .await?;
        import::health_addresses(name, &entries)
    }
}
