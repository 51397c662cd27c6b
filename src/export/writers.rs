//! The writers' supervisor: one writer per ExternalCatalog, started, rebuilt (a changed spec or
//! Secret), handed over (a catalog that moved: its successor removes the old entries first)
//! and drained (a deleted catalog). Every writer and drain is a supervised task: one that
//! panics is started again, counted and shown in the catalog's status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::desired::Desired;
use super::retire::{self, Retiring};
use super::snapshot::{Report, Snapshot};
use super::writer::{self, Writer};
use crate::api::crd::ExternalCatalog;
use crate::backend::{Backend, kind_of};
use crate::k8s::catalogs::Connect;
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
}

/// A deleted catalog's entries being removed.
struct Draining {
    retiring: Retiring,
    task: Supervised,
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
            secrets_checked: Instant::now(),
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
        for cat in catalogs {
            let Some(name) = cat.metadata.name.clone() else {
                continue;
            };
            seen.insert(name.clone());
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
            if let Some(r) = self.running.get(&name)
                && r.fingerprint == fingerprint
                && !rebuild
            {
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
                    let running = self.start(&name, built, Snapshot::new(wanted, since), previous);
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
            let Some((left, task)) = self.take_handover(&name) else {
                continue;
            };
            info!(catalog = %name, "ExternalCatalog deleted: removing its entries");
            self.metrics.forget_catalog(&name);
            let draining = self.drain(&name, left, task);
            self.draining.insert(name, draining);
        }
        self.draining.retain(|_, d| !d.task.is_finished());
        self.broken.retain(|n, _| seen.contains(n));
    }

    /// A supervised writer for catalog `name`, after what `previous` left to remove.
    fn start(
        &self,
        name: &str,
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
        }
    }

    /// A supervised drain of what a deleted catalog's writer left.
    fn drain(&self, name: &str, left: Vec<Arc<dyn Backend>>, task: JoinHandle<()>) -> Draining {
        let retiring: Retiring = Arc::new(Mutex::new(left));
        let stopped = Mutex::new(Some(task));
        let (catalog, list, gate, metrics, dry_run) = (
            name.to_string(),
            retiring.clone(),
            self.gate.clone(),
            self.metrics.clone(),
            self.settings.dry_run,
        );
        let task = Supervised::spawn(
            TaskKind::Drain,
            name.to_string(),
            self.metrics.clone(),
            move || {
                retire::drain(
                    catalog.clone(),
                    list.clone(),
                    stopped.lock().unwrap_or_else(|e| e.into_inner()).take(),
                    gate.clone(),
                    metrics.clone(),
                    dry_run,
                )
            },
        );
        Draining { retiring, task }
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
                },
            );
        }
        for (name, b) in &self.broken {
            out.insert(
                name.clone(),
                CatalogView {
                    kind: b.kind,
                    report: Report::default(),
                    problem: Some(b.problem.clone()),
                    task: TaskState::default(),
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
            exports: Vec::new(),
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
