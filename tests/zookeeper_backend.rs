//! The ZooKeeper backend against a real ZooKeeper 3.8: what it writes reads back identically
//! (so a restart writes nothing), kazoo and Curator-style readers see exactly the exported
//! instances as ephemeral nodes, writes go in `multi`s of at most 100 operations, nodes of
//! others are never touched, a restarted controller re-attaches to its session (the nodes never
//! go away), an expired session is replaced and its nodes re-created, the nodes of a dead
//! controller go after the session timeout, and a ZooKeeper that requires TLS with client
//! certificates is reached through the session relay.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use catalog_bridge::api::crd::ZooKeeperLayout;
use catalog_bridge::backend::tls::TlsSettings;
use catalog_bridge::backend::zookeeper::{
    MAX_MULTI_OPS, MemorySessionStore, SessionStore, StoredSession, ZooKeeper, ZooKeeperConfig,
};
use catalog_bridge::backend::{Backend, BackendError, ClientCert, ImportSnapshot, Record};
use catalog_bridge::export::Snapshot;
use catalog_bridge::export::plan::{Op, plan};
use catalog_bridge::export::writer::{self, Writer};
use catalog_bridge::model::{DesiredCatalog, Instance, Origin};
use catalog_bridge::runtime::metrics::Metrics;
use localenv::{Env, Scope, eventually};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OnceCell, watch};
use zookeeper_client as zk;

/// One ZooKeeper shared by the tests of this binary (each test uses its own base path); a test
/// that stops ZooKeeper builds its own.
async fn shared_zk() -> Result<&'static Env> {
    static ENV: OnceCell<Env> = OnceCell::const_new();
    ENV.get_or_try_init(|| async {
        let env = Env::builder().zookeeper().start().await?;
        Ok::<_, anyhow::Error>(env)
    })
    .await
    .context("starting the shared ZooKeeper")
}

fn base(scope: &Scope) -> String {
    format!("/{}/services", scope.prefix)
}

fn config(
    connect: &str,
    base: &str,
    layout: ZooKeeperLayout,
    store: Arc<MemorySessionStore>,
    timeout: Duration,
) -> ZooKeeperConfig {
    ZooKeeperConfig {
        connect: connect.to_string(),
        session_timeout: timeout,
        layout,
        base_path: Some(base.to_string()),
        owner: "cluster-a".into(),
        session_store: store,
        ..Default::default()
    }
}

fn backend(
    connect: &str,
    base: &str,
    layout: ZooKeeperLayout,
    store: &Arc<MemorySessionStore>,
    timeout: Duration,
) -> Result<ZooKeeper> {
    ZooKeeper::new(config(connect, base, layout, store.clone(), timeout))
}

/// A `plain` backend whose sessions each own at most 8 KiB of paths, so that a few hundred
/// entries pass one session's budget.
fn with_small_sessions(
    connect: &str,
    base: &str,
    store: &Arc<MemorySessionStore>,
) -> Result<ZooKeeper> {
    ZooKeeper::new(ZooKeeperConfig {
        session_path_budget: Some(8 * 1024),
        ..config(
            connect,
            base,
            ZooKeeperLayout::Plain,
            store.clone(),
            Duration::from_secs(10),
        )
    })
}

fn instance(name: &str, ip: &str, port: u16) -> Instance {
    Instance {
        name: name.into(),
        address: ip.parse::<IpAddr>().expect("test address"),
        port,
        origin: Origin {
            namespace: "shop".into(),
            service: "api-x".into(),
        }
        .into(),
        tags: vec![].into(),
        meta: Default::default(),
    }
}

fn many(name: &str, n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| instance(name, &format!("10.3.{}.{}", i / 200, i % 200 + 1), 8080))
        .collect()
}

fn puts(records: &BTreeMap<String, Record>) -> Vec<Op> {
    plan(records, &BTreeMap::<String, Record>::new()).ops
}

/// Runs a kazoo snippet that prints one JSON value; `sys.argv[1]` is the connect string.
fn kazoo(connect: &str, body: &str, args: &[&str]) -> Result<Value> {
    let script = format!(
        "import sys, json\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         try:\n\
         {}\n\
         finally:\n    zk.stop()\n",
        body.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut all = vec![connect];
    all.extend_from_slice(args);
    let out = localenv::python(&script, &all)?;
    serde_json::from_str(out.trim()).with_context(|| format!("kazoo printed {out:?}"))
}

/// What kazoo's `get_children(path)` returns, sorted.
fn kazoo_children(connect: &str, path: &str) -> Result<Vec<String>> {
    let v = kazoo(
        connect,
        "print(json.dumps(sorted(zk.get_children(sys.argv[2])) if zk.exists(sys.argv[2]) else []))",
        &[path],
    )?;
    Ok(serde_json::from_value(v)?)
}

/// `{child: [data as text, ephemeralOwner]}` of every child of `path`, as kazoo reads them.
fn kazoo_nodes(connect: &str, path: &str) -> Result<BTreeMap<String, (String, i64)>> {
    let v = kazoo(
        connect,
        "out = {}\n\
         for c in zk.get_children(sys.argv[2]):\n    \
             data, stat = zk.get(sys.argv[2] + '/' + c)\n    \
             out[c] = [data.decode(), stat.ephemeralOwner]\n\
         print(json.dumps(out))",
        &[path],
    )?;
    Ok(serde_json::from_value(v)?)
}

/// A kazoo session in a child process that holds an ephemeral node until dropped.
struct KazooEphemeral(Child);

impl KazooEphemeral {
    fn create(connect: &str, path: &str) -> Result<KazooEphemeral> {
        let script = "import sys\n\
             from kazoo.client import KazooClient\n\
             zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
             zk.create(sys.argv[2], b'{}', ephemeral=True, makepath=True)\n\
             print('ready', zk.client_id[0], flush=True)\n\
             sys.stdin.read()\n\
             zk.stop()\n";
        let mut child = Command::new(localenv::programs::python()?)
            .arg("-c")
            .arg(script)
            .arg(connect)
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a kazoo session")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("kazoo stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        ensure!(line.starts_with("ready"), "kazoo said {line:?}");
        Ok(KazooEphemeral(child))
    }
}

impl Drop for KazooEphemeral {
    fn drop(&mut self) {
        // Closing its standard input ends the kazoo session.
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// A client of its own, to look at nodes as they are.
async fn observer(connect: &str) -> Result<zk::Client> {
    Ok(zk::Client::connect(connect).await?)
}

/// `(czxid, ephemeralOwner)` of each child of `dir`.
async fn stats(c: &zk::Client, dir: &str) -> Result<BTreeMap<String, (i64, i64)>> {
    let mut out = BTreeMap::new();
    let children = match c.list_children(dir).await {
        Ok(ch) => ch,
        Err(zk::Error::NoNode) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for child in children {
        if let Some(s) = c.check_stat(&format!("{dir}/{child}")).await? {
            out.insert(child, (s.czxid, s.ephemeral_owner));
        }
    }
    Ok(out)
}

async fn stored_id(store: &MemorySessionStore) -> Result<i64> {
    Ok(store.load().await?.context("a stored session")?.first.id)
}

/// render → apply → read_owned gives back the rendered records and a second plan is empty;
/// kazoo lists exactly the instances as ephemeral nodes of the backend's session; an update
/// rewrites one node in place; lookups and the probe answer.
#[tokio::test]
async fn plain_layout_round_trip_and_kazoo_lists_the_instances() -> Result<()> {
    let env = shared_zk().await?;
    let server = env.zookeeper()?;
    let connect = server.connect_string();
    let scope = env.scope("zk-plain").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    let z = backend(
        &connect,
        &base,
        ZooKeeperLayout::Plain,
        &store,
        Duration::from_secs(10),
    )?;
    let mut instances = vec![
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.2", 8080),
        instance("api_x", "fd00::1", 8080),
        instance("memcache", "10.0.0.4", 11211),
    ];
    let desired = z.render(&instances);
    assert!(z.read_owned().await?.is_empty(), "nothing written yet");
    let first = plan(&desired, &z.read_owned().await?);
    assert_eq!(first.creates, 4);
    let trips = z.apply(&first.ops).await?;
    assert_eq!(trips, 1, "4 entries and their parents in one multi");

    let read = z.read_owned().await?;
    assert_eq!(read, desired, "what ZooKeeper holds reads back as rendered");
    assert!(plan(&desired, &read).is_empty(), "nothing to write again");

    let providers = format!("{base}/api_x/providers");
    assert_eq!(
        kazoo_children(&connect, &providers)?,
        ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::1]:8080"],
        "kazoo lists exactly the ready ip:port"
    );
    let sid = z.session_id().await?;
    assert_eq!(stored_id(&store).await?, sid, "the session is stored");
    let nodes = kazoo_nodes(&connect, &providers)?;
    for (name, (data, owner)) in &nodes {
        assert_eq!(
            *owner, sid,
            "{name} is an ephemeral node of the backend's session"
        );
        let data: Value = serde_json::from_str(data)?;
        assert_eq!(
            data,
            json!({"owner": "cluster-a", "namespace": "shop", "service": "api-x"})
        );
    }
    assert_eq!(
        kazoo_children(&connect, &format!("{base}/memcache/providers"))?,
        ["10.0.0.4:11211"]
    );
    let obs = observer(&connect).await?;
    for p in [base.clone(), format!("{base}/api_x"), providers.clone()] {
        let s = obs.check_stat(&p).await?.context("parent exists")?;
        assert_eq!(s.ephemeral_owner, 0, "{p} is persistent");
    }

    // The same endpoint exported by another Service: one node, its data rewritten in place.
    let before = stats(&obs, &providers).await?;
    std::sync::Arc::make_mut(&mut instances[1].origin).namespace = "shop-2".into();
    let desired = z.render(&instances);
    let p = plan(&desired, &z.read_owned().await?);
    assert_eq!((p.creates, p.updates, p.deletes), (0, 1, 0));
    z.apply(&p.ops).await?;
    assert_eq!(z.read_owned().await?, desired);
    assert_eq!(
        stats(&obs, &providers).await?,
        before,
        "updated, not re-created"
    );
    let nodes = kazoo_nodes(&connect, &providers)?;
    assert!(nodes["10.0.0.2:8080"].0.contains("shop-2"));

    assert_eq!(
        z.lookup("api_x").await?,
        ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::1]:8080"]
    );
    assert!(z.lookup("nothing_here").await?.is_empty());
    let info = z.probe().await?;
    assert_eq!(info.address.as_deref(), Some(connect.as_str()));
    assert_eq!(info.mode.as_deref(), Some("standalone"), "{info:?}");
    assert!(
        info.version.as_deref().is_some_and(|v| v.starts_with("3.")),
        "{info:?}"
    );
    Ok(())
}

/// The curator layout: each instance is `<base>/<name>/<id>` with a `ServiceInstance` whose id
/// is the znode name; a second backend reading it plans nothing.
#[tokio::test]
async fn curator_layout_round_trip_and_service_instances_are_valid() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-curator").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    let z = backend(
        &connect,
        &base,
        ZooKeeperLayout::Curator,
        &store,
        Duration::from_secs(10),
    )?;
    let instances = vec![
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.2", 8080),
        instance("api_x", "fd00::1", 8080),
    ];
    let desired = z.render(&instances);
    z.apply(&puts(&desired)).await?;
    let read = z.read_owned().await?;
    assert_eq!(read, desired);
    assert!(plan(&desired, &read).is_empty());

    let sid = z.session_id().await?;
    let nodes = kazoo_nodes(&connect, &format!("{base}/api_x"))?;
    let mut ids: Vec<&String> = nodes.keys().collect();
    ids.sort();
    let mut expected: Vec<String> = instances.iter().map(Instance::stable_id).collect();
    expected.sort();
    assert_eq!(ids, expected.iter().collect::<Vec<_>>());
    for (znode, (data, owner)) in &nodes {
        assert_eq!(
            *owner, sid,
            "{znode} is ephemeral, of the backend's session"
        );
        let v: Value = serde_json::from_str(data)?;
        assert_eq!(v["id"], json!(znode), "Curator needs id == znode name");
        assert_eq!(v["name"], "api_x");
        assert_eq!(v["serviceType"], "DYNAMIC");
        assert!(v["registrationTimeUTC"].is_u64(), "{v}");
        assert!(v.get("enabled").is_none(), "enabled is left out: {v}");
        assert!(
            v["payload"].is_null() || v["payload"].get("@class").is_some(),
            "payload is null or carries @class: {v}"
        );
        assert!(v["address"].is_string() && v["port"] == json!(8080), "{v}");
        assert!(
            v.get("sslPort").is_some() && v.get("uriSpec").is_some(),
            "{v}"
        );
    }
    assert_eq!(
        z.lookup("api_x").await?,
        ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::1]:8080"]
    );
    // Curator itself: ServiceDiscovery.queryForInstances with its default serializer.
    let mut want: Vec<String> = instances
        .iter()
        .map(|i| format!("{} {}:{}", i.stable_id(), i.address, i.port))
        .collect();
    want.sort();
    assert_eq!(
        env.zookeeper()?
            .curator_instances(&connect, &base, "api_x")?,
        want,
        "Curator's ServiceDiscovery reads every instance"
    );
    Ok(())
}

/// 250 instances go in three multis of at most 100 operations; all are there; removing them
/// takes three again.
#[tokio::test]
async fn many_instances_go_in_several_multis() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-bulk").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    // 250 entries pass one session's budget.
    let z = with_small_sessions(&connect, &base, &store)?;
    assert_eq!(z.warning(), None);
    let instances = many("api_x", 250);
    let desired = z.render(&instances);
    let p = plan(&desired, &z.read_owned().await?);
    let trips = z.apply(&p.ops).await?;
    // 250 entries + 4 parents in multis of at most 100 operations.
    assert_eq!(MAX_MULTI_OPS, 100);
    assert_eq!(trips, 3, "254 operations in 3 multis");
    assert_eq!(z.read_owned().await?, desired);
    assert_eq!(
        kazoo_children(&connect, &format!("{base}/api_x/providers"))?.len(),
        250
    );
    // The session's paths are over the budget: the catalog says so, and what to do.
    let warning = z.warning().context("250 entries pass an 8 KiB budget")?;
    println!("{warning}");
    ensure!(
        warning.contains("owns 250 entries") && warning.contains("jute.maxbuffer"),
        "{warning}"
    );
    let gone = plan(&BTreeMap::new(), &z.read_owned().await?);
    assert_eq!(gone.deletes, 250);
    assert_eq!(z.apply(&gone.ops).await?, 3);
    assert_eq!(z.warning(), None, "nothing owned, nothing to warn about");
    assert!(kazoo_children(&connect, &format!("{base}/api_x/providers"))?.is_empty());
    assert!(z.read_owned().await?.is_empty());
    Ok(())
}

/// A large addition announced with `expect` (the writer does so before writing it in steps)
/// opens every session it needs at once: the applies that follow, a part at a time, never
/// move an entry written by an earlier part to a newer session.
#[tokio::test]
async fn an_expected_addition_opens_its_sessions_first_and_moves_nothing() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-expect").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    // 40 names of 20 entries need several sessions.
    let z = with_small_sessions(&connect, &base, &store)?;
    let instances: Vec<Instance> = (0..40)
        .flat_map(|n| many(&format!("api_{n:02}"), 20))
        .collect();
    z.expect(&instances).await?;
    let sessions = |s: Option<StoredSession>| s.map_or(0, |s| 1 + s.shards.len());
    let opened = sessions(store.get());
    ensure!(
        opened > 2,
        "{opened} session(s) for 800 entries of 8 KiB budgets"
    );

    let obs = observer(&connect).await?;
    let first = format!("{base}/api_00/providers");
    let mut written_first = BTreeMap::new();
    for (i, part) in instances.chunks(300).enumerate() {
        let records = z.render(part);
        z.apply(&puts(&records)).await?;
        if i == 0 {
            written_first = stats(&obs, &first).await?;
        }
    }
    assert_eq!(z.read_owned().await?.len(), 800);
    assert_eq!(
        sessions(store.get()),
        opened,
        "no session opened while writing"
    );
    assert_eq!(written_first.len(), 20);
    assert_eq!(
        stats(&obs, &first).await?,
        written_first,
        "entries of the first part kept their node and session"
    );
    Ok(())
}

/// A persistent node made by hand and an ephemeral node of another (kazoo) session are not
/// read as owned and survive a plan that deletes everything; a put onto a foreign node fails
/// and says so, while the rest of its multi is written.
#[tokio::test]
async fn foreign_nodes_are_never_touched() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-foreign").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    let z = backend(
        &connect,
        &base,
        ZooKeeperLayout::Plain,
        &store,
        Duration::from_secs(10),
    )?;
    let mine = vec![
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.2", 8080),
    ];
    let desired = z.render(&mine);
    z.apply(&puts(&desired)).await?;

    let providers = format!("{base}/api_x/providers");
    kazoo(
        &connect,
        "zk.create(sys.argv[2], b'by hand')\nprint('null')",
        &[&format!("{providers}/10.9.9.9:1")],
    )?;
    let _other = KazooEphemeral::create(&connect, &format!("{providers}/10.9.9.8:1"))?;

    let read = z.read_owned().await?;
    assert_eq!(read, desired, "only the backend's own nodes are owned");

    // Someone else's node where an entry should go: that put fails, the other is written.
    let mut wanted = mine.clone();
    wanted.push(instance("api_x", "10.9.9.8", 1));
    wanted.push(instance("api_x", "10.0.0.3", 8080));
    let p = plan(&z.render(&wanted), &read);
    assert_eq!(p.creates, 2);
    match z.apply(&p.ops).await {
        Err(BackendError::Refused { message: m, keys }) => {
            assert!(
                m.contains("10.9.9.8:1") && m.contains("not this controller's"),
                "{m}"
            );
            assert!(m.starts_with("1 of 2"), "{m}");
            assert_eq!(keys.len(), 1, "the refused operation is named: {keys:?}");
        }
        other => bail!("expected a conflict, got {other:?}"),
    }
    let read = z.read_owned().await?;
    assert_eq!(read.len(), 3, "10.0.0.3 was written: {read:?}");

    let all_gone = plan(&BTreeMap::new(), &read);
    assert_eq!(all_gone.deletes, 3);
    z.apply(&all_gone.ops).await?;
    assert_eq!(
        kazoo_children(&connect, &providers)?,
        ["10.9.9.8:1", "10.9.9.9:1"],
        "the foreign nodes survive"
    );
    assert!(z.read_owned().await?.is_empty());
    // A delete of a key that is someone else's node is skipped, not executed.
    let foreign_key = "api_x/providers/10.9.9.9:1".to_string();
    z.apply(&[Op::Delete { key: foreign_key }]).await?;
    assert_eq!(kazoo_children(&connect, &providers)?.len(), 2);
    Ok(())
}

/// A restarted controller (a new backend with the same session store) re-attaches to the live
/// session: same session id, the nodes never went away (same czxid), an empty plan; and it
/// keeps the session alive past its timeout.
#[tokio::test]
async fn a_restarted_controller_re_attaches_to_its_session() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-restart").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    let timeout = Duration::from_secs(4);
    let instances = vec![
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.2", 8080),
    ];
    let dir = format!("{base}/api_x");
    let obs = observer(&connect).await?;

    let first = backend(&connect, &base, ZooKeeperLayout::Curator, &store, timeout)?;
    first.apply(&puts(&first.render(&instances))).await?;
    let sid = first.session_id().await?;
    let before = stats(&obs, &dir).await?;
    assert_eq!(before.len(), 2);
    assert!(before.values().all(|(_, owner)| *owner == sid));
    // The controller goes away without closing its session (a restart, a lost leadership).
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats(&obs, &dir).await?, before, "still there in between");

    let second = backend(&connect, &base, ZooKeeperLayout::Curator, &store, timeout)?;
    let read = second.read_owned().await?;
    assert_eq!(second.session_id().await?, sid, "the same session");
    let desired = second.render(&instances);
    assert_eq!(read, desired);
    assert!(
        plan(&desired, &read).is_empty(),
        "a restart writes nothing (registrationTimeUTC included)"
    );
    assert_eq!(stats(&obs, &dir).await?, before, "never re-created");

    // Past the session timeout the new process holds the session.
    tokio::time::sleep(timeout * 2).await;
    assert_eq!(stats(&obs, &dir).await?, before);
    assert_eq!(stored_id(&store).await?, sid);

    // A hand-over between two live replicas: the one that lost leadership releases the
    // session, the new leader re-attaches, and the old one stays away (ZooKeeper gives a
    // session to the connection that re-attached last: two live clients would take it from
    // each other, each time re-establishing its connection).
    let server = env.zookeeper()?;
    let third = backend(&connect, &base, ZooKeeperLayout::Curator, &store, timeout)?;
    second.release().await;
    let read = third.read_owned().await?;
    assert_eq!(third.session_id().await?, sid);
    assert!(plan(&third.render(&instances), &read).is_empty());
    let established = session_connections(server, sid).await?;
    assert_eq!(established.len(), 1, "one connection of the session");
    tokio::time::sleep(timeout * 2).await;
    assert_eq!(
        session_connections(server, sid).await?,
        established,
        "the same connection, never taken over"
    );
    assert_eq!(stats(&obs, &dir).await?, before);
    Ok(())
}

/// The `est` (established time) of each connection of session `sid`, from `cons`.
async fn session_connections(
    server: &localenv::zookeeper::ZooKeeper,
    sid: i64,
) -> Result<Vec<String>> {
    let cons = server.four_letter("cons").await?;
    let tag = format!("sid={sid:#x},");
    Ok(cons
        .lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| l.split(",est=").nth(1))
        .map(|rest| rest.split(',').next().unwrap_or_default().to_string())
        .collect())
}

/// ZooKeeper stopped and started again, for less and for more than the session timeout: the
/// session survives both (ZooKeeper restores sessions with a fresh timeout when it starts, and
/// the backend re-attaches even after its client gave the session up), so the nodes stay and
/// nothing is invalidated.
#[tokio::test]
async fn a_zookeeper_restart_keeps_the_session() -> Result<()> {
    let env = Env::builder().zookeeper().start().await?;
    let server = env.zookeeper()?;
    let connect = server.connect_string();
    let base = "/restart/services";
    let store = Arc::new(MemorySessionStore::default());
    // Long enough for a stop and start to fit in it.
    let timeout = Duration::from_secs(8);
    let z = backend(&connect, base, ZooKeeperLayout::Plain, &store, timeout)?;
    let invalidations = z.invalidations().context("zookeeper has invalidations")?;
    let instances = vec![
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.2", 8080),
    ];
    let desired = z.render(&instances);
    z.apply(&puts(&desired)).await?;
    let sid = z.session_id().await?;
    let dir = format!("{base}/api_x/providers");
    let before = stats(&observer(&connect).await?, &dir).await?;

    for (what, down) in [
        ("shorter than", Duration::ZERO),
        ("longer than", timeout * 2),
    ] {
        let t = Instant::now();
        server.stop()?;
        tokio::time::sleep(down).await;
        server.start_again().await?;
        let outage = t.elapsed();
        println!("ZooKeeper down for {outage:?} ({what} the session timeout, {timeout:?})");
        if down.is_zero() && outage >= timeout {
            // A loaded machine: the quick restart outlasted the timeout too, which the
            // session survives as well.
            println!("the quick restart took longer than the timeout: {outage:?}");
        }
        let read = eventually(
            "the backend to answer again",
            Duration::from_secs(60),
            || async { Ok(z.read_owned().await.ok()) },
        )
        .await?;
        println!(
            "ZooKeeper down {what} the session timeout: back after {:?}, session {:#x} -> {:#x}",
            t.elapsed(),
            sid,
            z.session_id().await?
        );
        assert_eq!(z.session_id().await?, sid, "down {what} the timeout");
        assert_eq!(read, desired);
        assert!(!invalidations.has_changed()?, "nothing to invalidate");
        let obs = observer(&connect).await?;
        assert_eq!(stats(&obs, &dir).await?, before, "the nodes stayed");
    }
    // The session is kept alive afterwards.
    tokio::time::sleep(timeout * 2).await;
    assert_eq!(stats(&observer(&connect).await?, &dir).await?, before);
    assert!(!invalidations.has_changed()?);
    Ok(())
}

/// A TCP relay in front of ZooKeeper that a test can cut (a network partition): cutting
/// closes every connection and refuses new ones.
struct Partition {
    address: String,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    async fn start(target: String) -> Result<Partition> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if *cut_rx.borrow() {
                    continue;
                }
                let target = target.clone();
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Ok(Partition { address, cut, task })
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// ZooKeeper cut off for longer than the session timeout while it runs: ZooKeeper expires
/// the session and removes the nodes; once reachable again the backend opens and stores a new
/// session and moves `invalidations()`; the re-read is empty and an apply re-creates the
/// nodes, owned by the new session.
#[tokio::test]
async fn an_expired_session_is_replaced_and_its_nodes_re_created() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-expiry").await?;
    let base = base(&scope);
    let net = Partition::start(connect.clone()).await?;
    let store = Arc::new(MemorySessionStore::default());
    let timeout = Duration::from_secs(3);
    let z = backend(&net.address, &base, ZooKeeperLayout::Plain, &store, timeout)?;
    let mut invalidations = z.invalidations().context("zookeeper has invalidations")?;
    let instances = vec![
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.2", 8080),
    ];
    let desired = z.render(&instances);
    z.apply(&puts(&desired)).await?;
    let old = z.session_id().await?;
    let dir = format!("{base}/api_x/providers");
    let obs = observer(&connect).await?;
    assert_eq!(stats(&obs, &dir).await?.len(), 2);

    net.set_cut(true);
    let cut_at = Instant::now();
    eventually(
        "ZooKeeper to expire the session",
        Duration::from_secs(30),
        || async { Ok(stats(&obs, &dir).await?.is_empty().then_some(())) },
    )
    .await?;
    println!("nodes gone {:?} after the partition", cut_at.elapsed());
    // Long enough for the client to give the session up and for attempts to re-attach to
    // fail while cut off.
    tokio::time::sleep(timeout * 2).await;
    assert!(
        matches!(z.read_owned().await, Err(BackendError::Unreachable(_))),
        "unreachable while cut off"
    );
    assert!(!invalidations.has_changed()?, "nothing re-established yet");
    net.set_cut(false);

    tokio::time::timeout(Duration::from_secs(30), invalidations.changed())
        .await
        .context("invalidations moved in time")??;
    let new = z.session_id().await?;
    assert_ne!(new, old, "a new session");
    assert_eq!(stored_id(&store).await?, new, "and it is stored");
    let read = z.read_owned().await?;
    assert!(read.is_empty(), "the re-read is empty: {read:?}");
    let p = plan(&desired, &read);
    assert_eq!(p.creates, 2);
    z.apply(&p.ops).await?;
    assert_eq!(z.read_owned().await?, desired);
    let back = stats(&obs, &dir).await?;
    assert_eq!(back.len(), 2, "the nodes are back");
    assert!(back.values().all(|(_, owner)| *owner == new), "{back:?}");
    Ok(())
}

/// The same expiry under the writer: with no call from the test, the writer re-creates the
/// entries once the backend has a new session.
#[tokio::test]
async fn the_writer_re_creates_entries_after_an_expiry() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-writer").await?;
    let base = base(&scope);
    let net = Partition::start(connect.clone()).await?;
    let store = Arc::new(MemorySessionStore::default());
    let timeout = Duration::from_secs(3);
    let z = Arc::new(backend(
        &net.address,
        &base,
        ZooKeeperLayout::Curator,
        &store,
        timeout,
    )?);
    let instances = [
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.2", 8080),
    ];
    let (desired_tx, desired_rx) = watch::channel(Arc::new(Snapshot::new(
        std::sync::Arc::new(instances.iter().cloned().collect::<DesiredCatalog>()),
        None,
    )));
    let (gate_tx, gate_rx) = watch::channel(true);
    let mut cfg = writer::Config::new("zk");
    cfg.drift_interval = Duration::from_secs(3600);
    cfg.min_backoff = Duration::from_millis(100);
    cfg.max_backoff = Duration::from_secs(1);
    let (w, _report) = Writer::new(
        cfg,
        z.clone(),
        desired_rx,
        gate_rx,
        Arc::new(Metrics::new()),
    );
    let task = tokio::spawn(w.run());

    let dir = format!("{base}/api_x");
    let obs = observer(&connect).await?;
    let first = eventually("the writer to export", Duration::from_secs(30), || async {
        let s = stats(&obs, &dir).await?;
        Ok((s.len() == 2).then_some(s))
    })
    .await?;
    net.set_cut(true);
    eventually("the session to expire", Duration::from_secs(30), || async {
        Ok(stats(&obs, &dir).await?.is_empty().then_some(()))
    })
    .await?;
    net.set_cut(false);
    let healed = Instant::now();
    let again = eventually(
        "the writer to re-create",
        Duration::from_secs(30),
        || async {
            let s = stats(&obs, &dir).await?;
            Ok((s.len() == 2).then_some(s))
        },
    )
    .await?;
    println!(
        "entries re-created {:?} after the partition healed",
        healed.elapsed()
    );
    let old_owner = first.values().next().map(|s| s.1);
    assert!(again.values().all(|s| Some(s.1) != old_owner), "{again:?}");
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>()
    );
    task.abort();
    drop((desired_tx, gate_tx));
    Ok(())
}

/// A controller that dies (its backend dropped with the session open, as in a crash): its
/// nodes go when ZooKeeper expires the session.
#[tokio::test]
async fn a_dead_controllers_nodes_go_after_the_session_timeout() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-dead").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    let timeout = Duration::from_secs(3);
    let z = backend(&connect, &base, ZooKeeperLayout::Plain, &store, timeout)?;
    z.apply(&puts(&z.render(&many("api_x", 5)))).await?;
    let negotiated = store.load().await?.context("stored")?.first.timeout_ms;
    let dir = format!("{base}/api_x/providers");
    let obs = observer(&connect).await?;
    assert_eq!(stats(&obs, &dir).await?.len(), 5);

    drop(z);
    let dead = Instant::now();
    eventually("the nodes to go", Duration::from_secs(30), || async {
        Ok(stats(&obs, &dir).await?.is_empty().then_some(()))
    })
    .await?;
    let took = dead.elapsed();
    println!(
        "a dead controller's nodes went {took:?} after it died (session timeout {negotiated} ms)"
    );
    let negotiated = Duration::from_millis(negotiated);
    assert!(took >= negotiated / 2, "not before the timeout: {took:?}");
    assert!(
        took <= negotiated + Duration::from_secs(3),
        "soon after the timeout: {took:?}"
    );
    Ok(())
}

/// A chroot and several hosts (the first dead), digest authentication: nodes land below the
/// chroot, the controller's identity owns them and the world may read (and register its own
/// entries in the shared directories, but not change ours). A base path the credentials may
/// not read is Unauthorized, one they may not write refuses the writes under it (Refused);
/// no server at all is Unreachable, naming the hosts.
#[tokio::test]
async fn chroot_several_hosts_digest_auth_and_errors() -> Result<()> {
    let env = shared_zk().await?;
    let zk_address = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-auth").await?;
    let chroot = format!("/{}-root", scope.prefix);
    let store = Arc::new(MemorySessionStore::default());
    let cfg = ZooKeeperConfig {
        digest: Some(("bridge".into(), "s3cret".into())),
        ..config(
            &format!("127.0.0.1:1,{zk_address}{chroot}"),
            "/services",
            ZooKeeperLayout::Plain,
            store.clone(),
            Duration::from_secs(10),
        )
    };
    let z = ZooKeeper::new(cfg.clone())?;
    assert_eq!(z.root(), format!("{chroot}/services"));
    let desired = z.render(&[instance("api_x", "10.0.0.1", 8080)]);
    z.apply(&puts(&desired)).await?;
    assert_eq!(z.read_owned().await?, desired);
    let providers = format!("{chroot}/services/api_x/providers");
    assert_eq!(kazoo_children(&zk_address, &providers)?, ["10.0.0.1:8080"]);
    // Through the chroot, as a client configured like the controller sees it.
    assert_eq!(
        kazoo_children(
            &format!("{zk_address}{chroot}"),
            "/services/api_x/providers"
        )?,
        ["10.0.0.1:8080"]
    );
    let acls = kazoo(
        &zk_address,
        "def acls(p):\n    \
             return sorted([a.id.scheme, a.id.id.split(':')[0], a.perms] for a in zk.get_acls(p)[0])\n\
         from kazoo.exceptions import NoAuthError\n\
         entry = sys.argv[2] + '/10.0.0.1:8080'\n\
         seen = {'entry': acls(entry), 'dir': acls(sys.argv[2])}\n\
         try:\n    \
             zk.set(entry, b'x'); changed = True\n\
         except NoAuthError:\n    \
             changed = False\n\
         try:\n    \
             zk.delete(entry); deleted = True\n\
         except NoAuthError:\n    \
             deleted = False\n\
         zk.create(sys.argv[2] + '/10.8.8.8:1', b'', ephemeral=True)\n\
         print(json.dumps(dict(seen, changed=changed, deleted=deleted)))",
        &[&providers],
    )?;
    assert_eq!(
        acls["entry"],
        json!([["digest", "bridge", 31], ["world", "anyone", 1]]),
        "{acls}"
    );
    assert_eq!(
        acls["dir"],
        json!([["digest", "bridge", 31], ["world", "anyone", 5]]),
        "the world reads and registers its own entries, and deletes nothing: {acls}"
    );
    assert_eq!(
        acls["changed"],
        json!(false),
        "others cannot change our entries"
    );
    assert_eq!(
        acls["deleted"],
        json!(false),
        "others cannot delete our entries"
    );
    // Nor a directory the controller made: emptied, it stays, and only its identity removes it.
    z.apply(&plan(&BTreeMap::new(), &desired).ops).await?;
    let dir = kazoo(
        &zk_address,
        "from kazoo.exceptions import NoAuthError\n\
         try:\n    \
             zk.delete(sys.argv[2]); deleted = True\n\
         except NoAuthError:\n    \
             deleted = False\n\
         print(json.dumps(deleted))",
        &[&providers],
    )?;
    assert_eq!(dir, json!(false), "others cannot delete our directories");
    // The owner marker, under the chroot: only this identity may change or delete it.
    let owners = format!("{chroot}/catalog-bridge/owners");
    assert_eq!(
        catalog_bridge::backend::claim::claim(&z, "uid-a").await?,
        catalog_bridge::backend::claim::Claim::Ours
    );
    let marker = kazoo(
        &zk_address,
        "def acls(p):\n    \
             return sorted([a.id.scheme, a.id.id.split(':')[0], a.perms] for a in zk.get_acls(p)[0])\n\
         from kazoo.exceptions import NoAuthError\n\
         m = sys.argv[2] + '/cluster-a'\n\
         seen = {'marker': acls(m), 'dir': acls(sys.argv[2]), 'data': json.loads(zk.get(m)[0])}\n\
         try:\n    \
             zk.set(m, b'{}'); changed = True\n\
         except NoAuthError:\n    \
             changed = False\n\
         try:\n    \
             zk.delete(m); deleted = True\n\
         except NoAuthError:\n    \
             deleted = False\n\
         print(json.dumps(dict(seen, changed=changed, deleted=deleted)))",
        &[&owners],
    )?;
    assert_eq!(marker["data"]["cluster"], "uid-a", "{marker}");
    assert_eq!(
        marker["marker"],
        json!([["digest", "bridge", 31], ["world", "anyone", 1]]),
        "{marker}"
    );
    assert_eq!(
        marker["dir"],
        json!([["digest", "bridge", 31], ["world", "anyone", 5]]),
        "{marker}"
    );
    assert_eq!(
        (&marker["changed"], &marker["deleted"]),
        (&json!(false), &json!(false)),
        "others can neither change nor delete the marker: {marker}"
    );
    assert!(catalog_bridge::backend::claim::release(&z, "uid-a").await?);
    assert_eq!(kazoo_children(&zk_address, &owners)?, Vec::<String>::new());
    let info = z.probe().await?;
    assert_eq!(info.address.as_deref(), Some(zk_address.as_str()));

    // A directory only someone else may write.
    let locked = format!("/{}-locked", scope.prefix);
    kazoo(
        &zk_address,
        "from kazoo.security import make_digest_acl\n\
         zk.create(sys.argv[2], b'', acl=[make_digest_acl('other', 'pw', all=True), make_digest_acl('x', 'y', read=True)])\n\
         print('null')",
        &[&locked],
    )?;
    let denied = ZooKeeper::new(ZooKeeperConfig {
        connect: zk_address.clone(),
        base_path: Some(format!("{locked}/services")),
        session_store: Arc::new(MemorySessionStore::default()),
        ..cfg
    })?;
    match denied.read_owned().await {
        Err(BackendError::Unauthorized(m)) => assert!(m.contains(&locked), "{m}"),
        Ok(read) => {
            assert!(read.is_empty());
            // An ACL on a path refuses the writes under it, not the catalog: the writer holds
            // back only their export.
            match denied.apply(&puts(&desired)).await {
                Err(BackendError::Refused { message: m, keys }) => {
                    assert!(m.contains(&locked), "{m}");
                    assert_eq!(keys.len(), desired.len(), "{keys:?}");
                }
                other => bail!("expected a refusal, got {other:?}"),
            }
        }
        Err(other) => bail!("expected Unauthorized, got {other:?}"),
    }

    let nowhere = backend(
        "127.0.0.1:1,127.0.0.1:2",
        "/services",
        ZooKeeperLayout::Plain,
        &Arc::new(MemorySessionStore::default()),
        Duration::from_secs(2),
    )?;
    match nowhere.read_owned().await {
        Err(BackendError::Unreachable(m)) => {
            assert!(
                m.contains("127.0.0.1:1") && m.contains("127.0.0.1:2"),
                "{m}"
            );
            assert!(m.contains("connection refused"), "{m}");
        }
        other => bail!("expected Unreachable, got {other:?}"),
    }
    Ok(())
}

/// A ZooKeeper whose secure port requires TLS and a client certificate of its CA: with the CA
/// and the certificate, the backend (its session relay speaking TLS to the server) writes,
/// reads back, probes, re-attaches to its session after a restart and imports; kazoo on the
/// plain port sees the same nodes. Without the certificate, trusting another CA, or in plain
/// text, nothing gets through and the error says why.
#[tokio::test]
async fn a_tls_zookeeper_is_reached_with_its_ca_and_a_client_certificate() -> Result<()> {
    let env = Env::builder().zookeeper_tls().start().await?;
    let tls = env.tls()?;
    let secure = env.zookeeper()?.secure_connect_string()?;
    let plain = env.zookeeper()?.connect_string();
    let base = "/tls/services";
    let timeout = Duration::from_secs(4);
    let cert = ClientCert {
        cert_pem: tls.client_cert_pem.clone(),
        key_pem: tls.client_key_pem.clone(),
    };
    let with = |ca: &[u8], cert: Option<&ClientCert>, store: &Arc<MemorySessionStore>| {
        ZooKeeper::new(ZooKeeperConfig {
            tls: Some(TlsSettings {
                ca_pem: Some(ca.to_vec()),
                client_cert: cert.cloned(),
                insecure_skip_verify: false,
            }),
            ..config(
                &secure,
                base,
                ZooKeeperLayout::Plain,
                store.clone(),
                timeout,
            )
        })
    };
    let store = Arc::new(MemorySessionStore::default());
    let b = with(&tls.ca_pem, Some(&cert), &store)?;
    let info = b.probe().await?;
    println!("over TLS: {info:?}");
    ensure!(
        info.mode.as_deref() == Some("standalone"),
        "srvr answered over TLS: {info:?}"
    );
    let instances = vec![
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.2", 8080),
    ];
    let desired = b.render(&instances);
    b.apply(&puts(&desired)).await?;
    assert_eq!(b.read_owned().await?, desired);
    assert_eq!(
        kazoo_children(&plain, &format!("{base}/api_x/providers"))?,
        ["10.0.0.1:8080", "10.0.0.2:8080"],
        "kazoo, on the plain port, lists what went through TLS"
    );
    let sid = b.session_id().await?;
    drop(b);
    let again = with(&tls.ca_pem, Some(&cert), &store)?;
    assert!(
        plan(&desired, &again.read_owned().await?).is_empty(),
        "a restart writes nothing"
    );
    assert_eq!(again.session_id().await?, sid, "re-attached through TLS");
    // Import over TLS too: a backend of another owner follows the instances.
    let reader = Arc::new(ZooKeeper::new(ZooKeeperConfig {
        owner: "cluster-b".into(),
        tls: Some(TlsSettings {
            ca_pem: Some(tls.ca_pem.clone()),
            client_cert: Some(cert.clone()),
            insecure_skip_verify: false,
        }),
        ..config(
            &secure,
            base,
            ZooKeeperLayout::Plain,
            Arc::default(),
            timeout,
        )
    })?);
    let (tx, mut rx) = watch::channel(ImportSnapshot::default());
    let follow = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.watch_service("api_x", tx).await })
    };
    let seen = tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| s.instances.len() == 2),
    )
    .await
    .context("the import over TLS saw nothing")??
    .clone();
    println!("imported over TLS: {:?}", seen.instances);
    follow.abort();

    let refused = [
        (
            "without a client certificate",
            with(&tls.ca_pem, None, &Arc::default())?,
        ),
        (
            "trusting another CA",
            with(&tls.other_ca_pem, Some(&cert), &Arc::default())?,
        ),
        (
            "in plain text",
            ZooKeeper::new(config(
                &secure,
                base,
                ZooKeeperLayout::Plain,
                Arc::default(),
                timeout,
            ))?,
        ),
    ];
    let hints = [
        "tls.clientCertSecretRef",
        "tls.caSecretRef",
        "set zookeeper.tls",
    ];
    for ((what, b), hint) in refused.into_iter().zip(hints) {
        match b.read_owned().await {
            Err(e @ (BackendError::Unreachable(_) | BackendError::Rejected(_))) => {
                println!("{what}: {e}");
                ensure!(
                    e.to_string().contains(&secure),
                    "{what}: the server is named: {e}"
                );
                ensure!(
                    e.to_string().contains(hint),
                    "{what}: says what to set: {e}"
                );
            }
            other => bail!("{what}: expected the connection to fail, got {other:?}"),
        }
    }
    Ok(())
}
