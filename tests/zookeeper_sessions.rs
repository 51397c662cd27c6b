//! ZooKeeper past one session, against a real ZooKeeper whose `jute.maxbuffer` is lowered to
//! 32 KiB, so that a session's budget of paths (half of it) is reached at about 350 plain
//! entries: 1,200 exported entries spread over several sessions, each within its budget, every
//! name in one session; growing the number of sessions moves entries without a reader ever
//! missing one; and a controller restart, a session expiry and a kill -9 each end with every
//! entry present (the same sessions, nothing rewritten) or gone on time, nothing left over.
//! The catalog is read with kazoo; the sessions are read from the controller's Secret.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use localenv::Env;
use serde_json::{Value, json};
use support::everywhere::catalog;
use support::{Controller, kubectl_apply};
use zookeeper_client as zk;

/// The servers' `jute.maxbuffer`: a session owns at most half of it in paths.
const MAX_BUFFER: usize = 32 * 1024;
const BUDGET: usize = MAX_BUFFER / 2;
const ENDPOINTS: usize = 10;
const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(60);

fn name(s: usize) -> String {
    format!("svc-{s:03}")
}

/// `<name>` → `ip:port` of its 10 endpoints.
fn want(services: std::ops::Range<usize>) -> BTreeMap<String, Vec<String>> {
    services
        .map(|s| {
            let mut eps: Vec<String> = (0..ENDPOINTS)
                .map(|e| format!("10.{}.{}.{}:8080", 100 + s / 250, s % 250, e + 1))
                .collect();
            eps.sort();
            (name(s), eps)
        })
        .collect()
}

/// Selector-less Services with one EndpointSlice each, exported to the catalog `zk`.
async fn create_services(client: &kube::Client, services: std::ops::Range<usize>) -> Result<()> {
    let svcs: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let mut pending = Vec::new();
    for s in services {
        let name = name(s);
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"catalog-bridge.io/export": "zk"}},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))?;
        let endpoints: Vec<Value> = (0..ENDPOINTS)
            .map(|e| {
                json!({"addresses": [format!("10.{}.{}.{}", 100 + s / 250, s % 250, e + 1)],
                       "conditions": {"ready": true}})
            })
            .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-1"), "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "test.catalog-bridge.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))?;
        let (svcs, slices) = (svcs.clone(), slices.clone());
        pending.push(async move {
            svcs.create(&PostParams::default(), &svc).await?;
            slices.create(&PostParams::default(), &slice).await?;
            Ok::<(), anyhow::Error>(())
        });
        if pending.len() == 32 {
            futures::future::try_join_all(pending.drain(..)).await?;
        }
    }
    futures::future::try_join_all(pending).await?;
    Ok(())
}

/// One entry as kazoo reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    czxid: i64,
    mzxid: i64,
    owner: i64,
}

/// Every child of `/services/<name>/providers`, by name, as kazoo reads them.
fn catalog_nodes(env: &Env) -> Result<BTreeMap<String, BTreeMap<String, Node>>> {
    let out = localenv::python(
        "import sys, json\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         out = {}\n\
         names = zk.get_children('/services') if zk.exists('/services') else []\n\
         for n in names:\n\
         \x20   d = '/services/%s/providers' % n\n\
         \x20   kids = zk.get_children(d) if zk.exists(d) else []\n\
         \x20   got = {}\n\
         \x20   for c in kids:\n\
         \x20       s = zk.exists(d + '/' + c)\n\
         \x20       if s: got[c] = [s.czxid, s.mzxid, s.ephemeralOwner]\n\
         \x20   if got: out[n] = got\n\
         print(json.dumps(out))\n\
         zk.stop()\n",
        &[&env.zookeeper()?.connect_string()],
    )?;
    let raw: BTreeMap<String, BTreeMap<String, (i64, i64, i64)>> =
        serde_json::from_str(out.trim()).with_context(|| format!("kazoo printed {out:?}"))?;
    Ok(raw
        .into_iter()
        .map(|(n, kids)| {
            let kids = kids
                .into_iter()
                .map(|(c, (czxid, mzxid, owner))| {
                    (
                        c,
                        Node {
                            czxid,
                            mzxid,
                            owner,
                        },
                    )
                })
                .collect();
            (n, kids)
        })
        .collect())
}

/// The sessions the controller keeps in its Secret for catalog `zk`: `(id, password)`, shard 0
/// first.
async fn stored_sessions(client: &kube::Client) -> Result<Vec<(i64, Vec<u8>)>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let s = secrets.get("catalog-bridge-zk-sessions").await?;
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get("zk.json"))
        .context("no zk.json in the sessions Secret")?;
    let v: Value = serde_json::from_slice(&bytes.0)?;
    let one = |v: &Value| -> Result<(i64, Vec<u8>)> {
        let id = v["id"].as_i64().context("id")?;
        let password: Vec<u8> = serde_json::from_value(v["password"].clone())?;
        Ok((id, password))
    };
    let mut out = vec![one(&v)?];
    for s in v["shards"].as_array().into_iter().flatten() {
        out.push(one(s)?);
    }
    Ok(out)
}

/// Checks the catalog holds exactly `want`, every name in one session of `sessions`, and no
/// session past its budget; returns the entries.
fn check_spread(
    nodes: &BTreeMap<String, BTreeMap<String, Node>>,
    want: &BTreeMap<String, Vec<String>>,
    sessions: &[i64],
) -> Result<()> {
    let have: BTreeMap<String, Vec<String>> = nodes
        .iter()
        .map(|(n, kids)| (n.clone(), kids.keys().cloned().collect()))
        .collect();
    ensure!(
        &have == want,
        "the catalog holds other entries than exported"
    );
    let mut bytes: HashMap<i64, usize> = HashMap::new();
    for (n, kids) in nodes {
        let owners: HashSet<i64> = kids.values().map(|k| k.owner).collect();
        ensure!(owners.len() == 1, "{n} is spread over sessions {owners:x?}");
        for (c, k) in kids {
            ensure!(
                sessions.contains(&k.owner),
                "{n}/{c} is owned by {:#x}, not a stored session",
                k.owner
            );
            *bytes.entry(k.owner).or_default() += 4 + format!("/services/{n}/providers/{c}").len();
        }
    }
    println!(
        "{} entries in {} sessions, bytes of paths per session: {:?} (budget {BUDGET})",
        nodes.values().map(BTreeMap::len).sum::<usize>(),
        sessions.len(),
        bytes.values().collect::<Vec<_>>()
    );
    ensure!(
        bytes.values().all(|&b| b <= BUDGET),
        "a session passes its budget: {bytes:?}"
    );
    Ok(())
}

/// Reads the entries of `names` in a loop until stopped; the fewest seen at once.
fn watch_fewest(connect: String, names: Vec<String>, stop: Arc<AtomicBool>) -> Arc<AtomicUsize> {
    let fewest = Arc::new(AtomicUsize::new(usize::MAX));
    let out = fewest.clone();
    tokio::spawn(async move {
        let Ok(c) = zk::Client::connect(&connect).await else {
            return;
        };
        while !stop.load(Ordering::SeqCst) {
            let lists = futures::future::join_all(
                names
                    .iter()
                    .map(|n| c.list_children(&format!("/services/{n}/providers"))),
            )
            .await;
            let seen = lists.iter().map(|l| l.as_ref().map_or(0, Vec::len)).sum();
            fewest.fetch_min(seen, Ordering::SeqCst);
        }
    });
    out
}

#[tokio::test]
async fn entries_spread_over_sessions_survive_restart_expiry_and_go_with_a_kill() -> Result<()> {
    let env = Env::builder()
        .kube()
        .zookeeper_max_buffer(MAX_BUFFER)
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, NS).await?;
    let connect = env.zookeeper()?.connect_string();
    kubectl_apply(
        &env,
        &catalog(
            "zk",
            json!({"zookeeper": {"connect": connect, "layout": "plain",
                                 "sessionTimeoutSeconds": 4, "juteMaxBuffer": MAX_BUFFER}}),
        ),
    )?;
    let args = ["--drift-interval=1s"];
    let a = Controller::start(&env, "cb-a", "cluster-a", &args).await?;

    // 400 entries: past one session's budget.
    create_services(&client, 0..40).await?;
    let first = want(0..40);
    localenv::eventually("the first 400 entries", WAIT, || async {
        Ok((catalog_nodes(&env)?.len() == first.len()).then_some(()))
    })
    .await
    .with_context(|| a.log())?;
    let sessions: Vec<i64> = stored_sessions(&client)
        .await?
        .iter()
        .map(|s| s.0)
        .collect();
    check_spread(&catalog_nodes(&env)?, &first, &sessions).with_context(|| a.log())?;
    ensure!(
        sessions.len() >= 2,
        "400 entries in {} session(s)",
        sessions.len()
    );

    // 800 more: more sessions again, and entries of the first 40 names move to them; a reader
    // of those names never finds fewer than 400.
    let stop = Arc::new(AtomicBool::new(false));
    let fewest = watch_fewest(
        connect.clone(),
        first.keys().cloned().collect(),
        stop.clone(),
    );
    let t = Instant::now();
    create_services(&client, 40..120).await?;
    let all = want(0..120);
    localenv::eventually("all 1,200 entries", WAIT, || async {
        Ok((catalog_nodes(&env)?.len() == all.len()).then_some(()))
    })
    .await
    .with_context(|| a.log())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    println!("1,200 entries in {:?}", t.elapsed());
    let stored = stored_sessions(&client).await?;
    let sessions: Vec<i64> = stored.iter().map(|s| s.0).collect();
    let before = catalog_nodes(&env)?;
    check_spread(&before, &all, &sessions).with_context(|| a.log())?;
    ensure!(
        sessions.len() > 2,
        "1,200 entries in {} sessions",
        sessions.len()
    );
    let log = a.full_log()?;
    ensure!(
        log.contains("ZooKeeper entries moved to the sessions of their names"),
        "growing moved no entry:\n{}",
        a.log()
    );
    let fewest = fewest.load(Ordering::SeqCst);
    println!("a reader of the first 40 names saw at least {fewest} of their 400 entries");
    assert_eq!(fewest, 400, "an entry went missing while it moved");

    // (a) A restart: the same sessions, re-attached; nothing rewritten.
    a.process.stop()?;
    let b = Controller::start(&env, "cb-b", "cluster-a", &args).await?;
    localenv::eventually("the restarted controller to lead", WAIT, || async {
        Ok(b.is_leader().await.then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        stored_sessions(&client).await?,
        stored,
        "the same sessions kept"
    );
    assert!(
        catalog_nodes(&env)? == before,
        "after a restart every entry is there, not re-created nor updated (czxid, mzxid, owner)"
    );
    let writes = b
        .metric("catalog_bridge_backend_operations_total", &[])
        .await?;
    assert_eq!(writes, 0.0, "{}", b.metrics().await?);

    // (b) Every session expires: the controller frozen (SIGSTOP) past the session timeout, as
    // in a long pause or a partition. Each shard gets a new session and its entries back.
    b.process.pause()?;
    let t = Instant::now();
    let frozen = localenv::eventually("the entries gone with their sessions", WAIT, || async {
        Ok(catalog_nodes(&env)?.is_empty().then_some(()))
    })
    .await;
    println!(
        "controller frozen -> every entry gone after {:?}",
        t.elapsed()
    );
    b.process.resume()?;
    frozen?;
    let t = Instant::now();
    localenv::eventually("every entry back in new sessions", WAIT, || async {
        let now: Vec<i64> = stored_sessions(&client)
            .await?
            .iter()
            .map(|s| s.0)
            .collect();
        let nodes = catalog_nodes(&env)?;
        Ok(
            (now.iter().all(|s| !sessions.contains(s)) && check_spread(&nodes, &all, &now).is_ok())
                .then_some(()),
        )
    })
    .await
    .with_context(|| b.log())?;
    println!(
        "every session expired -> every entry back in {:?}",
        t.elapsed()
    );
    let renewed: Vec<i64> = stored_sessions(&client)
        .await?
        .iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(renewed.len(), sessions.len(), "as many sessions as before");

    // The closing transactions fit in jute.maxbuffer: the server reads its log again.
    env.zookeeper()?.stop()?;
    env.zookeeper()?.start_again().await?;
    localenv::eventually("every entry after a ZooKeeper restart", WAIT, || async {
        Ok(check_spread(&catalog_nodes(&env)?, &all, &renewed)
            .is_ok()
            .then_some(()))
    })
    .await
    .with_context(|| b.log())?;

    // (c) kill -9: every entry goes with its session, after the session timeout (4 s).
    let t = Instant::now();
    b.process.kill()?;
    let mut gone = None;
    while t.elapsed() < Duration::from_secs(40) {
        if catalog_nodes(&env)?.is_empty() {
            gone = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("controller killed -> every entry gone after {gone:?} (session timeout 4 s)");
    let gone = gone.context("entries outlived their sessions")?;
    assert!(
        gone >= Duration::from_secs(2),
        "not before the sessions could expire: {gone:?}"
    );
    Ok(())
}
