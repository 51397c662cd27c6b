//! Export to Consul, end to end: the real API server and kube-controller-manager turn Pods into
//! EndpointSlices, the controller binary runs as users run it, and Consul is read back the way
//! discovery clients read it. Each test shows one guarantee of SPEC §6.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams};
use localenv::{Env, workload};
use serde_json::{Value, json};
use support::{
    ConsulView, Controller, annotate, annotations, catalog_condition, consul_catalog,
    consul_catalog_with_token, deploy, deploy_api_x, kubectl_apply,
};

const NODE: &str = "k8s-test";
const WAIT: Duration = Duration::from_secs(30);

/// A cluster (API server + controller manager), Consul, the CRDs, and an ExternalCatalog
/// `consul` pointing at it.
async fn setup() -> Result<(Env, kube::Client, ConsulView)> {
    let env = Env::builder().controller_manager().consul().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    kubectl_apply(
        &env,
        &consul_catalog("consul", &[env.consul()?.url()], NODE),
    )?;
    let consul = ConsulView::new(env.consul()?.url())?;
    Ok((env, client, consul))
}

/// [`setup`], the controller, and `api-x` (2 ready Pods, 10.1.0.1-2) exported as `api_x`
/// and already in Consul.
async fn api_x_exported(args: &[&str]) -> Result<(Env, kube::Client, ConsulView, Controller)> {
    let (env, client, consul) = setup().await?;
    let cb = Controller::start(&env, "cb", "cluster-a", args).await?;
    deploy(&client, "shop", "api-x", 1, 2, export_to_consul("api_x")).await?;
    consul
        .wait_passing("api_x", &API_X, WAIT)
        .await
        .with_context(|| cb.log())?;
    Ok((env, client, consul, cb))
}

const API_X: [&str; 2] = ["10.1.0.1:8080", "10.1.0.2:8080"];

fn export_to_consul(name: &str) -> std::collections::BTreeMap<String, String> {
    annotations(&[
        ("catalog-bridge.io/export", "consul"),
        ("catalog-bridge.io/name", name),
    ])
}

#[tokio::test]
async fn readiness_flip_removes_and_restores_exactly_that_instance() -> Result<()> {
    let (env, client, consul, cb) = api_x_exported(&["--drift-interval=1s"]).await?;
    let before = consul.node_services(NODE).await?;
    let delay = "catalog_bridge_propagation_delay_seconds_count";
    let commits = cb.metric(delay, &[]).await?;
    ensure!(commits >= 1.0, "the first export is timed: {commits}");

    let t = Instant::now();
    workload::set_pod_ready(&client, "shop", "api-x-2", false).await?;
    consul
        .wait_passing("api_x", &["10.1.0.1:8080"], WAIT)
        .await?;
    println!("pod unready -> gone from Consul in {:?}", t.elapsed());

    // A real client sees exactly the ready endpoint.
    let py = localenv::python(
        "import sys, consul\n\
         host, port = sys.argv[1].split(':')\n\
         _, entries = consul.Consul(host=host, port=int(port)).health.service(sys.argv[2], passing=True)\n\
         print(' & '.join(sorted(f\"{e['Service']['Address']}:{e['Service']['Port']}\" for e in entries)))\n",
        &[&env.consul()?.address(), "api_x"],
    )?;
    assert_eq!(py.trim(), "10.1.0.1:8080");

    let t = Instant::now();
    workload::set_pod_ready(&client, "shop", "api-x-2", true).await?;
    consul.wait_passing("api_x", &API_X, WAIT).await?;
    println!("pod ready -> back in Consul in {:?}", t.elapsed());

    // The other instance was never rewritten.
    let after = consul.node_services(NODE).await?;
    let untouched: Vec<_> = before
        .iter()
        .filter(|(_, (_, _, meta))| meta["k8s-service"] == "api-x")
        .filter(|(id, v)| after.get(*id) == Some(v))
        .collect();
    assert_eq!(
        untouched.len(),
        1,
        "exactly the flipped instance changed: {before:?} -> {after:?}"
    );
    // Each flip's commit is timed from the change.
    let timed = cb.metric(delay, &[]).await?;
    ensure!(
        timed >= commits + 2.0,
        "two more commits timed: {commits} -> {timed}"
    );
    Ok(())
}

#[tokio::test]
async fn an_unchanged_restart_writes_nothing_to_consul() -> Result<()> {
    let (env, client, consul) = setup().await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy(&client, "shop", "api-x", 1, 3, export_to_consul("api_x")).await?;
    consul
        .wait_passing(
            "api_x",
            &["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"],
            WAIT,
        )
        .await?;
    let services = consul.node_services(NODE).await?;
    let checks = consul.node_checks(NODE).await?;

    cb.process.stop()?;
    let cb2 = Controller::start(&env, "cb2", "cluster-a", &["--drift-interval=1s"]).await?;
    localenv::eventually("the new process to lead", WAIT, || async {
        Ok(cb2.is_leader().await.then_some(()))
    })
    .await?;
    // Drift checks pass (a read each, every second).
    let reads = localenv::eventually("two drift checks", WAIT, || async {
        let reads = cb2
            .metric(
                "catalog_bridge_backend_requests_total",
                &["op=\"read\"", "result=\"ok\""],
            )
            .await?;
        Ok((reads >= 2.0).then_some(reads))
    })
    .await
    .with_context(|| cb2.log())?;
    println!("{reads} reads of the catalog");
    assert_eq!(
        consul.node_services(NODE).await?,
        services,
        "no service rewritten or removed"
    );
    assert_eq!(
        consul.node_checks(NODE).await?,
        checks,
        "no check rewritten or removed"
    );
    let writes = cb2
        .metric("catalog_bridge_backend_operations_total", &[])
        .await?;
    assert_eq!(
        writes,
        0.0,
        "the restarted controller wrote nothing:\n{}",
        cb2.metrics().await?
    );
    Ok(())
}

#[tokio::test]
async fn entries_of_other_owners_and_hand_made_ones_are_never_touched() -> Result<()> {
    let (env, client, consul) = setup().await?;
    consul
        .register(NODE, "handmade", "api_x", json!({}))
        .await?;
    consul
        .register(
            NODE,
            "other-cluster",
            "api_x",
            json!({"catalog-bridge-owner": "cluster-b"}),
        )
        .await?;
    consul
        .register("elsewhere", "legacy", "api_x", json!({}))
        .await?;
    let foreign = |all: &std::collections::BTreeMap<String, (u64, u64, Value)>| {
        all.iter()
            .filter(|(id, _)| *id == "handmade" || *id == "other-cluster")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    let before = foreign(&consul.node_services(NODE).await?);
    assert_eq!(before.len(), 2);

    let _cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy(&client, "shop", "api-x", 1, 2, export_to_consul("api_x")).await?;
    localenv::eventually("our two instances", WAIT, || async {
        let n = consul
            .node_services(NODE)
            .await?
            .values()
            .filter(|(_, _, m)| m["catalog-bridge-owner"] == "cluster-a")
            .count();
        Ok((n == 2).then_some(()))
    })
    .await?;
    // Remove our export: exactly our entries go.
    annotate(
        &client,
        "shop",
        "api-x",
        json!({"catalog-bridge.io/export": null}),
    )
    .await?;
    localenv::eventually("our instances gone", WAIT, || async {
        let n = consul
            .node_services(NODE)
            .await?
            .values()
            .filter(|(_, _, m)| m["catalog-bridge-owner"] == "cluster-a")
            .count();
        Ok((n == 0).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        foreign(&consul.node_services(NODE).await?),
        before,
        "foreign entries unchanged"
    );
    assert!(
        consul
            .node_services("elsewhere")
            .await?
            .contains_key("legacy")
    );
    Ok(())
}

#[tokio::test]
async fn consul_down_at_start_is_reported_and_converges_when_it_comes() -> Result<()> {
    let (env, client, consul) = setup().await?;
    let consul_peer = env.consul()?;
    consul_peer.stop()?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy(&client, "shop", "api-x", 1, 2, export_to_consul("api_x")).await?;

    let down = catalog_condition(&client, "consul", "Reachable", "False").await?;
    let message = format!("{}: {}", down.reason, down.message);
    println!("while Consul is down: {message}");
    assert!(
        message.contains(&consul_peer.address()),
        "the condition names the address: {message}"
    );
    assert!(cb.process.is_running(), "the controller keeps running");
    assert_eq!(
        cb.metric("catalog_bridge_catalog_up", &["catalog=\"consul\""])
            .await?,
        0.0
    );

    consul_peer.start_again().await?;
    consul
        .wait_passing("api_x", &API_X, Duration::from_secs(60))
        .await?;
    catalog_condition(&client, "consul", "Reachable", "True").await?;
    Ok(())
}

#[tokio::test]
async fn a_consul_that_forgot_everything_is_repaired() -> Result<()> {
    let (env, _client, consul, cb) = api_x_exported(&["--drift-interval=1s"]).await?;
    env.consul()?.stop()?;
    env.consul()?.start_again().await?;
    let t = Instant::now();
    consul.wait_passing("api_x", &API_X, WAIT).await?;
    println!("Consul restarted empty -> repaired in {:?}", t.elapsed());
    let repaired = cb.metric("catalog_bridge_drift_repairs_total", &[]).await?;
    assert!(repaired >= 2.0, "the drift was counted: {repaired}");
    Ok(())
}

#[tokio::test]
async fn two_replicas_one_writer_and_a_takeover_without_deletions() -> Result<()> {
    let (env, client, consul) = setup().await?;
    let args = ["--drift-interval=1s", "--lease-duration=3s"];
    let a = Controller::start(&env, "cb-a", "cluster-a", &args).await?;
    let b = Controller::start(&env, "cb-b", "cluster-a", &args).await?;
    deploy(&client, "shop", "api-x", 1, 2, export_to_consul("api_x")).await?;
    consul.wait_passing("api_x", &API_X, WAIT).await?;
    // Exactly one leader (two scrapes: each may fail once on a loaded machine).
    let a_leads = localenv::eventually("exactly one leader", WAIT, || async {
        let (x, y) = (a.is_leader().await, b.is_leader().await);
        Ok((x != y).then_some(x))
    })
    .await?;
    let (leader, follower) = if a_leads { (a, b) } else { (b, a) };
    assert_eq!(
        follower
            .metric("catalog_bridge_backend_operations_total", &[])
            .await?,
        0.0,
        "the follower writes nothing"
    );
    let before = consul.node_services(NODE).await?;

    // Watch Consul during the handover: the instances must never disappear.
    let watcher = {
        let consul = ConsulView::new(consul.url.clone())?;
        tokio::spawn(async move {
            let mut min = usize::MAX;
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(p) = consul.passing("api_x").await {
                    min = min.min(p.len());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            min
        })
    };
    let t = Instant::now();
    leader.process.kill()?;
    localenv::eventually("the follower to take over", WAIT, || async {
        Ok(follower.is_leader().await.then_some(()))
    })
    .await?;
    println!("leader killed -> follower leads in {:?}", t.elapsed());
    let min = watcher.await?;
    assert_eq!(
        min, 2,
        "the instances stayed in Consul throughout the handover"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        consul.node_services(NODE).await?,
        before,
        "the new leader rewrote nothing"
    );

    // And it does write: a change after the handover reaches Consul.
    workload::set_pod_ready(&client, "shop", "api-x-1", false).await?;
    consul
        .wait_passing("api_x", &["10.1.0.2:8080"], WAIT)
        .await?;
    Ok(())
}

#[tokio::test]
async fn deleting_a_service_a_registration_or_an_annotation_removes_exactly_its_entries()
-> Result<()> {
    let (env, client, consul) = setup().await?;
    let _cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy(&client, "shop", "api-x", 1, 2, export_to_consul("api_x")).await?;
    deploy(&client, "shop", "api-y", 2, 2, Default::default()).await?;
    deploy(&client, "shop", "api-z", 3, 1, export_to_consul("api_z")).await?;
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": "api-y", "namespace": "shop"},
            "spec": {"catalogRef": {"name": "consul"}, "direction": "Export",
                     "service": {"name": "api-y"}, "externalName": "api_y", "tags": ["v2"]},
        }),
    )?;
    consul.wait_passing("api_x", &API_X, WAIT).await?;
    consul
        .wait_passing("api_y", &["10.2.0.1:8080", "10.2.0.2:8080"], WAIT)
        .await?;
    consul
        .wait_passing("api_z", &["10.3.0.1:8080"], WAIT)
        .await?;

    // The registration reports what it did.
    let regs: Api<catalog_bridge::api::crd::ExternalRegistration> =
        Api::namespaced(client.clone(), "shop");
    localenv::eventually(
        "registration Ready and Synced with 2 endpoints",
        WAIT,
        || async {
            let s = regs.get("api-y").await?.status.unwrap_or_default();
            let ok = |t: &str| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == t && c.status == "True")
            };
            Ok((ok("Ready")
                && ok("Synced")
                && s.endpoints == 2
                && s.observed_generation == Some(1))
            .then_some(()))
        },
    )
    .await?;
    let table = env.kube()?.kubectl(&["get", "xreg", "-n", "shop"])?;
    println!("{table}");
    assert!(
        table.contains("api_y") && table.contains("Export"),
        "{table}"
    );

    Api::<Service>::namespaced(client.clone(), "shop")
        .delete("api-x", &DeleteParams::default())
        .await?;
    consul.wait_passing("api_x", &[], WAIT).await?;
    regs.delete("api-y", &DeleteParams::default()).await?;
    consul.wait_passing("api_y", &[], WAIT).await?;
    assert_eq!(consul.passing("api_z").await?, ["10.3.0.1:8080"]);
    annotate(
        &client,
        "shop",
        "api-z",
        json!({"catalog-bridge.io/export": null}),
    )
    .await?;
    consul.wait_passing("api_z", &[], WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn a_bad_annotation_gives_a_warning_event_and_affects_nothing_else() -> Result<()> {
    let (env, client, consul) = setup().await?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy(&client, "shop", "good", 1, 1, export_to_consul("good")).await?;
    deploy(
        &client,
        "shop",
        "bad-catalog",
        2,
        1,
        annotations(&[("catalog-bridge.io/export", "nope")]),
    )
    .await?;
    deploy(
        &client,
        "shop",
        "bad-port",
        3,
        1,
        annotations(&[
            ("catalog-bridge.io/export", "consul"),
            ("catalog-bridge.io/port", "grpc"),
        ]),
    )
    .await?;
    // A meta key Consul would refuse: the instance is exported without it, and an Event says so.
    deploy(
        &client,
        "shop",
        "odd-meta",
        4,
        1,
        annotations(&[
            ("catalog-bridge.io/export", "consul"),
            ("catalog-bridge.io/meta.team", "shop"),
            ("catalog-bridge.io/meta.owner.team", "odd"),
        ]),
    )
    .await?;
    consul
        .wait_passing("good", &["10.1.0.1:8080"], WAIT)
        .await?;
    consul
        .wait_passing("odd-meta", &["10.4.0.1:8080"], WAIT)
        .await?;
    let services = consul.node_services(NODE).await?;
    let (_, _, meta) = services
        .values()
        .find(|(_, _, meta)| meta["k8s-service"] == "odd-meta")
        .context("odd-meta on the node")?;
    assert_eq!(meta["team"], "shop", "{meta}");
    assert!(
        meta.get("owner.team").is_none(),
        "the refused key is left out: {meta}"
    );

    let events = localenv::eventually("Warning Events on the bad Services", WAIT, || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "events",
            "-n",
            "shop",
            "--field-selector",
            "type=Warning",
            "-o",
            "jsonpath={range .items[*]}{.involvedObject.name} {.reason}: {.message}{\"\\n\"}{end}",
        ])?;
        Ok((out.contains("bad-catalog CatalogNotFound")
            && out.contains("bad-port PortNotFound")
            && out.contains("odd-meta InvalidMeta"))
        .then_some(out))
    })
    .await?;
    println!("{events}");
    assert_eq!(consul.passing("bad-port").await?, Vec::<String>::new());
    let invalid = cb
        .metric("catalog_bridge_invalid_exports", &["kind=\"annotation\""])
        .await?;
    assert_eq!(invalid, 2.0);
    // Still serving the good one, and still following it.
    workload::set_pod_ready(&client, "shop", "good-1", false).await?;
    consul.wait_passing("good", &[], WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn dry_run_logs_the_plan_as_json_and_writes_nothing() -> Result<()> {
    let (env, client, consul) = setup().await?;
    let cb = Controller::start(
        &env,
        "cb",
        "cluster-a",
        &["--dry-run", "--drift-interval=1s", "--log-format=json"],
    )
    .await?;
    deploy(&client, "shop", "api-x", 1, 2, export_to_consul("api_x")).await?;
    let log = localenv::eventually("the plan in the log", WAIT, || async {
        let log = cb.log();
        Ok(log.contains("dry run: plan not applied").then_some(log))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        consul.passing("api_x").await?,
        Vec::<String>::new(),
        "nothing written"
    );
    assert!(
        consul.node_services(NODE).await?.is_empty(),
        "not even the node"
    );
    let marker = localenv::http_client()?
        .get(format!(
            "{}/v1/kv/catalog-bridge/owners/cluster-a",
            consul.url
        ))
        .send()
        .await?
        .status();
    assert_eq!(
        marker,
        reqwest::StatusCode::NOT_FOUND,
        "nor the owner marker"
    );
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("log line {line:?}"))?;
        ensure!(
            v.get("level").is_some(),
            "structured log line without a level: {line}"
        );
    }
    let log = localenv::eventually("both instances planned", WAIT, || async {
        let log = cb.log();
        Ok((log.contains("10.1.0.1") && log.contains("10.1.0.2")).then_some(log))
    })
    .await?;
    let planned: Vec<Value> = log
        .lines()
        .filter(|l| l.contains("dry run: would write"))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let keys: std::collections::BTreeSet<String> = planned
        .iter()
        .filter_map(|p| p["op"].as_str()?.split('"').nth(1).map(str::to_string))
        .collect();
    assert_eq!(keys.len(), 2, "one planned put per endpoint: {keys:?}");
    assert_eq!(
        consul.passing("api_x").await?,
        Vec::<String>::new(),
        "still nothing written"
    );
    Ok(())
}

#[tokio::test]
async fn query_answers_like_a_discovery_client() -> Result<()> {
    let (env, _client, _consul, _cb) = api_x_exported(&[]).await?;
    let bin = env!("CARGO_BIN_EXE_catalog-bridge");
    let by_url = localenv::run_tool(std::process::Command::new(bin).args([
        "query",
        &format!("consul://{}", env.consul()?.address()),
        "api_x",
    ]))?;
    assert_eq!(by_url.trim(), "api_x @ 10.1.0.1:8080 & 10.1.0.2:8080");
    let by_name = localenv::run_tool(
        std::process::Command::new(bin)
            .env("KUBECONFIG", env.kube()?.kubeconfig_path())
            .args(["query", "consul", "api_x"]),
    )?;
    assert_eq!(by_name.trim(), "api_x @ 10.1.0.1:8080 & 10.1.0.2:8080");
    let none = localenv::run_tool(
        std::process::Command::new(bin)
            .env("KUBECONFIG", env.kube()?.kubeconfig_path())
            .args(["query", "consul", "nothing_here"]),
    )?;
    assert_eq!(none.trim(), "nothing_here @ (none)");
    Ok(())
}

#[tokio::test]
async fn acl_token_comes_from_a_secret_and_a_wrong_one_is_reported() -> Result<()> {
    const TOKEN: &str = "5f1c7d0e-8c2a-4b4e-9d55-3f0a2b6c9e11";
    let env = Env::builder()
        .controller_manager()
        .consul_with_acl(TOKEN)
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    let consul_url = env.consul()?.url();
    for (name, secret, token) in [
        ("good", "consul-token", TOKEN),
        ("bad", "wrong-token", "not-a-token"),
    ] {
        kubectl_apply(
            &env,
            &json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": secret, "namespace": "default"},
                "stringData": {"token": token},
            }),
        )?;
        kubectl_apply(
            &env,
            &consul_catalog_with_token(
                name,
                std::slice::from_ref(&consul_url),
                &format!("k8s-{name}"),
                "default",
                secret,
            ),
        )?;
    }
    let _cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy(
        &client,
        "shop",
        "api-x",
        1,
        1,
        annotations(&[
            ("catalog-bridge.io/export", "good,bad"),
            ("catalog-bridge.io/name", "api_x"),
        ]),
    )
    .await?;

    // Read with the management token: the good catalog's instance is there.
    let http = localenv::http_client()?;
    let got = localenv::eventually("api_x through the ACL", WAIT, || async {
        let v: Value = http
            .get(format!("{consul_url}/v1/health/service/api_x?passing"))
            .header("X-Consul-Token", TOKEN)
            .send()
            .await?
            .json()
            .await?;
        let nodes: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["Node"]["Node"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok((!nodes.is_empty()).then_some(nodes))
    })
    .await?;
    assert_eq!(
        got,
        ["k8s-good"],
        "only the catalog with a valid token wrote"
    );

    let bad = catalog_condition(&client, "bad", "Ready", "False").await?;
    assert_eq!(bad.reason, "Unauthorized", "{bad:?}");
    let msg = bad.message;
    println!("bad token: {msg}");

    // Fixing the Secret is enough: the catalog picks the new token up and writes.
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "wrong-token", "namespace": "default"},
            "stringData": {"token": TOKEN},
        }),
    )?;
    let t = Instant::now();
    localenv::eventually(
        "both catalogs' nodes to hold api_x",
        Duration::from_secs(45),
        || async {
            let v: Value = http
                .get(format!("{consul_url}/v1/health/service/api_x?passing"))
                .header("X-Consul-Token", TOKEN)
                .send()
                .await?
                .json()
                .await?;
            Ok((v.as_array().map(Vec::len) == Some(2)).then_some(()))
        },
    )
    .await?;
    println!("Secret fixed -> catalog writing after {:?}", t.elapsed());
    Ok(())
}

#[tokio::test]
async fn a_token_with_only_the_rights_the_readme_lists_exports_imports_and_retires() -> Result<()> {
    // What the README asks of a Consul token: node:write on the synthetic node, service:write on
    // the exported names, service:read and node:read for imports, key:write on the owner
    // markers (docs/operations.md). Nothing else.
    let (env, client, consul_url, cb) = consul_with_a_token(
        r#"
        node "k8s-least" { policy = "write" }
        service "api_x" { policy = "write" }
        service "ledger" { policy = "read" }
        node_prefix "" { policy = "read" }
        key_prefix "catalog-bridge/owners/" { policy = "write" }
    "#,
    )
    .await?;
    let admin_api = support::ConsulAdmin::new(&consul_url, MANAGEMENT)?;
    let as_admin = |m, path: &str, body| admin_api.request(m, path, body);

    // Export.
    deploy_api_x(&client, "least").await?;
    let admin = support::ConsulView::with_token(consul_url.clone(), MANAGEMENT)?;
    admin
        .wait_passing("api_x", &["10.1.0.1:8080", "10.1.0.2:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;
    workload::set_pod_ready(&client, "shop", "api-x-2", false).await?;
    admin
        .wait_passing("api_x", &["10.1.0.1:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;

    // Import: a service registered from outside, read with the same token.
    as_admin(
        reqwest::Method::PUT,
        "/v1/catalog/register",
        json!({"Node": "db-host", "Address": "10.9.0.5",
               "Service": {"ID": "ledger-1", "Service": "ledger", "Port": 7000}}),
    )
    .send()
    .await?
    .error_for_status()?;
    kubectl_apply(
        &env,
        &json!({"apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
                "metadata": {"name": "ledger", "namespace": "shop"},
                "spec": {"catalogRef": {"name": "least"}, "direction": "Import",
                         "externalName": "ledger", "target": {"ports": [{"name": "tcp", "port": 7000}]}}}),
    )?;
    localenv::eventually("ledger imported through the token", WAIT, || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "endpointslices",
            "-n",
            "shop",
            "-l",
            "kubernetes.io/service-name=ledger",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[*]}",
        ])?;
        Ok((out.trim() == "10.9.0.5").then_some(()))
    })
    .await
    .with_context(|| cb.log())?;

    // Deleting the catalog removes the entries and then the node: deregistration too works
    // with these rights.
    env.kube()?
        .kubectl(&["delete", "externalcatalog", "least"])?;
    localenv::eventually("the node k8s-least to go", WAIT, || async {
        let nodes = admin.nodes().await?;
        Ok((!nodes.iter().any(|n| n == "k8s-least")).then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    let log = cb.log();
    ensure!(
        !log.contains("Permission denied") && !log.contains("ACL not found"),
        "no request was refused:\n{log}"
    );
    Ok(())
}

const MANAGEMENT: &str = "0d9c4f7e-2b1a-4c3d-8e5f-6a7b8c9d0e1f";

/// An ACL-enabled Consul, a token with exactly `rules` in Secret `default/consul-token`, the
/// ExternalCatalog `least` (node `k8s-least`) using it, and the controller.
async fn consul_with_a_token(rules: &str) -> Result<(Env, kube::Client, String, Controller)> {
    let env = Env::builder()
        .controller_manager()
        .consul_with_acl(MANAGEMENT)
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    let consul_url = env.consul()?.url();
    support::ConsulAdmin::new(&consul_url, MANAGEMENT)?
        .token_secret(&env, rules)
        .await?;
    kubectl_apply(
        &env,
        &consul_catalog_with_token(
            "least",
            std::slice::from_ref(&consul_url),
            "k8s-least",
            "default",
            "consul-token",
        ),
    )?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    Ok((env, client, consul_url, cb))
}

/// A token from before the owner marker (no right on `catalog-bridge/owners/`): the export goes
/// on as before, and the catalog says that its owner id is not protected, and why.
#[tokio::test]
async fn a_token_without_the_owner_marker_right_exports_and_says_the_id_is_unprotected()
-> Result<()> {
    let (_env, client, consul_url, cb) = consul_with_a_token(
        r#"
        node "k8s-least" { policy = "write" }
        service "api_x" { policy = "write" }
        node_prefix "" { policy = "read" }
    "#,
    )
    .await?;
    deploy_api_x(&client, "least").await?;
    let admin = support::ConsulView::with_token(consul_url, MANAGEMENT)?;
    admin
        .wait_passing("api_x", &API_X, WAIT)
        .await
        .with_context(|| cb.log())?;
    let ready = support::catalog_condition(&client, "least", "Ready", "True").await?;
    println!("Ready=True {}: {}", ready.reason, ready.message);
    ensure!(
        ready.reason == "NeedsAttention"
            && ready.message.contains("not claimed")
            && ready.message.contains("catalog-bridge/owners/cluster-a"),
        "the catalog says the owner id is unprotected: {}: {}",
        ready.reason,
        ready.message
    );
    Ok(())
}

/// Sorted `address:port owner` of the services on `node`.
async fn instances_by_owner(consul: &ConsulView, node: &str) -> Result<Vec<String>> {
    let v: Value = localenv::http_client()?
        .get(format!("{}/v1/catalog/node-services/{node}", consul.url))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut out: Vec<String> = v["Services"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            format!(
                "{}:{} {}",
                s["Address"].as_str().unwrap_or_default(),
                s["Port"],
                s["Meta"]["catalog-bridge-owner"].as_str().unwrap_or("-")
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The datacenters a Consul agent knows (`/v1/catalog/datacenters`).
async fn datacenters(url: &str) -> Result<Value> {
    Ok(localenv::http_client()?
        .get(format!("{url}/v1/catalog/datacenters"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// A catalog moved to another Consul cluster whose datacenter has the same name (`dc1`, as
/// almost everywhere) is a move: every entry leaves the old cluster, none stays behind passing.
#[tokio::test]
async fn a_catalog_moved_to_another_consul_cluster_with_the_same_datacenter_name_leaves_it()
-> Result<()> {
    let (env, _client, consul, cb) = api_x_exported(&["--drift-interval=1s"]).await?;
    let other = localenv::consul::Consul::start(env.dir(), "consul-other").await?;
    let other_view = ConsulView::new(other.url())?;
    ensure!(
        datacenters(&consul.url).await? == json!(["dc1"])
            && datacenters(&other.url()).await? == json!(["dc1"]),
        "both clusters are dc1"
    );

    let t = Instant::now();
    kubectl_apply(&env, &consul_catalog("consul", &[other.url()], NODE))?;
    other_view
        .wait_passing("api_x", &API_X, WAIT)
        .await
        .with_context(|| cb.log())?;
    println!(
        "catalog moved -> entries in the new cluster in {:?}",
        t.elapsed()
    );
    localenv::eventually(
        "the old cluster to hold none of our entries",
        WAIT,
        || async {
            let left = instances_by_owner(&consul, NODE).await?;
            if left.is_empty() {
                Ok(Some(()))
            } else {
                anyhow::bail!("left behind: {left:?}")
            }
        },
    )
    .await
    .with_context(|| cb.log())?;
    ensure!(
        consul.passing("api_x").await?.is_empty(),
        "no instance of api_x passes in the old cluster"
    );
    Ok(())
}

/// Two clusters (two owner ids) whose controllers share a `nodeName` and export the same
/// namespace, Service, address and port into one Consul: each keeps its own instance, neither
/// overwrites the other's.
#[tokio::test]
async fn two_clusters_sharing_a_node_name_keep_their_own_instances() -> Result<()> {
    let (env, client, consul) = setup().await?;
    deploy(&client, "shop", "api-x", 1, 2, export_to_consul("api_x")).await?;
    let a = Controller::start(
        &env,
        "cb-a",
        "cluster-a",
        &["--drift-interval=1s", "--lease-name=cb-a"],
    )
    .await?;
    let b = Controller::start(
        &env,
        "cb-b",
        "cluster-b",
        &["--drift-interval=1s", "--lease-name=cb-b"],
    )
    .await?;
    let both = |ips: &[&str]| {
        let mut want: Vec<String> = ips
            .iter()
            .flat_map(|ip| ["cluster-a", "cluster-b"].map(|owner| format!("{ip}:8080 {owner}")))
            .collect();
        want.sort();
        want
    };
    let wait = |want: Vec<String>| {
        let consul = &consul;
        async move {
            localenv::eventually("each cluster's own instances", WAIT, || async {
                let got = instances_by_owner(consul, NODE).await?;
                if got == want {
                    Ok(Some(()))
                } else {
                    anyhow::bail!("got {got:?}")
                }
            })
            .await
        }
    };
    wait(both(&["10.1.0.1", "10.1.0.2"]))
        .await
        .with_context(|| format!("{}\n--- cb-b:\n{}", a.log(), b.log()))?;
    // A change reaches both clusters' instances, and only theirs.
    workload::set_pod_ready(&client, "shop", "api-x-2", false).await?;
    wait(both(&["10.1.0.1"]))
        .await
        .with_context(|| format!("{}\n--- cb-b:\n{}", a.log(), b.log()))?;
    Ok(())
}
