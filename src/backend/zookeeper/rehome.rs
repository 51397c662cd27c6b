//! More sessions when one would pass its budget of paths, and entries moved to the session of
//! their shard (`shards` says which).
//!
//! Before an apply writes, the bytes of paths each session would own after it are checked (the
//! owned entries keep running totals per session). When one would pass the budget, the number
//! of sessions doubles: the new sessions are opened and stored first (a restart or a new
//! leader re-attaches to them), then every entry whose name now belongs to another shard moves
//! there, before the apply's own writes.
//!
//! A move cannot create the new node before deleting the old one: they have the same path. So
//! the session of the new shard deletes the old node (at the version it read) and creates it
//! again, with the same data, as its own ephemeral node, in one `multi`: ZooKeeper applies both
//! or neither, and no reader ever finds the path missing. A watcher of that node sees it deleted
//! and created (its `czxid`, `mzxid` and `ephemeralOwner` change; its data does not; a Curator
//! entry keeps its `registrationTimeUTC`). ZooKeeper lets any session with DELETE on the
//! directory delete an ephemeral node, and every session of this controller has it (the same
//! identity with digest auth). A move that is interrupted (a crash, an error) leaves entries in
//! their old session: still owned, still alive, still handed over; the next apply moves them.

use std::collections::HashMap;
use std::sync::Arc;

use zookeeper_client as zk;

use super::ZooKeeper;
use super::batch::MAX_MULTI_OPS;
use super::read::pipelined;
use super::session::Conn;
use super::shards::{Known, MAX_SESSIONS, name_of, path_cost, sessions_needed, shard_of};
use crate::backend::BackendError;

/// An entry to move into the session of its shard.
struct Move {
    key: String,
    path: String,
    data: Vec<u8>,
    /// The version of the old node.
    version: i32,
    registered: Option<u64>,
}

impl ZooKeeper {
    /// Grows the number of sessions when `writes` (keys, and whether each is a put or a
    /// delete) would take one past its budget; `conns` (every shard's session) gets the new
    /// ones.
    pub(super) async fn grow_for(
        &self,
        conns: &mut Vec<Arc<Conn>>,
        writes: &[(&str, bool)],
    ) -> Result<(), BackendError> {
        let count = conns.len();
        let budget = self.inner.session_path_budget;
        let root = &self.inner.root;
        let needed = {
            let cache = self.inner.lock_cache();
            // The bytes each shard's session would own after `ops`, from the running totals.
            let mut bytes: Vec<usize> = conns
                .iter()
                .map(|c| cache.entries.bytes_of(c.session.id))
                .collect();
            for &(key, put) in writes {
                match (put, cache.entries.get(key)) {
                    (true, None) => {
                        bytes[shard_of(name_of(key), count)] += path_cost(root, key);
                    }
                    (false, Some(k)) => {
                        if let Some(j) = conns.iter().position(|c| c.session.id == k.owner) {
                            bytes[j] = bytes[j].saturating_sub(path_cost(root, key));
                        }
                    }
                    _ => {}
                }
            }
            if bytes.iter().all(|&b| b <= budget) || count >= MAX_SESSIONS {
                return Ok(());
            }
            // Per name (a pass over every entry: only when a session would pass its budget).
            let mut per_name: HashMap<&str, usize> = HashMap::new();
            for (key, _) in cache.entries.iter() {
                *per_name.entry(name_of(key)).or_default() += path_cost(root, key);
            }
            for &(key, put) in writes {
                let cost = path_cost(root, key);
                match (put, cache.entries.get(key)) {
                    (true, None) => *per_name.entry(name_of(key)).or_default() += cost,
                    (false, Some(_)) => {
                        if let Some(b) = per_name.get_mut(name_of(key)) {
                            *b = b.saturating_sub(cost);
                        }
                    }
                    _ => {}
                }
            }
            sessions_needed(&per_name, count, budget)
        };
        if needed <= count {
            // A name passes the budget alone: the warning says so.
            return Ok(());
        }
        tracing::info!(
            from = count,
            to = needed,
            budget,
            "a ZooKeeper session would pass its budget of paths: spreading the entries over more sessions"
        );
        self.inner.add_shards(needed).await;
        let new = futures::future::try_join_all((count..needed).map(|j| self.inner.shard_conn(j)))
            .await?;
        conns.extend(new);
        self.inner.lock_cache().rehome = true;
        Ok(())
    }

    /// Moves every entry that lives in the session of another shard than its name's into the
    /// session of its shard (see the module's documentation). Only when every session is
    /// stored: a restart must find the session an entry moved to.
    pub(super) async fn rehome(
        &self,
        conns: &[Arc<Conn>],
        trips: &mut usize,
    ) -> Result<(), BackendError> {
        let count = conns.len();
        let misplaced: Vec<(String, Known, usize)> = {
            let mut cache = self.inner.lock_cache();
            if !cache.rehome {
                return Ok(());
            }
            let out: Vec<_> = cache
                .entries
                .iter()
                .filter_map(|(key, k)| {
                    let j = shard_of(name_of(key), count);
                    (conns[j].session.id != k.owner).then(|| (key.clone(), *k, j))
                })
                .collect();
            if out.is_empty() {
                cache.rehome = false;
                return Ok(());
            }
            out
        };
        if !self.inner.all_stored().await {
            tracing::warn!(
                entries = misplaced.len(),
                "not moving ZooKeeper entries to their sessions until every session is stored"
            );
            return Ok(());
        }
        let (mut moved, mut left, mut gone) = (0, 0, false);
        for (j, conn) in conns.iter().enumerate() {
            let mine: Vec<&(String, Known, usize)> =
                misplaced.iter().filter(|m| m.2 == j).collect();
            if mine.is_empty() {
                continue;
            }
            let paths: Vec<String> = mine.iter().map(|m| self.path_of(&m.0)).collect();
            let nodes = pipelined(&paths, |p| conn.client.get_data(p)).await;
            let mut moves = Vec::new();
            for ((m, path), node) in mine.iter().zip(&paths).zip(nodes) {
                match node {
                    Ok((data, stat)) if stat.ephemeral_owner == m.1.owner => moves.push(Move {
                        key: m.0.clone(),
                        path: path.clone(),
                        data,
                        version: stat.version,
                        registered: m.1.registered,
                    }),
                    Ok(_) | Err(zk::Error::NoNode) => {
                        // Gone, or not ours any more: the writer re-reads.
                        self.inner.lock_cache().entries.remove(&m.0);
                        gone = true;
                    }
                    Err(e) => {
                        return Err(self.inner.error(
                            &format!("reading {path}"),
                            &e,
                            Some(&conn.proxy),
                        ));
                    }
                }
            }
            for part in cut(&moves, self.inner.multi_bytes) {
                *trips += 1;
                if self.commit_moves(conn, part).await? {
                    moved += part.len();
                    continue;
                }
                // Refused as a whole: each entry on its own.
                for m in part {
                    *trips += 1;
                    if self.commit_moves(conn, std::slice::from_ref(m)).await? {
                        moved += 1;
                    } else {
                        left += 1;
                    }
                }
            }
        }
        tracing::info!(
            moved,
            left,
            sessions = count,
            "ZooKeeper entries moved to the sessions of their names"
        );
        self.inner.lock_cache().rehome = left > 0;
        if gone {
            self.inner.invalidated.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Moves `moves` into the session of `conn` in one `multi`: true when committed, false
    /// when refused (a node changed or went meanwhile, an ACL).
    async fn commit_moves(&self, conn: &Conn, moves: &[Move]) -> Result<bool, BackendError> {
        let entry = zk::CreateMode::Ephemeral.with_acls(zk::Acls::new(&self.inner.entry_acls));
        let mut m = conn.client.new_multi_writer();
        let invalid =
            |e: zk::Error| BackendError::Protocol(format!("building a ZooKeeper multi: {e}"));
        for mv in moves {
            m.add_delete(&mv.path, Some(mv.version)).map_err(invalid)?;
            m.add_create(&mv.path, &mv.data, &entry).map_err(invalid)?;
        }
        match m.commit().await {
            Ok(results) => {
                let mut cache = self.inner.lock_cache();
                let current = cache.sessions.get(conn.shard) == Some(&conn.session.id);
                for (mv, r) in moves.iter().zip(results.chunks(2)) {
                    let version = match r.get(1) {
                        Some(zk::MultiWriteResult::Create { stat, .. }) if !stat.is_invalid() => {
                            stat.version
                        }
                        _ => 0,
                    };
                    if current {
                        cache.entries.insert(
                            mv.key.clone(),
                            Known {
                                version,
                                registered: mv.registered,
                                owner: conn.session.id,
                            },
                        );
                    }
                }
                Ok(true)
            }
            Err(zk::MultiWriteError::OperationFailed { index, source }) => {
                let path = moves.get(index / 2).map_or("?", |m| m.path.as_str());
                tracing::debug!(path, error = %source, "moving ZooKeeper entries refused");
                Ok(false)
            }
            Err(zk::MultiWriteError::RequestFailed { source }) => {
                Err(self
                    .inner
                    .error("moving entries (multi)", &source, Some(&conn.proxy)))
            }
        }
    }

    /// When a session owns more bytes of entry paths than its budget: what to do about it.
    /// ZooKeeper (3.6 and later, ZOOKEEPER-4306) writes the path of every ephemeral node of a
    /// session into the transaction that closes it, which must fit in `jute.maxbuffer`.
    pub(super) fn session_warning(&self) -> Option<String> {
        let cache = self.inner.lock_cache();
        let budget = self.inner.session_path_budget;
        let count = cache.sessions.len();
        let (shard, owner, bytes) = cache
            .sessions
            .iter()
            .enumerate()
            .map(|(j, &s)| (j, s, cache.entries.bytes_of(s)))
            .max_by_key(|&(_, _, b)| b)?;
        if bytes <= budget {
            return None;
        }
        // The largest name of that session (a pass over the entries: only when over budget).
        let mut per_name: HashMap<&str, usize> = HashMap::new();
        for (key, k) in cache.entries.iter() {
            if k.owner == owner {
                *per_name.entry(name_of(key)).or_default() += 1;
            }
        }
        let (name, instances) = per_name.into_iter().max_by_key(|&(_, n)| n)?;
        let why = if count >= MAX_SESSIONS {
            format!("this catalog already uses the most sessions ({MAX_SESSIONS})")
        } else {
            format!(
                "all {instances} entries of {name:?} share one session, which more sessions \
                 cannot split"
            )
        };
        Some(format!(
            "this controller's ZooKeeper session {} of {count} owns {} entries with {} KiB of \
             paths, past its budget of {} KiB: {why}. ZooKeeper (3.6 and later, \
             ZOOKEEPER-4306) puts them all in the transaction that closes the session, which \
             must fit in jute.maxbuffer: export fewer instances to this catalog, shorten \
             basePath, or raise jute.maxbuffer on the servers (and juteMaxBuffer here)",
            shard + 1,
            cache.entries.count_of(owner),
            bytes / 1024,
            budget / 1024,
        ))
    }
}

/// Cuts `moves` into `multi`s of at most [`MAX_MULTI_OPS`] operations (two per move) and about
/// `max_bytes`; a move larger alone still goes, alone.
fn cut(moves: &[Move], max_bytes: usize) -> Vec<&[Move]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, m) in moves.iter().enumerate() {
        let b = 2 * m.path.len() + m.data.len() + 128;
        if i > start && (2 * (i - start + 1) > MAX_MULTI_OPS || bytes + b > max_bytes) {
            out.push(&moves[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    if start < moves.len() {
        out.push(&moves[start..]);
    }
    out
}
