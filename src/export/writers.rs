//! The writers' supervisor: one writer per ExternalCatalog, started, rebuilt (a changed spec or
//! Secret), handed over (a catalog that moved: its successor removes the old entries first)
//! and drained (a deleted catalog). Every writer and drain is a supervised task: one that
//! panics is started again, counted and shown in the catalog's status. While leading, it puts
//! the finalizer on every ExternalCatalog, so that a deleted one waits for its drain — also one
//! deleted while no writer of this process ran (the controller was stopped).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::desired::Desired;
use super::retire::{self, Drain, Removal, Retiring};
use super::snapshot::{Report, Snapshot};
use super::writer::{self, Writer};
use crate::api::crd::ExternalCatalog;
use crate::api::labels::holds_finalizer;
use crate::backend::{Backend, kind_of};
use crate::k8s::catalogs::Connect;
use crate::k8s::finalizers::{Finalizers, changed_meanwhile};
use crate::k8s::secrets::Credentials;
use crate::model::Problem;
use crate::runtime::Metrics;
use crate::runtime::supervisor::{Supervised, TaskKind, TaskState};

/// A catalog as its status shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogView {
    pub kind: &'static str,
    pub report: Report,
    /// Set when the backend could not even be built.
    pub problem: Option<Problem>,
    /// The writer's task: restarts, and whether it is down right now.
    pub task: TaskState,
    /// Set while a deleted catalog's entries are being removed.
    pub removal: Option<Removal>,
}

/// What every writer is started with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub dry_run: bool,
    pub drift_interval: Duration,
}

/// A running writer and what it was built from.
struct Running {
    fingerprint: String,
    credentials: Credentials,
    kind: &'static str,
    desired: watch::Sender<Arc<Snapshot>>,
    report: watch::Receiver<Report>,
    backend: Arc<dyn Backend>,
    /// Backends of earlier configurations whose entries the writer has yet to remove.
    retiring: Retiring,
    /// `None` once handed to the writer that replaces this one.
    task: Option<Supervised>,
    /// The ExternalCatalog as last seen (for its drain, once deleted).
    object: Arc<ExternalCatalog>,
}

/// A deleted catalog's entries being removed.
struct Draining {
    kind: &'static str,
    /// The uid of the object it drains, if it was seen.
    uid: Option<String>,
    retiring: Retiring,
    task: Supervised,
    /// The object as the watch shows it now, for the drain.
    object: watch::Sender<Option<Arc<ExternalCatalog>>>,
    progress: watch::Receiver<Removal>,
}

/// A deleted catalog no writer served whose backend cannot be built (a Secret deleted with it).
struct Unbuildable {
    kind: &'static str,
    problem: Problem,
    retry_at: Instant,
}

/// What a writer leaves to the next one: backends whose entries are to be removed, oldest
/// first, and its task, stopping.
type Handover = (Vec<Arc<dyn Backend>>, JoinHandle<()>);

impl Running {
    /// Stops being this catalog's writer: the backends whose entries are still to be removed
    /// (this one last) and the task, stopping, for what comes next.
    fn hand_over(mut self) -> Option<Handover> {
        let mut retiring = retire::take_all(&self.retiring);
        retiring.push(self.backend.clone());
        // Stopped now, so that it writes nothing more while its successor is being built.
        let task = self.task.take()?.stop();
        Some((retiring, task))
    }
}

/// A catalog's backend, and what it was built from.
struct Built {
    fingerprint: String,
    credentials: Credentials,
    kind: &'static str,
    backend: Arc<dyn Backend>,
}

/// A catalog whose backend could not be built (missing Secret, unsupported kind).
struct Broken {
    fingerprint: String,
    kind: &'static str,
    problem: Problem,
    retry_at: Instant,
    /// What the writer before it left to remove, for the next writer or the drain.
    handover: Option<Handover>,
}

/// Starts and stops writers as ExternalCatalogs come and go, and hands them desired state.
pub struct Writers {
    connect: Arc<dyn Connect>,
    settings: Settings,
    gate: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    running: HashMap<String, Running>,
    broken: HashMap<String, Broken>,
    /// Writers of deleted ExternalCatalogs, removing their entries ([`retire::drain`]).
    draining: HashMap<String, Draining>,
    /// Deleted catalogs whose drain ended, by name: the uid drained (the object may still be
    /// listed for a moment, or held by another finalizer).
    drained: HashMap<String, Option<String>>,
    /// Deleted catalogs whose backend cannot be built.
    unbuildable: HashMap<String, Unbuildable>,
    /// Puts and lifts the finalizer; `None` in a dry run.
    finalizers: Option<Arc<dyn Finalizers>>,
    /// Finalizers put that the watch does not show yet: at which resource version, and when.
    holding: HashMap<String, (Option<String>, Instant)>,
    /// When referenced Secrets were last re-read.
    secrets_checked: Instant,
}

/// How often the Secrets of running catalogs are re-read.
const SECRET_RECHECK: Duration = Duration::from_secs(10);
/// How long a catalog that could not be built waits before it is tried again (a change of its
/// ExternalCatalog tries at once).
const BROKEN_RETRY: Duration = Duration::from_secs(10);

impl Writers {
    /// Writers write while `gate` is open (this replica leads and every cache has synced).
    pub fn new(
        connect: Arc<dyn Connect>,
        settings: Settings,
        gate: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Writers {
        Writers {
            connect,
            settings,
            gate,
            metrics,
            running: HashMap::new(),
            broken: HashMap::new(),
            draining: HashMap::new(),
            drained: HashMap::new(),
            unbuildable: HashMap::new(),
            finalizers: None,
            holding: HashMap::new(),
            secrets_checked: Instant::now(),
        }
    }

    /// Holds every ExternalCatalog with the finalizer while leading, and lifts it once a deleted
    /// one is drained (never in a dry run: it writes nothing to Kubernetes).
    pub fn finalizing(mut self, finalizers: Arc<dyn Finalizers>) -> Writers {
        self.finalizers = Some(finalizers);
        self
    }

    /// Puts the finalizer on `cat` if it lacks it and this replica leads.
    async fn hold(&mut self, name: &str, cat: &ExternalCatalog) {
        let Some(finalizers) = self.finalizers.clone() else {
            return;
        };
        if holds_finalizer(cat.metadata.finalizers.as_ref()) {
            self.holding.remove(name);
            return;
        }
        if !*self.gate.borrow() {
            return;
        }
        let version = cat.metadata.resource_version.clone();
        if let Some((tried, at)) = self.holding.get(name)
            && *tried == version
            && at.elapsed() < BROKEN_RETRY
        {
            return; // put already, the watch has not shown it yet
        }
        self.holding
            .insert(name.to_string(), (version, Instant::now()));
        match finalizers.add(cat).await {
            Ok(()) => {
                info!(catalog = %name, "finalizer added: a deletion waits until its entries are removed")
            }
            Err(e) if changed_meanwhile(&e) => {
                debug!(catalog = %name, "changed while the finalizer was added; trying again");
                self.holding.remove(name);
            }
            Err(e) => {
                warn!(catalog = %name, error = %format!("{e:#}"), "adding the finalizer failed; trying again")
            }
        }
    }

    /// Brings the writers in line with `catalogs` and hands each its part of `desired`; `since`
    /// is when the oldest change folded into it was seen.
    pub async fn sync(
        &mut self,
        catalogs: &[Arc<ExternalCatalog>],
        desired: &Desired,
        since: Option<Instant>,
    ) {
        let recheck_secrets = self.secrets_checked.elapsed() >= SECRET_RECHECK;
        if recheck_secrets {
            self.secrets_checked = Instant::now();
        }
        let mut seen = HashSet::new();
        let mut deleting: HashMap<String, Arc<ExternalCatalog>> = HashMap::new();
        for cat in catalogs {
            let Some(name) = cat.metadata.name.clone() else {
                continue;
            };
            if cat.metadata.deletion_timestamp.is_some() {
                deleting.insert(name, cat.clone());
                continue;
            }
            seen.insert(name.clone());
            self.hold(&name, cat).await;
            let fingerprint = serde_json::to_string(&cat.spec).unwrap_or_default();
            let wanted = desired.catalogs.get(&name).cloned().unwrap_or_default();
            let mut rebuild = false;
            if recheck_secrets
                && let Some(r) = self.running.get(&name)
                && r.fingerprint == fingerprint
            {
                let now = self.connect.credentials(cat).await.ok();
                if now.is_some_and(|c| c != r.credentials) {
                    info!(catalog = %name, "a referenced Secret changed; rebuilding the catalog writer");
                    rebuild = true;
                }
            }
            if let Some(r) = self.running.get_mut(&name)
                && r.fingerprint == fingerprint
                && !rebuild
            {
                r.object = cat.clone();
                r.desired.send_if_modified(|snap| {
                    if snap.catalog == wanted {
                        return false;
                    }
                    *snap = Arc::new(
                        snap.replacing(wanted.clone(), since.unwrap_or_else(Instant::now)),
                    );
                    true
                });
                continue;
            }
            if let Some(b) = self.broken.get(&name)
                && b.fingerprint == fingerprint
                && Instant::now() < b.retry_at
            {
                continue;
            }
            // A changed spec may move the catalog elsewhere: the new writer removes what the
            // old one wrote there first (a changed Secret alone moves nothing).
            // So does a catalog deleted and created again while its entries were being removed.
            // A catalog that could not be built kept what its writer before left.
            let previous = self.take_handover(&name);
            let kind = kind_of(&cat.spec);
            let credentials = self.connect.credentials(cat).await;
            let built = credentials
                .clone()
                .and_then(|c| self.connect.build(cat, c, self.settings.dry_run));
            match built {
                Ok(backend) => {
                    info!(catalog = %name, backend = %backend.describe(), "catalog writer starting");
                    self.broken.remove(&name);
                    let built = Built {
                        fingerprint,
                        credentials: credentials.unwrap_or_default(),
                        kind,
                        backend,
                    };
                    let first = Snapshot::new(wanted, since);
                    let running = self.start(&name, cat, built, first, previous);
                    self.running.insert(name, running);
                }
                Err(problem) => {
                    warn!(catalog = %name, reason = %problem.reason, error = %problem.message, "catalog cannot be used");
                    self.broken.insert(
                        name,
                        Broken {
                            fingerprint,
                            kind,
                            problem,
                            retry_at: Instant::now() + BROKEN_RETRY,
                            handover: previous,
                        },
                    );
                }
            }
        }
        // A deleted catalog: its entries go (SPEC §6.5, as for a deleted Service).
        let deleted: Vec<String> = (self.running.keys())
            .chain(self.broken.keys())
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        for name in deleted {
            let last = self.running.get(&name).map(|r| {
                let entries = r.report.borrow().entries;
                (r.object.clone(), r.kind, entries)
            });
            let kind = last
                .as_ref()
                .map(|l| l.1)
                .or(self.broken.get(&name).map(|b| b.kind));
            let Some((left, task)) = self.take_handover(&name) else {
                continue;
            };
            info!(catalog = %name, "ExternalCatalog deleted: removing its entries");
            self.metrics.forget_catalog(&name);
            let object = deleting.get(&name).cloned();
            let last_seen = object.clone().or(last.as_ref().map(|l| l.0.clone()));
            let kind = kind.unwrap_or("unknown");
            let entries = last.map(|l| l.2);
            let draining = self.drain(&name, kind, left, Some(task), (object, last_seen), entries);
            self.draining.insert(name, draining);
        }
        self.drain_deleted(&deleting).await;
        for (name, d) in &self.draining {
            let now = deleting.get(name).cloned();
            let version = now.as_ref().map(|o| o.metadata.resource_version.clone());
            d.object.send_if_modified(|o| {
                let changed = o.as_ref().map(|o| o.metadata.resource_version.clone()) != version;
                *o = now;
                changed
            });
        }
        let ended: Vec<String> = (self.draining.iter())
            .filter(|(_, d)| d.task.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for name in ended {
            if let Some(d) = self.draining.remove(&name) {
                self.drained.insert(name, d.uid);
            }
        }
        self.drained.retain(|n, _| deleting.contains_key(n));
        self.unbuildable.retain(|n, _| deleting.contains_key(n));
        self.holding.retain(|n, _| seen.contains(n));
        self.broken.retain(|n, _| seen.contains(n));
    }

    /// Drains the deleted catalogs that no writer of this process served (deleted while the
    /// controller was stopped, or before their backend could be built): their backend is
    /// built now, and what it owns removed.
    async fn drain_deleted(&mut self, deleting: &HashMap<String, Arc<ExternalCatalog>>) {
        for (name, cat) in deleting {
            if self.draining.contains_key(name)
                || self.drained.get(name) == Some(&cat.metadata.uid)
                || self
                    .unbuildable
                    .get(name)
                    .is_some_and(|u| Instant::now() < u.retry_at)
            {
                continue;
            }
            let kind = kind_of(&cat.spec);
            let built = match self.connect.credentials(cat).await {
                Ok(c) => self.connect.build(cat, c, self.settings.dry_run),
                Err(p) => Err(p),
            };
            match built {
                Ok(backend) => {
                    info!(catalog = %name, backend = %backend.describe(), "ExternalCatalog deleted: removing its entries");
                    self.unbuildable.remove(name);
                    let object = (Some(cat.clone()), Some(cat.clone()));
                    let d = self.drain(name, kind, vec![backend], None, object, None);
                    self.draining.insert(name.clone(), d);
                }
                Err(problem) => {
                    warn!(catalog = %name, reason = %problem.reason, error = %problem.message, "the entries of a deleted catalog cannot be removed");
                    let retry_at = Instant::now() + BROKEN_RETRY;
                    let u = Unbuildable {
                        kind,
                        problem,
                        retry_at,
                    };
                    self.unbuildable.insert(name.clone(), u);
                }
            }
        }
    }

    /// A supervised writer for catalog `name`, after what `previous` left to remove.
    fn start(
        &self,
        name: &str,
        object: &Arc<ExternalCatalog>,
        built: Built,
        first: Snapshot,
        previous: Option<Handover>,
    ) -> Running {
        let Built {
            fingerprint,
            credentials,
            kind,
            backend,
        } = built;
        let (desired, desired_rx) = watch::channel(Arc::new(first));
        let (report_tx, report) = writer::report_channel();
        let mut cfg = writer::Config::new(name);
        cfg.dry_run = self.settings.dry_run;
        cfg.drift_interval = self.settings.drift_interval;
        let retiring = Retiring::default();
        // The previous writer's task, stopped before the first writer reads anything; a writer
        // started again goes on with what is left in `retiring`.
        let stopped = previous.map(|(old, task)| {
            retiring
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(old);
            task
        });
        let stopped = Mutex::new(stopped);
        let task = {
            let (backend, gate, metrics) =
                (backend.clone(), self.gate.clone(), self.metrics.clone());
            let retiring = retiring.clone();
            Supervised::spawn(
                TaskKind::Writer,
                name.to_string(),
                self.metrics.clone(),
                move || {
                    let w = Writer::reporting_to(
                        cfg.clone(),
                        backend.clone(),
                        desired_rx.clone(),
                        gate.clone(),
                        report_tx.clone(),
                        metrics.clone(),
                    )
                    .after(
                        retiring.clone(),
                        stopped.lock().unwrap_or_else(|e| e.into_inner()).take(),
                    );
                    w.run()
                },
            )
        };
        Running {
            fingerprint,
            credentials,
            kind,
            desired,
            report,
            backend,
            retiring,
            task: Some(task),
            object: object.clone(),
        }
    }

    /// A supervised drain of what a deleted catalog's writer left (`left`, and its task,
    /// stopping). `object`: the ExternalCatalog as the watch shows it now (`None`: gone), and as
    /// last seen; `entries`: how many its writer last counted.
    fn drain(
        &self,
        name: &str,
        kind: &'static str,
        left: Vec<Arc<dyn Backend>>,
        task: Option<JoinHandle<()>>,
        object: (Option<Arc<ExternalCatalog>>, Option<Arc<ExternalCatalog>>),
        entries: Option<usize>,
    ) -> Draining {
        let (now, last_seen) = object;
        let at = left.first().map(|b| b.describe()).unwrap_or_default();
        let (progress_tx, progress) = watch::channel(Removal {
            entries: entries.filter(|_| left.len() == 1),
            at,
            error: None,
        });
        let uid = now
            .as_ref()
            .or(last_seen.as_ref())
            .and_then(|o| o.metadata.uid.clone());
        let (object, object_rx) = watch::channel(now);
        let retiring: Retiring = Arc::new(Mutex::new(left));
        let stopped = Mutex::new(task);
        let d = Drain {
            catalog: name.to_string(),
            retiring: retiring.clone(),
            gate: self.gate.clone(),
            metrics: self.metrics.clone(),
            dry_run: self.settings.dry_run,
            object: object_rx,
            last_seen,
            finalizers: self.finalizers.clone(),
            progress: Arc::new(progress_tx),
        };
        let task = Supervised::spawn(
            TaskKind::Drain,
            name.to_string(),
            self.metrics.clone(),
            move || {
                let stopped = stopped.lock().unwrap_or_else(|e| e.into_inner()).take();
                retire::drain(d.clone(), stopped)
            },
        );
        Draining {
            kind,
            uid,
            retiring,
            task,
            object,
            progress,
        }
    }

    /// What catalog `name`'s writer leaves to the next one, whichever state it is in:
    /// running, draining (a deleted catalog), or broken (keeping what the writer before left).
    fn take_handover(&mut self, name: &str) -> Option<Handover> {
        if let Some(r) = self.running.remove(name) {
            return r.hand_over();
        }
        if let Some(d) = self.draining.remove(name) {
            let left = retire::take_all(&d.retiring);
            return Some((left, d.task.stop()));
        }
        self.broken.remove(name).and_then(|b| b.handover)
    }

    /// Every catalog as its status shows it.
    pub fn views(&self) -> BTreeMap<String, CatalogView> {
        let mut out = BTreeMap::new();
        for (name, r) in &self.running {
            out.insert(
                name.clone(),
                CatalogView {
                    kind: r.kind,
                    report: r.report.borrow().clone(),
                    problem: None,
                    task: r.task.as_ref().map(Supervised::state).unwrap_or_default(),
                    removal: None,
                },
            );
        }
        for (name, d) in &self.draining {
            let removal = d.progress.borrow().clone();
            let report = Report {
                reachable: removal.error.as_ref().map(|_| false),
                error: removal.error.clone(),
                entries: removal.entries.unwrap_or(0),
                ..Default::default()
            };
            let view = CatalogView {
                kind: d.kind,
                report,
                problem: None,
                task: d.task.state(),
                removal: Some(removal),
            };
            out.insert(name.clone(), view);
        }
        for (name, u) in &self.unbuildable {
            let view = CatalogView {
                kind: u.kind,
                report: Report::default(),
                problem: Some(u.problem.clone()),
                task: TaskState::default(),
                removal: Some(Removal::default()),
            };
            out.insert(name.clone(), view);
        }
        for (name, b) in &self.broken {
            out.insert(
                name.clone(),
                CatalogView {
                    kind: b.kind,
                    report: Report::default(),
                    problem: Some(b.problem.clone()),
                    task: TaskState::default(),
                    removal: None,
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::Memory;
    use crate::fixtures::{MemoryCatalogs, catalog, eventually, instances};
    use crate::model::Reason;

    fn desired(name: &str, n: usize) -> Desired {
        Desired {
            catalogs: BTreeMap::from([(name.to_string(), instances(n))]),
            ..Default::default()
        }
    }

    /// Writers for the catalogs `connect` knows, behind an open gate.
    fn writers(
        connect: Arc<MemoryCatalogs>,
        metrics: Arc<Metrics>,
    ) -> (Writers, watch::Sender<bool>) {
        let (gate_tx, gate) = watch::channel(true);
        let settings = Settings {
            dry_run: false,
            drift_interval: Duration::from_secs(3600),
        };
        (Writers::new(connect, settings, gate, metrics), gate_tx)
    }

    #[tokio::test]
    async fn a_writer_that_panics_is_started_again_counted_and_shown() {
        let mem = Arc::new(Memory::new("me", 64));
        let connect = Arc::new(MemoryCatalogs::default());
        connect.insert("c", mem.clone());
        let metrics = Arc::new(Metrics::new());
        let (mut w, _gate) = writers(connect, metrics.clone());
        let cats = [catalog("c")];
        w.sync(&cats, &desired("c", 3), None).await;
        eventually("3 entries written", || mem.all().len() == 3).await;

        // A bug in the writer: its next write panics. The supervisor starts it again, and the
        // new writer reads what the catalog holds and writes the change.
        mem.panic_on_next_apply();
        w.sync(&cats, &desired("c", 4), Some(Instant::now())).await;
        eventually("the restarted writer wrote the 4th entry", || {
            mem.all().len() == 4
        })
        .await;
        let view = &w.views()["c"];
        assert_eq!(view.task.restarts, 1, "{view:?}");
        assert!(
            view.task
                .last_failure
                .as_deref()
                .is_some_and(|f| f.contains("injected")),
            "{view:?}"
        );
        eventually("in sync again", || w.views()["c"].report.in_sync).await;
        assert_eq!(metrics.task_restarts("writer"), 1);
    }

    #[tokio::test]
    async fn a_deleted_catalog_is_drained_and_a_moved_one_leaves_nothing_behind() {
        let old = Arc::new(Memory::new("me", 64).at("old"));
        old.put_foreign("foreign", "someone-else", serde_json::json!({}));
        let connect = Arc::new(MemoryCatalogs::default());
        connect.insert("c", old.clone());
        let (mut w, _gate) = writers(connect.clone(), Arc::new(Metrics::new()));
        w.sync(&[catalog("c")], &desired("c", 2), None).await;
        eventually("written", || old.all().len() == 3).await;

        // Moved: a changed spec, and the catalog answers at another place now.
        let new = Arc::new(Memory::new("me", 64).at("new"));
        connect.insert("c", new.clone());
        let mut moved = (*catalog("c")).clone();
        if let Some(c) = moved.spec.consul.as_mut() {
            c.addresses = vec!["http://127.0.0.2:8500".into()];
        }
        w.sync(&[Arc::new(moved)], &desired("c", 2), None).await;
        eventually("written at the new place, removed at the old", || {
            new.all().len() == 2 && old.all().len() == 1
        })
        .await;
        assert!(old.all().contains_key("foreign"), "never another owner's");

        // Deleted: drained by a supervised task, which ends once done.
        w.sync(&[], &Desired::default(), None).await;
        eventually("drained", || new.all().is_empty()).await;
        eventually("the drain ended", || {
            w.draining.values().all(|d| d.task.is_finished())
        })
        .await;
    }

    /// Finalizers kept in memory: who holds what, and the Events announced.
    #[derive(Default)]
    struct Held {
        held: Mutex<HashSet<String>>,
        events: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Finalizers for Held {
        async fn add(&self, c: &ExternalCatalog) -> anyhow::Result<()> {
            let name = c.metadata.name.clone().unwrap_or_default();
            self.held.lock().expect("lock").insert(name);
            Ok(())
        }
        async fn remove(&self, c: &ExternalCatalog) -> anyhow::Result<()> {
            let name = c.metadata.name.clone().unwrap_or_default();
            self.held.lock().expect("lock").remove(&name);
            Ok(())
        }
        async fn announce(&self, _: &ExternalCatalog, reason: Reason, note: &str) {
            self.events
                .lock()
                .expect("lock")
                .push(format!("{reason}: {note}"));
        }
    }

    impl Held {
        fn holds(&self, name: &str) -> bool {
            self.held.lock().expect("lock").contains(name)
        }
    }

    /// `name` as the watch shows it: holding the finalizer, deleted, maybe abandoned.
    fn deleted(name: &str, abandoned: bool) -> Arc<ExternalCatalog> {
        let mut c = (*catalog(name)).clone();
        c.metadata.finalizers = Some(vec![crate::api::labels::FINALIZER.to_string()]);
        c.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        if abandoned {
            c.metadata.annotations = Some(BTreeMap::from([(
                crate::api::labels::ANNOTATION_ABANDON.to_string(),
                "true".to_string(),
            )]));
        }
        Arc::new(c)
    }

    #[tokio::test]
    async fn a_deleted_catalog_is_held_until_emptied_or_abandoned() {
        let a = Arc::new(Memory::new("me", 64).at("a"));
        let b = Arc::new(Memory::new("me", 64).at("b"));
        let connect = Arc::new(MemoryCatalogs::default());
        connect.insert("a", a.clone());
        connect.insert("b", b.clone());
        let held = Arc::new(Held::default());
        let (w, _gate) = writers(connect, Arc::new(Metrics::new()));
        let mut w = w.finalizing(held.clone());
        let both = Desired {
            catalogs: BTreeMap::from([("a".into(), instances(2)), ("b".into(), instances(2))]),
            ..Default::default()
        };
        w.sync(&[catalog("a"), catalog("b")], &both, None).await;
        assert!(held.holds("a") && held.holds("b"), "held while leading");
        eventually("written", || a.all().len() == 2 && b.all().len() == 2).await;

        // Deleted while the catalogs do not answer: held, and the status says what is left.
        a.set_down(true);
        b.set_down(true);
        let gone = [deleted("a", false), deleted("b", false)];
        w.sync(&gone, &Desired::default(), None).await;
        eventually("the removal failing", || {
            w.views()["a"]
                .removal
                .as_ref()
                .is_some_and(|r| r.error.is_some())
        })
        .await;
        let removal = w.views()["a"].removal.clone().expect("a removal");
        assert_eq!(removal.entries, Some(2), "{removal:?}");
        assert!(held.holds("a"));

        // b is abandoned: let go, its entries stay, an Event says so.
        let gone = [deleted("a", false), deleted("b", true)];
        w.sync(&gone, &Desired::default(), None).await;
        eventually("b let go", || !held.holds("b")).await;
        assert_eq!(b.all().len(), 2, "abandoned entries stay");
        let events = held.events.lock().expect("lock").clone();
        assert!(
            events.len() == 1
                && events[0].starts_with("Abandoned")
                && events[0].contains("2 entries"),
            "{events:?}"
        );

        // a's catalog answers again: emptied, then let go.
        a.set_down(false);
        eventually("a emptied and let go", || {
            a.all().is_empty() && !held.holds("a")
        })
        .await;
    }

    #[tokio::test]
    async fn a_catalog_deleted_while_no_writer_ran_is_drained() {
        let mem = Arc::new(Memory::new("me", 64));
        let connect = Arc::new(MemoryCatalogs::default());
        connect.insert("c", mem.clone());
        // What an earlier process wrote.
        let (mut first, _gate) = writers(connect.clone(), Arc::new(Metrics::new()));
        first.sync(&[catalog("c")], &desired("c", 3), None).await;
        eventually("written", || mem.all().len() == 3).await;
        drop(first);

        let held = Arc::new(Held::default());
        held.held.lock().expect("lock").insert("c".into());
        let (w, _gate) = writers(connect, Arc::new(Metrics::new()));
        let mut w = w.finalizing(held.clone());
        w.sync(&[deleted("c", false)], &Desired::default(), None)
            .await;
        eventually("emptied and let go", || {
            mem.all().is_empty() && !held.holds("c")
        })
        .await;
        // Listed a while longer: not drained again.
        eventually("the drain ended", || {
            w.draining.values().all(|d| d.task.is_finished())
        })
        .await;
        w.sync(&[deleted("c", false)], &Desired::default(), None)
            .await;
        w.sync(&[deleted("c", false)], &Desired::default(), None)
            .await;
        assert!(w.draining.is_empty(), "drained once");
    }

    #[tokio::test]
    async fn a_catalog_that_cannot_be_built_shows_why() {
        let connect = Arc::new(MemoryCatalogs::default());
        let (mut w, _gate) = writers(connect, Arc::new(Metrics::new()));
        w.sync(&[catalog("nowhere")], &desired("nowhere", 1), None)
            .await;
        let view = &w.views()["nowhere"];
        let problem = view.problem.as_ref().expect("a problem");
        assert_eq!(problem.reason, Reason::InvalidConfig);
    }
}
