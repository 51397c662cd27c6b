//! `make bench` (`make bench BENCH=external_dns` alone): catalog-bridge beside external-dns,
//! the peer that does the same job for CoreDNS, on one API server and one etcd.
//!
//! The workload: 1,000 headless Services × 10 endpoints, each endpoint a Pod (created through
//! the API, its status patched Running and Ready with the endpoint's IP: there is no kubelet)
//! listed in an EndpointSlice the bench writes with a `targetRef` to that Pod (there is no
//! kube-controller-manager: the slices are written as it would write them). external-dns
//! publishes only endpoints whose Pod it finds, so the Pods are needed; catalog-bridge reads the
//! slices alone.
//!
//! Both tools write CoreDNS's etcd layout into the same etcd, kept apart so that neither reads
//! nor removes the other's keys: external-dns under its default prefix `/skydns/`, zone
//! `xdns.bench.local` (its `--domain-filter`); catalog-bridge under base path `/skydns-cb`,
//! zone `cb.bench.local` (its ExternalCatalog, layout `coredns`). A CoreDNS serving both zones
//! would read each from its own path.
//!
//! Measured, both processes started at the same instant with every object already in the
//! cluster:
//! 1. Convergence from empty: from the start until etcd holds every endpoint (an etcd watch on
//!    each tool's prefix, every key whose value has a `host`; the time is when the watch
//!    delivered the last one), and how many keys and transactions that took.
//! 2. Readiness flips: the first endpoint of a Service turns unready in its EndpointSlice, then
//!    ready again; for each tool, the time from the patch until its etcd entry for that address
//!    disappears / appears (as delivered by the watch); p50 and p99.
//! 3. Idle: keys written under each prefix while nothing changes, over a window (default
//!    120 s, `XDNS_IDLE_SECS`), reported per hour.
//!
//! The external-dns binary comes from `tests/peers/external-dns.sh` (run by `make bench`; the
//! path is passed in `CB_EXTERNAL_DNS`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{Client as EtcdClient, EventType, WatchOptions};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use localenv::process::{Process, Spec};
use serde_json::{Value, json};
use support::{Controller, kubectl_apply};

const SERVICES: usize = 1000;
const ENDPOINTS: usize = 10;
const NS: &str = "bench";
const NODE: &str = "bench-node";
/// The ExternalCatalog the Services are annotated with.
const CATALOG: &str = "coredns-side";
const CB_BASE: &str = "/skydns-cb";
const CB_ZONE: &str = "cb.bench.local";
/// external-dns's default `--coredns-prefix`.
const XDNS_PREFIX: &str = "/skydns/";
const XDNS_ZONE: &str = "xdns.bench.local";
const XDNS_OWNER: &str = "bench";
/// How long either tool may take to converge, or to show one flip.
const CONVERGE_LIMIT: Duration = Duration::from_secs(900);
const FLIP_LIMIT: Duration = Duration::from_secs(180);

fn flips() -> usize {
    env_number("XDNS_FLIPS", 40)
}

fn idle_window() -> Duration {
    Duration::from_secs(env_number("XDNS_IDLE_SECS", 120) as u64)
}

fn env_number(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ip(svc: usize, ep: usize) -> String {
    format!("10.{}.{}.{}", 100 + svc / 250, svc % 250, ep + 1)
}

fn name(svc: usize) -> String {
    format!("svc-{svc:04}")
}

fn pod_name(svc: usize, ep: usize) -> String {
    format!("{}-{ep}", name(svc))
}

/// The EndpointSlice endpoints of service `s`, each pointing at its Pod, the first one ready or
/// not.
fn endpoints(s: usize, uids: &[String], first_ready: bool) -> Vec<Value> {
    uids.iter()
        .enumerate()
        .map(|(e, uid)| {
            json!({
                "addresses": [ip(s, e)],
                "conditions": {"ready": e != 0 || first_ready},
                "nodeName": NODE,
                "targetRef": {"kind": "Pod", "namespace": NS, "name": pod_name(s, e), "uid": uid},
            })
        })
        .collect()
}

/// One headless Service, its Pods (status patched Ready with their IPs) and its EndpointSlice.
/// Returns the Pods' UIDs.
async fn create_service(client: &kube::Client, s: usize) -> Result<Vec<String>> {
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let name = name(s);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {
            "catalog-bridge.io/export": CATALOG,
            "external-dns.kubernetes.io/hostname": format!("{name}.{NS}.{XDNS_ZONE}"),
        }},
        "spec": {"clusterIP": "None", "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))?;
    services
        .create(&PostParams::default(), &svc)
        .await
        .with_context(|| format!("creating Service {name}"))?;
    let mut uids = Vec::with_capacity(ENDPOINTS);
    for e in 0..ENDPOINTS {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": pod_name(s, e), "labels": {"app": name}},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "bench.invalid/app:1",
                     "ports": [{"name": "http", "containerPort": 8080}]}]},
        }))?;
        let created = pods
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating Pod {}", pod_name(s, e)))?;
        uids.push(created.metadata.uid.context("a created Pod has a UID")?);
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip(s, e),
            "podIPs": [{"ip": ip(s, e)}],
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True"},
            ],
        }});
        pods.patch_status(
            &pod_name(s, e),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .with_context(|| format!("patching the status of Pod {}", pod_name(s, e)))?;
    }
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-1"), "labels": {
            "kubernetes.io/service-name": name,
            "endpointslice.kubernetes.io/managed-by": "bench.catalog-bridge.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints(s, &uids, true),
    }))?;
    slices
        .create(&PostParams::default(), &slice)
        .await
        .with_context(|| format!("creating EndpointSlice {name}-1"))?;
    Ok(uids)
}

/// What one tool has in etcd, as its watch delivered it.
#[derive(Default)]
struct Seen {
    /// Key → the address in its value (keys without a `host`, TXT records, are not here).
    hosts: HashMap<String, String>,
    /// Address → how many keys hold it.
    per_address: HashMap<String, usize>,
    /// Address → when it last appeared or disappeared.
    changed: HashMap<String, Instant>,
    /// When every address of the workload was first present.
    complete: Option<Instant>,
    /// Keys written (puts and deletes) and transactions (distinct revisions).
    keys_written: u64,
    transactions: u64,
    last_revision: i64,
}

impl Seen {
    fn present(&self, address: &str) -> bool {
        self.per_address.get(address).copied().unwrap_or(0) > 0
    }

    fn count(&mut self, revision: i64) {
        self.keys_written += 1;
        if revision != self.last_revision {
            self.transactions += 1;
            self.last_revision = revision;
        }
    }

    fn put(&mut self, key: &str, value: &[u8], at: Instant) {
        let host = serde_json::from_slice::<Value>(value)
            .ok()
            .and_then(|v| v.get("host").and_then(Value::as_str).map(str::to_string))
            .filter(|h| !h.is_empty());
        self.delete(key, at);
        if let Some(host) = host {
            let n = self.per_address.entry(host.clone()).or_default();
            *n += 1;
            if *n == 1 {
                self.changed.insert(host.clone(), at);
            }
            self.hosts.insert(key.to_string(), host);
            if self.complete.is_none() && self.all_present() {
                self.complete = Some(at);
            }
        }
    }

    fn delete(&mut self, key: &str, at: Instant) {
        if let Some(host) = self.hosts.remove(key)
            && let Some(n) = self.per_address.get_mut(&host)
        {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&host);
                self.changed.insert(host, at);
            }
        }
    }

    fn all_present(&self) -> bool {
        self.per_address.len() >= SERVICES * ENDPOINTS
            && (0..SERVICES).all(|s| (0..ENDPOINTS).all(|e| self.present(&ip(s, e))))
    }

    /// Addresses held under a key that does not name their Service.
    fn misplaced(&self) -> usize {
        self.hosts
            .iter()
            .filter(|(key, host)| match service_of(host) {
                Some(s) => !key.contains(&format!("/{}/", name(s))),
                None => true,
            })
            .count()
    }
}

/// The service index an address of the workload belongs to.
fn service_of(address: &str) -> Option<usize> {
    let parts: Vec<usize> = address
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts[..] {
        [10, a, b, _] if a >= 100 => Some((a - 100) * 250 + b),
        _ => None,
    }
}

/// One tool's prefix, watched from the start.
struct Watched {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Watched {
    async fn start(etcd: &str, prefix: &str) -> Result<Watched> {
        let mut client = EtcdClient::connect([etcd], None)
            .await
            .with_context(|| format!("connecting to etcd at {etcd}"))?;
        let existing = client
            .get(
                prefix,
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only(),
                ),
            )
            .await?
            .count();
        if existing != 0 {
            bail!("{prefix} already holds {existing} keys; the bench starts from empty");
        }
        let mut stream = client
            .watch(prefix, Some(WatchOptions::new().with_prefix()))
            .await
            .with_context(|| format!("watching {prefix}"))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = {
            let seen = seen.clone();
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                while let Some(resp) = stream.message().await? {
                    let at = Instant::now();
                    let mut seen = lock(&seen);
                    for event in resp.events() {
                        let Some(kv) = event.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        seen.count(kv.mod_revision());
                        match event.event_type() {
                            EventType::Put => seen.put(&key, kv.value(), at),
                            EventType::Delete => seen.delete(&key, at),
                        }
                    }
                }
                bail!("the etcd watch on {prefix} ended")
            })
        };
        Ok(Watched { seen, task })
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        lock(&self.seen)
    }

    fn writes(&self) -> (u64, u64) {
        let s = self.seen();
        (s.keys_written, s.transactions)
    }

    /// Fails if the watch task ended (with its error).
    async fn check(&mut self) -> Result<()> {
        if self.task.is_finished() {
            return match (&mut self.task).await {
                Ok(Ok(())) => bail!("the etcd watch ended"),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e).context("the etcd watch task"),
            };
        }
        Ok(())
    }
}

fn lock(seen: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|e| e.into_inner())
}

/// One of the two tools: its process and what the watch saw of it.
struct Tool {
    label: &'static str,
    settings: String,
    watched: Watched,
    process: Process,
}

impl Tool {
    fn log(&self) -> String {
        self.process.log_tail(60)
    }

    /// Resident memory now (VmRSS) in MiB and CPU seconds used so far (user + system).
    fn usage(&self) -> Result<(f64, f64)> {
        let pid = self.process.pid().context("the process runs")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: f64 = (status.lines())
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .context("VmRSS in /proc/<pid>/status")?
            .parse()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("/proc/<pid>/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            Ok(fields
                .get(i)
                .context("a field of /proc/<pid>/stat")?
                .parse()?)
        };
        // utime and stime are fields 14 and 15; `rest` starts at field 3.
        let cpu = (ticks(11)? + ticks(12)?) / clock_ticks()?;
        Ok((kib / 1024.0, cpu))
    }
}

fn clock_ticks() -> Result<f64> {
    let out = localenv::run_tool(std::process::Command::new("getconf").arg("CLK_TCK"))?;
    Ok(out.trim().parse()?)
}

/// Waits until `tool` shows every endpoint; the time since `start`.
async fn converged(tool: &mut Tool, start: Instant) -> Result<Duration> {
    loop {
        tool.watched.check().await?;
        if let Some(at) = tool.watched.seen().complete {
            return Ok(at.saturating_duration_since(start));
        }
        if let Some(status) = tool.process.exit_status() {
            bail!("{} exited ({status}):\n{}", tool.label, tool.log());
        }
        if start.elapsed() > CONVERGE_LIMIT {
            let n = tool.watched.seen().per_address.len();
            bail!(
                "{}: {n} of {} endpoints in etcd after {CONVERGE_LIMIT:?}:\n{}",
                tool.label,
                SERVICES * ENDPOINTS,
                tool.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until neither tool has written anything for `quiet`.
async fn settle(tools: &[&Tool], quiet: Duration, limit: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last = tools.iter().map(|t| t.watched.writes()).collect::<Vec<_>>();
    let mut since = Instant::now();
    while since.elapsed() < quiet {
        if start.elapsed() > limit {
            bail!("the tools still write to etcd after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = tools.iter().map(|t| t.watched.writes()).collect::<Vec<_>>();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    Ok(())
}

/// The time from `start` until `tool`'s entry for `address` is `present` (or not).
async fn flipped(
    tool: &mut Tool,
    address: &str,
    present: bool,
    start: Instant,
) -> Result<Duration> {
    loop {
        tool.watched.check().await?;
        {
            let seen = tool.watched.seen();
            if seen.present(address) == present
                && let Some(at) = seen.changed.get(address).filter(|at| **at >= start)
            {
                return Ok(at.saturating_duration_since(start));
            }
        }
        if start.elapsed() > FLIP_LIMIT {
            bail!(
                "{}: {address} not {} within {FLIP_LIMIT:?}:\n{}",
                tool.label,
                if present { "published" } else { "removed" },
                tool.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted
        .get(i.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the table shows of one tool.
struct Row {
    converge: Duration,
    converge_writes: (u64, u64),
    flips: Vec<Duration>,
    flip_writes: (u64, u64),
    idle_per_hour: f64,
    rss: f64,
    cpu: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let xdns_bin = localenv::programs::lookup("CB_EXTERNAL_DNS").context(
        "the external-dns binary: `make bench` builds it (tests/peers/external-dns.sh prints its path)",
    )?;
    eprintln!("starting the API server and etcd...");
    let env = localenv::Env::builder().kube().etcd().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, NS).await?;

    eprintln!(
        "creating {SERVICES} headless Services x {ENDPOINTS} Pods (status Ready) and their EndpointSlices..."
    );
    let t = Instant::now();
    let uids: Vec<Vec<String>> = futures::stream::iter(0..SERVICES)
        .map(|s| {
            let client = client.clone();
            async move { create_service(&client, s).await }
        })
        .buffered(32)
        .try_collect()
        .await?;
    eprintln!("  created in {:.1} s", t.elapsed().as_secs_f64());

    let etcd = env.etcd()?;
    let cb_watch = Watched::start(&etcd.endpoint(), &format!("{CB_BASE}/")).await?;
    let xdns_watch = Watched::start(&etcd.endpoint(), XDNS_PREFIX).await?;
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": CATALOG},
            "spec": {"etcd": {"endpoints": [etcd.endpoint()], "layout": "coredns",
                              "basePath": CB_BASE, "zone": CB_ZONE}},
        }),
    )?;

    let xdns_args = [
        "--source=service".to_string(),
        "--provider=coredns".to_string(),
        "--registry=txt".to_string(),
        format!("--txt-owner-id={XDNS_OWNER}"),
        "--policy=sync".to_string(),
        "--events".to_string(),
        "--listen-endpoint-events".to_string(),
        "--publish-internal-services".to_string(),
        format!("--domain-filter={XDNS_ZONE}"),
    ];
    let xdns_spec = Spec::new("external-dns", &xdns_bin, env.dir())
        .env("ETCD_URLS", etcd.url())
        .arg(format!(
            "--kubeconfig={}",
            env.kube()?.kubeconfig_path().display()
        ))
        .arg(format!(
            "--metrics-address=127.0.0.1:{}",
            localenv::ports::free_port()?
        ))
        .args(xdns_args.iter());

    eprintln!("starting catalog-bridge and external-dns at once...");
    let start = Instant::now();
    let cb = Controller::spawn(&env, "catalog-bridge", "bench", &[])?;
    let xdns = Process::start(xdns_spec)?;
    let mut cb = Tool {
        label: "catalog-bridge",
        settings: format!(
            "release build, `run` defaults (`--drift-interval=30s`); ExternalCatalog etcd `layout: coredns`, `basePath: {CB_BASE}`, `zone: {CB_ZONE}`, lease TTL 15 s"
        ),
        watched: cb_watch,
        process: cb.process,
    };
    let mut xdns = Tool {
        label: "external-dns v0.23.0",
        settings: format!(
            "`{}`; defaults `--interval=1m --min-event-sync-interval=5s --coredns-prefix={XDNS_PREFIX}`",
            xdns_args.join(" ")
        ),
        watched: xdns_watch,
        process: xdns,
    };

    let cb_converge = converged(&mut cb, start).await?;
    let cb_converge_writes = cb.watched.writes();
    eprintln!(
        "  catalog-bridge: every endpoint in etcd after {:.2} s",
        cb_converge.as_secs_f64()
    );
    let xdns_converge = converged(&mut xdns, start).await?;
    let xdns_converge_writes = xdns.watched.writes();
    eprintln!(
        "  external-dns: every endpoint in etcd after {:.2} s",
        xdns_converge.as_secs_f64()
    );
    settle(
        &[&cb, &xdns],
        Duration::from_secs(10),
        Duration::from_secs(300),
    )
    .await?;
    for tool in [&cb, &xdns] {
        let seen = tool.watched.seen();
        let misplaced = seen.misplaced();
        anyhow::ensure!(
            misplaced == 0 && seen.hosts.len() == SERVICES * ENDPOINTS,
            "{}: {} address keys, {misplaced} of them not under their Service's name",
            tool.label,
            seen.hosts.len()
        );
    }
    let (cb_all, xdns_all) = (cb.watched.writes(), xdns.watched.writes());
    eprintln!(
        "  keys written until quiet: catalog-bridge {} ({} transactions), external-dns {} ({})",
        cb_all.0, cb_all.1, xdns_all.0, xdns_all.1
    );

    eprintln!("readiness flips ({})...", flips());
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let (mut cb_flips, mut xdns_flips) = (Vec::new(), Vec::new());
    let before = (cb.watched.writes(), xdns.watched.writes());
    for i in 0..flips() {
        let s = ((i / 2) * 37) % SERVICES;
        let ready = i % 2 == 1;
        let address = ip(s, 0);
        let start = Instant::now();
        slices
            .patch(
                &format!("{}-1", name(s)),
                &PatchParams::default(),
                &Patch::Merge(&json!({"endpoints": endpoints(s, &uids[s], ready)})),
            )
            .await
            .with_context(|| format!("flipping {}", name(s)))?;
        cb_flips.push(flipped(&mut cb, &address, ready, start).await?);
        xdns_flips.push(flipped(&mut xdns, &address, ready, start).await?);
        eprintln!(
            "  flip {i}: {} {} -> catalog-bridge {:.1} ms, external-dns {:.1} ms",
            name(s),
            if ready { "ready" } else { "unready" },
            ms(cb_flips[i]),
            ms(xdns_flips[i])
        );
    }
    settle(
        &[&cb, &xdns],
        Duration::from_secs(5),
        Duration::from_secs(120),
    )
    .await?;
    let per_flip = |now: (u64, u64), then: (u64, u64)| (now.0 - then.0, now.1 - then.1);
    let cb_flip_writes = per_flip(cb.watched.writes(), before.0);
    let xdns_flip_writes = per_flip(xdns.watched.writes(), before.1);
    cb_flips.sort();
    xdns_flips.sort();

    let idle = idle_window();
    eprintln!("idle window of {} s...", idle.as_secs());
    let before = (cb.watched.writes(), xdns.watched.writes());
    tokio::time::sleep(idle).await;
    cb.watched.check().await?;
    xdns.watched.check().await?;
    let per_hour =
        |now: (u64, u64), then: (u64, u64)| (now.0 - then.0) as f64 * 3600.0 / idle.as_secs_f64();
    let cb_idle = per_hour(cb.watched.writes(), before.0);
    let xdns_idle = per_hour(xdns.watched.writes(), before.1);
    let (cb_rss, cb_cpu) = cb.usage()?;
    let (xdns_rss, xdns_cpu) = xdns.usage()?;

    let rows = [
        (
            &cb,
            Row {
                converge: cb_converge,
                converge_writes: cb_converge_writes,
                flips: cb_flips,
                flip_writes: cb_flip_writes,
                idle_per_hour: cb_idle,
                rss: cb_rss,
                cpu: cb_cpu,
            },
        ),
        (
            &xdns,
            Row {
                converge: xdns_converge,
                converge_writes: xdns_converge_writes,
                flips: xdns_flips,
                flip_writes: xdns_flip_writes,
                idle_per_hour: xdns_idle,
                rss: xdns_rss,
                cpu: xdns_cpu,
            },
        ),
    ];
    let n = flips() as f64;
    println!();
    println!(
        "catalog-bridge beside external-dns: {SERVICES} headless Services x {ENDPOINTS} Pods, one API server, one etcd, both started at once"
    );
    println!(
        "| tool | settings | convergence from empty | etcd keys written (transactions) to converge | flip p50 / p99 ({} flips) | keys written per flip | idle etcd writes per hour ({} s window) | RSS / CPU s at the end |",
        flips(),
        idle.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (tool, r) in &rows {
        println!(
            "| {} | {} | {:.2} s | {} ({}) | {:.1} / {:.1} ms | {:.1} | {:.0} | {:.0} MiB / {:.1} s |",
            tool.label,
            tool.settings,
            r.converge.as_secs_f64(),
            r.converge_writes.0,
            r.converge_writes.1,
            ms(percentile(&r.flips, 0.5)),
            ms(percentile(&r.flips, 0.99)),
            r.flip_writes.0 as f64 / n,
            r.idle_per_hour,
            r.rss,
            r.cpu,
        );
    }
    let (ours, theirs) = (&rows[0].1, &rows[1].1);
    println!(
        "| ratio external-dns / catalog-bridge (goal: >= 10x on convergence and flips) | | {:.1}x | | {:.0}x / {:.0}x | | | |",
        theirs.converge.as_secs_f64() / ours.converge.as_secs_f64(),
        ms(percentile(&theirs.flips, 0.5)) / ms(percentile(&ours.flips, 0.5)),
        ms(percentile(&theirs.flips, 0.99)) / ms(percentile(&ours.flips, 0.99)),
    );
    println!(
        "(Kept apart: external-dns under its default prefix {XDNS_PREFIX}, zone {XDNS_ZONE}; catalog-bridge under {CB_BASE}/, zone {CB_ZONE}. Times are until an etcd watch on each prefix delivered the change; convergence counts from the two processes' start, caches included. Flips patch the EndpointSlice's `ready`; the Pods stay. Keys written count puts and deletes, TXT ownership records included.)"
    );
    drop(cb);
    drop(xdns);
    Ok(())
}
