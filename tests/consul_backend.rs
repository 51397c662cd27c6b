//! The Consul backend against a real Consul 1.14 agent: what it writes reads back identically
//! (so a restart writes nothing), py-consul sees exactly the exported instances, writes go in
//! `/v1/txn` batches of at most 64 operations, entries of others are never touched, dead
//! addresses are skipped and named, and a Consul that lost its state is refilled.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail, ensure};
use catalog_bridge::backend::consul::{Consul, ConsulConfig, MARKER_KEY, MAX_TXN_OPS};
use catalog_bridge::backend::{Backend, BackendError, ClientCert, Record};
use catalog_bridge::export::plan::{Op, plan};
use catalog_bridge::model::{Instance, Origin};
use localenv::{Env, Scope};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

/// One Consul agent shared by the tests of this binary (each test uses its own node and
/// service names); a test that stops Consul builds its own.
async fn shared_consul() -> Result<&'static Env> {
    static ENV: OnceCell<Env> = OnceCell::const_new();
    ENV.get_or_try_init(|| async { Env::builder().consul().start().await })
        .await
        .context("starting the shared Consul agent")
}

fn backend_config(addresses: &[&str], scope: &Scope, owner: &str) -> ConsulConfig {
    ConsulConfig {
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        node_name: format!("k8s-{}", scope.prefix),
        owner: owner.to_string(),
        ..Default::default()
    }
}

fn backend(addresses: &[&str], scope: &Scope, owner: &str) -> Result<Consul> {
    Consul::new(backend_config(addresses, scope, owner))
}

fn instance(name: &str, ip: &str, port: u16, tags: &[&str], meta: &[(&str, &str)]) -> Instance {
    Instance {
        name: name.into(),
        address: ip.parse::<IpAddr>().expect("test address"),
        port,
        origin: Origin {
            namespace: "shop".into(),
            service: "api-x".into(),
        }
        .into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        meta: std::sync::Arc::new(
            meta.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
    }
}

fn many(name: &str, n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| {
            instance(
                name,
                &format!("10.2.{}.{}", i / 200, i % 200 + 1),
                8080,
                &["bulk"],
                &[],
            )
        })
        .collect()
}

async fn get_json(url: &str) -> Result<Value> {
    let http = localenv::http_client()?;
    Ok(http
        .get(url)
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("GET {url}"))?
        .json()
        .await?)
}

/// Service IDs on `node`, whoever registered them.
async fn node_service_ids(consul_url: &str, node: &str) -> Result<Vec<String>> {
    let v = get_json(&format!("{consul_url}/v1/catalog/node-services/{node}")).await?;
    let mut ids: Vec<String> = v["Services"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|s| s["ID"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    Ok(ids)
}

/// What py-consul's `health.service(name, passing=True)` returns, as
/// `[ID, Address, Port, Tags, owner]` sorted.
fn py_consul_passing(address: &str, name: &str) -> Result<Value> {
    let out = localenv::python(
        "import sys, json, consul\n\
         host, port = sys.argv[1].split(':')\n\
         c = consul.Consul(host=host, port=int(port))\n\
         _, entries = c.health.service(sys.argv[2], passing=True)\n\
         print(json.dumps(sorted([[e['Service']['ID'], e['Service']['Address'], e['Service']['Port'],\n\
                                   e['Service']['Tags'], (e['Service']['Meta'] or {}).get('catalog-bridge-owner')]\n\
                                  for e in entries])))\n",
        &[address, name],
    )?;
    serde_json::from_str(out.trim()).with_context(|| format!("py-consul printed {out:?}"))
}

fn expected_py(instances: &[Instance], owner: &str) -> Value {
    let mut rows: Vec<Value> = instances
        .iter()
        .map(|i| {
            json!([
                format!("{owner}:{}", i.stable_id()),
                i.address.to_string(),
                i.port,
                i.tags,
                owner
            ])
        })
        .collect();
    rows.sort_by_key(|v| v.to_string());
    Value::Array(rows)
}

/// Polls `/v1/health/service/<name>?passing` every 2 ms until stopped, counting the entries
/// not at `foreign` (someone else's address): the fewest seen in one answer, and the polls.
struct PassingReader {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Result<(usize, usize)>>,
}

impl PassingReader {
    fn start(url: &str, name: &str, foreign: &str) -> PassingReader {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (url, name, foreign, flag) = (
            url.to_string(),
            name.to_string(),
            foreign.to_string(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            let http = localenv::http_client()?;
            let (mut min, mut reads) = (usize::MAX, 0);
            while !flag.load(Ordering::SeqCst) {
                let v: Value = http
                    .get(format!("{url}/v1/health/service/{name}?passing"))
                    .send()
                    .await?
                    .json()
                    .await?;
                let ours = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|e| e["Service"]["Address"] != foreign.as_str())
                            .count()
                    })
                    .unwrap_or(0);
                min = min.min(ours);
                reads += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            Ok((min, reads))
        });
        PassingReader { stop, task }
    }

    /// Stops polling after one more round: (fewest entries seen, polls).
    async fn stop(self) -> Result<(usize, usize)> {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        self.stop.store(true, Ordering::SeqCst);
        self.task.await?
    }
}

/// Writes `services` on `node` as versions before this one did: the node registered by `owner`,
/// each service with a passing check `<service id>:ready` of its own; then `extra` operations,
/// all through `/v1/txn` in requests of at most [`MAX_TXN_OPS`].
async fn write_before(
    url: &str,
    node: &str,
    owner: &str,
    services: impl Iterator<Item = Value>,
    extra: Vec<Value>,
) -> Result<()> {
    let mut ops = vec![
        json!({"Node": {"Verb": "set", "Node": {"Node": node, "Address": "127.0.0.1",
        "Meta": {"external-source": "kubernetes", "catalog-bridge-owner": owner}}}}),
    ];
    for service in services {
        let check = json!({"Check": {"Verb": "set", "Check": {
            "Node": node, "CheckID": format!("{}:ready", service["ID"].as_str().unwrap_or_default()),
            "Name": "Kubernetes readiness", "Status": "passing", "ServiceID": service["ID"],
            "ServiceName": service["Service"]}}});
        ops.push(json!({"Service": {"Verb": "set", "Node": node, "Service": service}}));
        ops.push(check);
    }
    ops.extend(extra);
    let http = localenv::http_client()?;
    for batch in ops.chunks(MAX_TXN_OPS) {
        http.put(format!("{url}/v1/txn"))
            .json(&batch)
            .send()
            .await?
            .error_for_status()
            .context("writing the entries of before")?;
    }
    Ok(())
}

fn puts(records: &BTreeMap<String, Record>) -> Vec<Op> {
    plan(records, &BTreeMap::<String, Record>::new()).ops
}

/// render → apply → read_owned gives back exactly the rendered records, so a second plan (a
/// restarted controller) is empty; clients see exactly the instances, updates and deletes
/// (with their checks) land.
#[tokio::test]
async fn written_entries_read_back_identically_and_clients_see_them() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-roundtrip").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let c = backend(&[&consul.url()], &scope, &owner)?;
    let api_x = scope.name("api_x");
    let memcache = scope.name("memcache");

    let api_instances = vec![
        instance(
            &api_x,
            "10.0.0.1",
            8080,
            &["v2", "canary", "v2"],
            // A key Consul refuses is left out rather than failing the whole txn.
            &[("version", "2"), ("app.kubernetes.io/name", "api-x")],
        ),
        instance(&api_x, "10.0.0.2", 8080, &[], &[]),
        instance(&api_x, "fd00::1", 8080, &["ipv6"], &[]),
    ];
    let mut instances = api_instances.clone();
    instances.push(instance(&memcache, "10.0.0.4", 11211, &[], &[]));
    let desired = c.render(&instances);
    assert_eq!(desired.len(), 4);

    assert!(
        c.read_owned().await?.is_empty(),
        "a fresh node holds nothing"
    );
    let first = plan(&desired, &c.read_owned().await?);
    assert_eq!(first.creates, 4);
    let trips = c.apply(&first.ops).await?;
    assert_eq!(
        trips, 1,
        "4 instances (9 operations with the node) in one txn"
    );

    let read = c.read_owned().await?;
    assert_eq!(read, desired, "what Consul returns is what was rendered");
    assert_eq!(
        read[&c.service_id(&api_instances[0])]["Service"]["Meta"]["version"],
        "2"
    );
    assert!(plan(&desired, &read).is_empty(), "nothing to write again");

    // A restarted controller (a new backend, knowing nothing) plans nothing either.
    let restarted = backend(&[&consul.url()], &scope, &owner)?;
    let read = restarted.read_owned().await?;
    assert!(plan(&restarted.render(&instances), &read).is_empty());

    // The synthetic node carries the meta that marks it.
    let node = get_json(&format!(
        "{}/v1/catalog/node/k8s-{}",
        consul.url(),
        scope.prefix
    ))
    .await?;
    assert_eq!(node["Node"]["Meta"]["external-source"], "kubernetes");
    assert_eq!(node["Node"]["Meta"]["catalog-bridge-owner"], json!(owner));
    assert_eq!(node["Node"]["Address"], "127.0.0.1");

    // What discovery clients get.
    assert_eq!(
        c.lookup(&api_x).await?,
        ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::1]:8080"]
    );
    assert_eq!(c.lookup(&memcache).await?, ["10.0.0.4:11211"]);
    assert_eq!(
        py_consul_passing(&consul.address(), &api_x)?,
        expected_py(&api_instances, &owner),
        "py-consul sees exactly the exported api_x instances"
    );

    // An update (new tags) is one put; a removal one delete that takes its check along.
    let mut changed = instances.clone();
    changed[1].tags = vec!["blue".into()].into();
    let removed = changed.remove(0);
    let desired = c.render(&changed);
    let p = plan(&desired, &c.read_owned().await?);
    assert_eq!((p.creates, p.updates, p.deletes), (0, 1, 1));
    assert_eq!(c.apply(&p.ops).await?, 1);
    assert_eq!(c.read_owned().await?, desired);
    let checks = get_json(&format!(
        "{}/v1/health/node/k8s-{}",
        consul.url(),
        scope.prefix
    ))
    .await?;
    let check_ids: Vec<&str> = checks
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["CheckID"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        check_ids,
        ["catalog-bridge"],
        "one check on the node stands for every instance: {checks}"
    );
    assert!(!c.read_owned().await?.contains_key(&c.service_id(&removed)));
    assert_eq!(
        py_consul_passing(&consul.address(), &api_x)?,
        expected_py(&changed[..2], &owner)
    );

    // The node check someone set critical hides every instance; it is drift the plan repairs.
    localenv::http_client()?
        .put(format!("{}/v1/txn", consul.url()))
        .json(&json!([{"Check": {"Verb": "set", "Check": {
            "Node": format!("k8s-{}", scope.prefix), "CheckID": "catalog-bridge",
            "Name": "Kubernetes readiness", "Status": "critical"}}}]))
        .send()
        .await?
        .error_for_status()?;
    assert!(c.lookup(&api_x).await?.is_empty());
    assert!(
        py_consul_passing(&consul.address(), &memcache)?
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    let p = plan(&desired, &c.read_owned().await?);
    assert_eq!((p.creates, p.updates, p.deletes), (0, 3, 0));
    c.apply(&p.ops).await?;
    assert_eq!(c.lookup(&api_x).await?, ["10.0.0.2:8080", "[fd00::1]:8080"]);
    assert!(plan(&desired, &c.read_owned().await?).is_empty());
    Ok(())
}

/// 150 instances go in txns of at most 64 operations each (one per instance, after the node and
/// its check), and all arrive; deleting them all is batched too.
#[tokio::test]
async fn many_instances_are_written_in_batches_of_64_operations() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-batches").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let c = backend(&[&consul.url()], &scope, &owner)?;
    let name = scope.name("api_x");
    let instances = many(&name, 150);
    let desired = c.render(&instances);
    let ops = plan(&desired, &c.read_owned().await?).ops;
    assert_eq!(ops.len(), 150);

    let batches = c.txn_batches(&ops, true)?;
    assert_eq!(
        batches.iter().map(Vec::len).sum::<usize>(),
        2 + 150,
        "node, its check, and the service of each instance"
    );
    assert!(
        batches.iter().all(|b| b.len() <= 64),
        "at most 64 operations per txn"
    );
    assert_eq!(MAX_TXN_OPS, 64);
    assert!(batches.len() >= 152_usize.div_ceil(64));

    let trips = c.apply(&ops).await?;
    assert_eq!(trips, batches.len(), "one request per batch");
    assert!(
        trips >= 3,
        "152 operations need at least 3 txns, took {trips}"
    );
    let read = c.read_owned().await?;
    assert_eq!(read.len(), 150);
    assert_eq!(read, desired);
    assert_eq!(c.lookup(&name).await?.len(), 150);

    let delete_all = plan(&BTreeMap::new(), &read);
    assert_eq!(delete_all.deletes, 150);
    let trips = c.apply(&delete_all.ops).await?;
    assert_eq!(trips, 3, "150 deletes in txns of at most 64");
    assert!(c.read_owned().await?.is_empty());
    assert!(c.lookup(&name).await?.is_empty());
    assert!(
        node_service_ids(&consul.url(), &format!("k8s-{}", scope.prefix))
            .await?
            .is_empty()
    );
    Ok(())
}

/// Services on the node registered by hand, or by another owner, are neither read as ours nor
/// changed or deleted, and registering the node does not remove them.
#[tokio::test]
async fn entries_of_others_on_the_node_are_never_touched() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-foreign").await?;
    let node = format!("k8s-{}", scope.prefix);
    let owner = format!("cluster-{}", scope.prefix);
    let name = scope.name("api_x");
    let http = localenv::http_client()?;

    for (id, ip, meta) in [
        ("by-hand", "10.9.0.1", json!({})),
        (
            "other-cluster",
            "10.9.0.2",
            json!({"catalog-bridge-owner": "someone-else", "external-source": "kubernetes"}),
        ),
    ] {
        http.put(format!("{}/v1/catalog/register", consul.url()))
            .json(&json!({
                "Node": node, "Address": "192.0.2.1",
                "Service": {"ID": id, "Service": name, "Address": ip, "Port": 8080, "Meta": meta},
                "Check": {"CheckID": format!("{id}-check"), "Name": "by hand",
                          "Status": "passing", "ServiceID": id},
            }))
            .send()
            .await?
            .error_for_status()
            .context("registering a foreign service")?;
    }

    let c = backend(&[&consul.url()], &scope, &owner)?;
    assert!(
        c.read_owned().await?.is_empty(),
        "foreign services are invisible"
    );
    let instances = vec![
        instance(&name, "10.0.0.1", 8080, &[], &[]),
        instance(&name, "10.0.0.2", 8080, &[], &[]),
    ];
    let desired = c.render(&instances);
    c.apply(&puts(&desired)).await?;
    let read = c.read_owned().await?;
    assert_eq!(read, desired, "only our two instances are read");
    assert_eq!(
        c.lookup(&name).await?,
        [
            "10.0.0.1:8080",
            "10.0.0.2:8080",
            "10.9.0.1:8080",
            "10.9.0.2:8080"
        ],
        "all four are served"
    );

    let delete_all = plan(&BTreeMap::new(), &read);
    assert_eq!(delete_all.deletes, 2);
    c.apply(&delete_all.ops).await?;
    assert_eq!(
        node_service_ids(&consul.url(), &node).await?,
        ["by-hand", "other-cluster"],
        "the foreign services survive"
    );
    assert_eq!(c.lookup(&name).await?, ["10.9.0.1:8080", "10.9.0.2:8080"]);
    let checks = get_json(&format!("{}/v1/health/node/{node}", consul.url())).await?;
    assert_eq!(
        checks
            .as_array()
            .map(|c| c.iter().filter(|c| c["ServiceID"] != "").count()),
        Some(2),
        "their checks survive too: {checks}"
    );

    // `cleanup` then retires the node only once nothing of anyone is left on it, and only as
    // the owner that registered it.
    assert_eq!(c.retire().await?, None, "foreign services keep the node");
    for id in ["by-hand", "other-cluster"] {
        http.put(format!("{}/v1/catalog/deregister", consul.url()))
            .json(&json!({"Node": node, "ServiceID": id}))
            .send()
            .await?
            .error_for_status()
            .context("deregistering a foreign service")?;
    }
    let other = backend(&[&consul.url()], &scope, "someone-else")?;
    assert_eq!(
        other.retire().await?,
        None,
        "another owner never removes the node"
    );
    let node_url = format!("{}/v1/catalog/node/{node}", consul.url());
    ensure!(
        get_json(&node_url).await?["Node"]["Node"] == node.as_str(),
        "the empty node is still there"
    );
    assert_eq!(
        c.retire().await?,
        Some(format!("deregistered the empty node {node}"))
    );
    let gone = get_json(&node_url).await?;
    ensure!(gone.is_null(), "the node is gone: {gone}");
    assert_eq!(c.retire().await?, None, "nothing left to retire");
    Ok(())
}

/// A listener that accepts connections, counts them and answers each with `reply` (or closes
/// it at once when `reply` is empty).
async fn fake_server(reply: &'static str) -> Result<(String, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            if !reply.is_empty() {
                // Read the request head first: closing with unread data resets the connection.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        }
    });
    Ok((url, count))
}

/// Dead addresses are skipped (and the one that answered is used first afterwards), and so are
/// servers that answer 5xx or 429; when none answers, the error names each address and why; a
/// 4xx is an answer, not a reason to try the next address.
#[tokio::test]
async fn dead_addresses_are_skipped_and_named() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-failover").await?;
    let owner = format!("cluster-{}", scope.prefix);

    let c = backend(&["http://127.0.0.1:1", &consul.url()], &scope, &owner)?;
    let info = c.probe().await?;
    assert_eq!(info.address.as_deref(), Some(consul.url().as_str()));
    assert!(info.leader.as_deref().is_some_and(|l| !l.is_empty()));
    assert_eq!(info.datacenter.as_deref(), Some("dc1"));
    assert!(
        info.version
            .as_deref()
            .is_some_and(|v| v.starts_with("1.14")),
        "{info:?}"
    );
    let desired = c.render(&[instance(&scope.name("api_x"), "10.0.0.1", 80, &[], &[])]);
    c.apply(&puts(&desired)).await?;
    assert_eq!(c.read_owned().await?, desired);

    // The address that answered is asked first from then on.
    let (closing, hits) = fake_server("").await?;
    let c = backend(&[&closing, &consul.url()], &scope, &owner)?;
    assert_eq!(c.read_owned().await?, desired);
    let after_first = hits.load(Ordering::SeqCst);
    assert!(after_first >= 1, "the first address was tried first");
    assert_eq!(c.read_owned().await?, desired);
    c.probe().await?;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        after_first,
        "the dead address is not retried while the other answers"
    );

    // Nothing answers: every address is named, and so is why.
    let dead = backend(
        &["http://127.0.0.1:1", "http://127.0.0.1:2"],
        &scope,
        &owner,
    )?;
    for result in [
        dead.read_owned().await.map(|_| ()),
        dead.apply(&puts(&desired)).await.map(|_| ()),
        dead.probe().await.map(|_| ()),
        dead.lookup("x").await.map(|_| ()),
    ] {
        match result {
            Err(BackendError::Unreachable(msg)) => {
                assert_eq!(
                    msg,
                    "no Consul address answered: http://127.0.0.1:1 (connection refused), \
                     http://127.0.0.1:2 (connection refused)"
                );
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }

    // A server that cannot serve now (500 "No cluster leader", 429) is passed over for the
    // next address, as a refused one is.
    let (leaderless, _) = fake_server(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 17\r\nConnection: close\r\n\r\nNo cluster leader",
    )
    .await?;
    let (busy, _) = fake_server(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 9\r\nConnection: close\r\n\r\nslow down",
    )
    .await?;
    let c = backend(&[&leaderless, &busy, &consul.url()], &scope, &owner)?;
    assert_eq!(c.read_owned().await?, desired);
    // When no address can serve, each is named with what it said.
    let c = backend(&[&leaderless, &busy], &scope, &owner)?;
    match c.read_owned().await {
        Err(BackendError::Unreachable(msg)) => ensure!(
            msg.contains(&format!("{leaderless} (HTTP 500: No cluster leader)"))
                && msg.contains(&format!("{busy} (HTTP 429: slow down)")),
            "{msg}"
        ),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    // A 4xx is the request's own (a token without the right): every server would say so.
    let (forbidden, _) = fake_server(
        "HTTP/1.1 403 Forbidden\r\nContent-Length: 17\r\nConnection: close\r\n\r\nPermission denied",
    )
    .await?;
    let c = backend(&[&forbidden, &consul.url()], &scope, &owner)?;
    match c.read_owned().await {
        Err(BackendError::Unauthorized(msg)) => {
            ensure!(msg.contains("403") && msg.contains(&forbidden), "{msg}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    Ok(())
}

/// A Consul that loses its state (a dev agent restarted) reads as empty, and the plan writes
/// everything back; a write that finds the node gone registers it again by itself.
#[tokio::test]
async fn a_consul_that_lost_its_state_is_refilled() -> Result<()> {
    let env = Env::builder().consul().start().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-restart").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let c = backend(&[&consul.url()], &scope, &owner)?;
    let name = scope.name("api_x");
    let instances: Vec<Instance> = many(&name, 40);
    let desired = c.render(&instances);
    c.apply(&puts(&desired)).await?;
    assert_eq!(c.read_owned().await?, desired);

    consul.stop()?;
    assert!(matches!(
        c.read_owned().await,
        Err(BackendError::Unreachable(_))
    ));
    consul.start_again().await?;
    let read = c.read_owned().await?;
    assert!(read.is_empty(), "the restarted agent forgot everything");
    let p = plan(&desired, &read);
    assert_eq!((p.creates, p.updates, p.deletes), (40, 0, 0));
    c.apply(&p.ops).await?;
    assert_eq!(c.read_owned().await?, desired);
    assert_eq!(c.lookup(&name).await?.len(), 40);

    // Again, but the controller writes before it reads: the txn that finds no node is
    // retried with the node registration.
    consul.stop()?;
    consul.start_again().await?;
    let trips = c.apply(&puts(&desired)).await?;
    assert_eq!(trips, 2, "the refused txn, then 42 operations in one");
    assert_eq!(c.read_owned().await?, desired);
    Ok(())
}

/// A Consul that serves HTTPS only and verifies its clients (`verify_incoming`): with its CA and
/// a client certificate the backend writes, reads and looks up as over HTTP; without the
/// certificate, or trusting another CA, nothing gets through and the error says where and why.
#[tokio::test]
async fn a_tls_consul_is_reached_with_its_ca_and_a_client_certificate() -> Result<()> {
    let env = Env::builder().consul_tls().start().await?;
    let tls = env.tls()?;
    let url = env.consul()?.url();
    ensure!(url.starts_with("https://"), "{url}");
    let scope = env.scope("consul-tls").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let client_cert = ClientCert {
        cert_pem: tls.client_cert_pem.clone(),
        key_pem: tls.client_key_pem.clone(),
    };
    let with = |ca: &[u8], cert: Option<&ClientCert>| {
        Consul::new(ConsulConfig {
            addresses: vec![url.clone()],
            node_name: format!("k8s-{}", scope.prefix),
            owner: owner.clone(),
            ca_pem: Some(ca.to_vec()),
            client_cert: cert.cloned(),
            ..Default::default()
        })
    };

    let c = with(&tls.ca_pem, Some(&client_cert))?;
    let info = c.probe().await?;
    assert_eq!(info.address.as_deref(), Some(url.as_str()));
    let name = scope.name("api_x");
    let instances = [
        instance(&name, "10.0.0.1", 8080, &[], &[]),
        instance(&name, "10.0.0.2", 8080, &[], &[]),
    ];
    let desired = c.render(&instances);
    c.apply(&puts(&desired)).await?;
    assert_eq!(c.read_owned().await?, desired);
    assert_eq!(c.lookup(&name).await?, ["10.0.0.1:8080", "10.0.0.2:8080"]);

    for (what, refused, why) in [
        (
            "without a client certificate",
            with(&tls.ca_pem, None)?,
            "tls.clientCertSecretRef",
        ),
        (
            "trusting another CA",
            with(&tls.other_ca_pem, Some(&client_cert))?,
            "invalid peer certificate: UnknownIssuer; the server's certificate is not signed by a \
             CA this controller trusts (tls.caSecretRef)",
        ),
    ] {
        match refused.read_owned().await {
            Err(BackendError::Unreachable(msg)) => {
                println!("{what}: {msg}");
                ensure!(
                    msg.starts_with(&format!("no Consul address answered: {url} (")),
                    "{what}: the address is named: {msg}"
                );
                ensure!(msg.contains(why), "{what}: the message says why: {msg}");
            }
            other => bail!("{what}: expected Unreachable, got {other:?}"),
        }
    }
    Ok(())
}

/// Two ExternalCatalogs of one owner on one Consul node (one used only to import, say): each
/// owns only the entries it wrote, so the one with nothing to export deletes nothing.
#[tokio::test]
async fn two_catalogs_of_one_owner_on_one_node_own_only_their_own_entries() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-two-catalogs").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let name = scope.name("api_x");
    let with_catalog = |catalog: &str| {
        Consul::new(ConsulConfig {
            catalog: catalog.to_string(),
            ..backend_config(&[&consul.url()], &scope, &owner)
        })
    };
    let exporting = with_catalog("consul")?;
    let importing = with_catalog("consul-for-import")?;
    let desired = exporting.render(&[
        instance(&name, "10.0.0.1", 8080, &[], &[]),
        instance(&name, "10.0.0.2", 8080, &[], &[]),
    ]);
    exporting.apply(&puts(&desired)).await?;
    let theirs = importing.read_owned().await?;
    assert!(theirs.is_empty(), "the other catalog's entries: {theirs:?}");
    assert!(
        plan(&BTreeMap::new(), &theirs).is_empty(),
        "nothing to delete for the catalog that exports nothing"
    );
    assert_eq!(exporting.read_owned().await?, desired);
    Ok(())
}

/// An upgrade: the entries the previous version wrote, under service IDs without the owner id,
/// are replaced by the first write after a restart (each in one transaction with its new ID,
/// so a reader polling all along never sees an instance missing); foreign entries are not
/// touched, and the start after that writes nothing.
#[tokio::test]
async fn entries_under_the_ids_of_before_are_replaced_without_a_gap() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-upgrade").await?;
    let node = format!("k8s-{}", scope.prefix);
    let owner = format!("cluster-{}", scope.prefix);
    let name = scope.name("api_x");
    let http = localenv::http_client()?;
    let c = backend(&[&consul.url()], &scope, &owner)?;
    const N: usize = 30;
    let instances = many(&name, N);

    // As the previous version wrote them: ID = the instance's identity alone.
    let before = instances.iter().map(|i| {
        let mut service = c.record(i)["Service"].clone();
        service["ID"] = json!(i.stable_id());
        service
    });
    write_before(&consul.url(), &node, &owner, before, vec![]).await?;
    // Another cluster's entry and a hand-made one on the same node.
    for (id, meta) in [
        ("by-hand", json!({})),
        (
            "other-cluster",
            json!({"catalog-bridge-owner": "someone-else", "external-source": "kubernetes"}),
        ),
    ] {
        http.put(format!("{}/v1/catalog/register", consul.url()))
            .json(&json!({"Node": node, "Address": "127.0.0.1",
                          "Service": {"ID": id, "Service": name, "Address": "10.9.0.1",
                                      "Port": 8080, "Meta": meta}}))
            .send()
            .await?
            .error_for_status()?;
    }
    let foreign = || async {
        let v = get_json(&format!("{}/v1/catalog/node-services/{node}", consul.url())).await?;
        Ok::<_, anyhow::Error>(
            v["Services"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s["ID"] == "by-hand" || s["ID"] == "other-cluster")
                .map(|s| (s["ID"].to_string(), s["ModifyIndex"].clone()))
                .collect::<Vec<_>>(),
        )
    };
    let foreign_before = foreign().await?;
    assert_eq!(foreign_before.len(), 2);

    let reader = PassingReader::start(&consul.url(), &name, "10.9.0.1");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    // The restarted controller: one plan, written.
    let desired = c.render(&instances);
    let read = c.read_owned().await?;
    assert_eq!(read.len(), N, "the entries of before are read as ours");
    let p = plan(&desired, &read);
    assert_eq!((p.creates, p.updates, p.deletes), (0, N, 0), "{p}");
    let trips = c.apply(&p.ops).await?;
    let (min, reads) = reader.stop().await?;
    println!(
        "upgrade of {N} entries: {N} service sets and {N} deletes in {trips} round trip(s); a reader polled {reads} times"
    );
    assert_eq!(min, N, "the reader always saw every instance");

    let mut want: Vec<String> = desired.keys().cloned().collect();
    want.extend(["by-hand".to_string(), "other-cluster".to_string()]);
    want.sort();
    assert_eq!(
        node_service_ids(&consul.url(), &node).await?,
        want,
        "only the new IDs and the foreign entries are left"
    );
    assert_eq!(
        foreign().await?,
        foreign_before,
        "foreign entries untouched"
    );
    // The next start writes nothing.
    let restarted = backend(&[&consul.url()], &scope, &owner)?;
    let read = restarted.read_owned().await?;
    assert!(plan(&restarted.render(&instances), &read).is_empty());
    Ok(())
}

/// Health: one passing check on the synthetic node stands for every instance on it
/// (readiness is carried by adding and removing instances). A catalog the previous version
/// wrote, with a check per instance, moves to that layout in one pass: each instance's check is
/// deleted in the transaction that puts its service again, after the node check is set, so a
/// reader polling all along sees every instance; a check someone else put on the node stays,
/// and the start after that writes nothing.
#[tokio::test]
async fn per_instance_checks_of_before_give_way_to_one_node_check_without_a_gap() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-node-check").await?;
    let node = format!("k8s-{}", scope.prefix);
    let owner = format!("cluster-{}", scope.prefix);
    let name = scope.name("api_x");
    let c = backend(&[&consul.url()], &scope, &owner)?;
    const N: usize = 40;
    let instances = many(&name, N);

    // As the previous version wrote them: a passing check `<service id>:ready` per instance;
    // and someone else's service on the node, with a check of its own.
    let before = c
        .render(&instances)
        .into_values()
        .map(|r| r["Service"].clone());
    let foreign = vec![
        json!({"Service": {"Verb": "set", "Node": node, "Service": {
            "ID": "by-hand", "Service": name, "Address": "10.9.0.1", "Port": 8080}}}),
        json!({"Check": {"Verb": "set", "Check": {
            "Node": node, "CheckID": "by-hand-check", "Name": "by hand", "Status": "passing",
            "ServiceID": "by-hand"}}}),
    ];
    write_before(&consul.url(), &node, &owner, before, foreign).await?;
    let service_indexes = || async {
        let v = get_json(&format!("{}/v1/catalog/node-services/{node}", consul.url())).await?;
        Ok::<_, anyhow::Error>(
            v["Services"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|s| (s["ID"].to_string(), s["ModifyIndex"].clone()))
                .collect::<BTreeMap<_, _>>(),
        )
    };
    let before = service_indexes().await?;

    let reader = PassingReader::start(&consul.url(), &name, "10.9.0.1");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let desired = c.render(&instances);
    let p = plan(&desired, &c.read_owned().await?);
    assert_eq!((p.creates, p.updates, p.deletes), (0, N, 0), "{p}");
    let trips = c.apply(&p.ops).await?;
    let (min, reads) = reader.stop().await?;
    println!(
        "{N} instances moved to the node check in {trips} round trip(s); a reader polled {reads} times"
    );
    assert_eq!(min, N, "the reader always saw every instance");

    let checks = get_json(&format!("{}/v1/health/node/{node}", consul.url())).await?;
    let mut found: Vec<(String, String, String)> = checks
        .as_array()
        .context("health of the node")?
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("CheckID"), s("ServiceID"), s("Status"))
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("by-hand-check".into(), "by-hand".into(), "passing".into()),
            ("catalog-bridge".into(), String::new(), "passing".into()),
        ],
        "one node check of ours, the foreign check untouched: {checks}"
    );
    assert_eq!(
        service_indexes().await?,
        before,
        "the services themselves were not rewritten"
    );
    assert_eq!(
        py_consul_passing(&consul.address(), &name)?
            .as_array()
            .map(Vec::len),
        Some(N + 1),
        "py-consul sees every instance passing"
    );
    let restarted = backend(&[&consul.url()], &scope, &owner)?;
    assert!(plan(&desired, &restarted.read_owned().await?).is_empty());
    Ok(())
}

/// Two Consul clusters whose datacenters are both `dc1` are two locations; two clients of one
/// cluster (another token, another address of it) are one. With Connect on (as in dev mode) the
/// cluster is named by its CA's trust domain, and nothing is written.
#[tokio::test]
async fn the_location_names_the_cluster_not_only_the_datacenter() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-location").await?;
    let other_env = Env::builder().consul().start().await?;
    let other = other_env.consul()?;
    let here = backend(&[&consul.url()], &scope, "a")?.location().await?;
    let again = backend(&[&consul.url()], &scope, "b")?.location().await?;
    let there = backend(&[&other.url()], &scope, "a")?.location().await?;
    println!("{here}\n{there}");
    assert_eq!(here, again);
    assert_ne!(here, there);
    assert!(here.starts_with("consul datacenter dc1 cluster trust-domain "));
    assert!(there.starts_with("consul datacenter dc1 cluster trust-domain "));
    let kv = localenv::http_client()?
        .get(format!("{}/v1/kv/catalog-bridge/cluster-id", consul.url()))
        .send()
        .await?;
    assert_eq!(kv.status(), 404, "no marker written where Connect answers");
    Ok(())
}

/// Where Connect is off, the cluster is named by the marker key `catalog-bridge/cluster-id`,
/// written once (two clients writing it at once agree on one); a read-only client (a dry run)
/// writes none and names the cluster by its servers, as does a token that may not read the key.
#[tokio::test]
async fn without_connect_the_cluster_is_named_by_a_marker_written_once() -> Result<()> {
    const MANAGEMENT: &str = "5b1f0a3e-7c2d-4e6f-8a9b-0c1d2e3f4a5b";
    // An environment without peers of its own: its directory holds these agents.
    let env = Env::builder().start().await?;
    let (one, two, acl) = tokio::try_join!(
        localenv::consul::Consul::start_without_connect(env.dir(), "plain-1", None),
        localenv::consul::Consul::start_without_connect(env.dir(), "plain-2", None),
        localenv::consul::Consul::start_without_connect(env.dir(), "acl", Some(MANAGEMENT)),
    )?;
    let cfg = |url: String, owner: &str, read_only: bool| ConsulConfig {
        addresses: vec![url],
        node_name: "k8s-location".into(),
        owner: owner.into(),
        read_only,
        ..Default::default()
    };
    let marker = |url: String| async move {
        let r = localenv::http_client()?
            .get(format!("{url}/v1/kv/{MARKER_KEY}?raw"))
            .send()
            .await?;
        Ok::<_, anyhow::Error>((r.status().as_u16(), r.text().await?))
    };

    // Read-only and no marker yet: the servers name it, nothing is written.
    let dry = Consul::new(cfg(one.url(), "a", true))?.location().await?;
    println!("{dry}");
    assert!(dry.contains(" cluster servers 127.0.0.1:"), "{dry}");
    assert_eq!(
        marker(one.url()).await?.0,
        404,
        "a dry run writes no marker"
    );

    // Two writers at once: one marker, both read it.
    let (a, b) = (
        Consul::new(cfg(one.url(), "a", false))?,
        Consul::new(cfg(one.url(), "b", false))?,
    );
    let (la, lb) = tokio::try_join!(a.location(), b.location())?;
    println!("{la}");
    assert_eq!(la, lb);
    assert!(
        la.starts_with("consul datacenter dc1 cluster marker "),
        "{la}"
    );
    let (status, body) = marker(one.url()).await?;
    assert_eq!(status, 200);
    assert!(
        la.contains(
            serde_json::from_str::<Value>(&body)?["clusterId"]
                .as_str()
                .context("clusterId")?
        )
    );
    // Read-only, once the marker exists, names it the same way.
    assert_eq!(
        Consul::new(cfg(one.url(), "a", true))?.location().await?,
        la
    );
    // Another dc1 cluster is another location.
    let other = Consul::new(cfg(two.url(), "a", false))?.location().await?;
    assert_ne!(other, la);
    assert!(
        other.starts_with("consul datacenter dc1 cluster marker "),
        "{other}"
    );

    // A token without key rights: the servers name it.
    let http = localenv::http_client()?;
    http.put(format!("{}/v1/acl/policy", acl.url()))
        .header("X-Consul-Token", MANAGEMENT)
        .json(&json!({"Name": "catalog", "Rules": r#"node_prefix "" { policy = "write" } agent_prefix "" { policy = "read" }"#}))
        .send()
        .await?
        .error_for_status()?;
    let token: Value = http
        .put(format!("{}/v1/acl/token", acl.url()))
        .header("X-Consul-Token", MANAGEMENT)
        .json(&json!({"Policies": [{"Name": "catalog"}]}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let limited = Consul::new(ConsulConfig {
        token: token["SecretID"].as_str().map(str::to_string),
        ..cfg(acl.url(), "a", false)
    })?;
    let l = limited.location().await?;
    println!("{l}");
    assert!(l.contains(" cluster servers 127.0.0.1:"), "{l}");
    Ok(())
}
