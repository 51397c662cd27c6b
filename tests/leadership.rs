//! The controller's own failures, with every catalog real: a leader cut off from the API server
//! (fencing), a graceful handover, and the API server restarting under it.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use localenv::proxy::Proxy;
use localenv::workload;
use support::everywhere::{CATALOGS, WAIT, answers, no_gap, setup, spawn_readers, wait_everywhere};
use support::{Controller, deploy_api_x, sum_metric};

/// What a replica has written to catalogs (entries written and deleted, write round trips),
/// and how many reads it made.
async fn writes_and_reads(c: &Controller) -> Result<(f64, f64)> {
    let m = c.metrics().await?;
    let writes = sum_metric(&m, "catalog_bridge_backend_operations_total", &[])
        + sum_metric(
            &m,
            "catalog_bridge_backend_requests_total",
            &["op=\"write\""],
        );
    let reads = sum_metric(
        &m,
        "catalog_bridge_backend_requests_total",
        &["op=\"read\""],
    );
    Ok((writes, reads))
}

async fn wait_leading(c: &Controller, leading: bool) -> Result<()> {
    localenv::eventually(
        &format!("{} to have leader={leading}", c.process.name()),
        WAIT,
        || async { Ok((c.is_leader().await == leading).then_some(())) },
    )
    .await
    .with_context(|| c.log())
}

/// A leader `a` (started with `vars`) and a standby `b` of one owner, `api_x` exported to every
/// catalog and in all of them.
async fn leader_and_standby(
    env: &localenv::Env,
    client: &kube::Client,
    args: &[&str],
    vars: &[(&str, &str)],
) -> Result<(Controller, Controller)> {
    let a = Controller::start_with_env(env, "cb-a", "cluster-a", args, vars).await?;
    wait_leading(&a, true).await?;
    let b = Controller::start(env, "cb-b", "cluster-a", args).await?;
    deploy_api_x(client, CATALOGS).await?;
    wait_everywhere(env, &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| a.log())?;
    Ok((a, b))
}

/// Every catalog answers `want` at every look for `span` (the readers poll continuously).
async fn stays_everywhere(env: &localenv::Env, want: &[&str], span: Duration) -> Result<()> {
    let until = Instant::now() + span;
    while Instant::now() < until {
        let a = answers(env).await?;
        ensure!(
            a.iter().all(|(_, v)| v == want),
            "expected {want:?} everywhere, found {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_stops_writing_before_its_lease_can_be_taken()
-> Result<()> {
    let (env, client) = setup(15, 10).await?;
    let kube = env.kube()?;
    // Replica a reaches the API server only through a proxy the test can cut; the catalogs it
    // reaches directly, as a replica in a partitioned node would.
    let proxy = Proxy::start(([127, 0, 0, 1], kube.port()).into()).await?;
    let via = kube.kubeconfig_via(proxy.port(), "cb-a")?;
    let via = via.to_str().context("kubeconfig path")?;
    let args = ["--drift-interval=2s", "--lease-duration=6s"];
    let (a, b) = leader_and_standby(&env, &client, &args, &[("KUBECONFIG", via)]).await?;

    ensure!(
        !a.full_log()?.contains("stopped writing to catalogs"),
        "a leader in touch with the API server never stops: {}",
        a.log()
    );
    let cut = Instant::now();
    proxy.cut();
    wait_leading(&a, false).await?;
    let stepped_down = cut.elapsed();
    // From here on the cut-off replica must not write to a catalog; a drift check's read that
    // was under way when it stepped down may end (on a loaded machine, after the step-down is
    // seen), none may start.
    let (writes, _) = writes_and_reads(&a).await?;
    wait_leading(&b, true).await?;
    let (_, reads) = writes_and_reads(&a).await?;
    println!(
        "cut at 0: the cut-off leader stopped writing after {stepped_down:?}, the other replica led after {:?} (Lease 6 s, renew deadline 4 s)",
        cut.elapsed()
    );
    ensure!(
        a.full_log()?.contains("stopped writing to catalogs"),
        "the cut-off leader says why it stopped: {}",
        a.log()
    );

    // The new leader removes an endpoint that turned unready; the old one, still reaching every
    // catalog with its drift check due every 2 s, must not put it back.
    workload::set_pod_ready(&client, "shop", "api-x-2", false).await?;
    let unready = Instant::now();
    wait_everywhere(&env, &["10.1.0.1:8080"])
        .await
        .with_context(|| b.log())?;
    println!(
        "the unready endpoint left every catalog after {:?}",
        unready.elapsed()
    );
    stays_everywhere(&env, &["10.1.0.1:8080"], Duration::from_secs(10))
        .await
        .with_context(|| a.log())?;
    let (writes_after, reads_after) = writes_and_reads(&a).await?;
    ensure!(
        writes_after == writes && reads_after == reads,
        "the cut-off replica made {} writes after its deadline and {} reads after the other \
         replica led (drift checks every 2 s)\n{}",
        writes_after - writes,
        reads_after - reads,
        a.log()
    );

    // Reachable again, it rejoins as a follower: the other replica keeps the Lease and alone
    // writes the next change.
    proxy.restore();
    localenv::eventually("the old leader to see the new one", WAIT, || async {
        Ok(a.full_log()?
            .contains("the leader Lease is held by cb-b")
            .then_some(()))
    })
    .await
    .with_context(|| a.log())?;
    workload::set_pod_ready(&client, "shop", "api-x-2", true).await?;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| b.log())?;
    ensure!(
        b.is_leader().await && !a.is_leader().await,
        "b leads, a follows"
    );
    ensure!(
        writes_and_reads(&a).await? == (writes, reads),
        "the follower touched no catalog\n{}",
        a.log()
    );
    Ok(())
}

/// A rolling update: SIGTERM to the leader with a live standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_handover_leaves_readers_no_gap_and_the_new_leader_writes_nothing() -> Result<()>
{
    let (env, client) = setup(15, 10).await?;
    let args = ["--drift-interval=1s"];
    let (a, b) = leader_and_standby(&env, &client, &args, &[]).await?;

    let readers = spawn_readers(&env, 2, Duration::from_secs(15))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let term = Instant::now();
    tokio::task::block_in_place(|| a.process.stop())?;
    println!("the leader exited {:?} after SIGTERM", term.elapsed());
    wait_leading(&b, true).await?;
    println!("the standby led {:?} after SIGTERM", term.elapsed());
    no_gap(&readers.await??).with_context(|| b.log())?;
    let writes = b
        .metric("catalog_bridge_backend_operations_total", &[])
        .await?;
    ensure!(
        writes == 0.0,
        "the new leader wrote {writes} entries\n{}",
        b.log()
    );
    Ok(())
}

/// The remaining TTL of the etcd lease that holds `catalog`'s entries of `owner`.
fn etcd_lease_remaining(env: &localenv::Env, owner: &str, catalog: &str) -> Result<i64> {
    let etcd = env.etcd()?;
    let marker = format!("/catalog-bridge.io/leases/{owner}/{catalog}");
    let id: i64 = etcd
        .etcdctl(&["get", "--print-value-only", &marker])?
        .trim()
        .parse()
        .with_context(|| format!("the lease marker {marker}"))?;
    let out = etcd.etcdctl(&["lease", "timetolive", &format!("{id:x}")])?;
    // "lease 694d… granted with TTL(12s), remaining(11s)"
    out.split("remaining(")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("etcdctl lease timetolive: {out}"))
}

/// A crash (kill -9): the standby re-attaches to the etcd lease and keeps it alive at once, so
/// the entries do not expire under it (the lease had only what the crashed leader left it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_handoff_keeps_the_etcd_lease_alive_at_once_and_readers_see_no_gap() -> Result<()> {
    const TTL: i64 = 12;
    let (env, client) = setup(TTL, 10).await?;
    let args = ["--drift-interval=1s"];
    let (a, b) = leader_and_standby(&env, &client, &args, &[]).await?;

    let readers = spawn_readers(&env, 2, Duration::from_secs(25))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let crash = Instant::now();
    a.process.kill()?;
    wait_leading(&b, true).await?;
    localenv::eventually("the standby to take the etcd lease over", WAIT, || async {
        Ok(b.full_log()?
            .contains("etcd lease: reusing the live lease of the marker")
            .then_some(()))
    })
    .await
    .with_context(|| b.log())?;
    let remaining = etcd_lease_remaining(&env, "cluster-a", "etcd-plain")?;
    println!(
        "the standby took the etcd lease over {:?} after the crash; it has {remaining} s of {TTL} left",
        crash.elapsed()
    );
    ensure!(
        remaining > TTL / 2,
        "the lease was not kept alive on takeover: {remaining} s of {TTL} left\n{}",
        b.log()
    );
    no_gap(&readers.await??).with_context(|| b.log())?;
    ensure!(
        !b.full_log()?.contains("etcd lease expired or was revoked"),
        "the lease expired under the new leader\n{}",
        b.log()
    );
    Ok(())
}

/// The API server and the etcd behind it killed mid-run for longer than the renew deadline plus
/// the ZooKeeper session timeout, its history compacted so that every watch is answered 410 Gone
/// and relists: nothing leaves any catalog meanwhile, and a change made after it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_and_relist_remove_nothing_and_later_changes_arrive() -> Result<()> {
    let (env, client) = setup(15, 10).await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    wait_leading(&cb, true).await?;
    deploy_api_x(&client, CATALOGS).await?;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| cb.log())?;
    let kube = env.kube()?;

    let readers = spawn_readers(&env, 2, Duration::from_secs(40))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let down = Instant::now();
    kube.kill()?;
    wait_leading(&cb, false).await?;
    println!(
        "API server down at 0: stopped writing after {:?}",
        down.elapsed()
    );
    // Longer than the renew deadline (4 s) plus the ZooKeeper session timeout (10 s).
    tokio::time::sleep(Duration::from_secs(18)).await;
    kube.storage().start_again().await?;
    let status = kube
        .storage()
        .etcdctl(&["endpoint", "status", "--write-out=json"])?;
    let revision =
        serde_json::from_str::<serde_json::Value>(&status)?[0]["Status"]["header"]["revision"]
            .as_i64()
            .with_context(|| format!("etcd revision in {status}"))?;
    kube.storage()
        .etcdctl(&["compact", &revision.to_string()])?;
    kube.storage().kill()?;
    kube.start_again().await?;
    println!(
        "API server back after {:?} (history compacted at {revision})",
        down.elapsed()
    );
    wait_leading(&cb, true).await?;
    println!("leading again after {:?}", down.elapsed());
    no_gap(&readers.await??).with_context(|| cb.log())?;

    // A change the controller sees itself (an EndpointSlice change would wait for the
    // controller manager's own relist): the export is taken back.
    let client = kube.client().await?;
    let change = Instant::now();
    support::annotate(
        &client,
        "shop",
        "api-x",
        serde_json::json!({"catalog-bridge.io/export": null}),
    )
    .await?;
    wait_everywhere(&env, &[]).await.with_context(|| cb.log())?;
    println!(
        "a change after the restart reached every catalog in {:?}",
        change.elapsed()
    );
    Ok(())
}
