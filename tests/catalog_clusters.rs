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
use support::clusters::{
    CATALOGS, Identities, Readers, Through, connected_members, identities, no_miss, port_of, setup,
    wait_all,
};
use support::{Controller, deploy_api_x};

const STABLE: [&str; 2] = ["10.1.0.1:8080", "10.1.0.2:8080"];
const FLIPPED: &str = "10.1.0.3:8080";
/// The time a flip made during a fault may take after the cluster answers again.
const FLIP_AFTER_ANSWER: Duration = Duration::from_secs(2);
/// The ZooKeeper session timeout of the test's catalog.
const ZK_SESSION: Duration = Duration::from_secs(10);

/// How long after the cluster answers again a flip may land: [`FLIP_AFTER_ANSWER`], but for a
/// hung ZooKeeper server, which a ZooKeeper client (this one as Apache's) gives up on only
/// after two thirds of the session timeout without an answer (its read timeout); then the
/// session moves to another server.
fn allowed(catalog: &str, fault: Fault) -> Duration {
    match (catalog, fault) {
        ("zookeeper", Fault::Hang) => ZK_SESSION * 2 / 3 + FLIP_AFTER_ANSWER,
        _ => FLIP_AFTER_ANSWER,
    }
}
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
    let readers = Readers::spawn(&Through::avoiding(env, c, e, z)?, &STABLE)?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t0 = Instant::now();
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
        wait_all(env, &want, t0).await
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
        if after > allowed(name, fault) {
            late.push(format!("{name}: {after:?}"));
        }
    }
    tokio::try_join!(
        heal(consul, fault, c),
        heal(etcd, fault, e),
        heal(zk, fault, z)
    )?;
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
        "{fault:?}: the flip landed later after the cluster answered than it may: {late:?}\n{}",
        cb.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_faults_leave_every_reader_its_entries_and_flips_land_once_the_cluster_answers()
-> Result<()> {
    let (env, client) = setup(10, ZK_SESSION.as_secs() as i64).await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &[]).await?;
    deploy_api_x(&client, CATALOGS).await?;
    workload::create_pod(
        &client,
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
    wait_all(&env, &STABLE, Instant::now())
        .await
        .with_context(|| cb.log())?;
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
