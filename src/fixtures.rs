//! Test fixtures for the orchestration tests: a fake API server that keeps objects in memory —
//! enough of the API for the import tasks, the supervisors and the status loop: get, list by
//! label and field selector, server-side apply, merge patches of status, create and delete —
//! and a [`Connect`] that hands out in-memory catalogs. The real API server is for the
//! integration tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

use crate::api::crd::ExternalCatalog;
use crate::backend::Backend;
use crate::backend::memory::Memory;
use crate::k8s::catalogs::Connect;
use crate::k8s::secrets::Credentials;
use crate::model::{DesiredCatalog, Instance, Origin, Problem, Reason};

/// The collections the fake serves (the last segment of a collection's path).
const COLLECTIONS: [&str; 7] = [
    "services",
    "endpointslices",
    "externalregistrations",
    "externalcatalogs",
    "secrets",
    "events",
    "leases",
];

/// Objects by path (`/api/v1/namespaces/shop/services/mysql-x`), and every request seen.
#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    requests: Vec<String>,
}

/// An API server in memory. Cloning shares it.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    versions: Arc<AtomicU64>,
}

impl FakeApi {
    /// A fake API server and a client of it.
    pub fn start() -> (FakeApi, kube::Client) {
        let api = FakeApi::default();
        let served = api.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let api = served.clone();
            async move { Ok::<_, std::convert::Infallible>(api.serve(req).await) }
        });
        (api, kube::Client::new(service, "default"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The object at `path`.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path).cloned()
    }

    /// Puts `object` at `path`, as someone else would have created it.
    pub fn put(&self, path: &str, object: Value) {
        self.lock().objects.insert(path.to_string(), object);
    }

    /// Every object under `prefix`, by path.
    pub fn under(&self, prefix: &str) -> BTreeMap<String, Value> {
        self.lock()
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every request seen so far: `PATCH /api/v1/namespaces/shop/services/mysql-x`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    async fn serve(&self, req: Request<Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().trim_end_matches('/').to_string();
        let query: HashMap<String, String> = parts
            .uri
            .query()
            .and_then(|q| reqwest::Url::parse(&format!("http://fake/?{q}")).ok())
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default();
        let body = body
            .collect_bytes()
            .await
            .map(|b| b.to_vec())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        self.lock()
            .requests
            .push(format!("{} {path}", parts.method));
        let last = path.rsplit('/').next().unwrap_or_default();
        let (status, answer) = match parts.method {
            Method::GET if COLLECTIONS.contains(&last) => {
                (StatusCode::OK, self.list(&path, &query))
            }
            Method::GET => match self.get(&path) {
                Some(o) => (StatusCode::OK, o),
                None => not_found(&path),
            },
            Method::PATCH if path.ends_with("/status") => {
                let object = path.trim_end_matches("/status");
                self.patch(object, &body, false)
            }
            Method::PATCH => {
                let kind = parts.headers.get(http::header::CONTENT_TYPE);
                let starts = |p: &[u8]| kind.is_some_and(|v| v.as_bytes().starts_with(p));
                if starts(b"application/json-patch") {
                    self.json_patch(&path, &body)
                } else {
                    self.patch(&path, &body, starts(b"application/apply-patch"))
                }
            }
            Method::POST => {
                let name = body
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("generated-{}", self.next_version()));
                let object = format!("{path}/{name}");
                if self.get(&object).is_some() {
                    (
                        StatusCode::CONFLICT,
                        json!({"kind": "Status", "status": "Failure", "code": 409,
                               "reason": "AlreadyExists", "message": format!("{object} already exists")}),
                    )
                } else {
                    self.patch(&object, &body, true)
                }
            }
            Method::DELETE => match self.lock().objects.remove(&path) {
                Some(_) => (
                    StatusCode::OK,
                    json!({"kind": "Status", "status": "Success"}),
                ),
                None => not_found(&path),
            },
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"kind": "Status", "status": "Failure", "code": 405}),
            ),
        };
        let mut resp = Response::new(Body::from(serde_json::to_vec(&answer).unwrap_or_default()));
        *resp.status_mut() = status;
        resp
    }

    fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Server-side apply (`apply`: the object becomes `body`) or a merge patch onto an existing
    /// object; either way with a new resource version.
    fn patch(&self, path: &str, body: &Value, apply: bool) -> (StatusCode, Value) {
        let version = self.next_version();
        let mut state = self.lock();
        let existing = state.objects.get(path).cloned();
        let mut object = match (existing, apply) {
            (None, false) => return not_found(path),
            (None, true) => body.clone(),
            (Some(mut o), false) => {
                merge(&mut o, body);
                o
            }
            (Some(o), true) => {
                let mut next = body.clone();
                next["metadata"]["uid"] = o["metadata"]["uid"].clone();
                next["status"] = o.get("status").cloned().unwrap_or(Value::Null);
                next
            }
        };
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{version}"));
        }
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        state.objects.insert(path.to_string(), object.clone());
        (StatusCode::OK, object)
    }

    /// A JSON patch (RFC 6902, `test` ops included) onto an existing object.
    fn json_patch(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let Some(mut object) = self.get(path) else {
            return not_found(path);
        };
        let applied = serde_json::from_value::<json_patch::Patch>(body.clone())
            .map_err(|e| e.to_string())
            .and_then(|p| json_patch::patch(&mut object, &p).map_err(|e| e.to_string()));
        if let Err(e) = applied {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"kind": "Status", "status": "Failure", "code": 422, "message": e}),
            );
        }
        let version = self.next_version();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        self.lock().objects.insert(path.to_string(), object.clone());
        (StatusCode::OK, object)
    }

    fn list(&self, path: &str, query: &HashMap<String, String>) -> Value {
        let labels = selector(query.get("labelSelector"));
        let fields = selector(query.get("fieldSelector"));
        let prefix = format!("{path}/");
        let items: Vec<Value> = self
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains('/'))
            })
            .map(|(_, v)| v.clone())
            .filter(|o| {
                labels.iter().all(|(k, want)| {
                    o.pointer("/metadata/labels")
                        .and_then(|l| l.get(k))
                        .and_then(Value::as_str)
                        == Some(want.as_str())
                }) && fields.iter().all(|(k, want)| {
                    let pointer = format!("/{}", k.replace('.', "/"));
                    o.pointer(&pointer).and_then(Value::as_str) == Some(want.as_str())
                })
            })
            .collect();
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})
    }
}

fn not_found(path: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
               "code": 404, "message": format!("{path} not found")}),
    )
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// `k=v,k2=v2` as pairs.
fn selector(s: Option<&String>) -> Vec<(String, String)> {
    s.map(|s| {
        s.split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
    .unwrap_or_default()
}

/// A [`Connect`] that hands out in-memory catalogs by ExternalCatalog name.
#[derive(Default)]
pub struct MemoryCatalogs {
    catalogs: Mutex<HashMap<String, Arc<Memory>>>,
}

impl MemoryCatalogs {
    /// Catalog `name` answers with `memory` from now on.
    pub fn insert(&self, name: &str, memory: Arc<Memory>) {
        self.catalogs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), memory);
    }
}

#[async_trait]
impl Connect for MemoryCatalogs {
    async fn credentials(&self, _: &ExternalCatalog) -> Result<Credentials, Problem> {
        Ok(Credentials::default())
    }

    fn build(
        &self,
        catalog: &ExternalCatalog,
        _: Credentials,
        _: bool,
    ) -> Result<Arc<dyn Backend>, Problem> {
        let name = catalog.metadata.name.clone().unwrap_or_default();
        self.catalogs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .cloned()
            .map(|m| m as Arc<dyn Backend>)
            .ok_or_else(|| Problem::new(Reason::InvalidConfig, format!("no memory catalog {name}")))
    }
}

/// An ExternalCatalog `name` (a Consul one; the in-memory catalogs stand behind it).
pub fn catalog(name: &str) -> Arc<ExternalCatalog> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": name, "uid": format!("uid-catalog-{name}")},
            "spec": {"consul": {"addresses": ["http://127.0.0.1:8500"]}},
        }))
        .expect("a test catalog"),
    )
}

/// `n` instances of `api_x` (shop/api-x) at 10.0.x.y:8080, sorted.
pub fn instances(n: usize) -> Arc<DesiredCatalog> {
    Arc::new(
        (0..n)
            .map(|i| Instance {
                name: "api_x".into(),
                address: format!("10.0.{}.{}", i / 250, i % 250 + 1)
                    .parse()
                    .expect("an address"),
                port: 8080,
                origin: Origin {
                    namespace: "shop".into(),
                    service: "api-x".into(),
                }
                .into(),
                tags: vec![].into(),
                meta: Default::default(),
            })
            .collect(),
    )
}

/// Waits until `f` holds, checking every 10 ms, for at most 10 s.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "not in time: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
