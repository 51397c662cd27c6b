//! One refused write fails only the export it belongs to (SPEC §6.9): a catalog that refuses
//! one export's entries (a Consul ACL policy that denies one service name, an etcd role
//! without permission on one prefix, entries too large for one Consul request) still takes
//! every other export's puts and every deletion, and the refused export says why.
//!
//! Each test runs the controller binary against a real API server (with its controller
//! manager) and a real catalog, and reads the catalog back as its clients do.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams};
use localenv::{Env, workload};
use serde_json::json;
use support::{
    ConsulAdmin, ConsulView, Controller, annotations, catalog_condition, consul_catalog,
    consul_catalog_with_token, deploy, kubectl_apply, registration_condition, warning_event,
};

const WAIT: Duration = Duration::from_secs(30);
const NODE: &str = "k8s-partial";

/// `shop/api-x` (10.1.0.1-2, exported as `api_x`) and `shop/ledger` (10.2.0.1-2, as
/// `ledger`), both by annotation to `catalog`.
async fn deploy_two(client: &kube::Client, catalog: &str) -> Result<()> {
    for (svc, net, name) in [("api-x", 1, "api_x"), ("ledger", 2, "ledger")] {
        deploy(
            client,
            "shop",
            svc,
            net,
            2,
            annotations(&[
                ("catalog-bridge.io/export", catalog),
                ("catalog-bridge.io/name", name),
            ]),
        )
        .await?;
    }
    Ok(())
}

/// `shop/<svc>` (one Pod at 10.<net>.0.1) exported to `catalog` as `name` by an
/// ExternalRegistration `shop/<svc>`, with `tags`.
async fn deploy_registered(
    env: &Env,
    client: &kube::Client,
    svc: &str,
    net: u8,
    catalog: &str,
    name: &str,
    tags: &[String],
) -> Result<()> {
    deploy(client, "shop", svc, net, 1, Default::default()).await?;
    kubectl_apply(
        env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": svc, "namespace": "shop"},
            "spec": {"catalogRef": {"name": catalog}, "direction": "Export",
                     "service": {"name": svc}, "externalName": name, "tags": tags},
        }),
    )?;
    Ok(())
}

/// What changes while one export is refused: `api-x-2` turns unready (its entry must go) and
/// the Service `ledger` is deleted (both its entries must go).
async fn flip_and_delete(client: &kube::Client) -> Result<Instant> {
    let t = Instant::now();
    workload::set_pod_ready(client, "shop", "api-x-2", false).await?;
    Api::<Service>::namespaced(client.clone(), "shop")
        .delete("ledger", &DeleteParams::default())
        .await
        .context("deleting Service shop/ledger")?;
    Ok(t)
}

/// What a refused export looks like to users: `Synced=False` with the catalog's words on the
/// registration, a Warning Event on it, the catalog's `Ready` naming it, and the metrics.
async fn refusal_is_reported(
    client: &kube::Client,
    cb: &Controller,
    catalog: &str,
    registration: &str,
    catalog_words: &str,
) -> Result<()> {
    let synced = registration_condition(client, "shop", registration, "Synced", "False").await?;
    println!("Synced of shop/{registration}: {synced}");
    anyhow::ensure!(
        synced.starts_with("Refused: ") && synced.contains(catalog_words),
        "Synced should say the catalog refused it, in the catalog's words ({catalog_words:?}): {synced}"
    );
    let note = warning_event(
        client,
        "shop",
        "ExternalRegistration",
        registration,
        "Refused",
    )
    .await?;
    println!("Event on shop/{registration}: {note}");
    anyhow::ensure!(note.contains(catalog_words), "{note}");
    let ready = catalog_condition(client, catalog, "Ready", "False").await?;
    println!("Ready of {catalog}: {}: {}", ready.reason, ready.message);
    anyhow::ensure!(
        ready.reason == "Refused" && ready.message.contains(&format!("shop/{registration}")),
        "the catalog's Ready should name the stuck export: {ready:?}"
    );
    let refused = cb
        .metric(
            "catalog_bridge_backend_operations_total",
            &[&format!("catalog=\"{catalog}\""), "result=\"refused\""],
        )
        .await?;
    let stuck = cb
        .metric(
            "catalog_bridge_refused_exports",
            &[&format!("catalog=\"{catalog}\"")],
        )
        .await?;
    println!("refused operations: {refused}, refused exports now: {stuck}");
    anyhow::ensure!(refused > 0.0 && stuck == 1.0, "metrics: {refused} {stuck}");
    Ok(())
}

#[tokio::test]
async fn a_consul_acl_that_refuses_one_name_fails_only_that_export() -> Result<()> {
    const MANAGEMENT: &str = "7e1d2c3b-4a59-4f6e-8d7c-1b2a3f4e5d6c";
    let env = Env::builder()
        .controller_manager()
        .consul_with_acl(MANAGEMENT)
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    let consul_url = env.consul()?.url();
    let admin = ConsulAdmin::new(&consul_url, MANAGEMENT)?;
    // Every service name may be written but `denied`.
    let rules = |denied: &str| {
        format!(
            r#"
            node_prefix "" {{ policy = "write" }}
            service_prefix "" {{ policy = "write" }}
            key_prefix "catalog-bridge/owners/" {{ policy = "write" }}
            service "denied" {{ policy = "{denied}" }}
        "#
        )
    };
    let policy_id = admin.token_secret(&env, &rules("deny")).await?;
    kubectl_apply(
        &env,
        &consul_catalog_with_token(
            "consul",
            std::slice::from_ref(&consul_url),
            NODE,
            "default",
            "consul-token",
        ),
    )?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=2s"]).await?;
    let consul = ConsulView::with_token(consul_url.clone(), MANAGEMENT)?;
    deploy_two(&client, "consul").await?;
    consul
        .wait_passing("api_x", &["10.1.0.1:8080", "10.1.0.2:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;
    consul
        .wait_passing("ledger", &["10.2.0.1:8080", "10.2.0.2:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;

    // The export the ACL refuses, then changes to the others.
    deploy_registered(&env, &client, "denied", 3, "consul", "denied", &[]).await?;
    registration_condition(&client, "shop", "denied", "Synced", "False")
        .await
        .with_context(|| cb.log())?;
    let t = flip_and_delete(&client).await?;
    consul
        .wait_passing("api_x", &["10.1.0.1:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;
    consul
        .wait_passing("ledger", &[], WAIT)
        .await
        .with_context(|| cb.log())?;
    println!(
        "readiness flip and deletion in Consul {:?} after the change, beside a refused export",
        t.elapsed()
    );
    refusal_is_reported(&client, &cb, "consul", "denied", "Permission denied").await?;

    // The policy is fixed: the refused export is tried again on its own and lands.
    let t = Instant::now();
    admin
        .request(
            reqwest::Method::PUT,
            &format!("/v1/acl/policy/{policy_id}"),
            json!({"Name": "catalog-bridge", "Rules": rules("write")}),
        )
        .send()
        .await?
        .error_for_status()
        .context("updating the ACL policy")?;
    consul
        .wait_passing("denied", &["10.3.0.1:8080"], Duration::from_secs(60))
        .await
        .with_context(|| cb.log())?;
    println!("policy fixed -> denied in Consul after {:?}", t.elapsed());
    let synced = registration_condition(&client, "shop", "denied", "Synced", "True").await?;
    println!("Synced of shop/denied: {synced}");
    catalog_condition(&client, "consul", "Ready", "True").await?;
    Ok(())
}

/// The keys under `prefix`, read as etcd's root user.
fn etcd_keys(env: &Env, prefix: &str) -> Result<Vec<String>> {
    let out = env.etcd()?.etcdctl(&[
        "--user=root:rootpw",
        "get",
        "--prefix",
        "--keys-only",
        prefix,
    ])?;
    Ok(out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

async fn wait_etcd_keys(env: &Env, cb: &Controller, prefix: &str, want: &[&str]) -> Result<()> {
    localenv::eventually(&format!("etcd {prefix} = {want:?}"), WAIT, || async {
        let got = etcd_keys(env, prefix)?;
        if got == want {
            Ok(Some(()))
        } else {
            bail!("got {got:?}")
        }
    })
    .await
    .with_context(|| cb.log())
}

#[tokio::test]
async fn an_etcd_role_that_refuses_one_prefix_fails_only_that_export() -> Result<()> {
    let env = Env::builder().controller_manager().etcd().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    let etcd = env.etcd()?;
    // The controller's user may read every entry and write its lease marker and the entries of
    // api_x and ledger; not those of `denied`.
    for args in [
        &["user", "add", "root", "--new-user-password=rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "bridge"],
        &[
            "role",
            "grant-permission",
            "bridge",
            "readwrite",
            "--prefix=true",
            "/catalog-bridge.io/",
        ],
        &[
            "role",
            "grant-permission",
            "bridge",
            "read",
            "--prefix=true",
            "/services/",
        ],
        &[
            "role",
            "grant-permission",
            "bridge",
            "readwrite",
            "--prefix=true",
            "/services/api_x/",
        ],
        &[
            "role",
            "grant-permission",
            "bridge",
            "readwrite",
            "--prefix=true",
            "/services/ledger/",
        ],
        &["user", "add", "bridge", "--new-user-password=bridgepw"],
        &["user", "grant-role", "bridge", "bridge"],
        &["auth", "enable"],
    ] {
        etcd.etcdctl(args)
            .with_context(|| format!("etcdctl {}", args.join(" ")))?;
    }
    kubectl_apply(
        &env,
        &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "etcd-user", "namespace": "default"},
                "stringData": {"username": "bridge", "password": "bridgepw"}}),
    )?;
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "etcd"},
            "spec": {"etcd": {"endpoints": [etcd.endpoint()], "layout": "plain",
                              "credentialsSecretRef": {"namespace": "default", "name": "etcd-user"}}},
        }),
    )?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=2s"]).await?;
    deploy_two(&client, "etcd").await?;
    wait_etcd_keys(
        &env,
        &cb,
        "/services/",
        &[
            "/services/api_x/providers/10.1.0.1:8080",
            "/services/api_x/providers/10.1.0.2:8080",
            "/services/ledger/providers/10.2.0.1:8080",
            "/services/ledger/providers/10.2.0.2:8080",
        ],
    )
    .await?;

    deploy_registered(&env, &client, "denied", 3, "etcd", "denied", &[]).await?;
    registration_condition(&client, "shop", "denied", "Synced", "False")
        .await
        .with_context(|| cb.log())?;
    let t = flip_and_delete(&client).await?;
    wait_etcd_keys(
        &env,
        &cb,
        "/services/",
        &["/services/api_x/providers/10.1.0.1:8080"],
    )
    .await?;
    println!(
        "readiness flip and deletion in etcd {:?} after the change, beside a refused export",
        t.elapsed()
    );
    refusal_is_reported(&client, &cb, "etcd", "denied", "permission denied").await?;

    // The role is granted the prefix: the refused export lands.
    let t = Instant::now();
    etcd.etcdctl(&[
        "--user=root:rootpw",
        "role",
        "grant-permission",
        "bridge",
        "readwrite",
        "--prefix=true",
        "/services/denied/",
    ])?;
    localenv::eventually("denied in etcd", Duration::from_secs(60), || async {
        Ok(etcd_keys(&env, "/services/denied/")?
            .contains(&"/services/denied/providers/10.3.0.1:8080".to_string())
            .then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    println!("role fixed -> denied in etcd after {:?}", t.elapsed());
    registration_condition(&client, "shop", "denied", "Synced", "True").await?;
    Ok(())
}

#[tokio::test]
async fn an_export_too_large_for_one_consul_request_fails_only_that_export() -> Result<()> {
    // A Consul that takes requests of at most 8 KiB (both limits: the larger one counts).
    let env = Env::builder()
        .controller_manager()
        .consul_hcl("limits { txn_max_req_len = 8192, kv_max_value_size = 8192 }")
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    kubectl_apply(
        &env,
        &consul_catalog("consul", &[env.consul()?.url()], NODE),
    )?;
    let consul = ConsulView::new(env.consul()?.url())?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=2s"]).await?;
    deploy_two(&client, "consul").await?;
    consul
        .wait_passing("api_x", &["10.1.0.1:8080", "10.1.0.2:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;
    consul
        .wait_passing("ledger", &["10.2.0.1:8080", "10.2.0.2:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;

    // 40 tags of 250 characters: within what the registration accepts, 10 KB in one instance.
    let tags: Vec<String> = (0..40)
        .map(|i| format!("{i:03}-{}", "t".repeat(246)))
        .collect();
    deploy_registered(&env, &client, "big", 4, "consul", "big", &tags).await?;
    registration_condition(&client, "shop", "big", "Synced", "False")
        .await
        .with_context(|| cb.log())?;
    let t = flip_and_delete(&client).await?;
    consul
        .wait_passing("api_x", &["10.1.0.1:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;
    consul
        .wait_passing("ledger", &[], WAIT)
        .await
        .with_context(|| cb.log())?;
    println!(
        "readiness flip and deletion in Consul {:?} after the change, beside a refused export",
        t.elapsed()
    );
    refusal_is_reported(&client, &cb, "consul", "big", "too large").await?;

    // Fewer tags: it fits, and lands.
    let t = Instant::now();
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": "big", "namespace": "shop"},
            "spec": {"catalogRef": {"name": "consul"}, "direction": "Export",
                     "service": {"name": "big"}, "externalName": "big", "tags": ["small"]},
        }),
    )?;
    consul
        .wait_passing("big", &["10.4.0.1:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;
    println!("tags shrunk -> big in Consul after {:?}", t.elapsed());
    registration_condition(&client, "shop", "big", "Synced", "True").await?;

    // Annotations beyond the bounds are refused before they reach the catalog, with a
    // message that says which bound.
    let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    deploy(
        &client,
        "shop",
        "tagged",
        5,
        1,
        annotations(&[
            ("catalog-bridge.io/export", "consul"),
            ("catalog-bridge.io/tags", &many.join(",")),
        ]),
    )
    .await?;
    let note = warning_event(&client, "shop", "Service", "tagged", "InvalidAnnotation").await?;
    println!("Event on Service shop/tagged: {note}");
    anyhow::ensure!(
        note.contains("catalog-bridge.io/tags holds 65 tags; at most 64"),
        "{note}"
    );
    anyhow::ensure!(consul.passing("tagged").await?.is_empty());
    Ok(())
}

/// Runs `body` with kazoo connected to `connect` (`sys.argv[2:]` are `args`).
fn kazoo(connect: &str, body: &str, args: &[&str]) -> Result<String> {
    let script = format!(
        "import sys, json\n\
         from kazoo.client import KazooClient\n\
         from kazoo.security import make_digest_acl\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         try:\n{}\nfinally:\n    zk.stop()\n",
        body.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut all = vec![connect];
    all.extend_from_slice(args);
    localenv::python(&script, &all)
}

/// The children of `path`, sorted, as kazoo lists them.
fn zk_children(connect: &str, path: &str) -> Result<Vec<String>> {
    let out = kazoo(
        connect,
        "print(json.dumps(sorted(zk.get_children(sys.argv[2])) if zk.exists(sys.argv[2]) else []))",
        &[path],
    )?;
    serde_json::from_str(out.trim()).with_context(|| format!("kazoo printed {out:?}"))
}

#[tokio::test]
async fn a_zookeeper_acl_on_one_path_fails_only_that_export() -> Result<()> {
    let env = Env::builder()
        .controller_manager()
        .zookeeper()
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    let connect = env.zookeeper()?.connect_string();
    // Someone else owns /services/denied: the world may read it, only they may write.
    kazoo(
        &connect,
        "zk.ensure_path('/services')\n\
         zk.create('/services/denied', b'', acl=[make_digest_acl('other', 'pw', all=True), make_digest_acl('x', 'y', read=True)])\n\
         print('ok')",
        &[],
    )?;
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "zk"},
            "spec": {"zookeeper": {"connect": connect, "layout": "plain"}},
        }),
    )?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=2s"]).await?;
    deploy_two(&client, "zk").await?;
    let wait_children = |path: &'static str, want: &'static [&'static str]| {
        let connect = connect.clone();
        async move {
            localenv::eventually(&format!("{path} = {want:?}"), WAIT, || async {
                let got = zk_children(&connect, path)?;
                if got == want {
                    Ok(Some(()))
                } else {
                    bail!("got {got:?}")
                }
            })
            .await
        }
    };
    wait_children(
        "/services/api_x/providers",
        &["10.1.0.1:8080", "10.1.0.2:8080"],
    )
    .await
    .with_context(|| cb.log())?;
    wait_children(
        "/services/ledger/providers",
        &["10.2.0.1:8080", "10.2.0.2:8080"],
    )
    .await
    .with_context(|| cb.log())?;

    deploy_registered(&env, &client, "denied", 3, "zk", "denied", &[]).await?;
    registration_condition(&client, "shop", "denied", "Synced", "False")
        .await
        .with_context(|| cb.log())?;
    let t = flip_and_delete(&client).await?;
    wait_children("/services/api_x/providers", &["10.1.0.1:8080"])
        .await
        .with_context(|| cb.log())?;
    wait_children("/services/ledger/providers", &[])
        .await
        .with_context(|| cb.log())?;
    println!(
        "readiness flip and deletion in ZooKeeper {:?} after the change, beside a refused export",
        t.elapsed()
    );
    refusal_is_reported(&client, &cb, "zk", "denied", "not authorized").await?;
    Ok(())
}
