//! Import from a real Consul 1.14 agent: `Consul::watch_service` follows the healthy instances
//! of a service through blocking queries (a change shows up in milliseconds, not after the
//! wait), leaves out this controller's own exports, keeps the last instances while Consul is
//! down and follows it again when it comes back empty, and ends when nobody listens.
//!
//! Instances are registered with py-consul through the agent API with TTL checks, the way a
//! real service registers itself.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use catalog_bridge::backend::consul::{Consul, ConsulConfig};
use catalog_bridge::backend::{Backend, BackendError, External, ImportSnapshot};
use localenv::{Env, Scope};
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;

/// One Consul agent shared by the tests of this binary (each test uses its own service names
/// and owner); the test that stops Consul builds its own.
async fn shared_consul() -> Result<&'static Env> {
    static ENV: OnceCell<Env> = OnceCell::const_new();
    ENV.get_or_try_init(|| async { Env::builder().consul().start().await })
        .await
        .context("starting the shared Consul agent")
}

/// Generous against a loaded machine, far below the blocking query's wait: a change that
/// arrives within it came from the blocking query, not from the wait running out.
const PROMPT: Duration = Duration::from_secs(5);
const SLOW: Duration = Duration::from_secs(30);

/// py-consul, agent API. `sys.argv[1]` is `host:port`, then one operation:
/// `register <name> <id> <address> <port> <owner or ->` (TTL check, then passed),
/// `pass <id>`, `fail <id>`, `deregister <id>`.
const PY_AGENT: &str = "\
import sys, time, consul
host, port = sys.argv[1].split(':')
c = consul.Consul(host=host, port=int(port))
op, args = sys.argv[2], sys.argv[3:]
if op == 'register':
    name, sid, address, p, owner = args
    meta = None if owner == '-' else {'catalog-bridge-owner': owner}
    c.agent.service.register(name, service_id=sid, address=address, port=int(p), meta=meta,
                             check=consul.Check.ttl('60s'))
    c.agent.check.ttl_pass('service:' + sid)
elif op == 'pass':
    c.agent.check.ttl_pass('service:' + args[0])
elif op == 'fail':
    c.agent.check.ttl_fail('service:' + args[0])
elif op == 'deregister':
    c.agent.service.deregister(args[0])
else:
    raise SystemExit('unknown operation ' + op)
print(time.time_ns())
";

/// Runs one py-consul operation without blocking the runtime; returns when (wall clock) the
/// py-consul call returned, as the Python process saw it.
async fn py(address: &str, op: &[&str]) -> Result<SystemTime> {
    let mut args = vec![address.to_string()];
    args.extend(op.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = localenv::python(PY_AGENT, &args)?;
        let ns: u64 = out
            .trim()
            .parse()
            .with_context(|| format!("py-consul printed {out:?}"))?;
        Ok(UNIX_EPOCH + Duration::from_nanos(ns))
    })
    .await?
}

fn backend(address: &str, scope: &Scope, owner: &str) -> Result<Arc<Consul>> {
    Ok(Arc::new(Consul::new(ConsulConfig {
        addresses: vec![address.to_string()],
        node_name: format!("k8s-{}", scope.prefix),
        owner: owner.to_string(),
        ..Default::default()
    })?))
}

struct Watch {
    rx: watch::Receiver<ImportSnapshot>,
    task: JoinHandle<Result<(), BackendError>>,
}

fn start_watch(c: Arc<Consul>, name: &str) -> Watch {
    let (tx, rx) = watch::channel(ImportSnapshot::default());
    let name = name.to_string();
    let task = tokio::spawn(async move { c.watch_service(&name, tx).await });
    Watch { rx, task }
}

impl Watch {
    /// Waits until the snapshot satisfies `pred`; the snapshot and when it was seen.
    async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&ImportSnapshot) -> bool,
    ) -> Result<(ImportSnapshot, Instant, SystemTime)> {
        let waited = match tokio::time::timeout(timeout, self.rx.wait_for(pred)).await {
            Ok(Ok(s)) => Some(s.clone()),
            Ok(Err(_)) => bail!("waiting for {what}: the watch ended: {:?}", self.task),
            Err(_) => None,
        };
        match waited {
            Some(s) => Ok((s, Instant::now(), SystemTime::now())),
            None => bail!(
                "waiting for {what}: not within {timeout:?}; last snapshot {:?}",
                *self.rx.borrow()
            ),
        }
    }

    /// Runs a py-consul operation and waits (concurrently) until the snapshot satisfies
    /// `pred`; prints and returns the delay from the py-consul call returning to the snapshot
    /// showing it, both on the wall clock (the Python process reports when its call returned;
    /// the snapshot usually changes before that process has even exited).
    async fn after_py(
        &mut self,
        address: &str,
        op: &[&str],
        what: &str,
        pred: impl FnMut(&ImportSnapshot) -> bool,
    ) -> Result<(ImportSnapshot, Duration)> {
        let start = Instant::now();
        let (returned, (snap, seen, seen_wall)) =
            tokio::try_join!(py(address, op), self.until(what, SLOW, pred))?;
        let (delay, when) = match seen_wall.duration_since(returned) {
            Ok(d) => (d, format!("{d:?} after")),
            // Consul wakes blocking queries before the HTTP answer reaches the caller.
            Err(e) => (Duration::ZERO, format!("{:?} before", e.duration())),
        };
        println!(
            "{what}: snapshot changed {when} the py-consul call `{}` returned \
             ({:?} after the Python process was started)",
            op.join(" "),
            seen - start
        );
        Ok((snap, delay))
    }
}

fn ids(s: &ImportSnapshot) -> Vec<&str> {
    s.instances.iter().map(|i| i.id.as_str()).collect()
}

fn ext(address: &str, port: u16, id: &str) -> External {
    External {
        address: address.into(),
        port,
        id: id.into(),
    }
}

/// Two instances come in; one failing its check leaves, passing again returns, deregistered
/// leaves; every change shows up within milliseconds thanks to blocking queries.
#[tokio::test]
async fn healthy_instances_are_followed_through_blocking_queries() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let addr = consul.address();
    let scope = env.scope("consul-import-follow").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let name = scope.name("db");
    let (a, b) = (scope.name("db-a"), scope.name("db-b"));
    let mut w = start_watch(backend(&consul.url(), &scope, &owner)?, &name);

    let (first, ..) = w.until("the first read", SLOW, |s| s.synced).await?;
    ensure!(
        first.instances.is_empty() && first.error.is_none(),
        "{first:?}"
    );

    let mut delays = Vec::new();
    let (_, d) = w
        .after_py(
            &addr,
            &["register", &name, &a, "10.7.0.1", "5432", "-"],
            "instance a registered",
            |s| s.instances.len() == 1,
        )
        .await?;
    delays.push(d);
    let (s, d) = w
        .after_py(
            &addr,
            &["register", &name, &b, "10.7.0.2", "5433", "-"],
            "instance b registered",
            |s| s.instances.len() == 2,
        )
        .await?;
    delays.push(d);
    assert_eq!(
        s,
        ImportSnapshot {
            instances: vec![ext("10.7.0.1", 5432, &a), ext("10.7.0.2", 5433, &b)],
            failing: vec![],
            skipped: vec![],
            error: None,
            synced: true,
        }
    );

    let (s, d) = w
        .after_py(&addr, &["fail", &a], "a critical", |s| {
            s.instances.len() == 1
        })
        .await?;
    delays.push(d);
    assert_eq!(ids(&s), [b.as_str()]);
    assert_eq!(
        s.failing,
        [ext("10.7.0.1", 5432, &a)],
        "still registered, reported failing: a health answer, not a disappearance"
    );

    let (s, d) = w
        .after_py(&addr, &["pass", &a], "a passing again", |s| {
            s.instances.len() == 2
        })
        .await?;
    delays.push(d);
    assert_eq!(ids(&s), [a.as_str(), b.as_str()]);

    let (s, d) = w
        .after_py(&addr, &["deregister", &b], "b deregistered", |s| {
            s.instances.len() == 1
        })
        .await?;
    delays.push(d);
    assert_eq!(ids(&s), [a.as_str()]);

    for d in &delays {
        ensure!(
            *d < PROMPT,
            "a change took {d:?}: the watch is not blocking on the index"
        );
    }
    println!("delays after py-consul returned: {delays:?}");
    py(&addr, &["deregister", &a]).await?;
    Ok(())
}

/// An entry carrying this controller's owner id (its own export) is never imported; one
/// carrying another owner is.
#[tokio::test]
async fn our_own_entries_are_never_imported() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let addr = consul.address();
    let scope = env.scope("consul-import-owner").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let name = scope.name("cache");
    let (ours, theirs, plain) = (
        scope.name("ours"),
        scope.name("theirs"),
        scope.name("plain"),
    );
    let c = backend(&consul.url(), &scope, &owner)?;

    // Ours first, and known to be in the catalog and passing before the others come.
    py(
        &addr,
        &["register", &name, &ours, "10.8.0.1", "11211", &owner],
    )
    .await?;
    // The agent hands its registration to the catalog asynchronously.
    localenv::eventually(
        "py-consul's registration passing in the catalog",
        SLOW,
        || async { Ok((c.lookup(&name).await? == ["10.8.0.1:11211"]).then_some(())) },
    )
    .await?;

    let mut w = start_watch(c.clone(), &name);
    // Every snapshot the watch publishes, checked as it comes.
    let mut spy = w.rx.clone();
    let ours_id = ours.clone();
    let spy_task = tokio::spawn(async move {
        let mut seen = 0;
        loop {
            {
                let s = spy.borrow_and_update();
                if s.instances.iter().any(|i| i.id == ours_id) {
                    return Err(anyhow::anyhow!("our own entry was imported: {s:?}"));
                }
                seen += 1;
            }
            if spy.changed().await.is_err() {
                return Ok(seen);
            }
        }
    });

    let (s, ..) = w.until("the first read", SLOW, |s| s.synced).await?;
    ensure!(s.instances.is_empty() && s.skipped.is_empty(), "{s:?}");
    let other_owner = format!("other-{}", scope.prefix);
    py(
        &addr,
        &[
            "register",
            &name,
            &theirs,
            "10.8.0.2",
            "11211",
            &other_owner,
        ],
    )
    .await?;
    py(
        &addr,
        &["register", &name, &plain, "10.8.0.3", "11211", "-"],
    )
    .await?;
    let (s, ..) = w
        .until("the two foreign entries", SLOW, |s| s.instances.len() == 2)
        .await?;
    assert_eq!(
        s.instances,
        [
            ext("10.8.0.2", 11211, &theirs),
            ext("10.8.0.3", 11211, &plain)
        ]
    );
    assert!(s.skipped.is_empty(), "{s:?}");
    let mut sorted = c.lookup(&name).await?;
    sorted.sort();
    assert_eq!(
        sorted,
        ["10.8.0.1:11211", "10.8.0.2:11211", "10.8.0.3:11211"],
        "clients see all three"
    );

    // The spy's receiver would keep the watch going: stop it, which ends the spy.
    w.task.abort();
    let seen = tokio::time::timeout(PROMPT, spy_task).await???;
    println!("{seen} snapshot(s) checked, none held our own entry");
    for id in [&ours, &theirs, &plain] {
        py(&addr, &["deregister", id]).await?;
    }
    Ok(())
}

/// Consul stops: the snapshot keeps the last instances and says Unreachable, naming the
/// address. It comes back empty (a dev agent keeps nothing): the watch reads the empty
/// catalog, follows the re-registration, and blocks again on the new, lower index.
#[tokio::test]
async fn an_outage_keeps_the_instances_and_a_consul_back_empty_is_followed() -> Result<()> {
    let env = Env::builder().consul().start().await?;
    let consul = env.consul()?;
    let addr = consul.address();
    let scope = env.scope("consul-import-outage").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let name = scope.name("db");
    let (a, b) = (scope.name("db-a"), scope.name("db-b"));
    let c = backend(&consul.url(), &scope, &owner)?;

    py(&addr, &["register", &name, &a, "10.9.0.1", "5432", "-"]).await?;
    py(&addr, &["register", &name, &b, "10.9.0.2", "5432", "-"]).await?;
    // Some traffic so that the index before the outage is well above a fresh agent's.
    for _ in 0..3 {
        py(&addr, &["fail", &b]).await?;
        py(&addr, &["pass", &b]).await?;
    }
    // The agent hands its changes to the catalog asynchronously: the watch starts once the
    // catalog has settled, so the snapshot kept through the outage is the settled one.
    localenv::eventually("both instances passing in the catalog", SLOW, || async {
        Ok((c.lookup(&name).await?.len() == 2).then_some(()))
    })
    .await?;
    let mut w = start_watch(c, &name);
    let (before, ..) = w
        .until("both instances", SLOW, |s| s.instances.len() == 2)
        .await?;

    let stopped = Instant::now();
    consul.stop()?;
    let (down, seen, _) = w
        .until("the outage reported", SLOW, |s| {
            matches!(s.error, Some(BackendError::Unreachable(_)))
        })
        .await?;
    println!("outage reported {:?} after the stop", seen - stopped);
    assert_eq!(
        down.instances, before.instances,
        "the last instances are kept"
    );
    assert!(down.synced);
    match &down.error {
        Some(BackendError::Unreachable(m)) => {
            ensure!(m.contains(&consul.url()) && m.contains(&name), "{m}")
        }
        other => bail!("expected Unreachable, got {other:?}"),
    }

    consul.start_again().await?;
    let started = Instant::now();
    let (empty, seen, _) = w
        .until("the empty catalog read", SLOW, |s| {
            s.error.is_none() && s.instances.is_empty()
        })
        .await?;
    println!(
        "the restarted, empty Consul read {:?} after it was ready",
        seen - started
    );
    assert!(empty.synced);

    let (s, ..) = w
        .after_py(
            &addr,
            &["register", &name, &a, "10.9.0.11", "6432", "-"],
            "re-registered after the restart",
            |s| s.instances.len() == 1,
        )
        .await?;
    assert_eq!(s.instances, [ext("10.9.0.11", 6432, &a)]);
    // The watch blocks on the new agent's index: a second change is as prompt as the first.
    let (s, d) = w
        .after_py(
            &addr,
            &["register", &name, &b, "10.9.0.12", "6432", "-"],
            "a second registration after the restart",
            |s| s.instances.len() == 2,
        )
        .await?;
    ensure!(d < PROMPT, "took {d:?}: the watch blocks on a stale index");
    assert_eq!(
        s.instances,
        [ext("10.9.0.11", 6432, &a), ext("10.9.0.12", 6432, &b)]
    );
    assert!(s.error.is_none());
    Ok(())
}

/// The watch task ends, promptly, when every receiver is gone, even in the middle of a
/// blocking query.
#[tokio::test]
async fn the_watch_ends_when_its_receiver_is_dropped() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let scope = env.scope("consul-import-drop").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let mut w = start_watch(
        backend(&consul.url(), &scope, &owner)?,
        &scope.name("nothing"),
    );
    w.until("the first read", SLOW, |s| s.synced).await?;
    // Now it waits in a blocking query of up to 30 s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Watch { rx, task } = w;
    let dropped = Instant::now();
    drop(rx);
    let ended = tokio::time::timeout(PROMPT, task)
        .await
        .context("the watch did not end after its receiver was dropped")??;
    println!(
        "the watch ended {:?} after the receiver was dropped",
        dropped.elapsed()
    );
    assert_eq!(ended, Ok(()));
    Ok(())
}

/// Blocking queries that run out of time (index unchanged) publish nothing and keep waiting;
/// a change after several of them still shows up at once.
#[tokio::test]
async fn a_wait_that_runs_out_publishes_nothing() -> Result<()> {
    let env = shared_consul().await?;
    let consul = env.consul()?;
    let addr = consul.address();
    let scope = env.scope("consul-import-idle").await?;
    let owner = format!("cluster-{}", scope.prefix);
    let name = scope.name("idle");
    let id = scope.name("idle-a");
    let c = Consul::new(ConsulConfig {
        addresses: vec![consul.url()],
        node_name: format!("k8s-{}", scope.prefix),
        owner,
        ..Default::default()
    })?
    .with_watch_wait(Duration::from_secs(1));
    let mut w = start_watch(Arc::new(c), &name);
    w.until("the first read", SLOW, |s| s.synced).await?;
    w.rx.mark_unchanged();
    // Three waits of ~1 s run out with nothing new.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    ensure!(
        !w.rx.has_changed()?,
        "published without a change: {:?}",
        *w.rx.borrow()
    );
    let (s, d) = w
        .after_py(
            &addr,
            &["register", &name, &id, "10.6.0.1", "80", "-"],
            "registered after idle waits",
            |s| s.instances.len() == 1,
        )
        .await?;
    ensure!(d < PROMPT, "took {d:?}");
    assert_eq!(s.instances, [ext("10.6.0.1", 80, &id)]);
    py(&addr, &["deregister", &id]).await?;
    Ok(())
}
