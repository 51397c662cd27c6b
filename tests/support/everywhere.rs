//! One Service exported to every catalog in every layout at once, and what each layout's own
//! reader (py-consul's HTTP API, etcdctl, the etcd gRPC resolver, CoreDNS keys, kazoo) answers
//! for it: shared by the tests that follow an export through faults.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use localenv::Env;
use serde_json::{Value, json};

use super::{ConsulView, consul_catalog, kubectl_apply};

pub const WAIT: Duration = Duration::from_secs(30);
pub const CATALOGS: &str = "consul,etcd-plain,etcd-naming,etcd-coredns,zk-plain,zk-curator";

pub fn catalog(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
           "metadata": {"name": name}, "spec": spec})
}

/// Every peer, the CRDs, and one ExternalCatalog per layout.
pub async fn setup(etcd_ttl: i64, zk_timeout: i64) -> Result<(Env, kube::Client)> {
    let env = Env::builder().all().start().await?;
    let client = env.kube()?.client().await?;
    super::install_crds(&client).await?;
    let etcd = env.etcd()?.endpoint();
    let zk = env.zookeeper()?.connect_string();
    kubectl_apply(
        &env,
        &consul_catalog("consul", &[env.consul()?.url()], "k8s-test"),
    )?;
    for (name, layout) in [
        ("etcd-plain", "plain"),
        ("etcd-naming", "naming"),
        ("etcd-coredns", "coredns"),
    ] {
        kubectl_apply(
            &env,
            &catalog(
                name,
                json!({"etcd": {
            "endpoints": [etcd], "layout": layout, "leaseTTLSeconds": etcd_ttl, "zone": "bridge.local"}}),
            ),
        )?;
    }
    for (name, layout) in [("zk-plain", "plain"), ("zk-curator", "curator")] {
        let base = if layout == "plain" {
            "/services"
        } else {
            "/curator"
        };
        kubectl_apply(
            &env,
            &catalog(
                name,
                json!({"zookeeper": {
            "connect": zk, "layout": layout, "basePath": base, "sessionTimeoutSeconds": zk_timeout}}),
            ),
        )?;
    }
    Ok((env, client))
}

/// What each catalog's own reader answers for `api_x`, as sorted `ip:port` lists.
pub async fn answers(env: &Env) -> Result<Vec<(&'static str, Vec<String>)>> {
    let consul = ConsulView::new(env.consul()?.url())?;
    let etcd = env.etcd()?;
    let plain: Vec<String> = etcd
        .etcdctl(&[
            "get",
            "--prefix",
            "--print-value-only",
            "/services/api_x/providers/",
        ])?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    // What etcd's gRPC resolver resolves `etcd:///api_x` to, read by its endpoints manager
    // (which also refuses a value whose `Op` is not a number).
    let naming_addrs = etcd.resolve("api_x")?;
    let coredns = etcd.etcdctl(&["get", "--prefix", "/skydns/local/bridge/"])?;
    let mut dns = Vec::new();
    let lines: Vec<&str> = coredns.lines().collect();
    for pair in lines.chunks(2) {
        let [key, value] = pair else { continue };
        ensure!(
            *key == key.to_lowercase(),
            "CoreDNS keys are lower case: {key}"
        );
        let v: Value = serde_json::from_str(value)
            .with_context(|| format!("coredns value {value:?} at {key}"))?;
        if key.starts_with("/skydns/local/bridge/shop/api-x/") {
            dns.push(format!(
                "{}:{}",
                v["host"].as_str().unwrap_or_default(),
                v["port"]
            ));
        }
    }
    let kazoo = localenv::python(
        "import sys, json\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         plain = zk.get_children('/services/api_x/providers') if zk.exists('/services/api_x/providers') else []\n\
         cur = []\n\
         if zk.exists('/curator/api_x'):\n\
         \x20   for c in zk.get_children('/curator/api_x'):\n\
         \x20       d = json.loads(zk.get('/curator/api_x/' + c)[0])\n\
         \x20       assert d['id'] == c, (d, c)\n\
         \x20       assert d['serviceType'] == 'DYNAMIC' and 'enabled' not in d, d\n\
         \x20       cur.append('%s:%d' % (d['address'], d['port']))\n\
         print(json.dumps({'plain': sorted(plain), 'curator': sorted(cur)}))\n\
         zk.stop()\n",
        &[&env.zookeeper()?.connect_string()],
    )?;
    let z: Value = serde_json::from_str(kazoo.trim())?;
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = vec![
        ("consul", consul.passing("api_x").await?),
        ("etcd-plain", plain),
        ("etcd-naming", naming_addrs),
        ("etcd-coredns", dns),
        ("zk-plain", list(&z["plain"])),
        ("zk-curator", list(&z["curator"])),
    ];
    for (_, v) in &mut out {
        v.sort();
    }
    Ok(out)
}

pub async fn wait_everywhere(env: &Env, want: &[&str]) -> Result<()> {
    localenv::eventually(
        &format!("every catalog to answer {want:?}"),
        WAIT,
        || async {
            let a = answers(env).await?;
            if a.iter().all(|(_, v)| v == want) {
                Ok(Some(()))
            } else {
                anyhow::bail!("{a:?}")
            }
        },
    )
    .await
}

