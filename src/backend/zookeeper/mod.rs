//! ZooKeeper: every exported instance is an ephemeral znode of one of this controller's
//! sessions (one per shard of the service names, each within a budget of paths); the
//! directories above them are persistent. The sessions are stored and re-attached across
//! restarts and leaders, through a relay on loopback that reads the session handshake
//! (docs/architecture.md, "ZooKeeper layouts and liveness", tells the whole story).
//!
//! - `layout`: where an entry lives and what its node holds, pure;
//! - `shards`: which session holds a name's entries, and when there are more sessions, pure;
//! - `session`: the sessions — stored, established, re-attached, watched;
//! - `handover`: the sessions let go for the next leader;
//! - `relay`: the relay on loopback that reads the session handshake and speaks TLS;
//! - `read`, `batch`, `write`: the owned entries, read, cut into `multi`s and written;
//! - `rehome`: more sessions when one would pass its budget, and entries moved to them;
//! - `import`: the watches that follow other registrants' entries.

mod batch;
mod handover;
mod import;
mod layout;
mod owner;
mod read;
mod rehome;
mod relay;
mod session;
mod shards;
mod write;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use zookeeper_client as zk;

pub use self::batch::{MAX_MULTI_BYTES, MAX_MULTI_OPS};
pub use self::layout::{PROVIDERS, name_problem};
pub use self::owner::OWNERS_DIR;
pub use self::session::{MemorySessionStore, SessionStore};
pub use self::shards::{MAX_SESSIONS, SessionKey, StoredSession};

use self::layout::{Upstream, check_path, parse_connect};
use self::relay::{Tls, srvr};
use self::session::{Conn, Keys, Slot};
use self::shards::Entries;
use super::tls::{TlsSettings, client_config};
use super::{Backend, BackendError, ImportSnapshot, Record};
use crate::api::crd::{ServerInfo, ZooKeeperLayout};
use crate::model::{Instance, Op};

pub const DEFAULT_BASE_PATH: &str = "/services";
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// ZooKeeper (3.6 and later, ZOOKEEPER-4306) writes the path of every ephemeral node of a
/// session into the transaction that closes it, and a transaction must fit in `jute.maxbuffer`
/// (1 MiB by default): past that the ensemble becomes unavailable and cannot restart.
pub const DEFAULT_JUTE_MAX_BUFFER: usize = 1024 * 1024;

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
    /// The servers' `jute.maxbuffer` (default [`DEFAULT_JUTE_MAX_BUFFER`]): bounds the bytes
    /// of paths one session may own (half of it) and the size of a `multi` (a quarter).
    pub jute_max_buffer: usize,
    /// Bytes of entry paths one session may own: past it the entries go to more sessions, and
    /// the catalog warns about a name that passes it alone ([`Backend::warning`]). None: half
    /// of [`Self::jute_max_buffer`].
    pub session_path_budget: Option<usize>,
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
            jute_max_buffer: DEFAULT_JUTE_MAX_BUFFER,
            session_path_budget: None,
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

/// What the backend knows about the catalog between calls.
struct Cache {
    /// The live session of each shard (0: none yet); entries of other sessions are forgotten.
    sessions: Vec<i64>,
    /// Owned entries by key.
    entries: Entries,
    /// Persistent directories known to exist.
    parents: HashSet<String>,
    /// Some entries may live in the session of another shard than their name's (the number
    /// of sessions grew): the next write moves them.
    rehome: bool,
}

struct Inner {
    /// [`ZooKeeperConfig::read_only`].
    read_only: bool,
    connect: String,
    upstreams: Vec<Upstream>,
    /// TLS to the servers, spoken by the session relay.
    tls: Option<Tls>,
    session_path_budget: usize,
    /// At most this many bytes of paths and data in one `multi`.
    multi_bytes: usize,
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
    /// The session of each shard; shard 0 always exists.
    slots: Mutex<Vec<Arc<tokio::sync::Mutex<Slot>>>>,
    /// The sessions of every shard as known and as stored (also the lock of the store).
    keys: tokio::sync::Mutex<Keys>,
    /// The read-only session of the import watches (see [`Backend::watch_service`]).
    watch_conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    cache: Mutex<Cache>,
    invalidated: watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// While this replica does not write ([`ZooKeeper::pause`]): the task that lets the
    /// session go at the first disconnection.
    paused: Mutex<Option<JoinHandle<()>>>,
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

    /// Whether the sessions are this owner's stored ones, kept across restarts: attached to,
    /// saved, left open. Not for a client without owner, nor a read-only one.
    fn keeps_session(&self) -> bool {
        self.has_owner() && !self.read_only
    }
}

/// A ZooKeeper ensemble, reached through this owner's sessions.
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
        // The sessions are not closed (their clients are detached): the next leader
        // re-attaches.
        for t in self.inner.lock_tasks().drain(..) {
            t.abort();
        }
        self.inner.unpause();
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
        // With digest auth: the controller's identity may do everything and anyone may read.
        // Other registrants may create their own entries in the shared directories, but not
        // delete anything there: ZooKeeper checks DELETE on the parent, so a world DELETE on a
        // directory would let any client remove this controller's entries. Their ephemeral
        // entries go with their sessions. Without digest auth: what every unauthenticated
        // client writes.
        let creator = zk::Acl::new(zk::Permission::ALL, zk::AuthId::new("auth", ""));
        let world = |p| zk::Acl::new(p, zk::AuthId::anyone());
        let (entry_acls, parent_acls) = if digest.is_some() {
            (
                vec![creator.clone(), world(zk::Permission::READ)],
                vec![
                    creator,
                    world(zk::Permission::READ | zk::Permission::CREATE),
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
            Some(t) => Some(Tls {
                connector: TlsConnector::from(Arc::new(client_config("ZooKeeper", t)?)),
                client_cert: t.client_cert.is_some(),
            }),
        };
        if cfg.jute_max_buffer < 4096 {
            bail!(
                "a ZooKeeper jute.maxbuffer of {} bytes is too small",
                cfg.jute_max_buffer
            );
        }
        let (invalidated, _) = watch::channel(0);
        let cache = Cache {
            sessions: vec![0],
            entries: Entries::new(&root),
            parents: HashSet::new(),
            rehome: false,
        };
        Ok(ZooKeeper {
            inner: Arc::new(Inner {
                read_only: cfg.read_only,
                connect: cfg.connect.trim().to_string(),
                upstreams,
                tls,
                session_path_budget: cfg.session_path_budget.unwrap_or(cfg.jute_max_buffer / 2),
                multi_bytes: MAX_MULTI_BYTES.min(cfg.jute_max_buffer / 4),
                root,
                base,
                layout: cfg.layout,
                owner: cfg.owner,
                digest,
                session_timeout: cfg.session_timeout,
                store: cfg.session_store,
                entry_acls,
                parent_acls,
                slots: Mutex::new(vec![Arc::new(tokio::sync::Mutex::new(Slot::Empty))]),
                keys: tokio::sync::Mutex::default(),
                watch_conn: tokio::sync::Mutex::new(None),
                cache: Mutex::new(cache),
                invalidated,
                tasks: Mutex::default(),
                paused: Mutex::default(),
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

    fn layout_name(&self) -> &'static str {
        match self.inner.layout {
            ZooKeeperLayout::Plain => "plain",
            ZooKeeperLayout::Curator => "curator",
        }
    }
}

#[async_trait]
impl Backend for ZooKeeper {
    async fn release(&self) {
        ZooKeeper::release(self).await
    }

    async fn pause(&self) {
        ZooKeeper::pause(self).await
    }

    fn warning(&self) -> Option<String> {
        self.session_warning()
    }

    fn kind(&self) -> &'static str {
        "zookeeper"
    }

    fn describe(&self) -> String {
        format!(
            "zookeeper {} {} {}",
            self.inner.connect,
            self.layout_name(),
            self.inner.base
        )
    }

    fn render(&self, instances: &[Instance]) -> BTreeMap<String, Record> {
        instances.iter().filter_map(|i| self.entry(i)).collect()
    }

    async fn expect(&self, instances: &[Instance]) -> Result<(), BackendError> {
        if self.inner.read_only {
            return Ok(());
        }
        self.require_owner()?;
        let keys: Vec<String> = instances.iter().filter_map(|i| self.key_of(i)).collect();
        let puts: Vec<(&str, bool)> = keys.iter().map(|k| (k.as_str(), true)).collect();
        let mut conns = self.inner.conns().await?;
        self.grow_for(&mut conns, &puts).await
    }

    async fn read_owned(&self) -> Result<BTreeMap<String, Record>, BackendError> {
        self.owned_records().await
    }

    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError> {
        self.write_ops(ops).await
    }

    async fn location(&self) -> Result<String, BackendError> {
        Ok(format!(
            "zookeeper layout {} root {}",
            self.layout_name(),
            self.inner.root
        ))
    }

    /// The server of the session answers; every server of the connect string is asked what it
    /// is (`srvr`, whitelisted by default): the ones that answer are the members, the one in
    /// mode `leader` leads.
    async fn probe(&self) -> Result<ServerInfo, BackendError> {
        let conn = self.inner.conn().await?;
        conn.client
            .check_stat("/")
            .await
            .map_err(|e| self.inner.error("reading /", &e, Some(&conn.proxy)))?;
        let upstream = conn.proxy.current();
        let tls = self.inner.tls.as_ref();
        let answers = futures::future::join_all(
            self.inner
                .upstreams
                .iter()
                .map(|u| async move { (u, srvr(u, tls).await) }),
        )
        .await;
        let mut info = ServerInfo {
            address: upstream.as_ref().map(ToString::to_string),
            ..Default::default()
        };
        for (u, answer) in answers {
            let Some((mode, version)) = answer else {
                continue;
            };
            if mode.as_deref() == Some("leader") {
                info.leader = Some(u.to_string());
            }
            if upstream.as_ref() == Some(u) {
                info.mode = mode;
                info.version = version;
            }
            info.members.push(u.to_string());
        }
        Ok(info)
    }

    fn invalidations(&self) -> Option<watch::Receiver<u64>> {
        Some(self.inner.invalidated.subscribe())
    }

    /// Follows `name` with child and data watches through a session of the watches' own;
    /// this controller's own entries are left out ([`ZooKeeper::follow`], "No loops").
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
        self.look_up(name).await
    }
}
