//! Whole catalogs away, at controller level: a controller started while etcd and ZooKeeper are
//! down runs, reports and converges when they come; an etcd lease revoked by an admin and a
//! ZooKeeper session that expired during a partition are really lost — a new lease and a new
//! session are taken, and every entry comes back.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use localenv::Env;
use localenv::proxy::Proxy;
use serde_json::json;
use support::clusters::catalog_events;
use support::everywhere::{CATALOGS, WAIT, catalog, setup, wait_everywhere};
use support::{ConsulView, Controller, catalog_condition, deploy_api_x, kubectl_apply};

const BOTH: [&str; 2] = ["10.1.0.1:8080", "10.1.0.2:8080"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_started_while_etcd_and_zookeeper_are_down_runs_reports_and_converges_when_they_come()
-> Result<()> {
    let (env, client) = setup(10, 10).await?;
    env.etcd()?.stop()?;
    env.zookeeper()?.stop()?;
    let cb = Controller::start(&env, "cb", "cluster-a", &[]).await?;
    deploy_api_x(&client, CATALOGS).await?;

    // Consul, which is up, gets its entries meanwhile.
    ConsulView::new(env.consul()?.url())?
        .wait_passing("api_x", &BOTH, WAIT)
        .await
        .with_context(|| cb.log())?;
    for name in ["etcd-plain", "zk-plain"] {
        let c = catalog_condition(&client, name, "Reachable", "False")
            .await
            .with_context(|| cb.log())?;
        println!("{name}: Reachable=False {}: {}", c.reason, c.message);
        ensure!(c.reason == "Unreachable", "{name}: {c:?}");
        let up = cb
            .metric(
                "catalog_bridge_catalog_up",
                &[&format!("catalog=\"{name}\"")],
            )
            .await?;
        ensure!(up == 0.0, "{name}: catalog_up is {up} while it is down");
    }
    let events = localenv::eventually(
        "an Unreachable Event per catalog that is down",
        WAIT,
        || async {
            let e = catalog_events(&env, "Unreachable")?;
            Ok((e.len() == 5).then_some(e))
        },
    )
    .await?;
    println!("Events:\n{}", events.join("\n"));

    let back = Instant::now();
    env.etcd()?.start_again().await?;
    env.zookeeper()?.start_again().await?;
    wait_everywhere(&env, &BOTH)
        .await
        .with_context(|| cb.log())?;
    println!(
        "etcd and ZooKeeper started: every layout in place {:?} later",
        back.elapsed()
    );
    for name in ["etcd-plain", "zk-plain"] {
        catalog_condition(&client, name, "Reachable", "True").await?;
    }
    Ok(())
}

/// The API server with the CRDs, a single etcd and a standalone ZooKeeper of the test's own.
async fn etcd_and_zookeeper() -> Result<(Env, kube::Client)> {
    let env = Env::builder()
        .controller_manager()
        .etcd()
        .zookeeper()
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    Ok((env, client))
}

/// The keys of `/services/api_x/providers/` in etcd and the lease each is put with.
fn etcd_leases(env: &Env) -> Result<Vec<(String, i64)>> {
    let out = env.etcd()?.etcdctl(&[
        "get",
        "--prefix",
        "/services/api_x/providers/",
        "--write-out=json",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["kvs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|kv| {
            (
                kv["key"].as_str().unwrap_or_default().to_string(),
                kv["lease"].as_i64().unwrap_or(0),
            )
        })
        .collect())
}

/// The children of `/services/api_x/providers` and the session that owns each.
async fn zk_owners(connect: &str) -> Result<Vec<(String, i64)>> {
    let zk = zookeeper_client::Client::connect(connect).await?;
    let (children, _) = match zk.get_children("/services/api_x/providers").await {
        Ok(c) => c,
        Err(zookeeper_client::Error::NoNode) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for c in children {
        let (_, stat) = zk
            .get_data(&format!("/services/api_x/providers/{c}"))
            .await?;
        out.push((c, stat.ephemeral_owner));
    }
    Ok(out)
}

fn one_id(what: &str, entries: &[(String, i64)]) -> Result<i64> {
    let ids: BTreeSet<i64> = entries.iter().map(|(_, id)| *id).collect();
    match (entries.len(), ids.len()) {
        (2, 1) => ids.first().copied().context("one id"),
        _ => anyhow::bail!("{what}: not two entries of one owner: {entries:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_etcd_lease_and_an_expired_zookeeper_session_are_replaced_and_every_entry_comes_back()
-> Result<()> {
    const ZK_SESSION: Duration = Duration::from_secs(4);
    let (env, client) = etcd_and_zookeeper().await?;
    // The controller reaches ZooKeeper through a proxy that can be cut: a partition of this
    // controller only, while the server goes on (and expires the session).
    let zk = env.zookeeper()?.connect_string();
    let proxy = Proxy::start(zk.parse().context("the ZooKeeper address")?).await?;
    kubectl_apply(
        &env,
        &catalog(
            "etcd",
            json!({"etcd": {"endpoints": [env.etcd()?.endpoint()], "layout": "plain",
                            "leaseTTLSeconds": 10}}),
        ),
    )?;
    kubectl_apply(
        &env,
        &catalog(
            "zk",
            json!({"zookeeper": {"connect": format!("127.0.0.1:{}", proxy.port()),
                                 "layout": "plain", "basePath": "/services",
                                 "sessionTimeoutSeconds": ZK_SESSION.as_secs()}}),
        ),
    )?;
    let cb = Controller::start(&env, "cb", "cluster-a", &[]).await?;
    deploy_api_x(&client, "etcd,zk").await?;
    let lease = localenv::eventually("both keys in etcd", WAIT, || async {
        Ok(one_id("etcd", &etcd_leases(&env)?).ok())
    })
    .await
    .with_context(|| cb.log())?;
    let session = localenv::eventually("both nodes in ZooKeeper", WAIT, || async {
        Ok(one_id("zookeeper", &zk_owners(&zk).await?).ok())
    })
    .await
    .with_context(|| cb.log())?;

    // An admin revokes the lease: its keys are gone at once.
    env.etcd()?
        .etcdctl(&["lease", "revoke", &format!("{lease:x}")])?;
    let revoked = Instant::now();
    ensure!(
        etcd_leases(&env)?.is_empty(),
        "the keys went with the lease"
    );
    let again = localenv::eventually("both keys back on a new lease", WAIT, || async {
        Ok(one_id("etcd", &etcd_leases(&env)?).ok())
    })
    .await
    .with_context(|| cb.log())?;
    println!(
        "etcd lease {lease:x} revoked: both keys back on lease {again:x} after {:?}",
        revoked.elapsed()
    );
    ensure!(again != lease, "a new lease was granted");

    // A partition longer than the session timeout: the server expires the session and its
    // nodes; when the partition ends, the old session is refused and a new one writes them.
    proxy.cut();
    let cut = Instant::now();
    localenv::eventually("the session's nodes expired", WAIT, || async {
        Ok(zk_owners(&zk).await?.is_empty().then_some(()))
    })
    .await?;
    println!(
        "partitioned: the server expired the session after {:?}",
        cut.elapsed()
    );
    proxy.restore();
    let restored = Instant::now();
    let new_session = localenv::eventually("both nodes back in a new session", WAIT, || async {
        Ok(one_id("zookeeper", &zk_owners(&zk).await?).ok())
    })
    .await
    .with_context(|| cb.log())?;
    println!(
        "ZooKeeper session {session:x} expired: both nodes back in session {new_session:x} {:?} after the partition ended",
        restored.elapsed()
    );
    ensure!(new_session != session, "a new session was opened");
    for name in ["etcd", "zk"] {
        catalog_condition(&client, name, "Ready", "True").await?;
    }
    Ok(())
}

/// A Secret with `username` and `password` in namespace `default`.
fn credentials(env: &Env, name: &str, username: &str, password: &str) -> Result<String> {
    kubectl_apply(
        env,
        &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": "default"},
                "stringData": {"username": username, "password": password}}),
    )
}

/// Credentials from Secrets, as users give them: an etcd user and password against an etcd
/// with authentication on, a ZooKeeper digest against a base path only that identity may read.
/// Wrong ones say so (`Unauthorized`, one Warning Event with the catalog's words); the Secret
/// mended, the entries arrive without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_secrets_and_wrong_ones_say_so_until_the_secret_is_mended()
-> Result<()> {
    const ROOT: &str = "--user=root:rootpw";
    let (env, client) = etcd_and_zookeeper().await?;
    let etcd = env.etcd()?;
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "catalog-writer"],
        &[
            "role",
            "grant-permission",
            "catalog-writer",
            "--prefix=true",
            "readwrite",
            "/",
        ],
        &["user", "add", "bridge:s3cret"],
        &["user", "grant-role", "bridge", "catalog-writer"],
        &["auth", "enable"],
    ] {
        etcd.etcdctl(args)?;
    }
    let zk = env.zookeeper()?.connect_string();
    localenv::python(
        "import sys\n\
         from kazoo.client import KazooClient\n\
         from kazoo.security import make_digest_acl\n\
         zk = KazooClient(hosts=sys.argv[1], auth_data=[('digest', 'bridge:s3cret')]); zk.start(timeout=15)\n\
         zk.create('/locked/services', b'', acl=[make_digest_acl('bridge', 's3cret', all=True)], makepath=True)\n\
         zk.stop()\n",
        &[&zk],
    )?;
    credentials(&env, "etcd-creds", "bridge", "wrong")?;
    credentials(&env, "zk-creds", "bridge", "wrong")?;
    kubectl_apply(
        &env,
        &catalog(
            "etcd",
            json!({"etcd": {"endpoints": [etcd.endpoint()], "layout": "plain",
                            "credentialsSecretRef": {"namespace": "default", "name": "etcd-creds"}}}),
        ),
    )?;
    kubectl_apply(
        &env,
        &catalog(
            "zk",
            json!({"zookeeper": {"connect": zk, "layout": "plain", "basePath": "/locked/services",
                                 "digestSecretRef": {"namespace": "default", "name": "zk-creds"}}}),
        ),
    )?;
    let cb = Controller::start(&env, "cb", "cluster-a", &[]).await?;
    deploy_api_x(&client, "etcd,zk").await?;

    for name in ["etcd", "zk"] {
        let c = catalog_condition(&client, name, "Ready", "False")
            .await
            .with_context(|| cb.log())?;
        println!(
            "{name} with a wrong password: Ready=False {}: {}",
            c.reason, c.message
        );
        ensure!(c.reason == "Unauthorized", "{name}: {c:?}");
    }
    let events = localenv::eventually("an Unauthorized Event per catalog", WAIT, || async {
        let e = catalog_events(&env, "Unauthorized")?;
        Ok((e.len() == 2).then_some(e))
    })
    .await
    .with_context(|| cb.log())?;
    println!("Events:\n{}", events.join("\n"));
    ensure!(
        events
            .iter()
            .any(|e| e.starts_with("etcd ") && e.contains("authentication failed")),
        "etcd's own words: {events:?}"
    );

    credentials(&env, "etcd-creds", "bridge", "s3cret")?;
    credentials(&env, "zk-creds", "bridge", "s3cret")?;
    let mended = Instant::now();
    localenv::eventually("both keys in etcd, written as bridge", WAIT, || async {
        let out = etcd.etcdctl(&[
            ROOT,
            "get",
            "--prefix",
            "--print-value-only",
            "/services/api_x/providers/",
        ])?;
        let got: BTreeSet<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        Ok((got == BOTH.into_iter().collect()).then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    let acls = localenv::eventually("both nodes in ZooKeeper, owned by the digest identity", WAIT, || async {
        let out = localenv::python(
            "import sys, json\n\
             from kazoo.client import KazooClient\n\
             zk = KazooClient(hosts=sys.argv[1], auth_data=[('digest', 'bridge:s3cret')]); zk.start(timeout=15)\n\
             p = '/locked/services/api_x/providers'\n\
             kids = sorted(zk.get_children(p)) if zk.exists(p) else []\n\
             acls = sorted(set(a.id.id.split(':')[0] for k in kids for a in zk.get_acls(p + '/' + k)[0]))\n\
             print(json.dumps({'kids': kids, 'acls': acls}))\n\
             zk.stop()\n",
            &[&zk],
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        Ok((v["kids"] == json!(BOTH)).then_some(v["acls"].clone()))
    })
    .await
    .with_context(|| cb.log())?;
    println!(
        "Secrets mended: entries in etcd and ZooKeeper {:?} later",
        mended.elapsed()
    );
    ensure!(acls == json!(["anyone", "bridge"]), "{acls}");
    for name in ["etcd", "zk"] {
        catalog_condition(&client, name, "Ready", "True").await?;
    }
    Ok(())
}
