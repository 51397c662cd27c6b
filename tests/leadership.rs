//! The controller's own failures, with every catalog real: a leader cut off from the API server
//! (fencing), a graceful handover, and the API server restarting under it.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use localenv::proxy::Proxy;
use localenv::workload;
use support::everywhere::{CATALOGS, WAIT, answers, setup, wait_everywhere};
use support::{Controller, deploy_api_x, sum_metric};

/// Every catalog operation a replica has counted: entries written and deleted, write round
/// trips and reads.
async fn catalog_operations(c: &Controller) -> Result<f64> {
    let m = c.metrics().await?;
    Ok(sum_metric(&m, "catalog_bridge_backend_operations_total", &[])
        + sum_metric(&m, "catalog_bridge_backend_requests_total", &[]))
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
    let a = Controller::start_with_env(&env, "cb-a", "cluster-a", &args, &[("KUBECONFIG", via)])
        .await?;
    wait_leading(&a, true).await?;
    let b = Controller::start(&env, "cb-b", "cluster-a", &args).await?;
    deploy_api_x(&client, CATALOGS).await?;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| a.log())?;

    let cut = Instant::now();
    proxy.cut();
    wait_leading(&a, false).await?;
    let stepped_down = cut.elapsed();
    // From here on the cut-off replica must not touch a catalog.
    let ops = catalog_operations(&a).await?;
    wait_leading(&b, true).await?;
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
    let after = catalog_operations(&a).await?;
    ensure!(
        after == ops,
        "the cut-off replica made {} catalog operations after its deadline\n{}",
        after - ops,
        a.log()
    );

    // Reachable again, it rejoins as a follower: the other replica keeps the Lease and alone
    // writes the next change.
    proxy.restore();
    localenv::eventually("the old leader to see the new one", WAIT, || async {
        Ok(a.full_log()?.contains("the leader Lease is held by cb-b").then_some(()))
    })
    .await
    .with_context(|| a.log())?;
    workload::set_pod_ready(&client, "shop", "api-x-2", true).await?;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| b.log())?;
    ensure!(b.is_leader().await && !a.is_leader().await, "b leads, a follows");
    ensure!(
        catalog_operations(&a).await? == ops,
        "the follower wrote nothing\n{}",
        a.log()
    );
    Ok(())
}
