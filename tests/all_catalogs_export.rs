//! One annotated Service in all three catalogs at once, each in the layouts its users' clients
//! read, checked with those clients (py-consul's HTTP API, etcdctl, kazoo), through readiness
//! flips, controller restarts and catalog restarts; and all three reached over TLS with client
//! certificates, from Secrets.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use localenv::{Env, workload};
use serde_json::{Value, json};
use support::everywhere::{CATALOGS, WAIT, answers, catalog, setup, wait_everywhere};
use support::{
    ConsulView, Controller, annotations, catalog_condition, consul_catalog,
    consul_catalog_with_token, deploy, deploy_api_x, kubectl_apply,
};

#[tokio::test]
async fn one_service_in_every_catalog_and_layout_follows_readiness() -> Result<()> {
    let (env, client) = setup(15, 10).await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy_api_x(&client, CATALOGS)
        .await
        .with_context(|| cb.log())?;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| cb.log())?;

    // `catalog-bridge query` gives the same answer from each, by name or by URL.
    let (etcd, zk) = (env.etcd()?.endpoint(), env.zookeeper()?.connect_string());
    let mut targets: Vec<String> = CATALOGS.split(',').map(str::to_string).collect();
    targets.extend([
        format!("etcd://{etcd}?layout=naming"),
        format!("etcd://{etcd}?layout=coredns&zone=bridge.local"),
        format!("zk://{zk}/curator?layout=curator"),
        format!("zk://{zk}"),
    ]);
    for target in targets {
        let out = localenv::run_tool(
            std::process::Command::new(support::controller_bin()?)
                .env("KUBECONFIG", env.kube()?.kubeconfig_path())
                .args(["query", &target, "api_x"]),
        )?;
        assert_eq!(
            out.trim(),
            "api_x @ 10.1.0.1:8080 & 10.1.0.2:8080",
            "query {target}"
        );
    }

    let t = Instant::now();
    workload::set_pod_ready(&client, "shop", "api-x-2", false).await?;
    wait_everywhere(&env, &["10.1.0.1:8080"]).await?;
    println!(
        "unready -> gone from all six catalogs/layouts in {:?}",
        t.elapsed()
    );
    workload::set_pod_ready(&client, "shop", "api-x-2", true).await?;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"]).await?;

    // Curator itself reads the curator layout (a JVM per read, so once, not in every poll).
    let curator: Vec<String> = env
        .zookeeper()?
        .curator_instances(&zk, "/curator", "api_x")?
        .into_iter()
        .map(|i| i.split_once(' ').map_or(i.clone(), |(_, a)| a.to_string()))
        .collect();
    assert_eq!(
        curator,
        ["10.1.0.1:8080", "10.1.0.2:8080"],
        "ServiceDiscovery.queryForInstances(\"api_x\")"
    );
    Ok(())
}

/// Revisions and zxids of what the controller wrote, to prove a restart rewrote nothing.
async fn fingerprints(env: &Env) -> Result<String> {
    fingerprints_of(
        env,
        &["/services/", "api_x/", "/skydns/"],
        &["/services/api_x/providers", "/curator/api_x"],
    )
    .await
}

/// [`fingerprints`] of the keys under `prefixes` and the children of `dirs`.
async fn fingerprints_of(env: &Env, prefixes: &[&str], dirs: &[&str]) -> Result<String> {
    let etcd = env.etcd()?;
    let mut out = String::new();
    for prefix in prefixes {
        let v: Value =
            serde_json::from_str(&etcd.etcdctl(&["get", "--prefix", prefix, "-w", "json"])?)?;
        for kv in v["kvs"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!(
                "{} {} {} {}\n",
                kv["key"], kv["mod_revision"], kv["create_revision"], kv["lease"]
            ));
        }
    }
    let zk = localenv::python(
        "import sys\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         for base in sys.argv[2:]:\n\
         \x20   for c in sorted(zk.get_children(base)):\n\
         \x20       s = zk.exists(base + '/' + c)\n\
         \x20       print(base, c, s.czxid, s.mzxid, s.ephemeralOwner)\n\
         zk.stop()\n",
        &[&[env.zookeeper()?.connect_string().as_str()], dirs].concat(),
    )?;
    out.push_str(&zk);
    Ok(out)
}

#[tokio::test]
async fn a_restart_or_handoff_keeps_every_entry_and_rewrites_none() -> Result<()> {
    // The default etcd lease TTL (15 s), ZooKeeper session timeout (10 s) and leader Lease
    // duration (6 s): a standby takes over before the catalogs drop the crashed one's entries.
    let (env, client) = setup(15, 10).await?;
    let args = ["--drift-interval=1s"];
    let a = Controller::start(&env, "cb-a", "cluster-a", &args).await?;
    deploy_api_x(&client, CATALOGS).await?;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| a.log())?;
    let before = fingerprints(&env).await?;

    // A crash: the lease and the session outlive the process; the standby (the chart runs two
    // replicas) takes them over. Started before the crash, so its own start-up does not eat
    // into the ZooKeeper session's 10 s on a loaded machine.
    let b = Controller::start(&env, "cb-b", "cluster-a", &args).await?;
    let crash = Instant::now();
    a.process.kill()?;
    localenv::eventually("the standby to lead", WAIT, || async {
        Ok(b.is_leader().await.then_some(()))
    })
    .await?;
    println!("the standby led {:?} after the crash", crash.elapsed());
    tokio::time::sleep(Duration::from_secs(4)).await;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| b.log())?;
    assert_eq!(
        fingerprints(&env).await?,
        before,
        "nothing rewritten, no lease or session replaced"
    );
    let writes = b
        .metric("catalog_bridge_backend_operations_total", &[])
        .await?;
    assert_eq!(writes, 0.0, "{}", b.metrics().await?);
    Ok(())
}

/// `ip:port` of the instances of `name` under ZooKeeper path `dir` (plain layout children, or
/// curator instance JSON), read with kazoo.
fn zk_children(env: &Env, dir: &str) -> Result<Vec<String>> {
    let out = localenv::python(
        "import sys, json\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         d = sys.argv[2]\n\
         kids = zk.get_children(d) if zk.exists(d) else []\n\
         out = []\n\
         for c in kids:\n\
         \x20   data = zk.get(d + '/' + c)[0]\n\
         \x20   out.append(c if not data else '%(address)s:%(port)d' % json.loads(data))\n\
         print(json.dumps(sorted(out)))\n\
         zk.stop()\n",
        &[&env.zookeeper()?.connect_string(), dir],
    )?;
    Ok(serde_json::from_str(out.trim())?)
}

#[tokio::test]
async fn a_catalog_moved_elsewhere_or_deleted_leaves_nothing_behind_and_a_change_that_moves_nothing_rewrites_nothing()
-> Result<()> {
    let (env, client) = setup(15, 10).await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &[]).await?;
    deploy_api_x(&client, CATALOGS).await?;
    let both = ["10.1.0.1:8080", "10.1.0.2:8080"];
    wait_everywhere(&env, &both)
        .await
        .with_context(|| cb.log())?;
    let consul = ConsulView::new(env.consul()?.url())?;
    let etcd = env.etcd()?;
    let (endpoint, zk) = (etcd.endpoint(), env.zookeeper()?.connect_string());
    // Revisions and zxids of the catalogs whose change moves nothing (etcd-naming, zk-plain)
    // and of one left alone (etcd-coredns).
    let unmoved = || {
        fingerprints_of(
            &env,
            &["api_x/", "/skydns/"],
            &["/services/api_x/providers"],
        )
    };
    let before = unmoved().await?;
    ensure!(before.lines().count() == 6, "fingerprints {before}");

    // The etcd lease and the ZooKeeper session stay this catalog's, so nothing left at the old
    // location would ever expire: it has to be removed.
    // Consul's move goes through a spec that cannot be used at first (its token Secret does
    // not exist yet): what is left to remove waits for the writer that can.
    kubectl_apply(
        &env,
        &consul_catalog_with_token(
            "consul",
            &[env.consul()?.url()],
            "k8s-moved",
            "default",
            "consul-token",
        ),
    )?;
    let missing = catalog_condition(&client, "consul", "Ready", "False")
        .await
        .with_context(|| cb.log())?;
    assert_eq!(missing.reason, "SecretNotFound", "{missing:?}");
    kubectl_apply(
        &env,
        &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "consul-token", "namespace": "default"},
                "stringData": {"token": "unused-without-acls"}}),
    )?;
    kubectl_apply(
        &env,
        &catalog(
            "etcd-plain",
            json!({"etcd": {"endpoints": [endpoint], "layout": "plain", "basePath": "/moved",
                            "leaseTTLSeconds": 15}}),
        ),
    )?;
    kubectl_apply(
        &env,
        &catalog(
            "zk-curator",
            json!({"zookeeper": {"connect": zk, "layout": "curator", "basePath": "/moved-curator",
                                 "sessionTimeoutSeconds": 10}}),
        ),
    )?;
    // Written differently, the same place: the same endpoint with its scheme, the same ensemble.
    kubectl_apply(
        &env,
        &catalog(
            "etcd-naming",
            json!({"etcd": {"endpoints": [format!("http://{endpoint}")], "layout": "naming",
                            "leaseTTLSeconds": 15, "zone": "bridge.local"}}),
        ),
    )?;
    kubectl_apply(
        &env,
        &catalog(
            "zk-plain",
            json!({"zookeeper": {"connect": format!("{zk},{zk}"), "layout": "plain",
                                 "basePath": "/services", "sessionTimeoutSeconds": 10}}),
        ),
    )?;

    localenv::eventually("every moved catalog to hold its entries at the new location only", WAIT, || async {
        let nodes = consul.nodes().await?;
        let moved_node = consul.node_services("k8s-moved").await?.len();
        let old_etcd = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/services/api_x/"])?;
        let new_etcd = etcd.etcdctl(&["get", "--prefix", "--print-value-only", "/moved/api_x/providers/"])?;
        let mut new_etcd: Vec<&str> = new_etcd.lines().filter(|l| !l.is_empty()).collect();
        new_etcd.sort();
        let old_zk = zk_children(&env, "/curator/api_x")?;
        let new_zk = zk_children(&env, "/moved-curator/api_x")?;
        let state = format!(
            "consul nodes {nodes:?}, {moved_node} services on k8s-moved; etcd old {old_etcd:?} new {new_etcd:?}; \
             zk old {old_zk:?} new {new_zk:?}"
        );
        if !nodes.iter().any(|n| n == "k8s-test")
            && moved_node == 2
            && old_etcd.trim().is_empty()
            && new_etcd == both
            && old_zk.is_empty()
            && new_zk == both
        {
            Ok(Some(()))
        } else {
            anyhow::bail!(state)
        }
    })
    .await
    .with_context(|| cb.log())?;
    assert_eq!(consul.passing("api_x").await?, both);

    // The catalogs that did not move kept every entry as it was: same revisions and zxids,
    // same lease and session.
    wait_everywhere_but_moved(&env, &both).await?;
    assert_eq!(
        unmoved().await?,
        before,
        "nothing rewritten where nothing moved"
    );

    // Deleting an ExternalCatalog removes what it wrote, as deleting a Service does; Consul's
    // node goes once empty.
    for name in ["consul", "etcd-plain", "zk-curator"] {
        env.kube()?.kubectl(&["delete", "externalcatalog", name])?;
    }
    localenv::eventually(
        "the deleted catalogs to hold nothing of ours",
        WAIT,
        || async {
            let nodes = consul.nodes().await?;
            let etcd_left = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/moved/"])?;
            let zk_left = zk_children(&env, "/moved-curator/api_x")?;
            if !nodes.iter().any(|n| n == "k8s-moved")
                && etcd_left.trim().is_empty()
                && zk_left.is_empty()
            {
                Ok(Some(()))
            } else {
                anyhow::bail!("consul nodes {nodes:?}; etcd {etcd_left:?}; zk {zk_left:?}")
            }
        },
    )
    .await
    .with_context(|| cb.log())?;
    assert!(consul.passing("api_x").await?.is_empty());
    assert_eq!(
        unmoved().await?,
        before,
        "the other catalogs keep their entries"
    );
    Ok(())
}

/// [`wait_everywhere`] for the catalogs the move test leaves in place.
async fn wait_everywhere_but_moved(env: &Env, want: &[&str]) -> Result<()> {
    localenv::eventually("the unmoved catalogs to answer", WAIT, || async {
        let a = answers(env).await?;
        let off: Vec<_> = a
            .iter()
            .filter(|(name, v)| {
                ["etcd-naming", "zk-plain", "etcd-coredns"].contains(name) && v != want
            })
            .collect();
        if off.is_empty() {
            Ok(Some(()))
        } else {
            anyhow::bail!("{off:?}")
        }
    })
    .await
}

#[tokio::test]
async fn a_dead_controller_entries_expire_with_its_lease_and_session() -> Result<()> {
    let (env, client) = setup(5, 4).await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &[]).await?;
    deploy(
        &client,
        "shop",
        "api-x",
        1,
        1,
        annotations(&[
            ("catalog-bridge.io/export", "etcd-plain,zk-plain"),
            ("catalog-bridge.io/name", "api_x"),
        ]),
    )
    .await?;
    localenv::eventually("etcd and ZooKeeper hold api_x", WAIT, || async {
        let a = answers(&env).await?;
        Ok(a.iter()
            .filter(|(c, v)| (*c == "etcd-plain" || *c == "zk-plain") && v.len() == 1)
            .count()
            .eq(&2)
            .then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    let t = Instant::now();
    cb.process.kill()?;
    let (mut etcd_gone, mut zk_gone) = (None, None);
    while (etcd_gone.is_none() || zk_gone.is_none()) && t.elapsed() < Duration::from_secs(40) {
        let a = answers(&env).await?;
        let empty = |c: &str| a.iter().any(|(n, v)| *n == c && v.is_empty());
        if etcd_gone.is_none() && empty("etcd-plain") {
            etcd_gone = Some(t.elapsed());
        }
        if zk_gone.is_none() && empty("zk-plain") {
            zk_gone = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "controller killed -> etcd entries gone after {etcd_gone:?} (lease TTL 5 s), ZooKeeper entries after {zk_gone:?} (session timeout 4 s)"
    );
    let etcd_gone = etcd_gone.context("etcd entries outlived their lease")?;
    let zk_gone = zk_gone.context("ZooKeeper entries outlived their session")?;
    assert!(
        etcd_gone >= Duration::from_secs(2),
        "not before the lease could expire: {etcd_gone:?}"
    );
    assert!(
        zk_gone >= Duration::from_secs(2),
        "not before the session could expire: {zk_gone:?}"
    );
    Ok(())
}

#[tokio::test]
async fn catalog_restarts_are_survived_and_repaired() -> Result<()> {
    let (env, client) = setup(5, 4).await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy_api_x(&client, CATALOGS).await?;
    let both = ["10.1.0.1:8080", "10.1.0.2:8080"];
    wait_everywhere(&env, &both)
        .await
        .with_context(|| cb.log())?;

    // etcd away for longer than the lease TTL: the lease is lost, re-granted, keys re-put.
    env.etcd()?.stop()?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    env.etcd()?.start_again().await?;
    let t = Instant::now();
    wait_everywhere(&env, &both)
        .await
        .with_context(|| cb.log())?;
    println!(
        "etcd back after 7 s away -> entries back in {:?}",
        t.elapsed()
    );

    // ZooKeeper away for longer than the session timeout: a new session re-creates the nodes.
    env.zookeeper()?.stop()?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    env.zookeeper()?.start_again().await?;
    let t = Instant::now();
    wait_everywhere(&env, &both)
        .await
        .with_context(|| cb.log())?;
    println!(
        "ZooKeeper back after its session expired -> entries back in {:?}",
        t.elapsed()
    );

    // And everything still follows readiness.
    workload::set_pod_ready(&client, "shop", "api-x-1", false).await?;
    wait_everywhere(&env, &["10.1.0.2:8080"]).await?;
    Ok(())
}

#[tokio::test]
async fn foreign_entries_survive_and_removing_the_export_removes_exactly_ours() -> Result<()> {
    let (env, client) = setup(15, 10).await?;
    let etcd = env.etcd()?;
    let zk = env.zookeeper()?.connect_string();
    // Entries someone else put in the same places.
    etcd.etcdctl(&[
        "put",
        "/services/api_x/providers/192.0.2.7:8080",
        "192.0.2.7:8080",
    ])?;
    etcd.etcdctl(&[
        "put",
        "api_x/192.0.2.7:8080",
        r#"{"Op":0,"Addr":"192.0.2.7:8080"}"#,
    ])?;
    support::kazoo_create(&zk, "/services/api_x/providers/192.0.2.7:8080", "{}")?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy_api_x(&client, "etcd-plain,etcd-naming,zk-plain").await?;
    let check = |want: &'static [&'static str]| {
        let env = &env;
        async move {
            localenv::eventually(
                &format!("etcd and ZooKeeper to answer {want:?}"),
                WAIT,
                || async {
                    let a = answers(env).await?;
                    let ok = a
                        .iter()
                        .filter(|(c, _)| matches!(*c, "etcd-plain" | "etcd-naming" | "zk-plain"))
                        .all(|(_, v)| v == want);
                    if ok {
                        Ok(Some(()))
                    } else {
                        anyhow::bail!("{a:?}")
                    }
                },
            )
            .await
        }
    };
    check(&["10.1.0.1:8080", "10.1.0.2:8080", "192.0.2.7:8080"])
        .await
        .with_context(|| cb.log())?;

    // Removing the annotation removes exactly our entries.
    support::annotate(
        &client,
        "shop",
        "api-x",
        json!({"catalog-bridge.io/export": null}),
    )
    .await?;
    check(&["192.0.2.7:8080"]).await.with_context(|| cb.log())?;
    // Deleting the Service of a second export does the same.
    deploy(
        &client,
        "shop",
        "api-y",
        2,
        1,
        annotations(&[
            ("catalog-bridge.io/export", "etcd-plain,zk-plain"),
            ("catalog-bridge.io/name", "api_x"),
        ]),
    )
    .await?;
    localenv::eventually("api-y exported", WAIT, || async {
        let a = answers(&env).await?;
        Ok(a.iter()
            .any(|(c, v)| *c == "zk-plain" && v.len() == 2)
            .then_some(()))
    })
    .await?;
    kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "shop")
        .delete("api-y", &Default::default())
        .await?;
    check(&["192.0.2.7:8080"]).await?;
    Ok(())
}

#[tokio::test]
async fn cleanup_removes_every_entry_of_this_owner_after_an_uninstall() -> Result<()> {
    let (env, client) = setup(30, 30).await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &[]).await?;
    deploy_api_x(&client, CATALOGS).await?;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"])
        .await
        .with_context(|| cb.log())?;
    let run = |args: &[&str]| {
        localenv::run_tool(
            std::process::Command::new(support::controller_bin()?)
                .env("KUBECONFIG", env.kube()?.kubeconfig_path())
                .arg("cleanup")
                .args(args),
        )
    };
    // A dry run while the controller still runs counts its ZooKeeper nodes by the session it
    // keeps in its Secret, without attaching to that session (which would take it from the
    // controller): nothing written, nothing moved.
    let before = fingerprints(&env).await?;
    for catalog in ["zk-plain", "zk-curator", "etcd-naming"] {
        let dry = run(&[
            "--catalog",
            catalog,
            "--cluster-id",
            "cluster-a",
            "--dry-run",
        ])?;
        assert!(
            dry.starts_with(&format!("2 entries of owner cluster-a in {catalog}")),
            "{dry}"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        fingerprints(&env).await?,
        before,
        "a dry run changes nothing"
    );
    ensure!(
        !cb.log().contains("gave the session up"),
        "the controller kept its ZooKeeper session:\n{}",
        cb.log()
    );

    // Uninstalled: the controller is gone, its entries stay (the lease and the session live on).
    cb.process.stop()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_everywhere(&env, &["10.1.0.1:8080", "10.1.0.2:8080"]).await?;

    let dry = run(&[
        "--catalog",
        "etcd-plain",
        "--cluster-id",
        "cluster-a",
        "--dry-run",
    ])?;
    assert!(
        dry.starts_with("2 entries of owner cluster-a in etcd-plain"),
        "{dry}"
    );
    let other = run(&["--catalog", "consul", "--cluster-id", "cluster-b"])?;
    assert!(
        other.starts_with("removed 0 entries"),
        "another owner's cleanup touches nothing: {other}"
    );
    for catalog in CATALOGS.split(',') {
        let out = run(&["--catalog", catalog, "--cluster-id", "cluster-a"])?;
        println!("{out}");
        assert!(out.starts_with("removed 2 entries"), "{catalog}: {out}");
        if catalog == "consul" {
            assert!(
                out.contains("deregistered the empty node k8s-test"),
                "the synthetic node goes with its last service: {out}"
            );
        }
    }
    wait_everywhere(&env, &[]).await?;
    let nodes = ConsulView::new(env.consul()?.url())?.nodes().await?;
    assert!(
        !nodes.iter().any(|n| n == "k8s-test"),
        "no empty synthetic node is left behind: {nodes:?}"
    );
    // Nor the owner markers: the owner id may be used by another cluster now.
    let consul_marker = localenv::http_client()?
        .get(format!(
            "{}/v1/kv/catalog-bridge/owners/cluster-a",
            env.consul()?.url()
        ))
        .send()
        .await?
        .status();
    assert_eq!(consul_marker, reqwest::StatusCode::NOT_FOUND);
    let etcd_marker = env.etcd()?.etcdctl(&[
        "get",
        "--prefix",
        "--keys-only",
        "/catalog-bridge.io/owners/",
    ])?;
    assert_eq!(
        etcd_marker.trim(),
        "",
        "etcd owner markers left: {etcd_marker}"
    );
    let zk_marker = localenv::python(
        "import sys\nfrom kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         print(zk.get_children('/catalog-bridge/owners')); zk.stop()\n",
        &[&env.zookeeper()?.connect_string()],
    )?;
    assert_eq!(zk_marker.trim(), "[]", "ZooKeeper owner markers left");
    Ok(())
}

/// Consul (HTTPS only), etcd (TLS only) and ZooKeeper (its secureClientPort) all verify client
/// certificates. The catalogs are declared with the CA and the client certificate in Secrets
/// (`tls.caSecretRef`, and a `kubernetes.io/tls` Secret made by `kubectl create secret tls` as
/// `tls.clientCertSecretRef`): the export reaches all three, each catalog's status names the
/// server it reached, and `catalog-bridge query` reads each back through the same Secrets.
#[tokio::test]
async fn every_catalog_is_reached_over_tls_with_the_ca_and_client_certificate_from_secrets()
-> Result<()> {
    let env = Env::builder()
        .controller_manager()
        .consul_tls()
        .etcd_tls()
        .zookeeper_tls()
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, "catalog-secrets").await?;
    let tls = env.tls()?;
    let kube = env.kube()?;
    let file = |p: &std::path::Path| p.display().to_string();
    kube.kubectl(&[
        "create",
        "secret",
        "generic",
        "catalog-ca",
        "-n",
        "catalog-secrets",
        &format!("--from-file=ca.crt={}", file(&tls.ca_file)),
    ])?;
    kube.kubectl(&[
        "create",
        "secret",
        "tls",
        "catalog-client",
        "-n",
        "catalog-secrets",
        &format!("--cert={}", file(&tls.client_cert_file)),
        &format!("--key={}", file(&tls.client_key_file)),
    ])?;
    let refs = json!({
        "caSecretRef": {"namespace": "catalog-secrets", "name": "catalog-ca"},
        "clientCertSecretRef": {"namespace": "catalog-secrets", "name": "catalog-client"},
    });
    let url = env.consul()?.url();
    let endpoint = env.etcd()?.endpoint();
    let secure = env.zookeeper()?.secure_connect_string()?;
    let mut consul = consul_catalog("consul", std::slice::from_ref(&url), "k8s-test");
    consul["spec"]["consul"]["tls"] = refs.clone();
    kubectl_apply(&env, &consul)?;
    kubectl_apply(
        &env,
        &catalog(
            "etcd",
            json!({"etcd": {"endpoints": [endpoint], "tls": refs}}),
        ),
    )?;
    kubectl_apply(
        &env,
        &catalog("zk", json!({"zookeeper": {"connect": secure, "tls": refs}})),
    )?;
    // An https:// etcd endpoint and no CA: etcd's certificate is checked against the system's
    // roots, here the test CA given as $SSL_CERT_FILE (where the image's bundle would be).
    kubectl_apply(
        &env,
        &catalog(
            "etcd-roots",
            json!({"etcd": {"endpoints": [endpoint], "basePath": "/roots",
                            "tls": {"clientCertSecretRef": refs["clientCertSecretRef"]}}}),
        ),
    )?;
    let ca_file = file(&tls.ca_file);
    let cb = Controller::start_with_env(
        &env,
        "cb",
        "cluster-a",
        &[],
        &[("SSL_CERT_FILE", ca_file.as_str())],
    )
    .await?;
    deploy_api_x(&client, "consul,etcd,zk,etcd-roots").await?;

    // Each catalog's own reader: Consul over HTTPS, etcdctl with the certificates, kazoo on
    // ZooKeeper's plain port.
    ConsulView::with_client(url.clone(), localenv::https_client(tls)?)
        .wait_passing("api_x", &["10.1.0.1:8080", "10.1.0.2:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;
    localenv::eventually("api_x in etcd (twice) and ZooKeeper", WAIT, || async {
        let etcd_at = |base: &str| {
            env.etcd()?.etcdctl(&[
                "get",
                "--prefix",
                "--print-value-only",
                &format!("{base}/api_x/providers/"),
            ])
        };
        let (etcd, roots) = (etcd_at("/services")?, etcd_at("/roots")?);
        let zk = localenv::python(
            "import sys, json\n\
             from kazoo.client import KazooClient\n\
             zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
             p = '/services/api_x/providers'\n\
             print(json.dumps(sorted(zk.get_children(p)) if zk.exists(p) else []))\n\
             zk.stop()\n",
            &[&env.zookeeper()?.connect_string()],
        )?;
        let both = ["10.1.0.1:8080", "10.1.0.2:8080"];
        let in_etcd = both.iter().all(|a| etcd.contains(a) && roots.contains(a));
        let in_zk = serde_json::from_str::<Vec<String>>(zk.trim())? == both;
        Ok((in_etcd && in_zk).then_some(()))
    })
    .await
    .with_context(|| cb.log())?;

    let catalogs: kube::Api<catalog_bridge::api::crd::ExternalCatalog> =
        kube::Api::all(client.clone());
    for (name, server) in [
        ("consul", url.as_str()),
        ("etcd", endpoint.as_str()),
        ("etcd-roots", endpoint.as_str()),
        ("zk", secure.as_str()),
    ] {
        // The status names the TLS server it reached (the probe writes both together; a
        // sync may report Reachable before the first probe answers).
        let authority = server.trim_start_matches("https://");
        localenv::eventually(
            &format!("{name} Reachable, naming {authority}"),
            WAIT,
            || async {
                let status = catalogs.get(name).await?.status.unwrap_or_default();
                let reachable = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Reachable" && c.status == "True");
                let text = serde_json::to_string(&status)?;
                Ok((reachable && text.contains(authority)).then_some(()))
            },
        )
        .await?;
        let answer = localenv::run_tool(
            std::process::Command::new(support::controller_bin()?)
                .env("KUBECONFIG", kube.kubeconfig_path())
                .env("SSL_CERT_FILE", &ca_file)
                .args(["query", name, "api_x"]),
        )?;
        assert_eq!(
            answer.trim(),
            "api_x @ 10.1.0.1:8080 & 10.1.0.2:8080",
            "query {name}, through the catalog's TLS Secrets"
        );
    }
    Ok(())
}
