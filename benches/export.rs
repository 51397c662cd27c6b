//! `make bench`: export at scale to Consul, etcd and ZooKeeper, each measured against a floor
//! run in the same process; and import at scale from etcd.
//!
//! For each catalog:
//! 1. Convergence from empty: 1,000 Services × 10 endpoints (10,000 × 10 with `SCALE=100k`)
//!    are in the cluster, the ExternalCatalog `bench` they are annotated with starts pointing at
//!    the catalog, and the clock runs until the controller reports every entry in place (then
//!    checked in the catalog). The floor is the same catalog's backend alone — a plain writer
//!    with the controller's own batches — writing the same instances under another prefix with
//!    1, 2, 4 and 8 requests in flight; the best is the floor. Reported as a ratio.
//! 2. Readiness flips: an EndpointSlice endpoint flips unready/ready, and the clock runs until
//!    a reader of the catalog sees it; p50 and p99, against the floor writer flipping one entry
//!    and the same reader.
//! 3. A churn storm: 1,000 endpoints turn unready (then ready) within a few seconds; the time
//!    until the controller reports the catalog in step, and its CPU seconds per 1,000 changes.
//! 4. The controller's RSS and peak RSS (VmHWM) from /proc after convergence.
//!
//! Between catalogs the ExternalCatalog is deleted, which empties the previous catalog, and
//! created again pointing at the next one. Then an unchanged restart of the controller
//! (ZooKeeper, the last catalog): entries written (they should be 0).
//!
//! Import: one name with 1,000 instances (10,000) and 100 names (1,000) of 10, registered in
//! etcd by another owner, imported by one ExternalRegistration per name: time until the
//! EndpointSlices hold them all against slices written directly, one change's latency, RSS.
//!
//! And, in memory before any server starts: the desired-state step after one readiness change,
//! incremental (`desired::compute_with` and its memo) against a computation from scratch
//! (`desired::compute`), same process.
//!
//! EndpointSlices are written directly (selector-less Services, as any slice producer would),
//! so the benchmark measures catalog-bridge, not kube-controller-manager. Flip times include the
//! API server write and watch round trip, which the floor does not pay.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use catalog_bridge::backend::Backend;
use catalog_bridge::backend::consul::{Consul, ConsulConfig};
use catalog_bridge::backend::etcd::{Etcd, EtcdConfig};
use catalog_bridge::backend::zookeeper::{ZooKeeper, ZooKeeperConfig};
use catalog_bridge::export::plan::Op;
use catalog_bridge::k8s::cached::{CachedService, CachedSlice};
use catalog_bridge::model::{Instance, Origin};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::{ConsulView, Controller, kubectl_apply};

/// Services exported: 1,000 (10,000 instances), or 10,000 (100,000 instances) with
/// `SCALE=100k` (`make bench SCALE=100k`).
fn service_count() -> usize {
    match std::env::var("SCALE").as_deref() {
        Ok("100k") => 10_000,
        _ => 1000,
    }
}
const ENDPOINTS: usize = 10;
const FLIPS: usize = 60;
const NS: &str = "bench";
const OK_WRITES: [&str; 3] = ["catalog=\"bench\"", "op=\"write\"", "result=\"ok\""];

fn ip(svc: usize, ep: usize) -> String {
    format!("10.{}.{}.{}", 100 + svc / 250, svc % 250, ep + 1)
}

fn name(svc: usize) -> String {
    format!("svc-{svc:04}")
}

async fn create_objects(client: &kube::Client) -> Result<()> {
    support::ensure_namespace(client, NS).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let mut pending = Vec::new();
    for s in 0..service_count() {
        let name = name(s);
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"catalog-bridge.io/export": "bench"}},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))?;
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-1"), "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "bench.catalog-bridge.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints(s, true),
        }))?;
        let (services, slices) = (services.clone(), slices.clone());
        pending.push(async move {
            services.create(&PostParams::default(), &svc).await?;
            slices.create(&PostParams::default(), &slice).await?;
            Ok::<(), anyhow::Error>(())
        });
        if pending.len() == 32 {
            futures::future::try_join_all(pending.drain(..)).await?;
        }
    }
    futures::future::try_join_all(pending).await?;
    Ok(())
}

/// The endpoints of service `s`, the first one ready or not.
fn endpoints(s: usize, first_ready: bool) -> Vec<Value> {
    (0..ENDPOINTS)
        .map(|e| json!({"addresses": [ip(s, e)], "conditions": {"ready": e != 0 || first_ready}}))
        .collect()
}

/// One catalog under test.
struct Target {
    label: &'static str,
    /// The `spec` of the ExternalCatalog `bench` pointing at it.
    spec: Value,
    /// A backend of another owner: the floor writer (under `/floor` or node `floor`).
    floor: Arc<dyn Backend>,
    /// A reader, as a discovery client would ask, of what the controller writes…
    reader: Arc<dyn Backend>,
    /// …and of what the floor writes.
    floor_reader: Arc<dyn Backend>,
    /// The name the floor writes service `s` under, and the name the controller does.
    floor_name: fn(usize) -> String,
}

fn targets(env: &localenv::Env) -> Result<Vec<Target>> {
    let consul = env.consul()?.url();
    let etcd = env.etcd()?.endpoint();
    let zk = env.zookeeper()?.connect_string();
    let consul_backend = |node: &str| -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(Consul::new(ConsulConfig {
            addresses: vec![consul.clone()],
            node_name: node.into(),
            owner: node.into(),
            ..Default::default()
        })?))
    };
    let etcd_backend = |base: &str, owner: &str| -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(Etcd::new(EtcdConfig {
            endpoints: vec![etcd.clone()],
            base_path: Some(base.into()),
            owner: owner.into(),
            catalog: "bench".into(),
            ..Default::default()
        })?))
    };
    let zk_backend = |base: &str, owner: &str| -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(ZooKeeper::new(ZooKeeperConfig {
            connect: zk.clone(),
            base_path: Some(base.into()),
            owner: owner.into(),
            ..Default::default()
        })?))
    };
    Ok(vec![
        Target {
            label: "Consul (/v1/txn, 64 ops)",
            spec: json!({"consul": {"addresses": [consul], "nodeName": "k8s-bench"}}),
            floor: consul_backend("floor")?,
            reader: consul_backend("reader")?,
            floor_reader: consul_backend("reader")?,
            floor_name: |s| format!("floor-{s:04}"),
        },
        Target {
            label: "etcd plain (txn, 125 ops)",
            spec: json!({"etcd": {"endpoints": [etcd], "basePath": "/services"}}),
            floor: etcd_backend("/floor", "floor")?,
            reader: etcd_backend("/services", "reader")?,
            floor_reader: etcd_backend("/floor", "reader")?,
            floor_name: |s| format!("floor-{s:04}"),
        },
        Target {
            label: "ZooKeeper plain (multi, 100 ops)",
            spec: json!({"zookeeper": {"connect": zk, "basePath": "/services"}}),
            floor: zk_backend("/floor", "floor")?,
            reader: zk_backend("/services", "reader")?,
            floor_reader: zk_backend("/floor", "reader")?,
            floor_name: |s| format!("floor-{s:04}"),
        },
    ])
}

/// Requests in flight the floor writer is measured with; the best is the floor.
const IN_FLIGHT: [usize; 4] = [1, 2, 4, 8];

/// The floor: all instances written by the backend alone, in its own batches (the controller's
/// writer uses the same ones), with 1, 2, 4 and 8 requests in flight (the plan split in as many
/// parts, each applied by one task); between tries the floor's entries are deleted. Returns the
/// best time, its round trips and its requests in flight, and every try as `n: seconds`.
async fn floor_converge(t: &Target) -> Result<(Duration, usize, usize, String)> {
    let instances: Vec<Instance> = (0..service_count())
        .flat_map(|s| {
            (0..ENDPOINTS).map(move |e| Instance {
                name: format!("floor-{s:04}").into(),
                address: ip(s, e).parse().expect("bench ip"),
                port: 8080,
                origin: Origin {
                    namespace: NS.into(),
                    service: name(s),
                }
                .into(),
                tags: vec![].into(),
                meta: Default::default(),
            })
        })
        .collect();
    let ops: Vec<Op> = t
        .floor
        .render(&instances)
        .into_iter()
        .map(|(key, record)| Op::Put { key, record })
        .collect();
    // Once untimed, so that every try finds what stays between them (ZooKeeper's persistent
    // directories, Consul's node) in place.
    t.floor.apply(&ops).await?;
    let mut best: Option<(Duration, usize, usize)> = None;
    let mut tries = Vec::new();
    for n in IN_FLIGHT {
        let owned = t.floor.read_owned().await?;
        let deletes: Vec<Op> = owned.into_keys().map(|key| Op::Delete { key }).collect();
        t.floor.apply(&deletes).await?;
        let start = Instant::now();
        let parts = ops.chunks(ops.len().div_ceil(n));
        let trips: usize = futures::future::try_join_all(parts.map(|p| t.floor.apply(p)))
            .await?
            .into_iter()
            .sum();
        let took = start.elapsed();
        tries.push(format!("{n}: {:.2} s", took.as_secs_f64()));
        if best.is_none_or(|(b, _, _)| took < b) {
            best = Some((took, trips, n));
        }
    }
    let (took, trips, n) = best.context("at least one try")?;
    Ok((took, trips, n, tries.join(", ")))
}

/// Waits until `reader` answers `want` entries for `name`; the time since `start`.
async fn seen(reader: &dyn Backend, name: &str, want: usize, start: Instant) -> Result<Duration> {
    loop {
        if reader.lookup(name).await?.len() == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{name}: {want} entries not seen within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The floor of a flip: the first instance of a service deleted or put back by the backend
/// alone, timed until the reader sees it.
async fn floor_flips(t: &Target) -> Result<Vec<Duration>> {
    let owned = t.floor.read_owned().await?;
    let mut delays = Vec::new();
    for i in 0..FLIPS {
        let s = (i / 2) % service_count();
        let svc = (t.floor_name)(s);
        let first = ip(s, 0);
        let (key, record) = owned
            .iter()
            .find(|(k, r)| {
                let r = r.to_string();
                let at = format!("{first}:8080");
                (k.contains(&svc) || r.contains(&svc))
                    && (k.contains(&at) || r.contains(&at) || r.contains(&format!("\"{first}\"")))
            })
            .map(|(k, r)| (k.clone(), r.clone()))
            .with_context(|| format!("the floor entry of {svc} at {first}"))?;
        let (op, want) = if i % 2 == 1 {
            (Op::Put { key, record }, ENDPOINTS)
        } else {
            (Op::Delete { key }, ENDPOINTS - 1)
        };
        let start = Instant::now();
        t.floor.apply(&[op]).await?;
        delays.push(seen(t.floor_reader.as_ref(), &svc, want, start).await?);
    }
    delays.sort();
    Ok(delays)
}

/// Controller flips: the first endpoint of a service turns unready, then ready again. Returns
/// the delays until the reader sees the change, and until a plain watch on EndpointSlices sees
/// it (the part of the path that is Kubernetes, not catalog-bridge).
async fn flips(
    client: &kube::Client,
    reader: &dyn Backend,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watch = {
        let slices = slices.clone();
        tokio::spawn(async move {
            let stream = watcher(slices, watcher::Config::default()).applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(s)) = stream.next().await {
                let _ = tx.send((
                    s.metadata.resource_version.unwrap_or_default(),
                    Instant::now(),
                ));
            }
        })
    };
    let mut delays = Vec::new();
    let mut watched = Vec::new();
    for i in 0..FLIPS {
        let s = (i / 2) % service_count();
        let ready = i % 2 == 1;
        let want = if ready { ENDPOINTS } else { ENDPOINTS - 1 };
        let start = Instant::now();
        let patched = slices
            .patch(
                &format!("{}-1", name(s)),
                &PatchParams::default(),
                &Patch::Merge(&json!({"endpoints": endpoints(s, ready)})),
            )
            .await?;
        let rv = patched.metadata.resource_version.unwrap_or_default();
        delays.push(seen(reader, &name(s), want, start).await?);
        loop {
            let (got, at) = rx.recv().await.context("the EndpointSlice watch ended")?;
            if got == rv {
                watched.push(at.saturating_duration_since(start));
                break;
            }
        }
    }
    watch.abort();
    delays.sort();
    watched.sort();
    Ok((delays, watched))
}

/// One import scenario: `names` names of `per_name` instances each.
struct ImportCase {
    label: &'static str,
    /// Service names are `<prefix>-<n>`.
    prefix: &'static str,
    names: usize,
    per_name: usize,
}

/// The import scenarios: one name with many instances, and many names (one
/// ExternalRegistration each). `SCALE=100k`: 10,000 instances of one name and 1,000 names.
fn import_cases() -> [ImportCase; 2] {
    let big = service_count() >= 10_000;
    [
        ImportCase {
            label: "one name",
            prefix: "one",
            names: 1,
            per_name: if big { 10_000 } else { 1000 },
        },
        ImportCase {
            label: "many names",
            prefix: "many",
            names: if big { 1000 } else { 100 },
            per_name: 10,
        },
    ]
}

/// Endpoints of the imported EndpointSlices (those catalog-bridge manages), by Service name.
/// Read from the API server's watch cache (`resourceVersion=0`): polled every 50 ms, a quorum
/// read of every slice of the namespace from etcd is load enough to slow the server the
/// controller writes to.
async fn imported_endpoints(slices: &Api<EndpointSlice>) -> Result<BTreeMap<String, usize>> {
    use catalog_bridge::api::labels::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
    let lp = kube::api::ListParams::default()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
        .match_any();
    let mut out = BTreeMap::new();
    for s in slices.list(&lp).await?.items {
        let svc = (s.metadata.labels.as_ref())
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .cloned()
            .unwrap_or_default();
        *out.entry(svc).or_default() += s.endpoints.len();
    }
    Ok(out)
}

/// Import: the instances of `case` registered in etcd (plain layout, by another owner, on its
/// own lease) are imported, one ExternalRegistration per name (created through the API, 16 at
/// a time); the clock runs from the first registration until the EndpointSlices hold them all.
/// The floor is a plain writer applying the same endpoints as EndpointSlices directly (100
/// endpoints a slice, 16 requests in flight). Then single changes: one key of the first name
/// deleted / put back, until its slices say so. Then the controller's RSS.
async fn import_bench(
    env: &localenv::Env,
    client: &kube::Client,
    cb: &Controller,
    case: &ImportCase,
) -> Result<String> {
    use catalog_bridge::api::crd::ExternalRegistration;
    use futures::{StreamExt, TryStreamExt};
    let total = case.names * case.per_name;
    let registrant = Etcd::new(EtcdConfig {
        endpoints: vec![env.etcd()?.endpoint()],
        base_path: Some("/services".into()),
        owner: format!("registrant-{}", case.prefix),
        catalog: "external".into(),
        lease_ttl: Duration::from_secs(300),
        ..Default::default()
    })?;
    let name_of = |n: usize| format!("{}-{n:04}", case.prefix);
    let instances: Vec<Instance> = (0..case.names)
        .flat_map(|n| (0..case.per_name).map(move |i| (n, i)))
        .map(|(n, i)| {
            let k = n * case.per_name + i;
            Instance {
                name: name_of(n).into(),
                address: format!(
                    "10.{}.{}.{}",
                    200 + k / 62_500,
                    (k / 250) % 250,
                    k % 250 + 1
                )
                .parse()
                .expect("bench ip"),
                port: 5432,
                origin: Origin {
                    namespace: "vm".into(),
                    service: name_of(n),
                }
                .into(),
                tags: vec![].into(),
                meta: Default::default(),
            }
        })
        .collect();
    let records = registrant.render(&instances);
    let ops: Vec<Op> = records
        .iter()
        .map(|(k, r)| Op::Put {
            key: k.clone(),
            record: r.clone(),
        })
        .collect();
    registrant.apply(&ops).await?;
    kubectl_apply(
        env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "external"},
            "spec": {"etcd": {"endpoints": [env.etcd()?.endpoint()], "basePath": "/services"}},
        }),
    )?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let registrations: Api<ExternalRegistration> = Api::namespaced(client.clone(), NS);
    let ours = |counts: &BTreeMap<String, usize>| -> usize {
        counts
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{}-", case.prefix)))
            .map(|(_, n)| n)
            .sum()
    };
    let start = Instant::now();
    futures::stream::iter(0..case.names)
        .map(|n| {
            let registrations = registrations.clone();
            async move {
                let r: ExternalRegistration = serde_json::from_value(json!({
                    "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
                    "metadata": {"name": name_of(n)},
                    "spec": {"catalogRef": {"name": "external"}, "direction": "Import",
                             "externalName": name_of(n)},
                }))?;
                registrations.create(&PostParams::default(), &r).await?;
                Ok::<(), anyhow::Error>(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    localenv::eventually(
        "all imported endpoints in slices",
        Duration::from_secs(600),
        || async { Ok((ours(&imported_endpoints(&slices).await?) == total).then_some(())) },
    )
    .await
    .with_context(|| cb.log())?;
    let took = start.elapsed();

    // Floor: the same endpoints written as EndpointSlices by a plain writer.
    let floor_slices: Vec<EndpointSlice> = instances
        .chunk_by(|a, b| a.name == b.name)
        .flat_map(|same| same.chunks(100).enumerate())
        .map(|(c, chunk)| {
            serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("floor-{}-{c}", chunk[0].name), "labels": {
                    "kubernetes.io/service-name": format!("floor-{}", chunk[0].name),
                    "endpointslice.kubernetes.io/managed-by": "bench"}},
                "addressType": "IPv4",
                "ports": [{"name": "port-5432", "port": 5432, "protocol": "TCP"}],
                "endpoints": chunk.iter().map(|i| json!({"addresses": [i.address.to_string()], "conditions": {"ready": true}})).collect::<Vec<_>>(),
            }))
            .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let start = Instant::now();
    futures::stream::iter(floor_slices)
        .map(|slice| {
            let slices = slices.clone();
            async move {
                let name = slice.metadata.name.clone().unwrap_or_default();
                slices
                    .patch(
                        &name,
                        &PatchParams::apply("bench").force(),
                        &Patch::Apply(&slice),
                    )
                    .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let floor = start.elapsed();

    // Single changes: one key of the first name deleted, then put back.
    let first = name_of(0);
    let count_first = || async {
        let lp = kube::api::ListParams::default()
            .labels(&format!("kubernetes.io/service-name={first}"))
            .match_any();
        Ok::<usize, anyhow::Error>(
            slices
                .list(&lp)
                .await?
                .items
                .iter()
                .map(|s| s.endpoints.len())
                .sum(),
        )
    };
    let first_records = registrant.render(&instances[..case.per_name]);
    let mut delays = Vec::new();
    for i in 0..20 {
        let (key, record) = first_records
            .iter()
            .nth(i / 2)
            .map(|(k, r)| (k.clone(), r.clone()))
            .context("a key of the first name")?;
        let (op, want) = if i % 2 == 0 {
            (Op::Delete { key }, case.per_name - 1)
        } else {
            (Op::Put { key, record }, case.per_name)
        };
        let start = Instant::now();
        registrant.apply(&[op]).await?;
        loop {
            if count_first().await? == want {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "change {i} not imported"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        delays.push(start.elapsed());
    }
    delays.sort();
    let (rss, peak) = memory(cb)?;
    Ok(format!(
        "| {}: {} x {} instances | {:.2} s | {:.2} s | {:.2}x | {:.1} / {:.1} ms | {rss:.0} / {peak:.0} MiB |",
        case.label,
        case.names,
        case.per_name,
        took.as_secs_f64(),
        floor.as_secs_f64(),
        took.as_secs_f64() / floor.as_secs_f64(),
        ms(percentile(&delays, 0.5)),
        ms(percentile(&delays, 0.99)),
    ))
}

/// Endpoints flipped in a churn storm.
const STORM: usize = 1000;

/// A churn storm: the first endpoint of [`STORM`] Services turns unready, the patches sent
/// within about a second (16 at a time), then ready again the same way. For each direction:
/// the time from the first patch until the controller reports the catalog in step (its
/// `catalog_bridge_entries`, then checked with the reader on every flipped name), and the
/// controller's CPU seconds over both, per 1,000 changes.
async fn churn_storm(
    client: &kube::Client,
    cb: &Controller,
    reader: &dyn Backend,
) -> Result<(Duration, Duration, f64)> {
    use futures::{StreamExt, TryStreamExt};
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let services: Vec<usize> = (0..STORM).map(|i| i * service_count() / STORM).collect();
    let total = service_count() * ENDPOINTS;
    let cpu_before = cpu_seconds(cb)?;
    let mut took = Vec::new();
    for ready in [false, true] {
        let want = if ready { total } else { total - STORM };
        let start = Instant::now();
        futures::stream::iter(services.iter().copied())
            .map(|s| {
                let slices = slices.clone();
                async move {
                    slices
                        .patch(
                            &format!("{}-1", name(s)),
                            &PatchParams::default(),
                            &Patch::Merge(&json!({"endpoints": endpoints(s, ready)})),
                        )
                        .await
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        let sent = start.elapsed();
        localenv::eventually(
            "the catalog in step after the storm",
            Duration::from_secs(300),
            || async {
                let n = cb
                    .metric(
                        "catalog_bridge_entries",
                        &["catalog=\"bench\"", "direction=\"export\""],
                    )
                    .await?;
                Ok((n == want as f64).then_some(()))
            },
        )
        .await
        .with_context(|| cb.log())?;
        took.push(start.elapsed());
        eprintln!(
            "  storm of {STORM} (ready: {ready}): patches sent in {:.2} s, catalog in step after {:.2} s",
            sent.as_secs_f64(),
            start.elapsed().as_secs_f64()
        );
        let per_name = if ready { ENDPOINTS } else { ENDPOINTS - 1 };
        for &s in &services {
            let got = reader.lookup(&name(s)).await?.len();
            anyhow::ensure!(
                got == per_name,
                "after the storm {} has {got} entries",
                name(s)
            );
        }
    }
    let cpu = cpu_seconds(cb)? - cpu_before;
    Ok((took[0], took[1], cpu / (2 * STORM) as f64 * 1000.0))
}

/// The controller's CPU time so far (user and system), from /proc.
fn cpu_seconds(cb: &Controller) -> Result<f64> {
    let pid = cb.process.pid().context("the controller runs")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (in parentheses, which may hold spaces): utime and stime
    // are the 14th and 15th fields of the line, the 12th and 13th after it.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .context("utime and stime")?
        .iter()
        .map(|f| f.parse::<f64>())
        .sum::<Result<f64, _>>()?;
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Ok(ticks / 100.0)
}

/// The desired-state step after one readiness change: by the changed slice's key (what the
/// controller does), over every object with the memo (after a relist), and from scratch; p50
/// of each over 30 changes, as a table row.
fn desired_state_bench() -> Result<String> {
    use catalog_bridge::api::crd::{ExternalCatalog, ExternalRegistration};
    use catalog_bridge::export::desired::{
        Desired, Inputs, Memo, Objects, compute, compute_with, update,
    };
    use catalog_bridge::runtime::changed::Changed;
    struct ByKey {
        services: HashMap<(String, String), Arc<CachedService>>,
        slices: HashMap<(String, String), Arc<CachedSlice>>,
    }
    impl Objects for ByKey {
        fn service(&self, ns: &str, name: &str) -> Option<Arc<CachedService>> {
            self.services.get(&(ns.into(), name.into())).cloned()
        }
        fn slice(&self, ns: &str, name: &str) -> Option<Arc<CachedSlice>> {
            self.slices.get(&(ns.into(), name.into())).cloned()
        }
        fn registration(&self, _: &str, _: &str) -> Option<Arc<ExternalRegistration>> {
            None
        }
    }
    let services: Vec<Arc<CachedService>> = (0..service_count())
        .map(|s| {
            serde_json::from_value(json!({
                "metadata": {"namespace": NS, "name": name(s), "resourceVersion": "1",
                             "annotations": {"catalog-bridge.io/export": "bench"}},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
            }))
            .map(Arc::new)
        })
        .collect::<Result<_, _>>()?;
    let slice = |s: usize, version: usize, first_ready: bool| -> Result<Arc<CachedSlice>> {
        Ok(Arc::new(serde_json::from_value(json!({
            "metadata": {"namespace": NS, "name": format!("{}-1", name(s)),
                         "resourceVersion": version.to_string(),
                         "labels": {"kubernetes.io/service-name": name(s)}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints(s, first_ready),
        }))?))
    };
    let mut slices: Vec<Arc<CachedSlice>> = (0..service_count())
        .map(|s| slice(s, 1, true))
        .collect::<Result<_>>()?;
    let catalogs: Vec<Arc<ExternalCatalog>> = vec![Arc::new(serde_json::from_value(json!({
        "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
        "metadata": {"name": "bench"}, "spec": {"consul": {"addresses": ["http://127.0.0.1:1"]}},
    }))?)];
    let mut objects = ByKey {
        services: (services.iter())
            .map(|s| {
                (
                    (NS.to_string(), s.metadata.name.clone().unwrap_or_default()),
                    s.clone(),
                )
            })
            .collect(),
        slices: HashMap::new(),
    };
    let base = Inputs {
        services: &services,
        slices: &[],
        catalogs: &catalogs,
        registrations: &[],
        namespaces: &[],
    };
    let (mut by_key, mut relisted) = (Memo::default(), Memo::default());
    for memo in [&mut by_key, &mut relisted] {
        let _ = compute_with(
            Inputs {
                slices: &slices,
                ..base
            },
            memo,
        );
    }
    let (mut keyed, mut listed, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..30 {
        let s = (i * 37) % service_count();
        slices[s] = slice(s, 2 + i, i % 2 == 1)?;
        let key = (NS.to_string(), format!("{}-1", name(s)));
        objects.slices.insert(key.clone(), slices[s].clone());
        let mut changed = Changed::default();
        changed.slices.insert(key);
        let t = Instant::now();
        let a = update(&objects, &changed, &mut by_key);
        keyed.push(t.elapsed());
        let inputs = Inputs {
            slices: &slices,
            ..base
        };
        let t = Instant::now();
        let b = compute_with(inputs, &mut relisted);
        listed.push(t.elapsed());
        let t = Instant::now();
        let c: Desired = compute(inputs);
        scratch.push(t.elapsed());
        anyhow::ensure!(
            a == c && b == c,
            "the incremental results differ from the one from scratch"
        );
    }
    for v in [&mut keyed, &mut listed, &mut scratch] {
        v.sort();
    }
    let p50 = |v: &[Duration]| ms(percentile(v, 0.5));
    Ok(format!(
        "| desired state after one readiness change, {} instances | by the changed key p50: {:.3} ms | every object read, memo kept (a relist) p50: {:.2} ms | from scratch p50: {:.2} ms |",
        service_count() * ENDPOINTS,
        p50(&keyed),
        p50(&listed),
        p50(&scratch),
    ))
}

/// The controller's resident memory now and at its peak (VmRSS, VmHWM), in MiB.
fn memory(cb: &Controller) -> Result<(f64, f64)> {
    let pid = cb.process.pid().context("the controller runs")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = (status.lines())
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kib: f64 = (line.split_whitespace().nth(1))
            .context("a number")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The unchanged restart (on the last catalog), then the export table.
async fn export_report(
    env: &localenv::Env,
    cb: Controller,
    rows: Vec<String>,
    idle_rss: f64,
) -> Result<()> {
    eprintln!("unchanged restart (ZooKeeper, the last catalog)...");
    cb.process.stop()?;
    let cb2 = Controller::start(env, "cb2", "bench", &["--drift-interval=60s"]).await?;
    localenv::eventually(
        "the restarted controller in sync",
        Duration::from_secs(120),
        || async {
            let n = cb2
                .metric(
                    "catalog_bridge_entries",
                    &["catalog=\"bench\"", "direction=\"export\""],
                )
                .await?;
            Ok((n == (service_count() * ENDPOINTS) as f64).then_some(()))
        },
    )
    .await
    .with_context(|| cb2.log())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restart_writes = cb2
        .metric("catalog_bridge_backend_operations_total", &[])
        .await?;
    let consul_view = ConsulView::new(env.consul()?.url())?;
    let consul_left = consul_view.node_services("k8s-bench").await?.len();

    println!();
    println!(
        "export of {} Services x {ENDPOINTS} endpoints = {} instances; floor = the catalog's backend alone, same run",
        service_count(),
        service_count() * ENDPOINTS
    );
    println!(
        "| catalog | convergence from empty | floor | ratio | flip p50 / p99 | of which Kubernetes (patch -> watch event), p50 | floor flip p50 / p99 | ratio p50 / p99 | storm of {STORM} flips, unready / ready: until in step | controller CPU per 1,000 changes | controller RSS after convergence / peak so far |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!(
        "| unchanged restart (ZooKeeper session re-attached) | {restart_writes} entries written | | | | | | | | | |"
    );
    println!("(Consul entries left after the catalog pointing there was deleted: {consul_left})");
    println!(
        "(controller RSS with the caches of {} Services and their EndpointSlices synced, before any catalog: {idle_rss:.0} MiB)",
        service_count()
    );
    Ok(())
}

/// The controller's allocator: the in-memory steps are timed as the controller runs them (with
/// glibc's, the desired-state step after the bench's own large frees took 9 ms instead of 0.1).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> Result<()> {
    eprintln!("desired state, incremental and from scratch...");
    let desired_row = desired_state_bench()?;
    eprintln!("  {desired_row}");
    eprintln!("starting the API server, Consul, etcd and ZooKeeper...");
    let env = localenv::Env::builder()
        .kube()
        .consul()
        .etcd()
        .zookeeper()
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;

    // BENCH_CATALOGS=etcd,zookeeper: only those (by the start of their label, any case);
    // `import` for the import scenarios.
    let chosen = std::env::var("BENCH_CATALOGS").unwrap_or_default();
    let chosen: Vec<String> = (chosen.split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    let export_targets: Vec<Target> = targets(&env)?
        .into_iter()
        .filter(|t| {
            chosen.is_empty()
                || chosen
                    .iter()
                    .any(|c| t.label.to_ascii_lowercase().starts_with(c))
        })
        .collect();
    let with_import = chosen.is_empty() || chosen.iter().any(|c| c == "import");
    if !export_targets.is_empty() {
        eprintln!(
            "creating {} Services x {ENDPOINTS} endpoints...",
            service_count()
        );
        let t = Instant::now();
        create_objects(&client).await?;
        eprintln!("  created in {:?}", t.elapsed());
    }

    let cb = Controller::spawn(&env, "cb", "bench", &["--drift-interval=60s"])?;
    cb.wait_ready().await?;
    let mut rows = Vec::new();
    let mut previous: Option<Target> = None;
    let (rss, peak) = memory(&cb)?;
    eprintln!(
        "controller RSS with every cache synced, before any catalog: {rss:.0} MiB (peak {peak:.0} MiB)"
    );
    let idle_rss = rss;
    let exported = !export_targets.is_empty();
    for target in export_targets {
        if let Some(p) = previous.take() {
            // Deleting the catalog removes what it wrote; the next one starts from empty.
            eprintln!("{}: deleting the catalog, which empties it...", p.label);
            env.kube()?
                .kubectl(&["delete", "externalcatalog", "bench"])?;
            localenv::eventually(
                "the deleted catalog emptied",
                Duration::from_secs(300),
                || async {
                    let mut left = 0;
                    for s in [0, service_count() / 2, service_count() - 1] {
                        left += p.reader.lookup(&name(s)).await?.len();
                    }
                    Ok((left == 0).then_some(()))
                },
            )
            .await
            .with_context(|| cb.log())?;
        }
        eprintln!("{}: floor writer, 1, 2, 4 and 8 in flight...", target.label);
        let (floor_time, floor_trips, floor_n, floor_tries) = floor_converge(&target).await?;
        eprintln!("{}: floor {floor_tries}", target.label);

        eprintln!("{}: controller convergence from empty...", target.label);
        let writes_before = cb
            .metric("catalog_bridge_backend_requests_total", &OK_WRITES)
            .await?;
        // Created through the API (not kubectl, whose start-up and discovery are no part of
        // the controller's time); the clock also notes when the first Service is in the
        // catalog (what comes before is the controller's work before it writes).
        let catalog: catalog_bridge::api::crd::ExternalCatalog = serde_json::from_value(json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "bench"}, "spec": target.spec,
        }))?;
        let catalogs: Api<catalog_bridge::api::crd::ExternalCatalog> = Api::all(client.clone());
        let start = Instant::now();
        catalogs.create(&PostParams::default(), &catalog).await?;
        let first_write = std::sync::OnceLock::new();
        localenv::eventually("all entries in place", Duration::from_secs(900), || async {
            let n = cb
                .metric(
                    "catalog_bridge_entries",
                    &["catalog=\"bench\"", "direction=\"export\""],
                )
                .await?;
            let writes = cb
                .metric("catalog_bridge_backend_requests_total", &OK_WRITES)
                .await?;
            if first_write.get().is_none() && !target.reader.lookup(&name(0)).await?.is_empty() {
                let _ = first_write.set(start.elapsed());
            }
            Ok((n == (service_count() * ENDPOINTS) as f64 && writes > writes_before).then_some(()))
        })
        .await
        .with_context(|| cb.log())?;
        let converge = start.elapsed();
        let first_write = first_write.get().copied().unwrap_or(converge);
        eprintln!(
            "{}: converged in {:.2} s; the first Service was in the catalog after {:.2} s (read every 50 ms)",
            target.label,
            converge.as_secs_f64(),
            first_write.as_secs_f64()
        );
        let trips = cb
            .metric("catalog_bridge_backend_requests_total", &OK_WRITES)
            .await?
            - writes_before;
        for s in [0, service_count() / 2, service_count() - 1] {
            let got = target.reader.lookup(&name(s)).await?.len();
            anyhow::ensure!(
                got == ENDPOINTS,
                "{}: {} has {got} entries",
                target.label,
                name(s)
            );
        }

        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss, peak) = memory(&cb)?;
        eprintln!(
            "{}: controller RSS {rss:.0} MiB, peak so far {peak:.0} MiB",
            target.label
        );
        eprintln!("{}: readiness flips...", target.label);
        let (ours, k8s) = flips(&client, target.reader.as_ref()).await?;
        let floor = floor_flips(&target).await?;
        eprintln!("{}: churn storm...", target.label);
        let (storm_down, storm_up, cpu_per_1000) =
            churn_storm(&client, &cb, target.reader.as_ref()).await?;
        rows.push(format!(
            "| {} | {:.2} s ({trips} round trips) | {:.2} s ({floor_trips}, {floor_n} in flight) | {:.2}x | {:.1} / {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.2}x / {:.2}x | {:.2} / {:.2} s | {cpu_per_1000:.2} s | {rss:.0} / {peak:.0} MiB |",
            target.label,
            converge.as_secs_f64(),
            floor_time.as_secs_f64(),
            converge.as_secs_f64() / floor_time.as_secs_f64(),
            ms(percentile(&ours, 0.5)),
            ms(percentile(&ours, 0.99)),
            ms(percentile(&k8s, 0.5)),
            ms(percentile(&floor, 0.5)),
            ms(percentile(&floor, 0.99)),
            ms(percentile(&ours, 0.5)) / ms(percentile(&floor, 0.5)),
            ms(percentile(&ours, 0.99)) / ms(percentile(&floor, 0.99)),
            storm_down.as_secs_f64(),
            storm_up.as_secs_f64(),
        ));
        // Each row as soon as it is measured: a long run that fails later keeps it.
        eprintln!("  {}", rows.last().map(String::as_str).unwrap_or(""));
        previous = Some(target);
    }

    let mut import_rows = Vec::new();
    if with_import {
        // Created with the exported objects, unless the import runs alone.
        support::ensure_namespace(&client, NS).await?;
    }
    for case in import_cases().into_iter().filter(|_| with_import) {
        eprintln!(
            "import, {}: {} x {} instances registered in etcd by another owner...",
            case.label, case.names, case.per_name
        );
        import_rows.push(import_bench(&env, &client, &cb, &case).await?);
        eprintln!("  {}", import_rows.last().map(String::as_str).unwrap_or(""));
    }

    if exported {
        export_report(&env, cb, rows, idle_rss).await?;
    }
    println!();
    println!(
        "import from etcd (plain layout, another owner's lease), one ExternalRegistration per name; floor = the same endpoints written as EndpointSlices directly, 16 requests in flight"
    );
    println!(
        "| import | until the EndpointSlices hold all | floor | ratio | one change, p50 / p99 | controller RSS after / peak so far |"
    );
    println!("|---|---|---|---|---|---|");
    for r in import_rows {
        println!("{r}");
    }
    println!();
    println!("{desired_row}");
    Ok(())
}
