//! Deleting an ExternalCatalog, end to end (SPEC §6.10): what this cluster wrote there is
//! removed before the object goes — also when the controller was stopped at the time, and when
//! the catalog does not answer for longer than any patience; a catalog gone for good is let go
//! with the annotation `catalog-bridge.io/abandon: "true"`, which says what stays behind.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use catalog_bridge::api::crd::ExternalCatalog;
use kube::api::{Api, Patch, PatchParams};
use localenv::Env;
use serde_json::json;
use support::{ConsulView, Controller, annotations, consul_catalog, deploy, kubectl_apply};

const WAIT: Duration = Duration::from_secs(30);
const API_X: [&str; 2] = ["10.1.0.1:8080", "10.1.0.2:8080"];

fn export_to(catalogs: &str) -> std::collections::BTreeMap<String, String> {
    annotations(&[
        ("catalog-bridge.io/export", catalogs),
        ("catalog-bridge.io/name", "api_x"),
    ])
}

/// The ExternalCatalog `name` as the API server has it now (`None`: gone).
async fn catalog(client: &kube::Client, name: &str) -> Result<Option<ExternalCatalog>> {
    Api::<ExternalCatalog>::all(client.clone())
        .get_opt(name)
        .await
        .with_context(|| format!("reading ExternalCatalog {name}"))
}

/// `kubectl delete xcat <name> --wait=false`: the deletion is asked for, not waited on.
fn delete(env: &Env, name: &str) -> Result<()> {
    env.kube()?
        .kubectl(&["delete", "xcat", name, "--wait=false"])?;
    Ok(())
}

/// The condition `type_` of `cat` as `status reason: message`.
fn condition(cat: &ExternalCatalog, type_: &str) -> Option<String> {
    let c = cat
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?
        .clone();
    Some(format!("{} {}: {}", c.status, c.reason, c.message))
}

/// What the API server says about `name`: its finalizers and deletion, or that it is gone.
async fn describe(client: &kube::Client, name: &str) -> Result<String> {
    Ok(match catalog(client, name).await? {
        None => format!("{name}: gone"),
        Some(c) => format!(
            "{name}: finalizers {:?}, deleting since {:?}, Ready {:?}",
            c.metadata.finalizers.unwrap_or_default(),
            c.metadata.deletion_timestamp.map(|t| t.0.to_string()),
            condition(
                &Api::<ExternalCatalog>::all(client.clone())
                    .get(name)
                    .await?,
                "Ready"
            ),
        ),
    })
}

/// The keys under `/services/api_x/providers/` in etcd (layout plain), read with etcdctl.
fn etcd_api_x(env: &Env) -> Result<Vec<String>> {
    let out = env.etcd()?.etcdctl(&[
        "get",
        "--prefix",
        "--keys-only",
        "/services/api_x/providers/",
    ])?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Waits until each catalog in `names` says Ready=True; prints its finalizers.
async fn ready(client: &kube::Client, names: &[&str]) -> Result<()> {
    for name in names {
        let ready = localenv::eventually(&format!("{name} to be Ready"), WAIT, || async {
            let Some(c) = catalog(client, name).await? else {
                anyhow::bail!("{name} is gone")
            };
            Ok(condition(&c, "Ready").filter(|r| r.starts_with("True")))
        })
        .await?;
        println!("{name}: Ready {ready}; {}", describe(client, name).await?);
    }
    Ok(())
}

#[tokio::test]
async fn a_catalog_deleted_while_the_controller_is_stopped_is_emptied_before_it_goes() -> Result<()>
{
    let env = Env::builder()
        .controller_manager()
        .consul()
        .etcd()
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    let consul = ConsulView::new(env.consul()?.url())?;
    kubectl_apply(
        &env,
        &consul_catalog("consul", &[env.consul()?.url()], "k8s-test"),
    )?;
    kubectl_apply(
        &env,
        &json!({"apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
                "metadata": {"name": "etcd"},
                "spec": {"etcd": {"endpoints": [env.etcd()?.endpoint()], "layout": "plain"}}}),
    )?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy(&client, "shop", "api-x", 1, 2, export_to("consul,etcd")).await?;
    consul
        .wait_passing("api_x", &API_X, WAIT)
        .await
        .with_context(|| cb.log())?;
    localenv::eventually("api_x in etcd", WAIT, || async {
        Ok((etcd_api_x(&env)?.len() == 2).then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    ready(&client, &["consul", "etcd"])
        .await
        .with_context(|| cb.log())?;

    // The controller stops (an upgrade, a crash, a scale to zero); meanwhile both catalogs are
    // deleted. The deletion waits for the controller.
    cb.process.stop()?;
    delete(&env, "consul")?;
    delete(&env, "etcd")?;
    let mut waiting = Vec::new();
    for name in ["consul", "etcd"] {
        let c = catalog(&client, name).await?;
        waiting.push((
            name,
            c.is_some_and(|c| c.metadata.deletion_timestamp.is_some()),
        ));
    }
    println!(
        "deleted while the controller is stopped: {}; {}",
        describe(&client, "consul").await?,
        describe(&client, "etcd").await?
    );

    // Started again, the controller removes the entries, and only then lets the objects go.
    let t = Instant::now();
    let cb2 = Controller::start(&env, "cb2", "cluster-a", &["--drift-interval=1s"]).await?;
    let went_early = std::sync::Mutex::new(Vec::new());
    localenv::eventually(
        "the deleted catalogs emptied",
        Duration::from_secs(60),
        || {
            let (client, consul, env, went_early) = (&client, &consul, &env, &went_early);
            async move {
                // The objects first: one already gone while its entries are still there
                // afterwards went early (read the other way round, a catalog emptied and let go
                // between the two reads would look so too).
                let gone = [
                    catalog(client, "consul").await?.is_none(),
                    catalog(client, "etcd").await?.is_none(),
                ];
                let in_consul = consul.passing("api_x").await?;
                let in_etcd = etcd_api_x(env)?;
                for ((name, left), gone) in [("consul", &in_consul), ("etcd", &in_etcd)]
                    .into_iter()
                    .zip(gone)
                {
                    if !left.is_empty() && gone {
                        let note = format!("{name} went while it held {left:?}");
                        went_early.lock().expect("lock").push(note);
                    }
                }
                if in_consul.is_empty() && in_etcd.is_empty() {
                    return Ok(Some(()));
                }
                anyhow::bail!(
                    "Consul still holds {in_consul:?}, etcd {in_etcd:?}; {}; {}",
                    describe(client, "consul").await?,
                    describe(client, "etcd").await?
                )
            }
        },
    )
    .await
    .with_context(|| cb2.log())?;
    println!("entries removed {:?} after the restart", t.elapsed());
    ensure!(
        waiting.iter().all(|(_, w)| *w),
        "each deleted catalog waits for its entries to be removed: {waiting:?}"
    );
    let went_early = went_early.into_inner().expect("lock");
    ensure!(
        went_early.is_empty(),
        "an ExternalCatalog went before its entries: {went_early:?}"
    );
    let nodes = consul.nodes().await?;
    ensure!(
        !nodes.iter().any(|n| n == "k8s-test"),
        "the synthetic node went with its last entry: {nodes:?}"
    );
    for name in ["consul", "etcd"] {
        localenv::eventually(&format!("{name} gone"), WAIT, || async {
            Ok(catalog(&client, name).await?.is_none().then_some(()))
        })
        .await
        .with_context(|| cb2.log())?;
    }
    println!(
        "both ExternalCatalogs gone {:?} after the restart",
        t.elapsed()
    );
    let log = cb2.full_log()?;
    ensure!(
        log.contains("ExternalCatalog deleted: removing its entries"),
        "{log}"
    );
    // Nothing of this cluster stays in etcd for a lease's TTL either: the lease that held the
    // entries is revoked with its marker once they are gone.
    let keys = env
        .etcd()?
        .etcdctl(&["get", "", "--prefix", "--keys-only"])?;
    ensure!(
        keys.trim().is_empty(),
        "etcd still holds keys after its ExternalCatalog went: {keys}"
    );
    Ok(())
}

#[tokio::test]
async fn a_catalog_deleted_while_unreachable_stays_until_its_entries_are_gone_unless_abandoned()
-> Result<()> {
    let env = Env::builder().controller_manager().consul().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    let consul = ConsulView::new(env.consul()?.url())?;
    // Two catalogs in one Consul, on two nodes: one is deleted, the other abandoned.
    kubectl_apply(
        &env,
        &consul_catalog("kept", &[env.consul()?.url()], "k8s-kept"),
    )?;
    kubectl_apply(
        &env,
        &consul_catalog("gone", &[env.consul()?.url()], "k8s-gone"),
    )?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    deploy(&client, "shop", "api-x", 1, 2, export_to("kept,gone")).await?;
    localenv::eventually("api_x on both nodes", WAIT, || async {
        let kept = consul.node_services("k8s-kept").await?.len();
        let gone = consul.node_services("k8s-gone").await?.len();
        Ok((kept == 2 && gone == 2).then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    ready(&client, &["kept", "gone"])
        .await
        .with_context(|| cb.log())?;

    // Consul stops answering (hung: it keeps its state), and both catalogs are deleted; one
    // is abandoned: Consul is gone for good, as far as its owner knows.
    env.consul()?.process().pause()?;
    let paused = Instant::now();
    delete(&env, "kept")?;
    delete(&env, "gone")?;
    // Annotated once it is being deleted, as a user does who finds it stuck.
    let annotated = Api::<ExternalCatalog>::all(client.clone())
        .patch(
            "gone",
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"metadata": {"annotations": {"catalog-bridge.io/abandon": "true"}}}),
            ),
        )
        .await;
    if let Err(e) = &annotated {
        println!("annotating gone failed: {e}");
    }

    // For longer than any patience without Consul (the first attempt fails after a 10 s
    // request timeout, then 30 s of patience), what the API server shows.
    let mut pending = None;
    let mut abandoned_went = None;
    while paused.elapsed() < Duration::from_secs(60) {
        let kept = catalog(&client, "kept").await?;
        if let Some(r) = kept.as_ref().and_then(|c| condition(c, "Ready"))
            && r.contains("RemovalPending")
            && pending.is_none()
        {
            println!("kept, {:?} after the pause: Ready {r}", paused.elapsed());
            pending = Some(r);
        }
        if abandoned_went.is_none() && catalog(&client, "gone").await?.is_none() {
            println!(
                "the abandoned catalog went {:?} after the pause",
                paused.elapsed()
            );
            abandoned_went = Some(paused.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let kept_after = describe(&client, "kept").await?;
    println!("after {:?} without Consul: {kept_after}", paused.elapsed());

    // Consul answers again: kept's entries go, then kept; the abandoned entries stay.
    env.consul()?.process().resume()?;
    let resumed = Instant::now();
    localenv::eventually(
        "kept's entries removed",
        Duration::from_secs(60),
        || async {
            let left = consul.node_services("k8s-kept").await?;
            if left.is_empty() {
                return Ok(Some(()));
            }
            anyhow::bail!(
                "{} entries left on k8s-kept; {}",
                left.len(),
                describe(&client, "kept").await?
            )
        },
    )
    .await
    .with_context(|| cb.log())?;
    println!(
        "kept's entries removed {:?} after Consul resumed",
        resumed.elapsed()
    );
    ensure!(
        !kept_after.ends_with("gone"),
        "kept stayed while its entries could not be removed: {kept_after}"
    );
    let pending = pending.context("kept never said its removal is pending")?;
    ensure!(
        pending.starts_with("False") && pending.contains("2 entries"),
        "Ready=False RemovalPending, with what is left: {pending}"
    );
    localenv::eventually("kept gone", WAIT, || async {
        Ok(catalog(&client, "kept").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    println!("kept gone {:?} after Consul resumed", resumed.elapsed());

    // The abandoned one went during the outage, saying what it leaves behind (in the log and
    // an Event), and its entries stay.
    annotated.context("annotating gone, deleted while Consul did not answer")?;
    ensure!(
        abandoned_went.is_some(),
        "the abandoned catalog went while Consul did not answer"
    );
    let event = localenv::eventually("an Event on the abandoned catalog", WAIT, || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "events.events.k8s.io",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.regarding.kind}/{.regarding.name} {.type} {.reason}: {.note}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .find(|l| l.starts_with("ExternalCatalog/gone"))
            .map(str::to_string))
    })
    .await
    .with_context(|| cb.log())?;
    println!("event: {event}");
    ensure!(
        event.contains("Abandoned") && event.contains("2 entries") && event.contains("k8s-gone"),
        "the Event says how many entries stay, and where: {event}"
    );
    let log = cb.full_log()?;
    ensure!(
        log.lines()
            .any(|l| l.contains("abandon") && l.contains("k8s-gone") && l.contains("2 entries")),
        "the log says what stays behind:\n{}",
        cb.log()
    );
    let abandoned = consul.node_services("k8s-gone").await?;
    ensure!(
        abandoned.len() == 2,
        "the abandoned catalog's entries stay, as it said: {abandoned:?}"
    );
    Ok(())
}
