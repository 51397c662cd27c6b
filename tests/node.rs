//! The chart on a real node (`make test-node`): the image built without Docker and loaded into
//! containerd, two replicas running as Pods under kubelet, through `helm install`, a rolling
//! update, the leader Pod deleted, both replicas evicted at once (the PodDisruptionBudget
//! refuses the second) and `helm uninstall`, with readers polling the catalogs
//! every 20 ms. Real parts only: kube-apiserver, kube-controller-manager, kube-scheduler,
//! kubelet, kube-proxy, containerd, runc, Consul, etcd and ZooKeeper, all in a network
//! namespace of the test's own (`localenv::node`). The Pods reach the API server through the
//! `kubernetes` Service (kube-proxy) with their ServiceAccount's projected token, as in any
//! cluster.
//!
//! One test, in steps: each step starts from what the one before left, as a user's would.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use localenv::Env;
use localenv::kube::Kube;
use serde_json::{Value, json};
use support::everywhere::{CATALOGS, catalog_specs, no_gap, spawn_readers, wait_everywhere};
use support::{ConsulView, sum_metric};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/catalog-bridge");
const IMAGE: &str = concat!("catalog-bridge:", env!("CARGO_PKG_VERSION"));
const NS: &str = "catalog-bridge";
const RELEASE: &str = "cb";
const LEASE: &str = "cb-catalog-bridge";
const WAIT: Duration = Duration::from_secs(60);
/// The catalogs' own patience with a replica that is gone: the chart's `leaseDuration` (6 s)
/// plus a few seconds is below both.
const ETCD_TTL: i64 = 15;
const ZK_TIMEOUT: i64 = 10;

/// The chart's values: the six catalogs of `support::everywhere`, the image loaded on the node,
/// and `extra` on top.
fn values_file(env: &Env, name: &str, extra: Value) -> Result<String> {
    let catalogs: Vec<Value> = catalog_specs(env, ETCD_TTL, ZK_TIMEOUT)?
        .into_iter()
        .map(|(name, spec)| json!({"name": name, "spec": spec}))
        .collect();
    let mut values = json!({
        "image": {"pullPolicy": "Never"},
        "driftInterval": "2s",
        "catalogs": catalogs,
    });
    if let (Some(v), Some(e)) = (values.as_object_mut(), extra.as_object()) {
        v.extend(e.clone());
    }
    let path = env.dir().join(format!("values-{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&values)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path.display().to_string())
}

/// A replica of the release as the API server has it.
#[derive(Clone, Debug)]
struct Replica {
    name: String,
    ip: String,
    ready: bool,
    /// `containerd://<id>`.
    container: String,
}

fn replicas(kube: &Kube) -> Result<Vec<Replica>> {
    let out = kube.kubectl(&[
        "-n",
        NS,
        "get",
        "pods",
        "-l",
        &format!("app.kubernetes.io/instance={RELEASE}"),
        "-o",
        "json",
    ])?;
    let list: Value = serde_json::from_str(&out).context("parsing the Pod list")?;
    let mut out = Vec::new();
    for p in list["items"].as_array().into_iter().flatten() {
        if !p["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        let ready = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        out.push(Replica {
            name: p["metadata"]["name"].as_str().unwrap_or_default().into(),
            ip: p["status"]["podIP"].as_str().unwrap_or_default().into(),
            ready,
            container: p["status"]["containerStatuses"][0]["containerID"]
                .as_str()
                .unwrap_or_default()
                .into(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Waits until exactly two replicas run, both Ready, none of them in `not`.
async fn two_ready(kube: &Kube, not: &BTreeSet<String>) -> Result<Vec<Replica>> {
    localenv::eventually("two Ready replicas", WAIT, || async {
        let r = replicas(kube)?;
        if r.len() == 2 && r.iter().all(|p| p.ready && !not.contains(&p.name)) {
            Ok(Some(r))
        } else {
            bail!("{r:?}")
        }
    })
    .await
}

fn holder(kube: &Kube) -> Result<String> {
    Ok(kube
        .kubectl(&[
            "-n",
            NS,
            "get",
            "lease",
            LEASE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])?
        .trim()
        .to_string())
}

/// Waits until one of `among` (`None`: any replica running now) holds the Lease and says so
/// in its metrics; returns it.
async fn leader(kube: &Kube, among: Option<&[Replica]>) -> Result<Replica> {
    localenv::eventually("a replica to hold the Lease", WAIT, || async {
        let h = holder(kube)?;
        let now;
        let among = match among {
            Some(a) => a,
            None => {
                now = replicas(kube)?;
                &now[..]
            }
        };
        let Some(r) = among.iter().find(|r| r.name == h) else {
            bail!("the Lease is held by {h:?}");
        };
        if metric(r, "catalog_bridge_leader").await? == 1.0 {
            Ok(Some(r.clone()))
        } else {
            bail!("{h} holds the Lease but does not lead yet")
        }
    })
    .await
}

async fn metric(r: &Replica, name: &str) -> Result<f64> {
    let text = localenv::http_client()?
        .get(format!("http://{}:8080/metrics", r.ip))
        .send()
        .await
        .with_context(|| format!("reading the metrics of {}", r.name))?
        .error_for_status()?
        .text()
        .await?;
    Ok(sum_metric(&text, name, &[]))
}

/// The logs of the release's Pods, for errors.
fn pod_logs(kube: &Kube) -> String {
    kube.kubectl(&[
        "-n",
        NS,
        "logs",
        "-l",
        &format!("app.kubernetes.io/instance={RELEASE}"),
        "--tail=40",
        "--prefix",
    ])
    .unwrap_or_else(|e| format!("(no logs: {e:#})"))
}

/// `shop/api-x` as a user runs it: a Deployment of two real Pods on the node (the sandbox
/// image's pause program, Ready once running) behind a Service annotated for every catalog;
/// returns the Pods' `ip:8080`, sorted, once both are Ready.
async fn deploy_api_x(env: &Env) -> Result<Vec<String>> {
    let kube = env.kube()?;
    let labels = json!({"app": "api-x"});
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "api-x", "namespace": "shop"},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                      "name": "app", "image": localenv::node::PAUSE_IMAGE,
                      "imagePullPolicy": "Never",
                      "ports": [{"name": "http", "containerPort": 8080}]}]}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "api-x", "namespace": "shop", "annotations": {
             "catalog-bridge.io/export": CATALOGS, "catalog-bridge.io/name": "api_x"}},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 8080}]}},
    ]});
    let file = env.dir().join("api-x.json");
    std::fs::write(&file, serde_json::to_vec(&objects)?)?;
    kube.kubectl(&["apply", "-f", &file.display().to_string()])?;
    localenv::eventually("2 Ready Pods of shop/api-x", WAIT, || async {
        let out = kube.kubectl(&[
            "-n",
            "shop",
            "get",
            "pods",
            "-l",
            "app=api-x",
            "-o",
            "jsonpath={range .items[*]}{.status.podIP} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ])?;
        let ready: Vec<String> = out
            .lines()
            .filter_map(|l| l.strip_suffix(" True"))
            .filter(|ip| !ip.is_empty())
            .map(|ip| format!("{ip}:8080"))
            .collect();
        if ready.len() == 2 {
            let mut ready = ready;
            ready.sort();
            Ok(Some(ready))
        } else {
            bail!("{out}")
        }
    })
    .await
}

/// Asks the Eviction API to evict Pod `name` of the release, as `kubectl drain` does; `Ok(Err)`
/// with the API server's answer when it refuses.
fn evict(env: &Env, name: &str) -> Result<std::result::Result<(), String>> {
    let body = env.dir().join(format!("eviction-{name}.json"));
    std::fs::write(
        &body,
        serde_json::to_vec(&json!({"apiVersion": "policy/v1", "kind": "Eviction",
                                   "metadata": {"name": name, "namespace": NS}}))?,
    )?;
    let path = format!("/api/v1/namespaces/{NS}/pods/{name}/eviction");
    Ok(env
        .kube()?
        .kubectl(&["create", "--raw", &path, "-f", &body.display().to_string()])
        .map(drop)
        .map_err(|e| format!("{e:#}")))
}

/// The container's process as the kernel sees it: user, effective capabilities, no new
/// privileges, and how its root and every writable mount are mounted.
fn inspect_container(env: &Env, r: &Replica) -> Result<()> {
    let id = r
        .container
        .strip_prefix("containerd://")
        .with_context(|| format!("{}: container {:?}", r.name, r.container))?;
    let tasks = env.node()?.ctr(&["tasks", "list"])?;
    let pid = tasks
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .with_context(|| format!("no task of {id} in\n{tasks}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    println!(
        "d. {}: pid {pid}, Uid {}, Gid {}, CapEff {}, CapBnd {}, NoNewPrivs {}",
        r.name,
        field("Uid"),
        field("Gid"),
        field("CapEff"),
        field("CapBnd"),
        field("NoNewPrivs")
    );
    for (name, want) in [
        ("Uid", "65532 65532 65532 65532"),
        ("Gid", "65532 65532 65532 65532"),
        ("CapEff", "0000000000000000"),
        ("CapBnd", "0000000000000000"),
        ("NoNewPrivs", "1"),
    ] {
        ensure!(
            field(name) == want,
            "{}: {name} {}, not {want}",
            r.name,
            field(name)
        );
    }
    // mountinfo: `id parent major:minor root mount-point options …`.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let mut writable = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (Some(point), Some(options)) = (f.get(4), f.get(5)) else {
            continue;
        };
        let rw = options.split(',').any(|o| o == "rw");
        if *point == "/" {
            ensure!(!rw, "{}: the root filesystem is writable: {line}", r.name);
        } else if rw {
            writable.push(*point);
        }
    }
    println!(
        "d. {}: root read-only; writable mounts {writable:?}",
        r.name
    );
    for w in &writable {
        ensure!(
            [
                "/dev",
                "/proc",
                "/sys",
                "/etc/hosts",
                "/etc/hostname",
                "/etc/resolv.conf"
            ]
            .iter()
            .any(|ok| w == ok || w.starts_with(&format!("{ok}/")))
                || *w == "/dev/termination-log",
            "{}: writable mount {w} the chart does not declare",
            r.name
        );
    }
    Ok(())
}

/// Everything of this cluster (owner id `owner`) left in the catalogs: Consul's node, any etcd
/// key (etcd has no structure of its own), ZooKeeper ephemeral nodes and nodes naming the
/// owner. ZooKeeper's persistent parents of the layouts (`/services/api_x/providers`) may be
/// shared with other registrants and stay by design (SPEC §4); they are printed.
async fn left_in_catalogs(env: &Env, owner: &str) -> Result<Vec<String>> {
    let mut left = Vec::new();
    let consul = ConsulView::new(env.consul()?.url())?;
    if consul.nodes().await?.iter().any(|n| n == "k8s-test") {
        left.push(format!(
            "Consul node k8s-test: {:?}",
            consul.node_services("k8s-test").await?.keys()
        ));
    }
    left.extend(
        env.etcd()?
            .etcdctl(&["get", "", "--prefix", "--keys-only"])?
            .lines()
            .filter(|l| !l.is_empty())
            .map(|k| format!("etcd {k}")),
    );
    let zk = localenv::python(
        "import sys\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         def walk(p):\n\
         \x20   for c in zk.get_children(p):\n\
         \x20       q = p.rstrip('/') + '/' + c\n\
         \x20       if q == '/zookeeper':\n\
         \x20           continue\n\
         \x20       print(zk.exists(q).ephemeralOwner, q)\n\
         \x20       walk(q)\n\
         walk('/')\n\
         zk.stop()\n",
        &[&env.zookeeper()?.connect_string()],
    )?;
    let mut parents = Vec::new();
    for line in zk.lines() {
        let (session, path) = line.split_once(' ').unwrap_or(("?", line));
        if session != "0" || path.contains(owner) {
            left.push(format!("ZooKeeper {path} (ephemeralOwner {session})"));
        } else {
            parents.push(path);
        }
    }
    println!("e. persistent ZooKeeper nodes that stay: {parents:?}");
    Ok(left)
}

#[test]
#[ignore = "runs a kubelet node as root in a network namespace: `make test-node` runs it"]
fn the_chart_runs_on_a_node_through_install_a_rolling_update_a_leader_pod_deleted_and_uninstall()
-> Result<()> {
    localenv::node::run(|| async {
        let start = Instant::now();
        let env = Env::builder()
            .node()
            .consul()
            .etcd()
            .zookeeper()
            .start()
            .await?;
        println!(
            "control plane, catalogs and a Ready node in {:?}",
            start.elapsed()
        );
        let (node, kube) = (env.node()?, env.kube()?);
        let image = env.dir().join("catalog-bridge.tar");
        localenv::image::catalog_bridge(&support::controller_bin()?, IMAGE, &image)?;
        node.load_image(&image)?;

        // a. helm install: both Pods Ready through their probes, one holds the Lease, and an
        // annotated Service appears in every catalog.
        let values = values_file(&env, "install", json!({}))?;
        let t = Instant::now();
        kube.helm(&[
            "install",
            RELEASE,
            CHART,
            "-n",
            NS,
            "--create-namespace",
            "-f",
            &values,
            "--wait",
            "--timeout",
            "180s",
        ])
        .with_context(|| format!("{}\n{}", node.logs(), pod_logs(kube)))?;
        let first = two_ready(kube, &BTreeSet::new()).await?;
        println!("a. helm install --wait: 2 Pods Ready in {:?}", t.elapsed());
        let lead = leader(kube, Some(&first)).await?;
        println!("a. {} holds Lease {NS}/{LEASE}", lead.name);
        let t = Instant::now();
        let api_x = deploy_api_x(&env).await?;
        let api_x: Vec<&str> = api_x.iter().map(String::as_str).collect();
        wait_everywhere(&env, &api_x)
            .await
            .with_context(|| pod_logs(kube))?;
        println!(
            "a. api_x in all six catalogs {:?} after its Service",
            t.elapsed()
        );

        // b. helm upgrade that changes the Pod template: a rolling update, readers see no gap,
        // and the new leader writes nothing that was already right.
        let readers = spawn_readers(&env, 2, Duration::from_secs(40))?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rolled = values_file(
            &env,
            "rolled",
            json!({"podAnnotations": {"example.com/rolled": "1"}}),
        )?;
        let t = Instant::now();
        kube.helm(&[
            "upgrade",
            RELEASE,
            CHART,
            "-n",
            NS,
            "-f",
            &rolled,
            "--wait",
            "--timeout",
            "180s",
        ])
        .with_context(|| pod_logs(kube))?;
        let old: BTreeSet<String> = first.iter().map(|r| r.name.clone()).collect();
        let second = two_ready(kube, &old).await?;
        let lead = leader(kube, Some(&second)).await?;
        println!(
            "b. rolled to {:?} in {:?}; {} leads",
            second.iter().map(|r| &r.name).collect::<Vec<_>>(),
            t.elapsed(),
            lead.name
        );
        no_gap(&readers.await??).with_context(|| pod_logs(kube))?;
        let writes = metric(&lead, "catalog_bridge_backend_operations_total").await?;
        ensure!(
            writes == 0.0,
            "the new leader {} wrote {writes} entries\n{}",
            lead.name,
            pod_logs(kube)
        );
        println!("b. the new leader wrote 0 entries");

        // c. the leader Pod deleted: another replica takes over, the standby or (when it comes
        // up first) the Pod that replaces the deleted one; readers see no gap.
        let readers = spawn_readers(&env, 2, Duration::from_secs(20))?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t = Instant::now();
        kube.kubectl(&["-n", NS, "delete", "pod", &lead.name, "--wait=false"])?;
        let next = localenv::eventually("another replica to lead", WAIT, || async {
            let next = leader(kube, None).await?;
            Ok((next.name != lead.name).then_some(next))
        })
        .await?;
        let which = if second.iter().any(|r| r.name == next.name) {
            "the standby"
        } else {
            "the replacement Pod"
        };
        println!(
            "c. leader Pod {} deleted: {which} {} leads {:?} later",
            lead.name,
            next.name,
            t.elapsed()
        );
        let gone: BTreeSet<String> = [lead.name.clone()].into();
        let third = two_ready(kube, &gone).await?;
        println!(
            "c. the Deployment runs 2 Ready Pods again {:?} after the delete",
            t.elapsed()
        );
        no_gap(&readers.await??).with_context(|| pod_logs(kube))?;

        // The PodDisruptionBudget: both replicas evicted at once, as `kubectl drain` asks the
        // Eviction API; the first goes, the second is refused while only one is Ready.
        let readers = spawn_readers(&env, 2, Duration::from_secs(10))?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let [one, two] = &third[..] else {
            bail!("two replicas expected: {third:?}");
        };
        evict(&env, &one.name)?.map_err(anyhow::Error::msg)?;
        match evict(&env, &two.name)? {
            Err(refused) if refused.contains("TooManyRequests") => println!(
                "c. {} evicted; evicting {} too is refused: {}",
                one.name,
                two.name,
                refused.lines().last().unwrap_or_default().trim()
            ),
            other => bail!(
                "evicting {} while {} goes should be refused by the PodDisruptionBudget: \
                 {other:?}",
                two.name,
                one.name
            ),
        }
        no_gap(&readers.await??).with_context(|| pod_logs(kube))?;
        let evicted: BTreeSet<String> = [one.name.clone()].into();
        let third = two_ready(kube, &evicted).await?;

        // d. non-root, read-only root filesystem, no capabilities, and it works (the export
        // above, the handover): checked on the running processes.
        for r in &third {
            inspect_container(&env, r)?;
        }

        // e. the README's retirement: helm uninstall (its hook empties the chart's catalogs
        // while the controller runs), then the Lease and the sessions' Secret.
        let t = Instant::now();
        let out = kube
            .helm(&[
                "uninstall",
                RELEASE,
                "-n",
                NS,
                "--wait",
                "--timeout",
                "180s",
            ])
            .with_context(|| pod_logs(kube))?;
        println!("e. {} in {:?}", out.trim(), t.elapsed());
        kube.kubectl(&[
            "-n",
            NS,
            "delete",
            "lease,secret",
            LEASE,
            "cb-catalog-bridge-zk-sessions",
            "--ignore-not-found",
        ])?;
        let owner = kube.kubectl(&[
            "get",
            "namespace",
            "kube-system",
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        let left = left_in_catalogs(&env, owner.trim()).await?;
        ensure!(left.is_empty(), "left in the catalogs: {left:#?}");
        println!("e. nothing of this cluster is left in Consul, etcd or ZooKeeper");
        Ok(())
    })
}
