//! `catalog-bridge run`: the watches, the desired-state loop, one writer per catalog, status
//! and Events, leader election, and the HTTP endpoints — each a supervised task.
//!
//! ```text
//! watch (reflectors) ─▶ desired::compute (pure) ─▶ watch channel per catalog ─▶ writer
//!                                               └▶ status + Events (leader only)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::crd::{ExternalCatalog, ExternalRegistration};
use crate::desired::{self, Desired, Inputs, Problem};
use crate::import;
use crate::importer::{ImportView, Importers, Touched, Watched};
use crate::metrics::Metrics;
use crate::status::CatalogView;
use crate::writer::{self, Report, Snapshot, Writer};

/// Options of `catalog-bridge run`.
#[derive(Clone, Debug)]
pub struct Options {
    /// The owner id written into every entry (the cluster id).
    pub owner: String,
    pub dry_run: bool,
    pub drift_interval: Duration,
    /// Namespace and name of the leader Lease.
    pub lease_namespace: String,
    pub lease_name: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    pub lease_duration: Duration,
    /// The Secret (in `lease_namespace`) that keeps ZooKeeper sessions between processes.
    pub session_secret: String,
    pub metrics_addr: std::net::SocketAddr,
}

/// Kubernetes changes seen but not yet folded into desired state.
#[derive(Default)]
struct Changes {
    notify: Notify,
    since: Mutex<Option<Instant>>,
}

impl Changes {
    fn mark(&self) {
        let mut s = self.since.lock().unwrap_or_else(|e| e.into_inner());
        s.get_or_insert_with(Instant::now);
        drop(s);
        self.notify.notify_one();
    }

    fn take(&self) -> Option<Instant> {
        self.since.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A reflector (a watch feeding a store) whose every event marks `changes`. With `touched`,
/// changes to objects an import maintains are also sent there.
fn reflect<K>(
    api: Api<K>,
    changes: Arc<Changes>,
    touched: Option<(import::Kind, broadcast::Sender<Touched>)>,
) -> (Store<K>, JoinHandle<Result<()>>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    if let Some((kind, tx)) = &touched {
                        let t = match &ev {
                            watcher::Event::Apply(o) => Touched::of(*kind, o, false),
                            watcher::Event::Delete(o) => Touched::of(*kind, o, true),
                            watcher::Event::InitDone => Some(Touched::Relisted),
                            watcher::Event::Init | watcher::Event::InitApply(_) => None,
                        };
                        if let Some(t) = t {
                            let _ = tx.send(t); // no import running: nobody to tell
                        }
                    }
                    changes.mark()
                }
                Err(e) => warn!(%kind, error = %e, "watch failed; retrying"),
            }
        }
        bail!("the {kind} watch ended")
    });
    (reader, task)
}

/// The stores every part reads from.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub catalogs: Store<ExternalCatalog>,
    pub registrations: Store<ExternalRegistration>,
}

impl Stores {
    async fn wait_synced(&self) -> Result<()> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.catalogs.wait_until_ready().await?;
        self.registrations.wait_until_ready().await?;
        Ok(())
    }
}

/// A running writer and what it was built from.
struct Running {
    fingerprint: String,
    credentials: crate::catalogs::Credentials,
    kind: &'static str,
    desired: watch::Sender<Arc<Snapshot>>,
    report: watch::Receiver<Report>,
    backend: Arc<dyn crate::backend::Backend>,
    /// Backends of earlier configurations whose entries the writer has yet to remove.
    retiring: writer::Retiring,
    /// `None` once handed to the writer that replaces this one.
    task: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// A deleted catalog's entries being removed.
struct Draining {
    retiring: writer::Retiring,
    task: JoinHandle<()>,
}

/// What a writer leaves to the next one: backends whose entries are to be removed, oldest
/// first, and its task, to be stopped.
type Handover = (Vec<Arc<dyn crate::backend::Backend>>, JoinHandle<()>);

impl Running {
    /// Stops being this catalog's writer: the backends whose entries are still to be removed
    /// (this one last) and the task to stop, for what comes next.
    fn hand_over(mut self) -> Option<Handover> {
        let mut retiring = writer::take_all(&self.retiring);
        retiring.push(self.backend.clone());
        let task = self.task.take()?;
        // Stopped now, so that it writes nothing more while its successor is being built.
        task.abort();
        Some((retiring, task))
    }
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
struct Writers {
    client: kube::Client,
    opts: Options,
    gate: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    running: HashMap<String, Running>,
    broken: HashMap<String, Broken>,
    /// Writers of deleted ExternalCatalogs, removing their entries ([`writer::drain`]).
    draining: HashMap<String, Draining>,
    /// When referenced Secrets were last re-read.
    secrets_checked: Instant,
}

/// How often the Secrets of running catalogs are re-read.
const SECRET_RECHECK: Duration = Duration::from_secs(10);

impl Writers {
    fn build_context(&self) -> crate::catalogs::Context {
        crate::catalogs::Context {
            owner: self.opts.owner.clone(),
            sessions: Some(crate::catalogs::SessionSecret {
                client: self.client.clone(),
                namespace: self.opts.lease_namespace.clone(),
                name: self.opts.session_secret.clone(),
            }),
            read_only: self.opts.dry_run,
        }
    }

    async fn sync(
        &mut self,
        catalogs: &[Arc<ExternalCatalog>],
        desired: &Desired,
        since: Option<Instant>,
    ) {
        let recheck_secrets = self.secrets_checked.elapsed() >= SECRET_RECHECK;
        if recheck_secrets {
            self.secrets_checked = Instant::now();
        }
        let mut seen = Vec::new();
        let mut rebuild = std::collections::HashSet::new();
        for cat in catalogs {
            let Some(name) = cat.metadata.name.clone() else {
                continue;
            };
            seen.push(name.clone());
            let fingerprint = serde_json::to_string(&cat.spec).unwrap_or_default();
            let wanted = desired.catalogs.get(&name).cloned().unwrap_or_default();
            if recheck_secrets
                && let Some(r) = self.running.get(&name)
                && r.fingerprint == fingerprint
            {
                let now = crate::catalogs::credentials(&self.client, cat).await.ok();
                if now.is_some_and(|c| c != r.credentials) {
                    info!(catalog = %name, "a referenced Secret changed; rebuilding the catalog writer");
                    rebuild.insert(name.clone());
                }
            }
            if let Some(r) = self.running.get(&name)
                && r.fingerprint == fingerprint
                && !rebuild.contains(&name)
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
            let kind = crate::catalogs::kind(cat);
            let credentials = crate::catalogs::credentials(&self.client, cat).await;
            let built = credentials
                .clone()
                .and_then(|c| crate::catalogs::build(cat, c, &self.build_context()));
            match built {
                Ok(backend) => {
                    info!(catalog = %name, backend = %backend.describe(), "catalog writer starting");
                    self.broken.remove(&name);
                    let (tx, rx) = watch::channel(Arc::new(Snapshot::new(wanted, since)));
                    let mut cfg = writer::Config::new(&name);
                    cfg.dry_run = self.opts.dry_run;
                    cfg.drift_interval = self.opts.drift_interval;
                    let (mut w, report) = Writer::new(
                        cfg,
                        backend.clone(),
                        rx,
                        self.gate.clone(),
                        self.metrics.clone(),
                    );
                    let retiring = writer::Retiring::default();
                    if let Some((old, task)) = previous {
                        retiring
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend(old);
                        w = w.after(retiring.clone(), task);
                    }
                    self.running.insert(
                        name.clone(),
                        Running {
                            fingerprint,
                            credentials: credentials.unwrap_or_default(),
                            kind,
                            desired: tx,
                            report,
                            backend,
                            retiring,
                            task: Some(tokio::spawn(w.run())),
                        },
                    );
                }
                Err(problem) => {
                    warn!(catalog = %name, reason = problem.reason, error = %problem.message, "catalog cannot be used");
                    self.broken.insert(
                        name.clone(),
                        Broken {
                            fingerprint,
                            kind,
                            problem,
                            retry_at: Instant::now() + Duration::from_secs(10),
                            handover: previous,
                        },
                    );
                }
            }
        }
        // A deleted catalog: its entries go (SPEC §6.5, as for a deleted Service).
        let deleted: Vec<String> = (self.running.keys())
            .chain(self.broken.keys())
            .filter(|n| !seen.contains(n))
            .cloned()
            .collect();
        for name in deleted {
            let Some((left, task)) = self.take_handover(&name) else {
                continue;
            };
            info!(catalog = %name, "ExternalCatalog deleted: removing its entries");
            self.metrics.forget_catalog(&name);
            let retiring: writer::Retiring = Arc::new(std::sync::Mutex::new(left));
            let drain = writer::drain(
                name.clone(),
                retiring.clone(),
                task,
                self.gate.clone(),
                self.metrics.clone(),
                self.opts.dry_run,
            );
            self.draining.insert(
                name,
                Draining {
                    retiring,
                    task: tokio::spawn(drain),
                },
            );
        }
        self.draining.retain(|_, d| !d.task.is_finished());
        self.broken.retain(|n, _| seen.contains(n));
    }

    /// What catalog `name`'s writer leaves to the next one, whichever state it is in:
    /// running, draining (a deleted catalog), or broken (keeping what the writer before left).
    fn take_handover(&mut self, name: &str) -> Option<Handover> {
        if let Some(r) = self.running.remove(name) {
            return r.hand_over();
        }
        if let Some(d) = self.draining.remove(name) {
            let left = writer::take_all(&d.retiring);
            d.task.abort();
            return Some((left, d.task));
        }
        self.broken.remove(name).and_then(|b| b.handover)
    }

    fn views(&self) -> BTreeMap<String, CatalogView> {
        let mut out = BTreeMap::new();
        for (name, r) in &self.running {
            out.insert(
                name.clone(),
                CatalogView {
                    kind: r.kind,
                    report: r.report.borrow().clone(),
                    problem: None,
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
                },
            );
        }
        out
    }
}

/// What the HTTP endpoints read.
#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// True once every Kubernetes cache has synced.
    pub synced: watch::Receiver<bool>,
}

/// Runs the controller until a task fails or Ctrl-C / SIGTERM.
pub async fn run(client: kube::Client, opts: Options) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let changes = Arc::new(Changes::default());
    // Changes to imported objects, for the import tasks to undo someone else's.
    let (touched, _) = broadcast::channel(1024);
    let (services, t1) = reflect(
        Api::<Service>::all(client.clone()),
        changes.clone(),
        Some((import::Kind::Service, touched.clone())),
    );
    let (slices, t2) = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        changes.clone(),
        Some((import::Kind::EndpointSlice, touched.clone())),
    );
    let (catalogs, t3) = reflect(
        Api::<ExternalCatalog>::all(client.clone()),
        changes.clone(),
        None,
    );
    let (registrations, t4) = reflect(
        Api::<ExternalRegistration>::all(client.clone()),
        changes.clone(),
        None,
    );
    let stores = Stores {
        services,
        slices,
        catalogs,
        registrations,
    };

    let (synced_tx, synced) = watch::channel(false);
    // A dry run writes nothing to Kubernetes either: it takes no part in the election (it
    // would take the Lease from the real replicas) and plans as if it led.
    let (always, leading) = watch::channel(true);
    let (leader, lease_task) = if opts.dry_run {
        info!("dry run: not joining the leader election; planning as if leading");
        (leading, None)
    } else {
        let (leader, lease) = crate::leader::elect(client.clone(), &opts, metrics.clone()).await?;
        (leader, Some(lease))
    };
    // Writers open only while this replica leads and every cache is complete.
    let (gate_tx, gate) = watch::channel(false);
    let gate_task = {
        let mut leader = leader.clone();
        let mut synced = synced.clone();
        tokio::spawn(async move {
            loop {
                let open = *leader.borrow_and_update() && *synced.borrow_and_update();
                gate_tx.send_if_modified(|g| std::mem::replace(g, open) != open);
                tokio::select! {
                    r = leader.changed() => r?,
                    r = synced.changed() => r?,
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        })
    };

    let health = Health {
        metrics: metrics.clone(),
        synced: synced.clone(),
    };
    let http = tokio::spawn(crate::http::serve(opts.metrics_addr, health));

    let (desired_tx, desired_rx) = watch::channel(Arc::new(Desired::default()));
    let (views_tx, views_rx) = watch::channel(BTreeMap::<String, CatalogView>::new());
    let (imports_tx, imports_rx) = watch::channel(HashMap::<(String, String), ImportView>::new());
    let desired_loop = {
        let stores = stores.clone();
        let client = client.clone();
        let opts = opts.clone();
        let metrics = metrics.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            stores.wait_synced().await?;
            info!("Kubernetes caches synced");
            synced_tx.send_replace(true);
            let mut importers = Importers::new(
                client.clone(),
                opts.owner.clone(),
                gate.clone(),
                metrics.clone(),
                Watched {
                    services: stores.services.clone(),
                    slices: stores.slices.clone(),
                    registrations: stores.registrations.clone(),
                    touched,
                },
                Some(crate::catalogs::SessionSecret {
                    client: client.clone(),
                    namespace: opts.lease_namespace.clone(),
                    name: opts.session_secret.clone(),
                }),
                opts.dry_run,
            );
            let mut writers = Writers {
                client,
                opts,
                gate,
                metrics: metrics.clone(),
                running: HashMap::new(),
                broken: HashMap::new(),
                draining: HashMap::new(),
                secrets_checked: Instant::now(),
            };
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut first = true;
            let mut memo = desired::Memo::default();
            loop {
                let since = changes.take();
                let cats = stores.catalogs.state();
                // Recompute only when something changed; the tick alone refreshes views and
                // retries catalogs that could not be built.
                let d = if since.is_some() || first {
                    first = false;
                    let (svcs, sls, regs) = (
                        stores.services.state(),
                        stores.slices.state(),
                        stores.registrations.state(),
                    );
                    desired::compute_with(
                        Inputs {
                            services: &svcs,
                            slices: &sls,
                            catalogs: &cats,
                            registrations: &regs,
                        },
                        &mut memo,
                    )
                } else {
                    desired_tx.borrow().as_ref().clone()
                };
                writers.sync(&cats, &d, since).await;
                importers.sync(&stores.registrations.state(), &cats).await;
                imports_tx.send_if_modified(|cur| {
                    let v = importers.views();
                    if *cur == v {
                        return false;
                    }
                    *cur = v;
                    true
                });
                let mut invalid: BTreeMap<(String, String), i64> = BTreeMap::new();
                for e in &d.exports {
                    if let Some(p) = &e.problem {
                        let kind = match e.source {
                            desired::Source::Annotation { .. } => "annotation",
                            desired::Source::Registration { .. } => "registration",
                        };
                        *invalid
                            .entry((kind.to_string(), p.reason.to_string()))
                            .or_default() += 1;
                    }
                }
                metrics.set_invalid_exports(&invalid);
                desired_tx.send_if_modified(|cur| {
                    if **cur == d {
                        return false;
                    }
                    *cur = Arc::new(d);
                    true
                });
                views_tx.send_if_modified(|cur| {
                    let v = writers.views();
                    if *cur == v {
                        return false;
                    }
                    *cur = v;
                    true
                });
                tokio::select! {
                    _ = changes.notify.notified() => {}
                    _ = tick.tick() => {}
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        })
    };

    // No status and no Events from a dry run.
    let status_loop = if opts.dry_run {
        tokio::spawn(std::future::pending())
    } else {
        tokio::spawn(crate::status::run(
            client.clone(),
            stores.clone(),
            desired_rx,
            views_rx,
            imports_rx,
            gate.clone(),
        ))
    };

    let outcome = tokio::select! {
        r = t1 => flatten("Service watch", r),
        r = t2 => flatten("EndpointSlice watch", r),
        r = t3 => flatten("ExternalCatalog watch", r),
        r = t4 => flatten("ExternalRegistration watch", r),
        r = gate_task => flatten("leader gate", r),
        r = desired_loop => flatten("desired-state loop", r),
        r = status_loop => flatten("status loop", r),
        r = http => flatten("HTTP server", r),
        r = shutdown_signal() => r.map(|()| info!("shutting down")),
    };
    if let Some(lease) = lease_task {
        lease.release().await;
    }
    drop(always);
    outcome
}

fn flatten(what: &str, r: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match r {
        Ok(Ok(())) => bail!("{what} stopped"),
        Ok(Err(e)) => Err(e).with_context(|| format!("{what} failed")),
        Err(e) => Err(anyhow::Error::new(e)).with_context(|| format!("{what} panicked")),
    }
}

async fn shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
