//! Import from ZooKeeper against a real ZooKeeper 3.8: `watch_service` follows the children
//! of the plain layout (kazoo registrations, gone when their session closes) and the Curator
//! instances of the curator layout (malformed ones skipped, the rest imported), leaves out
//! what this controller exported (no loops), keeps the last instances through an outage and
//! follows again afterwards, and ends when its receivers are gone.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use catalog_bridge::api::crd::ZooKeeperLayout;
use catalog_bridge::backend::zookeeper::{MemorySessionStore, ZooKeeper, ZooKeeperConfig};
use catalog_bridge::backend::{Backend, BackendError, External, ImportSnapshot, Record};
use catalog_bridge::export::plan::{Op, plan};
use catalog_bridge::model::{Instance, Origin};
use localenv::{Env, Scope};
use serde_json::{Value, json};
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;

/// One ZooKeeper shared by the tests of this binary (each test uses its own base path); the
/// outage test builds its own.
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

fn backend(
    connect: &str,
    base: &str,
    layout: ZooKeeperLayout,
    owner: &str,
    store: &Arc<MemorySessionStore>,
) -> Result<Arc<ZooKeeper>> {
    backend_with_timeout(connect, base, layout, owner, store, Duration::from_secs(4))
}

fn backend_with_timeout(
    connect: &str,
    base: &str,
    layout: ZooKeeperLayout,
    owner: &str,
    store: &Arc<MemorySessionStore>,
    session_timeout: Duration,
) -> Result<Arc<ZooKeeper>> {
    Ok(Arc::new(ZooKeeper::new(ZooKeeperConfig {
        connect: connect.to_string(),
        session_timeout,
        layout,
        base_path: Some(base.to_string()),
        owner: owner.to_string(),
        session_store: store.clone(),
        ..Default::default()
    })?))
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

fn puts(records: &BTreeMap<String, Record>) -> Vec<Op> {
    plan(records, &BTreeMap::<String, Record>::new()).ops
}

fn ext(address: &str, port: u16, id: &str) -> External {
    External {
        address: address.to_string(),
        port,
        id: id.to_string(),
    }
}

/// A running `watch_service` and the receiving end of its snapshots.
struct Watch {
    rx: watch::Receiver<ImportSnapshot>,
    task: JoinHandle<Result<(), BackendError>>,
}

impl Watch {
    fn start(z: &Arc<ZooKeeper>, name: &str) -> Watch {
        let (tx, rx) = watch::channel(ImportSnapshot::default());
        let z = z.clone();
        let name = name.to_string();
        let task = tokio::spawn(async move { z.watch_service(&name, tx).await });
        Watch { rx, task }
    }

    /// The first snapshot that satisfies `pred`.
    async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&ImportSnapshot) -> bool,
    ) -> Result<ImportSnapshot> {
        let found = match tokio::time::timeout(timeout, self.rx.wait_for(pred)).await {
            Ok(Ok(s)) => Some(s.clone()),
            Ok(Err(_)) => bail!("the watch ended while waiting for {what}"),
            Err(_) => None,
        };
        match found {
            Some(s) => Ok(s),
            None => bail!(
                "timed out after {timeout:?} waiting for {what}; last: {:?}",
                *self.rx.borrow()
            ),
        }
    }

    /// Drops the receiver; the watch must end at once, with Ok.
    async fn stop(self) -> Result<Duration> {
        let t = Instant::now();
        drop(self.rx);
        let r = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .context("the watch did not end after its receiver was dropped")??;
        r?;
        Ok(t.elapsed())
    }
}

/// Runs a kazoo snippet to its end; `sys.argv[1]` is the connect string.
fn kazoo(connect: &str, body: &str, args: &[&str]) -> Result<String> {
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
    localenv::python(&script, &all)
}

/// Creates persistent nodes: `args` are pairs of path and data.
fn kazoo_create(connect: &str, nodes: &[(&str, &str)]) -> Result<()> {
    let mut args = Vec::new();
    for (p, d) in nodes {
        args.push(*p);
        args.push(*d);
    }
    kazoo(
        connect,
        "a = sys.argv[2:]\n\
         for p, d in zip(a[0::2], a[1::2]):\n    \
             zk.create(p, d.encode(), makepath=True)",
        &args,
    )?;
    Ok(())
}

/// A kazoo session in a child process holding ephemeral nodes until it is closed (its
/// standard input closed: the script then stops the client, which closes the session).
struct KazooSession {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    id: i64,
}

impl KazooSession {
    fn start(connect: &str, paths: &[&str]) -> Result<KazooSession> {
        let script = "import sys\n\
             from kazoo.client import KazooClient\n\
             zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
             for p in sys.argv[2:]:\n    \
                 zk.create(p, b'', ephemeral=True, makepath=True)\n\
             print('READY', zk.client_id[0], flush=True)\n\
             sys.stdin.read()\n\
             zk.stop()\n\
             print('CLOSED', flush=True)\n";
        let mut child = Command::new(localenv::programs::python()?)
            .arg("-c")
            .arg(script)
            .arg(connect)
            .args(paths)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a kazoo session")?;
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().context("kazoo stdout")?);
        stdout.read_line(&mut line)?;
        let id = line
            .strip_prefix("READY ")
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("kazoo said {line:?}"))?;
        Ok(KazooSession { child, stdout, id })
    }

    /// Closes the session (kazoo's `stop()` returns once ZooKeeper closed it) and waits for
    /// the process to end.
    fn close(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        ensure!(line.trim() == "CLOSED", "kazoo said {line:?}");
        let status = self.child.wait()?;
        ensure!(status.success(), "kazoo ended with {status}");
        Ok(())
    }
}

impl Drop for KazooSession {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

const WAIT: Duration = Duration::from_secs(20);

/// Plain layout: the children of `<base>/<name>/providers` that a kazoo session registers
/// import (IPv4 and IPv6), an unparsable child is skipped, and the instances go when the
/// kazoo session closes; a directory that does not exist yet is watched for its creation.
#[tokio::test]
async fn plain_children_of_a_kazoo_session_import_and_go_with_it() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-import-plain").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    let z = backend(&connect, &base, ZooKeeperLayout::Plain, "cluster-b", &store)?;
    let mut w = Watch::start(&z, "mysql_x");

    // Nothing there yet: synced and empty.
    let s = w.until("a first snapshot", WAIT, |s| s.synced).await?;
    assert_eq!(
        s,
        ImportSnapshot {
            synced: true,
            ..Default::default()
        }
    );

    let dir = format!("{base}/mysql_x/providers");
    let a = format!("{dir}/10.0.0.8:3306");
    let b = format!("{dir}/[fd00::8]:3306");
    let t = Instant::now();
    let kazoo = KazooSession::start(&connect, &[&a, &b])?;
    let created = t.elapsed();
    let want = vec![ext("10.0.0.8", 3306, &a), ext("fd00::8", 3306, &b)];
    let s = w
        .until("both kazoo nodes", WAIT, |s| s.instances == want)
        .await?;
    println!(
        "plain: kazoo started and registered 2 nodes in {created:?}; the snapshot had them {:?} \
         after kazoo said READY (upper bound: this thread was blocked reading it)",
        t.elapsed() - created
    );
    assert!(
        s.skipped.is_empty() && s.error.is_none() && s.synced,
        "{s:?}"
    );
    assert_ne!(kazoo.id, 0);

    // A child that is no address is skipped; the others stay.
    let bad = format!("{dir}/not-an-address");
    kazoo_create(&connect, &[(&bad, "")])?;
    let s = w
        .until("the bad child skipped", WAIT, |s| !s.skipped.is_empty())
        .await?;
    assert_eq!(s.instances, want);
    assert_eq!(s.skipped.len(), 1);
    assert_eq!(s.skipped[0].0, bad);
    println!("plain: skipped {:?}", s.skipped);

    // The kazoo session closes: its ephemeral nodes go, and so do the instances. The close
    // runs on a blocking thread so the change is timed as it arrives.
    let mut rx = w.rx.clone();
    let gone = tokio::spawn(async move {
        rx.wait_for(|s| s.instances.is_empty())
            .await
            .map(|s| (Instant::now(), s.clone()))
    });
    let t = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || kazoo.close().map(|()| Instant::now()));
    let (changed, s) = tokio::time::timeout(WAIT, gone)
        .await
        .context("the instances did not go")???;
    let stopped = stopped.await??;
    println!(
        "plain: kazoo session close began at 0; kazoo's stop() returned after {:?}; the \
         snapshot lost the instances after {:?}",
        stopped - t,
        changed - t
    );
    assert_eq!(s.skipped.len(), 1);
    w.stop().await?;
    Ok(())
}

/// Curator layout: instances (`address`/`port`, or `sslPort` without `port`) import; a
/// malformed node and one without a port are skipped, a disabled one left out, and the rest
/// still import; data changes and deletions are followed.
#[tokio::test]
async fn curator_instances_import_and_malformed_ones_are_skipped() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-import-curator").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    let z = backend(
        &connect,
        &base,
        ZooKeeperLayout::Curator,
        "cluster-b",
        &store,
    )?;
    let dir = format!("{base}/pay_x");
    let instance = |id: &str, address: &str, port: Value, ssl: Value| {
        json!({
            "name": "pay_x", "id": id, "address": address, "port": port, "sslPort": ssl,
            "payload": null, "registrationTimeUTC": 1_700_000_000_000_u64,
            "serviceType": "DYNAMIC", "uriSpec": null,
        })
        .to_string()
    };
    let one = format!("{dir}/one");
    let two = format!("{dir}/two");
    let bad = format!("{dir}/bad");
    let off = format!("{dir}/off");
    let noport = format!("{dir}/noport");
    let one_data = instance("one", "10.1.0.1", json!(8080), json!(null));
    let two_data = instance("two", "fd00::2", json!(null), json!(8443));
    let mut off_data: Value =
        serde_json::from_str(&instance("off", "10.1.0.3", json!(8080), json!(null)))?;
    off_data["enabled"] = json!(false);
    let off_data = off_data.to_string();
    let noport_data = instance("noport", "10.1.0.4", json!(null), json!(null));
    kazoo_create(
        &connect,
        &[
            (&one, &one_data),
            (&two, &two_data),
            (&bad, "{\"address\": \"10.1.0.9\", \"port\": "),
            (&off, &off_data),
            (&noport, &noport_data),
        ],
    )?;

    let mut w = Watch::start(&z, "pay_x");
    let want = vec![ext("10.1.0.1", 8080, &one), ext("fd00::2", 8443, &two)];
    let s = w
        .until("the two good instances", WAIT, |s| s.synced)
        .await?;
    assert_eq!(s.instances, want, "{s:?}");
    let skipped: Vec<&str> = s.skipped.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(skipped, [bad.as_str(), noport.as_str()], "{s:?}");
    assert!(s.error.is_none());
    println!("curator: skipped {:?}", s.skipped);

    // A data change (data watch) and a deletion (child watch) are followed.
    let t = Instant::now();
    kazoo(
        &connect,
        "zk.set(sys.argv[2], sys.argv[3].encode())",
        &[
            &one,
            &instance("one", "10.1.0.11", json!(9090), json!(null)),
        ],
    )?;
    w.until("the changed address", WAIT, |s| {
        s.instances.first() == Some(&ext("10.1.0.11", 9090, &one))
    })
    .await?;
    println!(
        "curator: data change imported {:?} after the change began",
        t.elapsed()
    );
    kazoo(&connect, "zk.delete(sys.argv[2])", &[&two])?;
    let s = w
        .until("the deleted instance gone", WAIT, |s| {
            s.instances.len() == 1
        })
        .await?;
    assert_eq!(s.instances, [ext("10.1.0.11", 9090, &one)]);
    assert_eq!(s.skipped.len(), 2);
    w.stop().await?;
    Ok(())
}

/// No loops: what a backend with owner A exported is not imported by a watch of owner A —
/// the same backend, another backend of A with no session of its own yet (plain: by the
/// owner in the data; curator: by the session in the shared store) — and is imported by a
/// watch of owner B. Others' entries in the same directory import for everybody.
#[tokio::test]
async fn a_controller_does_not_import_what_it_exported() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-import-loops").await?;
    for layout in [ZooKeeperLayout::Plain, ZooKeeperLayout::Curator] {
        let base = format!("{}/{layout:?}", base(&scope)).to_lowercase();
        let store_a = Arc::new(MemorySessionStore::default());
        let a = backend(&connect, &base, layout, "cluster-a", &store_a)?;
        let mine = instance("api_x", "10.2.0.1", 8080);
        let records = a.render(std::slice::from_ref(&mine));
        a.apply(&puts(&records)).await?;
        let my_id = format!("{base}/{}", records.keys().next().context("one record")?);
        // Someone else's entry in the same directory.
        let (foreign_path, foreign_data) = match layout {
            ZooKeeperLayout::Plain => (format!("{base}/api_x/providers/10.2.0.99:8080"), "".into()),
            ZooKeeperLayout::Curator => (
                format!("{base}/api_x/foreign"),
                json!({"name": "api_x", "id": "foreign", "address": "10.2.0.99", "port": 8080})
                    .to_string(),
            ),
        };
        kazoo_create(&connect, &[(&foreign_path, &foreign_data)])?;
        let foreign = ext("10.2.0.99", 8080, &foreign_path);

        // Owner A: the exporting backend itself, and another backend of A (its store holds
        // A's session; for plain a fresh store: the owner in the data is enough).
        let other_store = match layout {
            ZooKeeperLayout::Plain => Arc::new(MemorySessionStore::default()),
            ZooKeeperLayout::Curator => store_a.clone(),
        };
        let a2 = backend(&connect, &base, layout, "cluster-a", &other_store)?;
        for (who, z) in [("the exporter", &a), ("another backend of A", &a2)] {
            let mut w = Watch::start(z, "api_x");
            let s = w.until("a snapshot", WAIT, |s| s.synced).await?;
            assert_eq!(
                s.instances,
                std::slice::from_ref(&foreign),
                "{layout:?}, {who}: {s:?}"
            );
            assert!(s.skipped.is_empty(), "{s:?}");
            w.stop().await?;
        }
        // The export session was not disturbed: A still owns its entry, same session.
        let sid = a.session_id().await?;
        assert_eq!(a.read_owned().await?, records, "{layout:?}");
        assert_eq!(store_a.get().context("stored")?.first.id, sid);

        // Owner B imports A's entry too.
        let b = backend(
            &connect,
            &base,
            layout,
            "cluster-b",
            &Arc::new(MemorySessionStore::default()),
        )?;
        let mut w = Watch::start(&b, "api_x");
        let s = w.until("a snapshot", WAIT, |s| s.synced).await?;
        let mut want = vec![foreign.clone(), ext("10.2.0.1", 8080, &my_id)];
        want.sort();
        assert_eq!(s.instances, want, "{layout:?}: {s:?}");
        w.stop().await?;
        assert_eq!(a.session_id().await?, sid);
    }
    Ok(())
}

/// A dedicated ZooKeeper stopped after a first snapshot: the instances are kept and `error`
/// says which hosts are unreachable; started again, the error clears and later changes are
/// followed.
#[tokio::test]
async fn an_outage_keeps_the_instances_and_the_watch_follows_afterwards() -> Result<()> {
    let env = Env::builder().zookeeper().start().await?;
    let server = env.zookeeper()?;
    let connect = server.connect_string();
    let base = "/outage/services";
    let store = Arc::new(MemorySessionStore::default());
    // Long enough for a stop and start to fit in it.
    let timeout = Duration::from_secs(8);
    let z = backend_with_timeout(
        &connect,
        base,
        ZooKeeperLayout::Plain,
        "cluster-b",
        &store,
        timeout,
    )?;
    let dir = format!("{base}/web_x/providers");
    let one = format!("{dir}/10.4.0.1:80");
    kazoo_create(&connect, &[(&one, "")])?;
    let mut w = Watch::start(&z, "web_x");
    let first = vec![ext("10.4.0.1", 80, &one)];
    w.until("the first snapshot", WAIT, |s| s.instances == first)
        .await?;

    // A restart shorter than the session timeout: the watch session reconnects; the error
    // is set while it is away and cleared after the re-read; changes right after are seen.
    let t = Instant::now();
    server.stop()?;
    w.until("the error of a short outage", WAIT, |s| s.error.is_some())
        .await?;
    server.start_again().await?;
    let outage = t.elapsed();
    if outage >= timeout {
        // A loaded machine: the session may have been given up; the watch must recover all
        // the same, with a new session.
        println!("outage: the restart took {outage:?}, not shorter than the timeout {timeout:?}");
    }
    let s = w
        .until("the error to clear after a short outage", WAIT, |s| {
            s.error.is_none()
        })
        .await?;
    println!(
        "outage: restart within the session ({outage:?}): error cleared {:?} after the stop",
        t.elapsed()
    );
    assert_eq!(s.instances, first);
    let mid = format!("{dir}/10.4.0.3:80");
    kazoo_create(&connect, &[(&mid, "")])?;
    let mut both = vec![ext("10.4.0.1", 80, &one), ext("10.4.0.3", 80, &mid)];
    both.sort();
    w.until("a change after the reconnect", WAIT, |s| {
        s.instances == both
    })
    .await?;
    kazoo(&connect, "zk.delete(sys.argv[2])", &[&mid])?;
    w.until("a deletion after the reconnect", WAIT, |s| {
        s.instances == first
    })
    .await?;

    // A stop longer than the session timeout.
    let t = Instant::now();
    server.stop()?;
    let s = w
        .until("the error", Duration::from_secs(30), |s| s.error.is_some())
        .await?;
    println!(
        "outage: error set {:?} after the stop: {:?}",
        t.elapsed(),
        s.error
    );
    assert_eq!(s.instances, first, "the last instances are kept");
    assert!(s.synced);
    match &s.error {
        Some(BackendError::Unreachable(m)) => {
            let host = connect.split('/').next().unwrap_or_default();
            assert!(m.contains(host), "{m}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    // Down for longer than the session timeout: the watch session is lost as well.
    tokio::time::sleep(timeout + Duration::from_secs(2)).await;
    assert_eq!(w.rx.borrow().instances, first);
    assert!(w.rx.borrow().error.is_some());

    let t = Instant::now();
    server.start_again().await?;
    let s = w
        .until("the error to clear", Duration::from_secs(30), |s| {
            s.error.is_none()
        })
        .await?;
    println!("outage: error cleared {:?} after the start", t.elapsed());
    assert_eq!(s.instances, first);
    let two = format!("{dir}/10.4.0.2:80");
    let t = Instant::now();
    kazoo_create(&connect, &[(&two, "")])?;
    kazoo(&connect, "zk.delete(sys.argv[2])", &[&one])?;
    w.until("the later changes", WAIT, |s| {
        s.instances == [ext("10.4.0.2", 80, &two)]
    })
    .await?;
    println!(
        "outage: later changes followed {:?} after they began",
        t.elapsed()
    );
    w.stop().await?;
    Ok(())
}

/// The watch ends, with Ok, as soon as its receivers are dropped: while it waits for a
/// change, and while it retries an unreachable ZooKeeper (whose error names the host).
#[tokio::test]
async fn the_watch_ends_when_the_receiver_is_dropped() -> Result<()> {
    let env = shared_zk().await?;
    let connect = env.zookeeper()?.connect_string();
    let scope = env.scope("zk-import-end").await?;
    let base = base(&scope);
    let store = Arc::new(MemorySessionStore::default());
    let z = backend(&connect, &base, ZooKeeperLayout::Plain, "cluster-b", &store)?;
    let mut w = Watch::start(&z, "end_x");
    w.until("a snapshot", WAIT, |s| s.synced).await?;
    let took = w.stop().await?;
    println!("end: the watch ended {took:?} after its receiver was dropped");

    let dead = backend(
        "127.0.0.1:1",
        &base,
        ZooKeeperLayout::Plain,
        "cluster-b",
        &store,
    )?;
    let mut w = Watch::start(&dead, "end_x");
    let s = w.until("an error", WAIT, |s| s.error.is_some()).await?;
    assert!(!s.synced && s.instances.is_empty());
    match &s.error {
        Some(BackendError::Unreachable(m)) => assert!(m.contains("127.0.0.1:1"), "{m}"),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let took = w.stop().await?;
    println!("end: the failing watch ended {took:?} after its receiver was dropped");

    // A name that cannot be a znode name is refused.
    let (tx, _rx) = watch::channel(ImportSnapshot::default());
    assert!(matches!(
        z.watch_service("a/b", tx).await,
        Err(BackendError::Rejected(_))
    ));
    Ok(())
}

/// Packets the ZooKeeper server has received, from `srvr`.
async fn packets_received(env: &Env) -> Result<u64> {
    let srvr = env.zookeeper()?.four_letter("srvr").await?;
    srvr.lines()
        .find_map(|l| l.strip_prefix("Received: "))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no `Received:` in srvr:\n{srvr}"))
}

/// A change to one of many children costs the watch a few requests, not a read of every child:
/// a new child is read alone, a changed or deleted one is read again alone.
/// Counted by the server itself (`srvr`), on a ZooKeeper of this test's own.
#[tokio::test]
async fn one_change_among_many_children_reads_only_that_child() -> Result<()> {
    const N: usize = 300;
    let env = Env::builder().zookeeper().start().await?;
    let connect = env.zookeeper()?.connect_string();
    let base = "/many/services";
    let dir = format!("{base}/cache/providers");
    let paths: Vec<String> = (0..N)
        .map(|i| format!("{dir}/10.5.{}.{}:6379", i / 250, i % 250 + 1))
        .collect();
    let nodes: Vec<(&str, &str)> = paths.iter().map(|p| (p.as_str(), "")).collect();
    kazoo_create(&connect, &nodes)?;
    let store = Arc::new(MemorySessionStore::default());
    let z = backend(&connect, base, ZooKeeperLayout::Plain, "cluster-b", &store)?;
    let mut w = Watch::start(&z, "cache");
    w.until("every child", WAIT, |s| s.instances.len() == N)
        .await?;

    // What one kazoo run of one request costs the server (connect, the request, close), so
    // that only the watch's share is compared.
    let before = packets_received(&env).await?;
    kazoo(&connect, "zk.exists('/')", &[])?;
    let kazoo_alone = packets_received(&env).await? - before;

    let new = format!("{dir}/10.5.9.9:6379");
    // (what, the kazoo request, the instances afterwards)
    let steps = [
        ("a child created", "zk.create(sys.argv[2], b'')", N + 1),
        (
            "a child's data changed",
            "zk.set(sys.argv[2], b'{\"note\": \"changed\"}')",
            N + 1,
        ),
        ("a child deleted", "zk.delete(sys.argv[2])", N),
    ];
    for (what, body, after) in steps {
        let before = packets_received(&env).await?;
        kazoo(&connect, body, &[&new])?;
        w.until(what, WAIT, |s| s.instances.len() == after).await?;
        // The watch's reads of a data change arrive after kazoo's; give them a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let watch = (packets_received(&env).await? - before).saturating_sub(kazoo_alone);
        println!("{what}: the watch sent about {watch} requests ({N} children)");
        ensure!(
            watch < 20,
            "{what}: the watch sent about {watch} requests for one change among {N} children"
        );
    }
    let s = w
        .until("the end state", WAIT, |s| s.instances.len() == N)
        .await?;
    ensure!(s.skipped.is_empty() && s.error.is_none(), "{s:?}");
    w.stop().await?;
    Ok(())
}
