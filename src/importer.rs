//! The import tasks: one per `direction: Import` ExternalRegistration, run while this replica
//! leads. Each follows its external service in the catalog (`Backend::watch_service`) and keeps
//! the Service and EndpointSlices equal to the healthy set (`import::render` + `import::apply`).
//!
//! Nothing is deleted because a read failed: until the first successful read nothing is applied,
//! and while the catalog is unreachable the last known instances stay in place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::backend::{Backend, BackendError, ImportSnapshot};
use crate::catalogs;
use crate::crd::{Direction, ExternalCatalog, ExternalRegistration};
use crate::desired::Problem;
use crate::metrics::Metrics;

/// What one import task last saw and did, for status, Events and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportView {
    pub catalog: String,
    pub service_name: String,
    /// Endpoints now in the EndpointSlices.
    pub endpoints: usize,
    /// Entries the catalog holds that could not be parsed: (id, why).
    pub skipped: Vec<(String, String)>,
    /// The catalog's last read failed (the last known endpoints stay).
    pub catalog_error: Option<BackendError>,
    /// Writing the Service or EndpointSlices failed.
    pub apply_error: Option<String>,
    /// The first read succeeded and its result was applied.
    pub synced: bool,
    /// The import cannot run (catalog missing, backend not buildable).
    pub problem: Option<Problem>,
}

struct Running {
    fingerprint: String,
    view: watch::Receiver<ImportView>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts, restarts and stops import tasks as registrations and catalogs change.
pub struct Importers {
    client: kube::Client,
    owner: String,
    gate: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    running: HashMap<(String, String), Running>,
}

impl Importers {
    pub fn new(
        client: kube::Client,
        owner: String,
        gate: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Importers {
        Importers {
            client,
            owner,
            gate,
            metrics,
            running: HashMap::new(),
        }
    }

    /// Brings the tasks in line with the Import registrations and the catalogs.
    pub async fn sync(
        &mut self,
        registrations: &[Arc<ExternalRegistration>],
        catalogs: &[Arc<ExternalCatalog>],
    ) {
        let mut seen = Vec::new();
        for reg in registrations {
            if reg.spec.direction != Direction::Import {
                continue;
            }
            let (Some(ns), name) = (reg.namespace(), reg.name_any()) else {
                continue;
            };
            let key = (ns, name);
            seen.push(key.clone());
            let catalog = catalogs
                .iter()
                .find(|c| c.name_any() == reg.spec.catalog_ref.name);
            let fingerprint = format!(
                "{}|{}|{}",
                serde_json::to_string(&reg.spec).unwrap_or_default(),
                reg.uid().unwrap_or_default(),
                catalog
                    .map(|c| serde_json::to_string(&c.spec).unwrap_or_default())
                    .unwrap_or_default()
            );
            if self
                .running
                .get(&key)
                .is_some_and(|r| r.fingerprint == fingerprint)
            {
                continue;
            }
            self.running.remove(&key);
            let (view_tx, view) = watch::channel(ImportView {
                catalog: reg.spec.catalog_ref.name.clone(),
                service_name: crate::import::service_name(reg),
                ..Default::default()
            });
            let backend = match catalog {
                None => Err(Problem {
                    reason: "CatalogNotFound",
                    message: format!(
                        "ExternalCatalog {:?} does not exist",
                        reg.spec.catalog_ref.name
                    ),
                }),
                Some(cat) => self.backend(cat).await,
            };
            let task = match backend {
                Ok(backend) => {
                    info!(registration = %format!("{}/{}", key.0, key.1), catalog = %backend.describe(), "import starting");
                    tokio::spawn(run(
                        self.client.clone(),
                        reg.clone(),
                        backend,
                        self.gate.clone(),
                        view_tx,
                        self.metrics.clone(),
                    ))
                }
                Err(problem) => {
                    view_tx.send_modify(|v| v.problem = Some(problem));
                    // Keeps the channel open so the view stays readable.
                    tokio::spawn(async move { view_tx.closed().await })
                }
            };
            self.running.insert(
                key,
                Running {
                    fingerprint,
                    view,
                    task,
                },
            );
        }
        let gone: Vec<(String, String)> = self
            .running
            .keys()
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        for key in gone {
            self.running.remove(&key);
            // The owner references let the garbage collector do this too; doing it here makes it
            // immediate (the collector may not watch a freshly installed CRD yet).
            if *self.gate.borrow()
                && let Err(e) = crate::import::remove(&self.client, &key.0, &key.1).await
            {
                warn!(registration = %format!("{}/{}", key.0, key.1), error = %format!("{e:#}"), "removing the imported Service failed; the garbage collector will");
            }
        }
    }

    /// A backend for reading the catalog. It keeps no ZooKeeper session in the Secret: that one
    /// belongs to the exporting writer, and two clients on one session take it from each other.
    async fn backend(&self, cat: &ExternalCatalog) -> Result<Arc<dyn Backend>, Problem> {
        let credentials = catalogs::credentials(&self.client, cat).await?;
        let ctx = catalogs::Context {
            owner: self.owner.clone(),
            sessions: None,
        };
        catalogs::build(cat, credentials, &ctx)
    }

    /// The current view of every import, by (namespace, name).
    pub fn views(&self) -> HashMap<(String, String), ImportView> {
        self.running
            .iter()
            .map(|(k, r)| (k.clone(), r.view.borrow().clone()))
            .collect()
    }
}

/// One import: while the gate is open, watch the catalog and apply every change.
async fn run(
    client: kube::Client,
    reg: Arc<ExternalRegistration>,
    backend: Arc<dyn Backend>,
    mut gate: watch::Receiver<bool>,
    view: watch::Sender<ImportView>,
    metrics: Arc<Metrics>,
) {
    let external = reg.spec.external_name.clone().unwrap_or_default();
    let catalog = reg.spec.catalog_ref.name.clone();
    loop {
        while !*gate.borrow_and_update() {
            if gate.changed().await.is_err() {
                return;
            }
        }
        let (tx, mut rx) = watch::channel(ImportSnapshot::default());
        let watcher = {
            let backend = backend.clone();
            let external = external.clone();
            tokio::spawn(async move { backend.watch_service(&external, tx).await })
        };
        let mut retry = false;
        // What the last successful apply wrote (so unchanged objects are not sent again).
        let mut applied: Option<crate::import::Rendered> = None;
        loop {
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                r = gate.changed() => if r.is_err() || !*gate.borrow() { break },
                _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            }
            let snap = rx.borrow_and_update().clone();
            metrics.import_skipped(
                &catalog,
                &reg.namespace().unwrap_or_default(),
                &reg.name_any(),
                snap.skipped.len() as i64,
            );
            view.send_modify(|v| {
                v.catalog_error = snap.error.clone();
                v.skipped = snap.skipped.clone();
            });
            if !snap.synced {
                continue; // nothing read yet: nothing to apply, nothing to delete
            }
            let result = match crate::import::render(&reg, &snap, applied.as_ref()) {
                Ok(r) => match crate::import::apply(&client, &reg, &r, applied.as_ref()).await {
                    Ok(()) => {
                        let n = r.endpoints;
                        applied = Some(r);
                        Ok(n)
                    }
                    Err(e) => {
                        applied = None; // unknown state: the next apply sends everything
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            retry = result.is_err();
            match result {
                Ok(n) => {
                    metrics.entries(&catalog, "import", n as i64);
                    view.send_modify(|v| {
                        v.endpoints = n;
                        v.apply_error = None;
                        v.synced = true;
                    });
                }
                Err(e) => {
                    warn!(registration = %reg.name_any(), error = %format!("{e:#}"), "applying the imported Service failed; retrying");
                    view.send_modify(|v| v.apply_error = Some(format!("{e:#}")));
                }
            }
        }
        watcher.abort();
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_millis(10), watcher).await {
            view.send_modify(|v| {
                v.problem = Some(Problem {
                    reason: e.reason(),
                    message: e.to_string(),
                })
            });
            return;
        }
    }
}
