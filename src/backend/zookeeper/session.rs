//! The sessions, kept across restarts and leaders: where they are stored, how they are
//! established, re-attached, watched and released. The entries are spread over one or more
//! sessions (`shards`); shard 0 also serves every read, probe and owner marker.
//!
//! The session ids and passwords are kept in a [`SessionStore`] (a Kubernetes Secret in the
//! controller). On first use the backend re-attaches to the stored sessions; when ZooKeeper
//! still knows them, their ephemeral nodes are still there and the first plan is empty. Only
//! when ZooKeeper says one expired is a new session created for its shard (and stored). Dropping the backend does
//! not close the session — neither does a graceful shutdown: the next leader re-attaches, and
//! the entries of a controller that never comes back go after the session timeout.
//!
//! ZooKeeper gives a session to the connection that attached last and closes the others, so
//! only one live backend may use the sessions: a replica that stops leading must drop its backend
//! or call [`ZooKeeper::release`], or it takes the session back from the new leader (and so
//! on, endlessly).
//!
//! A session that expires (ZooKeeper unreachable for longer than the timeout, or closed by
//! someone who had its password) is replaced by a new one for its shard in the background; [`Backend::invalidations`](crate::backend::Backend::invalidations)
//! then moves so the writer re-reads (now without that session's entries) and re-creates them. A reconnect
//! within the session changes nothing, and neither does a ZooKeeper restart: ZooKeeper restores
//! its sessions with a fresh timeout, so the backend re-attaches even when the client had given
//! the session up.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use zookeeper_client as zk;

use super::Inner;
use super::relay::Proxy;
use super::shards::{SessionKey, StoredSession};
use crate::backend::BackendError;
use crate::runtime::backoff::Backoff;

/// Where the session ids and passwords are kept between controller processes, so a restarted
/// controller or a new leader re-attaches to the live sessions and their ephemeral nodes
/// survive.
#[async_trait]
pub trait SessionStore: Send + Sync {
    async fn load(&self) -> anyhow::Result<Option<StoredSession>>;
    async fn save(&self, s: &StoredSession) -> anyhow::Result<()>;
}

/// A [`SessionStore`] in memory: for tests, and for clients that need no hand-over.
#[derive(Default)]
pub struct MemorySessionStore {
    session: Mutex<Option<StoredSession>>,
}

impl MemorySessionStore {
    /// The sessions stored now.
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

/// One live session.
pub(super) struct Conn {
    pub(super) client: zk::Client,
    pub(super) proxy: Proxy,
    pub(super) session: SessionKey,
    /// Its shard.
    pub(super) shard: usize,
}

/// The session of a backend.
pub(super) enum Slot {
    /// None yet, or released: the next call re-attaches to the stored session.
    Empty,
    Live(Arc<Conn>),
    /// Held, then lost on the client (expired, or given up while unreachable) and not
    /// re-established yet.
    Lost(SessionKey),
}

/// The sessions of every shard as this backend knows them, and what the store holds.
#[derive(Default)]
pub(super) struct Keys {
    /// By shard; None for a shard whose session is not opened yet.
    pub(super) slots: Vec<Option<SessionKey>>,
    /// What was stored last (or loaded).
    pub(super) stored: Option<StoredSession>,
}

impl Keys {
    fn is_stored(&self, shard: usize, s: &SessionKey) -> bool {
        self.stored
            .as_ref()
            .and_then(|st| st.all().nth(shard))
            .is_some_and(|k| k == s)
    }
}

/// An error while establishing a session.
pub(super) enum ConnectError {
    /// The session to re-attach to no longer exists.
    Expired,
    Failed(BackendError),
}

pub(super) fn is_connection_error(e: &zk::Error) -> bool {
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
    pub(super) fn hosts(&self) -> String {
        self.upstreams
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The error for a failed ZooKeeper call.
    pub(super) fn error(&self, what: &str, e: &zk::Error, proxy: Option<&Proxy>) -> BackendError {
        let msg = format!("{what} on ZooKeeper {}: {e}", self.hosts());
        match e {
            zk::Error::NoAuth | zk::Error::AuthFailed => BackendError::Unauthorized(msg),
            e if is_connection_error(e) => BackendError::Unreachable(format!(
                "{msg}{}",
                proxy.map(Proxy::failures_note).unwrap_or_default()
            )),
            zk::Error::UnmarshalError { .. }
            | zk::Error::UnexpectedError(_)
            | zk::Error::UnexpectedErrorCode(_)
            | zk::Error::MarshallingError => BackendError::Protocol(msg),
            _ => BackendError::Rejected(msg),
        }
    }

    /// The pauses between attempts of the background retries (session, import watches):
    /// from 100 ms up to a quarter of the session timeout, within 100 ms to 2 s.
    pub(super) fn backoff(&self) -> Backoff {
        let cap =
            (self.session_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
        Backoff::new(Duration::from_millis(100), cap)
    }

    /// The live session of shard 0 (reads, probes, owner markers, and the entries of the
    /// names of shard 0), established (or re-established) when there is none.
    pub(super) async fn conn(self: &Arc<Self>) -> Result<Arc<Conn>, BackendError> {
        self.shard_conn(0).await
    }

    /// The live session of `shard`, established (or re-established) when there is none.
    /// (Boxed: the session watcher it spawns calls it again.)
    pub(super) fn shard_conn(
        self: &Arc<Self>,
        shard: usize,
    ) -> futures::future::BoxFuture<'_, Result<Arc<Conn>, BackendError>> {
        Box::pin(async move {
            self.establish(shard, false).await?.ok_or_else(|| {
                BackendError::Protocol("no ZooKeeper session was established".into())
            })
        })
    }

    /// The live session of every shard, shard 0 first (which learns from the store how many
    /// there are).
    pub(super) async fn conns(self: &Arc<Self>) -> Result<Vec<Arc<Conn>>, BackendError> {
        let first = self.conn().await?;
        let count = self.lock_slots().len();
        let rest = futures::future::try_join_all((1..count).map(|j| self.shard_conn(j))).await?;
        Ok(std::iter::once(first).chain(rest).collect())
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Vec<Arc<tokio::sync::Mutex<Slot>>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, shard: usize) -> Result<Arc<tokio::sync::Mutex<Slot>>, BackendError> {
        self.lock_slots()
            .get(shard)
            .cloned()
            .ok_or_else(|| BackendError::Protocol(format!("no ZooKeeper session shard {shard}")))
    }

    /// Makes room for `count` shards (new ones empty: opened on first use).
    pub(super) async fn add_shards(&self, count: usize) {
        let mut keys = self.keys.lock().await;
        if keys.slots.len() < count {
            keys.slots.resize(count, None);
        }
        let mut slots = self.lock_slots();
        while slots.len() < count {
            slots.push(Arc::new(tokio::sync::Mutex::new(Slot::Empty)));
        }
    }

    /// Returns the live session of `shard`, or re-attaches to the session held last, or to
    /// the stored one, or opens a new one. In the `background` (the session watcher), only a
    /// session that was held and lost is re-established: None when there is nothing to do.
    async fn establish(
        self: &Arc<Self>,
        shard: usize,
        background: bool,
    ) -> Result<Option<Arc<Conn>>, BackendError> {
        // In use again: the session is no longer only kept alive for someone else.
        self.unpause();
        let slot_lock = self.slot(shard)?;
        let mut slot = slot_lock.lock().await;
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
                tracing::info!(shard, session = %format_args!("{:#x}", c.session.id), state = %c.client.state(), "the ZooKeeper client gave the session up; re-attaching");
                (Some(c.session.clone()), true)
            }
            Slot::Lost(s) => (Some(s.clone()), true),
            // Released, or never used: only a caller brings it back.
            Slot::Empty if background => return Ok(None),
            Slot::Empty if self.keeps_session() && shard == 0 => (self.load_keys().await?, false),
            Slot::Empty if self.keeps_session() => (
                self.keys.lock().await.slots.get(shard).cloned().flatten(),
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
            match self.connect(Some(s), self.has_owner(), shard).await {
                Ok(c) => {
                    tracing::info!(shard, session = %format_args!("{:#x}", s.id), "re-attached to the ZooKeeper session");
                    attached = Some(c);
                }
                Err(ConnectError::Expired) => {
                    tracing::info!(shard, session = %format_args!("{:#x}", s.id), "the ZooKeeper session expired; starting a new one");
                }
                Err(ConnectError::Failed(e)) => return Err(e),
            }
        }
        let fresh = attached.is_none();
        let conn = match attached {
            Some(c) => c,
            // A read-only session is its own: closed when dropped.
            None => match self.connect(None, self.keeps_session(), shard).await {
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
            if cache.sessions.len() <= shard {
                cache.sessions.resize(shard + 1, 0);
            }
            let old = std::mem::replace(&mut cache.sessions[shard], conn.session.id);
            if old != conn.session.id {
                cache.entries.forget_session(old);
            }
        }
        let watcher = tokio::spawn(watch_session(
            Arc::downgrade(self),
            shard,
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
            tracing::info!(shard, session = %format_args!("{:#x}", conn.session.id), timeout_ms = conn.session.timeout_ms, hosts = %self.hosts(), "new ZooKeeper session");
        }
        self.save(&conn).await;
        if fresh && held {
            // Everything the old session held is gone: the writer re-reads and re-puts.
            self.invalidated.send_modify(|n| *n += 1);
        }
        Ok(Some(conn))
    }

    /// Loads the stored sessions: shard 0's is returned, and the others are known for their
    /// shards (empty slots made for them).
    async fn load_keys(&self) -> Result<Option<SessionKey>, BackendError> {
        let stored = self.store.load().await.map_err(|e| {
            BackendError::Rejected(format!(
                "loading the stored ZooKeeper sessions for {}: {e:#}",
                self.hosts()
            ))
        })?;
        let count = stored.as_ref().map_or(1, |s| 1 + s.shards.len());
        {
            let mut keys = self.keys.lock().await;
            keys.slots = match &stored {
                Some(s) => s.all().cloned().map(Some).collect(),
                None => vec![None],
            };
            keys.stored = stored.clone();
        }
        let mut slots = self.lock_slots();
        slots.truncate(count.max(1));
        while slots.len() < count {
            slots.push(Arc::new(tokio::sync::Mutex::new(Slot::Empty)));
        }
        Ok(stored.map(|s| s.first))
    }

    /// [`Inner::establish`] for the session watcher. (Boxed: it spawns the watcher.)
    fn establish_in_background(
        self: &Arc<Self>,
        shard: usize,
    ) -> futures::future::BoxFuture<'_, Result<Option<Arc<Conn>>, BackendError>> {
        Box::pin(self.establish(shard, true))
    }

    /// Stores the sessions when this one is not stored yet and every shard has one; a failure
    /// is logged and retried on the next call (without it, a restart cannot re-attach and
    /// re-creates the entries).
    async fn save(&self, conn: &Conn) {
        if !self.keeps_session() {
            return;
        }
        let mut keys = self.keys.lock().await;
        if keys.slots.len() <= conn.shard {
            keys.slots.resize(conn.shard + 1, None);
        }
        keys.slots[conn.shard] = Some(conn.session.clone());
        if keys.is_stored(conn.shard, &conn.session) {
            return;
        }
        let Some(all) = StoredSession::from_slots(&keys.slots) else {
            // A shard being opened: the last one stores them all.
            return;
        };
        match self.store.save(&all).await {
            Ok(()) => keys.stored = Some(all),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not store the ZooKeeper sessions; a restart will not re-attach to them")
            }
        }
    }

    /// Stores the sessions of every shard unless they are stored already (a save that failed
    /// when a session was opened is tried again here); whether they are stored now.
    pub(super) async fn store_all(&self) -> bool {
        if !self.keeps_session() {
            return true;
        }
        let mut keys = self.keys.lock().await;
        let Some(all) = StoredSession::from_slots(&keys.slots) else {
            return false;
        };
        if keys.stored.as_ref() == Some(&all) {
            return true;
        }
        match self.store.save(&all).await {
            Ok(()) => {
                keys.stored = Some(all);
                true
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not store the ZooKeeper sessions; nothing is written in them until they are");
                false
            }
        }
    }

    /// Whether the sessions of every shard are stored (a restart re-attaches to them).
    pub(super) async fn all_stored(&self) -> bool {
        let keys = self.keys.lock().await;
        keys.stored.as_ref().is_some_and(|st| {
            st.all().count() == keys.slots.len()
                && st
                    .all()
                    .zip(&keys.slots)
                    .all(|(a, b)| Some(a) == b.as_ref())
        })
    }

    /// The ids of the sessions the entries of this owner belong to: the live ones of every
    /// shard (not 0).
    pub(super) fn own_ids(&self) -> Vec<i64> {
        self.lock_cache()
            .sessions
            .iter()
            .copied()
            .filter(|&s| s != 0)
            .collect()
    }

    /// Opens a session, re-attaching to `attach` when given. A `detached` session is not
    /// closed when its client is dropped.
    pub(super) async fn connect(
        &self,
        attach: Option<&SessionKey>,
        detached: bool,
        shard: usize,
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
                    proxy.failures_note()
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
            session: SessionKey {
                id: hs.session_id,
                password: hs.password,
                timeout_ms: u64::try_from(hs.timeout_ms).unwrap_or(0),
            },
            client,
            proxy,
            shard,
        })
    }
}

/// Waits for the session of `shard` to end on the client (expired, or given up after being
/// disconnected for longer than its timeout), then re-establishes it in the background.
async fn watch_session(inner: Weak<Inner>, shard: usize, mut state: zk::StateWatcher) {
    loop {
        let s = state.changed().await;
        tracing::debug!(shard, state = %s, "ZooKeeper session state");
        if s.is_terminated() {
            break;
        }
    }
    let Some(mut backoff) = inner.upgrade().map(|i| i.backoff()) else {
        return;
    };
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match inner.establish_in_background(shard).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(shard, error = %e, "re-establishing the ZooKeeper session failed; retrying")
            }
        }
        drop(inner);
        backoff.wait().await;
    }
}

impl Inner {
    /// Lets every session go (not closed): the next use re-attaches to the stored ones.
    pub(super) async fn let_go(&self) {
        let slots: Vec<_> = self.lock_slots().clone();
        for s in slots {
            *s.lock().await = Slot::Empty;
        }
        for t in self.lock_tasks().drain(..) {
            t.abort();
        }
        self.lock_cache().entries.clear();
    }

    /// The live sessions now, without establishing any.
    pub(super) async fn live(&self) -> Vec<Arc<Conn>> {
        let slots: Vec<_> = self.lock_slots().clone();
        let mut out = Vec::new();
        for s in slots {
            if let Slot::Live(c) = &*s.lock().await {
                out.push(c.clone());
            }
        }
        out
    }
}
