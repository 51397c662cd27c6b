//! A catalog's policy (`spec.policy`) against real servers: which namespaces may export to a
//! catalog and import from it, under which names; one name exported from two namespaces kept
//! by the oldest export; imported addresses within the catalog's CIDR lists.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams};
use localenv::Env;
use serde_json::{Value, json};
use support::{
    ConsulView, Controller, annotations, deploy, ensure_namespace, kubectl_apply, ready_endpoints,
    registration_condition, warning_event,
};

const WAIT: Duration = Duration::from_secs(30);

async fn setup() -> Result<(Env, kube::Client, Controller)> {
    let env = Env::builder().all().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    for (ns, team) in [("shop", "shop"), ("pay", "pay")] {
        ensure_namespace(&client, ns).await?;
        env.kube()?.kubectl(&[
            "label",
            "namespace",
            ns,
            &format!("team={team}"),
            "--overwrite",
        ])?;
    }
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    Ok((env, client, cb))
}

fn catalog(name: &str, kind: Value, policy: Value) -> Value {
    let mut spec = kind;
    spec["policy"] = policy;
    json!({
        "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
        "metadata": {"name": name}, "spec": spec,
    })
}

/// `<ip>:<port>` under the etcd `plain` layout's `/services/<name>/providers/`.
fn etcd_providers(env: &Env, name: &str) -> Result<Vec<String>> {
    let out = env.etcd()?.etcdctl(&[
        "get",
        "--prefix",
        "--print-value-only",
        &format!("/services/{name}/providers/"),
    ])?;
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    Ok(v)
}

async fn wait_etcd(env: &Env, name: &str, want: &[&str]) -> Result<()> {
    localenv::eventually(&format!("etcd {name} = {want:?}"), WAIT, || async {
        let got = etcd_providers(env, name)?;
        if got == want {
            Ok(Some(()))
        } else {
            anyhow::bail!("got {got:?}")
        }
    })
    .await
}

/// Exports: a namespace the Consul catalog's policy does not select is refused there
/// (`NotAllowed`), and the etcd catalog, which allows every namespace but does not merge, keeps
/// `api_x` for the namespace that exported it first (`NameConflict` for the other, Service and
/// registration alike) until that export goes.
#[tokio::test]
async fn a_namespace_publishes_only_what_the_catalog_policy_gives_it() -> Result<()> {
    let (env, client, cb) = setup().await?;
    let consul = ConsulView::new(env.consul()?.url())?;
    kubectl_apply(
        &env,
        &catalog(
            "consul",
            json!({"consul": {"addresses": [env.consul()?.url()], "nodeName": "k8s-policy"}}),
            json!({"export": {"namespaces": {"from": "Selector",
                "selector": {"matchLabels": {"team": "shop"}}}}}),
        ),
    )?;
    kubectl_apply(
        &env,
        &catalog(
            "etcd",
            json!({"etcd": {"endpoints": [env.etcd()?.endpoint()]}}),
            json!({}),
        ),
    )?;
    let export = annotations(&[
        ("catalog-bridge.io/export", "consul,etcd"),
        ("catalog-bridge.io/name", "api_x"),
    ]);
    deploy(&client, "shop", "api", 1, 1, export.clone()).await?;
    wait_etcd(&env, "api_x", &["10.1.0.1:8080"])
        .await
        .with_context(|| cb.log())?;
    consul
        .wait_passing("api_x", &["10.1.0.1:8080"], WAIT)
        .await
        .with_context(|| cb.log())?;
    // Creation times count in seconds: pay's export is surely the younger.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    deploy(&client, "pay", "api", 2, 1, export).await?;

    let refused = warning_event(&client, "pay", "Service", "api", "NotAllowed")
        .await
        .with_context(|| cb.log())?;
    println!("NotAllowed: {refused}");
    ensure!(
        refused.contains("namespace pay may not export to ExternalCatalog consul")
            && refused.contains("team=shop"),
        "the Event says who may: {refused}"
    );
    let conflict = warning_event(&client, "pay", "Service", "api", "NameConflict").await?;
    println!("NameConflict: {conflict}");
    ensure!(
        conflict.contains("Service shop/api"),
        "the Event names the holder: {conflict}"
    );
    // The refusals are decided: the catalogs hold shop's endpoint only, and keep it.
    for _ in 0..10 {
        ensure!(etcd_providers(&env, "api_x")? == ["10.1.0.1:8080"]);
        ensure!(consul.passing("api_x").await? == ["10.1.0.1:8080"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A registration of pay's for the same name: refused too, with a condition.
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": "api-reg", "namespace": "pay"},
            "spec": {"catalogRef": {"name": "etcd"}, "direction": "Export",
                     "service": {"name": "api"}, "externalName": "api_x"},
        }),
    )?;
    let ready = registration_condition(&client, "pay", "api-reg", "Ready", "False").await?;
    println!("pay/api-reg Ready=False {ready}");
    ensure!(ready.starts_with("NameConflict: "), "{ready}");

    // shop's export goes: pay holds the name now, in etcd; Consul still refuses pay.
    Api::<Service>::namespaced(client.clone(), "shop")
        .delete("api", &DeleteParams::default())
        .await
        .context("deleting shop/api")?;
    wait_etcd(&env, "api_x", &["10.2.0.1:8080"])
        .await
        .with_context(|| cb.log())?;
    registration_condition(&client, "pay", "api-reg", "Ready", "True").await?;
    consul
        .wait_passing("api_x", &[], WAIT)
        .await
        .with_context(|| cb.log())?;
    Ok(())
}

/// Imports: the catalog of the report (one good entry and the cloud metadata address under
/// one name), with entries outside the catalog's CIDR lists besides. A namespace the policy
/// selects imports the good entry only, every other skipped and counted in one Event; a
/// namespace it does not select, or a name it does not allow, is refused and gets nothing; a
/// namespace that stops being selected loses what it imported.
#[tokio::test]
async fn an_import_takes_only_what_the_catalog_policy_gives_it() -> Result<()> {
    let (env, client, cb) = setup().await?;
    kubectl_apply(
        &env,
        &catalog(
            "vms",
            json!({"etcd": {"endpoints": [env.etcd()?.endpoint()]}}),
            json!({"import": {
                "namespaces": {"from": "Selector", "selector": {"matchExpressions": [
                    {"key": "team", "operator": "In", "values": ["shop"]}]}},
                "names": [{"prefix": "mysql"}],
                "addresses": {"allow": ["198.18.0.0/15"], "deny": ["198.18.0.128/25"]},
            }}),
        ),
    )?;
    let etcd = env.etcd()?;
    for entry in [
        "198.18.0.9:8080",
        "169.254.169.254:80",
        "10.1.2.3:3306",
        "198.18.0.200:3306",
    ] {
        etcd.etcdctl(&[
            "put",
            &format!("/services/mysql_x/providers/{entry}"),
            entry,
        ])?;
    }
    let import = |ns: &str, name: &str, external: &str| {
        json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"catalogRef": {"name": "vms"}, "direction": "Import",
                     "externalName": external,
                     "target": {"ports": [{"name": "db", "port": 8080}]}},
        })
    };
    kubectl_apply(&env, &import("shop", "mysql-x", "mysql_x"))?;
    kubectl_apply(&env, &import("pay", "mysql-x", "mysql_x"))?;
    kubectl_apply(&env, &import("shop", "redis", "redis"))?;

    localenv::eventually("shop/mysql-x imports 198.18.0.9 only", WAIT, || async {
        let got = ready_endpoints(&client, "shop", "mysql-x").await?;
        Ok((got == ["198.18.0.9:8080"]).then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    let skipped = warning_event(
        &client,
        "shop",
        "ExternalRegistration",
        "mysql-x",
        "UnparsableEntry",
    )
    .await?;
    println!("shop/mysql-x: {skipped}");
    for why in [
        "skipped 3 entries",
        "link-local",
        "10.1.2.3",
        "198.18.0.128/25",
    ] {
        ensure!(skipped.contains(why), "{why:?} in the Event: {skipped}");
    }
    let counted = cb
        .metric(
            "catalog_bridge_import_skipped_entries",
            &["namespace=\"shop\"", "registration=\"mysql-x\""],
        )
        .await?;
    ensure!(counted == 3.0, "three entries skipped: {counted}");

    let pay = registration_condition(&client, "pay", "mysql-x", "Ready", "False").await?;
    println!("pay/mysql-x Ready=False {pay}");
    ensure!(
        pay.starts_with("NotAllowed: ") && pay.contains("namespace pay may not import"),
        "{pay}"
    );
    warning_event(
        &client,
        "pay",
        "ExternalRegistration",
        "mysql-x",
        "NotAllowed",
    )
    .await?;
    let redis = registration_condition(&client, "shop", "redis", "Ready", "False").await?;
    println!("shop/redis Ready=False {redis}");
    ensure!(
        redis.contains("\"redis\"") && redis.contains("\"mysql\"*"),
        "{redis}"
    );
    for (ns, svc) in [("pay", "mysql-x"), ("shop", "redis")] {
        let got = Api::<Service>::namespaced(client.clone(), ns)
            .get_opt(svc)
            .await?;
        ensure!(
            got.is_none(),
            "a refused import writes no Service {ns}/{svc}"
        );
    }

    // shop is no longer selected: its import is refused, and what it imported goes.
    env.kube()?
        .kubectl(&["label", "namespace", "shop", "team=retail", "--overwrite"])?;
    registration_condition(&client, "shop", "mysql-x", "Ready", "False").await?;
    localenv::eventually("shop/mysql-x removed", WAIT, || async {
        let got = Api::<Service>::namespaced(client.clone(), "shop")
            .get_opt("mysql-x")
            .await?;
        Ok(got.is_none().then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    Ok(())
}
