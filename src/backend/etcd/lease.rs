//! The lease every key of this (owner id, catalog) pair is attached to, so that a dead
//! controller's entries disappear after its TTL ("TTL = failure detection latency").
//!
//! - One lease per (owner, catalog), TTL = `leaseTTLSeconds`, kept alive by a background task
//!   (at once, then every TTL/3, every second while failing) that the backend spawns on first
//!   use and stops when it is dropped. Every key is put with that lease.
//! - The lease id is kept in etcd, in a marker key outside every layout prefix,
//!   `/catalog-bridge.io/leases/<owner>/<catalog>` = the lease id in decimal, put with the same
//!   lease (it dies with it). On first use the backend reads the marker and, when that lease is
//!   still alive, reuses it: a restarted controller (or a new leader) owns the same keys, reads
//!   them back and writes nothing. Otherwise it grants a new lease and claims the marker with a
//!   compare-and-swap, so two replicas starting at once end up on one lease.
//! - A lost lease (it expired while etcd or the network was away, or was revoked; keep-alive
//!   answers TTL 0) is replaced by a new one, the marker moved to it, and
//!   `Backend::invalidations` moves: the writer re-reads (nothing is owned under the new lease)
//!   and puts every entry again. Keys of the dead lease are gone with it.
//! - TTL change: when the marker's lease was granted with another TTL than the configured one, a
//!   new lease is granted and the old one is kept alive while keys remain on it; those keys read
//!   as `"lease": "previous"`, the writer rewrites them onto the new lease (entries never
//!   vanish), and the old lease is then revoked. When etcd grants the new lease with the very
//!   TTL of the old one (its minimum TTL is above the configured one), the old lease is kept.
//! - Read only (`--dry-run`): never grants a lease, claims the marker or keeps a lease alive;
//!   owns what the marker's live lease holds, nothing without one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, KeyValue, LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp};
use tracing::{debug, info, warn};

use super::Inner;
use super::client::Fail;
use crate::backend::BackendError;

/// Where lease markers live: `<MARKER_PREFIX><owner>/<catalog>`, outside every layout prefix.
pub const MARKER_PREFIX: &str = "/catalog-bridge.io/leases/";
/// Retry interval of the keep-alive task while keep-alives fail.
const RETRY: Duration = Duration::from_secs(1);

/// A lease in use.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    pub(super) id: i64,
    /// Its granted TTL in seconds.
    ttl: i64,
}

/// The leases of this backend, behind one lock: establishing or replacing a lease happens once.
#[derive(Debug, Default)]
pub(super) struct LeaseState {
    pub(super) current: Option<Held>,
    /// An older lease of ours whose keys move to `current` (after a TTL change).
    pub(super) previous: Option<Held>,
    /// The current lease was lost and not yet replaced: replacing it moves the counter.
    lost: bool,
}

/// The lease id a marker key names: its value in decimal, else the lease it is attached to.
pub(super) fn marker_lease(kv: &KeyValue) -> Option<i64> {
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|id| *id != 0)
        .or(Some(kv.lease()))
        .filter(|id| *id != 0)
}

impl Inner {
    /// Ok while lease `id` exists; `LeaseGone` when it does not anymore. Its keys are not
    /// asked for: they come in one response, which outgrows what a client takes (4 MiB, about
    /// 80,000 keys); the owned keys are read by range, in pages ([`Inner::owned_keys`]).
    pub(super) async fn lease_alive(&self, id: i64) -> Result<(), Fail> {
        let resp = self
            .conn
            .call("lease time-to-live", move |mut c| async move {
                c.lease_time_to_live(id, None).await
            })
            .await?;
        if resp.ttl() <= 0 {
            return Err(Fail::LeaseGone(format!("lease {id:x} does not exist")));
        }
        Ok(())
    }

    /// Whether lease `id` holds no key at all, asked once none of this layout's keys is left on
    /// it (so the answer is short). An error, or keys of another layout, say no: it is then
    /// left to expire rather than revoked.
    pub(super) async fn lease_empty(&self, id: i64) -> bool {
        let resp = self
            .conn
            .call("lease time-to-live", move |mut c| async move {
                c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
                    .await
            })
            .await;
        resp.is_ok_and(|r| r.keys().is_empty())
    }

    /// After every owned entry was deleted (a catalog deleted, `cleanup`): revokes the lease
    /// when the only key left on it is its marker, which goes with it, and stops keeping it
    /// alive, so that nothing of this owner stays for a TTL. A lease that still holds another
    /// key (written meanwhile), or a previous lease being emptied, stays. Returns what was
    /// removed, for the user.
    pub(super) async fn retire_lease(&self) -> Result<Option<String>, BackendError> {
        if self.read_only {
            return Ok(None);
        }
        let mut st = self.lease.lock().await;
        let (Some(held), None) = (st.current, st.previous) else {
            return Ok(None);
        };
        let id = held.id;
        let keys = match self
            .conn
            .call("lease time-to-live", move |mut c| async move {
                c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
                    .await
            })
            .await
        {
            Ok(r) => r.keys().to_vec(),
            Err(Fail::LeaseGone(_)) => return Ok(None),
            Err(Fail::Backend(e)) => return Err(e),
        };
        if keys.iter().any(|k| k.as_slice() != self.marker.as_bytes()) {
            return Ok(None);
        }
        if let Some(keeper) = self.keeper.lock().unwrap_or_else(|e| e.into_inner()).take() {
            keeper.abort();
        }
        st.current = None;
        drop(st);
        self.revoke(id).await;
        info!(catalog = %self.catalog, lease = %format!("{id:x}"), "etcd lease revoked with its marker: no entry is left on it");
        Ok(Some(format!(
            "etcd lease {id:x} revoked with its marker {}",
            self.marker
        )))
    }

    async fn keep_alive_once(&self, id: i64) -> Result<(), Fail> {
        self.conn
            .call("lease keep-alive", move |mut c| async move {
                c.lease_keep_alive(id).await.map(|_| ())
            })
            .await
    }

    async fn revoke(&self, id: i64) {
        let r = self
            .conn
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

    /// Read only: whether the marker names a live lease (looked up once).
    pub(super) async fn has_lease(self: &Arc<Self>) -> Result<bool, BackendError> {
        let mut st = self.lease.lock().await;
        if st.current.is_none() {
            self.establish(&mut st).await?;
        }
        Ok(st.current.is_some())
    }

    /// The lease in use (and the previous one), established on first use.
    pub(super) async fn ensure_lease(
        self: &Arc<Self>,
    ) -> Result<(Held, Option<Held>), BackendError> {
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
                .conn
                .call("reading the lease marker", move |mut c| {
                    let marker = marker.clone();
                    async move { c.get(marker, None).await }
                })
                .await?;
            let (existing, mod_revision) = got
                .kvs()
                .first()
                .map_or((None, 0), |kv| (marker_lease(kv), kv.mod_revision()));
            let mut older = None;
            if self.read_only && existing.is_none() {
                return Ok(());
            }
            if let Some(id) = existing {
                let ttl = match self
                    .conn
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
                .conn
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
                .conn
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
    pub(super) async fn replace_lost(self: &Arc<Self>, id: i64) -> Result<(), BackendError> {
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

    pub(super) async fn drop_previous(&self, id: i64, revoke: bool) {
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

/// Keeps the leases alive while the backend exists. The first keep-alive goes out at once: a
/// lease taken over from a crashed leader has only what that one left it, possibly less than
/// the interval.
async fn keep_alive_loop(weak: Weak<Inner>) {
    let mut failing = false;
    let mut first = true;
    loop {
        let wait = match weak.upgrade() {
            Some(inner) => inner.keep_alive_interval(failing).await,
            None => return,
        };
        if !std::mem::take(&mut first) {
            tokio::time::sleep(wait).await;
        }
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
