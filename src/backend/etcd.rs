//! etcd v3: every exported instance is one key, attached to one lease shared by all the keys of
//! this controller's (owner id, catalog) pair, so a dead controller's entries disappear after the
//! lease TTL ("TTL = failure detection latency").
//!
//! # Layouts (SPEC §4)
//!
//! - `plain` (base path `/services`): `<base>/<name>/providers/<ip>:<port>` = `<ip>:<port>`
//!   (`[addr]:port` for IPv6), what a prefix get returns.
//! - `naming` (base path empty): `<name>/<ip>:<port>` (no leading slash; `<base>/<name>/<addr>`
//!   with a base path) = `{"Op":0,"Addr":"<ip>:<port>","Metadata":{…}}`, read by the etcd gRPC
//!   resolver (`etcd:///<name>`) and the endpoints manager: `Op` is the number 0 (Add), only
//!   `Addr` is used by the resolver; `Metadata` carries owner, namespace, service, tags and meta.
//! - `coredns` (base path `/skydns`): `/skydns/<zone labels reversed>/<namespace>/<name>/<id>` =
//!   `{"host":"<ip>","port":<port>,"ttl":30}`, all lower case, so that
//!   `dig <name>.<namespace>.<zone>` answers. See [`dns_label`] for how names become DNS labels
//!   and [`coredns_id`] for the last segment.
//!
//! A [`Record`] is `{"value": "<the exact value string>"}`: what [`Etcd::read_owned`] returns
//! compares equal to what [`Etcd::render`] produces exactly when the key holds what would be
//! written. A key still attached to a previous lease of ours (see *TTL change* below) reads as
//! `{"value": …, "lease": "previous"}`, so that the plan rewrites it onto the current lease.
//!
//! # Liveness and ownership
//!
//! - One lease per (owner, catalog), TTL = `leaseTTLSeconds`, kept alive by a background task
//!   (every TTL/3, every second while failing) that the backend spawns on first use and stops
//!   when it is dropped. Every key is put with that lease.
//! - The keys this controller owns are the keys under the layout's prefix attached to that
//!   lease; keys without a lease or with another lease are never changed or deleted: every put
//!   and delete is guarded by a compare on the key's lease inside the transaction (a put also
//!   goes through when the key does not exist).
//! - The lease id is kept in etcd, in a marker key outside every layout prefix,
//!   `/catalog-bridge.io/leases/<owner>/<catalog>` = the lease id in decimal, put with the same
//!   lease (it dies with it). On first use the backend reads the marker and, when that lease is
//!   still alive, reuses it: a restarted controller (or a new leader) owns the same keys, reads
//!   them back and writes nothing. Otherwise it grants a new lease and claims the marker with a
//!   compare-and-swap, so two replicas starting at once end up on one lease.
//! - A lost lease (it expired while etcd or the network was away, or was revoked; keep-alive
//!   answers TTL 0) is replaced by a new one, the marker moved to it, and
//!   [`Backend::invalidations`] moves: the writer re-reads (nothing is owned under the new
//!   lease) and puts every entry again. Keys of the dead lease are gone with it.
//! - TTL change: when the marker's lease was granted with another TTL than the configured one, a
//!   new lease is granted and the old one is kept alive while keys remain on it; those keys read
//!   as `"lease": "previous"`, the writer rewrites them onto the new lease (entries never
//!   vanish), and the old lease is then revoked. When etcd grants the new lease with the very
//!   TTL of the old one (its minimum TTL is above the configured one), the old lease is kept.
//!
//! # Import
//!
//! [`Backend::watch_service`] reads the prefix `lookup` reads for the name (`coredns`: the
//! name's path, or with a bare name the zone, keeping keys whose name segment is that label)
//! and this owner's lease marker at one revision, then watches both from the next revision on
//! one watch stream, so nothing is lost between read and watch; a cancelled (compacted) or
//! broken watch is followed by a new read. An entry lives while its key does (a key dies with
//! its lease). Keys attached to the marker's lease (or a lease this backend holds), and
//! `naming` values whose metadata names this owner, are this controller's exports and never
//! imported. Values that do not parse are reported as skipped. A failed read keeps the last
//! instances and sets the error, retried after 200 ms doubling to 10 s.
//!
//! # Connections
//!
//! One client per endpoint, connected lazily on first use (never in [`Etcd::new`]); a request
//! goes to the endpoint that answered last, then to the others in turn. A connection that failed
//! or timed out is dropped and made again on the next request. Errors name every endpoint tried
//! and why it failed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::bail;
use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, LeaseTimeToLiveOptions, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchOptions, WatchResponse, WatchStream,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Backend, BackendError, ClientCert, External, ImportSnapshot, Record};
use crate::api::crd::{EtcdLayout, ServerInfo};
use crate::model::Op;
use crate::model::address::{import_host, parse_host_port};
use crate::model::{Instance, fnv1a64};

/// At most this many operations in one transaction (etcd's `--max-txn-ops` default).
///
/// etcd counts the operations of nested transactions against the same budget, level by level:
/// a nested transaction may hold at most 128 minus the operations of the levels above it. Each
/// plan operation is one guarded nested transaction chain of at most [`MAX_GUARD_DEPTH`]
/// levels of one operation each, so a transaction carries at most [`MAX_PLAN_OPS_PER_TXN`]
/// plan operations.
pub const MAX_TXN_OPS: usize = 128;
/// Levels of nested transactions that guard one put (key absent, on our lease, on our previous
/// lease).
pub const MAX_GUARD_DEPTH: usize = 3;
/// Plan operations in one transaction: `128 - 3`.
pub const MAX_PLAN_OPS_PER_TXN: usize = MAX_TXN_OPS - MAX_GUARD_DEPTH;
/// At most about this many bytes in one transaction (etcd's `--max-request-bytes` defaults to
/// 1.5 MiB); an operation larger than this alone still goes, alone.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;
/// Default lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
/// Default DNS zone of the `coredns` layout.
pub const DEFAULT_ZONE: &str = "bridge.local";
/// The DNS TTL in `coredns` records.
pub const COREDNS_TTL: u32 = 30;
/// Where lease markers live: `<MARKER_PREFIX><owner>/<catalog>`, outside every layout prefix.
pub const MARKER_PREFIX: &str = "/catalog-bridge.io/leases/";

/// Time for one request to one endpoint, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings find a connection to a hung server (etcd refuses pings more often than 5 s).
const HTTP2_KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));
/// Keys per page of a range read.
const PAGE: i64 = 1000;
/// Retry interval of the keep-alive task while keep-alives fail.
const RETRY: Duration = Duration::from_secs(1);

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

/// Makes a name one DNS label for the `coredns` layout: lower case; every character other than
/// `a-z`, `0-9` and `-` (so `_` and `.` too) becomes `-`; leading and trailing `-` are dropped;
/// at most 63 characters. `api_x` → `api-x`, `API.v2` → `api-v2`. A name with nothing left
/// (`___`) becomes `x` and 8 hex digits of its hash. Distinct names can map to one label
/// (`api_x` and `api-x`): their instances then answer the same DNS name.
pub fn dns_label(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed: String = mapped.trim_matches('-').chars().take(63).collect();
    let trimmed = trimmed.trim_end_matches('-');
    if trimmed.is_empty() {
        format!("x{:08x}", fnv1a64(s) as u32)
    } else {
        trimmed.to_string()
    }
}

/// The last key segment of an instance in the `coredns` layout: the address and port, readable,
/// and 8 hex digits of a hash of (owner, [`Instance::stable_id`]), all lower case, at most 63
/// characters: `10-0-0-1-8080-1a2b3c4d`, `fd00--1-8080-…`. Deterministic on every restart and
/// replica; distinct per origin and per owner, so two clusters exporting the same name never
/// write the same key.
pub fn coredns_id(owner: &str, instance: &Instance) -> String {
    let digest = fnv1a64(&format!("{owner}\0{}", instance.stable_id())) as u32;
    let addr = instance.address.to_string().replace([':', '.'], "-");
    format!("{addr}-{}-{digest:08x}", instance.port)
}

/// The transactions `apply` sends for `ops`, in order: consecutive slices of at most
/// [`MAX_PLAN_OPS_PER_TXN`] operations (so that with their guards they stay within etcd's
/// [`MAX_TXN_OPS`]) and about [`MAX_TXN_BYTES`].
pub fn batches(ops: &[Op]) -> Vec<&[Op]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, op) in ops.iter().enumerate() {
        let b = op_bytes(op);
        if i > start && (i - start >= MAX_PLAN_OPS_PER_TXN || bytes + b > MAX_TXN_BYTES) {
            out.push(&ops[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    if start < ops.len() {
        out.push(&ops[start..]);
    }
    out
}

/// An estimate of the bytes one operation takes in a transaction request: a guarded put holds
/// its key and value up to three times (create, ours, previous lease).
fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Put { key, record } => {
            let value = record
                .get("value")
                .and_then(Value::as_str)
                .map_or_else(|| record.to_string().len(), str::len);
            3 * (2 * key.len() + value) + 96
        }
        Op::Delete { key } => 2 * (2 * key.len()) + 64,
    }
}

/// The record of a key holding `value` (attached to a previous lease of ours when `previous`).
fn record_of(value: &str, previous: bool) -> Record {
    if previous {
        json!({"value": value, "lease": "previous"})
    } else {
        json!({"value": value})
    }
}

/// The value string a record stands for.
fn record_value<'a>(key: &str, record: &'a Record) -> Result<&'a str, BackendError> {
    record.get("value").and_then(Value::as_str).ok_or_else(|| {
        BackendError::Protocol(format!(
            "record {key} is not an etcd record (no \"value\" string): {record}"
        ))
    })
}

/// The end of the range of keys starting with `prefix` (etcd's `WithPrefix`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty or all 0xff: to the end of the keyspace.
    vec![0]
}

/// `host:port` as clients dial it (`[v6]:port`).
fn host_port(host: &str, port: u64) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => match u16::try_from(port) {
            Ok(p) => SocketAddr::new(ip, p).to_string(),
            Err(_) => format!("{ip}:{port}"),
        },
        Err(_) => format!("{host}:{port}"),
    }
}

/// `Addr` of a `naming` value, unless it is not one or says Delete (`Op` 1).
fn naming_addr(value: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(value).ok()?;
    if v.get("Op").and_then(Value::as_u64).unwrap_or(0) != 0 {
        return None;
    }
    v.get("Addr")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
}

/// `host:port` of a `coredns` value, unless it is not one (CoreDNS drops records without host).
fn coredns_host_port(value: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(value).ok()?;
    let host = v
        .get("host")
        .and_then(Value::as_str)
        .filter(|h| !h.is_empty())?;
    let port = v.get("port").and_then(Value::as_u64).unwrap_or(0);
    Some(host_port(host, port))
}

#[derive(Serialize)]
struct NamingValue<'a> {
    #[serde(rename = "Op")]
    op: u8,
    #[serde(rename = "Addr")]
    addr: &'a str,
    #[serde(rename = "Metadata")]
    metadata: NamingMetadata<'a>,
}

#[derive(Serialize)]
struct NamingMetadata<'a> {
    owner: &'a str,
    namespace: &'a str,
    service: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    tags: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    meta: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct CorednsValue<'a> {
    host: &'a str,
    port: u16,
    ttl: u32,
}

fn to_json<T: Serialize>(v: &T) -> String {
    // These types only have string keys: serialization cannot fail.
    serde_json::to_string(v).unwrap_or_else(|e| json!({ "error": e.to_string() }).to_string())
}

/// Where and how keys are written: pure.
#[derive(Clone, Debug)]
struct Layout {
    kind: EtcdLayout,
    /// Without a trailing `/`; may be empty.
    base: String,
    /// `coredns`: the DNS zone, lower case, without a trailing dot.
    zone: String,
    /// Every key this layout writes starts with it.
    prefix: String,
    owner: String,
}

impl Layout {
    fn new(
        kind: EtcdLayout,
        base_path: Option<&str>,
        zone: Option<&str>,
        owner: &str,
    ) -> anyhow::Result<Layout> {
        let base = match base_path {
            Some(b) => b.trim().trim_end_matches('/').to_string(),
            None => match kind {
                EtcdLayout::Plain => "/services".to_string(),
                EtcdLayout::Naming => String::new(),
                EtcdLayout::Coredns => "/skydns".to_string(),
            },
        };
        if base.contains("//") {
            bail!("etcd base path {base:?} must not hold an empty segment (//)");
        }
        let zone = zone
            .map(|z| z.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|z| !z.is_empty())
            .unwrap_or_else(|| DEFAULT_ZONE.to_string());
        let labels: Vec<&str> = zone.split('.').collect();
        if labels
            .iter()
            .any(|l| l.is_empty() || l.len() > 63 || dns_label(l) != *l)
        {
            bail!("etcd zone {zone:?} is not a DNS name of lower-case labels");
        }
        let zone_path = labels.iter().rev().copied().collect::<Vec<_>>().join("/");
        let prefix = match kind {
            EtcdLayout::Plain => format!("{base}/"),
            EtcdLayout::Naming if base.is_empty() => String::new(),
            EtcdLayout::Naming => format!("{base}/"),
            EtcdLayout::Coredns => format!("{base}/{zone_path}/"),
        };
        Ok(Layout {
            kind,
            base,
            zone,
            prefix,
            owner: owner.to_string(),
        })
    }

    fn name(&self) -> &'static str {
        match self.kind {
            EtcdLayout::Plain => "plain",
            EtcdLayout::Naming => "naming",
            EtcdLayout::Coredns => "coredns",
        }
    }

    /// The directory of `name`'s entries (`plain`, `naming`).
    fn name_dir(&self, name: &str) -> String {
        match self.kind {
            EtcdLayout::Plain => format!("{}/{name}/providers/", self.base),
            _ => format!("{}{name}/", self.prefix),
        }
    }

    fn key(&self, i: &Instance) -> String {
        match self.kind {
            EtcdLayout::Plain | EtcdLayout::Naming => {
                format!("{}{}", self.name_dir(&i.name), i.host_port())
            }
            EtcdLayout::Coredns => format!(
                "{}{}/{}/{}",
                self.prefix,
                dns_label(&i.origin.namespace),
                dns_label(&i.name),
                coredns_id(&self.owner, i)
            ),
        }
    }

    fn value(&self, i: &Instance) -> String {
        match self.kind {
            EtcdLayout::Plain => i.host_port(),
            EtcdLayout::Naming => to_json(&NamingValue {
                op: 0,
                addr: &i.host_port(),
                metadata: NamingMetadata {
                    owner: &self.owner,
                    namespace: &i.origin.namespace,
                    service: &i.origin.service,
                    tags: &i.tags,
                    meta: &i.meta,
                },
            }),
            EtcdLayout::Coredns => to_json(&CorednsValue {
                host: &i.address.to_string(),
                port: i.port,
                ttl: COREDNS_TTL,
            }),
        }
    }

    /// Where a reader looks for `name`, and for `coredns` without a namespace the DNS label the
    /// name segment must equal.
    fn lookup_prefix(&self, name: &str) -> (String, Option<String>) {
        match self.kind {
            EtcdLayout::Plain | EtcdLayout::Naming => (self.name_dir(name), None),
            EtcdLayout::Coredns => {
                let mut n = name.trim().trim_end_matches('.').to_ascii_lowercase();
                if let Some(stripped) = n.strip_suffix(&format!(".{}", self.zone)) {
                    n = stripped.to_string();
                }
                let labels: Vec<String> = n.split('.').map(dns_label).collect();
                if labels.len() == 1 {
                    (self.prefix.clone(), labels.into_iter().next())
                } else {
                    let path: Vec<&str> = labels.iter().rev().map(String::as_str).collect();
                    (format!("{}{}/", self.prefix, path.join("/")), None)
                }
            }
        }
    }
}

/// Why a request failed, as far as the lease logic cares.
#[derive(Debug)]
enum Fail {
    /// etcd says the lease does not exist (expired or revoked).
    LeaseGone(String),
    Backend(BackendError),
}

impl From<Fail> for BackendError {
    fn from(f: Fail) -> BackendError {
        match f {
            Fail::LeaseGone(m) => BackendError::Rejected(m),
            Fail::Backend(e) => e,
        }
    }
}

impl From<BackendError> for Fail {
    fn from(e: BackendError) -> Fail {
        Fail::Backend(e)
    }
}

/// The category of an etcd error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Nothing (useful) answered: try the next endpoint.
    Transport,
    Unauthorized,
    LeaseGone,
    /// The server answered with an error.
    Rejected,
}

/// The category of a gRPC status from etcd (`code` as in the gRPC spec).
fn classify_status(code: i32, message: &str) -> Kind {
    let m = message.to_ascii_lowercase();
    if m.contains("lease not found") {
        return Kind::LeaseGone;
    }
    if code == 16
        || code == 7
        || m.contains("authentication failed")
        || m.contains("user name is empty")
        || m.contains("invalid auth token")
        || m.contains("permission denied")
    {
        return Kind::Unauthorized;
    }
    match code {
        // Unavailable (refused, no leader), DeadlineExceeded, Cancelled (client timeout).
        14 | 4 | 1 => Kind::Transport,
        2 if [
            "transport",
            "connect",
            "connection",
            "broken pipe",
            "h2 protocol",
        ]
        .iter()
        .any(|t| m.contains(t)) =>
        {
            Kind::Transport
        }
        _ => Kind::Rejected,
    }
}

/// An error and its sources, each once.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        push_part(&mut parts, &err.to_string());
        cur = err.source();
    }
    parts.join(": ")
}

/// Adds a part of an error text unless it says nothing new (`transport error`, a repeat).
fn push_part(parts: &mut Vec<String>, s: &str) {
    let s = s.trim();
    if !s.is_empty() && s != "transport error" && !parts.iter().any(|p| p.contains(s)) {
        parts.push(s.to_string());
    }
}

fn classify(e: &etcd_client::Error) -> (Kind, String) {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => {
            let mut parts = Vec::new();
            push_part(&mut parts, s.message());
            let mut cur = std::error::Error::source(s);
            while let Some(err) = cur {
                push_part(&mut parts, &err.to_string());
                cur = err.source();
            }
            let mut text = parts.join(": ");
            if text.is_empty() {
                text = format!("gRPC status {:?}", s.code());
            }
            (classify_status(i32::from(s.code()), &text), text)
        }
        E::TransportError(_) | E::IoError(_) => (Kind::Transport, error_text(e)),
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => (Kind::LeaseGone, m.clone()),
        E::LeaseKeepAliveError(_) | E::WatchError(_) => (Kind::Transport, error_text(e)),
        _ => (Kind::Rejected, error_text(e)),
    }
}

/// A lease in use.
#[derive(Clone, Copy, Debug)]
struct Held {
    id: i64,
    /// Its granted TTL in seconds.
    ttl: i64,
}

#[derive(Debug, Default)]
struct LeaseState {
    current: Option<Held>,
    /// An older lease of ours whose keys move to `current` (after a TTL change).
    previous: Option<Held>,
    /// The current lease was lost and not yet replaced: replacing it moves the counter.
    lost: bool,
}

struct Inner {
    /// As configured, for messages.
    endpoints: Vec<String>,
    /// `http(s)://host:port`, as the client takes them.
    urls: Vec<String>,
    options: ConnectOptions,
    /// Without credentials, for an etcd that has authentication disabled.
    anonymous: Option<ConnectOptions>,
    user: Option<String>,
    clients: Mutex<Vec<Option<Client>>>,
    preferred: AtomicUsize,
    layout: Layout,
    owner: String,
    catalog: String,
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
            .field("endpoints", &self.inner.endpoints)
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

/// `host:port` (or `[v6]:port`) with a numeric port.
fn valid_authority(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !host.contains('/')
        && port.parse::<u16>().is_ok_and(|p| p > 0)
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')))
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
        let https = cfg
            .endpoints
            .iter()
            .any(|e| e.trim().starts_with("https://"));
        if cfg.client_cert.is_some() && cfg.ca_pem.is_none() && !https {
            bail!(
                "a client certificate for etcd (tls.clientCertSecretRef) needs TLS: the CA that \
                 signed etcd's certificate (tls.caSecretRef), or https:// endpoints"
            );
        }
        // TLS with the CA given, or with the system's roots for https:// endpoints without one
        // (then every endpoint speaks TLS: host:port ones too).
        let tls = cfg.ca_pem.is_some() || https;
        let mut endpoints = Vec::with_capacity(cfg.endpoints.len());
        let mut urls = Vec::with_capacity(cfg.endpoints.len());
        for e in &cfg.endpoints {
            let e = e.trim().trim_end_matches('/').to_string();
            let (scheme, authority) = match e.split_once("://") {
                Some((s, a)) => (Some(s), a),
                None => (None, e.as_str()),
            };
            if !valid_authority(authority) {
                bail!("etcd endpoint {e:?} is not host:port or http(s)://host:port");
            }
            let url = match scheme {
                Some("http") if tls => bail!(
                    "etcd endpoint {e:?} is http:// but the others speak TLS (https:// or a CA \
                     in tls.caSecretRef): use https:// or host:port"
                ),
                Some("http") => format!("http://{authority}"),
                Some("https") => format!("https://{authority}"),
                Some(other) => bail!("etcd endpoint {e:?}: unknown scheme {other:?}"),
                None if tls => format!("https://{authority}"),
                None => format!("http://{authority}"),
            };
            endpoints.push(e);
            urls.push(url);
        }

        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(HTTP2_KEEP_ALIVE.0, HTTP2_KEEP_ALIVE.1)
            .with_keep_alive_while_idle(true);
        if let Some(pem) = &cfg.ca_pem {
            let text = String::from_utf8_lossy(pem);
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                bail!("the etcd CA bundle holds no PEM certificate");
            }
        }
        if tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut options_tls = match &cfg.ca_pem {
                Some(pem) => TlsOptions::new().ca_certificate(Certificate::from_pem(pem)),
                // No CA given: etcd's certificate is checked against the system's roots (the
                // image's CA bundle, or $SSL_CERT_FILE).
                None => TlsOptions::new().with_native_roots(),
            };
            if let Some(c) = &cfg.client_cert {
                for (what, bytes, marker) in [
                    ("certificate", &c.cert_pem, "-----BEGIN CERTIFICATE-----"),
                    ("key", &c.key_pem, "PRIVATE KEY-----"),
                ] {
                    if !String::from_utf8_lossy(bytes).contains(marker) {
                        bail!("the etcd client {what} (tls.clientCertSecretRef) is not PEM");
                    }
                }
                options_tls = options_tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
            }
            options = options.with_tls(options_tls);
        }
        let anonymous = options.clone();
        let user = cfg.username.clone().filter(|u| !u.is_empty());
        if let Some(u) = &user {
            options = options
                .with_user(u.clone(), cfg.password.clone().unwrap_or_default())
                .with_auto_token_refresh(true);
        }

        let layout = Layout::new(
            cfg.layout,
            cfg.base_path.as_deref(),
            cfg.zone.as_deref(),
            &cfg.owner,
        )?;
        let marker = format!("{MARKER_PREFIX}{}/{}", cfg.owner, cfg.catalog);
        let n = endpoints.len();
        Ok(Etcd {
            inner: Arc::new(Inner {
                endpoints,
                urls,
                options,
                anonymous: user.as_ref().map(|_| anonymous),
                user,
                clients: Mutex::new(vec![None; n]),
                preferred: AtomicUsize::new(0),
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
                self.inner.endpoints.join(",")
            )));
        }
        Ok(())
    }
}

impl Inner {
    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Option<Client>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connect(&self, idx: usize) -> Result<Client, etcd_client::Error> {
        let url = self.urls[idx].as_str();
        match Client::connect([url], Some(self.options.clone())).await {
            Err(e)
                if self.anonymous.is_some()
                    && classify(&e).1.contains("authentication is not enabled") =>
            {
                warn!(endpoint = %self.endpoints[idx], "etcd has authentication disabled; connecting without the configured credentials");
                Client::connect([url], self.anonymous.clone()).await
            }
            r => r,
        }
    }

    async fn client(&self, idx: usize) -> Result<Client, etcd_client::Error> {
        let cached = self.slots()[idx].clone();
        if let Some(c) = cached {
            return Ok(c);
        }
        let c = self.connect(idx).await?;
        self.slots()[idx] = Some(c.clone());
        Ok(c)
    }

    /// Drops the connection to endpoint `idx`; the next request connects again.
    fn forget(&self, idx: usize) {
        self.slots()[idx] = None;
    }

    /// Runs `f` against the endpoint that answered last, then the others in turn, until one
    /// answers. Returns the answer and the index of the endpoint that gave it.
    async fn call_at<T, F, Fut>(&self, what: &str, f: F) -> Result<(T, usize), Fail>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let endpoint = &self.endpoints[idx];
            let attempt = async {
                let c = self.client(idx).await?;
                f(c).await
            };
            let err = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
                Ok(Ok(v)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok((v, idx));
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    debug!(%endpoint, what, "etcd endpoint did not answer in time");
                    failures.push(format!(
                        "{endpoint} (no answer within {}s)",
                        REQUEST_TIMEOUT.as_secs()
                    ));
                    self.forget(idx);
                    continue;
                }
            };
            let (kind, text) = classify(&err);
            match kind {
                Kind::Transport => {
                    debug!(%endpoint, what, error = %text, "etcd endpoint failed");
                    failures.push(format!("{endpoint} ({text})"));
                    self.forget(idx);
                }
                Kind::Unauthorized => {
                    self.forget(idx);
                    let user = self.user.as_deref().map_or_else(
                        || "without credentials".to_string(),
                        |u| format!("as {u:?}"),
                    );
                    return Err(Fail::Backend(BackendError::Unauthorized(format!(
                        "{what} on etcd {endpoint} {user}: {text}"
                    ))));
                }
                Kind::LeaseGone => {
                    return Err(Fail::LeaseGone(format!(
                        "{what} on etcd {endpoint}: {text}"
                    )));
                }
                Kind::Rejected => {
                    return Err(Fail::Backend(BackendError::Rejected(format!(
                        "{what} on etcd {endpoint}: {text}"
                    ))));
                }
            }
        }
        Err(Fail::Backend(BackendError::Unreachable(format!(
            "{what}: no etcd endpoint answered: {}",
            failures.join(", ")
        ))))
    }

    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Fail>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_at(what, f).await.map(|(v, _)| v)
    }

    /// Every key-value in `[start, end)`, read in pages at one revision.
    async fn range(
        &self,
        what: &str,
        start: Vec<u8>,
        end: Vec<u8>,
    ) -> Result<Vec<etcd_client::KeyValue>, Fail> {
        self.range_at(what, start, end, 0).await.map(|(kvs, _)| kvs)
    }

    /// Every key-value in `[start, end)`, read in pages at `revision` (0: the latest), and the
    /// revision read.
    async fn range_at(
        &self,
        what: &str,
        start: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
    ) -> Result<(Vec<etcd_client::KeyValue>, i64), Fail> {
        let mut out = Vec::new();
        let mut from = start;
        let mut revision = revision;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let key = from.clone();
            let mut resp = self
                .call(what, move |mut c| {
                    let (key, opts) = (key.clone(), opts.clone());
                    async move { c.get(key, Some(opts)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let next = kvs.last().map(|kv| {
                let mut k = kv.key().to_vec();
                k.push(0);
                k
            });
            out.extend(kvs);
            match next {
                Some(n) if more => from = n,
                _ => return Ok((out, revision)),
            }
        }
    }

    /// The keys attached to lease `id`; `LeaseGone` when it does not exist anymore.
    async fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>, Fail> {
        let resp = self
            .call("lease time-to-live", move |mut c| async move {
                c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
                    .await
            })
            .await?;
        if resp.ttl() <= 0 {
            return Err(Fail::LeaseGone(format!("lease {id:x} does not exist")));
        }
        Ok(resp.keys().to_vec())
    }

    async fn keep_alive_once(&self, id: i64) -> Result<(), Fail> {
        self.call("lease keep-alive", move |mut c| async move {
            c.lease_keep_alive(id).await.map(|_| ())
        })
        .await
    }

    async fn revoke(&self, id: i64) {
        let r = self
            .call("lease revoke", move |mut c| async move {
                c.lease_revoke(id).await.map(|_| ())
            })
            .await;
        match r {
            Ok(()) | Err(Fail::LeaseGone(_)) => {}
            Err(Fail::Backend(e)) => {
                debug!(lease = %format!("{id:x}"), error = %e, "revoking an unused lease failed; it expires on its own")
            }
        }
    }

    /// The lease in use (and the previous one), established on first use.
    /// Read only: whether the marker names a live lease (looked up once).
    async fn has_lease(self: &Arc<Self>) -> Result<bool, BackendError> {
        let mut st = self.lease.lock().await;
        if st.current.is_none() {
            self.establish(&mut st).await?;
        }
        Ok(st.current.is_some())
    }

    async fn ensure_lease(self: &Arc<Self>) -> Result<(Held, Option<Held>), BackendError> {
        let mut st = self.lease.lock().await;
        if let Some(h) = st.current {
            return Ok((h, st.previous));
        }
        self.establish(&mut st).await?;
        match st.current {
            Some(h) => Ok((h, st.previous)),
            None if self.read_only => Err(BackendError::Rejected(
                "read only: no live lease of this owner, and none granted".into(),
            )),
            None => Err(BackendError::Protocol(
                "no etcd lease after granting one".into(),
            )),
        }
    }

    /// Finds the lease of the marker or grants one; with the state locked.
    async fn establish(self: &Arc<Self>, st: &mut LeaseState) -> Result<(), BackendError> {
        for _ in 0..3 {
            let marker = self.marker.clone();
            let got = self
                .call("reading the lease marker", move |mut c| {
                    let marker = marker.clone();
                    async move { c.get(marker, None).await }
                })
                .await?;
            let (existing, mod_revision) = match got.kvs().first() {
                Some(kv) => {
                    let id = std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|v| v.trim().parse::<i64>().ok())
                        .filter(|id| *id != 0)
                        .unwrap_or(kv.lease());
                    (Some(id).filter(|id| *id != 0), kv.mod_revision())
                }
                None => (None, 0),
            };
            let mut older = None;
            if self.read_only && existing.is_none() {
                return Ok(());
            }
            if let Some(id) = existing {
                let ttl = match self
                    .call("lease time-to-live", move |mut c| async move {
                        c.lease_time_to_live(id, None).await
                    })
                    .await
                {
                    Ok(t) => Some(t),
                    Err(Fail::LeaseGone(_)) => None,
                    Err(Fail::Backend(e)) => return Err(e),
                };
                if let Some(t) = ttl.filter(|t| t.ttl() > 0) {
                    let held = Held {
                        id,
                        ttl: t.granted_ttl().max(1),
                    };
                    if self.read_only {
                        // Looked at, never kept alive: the writing controller keeps it.
                        st.current = Some(held);
                        return Ok(());
                    }
                    if held.ttl == self.ttl_secs {
                        self.adopt(st, held, None, "reusing the live lease of the marker");
                        return Ok(());
                    }
                    older = Some(held);
                }
            }
            if self.read_only {
                // The marker names a lease that is gone: nothing is owned.
                return Ok(());
            }
            let ttl_secs = self.ttl_secs;
            let granted = self
                .call("granting a lease", move |mut c| async move {
                    c.lease_grant(ttl_secs, None).await
                })
                .await?;
            let new = Held {
                id: granted.id(),
                ttl: granted.ttl().max(1),
            };
            if let Some(old) = older
                && old.ttl == new.ttl
            {
                // etcd raised the TTL to its minimum: the old lease is as good.
                self.revoke(new.id).await;
                self.adopt(st, old, None, "reusing the live lease of the marker");
                return Ok(());
            }
            let (marker, value) = (self.marker.clone(), new.id.to_string());
            let claimed = self
                .call("claiming the lease marker", move |mut c| {
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            marker.clone(),
                            CompareOp::Equal,
                            mod_revision,
                        )])
                        .and_then([TxnOp::put(
                            marker.clone(),
                            value.clone(),
                            Some(PutOptions::new().with_lease(new.id)),
                        )]);
                    async move { c.txn(txn).await }
                })
                .await;
            match claimed {
                Ok(r) if r.succeeded() => {
                    let why = if older.is_some() {
                        "granted a lease with the configured TTL; keys move from the old one"
                    } else {
                        "granted a new lease"
                    };
                    self.adopt(st, new, older, why);
                    return Ok(());
                }
                Ok(_) => {
                    // Another process moved the marker meanwhile: use what it wrote.
                    self.revoke(new.id).await;
                }
                Err(e) => {
                    self.revoke(new.id).await;
                    return Err(e.into());
                }
            }
        }
        Err(BackendError::Rejected(format!(
            "the lease marker {} keeps changing: another process is claiming it",
            self.marker
        )))
    }

    fn adopt(self: &Arc<Self>, st: &mut LeaseState, held: Held, previous: Option<Held>, why: &str) {
        st.current = Some(held);
        st.previous = previous;
        info!(
            catalog = %self.catalog,
            lease = %format!("{:x}", held.id),
            ttl = held.ttl,
            previous = ?previous.map(|p| format!("{:x}", p.id)),
            "etcd lease: {why}"
        );
        if held.ttl != self.ttl_secs {
            info!(catalog = %self.catalog, configured = self.ttl_secs, granted = held.ttl, "etcd granted another lease TTL than configured (its minimum)");
        }
        if std::mem::take(&mut st.lost) {
            self.invalidations.send_modify(|n| *n += 1);
        }
        let mut keeper = self.keeper.lock().unwrap_or_else(|e| e.into_inner());
        if keeper.as_ref().is_none_or(|h| h.is_finished()) {
            let weak = Arc::downgrade(self);
            *keeper = Some(tokio::spawn(keep_alive_loop(weak)).abort_handle());
        }
    }

    /// Replaces lease `id` after etcd said it does not exist; the counter moves when the new
    /// lease is in place.
    async fn replace_lost(self: &Arc<Self>, id: i64) -> Result<(), BackendError> {
        let mut st = self.lease.lock().await;
        if st.current.is_some_and(|h| h.id == id) {
            warn!(catalog = %self.catalog, lease = %format!("{id:x}"), "etcd lease expired or was revoked: its keys are gone; granting a new lease, entries will be written again");
            st.current = None;
            st.previous = None;
            st.lost = true;
        }
        if st.current.is_none() {
            self.establish(&mut st).await?;
        }
        Ok(())
    }

    async fn drop_previous(&self, id: i64, revoke: bool) {
        let mut st = self.lease.lock().await;
        if st.previous.is_some_and(|p| p.id == id) {
            st.previous = None;
            drop(st);
            info!(catalog = %self.catalog, lease = %format!("{id:x}"), "etcd: no keys left on the previous lease");
            if revoke {
                self.revoke(id).await;
            }
        }
    }

    async fn keep_alive_interval(&self, failing: bool) -> Duration {
        let st = self.lease.lock().await;
        let ttl = [st.current, st.previous]
            .iter()
            .flatten()
            .map(|h| h.ttl)
            .min();
        match ttl {
            Some(t) if !failing => Duration::from_millis(
                u64::try_from(t.saturating_mul(1000) / 3)
                    .unwrap_or(1000)
                    .max(500),
            ),
            Some(t) => RETRY.min(Duration::from_millis(
                u64::try_from(t.saturating_mul(1000) / 3)
                    .unwrap_or(1000)
                    .max(500),
            )),
            None => RETRY,
        }
    }

    /// One keep-alive of each lease in use; replaces a lost one.
    async fn keep_alive_round(self: &Arc<Self>) -> Result<(), BackendError> {
        let (current, previous) = {
            let st = self.lease.lock().await;
            (st.current, st.previous)
        };
        if let Some(p) = previous
            && let Err(Fail::LeaseGone(_)) = self.keep_alive_once(p.id).await
        {
            self.drop_previous(p.id, false).await;
        }
        let Some(h) = current else {
            // Lost while etcd was away: get a new one as soon as it answers.
            return self.ensure_lease().await.map(|_| ());
        };
        match self.keep_alive_once(h.id).await {
            Ok(()) => Ok(()),
            Err(Fail::LeaseGone(_)) => self.replace_lost(h.id).await,
            Err(Fail::Backend(e)) => Err(e),
        }
    }
}

/// Keeps the leases alive while the backend exists.
async fn keep_alive_loop(weak: Weak<Inner>) {
    let mut failing = false;
    loop {
        let wait = match weak.upgrade() {
            Some(inner) => inner.keep_alive_interval(failing).await,
            None => return,
        };
        tokio::time::sleep(wait).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        match inner.keep_alive_round().await {
            Ok(()) => {
                if failing {
                    info!(catalog = %inner.catalog, "etcd lease keep-alive works again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!(catalog = %inner.catalog, error = %e, "etcd lease keep-alive failed; retrying every second");
                } else {
                    debug!(catalog = %inner.catalog, error = %e, "etcd lease keep-alive failed");
                }
                failing = true;
            }
        }
    }
}

/// A condition chain: the first of `conds` that holds runs `op`; none: nothing happens.
fn guarded(conds: &[Compare], op: &dyn Fn() -> TxnOp) -> TxnOp {
    let mut chain: Option<TxnOp> = None;
    for c in conds.iter().rev() {
        let txn = Txn::new().when([c.clone()]).and_then([op()]);
        let txn = match chain.take() {
            Some(next) => txn.or_else([next]),
            None => txn,
        };
        chain = Some(TxnOp::txn(txn));
    }
    chain.unwrap_or_else(op)
}

/// Whether a guarded operation ran (some condition of its chain held).
fn took_effect(r: &TxnResponse) -> bool {
    r.succeeded()
        || r.op_responses()
            .iter()
            .any(|o| matches!(o, TxnOpResponse::Txn(n) if took_effect(n)))
}

impl Etcd {
    /// The transaction of one batch, guarded so that only our keys change.
    fn txn(&self, batch: &[Op], lease: i64, previous: Option<i64>) -> Result<Txn, BackendError> {
        let layout = &self.inner.layout;
        let mut ops = Vec::with_capacity(batch.len());
        for op in batch {
            let key = op.key();
            if !key.starts_with(&layout.prefix) || key == self.inner.marker || key.is_empty() {
                return Err(BackendError::Protocol(format!(
                    "refusing to write {key:?}: outside this catalog's prefix {:?}",
                    layout.prefix
                )));
            }
            let mut ours = vec![Compare::lease(key, CompareOp::Equal, lease)];
            if let Some(p) = previous {
                ours.push(Compare::lease(key, CompareOp::Equal, p));
            }
            match op {
                Op::Put { key, record } => {
                    let value = record_value(key, record)?;
                    let mut conds = vec![Compare::version(key.as_str(), CompareOp::Equal, 0)];
                    conds.extend(ours);
                    let put = || {
                        TxnOp::put(
                            key.as_str(),
                            value,
                            Some(PutOptions::new().with_lease(lease)),
                        )
                    };
                    ops.push(guarded(&conds, &put));
                }
                Op::Delete { key } => {
                    ops.push(guarded(&ours, &|| TxnOp::delete(key.as_str(), None)));
                }
            }
        }
        Ok(Txn::new().and_then(ops))
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
            self.inner.endpoints.join(","),
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

    async fn read_owned(&self) -> Result<BTreeMap<String, Record>, BackendError> {
        self.require_owner()?;
        let inner = &self.inner;
        let ours = |k: &[u8]| -> Option<String> {
            let k = std::str::from_utf8(k).ok()?;
            (k.starts_with(&inner.layout.prefix) && k != inner.marker).then(|| k.to_string())
        };
        // Key → attached to the previous lease.
        let mut keys: BTreeMap<String, bool> = BTreeMap::new();
        let mut attempts = 0;
        if inner.read_only && !inner.has_lease().await? {
            return Ok(BTreeMap::new());
        }
        let (current, previous) = loop {
            let (current, previous) = inner.ensure_lease().await?;
            match inner.lease_keys(current.id).await {
                Ok(k) => {
                    keys.extend(k.iter().filter_map(|k| ours(k)).map(|k| (k, false)));
                    break (current, previous);
                }
                Err(Fail::LeaseGone(_)) if inner.read_only => {
                    inner.lease.lock().await.current = None;
                    return Ok(BTreeMap::new());
                }
                Err(Fail::LeaseGone(m)) => {
                    // Its keys went with it. Read what the new lease holds (nothing, unless it
                    // was granted a moment ago and written to).
                    inner.replace_lost(current.id).await?;
                    attempts += 1;
                    if attempts > 1 {
                        return Err(BackendError::Rejected(format!(
                            "{m}: the etcd lease was lost twice in a row"
                        )));
                    }
                }
                Err(Fail::Backend(e)) => return Err(e),
            }
        };
        if let Some(p) = previous {
            match inner.lease_keys(p.id).await {
                Ok(k) => {
                    let mine: Vec<String> = k.iter().filter_map(|k| ours(k)).collect();
                    if mine.is_empty() {
                        inner.drop_previous(p.id, k.is_empty()).await;
                    }
                    for k in mine {
                        keys.entry(k).or_insert(true);
                    }
                }
                Err(Fail::LeaseGone(_)) => inner.drop_previous(p.id, false).await,
                Err(Fail::Backend(e)) => return Err(e),
            }
        }
        let (Some(first), Some(last)) = (keys.keys().next(), keys.keys().next_back()) else {
            return Ok(BTreeMap::new());
        };
        let mut end = last.as_bytes().to_vec();
        end.push(0);
        let kvs = inner
            .range("reading owned keys", first.as_bytes().to_vec(), end)
            .await?;
        let mut out = BTreeMap::new();
        for kv in kvs {
            let Ok(key) = std::str::from_utf8(kv.key()) else {
                continue;
            };
            let Some(&on_previous) = keys.get(key) else {
                continue;
            };
            let expected = if on_previous {
                previous.map(|p| p.id)
            } else {
                Some(current.id)
            };
            if Some(kv.lease()) != expected {
                continue;
            }
            let value = String::from_utf8_lossy(kv.value());
            out.insert(key.to_string(), record_of(&value, on_previous));
        }
        Ok(out)
    }

    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError> {
        if ops.is_empty() {
            return Ok(0);
        }
        self.require_owner()?;
        let inner = &self.inner;
        if inner.read_only {
            return Err(BackendError::Rejected(format!(
                "{} operation(s) not written: this etcd client is read only",
                ops.len()
            )));
        }
        let (lease, previous) = inner.ensure_lease().await?;
        let mut txns = 0;
        let mut skipped = Vec::new();
        for batch in batches(ops) {
            let txn = self.txn(batch, lease.id, previous.map(|p| p.id))?;
            let what = format!("transaction of {} operation(s)", batch.len());
            let resp = inner
                .call(&what, move |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(Fail::LeaseGone(m)) => {
                    inner.replace_lost(lease.id).await?;
                    return Err(BackendError::Rejected(format!(
                        "{m}: lease {:x} expired, its keys are gone; a new lease was granted \
                         and every entry is to be written again",
                        lease.id
                    )));
                }
                Err(Fail::Backend(e)) => return Err(e),
            };
            txns += 1;
            for (op, r) in batch.iter().zip(resp.op_responses()) {
                if let (Op::Put { key, .. }, TxnOpResponse::Txn(r)) = (op, &r)
                    && !took_effect(r)
                {
                    skipped.push(key.clone());
                }
            }
        }
        if !skipped.is_empty() {
            warn!(
                catalog = %inner.catalog,
                count = skipped.len(),
                keys = ?skipped.iter().take(5).collect::<Vec<_>>(),
                "etcd keys held by someone else (no lease or another lease) were left alone"
            );
        }
        Ok(txns)
    }

    async fn probe(&self) -> Result<ServerInfo, BackendError> {
        let ((status, members), idx) = self
            .inner
            .call_at("status", |mut c| async move {
                let s = c.status().await?;
                let m = c.member_list().await?;
                Ok((s, m))
            })
            .await?;
        let members = members.members();
        let leader = members
            .iter()
            .find(|m| m.id() == status.leader())
            .map(|m| {
                if m.name().is_empty() {
                    format!("{:x}", m.id())
                } else {
                    m.name().to_string()
                }
            })
            .or_else(|| (status.leader() != 0).then(|| format!("{:x}", status.leader())));
        let mut urls: Vec<String> = members
            .iter()
            .flat_map(|m| m.client_urls().iter().cloned())
            .collect();
        urls.sort();
        urls.dedup();
        Ok(ServerInfo {
            address: Some(self.inner.endpoints[idx].clone()),
            leader,
            cluster_id: status.header().map(|h| format!("{:x}", h.cluster_id())),
            members: urls,
            version: Some(status.version().to_string()).filter(|v| !v.is_empty()),
            ..Default::default()
        })
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
        if name.trim().is_empty() {
            return Err(BackendError::Rejected(
                "an etcd import needs a service name".into(),
            ));
        }
        let target = self.import_target(name);
        debug!(catalog = %self.inner.catalog, name, prefix = %target.prefix, "etcd import watch starts");
        tokio::select! {
            () = tx.closed() => {}
            () = self.follow_import(&target, &tx) => {}
        }
        debug!(catalog = %self.inner.catalog, name, "etcd import watch ends: nobody listens");
        Ok(())
    }

    async fn lookup(&self, name: &str) -> Result<Vec<String>, BackendError> {
        let layout = &self.inner.layout;
        let (prefix, name_label) = layout.lookup_prefix(name);
        let kvs = self
            .inner
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
                    if let Some(label) = &name_label {
                        // <prefix><namespace>/<name>/<id>
                        let rest = kv.key().get(prefix.len()..).unwrap_or_default();
                        let segments: Vec<&[u8]> = rest.split(|b| *b == b'/').collect();
                        if segments.len() < 3 || segments[1] != label.as_bytes() {
                            continue;
                        }
                    }
                    coredns_host_port(kv.value())
                }
            };
            out.extend(found);
        }
        Ok(out.into_iter().collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Import (SPEC §5): a watch on the layout's prefix for one name.
// ---------------------------------------------------------------------------------------------

/// First pause after a failed import read; it doubles up to [`IMPORT_RETRY_MAX`].
const IMPORT_RETRY_FIRST: Duration = Duration::from_millis(200);
const IMPORT_RETRY_MAX: Duration = Duration::from_secs(10);
/// An established import watch that breaks sooner than this counts as a failure for the
/// backoff (so a watch refused right after its creation does not spin).
const IMPORT_QUICK_BREAK: Duration = Duration::from_secs(1);

/// Where an import watch of one name looks.
#[derive(Clone, Debug)]
struct ImportTarget {
    kind: EtcdLayout,
    /// The prefix read and watched.
    prefix: String,
    /// `coredns` with a bare name: the DNS label the name segment must equal (as `lookup`).
    label: Option<String>,
    /// This (owner, catalog)'s lease marker; `None` for a client without owner.
    marker: Option<String>,
    owner: String,
}

/// One key under the watched prefix, as last read or reported by the watch.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    /// The lease the key is attached to (0: none).
    lease: i64,
    /// The value names this controller as its owner (`naming` metadata).
    owner_tagged: bool,
    /// The entry, why it cannot be imported, or `None` when it is not one (a `naming` Delete).
    parsed: Option<Result<External, String>>,
}

/// What an import watch knows: every key of the name, and the lease of this owner's marker.
#[derive(Debug, Default)]
struct ImportState {
    keys: BTreeMap<String, Seen>,
    marker_lease: Option<i64>,
}

impl ImportTarget {
    /// The entry of key-value `kv`, or `None` when the key is not one of this name's
    /// (`coredns`: another name's key under the zone).
    fn seen(&self, kv: &KeyValue) -> Option<(String, Seen)> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        if let Some(label) = &self.label {
            // <prefix><namespace>/<name>/<id>
            let rest = kv.key().get(self.prefix.len()..).unwrap_or_default();
            let segments: Vec<&[u8]> = rest.split(|b| *b == b'/').collect();
            if segments.len() < 3 || segments[1] != label.as_bytes() {
                return None;
            }
        }
        let (parsed, owner_tagged) = match self.kind {
            EtcdLayout::Plain => (Some(parse_plain(kv.value())), false),
            EtcdLayout::Naming => parse_naming(kv.value(), &self.owner),
            EtcdLayout::Coredns => (Some(parse_coredns(kv.value())), false),
        };
        let parsed = parsed.map(|r| {
            r.map(|(address, port)| External {
                address,
                port,
                id: key.clone(),
            })
        });
        Some((
            key,
            Seen {
                lease: kv.lease(),
                owner_tagged,
                parsed,
            },
        ))
    }
}

impl ImportState {
    /// Applies the events of one watch response; whether anything changed.
    fn apply(&mut self, target: &ImportTarget, resp: &WatchResponse) -> bool {
        let mut changed = false;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let is_marker = target
                .marker
                .as_deref()
                .is_some_and(|m| m.as_bytes() == kv.key());
            match (ev.event_type(), is_marker) {
                (EventType::Put, true) => {
                    let lease = marker_lease(kv);
                    changed |= self.marker_lease != lease;
                    self.marker_lease = lease;
                }
                (EventType::Delete, true) => {
                    changed |= self.marker_lease.take().is_some();
                }
                (EventType::Put, false) => {
                    if !kv.key().starts_with(target.prefix.as_bytes()) {
                        continue;
                    }
                    if let Some((key, seen)) = target.seen(kv)
                        && self.keys.get(&key) != Some(&seen)
                    {
                        self.keys.insert(key, seen);
                        changed = true;
                    }
                }
                (EventType::Delete, false) => {
                    let key = String::from_utf8_lossy(kv.key());
                    changed |= self.keys.remove(key.as_ref()).is_some();
                }
            }
        }
        changed
    }

    /// The instances and skipped entries, without those of `own` leases or tagged with this
    /// owner, sorted.
    fn parts(&self, own: &[i64]) -> (Vec<External>, Vec<(String, String)>) {
        let mut instances = Vec::new();
        let mut skipped = Vec::new();
        for (key, seen) in &self.keys {
            if seen.owner_tagged || (seen.lease != 0 && own.contains(&seen.lease)) {
                continue;
            }
            match &seen.parsed {
                Some(Ok(e)) => instances.push(e.clone()),
                Some(Err(why)) => skipped.push((key.clone(), why.clone())),
                None => {}
            }
        }
        instances.sort();
        skipped.sort();
        (instances, skipped)
    }
}

/// The lease id a marker key names: its value in decimal, else the lease it is attached to.
fn marker_lease(kv: &KeyValue) -> Option<i64> {
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|id| *id != 0)
        .or(Some(kv.lease()))
        .filter(|id| *id != 0)
}

/// An imported entry's host and port, or why it has none.
type HostPort = Result<(String, u16), String>;

/// A `plain` value: `host:port`.
fn parse_plain(value: &[u8]) -> HostPort {
    let v = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8".to_string())?;
    parse_host_port(v)
}

/// A `naming` value (an endpoints manager update): the entry unless `Op` is 1 (Delete), and
/// whether its metadata names `owner`.
fn parse_naming(value: &[u8], owner: &str) -> (Option<HostPort>, bool) {
    let v: Value = match serde_json::from_slice(value) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) | Err(_) => {
            return (
                Some(Err(
                    "not an endpoints manager update (a JSON object with Op and Addr)".into(),
                )),
                false,
            );
        }
    };
    let tagged =
        !owner.is_empty() && v.pointer("/Metadata/owner").and_then(Value::as_str) == Some(owner);
    let parsed = match v.get("Op") {
        None => Some(Ok(())),
        Some(op) => match op.as_u64() {
            Some(0) => Some(Ok(())),
            Some(1) => None,
            _ => Some(Err(format!("Op {op} is neither 0 (Add) nor 1 (Delete)"))),
        },
    };
    let parsed = parsed.map(|r| {
        r.and_then(|()| match v.get("Addr").and_then(Value::as_str) {
            Some(a) => parse_host_port(a).map_err(|e| format!("Addr: {e}")),
            None => Err("no Addr string".into()),
        })
    });
    (parsed, tagged)
}

/// A `coredns` value: `{"host": …, "port": …}`.
fn parse_coredns(value: &[u8]) -> HostPort {
    let v: Value =
        serde_json::from_slice(value).map_err(|e| format!("not a CoreDNS record (JSON): {e}"))?;
    let host = v
        .get("host")
        .and_then(Value::as_str)
        .filter(|h| !h.is_empty())
        .ok_or("no host")?;
    let host = import_host(host)?;
    let port = match v.get("port") {
        Some(p) => p
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {p} is not a port (1-65535)"))?,
        None => return Err("no port".into()),
    };
    Ok((host, port))
}

/// Publishes a change of the snapshot, and only a change.
fn publish(tx: &watch::Sender<ImportSnapshot>, f: impl FnOnce(&mut ImportSnapshot)) {
    tx.send_if_modified(|s| {
        let before = s.clone();
        f(s);
        *s != before
    });
}

/// Backoff of an import watch.
struct Retry {
    pause: Duration,
    failing: bool,
    /// The last established watch broke quickly: do not reset the pause.
    quick: bool,
}

impl Etcd {
    fn import_target(&self, name: &str) -> ImportTarget {
        let layout = &self.inner.layout;
        let (prefix, label) = layout.lookup_prefix(name);
        let marker = (!self.inner.owner.is_empty() && !self.inner.catalog.is_empty())
            .then(|| self.inner.marker.clone());
        ImportTarget {
            kind: layout.kind,
            prefix,
            label,
            marker,
            owner: self.inner.owner.clone(),
        }
    }

    /// The leases whose keys are this controller's: the marker's, and the leases this backend
    /// holds itself (a previous one during a TTL change).
    fn own_leases(&self, state: &ImportState) -> Vec<i64> {
        let mut own: Vec<i64> = state.marker_lease.into_iter().collect();
        if !self.inner.owner.is_empty()
            && let Ok(st) = self.inner.lease.try_lock()
        {
            own.extend(st.current.iter().chain(st.previous.iter()).map(|h| h.id));
        }
        own
    }

    fn publish_state(&self, tx: &watch::Sender<ImportSnapshot>, state: &ImportState) {
        let (instances, skipped) = state.parts(&self.own_leases(state));
        publish(tx, |s| {
            s.instances = instances;
            s.skipped = skipped;
            s.error = None;
            s.synced = true;
        });
    }

    /// Reads, watches and re-reads forever.
    async fn follow_import(&self, target: &ImportTarget, tx: &watch::Sender<ImportSnapshot>) {
        let mut retry = Retry {
            pause: IMPORT_RETRY_FIRST,
            failing: false,
            quick: false,
        };
        loop {
            match self.import_round(target, tx, &mut retry).await {
                Err(e) => {
                    if retry.failing {
                        debug!(catalog = %self.inner.catalog, prefix = %target.prefix, error = %e, "etcd import read failed");
                    } else {
                        warn!(catalog = %self.inner.catalog, prefix = %target.prefix, error = %e, "etcd import read failed; keeping the last instances and retrying");
                    }
                    retry.failing = true;
                    publish(tx, |s| s.error = Some(e));
                    tokio::time::sleep(retry.pause).await;
                    retry.pause = (retry.pause * 2).min(IMPORT_RETRY_MAX);
                }
                Ok((why, lived)) => {
                    debug!(catalog = %self.inner.catalog, prefix = %target.prefix, why, "etcd import watch broke; reading again");
                    retry.quick = lived < IMPORT_QUICK_BREAK;
                    if retry.quick {
                        tokio::time::sleep(retry.pause).await;
                        retry.pause = (retry.pause * 2).min(IMPORT_RETRY_MAX);
                    }
                }
            }
        }
    }

    /// The keys of the target and the marker's lease, at one revision, and that revision.
    async fn import_read(&self, target: &ImportTarget) -> Result<(ImportState, i64), Fail> {
        let what = format!("reading {}", target.prefix);
        let (kvs, revision) = self
            .inner
            .range_at(
                &what,
                target.prefix.as_bytes().to_vec(),
                prefix_end(target.prefix.as_bytes()),
                0,
            )
            .await?;
        if revision <= 0 {
            return Err(Fail::Backend(BackendError::Protocol(format!(
                "{what}: etcd answered without a revision"
            ))));
        }
        let mut state = ImportState {
            keys: kvs.iter().filter_map(|kv| target.seen(kv)).collect(),
            marker_lease: None,
        };
        if let Some(marker) = &target.marker {
            let marker = marker.clone();
            let resp = self
                .inner
                .call("reading the lease marker", move |mut c| {
                    let marker = marker.clone();
                    async move {
                        c.get(marker, Some(GetOptions::new().with_revision(revision)))
                            .await
                    }
                })
                .await?;
            state.marker_lease = resp.kvs().first().and_then(marker_lease);
        }
        Ok((state, revision))
    }

    /// An error of an import watch stream on endpoint `idx`.
    fn watch_error(&self, idx: usize, what: &str, e: &etcd_client::Error) -> BackendError {
        let endpoint = &self.inner.endpoints[idx];
        let (kind, text) = classify(e);
        match kind {
            Kind::Transport => {
                self.inner.forget(idx);
                BackendError::Unreachable(format!("{what} on etcd {endpoint}: {text}"))
            }
            Kind::Unauthorized => {
                self.inner.forget(idx);
                BackendError::Unauthorized(format!("{what} on etcd {endpoint}: {text}"))
            }
            Kind::LeaseGone | Kind::Rejected => {
                BackendError::Rejected(format!("{what} on etcd {endpoint}: {text}"))
            }
        }
    }

    /// One read and the watch from the revision read, until the watch breaks. An error before
    /// the watch is in place is the snapshot's error; a watch that broke afterwards returns why
    /// and how long it lived.
    async fn import_round(
        &self,
        target: &ImportTarget,
        tx: &watch::Sender<ImportSnapshot>,
        retry: &mut Retry,
    ) -> Result<(String, Duration), BackendError> {
        let (mut state, revision) = self.import_read(target).await?;
        let what = format!("watching {}", target.prefix);
        let opts = WatchOptions::new()
            .with_range(prefix_end(target.prefix.as_bytes()))
            .with_start_revision(revision + 1);
        let prefix = target.prefix.clone();
        let (mut stream, idx): (WatchStream, usize) = self
            .inner
            .call_at(&what, move |mut c| {
                let (prefix, opts) = (prefix.clone(), opts.clone());
                async move { c.watch(prefix, Some(opts)).await }
            })
            .await?;
        let endpoint = self.inner.endpoints[idx].clone();
        let mut want = 1;
        if let Some(marker) = &target.marker {
            let opts = WatchOptions::new().with_start_revision(revision + 1);
            stream
                .watch(marker.clone(), Some(opts))
                .await
                .map_err(|e| self.watch_error(idx, &what, &e))?;
            want += 1;
        }
        // Until etcd confirms the watches, events are kept but not yet published.
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut created = 0;
        while created < want {
            let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
                Ok(m) => m,
                Err(_) => {
                    self.inner.forget(idx);
                    return Err(BackendError::Unreachable(format!(
                        "{what}: etcd {endpoint} did not confirm the watch within {}s",
                        REQUEST_TIMEOUT.as_secs()
                    )));
                }
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Err(BackendError::Unreachable(format!(
                        "{what}: etcd {endpoint} closed the watch stream"
                    )));
                }
                Err(e) => return Err(self.watch_error(idx, &what, &e)),
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return Ok((format!("revision {revision} was compacted"), Duration::ZERO));
                }
                return Err(BackendError::Rejected(format!(
                    "{what} on etcd {endpoint}: the watch was cancelled: {}",
                    resp.cancel_reason()
                )));
            }
            if resp.created() {
                created += 1;
            }
            state.apply(target, &resp);
        }
        if retry.failing {
            info!(catalog = %self.inner.catalog, prefix = %target.prefix, "etcd import watch works again");
        }
        retry.failing = false;
        if !retry.quick {
            retry.pause = IMPORT_RETRY_FIRST;
        }
        self.publish_state(tx, &state);
        let started = tokio::time::Instant::now();
        loop {
            let why = match stream.message().await {
                Ok(Some(resp)) if resp.canceled() => {
                    format!(
                        "the watch was cancelled (compacted at {}): {}",
                        resp.compact_revision(),
                        resp.cancel_reason()
                    )
                }
                Ok(Some(resp)) => {
                    if state.apply(target, &resp) {
                        self.publish_state(tx, &state);
                    }
                    continue;
                }
                Ok(None) => format!("etcd {endpoint} closed the watch stream"),
                Err(e) => self.watch_error(idx, &what, &e).to_string(),
            };
            return Ok((why, started.elapsed()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Origin;

    fn inst(name: &str, ns: &str, ip: &str, port: u16) -> Instance {
        Instance {
            name: name.into(),
            address: ip.parse().expect("test ip"),
            port,
            origin: Origin {
                namespace: ns.into(),
                service: "api-x".into(),
            },
            tags: vec![],
            meta: BTreeMap::new(),
        }
    }

    fn cfg(layout: EtcdLayout) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            layout,
            owner: "c1".into(),
            catalog: "etcd-main".into(),
            ..Default::default()
        }
    }

    fn etcd(layout: EtcdLayout) -> Etcd {
        Etcd::new(cfg(layout)).expect("valid config")
    }

    #[test]
    fn config_is_checked_without_contacting_anything() {
        let ok = cfg(EtcdLayout::Plain);
        let bad = |c: EtcdConfig| Etcd::new(c).is_err();
        assert!(Etcd::new(ok.clone()).is_ok());
        for endpoints in [
            vec![],
            vec!["etcd".to_string()],
            vec!["etcd:x".to_string()],
            vec!["ftp://etcd:2379".to_string()],
            vec!["http://etcd:2379/path".to_string()],
            vec!["::1:2379".to_string()],
            vec![
                "https://etcd-0:2379".to_string(),
                "http://etcd-1:2379".to_string(),
            ],
        ] {
            assert!(
                bad(EtcdConfig {
                    endpoints: endpoints.clone(),
                    ..ok.clone()
                }),
                "{endpoints:?}"
            );
        }
        for endpoints in [
            vec!["http://etcd-0:2379".to_string(), "[::1]:2379".to_string()],
            vec!["etcd.example:2379/".to_string()],
            // TLS checked against the system's roots.
            vec!["https://etcd:2379".to_string(), "etcd-1:2379".to_string()],
        ] {
            assert!(!bad(EtcdConfig {
                endpoints,
                ..ok.clone()
            }));
        }
        assert!(bad(EtcdConfig {
            owner: "a/b".into(),
            ..ok.clone()
        }));
        assert!(bad(EtcdConfig {
            insecure_skip_verify: true,
            ..ok.clone()
        }));
        assert!(bad(EtcdConfig {
            ca_pem: Some(b"not pem".to_vec()),
            ..ok.clone()
        }));
        let cert = ClientCert {
            cert_pem: b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec(),
            key_pem: b"-----BEGIN PRIVATE KEY-----\nsecret-key\n-----END PRIVATE KEY-----\n"
                .to_vec(),
        };
        assert!(
            bad(EtcdConfig {
                client_cert: Some(cert.clone()),
                ..ok.clone()
            }),
            "a client certificate without the CA"
        );
        assert!(bad(EtcdConfig {
            ca_pem: Some(cert.cert_pem.clone()),
            client_cert: Some(ClientCert {
                key_pem: b"not pem".to_vec(),
                ..cert.clone()
            }),
            ..ok.clone()
        }));
        assert!(
            !format!("{:?}", cert).contains("secret-key"),
            "the key is never printed"
        );
        assert!(bad(EtcdConfig {
            lease_ttl: Duration::ZERO,
            ..ok.clone()
        }));
        assert!(bad(EtcdConfig {
            zone: Some("Bad_Zone.local".into()),
            layout: EtcdLayout::Coredns,
            ..ok.clone()
        }));
        let dbg = format!(
            "{:?}",
            EtcdConfig {
                password: Some("secret-pw".into()),
                ..ok
            }
        );
        assert!(!dbg.contains("secret-pw"), "{dbg}");
    }

    #[test]
    fn plain_keys_and_values_are_host_port() {
        let e = etcd(EtcdLayout::Plain);
        let recs = e.render(&[
            inst("api_x", "shop", "10.0.0.1", 8080),
            inst("api_x", "shop", "fd00::1", 8080),
        ]);
        assert_eq!(
            recs,
            BTreeMap::from([
                (
                    "/services/api_x/providers/10.0.0.1:8080".to_string(),
                    json!({"value": "10.0.0.1:8080"})
                ),
                (
                    "/services/api_x/providers/[fd00::1]:8080".to_string(),
                    json!({"value": "[fd00::1]:8080"})
                ),
            ])
        );
        assert_eq!(e.prefix(), "/services/");
        assert_eq!(e.marker_key(), "/catalog-bridge.io/leases/c1/etcd-main");
        assert_eq!(
            e.describe(),
            "etcd 127.0.0.1:2379 layout plain prefix /services/"
        );
        let e = Etcd::new(EtcdConfig {
            base_path: Some("/ep2016/".into()),
            ..cfg(EtcdLayout::Plain)
        })
        .expect("valid");
        let (key, _) = e.entry(&inst("api_x", "shop", "10.0.0.1", 80));
        assert_eq!(key, "/ep2016/api_x/providers/10.0.0.1:80");
    }

    #[test]
    fn naming_values_are_endpoint_manager_updates() {
        let e = etcd(EtcdLayout::Naming);
        let mut i = inst("api_x", "shop", "10.0.0.1", 8080);
        let (key, value) = e.entry(&i);
        assert_eq!(key, "api_x/10.0.0.1:8080", "no leading slash");
        assert_eq!(
            value,
            r#"{"Op":0,"Addr":"10.0.0.1:8080","Metadata":{"owner":"c1","namespace":"shop","service":"api-x"}}"#
        );
        i.tags = vec!["v2".into()];
        i.meta.insert("version".into(), "2".into());
        let (_, value) = e.entry(&i);
        let v: Value = serde_json::from_str(&value).expect("json");
        assert_eq!(v["Op"], json!(0));
        assert!(v["Op"].is_u64(), "Op is a number");
        assert_eq!(v["Metadata"]["tags"], json!(["v2"]));
        assert_eq!(v["Metadata"]["meta"]["version"], "2");
        assert_eq!(
            naming_addr(value.as_bytes()).as_deref(),
            Some("10.0.0.1:8080")
        );
        assert_eq!(naming_addr(br#"{"Op":1,"Addr":"10.0.0.1:1"}"#), None);
        assert_eq!(naming_addr(b"10.0.0.1:1"), None);
        assert_eq!(e.prefix(), "");
        let e = Etcd::new(EtcdConfig {
            base_path: Some("/grpc".into()),
            ..cfg(EtcdLayout::Naming)
        })
        .expect("valid");
        assert_eq!(e.entry(&i).0, "/grpc/api_x/10.0.0.1:8080");
    }

    #[test]
    fn coredns_keys_are_lower_case_dns_paths() {
        let e = Etcd::new(EtcdConfig {
            zone: Some("Bridge.Example.".into()),
            ..cfg(EtcdLayout::Coredns)
        })
        .expect("valid");
        let i = inst("API_x", "Shop", "fd00::1", 8080);
        let (key, value) = e.entry(&i);
        let id = coredns_id("c1", &i);
        assert!(id.starts_with("fd00--1-8080-"), "{id}");
        assert_eq!(key, format!("/skydns/example/bridge/shop/api-x/{id}"));
        assert_eq!(key, key.to_ascii_lowercase());
        assert_eq!(value, r#"{"host":"fd00::1","port":8080,"ttl":30}"#);
        assert_eq!(
            coredns_host_port(value.as_bytes()).as_deref(),
            Some("[fd00::1]:8080")
        );
        assert_eq!(coredns_host_port(br#"{"port":1}"#), None);
        // The id is deterministic, and differs per owner and per origin.
        assert_eq!(id, coredns_id("c1", &i.clone()));
        assert_ne!(id, coredns_id("c2", &i));
        assert_ne!(
            id,
            coredns_id("c1", &inst("API_x", "other", "fd00::1", 8080))
        );
        assert_eq!(e.prefix(), "/skydns/example/bridge/");
        // Default zone.
        let (key, _) = etcd(EtcdLayout::Coredns).entry(&inst("api_x", "shop", "10.0.0.1", 80));
        assert!(
            key.starts_with("/skydns/local/bridge/shop/api-x/10-0-0-1-80-"),
            "{key}"
        );
    }

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(dns_label("api_x"), "api-x");
        assert_eq!(dns_label("API.v2"), "api-v2");
        assert_eq!(dns_label("-x-"), "x");
        assert_eq!(dns_label(&"a".repeat(80)).len(), 63);
        let odd = dns_label("___");
        assert!(odd.starts_with('x') && odd.len() == 9, "{odd}");
        assert_eq!(odd, dns_label("___"));
    }

    #[test]
    fn coredns_lookups_take_a_name_or_a_dns_name() {
        let e = etcd(EtcdLayout::Coredns);
        let l = &e.inner.layout;
        assert_eq!(
            l.lookup_prefix("api_x"),
            (
                "/skydns/local/bridge/".to_string(),
                Some("api-x".to_string())
            )
        );
        for n in ["api_x.shop", "api-x.shop.bridge.local.", "API-X.Shop"] {
            assert_eq!(
                l.lookup_prefix(n),
                ("/skydns/local/bridge/shop/api-x/".to_string(), None),
                "{n}"
            );
        }
        let p = etcd(EtcdLayout::Plain);
        assert_eq!(
            p.inner.layout.lookup_prefix("api_x").0,
            "/services/api_x/providers/"
        );
        let n = etcd(EtcdLayout::Naming);
        assert_eq!(n.inner.layout.lookup_prefix("api_x").0, "api_x/");
    }

    #[test]
    fn records_compare_equal_only_for_the_same_value_and_lease() {
        let e = etcd(EtcdLayout::Plain);
        let i = inst("api_x", "shop", "10.0.0.1", 8080);
        let rendered = e.render(std::slice::from_ref(&i));
        let (key, value) = e.entry(&i);
        let read = BTreeMap::from([(key.clone(), record_of(&value, false))]);
        assert!(crate::export::plan::plan(&rendered, &read).is_empty());
        let moved = BTreeMap::from([(key.clone(), record_of(&value, true))]);
        let p = crate::export::plan::plan(&rendered, &moved);
        assert_eq!((p.creates, p.updates, p.deletes), (0, 1, 0));
        assert_eq!(
            record_value(&key, &rendered[&key]).expect("value"),
            "10.0.0.1:8080"
        );
        assert!(record_value("k", &json!({"v": 1})).is_err());
    }

    fn puts(e: &Etcd, n: usize) -> Vec<Op> {
        let instances: Vec<Instance> = (0..n)
            .map(|i| {
                inst(
                    "api_x",
                    "shop",
                    &format!("10.1.{}.{}", i / 250, i % 250 + 1),
                    80,
                )
            })
            .collect();
        e.render(&instances)
            .into_iter()
            .map(|(key, record)| Op::Put { key, record })
            .collect()
    }

    #[test]
    fn batches_stay_within_128_operations_guards_included() {
        let e = etcd(EtcdLayout::Plain);
        let mut ops = puts(&e, 300);
        ops.extend((0..10).map(|i| Op::Delete {
            key: format!("/services/old/providers/10.9.9.{i}:1"),
        }));
        let b = batches(&ops);
        assert_eq!(
            b.iter().map(|b| b.len()).collect::<Vec<_>>(),
            [125, 125, 60]
        );
        assert_eq!(b.concat(), ops);
        assert!(batches(&[]).is_empty());
        for batch in &b {
            assert!(e.txn(batch, 1, Some(2)).is_ok());
        }
        // Large values split by size too; one huge op still goes alone.
        let big = |n: usize| Op::Put {
            key: format!("/services/big/providers/{n}"),
            record: json!({"value": "x".repeat(300 * 1024)}),
        };
        let ops: Vec<Op> = (0..4).map(big).collect();
        assert_eq!(batches(&ops).len(), 4);
        let huge = [Op::Put {
            key: "/services/huge/providers/1".into(),
            record: json!({"value": "x".repeat(2 * MAX_TXN_BYTES)}),
        }];
        assert_eq!(batches(&huge).len(), 1);
    }

    #[test]
    fn writes_outside_the_prefix_or_without_a_value_are_refused() {
        let e = etcd(EtcdLayout::Plain);
        let outside = [Op::Delete {
            key: "/elsewhere/x".into(),
        }];
        assert!(matches!(
            e.txn(&outside, 1, None),
            Err(BackendError::Protocol(_))
        ));
        let marker = [Op::Delete {
            key: e.marker_key().to_string(),
        }];
        assert!(e.txn(&marker, 1, None).is_err());
        let no_value = [Op::Put {
            key: "/services/a/providers/1".into(),
            record: json!({"Service": {}}),
        }];
        assert!(matches!(
            e.txn(&no_value, 1, None),
            Err(BackendError::Protocol(_))
        ));
        // naming without a base path: the marker is inside "every key" and still refused.
        let n = etcd(EtcdLayout::Naming);
        let marker = [Op::Delete {
            key: n.marker_key().to_string(),
        }];
        assert!(n.txn(&marker, 1, None).is_err());
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(
            classify_status(14, "tcp connect error: Connection refused (os error 111)"),
            Kind::Transport
        );
        assert_eq!(
            classify_status(14, "etcdserver: no leader"),
            Kind::Transport
        );
        assert_eq!(classify_status(4, "deadline"), Kind::Transport);
        assert_eq!(
            classify_status(5, "etcdserver: requested lease not found"),
            Kind::LeaseGone
        );
        assert_eq!(
            classify_status(
                3,
                "etcdserver: authentication failed, invalid user ID or password"
            ),
            Kind::Unauthorized
        );
        assert_eq!(
            classify_status(3, "etcdserver: user name is empty"),
            Kind::Unauthorized
        );
        assert_eq!(
            classify_status(7, "etcdserver: permission denied"),
            Kind::Unauthorized
        );
        assert_eq!(
            classify_status(3, "etcdserver: too many operations in txn request"),
            Kind::Rejected
        );
        assert_eq!(
            classify_status(2, "transport error: broken pipe"),
            Kind::Transport
        );
        assert_eq!(classify_status(2, "something odd"), Kind::Rejected);
    }

    #[test]
    fn prefix_ends_and_addresses() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(host_port("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(host_port("fd00::2", 80), "[fd00::2]:80");
        assert_eq!(host_port("db.example", 80), "db.example:80");
    }

    #[test]
    fn import_values_parse_per_layout() {
        let ok = |h: &str, p: u16| Ok((h.to_string(), p));
        assert_eq!(parse_plain(b"10.0.0.8:3306"), ok("10.0.0.8", 3306));
        assert_eq!(parse_plain(b" [fd00::8]:3306\n"), ok("fd00::8", 3306));
        assert_eq!(parse_plain(b"db-1.example:5432"), ok("db-1.example", 5432));
        for bad in [
            &b""[..],
            b"garbage",
            b"10.0.0.8",
            b"10.0.0.8:0",
            b"10.0.0.8:70000",
            b"fd00::8:3306",
            b"[nope]:1",
            b"10.0.0.300:1",
            b"a b:1",
            b"\xff:1",
        ] {
            assert!(
                parse_plain(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let (p, tagged) = parse_naming(br#"{"Op":0,"Addr":"10.0.0.9:3306"}"#, "c1");
        assert_eq!((p, tagged), (Some(ok("10.0.0.9", 3306)), false));
        let (p, _) = parse_naming(br#"{"Addr":"10.0.0.9:3306"}"#, "c1");
        assert_eq!(p, Some(ok("10.0.0.9", 3306)), "Op absent is Add");
        assert_eq!(parse_naming(br#"{"Op":1,"Addr":"x:1"}"#, "c1").0, None);
        for bad in [
            &b"garbage"[..],
            b"[1]",
            br#"{"Op":"0","Addr":"10.0.0.9:1"}"#,
            br#"{"Op":2,"Addr":"10.0.0.9:1"}"#,
            br#"{"Op":0}"#,
            br#"{"Op":0,"Addr":"10.0.0.9"}"#,
        ] {
            assert!(
                matches!(parse_naming(bad, "c1").0, Some(Err(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let e = etcd(EtcdLayout::Naming);
        let (_, value) = e.entry(&inst("api_x", "shop", "10.0.0.1", 80));
        assert!(parse_naming(value.as_bytes(), "c1").1, "our own");
        assert!(!parse_naming(value.as_bytes(), "c2").1);
        assert_eq!(
            parse_coredns(br#"{"host":"fd00::1","port":80,"ttl":30}"#),
            ok("fd00::1", 80)
        );
        assert_eq!(
            parse_coredns(br#"{"host":"db.example.","port":80}"#),
            ok("db.example", 80)
        );
        for bad in [
            &b"x"[..],
            br#"{"port":80}"#,
            br#"{"host":"10.0.0.1"}"#,
            br#"{"host":"10.0.0.1","port":0}"#,
            br#"{"host":"10.0.0.1","port":"80"}"#,
        ] {
            assert!(
                parse_coredns(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_client_without_owner_only_looks_up_and_nothing_connects_early() {
        let e = Etcd::new(EtcdConfig {
            endpoints: vec!["127.0.0.1:1".into()],
            ..Default::default()
        })
        .expect("a lookup-only client");
        assert!(matches!(
            e.read_owned().await,
            Err(BackendError::Rejected(_))
        ));
        assert_eq!(e.apply(&[]).await, Ok(0));
        assert!(e.lease_id().await.is_none());
        match e.lookup("x").await {
            Err(BackendError::Unreachable(m)) => assert!(m.contains("127.0.0.1:1"), "{m}"),
            other => panic!("expected Unreachable, got {other:?}"),
        }
        assert!(e.invalidations().is_some());
    }
}
