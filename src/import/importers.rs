//! The import supervisor: one supervised task per `direction: Import` ExternalRegistration,
//! started, restarted (a changed registration or catalog, or a task that panicked) and stopped
//! as registrations and catalogs change; and what each import shows in its status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use tokio::sync::watch;
use tracing::{info, warn};

use super::task::{self, ImportView, Task};
use super::touched::Watched;
use crate::api::crd::{Direction, ExternalCatalog, ExternalRegistration};
use crate::api::policy::AddressRules;
use crate::backend::Backend;
use crate::k8s::catalogs::Connect;
use crate::model::{Problem, Reason};
use crate::runtime::Metrics;
use crate::runtime::supervisor::{Supervised, TaskKind};

struct Reader {
    spec: String,
    credentials: crate::k8s::secrets::Credentials,
    backend: Arc<dyn Backend>,
}

struct Running {
    fingerprint: String,
    /// The objects the fingerprint was taken from: while the same ones are given (and the
    /// namespaces did not change), nothing is computed again.
    from: (Arc<ExternalRegistration>, Option<Arc<ExternalCatalog>>),
    /// The catalog's policy refuses this import: its objects are removed, once the gate
    /// opens (then false).
    remove_pending: bool,
    view: watch::Receiver<ImportView>,
    /// `None` for an import that cannot run: its view says why.
    task: Option<Supervised>,
}

/// Why the catalog's policy refuses the import `reg` (its namespace, its name, or address
/// rules that cannot be read).
fn refusal(
    cat: &ExternalCatalog,
    reg: &ExternalRegistration,
    labels: &HashMap<&str, &BTreeMap<String, String>>,
) -> Option<Problem> {
    let policy = cat.spec.policy.as_ref()?;
    if let Err(why) = AddressRules::of(Some(policy)) {
        return Some(Problem::new(Reason::InvalidConfig, why));
    }
    let ns = reg.namespace()?;
    let none = BTreeMap::new();
    let labels = labels.get(ns.as_str()).copied().unwrap_or(&none);
    let name = reg.spec.external_name.as_deref().unwrap_or_default();
    policy
        .import()
        .refusal("import from", &cat.name_any(), &ns, labels, name)
        .map(|m| Problem::new(Reason::NotAllowed, m))
}

/// Starts, restarts and stops import tasks as registrations and catalogs change.
pub struct Importers {
    client: kube::Client,
    connect: Arc<dyn Connect>,
    gate: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    watched: Watched,
    /// `--dry-run`: log what would be applied, apply nothing.
    dry_run: bool,
    running: HashMap<(String, String), Running>,
    /// One reading backend per catalog, shared by its imports: one etcd client, one ZooKeeper
    /// session, one HTTP client for Consul, however many names are imported (ZooKeeper allows
    /// 60 connections from one address by default). Kept with the spec and credentials it was
    /// built from; a change builds another.
    readers: HashMap<String, Reader>,
    /// The namespaces of the last sync (their labels decide what policies allow).
    namespaces: Vec<Arc<Namespace>>,
    /// Catalogs whose import entries gauge was last set above 0.
    import_catalogs: HashSet<String>,
}

impl Importers {
    /// Imports apply with `client` while `gate` is open (this replica leads and every cache has
    /// synced), reading catalogs through backends from `connect`.
    pub fn new(
        client: kube::Client,
        connect: Arc<dyn Connect>,
        gate: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        watched: Watched,
        dry_run: bool,
    ) -> Importers {
        Importers {
            client,
            connect,
            gate,
            metrics,
            watched,
            dry_run,
            running: HashMap::new(),
            readers: HashMap::new(),
            namespaces: Vec::new(),
            import_catalogs: HashSet::new(),
        }
    }

    /// Brings the tasks in line with the Import registrations and the catalogs.
    pub async fn sync(
        &mut self,
        registrations: &[Arc<ExternalRegistration>],
        catalogs: &[Arc<ExternalCatalog>],
        namespaces: &[Arc<Namespace>],
    ) {
        let mut seen = HashSet::new();
        let same_namespaces = self.namespaces.len() == namespaces.len()
            && (self.namespaces.iter())
                .zip(namespaces)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        self.namespaces = namespaces.to_vec();
        let labels: HashMap<&str, &BTreeMap<String, String>> = namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
            .collect();
        for reg in registrations {
            if reg.spec.direction != Direction::Import {
                continue;
            }
            let (Some(ns), name) = (reg.namespace(), reg.name_any()) else {
                continue;
            };
            let key = (ns, name);
            seen.insert(key.clone());
            let catalog = catalogs
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(reg.spec.catalog_ref.name.as_str()));
            // The same registration and catalog objects as before: nothing to look at again.
            if same_namespaces
                && let Some(r) = self.running.get(&key)
                && Arc::ptr_eq(&r.from.0, reg)
                && match (&r.from.1, catalog) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                }
                && !r.remove_pending
            {
                continue;
            }
            let refused = catalog.and_then(|c| refusal(c, reg, &labels));
            let fingerprint = format!(
                "{}|{}|{}|{:?}",
                serde_json::to_string(&reg.spec).unwrap_or_default(),
                reg.uid().unwrap_or_default(),
                catalog
                    .map(|c| serde_json::to_string(&c.spec).unwrap_or_default())
                    .unwrap_or_default(),
                refused,
            );
            let unchanged = (self.running.get(&key))
                .filter(|r| r.fingerprint == fingerprint)
                .map(|r| r.remove_pending);
            if let Some(remove_pending) = unchanged {
                let removed = remove_pending && self.remove(&key).await;
                self.running.entry(key).and_modify(|r| {
                    r.from = (reg.clone(), catalog.cloned());
                    r.remove_pending &= !removed;
                });
                continue;
            }
            self.running.remove(&key);
            let (view_tx, view) = watch::channel(ImportView {
                catalog: reg.spec.catalog_ref.name.clone(),
                service_name: super::render::service_name(reg),
                ..Default::default()
            });
            let rules = catalog
                .map(|c| AddressRules::of(c.spec.policy.as_ref()))
                .transpose()
                .unwrap_or_default()
                .unwrap_or_default();
            let backend = match (catalog, refused) {
                (_, Some(problem)) => Err(problem),
                (None, _) => Err(Problem::new(
                    Reason::CatalogNotFound,
                    format!(
                        "ExternalCatalog {:?} does not exist",
                        reg.spec.catalog_ref.name
                    ),
                )),
                (Some(cat), None) => self.backend(cat).await,
            };
            let remove_pending = backend
                .as_ref()
                .is_err_and(|p| p.reason == Reason::NotAllowed)
                && !self.remove(&key).await;
            let task = match backend {
                Ok(backend) => {
                    let id = format!("{}/{}", key.0, key.1);
                    info!(registration = %id, catalog = %backend.describe(), "import starting");
                    let shared = Task {
                        client: self.client.clone(),
                        metrics: self.metrics.clone(),
                        watched: self.watched.clone(),
                        dry_run: self.dry_run,
                    };
                    let (reg, gate, rules) = (reg.clone(), self.gate.clone(), Arc::new(rules));
                    Some(Supervised::spawn(
                        TaskKind::Import,
                        id,
                        self.metrics.clone(),
                        move || {
                            task::run(
                                shared.clone(),
                                reg.clone(),
                                backend.clone(),
                                rules.clone(),
                                gate.clone(),
                                view_tx.clone(),
                            )
                        },
                    ))
                }
                Err(problem) => {
                    view_tx.send_modify(|v| v.problem = Some(problem));
                    None
                }
            };
            self.running.insert(
                key,
                Running {
                    fingerprint,
                    from: (reg.clone(), catalog.cloned()),
                    remove_pending,
                    view,
                    task,
                },
            );
        }
        let gone: Vec<(String, String)> = self
            .running
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        self.readers
            .retain(|name, _| catalogs.iter().any(|c| c.name_any() == *name));
        for key in gone {
            if let Some(r) = self.running.remove(&key) {
                let catalog = r.view.borrow().catalog.clone();
                self.metrics.forget_import(&catalog, &key.0, &key.1);
            }
            // The owner references let the garbage collector do this too; doing it here makes it
            // immediate (the collector may not watch a freshly installed CRD yet).
            self.remove(&key).await;
        }
    }

    /// Removes the imported Service and EndpointSlices of the registration `key` (one that is
    /// gone, or that the catalog's policy refuses); whether that is done. Nothing is removed
    /// while the gate is closed. A dry run's gate is always open: it only says what it would
    /// remove.
    async fn remove(&self, key: &(String, String)) -> bool {
        let id = format!("{}/{}", key.0, key.1);
        if !*self.gate.borrow() {
            return false;
        }
        if self.dry_run {
            info!(registration = %id, "dry run: would remove the imported Service and EndpointSlices");
            return true;
        }
        match super::apply::remove(&self.client, &key.0, &key.1).await {
            Ok(()) => true,
            Err(e) => {
                warn!(registration = %id, error = %format!("{e:#}"), "removing the imported Service failed");
                false
            }
        }
    }

    /// The backend the imports of `cat` read it through, built once for its spec and
    /// credentials. Its import watches use a ZooKeeper session of their own; the session in
    /// the Secret belongs to the exporting writer (two clients on one session take it from each
    /// other) and is only read, to recognise the writer's entries.
    async fn backend(&mut self, cat: &ExternalCatalog) -> Result<Arc<dyn Backend>, Problem> {
        let credentials = self.connect.credentials(cat).await?;
        let spec = serde_json::to_string(&cat.spec).unwrap_or_default();
        let name = cat.name_any();
        if let Some(r) = self.readers.get(&name)
            && r.spec == spec
            && r.credentials == credentials
        {
            return Ok(r.backend.clone());
        }
        let backend = self.connect.build(cat, credentials.clone(), true)?;
        let reader = Reader {
            spec,
            credentials,
            backend: backend.clone(),
        };
        self.readers.insert(name, reader);
        Ok(backend)
    }

    /// The current view of every import, by (namespace, name). Also sets
    /// `entries{direction="import"}` of each catalog to the endpoints of all its imports (0 for
    /// a catalog whose last import went).
    pub fn views(&mut self) -> HashMap<(String, String), ImportView> {
        let views: HashMap<(String, String), ImportView> = self
            .running
            .iter()
            .map(|(k, r)| {
                let mut v = r.view.borrow().clone();
                v.task = r.task.as_ref().map(Supervised::state).unwrap_or_default();
                (k.clone(), v)
            })
            .collect();
        let mut per_catalog: HashMap<String, i64> =
            self.import_catalogs.drain().map(|c| (c, 0)).collect();
        for v in views.values() {
            *per_catalog.entry(v.catalog.clone()).or_default() += v.endpoints as i64;
        }
        for (catalog, n) in &per_catalog {
            self.metrics.entries(catalog, "import", *n);
        }
        self.import_catalogs = per_catalog
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(c, _)| c)
            .collect();
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::External;
    use crate::backend::memory::Memory;
    use crate::fixtures::{FakeApi, MemoryCatalogs, catalog, eventually};
    use kube::runtime::reflector;
    use serde_json::{Value, json};

    const SERVICE: &str = "/api/v1/namespaces/shop/services/mysql-x";
    const SLICE: &str =
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/mysql-x-ipv4-3306-0";

    fn registration() -> Arc<ExternalRegistration> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
                "metadata": {"name": "mysql-x", "namespace": "shop", "uid": "uid-reg"},
                "spec": {"catalogRef": {"name": "zk"}, "direction": "Import",
                         "externalName": "mysql_x"},
            }))
            .expect("a registration"),
        )
    }

    /// Stores that hold nothing, and nobody telling of changes.
    fn unwatched() -> Watched {
        Watched {
            services: reflector::store().0,
            slices: reflector::store().0,
            registrations: reflector::store().0,
            touched: tokio::sync::broadcast::channel(16).0,
        }
    }

    fn external(ips: &[&str]) -> Vec<External> {
        ips.iter()
            .map(|ip| External {
                address: ip.to_string(),
                port: 3306,
                id: format!("{ip}:3306"),
            })
            .collect()
    }

    fn addresses(slice: Option<Value>) -> Vec<String> {
        slice
            .and_then(|s| s.get("endpoints").cloned())
            .and_then(|e| e.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.pointer("/addresses/0").and_then(Value::as_str))
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn an_import_whose_watch_panics_is_started_again_and_its_objects_removed_with_it() {
        let (api, client) = FakeApi::start();
        let mem = Arc::new(Memory::new("me", 64));
        mem.register_external("mysql_x", external(&["10.8.0.8"]));
        let connect = Arc::new(MemoryCatalogs::default());
        connect.insert("zk", mem.clone());
        let metrics = Arc::new(Metrics::new());
        let (_gate_tx, gate) = watch::channel(true);
        let watched = unwatched();
        let mut importers = Importers::new(client, connect, gate, metrics.clone(), watched, false);
        let (regs, cats) = ([registration()], [catalog("zk")]);
        importers.sync(&regs, &cats, &[]).await;
        eventually("the Service and its slice", || {
            api.get(SERVICE).is_some() && addresses(api.get(SLICE)) == ["10.8.0.8"]
        })
        .await;

        // A bug in the watch: it panics at its next change. The import fails with it, is
        // started again, and the new one applies what the catalog holds now.
        mem.panic_on_next_watch();
        mem.register_external("mysql_x", external(&["10.8.0.8", "10.8.0.9"]));
        eventually("the restarted import applied the new instance", || {
            addresses(api.get(SLICE)) == ["10.8.0.8", "10.8.0.9"]
        })
        .await;
        let key = ("shop".to_string(), "mysql-x".to_string());
        let view = importers.views()[&key].clone();
        assert_eq!(view.task.restarts, 1, "{view:?}");
        assert!(view.synced && view.endpoints == 2, "{view:?}");
        assert_eq!(metrics.task_restarts("import"), 1);

        // The registration goes: so do its Service and slices.
        importers.sync(&[], &cats, &[]).await;
        assert!(api.get(SERVICE).is_none() && api.get(SLICE).is_none());
    }

    #[tokio::test]
    async fn a_dry_run_neither_applies_nor_removes_an_import() {
        let (api, client) = FakeApi::start();
        // Objects the real replica made for the registration.
        let labels = json!({"catalog-bridge.io/registration": "mysql-x",
                            "endpointslice.kubernetes.io/managed-by": "catalog-bridge.io"});
        api.put(
            SERVICE,
            json!({"metadata": {"name": "mysql-x", "namespace": "shop", "labels": labels}}),
        );
        api.put(SLICE, json!({"metadata": {"name": "mysql-x-ipv4-3306-0", "namespace": "shop", "labels": labels},
                              "addressType": "IPv4", "endpoints": []}));
        let mem = Arc::new(Memory::new("me", 64));
        mem.register_external("mysql_x", external(&["10.8.0.8"]));
        let connect = Arc::new(MemoryCatalogs::default());
        connect.insert("zk", mem.clone());
        let (_gate_tx, gate) = watch::channel(true);
        let watched = unwatched();
        let mut importers = Importers::new(
            client,
            connect,
            gate,
            Arc::new(Metrics::new()),
            watched,
            true,
        );
        let cats = [catalog("zk")];
        importers.sync(&[registration()], &cats, &[]).await;
        let key = ("shop".to_string(), "mysql-x".to_string());
        eventually("the dry run to plan the import", || {
            importers.views().get(&key).is_some_and(|v| v.synced)
        })
        .await;
        // The registration goes: nothing is deleted.
        importers.sync(&[], &cats, &[]).await;
        let writes: Vec<String> = api
            .requests()
            .into_iter()
            .filter(|r| !r.starts_with("GET "))
            .collect();
        assert!(writes.is_empty(), "a dry run wrote: {writes:?}");
        assert!(api.get(SERVICE).is_some() && api.get(SLICE).is_some());
    }

    #[tokio::test]
    async fn an_import_of_a_missing_catalog_says_so_and_applies_nothing() {
        let (api, client) = FakeApi::start();
        let (_gate_tx, gate) = watch::channel(true);
        let watched = unwatched();
        let mut importers = Importers::new(
            client,
            Arc::new(MemoryCatalogs::default()),
            gate,
            Arc::new(Metrics::new()),
            watched,
            false,
        );
        importers.sync(&[registration()], &[], &[]).await;
        let key = ("shop".to_string(), "mysql-x".to_string());
        let problem = importers.views()[&key].problem.clone().expect("a problem");
        assert_eq!(problem.reason, Reason::CatalogNotFound);
        assert!(api.requests().is_empty(), "{:?}", api.requests());
    }
}
