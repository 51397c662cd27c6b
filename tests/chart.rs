//! The Helm chart `charts/catalog-bridge`: it lints and its schema refuses bad values, it renders
//! what its values say, the real API server accepts every object it renders, and — the RBAC
//! proof — the controller, run with the chart's own arguments as the chart's ServiceAccount
//! (a real token from the TokenRequest API), exports to Consul, etcd and ZooKeeper end to end
//! (keeping the ZooKeeper session in the chart's Secret) and imports from ZooKeeper into a
//! Service with EndpointSlices, with no request refused, while requests outside its role are
//! refused.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use localenv::Env;
use localenv::process::{Process, Spec};
use serde_json::{Value, json};
use support::{
    ConsulView, annotations, consul_catalog_with_token, deploy, deploy_api_x, kubectl_apply,
};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/catalog-bridge");
const CHART_CRDS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/catalog-bridge/crds/crds.yaml"
);
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// helm and kubectl
// ---------------------------------------------------------------------------------------------

/// A scratch directory for this test binary (values files, helm's own directories).
fn scratch(name: &str) -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("chart-{}", std::process::id()))
        .join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// helm without a cluster (`lint`, `template`), with private helm directories.
fn helm(args: &[&str]) -> Result<String> {
    let home = scratch("helm-home")?;
    localenv::run_tool(
        Command::new(localenv::programs::helm()?)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env("KUBECONFIG", home.join("no-kubeconfig"))
            .args(args),
    )
}

/// Writes `values` (JSON is YAML) into a file and returns its path.
fn values_file(name: &str, values: &Value) -> Result<String> {
    let path = scratch("values")?.join(format!("{name}.yaml"));
    std::fs::write(&path, serde_json::to_vec_pretty(values)?)?;
    Ok(path.display().to_string())
}

/// `helm template cb <chart> -n cb-system -f <values>` as a list of objects.
fn render(name: &str, values: &Value) -> Result<Vec<Value>> {
    let file = values_file(name, values)?;
    let out = helm(&["template", "cb", CHART, "-n", "cb-system", "-f", &file])?;
    parse_objects(&out)
}

fn parse_objects(yaml: &str) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    k.sort();
    k
}

/// The rules of a (Cluster)Role as `(apiGroup, resource, resourceNames, verb)` strings, one per
/// combination, e.g. `"/secrets [] get"`.
fn rules(role: &Value) -> Vec<String> {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for rule in role["rules"].as_array().cloned().unwrap_or_default() {
        let names = strs(&rule["resourceNames"]).join(",");
        for group in strs(&rule["apiGroups"]) {
            for resource in strs(&rule["resources"]) {
                for verb in strs(&rule["verbs"]) {
                    out.push(format!("{group}/{resource} [{names}] {verb}"));
                }
            }
        }
    }
    out.sort();
    out
}

fn args_of(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Without a cluster: the files, lint, schema, rendering
// ---------------------------------------------------------------------------------------------

#[test]
fn the_chart_carries_the_repository_crds() -> Result<()> {
    let committed = std::fs::read(support::CRDS_FILE)?;
    let chart = std::fs::read(CHART_CRDS).with_context(|| format!("reading {CHART_CRDS}"))?;
    assert!(
        committed == chart,
        "charts/catalog-bridge/crds/crds.yaml differs from crds/crds.yaml; \
         copy it: cp crds/crds.yaml charts/catalog-bridge/crds/"
    );
    Ok(())
}

/// Values that set everything a platform team typically sets.
fn production_values() -> Value {
    json!({
        "clusterId": "prod-eu-1",
        "catalogs": [
            {"name": "consul", "spec": {"consul": {
                "addresses": ["http://consul-server.consul:8500"],
                "tokenSecretRef": {"namespace": "catalog-secrets", "name": "consul-token", "key": "token"}}}},
            {"name": "zk", "spec": {"zookeeper": {"connect": "zk-0.zk:2181,zk-1.zk:2181/services", "layout": "curator"}}},
            {"name": "etcd", "spec": {"etcd": {"endpoints": ["etcd-0.etcd:2379"], "layout": "coredns"},
                "policy": {"export": {"namespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "dns"}}}}}}},
        ],
        "serviceMonitor": {"enabled": false},
        "rbac": {"secretNamespaces": ["catalog-secrets"]},
        "image": {"repository": "registry.example.com/catalog-bridge", "tag": "0.1.0"},
        "podAnnotations": {"team": "platform"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
        "extraArgs": ["--a-future-flag=1"],
        "metricsBindAddress": "::",
        "leaseDuration": 8,
    })
}

#[test]
fn helm_lint_passes_and_the_schema_refuses_bad_values() -> Result<()> {
    let out = helm(&["lint", "--strict", CHART])?;
    println!("{out}");
    let good = values_file("lint-production", &production_values())?;
    helm(&["lint", "--strict", CHART, "-f", &good])?;

    for (name, bad, field) in [
        (
            "replicas-text",
            json!({"replicaCount": "two"}),
            "replicaCount",
        ),
        ("unknown-key", json!({"replicas": 2}), "replicas"),
        (
            "pull-policy",
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "pullPolicy",
        ),
        (
            "duration",
            json!({"driftInterval": "thirty seconds"}),
            "driftInterval",
        ),
        (
            "two-kinds",
            json!({"catalogs": [{"name": "c", "spec": {"consul": {}, "etcd": {}}}]}),
            "spec",
        ),
        (
            "policy-alone",
            json!({"catalogs": [{"name": "c", "spec": {"policy": {}}}]}),
            "spec",
        ),
        (
            "catalog-policy-key",
            json!({"catalogPolicy": {"exports": {}}}),
            "exports",
        ),
        (
            "catalog-name",
            json!({"catalogs": [{"name": "Not_A_Name", "spec": {"consul": {}}}]}),
            "name",
        ),
        (
            "secret-namespaces",
            json!({"rbac": {"secretNamespaces": "team-a"}}),
            "secretNamespaces",
        ),
        (
            "anti-affinity",
            json!({"podAntiAffinity": "maybe"}),
            "podAntiAffinity",
        ),
    ] {
        let file = values_file(&format!("bad-{name}"), &bad)?;
        for cmd in [
            vec!["lint", CHART, "-f", &file],
            vec!["template", "cb", CHART, "-f", &file],
        ] {
            let err = match helm(&cmd) {
                Ok(out) => bail!("helm {} accepted {bad}:\n{out}", cmd[0]),
                Err(e) => format!("{e:#}"),
            };
            ensure!(
                err.contains("schema") && err.contains(field),
                "helm {} refused {bad} but not with a schema error about {field}:\n{err}",
                cmd[0]
            );
        }
        println!("refused {bad}");
    }
    Ok(())
}

#[test]
fn helm_template_renders_what_the_values_say() -> Result<()> {
    // Defaults.
    let objects = render("defaults", &json!({}))?;
    println!("default objects: {:?}", kinds(&objects));
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole/cb-catalog-bridge",
            "ClusterRoleBinding/cb-catalog-bridge",
            "Deployment/cb-catalog-bridge",
            "PodDisruptionBudget/cb-catalog-bridge",
            "Role/cb-catalog-bridge",
            "RoleBinding/cb-catalog-bridge",
            "Service/cb-catalog-bridge-metrics",
            "ServiceAccount/cb-catalog-bridge",
        ]
    );
    let deploy = find(&objects, "Deployment", "cb-catalog-bridge").context("no Deployment")?;
    let pod = &deploy["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(pod["serviceAccountName"], "cb-catalog-bridge");
    assert_eq!(container["image"], "catalog-bridge:0.1.0");
    assert_eq!(
        args_of(deploy),
        [
            "run",
            "--log-format=json",
            "--log=info",
            "--metrics-addr=0.0.0.0:8080",
            "--lease-namespace=$(POD_NAMESPACE)",
            "--lease-name=cb-catalog-bridge",
            "--lease-duration=6s",
            "--identity=$(POD_NAME)",
            "--session-secret=cb-catalog-bridge-zk-sessions",
            "--drift-interval=30s",
        ],
        "no --cluster-id (the kube-system UID) and no --dry-run by default"
    );
    assert_eq!(
        container["env"],
        json!([
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ])
    );
    // Restricted Pod Security Standard, at pod and container level.
    for sc in [&pod["securityContext"], &container["securityContext"]] {
        assert_eq!(sc["runAsNonRoot"], true, "{sc}");
        assert_eq!(sc["runAsUser"], 65532, "{sc}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{sc}");
    }
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}})
    );
    let spread = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        [0]["podAffinityTerm"];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        spread["labelSelector"]["matchLabels"],
        deploy["spec"]["selector"]["matchLabels"]
    );
    let pdb = find(&objects, "PodDisruptionBudget", "cb-catalog-bridge").context("no PDB")?;
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let svc = find(&objects, "Service", "cb-catalog-bridge-metrics").context("no Service")?;
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}])
    );

    // RBAC: exactly the controller's requests, nothing with a wildcard.
    let cluster_role = find(&objects, "ClusterRole", "cb-catalog-bridge").context("ClusterRole")?;
    let cluster_rules = rules(cluster_role);
    println!("ClusterRole:\n  {}", cluster_rules.join("\n  "));
    assert_eq!(
        cluster_rules,
        [
            "/namespaces [] get",
            "/namespaces [] list",
            "/namespaces [] watch",
            "/secrets [] get",
            "/services [] create",
            "/services [] delete",
            "/services [] list",
            "/services [] patch",
            "/services [] watch",
            "catalog-bridge.io/externalcatalogs [] list",
            "catalog-bridge.io/externalcatalogs [] patch",
            "catalog-bridge.io/externalcatalogs [] watch",
            "catalog-bridge.io/externalcatalogs/status [] patch",
            "catalog-bridge.io/externalregistrations [] list",
            "catalog-bridge.io/externalregistrations [] watch",
            "catalog-bridge.io/externalregistrations/status [] patch",
            "discovery.k8s.io/endpointslices [] create",
            "discovery.k8s.io/endpointslices [] delete",
            "discovery.k8s.io/endpointslices [] list",
            "discovery.k8s.io/endpointslices [] patch",
            "discovery.k8s.io/endpointslices [] watch",
            "events.k8s.io/events [] create",
            "events.k8s.io/events [] patch",
        ]
    );
    let role = find(&objects, "Role", "cb-catalog-bridge").context("Role")?;
    assert_eq!(role["metadata"]["namespace"], "cb-system");
    let role_rules = rules(role);
    println!(
        "Role cb-system/cb-catalog-bridge:\n  {}",
        role_rules.join("\n  ")
    );
    assert_eq!(
        role_rules,
        [
            "/secrets [cb-catalog-bridge-zk-sessions] create",
            "/secrets [cb-catalog-bridge-zk-sessions] get",
            "/secrets [cb-catalog-bridge-zk-sessions] patch",
            "coordination.k8s.io/leases [] create",
            "coordination.k8s.io/leases [cb-catalog-bridge] get",
            "coordination.k8s.io/leases [cb-catalog-bridge] list",
            "coordination.k8s.io/leases [cb-catalog-bridge] patch",
            "coordination.k8s.io/leases [cb-catalog-bridge] watch",
        ]
    );
    for o in &objects {
        let text = serde_json::to_string(&o["rules"])?;
        assert!(!text.contains('*'), "a wildcard in {o}");
    }

    // Production values: cluster id, namespaced Secrets, catalogs, scheduling.
    let objects = render("production", &production_values())?;
    println!("production objects: {:?}", kinds(&objects));
    let deploy = find(&objects, "Deployment", "cb-catalog-bridge").context("no Deployment")?;
    let args = args_of(deploy);
    for arg in [
        "--cluster-id=prod-eu-1",
        "--metrics-addr=[::]:8080",
        "--lease-duration=8",
    ] {
        assert!(args.contains(&arg.to_string()), "{arg} in {args:?}");
    }
    assert_eq!(args.last().map(String::as_str), Some("--a-future-flag=1"));
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example.com/catalog-bridge:0.1.0"
    );
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(pod["tolerations"][0]["key"], "infra");
    assert_eq!(
        deploy["spec"]["template"]["metadata"]["annotations"],
        json!({"team": "platform"})
    );
    let cluster_rules = rules(find(&objects, "ClusterRole", "cb-catalog-bridge").context("CR")?);
    assert!(
        !cluster_rules.iter().any(|r| r.starts_with("/secrets")),
        "with secretNamespaces set, no Secrets cluster-wide: {cluster_rules:?}"
    );
    let secrets_role =
        find(&objects, "Role", "cb-catalog-bridge-secrets").context("no Secrets Role")?;
    assert_eq!(secrets_role["metadata"]["namespace"], "catalog-secrets");
    assert_eq!(rules(secrets_role), ["/secrets [] get"]);
    let binding =
        find(&objects, "RoleBinding", "cb-catalog-bridge-secrets").context("no RoleBinding")?;
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "cb-catalog-bridge", "namespace": "cb-system"}])
    );
    let catalogs: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ExternalCatalog")
        .collect();
    assert_eq!(catalogs.len(), 3);
    let consul = find(&objects, "ExternalCatalog", "consul").context("no consul catalog")?;
    assert_eq!(consul["apiVersion"], "catalog-bridge.io/v1alpha1");
    let mut with_policy = production_values()["catalogs"][0]["spec"].clone();
    with_policy["policy"] = json!({
        "export": {"namespaces": {"from": "All"}, "sharedNames": "Refuse"},
        "import": {"namespaces": {"from": "All"}},
    });
    assert_eq!(
        consul["spec"], with_policy,
        "the spec is passed through, with catalogPolicy as its policy"
    );
    let etcd = find(&objects, "ExternalCatalog", "etcd").context("no etcd catalog")?;
    assert_eq!(
        etcd["spec"],
        production_values()["catalogs"][2]["spec"],
        "a catalog's own policy is kept"
    );
    assert!(
        find(&objects, "ServiceMonitor", "cb-catalog-bridge").is_none(),
        "serviceMonitor.enabled=false renders no ServiceMonitor"
    );
    // With catalogs in values, a pre-delete hook deletes them (and waits) before Helm removes
    // the controller; its ServiceAccount may do that and nothing else, and its Pod is not one
    // of the controller's (Service, PodDisruptionBudget).
    let hook = find(&objects, "Job", "cb-catalog-bridge-uninstall").context("no hook Job")?;
    assert_eq!(
        hook["metadata"]["annotations"]["helm.sh/hook"],
        "pre-delete"
    );
    assert_eq!(
        args_of(hook),
        [
            "--log-format=json",
            "delete-catalogs",
            "--selector=app.kubernetes.io/name=catalog-bridge,app.kubernetes.io/instance=cb",
            "--timeout=4m",
        ]
    );
    for label in ["app.kubernetes.io/name", "app.kubernetes.io/instance"] {
        assert_eq!(
            consul["metadata"]["labels"][label],
            deploy["spec"]["selector"]["matchLabels"][label]
        );
    }
    assert!(
        hook["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"].is_null(),
        "the hook's Pod does not match the controller's selector"
    );
    let hook_role =
        find(&objects, "ClusterRole", "cb-catalog-bridge-uninstall").context("hook CR")?;
    assert_eq!(
        rules(hook_role),
        [
            "catalog-bridge.io/externalcatalogs [] delete",
            "catalog-bridge.io/externalcatalogs [] get",
            "catalog-bridge.io/externalcatalogs [] list",
            "catalog-bridge.io/externalcatalogs [] watch",
        ]
    );
    let without = render(
        "no-hook",
        &json!({"catalogs": production_values()["catalogs"], "uninstallHook": {"enabled": false}}),
    )?;
    assert!(find(&without, "Job", "cb-catalog-bridge-uninstall").is_none());

    // The switches.
    let objects = render(
        "switches",
        &json!({
            "serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}},
            "replicaCount": 1,
            "dryRun": true,
            "rbac": {"import": false},
            "podAntiAffinity": "hard",
        }),
    )?;
    let sm = find(&objects, "ServiceMonitor", "cb-catalog-bridge")
        .context("serviceMonitor.enabled=true renders a ServiceMonitor")?;
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert!(
        find(&objects, "PodDisruptionBudget", "cb-catalog-bridge").is_none(),
        "no PDB for a single replica (it would block every drain)"
    );
    let deploy = find(&objects, "Deployment", "cb-catalog-bridge").context("no Deployment")?;
    assert!(args_of(deploy).contains(&"--dry-run".to_string()));
    assert!(
        deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );
    let cluster_rules = rules(find(&objects, "ClusterRole", "cb-catalog-bridge").context("CR")?);
    assert!(
        !cluster_rules.iter().any(|r| r.ends_with(" create")
            && (r.starts_with("/services") || r.contains("endpointslices"))),
        "rbac.import=false: Services and EndpointSlices are read only: {cluster_rules:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Against the real API server
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_api_server_accepts_everything_the_chart_renders() -> Result<()> {
    let env = Env::builder().kube().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    for ns in ["cb-system", "catalog-secrets"] {
        support::ensure_namespace(&client, ns).await?;
    }
    for (name, values) in [("defaults", json!({})), ("production", production_values())] {
        let file = values_file(&format!("dry-run-{name}"), &values)?;
        let rendered =
            env.kube()?
                .helm(&["template", "cb", CHART, "-n", "cb-system", "-f", &file])?;
        let count = parse_objects(&rendered)?.len();
        let manifest = env.dir().join(format!("rendered-{name}.yaml"));
        std::fs::write(&manifest, &rendered)?;
        let out = env.kube()?.kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &manifest.display().to_string(),
        ])?;
        println!("{name}:\n{out}");
        let accepted = out
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        assert_eq!(accepted, count, "every rendered object accepted:\n{out}");
    }
    // The CEL/schema rules of the CRDs apply to catalogs declared in values too.
    let file = values_file(
        "dry-run-bad-catalog",
        &json!({"catalogs": [{"name": "bad", "spec": {"consul": {"addresses": ["consul:8500"]}}}]}),
    )?;
    let rendered = env
        .kube()?
        .helm(&["template", "cb", CHART, "-n", "cb-system", "-f", &file])?;
    let manifest = env.dir().join("rendered-bad.yaml");
    std::fs::write(&manifest, &rendered)?;
    let err = env
        .kube()?
        .kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &manifest.display().to_string(),
        ])
        .err()
        .context("an address without http:// must be refused by the CRD")?;
    println!("refused: {err:#}");
    assert!(format!("{err:#}").contains("addresses"), "{err:#}");

    // The Pod the Deployment makes passes the `restricted` Pod Security Standard, enforced
    // by the API server's PodSecurity admission; a Pod without the securityContext does not.
    kubectl_apply(
        &env,
        &json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "restricted", "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest"}}}),
    )?;
    let objects = render("psa", &json!({}))?;
    let deploy = find(&objects, "Deployment", "cb-catalog-bridge").context("no Deployment")?;
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": "cb-pod", "namespace": "restricted"},
                         "spec": deploy["spec"]["template"]["spec"].clone()});
    let apply_pod = |pod: &Value, name: &str| -> Result<String> {
        let path = env.dir().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec(pod)?)?;
        env.kube()?.kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &path.display().to_string(),
        ])
    };
    let out = apply_pod(&pod, "pod-restricted")?;
    println!("{out}");
    pod["spec"]
        .as_object_mut()
        .context("spec")?
        .remove("securityContext");
    pod["spec"]["containers"][0]
        .as_object_mut()
        .context("container")?
        .remove("securityContext");
    let err = apply_pod(&pod, "pod-unrestricted")
        .err()
        .context("PodSecurity must refuse a Pod without the securityContext")?;
    let err = format!("{err:#}");
    ensure!(err.contains("violates PodSecurity"), "{err}");
    println!("without the chart's securityContext: refused by PodSecurity");
    Ok(())
}

/// kubectl with a kubeconfig of its own (the ServiceAccount's).
struct Kubectl {
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(localenv::programs::kubectl()?);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args);
        Ok(cmd)
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        localenv::run_tool(&mut self.command(args)?)
    }

    /// `kubectl auth can-i …`: yes or no.
    fn can_i(&self, args: &[&str]) -> Result<bool> {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let out = self.command(&all)?.output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match answer.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => bail!(
                "kubectl auth can-i {args:?}: {answer} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Runs a request that must be refused with Forbidden.
    fn refused(&self, args: &[&str]) -> Result<()> {
        match self.run(args) {
            Ok(out) => bail!("kubectl {args:?} was allowed:\n{out}"),
            Err(e) => {
                let e = format!("{e:#}");
                ensure!(
                    e.contains("Forbidden") || e.contains("forbidden"),
                    "kubectl {args:?} failed, but not as Forbidden:\n{e}"
                );
                let why = e.lines().find(|l| l.contains("orbidden")).unwrap_or("");
                println!("refused: kubectl {} -> {}", args.join(" "), why.trim());
                Ok(())
            }
        }
    }
}

/// A kubeconfig for the same API server that authenticates with a token of ServiceAccount
/// `ns/sa` obtained from the TokenRequest API, as a Pod's projected token would.
fn service_account_kubeconfig(env: &Env, ns: &str, sa: &str) -> Result<Kubectl> {
    let token = env
        .kube()?
        .kubectl(&["create", "token", sa, "-n", ns, "--duration=2h"])?;
    let path = env.dir().join(format!("kubeconfig-{ns}-{sa}"));
    std::fs::copy(env.kube()?.kubeconfig_path(), &path)?;
    let k = Kubectl { kubeconfig: path };
    k.run(&[
        "config",
        "set-credentials",
        "chart-sa",
        &format!("--token={}", token.trim()),
    ])?;
    k.run(&["config", "set-context", "--current", "--user=chart-sa"])?;
    let who = k.run(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ])?;
    ensure!(
        who == format!("system:serviceaccount:{ns}:{sa}"),
        "the kubeconfig authenticates as {who:?}"
    );
    Ok(k)
}

/// Sorted values under `/services/<name>/providers/` in etcd (layout plain), read with etcdctl;
/// each key is the prefix followed by its value.
fn etcd_providers(env: &Env, name: &str) -> Result<Vec<String>> {
    let prefix = format!("/services/{name}/providers/");
    let out = env.etcd()?.etcdctl(&["get", "--prefix", &prefix])?;
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    let mut values = Vec::new();
    for pair in lines.chunks(2) {
        let [key, value] = pair else {
            bail!("etcdctl printed a key without a value:\n{out}")
        };
        ensure!(
            key.strip_prefix(&prefix) == Some(*value),
            "{key} = {value} is not <prefix><ip:port> = <ip:port>"
        );
        values.push(value.to_string());
    }
    values.sort();
    Ok(values)
}

/// The children of `/services/<name>/providers` in ZooKeeper (layout plain), read with kazoo's
/// `get_children`, sorted, and the session ids owning them (ephemeral nodes).
fn zookeeper_providers(env: &Env, name: &str) -> Result<(Vec<String>, Vec<i64>)> {
    let out = localenv::python(
        "import sys, json\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         base = '/services/%s/providers' % sys.argv[2]\n\
         children = sorted(zk.get_children(base)) if zk.exists(base) else []\n\
         owners = sorted({zk.exists(base + '/' + c).ephemeralOwner for c in children})\n\
         print(json.dumps({'children': children, 'owners': owners}))\n\
         zk.stop()\n",
        &[&env.zookeeper()?.connect_string(), name],
    )?;
    let v: Value = serde_json::from_str(out.trim()).with_context(|| format!("kazoo: {out}"))?;
    let children = v["children"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let owners = v["owners"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    Ok((children, owners))
}

/// Waits until etcdctl and kazoo both answer exactly `want` for `name`; returns the one
/// ZooKeeper session that owns the entries.
async fn wait_etcd_and_zookeeper(env: &Env, name: &str, want: &[&str]) -> Result<i64> {
    localenv::eventually(
        &format!("etcd and ZooKeeper to answer {name} @ {}", want.join(" & ")),
        WAIT,
        || async {
            let etcd = etcd_providers(env, name)?;
            let (zk, owners) = zookeeper_providers(env, name)?;
            match owners.as_slice() {
                [owner] if etcd == want && zk == want => Ok(Some(*owner)),
                _ => bail!("etcd {etcd:?}, ZooKeeper {zk:?} owned by sessions {owners:?}"),
            }
        },
    )
    .await
}

/// Waits until the imported Service `svc` of namespace `shop` exists and its EndpointSlices
/// list exactly the ready addresses `want` (space-separated, sorted); returns the slices.
async fn wait_imported(env: &Env, svc: &str, want: &str) -> Result<String> {
    localenv::eventually(
        &format!("Service shop/{svc} with endpoints {want}"),
        WAIT,
        || async {
            env.kube()?
                .kubectl(&["get", "service", svc, "-n", "shop", "-o", "name"])?;
            let selector = format!("kubernetes.io/service-name={svc}");
            let slices = |output: &[&str]| {
                let mut args = vec!["get", "endpointslices", "-n", "shop", "-l", &selector];
                args.extend_from_slice(output);
                env.kube()?.kubectl(&args)
            };
            let out = slices(&[
                "-o",
                "jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{\"\\n\"}{end}",
            ])?;
            let mut got: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
            got.sort();
            let got = got.join(" ");
            ensure!(got == want, "ready endpoints {got:?}");
            Ok(Some(slices(&[])?))
        },
    )
    .await
}

/// The whole log of the controller, and the lines of it where a request was refused.
fn refusals(process: &Process) -> Result<(String, Vec<String>)> {
    let log = std::fs::read_to_string(process.log_path())
        .with_context(|| format!("reading {}", process.log_path().display()))?;
    let bad = log
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("forbidden") || (l.contains("unauthorized") && !l.contains("consul"))
        })
        .map(str::to_string)
        .collect();
    Ok((log, bad))
}

fn assert_nothing_refused(process: &Process, when: &str) -> Result<()> {
    let (log, bad) = refusals(process)?;
    ensure!(
        bad.is_empty(),
        "the API server refused requests of the controller {when}:\n{}\n--- the whole log ---\n{log}",
        bad.join("\n")
    );
    Ok(())
}

/// Waits until condition `type_` of the object `kubectl get <what>` is True; returns it.
async fn condition_true(env: &Env, what: &[&str], type_: &str) -> Result<String> {
    let jsonpath = format!(
        "jsonpath={{.status.conditions[?(@.type==\"{type_}\")].status}} {{.status.conditions[?(@.type==\"{type_}\")].message}}"
    );
    localenv::eventually(&format!("{type_}=True on {what:?}"), WAIT, || async {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", &jsonpath]);
        let out = env.kube()?.kubectl(&args)?;
        Ok(out.starts_with("True").then_some(out))
    })
    .await
}

#[tokio::test]
async fn the_chart_rbac_is_enough_for_the_controller_and_no_more() -> Result<()> {
    const TOKEN: &str = "0d6a3c52-1f4e-4b8a-9c7d-2e5f6a7b8c9d";
    const NS: &str = "cb-system";
    const SA: &str = "cb-catalog-bridge";
    // Where the ZooKeeper backend keeps its session: `<release>-zk-sessions`, one key per
    // catalog, created by server-side apply.
    const SESSIONS: &str = "cb-catalog-bridge-zk-sessions";
    let env = Env::builder()
        .controller_manager()
        .consul_with_acl(TOKEN)
        .etcd()
        .zookeeper()
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    let consul = env.consul()?.url();
    let etcd = env.etcd()?.endpoint();
    let zk = env.zookeeper()?.connect_string();
    let http = localenv::http_client()?;
    let consul_view = ConsulView::with_token(consul.clone(), TOKEN)?;

    // The Consul ACL token in a Secret of its own namespace: the export only works if the
    // ServiceAccount may read it.
    support::ensure_namespace(&client, "catalog-secrets").await?;
    kubectl_apply(
        &env,
        &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "consul-token", "namespace": "catalog-secrets"},
                "stringData": {"token": TOKEN}}),
    )?;

    // helm install, with the catalogs declared in values and Secrets limited to one namespace.
    let values = json!({
        "catalogs": [
            {"name": "consul", "spec": {"consul": {
                "addresses": [consul],
                "nodeName": "k8s-chart",
                "tokenSecretRef": {"namespace": "catalog-secrets", "name": "consul-token", "key": "token"},
            }}},
            {"name": "etcd", "spec": {"etcd": {"endpoints": [etcd], "layout": "plain"}}},
            {"name": "zk", "spec": {"zookeeper": {"connect": zk, "layout": "plain"}}},
        ],
        "rbac": {"secretNamespaces": ["catalog-secrets"]},
    });
    let file = values_file("install", &values)?;
    let out = env.kube()?.helm(&[
        "install",
        "cb",
        CHART,
        "-n",
        NS,
        "--create-namespace",
        "-f",
        &file,
    ])?;
    println!("{out}");
    assert!(
        out.contains("kubectl get xcat,xreg"),
        "NOTES.txt says how to look: {out}"
    );
    assert!(
        out.contains("This release declared the catalogs consul, etcd, zk")
            && !out.contains("kind: ExternalCatalog"),
        "NOTES.txt names the catalogs from values, and offers none to overwrite them: {out}"
    );
    let installed = env.kube()?.kubectl(&[
        "get",
        "crd,xcat,deploy,sa,role,rolebinding,clusterrole,clusterrolebinding,svc,pdb",
        "-A",
        "-l",
        "app.kubernetes.io/instance=cb",
        "-o",
        "name",
    ])?;
    println!("{installed}");
    env.kube()?
        .kubectl(&["get", "crd", "externalregistrations.catalog-bridge.io"])
        .context("helm installed the CRDs from crds/")?;
    let secrets = Api::<Secret>::namespaced(client.clone(), NS);
    ensure!(
        secrets.get_opt(SESSIONS).await?.is_none(),
        "the chart does not create the session Secret; the controller does"
    );

    // The controller, with the Deployment's own arguments, authenticated as its ServiceAccount.
    let deployment: Value = serde_json::from_str(&env.kube()?.kubectl(&[
        "get",
        "deployment",
        SA,
        "-n",
        NS,
        "-o",
        "json",
    ])?)?;
    let pod_name = "cb-catalog-bridge-7d9f8-x2x4q";
    let metrics_port = localenv::ports::free_port()?;
    let args: Vec<String> = args_of(&deployment)
        .into_iter()
        .map(|a| {
            a.replace("$(POD_NAMESPACE)", NS)
                .replace("$(POD_NAME)", pod_name)
                .replace(
                    "--metrics-addr=0.0.0.0:8080",
                    &format!("--metrics-addr=127.0.0.1:{metrics_port}"),
                )
        })
        .collect();
    println!("catalog-bridge {}", args.join(" "));
    ensure!(
        !args.iter().any(|a| a.starts_with("--cluster-id")),
        "clusterId is empty: the controller reads the kube-system UID (and may)"
    );
    let sa = service_account_kubeconfig(&env, NS, SA)?;
    let spec = Spec::new(
        "catalog-bridge-as-sa",
        support::controller_bin()?,
        env.dir(),
    )
    .env("KUBECONFIG", &sa.kubeconfig)
    .env("POD_NAME", pod_name)
    .env("POD_NAMESPACE", NS)
    .args(args);
    let cb = Process::start(spec)?;
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    localenv::ready::wait_ready(&cb, Duration::from_secs(60), || async {
        let text = http.get(&metrics_url).send().await?.text().await?;
        Ok(support::sum_metric(&text, "catalog_bridge_leader", &[]) == 1.0)
    })
    .await
    .context("the controller as the ServiceAccount: caches synced and Lease taken")?;
    let holder = env.kube()?.kubectl(&[
        "get",
        "lease",
        SA,
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    assert_eq!(holder, pod_name, "the chart's Lease, held by this replica");

    // Export by annotation, to the three catalogs.
    deploy_api_x(&client, "consul,etcd,zk").await?;
    consul_view
        .wait_passing("api_x", &["10.1.0.1:8080", "10.1.0.2:8080"], WAIT)
        .await
        .with_context(|| cb.log_tail(60))?;
    println!("api_x exported to Consul through the ACL, as the ServiceAccount");
    let zk_owner = wait_etcd_and_zookeeper(&env, "api_x", &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| cb.log_tail(60))?;
    println!(
        "api_x exported to etcd (etcdctl) and ZooKeeper (kazoo, session {zk_owner:#x}), as the ServiceAccount"
    );
    for catalog in ["etcd", "zk"] {
        let ready = condition_true(&env, &["xcat", catalog], "Ready").await?;
        println!("xcat {catalog} Ready: {ready}");
    }

    // The ZooKeeper session, kept in the chart's Secret (created by server-side apply, as the
    // ServiceAccount): the very session that owns the ephemeral entries.
    let secret = secrets
        .get_opt(SESSIONS)
        .await?
        .with_context(|| format!("no Secret {NS}/{SESSIONS}:\n{}", cb.log_tail(60)))?;
    let data = secret.data.clone().unwrap_or_default();
    ensure!(
        data.keys().eq(["zk.json"]),
        "one key per ZooKeeper catalog, `<catalog>.json`: {:?}",
        data.keys().collect::<Vec<_>>()
    );
    let stored: Value = serde_json::from_slice(&data["zk.json"].0).context("zk.json")?;
    ensure!(
        stored["id"].as_i64() == Some(zk_owner),
        "the stored session {} owns the entries ({zk_owner:#x})",
        stored["id"]
    );
    let managers: Vec<String> = secret
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            format!(
                "{} {}",
                f.manager.unwrap_or_default(),
                f.operation.unwrap_or_default()
            )
        })
        .collect();
    ensure!(
        managers == ["catalog-bridge-zk.json Apply"],
        "written by server-side apply only: {managers:?}"
    );
    println!("Secret {NS}/{SESSIONS}: key zk.json, session {zk_owner:#x}, {managers:?}");

    // Export by ExternalRegistration: its status is written.
    deploy(&client, "shop", "api-y", 2, 1, Default::default()).await?;
    kubectl_apply(
        &env,
        &json!({"apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
                "metadata": {"name": "api-y", "namespace": "shop"},
                "spec": {"catalogRef": {"name": "consul"}, "direction": "Export",
                         "service": {"name": "api-y"}, "externalName": "api_y"}}),
    )?;
    consul_view
        .wait_passing("api_y", &["10.2.0.1:8080"], WAIT)
        .await?;
    let ready = condition_true(&env, &["xreg", "api-y", "-n", "shop"], "Ready").await?;
    println!("xreg shop/api-y Ready: {ready}");
    condition_true(&env, &["xreg", "api-y", "-n", "shop"], "Synced").await?;
    let ready = condition_true(&env, &["xcat", "consul"], "Ready").await?;
    println!("xcat consul Ready: {ready}");

    // A bad annotation: a Warning Event (events.k8s.io) from the controller.
    deploy(
        &client,
        "shop",
        "bad",
        3,
        1,
        annotations(&[("catalog-bridge.io/export", "nope")]),
    )
    .await?;
    let event = localenv::eventually("a Warning Event on shop/bad", WAIT, || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "events.events.k8s.io",
            "-n",
            "shop",
            "-o",
            "jsonpath={range .items[*]}{.regarding.name} {.type} {.reason} {.reportingController}: {.note}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .find(|l| l.starts_with("bad Warning CatalogNotFound catalog-bridge"))
            .map(str::to_string))
    })
    .await?;
    println!("event: {event}");

    // Readiness still followed (the watches run as the ServiceAccount too).
    localenv::workload::set_pod_ready(&client, "shop", "api-x-2", false).await?;
    consul_view
        .wait_passing("api_x", &["10.1.0.1:8080"], WAIT)
        .await?;
    wait_etcd_and_zookeeper(&env, "api_x", &["10.1.0.1:8080"]).await?;

    // Import, as the ServiceAccount: mysql_x, registered in ZooKeeper by an outside client
    // (kazoo), becomes a selector-less Service with an EndpointSlice (create), follows the
    // catalog (patch), and goes when its registration goes (list by label, delete).
    let kazoo = |script: &str| {
        localenv::python(
            &format!(
                "import sys\nfrom kazoo.client import KazooClient\n\
                 zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
                 base = '/services/mysql_x/providers/'\n{script}\nzk.stop()\n"
            ),
            &[&zk],
        )
    };
    kazoo(
        "zk.create(base + '10.7.0.8:3306', b'', makepath=True)\n\
         zk.create(base + '10.7.0.9:3306', b'', makepath=True)",
    )?;
    kubectl_apply(
        &env,
        &json!({"apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
                "metadata": {"name": "mysql-x", "namespace": "shop"},
                "spec": {"catalogRef": {"name": "zk"}, "direction": "Import",
                         "externalName": "mysql_x",
                         "target": {"ports": [{"name": "mysql", "port": 3306}]}}}),
    )?;
    let slice = wait_imported(&env, "mysql-x", "10.7.0.8 10.7.0.9")
        .await
        .with_context(|| cb.log_tail(60))?;
    println!("mysql_x imported, as the ServiceAccount: {slice}");
    let ready = condition_true(&env, &["xreg", "mysql-x", "-n", "shop"], "Ready").await?;
    println!("xreg shop/mysql-x Ready: {ready}");
    kazoo("zk.delete(base + '10.7.0.9:3306')")?;
    wait_imported(&env, "mysql-x", "10.7.0.8").await?;
    env.kube()?
        .kubectl(&["delete", "xreg", "mysql-x", "-n", "shop", "--wait"])?;
    localenv::eventually("the imported Service deleted", WAIT, || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "service,endpointslices",
            "-n",
            "shop",
            "-l",
            "catalog-bridge.io/registration=mysql-x",
            "-o",
            "name",
        ])?;
        Ok(out.trim().is_empty().then_some(()))
    })
    .await
    .with_context(|| cb.log_tail(60))?;
    println!("registration deleted: the Service and its EndpointSlices are gone");

    // Not one request of the controller was refused.
    let (log, _) = refusals(&cb)?;
    ensure!(
        log.contains("became the leader") && log.contains("catalog writer starting"),
        "the controller's log is where it should be:\n{log}"
    );
    ensure!(
        log.contains("new ZooKeeper session")
            && !log.contains("could not store the ZooKeeper session"),
        "the ZooKeeper session was stored:\n{log}"
    );
    assert_nothing_refused(&cb, "during the export")?;

    // Outside the role: refused.
    sa.refused(&["delete", "namespace", "kube-public"])?;
    sa.refused(&["label", "namespace", "default", "x=y"])?;
    sa.refused(&["get", "secrets", "-A"])?;
    sa.refused(&["get", "secrets", "-n", "catalog-secrets"])?; // get by name only, no list
    sa.refused(&["get", "secret", "consul-token", "-n", "default"])?;
    sa.refused(&["get", "pods", "-A"])?;
    sa.refused(&["create", "deployment", "x", "--image=x", "-n", "shop"])?;
    sa.refused(&[
        "get",
        "lease",
        "kube-controller-manager",
        "-n",
        "kube-system",
    ])?;
    sa.refused(&["get", "lease", "other", "-n", NS])?;
    // The session Secret by name only: no other Secret of the release namespace, and no delete.
    sa.refused(&["get", "secret", "other", "-n", NS])?;
    sa.refused(&["get", "secrets", "-n", NS])?;
    sa.refused(&["delete", "secret", SESSIONS, "-n", NS])?;
    sa.refused(&["create", "secret", "generic", "other", "-n", NS])?;
    sa.refused(&["delete", "xcat", "consul"])?;
    sa.refused(&[
        "create",
        "clusterrolebinding",
        "x",
        "--clusterrole=cluster-admin",
        &format!("--serviceaccount={NS}:{SA}"),
    ])?;
    // Inside it, positively.
    sa.run(&[
        "get",
        "secret",
        "consul-token",
        "-n",
        "catalog-secrets",
        "-o",
        "name",
    ])?;
    ensure!(
        sa.can_i(&["create", &format!("secrets/{SESSIONS}"), "-n", NS])?,
        "the session Secret may be created (by server-side apply, under its name)"
    );
    ensure!(
        !sa.can_i(&["create", "secrets", "-n", NS])?,
        "no Secret of another name"
    );
    ensure!(
        !sa.can_i(&["update", &format!("secrets/{SESSIONS}"), "-n", NS])?,
        "patch (apply) only"
    );
    ensure!(
        sa.can_i(&["create", "services", "-n", "shop"])?,
        "import may create Services"
    );
    ensure!(
        sa.can_i(&["delete", "endpointslices.discovery.k8s.io", "-n", "shop"])?,
        "import may delete EndpointSlices"
    );
    ensure!(!sa.can_i(&[
        "update",
        &format!("leases.coordination.k8s.io/{SA}"),
        "-n",
        NS
    ])?);
    ensure!(
        !sa.can_i(&["get", "services", "-n", "shop"])?,
        "list and watch only"
    );
    ensure!(
        !sa.can_i(&["update", "services", "-n", "shop"])?,
        "imports are applied (patch), never replaced"
    );

    // No wildcard anywhere in what the ServiceAccount may do.
    for ns in [NS, "shop", "catalog-secrets"] {
        let list = sa.run(&["auth", "can-i", "--list", "-n", ns])?;
        println!("kubectl auth can-i --list -n {ns} (as {SA}):\n{list}");
        for line in list.lines().skip(1) {
            let (resource, rest) = line.split_once(' ').unwrap_or((line, ""));
            let verbs = rest.rsplit('[').next().unwrap_or("");
            ensure!(!verbs.contains('*'), "a wildcard verb: {line}");
            ensure!(!resource.starts_with('*'), "a wildcard resource: {line}");
        }
    }

    // helm upgrade to the defaults (Secrets cluster-wide, import off): the rules follow, and
    // the running controller is unaffected.
    let values = json!({
        "catalogs": values["catalogs"],
        "rbac": {"import": false},
    });
    let file = values_file("upgrade", &values)?;
    env.kube()?
        .helm(&["upgrade", "cb", CHART, "-n", NS, "-f", &file])?;
    localenv::eventually("the upgraded rules in force", WAIT, || async {
        Ok(sa
            .can_i(&["get", "secrets", "-n", "default"])?
            .then_some(()))
    })
    .await
    .context("Secrets cluster-wide by default")?;
    ensure!(
        !sa.can_i(&["list", "secrets", "-n", "default"])?,
        "get only"
    );
    ensure!(
        !sa.can_i(&["create", "services", "-n", "shop"])?,
        "rbac.import=false"
    );
    ensure!(!sa.can_i(&["create", "endpointslices.discovery.k8s.io", "-n", "shop"])?);
    localenv::workload::set_pod_ready(&client, "shop", "api-x-2", true).await?;
    consul_view
        .wait_passing("api_x", &["10.1.0.1:8080", "10.1.0.2:8080"], WAIT)
        .await?;
    let owner_after =
        wait_etcd_and_zookeeper(&env, "api_x", &["10.1.0.1:8080", "10.1.0.2:8080"]).await?;
    ensure!(
        owner_after == zk_owner,
        "the same ZooKeeper session throughout"
    );
    assert_nothing_refused(&cb, "after the upgrade")?;
    ensure!(
        cb.is_running(),
        "the controller is still running:\n{}",
        cb.log_tail(40)
    );

    // And the other way round: with Secrets limited to a namespace that does not hold the
    // token, a new catalog cannot read it — the status says so, and the log check above
    // would have caught it.
    let values = json!({
        "catalogs": values["catalogs"],
        "rbac": {"secretNamespaces": ["shop"]},
    });
    let file = values_file("upgrade-shop-secrets", &values)?;
    env.kube()?
        .helm(&["upgrade", "cb", CHART, "-n", NS, "-f", &file])?;
    localenv::eventually("Secrets limited to shop", WAIT, || async {
        Ok((!sa.can_i(&["get", "secrets", "-n", "catalog-secrets"])?).then_some(()))
    })
    .await?;
    kubectl_apply(
        &env,
        &consul_catalog_with_token(
            "consul-2",
            std::slice::from_ref(&consul),
            "k8s-chart-2",
            "catalog-secrets",
            "consul-token",
        ),
    )?;
    let status = localenv::eventually("consul-2 to report the refused Secret", WAIT, || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "xcat",
            "consul-2",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}: {.status.conditions[?(@.type==\"Ready\")].message}",
        ])?;
        Ok(out.starts_with("SecretForbidden").then_some(out))
    })
    .await?;
    println!("consul-2: {status}");
    ensure!(
        status.contains("forbidden") && status.contains("rbac.secretNamespaces"),
        "{status}"
    );
    let (_, refused) = refusals(&cb)?;
    ensure!(!refused.is_empty(), "the log check sees a refused request");
    println!("the log check sees it:\n{}", refused.join("\n"));

    // Uninstall as Helm does: the pre-delete hook first, while the controller runs — it deletes
    // the release's catalogs and waits until the controller has removed this cluster's entries
    // from each (ZooKeeper's through the session the chart's Secret keeps) and lifted their
    // finalizers. The harness has no node to run the hook Job's Pod, so the test runs its
    // command, with the Job's own arguments, as the hook's own ServiceAccount.
    let hook = parse_objects(&env.kube()?.helm(&[
        "template",
        "cb",
        CHART,
        "-n",
        NS,
        "-f",
        &file,
        "--show-only",
        "templates/uninstall-hook.yaml",
    ])?)?;
    for o in hook.iter().filter(|o| o["kind"] != "Job") {
        kubectl_apply(&env, o)?;
    }
    let job = find(&hook, "Job", "cb-catalog-bridge-uninstall").context("the hook Job")?;
    let hook_sa = service_account_kubeconfig(&env, NS, "cb-catalog-bridge-uninstall")?;
    hook_sa.refused(&["get", "secrets", "-n", NS])?;
    let t = std::time::Instant::now();
    let out = localenv::run_tool(
        Command::new(support::controller_bin()?)
            .env("KUBECONFIG", &hook_sa.kubeconfig)
            .args(args_of(job)),
    )?;
    println!("the pre-delete hook: {} ({:?})", out.trim(), t.elapsed());
    ensure!(out.contains("deleted consul, etcd, zk"), "{out}");
    ensure!(
        consul_view.passing("api_x").await?.is_empty()
            && consul_view.passing("api_y").await?.is_empty(),
        "Consul emptied"
    );
    let nodes = consul_view.nodes().await?;
    ensure!(
        !nodes.iter().any(|n| n == "k8s-chart"),
        "the empty synthetic node went with its last service: {nodes:?}"
    );
    let etcd_left = etcd_providers(&env, "api_x")?;
    let (zk_left, _) = zookeeper_providers(&env, "api_x")?;
    ensure!(
        etcd_left.is_empty() && zk_left.is_empty(),
        "etcd {etcd_left:?} and ZooKeeper {zk_left:?} emptied"
    );
    let (log, refused) = refusals(&cb)?;
    ensure!(
        !refused.iter().any(|r| r.contains("finalizer")) && !log.contains("finalizer failed"),
        "the finalizer was put and lifted, as the ServiceAccount: {refused:?}"
    );
    ensure!(
        log.contains("its entries are removed: the ExternalCatalog goes"),
        "each catalog let go once emptied:\n{log}"
    );

    // A catalog deleted once the controller is gone stays, held by the finalizer;
    // `catalog-bridge cleanup` removes its entries (none here: its Secret was out of reach)
    // and lets it go.
    cb.stop()?;
    env.kube()?
        .kubectl(&["delete", "xcat", "consul-2", "--wait=false"])?;
    let held = env.kube()?.kubectl(&[
        "get",
        "xcat",
        "consul-2",
        "-o",
        "jsonpath={.metadata.deletionTimestamp} {.metadata.finalizers}",
    ])?;
    println!("consul-2 deleted with no controller running: {held}");
    ensure!(held.contains("catalog-bridge.io/cleanup"), "held: {held}");
    let out = localenv::run_tool(
        Command::new(support::controller_bin()?)
            .env("KUBECONFIG", env.kube()?.kubeconfig_path())
            .args(["cleanup", "--catalog", "consul-2"])
            .args(["--session-namespace", NS, "--session-secret", SESSIONS]),
    )?;
    println!("cleanup consul-2: {}", out.trim());
    ensure!(
        out.starts_with("removed 0 entries") && out.contains("its finalizer is lifted"),
        "{out}"
    );
    localenv::eventually("consul-2 gone", WAIT, || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "xcat",
            "consul-2",
            "--ignore-not-found",
            "-o",
            "name",
        ])?;
        Ok(out.trim().is_empty().then_some(()))
    })
    .await?;
    // The hook has run: Helm must not start its Job again (no node would run it).
    env.kube()?
        .helm(&["uninstall", "cb", "-n", NS, "--no-hooks"])?;
    env.kube()?.kubectl(&[
        "delete",
        "serviceaccount,clusterrole,clusterrolebinding",
        "cb-catalog-bridge-uninstall",
        "-n",
        NS,
    ])?;
    env.kube()?.kubectl(&[
        "delete",
        "lease,secret",
        SA,
        SESSIONS,
        "-n",
        NS,
        "--ignore-not-found",
    ])?;
    let left = env.kube()?.kubectl(&[
        "get",
        "deploy,sa,role,rolebinding,clusterrole,clusterrolebinding,svc,pdb,lease,secret,xcat",
        "-A",
        "-o",
        "name",
    ])?;
    for gone in [
        format!("deployment.apps/{SA}"),
        format!("clusterrole.rbac.authorization.k8s.io/{SA}"),
        format!("lease.coordination.k8s.io/{SA}"),
        format!("secret/{SESSIONS}"),
        "externalcatalog.catalog-bridge.io/consul".to_string(),
        "externalcatalog.catalog-bridge.io/consul-2".to_string(),
    ] {
        ensure!(
            !left.lines().any(|l| l == gone),
            "{gone} is left after the uninstall:\n{left}"
        );
    }
    env.kube()?
        .kubectl(&["get", "crd", "externalregistrations.catalog-bridge.io"])
        .context("helm keeps the CRDs (and the objects of them made with kubectl)")?;
    println!(
        "uninstalled; in {NS}:\n{}",
        env.kube()?
            .kubectl(&["get", "all,lease,secret,role,rolebinding", "-n", NS])?
    );
    Ok(())
}
