//! Import (SPEC §5): a watch on the layout's prefix for one name.
//!
//! [`Backend::watch_service`](crate::backend::Backend::watch_service) reads the prefix `lookup`
//! reads for the name (`coredns`: the name's path, or with a bare name the zone, keeping keys
//! whose name segment is that label) and this owner's lease marker at one revision, then
//! watches both from the next revision on one watch stream, so nothing is lost between read and
//! watch; a cancelled (compacted) or broken watch is followed by a new read. An entry lives
//! while its key does (a key dies with its lease). Keys attached to the marker's lease (or a
//! lease this backend holds), and `naming` values whose metadata names this owner, are this
//! controller's exports and never imported. Values that do not parse are reported as skipped. A
//! failed read keeps the last instances and sets the error, retried after 200 ms doubling to
//! 10 s.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Etcd;
use super::client::{Fail, REQUEST_TIMEOUT};
use super::layout::{names_label, parse_coredns, parse_naming, parse_plain, prefix_end};
use super::lease::marker_lease;
use crate::api::crd::EtcdLayout;
use crate::backend::{BackendError, External, ImportSnapshot, publish_error, publish_read};
use crate::runtime::Backoff;

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
        if let Some(label) = &self.label
            && !names_label(kv.key(), &self.prefix, label)
        {
            return None;
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

/// Backoff of an import watch.
struct Retry {
    backoff: Backoff,
    failing: bool,
    /// The last established watch broke quickly: do not reset the backoff.
    quick: bool,
}

impl Etcd {
    /// Follows `name` until nobody listens on `tx`.
    pub(super) async fn follow(
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
        publish_read(tx, instances, skipped);
    }

    /// Reads, watches and re-reads forever.
    async fn follow_import(&self, target: &ImportTarget, tx: &watch::Sender<ImportSnapshot>) {
        let mut retry = Retry {
            backoff: Backoff::new(IMPORT_RETRY_FIRST, IMPORT_RETRY_MAX),
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
                    publish_error(tx, e);
                    retry.backoff.wait().await;
                }
                Ok((why, lived)) => {
                    debug!(catalog = %self.inner.catalog, prefix = %target.prefix, why, "etcd import watch broke; reading again");
                    retry.quick = lived < IMPORT_QUICK_BREAK;
                    if retry.quick {
                        retry.backoff.wait().await;
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
            .conn
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
                .conn
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
            .conn
            .call_at(&what, move |mut c| {
                let (prefix, opts) = (prefix.clone(), opts.clone());
                async move { c.watch(prefix, Some(opts)).await }
            })
            .await?;
        let endpoint = self.inner.conn.endpoints()[idx].clone();
        let mut want = 1;
        if let Some(marker) = &target.marker {
            let opts = WatchOptions::new().with_start_revision(revision + 1);
            stream
                .watch(marker.clone(), Some(opts))
                .await
                .map_err(|e| self.inner.conn.stream_error(idx, &what, &e))?;
            want += 1;
        }
        // Until etcd confirms the watches, events are kept but not yet published.
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut created = 0;
        while created < want {
            let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
                Ok(m) => m,
                Err(_) => {
                    self.inner.conn.forget(idx);
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
                Err(e) => return Err(self.inner.conn.stream_error(idx, &what, &e)),
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
            retry.backoff.reset();
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
                Err(e) => self.inner.conn.stream_error(idx, &what, &e).to_string(),
            };
            return Ok((why, started.elapsed()));
        }
    }
}
