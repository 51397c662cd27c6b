//! The harness's fault controls — stop, start, kill, pause — act on the real servers, and a
//! test that panics leaves no server behind. Later fault tests of the controller rely on these.

use std::time::Duration;

use anyhow::{Context, Result};
use localenv::Env;
use serde_json::{Value, json};

async fn consul_services(http: &reqwest::Client, url: &str) -> Result<Value> {
    Ok(http
        .get(format!("{url}/v1/catalog/services"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// A dev agent started again has forgotten everything: the real fault a catalog restart is.
#[tokio::test]
async fn consul_restart_empties_the_catalog() -> Result<()> {
    let env = Env::builder().consul().start().await?;
    let consul = env.consul()?;
    let http = localenv::http_client()?;
    http.put(format!("{}/v1/catalog/register", consul.url()))
        .json(&json!({"Node": "n1", "Address": "192.0.2.1",
                      "Service": {"Service": "api_x", "Address": "10.0.0.1", "Port": 8080}}))
        .send()
        .await?
        .error_for_status()?;
    assert!(
        consul_services(&http, &consul.url())
            .await?
            .get("api_x")
            .is_some()
    );

    consul.stop()?;
    assert!(
        consul_services(&http, &consul.url()).await.is_err(),
        "a stopped agent does not answer"
    );
    consul.start_again().await?;
    let after = consul_services(&http, &consul.url()).await?;
    assert!(
        after.get("api_x").is_none(),
        "restarted dev agent is empty: {after}"
    );
    Ok(())
}

/// etcd killed with SIGKILL and started again keeps its data; paused, it answers nothing.
#[tokio::test]
async fn etcd_kill_pause_and_restart() -> Result<()> {
    let env = Env::builder().etcd().start().await?;
    let etcd = env.etcd()?;
    etcd.etcdctl(&["put", "/k", "v"])?;

    etcd.process().pause()?;
    let t = std::time::Instant::now();
    let hung = etcd.etcdctl(&["--command-timeout=1s", "get", "/k"]);
    assert!(hung.is_err(), "a paused etcd answers nothing");
    println!("request to paused etcd failed after {:?}", t.elapsed());
    etcd.process().resume()?;

    etcd.kill()?;
    assert!(!etcd.process().is_running());
    assert!(etcd.etcdctl(&["--dial-timeout=1s", "get", "/k"]).is_err());
    etcd.start_again().await?;
    assert_eq!(
        etcd.etcdctl(&["get", "--print-value-only", "/k"])?.trim(),
        "v"
    );
    Ok(())
}

/// ZooKeeper stopped and started again keeps its persistent nodes (its data directory stays).
#[tokio::test]
async fn zookeeper_stop_and_start_again() -> Result<()> {
    use zookeeper_client as zk;
    let env = Env::builder().zookeeper().start().await?;
    let server = env.zookeeper()?;
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    {
        let c = zk::Client::connect(&server.connect_string()).await?;
        c.create("/kept", b"1", &persistent).await?;
    }
    server.stop()?;
    assert!(
        server.four_letter("ruok").await.is_err(),
        "stopped server answers nothing"
    );
    server.start_again().await?;
    let c = zk::Client::connect(&server.connect_string()).await?;
    let (data, _) = c
        .get_data("/kept")
        .await
        .context("reading /kept after restart")?;
    assert_eq!(data, b"1");
    Ok(())
}

/// A test that panics while it holds an environment leaves no server process behind.
#[tokio::test]
async fn a_panicking_test_leaves_no_server_running() -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let env = Env::builder()
            .etcd()
            .consul()
            .start()
            .await
            .expect("peers start");
        let pids = [
            env.etcd().expect("etcd").process().pid(),
            env.consul().expect("consul").process().pid(),
        ];
        tx.send(pids).expect("receiver waits");
        panic!("a test failing while its peers run");
    });
    let pids = rx.await.context("the task sent its pids")?;
    let joined = task.await;
    assert!(joined.is_err_and(|e| e.is_panic()), "the task panicked");
    for pid in pids.into_iter().flatten() {
        let alive =
            localenv::eventually("the process to exit", Duration::from_secs(15), || async {
                Ok((!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(()))
            })
            .await;
        assert!(alive.is_ok(), "process {pid} still runs after the panic");
    }
    Ok(())
}

/// Kills the leader of `cluster` and waits until another leads: the member killed, and one
/// that runs.
async fn kill_the_leader<M: localenv::cluster::Member>(
    cluster: &localenv::Cluster<M>,
    catalog: &str,
) -> Result<(usize, usize)> {
    let within = Duration::from_secs(30);
    let leader = cluster.leader(within).await?;
    cluster.kill(leader)?;
    let t = std::time::Instant::now();
    let next = cluster.leader(within).await?;
    println!(
        "{catalog}: member {leader} killed, member {next} leads after {:?}",
        t.elapsed()
    );
    assert_ne!(next, leader);
    Ok((leader, cluster.other_than(&[leader])?))
}

/// Each catalog as a 3-member cluster: a write through one member is read through another,
/// the killed leader is replaced by a new one while the other two go on answering, a hung
/// member is not the leader afterwards, and the old leader comes back with its data.
#[tokio::test]
async fn three_member_clusters_elect_again_and_take_members_back() -> Result<()> {
    use localenv::cluster::Member;
    use zookeeper_client as zk;
    let t = std::time::Instant::now();
    let env = Env::builder().clusters().start().await?;
    println!("three 3-member clusters up in {:?}", t.elapsed());
    let within = Duration::from_secs(30);

    // etcd: written through one member, read through each of the others.
    let etcd = env.etcd_cluster()?;
    etcd.members()[0].etcdctl(&["put", "/k", "v"])?;
    for m in &etcd.members()[1..] {
        let got = m.etcdctl(&["get", "--print-value-only", "/k"])?;
        assert_eq!(got.trim(), "v");
    }
    let (leader, up) = kill_the_leader(etcd, "etcd").await?;
    etcd.members()[up].etcdctl(&["put", "/k", "w"])?;
    etcd.start_again(leader).await?;
    let got = etcd.members()[leader].etcdctl(&["get", "--print-value-only", "/k"])?;
    assert_eq!(got.trim(), "w", "the member killed caught up");

    // ZooKeeper: a node made through one server is seen through another; the leader killed.
    let ensemble = env.zookeeper_ensemble()?;
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    zk::Client::connect(&ensemble.members()[0].connect_string())
        .await?
        .create("/kept", b"1", &persistent)
        .await?;
    let (leader, up) = kill_the_leader(ensemble, "ZooKeeper").await?;
    let (data, _) = zk::Client::connect(&ensemble.members()[up].connect_string())
        .await?
        .get_data("/kept")
        .await?;
    assert_eq!(data, b"1");
    ensemble.start_again(leader).await?;
    assert!(
        !ensemble.members()[leader].is_leader().await?,
        "the old leader follows"
    );

    // Consul: registered through one server, read through another; the leader killed, then a
    // follower hung.
    let consul = env.consul_cluster()?;
    let http = localenv::http_client()?;
    http.put(format!("{}/v1/catalog/register", consul.members()[0].url()))
        .json(&json!({"Node": "n1", "Address": "192.0.2.1",
                      "Service": {"Service": "api_x", "Address": "10.0.0.1", "Port": 8080}}))
        .send()
        .await?
        .error_for_status()?;
    let (leader, up) = kill_the_leader(consul, "Consul").await?;
    let services = consul_services(&http, &consul.members()[up].url()).await?;
    assert!(services.get("api_x").is_some(), "{services}");
    consul.start_again(leader).await?;
    let services = consul_services(&http, &consul.members()[leader].url()).await?;
    assert!(
        services.get("api_x").is_some(),
        "a server keeps its state: {services}"
    );
    let follower = consul.other_than(&[consul.leader(within).await?])?;
    consul.pause(follower)?;
    assert_ne!(consul.leader(within).await?, follower);
    consul.resume(follower)?;
    Ok(())
}
