//! Reads: what this owner holds, and lookups, with many requests in flight.
//!
//! Ownership is the session: the owned entries are the ephemeral nodes of the layout whose
//! `ephemeralOwner` is one of this backend's sessions (a read-only backend: the stored ones). What
//! a read learns — versions, Curator registration times, directories that exist — goes into the
//! [`Cache`](super::Cache) the writes start from.

use std::collections::{BTreeMap, HashMap, HashSet};

use zookeeper_client as zk;

use super::ZooKeeper;
use super::layout::{ancestors, curator_address, name_problem};
use super::session::Conn;
use super::shards::{Known, name_of, shard_of};
use crate::api::crd::ZooKeeperLayout;
use crate::backend::{BackendError, Record};

/// Requests sent before waiting for their answers, when reading many nodes.
const PIPELINE: usize = 512;

/// Runs `f` over `items` with up to [`PIPELINE`] requests in flight (each call sends its
/// request at once; the answers are awaited together).
pub(super) async fn pipelined<'a, T, F, Fut>(items: &'a [String], f: F) -> Vec<T>
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

impl ZooKeeper {
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

    /// [`Backend::read_owned`](crate::backend::Backend::read_owned).
    pub(super) async fn owned_records(&self) -> Result<BTreeMap<String, Record>, BackendError> {
        self.require_owner()?;
        // Every shard's session attached (a session nobody attaches to expires), shard 0 first.
        let conns = if self.inner.read_only {
            vec![self.inner.conn().await?]
        } else {
            self.inner.conns().await?
        };
        let conn = &conns[0];
        let client = &conn.client;
        let ours: HashSet<i64> = if self.inner.read_only {
            // The writer's sessions, recognised, not attached to.
            match self.inner.store.load().await {
                Ok(Some(s)) => s.all().map(|k| k.id).collect(),
                Ok(None) => return Ok(BTreeMap::new()),
                Err(e) => {
                    return Err(BackendError::Rejected(format!(
                        "loading the stored ZooKeeper sessions: {e:#}"
                    )));
                }
            }
        } else {
            conns.iter().map(|c| c.session.id).collect()
        };
        let root = &self.inner.root;
        let err = |what: &str, e: &zk::Error| self.inner.error(what, e, Some(&conn.proxy));
        let names = match client.list_children(root).await {
            Ok(n) => n,
            Err(zk::Error::NoNode) => {
                self.learn_ancestors(conn).await?;
                if !self.inner.read_only {
                    self.inner.lock_cache().entries.clear();
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
                Ok((data, stat)) if ours.contains(&stat.ephemeral_owner) => {
                    let (record, registered) = self.record_from_data(&data);
                    known.insert(
                        key.clone(),
                        Known {
                            version: stat.version,
                            registered,
                            owner: stat.ephemeral_owner,
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
        if !self.inner.read_only {
            // What the sessions of now own; an entry in another shard's session moves at the
            // next write (`rehome`).
            let sessions = cache.sessions.clone();
            let count = sessions.len();
            cache.entries.clear();
            let mut misplaced = false;
            for (key, k) in known {
                if sessions.contains(&k.owner) {
                    misplaced |= sessions.get(shard_of(name_of(&key), count)) != Some(&k.owner);
                    cache.entries.insert(key, k);
                }
            }
            cache.rehome |= misplaced;
        }
        Ok(out)
    }

    /// [`Backend::lookup`](crate::backend::Backend::lookup): every registrant's entries of
    /// `name`, sorted.
    pub(super) async fn look_up(&self, name: &str) -> Result<Vec<String>, BackendError> {
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
