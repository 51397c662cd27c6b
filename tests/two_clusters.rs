//! Two Kubernetes clusters discovering each other through the same catalogs, without a mesh:
//! two API servers (each with its own storage, so its own `kube-system` UID), one controller in
//! each with its default owner id, and one Consul, one etcd and one ZooKeeper shared by both.
//! Cluster A exports `api_x`, cluster B imports it from Consul, etcd (`plain` and `naming`) and
//! ZooKeeper (`curator`) and follows A's readiness flips; then B exports its own `api_x` under
//! the same name: each catalog holds both, each side imports only the other's endpoints, neither
//! controller touches the other's entries, and nothing loops. Read back with the catalogs' own
//! clients (Consul's HTTP API, the etcd client, kazoo).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use localenv::Env;
use localenv::kube::Kube;
use serde_json::{Value, json};
use support::{ConsulView, Controller, kubectl_apply_on};

const WAIT: Duration = Duration::from_secs(30);
/// The ExternalCatalogs both clusters define, the same way.
const CATALOGS: [&str; 4] = ["consul", "etcd-plain", "etcd-naming", "zk-curator"];
const A_ADDRS: [&str; 2] = ["198.18.1.1", "198.18.1.2"];
const B_ADDRS: [&str; 2] = ["198.18.2.1", "198.18.2.2"];

fn catalog(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
           "metadata": {"name": name}, "spec": spec})
}

/// The four ExternalCatalogs, as a user would apply them to each cluster (Consul's node left to
/// its default, `k8s-<owner id>`).
fn catalogs(env: &Env) -> Result<Vec<Value>> {
    let etcd = env.etcd()?.endpoint();
    Ok(vec![
        catalog(
            "consul",
            json!({"consul": {"addresses": [env.consul()?.url()]}}),
        ),
        catalog(
            "etcd-plain",
            json!({"etcd": {"endpoints": [etcd], "layout": "plain"}}),
        ),
        catalog(
            "etcd-naming",
            json!({"etcd": {"endpoints": [etcd], "layout": "naming"}}),
        ),
        catalog(
            "zk-curator",
            json!({"zookeeper": {"connect": env.zookeeper()?.connect_string(),
                                 "layout": "curator", "basePath": "/curator"}}),
        ),
    ])
}

/// One cluster: its API server, a client, and its controller.
struct Cluster<'a> {
    name: &'static str,
    kube: &'a Kube,
    client: kube::Client,
    controller: Controller,
}

/// CRDs, namespace `shop` and the four catalogs on `kube`, and its controller started without
/// `--cluster-id` (so with the kube-system UID as owner id), plus `extra` arguments.
async fn cluster<'a>(
    env: &Env,
    kube: &'a Kube,
    name: &'static str,
    cluster_id: Option<&str>,
    extra: &[&str],
) -> Result<Cluster<'a>> {
    let client = kube.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, "shop").await?;
    for c in catalogs(env)? {
        kubectl_apply_on(env, kube, &c)?;
    }
    let controller = Controller::start_on(env, kube, &format!("cb-{name}"), cluster_id, extra)
        .await
        .with_context(|| format!("starting cluster {name}'s controller"))?;
    Ok(Cluster {
        name,
        kube,
        client,
        controller,
    })
}

/// A selector-less Service `shop/api-x` exported to the four catalogs as `api_x`, and one
/// EndpointSlice of its own with `addrs` ready on port 8080.
async fn export_api_x(c: &Cluster<'_>, addrs: &[&str]) -> Result<()> {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "api-x", "namespace": "shop", "annotations": {
            "catalog-bridge.io/export": CATALOGS.join(","),
            "catalog-bridge.io/name": "api_x"}},
        "spec": {"ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
    }))?;
    Api::<Service>::namespaced(c.client.clone(), "shop")
        .create(&PostParams::default(), &svc)
        .await
        .with_context(|| format!("creating shop/api-x in cluster {}", c.name))?;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "api-x-1", "namespace": "shop", "labels": {
            "kubernetes.io/service-name": "api-x",
            "endpointslice.kubernetes.io/managed-by": "tests"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": addrs.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    }))?;
    Api::<EndpointSlice>::namespaced(c.client.clone(), "shop")
        .create(&PostParams::default(), &slice)
        .await
        .with_context(|| format!("creating the EndpointSlice of api-x in cluster {}", c.name))?;
    Ok(())
}

/// Sets the readiness of `addr` in `shop/api-x-1`.
async fn set_ready(c: &Cluster<'_>, addrs: &[&str], addr: &str, ready: bool) -> Result<()> {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": *a != addr || ready}}))
        .collect();
    Api::<EndpointSlice>::namespaced(c.client.clone(), "shop")
        .patch(
            "api-x-1",
            &PatchParams::default(),
            &Patch::Merge(&json!({"endpoints": endpoints})),
        )
        .await
        .with_context(|| format!("setting {addr} ready={ready} in cluster {}", c.name))?;
    Ok(())
}

/// The import of `api_x` from catalog `from`, as Service `shop/from-<catalog>`.
fn import(from: &str) -> Value {
    json!({
        "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
        "metadata": {"name": format!("from-{from}"), "namespace": "shop"},
        "spec": {"catalogRef": {"name": from}, "direction": "Import", "externalName": "api_x",
                 "target": {"serviceName": format!("from-{from}")}},
    })
}

fn import_all(env: &Env, c: &Cluster<'_>) -> Result<()> {
    for from in CATALOGS {
        kubectl_apply_on(env, c.kube, &import(from))?;
    }
    Ok(())
}

/// Sorted `ip:port` of the ready endpoints in the EndpointSlices of Service `shop/<svc>`.
async fn endpoints(client: &kube::Client, svc: &str) -> Result<Vec<String>> {
    support::ready_endpoints(client, "shop", svc).await
}

fn with_port(addrs: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = addrs.iter().map(|a| format!("{a}:8080")).collect();
    v.sort();
    v
}

/// Waits until every import of cluster `c` (one Service per catalog) holds exactly `want`; returns
/// per catalog how long after `since` that was first seen (polled every 20 ms).
async fn imports_follow(
    c: &Cluster<'_>,
    want: &[String],
    since: Instant,
) -> Result<BTreeMap<&'static str, Duration>> {
    let mut seen = BTreeMap::new();
    let mut last = BTreeMap::new();
    while seen.len() < CATALOGS.len() {
        if since.elapsed() > WAIT {
            bail!(
                "cluster {}'s imports did not all become {want:?} within {WAIT:?}: seen {seen:?}, \
                 last {last:?}\n{}",
                c.name,
                c.controller.log()
            );
        }
        let pending: Vec<&'static str> = (CATALOGS.iter().copied())
            .filter(|f| !seen.contains_key(f))
            .collect();
        for from in pending {
            let got = endpoints(&c.client, &format!("from-{from}")).await?;
            if got == want {
                seen.insert(from, since.elapsed());
            } else {
                last.insert(from, got);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(seen)
}

/// One entry as a catalog's own client reads it: where it points, and what names its writer and
/// its last change (Consul: owner meta and ModifyIndex; etcd: lease and mod revision; ZooKeeper:
/// ephemeral owner and mzxid).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    address: String,
    owner: String,
    version: String,
}

/// Every entry of `api_x` in each catalog, by catalog, sorted.
async fn entries(env: &Env) -> Result<BTreeMap<&'static str, Vec<Entry>>> {
    let mut out = BTreeMap::new();
    // Consul: every passing instance of api_x, whoever wrote it.
    let consul = ConsulView::new(env.consul()?.url())?;
    let http = localenv::http_client()?;
    let health: Vec<Value> = http
        .get(format!("{}/v1/health/service/api_x?passing", consul.url))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut v: Vec<Entry> = health
        .iter()
        .map(|e| Entry {
            address: format!(
                "{}:{}",
                e["Service"]["Address"].as_str().unwrap_or_default(),
                e["Service"]["Port"]
            ),
            owner: format!(
                "{} on {}",
                e["Service"]["Meta"]["catalog-bridge-owner"]
                    .as_str()
                    .unwrap_or("-"),
                e["Node"]["Node"].as_str().unwrap_or_default()
            ),
            version: format!(
                "{} {}",
                e["Service"]["ID"].as_str().unwrap_or_default(),
                e["Service"]["ModifyIndex"]
            ),
        })
        .collect();
    v.sort();
    out.insert("consul", v);
    // etcd, with its own client: the keys of each layout, their lease and mod revision.
    let mut etcd = etcd_client::Client::connect([env.etcd()?.endpoint()], None)
        .await
        .context("connecting to etcd")?;
    for (catalog, prefix) in [
        ("etcd-plain", "/services/api_x/providers/"),
        ("etcd-naming", "api_x/"),
    ] {
        let r = etcd
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await?;
        let mut v = Vec::new();
        for kv in r.kvs() {
            let value = kv.value_str()?;
            let address = match catalog {
                "etcd-plain" => value.to_string(),
                _ => serde_json::from_str::<Value>(value)?["Addr"]
                    .as_str()
                    .context("naming value without Addr")?
                    .to_string(),
            };
            v.push(Entry {
                address,
                owner: format!("lease {:x}", kv.lease()),
                version: format!("{} rev {}", kv.key_str()?, kv.mod_revision()),
            });
        }
        v.sort();
        out.insert(catalog, v);
    }
    // ZooKeeper, with kazoo: Curator instances, their ephemeral owner and mzxid.
    let kazoo = localenv::python(
        "import sys, json\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         out = []\n\
         if zk.exists('/curator/api_x'):\n\
         \x20   for c in zk.get_children('/curator/api_x'):\n\
         \x20       data, st = zk.get('/curator/api_x/' + c)\n\
         \x20       d = json.loads(data)\n\
         \x20       out.append({'address': '%s:%d' % (d['address'], d['port']),\n\
         \x20                   'owner': 'session %x' % st.ephemeralOwner,\n\
         \x20                   'version': '%s mzxid %d' % (c, st.mzxid)})\n\
         print(json.dumps(out))\n\
         zk.stop()\n",
        &[&env.zookeeper()?.connect_string()],
    )?;
    let z: Vec<Value> = serde_json::from_str(kazoo.trim()).context("kazoo's answer")?;
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    let mut v: Vec<Entry> = z
        .iter()
        .map(|e| Entry {
            address: s(e, "address"),
            owner: s(e, "owner"),
            version: s(e, "version"),
        })
        .collect();
    v.sort();
    out.insert("zk-curator", v);
    Ok(out)
}

fn addresses(v: &[Entry]) -> Vec<String> {
    let mut a: Vec<String> = v.iter().map(|e| e.address.clone()).collect();
    a.sort();
    a
}

/// Waits until each catalog holds exactly the entries at `want`.
async fn wait_catalogs(env: &Env, want: &[String]) -> Result<BTreeMap<&'static str, Vec<Entry>>> {
    localenv::eventually(&format!("every catalog to hold {want:?}"), WAIT, || async {
        let e = entries(env).await?;
        if e.values().all(|v| addresses(v) == want) {
            Ok(Some(e))
        } else {
            bail!("{e:#?}")
        }
    })
    .await
}

/// The owners (writers) of the entries at `addrs`, in one catalog's listing: each address must
/// be there exactly once, and all of them under one owner, returned.
fn owner_of(catalog: &str, v: &[Entry], addrs: &[&str]) -> Result<String> {
    let mut owners: Vec<&str> = Vec::new();
    for a in with_port(addrs) {
        let found: Vec<&Entry> = v.iter().filter(|e| e.address == a).collect();
        ensure!(
            found.len() == 1,
            "{catalog}: {a} is there {} times: {v:#?}",
            found.len()
        );
        owners.push(&found[0].owner);
    }
    owners.dedup();
    ensure!(
        owners.len() == 1,
        "{catalog}: {addrs:?} have several owners: {v:#?}"
    );
    Ok(owners[0].to_string())
}

/// Every catalog operation the controller of `c` made (puts and deletes, any result).
async fn writes(c: &Cluster<'_>) -> Result<f64> {
    c.controller
        .metric("catalog_bridge_backend_operations_total", &[])
        .await
}

/// Two API servers (two kube-system UIDs) and one Consul, etcd and ZooKeeper they share.
async fn two_clusters_and_the_catalogs() -> Result<Env> {
    Env::builder()
        .kube()
        .second_cluster()
        .consul()
        .etcd()
        .zookeeper()
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_export_and_import_the_same_name_through_every_catalog() -> Result<()> {
    let started = Instant::now();
    let env = two_clusters_and_the_catalogs().await?;
    println!(
        "two API servers and the catalogs started in {:?}",
        started.elapsed()
    );
    // A short drift interval: each controller re-reads what it owns every 2 s, so that a
    // controller that took the other's entries for its own would act on them while we look.
    let extra = ["--drift-interval=2s"];
    let (a, b) = tokio::try_join!(
        cluster(&env, env.kube()?, "a", None, &extra),
        cluster(&env, env.second_cluster()?, "b", None, &extra),
    )?;
    println!(
        "cluster A owner id {}, cluster B owner id {}",
        a.controller.cluster_id, b.controller.cluster_id
    );
    ensure!(
        !a.controller.cluster_id.is_empty() && a.controller.cluster_id != b.controller.cluster_id,
        "two clusters, two kube-system UIDs"
    );

    // A exports, B imports from each catalog and follows A's readiness.
    export_api_x(&a, &A_ADDRS).await?;
    import_all(&env, &b)?;
    let a_all = with_port(&A_ADDRS);
    let t = Instant::now();
    let took = imports_follow(&b, &a_all, t).await?;
    println!("B imported A's api_x (from the import's creation): {took:?}");
    let t = Instant::now();
    set_ready(&a, &A_ADDRS, A_ADDRS[1], false).await?;
    let took = imports_follow(&b, &with_port(&A_ADDRS[..1]), t).await?;
    println!(
        "A's endpoint {} not ready -> gone from B's slices: {took:?}",
        A_ADDRS[1]
    );
    let t = Instant::now();
    set_ready(&a, &A_ADDRS, A_ADDRS[1], true).await?;
    let took = imports_follow(&b, &a_all, t).await?;
    println!(
        "A's endpoint {} ready again -> back in B's slices: {took:?}",
        A_ADDRS[1]
    );

    // B exports its own api_x under the same name, and A imports it too.
    export_api_x(&b, &B_ADDRS).await?;
    import_all(&env, &a)?;
    let union = with_port(&[A_ADDRS, B_ADDRS].concat());
    let before = wait_catalogs(&env, &union)
        .await
        .with_context(|| format!("A:\n{}\nB:\n{}", a.controller.log(), b.controller.log()))?;
    println!("every catalog holds both clusters' api_x: {before:#?}");
    imports_follow(&a, &with_port(&B_ADDRS), Instant::now()).await?;
    imports_follow(&b, &a_all, Instant::now()).await?;

    // Each cluster's entries carry its own writer: Consul its owner id on its own node, etcd
    // its own lease, ZooKeeper its own session.
    for (catalog, v) in &before {
        let owner_a = owner_of(catalog, v, &A_ADDRS)?;
        let owner_b = owner_of(catalog, v, &B_ADDRS)?;
        ensure!(owner_a != owner_b, "{catalog}: one writer for both: {v:#?}");
        if *catalog == "consul" {
            ensure!(
                owner_a.starts_with(&a.controller.cluster_id)
                    && owner_b.starts_with(&b.controller.cluster_id),
                "consul: owner meta {owner_a:?} / {owner_b:?}"
            );
        }
    }

    // A few seconds with both controllers re-reading their catalogs every 2 s: nothing
    // changes — no entry rewritten or removed by the other cluster, none added (an imported
    // address exported again would be one more), and each import still sees only the other's.
    let ops_before = (writes(&a).await?, writes(&b).await?);
    let watch_until = Instant::now() + Duration::from_secs(6);
    let mut looks = 0;
    while Instant::now() < watch_until {
        let now = entries(&env).await?;
        ensure!(
            now == before,
            "the catalogs changed while both clusters ran: before {before:#?}\nnow {now:#?}"
        );
        for from in CATALOGS {
            let svc = format!("from-{from}");
            ensure!(
                endpoints(&a.client, &svc).await? == with_port(&B_ADDRS),
                "cluster A's import from {from} sees more than B's endpoints"
            );
            ensure!(
                endpoints(&b.client, &svc).await? == a_all,
                "cluster B's import from {from} sees more than A's endpoints"
            );
        }
        looks += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("{looks} looks over 6 s: every entry unchanged, imports stable");
    let ops_after = (writes(&a).await?, writes(&b).await?);
    ensure!(
        ops_before == ops_after,
        "a controller wrote while nothing changed: (A, B) operations {ops_before:?} -> {ops_after:?}"
    );
    println!("catalog operations (A, B): {ops_after:?}, none while nothing changed");
    println!("whole test: {:?}", started.elapsed());
    Ok(())
}

/// The owner markers of owner id `owner` (Consul KV, etcd key, ZooKeeper node), as their own
/// clients read them: catalog → the JSON stored, or None.
async fn markers(env: &Env, owner: &str) -> Result<BTreeMap<&'static str, Option<Value>>> {
    let mut out = BTreeMap::new();
    let http = localenv::http_client()?;
    let r = http
        .get(format!(
            "{}/v1/kv/catalog-bridge/owners/{owner}?raw",
            env.consul()?.url()
        ))
        .send()
        .await?;
    out.insert(
        "consul",
        match r.status() {
            reqwest::StatusCode::NOT_FOUND => None,
            _ => Some(r.error_for_status()?.json::<Value>().await?),
        },
    );
    let mut etcd = etcd_client::Client::connect([env.etcd()?.endpoint()], None).await?;
    let got = etcd
        .get(format!("/catalog-bridge.io/owners/{owner}"), None)
        .await?;
    out.insert(
        "etcd",
        match got.kvs().first() {
            None => None,
            Some(kv) => {
                ensure!(kv.lease() == 0, "the etcd marker carries no lease");
                Some(serde_json::from_slice(kv.value())?)
            }
        },
    );
    let z = localenv::python(
        "import sys\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         p = '/catalog-bridge/owners/' + sys.argv[2]\n\
         print(zk.get(p)[0].decode() if zk.exists(p) else 'null')\n\
         zk.stop()\n",
        &[&env.zookeeper()?.connect_string(), owner],
    )?;
    out.insert("zookeeper", serde_json::from_str(z.trim())?);
    Ok(out)
}

/// The `Ready` condition of each of `c`'s ExternalCatalogs: (status, reason, message).
async fn ready_of(c: &Cluster<'_>) -> Result<BTreeMap<String, (String, String, String)>> {
    let api: Api<catalog_bridge::api::crd::ExternalCatalog> = Api::all(c.client.clone());
    let mut out = BTreeMap::new();
    for cat in api.list(&ListParams::default()).await?.items {
        let name = cat.metadata.name.clone().unwrap_or_default();
        if let Some(r) =
            (cat.status.unwrap_or_default().conditions.into_iter()).find(|c| c.type_ == "Ready")
        {
            out.insert(name, (r.status, r.reason, r.message));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_cluster_with_the_same_cluster_id_writes_nothing_and_says_why() -> Result<()> {
    let started = Instant::now();
    let env = two_clusters_and_the_catalogs().await?;
    let extra = ["--drift-interval=2s"];
    let a = cluster(&env, env.kube()?, "a", Some("shared"), &extra).await?;
    export_api_x(&a, &A_ADDRS).await?;
    let before = wait_catalogs(&env, &with_port(&A_ADDRS)).await?;
    let uid_a = support::kube_system_uid(&a.client).await?;

    // B: another cluster, configured with the same clusterId, exporting its own api_x.
    let b = cluster(&env, env.second_cluster()?, "b", Some("shared"), &extra).await?;
    let uid_b = support::kube_system_uid(&b.client).await?;
    ensure!(uid_a != uid_b, "two clusters, two kube-system UIDs");
    export_api_x(&b, &B_ADDRS).await?;

    // For 8 s (B re-reads its catalogs every 2 s meanwhile): A's entries exactly as they were
    // (same Consul ModifyIndex, etcd lease and revision, ZooKeeper session and mzxid), and
    // nothing of B's.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let now = entries(&env).await?;
        ensure!(
            now == before,
            "cluster B (same clusterId) changed the catalogs: before {before:#?}\nnow {now:#?}\n\
             B's log:\n{}",
            b.controller.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let b_ops = writes(&b).await?;
    ensure!(b_ops == 0.0, "cluster B made {b_ops} catalog operations");
    println!("8 s with both running: A's entries unchanged, B wrote nothing");

    // Each catalog's marker names A's cluster; B's catalogs say why they write nothing.
    let m = markers(&env, "shared").await?;
    for (catalog, v) in &m {
        let v = v
            .as_ref()
            .with_context(|| format!("no owner marker in {catalog}"))?;
        ensure!(v["cluster"] == uid_a.as_str(), "{catalog}: marker {v}");
        ensure!(
            v["claimedAt"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{catalog}: {v}"
        );
    }
    println!("owner markers: {m:?}");
    let ready = localenv::eventually("B's catalogs Ready=False OwnerClaimed", WAIT, || async {
        let r = ready_of(&b).await?;
        if r.len() == CATALOGS.len()
            && r.values()
                .all(|(s, reason, _)| s == "False" && reason == "OwnerClaimed")
        {
            Ok(Some(r))
        } else {
            bail!("{r:#?}")
        }
    })
    .await?;
    for (name, (_, _, message)) in &ready {
        ensure!(
            message.contains("\"shared\"")
                && message.contains(&uid_a)
                && message.contains(&uid_b)
                && message.contains("clusterId"),
            "{name}: the condition names the owner id, both clusters and the way out: {message}"
        );
    }
    println!("B's Ready: {ready:#?}");
    let events = localenv::eventually("one OwnerClaimed Event per catalog of B", WAIT, || async {
        let out = b.kube.kubectl(&[
            "get",
            "events.events.k8s.io",
            "-A",
            "--field-selector",
            "reason=OwnerClaimed",
            "-o",
            "jsonpath={range .items[*]}{.regarding.kind}/{.regarding.name} {.type} {.reason}: {.note}{\"\\n\"}{end}",
        ])?;
        let lines: Vec<String> = out.lines().map(str::to_string).collect();
        Ok((lines.len() == CATALOGS.len()).then_some(lines))
    })
    .await?;
    for e in &events {
        ensure!(
            e.contains(" Warning OwnerClaimed: ") && e.contains(&uid_a) && e.contains(&uid_b),
            "{e}"
        );
    }
    println!("B's Events:\n{}", events.join("\n"));
    ensure!(
        ready_of(&a).await?.values().all(|(s, _, _)| s == "True"),
        "A's catalogs stay Ready: {:#?}",
        ready_of(&a).await?
    );

    // A is gone for good: its controller stops, the operator deletes the markers (the way out
    // the message gives), and B proceeds at its next try. With the same owner id, A's entries
    // are B's now: B's writer replaces them with its own.
    drop(a);
    let http = localenv::http_client()?;
    http.delete(format!(
        "{}/v1/kv/catalog-bridge/owners/shared",
        env.consul()?.url()
    ))
    .send()
    .await?
    .error_for_status()?;
    env.etcd()?
        .etcdctl(&["del", "/catalog-bridge.io/owners/shared"])?;
    localenv::python(
        "import sys\nfrom kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         zk.delete('/catalog-bridge/owners/shared'); zk.stop()\n",
        &[&env.zookeeper()?.connect_string()],
    )?;
    let t = Instant::now();
    wait_catalogs(&env, &with_port(&B_ADDRS))
        .await
        .with_context(|| b.controller.log())?;
    println!(
        "markers deleted -> B's entries alone in every catalog after {:?}",
        t.elapsed()
    );
    let m = markers(&env, "shared").await?;
    ensure!(
        m.values()
            .all(|v| v.as_ref().is_some_and(|v| v["cluster"] == uid_b.as_str())),
        "B claimed the owner id: {m:?}"
    );

    // A deleted catalog takes its marker with its entries (the id may be used elsewhere later).
    b.kube
        .kubectl(&["delete", "xcat", "consul", "--wait", "--timeout=30s"])?;
    let m = markers(&env, "shared").await?;
    ensure!(
        m["consul"].is_none(),
        "the Consul marker went with the catalog: {m:?}"
    );
    ensure!(
        ConsulView::new(env.consul()?.url())?
            .passing("api_x")
            .await?
            .is_empty(),
        "B's Consul entries went with the catalog"
    );
    println!("whole test: {:?}", started.elapsed());
    Ok(())
}
