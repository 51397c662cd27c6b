//! ZooKeeper: every exported instance is an ephemeral znode of this controller's one session;
//! the directories above them are persistent.
//!
//! Layouts (`<root>` is the chroot of the connect string followed by the base path, default
//! `/services`):
//!
//! - `plain`: `<root>/<name>/providers/<ip>:<port>` (IPv6 `[addr]:port`), data
//!   `{"owner": …, "namespace": …, "service": …}` — what kazoo's `get_children()` lists;
//! - `curator`: `<root>/<name>/<id>` with a Curator `ServiceInstance` as data: `name`, `id` (the
//!   znode name, [`Instance::stable_id`]), `address`, `port`, `sslPort` (null), `payload` (null:
//!   a payload without `@class` breaks Curator readers, and one with a class they do not have
//!   breaks them too), `registrationTimeUTC`, `serviceType: "DYNAMIC"` and `uriSpec`
//!   (`{scheme}://{address}:{port}` as Spring Cloud registers it; null for IPv6, whose address
//!   would make an invalid URI). `enabled` is left out (absent means enabled).
//!
//! A record is `{"data": <the node's data, parsed>}`, keyed by the path below `<root>`
//! (`api_x/providers/10.0.0.1:8080`, `api_x/<id>`). Curator's `registrationTimeUTC` is not part
//! of the record: it is set to the time of creation when the node is created and kept when its
//! data is updated, so an entry that exists compares equal to its rendering after any restart
//! (and the time means what Curator readers expect: when the entry was registered).
//!
//! Ownership is the session: the owned entries are the ephemeral nodes of the layout whose
//! `ephemeralOwner` is this backend's session. Nodes of other sessions and persistent nodes are
//! never changed or deleted; updates and deletes carry the version read.
//!
//! # One session, kept across restarts and leaders
//!
//! The session id and password are kept in a [`SessionStore`] (a Kubernetes Secret in the
//! controller). On first use the backend re-attaches to the stored session; when ZooKeeper
//! still knows it, its ephemeral nodes are still there and the first plan is empty. Only when
//! ZooKeeper says it expired is a new session created (and stored). Dropping the backend does
//! not close the session — neither does a graceful shutdown: the next leader re-attaches, and
//! the entries of a controller that never comes back go after the session timeout.
//!
//! ZooKeeper gives a session to the connection that attached last and closes the others, so
//! only one live backend may use a session: a replica that stops leading must drop its backend
//! or call [`ZooKeeper::release`], or it takes the session back from the new leader (and so
//! on, endlessly).
//!
//! zookeeper-client 0.11 neither exposes a session's password nor builds a session from an id
//! and password, so every connection of the backend goes through a small relay on loopback
//! ([`Proxy`]) that reads the session handshake: it records the id and password the server
//! hands out and, to re-attach, puts the stored ones into the client's first connect request.
//! After the handshake it copies bytes and nothing else.
//!
//! A session that expires (ZooKeeper unreachable for longer than the timeout) is replaced by a
//! new one in the background; [`Backend::invalidations`] then moves so the writer re-reads
//! (now nothing) and re-creates every entry. A reconnect within the session changes nothing,
//! and neither does a ZooKeeper restart: ZooKeeper restores its sessions with a fresh timeout,
//! so the backend re-attaches even when the client had given the session up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use zookeeper_client as zk;

use super::tls::TlsSettings;
use super::{Backend, BackendError, External, ImportSnapshot, Record};
use crate::api::crd::{ServerInfo, ZooKeeperLayout};
use crate::model::Instance;
use crate::model::Op;
use crate::model::address::{import_host, parse_host_port};

/// At most this many operations (entries and the parents they need) in one `multi`: far below
/// `jute.maxbuffer` (1 MiB) for entries of the sizes written here.
pub const MAX_MULTI_OPS: usize = 100;
/// At most this many bytes of paths and data in one `multi`; an entry larger alone still goes,
/// alone.
pub const MAX_MULTI_BYTES: usize = 256 * 1024;
pub const DEFAULT_BASE_PATH: &str = "/services";
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// ZooKeeper (3.6 and later, ZOOKEEPER-4306) writes the path of every ephemeral node of a
/// session into the transaction that closes it, and a transaction must fit in `jute.maxbuffer`
/// (1 MiB by default): past that the ensemble becomes unavailable and cannot restart.
/// Past this many bytes of paths the catalog says so ([`Backend::warning`]).
pub const DEFAULT_SESSION_PATH_BUDGET: usize = 512 * 1024;
/// The directory of the plain layout below each name.
pub const PROVIDERS: &str = "providers";
/// Requests sent before waiting for their answers, when reading many nodes.
const PIPELINE: usize = 512;
/// Bound on the connect handshake frames the relay reads (they are about 50 bytes).
const MAX_HANDSHAKE_FRAME: usize = 4096;
/// The `uriSpec` Spring Cloud Zookeeper registers: `{scheme}://{address}:{port}`.
const URI_SPEC_PARTS: [(&str, bool); 5] = [
    ("scheme", true),
    ("://", false),
    ("address", true),
    (":", false),
    ("port", true),
];

/// Where the session id and password are kept between controller processes, so a restarted
/// controller or a new leader re-attaches to the live session and its ephemeral nodes survive.
#[async_trait]
pub trait SessionStore: Send + Sync {
    async fn load(&self) -> anyhow::Result<Option<StoredSession>>;
    async fn save(&self, s: &StoredSession) -> anyhow::Result<()>;
}

/// A ZooKeeper session as a client needs it to re-attach. The password lets anyone who has it
/// take the session over: keep it secret (it is left out of `Debug`).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredSession {
    pub id: i64,
    pub password: Vec<u8>,
    /// The negotiated session timeout.
    pub timeout_ms: u64,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSession")
            .field("id", &format_args!("{:#x}", self.id))
            .field("password", &"<redacted>")
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// A [`SessionStore`] in memory: for tests, and for clients that need no hand-over.
#[derive(Default)]
pub struct MemorySessionStore {
    session: Mutex<Option<StoredSession>>,
}

impl MemorySessionStore {
    /// The session stored now.
    pub fn get(&self) -> Option<StoredSession> {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl std::fmt::Debug for MemorySessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySessionStore")
            .field("session", &self.get())
            .finish()
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    async fn load(&self) -> anyhow::Result<Option<StoredSession>> {
        Ok(self.get())
    }

    async fn save(&self, s: &StoredSession) -> anyhow::Result<()> {
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
        Ok(())
    }
}

/// How to reach ZooKeeper and where to write.
#[derive(Clone)]
pub struct ZooKeeperConfig {
    /// `host1:2181,host2:2181[/chroot]`.
    pub connect: String,
    /// Requested session timeout (the server bounds it); default 10 s.
    pub session_timeout: Duration,
    /// Username and password for digest authentication.
    pub digest: Option<(String, String)>,
    pub layout: ZooKeeperLayout,
    /// znode prefix below the chroot; default `/services`.
    pub base_path: Option<String>,
    /// This controller's owner id (the cluster id). Empty: a client that can only look up and
    /// probe, with a session of its own that is closed when it is dropped.
    pub owner: String,
    pub session_store: Arc<dyn SessionStore>,
    /// TLS to the servers (their `secureClientPort`); `None`: plain TCP.
    pub tls: Option<TlsSettings>,
    /// Bytes of entry paths one session may own before the catalog warns; default
    /// [`DEFAULT_SESSION_PATH_BUDGET`].
    pub session_path_budget: usize,
    /// Reads only (`--dry-run`, `cleanup --dry-run`): never attaches to the stored session
    /// (which would take it from the writing leader) nor stores one; owns what the stored
    /// session's ephemeral nodes hold, read through a session of its own; writes nothing.
    pub read_only: bool,
}

impl Default for ZooKeeperConfig {
    fn default() -> Self {
        ZooKeeperConfig {
            connect: String::new(),
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            digest: None,
            layout: ZooKeeperLayout::Plain,
            base_path: None,
            owner: String::new(),
            session_store: Arc::new(MemorySessionStore::default()),
            tls: None,
            session_path_budget: DEFAULT_SESSION_PATH_BUDGET,
            read_only: false,
        }
    }
}

impl std::fmt::Debug for ZooKeeperConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZooKeeperConfig")
            .field("connect", &self.connect)
            .field("session_timeout", &self.session_timeout)
            .field(
                "digest",
                &self.digest.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("layout", &self.layout)
            .field("base_path", &self.base_path)
            .field("tls", &self.tls)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// Why a name cannot be a znode name (and so not an external name in ZooKeeper), or None.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name == "." || name == ".." {
        return Some(format!("{name:?} is not a valid znode name"));
    }
    if name.contains('/') {
        return Some(format!("znode name {name:?} must not contain '/'"));
    }
    // ZooKeeper's PathUtils refuses these characters.
    let bad = |c: char| {
        c == '\0'
            || ('\u{1}'..='\u{1f}').contains(&c)
            || ('\u{7f}'..='\u{9f}').contains(&c)
            || ('\u{e000}'..='\u{f8ff}').contains(&c)
            || ('\u{fff0}'..='\u{ffff}').contains(&c)
    };
    if name.chars().any(bad) {
        return Some(format!(
            "znode name {name:?} holds a character ZooKeeper refuses"
        ));
    }
    None
}

/// One server of the connect string.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Upstream {
    host: String,
    port: u16,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The servers and the chroot (`""` when none) of a connect string.
fn parse_connect(s: &str) -> anyhow::Result<(Vec<Upstream>, String)> {
    let s = s.trim();
    let (hosts, chroot) = match s.find('/') {
        // `tcp://` prefixes hold slashes too: the chroot starts at the first '/' after them.
        _ if s.contains("://") => {
            let mut hosts = s;
            let mut chroot = "";
            let mut offset = 0;
            for part in s.split(',') {
                let body = part.split_once("://").map_or(part, |(_, b)| b);
                if let Some(i) = body.find('/') {
                    let start = offset + (part.len() - body.len()) + i;
                    hosts = &s[..start];
                    chroot = &s[start..];
                    break;
                }
                offset += part.len() + 1;
            }
            (hosts, chroot)
        }
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let chroot = if chroot == "/" { "" } else { chroot };
    if !chroot.is_empty() {
        check_path(chroot).with_context(|| format!("the chroot of {s:?}"))?;
    }
    let mut upstreams = Vec::new();
    for part in hosts.split(',') {
        let part = part.trim();
        let part = match part.split_once("://") {
            None => part,
            Some(("tcp", rest)) => rest,
            Some((scheme, _)) => bail!(
                "ZooKeeper address {part:?}: write host:port without {scheme}:// (for TLS, \
                 name the secureClientPort and set zookeeper.tls)"
            ),
        };
        if part.is_empty() {
            bail!("ZooKeeper connect string {s:?} has an empty address");
        }
        let (host, port) = if let Some(rest) = part.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .with_context(|| format!("ZooKeeper address {part:?}: no closing ']'"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(p.strip_prefix(':').with_context(|| {
                        format!("ZooKeeper address {part:?}: expected ':' after ']'")
                    })?),
                ),
            }
        } else {
            match part.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (part, None),
            }
        };
        if host.is_empty() || host.contains(['/', ' ']) {
            bail!("ZooKeeper address {part:?} has no valid host");
        }
        let port = match port {
            None => 2181,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => bail!("ZooKeeper address {part:?} has an invalid port"),
            },
        };
        upstreams.push(Upstream {
            host: host.to_string(),
            port,
        });
    }
    Ok((upstreams, chroot.to_string()))
}

/// An absolute znode path without a trailing slash, of valid names.
fn check_path(p: &str) -> anyhow::Result<()> {
    let Some(rest) = p.strip_prefix('/') else {
        bail!("{p:?} is not an absolute path");
    };
    for part in rest.split('/') {
        if let Some(problem) = name_problem(part) {
            bail!("{p:?}: {problem}");
        }
    }
    Ok(())
}

/// Every proper ancestor of `path` except `/`, shallowest first.
fn ancestors(path: &str) -> Vec<String> {
    path.match_indices('/')
        .filter(|(i, _)| *i > 0)
        .map(|(i, _)| path[..i].to_string())
        .collect()
}

/// `host:port` as a client dials it: IPv6 in brackets.
fn dial_address(host: &str, port: u64) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What one owned node is known to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Known {
    version: i32,
    /// Curator: its `registrationTimeUTC`.
    registered: Option<u64>,
}

/// What the backend knows about the catalog between calls.
#[derive(Default)]
struct Cache {
    /// The session the entries belong to.
    session: i64,
    /// Owned entries by key.
    entries: HashMap<String, Known>,
    /// Persistent directories known to exist.
    parents: HashSet<String>,
}

/// One live session.
struct Conn {
    client: zk::Client,
    proxy: Proxy,
    session: StoredSession,
    /// The session is in the store.
    saved: AtomicBool,
}

/// The session of a backend.
enum Slot {
    /// None yet, or released: the next call re-attaches to the stored session.
    Empty,
    Live(Arc<Conn>),
    /// Held, then lost on the client (expired, or given up while unreachable) and not
    /// re-established yet.
    Lost(StoredSession),
}

struct Inner {
    /// [`ZooKeeperConfig::read_only`].
    read_only: bool,
    connect: String,
    upstreams: Vec<Upstream>,
    /// TLS to the servers, spoken by the session relay.
    tls: Option<TlsConnector>,
    session_path_budget: usize,
    /// The chroot followed by the base path: the directory that holds the names.
    root: String,
    base: String,
    layout: ZooKeeperLayout,
    owner: String,
    /// `user:password` for digest authentication.
    digest: Option<String>,
    session_timeout: Duration,
    store: Arc<dyn SessionStore>,
    entry_acls: Vec<zk::Acl>,
    parent_acls: Vec<zk::Acl>,
    conn: tokio::sync::Mutex<Slot>,
    /// The read-only session of the import watches (see [`Backend::watch_service`]).
    watch_conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    cache: Mutex<Cache>,
    invalidated: watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A ZooKeeper ensemble, reached through one session.
pub struct ZooKeeper {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ZooKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZooKeeper")
            .field("connect", &self.inner.connect)
            .field("root", &self.inner.root)
            .field("layout", &self.inner.layout)
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        // The session is not closed (its client is detached): the next leader re-attaches.
        for t in self.inner.lock_tasks().drain(..) {
            t.abort();
        }
    }
}

/// An error while establishing a session.
enum ConnectError {
    /// The session to re-attach to no longer exists.
    Expired,
    Failed(BackendError),
}

/// One write of an apply.
#[derive(Clone, Debug)]
enum Write {
    Create {
        key: String,
        path: String,
        record: Record,
        data: Vec<u8>,
        registered: Option<u64>,
    },
    Set {
        key: String,
        path: String,
        record: Record,
        data: Vec<u8>,
        registered: Option<u64>,
        version: i32,
    },
    Delete {
        key: String,
        path: String,
        version: i32,
    },
}

impl Write {
    fn path(&self) -> &str {
        match self {
            Write::Create { path, .. } | Write::Set { path, .. } | Write::Delete { path, .. } => {
                path
            }
        }
    }

    fn size(&self) -> usize {
        let data = match self {
            Write::Create { data, .. } | Write::Set { data, .. } => data.len(),
            Write::Delete { .. } => 0,
        };
        self.path().len() + data + 64
    }
}

/// A `multi`: the parents it creates first, then `writes[range]`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Batch {
    parents: Vec<String>,
    range: std::ops::Range<usize>,
}

/// Cuts `writes` into multis of at most [`MAX_MULTI_OPS`] operations and about
/// [`MAX_MULTI_BYTES`], each creating the parents not in `known` that its creates need (once).
fn batches(writes: &[Write], known: &HashSet<String>) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut created: HashSet<String> = HashSet::new();
    let mut i = 0;
    while i < writes.len() {
        let start = i;
        let mut parents: Vec<String> = Vec::new();
        let (mut ops, mut bytes) = (0, 0);
        while i < writes.len() {
            let w = &writes[i];
            let new: Vec<String> = match w {
                Write::Create { path, .. } => ancestors(path)
                    .into_iter()
                    .filter(|p| !known.contains(p) && !created.contains(p))
                    .collect(),
                _ => Vec::new(),
            };
            let n = 1 + new.len();
            let b = w.size() + new.iter().map(|p| p.len() + 64).sum::<usize>();
            if i > start && (ops + n > MAX_MULTI_OPS || bytes + b > MAX_MULTI_BYTES) {
                break;
            }
            ops += n;
            bytes += b;
            created.extend(new.iter().cloned());
            parents.extend(new);
            i += 1;
        }
        out.push(Batch {
            parents,
            range: start..i,
        });
    }
    out
}

fn is_connection_error(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::ConnectionLoss
            | zk::Error::SessionExpired
            | zk::Error::SessionMoved
            | zk::Error::ClientClosed
            | zk::Error::Timeout
            | zk::Error::NoHosts
    )
}

impl Inner {
    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_owner(&self) -> bool {
        !self.owner.is_empty()
    }

    /// Whether the session is this owner's stored one, kept across restarts: attached to,
    /// saved, left open. Not for a client without owner, nor a read-only one.
    fn keeps_session(&self) -> bool {
        self.has_owner() && !self.read_only
    }

    fn hosts(&self) -> String {
        self.upstreams
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The error for a failed ZooKeeper call.
    fn error(&self, what: &str, e: &zk::Error, proxy: Option<&Proxy>) -> BackendError {
        let mut msg = format!("{what} on ZooKeeper {}: {e}", self.hosts());
        match e {
            zk::Error::NoAuth | zk::Error::AuthFailed => BackendError::Unauthorized(msg),
            e if is_connection_error(e) => {
                if let Some(f) = proxy.and_then(Proxy::failures) {
                    msg.push_str(&format!(" ({f})"));
                }
                BackendError::Unreachable(msg)
            }
            zk::Error::UnmarshalError { .. }
            | zk::Error::UnexpectedError(_)
            | zk::Error::UnexpectedErrorCode(_)
            | zk::Error::MarshallingError => BackendError::Protocol(msg),
            _ => BackendError::Rejected(msg),
        }
    }

    fn backoff_cap(&self) -> Duration {
        (self.session_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// The live session, established (or re-established) when there is none. (Boxed: the
    /// session watcher it spawns calls it again.)
    fn conn(self: &Arc<Self>) -> futures::future::BoxFuture<'_, Result<Arc<Conn>, BackendError>> {
        Box::pin(async move {
            self.establish(false).await?.ok_or_else(|| {
                BackendError::Protocol("no ZooKeeper session was established".into())
            })
        })
    }

    /// Returns the live session, or re-attaches to the session held last, or to the stored
    /// one, or opens a new one. In the `background` (the session watcher), only a session
    /// that was held and lost is re-established: None when there is nothing to do.
    async fn establish(
        self: &Arc<Self>,
        background: bool,
    ) -> Result<Option<Arc<Conn>>, BackendError> {
        let mut slot = self.conn.lock().await;
        let (candidate, held) = match &*slot {
            Slot::Live(c) if !c.client.state().is_terminated() => {
                if background {
                    return Ok(None);
                }
                let c = c.clone();
                drop(slot);
                self.save(&c).await;
                return Ok(Some(c));
            }
            Slot::Live(c) => {
                tracing::info!(session = %format_args!("{:#x}", c.session.id), state = %c.client.state(), "the ZooKeeper client gave the session up; re-attaching");
                (Some(c.session.clone()), true)
            }
            Slot::Lost(s) => (Some(s.clone()), true),
            // Released, or never used: only a caller brings it back.
            Slot::Empty if background => return Ok(None),
            Slot::Empty if self.keeps_session() => (
                self.store.load().await.map_err(|e| {
                    BackendError::Rejected(format!(
                        "loading the stored ZooKeeper session for {}: {e:#}",
                        self.hosts()
                    ))
                })?,
                false,
            ),
            Slot::Empty => (None, false),
        };
        if held && let Some(s) = &candidate {
            // Keep knowing the session while it cannot be reached (drops the dead client).
            *slot = Slot::Lost(s.clone());
        }
        let mut attached = None;
        if let Some(s) = &candidate {
            match self.connect(Some(s), self.has_owner()).await {
                Ok(c) => {
                    tracing::info!(session = %format_args!("{:#x}", s.id), "re-attached to the ZooKeeper session");
                    c.saved.store(true, Ordering::SeqCst);
                    attached = Some(c);
                }
                Err(ConnectError::Expired) => {
                    tracing::info!(session = %format_args!("{:#x}", s.id), "the ZooKeeper session expired; starting a new one");
                }
                Err(ConnectError::Failed(e)) => return Err(e),
            }
        }
        let fresh = attached.is_none();
        let conn = match attached {
            Some(c) => c,
            // A read-only session is its own: closed when dropped.
            None => match self.connect(None, self.keeps_session()).await {
                Ok(c) => c,
                Err(ConnectError::Expired) => {
                    return Err(BackendError::Protocol(format!(
                        "ZooKeeper {} refused to open a new session",
                        self.hosts()
                    )));
                }
                Err(ConnectError::Failed(e)) => return Err(e),
            },
        };
        let conn = Arc::new(conn);
        {
            let mut cache = self.lock_cache();
            if cache.session != conn.session.id {
                cache.session = conn.session.id;
                cache.entries.clear();
            }
        }
        let watcher = tokio::spawn(watch_session(
            Arc::downgrade(self),
            conn.client.state_watcher(),
        ));
        {
            let mut tasks = self.lock_tasks();
            tasks.retain(|t| !t.is_finished());
            tasks.push(watcher);
        }
        *slot = Slot::Live(conn.clone());
        drop(slot);
        if fresh {
            tracing::info!(session = %format_args!("{:#x}", conn.session.id), timeout_ms = conn.session.timeout_ms, hosts = %self.hosts(), "new ZooKeeper session");
            self.save(&conn).await;
            if held {
                // Everything the old session held is gone: the writer re-reads and re-puts.
                self.invalidated.send_modify(|n| *n += 1);
            }
        }
        Ok(Some(conn))
    }

    /// [`Inner::establish`] for the session watcher. (Boxed: it spawns the watcher.)
    fn establish_in_background(
        self: &Arc<Self>,
    ) -> futures::future::BoxFuture<'_, Result<Option<Arc<Conn>>, BackendError>> {
        Box::pin(self.establish(true))
    }

    /// Stores the session when it is not stored yet; a failure is logged and retried on the
    /// next call (without it, a restart cannot re-attach and re-creates the entries).
    async fn save(&self, conn: &Conn) {
        if !self.keeps_session() || conn.saved.load(Ordering::SeqCst) {
            return;
        }
        match self.store.save(&conn.session).await {
            Ok(()) => conn.saved.store(true, Ordering::SeqCst),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not store the ZooKeeper session; a restart will not re-attach to it")
            }
        }
    }

    /// Opens a session, re-attaching to `attach` when given. A `detached` session is not
    /// closed when its client is dropped.
    async fn connect(
        &self,
        attach: Option<&StoredSession>,
        detached: bool,
    ) -> Result<Conn, ConnectError> {
        let upstream_timeout = (self.session_timeout * 2 / 5).min(Duration::from_secs(5));
        let proxy = Proxy::start(
            &self.upstreams,
            self.tls.clone(),
            attach.map(|s| (s.id, s.password.clone())),
            upstream_timeout,
        )
        .await
        .map_err(|e| {
            ConnectError::Failed(BackendError::Rejected(format!(
                "starting the session relay for ZooKeeper {}: {e}",
                self.hosts()
            )))
        })?;
        let mut connector = zk::Client::connector()
            .with_session_timeout(self.session_timeout)
            .with_fail_eagerly();
        if detached {
            // Dropping the client leaves the session (and its ephemeral nodes) to the next
            // process that re-attaches, or to the session timeout.
            connector = connector.with_detached();
        }
        if let Some(d) = &self.digest {
            connector = connector.with_auth("digest", d.as_bytes());
        }
        let result = tokio::time::timeout(
            self.session_timeout * 2 + Duration::from_secs(1),
            connector.connect(&proxy.connect_string()),
        )
        .await;
        proxy.stop_attaching();
        let client = match result {
            Ok(Ok(c)) => c,
            Ok(Err(zk::Error::SessionExpired)) if attach.is_some() => {
                return Err(ConnectError::Expired);
            }
            Ok(Err(e)) => {
                let what = if attach.is_some() {
                    "re-attaching to the session"
                } else {
                    "opening a session"
                };
                return Err(ConnectError::Failed(self.error(what, &e, Some(&proxy))));
            }
            Err(_) => {
                return Err(ConnectError::Failed(BackendError::Unreachable(format!(
                    "opening a session on ZooKeeper {}: timed out{}",
                    self.hosts(),
                    proxy
                        .failures()
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default()
                ))));
            }
        };
        let Some(hs) = proxy.handshake() else {
            return Err(ConnectError::Failed(BackendError::Protocol(format!(
                "ZooKeeper {}: the session handshake was not seen",
                self.hosts()
            ))));
        };
        if hs.session_id != client.session_id().0 {
            return Err(ConnectError::Failed(BackendError::Protocol(format!(
                "ZooKeeper {}: the client reports session {} but the server handed out {:#x}",
                self.hosts(),
                client.session_id(),
                hs.session_id
            ))));
        }
        Ok(Conn {
            session: StoredSession {
                id: hs.session_id,
                password: hs.password,
                timeout_ms: u64::try_from(hs.timeout_ms).unwrap_or(0),
            },
            client,
            proxy,
            saved: AtomicBool::new(false),
        })
    }
}

/// Waits for the session to end on the client (expired, or given up after being disconnected
/// for longer than its timeout), then re-establishes it in the background.
async fn watch_session(inner: Weak<Inner>, mut state: zk::StateWatcher) {
    loop {
        let s = state.changed().await;
        tracing::debug!(state = %s, "ZooKeeper session state");
        if s.is_terminated() {
            break;
        }
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match inner.establish_in_background().await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "re-establishing the ZooKeeper session failed; retrying")
            }
        }
        let cap = inner.backoff_cap();
        drop(inner);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cap);
    }
}

impl ZooKeeper {
    /// Checks the configuration; contacts nothing.
    pub fn new(cfg: ZooKeeperConfig) -> anyhow::Result<ZooKeeper> {
        let (upstreams, chroot) = parse_connect(&cfg.connect)
            .with_context(|| format!("ZooKeeper connect string {:?}", cfg.connect))?;
        let base = cfg
            .base_path
            .clone()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| DEFAULT_BASE_PATH.to_string());
        check_path(&base).with_context(|| format!("ZooKeeper base path {base:?}"))?;
        let root = format!("{chroot}{base}");
        if root == "/zookeeper" || root.starts_with("/zookeeper/") {
            bail!("ZooKeeper base path {root:?} is inside ZooKeeper's own /zookeeper");
        }
        if cfg.owner.trim() != cfg.owner {
            bail!(
                "the owner id {:?} must not start or end with spaces",
                cfg.owner
            );
        }
        if cfg.session_timeout < Duration::from_millis(100) {
            bail!(
                "a ZooKeeper session timeout of {:?} is too short",
                cfg.session_timeout
            );
        }
        let digest = match &cfg.digest {
            None => None,
            Some((u, _)) if u.is_empty() || u.contains(':') => {
                bail!("a ZooKeeper digest username must be non-empty and hold no ':'")
            }
            Some((u, p)) => Some(format!("{u}:{p}")),
        };
        // With digest auth: the controller's identity may do everything, anyone may read, and
        // other registrants may create and remove their own entries in the shared
        // directories. Without: what every unauthenticated client writes.
        let creator = zk::Acl::new(zk::Permission::ALL, zk::AuthId::new("auth", ""));
        let world = |p| zk::Acl::new(p, zk::AuthId::anyone());
        let (entry_acls, parent_acls) = if digest.is_some() {
            (
                vec![creator.clone(), world(zk::Permission::READ)],
                vec![
                    creator,
                    world(zk::Permission::READ | zk::Permission::CREATE | zk::Permission::DELETE),
                ],
            )
        } else {
            (
                vec![world(zk::Permission::ALL)],
                vec![world(zk::Permission::ALL)],
            )
        };
        let tls = match &cfg.tls {
            None => None,
            Some(t) => Some(TlsConnector::from(Arc::new(super::tls::client_config(
                "ZooKeeper",
                t,
            )?))),
        };
        let (invalidated, _) = watch::channel(0);
        Ok(ZooKeeper {
            inner: Arc::new(Inner {
                read_only: cfg.read_only,
                connect: cfg.connect.trim().to_string(),
                upstreams,
                tls,
                session_path_budget: cfg.session_path_budget,
                root,
                base,
                layout: cfg.layout,
                owner: cfg.owner,
                digest,
                session_timeout: cfg.session_timeout,
                store: cfg.session_store,
                entry_acls,
                parent_acls,
                conn: tokio::sync::Mutex::new(Slot::Empty),
                watch_conn: tokio::sync::Mutex::new(None),
                cache: Mutex::default(),
                invalidated,
                tasks: Mutex::default(),
            }),
        })
    }

    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The chroot followed by the base path: the directory that holds the names.
    pub fn root(&self) -> &str {
        &self.inner.root
    }

    /// Lets the session go without closing it: for a replica that stops writing (it lost
    /// leadership) while another takes the session over. ZooKeeper moves a session to the
    /// connection that re-attached last and closes the others, so two live clients of one
    /// session would take it from each other endlessly; after `release` this one stays away
    /// until it is used again (and then re-attaches to the stored session).
    pub async fn release(&self) {
        let mut slot = self.inner.conn.lock().await;
        *slot = Slot::Empty;
        for t in self.inner.lock_tasks().drain(..) {
            t.abort();
        }
        self.inner.lock_cache().entries.clear();
    }

    /// The id of the current session, establishing it if needed.
    pub async fn session_id(&self) -> Result<i64, BackendError> {
        Ok(self.inner.conn().await?.session.id)
    }

    /// The key (path below the root) and record of one instance, or None when its name
    /// cannot be a znode name ([`name_problem`]).
    pub fn entry(&self, i: &Instance) -> Option<(String, Record)> {
        if name_problem(&i.name).is_some() {
            return None;
        }
        Some(match self.inner.layout {
            ZooKeeperLayout::Plain => (
                format!("{}/{PROVIDERS}/{}", i.name, i.host_port()),
                json!({"data": {
                    "owner": self.inner.owner,
                    "namespace": i.origin.namespace,
                    "service": i.origin.service,
                }}),
            ),
            ZooKeeperLayout::Curator => {
                let id = i.stable_id();
                let uri_spec = match i.address {
                    IpAddr::V4(_) => json!({"parts": URI_SPEC_PARTS
                        .iter()
                        .map(|(value, variable)| json!({"value": value, "variable": variable}))
                        .collect::<Vec<_>>()}),
                    IpAddr::V6(_) => Value::Null,
                };
                (
                    format!("{}/{id}", i.name),
                    json!({"data": {
                        "name": i.name,
                        "id": id,
                        "address": i.address.to_string(),
                        "port": i.port,
                        "sslPort": null,
                        "payload": null,
                        "serviceType": "DYNAMIC",
                        "uriSpec": uri_spec,
                    }}),
                )
            }
        })
    }

    /// The record a node's data reads back as, and its Curator registration time.
    fn record_from_data(&self, data: &[u8]) -> (Record, Option<u64>) {
        match serde_json::from_slice::<Value>(data) {
            Ok(mut v) => {
                let mut registered = None;
                if self.inner.layout == ZooKeeperLayout::Curator
                    && let Some(obj) = v.as_object_mut()
                    && let Some(t) = obj.get("registrationTimeUTC").and_then(Value::as_u64)
                {
                    registered = Some(t);
                    obj.remove("registrationTimeUTC");
                }
                (json!({ "data": v }), registered)
            }
            Err(_) => (
                json!({"raw": String::from_utf8_lossy(data).into_owned()}),
                None,
            ),
        }
    }

    /// The bytes a record is written as.
    fn data_of(
        &self,
        key: &str,
        record: &Record,
        registered: u64,
    ) -> Result<Vec<u8>, BackendError> {
        let data = record
            .get("data")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                BackendError::Protocol(format!(
                    "record {key} is not a ZooKeeper record (no data object): {record}"
                ))
            })?;
        let mut data = data.clone();
        if self.inner.layout == ZooKeeperLayout::Curator {
            let id = key.rsplit('/').next().unwrap_or_default();
            if data.get("id").and_then(Value::as_str) != Some(id) {
                return Err(BackendError::Protocol(format!(
                    "record {key}: a Curator instance's id must be its znode name {id:?}: {record}"
                )));
            }
            data.insert("registrationTimeUTC".into(), json!(registered));
        }
        serde_json::to_vec(&data).map_err(|e| BackendError::Protocol(format!("record {key}: {e}")))
    }

    /// Checks that `key` is an entry key of the layout.
    fn check_key(&self, key: &str) -> Result<(), BackendError> {
        let parts: Vec<&str> = key.split('/').collect();
        let shape_ok = match self.inner.layout {
            ZooKeeperLayout::Plain => parts.len() == 3 && parts[1] == PROVIDERS,
            ZooKeeperLayout::Curator => parts.len() == 2,
        };
        if !shape_ok || parts.iter().any(|p| name_problem(p).is_some()) {
            return Err(BackendError::Protocol(format!(
                "{key:?} is not an entry key of the {:?} ZooKeeper layout",
                self.inner.layout
            )));
        }
        Ok(())
    }

    fn path_of(&self, key: &str) -> String {
        format!("{}/{key}", self.inner.root)
    }

    /// The directory that holds the entries of `name`.
    fn dir_of(&self, name: &str) -> String {
        match self.inner.layout {
            ZooKeeperLayout::Plain => format!("{}/{name}/{PROVIDERS}", self.inner.root),
            ZooKeeperLayout::Curator => format!("{}/{name}", self.inner.root),
        }
    }

    fn require_owner(&self) -> Result<(), BackendError> {
        if !self.inner.has_owner() {
            return Err(BackendError::Rejected(format!(
                "this ZooKeeper client ({}) has no owner id: it can look up services but not \
                 read or write exported entries",
                self.inner.hosts()
            )));
        }
        Ok(())
    }

    /// Marks the existing ancestors of the root as known, when the root is missing.
    async fn learn_ancestors(&self, conn: &Conn) -> Result<(), BackendError> {
        let paths = ancestors(&format!("{}/x", self.inner.root));
        let stats =
            futures::future::join_all(paths.iter().map(|p| conn.client.check_stat(p))).await;
        let mut cache = self.inner.lock_cache();
        for (p, s) in paths.iter().zip(stats) {
            match s {
                Ok(Some(_)) => {
                    cache.parents.insert(p.clone());
                }
                Ok(None) => {
                    cache.parents.remove(p);
                }
                Err(e) => {
                    return Err(self
                        .inner
                        .error("checking the base path", &e, Some(&conn.proxy)));
                }
            }
        }
        Ok(())
    }

    /// Turns plan operations into writes, with the versions of the owned nodes.
    async fn writes(&self, conn: &Conn, ops: &[Op]) -> Result<Vec<Write>, BackendError> {
        let me = conn.session.id;
        let mut out = Vec::with_capacity(ops.len());
        let mut unknown_deletes = Vec::new();
        let now = now_ms();
        {
            let cache = self.inner.lock_cache();
            for op in ops {
                self.check_key(op.key())?;
                let key = op.key().to_string();
                let path = self.path_of(&key);
                let known = if cache.session == me {
                    cache.entries.get(&key).copied()
                } else {
                    None
                };
                match (op, known) {
                    (Op::Put { record, .. }, Some(k)) => {
                        let registered = k.registered.unwrap_or(now);
                        out.push(Write::Set {
                            data: self.data_of(&key, record, registered)?,
                            record: record.clone(),
                            registered: Some(registered),
                            version: k.version,
                            key,
                            path,
                        });
                    }
                    (Op::Put { record, .. }, None) => out.push(Write::Create {
                        data: self.data_of(&key, record, now)?,
                        record: record.clone(),
                        registered: Some(now),
                        key,
                        path,
                    }),
                    (Op::Delete { .. }, Some(k)) => out.push(Write::Delete {
                        key,
                        path,
                        version: k.version,
                    }),
                    (Op::Delete { .. }, None) => {
                        unknown_deletes.push(out.len());
                        out.push(Write::Delete {
                            key,
                            path,
                            version: -1,
                        });
                    }
                }
            }
        }
        // Deletes of nodes not read before: only ours, at the version they have now.
        if !unknown_deletes.is_empty() {
            let paths: Vec<String> = unknown_deletes
                .iter()
                .map(|&i| out[i].path().to_string())
                .collect();
            let stats = pipelined(&paths, |p| conn.client.check_stat(p)).await;
            let mut drop_idx = HashSet::new();
            for (&i, s) in unknown_deletes.iter().zip(stats) {
                match s {
                    Ok(Some(stat)) if stat.ephemeral_owner == me => {
                        if let Write::Delete { version, .. } = &mut out[i] {
                            *version = stat.version;
                        }
                    }
                    Ok(_) => {
                        tracing::debug!(
                            path = out[i].path(),
                            "not deleting a node that is gone or not ours"
                        );
                        drop_idx.insert(i);
                    }
                    Err(e) => {
                        return Err(self.inner.error(
                            &format!("checking {}", out[i].path()),
                            &e,
                            Some(&conn.proxy),
                        ));
                    }
                }
            }
            let mut i = 0;
            out.retain(|_| {
                i += 1;
                !drop_idx.contains(&(i - 1))
            });
        }
        Ok(out)
    }

    /// Records the effect of committed writes.
    fn committed(&self, me: i64, parents: &[String], writes: &[Write], versions: &[Option<i32>]) {
        let mut cache = self.inner.lock_cache();
        cache.parents.extend(parents.iter().cloned());
        if cache.session != me {
            return;
        }
        for (w, v) in writes.iter().zip(versions) {
            match w {
                Write::Create {
                    key, registered, ..
                } => {
                    cache.entries.insert(
                        key.clone(),
                        Known {
                            version: v.unwrap_or(0),
                            registered: *registered,
                        },
                    );
                }
                Write::Set {
                    key,
                    registered,
                    version,
                    ..
                } => {
                    cache.entries.insert(
                        key.clone(),
                        Known {
                            version: v.unwrap_or(version + 1),
                            registered: *registered,
                        },
                    );
                }
                Write::Delete { key, .. } => {
                    cache.entries.remove(key);
                }
            }
        }
    }

    /// Records an owned node written outside a multi.
    fn remember(&self, me: i64, key: &str, version: i32, registered: Option<u64>) {
        let mut cache = self.inner.lock_cache();
        if cache.session == me {
            cache.entries.insert(
                key.to_string(),
                Known {
                    version,
                    registered,
                },
            );
        }
    }

    /// Commits one batch as a `multi`. `Ok(None)` when committed; `Ok(Some(index))` when the
    /// write at `index` (of the batch) was refused for a reason another write might not share.
    async fn commit(
        &self,
        conn: &Conn,
        parents: &mut Vec<String>,
        writes: &[Write],
        trips: &mut usize,
    ) -> Result<Option<usize>, BackendError> {
        let entry = zk::CreateMode::Ephemeral.with_acls(zk::Acls::new(&self.inner.entry_acls));
        let parent = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&self.inner.parent_acls));
        loop {
            let mut m = conn.client.new_multi_writer();
            let invalid =
                |e: zk::Error| BackendError::Protocol(format!("building a ZooKeeper multi: {e}"));
            for p in parents.iter() {
                m.add_create(p, &[], &parent).map_err(invalid)?;
            }
            for w in writes {
                match w {
                    Write::Create { path, data, .. } => m.add_create(path, data, &entry),
                    Write::Set {
                        path,
                        data,
                        version,
                        ..
                    } => m.add_set_data(path, data, Some(*version)),
                    Write::Delete { path, version, .. } => m.add_delete(path, Some(*version)),
                }
                .map_err(invalid)?;
            }
            *trips += 1;
            match m.commit().await {
                Ok(results) => {
                    let versions: Vec<Option<i32>> = results
                        .iter()
                        .skip(parents.len())
                        .map(|r| match r {
                            zk::MultiWriteResult::Create { stat, .. }
                            | zk::MultiWriteResult::SetData { stat }
                                if !stat.is_invalid() =>
                            {
                                Some(stat.version)
                            }
                            _ => None,
                        })
                        .collect();
                    self.committed(conn.session.id, parents, writes, &versions);
                    tracing::debug!(
                        parents = parents.len(),
                        writes = writes.len(),
                        "ZooKeeper multi committed"
                    );
                    return Ok(None);
                }
                Err(zk::MultiWriteError::OperationFailed { index, source }) => {
                    if source == zk::Error::NoAuth {
                        let path = parents
                            .get(index)
                            .map(String::as_str)
                            .or_else(|| writes.get(index - parents.len()).map(Write::path))
                            .unwrap_or("?");
                        return Err(self.inner.error(&format!("writing {path}"), &source, None));
                    }
                    if index < parents.len() && source == zk::Error::NodeExists {
                        // Created meanwhile by someone else: fine, without it.
                        let p = parents.remove(index);
                        self.inner.lock_cache().parents.insert(p);
                        continue;
                    }
                    if index < parents.len() {
                        let p = &parents[index];
                        return Err(self.inner.error(&format!("creating {p}"), &source, None));
                    }
                    tracing::debug!(index, error = %source, "ZooKeeper multi refused; writing its operations one by one");
                    return Ok(Some(index - parents.len()));
                }
                Err(zk::MultiWriteError::RequestFailed { source }) => {
                    return Err(self
                        .inner
                        .error("ZooKeeper multi", &source, Some(&conn.proxy)));
                }
            }
        }
    }

    /// Writes one operation on its own, resolving conflicts with what is there now: the
    /// reason it could not be written, or None.
    async fn write_one(
        &self,
        conn: &Conn,
        w: &Write,
        trips: &mut usize,
    ) -> Result<Option<String>, BackendError> {
        let client = &conn.client;
        let me = conn.session.id;
        let entry = zk::CreateMode::Ephemeral.with_acls(zk::Acls::new(&self.inner.entry_acls));
        let parent = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&self.inner.parent_acls));
        let fail = |what: &str, e: &zk::Error| -> Result<Option<String>, BackendError> {
            if is_connection_error(e) || *e == zk::Error::NoAuth {
                Err(self.inner.error(what, e, Some(&conn.proxy)))
            } else {
                Ok(Some(format!("{what}: {e}")))
            }
        };
        let path = w.path();
        match w {
            Write::Create {
                record,
                data,
                registered,
                ..
            }
            | Write::Set {
                record,
                data,
                registered,
                ..
            } => {
                let mut version = match w {
                    Write::Set { version, .. } => Some(*version),
                    _ => None,
                };
                let mut made_parents = false;
                for _ in 0..4 {
                    *trips += 1;
                    let result = match version {
                        Some(v) => client.set_data(path, data, Some(v)).await,
                        None => client.create(path, data, &entry).await.map(|(s, _)| s),
                    };
                    match result {
                        Ok(stat) => {
                            let v = if stat.is_invalid() {
                                version.map_or(0, |v| v + 1)
                            } else {
                                stat.version
                            };
                            self.remember(me, key_of(w), v, *registered);
                            return Ok(None);
                        }
                        Err(zk::Error::NoNode) if version.is_none() && !made_parents => {
                            made_parents = true;
                            for p in ancestors(path) {
                                *trips += 1;
                                match client.create(&p, &[], &parent).await {
                                    Ok(_) | Err(zk::Error::NodeExists) => {
                                        self.inner.lock_cache().parents.insert(p);
                                    }
                                    Err(e) => return fail(&format!("creating {p}"), &e),
                                }
                            }
                        }
                        Err(zk::Error::NoNode) if version.is_some() => version = None,
                        Err(zk::Error::NodeExists | zk::Error::BadVersion) => {
                            *trips += 1;
                            match client.get_data(path).await {
                                Ok((have, stat)) if stat.ephemeral_owner == me => {
                                    let (have_record, have_registered) =
                                        self.record_from_data(&have);
                                    if &have_record == record {
                                        self.remember(me, key_of(w), stat.version, have_registered);
                                        return Ok(None);
                                    }
                                    version = Some(stat.version);
                                }
                                Ok((_, stat)) => {
                                    return Ok(Some(format!(
                                        "{path} exists and is not this controller's ({})",
                                        describe_owner(stat.ephemeral_owner)
                                    )));
                                }
                                Err(zk::Error::NoNode) => version = None,
                                Err(e) => return fail(&format!("reading {path}"), &e),
                            }
                        }
                        Err(e) => return fail(&format!("writing {path}"), &e),
                    }
                }
                Ok(Some(format!("{path} kept changing while it was written")))
            }
            Write::Delete { version, .. } => {
                let mut version = *version;
                for _ in 0..4 {
                    *trips += 1;
                    match client.delete(path, Some(version)).await {
                        Ok(()) | Err(zk::Error::NoNode) => {
                            self.committed(me, &[], std::slice::from_ref(w), &[None]);
                            return Ok(None);
                        }
                        Err(zk::Error::BadVersion) => {
                            *trips += 1;
                            match client.check_stat(path).await {
                                Ok(Some(stat)) if stat.ephemeral_owner == me => {
                                    version = stat.version
                                }
                                Ok(_) => {
                                    tracing::debug!(path, "not deleting a node that is not ours");
                                    self.committed(me, &[], std::slice::from_ref(w), &[None]);
                                    return Ok(None);
                                }
                                Err(e) => return fail(&format!("checking {path}"), &e),
                            }
                        }
                        Err(e) => return fail(&format!("deleting {path}"), &e),
                    }
                }
                Ok(Some(format!("{path} kept changing while it was deleted")))
            }
        }
    }
}

fn key_of(w: &Write) -> &str {
    match w {
        Write::Create { key, .. } | Write::Set { key, .. } | Write::Delete { key, .. } => key,
    }
}

fn describe_owner(ephemeral_owner: i64) -> String {
    if ephemeral_owner == 0 {
        "a persistent node".into()
    } else {
        format!("an ephemeral node of session {ephemeral_owner:#x}")
    }
}

/// Runs `f` over `items` with up to [`PIPELINE`] requests in flight (each call sends its
/// request at once; the answers are awaited together).
async fn pipelined<'a, T, F, Fut>(items: &'a [String], f: F) -> Vec<T>
where
    F: Fn(&'a str) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(PIPELINE) {
        let futs: Vec<Fut> = chunk.iter().map(|p| f(p.as_str())).collect();
        out.extend(futures::future::join_all(futs).await);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Import.

/// How long the import watches trust a stored session id they loaded before loading it again
/// when they meet a session they do not know.
const STORE_RECHECK: Duration = Duration::from_secs(30);

/// What an import watch knows of the directory it follows.
struct ImportRead {
    /// The directory exists (when it does not, the only watch is its exists watch).
    listed: bool,
    /// Each child read, by name.
    entries: BTreeMap<String, ImportEntry>,
}

/// One child of an imported directory, as last read.
enum ImportEntry {
    Instance(External),
    /// Could not be parsed: (id, why).
    Skipped(String, String),
    /// This controller's own entry, or a Curator instance that is not enabled.
    Ignored,
}

/// A watch armed by an import read: the directory's (`None`) or a child's.
type ImportWatch = (Option<String>, zk::OneshotWatcher);

impl ImportRead {
    /// The instances and the skipped entries, sorted.
    fn parts(&self) -> (Vec<External>, Vec<(String, String)>) {
        let mut instances = Vec::new();
        let mut skipped = Vec::new();
        for e in self.entries.values() {
            match e {
                ImportEntry::Instance(i) => instances.push(i.clone()),
                ImportEntry::Skipped(id, why) => skipped.push((id.clone(), why.clone())),
                ImportEntry::Ignored => {}
            }
        }
        instances.sort();
        skipped.sort();
        (instances, skipped)
    }
}

/// The sessions whose ephemeral nodes this controller wrote, as one import watch knows them.
#[derive(Default)]
struct OwnSessions {
    /// The session in the [`SessionStore`] when it was loaded last.
    stored: Option<i64>,
    loaded: Option<std::time::Instant>,
    /// Sessions found not to be ours at the last load.
    foreign: HashSet<i64>,
}

impl OwnSessions {
    /// Whether a node with this `ephemeralOwner` is this controller's: the backend's current
    /// session, or the session in the store (the leader's, when this replica does not lead).
    /// The store is loaded again when a session not seen before shows up (at most once per
    /// session and [`STORE_RECHECK`]), so a new leader's session is recognized before its
    /// first entry could be imported.
    async fn is_own(&mut self, inner: &Inner, ephemeral_owner: i64) -> bool {
        if ephemeral_owner == 0 || !inner.has_owner() {
            return false;
        }
        if ephemeral_owner == inner.lock_cache().session || Some(ephemeral_owner) == self.stored {
            return true;
        }
        let fresh = self.loaded.is_some_and(|t| t.elapsed() < STORE_RECHECK);
        if fresh && self.foreign.contains(&ephemeral_owner) {
            return false;
        }
        if !fresh {
            self.foreign.clear();
        }
        match inner.store.load().await {
            Ok(s) => {
                self.stored = s.map(|s| s.id);
                self.loaded = Some(std::time::Instant::now());
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "loading the stored ZooKeeper session for an import watch failed");
                return false;
            }
        }
        if Some(ephemeral_owner) == self.stored {
            return true;
        }
        self.foreign.insert(ephemeral_owner);
        false
    }
}

/// Address and port of a plain-layout child name: `ip:port`, `[ipv6]:port` or `host:port`.
fn parse_provider(child: &str) -> Result<(String, u16), String> {
    parse_host_port(child)
}

/// Address and port of a Curator `ServiceInstance` (`port`, or `sslPort` when `port` is null
/// or absent); `Ok(None)` when it is disabled (`enabled: false`).
fn parse_curator(data: &[u8]) -> Result<Option<(String, u16)>, String> {
    let v: Value =
        serde_json::from_slice(data).map_err(|e| format!("not a JSON ServiceInstance: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "not a JSON object (a Curator ServiceInstance)".to_string())?;
    match obj.get("enabled") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Ok(None),
        Some(other) => return Err(format!("\"enabled\" is {other}, not a boolean")),
    }
    let address = match obj.get("address") {
        Some(Value::String(a)) if !a.trim().is_empty() => a.trim(),
        Some(other) => return Err(format!("\"address\" is {other}, not an address")),
        None => return Err("no \"address\"".into()),
    };
    let port_of = |key: &str| -> Result<Option<u16>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64().and_then(|p| u16::try_from(p).ok()) {
                Some(p) if p > 0 => Ok(Some(p)),
                _ => Err(format!("\"{key}\" is {n}, not a port")),
            },
            Some(other) => Err(format!("\"{key}\" is {other}, not a port")),
        }
    };
    let port = match port_of("port")? {
        Some(p) => p,
        None => {
            port_of("sslPort")?.ok_or_else(|| "neither \"port\" nor \"sslPort\"".to_string())?
        }
    };
    Ok(Some((import_host(address)?, port)))
}

/// Whether plain-layout data names `owner` (`{"owner": …}`, as [`ZooKeeper::entry`] writes).
fn plain_owner_is(data: &[u8], owner: &str) -> bool {
    !owner.is_empty()
        && serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v.get("owner").and_then(Value::as_str).map(|o| o == owner))
            .unwrap_or(false)
}

/// Publishes a change of the snapshot, and only a change.
fn publish(tx: &watch::Sender<ImportSnapshot>, f: impl FnOnce(&mut ImportSnapshot)) {
    tx.send_if_modified(|s| {
        let before = s.clone();
        f(s);
        *s != before
    });
}

fn publish_error(tx: &watch::Sender<ImportSnapshot>, e: BackendError) {
    publish(tx, |s| s.error = Some(e));
}

impl ZooKeeper {
    /// The session the import watches read through: a session of their own, never the
    /// export session, so a watch neither creates nodes nor takes the export session over
    /// (ZooKeeper gives a session to the connection that attached last). It is not detached
    /// (it owns nothing) and is replaced when it ends.
    async fn watch_conn(&self) -> Result<Arc<Conn>, BackendError> {
        let mut slot = self.inner.watch_conn.lock().await;
        if let Some(c) = &*slot
            && !c.client.state().is_terminated()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let conn = match self.inner.connect(None, false).await {
            Ok(c) => Arc::new(c),
            Err(ConnectError::Failed(e)) => return Err(e),
            Err(ConnectError::Expired) => {
                return Err(BackendError::Protocol(format!(
                    "ZooKeeper {} refused to open a session",
                    self.inner.hosts()
                )));
            }
        };
        tracing::debug!(session = %format_args!("{:#x}", conn.session.id), "new ZooKeeper session for import watches");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Reads the entries of `name` and arms the watches that fire on their next change: the
    /// child watch of the directory (an exists watch while it does not exist) and a data
    /// watch on every entry (Curator data is the instance; plain data carries the owner).
    async fn read_import(
        &self,
        conn: &Conn,
        name: &str,
        own: &mut OwnSessions,
    ) -> Result<(ImportRead, Vec<ImportWatch>), BackendError> {
        let dir = self.dir_of(name);
        let (children, child_watch) = loop {
            if let Some(listed) = self.list_import(conn, &dir).await? {
                break listed;
            }
            match conn.client.check_and_watch_stat(&dir).await {
                // Created in between: list it.
                Ok((Some(_), _)) => continue,
                Ok((None, w)) => {
                    let read = ImportRead {
                        listed: false,
                        entries: BTreeMap::new(),
                    };
                    return Ok((read, vec![(None, w)]));
                }
                Err(e) => {
                    return Err(self.inner.error(
                        &format!("watching {dir} for its creation"),
                        &e,
                        Some(&conn.proxy),
                    ));
                }
            }
        };
        let (entries, mut watches) = self.read_children(conn, &dir, &children, own).await?;
        watches.push((None, child_watch));
        let read = ImportRead {
            listed: true,
            entries: entries.into_iter().collect(),
        };
        Ok((read, watches))
    }

    /// The children of `dir` and their watch; `None` when `dir` does not exist.
    async fn list_import(
        &self,
        conn: &Conn,
        dir: &str,
    ) -> Result<Option<(Vec<String>, zk::OneshotWatcher)>, BackendError> {
        match conn.client.get_and_watch_children(dir).await {
            Ok((children, _, w)) => Ok(Some((children, w))),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(self
                .inner
                .error(&format!("watching {dir}"), &e, Some(&conn.proxy))),
        }
    }

    /// Reads the children `names` of `dir` (pipelined) and arms their data watches. A child
    /// deleted since the listing is left out (the directory's watch fires for it).
    async fn read_children(
        &self,
        conn: &Conn,
        dir: &str,
        names: &[String],
        own: &mut OwnSessions,
    ) -> Result<(Vec<(String, ImportEntry)>, Vec<ImportWatch>), BackendError> {
        let paths: Vec<String> = names.iter().map(|c| format!("{dir}/{c}")).collect();
        let nodes = pipelined(&paths, |p| conn.client.get_and_watch_data(p)).await;
        let mut entries = Vec::new();
        let mut watches = Vec::new();
        for ((child, path), node) in names.iter().zip(&paths).zip(nodes) {
            let (data, stat, w) = match node {
                Ok(n) => n,
                Err(zk::Error::NoNode) => continue,
                Err(e) => {
                    return Err(self.inner.error(
                        &format!("reading {path}"),
                        &e,
                        Some(&conn.proxy),
                    ));
                }
            };
            watches.push((Some(child.clone()), w));
            let mine = match self.inner.layout {
                ZooKeeperLayout::Plain => plain_owner_is(&data, &self.inner.owner),
                ZooKeeperLayout::Curator => false,
            } || own.is_own(&self.inner, stat.ephemeral_owner).await;
            let parsed = match self.inner.layout {
                _ if mine => Ok(None),
                ZooKeeperLayout::Plain => parse_provider(child).map(Some),
                ZooKeeperLayout::Curator => parse_curator(&data),
            };
            let entry = match parsed {
                Ok(Some((address, port))) => ImportEntry::Instance(External {
                    address,
                    port,
                    id: path.clone(),
                }),
                Ok(None) => ImportEntry::Ignored,
                Err(why) => ImportEntry::Skipped(path.clone(), why),
            };
            entries.push((child.clone(), entry));
        }
        Ok((entries, watches))
    }

    /// Follows one fired watch of an import: the directory's lists it again and reads only
    /// the children that are new; a child's reads that child again (forgetting it if gone).
    /// Returns the watches armed, or `None` when everything must be read again.
    async fn update_import(
        &self,
        conn: &Conn,
        dir: &str,
        read: &mut ImportRead,
        child: Option<String>,
        event: zk::EventType,
        own: &mut OwnSessions,
    ) -> Result<Option<Vec<ImportWatch>>, BackendError> {
        if event == zk::EventType::Session || !read.listed {
            return Ok(None);
        }
        match child {
            None => {
                let Some((children, w)) = self.list_import(conn, dir).await? else {
                    return Ok(None); // the directory went: watch for its creation
                };
                let listed: HashSet<&String> = children.iter().collect();
                read.entries.retain(|c, _| listed.contains(c));
                let new: Vec<String> = children
                    .iter()
                    .filter(|c| !read.entries.contains_key(*c))
                    .cloned()
                    .collect();
                let (entries, mut watches) = self.read_children(conn, dir, &new, own).await?;
                read.entries.extend(entries);
                watches.push((None, w));
                Ok(Some(watches))
            }
            // A child the directory's listing already dropped: its removal was seen (and a
            // child of that name created since is new to the next listing).
            Some(c) if !read.entries.contains_key(&c) => Ok(Some(Vec::new())),
            // Changed or deleted: read it again. A deleted child may already be back under the
            // same name (re-registered) with a listing that did not see it go.
            Some(c) => {
                let (entries, watches) = self
                    .read_children(conn, dir, std::slice::from_ref(&c), own)
                    .await?;
                read.entries.remove(&c);
                read.entries.extend(entries);
                Ok(Some(watches))
            }
        }
    }

    /// The loop of [`Backend::watch_service`]; returns when `tx` has no receivers left.
    async fn follow(&self, name: &str, tx: &watch::Sender<ImportSnapshot>) {
        let mut own = OwnSessions::default();
        let mut backoff = Duration::from_millis(100);
        let cap = self.inner.backoff_cap();
        // A read that hangs (requests wait while the client reconnects) counts as failed.
        let read_timeout = self.inner.session_timeout.max(Duration::from_secs(2));
        let dir = self.dir_of(name);
        loop {
            let attempt = async {
                let conn = self.watch_conn().await?;
                let state = conn.client.state_watcher();
                match tokio::time::timeout(read_timeout, self.read_import(&conn, name, &mut own))
                    .await
                {
                    Ok(Ok(read)) => Ok((conn, state, read)),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(BackendError::Unreachable(format!(
                        "watching {dir} on ZooKeeper {}: timed out{}",
                        self.inner.hosts(),
                        conn.proxy
                            .failures()
                            .map(|f| format!(" ({f})"))
                            .unwrap_or_default()
                    ))),
                }
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = tx.closed() => return,
            };
            let (conn, mut state, (mut read, watches)) = match result {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, name, "reading an imported ZooKeeper service failed; retrying");
                    publish_error(tx, e);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(cap);
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let publish_read = |read: &ImportRead| {
                let (instances, skipped) = read.parts();
                publish(tx, |s| {
                    s.instances = instances;
                    s.skipped = skipped;
                    s.error = None;
                    s.synced = true;
                });
            };
            publish_read(&read);
            // Every armed watch; one that fires is followed by reading only what it names.
            let mut fired = futures::stream::FuturesUnordered::new();
            let arm = |fired: &mut futures::stream::FuturesUnordered<_>,
                       watches: Vec<ImportWatch>| {
                for (child, w) in watches {
                    fired.push(async move { (child, w.changed().await.event_type) });
                }
            };
            arm(&mut fired, watches);
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    Some((child, event)) = fired.next() => {
                        let step = tokio::time::timeout(
                            read_timeout,
                            self.update_import(&conn, &dir, &mut read, child, event, &mut own),
                        )
                        .await;
                        match step {
                            Ok(Ok(Some(watches))) => {
                                arm(&mut fired, watches);
                                publish_read(&read);
                            }
                            // Read everything again (and report a failure while doing so).
                            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
                        }
                    }
                    s = state.changed() => match s {
                        zk::SessionState::Disconnected => publish_error(
                            tx,
                            BackendError::Unreachable(format!(
                                "watching {dir} on ZooKeeper {}: disconnected{}",
                                self.inner.hosts(),
                                conn.proxy
                                    .failures()
                                    .map(|f| format!(" ({f})"))
                                    .unwrap_or_default()
                            )),
                        ),
                        // Reconnected (read again: nothing missed), or the session ended
                        // (a new one is opened by the next read).
                        _ => break,
                    },
                }
            }
        }
    }
}

#[async_trait]
impl Backend for ZooKeeper {
    async fn release(&self) {
        ZooKeeper::release(self).await
    }

    fn warning(&self) -> Option<String> {
        let cache = self.inner.lock_cache();
        // What the close transaction carries per node: a length and the path from the root.
        let prefix = self.inner.root.len() + 1 + 4;
        let bytes: usize = cache.entries.keys().map(|k| prefix + k.len()).sum();
        (bytes > self.inner.session_path_budget).then(|| {
            format!(
                "this controller's ZooKeeper session owns {} entries with {} KiB of paths; \
                 ZooKeeper (3.6 and later, ZOOKEEPER-4306) puts them all in the transaction \
                 that closes the session, which must fit in jute.maxbuffer (1 MiB by default): \
                 export fewer instances to this catalog, shorten basePath, or raise \
                 jute.maxbuffer on the servers",
                cache.entries.len(),
                bytes / 1024
            )
        })
    }

    fn kind(&self) -> &'static str {
        "zookeeper"
    }

    fn describe(&self) -> String {
        let layout = match self.inner.layout {
            ZooKeeperLayout::Plain => "plain",
            ZooKeeperLayout::Curator => "curator",
        };
        format!(
            "zookeeper {} {layout} {}",
            self.inner.connect, self.inner.base
        )
    }

    fn render(&self, instances: &[Instance]) -> BTreeMap<String, Record> {
        instances.iter().filter_map(|i| self.entry(i)).collect()
    }

    async fn read_owned(&self) -> Result<BTreeMap<String, Record>, BackendError> {
        self.require_owner()?;
        let conn = self.inner.conn().await?;
        let client = &conn.client;
        let me = if self.inner.read_only {
            // The writer's session, recognised, not attached to.
            match self.inner.store.load().await {
                Ok(Some(s)) => s.id,
                Ok(None) => return Ok(BTreeMap::new()),
                Err(e) => {
                    return Err(BackendError::Rejected(format!(
                        "loading the stored ZooKeeper session: {e:#}"
                    )));
                }
            }
        } else {
            conn.session.id
        };
        let root = &self.inner.root;
        let err = |what: &str, e: &zk::Error| self.inner.error(what, e, Some(&conn.proxy));
        let names = match client.list_children(root).await {
            Ok(n) => n,
            Err(zk::Error::NoNode) => {
                self.learn_ancestors(&conn).await?;
                let mut cache = self.inner.lock_cache();
                if cache.session == me {
                    cache.entries.clear();
                }
                return Ok(BTreeMap::new());
            }
            Err(e) => return Err(err(&format!("listing {root}"), &e)),
        };
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| name_problem(n).is_none())
            .collect();
        let dirs: Vec<String> = names.iter().map(|n| self.dir_of(n)).collect();
        let listed = pipelined(&dirs, |d| client.list_children(d)).await;
        let mut parents: Vec<String> = ancestors(&format!("{root}/x"));
        let mut keys = Vec::new();
        for ((name, dir), children) in names.iter().zip(&dirs).zip(listed) {
            parents.push(format!("{root}/{name}"));
            match children {
                Ok(children) => {
                    parents.push(dir.clone());
                    let prefix = &dir[root.len() + 1..];
                    keys.extend(
                        children
                            .into_iter()
                            .filter(|c| name_problem(c).is_none())
                            .map(|c| format!("{prefix}/{c}")),
                    );
                }
                Err(zk::Error::NoNode) => {}
                Err(e) => return Err(err(&format!("listing {dir}"), &e)),
            }
        }
        let paths: Vec<String> = keys.iter().map(|k| self.path_of(k)).collect();
        let nodes = pipelined(&paths, |p| client.get_data(p)).await;
        let mut out = BTreeMap::new();
        let mut known = HashMap::new();
        for ((key, path), node) in keys.into_iter().zip(&paths).zip(nodes) {
            match node {
                Ok((data, stat)) if stat.ephemeral_owner == me => {
                    let (record, registered) = self.record_from_data(&data);
                    known.insert(
                        key.clone(),
                        Known {
                            version: stat.version,
                            registered,
                        },
                    );
                    out.insert(key, record);
                }
                Ok(_) | Err(zk::Error::NoNode) => {}
                Err(e) => return Err(err(&format!("reading {path}"), &e)),
            }
        }
        let mut cache = self.inner.lock_cache();
        cache.parents.extend(parents);
        if cache.session == me {
            cache.entries = known;
        }
        Ok(out)
    }

    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError> {
        if ops.is_empty() {
            return Ok(0);
        }
        self.require_owner()?;
        if self.inner.read_only {
            return Err(BackendError::Rejected(format!(
                "{} operation(s) not written: this ZooKeeper client is read only",
                ops.len()
            )));
        }
        let conn = self.inner.conn().await?;
        let writes = self.writes(&conn, ops).await?;
        let known = self.inner.lock_cache().parents.clone();
        let mut trips = 0;
        let mut failures = Vec::new();
        for batch in batches(&writes, &known) {
            let part = &writes[batch.range.clone()];
            let mut parents = batch.parents.clone();
            if let Some(index) = self.commit(&conn, &mut parents, part, &mut trips).await? {
                tracing::info!(
                    path = part.get(index).map(Write::path).unwrap_or("?"),
                    writes = part.len(),
                    "a ZooKeeper multi was refused; writing its operations one by one"
                );
                for w in part {
                    if let Some(why) = self.write_one(&conn, w, &mut trips).await? {
                        failures.push(why);
                    }
                }
            }
        }
        if failures.is_empty() {
            Ok(trips)
        } else {
            Err(BackendError::Rejected(format!(
                "{} of {} operation(s) failed on ZooKeeper {}: {}",
                failures.len(),
                ops.len(),
                self.inner.hosts(),
                failures.join("; ")
            )))
        }
    }

    async fn location(&self) -> Result<String, BackendError> {
        let layout = match self.inner.layout {
            ZooKeeperLayout::Plain => "plain",
            ZooKeeperLayout::Curator => "curator",
        };
        Ok(format!(
            "zookeeper layout {layout} root {}",
            self.inner.root
        ))
    }

    async fn probe(&self) -> Result<ServerInfo, BackendError> {
        let conn = self.inner.conn().await?;
        conn.client
            .check_stat("/")
            .await
            .map_err(|e| self.inner.error("reading /", &e, Some(&conn.proxy)))?;
        let upstream = conn.proxy.current();
        let (mode, version) = match &upstream {
            Some(u) => srvr(u, self.inner.tls.as_ref()).await.unwrap_or_default(),
            None => (None, None),
        };
        Ok(ServerInfo {
            address: upstream.map(|u| u.to_string()),
            mode,
            version,
            ..Default::default()
        })
    }

    fn invalidations(&self) -> Option<watch::Receiver<u64>> {
        Some(self.inner.invalidated.subscribe())
    }

    /// Child watches on the layout's directory (an exists watch until it is created) and
    /// data watches on each entry, through a read-only session of the watches' own (see
    /// [`ZooKeeper::watch_conn`]). Every event, and every reconnect, leads to a full re-read
    /// with the watches armed again by the read itself, so nothing is lost in between.
    ///
    /// # No loops
    ///
    /// An entry is this controller's, and left out, when
    /// - (plain) its data is JSON whose `owner` is this backend's owner id (what
    ///   [`ZooKeeper::entry`] writes), or
    /// - (both layouts; Curator instances carry no owner marker) its `ephemeralOwner` is this
    ///   backend's current export session, or the session in the [`SessionStore`] — the one
    ///   every replica of this controller writes through (see [`OwnSessions::is_own`]).
    ///
    /// A backend without owner id leaves nothing out.
    async fn watch_service(
        &self,
        name: &str,
        tx: watch::Sender<ImportSnapshot>,
    ) -> Result<(), BackendError> {
        if let Some(problem) = name_problem(name) {
            return Err(BackendError::Rejected(problem));
        }
        self.follow(name, &tx).await;
        Ok(())
    }

    async fn lookup(&self, name: &str) -> Result<Vec<String>, BackendError> {
        if let Some(problem) = name_problem(name) {
            return Err(BackendError::Rejected(problem));
        }
        let conn = self.inner.conn().await?;
        let client = &conn.client;
        let dir = self.dir_of(name);
        let children = match client.list_children(&dir).await {
            Ok(c) => c,
            Err(zk::Error::NoNode) => return Ok(Vec::new()),
            Err(e) => {
                return Err(self
                    .inner
                    .error(&format!("listing {dir}"), &e, Some(&conn.proxy)));
            }
        };
        let mut out = match self.inner.layout {
            ZooKeeperLayout::Plain => children,
            ZooKeeperLayout::Curator => {
                let paths: Vec<String> = children.iter().map(|c| format!("{dir}/{c}")).collect();
                let nodes = pipelined(&paths, |p| client.get_data(p)).await;
                let mut out = Vec::new();
                for (path, node) in paths.iter().zip(nodes) {
                    match node {
                        Ok((data, _)) => match curator_address(&data) {
                            Some(a) => out.push(a),
                            None => tracing::debug!(
                                path,
                                "skipping a node that is not an enabled Curator instance"
                            ),
                        },
                        Err(zk::Error::NoNode) => {}
                        Err(e) => {
                            return Err(self.inner.error(
                                &format!("reading {path}"),
                                &e,
                                Some(&conn.proxy),
                            ));
                        }
                    }
                }
                out
            }
        };
        out.sort();
        Ok(out)
    }
}

/// `host:port` of an enabled Curator `ServiceInstance` (`port`, or `sslPort` without one).
fn curator_address(data: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(data).ok()?;
    if v.get("enabled").and_then(Value::as_bool) == Some(false) {
        return None;
    }
    let address = v.get("address").and_then(Value::as_str)?;
    let port = v
        .get("port")
        .and_then(Value::as_u64)
        .or_else(|| v.get("sslPort").and_then(Value::as_u64))?;
    (!address.is_empty()).then(|| dial_address(address, port))
}

/// Mode and version from a `srvr` four-letter command, best effort (it may be disabled).
async fn srvr(
    u: &Upstream,
    tls: Option<&TlsConnector>,
) -> Option<(Option<String>, Option<String>)> {
    let ask = async {
        let mut s = dial(u, tls).await.ok()?;
        s.write_all(b"srvr").await.ok()?;
        let mut out = Vec::new();
        (&mut s).take(64 * 1024).read_to_end(&mut out).await.ok()?;
        Some(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()??;
    Some(parse_srvr(&text))
}

/// `(mode, version)` of a `srvr` answer.
fn parse_srvr(text: &str) -> (Option<String>, Option<String>) {
    let mut mode = None;
    let mut version = None;
    for line in text.lines() {
        if let Some(m) = line.strip_prefix("Mode:") {
            mode = Some(m.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Zookeeper version:") {
            version = v.split(',').next().map(|v| v.trim().to_string());
        }
    }
    (
        mode.filter(|m| !m.is_empty()),
        version.filter(|v| !v.is_empty()),
    )
}

// ---------------------------------------------------------------------------------------------
// The session relay.

/// What the server answered to a connect request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Handshake {
    session_id: i64,
    password: Vec<u8>,
    timeout_ms: i32,
}

/// A jute `ConnectRequest`: `protocolVersion:int lastZxidSeen:long timeOut:int sessionId:long
/// passwd:buffer` and, from newer clients, `readOnly:bool`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ConnectRequest {
    protocol_version: i32,
    last_zxid_seen: i64,
    timeout_ms: i32,
    session_id: i64,
    password: Vec<u8>,
    /// What follows the password (the readOnly flag).
    rest: Vec<u8>,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn buffer(&mut self) -> Option<Vec<u8>> {
        let n = self.i32()?;
        if n < 0 {
            return Some(Vec::new());
        }
        Some(self.take(usize::try_from(n).ok()?)?.to_vec())
    }
}

impl ConnectRequest {
    fn parse(b: &[u8]) -> Option<ConnectRequest> {
        let mut r = Reader(b);
        Some(ConnectRequest {
            protocol_version: r.i32()?,
            last_zxid_seen: r.i64()?,
            timeout_ms: r.i32()?,
            session_id: r.i64()?,
            password: r.buffer()?,
            rest: r.0.to_vec(),
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.password.len() + self.rest.len());
        b.extend_from_slice(&self.protocol_version.to_be_bytes());
        b.extend_from_slice(&self.last_zxid_seen.to_be_bytes());
        b.extend_from_slice(&self.timeout_ms.to_be_bytes());
        b.extend_from_slice(&self.session_id.to_be_bytes());
        b.extend_from_slice(&(self.password.len() as i32).to_be_bytes());
        b.extend_from_slice(&self.password);
        b.extend_from_slice(&self.rest);
        b
    }
}

/// A jute `ConnectResponse`: `protocolVersion:int timeOut:int sessionId:long passwd:buffer`
/// (then `readOnly:bool`). Session id 0 means the session asked for has expired.
fn parse_connect_response(b: &[u8]) -> Option<Handshake> {
    let mut r = Reader(b);
    let _protocol = r.i32()?;
    let timeout_ms = r.i32()?;
    let session_id = r.i64()?;
    let password = r.buffer()?;
    Some(Handshake {
        session_id,
        password,
        timeout_ms,
    })
}

async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let len = r.read_i32().await?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_HANDSHAKE_FRAME)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a handshake frame of {len} bytes"),
            )
        })?;
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(4 + body.len());
    b.extend_from_slice(&(body.len() as i32).to_be_bytes());
    b.extend_from_slice(body);
    w.write_all(&b).await
}

#[derive(Default)]
struct RelayState {
    /// Session id and password to put into connect requests that ask for a new session.
    attach: Option<(i64, Vec<u8>)>,
    /// The last session the server handed out.
    handshake: Option<Handshake>,
    /// The server of the last established connection.
    current: Option<usize>,
    /// Why each server could not be reached, last time it was tried.
    failures: Vec<Option<String>>,
}

struct RelayShared {
    upstreams: Vec<Upstream>,
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
    state: Mutex<RelayState>,
}

impl RelayShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A relay on loopback in front of each server of the connect string, through which the
/// client of one session connects: it sees the session handshake (see the module
/// documentation) and copies everything else unchanged.
struct Proxy {
    listeners: Vec<SocketAddr>,
    shared: Arc<RelayShared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Each listener task owns its connections: aborting it closes them.
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Proxy {
    async fn start(
        upstreams: &[Upstream],
        tls: Option<TlsConnector>,
        attach: Option<(i64, Vec<u8>)>,
        connect_timeout: Duration,
    ) -> std::io::Result<Proxy> {
        let shared = Arc::new(RelayShared {
            upstreams: upstreams.to_vec(),
            tls,
            connect_timeout,
            state: Mutex::new(RelayState {
                attach,
                failures: vec![None; upstreams.len()],
                ..Default::default()
            }),
        });
        let mut proxy = Proxy {
            listeners: Vec::new(),
            shared: shared.clone(),
            tasks: Vec::new(),
        };
        for i in 0..upstreams.len() {
            let listener = match TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(_) => TcpListener::bind("[::1]:0").await?,
            };
            proxy.listeners.push(listener.local_addr()?);
            proxy
                .tasks
                .push(tokio::spawn(accept(listener, i, shared.clone())));
        }
        Ok(proxy)
    }

    /// The connect string of the relays, one per server, in the same order.
    fn connect_string(&self) -> String {
        self.listeners
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// From now on, requests for a new session pass unchanged.
    fn stop_attaching(&self) {
        self.shared.lock().attach = None;
    }

    fn handshake(&self) -> Option<Handshake> {
        self.shared.lock().handshake.clone()
    }

    fn current(&self) -> Option<Upstream> {
        let i = self.shared.lock().current?;
        self.shared.upstreams.get(i).cloned()
    }

    /// `host:port: why` of each server that failed last time, or None.
    fn failures(&self) -> Option<String> {
        let state = self.shared.lock();
        let f: Vec<String> = state
            .failures
            .iter()
            .zip(&self.shared.upstreams)
            .filter_map(|(f, u)| f.as_ref().map(|f| format!("{u}: {f}")))
            .collect();
        (!f.is_empty()).then(|| f.join(", "))
    }
}

async fn accept(listener: TcpListener, upstream: usize, shared: Arc<RelayShared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((down, _)) => {
                    conns.spawn(relay(down, upstream, shared.clone()));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "session relay accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// What to set when a TLS error has a likely cause in the catalog's `tls`, from the rustls
/// error inside `e` (during the handshake, or at the first read with TLS 1.3, where a refused
/// client certificate arrives as an alert after the handshake).
fn tls_hint(e: &std::io::Error) -> Option<&'static str> {
    use tokio_rustls::rustls::{AlertDescription, CertificateError, Error};
    let inner = e.get_ref()?.downcast_ref::<Error>()?;
    Some(match inner {
        Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => " (ZooKeeper wants a client certificate of a CA it trusts: tls.clientCertSecretRef)",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            " (the server's certificate is not signed by a CA this controller trusts: \
             tls.caSecretRef)"
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => {
            " (the server's certificate does not name the host of the connect string: connect \
             by a name the certificate carries)"
        }
        _ => return None,
    })
}

/// A connection to a ZooKeeper server: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to `u`, over TLS when `tls` is set (the server's `secureClientPort`).
async fn dial(u: &Upstream, tls: Option<&TlsConnector>) -> std::io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect((u.host.as_str(), u.port)).await?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = ServerName::try_from(u.host.clone()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{:?} is no TLS server name: {e}", u.host),
        )
    })?;
    let stream = tls.connect(name, tcp).await.map_err(|e| {
        let hint = tls_hint(&e).unwrap_or_default();
        std::io::Error::new(e.kind(), format!("TLS handshake: {e}{hint}"))
    })?;
    Ok(Box::new(stream))
}

async fn relay(mut down: TcpStream, i: usize, shared: Arc<RelayShared>) {
    let Some(target) = shared.upstreams.get(i).cloned() else {
        return;
    };
    let connected =
        tokio::time::timeout(shared.connect_timeout, dial(&target, shared.tls.as_ref())).await;
    let mut up = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.lock().failures[i] = Some(describe_io(&e));
            return;
        }
        Err(_) => {
            shared.lock().failures[i] = Some("timed out".into());
            return;
        }
    };
    shared.lock().failures[i] = None;
    let _ = down.set_nodelay(true);
    let handshake = tokio::time::timeout(
        shared.connect_timeout * 2,
        relay_handshake(&mut down, &mut up, i, &shared),
    )
    .await;
    match handshake {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(server = %target, error = %e, "session handshake failed");
            // (TLS hints are in the message already.)
            let hint = if shared.tls.is_none() && e.kind() == std::io::ErrorKind::UnexpectedEof {
                " (a server without a quorum does that; so does a TLS port: if this is \
                 ZooKeeper's secureClientPort, set zookeeper.tls)"
            } else {
                ""
            };
            shared.lock().failures[i] = Some(format!("{e}{hint}"));
            return;
        }
        Err(_) => {
            shared.lock().failures[i] = Some("no answer to the session handshake".into());
            return;
        }
    }
    let (mut dr, mut dw) = down.into_split();
    let (mut ur, mut uw) = tokio::io::split(up);
    // Either side closing ends the connection (ZooKeeper has no half-closed state).
    tokio::select! {
        _ = tokio::io::copy(&mut dr, &mut uw) => {}
        _ = tokio::io::copy(&mut ur, &mut dw) => {}
    }
}

async fn relay_handshake(
    down: &mut TcpStream,
    up: &mut Box<dyn Io>,
    i: usize,
    shared: &RelayShared,
) -> std::io::Result<()> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let context = |what: &'static str| {
        move |e: std::io::Error| {
            let hint = tls_hint(&e).unwrap_or_default();
            std::io::Error::new(e.kind(), format!("{what}: {}{hint}", describe_io(&e)))
        }
    };
    let request = read_frame(down)
        .await
        .map_err(context("reading the client's connect request"))?;
    let mut parsed =
        ConnectRequest::parse(&request).ok_or_else(|| invalid("malformed connect request"))?;
    let attach = shared.lock().attach.clone();
    let request = match attach {
        Some((id, password)) if parsed.session_id == 0 => {
            parsed.session_id = id;
            parsed.password = password;
            parsed.encode()
        }
        _ => request,
    };
    write_frame(up, &request)
        .await
        .map_err(context("sending the connect request"))?;
    // A server that is not serving yet (starting, or without a quorum) closes here.
    let response = read_frame(up).await.map_err(context(
        "the server closed the connection in the session handshake",
    ))?;
    let hs =
        parse_connect_response(&response).ok_or_else(|| invalid("malformed connect response"))?;
    {
        let mut state = shared.lock();
        if hs.session_id != 0 {
            state.handshake = Some(hs);
            state.current = Some(i);
        }
    }
    write_frame(down, &response).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Origin;

    fn zk(layout: ZooKeeperLayout) -> ZooKeeper {
        ZooKeeper::new(ZooKeeperConfig {
            connect: "127.0.0.1:2181".into(),
            layout,
            owner: "c1".into(),
            ..Default::default()
        })
        .expect("valid config")
    }

    fn inst(ip: &str, port: u16) -> Instance {
        Instance {
            name: "api_x".into(),
            address: ip.parse().expect("test ip"),
            port,
            origin: Origin {
                namespace: "shop".into(),
                service: "api-x".into(),
            },
            tags: vec!["t".into()],
            meta: BTreeMap::new(),
        }
    }

    #[test]
    fn connect_strings_hosts_and_chroot() {
        let up = |h: &str, p| Upstream {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            parse_connect("zk1:2181,zk2:2182/app/x").expect("valid"),
            (vec![up("zk1", 2181), up("zk2", 2182)], "/app/x".into())
        );
        assert_eq!(
            parse_connect("[fd00::1]:2181,zk2,tcp://zk3:1/").expect("valid"),
            (
                vec![up("fd00::1", 2181), up("zk2", 2181), up("zk3", 1)],
                "".into()
            )
        );
        assert_eq!(
            parse_connect("tcp://zk3:1/c").expect("valid"),
            (vec![up("zk3", 1)], "/c".into())
        );
        assert_eq!(up("fd00::1", 2181).to_string(), "[fd00::1]:2181");
        for bad in [
            "",
            "zk:0",
            "zk:x",
            "zk1,,zk2",
            "tcp+tls://zk:2181",
            "zk/a//b",
            "[fd00::1",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_is_checked_without_contacting_anything() {
        let ok = ZooKeeperConfig {
            connect: "127.0.0.1:1/chroot".into(),
            owner: "o".into(),
            ..Default::default()
        };
        let z = ZooKeeper::new(ok.clone()).expect("a dead address is fine");
        assert_eq!(z.root(), "/chroot/services");
        assert_eq!(z.describe(), "zookeeper 127.0.0.1:1/chroot plain /services");
        let bad = |cfg: ZooKeeperConfig| ZooKeeper::new(cfg).is_err();
        assert!(bad(ZooKeeperConfig {
            base_path: Some("services".into()),
            ..ok.clone()
        }));
        assert!(bad(ZooKeeperConfig {
            base_path: Some("/a/".into()),
            ..ok.clone()
        }));
        assert!(bad(ZooKeeperConfig {
            connect: "127.0.0.1:1".into(),
            base_path: Some("/zookeeper/x".into()),
            ..ok.clone()
        }));
        assert!(bad(ZooKeeperConfig {
            digest: Some(("a:b".into(), "p".into())),
            ..ok.clone()
        }));
        assert!(bad(ZooKeeperConfig {
            owner: "o ".into(),
            ..ok.clone()
        }));
        let dbg = format!(
            "{:?}",
            ZooKeeperConfig {
                digest: Some(("user".into(), "secret-pass".into())),
                ..ok
            }
        );
        assert!(
            !dbg.contains("secret-pass") && dbg.contains("user"),
            "{dbg}"
        );
        let s = StoredSession {
            id: 0x1234,
            password: b"secret".to_vec(),
            timeout_ms: 4000,
        };
        let dbg = format!("{s:?}");
        assert!(dbg.contains("0x1234") && !dbg.contains("115"), "{dbg}");
    }

    #[tokio::test]
    async fn a_client_without_owner_only_looks_up() {
        let z = ZooKeeper::new(ZooKeeperConfig {
            connect: "127.0.0.1:1".into(),
            session_timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .expect("a lookup-only client");
        assert!(matches!(
            z.read_owned().await,
            Err(BackendError::Rejected(_))
        ));
        let ops = [Op::Delete {
            key: "api_x/providers/10.0.0.1:1".into(),
        }];
        assert!(matches!(
            z.apply(&ops).await,
            Err(BackendError::Rejected(_))
        ));
        assert_eq!(z.apply(&[]).await, Ok(0));
        match z.lookup("x").await {
            Err(BackendError::Unreachable(m)) => {
                assert!(
                    m.contains("127.0.0.1:1") && m.contains("connection refused"),
                    "{m}"
                )
            }
            other => panic!("expected unreachable, got {other:?}"),
        }
        assert!(matches!(
            z.lookup("a/b").await,
            Err(BackendError::Rejected(_))
        ));
    }

    #[test]
    fn plain_records_read_back_equal() {
        let z = zk(ZooKeeperLayout::Plain);
        let a = inst("10.0.0.1", 8080);
        let b = inst("fd00::1", 8080);
        let recs = z.render(&[a, b]);
        let keys: Vec<&String> = recs.keys().collect();
        assert_eq!(
            keys,
            [
                "api_x/providers/10.0.0.1:8080",
                "api_x/providers/[fd00::1]:8080"
            ]
        );
        let r = &recs["api_x/providers/10.0.0.1:8080"];
        assert_eq!(
            r,
            &json!({"data": {"owner": "c1", "namespace": "shop", "service": "api-x"}})
        );
        let bytes = z
            .data_of("api_x/providers/10.0.0.1:8080", r, 5)
            .expect("valid");
        assert_eq!(z.record_from_data(&bytes), (r.clone(), None));
        assert_eq!(
            z.record_from_data(b"10.0.0.1:8080").0,
            json!({"raw": "10.0.0.1:8080"})
        );
        assert!(z.check_key("api_x/providers/10.0.0.1:8080").is_ok());
        for bad in [
            "api_x/10.0.0.1:8080",
            "api_x/x/1",
            "a/providers/b/c",
            "../providers/x",
        ] {
            assert!(z.check_key(bad).is_err(), "{bad}");
        }
        // Names that cannot be znode names are not rendered.
        let mut odd = inst("10.0.0.2", 1);
        odd.name = "a/b".into();
        assert!(z.render(&[odd]).is_empty());
    }

    #[test]
    fn curator_records_are_service_instances_that_read_back_equal() {
        let z = zk(ZooKeeperLayout::Curator);
        let a = inst("10.0.0.1", 8080);
        let id = a.stable_id();
        let recs = z.render(std::slice::from_ref(&a));
        let key = format!("api_x/{id}");
        let r = &recs[&key];
        assert_eq!(r["data"]["id"], json!(id));
        assert_eq!(r["data"]["serviceType"], "DYNAMIC");
        assert_eq!(r["data"]["payload"], Value::Null);
        assert!(r["data"].get("enabled").is_none());
        assert!(r["data"].get("registrationTimeUTC").is_none());
        assert_eq!(
            r["data"]["uriSpec"]["parts"][0],
            json!({"value": "scheme", "variable": true})
        );

        let bytes = z.data_of(&key, r, 1_700_000_000_123).expect("valid");
        let written: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(written["registrationTimeUTC"], json!(1_700_000_000_123_u64));
        assert_eq!(written["address"], "10.0.0.1");
        assert_eq!(written["port"], 8080);
        assert_eq!(written["sslPort"], Value::Null);
        assert_eq!(
            z.record_from_data(&bytes),
            (r.clone(), Some(1_700_000_000_123))
        );
        assert_eq!(curator_address(&bytes).as_deref(), Some("10.0.0.1:8080"));

        // IPv6: no uriSpec (Curator would build an invalid URI); lookups bracket it.
        let v6 = inst("fd00::2", 9);
        let (k6, r6) = z.entry(&v6).expect("valid");
        assert_eq!(r6["data"]["uriSpec"], Value::Null);
        let b6 = z.data_of(&k6, &r6, 1).expect("valid");
        assert_eq!(curator_address(&b6).as_deref(), Some("[fd00::2]:9"));

        // A record whose id is not its key is refused.
        assert!(z.data_of("api_x/other", r, 1).is_err());
        assert!(z.data_of(&key, &json!({"name": "x"}), 1).is_err());
        // An invalid time stays in the record, so it differs and gets rewritten.
        let mut odd = written.clone();
        odd["registrationTimeUTC"] = json!("yesterday");
        let (rec, t) = z.record_from_data(odd.to_string().as_bytes());
        assert!(t.is_none() && &rec != r);
        assert!(curator_address(br#"{"address":"h","port":1,"enabled":false}"#).is_none());
        assert!(curator_address(b"garbage").is_none());
    }

    #[test]
    fn import_parses_provider_names_and_curator_instances() {
        let ok = |h: &str, p| Ok((h.to_string(), p));
        assert_eq!(parse_provider("10.0.0.8:3306"), ok("10.0.0.8", 3306));
        assert_eq!(parse_provider("[fd00::8]:3306"), ok("fd00::8", 3306));
        assert_eq!(
            parse_provider("db-1.example:5432"),
            ok("db-1.example", 5432)
        );
        for bad in [
            "10.0.0.8",
            "fd00::8:3306",
            "[fd00::8]3306",
            "[nope]:1",
            "h:0",
            "h:70000",
            ":80",
            "a b:1",
        ] {
            assert!(parse_provider(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_curator(br#"{"address":"10.0.0.1","port":8080,"sslPort":null}"#),
            Ok(Some(("10.0.0.1".into(), 8080)))
        );
        assert_eq!(
            parse_curator(br#"{"address":"[fd00::1]","port":null,"sslPort":8443}"#),
            Ok(Some(("fd00::1".into(), 8443)))
        );
        assert_eq!(
            parse_curator(br#"{"address":"h","port":1,"enabled":false}"#),
            Ok(None)
        );
        for bad in [
            &b"garbage"[..],
            br#"[1]"#,
            br#"{"port":1}"#,
            br#"{"address":"h"}"#,
            br#"{"address":"h","port":"80"}"#,
            br#"{"address":"h","port":0}"#,
            br#"{"address":"h","port":1,"enabled":"no"}"#,
        ] {
            assert!(
                parse_curator(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(plain_owner_is(br#"{"owner":"c1"}"#, "c1"));
        assert!(!plain_owner_is(br#"{"owner":"c2"}"#, "c1"));
        assert!(!plain_owner_is(b"", "c1"));
        assert!(!plain_owner_is(br#"{"owner":""}"#, ""));
    }

    #[test]
    fn names_and_paths() {
        assert!(name_problem("api_x").is_none());
        assert!(name_problem("[fd00::1]:80").is_none());
        for bad in ["", ".", "..", "a/b", "a\0b", "a\u{1}"] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(ancestors("/a/b/c"), ["/a", "/a/b"]);
        assert!(ancestors("/a").is_empty());
        assert_eq!(dial_address("fd00::1", 1), "[fd00::1]:1");
        assert_eq!(dial_address("h", 1), "h:1");
    }

    fn create(path: &str, bytes: usize) -> Write {
        Write::Create {
            key: path.trim_start_matches('/').into(),
            path: path.into(),
            record: Value::Null,
            data: vec![b'x'; bytes],
            registered: None,
        }
    }

    #[test]
    fn multis_hold_at_most_100_operations_parents_included_once() {
        let writes: Vec<Write> = (0..250)
            .map(|i| create(&format!("/r/services/api_x/providers/10.0.0.{i}:1"), 60))
            .collect();
        let b = batches(&writes, &HashSet::new());
        assert_eq!(b.len(), 3);
        assert_eq!(
            b[0].parents,
            [
                "/r",
                "/r/services",
                "/r/services/api_x",
                "/r/services/api_x/providers"
            ]
        );
        assert_eq!(b[0].range, 0..96);
        assert!(b[1].parents.is_empty() && b[2].parents.is_empty());
        assert_eq!(b[2].range.end, 250);
        // Known parents are not created; deletes need none.
        let known: HashSet<String> = ancestors("/r/services/api_x/providers/x")
            .into_iter()
            .collect();
        let b = batches(&writes[..10], &known);
        assert_eq!(
            b,
            [Batch {
                parents: vec![],
                range: 0..10
            }]
        );
        let del = Write::Delete {
            key: "k".into(),
            path: "/r/x/y".into(),
            version: 0,
        };
        assert!(batches(&[del], &HashSet::new())[0].parents.is_empty());
        // Large data cuts batches by size; an entry larger than the limit goes alone.
        let big: Vec<Write> = (0..10)
            .map(|i| create(&format!("/r/n{i}"), MAX_MULTI_BYTES / 3))
            .collect();
        let b = batches(&big, &known);
        assert!(b.len() >= 4, "{b:?}");
        let huge = [create("/r/a", MAX_MULTI_BYTES * 2), create("/r/b", 1)];
        assert_eq!(batches(&huge, &HashSet::new()).len(), 2);
    }

    #[test]
    fn handshake_frames_are_read_and_rewritten() {
        let req = ConnectRequest {
            protocol_version: 0,
            last_zxid_seen: 0,
            timeout_ms: 4000,
            session_id: 0,
            password: vec![0; 16],
            rest: vec![0],
        };
        let bytes = req.encode();
        assert_eq!(bytes.len(), 45);
        assert_eq!(ConnectRequest::parse(&bytes), Some(req.clone()));
        let mut attached = req.clone();
        attached.session_id = 0x0100_0000_0000_0042;
        attached.password = (1..=16).collect();
        let parsed = ConnectRequest::parse(&attached.encode()).expect("parses");
        assert_eq!(parsed.session_id, 0x0100_0000_0000_0042);
        assert_eq!(parsed.password, (1..=16).collect::<Vec<u8>>());
        assert_eq!(parsed.rest, [0]);
        assert!(ConnectRequest::parse(&bytes[..20]).is_none());

        let mut resp = Vec::new();
        resp.extend_from_slice(&0i32.to_be_bytes());
        resp.extend_from_slice(&4000i32.to_be_bytes());
        resp.extend_from_slice(&7i64.to_be_bytes());
        resp.extend_from_slice(&16i32.to_be_bytes());
        resp.extend_from_slice(&[9; 16]);
        resp.push(0);
        assert_eq!(
            parse_connect_response(&resp),
            Some(Handshake {
                session_id: 7,
                password: vec![9; 16],
                timeout_ms: 4000
            })
        );
        assert!(parse_connect_response(&resp[..10]).is_none());
    }

    #[test]
    fn srvr_answers_give_mode_and_version() {
        let text = "Zookeeper version: 3.8.4-9316c2a7a97e1666d8f4593f34dd6fc36ecc436c, built on 2024-02-12 22:16 UTC\nLatency min/avg/max: 0/0.0/0\nMode: standalone\nNode count: 5\n";
        assert_eq!(
            parse_srvr(text),
            (
                Some("standalone".into()),
                Some("3.8.4-9316c2a7a97e1666d8f4593f34dd6fc36ecc436c".into())
            )
        );
        assert_eq!(
            parse_srvr("srvr is not executed because it is not in the whitelist.\n"),
            (None, None)
        );
    }

    #[tokio::test]
    async fn the_memory_store_keeps_one_session() {
        let s = MemorySessionStore::default();
        assert_eq!(s.load().await.expect("load"), None);
        let one = StoredSession {
            id: 1,
            password: vec![1],
            timeout_ms: 10,
        };
        s.save(&one).await.expect("save");
        assert_eq!(s.load().await.expect("load"), Some(one.clone()));
        assert_eq!(s.get(), Some(one));
    }
}
