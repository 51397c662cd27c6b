//! `make bench`: export to Consul at scale, measured against a floor run in the same process.
//!
//! 1. Convergence from empty: 1,000 Services × 10 endpoints already in the cluster, the
//!    controller starts, and the clock runs until Consul holds all 10,000 instances. The floor
//!    is a plain batched writer (the Consul backend alone, 64 operations per `/v1/txn`) writing
//!    the same 10,000 instances to the same Consul. Reported as a ratio.
//! 2. Propagation of readiness flips: an EndpointSlice endpoint flips ready/unready, and the
//!    clock runs until `/v1/health/service/<name>?passing` reflects it; p50 and p99.
//! 3. An unchanged restart of the controller: Consul writes counted (they should be 0).
//!
//! EndpointSlices are written directly (selector-less Services, as any slice producer would),
//! so the benchmark measures catalog-bridge, not kube-controller-manager.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use catalog_bridge::backend::Backend;
use catalog_bridge::backend::consul::{Consul, ConsulConfig};
use catalog_bridge::model::{Instance, Origin};
use catalog_bridge::plan::Op;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use support::{ConsulView, Controller, consul_catalog, kubectl_apply};

const SERVICES: usize = 1000;
const ENDPOINTS: usize = 10;
const FLIPS: usize = 60;
const NS: &str = "bench";

fn ip(svc: usize, ep: usize) -> String {
    format!("10.{}.{}.{}", 100 + svc / 250, svc % 250, ep + 1)
}

async fn create_objects(client: &kube::Client) -> Result<()> {
    support::ensure_namespace(client, NS).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let mut pending = Vec::new();
    for s in 0..SERVICES {
        let name = format!("svc-{s:04}");
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"catalog-bridge.io/export": "consul"}},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))?;
        let endpoints: Vec<_> = (0..ENDPOINTS)
            .map(|e| json!({"addresses": [ip(s, e)], "conditions": {"ready": true}}))
            .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-1"), "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "bench.catalog-bridge.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
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

async fn count_on_node(consul: &ConsulView, node: &str) -> Result<usize> {
    Ok(consul.node_services(node).await?.len())
}

async fn wait_count(consul: &ConsulView, node: &str, want: usize, timeout: Duration) -> Result<()> {
    localenv::eventually(&format!("{want} instances on {node}"), timeout, || async {
        Ok((count_on_node(consul, node).await? == want).then_some(()))
    })
    .await
}

fn floor_backend(consul_url: &str) -> Result<Consul> {
    Consul::new(ConsulConfig {
        addresses: vec![consul_url.to_string()],
        node_name: "floor".into(),
        owner: "floor".into(),
        ..Default::default()
    })
}

/// The floor of a flip: one instance deleted or put by the Consul backend alone, timed until
/// the health endpoint shows it, exactly as the controller's flips are timed.
async fn floor_flips(consul_url: &str, consul: &ConsulView) -> Result<Vec<Duration>> {
    let backend = floor_backend(consul_url)?;
    let owned = backend.read_owned().await?;
    let mut delays = Vec::new();
    for i in 0..FLIPS {
        let target = (i / 2) % SERVICES;
        let name = format!("floor-{target:04}");
        let id = owned
            .iter()
            .find(|(_, r)| {
                r["Service"]["Service"] == name.as_str()
                    && r["Service"]["Address"] == ip(target, 0).as_str()
            })
            .map(|(k, r)| (k.clone(), r.clone()))
            .context("floor instance")?;
        let (op, want) = if i % 2 == 1 {
            (
                Op::Put {
                    key: id.0,
                    record: id.1,
                },
                ENDPOINTS,
            )
        } else {
            (Op::Delete { key: id.0 }, ENDPOINTS - 1)
        };
        let t = Instant::now();
        backend.apply(&[op]).await?;
        while consul.passing(&name).await?.len() != want {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "floor flip {i} not seen"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        delays.push(t.elapsed());
    }
    delays.sort();
    Ok(delays)
}

/// The floor: the same instances written by the Consul backend alone, in 64-op transactions.
async fn floor(consul_url: &str) -> Result<(Duration, usize)> {
    let backend = floor_backend(consul_url)?;
    let instances: Vec<Instance> = (0..SERVICES)
        .flat_map(|s| {
            (0..ENDPOINTS).map(move |e| Instance {
                name: format!("floor-{s:04}"),
                address: ip(s, e).parse().expect("bench ip"),
                port: 8080,
                origin: Origin {
                    namespace: NS.into(),
                    service: format!("svc-{s:04}"),
                },
                tags: vec![],
                meta: BTreeMap::new(),
            })
        })
        .collect();
    let ops: Vec<Op> = backend
        .render(&instances)
        .into_iter()
        .map(|(key, record)| Op::Put { key, record })
        .collect();
    let t = Instant::now();
    let trips = backend.apply(&ops).await?;
    Ok((t.elapsed(), trips))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    eprintln!("starting the API server and Consul...");
    let env = localenv::Env::builder().kube().consul().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    let consul_url = env.consul()?.url();
    let consul = ConsulView::new(consul_url.clone())?;
    kubectl_apply(
        &env,
        &consul_catalog("consul", std::slice::from_ref(&consul_url), "k8s-bench"),
    )?;

    eprintln!("creating {SERVICES} Services x {ENDPOINTS} endpoints...");
    let t = Instant::now();
    create_objects(&client).await?;
    eprintln!("  created in {:?}", t.elapsed());

    eprintln!("floor: plain batched writer...");
    let (floor_time, floor_trips) = floor(&consul_url).await?;
    wait_count(
        &consul,
        "floor",
        SERVICES * ENDPOINTS,
        Duration::from_secs(60),
    )
    .await?;

    eprintln!("controller: convergence from empty...");
    let t = Instant::now();
    let cb = Controller::spawn(&env, "cb", "bench", &["--drift-interval=30s"])?;
    wait_count(
        &consul,
        "k8s-bench",
        SERVICES * ENDPOINTS,
        Duration::from_secs(600),
    )
    .await
    .with_context(|| cb.log())?;
    let converge = t.elapsed();
    let trips = cb
        .metric("catalog_bridge_backend_requests_total", &["op=\"write\""])
        .await?;

    eprintln!("readiness flips...");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let mut delays = Vec::new();
    for i in 0..FLIPS {
        // Each service in turn: its first endpoint turns unready, then ready again.
        let target = (i / 2) % SERVICES;
        let ready = i % 2 == 1;
        let name = format!("svc-{target:04}");
        let endpoints: Vec<_> = (0..ENDPOINTS)
            .map(
                |e| json!({"addresses": [ip(target, e)], "conditions": {"ready": e != 0 || ready}}),
            )
            .collect();
        let want = if ready { ENDPOINTS } else { ENDPOINTS - 1 };
        let t = Instant::now();
        slices
            .patch(
                &format!("{name}-1"),
                &PatchParams::default(),
                &Patch::Merge(&json!({"endpoints": endpoints})),
            )
            .await?;
        loop {
            if consul.passing(&name).await?.len() == want {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("flip {i} of {name} not seen in 30 s\n{}", cb.log());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        delays.push(t.elapsed());
    }
    delays.sort();

    eprintln!("floor flips...");
    let floor_delays = floor_flips(&consul_url, &consul).await?;

    eprintln!("unchanged restart...");
    let before = consul.node_services("k8s-bench").await?;
    cb.process.stop()?;
    let cb2 = Controller::start(&env, "cb2", "bench", &["--drift-interval=30s"]).await?;
    localenv::eventually(
        "the restarted controller to lead",
        Duration::from_secs(60),
        || async { Ok(cb2.is_leader().await.then_some(())) },
    )
    .await?;
    localenv::eventually(
        "its first read of Consul",
        Duration::from_secs(60),
        || async {
            let reads = cb2
                .metric("catalog_bridge_backend_requests_total", &["op=\"read\""])
                .await?;
            Ok((reads >= 1.0).then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restart_writes = cb2
        .metric("catalog_bridge_backend_operations_total", &[])
        .await?;
    let after = consul.node_services("k8s-bench").await?;
    let rewritten = before
        .iter()
        .filter(|(id, v)| after.get(*id) != Some(v))
        .count();

    println!();
    println!(
        "export to Consul, {SERVICES} Services x {ENDPOINTS} endpoints = {} instances",
        SERVICES * ENDPOINTS
    );
    println!("| measure | catalog-bridge | floor (plain batched writer) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| convergence from empty | {:.2} s ({trips} txns) | {:.2} s ({floor_trips} txns) | {:.2}x |",
        converge.as_secs_f64(),
        floor_time.as_secs_f64(),
        converge.as_secs_f64() / floor_time.as_secs_f64()
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99) = (percentile(&delays, 0.5), percentile(&delays, 0.99));
    let (f50, f99) = (
        percentile(&floor_delays, 0.5),
        percentile(&floor_delays, 0.99),
    );
    println!(
        "| readiness flip -> Consul, p50 / p99 of {FLIPS} | {:.1} ms / {:.1} ms | {:.1} ms / {:.1} ms | {:.2}x / {:.2}x |",
        ms(p50),
        ms(p99),
        ms(f50),
        ms(f99),
        ms(p50) / ms(f50),
        ms(p99) / ms(f99)
    );
    println!(
        "| unchanged restart: entries written / rewritten | {restart_writes} / {rewritten} of {} | | |",
        before.len()
    );
    Ok(())
}
