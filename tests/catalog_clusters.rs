//! The controller against 3-member Consul, etcd and ZooKeeper clusters while members fail: the
//! member it is connected to killed, the leader killed, a member hung (SIGSTOP), and a rolling
//! restart of every member. Readers poll every catalog every 20 ms through members that stay
//! up; not one answer may lack an entry, no entry may be written again (the etcd lease and
//! revision, the ZooKeeper session and zxid, Consul's ModifyIndex stay), and a readiness flip
//! made during the fault lands within 2 s of the cluster answering again.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use localenv::cluster::Member;
use localenv::{Cluster, Env, workload};
use support::clusters::catalog_events;
use support::clusters::{
    CATALOGS, Identities, Readers, Through, connected_members, identities, no_miss, port_of, setup,
    wait_all,
};
use support::{Controller, catalog_condition, deploy_api_x};

const STABLE: [&str; 2] = ["10.1.0.1:8080", "10.1.0.2:8080"];
const FLIPPED: &str = "10.1.0.3:8080";
/// The time a flip made during a fault may take after the cluster answers again.
const FLIP_AFTER_ANSWER: Duration = Duration::from_secs(2);
/// The ZooKeeper session timeout of the test's catalog.
const ZK_SESSION: Duration = Duration::from_secs(10);

/// The etcd lease TTL of the test's catalog: above the hang (10 s) plus a keep-alive interval.
/// etcd's leader, hung for longer than what it last saw of a lease's time, revokes the lease
/// when it wakes, before it learns that it was replaced (etcd issues 12528 and 15247): the
/// controller then takes a new lease at once, but readers see the entries gone for a moment.
const ETCD_TTL: i64 = 20;
/// How long an election may take, at most, before a test gives up on the cluster.
const ELECTION: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// kill -9 of the member the controller is connected to.
    KillConnected,
    /// kill -9 of the cluster's leader.
    KillLeader,
    /// SIGSTOP of the member the controller is connected to, for 10 s.
    Hang,
    /// Every member stopped gracefully and started again, one after the other.
    RollingRestart,
}

/// The member of each cluster a fault hits: (consul, etcd, zookeeper).
async fn targets(env: &Env, cb: &Controller, fault: Fault) -> Result<[usize; 3]> {
    let pid = cb.process.pid().context("the controller runs")?;
    let connected = |ports: Vec<u16>| -> Result<usize> {
        let c = connected_members(pid, &ports)?;
        c.first()
            .copied()
            .with_context(|| format!("the controller holds no connection to any of {ports:?}"))
    };
    let consul = env.consul_cluster()?;
    let etcd = env.etcd_cluster()?;
    let zk = env.zookeeper_ensemble()?;
    Ok(match fault {
        Fault::KillConnected | Fault::Hang => [
            connected(
                consul
                    .members()
                    .iter()
                    .map(|m| port_of(&m.address()))
                    .collect::<Result<_>>()?,
            )?,
            connected(
                etcd.endpoints()
                    .iter()
                    .map(|e| port_of(e))
                    .collect::<Result<_>>()?,
            )?,
            connected(
                zk.members()
                    .iter()
                    .map(|m| port_of(&m.connect_string()))
                    .collect::<Result<_>>()?,
            )?,
        ],
        Fault::KillLeader => [
            consul.leader(ELECTION).await?,
            etcd.leader(ELECTION).await?,
            zk.leader(ELECTION).await?,
        ],
        Fault::RollingRestart => [0, 0, 0],
    })
}

/// Hits member `target` of `cluster` with `fault`; returns when the cluster answers again
/// (a leader among the members that run), measured from `t0`.
async fn strike<M: Member>(
    cluster: &Cluster<M>,
    fault: Fault,
    target: usize,
    t0: Instant,
) -> Result<Duration> {
    match fault {
        Fault::KillConnected | Fault::KillLeader => cluster.kill(target)?,
        Fault::Hang => cluster.pause(target)?,
        Fault::RollingRestart => cluster.stop(target)?,
    }
    cluster.leader(ELECTION).await?;
    Ok(t0.elapsed())
}

/// Brings `cluster` whole again after `fault`: the rest of a rolling restart included.
async fn heal<M: Member>(cluster: &Cluster<M>, fault: Fault, target: usize) -> Result<()> {
    match fault {
        Fault::KillConnected | Fault::KillLeader => cluster.start_again(target).await?,
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            cluster.resume(target)?;
        }
        Fault::RollingRestart => {
            cluster.start_again(0).await?;
            for i in 1..localenv::cluster::MEMBERS {
                cluster.leader(ELECTION).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                cluster.stop(i)?;
                cluster.leader(ELECTION).await?;
                cluster.start_again(i).await?;
            }
        }
    }
    cluster.leader(ELECTION).await?;
    Ok(())
}

/// Each ExternalCatalog's `status.server` names its cluster's leader and every member, as the
/// cluster says now (the controller asks at every drift check).
async fn leaders_shown(env: &Env, client: &kube::Client) -> Result<()> {
    let consul = env.consul_cluster()?;
    let etcd = env.etcd_cluster()?;
    let zk = env.zookeeper_ensemble()?;
    let want = [
        (
            "consul",
            consul.members()[consul.leader(ELECTION).await?].server_address(),
        ),
        ("etcd", format!("etcd-c-{}", etcd.leader(ELECTION).await?)),
        (
            "zk",
            zk.members()[zk.leader(ELECTION).await?].connect_string(),
        ),
    ];
    let api: kube::Api<catalog_bridge::api::crd::ExternalCatalog> = kube::Api::all(client.clone());
    for (name, leader) in want {
        let shown = localenv::eventually(
            &format!("{name}'s status to name {leader} as the leader of 3 members"),
            Duration::from_secs(30),
            || async {
                let server = api.get(name).await?.status.and_then(|s| s.server);
                Ok(server.filter(|s| {
                    s.leader.as_deref() == Some(leader.as_str()) && s.members.len() == 3
                }))
            },
        )
        .await?;
        println!("{name}: status.server {shown:?}");
    }
    Ok(())
}

fn stable_of(ids: &Identities) -> Identities {
    ids.iter()
        .filter(|((_, addr), _)| STABLE.contains(&addr.as_str()))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// One fault, struck at all three clusters at once, with the flipped Pod's readiness set to
/// `ready` right after it.
async fn survive(
    env: &Env,
    client: &kube::Client,
    cb: &Controller,
    fault: Fault,
    ready: bool,
) -> Result<()> {
    let [c, e, z] = targets(env, cb, fault).await?;
    println!("== {fault:?}: Consul server {c}, etcd member {e}, ZooKeeper server {z}");
    let before = stable_of(&identities(env).await?);
    let through = Through::avoiding(env, c, e, z)?;
    let readers = Readers::spawn(&through, &STABLE)?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t0 = Instant::now();
    println!(
        "{fault:?} struck at {}",
        k8s_openapi::jiff::Timestamp::now()
    );
    let (consul, etcd, zk) = (
        env.consul_cluster()?,
        env.etcd_cluster()?,
        env.zookeeper_ensemble()?,
    );
    let flip = async {
        workload::set_pod_ready(client, "shop", "api-x-3", ready).await?;
        let mut want: Vec<&str> = STABLE.to_vec();
        if ready {
            want.push(FLIPPED);
        }
        wait_all(&through, &want, t0).await
    };
    let (answered, landed) = tokio::join!(
        async {
            tokio::try_join!(
                strike(consul, fault, c, t0),
                strike(etcd, fault, e, t0),
                strike(zk, fault, z, t0)
            )
        },
        flip
    );
    let (answered, landed) = (answered?, landed.with_context(|| cb.log())?);
    let answered = [
        ("consul", answered.0),
        ("etcd", answered.1),
        ("zookeeper", answered.2),
    ];
    let mut late = Vec::new();
    for (name, answer) in answered {
        let land = landed
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| *d)
            .context("every catalog landed")?;
        let after = land.saturating_sub(answer);
        println!(
            "{fault:?} {name}: the cluster answered again {answer:?} after the fault, the flip \
             to ready={ready} landed {land:?} after it ({after:?} after the cluster answered)"
        );
        if after > FLIP_AFTER_ANSWER {
            late.push(format!("{name}: {after:?}"));
        }
    }
    tokio::try_join!(
        heal(consul, fault, c),
        heal(etcd, fault, e),
        heal(zk, fault, z)
    )?;
    leaders_shown(env, client).await.with_context(|| cb.log())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    no_miss(&readers.finish().await?, 20).with_context(|| cb.log())?;
    let after = stable_of(&identities(env).await?);
    ensure!(
        after == before,
        "{fault:?} rewrote entries:\nbefore {before:?}\nafter  {after:?}\n{}",
        cb.log()
    );
    ensure!(
        late.is_empty(),
        "{fault:?}: the flip landed more than {FLIP_AFTER_ANSWER:?} after the cluster answered: {late:?}\n{}",
        cb.log()
    );
    Ok(())
}

/// `shop/api-x` exported to the three clusters: two ready Pods (the entries readers count on)
/// and a third not ready (the one a flip turns ready); returns once the two are everywhere.
async fn deploy(env: &Env, client: &kube::Client, cb: &Controller) -> Result<()> {
    deploy_api_x(client, CATALOGS).await?;
    workload::create_pod(
        client,
        "shop",
        &workload::PodSpec {
            name: "api-x-3",
            app: "api-x",
            node: "node-1",
            ip: "10.1.0.3",
            port: 8080,
            ready: false,
        },
    )
    .await?;
    wait_all(&Through::all(env)?, &STABLE, Instant::now())
        .await
        .with_context(|| cb.log())?;
    Ok(())
}

/// One service registered outside Kubernetes in each cluster, as its clients do (a Consul node
/// of its own, an etcd key, a ZooKeeper node), imported into `shop`: the imported Services and
/// the endpoints each has once imported.
async fn import_one_from_each(
    env: &Env,
    client: &kube::Client,
) -> Result<Vec<(&'static str, Vec<String>)>> {
    let consul = env.consul_cluster()?.urls();
    localenv::http_client()?
        .put(format!("{}/v1/catalog/register", consul[0]))
        .json(&serde_json::json!({"Node": "vm-1", "Address": "10.7.0.1",
               "Service": {"Service": "api_z", "Address": "10.7.0.1", "Port": 7070}}))
        .send()
        .await?
        .error_for_status()?;
    env.etcd_cluster()?.members()[0].etcdctl(&[
        "put",
        "/services/memcache/providers/10.8.0.1:11211",
        "10.8.0.1:11211",
    ])?;
    support::kazoo_create(
        &env.zookeeper_ensemble()?.connect_string(),
        "/services/mysql_x/providers/10.9.0.1:3306",
        "",
    )?;
    let imports = [
        ("api-z", "consul", "api_z", 7070, "10.7.0.1:7070"),
        ("memcache", "etcd", "memcache", 11211, "10.8.0.1:11211"),
        ("mysql-x", "zk", "mysql_x", 3306, "10.9.0.1:3306"),
    ];
    let mut out = Vec::new();
    for (svc, catalog, external, port, endpoint) in imports {
        support::kubectl_apply(
            env,
            &serde_json::json!({
                "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
                "metadata": {"name": svc, "namespace": "shop"},
                "spec": {"catalogRef": {"name": catalog}, "direction": "Import",
                         "externalName": external,
                         "target": {"ports": [{"name": "main", "port": port}]}},
            }),
        )?;
        let want = vec![endpoint.to_string()];
        localenv::eventually(
            &format!("{svc} imported"),
            Duration::from_secs(30),
            || async {
                Ok((support::ready_endpoints(client, "shop", svc).await? == want).then_some(()))
            },
        )
        .await?;
        out.push((svc, want));
    }
    Ok(out)
}

/// The tests of this file one at a time: each runs three clusters of its own, and its timings
/// mean something only on a machine that is not starting three more.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_faults_leave_every_reader_its_entries_and_flips_land_once_the_cluster_answers()
-> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (env, client) = setup(ETCD_TTL, ZK_SESSION.as_secs() as i64).await?;
    // The drift check also asks each catalog what it is (status.server): often, to see it
    // follow the leader.
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=2s"]).await?;
    deploy(&env, &client, &cb).await?;
    let mut ready = true;
    for fault in [
        Fault::KillConnected,
        Fault::KillLeader,
        Fault::Hang,
        Fault::RollingRestart,
    ] {
        survive(&env, &client, &cb, fault, ready).await?;
        ready = !ready;
    }
    Ok(())
}

/// Two members of each cluster down: no quorum. Each ExternalCatalog says `Reachable=False` in
/// the catalog's own words, `catalog_bridge_catalog_up` is 0, and one Warning Event says so,
/// however often the writer tries meanwhile; imports keep their last endpoints; a flip made
/// meanwhile lands when the quorum is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_quorum_is_reported_once_and_everything_converges_when_it_returns() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (env, client) = setup(10, ZK_SESSION.as_secs() as i64).await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &[]).await?;
    deploy(&env, &client, &cb).await?;
    for name in ["consul", "etcd", "zk"] {
        catalog_condition(&client, name, "Reachable", "True").await?;
    }
    let imported = import_one_from_each(&env, &client)
        .await
        .with_context(|| cb.log())?;

    let (consul, etcd, zk) = (
        env.consul_cluster()?,
        env.etcd_cluster()?,
        env.zookeeper_ensemble()?,
    );
    let down = Instant::now();
    for i in [1, 2] {
        consul.kill(i)?;
        etcd.kill(i)?;
        zk.kill(i)?;
    }
    workload::set_pod_ready(&client, "shop", "api-x-3", true).await?;
    for name in ["consul", "etcd", "zk"] {
        let c = catalog_condition(&client, name, "Reachable", "False")
            .await
            .with_context(|| cb.log())?;
        println!(
            "{name} without quorum after {:?}: Reachable=False {}: {}",
            down.elapsed(),
            c.reason,
            c.message
        );
        let up = cb
            .metric(
                "catalog_bridge_catalog_up",
                &[&format!("catalog=\"{name}\"")],
            )
            .await?;
        ensure!(up == 0.0, "{name}: catalog_up is {up} without quorum");
    }
    for (svc, want) in &imported {
        let got = support::ready_endpoints(&client, "shop", svc).await?;
        ensure!(
            got == *want,
            "{svc} keeps its endpoints without quorum: {got:?}"
        );
    }
    // The writers try again and again meanwhile: still one Event per catalog.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let events = catalog_events(&env, "Unreachable")?;
    println!("Events:\n{}", events.join("\n"));
    for name in ["consul", "etcd", "zk"] {
        let of: Vec<&String> = events
            .iter()
            .filter(|e| e.starts_with(&format!("{name} ")))
            .collect();
        ensure!(
            of.len() == 1 && of[0].contains(" Warning Unreachable x1: the catalog does not answer"),
            "{name}: one Warning Event for the lost quorum, not {of:?}"
        );
    }
    // The condition follows what the catalog says now: Consul's surviving server knows by now
    // that its cluster has no leader.
    localenv::eventually(
        "Consul's own words in its condition",
        Duration::from_secs(30),
        || async {
            let c = catalog_condition(&client, "consul", "Reachable", "False").await?;
            Ok(c.message.contains("No cluster leader").then_some(()))
        },
    )
    .await?;
    let back = Instant::now();
    tokio::try_join!(
        async {
            consul.start_again(1).await?;
            consul.start_again(2).await
        },
        async {
            etcd.start_again(1).await?;
            etcd.start_again(2).await
        },
        async {
            zk.start_again(1).await?;
            zk.start_again(2).await
        },
    )?;
    println!(
        "quorum back {:?} after the last member was started",
        back.elapsed()
    );
    let mut want = STABLE.to_vec();
    want.push(FLIPPED);
    let landed = wait_all(&Through::all(&env)?, &want, back)
        .await
        .with_context(|| cb.log())?;
    println!("the flip made without quorum landed once the members were started: {landed:?}");
    for name in ["consul", "etcd", "zk"] {
        catalog_condition(&client, name, "Reachable", "True").await?;
    }
    for (svc, want) in &imported {
        let got = support::ready_endpoints(&client, "shop", svc).await?;
        ensure!(
            got == *want,
            "{svc} keeps its endpoints after the quorum is back: {got:?}"
        );
    }
    let again = catalog_events(&env, "Connected")?;
    println!("Events:\n{}", again.join("\n"));
    ensure!(
        again.len() == 3
            && again
                .iter()
                .all(|e| e.contains(" Normal Connected x1: the catalog answers again")),
        "one Normal Event per catalog answering again: {again:?}"
    );
    Ok(())
}
