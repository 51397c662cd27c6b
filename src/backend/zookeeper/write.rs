//! Writes: plan operations turned into `multi`s of ephemeral entries and the persistent
//! directories they need, and one by one when a `multi` is refused. What is still refused one
//! by one (an ACL on a path, someone else's node) is [`BackendError::Refused`] with its keys;
//! everything else is written.
//!
//! Nodes of other sessions and persistent nodes are never changed or deleted; updates and
//! deletes carry the version read.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use zookeeper_client as zk;

use super::ZooKeeper;
use super::batch::{Write, batches};
use super::layout::ancestors;
use super::read::pipelined;
use super::session::{Conn, is_connection_error};
use super::shards::{Known, name_of, shard_of};
use crate::backend::BackendError;
use crate::model::Op;

/// `multi`s one session keeps in flight.
const IN_FLIGHT: usize = 8;

/// What the writes through one session did: round trips, and the operations refused (key,
/// why).
#[derive(Default)]
struct Written {
    trips: usize,
    failures: Vec<(String, String)>,
}

/// `sent`'s answer, with what it was for.
async fn answer<T, F: std::future::Future>(about: T, sent: F) -> (T, F::Output) {
    (about, sent.await)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl ZooKeeper {
    /// [`Backend::apply`](crate::backend::Backend::apply): the writes in `multi`s, each in the
    /// session of its name's shard (more sessions first when one would pass its budget, and
    /// entries moved to them: `rehome`); the operations of a refused one, one by one. Returns
    /// the round trips.
    pub(super) async fn write_ops(&self, ops: &[Op]) -> Result<usize, BackendError> {
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
        let mut conns = self.inner.conns().await?;
        let writes: Vec<(&str, bool)> = (ops.iter())
            .map(|op| (op.key(), matches!(op, Op::Put { .. })))
            .collect();
        self.grow_for(&mut conns, &writes).await?;
        // An entry in a session the Secret does not hold would be lost to a restart (it could
        // not re-attach, and would find the entry someone else's).
        if conns.len() > 1 && !self.inner.store_all().await {
            return Err(BackendError::Rejected(format!(
                "the {} ZooKeeper sessions of this catalog could not be stored in the sessions \
                 Secret: nothing is written until they are",
                conns.len()
            )));
        }
        let mut trips = 0;
        self.rehome(&conns, &mut trips).await?;
        let mut by_shard: Vec<Vec<&Op>> = vec![Vec::new(); conns.len()];
        for op in ops {
            by_shard[shard_of(name_of(op.key()), conns.len())].push(op);
        }
        if conns.len() > 1 {
            trips += self.make_shared_dirs(&conns[0]).await?;
        }
        // The sessions write side by side: each name is in one shard only, and the
        // directories above the names are there.
        let written = futures::future::join_all(
            (conns.iter().zip(&by_shard))
                .filter(|(_, ops)| !ops.is_empty())
                .map(|(conn, ops)| self.write_in(conn, ops)),
        )
        .await;
        let mut failures = Vec::new();
        for w in written {
            let w = w?;
            trips += w.trips;
            failures.extend(w.failures);
        }
        if failures.is_empty() {
            Ok(trips)
        } else {
            // Every other operation is written; these are refused (an ACL on their path, a
            // node of someone else's there).
            Err(BackendError::Refused {
                message: format!(
                    "{} of {} operation(s) refused by ZooKeeper {}: {}",
                    failures.len(),
                    ops.len(),
                    self.inner.hosts(),
                    failures
                        .iter()
                        .map(|(_, why)| why.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                keys: failures.into_iter().map(|(k, _)| k).collect(),
            })
        }
    }

    /// Writes `ops` through the session of their shard: in `multi`s, [`IN_FLIGHT`] at a time,
    /// and the operations of a refused one one by one (what is still refused goes to
    /// `failures`).
    async fn write_in(&self, conn: &Conn, ops: &[&Op]) -> Result<Written, BackendError> {
        let mut done = Written::default();
        let writes = self.writes(conn, ops).await?;
        // The guard goes at the end of the statement, before a commit takes the lock again.
        let batches = batches(
            &writes,
            &self.inner.lock_cache().parents,
            self.inner.multi_bytes,
        );
        let mut waiting = batches.into_iter();
        let mut flight = futures::stream::FuturesOrdered::new();
        loop {
            while flight.len() < IN_FLIGHT {
                let Some(batch) = waiting.next() else { break };
                let part = &writes[batch.range.clone()];
                // Sent now, in this order: ZooKeeper applies one session's requests in the
                // order they were sent, so a later multi finds the parents an earlier one
                // created.
                let sent = self.send(conn, &batch.parents, part)?;
                done.trips += 1;
                flight.push_back(answer(batch, sent));
            }
            let Some((mut batch, result)) = flight.next().await else {
                break;
            };
            let part = &writes[batch.range.clone()];
            let refused = match result {
                Ok(results) => {
                    let versions: Vec<Option<i32>> = (results.iter())
                        .skip(batch.parents.len())
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
                    self.committed(conn, &batch.parents, part, &versions);
                    tracing::debug!(
                        parents = batch.parents.len(),
                        writes = part.len(),
                        "ZooKeeper multi committed"
                    );
                    None
                }
                Err(zk::MultiWriteError::OperationFailed { index, source }) => {
                    let parents = batch.parents.len();
                    if source == zk::Error::NoAuth {
                        // An ACL on one path (a parent's too): the others may be writable,
                        // one by one.
                        tracing::debug!(
                            index,
                            "ZooKeeper multi refused (NoAuth); writing its operations one by one"
                        );
                        Some(index.saturating_sub(parents))
                    } else if index < parents && source == zk::Error::NodeExists {
                        // Created meanwhile by someone else: fine, without it; sent again
                        // (nothing of a refused multi is written).
                        let p = batch.parents.remove(index);
                        self.inner.lock_cache().parents.insert(p);
                        let sent = self.send(conn, &batch.parents, part)?;
                        done.trips += 1;
                        flight.push_front(answer(batch, sent));
                        continue;
                    } else if index < parents {
                        let p = &batch.parents[index];
                        return Err(self.inner.error(&format!("creating {p}"), &source, None));
                    } else {
                        // Someone else's node: the others may be writable, one by one.
                        tracing::debug!(index, error = %source, "ZooKeeper multi refused; writing its operations one by one");
                        Some(index - parents)
                    }
                }
                Err(zk::MultiWriteError::RequestFailed { source }) => {
                    return Err(self
                        .inner
                        .error("ZooKeeper multi", &source, Some(&conn.proxy)));
                }
            };
            if let Some(index) = refused {
                tracing::info!(
                    path = part.get(index).map(Write::path).unwrap_or("?"),
                    writes = part.len(),
                    "a ZooKeeper multi was refused; writing its operations one by one"
                );
                for w in part {
                    if let Some(why) = self.write_one(conn, w, &mut done.trips).await? {
                        done.failures.push((w.key().to_string(), why));
                    }
                }
            }
        }
        Ok(done)
    }

    /// Turns plan operations into writes, with the versions of the owned nodes.
    async fn writes(&self, conn: &Conn, ops: &[&Op]) -> Result<Vec<Write>, BackendError> {
        let ours = self.inner.own_ids();
        let mut out = Vec::with_capacity(ops.len());
        let mut unknown_deletes = Vec::new();
        let now = now_ms();
        {
            let cache = self.inner.lock_cache();
            for &op in ops {
                self.check_key(op.key())?;
                let key = op.key().to_string();
                let path = self.path_of(&key);
                let known = cache.entries.get(&key).copied();
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
                    Ok(Some(stat)) if ours.contains(&stat.ephemeral_owner) => {
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

    /// Records the effect of writes committed by `conn`: what it creates is its own; an
    /// update keeps the node's owner.
    fn committed(
        &self,
        conn: &Conn,
        parents: &[String],
        writes: &[Write],
        versions: &[Option<i32>],
    ) {
        let me = conn.session.id;
        let mut cache = self.inner.lock_cache();
        cache.parents.extend(parents.iter().cloned());
        if cache.sessions.get(conn.shard) != Some(&me) {
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
                            owner: me,
                        },
                    );
                }
                Write::Set {
                    key,
                    registered,
                    version,
                    ..
                } => {
                    let owner = cache.entries.get(key).map_or(me, |k| k.owner);
                    cache.entries.insert(
                        key.clone(),
                        Known {
                            version: v.unwrap_or(version + 1),
                            registered: *registered,
                            owner,
                        },
                    );
                }
                Write::Delete { key, .. } => {
                    cache.entries.remove(key);
                }
            }
        }
    }

    /// The session that owns `key`, as known.
    fn owner_of(&self, key: &str) -> Option<i64> {
        self.inner.lock_cache().entries.get(key).map(|k| k.owner)
    }

    /// Records an owned node (of session `owner`) written outside a multi.
    fn remember(&self, owner: i64, key: &str, version: i32, registered: Option<u64>) {
        let mut cache = self.inner.lock_cache();
        if cache.sessions.contains(&owner) {
            cache.entries.insert(
                key.to_string(),
                Known {
                    version,
                    registered,
                    owner,
                },
            );
        }
    }

    /// Creates the directories above the names (the root and what leads to it) that are not
    /// known to exist, through `conn`: every shard's entries are below them, and sessions
    /// writing side by side would each try to create them. Returns the round trips.
    async fn make_shared_dirs(&self, conn: &Conn) -> Result<usize, BackendError> {
        let missing: Vec<String> = {
            let cache = self.inner.lock_cache();
            ancestors(&format!("{}/x", self.inner.root))
                .into_iter()
                .filter(|p| !cache.parents.contains(p))
                .collect()
        };
        let parent = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&self.inner.parent_acls));
        for p in &missing {
            match conn.client.create(p, &[], &parent).await {
                Ok(_) | Err(zk::Error::NodeExists) => {
                    self.inner.lock_cache().parents.insert(p.clone());
                }
                // Not ours to create: the writes below it are refused one by one, and say so.
                Err(zk::Error::NoAuth) => break,
                Err(e) => {
                    return Err(self
                        .inner
                        .error(&format!("creating {p}"), &e, Some(&conn.proxy)));
                }
            }
        }
        Ok(missing.len())
    }

    /// Sends `parents` (created first) and `writes` as one `multi`; the future of its answer.
    fn send<'c>(
        &self,
        conn: &'c Conn,
        parents: &[String],
        writes: &[Write],
    ) -> Result<
        impl std::future::Future<Output = Result<Vec<zk::MultiWriteResult>, zk::MultiWriteError>>
        + Send
        + 'c,
        BackendError,
    > {
        let entry = zk::CreateMode::Ephemeral.with_acls(zk::Acls::new(&self.inner.entry_acls));
        let parent = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&self.inner.parent_acls));
        let mut m = conn.client.new_multi_writer();
        let invalid =
            |e: zk::Error| BackendError::Protocol(format!("building a ZooKeeper multi: {e}"));
        for p in parents {
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
        Ok(m.commit())
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
        let ours = self.inner.own_ids();
        let entry = zk::CreateMode::Ephemeral.with_acls(zk::Acls::new(&self.inner.entry_acls));
        let parent = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&self.inner.parent_acls));
        let fail = |what: &str, e: &zk::Error| -> Result<Option<String>, BackendError> {
            if is_connection_error(e) {
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
                            // A create is this session's; an update keeps the owner.
                            let owner = match version {
                                Some(_) => self.owner_of(w.key()).unwrap_or(me),
                                None => me,
                            };
                            self.remember(owner, w.key(), v, *registered);
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
                                Ok((have, stat)) if ours.contains(&stat.ephemeral_owner) => {
                                    let (have_record, have_registered) =
                                        self.record_from_data(&have);
                                    if &have_record == record {
                                        self.remember(
                                            stat.ephemeral_owner,
                                            w.key(),
                                            stat.version,
                                            have_registered,
                                        );
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
                            self.committed(conn, &[], std::slice::from_ref(w), &[None]);
                            return Ok(None);
                        }
                        Err(zk::Error::BadVersion) => {
                            *trips += 1;
                            match client.check_stat(path).await {
                                Ok(Some(stat)) if ours.contains(&stat.ephemeral_owner) => {
                                    version = stat.version
                                }
                                Ok(_) => {
                                    tracing::debug!(path, "not deleting a node that is not ours");
                                    self.committed(conn, &[], std::slice::from_ref(w), &[None]);
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

fn describe_owner(ephemeral_owner: i64) -> String {
    if ephemeral_owner == 0 {
        "a persistent node".into()
    } else {
        format!("an ephemeral node of session {ephemeral_owner:#x}")
    }
}
