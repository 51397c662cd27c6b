//! Import: following the entries other registrants keep of one name, with ZooKeeper's child
//! and data watches, through a session of the watches' own.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use zookeeper_client as zk;

use super::layout::{parse_curator, parse_provider, plain_owner_is};
use super::read::pipelined;
use super::session::{Conn, ConnectError};
use super::{Inner, ZooKeeper};
use crate::api::crd::ZooKeeperLayout;
use crate::backend::{BackendError, External, ImportSnapshot, publish_error, publish_read};

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
    /// The sessions in the [`SessionStore`] when it was loaded last.
    stored: HashSet<i64>,
    loaded: Option<std::time::Instant>,
    /// Sessions found not to be ours at the last load.
    foreign: HashSet<i64>,
}

impl OwnSessions {
    /// Whether a node with this `ephemeralOwner` is this controller's: one of the backend's
    /// current sessions, or of the sessions in the store (the leader's, when this replica does
    /// not lead).
    /// The store is loaded again when a session not seen before shows up (at most once per
    /// session and [`STORE_RECHECK`]), so a new leader's session is recognized before its
    /// first entry could be imported.
    async fn is_own(&mut self, inner: &Inner, ephemeral_owner: i64) -> bool {
        if ephemeral_owner == 0 || !inner.has_owner() {
            return false;
        }
        if inner.lock_cache().sessions.contains(&ephemeral_owner)
            || self.stored.contains(&ephemeral_owner)
        {
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
                self.stored = s.iter().flat_map(|s| s.all()).map(|k| k.id).collect();
                self.loaded = Some(std::time::Instant::now());
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "loading the stored ZooKeeper session for an import watch failed");
                return false;
            }
        }
        if self.stored.contains(&ephemeral_owner) {
            return true;
        }
        self.foreign.insert(ephemeral_owner);
        false
    }
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
        let conn = match self.inner.connect(None, false, 0).await {
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

    /// [`Backend::watch_service`](crate::backend::Backend::watch_service): child watches on
    /// the layout's directory (an exists watch until it is created) and data watches on each
    /// entry, through a read-only session of the watches' own (see [`ZooKeeper::watch_conn`]).
    /// A fired watch leads to reading only what it names, with the watches armed again by the
    /// read itself, so nothing is lost in between; a reconnect or a failure, to a full re-read.
    /// Returns when `tx` has no receivers left.
    ///
    /// # No loops
    ///
    /// An entry is this controller's, and left out, when
    /// - (plain) its data is JSON whose `owner` is this backend's owner id (what
    ///   [`ZooKeeper::entry`] writes), or
    /// - (both layouts; Curator instances carry no owner marker) its `ephemeralOwner` is this
    ///   backend's current export session, or the session in the
    ///   [`SessionStore`](super::SessionStore) — the one every replica of this controller
    ///   writes through (see [`OwnSessions::is_own`]).
    ///
    /// A backend without owner id leaves nothing out.
    pub(super) async fn follow(&self, name: &str, tx: &watch::Sender<ImportSnapshot>) {
        let mut own = OwnSessions::default();
        let mut backoff = self.inner.backoff();
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
                        conn.proxy.failures_note()
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
                        _ = backoff.wait() => {}
                        _ = tx.closed() => return,
                    }
                    continue;
                }
            };
            backoff.reset();
            let publish_read = |read: &ImportRead| {
                let (instances, skipped) = read.parts();
                publish_read(tx, instances, skipped);
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
                                conn.proxy.failures_note()
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
