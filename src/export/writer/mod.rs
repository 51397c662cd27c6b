//! The writer of one catalog: a task that keeps the catalog equal to the desired state while
//! this replica leads, writing only diffs (the safety rules are in docs/architecture.md, "Why
//! a writer never deletes what it should not").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::held::Held;
use super::plan::{Plan, plan_keys, plan_with};
use super::records::{DesiredEntry, DesiredRecords, Steps};
use super::retire::{self, Patience, RETIRE_PATIENCE, Retiring};
use super::snapshot::{Report, Snapshot};
use crate::backend::Backend;
use crate::model::{BackendError, DesiredCatalog, Digest, Op, Unit};
use crate::runtime::{Backoff, Metrics};

mod apply;
mod previous;

use apply::{Sending, Totals};
use previous::Previous;

#[derive(Clone, Debug)]
pub struct Config {
    pub catalog: String,
    pub dry_run: bool,
    pub drift_interval: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long to keep trying to remove the entries at a previous location.
    pub retire_patience: Duration,
}

impl Config {
    pub fn new(catalog: &str) -> Config {
        Config {
            catalog: catalog.to_string(),
            dry_run: false,
            drift_interval: Duration::from_secs(30),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            retire_patience: RETIRE_PATIENCE,
        }
    }
}

pub struct Writer {
    cfg: Config,
    backend: Arc<dyn Backend>,
    desired: watch::Receiver<Arc<Snapshot>>,
    gate: watch::Receiver<bool>,
    report: watch::Sender<Report>,
    metrics: Arc<Metrics>,
    /// The owned entries as last read or written, by digest (the records are rendered again
    /// when needed, never kept twice); `None` when unknown.
    current: Option<BTreeMap<String, Digest>>,
    /// With `--dry-run`: the plan last logged.
    last_dry_plan: Option<Plan>,
    /// The desired records, rendered incrementally.
    desired_records: DesiredRecords,
    /// `current` equals the desired records as of the previous sync, but for the keys held.
    trusted: bool,
    /// The exports whose writes the catalog refused, tried again on their own.
    held: Held,
    /// The backends this catalog was configured with before, whose entries go first where
    /// they live elsewhere ([`Writer::after`]).
    previous: Option<Previous>,
    /// Previous locations given up on, with why: reported as a warning (`NeedsAttention`)
    /// for as long as this writer runs.
    left_behind: Vec<String>,
}

/// A large addition is written in steps, the first of this many instances, each next one twice
/// the one before up to [`STEP_MAX`]: each step's records are rendered and planned while the
/// step before is being written.
const STEP: usize = 2_048;
const STEP_MAX: usize = 16_384;

/// Resolves when the backend reports lost entries; never, for backends that cannot lose them.
async fn lost(rx: &mut Option<watch::Receiver<u64>>) {
    if let Some(r) = rx
        && r.changed().await.is_ok()
    {
        return;
    }
    // No backend signal (or the backend is gone): never resolves.
    *rx = None;
    std::future::pending::<()>().await
}

/// Resolves at `t`; never, without one.
async fn at(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// The channel a writer reports on, starting idle.
pub fn report_channel() -> (watch::Sender<Report>, watch::Receiver<Report>) {
    watch::channel(Report {
        idle: true,
        ..Default::default()
    })
}

impl Writer {
    /// A writer that reports on a channel of its own.
    pub fn new(
        cfg: Config,
        backend: Arc<dyn Backend>,
        desired: watch::Receiver<Arc<Snapshot>>,
        gate: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> (Writer, watch::Receiver<Report>) {
        let (report, report_rx) = report_channel();
        (
            Writer::reporting_to(cfg, backend, desired, gate, report, metrics),
            report_rx,
        )
    }

    /// A writer that reports on `report`: the channel its predecessor reported on when it is
    /// started again after a failure.
    pub fn reporting_to(
        cfg: Config,
        backend: Arc<dyn Backend>,
        desired: watch::Receiver<Arc<Snapshot>>,
        gate: watch::Receiver<bool>,
        report: watch::Sender<Report>,
        metrics: Arc<Metrics>,
    ) -> Writer {
        metrics.catalog_started(&cfg.catalog);
        Writer {
            cfg,
            backend,
            desired,
            gate,
            report,
            metrics,
            current: None,
            last_dry_plan: None,
            desired_records: DesiredRecords::default(),
            trusted: false,
            held: Held::default(),
            previous: None,
            left_behind: Vec::new(),
        }
    }

    /// Takes over from the writer of the catalog's previous configuration: `stopped` (its task,
    /// told to stop) is awaited first, and once this replica leads, each backend in `retiring` that writes to another
    /// location than this one (another Consul node or datacenter, etcd prefix or layout,
    /// ZooKeeper path...) has the entries it owns there removed, before anything is written to
    /// the new one. The same session or lease may hold both, so one backend at a time uses it.
    pub fn after(mut self, retiring: Retiring, stopped: Option<JoinHandle<()>>) -> Writer {
        self.previous = Some(Previous {
            retiring,
            stopped,
            patience: Patience::new(self.cfg.retire_patience),
        });
        self
    }

    /// Runs until the desired or gate channel closes.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(self.cfg.min_backoff, self.cfg.max_backoff);
        let mut drift = tokio::time::interval(self.cfg.drift_interval);
        drift.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        drift.tick().await;
        let mut probed = false;
        let mut invalidations = self.backend.invalidations();
        let mut led = false;
        loop {
            // Leadership and synced caches first: before that, nothing is read or written.
            if !*self.gate.borrow_and_update() {
                if led {
                    // Was leading: keep liveness (a ZooKeeper session) for as long as nobody
                    // else takes it — this replica may lead again when the API server is back —
                    // and hand it over when the next leader does; the previous
                    // configurations' are handed over, their patience starts again.
                    self.backend.pause().await;
                    if let Some(p) = self.previous.as_mut() {
                        p.patience.give_up_at = None;
                        retire::release_all(&p.retiring).await;
                    }
                    led = false;
                }
                self.current = None;
                self.report.send_modify(|r| r.idle = true);
                if self.gate.changed().await.is_err() {
                    return Ok(());
                }
                continue;
            }
            led = true;
            self.report.send_modify(|r| r.idle = false);
            if self.previous.is_some() && !self.retire_previous().await {
                tokio::select! {
                    () = backoff.wait() => {}
                    r = self.gate.changed() => if r.is_err() { return Ok(()) },
                }
                continue;
            }
            if !probed {
                probed = self.probe().await;
            }
            let snapshot = self.desired.borrow_and_update().clone();
            snapshot.take();
            match self.sync(&snapshot).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    self.failed(&e);
                    tokio::select! {
                        () = backoff.wait() => {}
                        r = self.gate.changed() => if r.is_err() { return Ok(()) },
                    }
                    continue;
                }
            }
            let retry = self.held.next_try();
            tokio::select! {
                r = self.desired.changed() => if r.is_err() { return Ok(()) },
                r = self.gate.changed() => if r.is_err() { return Ok(()) },
                () = at(retry) => {}
                _ = lost(&mut invalidations) => {
                    warn!(catalog = %self.cfg.catalog, "the catalog lost this controller's entries (lease or session expired); writing them again");
                    self.current = None;
                }
                _ = drift.tick() => {
                    self.probe().await;
                    if let Err(e) = self.check_drift().await {
                        self.failed(&e);
                    }
                }
            }
        }
    }

    /// Brings the catalog to `snapshot`: reads the owned state if unknown, plans, writes. A
    /// large addition (a catalog's first fill) goes in steps ([`STEP`]), each
    /// step's records rendered and planned while the step before is being written.
    async fn sync(&mut self, snapshot: &Snapshot) -> Result<(), BackendError> {
        let mut current = match self.current.take() {
            Some(c) => c,
            None => {
                self.trusted = false;
                self.read().await?
            }
        };
        let started = Instant::now();
        let mut done = Totals::default();
        let mut steps = if self.cfg.dry_run {
            Steps::default()
        } else {
            self.desired_records
                .steps_to(&snapshot.catalog, STEP, STEP_MAX)
        };
        if !steps.added().is_empty() {
            // Sized for all of it at once (ZooKeeper's sessions), not step by step.
            self.backend.expect(steps.added()).await?;
        }
        // Each step but the last adds instances only: its plan is the keys it touched.
        let mut sending: Option<Sending> = None;
        while let Some(step) = steps.next_step() {
            let (p, waiting) = self.plan_step(&step, &current, false);
            if let Some(s) = sending.take() {
                self.landed(&mut current, s, &mut done).await?;
            }
            done.waiting += waiting;
            if !p.is_empty() {
                sending = Some(self.send(p, &mut done));
            }
        }
        if let Some(s) = sending.take() {
            self.landed(&mut current, s, &mut done).await?;
        }
        let (p, waiting) = self.plan_step(&snapshot.catalog, &current, true);
        done.waiting += waiting;
        let entries = self.desired_records.entries.len();
        if p.is_empty() && done.sent == 0 {
            self.current = Some(current);
            self.trusted = !self.cfg.dry_run;
            self.succeeded(entries, true);
            return Ok(());
        }
        if self.cfg.dry_run {
            // Log each distinct plan once; the catalog keeps its real state, so the plan stays
            // what a real run would do now.
            if self.last_dry_plan.as_ref() != Some(&p) {
                for op in &p.ops {
                    info!(catalog = %self.cfg.catalog, ?op, "dry run: would write");
                }
                info!(catalog = %self.cfg.catalog, plan = %p, "dry run: plan not applied");
                self.last_dry_plan = Some(p);
            }
            self.current = Some(current);
            self.succeeded(entries, false);
            return Ok(());
        }
        if !p.is_empty() {
            let s = self.send(p, &mut done);
            self.landed(&mut current, s, &mut done).await?;
        }
        if let Some(t) = snapshot.changed_at {
            self.metrics.propagation(&self.cfg.catalog, t.elapsed());
        }
        info!(catalog = %self.cfg.catalog, plan = %done.plan, steps = done.sent, written = done.written, refused = done.refused, held_back = done.waiting, requests = done.requests, round_trips = done.round_trips, took = ?started.elapsed(), "catalog updated");
        self.current = Some(current);
        self.trusted = true;
        self.succeeded(entries, true);
        Ok(())
    }

    /// Moves the desired records to `catalog` and plans what differs from `current`: the keys
    /// the move touched (a step on the way); for the `last` step, the snapshot itself, also
    /// the held keys that are due when trusted, else every key. Held-back exports are left
    /// out; returns how many of their operations were.
    fn plan_step(
        &mut self,
        catalog: &Arc<DesiredCatalog>,
        current: &BTreeMap<String, Digest>,
        last: bool,
    ) -> (Plan, usize) {
        let (touched, mut fresh) = self
            .desired_records
            .update(|i| self.backend.render(i), catalog);
        let now = Instant::now();
        if last {
            self.held.prune(&self.desired_records.entries, current);
        }
        let desired = &self.desired_records.entries;
        // The records to write: rendered by this update, else rendered again (only their
        // digests are kept).
        let record = |key: &str, _: &DesiredEntry| {
            (fresh.remove(key))
                .or_else(|| (self.desired_records).record(key, |i| self.backend.render(i)))
        };
        let p = if !last {
            plan_keys(desired, current, &touched, record)
        } else if self.trusted {
            // In sync before this snapshot: only what the snapshot touched can differ, and
            // what is held back.
            let mut keys: BTreeSet<String> = self.held.due_keys(now);
            keys.extend(touched.iter().cloned());
            plan_keys(desired, current, &keys, record)
        } else {
            plan_with(desired, current, record)
        };
        // Refused exports wait for their turn (or a change of their own).
        let (ops, waiting) = (self.held).hold_back(p.ops, &touched, now, |op| self.unit_of(op));
        (Plan { ops, ..p }, waiting)
    }

    /// The export an operation belongs to: its instance's, the last one's for a deletion, the
    /// one it was refused with, else the entry alone.
    fn unit_of(&self, op: &Op) -> Unit {
        self.desired_records
            .unit(op.key())
            .or_else(|| self.held.unit_of_key(op.key()).cloned())
            .unwrap_or_else(|| Unit::Entry {
                key: op.key().to_string(),
            })
    }

    async fn read(&mut self) -> Result<BTreeMap<String, Digest>, BackendError> {
        let r = self.backend.read_owned().await;
        self.metrics
            .reads(&self.cfg.catalog, if r.is_ok() { "ok" } else { "error" });
        let owned = r?;
        debug!(catalog = %self.cfg.catalog, entries = owned.len(), "read owned state");
        Ok((owned.into_iter())
            .map(|(k, r)| {
                let d = Digest::of(&r);
                (k, d)
            })
            .collect())
    }

    /// Re-reads the owned state and counts every entry that differs from what was written
    /// (removed, changed or added behind this controller's back); the next sync repairs them.
    async fn check_drift(&mut self) -> Result<(), BackendError> {
        let read = self.read().await?;
        if let Some(known) = &self.current {
            let drifted = drifted(known, &read);
            self.trusted &= drifted.is_empty();
            if !drifted.is_empty() {
                warn!(catalog = %self.cfg.catalog, entries = drifted.len(), first = ?drifted.iter().take(5).collect::<Vec<_>>(), "catalog drifted from what was written; repairing");
                self.metrics.drift(&self.cfg.catalog, drifted.len() as u64);
            }
        }
        if self.current.is_none() {
            self.trusted = false;
        }
        self.current = Some(read);
        let snapshot = self.desired.borrow().clone();
        self.sync(&snapshot).await
    }

    async fn probe(&mut self) -> bool {
        match self.backend.probe().await {
            Ok(info) => {
                self.report.send_modify(|r| {
                    r.server = Some(info);
                    r.reachable = Some(true);
                    r.last_contact = Some(SystemTime::now());
                });
                true
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    fn succeeded(&self, entries: usize, in_sync: bool) {
        self.metrics.up(&self.cfg.catalog, true);
        self.metrics
            .entries(&self.cfg.catalog, "export", entries as i64);
        self.report.send_if_modified(|r| {
            let new = Report {
                reachable: Some(true),
                error: None,
                in_sync,
                entries,
                last_contact: r.last_contact,
                server: r.server.clone(),
                idle: false,
                warning: self.warning(),
                refused: self.held.report(),
            };
            // lastContactTime moves on every contact, but is only published with another
            // change or once a minute, so status is not rewritten on every write.
            let stale = r
                .last_contact
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age > Duration::from_secs(60));
            if new.warning.is_some() && new.warning != r.warning {
                warn!(catalog = %self.cfg.catalog, warning = new.warning.as_deref().unwrap_or_default(), "catalog needs attention");
            }
            let changed = *r != new || stale;
            *r = Report {
                last_contact: if changed {
                    Some(SystemTime::now())
                } else {
                    r.last_contact
                },
                ..new
            };
            changed
        });
    }

    /// What needs attention: the backend's warning, and the previous locations given up on.
    fn warning(&self) -> Option<String> {
        let left = (!self.left_behind.is_empty()).then(|| {
            format!(
                "entries stayed behind at the catalog's previous place ({}); `catalog-bridge \
                 cleanup` on an ExternalCatalog with the previous spec removes them",
                self.left_behind.join("; ")
            )
        });
        match (self.backend.warning(), left) {
            (Some(w), Some(l)) => Some(format!("{w}; {l}")),
            (w, l) => w.or(l),
        }
    }

    fn failed(&self, e: &BackendError) {
        warn!(catalog = %self.cfg.catalog, error = %e, reason = %e.reason(), "catalog operation failed");
        let unreachable = matches!(e, BackendError::Unreachable(_));
        self.metrics.up(&self.cfg.catalog, !unreachable);
        self.report.send_if_modified(|r| {
            let changed = r.error.as_ref() != Some(e) || r.in_sync;
            r.reachable = Some(!unreachable);
            r.error = Some(e.clone());
            r.in_sync = false;
            changed
        });
    }
}

/// The keys whose entries differ between what was written (`known`) and what was read:
/// changed, removed or added behind this controller's back.
fn drifted<'a>(
    known: &'a BTreeMap<String, Digest>,
    read: &'a BTreeMap<String, Digest>,
) -> Vec<&'a str> {
    let changed = (known.iter())
        .filter(|(k, d)| read.get(*k) != Some(d))
        .map(|(k, _)| k.as_str());
    let added = (read.keys())
        .filter(|k| !known.contains_key(*k))
        .map(String::as_str);
    changed.chain(added).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::Memory;
    use crate::fixtures::instances;

    struct Harness {
        desired: watch::Sender<Arc<Snapshot>>,
        gate: watch::Sender<bool>,
        report: watch::Receiver<Report>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(backend: Arc<Memory>, drift: Duration) -> Harness {
        start_after(backend, drift, None)
    }

    /// A writer that replaces another one (a changed ExternalCatalog).
    fn start_after(
        backend: Arc<Memory>,
        drift: Duration,
        previous: Option<(Retiring, tokio::task::JoinHandle<()>)>,
    ) -> Harness {
        let mut cfg = Config::new("test");
        cfg.drift_interval = drift;
        cfg.min_backoff = Duration::from_millis(10);
        start_with(backend, cfg, previous)
    }

    fn start_with(
        backend: Arc<Memory>,
        cfg: Config,
        previous: Option<(Retiring, tokio::task::JoinHandle<()>)>,
    ) -> Harness {
        let (desired, desired_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (gate, gate_rx) = watch::channel(false);
        let (mut w, report) =
            Writer::new(cfg, backend, desired_rx, gate_rx, Arc::new(Metrics::new()));
        if let Some((retiring, stopped)) = previous {
            stopped.abort();
            w = w.after(retiring, Some(stopped));
        }
        Harness {
            desired,
            gate,
            report,
            task: tokio::spawn(async move {
                let _ = w.run().await;
            }),
        }
    }

    /// A writer on `mem` that has written `snapshot`.
    async fn in_sync(mem: Arc<Memory>, snapshot: Arc<Snapshot>) -> Harness {
        let entries = snapshot.catalog.len();
        let mut h = start(mem, Duration::from_secs(3600));
        h.desired.send(snapshot).expect("send");
        h.gate.send(true).expect("gate");
        until(&mut h.report, |r| r.in_sync && r.entries == entries).await;
        h
    }

    /// `old` goes down and the catalog moves to location `new`: the new backend, and the
    /// list with `old` to retire.
    fn moved_while_down(old: &Arc<Memory>) -> (Arc<Memory>, Retiring) {
        old.set_down(true);
        let new = Arc::new(Memory::new("me", 64).at("new"));
        let retiring: Retiring =
            Arc::new(std::sync::Mutex::new(vec![old.clone() as Arc<dyn Backend>]));
        (new, retiring)
    }

    async fn until(report: &mut watch::Receiver<Report>, f: impl Fn(&Report) -> bool) -> Report {
        tokio::time::timeout(Duration::from_secs(5), report.wait_for(|r| f(r)))
            .await
            .expect("report in time")
            .expect("writer alive")
            .clone()
    }

    #[tokio::test]
    async fn nothing_happens_before_the_gate_opens() {
        let mem = Arc::new(Memory::new("me", 64));
        mem.put_foreign("mine-stale", "me", serde_json::json!({}));
        let h = start(mem.clone(), Duration::from_secs(3600));
        h.desired
            .send(Arc::new(Snapshot::new(Arc::default(), None)))
            .expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(mem.writes(), 0, "no write while the gate is closed");
        assert_eq!(mem.all().len(), 1);
        h.task.abort();
    }

    #[tokio::test]
    async fn converges_in_batches_and_an_unchanged_restart_writes_nothing() {
        let mem = Arc::new(Memory::new("me", 64));
        mem.put_foreign("foreign", "someone-else", serde_json::json!({}));
        let mut h = start(mem.clone(), Duration::from_secs(3600));
        h.desired
            .send(Arc::new(Snapshot::new(
                instances(200),
                Some(Instant::now()),
            )))
            .expect("send");
        h.gate.send(true).expect("gate");
        until(&mut h.report, |r| r.in_sync && r.entries == 200).await;
        assert_eq!(mem.round_trips(), 4, "200 puts in batches of 64");
        assert_eq!(mem.all().len(), 201);
        h.task.abort();

        // A new writer (a restart, or another replica taking over) with the same desired state.
        let writes = mem.writes();
        let mut h2 = start(mem.clone(), Duration::from_secs(3600));
        h2.desired
            .send(Arc::new(Snapshot::new(instances(200), None)))
            .expect("send");
        h2.gate.send(true).expect("gate");
        until(&mut h2.report, |r| r.in_sync && r.entries == 200).await;
        assert_eq!(mem.writes(), writes, "an unchanged restart writes nothing");

        // Shrinking deletes exactly the difference and never the foreign entry.
        h2.desired
            .send(Arc::new(Snapshot::new(instances(150), None)))
            .expect("send");
        until(&mut h2.report, |r| r.in_sync && r.entries == 150).await;
        assert_eq!(mem.writes(), writes + 50);
        assert!(mem.all().contains_key("foreign"));
        h2.task.abort();
    }

    #[tokio::test]
    async fn a_large_first_fill_goes_in_steps_and_ends_as_one_sync_would() {
        // More than two steps' worth: written step by step, each planned by its own keys;
        // the owned entry no instance holds goes in the last step, the foreign one stays.
        let n = 3 * STEP + 100;
        let mem = Arc::new(Memory::new("me", 64));
        mem.put_foreign("foreign", "someone-else", serde_json::json!({}));
        mem.put_foreign("mine-stale", "me", serde_json::json!({}));
        let mut h = start(mem.clone(), Duration::from_secs(3600));
        h.desired
            .send(Arc::new(Snapshot::new(instances(n), Some(Instant::now()))))
            .expect("send");
        h.gate.send(true).expect("gate");
        until(&mut h.report, |r| r.in_sync && r.entries == n).await;
        let all = mem.all();
        assert_eq!(all.len(), n + 1, "every instance and the foreign entry");
        assert!(all.contains_key("foreign") && !all.contains_key("mine-stale"));
        assert_eq!(
            mem.writes(),
            n + 1,
            "each entry written once, the stale one deleted"
        );
        h.task.abort();

        // A restart with the same instances: steps again, nothing written.
        let writes = mem.writes();
        let mut h2 = start(mem.clone(), Duration::from_secs(3600));
        h2.desired
            .send(Arc::new(Snapshot::new(instances(n), None)))
            .expect("send");
        h2.gate.send(true).expect("gate");
        until(&mut h2.report, |r| r.in_sync && r.entries == n).await;
        assert_eq!(mem.writes(), writes, "an unchanged restart writes nothing");
        h2.task.abort();
    }

    #[tokio::test]
    async fn a_moved_catalog_removes_its_entries_at_the_old_location_first() {
        let old = Arc::new(Memory::new("me", 64).at("old"));
        old.put_foreign("foreign", "someone-else", serde_json::json!({}));
        let snapshot = || Arc::new(Snapshot::new(instances(3), None));
        let h = in_sync(old.clone(), snapshot()).await;

        // Moved while the old location is down: nothing is written to the new one before the
        // old one is emptied.
        let (new, retiring) = moved_while_down(&old);
        let mut h2 = start_after(
            new.clone(),
            Duration::from_secs(3600),
            Some((retiring.clone(), h.task)),
        );
        h2.desired.send(snapshot()).expect("send");
        h2.gate.send(true).expect("gate");
        until(&mut h2.report, |r| r.reachable == Some(false)).await;
        assert!(
            new.all().is_empty(),
            "nothing written before the old location is emptied"
        );
        old.set_down(false);
        until(&mut h2.report, |r| r.in_sync && r.entries == 3).await;
        assert_eq!(new.all().len(), 3);
        assert_eq!(
            old.all().into_keys().collect::<Vec<_>>(),
            ["foreign"],
            "only this owner's entries left the old location"
        );
        assert!(retiring.lock().expect("lock").is_empty());

        // A change that moves nothing (same location) removes nothing and writes nothing.
        let writes = new.writes();
        let again: Retiring =
            Arc::new(std::sync::Mutex::new(vec![new.clone() as Arc<dyn Backend>]));
        let mut h3 = start_after(
            new.clone(),
            Duration::from_secs(3600),
            Some((again, h2.task)),
        );
        h3.desired.send(snapshot()).expect("send");
        h3.gate.send(true).expect("gate");
        until(&mut h3.report, |r| r.in_sync && r.entries == 3).await;
        assert_eq!(new.writes(), writes);
        h3.task.abort();
    }

    #[test]
    fn a_replaced_snapshot_passes_its_older_change_on_until_the_writer_took_it() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(5);
        let first = Snapshot::new(instances(1), Some(t0));
        let second = first.replacing(instances(2), t1);
        assert_eq!(
            second.changed_at,
            Some(t0),
            "not taken: the oldest change counts"
        );
        second.take();
        let third = second.replacing(instances(3), t1);
        assert_eq!(
            third.changed_at,
            Some(t1),
            "taken: a new change counts from itself"
        );
        let none = Snapshot::new(instances(1), None).replacing(instances(2), t1);
        assert_eq!(none.changed_at, Some(t1));
    }

    #[tokio::test]
    async fn a_previous_location_given_up_on_is_reported_until_the_writer_ends() {
        let old = Arc::new(Memory::new("me", 64).at("old"));
        let snapshot = || Arc::new(Snapshot::new(instances(2), None));
        let h = in_sync(old.clone(), snapshot()).await;

        // Moved away from servers that are gone for good.
        let (new, retiring) = moved_while_down(&old);
        let mut cfg = Config::new("test");
        cfg.drift_interval = Duration::from_secs(3600);
        cfg.min_backoff = Duration::from_millis(10);
        cfg.max_backoff = Duration::from_millis(50);
        cfg.retire_patience = Duration::from_millis(300);
        let mut h2 = start_with(new.clone(), cfg, Some((retiring.clone(), h.task)));
        h2.desired.send(snapshot()).expect("send");
        h2.gate.send(true).expect("gate");
        let r = until(&mut h2.report, |r| r.in_sync && r.entries == 2).await;
        assert_eq!(new.all().len(), 2, "written at the new place");
        assert_eq!(old.all().len(), 2, "the old place kept its entries");
        assert!(retiring.lock().expect("lock").is_empty());
        let warning = r.warning.expect("a warning");
        assert!(
            warning.contains("stayed behind") && warning.contains("old"),
            "{warning}"
        );

        // Still said after later writes.
        h2.desired
            .send(Arc::new(Snapshot::new(instances(3), None)))
            .expect("send");
        let r = until(&mut h2.report, |r| r.in_sync && r.entries == 3).await;
        assert!(r.warning.is_some_and(|w| w.contains("stayed behind")));
        h2.task.abort();
    }

    /// `n` instances of Service `service`, published as `service`.
    fn of(service: &str, n: usize, net: u8) -> Vec<crate::model::Instance> {
        (0..n)
            .map(|i| crate::model::Instance {
                name: service.into(),
                address: format!("10.{net}.0.{}", i + 1).parse().expect("an address"),
                port: 8080,
                origin: crate::model::Origin {
                    namespace: "shop".into(),
                    service: service.into(),
                }
                .into(),
                tags: vec![].into(),
                meta: Default::default(),
            })
            .collect()
    }

    fn snapshot(parts: &[&[crate::model::Instance]]) -> Arc<Snapshot> {
        Arc::new(Snapshot::new(
            Arc::new(parts.concat().into_iter().collect()),
            None,
        ))
    }

    #[tokio::test]
    async fn a_refused_export_is_held_back_and_everything_else_is_written() {
        let mem = Arc::new(Memory::new("me", 64));
        let (a, b) = (of("api-x", 3, 1), of("ledger", 2, 2));
        let mut h = in_sync(mem.clone(), snapshot(&[&a, &b])).await;
        mem.refuse_prefix("denied-", false);
        let denied = of("denied", 2, 3);
        // One export refused, and in the same change an endpoint leaves and a Service goes.
        h.desired.send(snapshot(&[&a[..2], &denied])).expect("send");
        let r = until(&mut h.report, |r| r.in_sync && !r.refused.is_empty()).await;
        assert_eq!(r.refused.len(), 1, "{:?}", r.refused);
        assert_eq!(r.refused[0].operations, 2);
        assert!(
            r.refused[0]
                .unit
                .to_string()
                .starts_with("shop/denied as denied")
        );
        assert!(
            r.error.is_none(),
            "not an error of the catalog: {:?}",
            r.error
        );
        let keys: Vec<String> = mem.all().into_keys().collect();
        assert_eq!(
            keys.len(),
            2,
            "api-x's two, nothing of ledger nor denied: {keys:?}"
        );
        assert!(keys.iter().all(|k| k.starts_with("api-x-")), "{keys:?}");

        // The catalog takes it now: it is tried again on its own and lands.
        mem.refuse_prefix("", false);
        let r = until(&mut h.report, |r| r.in_sync && r.refused.is_empty()).await;
        assert_eq!(r.entries, 4);
        assert_eq!(mem.all().len(), 4);
        h.task.abort();
    }

    #[tokio::test]
    async fn an_outage_is_reported_and_repaired_on_return() {
        let mem = Arc::new(Memory::new("me", 64));
        mem.set_down(true);
        let mut h = start(mem.clone(), Duration::from_millis(50));
        h.desired
            .send(Arc::new(Snapshot::new(instances(3), None)))
            .expect("send");
        h.gate.send(true).expect("gate");
        let r = until(&mut h.report, |r| r.reachable == Some(false)).await;
        assert!(
            r.error
                .expect("error")
                .to_string()
                .contains("connection refused")
        );
        mem.set_down(false);
        until(&mut h.report, |r| r.in_sync && r.entries == 3).await;

        // The catalog forgets everything (a dev agent restart): the drift check repairs it.
        mem.wipe();
        tokio::time::timeout(Duration::from_secs(5), async {
            while mem.all().len() != 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("repaired after wipe");
        h.task.abort();
    }
}
