//! One session, kept across restarts and leaders: where it is stored, how it is established,
//! re-attached, watched and released.
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
//! A session that expires (ZooKeeper unreachable for longer than the timeout) is replaced by a
//! new one in the background; [`Backend::invalidations`](crate::backend::Backend::invalidations)
//! then moves so the writer re-reads (now nothing) and re-creates every entry. A reconnect
//! within the session changes nothing, and neither does a ZooKeeper restart: ZooKeeper restores
//! its sessions with a fresh timeout, so the backend re-attaches even when the client had given
//! the session up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use zookeeper_client as zk;

use super::relay::Proxy;
use super::{Inner, ZooKeeper};
use crate::backend::BackendError;
use crate::runtime::backoff::Backoff;

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

/// One live session.
pub(super) struct Conn {
    pub(super) client: zk::Client,
    pub(super) proxy: Proxy,
    pub(super) session: StoredSession,
    /// The session is in the store.
    saved: AtomicBool,
}

/// The session of a backend.
pub(super) enum Slot {
    /// None yet, or released: the next call re-attaches to the stored session.
    Empty,
    Live(Arc<Conn>),
    /// Held, then lost on the client (expired, or given up while unreachable) and not
    /// re-established yet.
    Lost(StoredSession),
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

    /// The live session, established (or re-established) when there is none. (Boxed: the
    /// session watcher it spawns calls it again.)
    pub(super) fn conn(
        self: &Arc<Self>,
    ) -> futures::future::BoxFuture<'_, Result<Arc<Conn>, BackendError>> {
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
        // In use again: the session is no longer only kept alive for someone else.
        self.unpause();
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
    pub(super) async fn connect(
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
    let Some(mut backoff) = inner.upgrade().map(|i| i.backoff()) else {
        return;
    };
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
        drop(inner);
        backoff.wait().await;
    }
}

impl Inner {
    /// Ends a [`ZooKeeper::pause`]: the session is used again, or the backend is gone.
    pub(super) fn unpause(&self) {
        let paused = self.paused.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = paused {
            t.abort();
        }
    }

    async fn let_go(&self) {
        let mut slot = self.conn.lock().await;
        *slot = Slot::Empty;
        for t in self.lock_tasks().drain(..) {
            t.abort();
        }
        self.lock_cache().entries.clear();
    }
}

impl ZooKeeper {
    /// Stops using the session but keeps it alive, for a replica that stops writing while its
    /// leadership is in doubt (it cannot renew its Lease: the API server may be down for every
    /// replica, and the session's ephemeral nodes must outlive that) or lost. The connection
    /// stays until its first disconnection — the new leader re-attaching takes the session,
    /// and ZooKeeper closes this connection — and the session is then let go as by
    /// [`Self::release`], so the two never take it from each other. Using the backend again
    /// ends the pause.
    pub async fn pause(&self) {
        let slot = self.inner.conn.lock().await;
        let Slot::Live(conn) = &*slot else {
            return;
        };
        let mut state = conn.client.state_watcher();
        drop(slot);
        let inner = Arc::downgrade(&self.inner);
        let watch = tokio::spawn(async move {
            loop {
                let s = state.changed().await;
                if !matches!(
                    s,
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
                ) {
                    tracing::info!(state = %s, "ZooKeeper connection lost while not writing: letting the session go for the leader to re-attach to");
                    break;
                }
            }
            if let Some(inner) = inner.upgrade() {
                inner.let_go().await;
            }
        });
        let old = self
            .inner
            .paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(watch);
        if let Some(t) = old {
            t.abort();
        }
    }

    /// Lets the session go without closing it: for a replica that stops writing (it lost
    /// leadership) while another takes the session over. ZooKeeper moves a session to the
    /// connection that re-attached last and closes the others, so two live clients of one
    /// session would take it from each other endlessly; after `release` this one stays away
    /// until it is used again (and then re-attaches to the stored session).
    pub async fn release(&self) {
        self.inner.unpause();
        self.inner.let_go().await;
    }

    /// The id of the current session, establishing it if needed.
    pub async fn session_id(&self) -> Result<i64, BackendError> {
        Ok(self.inner.conn().await?.session.id)
    }

    /// When the session owns more bytes of entry paths than its budget: what to do about it.
    /// ZooKeeper (3.6 and later, ZOOKEEPER-4306) writes the path of every ephemeral node of a
    /// session into the transaction that closes it, which must fit in `jute.maxbuffer`.
    pub(super) fn session_warning(&self) -> Option<String> {
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
}
