//! What the controller's integration tests share: the CRDs installed on the real API server,
//! the controller binary run as a real process, workloads, and Consul read back over HTTP.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use localenv::process::{Process, Spec};
use localenv::{Env, workload};
use serde_json::{Value, json};

pub mod clusters;
pub mod everywhere;

pub const CRDS_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml");

/// Applies the CRDs from `crds/` and waits until the API server serves them.
pub async fn install_crds(client: &kube::Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let text = std::fs::read_to_string(CRDS_FILE)?;
    let mut names = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let crd: CustomResourceDefinition = serde::Deserialize::deserialize(doc)?;
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        api.patch(
            &name,
            &PatchParams::apply("tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    for name in names {
        localenv::eventually(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || async {
                let crd = api.get(&name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                Ok(established.then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

/// The UID of the `kube-system` namespace: the default owner id of a controller.
pub async fn kube_system_uid(client: &kube::Client) -> Result<String> {
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get("kube-system")
        .await
        .context("reading the kube-system namespace")?
        .metadata
        .uid
        .context("kube-system has no uid")
}

/// Applies any object given as JSON with kubectl's server-side apply semantics.
pub fn kubectl_apply(env: &Env, obj: &Value) -> Result<String> {
    kubectl_apply_on(env, env.kube()?, obj)
}

/// [`kubectl_apply`] on the API server of `kube` (the environment's, or its second cluster).
pub fn kubectl_apply_on(env: &Env, kube: &localenv::kube::Kube, obj: &Value) -> Result<String> {
    let path = env.dir().join(format!(
        "apply-{}.json",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    std::fs::write(&path, serde_json::to_vec(obj)?)?;
    kube.kubectl(&["apply", "--server-side", "-f", &path.display().to_string()])
}

/// An ExternalCatalog for Consul at `addresses`, with node `node`.
pub fn consul_catalog(name: &str, addresses: &[String], node: &str) -> Value {
    json!({
        "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
        "metadata": {"name": name},
        "spec": {"consul": {"addresses": addresses, "nodeName": node}},
    })
}

/// [`consul_catalog`] whose ACL token is key `token` of Secret `namespace/secret`.
pub fn consul_catalog_with_token(
    name: &str,
    addresses: &[String],
    node: &str,
    namespace: &str,
    secret: &str,
) -> Value {
    let mut c = consul_catalog(name, addresses, node);
    c["spec"]["consul"]["tokenSecretRef"] =
        json!({"namespace": namespace, "name": secret, "key": "token"});
    c
}

/// Creates the persistent node `path` (with its parents) holding `data` in the ZooKeeper at
/// `connect`, with kazoo, as a registrant outside Kubernetes would.
pub fn kazoo_create(connect: &str, path: &str, data: &str) -> Result<()> {
    localenv::python(
        "import sys\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         zk.create(sys.argv[2], sys.argv[3].encode(), makepath=True)\n\
         zk.stop()\n",
        &[connect, path, data],
    )
    .map(drop)
}

/// The `catalog-bridge` binary: Cargo's path for tests and benchmarks, else
/// `$CATALOG_BRIDGE_BIN` (set by `make demo`).
pub fn controller_bin() -> Result<std::path::PathBuf> {
    if let Some(p) = option_env!("CARGO_BIN_EXE_catalog-bridge") {
        return Ok(p.into());
    }
    std::env::var_os("CATALOG_BRIDGE_BIN")
        .map(Into::into)
        .context("CATALOG_BRIDGE_BIN is not set (make demo sets it)")
}

/// The controller binary, run as users run it, with its log in the environment's directory.
pub struct Controller {
    pub process: Process,
    pub metrics_port: u16,
    pub cluster_id: String,
    http: reqwest::Client,
}

impl Controller {
    /// Starts `catalog-bridge run` against the environment's API server.
    pub async fn start(
        env: &Env,
        name: &str,
        cluster_id: &str,
        extra: &[&str],
    ) -> Result<Controller> {
        Self::start_with_env(env, name, cluster_id, extra, &[]).await
    }

    pub fn spawn(env: &Env, name: &str, cluster_id: &str, extra: &[&str]) -> Result<Controller> {
        Self::spawn_with_env(env, name, cluster_id, extra, &[])
    }

    /// [`Controller::start`] with environment variables of its own.
    pub async fn start_with_env(
        env: &Env,
        name: &str,
        cluster_id: &str,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Result<Controller> {
        let c = Self::spawn_with_env(env, name, cluster_id, extra, vars)?;
        c.wait_ready().await?;
        Ok(c)
    }

    fn spawn_with_env(
        env: &Env,
        name: &str,
        cluster_id: &str,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Result<Controller> {
        Self::spawn_on(env, env.kube()?, name, Some(cluster_id), extra, vars)
    }

    /// Starts `catalog-bridge run` against the API server of `kube` (the environment's, or
    /// its [`Env::second_cluster`]); without `cluster_id`, as the chart runs it by default: no
    /// `--cluster-id`, the owner id is that cluster's `kube-system` UID (then `cluster_id`
    /// holds that UID).
    pub async fn start_on(
        env: &Env,
        kube: &localenv::kube::Kube,
        name: &str,
        cluster_id: Option<&str>,
        extra: &[&str],
    ) -> Result<Controller> {
        let mut c = Self::spawn_on(env, kube, name, cluster_id, extra, &[])?;
        if cluster_id.is_none() {
            c.cluster_id = kube_system_uid(&kube.client().await?).await?;
        }
        c.wait_ready().await?;
        Ok(c)
    }

    fn spawn_on(
        env: &Env,
        kube: &localenv::kube::Kube,
        name: &str,
        cluster_id: Option<&str>,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Result<Controller> {
        let metrics_port = localenv::ports::free_port()?;
        // The defaults first: `vars` may replace them (a KUBECONFIG through a proxy).
        let mut spec = Spec::new(name, controller_bin()?, env.dir())
            .env("KUBECONFIG", kube.kubeconfig_path())
            .env("RUST_LOG", "info,catalog_bridge=debug");
        for (k, v) in vars {
            spec = spec.env(k, v);
        }
        let mut spec = spec.arg("run");
        if let Some(id) = cluster_id {
            spec = spec.arg(format!("--cluster-id={id}"));
        }
        let spec = spec
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
            .arg(format!("--identity={name}"))
            .arg("--lease-namespace=default")
            .args(extra.iter().copied());
        Ok(Controller {
            process: Process::start(spec)?,
            metrics_port,
            cluster_id: cluster_id.unwrap_or_default().to_string(),
            http: localenv::http_client()?,
        })
    }

    /// Waits until `/readyz` answers 200 (every cache synced).
    pub async fn wait_ready(&self) -> Result<()> {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        localenv::ready::wait_ready(&self.process, Duration::from_secs(60), || async {
            Ok(self.http.get(&url).send().await?.status().is_success())
        })
        .await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Sum of the samples of `name` whose labels contain every `label="value"` given.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        Ok(sum_metric(&self.metrics().await?, name, labels))
    }

    pub async fn is_leader(&self) -> bool {
        self.metric("catalog_bridge_leader", &[]).await.ok() == Some(1.0)
    }

    pub fn log(&self) -> String {
        self.process.log_tail(200)
    }

    /// The whole log, for counting lines (the tail of [`Self::log`] moves on).
    pub fn full_log(&self) -> Result<String> {
        std::fs::read_to_string(self.process.log_path())
            .with_context(|| format!("reading {}", self.process.log_path().display()))
    }
}

pub fn sum_metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next().is_some_and(|n| n == name))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// A namespace, a Node and a Service `name` with `pods` ready Pods (10.<net>.0.1, .2, …) on
/// port 8080, annotated with `annotations`; returns the Pod names.
pub async fn deploy(
    client: &kube::Client,
    ns: &str,
    name: &str,
    net: u8,
    pods: usize,
    annotations: BTreeMap<String, String>,
) -> Result<Vec<String>> {
    workload::ensure_node(client, "node-1").await?;
    ensure_namespace(client, ns).await?;
    workload::create_service(client, ns, name, 8080, annotations).await?;
    let mut names = Vec::new();
    for i in 1..=pods {
        let pod = format!("{name}-{i}");
        let ip = format!("10.{net}.0.{i}");
        workload::create_pod(
            client,
            ns,
            &workload::PodSpec {
                name: &pod,
                app: name,
                node: "node-1",
                ip: &ip,
                port: 8080,
                ready: true,
            },
        )
        .await?;
        names.push(pod);
    }
    Ok(names)
}

/// [`deploy`] of `shop/api-x` (2 Pods, 10.1.0.1 and .2), exported to `export` (a
/// comma-separated list of ExternalCatalogs) under the name `api_x`.
pub async fn deploy_api_x(client: &kube::Client, export: &str) -> Result<Vec<String>> {
    deploy(
        client,
        "shop",
        "api-x",
        1,
        2,
        annotations(&[
            ("catalog-bridge.io/export", export),
            ("catalog-bridge.io/name", "api_x"),
        ]),
    )
    .await
}

/// Waits until ExternalCatalog `name` has condition `type_` with `status`; returns it.
pub async fn catalog_condition(
    client: &kube::Client,
    name: &str,
    type_: &str,
    status: &str,
) -> Result<catalog_bridge::api::crd::Condition> {
    let catalogs: Api<catalog_bridge::api::crd::ExternalCatalog> = Api::all(client.clone());
    localenv::eventually(
        &format!("{type_}={status} on {name}"),
        Duration::from_secs(30),
        || async {
            let c = catalogs.get(name).await?;
            Ok(c.status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == type_ && c.status == status))
        },
    )
    .await
}

pub async fn ensure_namespace(client: &kube::Client, ns: &str) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let obj: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    api.patch(ns, &PatchParams::apply("tests"), &Patch::Apply(&obj))
        .await
        .with_context(|| format!("creating namespace {ns}"))?;
    Ok(())
}

pub fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Consul read back over its HTTP API, as a discovery client and as an auditor would.
pub struct ConsulView {
    pub url: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl ConsulView {
    pub fn new(url: String) -> Result<ConsulView> {
        Ok(ConsulView {
            url,
            http: localenv::http_client()?,
            token: None,
        })
    }

    /// Reads with an ACL token, for a Consul with ACLs enabled.
    pub fn with_token(url: String, token: &str) -> Result<ConsulView> {
        Ok(ConsulView {
            token: Some(token.to_string()),
            ..ConsulView::new(url)?
        })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        Ok(req.send().await?.error_for_status()?.json().await?)
    }

    /// Reads through `http` (a client with a CA and a client certificate, for a TLS Consul).
    pub fn with_client(url: String, http: reqwest::Client) -> ConsulView {
        ConsulView {
            url,
            http,
            token: None,
        }
    }

    /// The names of every node in the catalog (`/v1/catalog/nodes`), sorted.
    pub async fn nodes(&self) -> Result<Vec<String>> {
        let nodes = self.get("/v1/catalog/nodes").await?;
        let mut names: Vec<String> = nodes
            .as_array()
            .context("/v1/catalog/nodes is not a list")?
            .iter()
            .filter_map(|n| n["Node"].as_str().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Sorted `ip:port` of the passing instances of `name` (`/v1/health/service/<name>?passing`).
    pub async fn passing(&self, name: &str) -> Result<Vec<String>> {
        let entries = self
            .get(&format!("/v1/health/service/{name}?passing"))
            .await?;
        let mut out: Vec<String> = entries
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        format!(
                            "{}:{}",
                            e["Service"]["Address"].as_str().unwrap_or_default(),
                            e["Service"]["Port"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        Ok(out)
    }

    /// Service ID → (CreateIndex, ModifyIndex, Meta) of every service on `node`.
    pub async fn node_services(&self, node: &str) -> Result<BTreeMap<String, (u64, u64, Value)>> {
        let v = self
            .get(&format!("/v1/catalog/node-services/{node}"))
            .await?;
        let mut out = BTreeMap::new();
        for s in v["Services"].as_array().cloned().unwrap_or_default() {
            out.insert(
                s["ID"].as_str().unwrap_or_default().to_string(),
                (
                    s["CreateIndex"].as_u64().unwrap_or(0),
                    s["ModifyIndex"].as_u64().unwrap_or(0),
                    s["Meta"].clone(),
                ),
            );
        }
        Ok(out)
    }

    /// CheckID → ModifyIndex of every check on `node`.
    pub async fn node_checks(&self, node: &str) -> Result<BTreeMap<String, u64>> {
        let v = self.get(&format!("/v1/health/node/{node}")).await?;
        Ok(v.as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| {
                (
                    c["CheckID"].as_str().unwrap_or_default().to_string(),
                    c["ModifyIndex"].as_u64().unwrap_or(0),
                )
            })
            .collect())
    }

    /// Registers a service by hand, as an operator or another tool would.
    pub async fn register(&self, node: &str, id: &str, name: &str, meta: Value) -> Result<()> {
        self.http
            .put(format!("{}/v1/catalog/register", self.url))
            .json(&json!({"Node": node, "Address": "127.0.0.1",
                          "Service": {"ID": id, "Service": name, "Address": "192.0.2.10", "Port": 1234, "Meta": meta}}))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Waits until the passing instances of `name` are exactly `want`.
    pub async fn wait_passing(&self, name: &str, want: &[&str], timeout: Duration) -> Result<()> {
        localenv::eventually(
            &format!("Consul to answer {name} @ {}", want.join(" & ")),
            timeout,
            || async {
                let got = self.passing(name).await?;
                if got == want {
                    Ok(Some(()))
                } else {
                    anyhow::bail!("got {got:?}")
                }
            },
        )
        .await
    }
}

/// The log of a process, for failure messages.
pub fn log_of(p: &Path) -> String {
    localenv::process::tail_of(p, 80)
}

/// Merges `patch` into the annotations of Service `ns/svc` (`null` removes one).
pub async fn annotate(client: &kube::Client, ns: &str, svc: &str, patch: Value) -> Result<()> {
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), ns)
        .patch(
            svc,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": patch}})),
        )
        .await
        .with_context(|| format!("annotating {ns}/{svc}"))?;
    Ok(())
}

/// Waits until ExternalRegistration `<ns>/<name>` has condition `type_` with `status`; returns
/// `reason: message`.
pub async fn registration_condition(
    client: &kube::Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
) -> Result<String> {
    let api: Api<catalog_bridge::api::crd::ExternalRegistration> =
        Api::namespaced(client.clone(), ns);
    localenv::eventually(
        &format!("{type_}={status} on {ns}/{name}"),
        Duration::from_secs(30),
        || async {
            let r = api.get(name).await?;
            Ok(r.status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map(|c| format!("{}: {}", c.reason, c.message)))
        },
    )
    .await
}

/// Waits for a Warning Event with `reason` about `kind` `<ns>/<name>`; returns its note.
pub async fn warning_event(
    client: &kube::Client,
    ns: &str,
    kind: &str,
    name: &str,
    reason: &str,
) -> Result<String> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    localenv::eventually(
        &format!("a {reason} Event on {kind} {ns}/{name}"),
        Duration::from_secs(30),
        || async {
            let events = api.list(&kube::api::ListParams::default()).await?;
            Ok(events.items.into_iter().find_map(|e| {
                let about = e.regarding.as_ref()?;
                (about.kind.as_deref() == Some(kind)
                    && about.name.as_deref() == Some(name)
                    && e.reason.as_deref() == Some(reason)
                    && e.type_.as_deref() == Some("Warning"))
                .then(|| e.note.clone().unwrap_or_default())
            }))
        },
    )
    .await
}

/// Sorted `ip:port` of the ready endpoints in the EndpointSlices of Service `<ns>/<svc>`.
pub async fn ready_endpoints(client: &kube::Client, ns: &str, svc: &str) -> Result<Vec<String>> {
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    let selector = format!("kubernetes.io/service-name={svc}");
    for s in slices
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?
        .items
    {
        let port = (s.ports.as_ref())
            .and_then(|p| p.first())
            .and_then(|p| p.port)
            .unwrap_or(0);
        for e in s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                out.extend(e.addresses.iter().map(|a| format!("{a}:{port}")));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Consul with ACLs, as its administrator: requests with the management token, and tokens made
/// for the controller.
pub struct ConsulAdmin {
    url: String,
    management: String,
    http: reqwest::Client,
}

impl ConsulAdmin {
    pub fn new(url: &str, management: &str) -> Result<ConsulAdmin> {
        Ok(ConsulAdmin {
            url: url.to_string(),
            management: management.to_string(),
            http: localenv::http_client()?,
        })
    }

    /// A request with the management token and a JSON body.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .header("X-Consul-Token", &self.management)
            .json(&body)
    }

    /// The ACL policy `catalog-bridge` with `rules`, a token holding it, and the token in
    /// Secret `default/consul-token`; the policy's ID (to change its rules later).
    pub async fn token_secret(&self, env: &Env, rules: &str) -> Result<String> {
        let created: Value = self
            .request(
                reqwest::Method::PUT,
                "/v1/acl/policy",
                json!({"Name": "catalog-bridge", "Rules": rules}),
            )
            .send()
            .await?
            .error_for_status()
            .context("creating the ACL policy")?
            .json()
            .await?;
        let policy_id = created["ID"].as_str().context("policy ID")?.to_string();
        let token: Value = self
            .request(
                reqwest::Method::PUT,
                "/v1/acl/token",
                json!({"Policies": [{"Name": "catalog-bridge"}]}),
            )
            .send()
            .await?
            .error_for_status()
            .context("creating the ACL token")?
            .json()
            .await?;
        let secret_id = token["SecretID"].as_str().context("token SecretID")?;
        kubectl_apply(
            env,
            &json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "consul-token", "namespace": "default"},
                    "stringData": {"token": secret_id}}),
        )?;
        Ok(policy_id)
    }
}
