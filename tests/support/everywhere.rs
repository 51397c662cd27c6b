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
    for (name, spec) in catalog_specs(&env, etcd_ttl, zk_timeout)? {
        kubectl_apply(&env, &catalog(name, spec))?;
    }
    Ok((env, client))
}

/// The name and spec of one ExternalCatalog per layout ([`CATALOGS`]) on the environment's
/// Consul, etcd and ZooKeeper.
pub fn catalog_specs(
    env: &Env,
    etcd_ttl: i64,
    zk_timeout: i64,
) -> Result<Vec<(&'static str, Value)>> {
    let etcd = env.etcd()?.endpoint();
    let zk = env.zookeeper()?.connect_string();
    let mut specs = vec![(
        "consul",
        consul_catalog("consul", &[env.consul()?.url()], "k8s-test")["spec"].clone(),
    )];
    for (name, layout) in [
        ("etcd-plain", "plain"),
        ("etcd-naming", "naming"),
        ("etcd-coredns", "coredns"),
    ] {
        specs.push((
            name,
            json!({"etcd": {"endpoints": [etcd], "layout": layout, "leaseTTLSeconds": etcd_ttl,
                            "zone": "bridge.local"}}),
        ));
    }
    for (name, layout, base) in [
        ("zk-plain", "plain", "/services"),
        ("zk-curator", "curator", "/curator"),
    ] {
        specs.push((
            name,
            json!({"zookeeper": {"connect": zk, "layout": layout, "basePath": base,
                                 "sessionTimeoutSeconds": zk_timeout}}),
        ));
    }
    Ok(specs)
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

/// What readers polling every 20 ms saw of `api_x` during a span: per catalog, how many looks
/// and how many of them missed an entry (fewer than `want` instances).
#[derive(Debug)]
pub struct Looks {
    pub catalog: &'static str,
    pub looks: u64,
    pub misses: u64,
}

/// Readers saw every instance at every look.
pub fn no_gap(looks: &[Looks]) -> Result<()> {
    println!("readers: {looks:?}");
    for l in looks {
        ensure!(
            l.looks >= 50 && l.misses == 0,
            "{}: {} of {} looks missed an instance",
            l.catalog,
            l.misses,
            l.looks
        );
    }
    Ok(())
}

/// Polls Consul (passing instances), etcd (the plain layout's keys) and ZooKeeper (the plain
/// and curator layouts' nodes, with kazoo) every 20 ms for `span`, as discovery clients that
/// poll would, and counts every look that found fewer than `want` instances. Runs as a task of
/// its own, so the test goes on meanwhile.
pub fn spawn_readers(
    env: &Env,
    want: usize,
    span: Duration,
) -> Result<tokio::task::JoinHandle<Result<Vec<Looks>>>> {
    let every = Duration::from_millis(20);
    let consul = {
        let http = localenv::http_client()?;
        let url = format!("{}/v1/health/service/api_x?passing", env.consul()?.url());
        async move {
            let (mut looks, mut misses) = (0, 0);
            let until = std::time::Instant::now() + span;
            while std::time::Instant::now() < until {
                let n = match http.get(&url).send().await {
                    Ok(r) => r.json::<Vec<Value>>().await.map(|v| v.len()).unwrap_or(0),
                    Err(_) => 0,
                };
                looks += 1;
                misses += u64::from(n < want);
                tokio::time::sleep(every).await;
            }
            Ok::<_, anyhow::Error>(Looks {
                catalog: "consul",
                looks,
                misses,
            })
        }
    };
    let etcd = {
        let endpoint = env.etcd()?.endpoint();
        async move {
            let mut client = etcd_client::Client::connect([endpoint], None)
                .await
                .context("connecting to etcd")?;
            let (mut looks, mut misses) = (0, 0);
            let until = std::time::Instant::now() + span;
            while std::time::Instant::now() < until {
                let n = client
                    .get(
                        "/services/api_x/providers/",
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_count_only(),
                        ),
                    )
                    .await
                    .map_or(0, |r| r.count());
                looks += 1;
                misses += u64::from(n < want as i64);
                tokio::time::sleep(every).await;
            }
            Ok::<_, anyhow::Error>(Looks {
                catalog: "etcd",
                looks,
                misses,
            })
        }
    };
    let connect = env.zookeeper()?.connect_string();
    let secs = span.as_secs_f64().to_string();
    // A child process killed when dropped: a test that fails meanwhile does not wait for it.
    let zookeeper = tokio::process::Command::new(localenv::programs::python()?)
        .arg("-c")
        .arg(
            "import sys, json, time\n\
             from kazoo.client import KazooClient\n\
             zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
             want, until = int(sys.argv[2]), time.time() + float(sys.argv[3])\n\
             looks, misses = 0, 0\n\
             def count(p):\n\
             \x20   try:\n\
             \x20       return len(zk.get_children(p))\n\
             \x20   except Exception:\n\
             \x20       return 0\n\
             while time.time() < until:\n\
             \x20   looks += 1\n\
             \x20   if count('/services/api_x/providers') < want or count('/curator/api_x') < want:\n\
             \x20       misses += 1\n\
             \x20   time.sleep(0.02)\n\
             print(json.dumps({'looks': looks, 'misses': misses}))\n\
             zk.stop()\n",
        )
        .args([connect, want.to_string(), secs])
        .kill_on_drop(true)
        .output();
    let zookeeper = async move {
        let out = zookeeper.await.context("running the ZooKeeper reader")?;
        anyhow::ensure!(
            out.status.success(),
            "the ZooKeeper reader failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value =
            serde_json::from_slice(&out.stdout).context("the ZooKeeper reader's answer")?;
        Ok::<_, anyhow::Error>(Looks {
            catalog: "zookeeper",
            looks: v["looks"].as_u64().unwrap_or(0),
            misses: v["misses"].as_u64().unwrap_or(u64::MAX),
        })
    };
    Ok(tokio::spawn(async move {
        let (consul, etcd, zookeeper) = tokio::join!(consul, etcd, zookeeper);
        Ok(vec![consul?, etcd?, zookeeper?])
    }))
}
