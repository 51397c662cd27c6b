//! Import from a real etcd 3.6 (`Backend::watch_service`): keys put, deleted and expired with
//! etcdctl show up in the snapshot within milliseconds; values that cannot be parsed are skipped
//! and the rest still import; this controller's own keys (attached to the lease of its marker)
//! are never imported; a stopped etcd keeps the last instances and sets the error, and the watch
//! follows again when etcd returns; the watch ends when nobody listens.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use catalog_bridge::api::crd::EtcdLayout;
use catalog_bridge::backend::etcd::{Etcd, EtcdConfig};
use catalog_bridge::backend::{Backend, BackendError, External, ImportSnapshot};
use catalog_bridge::export::plan::plan;
use catalog_bridge::model::{Instance, Origin};
use localenv::{Env, Scope};
use tokio::sync::OnceCell;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One etcd shared by the tests of this binary (each test uses its own prefix, owner and
/// catalog); the test that stops etcd builds its own.
async fn shared_etcd() -> Result<&'static Env> {
    static ENV: OnceCell<Env> = OnceCell::const_new();
    ENV.get_or_try_init(|| async { Env::builder().etcd().start().await })
        .await
        .context("starting the shared etcd")
}

/// How long a snapshot may take to follow a change.
const FOLLOW: Duration = Duration::from_secs(10);

fn base_path(scope: &Scope, layout: EtcdLayout) -> Option<String> {
    match layout {
        EtcdLayout::Plain => Some(format!("/{}/services", scope.prefix)),
        EtcdLayout::Naming => None,
        EtcdLayout::Coredns => Some(format!("/{}/skydns", scope.prefix)),
    }
}

fn backend(
    endpoints: &[String],
    scope: &Scope,
    layout: EtcdLayout,
    owner: &str,
) -> Result<Arc<Etcd>> {
    Ok(Arc::new(Etcd::new(EtcdConfig {
        endpoints: endpoints.to_vec(),
        lease_ttl: Duration::from_secs(5),
        layout,
        base_path: base_path(scope, layout),
        owner: owner.to_string(),
        catalog: format!("etcd-{}", scope.prefix),
        ..Default::default()
    })?))
}

/// A running import watch.
struct Watch {
    rx: watch::Receiver<ImportSnapshot>,
    task: JoinHandle<Result<(), BackendError>>,
}

fn start_watch(b: &Arc<Etcd>, name: &str) -> Watch {
    let (tx, rx) = watch::channel(ImportSnapshot::default());
    let (b, name) = (b.clone(), name.to_string());
    let task = tokio::spawn(async move { b.watch_service(&name, tx).await });
    Watch { rx, task }
}

impl Watch {
    /// Waits until the snapshot satisfies `f`; returns it and how long that took.
    async fn until(
        &mut self,
        what: &str,
        f: impl FnMut(&ImportSnapshot) -> bool,
    ) -> Result<(ImportSnapshot, Duration)> {
        let t = Instant::now();
        let r = match tokio::time::timeout(FOLLOW, self.rx.wait_for(f)).await {
            Ok(Ok(s)) => Ok(s.clone()),
            Ok(Err(_)) => Err("the watch ended"),
            Err(_) => Err("not in time"),
        };
        match r {
            Ok(s) => Ok((s, t.elapsed())),
            Err(why) => bail!(
                "{what}: {why} ({FOLLOW:?}); the snapshot is {:?}",
                *self.rx.borrow()
            ),
        }
    }
}

fn addrs(s: &ImportSnapshot) -> Vec<String> {
    s.instances
        .iter()
        .map(|e| {
            if e.address.contains(':') {
                format!("[{}]:{}", e.address, e.port)
            } else {
                format!("{}:{}", e.address, e.port)
            }
        })
        .collect()
}

/// `etcdctl lease grant <ttl>`: the lease id in hex, as etcdctl takes it back.
fn lease_grant(env: &Env, ttl: u32) -> Result<String> {
    let out = env.etcd()?.etcdctl(&["lease", "grant", &ttl.to_string()])?;
    // "lease 694d7e0b2a8e1a0b granted with TTL(30s)"
    out.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("etcdctl lease grant said {out:?}"))
}

fn put(env: &Env, key: &str, value: &str, lease: Option<&str>) -> Result<()> {
    let lease_arg = lease.map(|l| format!("--lease={l}"));
    let mut args = vec!["put"];
    if let Some(l) = &lease_arg {
        args.push(l);
    }
    args.extend([key, value]);
    let out = env.etcd()?.etcdctl(&args)?;
    ensure!(out.trim() == "OK", "etcdctl put {key}: {out}");
    Ok(())
}

fn del(env: &Env, key: &str) -> Result<()> {
    let out = env.etcd()?.etcdctl(&["del", key])?;
    ensure!(out.trim() == "1", "etcdctl del {key}: {out}");
    Ok(())
}

/// When each snapshot change was published, and how many instances it held.
type Stamps = Mutex<Vec<(Instant, usize)>>;

/// Runs an etcdctl step, waits for `n` instances, prints when the snapshot changed after the
/// call started and relative to the call returning (negative: before etcdctl exited), and
/// returns the latter (zero when negative): etcdctl's own start-up is no part of the watch.
async fn timed(
    w: &mut Watch,
    stamps: &Stamps,
    what: &str,
    n: usize,
    f: &dyn Fn() -> Result<()>,
) -> Result<Duration> {
    let start = Instant::now();
    f()?;
    let returned = Instant::now();
    w.until(what, |s| s.instances.len() == n).await?;
    // The recorder may see the change a moment after `until` does.
    let deadline = Instant::now() + Duration::from_secs(1);
    let at = loop {
        let found = stamps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(t, k)| *t >= start && *k == n)
            .map(|(t, _)| *t);
        match found {
            Some(t) => break t,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            None => bail!("{what}: the change was not recorded"),
        }
    };
    let from_return = if at >= returned {
        format!("+{:?}", at - returned)
    } else {
        format!("-{:?}", returned - at)
    };
    println!(
        "{what}: snapshot changed {:?} after etcdctl started, {from_return} from it returning \
         (etcdctl took {:?})",
        at - start,
        returned - start
    );
    Ok(at.saturating_duration_since(returned))
}

/// plain: keys put with a lease import, a deleted key leaves, a revoked lease takes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_keys_follow_puts_deletes_and_revoked_leases() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("import-plain").await?;
    let b = backend(
        &[env.etcd()?.endpoint()],
        &scope,
        EtcdLayout::Plain,
        "importer",
    )?;
    let dir = format!("/{}/services/mysql_x/providers", scope.prefix);
    // A neighbour whose name shares the prefix must not leak in.
    put(
        env,
        &format!(
            "/{}/services/mysql_xy/providers/10.0.0.99:3306",
            scope.prefix
        ),
        "10.0.0.99:3306",
        None,
    )?;
    let mut w = start_watch(&b, "mysql_x");
    let (first, t) = w.until("the first read", |s| s.synced).await?;
    println!("first snapshot after {t:?}: {first:?}");
    assert_eq!(
        first,
        ImportSnapshot {
            synced: true,
            ..Default::default()
        }
    );

    // When each snapshot change was published, to time changes against the etcdctl calls.
    let stamps: Arc<Stamps> = Arc::default();
    let mut rec = w.rx.clone();
    let recorder = {
        let stamps = stamps.clone();
        tokio::spawn(async move {
            while rec.changed().await.is_ok() {
                let n = rec.borrow_and_update().instances.len();
                stamps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), n));
            }
        })
    };
    let mut delays = Vec::new();
    let lease = lease_grant(env, 30)?;
    for (ip, n) in [("10.0.0.8", 1), ("10.0.0.9", 2)] {
        let key = format!("{dir}/{ip}:3306");
        let value = format!("{ip}:3306");
        delays.push(
            timed(&mut w, &stamps, &format!("put {ip}:3306"), n, &|| {
                put(env, &key, &value, Some(&lease))
            })
            .await?,
        );
    }
    let s = w.rx.borrow().clone();
    assert!(s.error.is_none() && s.skipped.is_empty(), "{s:?}");
    assert_eq!(addrs(&s), ["10.0.0.8:3306", "10.0.0.9:3306"]);
    assert_eq!(
        s.instances[0],
        External {
            address: "10.0.0.8".into(),
            port: 3306,
            id: format!("{dir}/10.0.0.8:3306"),
        }
    );

    let key = format!("{dir}/10.0.0.8:3306");
    delays.push(timed(&mut w, &stamps, "etcdctl del", 1, &|| del(env, &key)).await?);
    assert_eq!(addrs(&w.rx.borrow()), ["10.0.0.9:3306"]);

    delays.push(
        timed(&mut w, &stamps, "etcdctl lease revoke", 0, &|| {
            let out = env.etcd()?.etcdctl(&["lease", "revoke", &lease])?;
            ensure!(out.contains("revoked"), "{out}");
            Ok(())
        })
        .await?,
    );
    let s = w.rx.borrow().clone();
    assert!(s.synced && s.error.is_none(), "{s:?}");
    println!("delays etcdctl exit → snapshot: {delays:?}");
    // Followed by the watch, not found by a later re-read: a bound far above a loaded
    // machine's scheduling delays and far below any polling period.
    for d in &delays {
        assert!(*d < Duration::from_secs(5), "{delays:?}");
    }
    recorder.abort();
    // IPv6 and host names import as well.
    put(env, &format!("{dir}/v6"), "[fd00::8]:3306", None)?;
    put(env, &format!("{dir}/db"), "db-1.example:3306", None)?;
    let (s, _) = w
        .until("IPv6 and a host name", |s| s.instances.len() == 2)
        .await?;
    // Sorted by address.
    assert_eq!(addrs(&s), ["db-1.example:3306", "[fd00::8]:3306"]);
    assert!(!w.task.is_finished());
    w.task.abort();
    Ok(())
}

/// naming: endpoints manager updates import; a garbage value is skipped with its key and why,
/// an `Op: 1` (Delete) is no entry, and the others still import.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naming_values_import_and_garbage_is_skipped() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("import-naming").await?;
    let b = backend(
        &[env.etcd()?.endpoint()],
        &scope,
        EtcdLayout::Naming,
        "importer",
    )?;
    let name = scope.name("mysql_x");
    put(
        env,
        &format!("{name}/10.0.0.9:3306"),
        r#"{"Op":0,"Addr":"10.0.0.9:3306","Metadata":{"zone":"a"}}"#,
        None,
    )?;
    put(env, &format!("{name}/bad"), "garbage", None)?;
    put(
        env,
        &format!("{name}/10.0.0.10:3306"),
        r#"{"Op":1,"Addr":"10.0.0.10:3306"}"#,
        None,
    )?;
    put(
        env,
        &format!("{name}/no-port"),
        r#"{"Op":0,"Addr":"10.0.0.11"}"#,
        None,
    )?;
    let mut w = start_watch(&b, &name);
    let (s, t) = w.until("the first read", |s| s.synced).await?;
    println!("first snapshot after {t:?}: {s:?}");
    assert_eq!(addrs(&s), ["10.0.0.9:3306"]);
    assert_eq!(s.instances[0].id, format!("{name}/10.0.0.9:3306"));
    let skipped: Vec<&str> = s.skipped.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(skipped, [format!("{name}/bad"), format!("{name}/no-port")]);
    for (key, why) in &s.skipped {
        println!("skipped {key}: {why}");
        assert!(!why.is_empty());
    }
    assert!(s.error.is_none());

    // Changes follow: a new Add, the Delete turned into an Add, the garbage fixed.
    put(
        env,
        &format!("{name}/[fd00::9]:3306"),
        r#"{"Op":0,"Addr":"[fd00::9]:3306"}"#,
        None,
    )?;
    put(
        env,
        &format!("{name}/10.0.0.10:3306"),
        r#"{"Op":0,"Addr":"10.0.0.10:3306"}"#,
        None,
    )?;
    put(
        env,
        &format!("{name}/bad"),
        r#"{"Addr":"10.0.0.12:3306"}"#,
        None,
    )?;
    let (s, t) = w
        .until("three more", |s| {
            s.instances.len() == 4 && s.skipped.len() == 1
        })
        .await?;
    println!("three puts → snapshot in {t:?}");
    assert_eq!(
        addrs(&s),
        [
            "10.0.0.10:3306",
            "10.0.0.12:3306",
            "10.0.0.9:3306",
            "[fd00::9]:3306"
        ]
    );
    // An Op 1 on a live entry removes it, as the endpoints manager's Delete does.
    put(
        env,
        &format!("{name}/10.0.0.10:3306"),
        r#"{"Op":1,"Addr":"10.0.0.10:3306"}"#,
        None,
    )?;
    w.until("an Op 1", |s| s.instances.len() == 3).await?;
    w.task.abort();
    Ok(())
}

/// coredns: a name with its namespace, or the full DNS name, watches that path; a bare name
/// watches the zone and keeps only that name's entries, as `lookup` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coredns_records_import_by_dns_name() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("import-coredns").await?;
    let b = backend(
        &[env.etcd()?.endpoint()],
        &scope,
        EtcdLayout::Coredns,
        "importer",
    )?;
    let zone = format!("/{}/skydns/local/bridge", scope.prefix);
    put(
        env,
        &format!("{zone}/shop/mysql-x/a"),
        r#"{"host":"10.0.0.7","port":3306,"ttl":30}"#,
        None,
    )?;
    put(
        env,
        &format!("{zone}/other/mysql-x/b"),
        r#"{"host":"fd00::7","port":3306}"#,
        None,
    )?;
    put(
        env,
        &format!("{zone}/shop/redis/c"),
        r#"{"host":"10.0.0.6","port":6379}"#,
        None,
    )?;
    put(
        env,
        &format!("{zone}/shop/mysql-x/d"),
        r#"{"port":3306}"#,
        None,
    )?;
    for (name, want) in [
        ("mysql_x.shop", vec!["10.0.0.7:3306"]),
        ("mysql-x.shop.bridge.local.", vec!["10.0.0.7:3306"]),
        ("mysql_x", vec!["10.0.0.7:3306", "[fd00::7]:3306"]),
    ] {
        let mut w = start_watch(&b, name);
        let (s, _) = w.until(name, |s| s.synced).await?;
        assert_eq!(addrs(&s), want, "{name}");
        assert_eq!(s.skipped.len(), 1, "{name}: {s:?}");
        assert_eq!(s.skipped[0].0, format!("{zone}/shop/mysql-x/d"));
        w.task.abort();
    }
    Ok(())
}

/// No loops: what this owner exports to a catalog (keys on the lease of its marker) is not
/// imported by a watch with the same owner and catalog, also after the lease is replaced; a
/// watch of another owner imports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_exports_are_not_imported() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("import-loops").await?;
    let endpoints = [env.etcd()?.endpoint()];
    let exporter = backend(&endpoints, &scope, EtcdLayout::Plain, "owner-a")?;
    let same = backend(&endpoints, &scope, EtcdLayout::Plain, "owner-a")?;
    let other = backend(&endpoints, &scope, EtcdLayout::Plain, "owner-b")?;
    let dir = format!("/{}/services/mysql_x/providers", scope.prefix);

    // Both watches run before the exporter has a lease or a marker.
    let mut w_same = start_watch(&same, "mysql_x");
    let mut w_other = start_watch(&other, "mysql_x");
    w_same.until("first read", |s| s.synced).await?;
    w_other.until("first read", |s| s.synced).await?;

    let inst = Instance {
        name: "mysql_x".into(),
        address: "10.0.0.20".parse()?,
        port: 3306,
        origin: Origin {
            namespace: "shop".into(),
            service: "mysql".into(),
        }
        .into(),
        tags: vec![].into(),
        meta: Default::default(),
    };
    let own_key = format!("{dir}/10.0.0.20:3306");
    let desired = exporter.render(std::slice::from_ref(&inst));
    exporter
        .apply(
            &plan(
                &desired,
                &std::collections::BTreeMap::<String, catalog_bridge::model::Record>::new(),
            )
            .ops,
        )
        .await?;

    let has_own = |s: &ImportSnapshot| s.instances.iter().any(|e| e.id == own_key);
    let (s, t) = w_other.until("another owner imports it", has_own).await?;
    println!("another owner sees the export after {t:?}: {s:?}");

    // A sentinel written after the export: once the same-owner watch has it, it has seen the
    // export too, and must never have imported it.
    let mut leaked = false;
    let sentinel = |w: &'static str, s: &ImportSnapshot, leaked: &mut bool| {
        *leaked |= has_own(s);
        s.instances.iter().any(|e| e.id.ends_with(w))
    };
    put(env, &format!("{dir}/s1"), "10.0.0.21:3306", None)?;
    let (s, _) = w_same
        .until("the sentinel", |s| sentinel("/s1", s, &mut leaked))
        .await?;
    assert!(
        !leaked && !has_own(&s),
        "the owner's own export was imported: {s:?}"
    );
    assert_eq!(addrs(&s), ["10.0.0.21:3306"]);

    // The lease is lost: a new one is granted, the marker moves, the keys are put again.
    let old = exporter.lease_id().await.context("a lease")?;
    env.etcd()?
        .etcdctl(&["lease", "revoke", &format!("{old:x}")])?;
    let t = Instant::now();
    loop {
        let owned = exporter.read_owned().await?;
        if exporter.apply(&plan(&desired, &owned).ops).await.is_ok()
            && exporter.read_owned().await? == desired
        {
            break;
        }
        ensure!(t.elapsed() < FOLLOW, "the export is not back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new = exporter.lease_id().await.context("a lease")?;
    assert_ne!(new, old);
    w_other.until("back at the other owner", has_own).await?;
    put(env, &format!("{dir}/s2"), "10.0.0.22:3306", None)?;
    let (s, _) = w_same
        .until("the second sentinel", |s| sentinel("/s2", s, &mut leaked))
        .await?;
    assert!(
        !leaked && !has_own(&s),
        "re-put under a new lease, imported: {s:?}"
    );
    let s = w_other.rx.borrow().clone();
    assert!(has_own(&s), "{s:?}");
    w_same.task.abort();
    w_other.task.abort();
    Ok(())
}

/// A stopped etcd keeps the last instances and sets the error; when it returns the watch
/// follows again and the error clears; a watch nobody listens to ends, also while failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_etcd_keeps_the_instances_and_the_watch_recovers() -> Result<()> {
    let env = Env::builder().etcd().start().await?;
    let etcd = env.etcd()?;
    let scope = env.scope("import-outage").await?;
    let b = backend(&[etcd.endpoint()], &scope, EtcdLayout::Plain, "importer")?;
    let dir = format!("/{}/services/mysql_x/providers", scope.prefix);
    put(&env, &format!("{dir}/10.0.0.8:3306"), "10.0.0.8:3306", None)?;
    let mut w = start_watch(&b, "mysql_x");
    let (first, _) = w.until("the first read", |s| s.synced).await?;
    assert_eq!(addrs(&first), ["10.0.0.8:3306"]);

    etcd.stop()?;
    let (s, t) = w.until("the error", |s| s.error.is_some()).await?;
    println!("etcd stopped → error after {t:?}: {:?}", s.error);
    assert!(
        matches!(&s.error, Some(BackendError::Unreachable(m)) if m.contains(&etcd.endpoint())),
        "{s:?}"
    );
    assert_eq!(s.instances, first.instances, "the last instances are kept");
    assert!(s.synced);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(w.rx.borrow().instances, first.instances);

    etcd.start_again().await?;
    put(&env, &format!("{dir}/10.0.0.9:3306"), "10.0.0.9:3306", None)?;
    let (s, t) = w
        .until("the change after the outage", |s| {
            s.instances.len() == 2 && s.error.is_none()
        })
        .await?;
    println!("etcd back, key put → snapshot after {t:?}");
    assert_eq!(addrs(&s), ["10.0.0.8:3306", "10.0.0.9:3306"]);
    // It watches again (not just re-read once).
    del(&env, &format!("{dir}/10.0.0.8:3306"))?;
    let (_, t) = w
        .until("a delete after the outage", |s| s.instances.len() == 1)
        .await?;
    println!("del after the outage → snapshot in {t:?}");

    // Down again, and nobody listens any more: the watch ends during its backoff.
    etcd.stop()?;
    w.until("the error again", |s| s.error.is_some()).await?;
    let Watch { rx, task } = w;
    drop(rx);
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .context("the watch ends when the receiver is dropped")??;
    assert_eq!(r, Ok(()));
    println!(
        "failing watch ended {:?} after the receiver was dropped",
        t.elapsed()
    );
    Ok(())
}

/// The watch ends, with Ok, as soon as every receiver is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_ends_when_the_receiver_is_dropped() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("import-end").await?;
    let b = backend(
        &[env.etcd()?.endpoint()],
        &scope,
        EtcdLayout::Plain,
        "importer",
    )?;
    let mut w = start_watch(&b, "mysql_x");
    w.until("the first read", |s| s.synced).await?;
    let extra = w.rx.clone();
    let Watch { rx, task } = w;
    drop(rx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "a receiver is still there");
    drop(extra);
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .context("the watch ends when the receiver is dropped")??;
    assert_eq!(r, Ok(()));
    println!(
        "watch ended {:?} after the last receiver was dropped",
        t.elapsed()
    );
    Ok(())
}
