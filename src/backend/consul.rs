//! Consul: exported instances live on one synthetic node, written through the catalog API in
//! `/v1/txn` batches, never through the agent API (an agent's anti-entropy would remove
//! services that do not run on it).
//!
//! A record is the part of a catalog entry this controller decides, in the exact shape Consul
//! returns it, so that what [`Consul::read_owned`] reconstructs compares equal to what
//! [`Consul::render`] produces when nothing changed:
//!
//! ```json
//! {"Service": {"ID": "<stable id>", "Service": "api_x", "Address": "10.0.0.1", "Port": 8080,
//!              "Tags": [], "Meta": {"catalog-bridge-owner": "…", "external-source": "kubernetes",
//!                                   "k8s-namespace": "shop", "k8s-service": "api-x"}},
//!  "Check": {"CheckID": "<stable id>:ready", "Name": "Kubernetes readiness",
//!            "Status": "passing", "ServiceID": "<stable id>", "ServiceName": "api_x"}}
//! ```
//!
//! Ownership is the service meta `catalog-bridge-owner`: services on the node without it (or
//! with another owner) are never read as ours, so never changed or deleted.
//!
//! Import ([`Consul::watch_service`]) follows `/v1/health/service/<name>?passing` with blocking
//! queries: an instance imports while all its checks and its node's pass, and entries carrying
//! this owner's meta (our own exports) never import.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

use super::{Backend, BackendError, ClientCert, External, ImportSnapshot, Record};
use crate::api::crd::ServerInfo;
use crate::model::Instance;
use crate::model::Op;
use crate::model::address::import_host;

/// At most this many operations in one `/v1/txn` request (the limit of older Consul servers),
/// counting every operation: node, service and check.
pub const MAX_TXN_OPS: usize = 64;
/// At most this many bytes of operations in one request (Consul's `txn_max_req_len` defaults
/// to 512 KiB); an instance whose operations alone exceed it still goes, alone.
pub const MAX_TXN_BYTES: usize = 256 * 1024;
/// Service meta key that marks the owner of an entry.
pub const OWNER_META: &str = "catalog-bridge-owner";
/// Service meta key naming the ExternalCatalog that wrote an entry: two ExternalCatalogs of one
/// owner on one Consul node (one for import only, say) each own only their own entries.
pub const CATALOG_META: &str = "catalog-bridge-catalog";
/// Meta key (node and service) that marks entries synced from Kubernetes.
pub const SOURCE_META: &str = "external-source";
pub const SOURCE_VALUE: &str = "kubernetes";
/// Name of the one check each exported instance carries.
pub const CHECK_NAME: &str = "Kubernetes readiness";
/// Address of the synthetic node (it runs no agent; the services carry their own addresses).
pub const NODE_ADDRESS: &str = "127.0.0.1";

/// Consul's limits on service meta (`agent/structs`): pairs per service, key and value length.
pub const MAX_META_PAIRS: usize = 64;
const MAX_META_KEY_LEN: usize = 128;
const MAX_META_VALUE_LEN: usize = 512;
/// The meta keys every record carries besides the instance's own.
const OWN_META_KEYS: usize = 5;

/// Why Consul would refuse this service meta pair (and with it the whole transaction that
/// carries it), or None when it is valid. For the layer that reads annotations and
/// registrations, to report a bad key where the user wrote it.
pub fn meta_problem(key: &str, value: &str) -> Option<String> {
    if key.is_empty() {
        return Some("a Consul meta key cannot be empty".into());
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Some(format!(
            "Consul meta key {key:?} may only hold letters, digits, '_' and '-'"
        ));
    }
    if key.len() > MAX_META_KEY_LEN {
        return Some(format!(
            "Consul meta key {key:?} is longer than {MAX_META_KEY_LEN} characters"
        ));
    }
    if key.starts_with("consul-") {
        return Some(format!(
            "Consul meta key {key:?}: the prefix consul- is reserved"
        ));
    }
    if value.len() > MAX_META_VALUE_LEN {
        return Some(format!(
            "Consul meta value of {key:?} is longer than {MAX_META_VALUE_LEN} characters"
        ));
    }
    None
}

/// Why each meta pair of an instance is left out of its Consul entry ([`Consul::record`]): the
/// pairs Consul would refuse, and those beyond its limit of pairs. Empty when all are kept.
pub fn dropped_meta(meta: &BTreeMap<String, String>) -> Vec<String> {
    let mut kept = 0;
    let mut dropped = Vec::new();
    for (k, v) in meta {
        if let Some(why) = meta_problem(k, v) {
            dropped.push(why);
        } else if kept == MAX_META_PAIRS - OWN_META_KEYS {
            dropped.push(format!(
                "Consul meta key {k:?} is beyond the {} pairs an entry can carry besides catalog-bridge's own",
                MAX_META_PAIRS - OWN_META_KEYS
            ));
        } else {
            kept += 1;
        }
    }
    dropped
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an import watch's blocking query waits for a change (`wait=`) before Consul
/// answers anyway; [`Consul::with_watch_wait`] changes it.
pub const WATCH_WAIT: Duration = Duration::from_secs(30);
/// Consul's own cap on `wait`.
const MAX_WATCH_WAIT: Duration = Duration::from_secs(600);
/// After a failed read, the watch retries after this, doubling up to [`WATCH_BACKOFF_MAX`].
pub const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Pause after an answer without a usable `X-Consul-Index` (missing or 0): the next query
/// cannot block, and without a pause the watch would spin.
pub const WATCH_NO_INDEX_PAUSE: Duration = Duration::from_secs(1);

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
            .finish()
    }
}

/// A Consul catalog reached over HTTP.
pub struct Consul {
    /// A client certificate is presented (for messages about refused handshakes).
    client_cert: bool,
    /// The addresses as configured (trailing `/` removed), for messages.
    addresses: Vec<String>,
    urls: Vec<Url>,
    datacenter: Option<String>,
    token: Option<String>,
    node: String,
    owner: String,
    catalog: String,
    http: reqwest::Client,
    /// Index of the address that answered last; requests start there.
    preferred: AtomicUsize,
    /// The node is known to exist with our address and meta; when false the next txn
    /// (re)registers it.
    node_ok: AtomicBool,
    /// Service ID → service name of the entries we own: a txn `delete` needs a name.
    names: Mutex<HashMap<String, String>>,
    /// `wait=` of the import watch's blocking queries.
    watch_wait: Duration,
}

impl std::fmt::Debug for Consul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consul")
            .field("addresses", &self.addresses)
            .field("datacenter", &self.datacenter)
            .field("node", &self.node)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// One answer of one address.
struct Reply {
    address: String,
    status: StatusCode,
    body: Vec<u8>,
    /// The `X-Consul-Index` header, when present and a number.
    index: Option<u64>,
}

impl Reply {
    fn text(&self) -> String {
        let t = String::from_utf8_lossy(&self.body);
        let t = t.trim();
        if t.chars().count() > 500 {
            format!("{}…", t.chars().take(500).collect::<String>())
        } else {
            t.to_string()
        }
    }

    fn json(&self, what: &str) -> Result<Value, BackendError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            BackendError::Protocol(format!(
                "{what} on {}: the answer is not JSON ({e}): {}",
                self.address,
                self.text()
            ))
        })
    }

    /// The error for an unexpected HTTP status.
    fn status_error(&self, what: &str) -> BackendError {
        let msg = format!(
            "{what} on {}: HTTP {}: {}",
            self.address,
            self.status.as_u16(),
            self.text()
        );
        match self.status {
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => BackendError::Unauthorized(msg),
            _ => BackendError::Rejected(msg),
        }
    }
}

/// The txn operations for a prefix of the plan.
struct Batch {
    ops: Vec<Value>,
    /// How many plan operations it covers.
    consumed: usize,
    with_node: bool,
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
        let mut addresses = Vec::with_capacity(cfg.addresses.len());
        let mut urls = Vec::with_capacity(cfg.addresses.len());
        for a in &cfg.addresses {
            let a = a.trim().trim_end_matches('/').to_string();
            let url = Url::parse(&a).with_context(|| {
                format!("Consul address {a:?} is not an http(s)://host:port URL")
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                bail!("Consul address {a:?} is not an http(s)://host:port URL");
            }
            if url.path() != "/" && !url.path().is_empty() {
                bail!("Consul address {a:?} must not have a path");
            }
            addresses.push(a);
            urls.push(url);
        }

        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("catalog-bridge/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &cfg.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .context("reading the Consul CA bundle (PEM)")?;
            if certs.is_empty() {
                bail!("the Consul CA bundle holds no PEM certificate");
            }
            builder = builder.tls_certs_only(certs);
        }
        if let Some(c) = &cfg.client_cert {
            let identity =
                reqwest::Identity::from_pem(&[&c.cert_pem[..], b"\n", &c.key_pem[..]].concat())
                    .context(
                        "reading the Consul client certificate and key (PEM: tls.crt, tls.key)",
                    )?;
            builder = builder.identity(identity);
        }
        if cfg.insecure_skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .context("building the HTTP client for Consul")?;

        Ok(Consul {
            addresses,
            urls,
            datacenter: cfg.datacenter.filter(|d| !d.is_empty()),
            token: cfg.token.filter(|t| !t.is_empty()),
            node: cfg.node_name,
            owner: cfg.owner,
            catalog: cfg.catalog,
            http,
            preferred: AtomicUsize::new(0),
            node_ok: AtomicBool::new(false),
            names: Mutex::default(),
            client_cert: cfg.client_cert.is_some(),
            watch_wait: WATCH_WAIT,
        })
    }

    /// Sets how long the import watch's blocking queries wait for a change (default
    /// [`WATCH_WAIT`], at most Consul's 10 minutes, at least 1 s). Their HTTP timeout is
    /// longer by Consul's jitter (wait/16) plus the usual request timeout.
    pub fn with_watch_wait(mut self, wait: Duration) -> Consul {
        self.watch_wait = wait.clamp(Duration::from_secs(1), MAX_WATCH_WAIT);
        self
    }

    /// Refuses to read or write entries without a node and an owner: with an empty owner,
    /// everything unmarked would look like ours.
    fn require_owner(&self) -> Result<(), BackendError> {
        if self.node.is_empty() || self.owner.is_empty() {
            return Err(BackendError::Rejected(format!(
                "this Consul client ({}) has no node name or owner id: it can look up \
                 services but not read or write exported entries",
                self.addresses.join(",")
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

    /// The ID of the check of the instance with service ID `service_id`.
    pub fn check_id(service_id: &str) -> String {
        format!("{service_id}:ready")
    }

    /// The record of one instance (see the module documentation). Meta pairs Consul would
    /// refuse ([`meta_problem`], and those beyond its 64 pairs) are left out: one of them
    /// would fail the whole transaction, and with it every other instance in it.
    pub fn record(&self, instance: &Instance) -> Record {
        let id = instance.stable_id();
        let mut meta: BTreeMap<String, String> = instance
            .meta
            .iter()
            .filter(|(k, v)| meta_problem(k, v).is_none())
            .take(MAX_META_PAIRS - OWN_META_KEYS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.insert(SOURCE_META.into(), SOURCE_VALUE.into());
        meta.insert(OWNER_META.into(), self.owner.clone());
        if !self.catalog.is_empty() {
            meta.insert(CATALOG_META.into(), self.catalog.clone());
        }
        meta.insert("k8s-namespace".into(), instance.origin.namespace.clone());
        meta.insert("k8s-service".into(), instance.origin.service.clone());
        json!({
            "Service": {
                "ID": id,
                "Service": instance.name,
                "Address": instance.address.to_string(),
                "Port": instance.port,
                "Tags": instance.tags,
                "Meta": meta,
            },
            "Check": {
                "CheckID": Self::check_id(&id),
                "Name": CHECK_NAME,
                "Status": "passing",
                "ServiceID": id,
                // Consul checks `service:write` on the check's service by this name: without
                // it, a token allowed to write only the exported names is refused.
                "ServiceName": instance.name,
            },
        })
    }

    /// The txn operation that registers the synthetic node.
    fn node_op(&self) -> Value {
        json!({"Node": {"Verb": "set", "Node": {
            "Node": self.node,
            "Address": NODE_ADDRESS,
            "Meta": {SOURCE_META: SOURCE_VALUE, OWNER_META: self.owner},
        }}})
    }

    fn known_name(&self, id: &str) -> Option<String> {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The txn operations of one plan operation: a service `set` and its check `set`, or a
    /// service `delete` (Consul removes the service's checks with it).
    fn txn_ops(&self, op: &Op) -> Result<Vec<Value>, BackendError> {
        match op {
            Op::Put { key, record } => {
                let service = record
                    .get("Service")
                    .filter(|s| s.is_object())
                    .ok_or_else(|| {
                        BackendError::Protocol(format!(
                            "record {key} is not a Consul record (no Service object): {record}"
                        ))
                    })?;
                if service.get("ID").and_then(Value::as_str) != Some(key.as_str()) {
                    return Err(BackendError::Protocol(format!(
                        "record {key} has Service.ID {} instead of its key",
                        service.get("ID").unwrap_or(&Value::Null)
                    )));
                }
                let mut out = vec![json!({"Service": {
                    "Verb": "set", "Node": self.node, "Service": service,
                }})];
                match record.get("Check") {
                    Some(Value::Object(check)) => {
                        let mut check = check.clone();
                        check.insert("Node".into(), Value::String(self.node.clone()));
                        out.push(json!({"Check": {"Verb": "set", "Check": check}}));
                    }
                    None | Some(Value::Null) => {}
                    Some(other) => {
                        return Err(BackendError::Protocol(format!(
                            "record {key} has a Check that is not an object: {other}"
                        )));
                    }
                }
                Ok(out)
            }
            Op::Delete { key } => {
                // Consul deletes by ID but insists on a non-empty name.
                let name = self.known_name(key).unwrap_or_else(|| key.clone());
                Ok(vec![json!({"Service": {
                    "Verb": "delete", "Node": self.node,
                    "Service": {"ID": key, "Service": name},
                }})])
            }
        }
    }

    /// The next txn from the start of `ops`: as many whole plan operations as fit in
    /// [`MAX_TXN_OPS`] operations and [`MAX_TXN_BYTES`], after the node registration when
    /// `with_node`. Always covers at least one plan operation when `ops` is not empty.
    fn next_batch(&self, ops: &[Op], with_node: bool) -> Result<Batch, BackendError> {
        let mut batch = Batch {
            ops: Vec::new(),
            consumed: 0,
            with_node,
        };
        let mut bytes = 0;
        if with_node {
            let node = self.node_op();
            bytes += node.to_string().len();
            batch.ops.push(node);
        }
        for op in ops {
            let unit = self.txn_ops(op)?;
            let unit_bytes: usize = unit.iter().map(|v| v.to_string().len() + 1).sum();
            let fits =
                batch.ops.len() + unit.len() <= MAX_TXN_OPS && bytes + unit_bytes <= MAX_TXN_BYTES;
            if !fits && batch.consumed > 0 {
                break;
            }
            bytes += unit_bytes;
            batch.ops.extend(unit);
            batch.consumed += 1;
        }
        Ok(batch)
    }

    /// The txn request bodies `apply` sends for `ops`, in order, the first one registering the
    /// node when `include_node`. No request holds more than [`MAX_TXN_OPS`] operations, and an
    /// instance's service and check are never split.
    pub fn txn_batches(
        &self,
        ops: &[Op],
        include_node: bool,
    ) -> Result<Vec<Vec<Value>>, BackendError> {
        let mut out = Vec::new();
        let mut next = 0;
        let mut with_node = include_node;
        while next < ops.len() {
            let b = self.next_batch(&ops[next..], with_node)?;
            next += b.consumed;
            out.push(b.ops);
            with_node = false;
        }
        Ok(out)
    }

    /// The owned records in the answers of `/v1/catalog/node-services/<node>` and
    /// `/v1/health/node/<node>`, and whether the node is registered as we register it.
    fn owned_records(
        &self,
        node_services: &Value,
        checks: &Value,
    ) -> Result<(bool, BTreeMap<String, Record>), BackendError> {
        let node = node_services.get("Node").unwrap_or(&Value::Null);
        let node_ok = node.is_object()
            && node.get("Address").and_then(Value::as_str) == Some(NODE_ADDRESS)
            && node
                .pointer(&format!("/Meta/{SOURCE_META}"))
                .and_then(Value::as_str)
                == Some(SOURCE_VALUE)
            && node
                .pointer(&format!("/Meta/{OWNER_META}"))
                .and_then(Value::as_str)
                == Some(self.owner.as_str());

        let services = match node_services.get("Services") {
            None | Some(Value::Null) => return Ok((node_ok, BTreeMap::new())),
            Some(Value::Array(s)) => s,
            Some(other) => {
                return Err(BackendError::Protocol(format!(
                    "node-services of {}: Services is not a list: {other}",
                    self.node
                )));
            }
        };
        let checks: &[Value] = match checks {
            Value::Array(c) => c,
            Value::Null => &[],
            other => {
                return Err(BackendError::Protocol(format!(
                    "health of node {}: not a list of checks: {other}",
                    self.node
                )));
            }
        };
        let mut checks_by_id: HashMap<&str, &Value> = HashMap::new();
        for c in checks {
            if let Some(id) = c.get("CheckID").and_then(Value::as_str) {
                checks_by_id.insert(id, c);
            }
        }

        let mut out = BTreeMap::new();
        for s in services {
            let meta = |key: &str| {
                s.get("Meta")
                    .and_then(|m| m.get(key))
                    .and_then(Value::as_str)
            };
            if meta(OWNER_META) != Some(self.owner.as_str()) {
                continue;
            }
            // Written by another ExternalCatalog of this owner on the same node. (Entries
            // without the key predate it and are this catalog's; a backend without a catalog
            // name owns every entry of its owner.)
            if !self.catalog.is_empty() && meta(CATALOG_META).is_some_and(|c| c != self.catalog) {
                continue;
            }
            let field = |name: &str| {
                s.get(name).ok_or_else(|| {
                    BackendError::Protocol(format!(
                        "a service on node {} has no {name}: {s}",
                        self.node
                    ))
                })
            };
            let id = field("ID")?.as_str().unwrap_or_default().to_string();
            if id.is_empty() {
                return Err(BackendError::Protocol(format!(
                    "a service on node {} has no ID: {s}",
                    self.node
                )));
            }
            let or_empty = |name: &str, empty: Value| match s.get(name) {
                None | Some(Value::Null) => empty,
                Some(v) => v.clone(),
            };
            let service = json!({
                "ID": id,
                "Service": field("Service")?,
                "Address": or_empty("Address", json!("")),
                "Port": or_empty("Port", json!(0)),
                "Tags": or_empty("Tags", json!([])),
                "Meta": or_empty("Meta", json!({})),
            });
            let check = match checks_by_id.get(Self::check_id(&id).as_str()) {
                Some(c) if c.get("ServiceID").and_then(Value::as_str) == Some(id.as_str()) => {
                    let pick = |k: &str| c.get(k).cloned().unwrap_or(Value::Null);
                    json!({
                        "CheckID": pick("CheckID"),
                        "Name": pick("Name"),
                        "Status": pick("Status"),
                        "ServiceID": pick("ServiceID"),
                        "ServiceName": pick("ServiceName"),
                    })
                }
                _ => Value::Null,
            };
            out.insert(id, json!({"Service": service, "Check": check}));
        }
        Ok((node_ok, out))
    }

    fn remember_names<'a>(&self, entries: impl IntoIterator<Item = (&'a String, &'a Record)>) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        for (id, record) in entries {
            if let Some(name) = record.pointer("/Service/Service").and_then(Value::as_str) {
                names.insert(id.clone(), name.to_string());
            }
        }
    }

    /// Sends one request to the first address that answers, starting with the one that
    /// answered last. Any HTTP status counts as an answer; only transport failures move on.
    async fn call(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        with_dc: bool,
        body: Option<&Value>,
    ) -> Result<Reply, BackendError> {
        self.call_with_timeout(method, path, query, with_dc, body, None)
            .await
    }

    /// [`Consul::call`] with a request timeout other than the client's (a blocking query
    /// waits longer than [`REQUEST_TIMEOUT`]).
    async fn call_with_timeout(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        with_dc: bool,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<Reply, BackendError> {
        let n = self.urls.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let mut url = self.urls[idx].clone();
            if let Ok(mut segs) = url.path_segments_mut() {
                segs.pop_if_empty().push("v1").extend(path);
            }
            {
                let mut q = url.query_pairs_mut();
                for (k, v) in query {
                    if v.is_empty() {
                        q.append_key_only(k);
                    } else {
                        q.append_pair(k, v);
                    }
                }
                if with_dc && let Some(dc) = &self.datacenter {
                    q.append_pair("dc", dc);
                }
            }
            if url.query() == Some("") {
                url.set_query(None);
            }
            let mut req = self.http.request(method.clone(), url);
            if let Some(t) = &self.token {
                req = req.header("X-Consul-Token", t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            let sent = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let index = resp
                        .headers()
                        .get("X-Consul-Index")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    resp.bytes().await.map(|b| (status, b.to_vec(), index))
                }
                Err(e) => Err(e),
            };
            match sent {
                Ok((status, body, index)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(Reply {
                        address: self.addresses[idx].clone(),
                        status,
                        body,
                        index,
                    });
                }
                Err(e) => {
                    let mut why = transport_error(&e);
                    // A Consul that verifies clients either says so (an alert) or just closes
                    // the connection, depending on timing: name the setting either way.
                    if !self.client_cert
                        && self.urls[idx].scheme() == "https"
                        && super::transport::may_want_client_cert(&why)
                    {
                        why.push_str(
                            "; Consul may require a client certificate (tls.clientCertSecretRef)",
                        );
                    }
                    tracing::debug!(address = %self.addresses[idx], error = %why, "Consul address failed");
                    failures.push(format!("{} ({why})", self.addresses[idx]));
                }
            }
        }
        Err(BackendError::Unreachable(format!(
            "no Consul address answered: {}",
            failures.join(", ")
        )))
    }

    async fn get_json(
        &self,
        what: &str,
        path: &[&str],
        query: &[(&str, &str)],
    ) -> Result<(String, Value), BackendError> {
        let reply = self.call(Method::GET, path, query, true, None).await?;
        if !reply.status.is_success() {
            return Err(reply.status_error(what));
        }
        Ok((reply.address.clone(), reply.json(what)?))
    }

    /// Sends one txn. `Ok(Err(missing_node))` when Consul refused it only because the node
    /// is not registered.
    async fn send_txn(&self, ops: &[Value]) -> Result<(), TxnFailure> {
        let body = Value::Array(ops.to_vec());
        let reply = self
            .call(Method::PUT, &["txn"], &[], true, Some(&body))
            .await
            .map_err(TxnFailure::Other)?;
        if reply.status.is_success() {
            return Ok(());
        }
        if reply.status == StatusCode::CONFLICT {
            let errors = txn_errors(&reply.body, ops);
            if let Some(errors) = errors {
                let missing_node = errors
                    .iter()
                    .any(|(_, what)| what.contains("Missing node registration"));
                let text = errors
                    .iter()
                    .map(|(op, what)| format!("{op}: {what}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let err = BackendError::Rejected(format!(
                    "Consul at {} rejected the transaction of {} operation(s) on node {}: {text}",
                    reply.address,
                    ops.len(),
                    self.node
                ));
                return Err(if missing_node {
                    TxnFailure::MissingNode(err)
                } else {
                    TxnFailure::Other(err)
                });
            }
        }
        Err(TxnFailure::Other(reply.status_error("PUT /v1/txn")))
    }
}

impl Consul {
    /// One read of the healthy instances of `name`: a blocking query from `index` (a plain
    /// read when 0). Returns the entries and the answer's `X-Consul-Index`.
    async fn read_passing(
        &self,
        name: &str,
        index: u64,
    ) -> Result<(Value, Option<u64>), BackendError> {
        let index_s = index.to_string();
        let wait_s = format!("{}ms", self.watch_wait.as_millis());
        let mut query = vec![("passing", "")];
        if index > 0 {
            query.push(("index", index_s.as_str()));
            query.push(("wait", wait_s.as_str()));
        }
        let timeout = self.watch_wait + self.watch_wait / 16 + REQUEST_TIMEOUT;
        let what = format!("GET /v1/health/service/{name}?passing");
        let reply = self
            .call_with_timeout(
                Method::GET,
                &["health", "service", name],
                &query,
                true,
                None,
                Some(timeout),
            )
            .await
            .map_err(|e| match e {
                BackendError::Unreachable(m) => {
                    BackendError::Unreachable(format!("watching Consul service {name}: {m}"))
                }
                other => other,
            })?;
        if !reply.status.is_success() {
            return Err(reply.status_error(&what));
        }
        Ok((reply.json(&what)?, reply.index))
    }
}

/// The index of the next blocking query after an answer with `got` to a query from `sent`,
/// by Consul's rules, and whether to pause before it: an index that went backwards (the
/// catalog was reset or another server answered) starts again from 0; a missing or zero index
/// cannot block, so the watch pauses instead of spinning; an unchanged one is simply reused.
fn next_index(sent: u64, got: Option<u64>) -> (u64, bool) {
    match got {
        None | Some(0) => (0, true),
        Some(i) if i < sent => (0, false),
        Some(i) => (i, false),
    }
}

/// The instances an answer imports, and the entries skipped with why.
type Imported = (Vec<External>, Vec<(String, String)>);

/// What one `/v1/health/service/<name>?passing` answer imports: the instances, sorted, and
/// the entries that cannot be used, with why. Entries whose owner meta is `owner` (this
/// controller's own exports) are left out of both. The id is the service ID, prefixed with
/// `<node>/` when that ID is on more than one node.
fn import_entries(name: &str, owner: &str, entries: &Value) -> Result<Imported, BackendError> {
    let entries = match entries {
        Value::Array(e) => e.as_slice(),
        Value::Null => &[],
        other => {
            return Err(BackendError::Protocol(format!(
                "health of service {name}: not a list: {other}"
            )));
        }
    };
    let str_at = |e: &Value, p: &str| -> String {
        e.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut nodes_of_id: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for e in entries {
        nodes_of_id
            .entry(str_at(e, "/Service/ID"))
            .or_default()
            .insert(str_at(e, "/Node/Node"));
    }
    let mut instances = Vec::with_capacity(entries.len());
    let mut skipped = Vec::new();
    for (n, e) in entries.iter().enumerate() {
        let node = str_at(e, "/Node/Node");
        let sid = str_at(e, "/Service/ID");
        let id = if sid.is_empty() {
            format!("{node}/entry-{n}")
        } else if nodes_of_id.get(&sid).is_some_and(|nodes| nodes.len() > 1) {
            format!("{node}/{sid}")
        } else {
            sid.clone()
        };
        let Some(service) = e.get("Service").filter(|s| s.is_object()) else {
            skipped.push((id, "the entry has no Service object".to_string()));
            continue;
        };
        let entry_owner = service
            .pointer(&format!("/Meta/{OWNER_META}"))
            .and_then(Value::as_str);
        if !owner.is_empty() && entry_owner == Some(owner) {
            continue;
        }
        if sid.is_empty() {
            skipped.push((id, "the service has no ID".to_string()));
            continue;
        }
        let service_addr = str_at(e, "/Service/Address");
        let host = if service_addr.is_empty() {
            str_at(e, "/Node/Address")
        } else {
            service_addr
        };
        if host.is_empty() {
            skipped.push((
                id,
                "no address: Service.Address and Node.Address are empty".to_string(),
            ));
            continue;
        }
        let host = match import_host(&host) {
            Ok(h) => h,
            Err(why) => {
                skipped.push((id, why));
                continue;
            }
        };
        let port = match service.get("Port") {
            None | Some(Value::Null) => {
                skipped.push((id, "no port".to_string()));
                continue;
            }
            Some(p) => match p.as_u64().map(u16::try_from) {
                Some(Ok(p)) if p > 0 => p,
                _ => {
                    skipped.push((id, format!("port {p} is not in 1-65535")));
                    continue;
                }
            },
        };
        instances.push(External {
            address: host,
            port,
            id,
        });
    }
    instances.sort();
    skipped.sort();
    Ok((instances, skipped))
}

enum TxnFailure {
    MissingNode(BackendError),
    Other(BackendError),
}

/// `(operation, message)` of each error of a 409 txn answer, or None when it has none.
fn txn_errors(body: &[u8], ops: &[Value]) -> Option<Vec<(String, String)>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let errors = v.get("Errors")?.as_array()?;
    if errors.is_empty() {
        return None;
    }
    Some(
        errors
            .iter()
            .map(|e| {
                let what = e
                    .get("What")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string();
                let op = e
                    .get("OpIndex")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| ops.get(i).map(|op| (i, op)))
                    .map(|(i, op)| format!("op {i} ({})", describe_op(op)))
                    .unwrap_or_else(|| "op ?".into());
                (op, what)
            })
            .collect(),
    )
}

/// `service set api-x-…`, `check set api-x-…:ready`, `node set k8s-x`.
fn describe_op(op: &Value) -> String {
    let Some((kind, inner)) = op.as_object().and_then(|o| o.iter().next()) else {
        return "?".into();
    };
    let verb = inner.get("Verb").and_then(Value::as_str).unwrap_or("?");
    let id = match kind.as_str() {
        "Service" => inner.pointer("/Service/ID"),
        "Check" => inner.pointer("/Check/CheckID"),
        "Node" => inner.pointer("/Node/Node"),
        _ => None,
    }
    .and_then(Value::as_str)
    .unwrap_or("?");
    format!("{} {verb} {id}", kind.to_lowercase())
}

/// What went wrong with one address, briefly: `connection refused`, `timed out`, or the
/// innermost error.
fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut innermost = e.to_string();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => return "connection reset".into(),
                std::io::ErrorKind::TimedOut => return "timed out".into(),
                _ => {}
            }
        }
        innermost = s.to_string();
        source = s.source();
    }
    innermost
}

/// `host:port` as a client dials it: IPv6 in brackets.
fn dial_address(host: &str, port: u64) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => match u16::try_from(port) {
            Ok(p) => SocketAddr::new(ip, p).to_string(),
            Err(_) if ip.is_ipv6() => format!("[{ip}]:{port}"),
            Err(_) => format!("{ip}:{port}"),
        },
        Err(_) if host.contains(':') => format!("[{host}]:{port}"),
        Err(_) => format!("{host}:{port}"),
    }
}

/// `host:port` of every entry of a `/v1/health/service/<name>` answer, sorted.
fn health_addresses(name: &str, entries: &Value) -> Result<Vec<String>, BackendError> {
    let entries = match entries {
        Value::Array(e) => e.as_slice(),
        Value::Null => &[],
        other => {
            return Err(BackendError::Protocol(format!(
                "health of service {name}: not a list: {other}"
            )));
        }
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let service_addr = e
            .pointer("/Service/Address")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let host = if service_addr.is_empty() {
            e.pointer("/Node/Address")
                .and_then(Value::as_str)
                .unwrap_or_default()
        } else {
            service_addr
        };
        let port = e.pointer("/Service/Port").and_then(Value::as_u64);
        match port {
            Some(port) if !host.is_empty() => out.push(dial_address(host, port)),
            _ => {
                return Err(BackendError::Protocol(format!(
                    "health of service {name}: an entry without address or port: {e}"
                )));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[async_trait]
impl Backend for Consul {
    fn kind(&self) -> &'static str {
        "consul"
    }

    fn describe(&self) -> String {
        let mut s = format!("consul {} node {}", self.addresses.join(","), self.node);
        if let Some(dc) = &self.datacenter {
            s.push_str(&format!(" dc {dc}"));
        }
        s
    }

    fn render(&self, instances: &[Instance]) -> BTreeMap<String, Record> {
        instances
            .iter()
            .map(|i| (i.stable_id(), self.record(i)))
            .collect()
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
            s if s.is_success() => reply.json(&what)?,
            _ => return Err(reply.status_error(&what)),
        };
        let services_present = node_services
            .get("Services")
            .and_then(Value::as_array)
            .is_some_and(|s| !s.is_empty());
        let checks = if services_present {
            let what = format!("GET /v1/health/node/{}", self.node);
            self.get_json(&what, &["health", "node", &self.node], &[])
                .await?
                .1
        } else {
            Value::Null
        };
        let (node_ok, owned) = self.owned_records(&node_services, &checks)?;
        self.node_ok.store(node_ok, Ordering::SeqCst);
        self.remember_names(&owned);
        Ok(owned)
    }

    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError> {
        if ops.is_empty() {
            return Ok(0);
        }
        self.require_owner()?;
        let mut next = 0;
        let mut trips = 0;
        let mut retried = false;
        while next < ops.len() {
            let with_node = !self.node_ok.load(Ordering::SeqCst);
            let batch = self.next_batch(&ops[next..], with_node)?;
            trips += 1;
            match self.send_txn(&batch.ops).await {
                Ok(()) => {
                    if batch.with_node {
                        self.node_ok.store(true, Ordering::SeqCst);
                    }
                    let done = &ops[next..next + batch.consumed];
                    {
                        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
                        for op in done {
                            match op {
                                Op::Put { key, record } => {
                                    if let Some(n) =
                                        record.pointer("/Service/Service").and_then(Value::as_str)
                                    {
                                        names.insert(key.clone(), n.to_string());
                                    }
                                }
                                Op::Delete { key } => {
                                    names.remove(key);
                                }
                            }
                        }
                    }
                    tracing::debug!(
                        node = %self.node,
                        operations = batch.ops.len(),
                        entries = batch.consumed,
                        "Consul txn committed"
                    );
                    next += batch.consumed;
                }
                // The node went away (a Consul that lost its state): register it and retry
                // once; the txn was rolled back as a whole.
                Err(TxnFailure::MissingNode(e)) if !batch.with_node && !retried => {
                    tracing::info!(node = %self.node, error = %e, "Consul node missing, registering it again");
                    self.node_ok.store(false, Ordering::SeqCst);
                    retried = true;
                }
                Err(TxnFailure::MissingNode(e)) | Err(TxnFailure::Other(e)) => {
                    if matches!(e, BackendError::Unreachable(_)) {
                        // Unknown whether it committed; re-register the node next time.
                        self.node_ok.store(false, Ordering::SeqCst);
                    }
                    return Err(e);
                }
            }
        }
        Ok(trips)
    }

    /// Deregisters the synthetic node when no service is left on it and its meta names this
    /// owner as the one that registered it. A node shared by several owners (the same
    /// `nodeName` in two clusters) stays while any of them has a service there.
    async fn retire(&self) -> Result<Option<String>, BackendError> {
        self.require_owner()?;
        let what = format!("GET /v1/catalog/node/{}", self.node);
        let reply = self
            .call(
                Method::GET,
                &["catalog", "node", &self.node],
                &[],
                true,
                None,
            )
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !reply.status.is_success() {
            return Err(reply.status_error(&what));
        }
        let node: Value = reply.json(&what)?;
        let services = node
            .get("Services")
            .and_then(Value::as_object)
            .map_or(0, |s| s.len());
        let registered_by = node.pointer(&format!("/Node/Meta/{OWNER_META}"));
        if node.get("Node").is_none_or(Value::is_null)
            || services > 0
            || registered_by.and_then(Value::as_str) != Some(self.owner.as_str())
        {
            return Ok(None);
        }
        let mut body = json!({"Node": self.node});
        if let Some(dc) = &self.datacenter {
            body["Datacenter"] = Value::String(dc.clone());
        }
        let what = format!("PUT /v1/catalog/deregister node {}", self.node);
        let reply = self
            .call(
                Method::PUT,
                &["catalog", "deregister"],
                &[],
                true,
                Some(&body),
            )
            .await?;
        if !reply.status.is_success() {
            return Err(reply.status_error(&what));
        }
        self.node_ok.store(false, Ordering::SeqCst);
        Ok(Some(format!("deregistered the empty node {}", self.node)))
    }

    async fn probe(&self) -> Result<ServerInfo, BackendError> {
        let (_, leader) = self
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
            return Err(BackendError::Rejected(format!(
                "Consul at {} answers but has no cluster leader",
                reply.address
            )));
        }
        Ok(ServerInfo {
            address: Some(reply.address),
            leader: Some(leader),
            datacenter: self.datacenter.clone().or(datacenter),
            version,
            ..Default::default()
        })
    }

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
                    .1
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
        Ok(format!("consul datacenter {dc} node {}", self.node))
    }

    /// Blocking queries on `/v1/health/service/<name>?passing` (see [`next_index`] for how the
    /// index moves); after a failed read the next query is a plain one from index 0, so a
    /// Consul that came back empty is read at once.
    async fn watch_service(
        &self,
        name: &str,
        tx: tokio::sync::watch::Sender<ImportSnapshot>,
    ) -> Result<(), BackendError> {
        let mut index = 0u64;
        let mut backoff = WATCH_BACKOFF_MIN;
        let mut failing = false;
        loop {
            if tx.is_closed() {
                return Ok(());
            }
            let read = tokio::select! {
                biased;
                () = tx.closed() => return Ok(()),
                r = self.read_passing(name, index) => r,
            };
            let read = read.and_then(|(entries, got)| {
                let (instances, skipped) = import_entries(name, &self.owner, &entries)?;
                Ok((instances, skipped, got))
            });
            let pause = match read {
                Ok((instances, skipped, got)) => {
                    if failing {
                        tracing::info!(service = name, "Consul import watch reads again");
                        failing = false;
                    }
                    backoff = WATCH_BACKOFF_MIN;
                    let next = ImportSnapshot {
                        instances,
                        skipped,
                        error: None,
                        synced: true,
                    };
                    tx.send_if_modified(|snap| {
                        if *snap == next {
                            false
                        } else {
                            *snap = next;
                            true
                        }
                    });
                    let (next_index, pause) = next_index(index, got);
                    if pause {
                        tracing::debug!(service = name, index = ?got, "Consul answered without a usable X-Consul-Index");
                    }
                    index = next_index;
                    pause.then_some(WATCH_NO_INDEX_PAUSE)
                }
                Err(e) => {
                    if failing {
                        tracing::debug!(service = name, error = %e, "Consul import watch still failing");
                    } else {
                        tracing::warn!(service = name, error = %e, "Consul import watch failed; keeping the last instances");
                        failing = true;
                    }
                    tx.send_if_modified(|snap| {
                        if snap.error.as_ref() == Some(&e) {
                            false
                        } else {
                            snap.error = Some(e);
                            true
                        }
                    });
                    index = 0;
                    let pause = backoff;
                    backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                    Some(pause)
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = tx.closed() => return Ok(()),
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    async fn lookup(&self, name: &str) -> Result<Vec<String>, BackendError> {
        let (_, entries) = self
            .get_json(
                &format!("GET /v1/health/service/{name}?passing"),
                &["health", "service", name],
                &[("passing", "")],
            )
            .await?;
        health_addresses(name, &entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Origin;

    fn consul() -> Consul {
        Consul::new(ConsulConfig {
            addresses: vec!["http://127.0.0.1:8500/".into()],
            node_name: "k8s-c1".into(),
            owner: "c1".into(),
            catalog: "consul".into(),
            ..Default::default()
        })
        .expect("valid config")
    }

    fn inst(ip: &str, tags: &[&str]) -> Instance {
        Instance {
            name: "api_x".into(),
            address: ip.parse().expect("test ip"),
            port: 8080,
            origin: Origin {
                namespace: "shop".into(),
                service: "api-x".into(),
            },
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: BTreeMap::from([
                ("version".to_string(), "1".to_string()),
                (OWNER_META.to_string(), "spoofed".to_string()),
            ]),
        }
    }

    fn puts(c: &Consul, n: usize) -> Vec<Op> {
        let instances: Vec<Instance> = (0..n)
            .map(|i| inst(&format!("10.1.{}.{}", i / 250, i % 250 + 1), &[]))
            .collect();
        c.render(&instances)
            .into_iter()
            .map(|(key, record)| Op::Put { key, record })
            .collect()
    }

    #[test]
    fn config_is_checked_without_contacting_anything() {
        let bad = |cfg: ConsulConfig| Consul::new(cfg).is_err();
        let ok = ConsulConfig {
            addresses: vec!["http://127.0.0.1:1".into()],
            node_name: "n".into(),
            owner: "o".into(),
            ..Default::default()
        };
        assert!(Consul::new(ok.clone()).is_ok(), "a dead address is fine");
        assert!(bad(ConsulConfig {
            addresses: vec![],
            ..ok.clone()
        }));
        assert!(bad(ConsulConfig {
            addresses: vec!["consul:8500".into()],
            ..ok.clone()
        }));
        assert!(bad(ConsulConfig {
            addresses: vec!["http://consul:8500/x".into()],
            ..ok.clone()
        }));
        assert!(bad(ConsulConfig {
            owner: " o".into(),
            ..ok.clone()
        }));
        assert!(bad(ConsulConfig {
            ca_pem: Some(b"not pem".to_vec()),
            ..ok.clone()
        }));
        assert!(bad(ConsulConfig {
            client_cert: Some(ClientCert {
                cert_pem: b"not pem".to_vec(),
                key_pem: b"not pem either".to_vec(),
            }),
            ..ok.clone()
        }));
        let dbg = format!(
            "{:?}",
            ConsulConfig {
                token: Some("secret-token".into()),
                ..ok
            }
        );
        assert!(!dbg.contains("secret-token"), "{dbg}");
    }

    #[tokio::test]
    async fn a_client_without_owner_only_looks_up() {
        let c = Consul::new(ConsulConfig {
            addresses: vec!["http://127.0.0.1:1".into()],
            ..Default::default()
        })
        .expect("a lookup-only client");
        assert!(matches!(
            c.read_owned().await,
            Err(BackendError::Rejected(_))
        ));
        let ops = [Op::Delete { key: "x".into() }];
        assert!(matches!(
            c.apply(&ops).await,
            Err(BackendError::Rejected(_))
        ));
        assert_eq!(c.apply(&[]).await, Ok(0));
        // Lookups go to Consul (here: nobody answers).
        assert!(matches!(
            c.lookup("x").await,
            Err(BackendError::Unreachable(_))
        ));
    }

    #[test]
    fn render_holds_identity_address_tags_meta_and_a_passing_check() {
        let c = consul();
        let i = inst("fd00::1", &["b", "a"]);
        let recs = c.render(std::slice::from_ref(&i));
        let id = i.stable_id();
        assert_eq!(recs.len(), 1);
        assert_eq!(
            recs[&id],
            json!({
                "Service": {
                    "ID": id, "Service": "api_x", "Address": "fd00::1", "Port": 8080,
                    "Tags": ["b", "a"],
                    "Meta": {"version": "1", "catalog-bridge-owner": "c1",
                             "catalog-bridge-catalog": "consul",
                             "external-source": "kubernetes", "k8s-namespace": "shop",
                             "k8s-service": "api-x"},
                },
                "Check": {"CheckID": format!("{id}:ready"), "Name": CHECK_NAME,
                          "Status": "passing", "ServiceID": id, "ServiceName": "api_x"},
            })
        );
        assert_eq!(c.describe(), "consul http://127.0.0.1:8500 node k8s-c1");
    }

    #[test]
    fn meta_consul_would_refuse_is_left_out() {
        assert_eq!(meta_problem("ok_key-1", "v"), None);
        for (k, v) in [
            ("a.b", "1"),
            ("", "1"),
            ("consul-x", "1"),
            ("has space", "1"),
        ] {
            assert!(meta_problem(k, v).is_some(), "{k:?}");
        }
        assert!(meta_problem(&"k".repeat(129), "").is_some());
        let mut meta: BTreeMap<String, String> = (0..62)
            .map(|i| (format!("k{i:02}"), "v".to_string()))
            .collect();
        meta.insert("app.kubernetes.io/name".into(), "x".into());
        let dropped = dropped_meta(&meta);
        assert_eq!(dropped.len(), 4, "{dropped:?}");
        assert!(dropped[0].contains("app.kubernetes.io/name"), "{dropped:?}");
        assert!(
            dropped[1].contains("\"k59\"")
                && dropped[2].contains("\"k60\"")
                && dropped[3].contains("\"k61\"")
        );
        assert!(dropped_meta(&BTreeMap::new()).is_empty());
        assert!(meta_problem("k", &"v".repeat(513)).is_some());

        let c = consul();
        let mut i = inst("10.0.0.1", &[]);
        i.meta.clear();
        i.meta.insert("app.kubernetes.io/name".into(), "x".into());
        i.meta.insert("consul-version".into(), "1".into());
        i.meta.insert("team".into(), "shop".into());
        let r = c.record(&i);
        let keys: Vec<&String> = r["Service"]["Meta"]
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        assert_eq!(
            keys,
            [
                "catalog-bridge-catalog",
                "catalog-bridge-owner",
                "external-source",
                "k8s-namespace",
                "k8s-service",
                "team"
            ]
        );
        for n in 0..100 {
            i.meta.insert(format!("k{n:03}"), "v".into());
        }
        let r = c.record(&i);
        assert_eq!(
            r["Service"]["Meta"].as_object().map(|m| m.len()),
            Some(MAX_META_PAIRS)
        );
    }

    #[test]
    fn what_consul_returns_reads_back_as_the_rendered_record() {
        let c = consul();
        let i = inst("10.0.0.1", &[]);
        let mut no_meta = inst("10.0.0.2", &[]);
        no_meta.meta.clear();
        let rendered = c.render(&[i.clone(), no_meta.clone()]);
        // As Consul 1.14 answers: extra fields, Tags [] even when omitted, foreign services.
        let as_consul = |r: &Record| {
            let mut s = r["Service"].clone();
            s["Weights"] = json!({"Passing": 1, "Warning": 1});
            s["CreateIndex"] = json!(18);
            s
        };
        let node_services = json!({
            "Node": {"Node": "k8s-c1", "Address": "127.0.0.1",
                     "Meta": {"external-source": "kubernetes", "catalog-bridge-owner": "c1"}},
            "Services": [
                as_consul(&rendered[&i.stable_id()]),
                as_consul(&rendered[&no_meta.stable_id()]),
                {"ID": "by-hand", "Service": "api_x", "Tags": null, "Meta": null,
                 "Address": "10.9.9.9", "Port": 1},
                {"ID": "other", "Service": "api_x", "Tags": [], "Address": "10.9.9.8",
                 "Port": 1, "Meta": {"catalog-bridge-owner": "c2"}},
            ],
        });
        let check = |id: &str, status: &str| {
            json!({"Node": "k8s-c1", "CheckID": format!("{id}:ready"), "Name": CHECK_NAME,
                   "Status": status, "ServiceID": id, "ServiceName": "api_x", "Output": "",
                   "ServiceTags": []})
        };
        let checks = json!([
            check(&i.stable_id(), "passing"),
            check(&no_meta.stable_id(), "passing")
        ]);
        let (node_ok, owned) = c.owned_records(&node_services, &checks).expect("parses");
        assert!(node_ok);
        assert_eq!(owned, rendered);
        assert!(crate::export::plan::plan(&rendered, &owned).is_empty());

        // A check that is not passing, or missing, is drift that a put repairs.
        let checks = json!([check(&i.stable_id(), "critical")]);
        let (_, owned) = c.owned_records(&node_services, &checks).expect("parses");
        let p = crate::export::plan::plan(&rendered, &owned);
        assert_eq!((p.creates, p.updates, p.deletes), (0, 2, 0));

        // Null Tags and Meta read as empty ones.
        let odd = json!({"Node": null, "Services": [{"ID": "x", "Service": "s", "Tags": null,
            "Meta": {"catalog-bridge-owner": "c1"}, "Address": "10.0.0.3", "Port": 1}]});
        let (node_ok, owned) = c.owned_records(&odd, &Value::Null).expect("parses");
        assert!(!node_ok);
        assert_eq!(owned["x"]["Service"]["Tags"], json!([]));
        assert_eq!(owned["x"]["Check"], Value::Null);

        // A missing node is an empty catalog; a node registered differently gets re-registered.
        let (node_ok, owned) = c
            .owned_records(&json!({"Node": null, "Services": null}), &json!([]))
            .expect("parses");
        assert!(!node_ok && owned.is_empty());
        let (node_ok, _) = c
            .owned_records(
                &json!({"Node": {"Address": "127.0.0.1", "Meta": {}}, "Services": []}),
                &json!([]),
            )
            .expect("parses");
        assert!(!node_ok);
    }

    #[test]
    fn put_becomes_service_and_check_set_delete_a_service_delete() {
        let c = consul();
        let ops = puts(&c, 1);
        let Op::Put { key, .. } = &ops[0] else {
            panic!("a put")
        };
        let key = key.clone();
        let mut all = ops.clone();
        all.push(Op::Delete {
            key: "gone-1".into(),
        });
        let batches = c.txn_batches(&all, true).expect("valid records");
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(b.len(), 4);
        assert_eq!(
            b[0],
            json!({"Node": {"Verb": "set", "Node": {"Node": "k8s-c1", "Address": "127.0.0.1",
                "Meta": {"external-source": "kubernetes", "catalog-bridge-owner": "c1"}}}})
        );
        assert_eq!(b[1]["Service"]["Verb"], "set");
        assert_eq!(b[1]["Service"]["Node"], "k8s-c1");
        assert_eq!(b[1]["Service"]["Service"]["ID"], json!(key));
        assert_eq!(b[2]["Check"]["Verb"], "set");
        assert_eq!(b[2]["Check"]["Check"]["Node"], "k8s-c1");
        assert_eq!(b[2]["Check"]["Check"]["ServiceID"], json!(key));
        // Consul needs a non-empty name to delete; the ID stands in when none is known.
        assert_eq!(
            b[3],
            json!({"Service": {"Verb": "delete", "Node": "k8s-c1",
                               "Service": {"ID": "gone-1", "Service": "gone-1"}}})
        );
        c.remember_names([(
            &"gone-1".to_string(),
            &json!({"Service": {"Service": "api_x"}}),
        )]);
        let b = c.txn_batches(&all[1..], false).expect("valid");
        assert_eq!(b[0][0]["Service"]["Service"]["Service"], "api_x");

        let bad = [Op::Put {
            key: "k".into(),
            record: json!({"name": "api_x"}),
        }];
        assert!(matches!(
            c.txn_batches(&bad, false),
            Err(BackendError::Protocol(_))
        ));
    }

    #[test]
    fn batches_hold_at_most_64_operations_and_never_split_an_instance() {
        let c = consul();
        let mut ops = puts(&c, 150);
        ops.extend((0..10).map(|i| Op::Delete {
            key: format!("old-{i}"),
        }));
        let batches = c.txn_batches(&ops, true).expect("valid");
        // 1 node op + 300 put ops + 10 deletes = 311 ops.
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 311);
        assert_eq!(batches.len(), 5, "311 ops in txns of at most 64");
        for b in &batches {
            assert!(b.len() <= MAX_TXN_OPS, "{} ops", b.len());
            // Each check follows its service in the same txn.
            for (i, op) in b.iter().enumerate() {
                if let Some(check) = op.get("Check") {
                    let prev = i.checked_sub(1).map(|p| &b[p]);
                    assert_eq!(
                        prev.and_then(|p| p.pointer("/Service/Service/ID")),
                        check.pointer("/Check/ServiceID"),
                    );
                }
            }
        }
        assert!(batches[0][0].get("Node").is_some());
        assert!(
            batches[1..]
                .iter()
                .flatten()
                .all(|o| o.get("Node").is_none())
        );
        // Order is kept: the deletes come last.
        assert_eq!(
            batches
                .last()
                .and_then(|b| b.last())
                .and_then(|o| o.pointer("/Service/Service/ID")),
            Some(&json!("old-9"))
        );
        assert!(c.txn_batches(&[], true).expect("empty").is_empty());
    }

    #[test]
    fn large_records_are_batched_by_size_too() {
        let c = consul();
        let mut i = inst("10.0.0.1", &[]);
        let big = "x".repeat(500);
        for k in 0..60 {
            i.meta.insert(format!("k{k}"), big.clone());
        }
        let instances: Vec<Instance> = (0..40)
            .map(|n| Instance {
                address: format!("10.0.1.{}", n + 1).parse().expect("ip"),
                ..i.clone()
            })
            .collect();
        let ops: Vec<Op> = c
            .render(&instances)
            .into_iter()
            .map(|(key, record)| Op::Put { key, record })
            .collect();
        let batches = c.txn_batches(&ops, false).expect("valid");
        assert!(batches.len() > 2, "{} batches", batches.len());
        for b in &batches {
            let bytes: usize = b.iter().map(|o| o.to_string().len()).sum();
            assert!(bytes <= MAX_TXN_BYTES, "{bytes} bytes");
            assert_eq!(b.len() % 2, 0, "service and check together");
        }
    }

    #[test]
    fn txn_errors_name_the_operation() {
        let ops = vec![
            json!({"Service": {"Verb": "set", "Node": "n", "Service": {"ID": "s1"}}}),
            json!({"Check": {"Verb": "set", "Check": {"CheckID": "s1:ready"}}}),
        ];
        let body = br#"{"Results":null,"Errors":[{"OpIndex":0,"What":"Missing node registration"},{"OpIndex":1,"What":"Missing service registration"}]}"#;
        let errs = txn_errors(body, &ops).expect("errors");
        assert_eq!(
            errs,
            vec![
                (
                    "op 0 (service set s1)".to_string(),
                    "Missing node registration".to_string()
                ),
                (
                    "op 1 (check set s1:ready)".to_string(),
                    "Missing service registration".to_string()
                ),
            ]
        );
        assert!(txn_errors(b"Permission denied", &ops).is_none());
    }

    #[test]
    fn blocking_query_index_follows_consuls_rules() {
        // First answer, then a change: block from the new index.
        assert_eq!(next_index(0, Some(12)), (12, false));
        assert_eq!(next_index(12, Some(15)), (15, false));
        // No change (the wait ran out): block again from the same index.
        assert_eq!(next_index(15, Some(15)), (15, false));
        // Backwards (a catalog that lost its state): start again from 0, at once.
        assert_eq!(next_index(15, Some(3)), (0, false));
        // Missing or zero: cannot block, so pause instead of spinning.
        assert_eq!(next_index(15, None), (0, true));
        assert_eq!(next_index(0, Some(0)), (0, true));
    }

    #[test]
    fn import_keeps_usable_entries_and_says_why_it_skips_the_others() {
        let entry =
            |node: &str, node_addr: &str, id: &str, addr: &str, port: Value, meta: Value| {
                json!({"Node": {"Node": node, "Address": node_addr},
                   "Service": {"ID": id, "Service": "db", "Address": addr, "Port": port,
                               "Meta": meta},
                   "Checks": []})
            };
        let entries = json!([
            entry("n1", "192.0.2.1", "db-2", "10.0.0.2", json!(5432), Value::Null),
            entry("n1", "192.0.2.1", "db-1", "", json!(5432), json!({})),
            entry("n2", "192.0.2.2", "db-1", "fd00::1", json!(5433), json!({})),
            entry("n1", "192.0.2.1", "db-host", "db.example.", json!(1), json!({})),
            entry("n1", "192.0.2.1", "ours", "10.0.0.9", json!(1),
                  json!({"catalog-bridge-owner": "c1"})),
            entry("n1", "192.0.2.1", "theirs", "10.0.0.8", json!(1),
                  json!({"catalog-bridge-owner": "c2"})),
            entry("n1", "192.0.2.1", "no-port", "10.0.0.7", json!(0), json!({})),
            entry("n1", "192.0.2.1", "big-port", "10.0.0.7", json!(70000), json!({})),
            entry("n1", "192.0.2.1", "bad-addr", "not an address", json!(1), json!({})),
            entry("n3", "", "no-addr", "", json!(1), json!({})),
            entry("n1", "192.0.2.1", "ours-broken", "", json!(0),
                  json!({"catalog-bridge-owner": "c1"})),
            {"Node": {"Node": "n1"}},
        ]);
        let (instances, skipped) = import_entries("db", "c1", &entries).expect("a list");
        let ext = |address: &str, port: u16, id: &str| External {
            address: address.into(),
            port,
            id: id.into(),
        };
        assert_eq!(
            instances,
            [
                ext("10.0.0.2", 5432, "db-2"),
                ext("10.0.0.8", 1, "theirs"),
                ext("192.0.2.1", 5432, "n1/db-1"),
                ext("db.example", 1, "db-host"),
                ext("fd00::1", 5433, "n2/db-1"),
            ]
        );
        let skipped_ids: Vec<&str> = skipped.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            skipped_ids,
            ["bad-addr", "big-port", "n1/entry-11", "no-addr", "no-port"]
        );
        assert!(skipped[0].1.contains("not an address"), "{skipped:?}");
        assert!(skipped[3].1.contains("no address"), "{skipped:?}");

        assert_eq!(
            import_entries("db", "c1", &Value::Null).expect("empty"),
            (vec![], vec![])
        );
        assert!(matches!(
            import_entries("db", "c1", &json!({"x": 1})),
            Err(BackendError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn a_watch_of_an_unreachable_consul_reports_it_and_ends_with_its_receivers() {
        let c = Consul::new(ConsulConfig {
            addresses: vec!["http://127.0.0.1:1".into()],
            node_name: "n".into(),
            owner: "o".into(),
            ..Default::default()
        })
        .expect("valid config");
        let (tx, mut rx) = tokio::sync::watch::channel(ImportSnapshot::default());
        let task = tokio::spawn(async move { c.watch_service("db", tx).await });
        let snap =
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.error.is_some()))
                .await
                .expect("an error in time")
                .expect("the watch runs")
                .clone();
        assert!(!snap.synced && snap.instances.is_empty());
        match snap.error {
            Some(BackendError::Unreachable(m)) => {
                assert!(m.contains("http://127.0.0.1:1") && m.contains("db"), "{m}")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
        drop(rx);
        let ended = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the watch ends when its receivers are gone")
            .expect("no panic");
        assert_eq!(ended, Ok(()));
    }

    #[test]
    fn lookup_formats_addresses_as_clients_dial_them() {
        let entries = json!([
            {"Node": {"Address": "192.0.2.1"}, "Service": {"Address": "10.0.0.2", "Port": 80}},
            {"Node": {"Address": "192.0.2.1"}, "Service": {"Address": "", "Port": 81}},
            {"Node": {"Address": "192.0.2.1"}, "Service": {"Address": "fd00::1", "Port": 82}},
            {"Node": {"Address": "192.0.2.1"}, "Service": {"Address": "db.example", "Port": 83}},
        ]);
        assert_eq!(
            health_addresses("s", &entries).expect("valid"),
            [
                "10.0.0.2:80",
                "192.0.2.1:81",
                "[fd00::1]:82",
                "db.example:83"
            ]
        );
        assert!(health_addresses("s", &json!([{"Service": {"Port": 1}}])).is_err());
        assert!(
            health_addresses("s", &Value::Null)
                .expect("empty")
                .is_empty()
        );
    }
}
