//! The etcd backend against a real etcd 3.6, read back with etcdctl, etcd's own client: each
//! layout reads back exactly as rendered (so a restart writes nothing) and in the form its
//! readers take; writes go in transactions of at most 128 operations; keys of others (no lease,
//! another lease) are never touched; a restarted controller reuses the lease; a lost lease is
//! replaced and the keys are put again; a stopped etcd gives errors that name it and the backend
//! works again when it returns; a dead controller's keys expire after the lease TTL.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use catalog_bridge::api::crd::EtcdLayout;
use catalog_bridge::backend::etcd::{Etcd, EtcdConfig, MAX_PLAN_OPS_PER_TXN, MAX_TXN_OPS, batches};
use catalog_bridge::backend::{Backend, BackendError, ClientCert, Record};
use catalog_bridge::export::Snapshot;
use catalog_bridge::export::plan::{Op, plan};
use catalog_bridge::export::writer::{Config as WriterConfig, Writer};
use catalog_bridge::model::{DesiredCatalog, Instance, Origin};
use catalog_bridge::runtime::metrics::Metrics;
use localenv::{Env, Scope};
use serde_json::Value;
use tokio::sync::OnceCell;

/// One etcd shared by the tests of this binary (each test uses its own base path, owner and
/// catalog); a test that stops etcd or enables authentication builds its own.
async fn shared_etcd() -> Result<&'static Env> {
    static ENV: OnceCell<Env> = OnceCell::const_new();
    ENV.get_or_try_init(|| async { Env::builder().etcd().start().await })
        .await
        .context("starting the shared etcd")
}

struct Setup {
    endpoints: Vec<String>,
    layout: EtcdLayout,
    base: Option<String>,
    owner: String,
    catalog: String,
    ttl: Duration,
}

impl Setup {
    fn new(endpoint: &str, scope: &Scope, layout: EtcdLayout) -> Setup {
        let base = match layout {
            EtcdLayout::Plain => Some(format!("/{}/services", scope.prefix)),
            EtcdLayout::Naming => None,
            EtcdLayout::Coredns => Some(format!("/{}/skydns", scope.prefix)),
        };
        Setup {
            endpoints: vec![endpoint.to_string()],
            layout,
            base,
            owner: format!("cluster-{}", scope.prefix),
            catalog: format!("etcd-{}", scope.prefix),
            ttl: Duration::from_secs(5),
        }
    }

    fn backend(&self) -> Result<Etcd> {
        Etcd::new(EtcdConfig {
            endpoints: self.endpoints.clone(),
            lease_ttl: self.ttl,
            layout: self.layout,
            base_path: self.base.clone(),
            owner: self.owner.clone(),
            catalog: self.catalog.clone(),
            ..Default::default()
        })
    }
}

fn instance(name: &str, ip: &str, port: u16) -> Instance {
    Instance {
        name: name.into(),
        address: ip.parse::<IpAddr>().expect("test address"),
        port,
        origin: Origin {
            namespace: "shop".into(),
            service: "api-x".into(),
        }
        .into(),
        tags: vec!["v2".into()].into(),
        meta: BTreeMap::from([("version".to_string(), "2".to_string())]).into(),
    }
}

fn many(name: &str, n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| instance(name, &format!("10.2.{}.{}", i / 200, i % 200 + 1), 8080))
        .collect()
}

fn puts(records: &BTreeMap<String, Record>) -> Vec<Op> {
    plan(records, &BTreeMap::<String, Record>::new()).ops
}

/// Standard base64, as etcdctl's JSON output encodes keys and values.
fn base64(s: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => bail!("not base64: {s:?}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// A key as etcdctl sees it.
#[derive(Debug, Clone, PartialEq)]
struct Kv {
    key: String,
    value: String,
    lease: i64,
}

/// Every key under `prefix`, through `etcdctl get --prefix -w json`.
fn etcdctl_kvs(env: &Env, prefix: &str) -> Result<Vec<Kv>> {
    let out = env
        .etcd()?
        .etcdctl(&["get", "--prefix", prefix, "-w", "json"])?;
    let v: Value = serde_json::from_str(out.trim()).with_context(|| format!("etcdctl: {out}"))?;
    let mut kvs = Vec::new();
    for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let text = |f: &str| -> Result<String> {
            Ok(String::from_utf8(base64(
                kv[f].as_str().unwrap_or_default(),
            )?)?)
        };
        kvs.push(Kv {
            key: text("key")?,
            value: text("value")?,
            lease: kv["lease"].as_i64().unwrap_or(0),
        });
    }
    Ok(kvs)
}

/// The values under `prefix`, through `etcdctl get --prefix --print-value-only`, sorted.
fn etcdctl_values(env: &Env, prefix: &str) -> Result<Vec<String>> {
    let out = env
        .etcd()?
        .etcdctl(&["get", "--prefix", prefix, "--print-value-only"])?;
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    Ok(v)
}

fn marker_value(env: &Env, backend: &Etcd) -> Result<String> {
    Ok(env
        .etcd()?
        .etcdctl(&["get", "--print-value-only", backend.marker_key()])?
        .trim()
        .to_string())
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn host_ports(instances: &[Instance]) -> Vec<String> {
    sorted(instances.iter().map(Instance::host_port).collect())
}

async fn lease_of(b: &Etcd) -> Result<i64> {
    b.lease_id().await.context("the backend has a lease")
}

/// Writes `instances` from nothing, checks that what is read back is what was rendered, that a
/// second plan and a restarted controller's plan are empty, and that every key is attached to
/// the backend's lease.
async fn roundtrip(env: &Env, setup: &Setup, instances: &[Instance]) -> Result<Etcd> {
    let b = setup.backend()?;
    let desired = b.render(instances);
    assert_eq!(desired.len(), instances.len());
    assert!(b.read_owned().await?.is_empty(), "nothing owned yet");
    let first = plan(&desired, &b.read_owned().await?);
    assert_eq!(first.creates, instances.len());
    assert_eq!(b.apply(&first.ops).await?, 1, "one transaction");
    let read = b.read_owned().await?;
    assert_eq!(read, desired, "what etcd holds is what was rendered");
    assert!(plan(&desired, &read).is_empty(), "nothing to write again");

    let lease = lease_of(&b).await?;
    assert_eq!(marker_value(env, &b)?, lease.to_string());
    let restarted = setup.backend()?;
    assert!(plan(&restarted.render(instances), &restarted.read_owned().await?).is_empty());
    assert_eq!(
        lease_of(&restarted).await?,
        lease,
        "the restart reuses the lease"
    );

    let prefix = if b.prefix().is_empty() {
        // naming without a base path: the names' directories.
        format!("{}/", instances[0].name)
    } else {
        b.prefix().to_string()
    };
    let kvs = etcdctl_kvs(env, &prefix)?;
    ensure!(!kvs.is_empty(), "etcdctl sees keys under {prefix}");
    for kv in &kvs {
        assert_eq!(kv.lease, lease, "{} is attached to the lease", kv.key);
        assert_eq!(
            desired.get(&kv.key).and_then(|r| r["value"].as_str()),
            Some(kv.value.as_str())
        );
    }
    Ok(b)
}

/// Updates and deletes land, and only the changed keys are written.
async fn change_and_delete(env: &Env, b: &Etcd, instances: &[Instance]) -> Result<()> {
    let mut changed = instances.to_vec();
    let gone = changed.pop().context("instances")?;
    changed[0].tags = vec!["canary".into()].into();
    let desired = b.render(&changed);
    let p = plan(&desired, &b.read_owned().await?);
    assert_eq!(p.deletes, 1);
    b.apply(&p.ops).await?;
    assert_eq!(b.read_owned().await?, desired);
    let (gone_key, _) = b.entry(&gone);
    assert!(
        etcdctl_kvs(env, &gone_key)?.is_empty(),
        "{gone_key} deleted"
    );
    Ok(())
}

/// plain: `etcdctl get --prefix <base>/api_x/providers/` returns exactly the `ip:port` values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_layout_reads_back_and_a_prefix_get_returns_host_ports() -> Result<()> {
    let env = shared_etcd().await?;
    let etcd = env.etcd()?;
    let scope = env.scope("etcd-plain").await?;
    let setup = Setup::new(&etcd.endpoint(), &scope, EtcdLayout::Plain);
    let api = vec![
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.2", 8080),
        instance("api_x", "fd00::1", 8080),
    ];
    let mut all = api.clone();
    all.push(instance("memcache", "10.0.0.4", 11211));
    let b = roundtrip(env, &setup, &all).await?;
    let base = setup.base.clone().context("base")?;

    assert_eq!(
        etcdctl_values(env, &format!("{base}/api_x/providers/"))?,
        ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::1]:8080"]
    );
    assert_eq!(
        etcdctl_values(env, &format!("{base}/memcache/providers/"))?,
        ["10.0.0.4:11211"]
    );
    let keys: Vec<String> = etcdctl_kvs(env, &format!("{base}/api_x/"))?
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        keys,
        [
            format!("{base}/api_x/providers/10.0.0.1:8080"),
            format!("{base}/api_x/providers/10.0.0.2:8080"),
            format!("{base}/api_x/providers/[fd00::1]:8080"),
        ]
    );
    assert_eq!(b.lookup("api_x").await?, host_ports(&api));

    let info = b.probe().await?;
    println!("probe: {info:?}");
    assert!(info.cluster_id.as_deref().is_some_and(|c| !c.is_empty()));
    assert_eq!(info.members, [etcd.url()]);
    assert!(
        info.version
            .as_deref()
            .is_some_and(|v| v.starts_with("3.6")),
        "{info:?}"
    );
    assert_eq!(info.leader.as_deref(), Some("etcd"));
    assert_eq!(info.address, Some(etcd.endpoint()));

    change_and_delete(env, &b, &all).await
}

/// naming: keys `<name>/<addr>` without a leading slash, values whose `Op` is the number 0 and
/// whose `Addr` is the address, as the gRPC resolver and the endpoints manager read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naming_layout_writes_endpoint_manager_updates() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("etcd-naming").await?;
    let setup = Setup::new(&env.etcd()?.endpoint(), &scope, EtcdLayout::Naming);
    let name = scope.name("api_x");
    let instances = vec![
        instance(&name, "10.0.0.1", 8080),
        instance(&name, "10.0.0.2", 8080),
        instance(&name, "fd00::1", 8080),
    ];
    let b = roundtrip(env, &setup, &instances).await?;
    let kvs = etcdctl_kvs(env, &format!("{name}/"))?;
    assert_eq!(kvs.len(), 3);
    let mut addrs = Vec::new();
    for kv in &kvs {
        assert!(!kv.key.starts_with('/'), "{}", kv.key);
        let v: Value = serde_json::from_str(&kv.value).context("a naming value is JSON")?;
        assert!(v["Op"].is_number(), "Op is a number: {}", kv.value);
        assert_eq!(v["Op"].as_u64(), Some(0));
        let addr = v["Addr"].as_str().context("Addr")?.to_string();
        assert_eq!(kv.key, format!("{name}/{addr}"));
        assert_eq!(v["Metadata"]["owner"].as_str(), Some(setup.owner.as_str()));
        addrs.push(addr);
    }
    assert_eq!(sorted(addrs), host_ports(&instances));
    assert_eq!(
        env.etcd()?.resolve(&name)?,
        host_ports(&instances),
        "etcd's gRPC resolver reads them"
    );
    assert_eq!(b.lookup(&name).await?, host_ports(&instances));
    change_and_delete(env, &b, &instances).await?;
    assert_eq!(
        env.etcd()?.resolve(&name)?,
        host_ports(&instances[..2]),
        "and no longer the one deleted"
    );
    Ok(())
}

/// coredns: lower-case keys `/skydns/<zone reversed>/<namespace>/<name>/<id>`, and every value
/// under the prefix parses as JSON with host and port (one bad value fails a CoreDNS query).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coredns_layout_writes_lower_case_keys_and_json_values() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("etcd-coredns").await?;
    let setup = Setup::new(&env.etcd()?.endpoint(), &scope, EtcdLayout::Coredns);
    let instances = vec![
        instance("API_x", "10.0.0.1", 8080),
        instance("API_x", "10.0.0.2", 8080),
        instance("API_x", "fd00::1", 8080),
    ];
    let b = roundtrip(env, &setup, &instances).await?;
    let base = setup.base.clone().context("base")?;
    let kvs = etcdctl_kvs(env, &format!("{base}/"))?;
    assert_eq!(kvs.len(), 3);
    let dir = format!("{base}/local/bridge/shop/api-x/");
    let mut found = Vec::new();
    for kv in &kvs {
        assert_eq!(kv.key, kv.key.to_lowercase(), "lower case");
        let id = kv.key.strip_prefix(&dir).context("under the name's path")?;
        assert!(!id.is_empty() && !id.contains('/'), "{}", kv.key);
        let v: Value = serde_json::from_str(&kv.value).context("a coredns value is JSON")?;
        let host: IpAddr = v["host"].as_str().context("host")?.parse()?;
        let port = v["port"].as_u64().context("port")?;
        assert_eq!(v["ttl"].as_u64(), Some(30));
        found.push(std::net::SocketAddr::new(host, u16::try_from(port)?).to_string());
    }
    assert_eq!(sorted(found), host_ports(&instances));
    for name in ["api_x.shop", "api-x.shop.bridge.local.", "API_x"] {
        assert_eq!(b.lookup(name).await?, host_ports(&instances), "{name}");
    }
    change_and_delete(env, &b, &instances).await
}

/// 300 instances go in transactions of at most 128 operations, all of them present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instances_are_written_in_transactions_of_at_most_128_operations() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("etcd-bulk").await?;
    let setup = Setup::new(&env.etcd()?.endpoint(), &scope, EtcdLayout::Plain);
    let b = setup.backend()?;
    let instances = many("bulk", 300);
    let desired = b.render(&instances);
    let ops = puts(&desired);
    let sizes: Vec<usize> = batches(&ops).iter().map(|b| b.len()).collect();
    // Each put is guarded by nested transactions that etcd counts against the same limit.
    assert_eq!(sizes, [125, 125, 50]);
    assert!(sizes.iter().all(|s| *s <= MAX_PLAN_OPS_PER_TXN));
    assert_eq!(MAX_PLAN_OPS_PER_TXN, MAX_TXN_OPS - 3);

    let t = Instant::now();
    let txns = b.apply(&ops).await?;
    println!("300 puts in {txns} transactions, {:?}", t.elapsed());
    assert_eq!(txns, 3);
    assert_eq!(b.read_owned().await?, desired);
    let base = setup.base.clone().context("base")?;
    assert_eq!(
        etcdctl_values(env, &format!("{base}/bulk/providers/"))?.len(),
        300
    );

    // Deleting them all: 300 deletes, 3 transactions again.
    let p = plan(&BTreeMap::new(), &b.read_owned().await?);
    assert_eq!(b.apply(&p.ops).await?, 3);
    assert!(etcdctl_kvs(env, &format!("{base}/"))?.is_empty());
    Ok(())
}

/// Keys without a lease or with another lease under the same prefix are not read as ours and
/// survive a plan that deletes everything ours; a put onto such a key leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_others_are_never_touched() -> Result<()> {
    let env = shared_etcd().await?;
    let etcd = env.etcd()?;
    let scope = env.scope("etcd-foreign").await?;
    let setup = Setup::new(&etcd.endpoint(), &scope, EtcdLayout::Plain);
    let base = setup.base.clone().context("base")?;
    let b = setup.backend()?;

    let no_lease = format!("{base}/api_x/providers/10.9.9.9:1");
    etcdctl_put(env, &no_lease, "10.9.9.9:1", None)?;
    let grant = etcd.etcdctl(&["lease", "grant", "120"])?;
    let other_lease = grant
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("etcdctl lease grant said {grant:?}"))?
        .to_string();
    let leased = format!("{base}/api_x/providers/10.9.9.8:1");
    etcdctl_put(env, &leased, "10.9.9.8:1", Some(&other_lease))?;
    // Someone registered 10.0.0.3:8080 by hand, at the very key this controller would use.
    let contested = format!("{base}/api_x/providers/10.0.0.3:8080");
    etcdctl_put(env, &contested, "hand-made", None)?;

    let instances = vec![
        instance("api_x", "10.0.0.1", 8080),
        instance("api_x", "10.0.0.3", 8080),
    ];
    let desired = b.render(&instances);
    assert!(
        b.read_owned().await?.is_empty(),
        "foreign keys are not ours"
    );
    b.apply(&puts(&desired)).await?;
    let owned = b.read_owned().await?;
    assert_eq!(
        owned.keys().cloned().collect::<Vec<_>>(),
        [format!("{base}/api_x/providers/10.0.0.1:8080")],
        "only the key this controller could write is ours"
    );
    let value_of = |key: &str| -> Result<Option<Kv>> {
        Ok(etcdctl_kvs(env, key)?.into_iter().find(|kv| kv.key == key))
    };
    assert_eq!(
        value_of(&contested)?.map(|kv| (kv.value, kv.lease)),
        Some(("hand-made".to_string(), 0)),
        "the hand-made key is left as it was"
    );

    // Delete everything owned, and also (as a stale plan would) the foreign keys.
    let mut ops = plan(&BTreeMap::new(), &owned).ops;
    for key in [&no_lease, &leased, &contested] {
        ops.push(Op::Delete { key: key.clone() });
    }
    b.apply(&ops).await?;
    assert!(b.read_owned().await?.is_empty());
    let left: Vec<String> = etcdctl_kvs(env, &format!("{base}/"))?
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, [contested.clone(), leased.clone(), no_lease.clone()]);
    Ok(())
}

fn etcdctl_put(env: &Env, key: &str, value: &str, lease: Option<&str>) -> Result<()> {
    let lease_arg = lease.map(|l| format!("--lease={l}"));
    let mut args = vec!["put"];
    if let Some(l) = &lease_arg {
        args.push(l);
    }
    // `--` so that values starting with '-' are not flags.
    args.extend(["--", key, value]);
    env.etcd()?.etcdctl(&args)?;
    Ok(())
}

/// Polls `f` every 100 ms until it returns true, for at most `limit`.
async fn until(limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let t = Instant::now();
    loop {
        if f()? {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!("condition not met within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A restarted controller (a second backend with the same owner and catalog) finds the lease in
/// the marker, reuses it and plans nothing; the keys never disappear, also after the first
/// backend is gone for longer than the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_reuses_the_lease_and_writes_nothing() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("etcd-restart").await?;
    let setup = Setup::new(&env.etcd()?.endpoint(), &scope, EtcdLayout::Plain);
    let base = setup.base.clone().context("base")?;
    let instances = many("api_x", 5);
    let first = setup.backend()?;
    let desired = first.render(&instances);
    first.apply(&puts(&desired)).await?;
    let lease = lease_of(&first).await?;

    let second = setup.backend()?;
    let read = second.read_owned().await?;
    assert_eq!(read, desired);
    assert!(plan(&second.render(&instances), &read).is_empty());
    assert_eq!(lease_of(&second).await?, lease);
    assert_eq!(marker_value(env, &second)?, lease.to_string());

    // The first controller is gone; the second keeps the lease alive.
    drop(first);
    let t = Instant::now();
    while t.elapsed() < setup.ttl * 2 {
        let kvs = etcdctl_kvs(env, &format!("{base}/"))?;
        assert_eq!(kvs.len(), 5, "keys never disappear ({:?})", t.elapsed());
        assert!(kvs.iter().all(|kv| kv.lease == lease));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(second.read_owned().await?, desired);
    Ok(())
}

/// What this owner holds is read in pages, never in one response that grows with the catalog:
/// 100,000 entries, whose key names alone pass the 4 MiB a gRPC response may carry (a lease's
/// key list did, so a restarted controller could not read its state back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_state_larger_than_one_response_is_read_back_after_a_restart() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("etcd-large").await?;
    let mut setup = Setup::new(&env.etcd()?.endpoint(), &scope, EtcdLayout::Plain);
    setup.ttl = Duration::from_secs(30);
    let instances: Vec<Instance> = (0..100)
        .flat_map(|s| {
            (0..1000).map(move |i| {
                instance(
                    &format!("service-with-a-long-enough-name-{s:03}"),
                    &format!("10.{}.{}.{}", s, i / 250, i % 250 + 1),
                    8080,
                )
            })
        })
        .collect();
    let first = setup.backend()?;
    let desired = first.render(&instances);
    let t = Instant::now();
    let txns = first.apply(&puts(&desired)).await?;
    println!(
        "{} entries written in {txns} transactions in {:?}",
        desired.len(),
        t.elapsed()
    );
    let key_bytes: usize = desired.keys().map(String::len).sum();
    ensure!(
        key_bytes > 4 * 1024 * 1024,
        "the key names ({key_bytes} bytes) pass one response's 4 MiB"
    );

    let second = setup.backend()?;
    let t = Instant::now();
    let read = second.read_owned().await?;
    println!("read back after a restart in {:?}", t.elapsed());
    ensure!(
        read.len() == desired.len(),
        "read {} of {}",
        read.len(),
        desired.len()
    );
    ensure!(read == desired, "read back as rendered");
    ensure!(plan(&second.render(&instances), &read).is_empty());
    // Clean up: 100,000 keys would slow every other test of the shared etcd.
    second.apply(&plan(&BTreeMap::new(), &read).ops).await?;
    Ok(())
}

/// Revoking the lease (as its expiry would) removes the keys; the keep-alive notices, a new
/// lease is granted, `invalidations()` moves, nothing is owned any more, and putting everything
/// again (what the writer does) brings the keys back on the new lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_replaced_and_the_keys_are_put_again() -> Result<()> {
    let env = shared_etcd().await?;
    let etcd = env.etcd()?;
    let scope = env.scope("etcd-lost").await?;
    let setup = Setup::new(&etcd.endpoint(), &scope, EtcdLayout::Plain);
    let base = setup.base.clone().context("base")?;
    let b = setup.backend()?;
    let mut invalidations = b.invalidations().context("etcd reports lost leases")?;
    let desired = b.render(&many("api_x", 20));
    b.apply(&puts(&desired)).await?;
    let old = lease_of(&b).await?;
    let seen = *invalidations.borrow_and_update();

    etcd.etcdctl(&["lease", "revoke", &format!("{old:x}")])?;
    assert!(
        etcdctl_kvs(env, &format!("{base}/"))?.is_empty(),
        "keys gone"
    );
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), invalidations.changed())
        .await
        .context("invalidations moved in time")??;
    println!("lost lease noticed after {:?}", t.elapsed());
    assert_eq!(*invalidations.borrow_and_update(), seen + 1);
    let new = lease_of(&b).await?;
    assert_ne!(new, old);
    assert_eq!(marker_value(env, &b)?, new.to_string());

    let read = b.read_owned().await?;
    assert!(
        read.is_empty(),
        "the old lease's keys are not ours: {read:?}"
    );
    let p = plan(&desired, &read);
    assert_eq!(p.creates, 20);
    b.apply(&p.ops).await?;
    let kvs = etcdctl_kvs(env, &format!("{base}/"))?;
    assert_eq!(kvs.len(), 20);
    assert!(kvs.iter().all(|kv| kv.lease == new), "on the new lease");
    assert_eq!(b.read_owned().await?, desired);
    Ok(())
}

/// A write on a lease revoked a moment ago fails, the lease is replaced, `invalidations()`
/// moves, and the re-read is empty, so the writer puts everything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_a_revoked_lease_regrants_it() -> Result<()> {
    let env = shared_etcd().await?;
    let etcd = env.etcd()?;
    let scope = env.scope("etcd-revoked-write").await?;
    let mut setup = Setup::new(&etcd.endpoint(), &scope, EtcdLayout::Plain);
    // A long TTL: the keep-alive (every 10 s) does not notice before the write does.
    setup.ttl = Duration::from_secs(30);
    let b = setup.backend()?;
    let mut invalidations = b.invalidations().context("invalidations")?;
    let desired = b.render(&many("api_x", 3));
    b.apply(&puts(&desired)).await?;
    let old = lease_of(&b).await?;
    invalidations.borrow_and_update();

    etcd.etcdctl(&["lease", "revoke", &format!("{old:x}")])?;
    let more = b.render(&many("api_x", 4));
    let p = plan(&more, &desired);
    assert_eq!(p.creates, 1);
    match b.apply(&p.ops).await {
        Err(BackendError::Rejected(m)) => {
            println!("write on a revoked lease: {m}");
            assert!(m.contains("lease"), "{m}");
        }
        other => panic!("expected a Rejected error, got {other:?}"),
    }
    assert!(invalidations.has_changed()?, "invalidations moved");
    assert_ne!(lease_of(&b).await?, old);
    let read = b.read_owned().await?;
    assert!(read.is_empty());
    b.apply(&plan(&more, &read).ops).await?;
    assert_eq!(b.read_owned().await?, more);
    Ok(())
}

/// A stopped etcd gives Unreachable errors naming every endpoint, a dead endpoint before a live
/// one is skipped, and everything works again once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_etcd_is_named_and_the_backend_recovers() -> Result<()> {
    let env = Env::builder().etcd().start().await?;
    let etcd = env.etcd()?;
    let scope = env.scope("etcd-down").await?;
    let mut setup = Setup::new(&etcd.endpoint(), &scope, EtcdLayout::Plain);
    // A dead endpoint first: failover to the live one.
    setup.endpoints = vec!["127.0.0.1:1".to_string(), etcd.endpoint()];
    let base = setup.base.clone().context("base")?;
    let b = setup.backend()?;
    let mut invalidations = b.invalidations().context("invalidations")?;
    let instances = many("api_x", 10);
    let desired = b.render(&instances);
    b.apply(&puts(&desired)).await?;
    assert_eq!(b.read_owned().await?, desired);
    assert_eq!(b.probe().await?.address, Some(etcd.endpoint()));
    invalidations.borrow_and_update();

    etcd.stop()?;
    let t = Instant::now();
    for (what, r) in [
        ("read_owned", b.read_owned().await.map(|_| ())),
        ("apply", b.apply(&puts(&desired)).await.map(|_| ())),
        ("probe", b.probe().await.map(|_| ())),
        ("lookup", b.lookup("api_x").await.map(|_| ())),
    ] {
        match r {
            Err(BackendError::Unreachable(m)) => {
                println!("{what} with etcd stopped: {m}");
                assert!(m.contains(&etcd.endpoint()), "{m}");
                assert!(m.contains("127.0.0.1:1"), "{m}");
            }
            other => panic!("{what}: expected Unreachable, got {other:?}"),
        }
    }
    println!("4 calls failed in {:?}", t.elapsed());
    // Down for longer than the TTL.
    tokio::time::sleep(setup.ttl + Duration::from_secs(2)).await;
    etcd.start_again().await?;

    // Back: the lease survived (etcd renews leases when a leader is elected) or was replaced
    // (then invalidations moved and everything is put again, as the writer would).
    let t = Instant::now();
    let read = loop {
        match b.read_owned().await {
            Ok(r) => break r,
            Err(e) if t.elapsed() < Duration::from_secs(20) => {
                println!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let replaced = invalidations.has_changed()?;
    println!(
        "etcd back after {:?}: lease {}, {} key(s) owned",
        t.elapsed(),
        if replaced { "replaced" } else { "survived" },
        read.len()
    );
    if replaced {
        assert!(read.is_empty());
    } else {
        assert_eq!(read, desired);
    }
    b.apply(&plan(&desired, &read).ops).await?;
    assert_eq!(b.read_owned().await?, desired);
    assert_eq!(
        etcdctl_values(&env, &format!("{base}/api_x/providers/"))?,
        host_ports(&instances)
    );
    // The keep-alive runs again: the keys outlive the TTL.
    tokio::time::sleep(setup.ttl + Duration::from_secs(1)).await;
    assert_eq!(b.read_owned().await?, desired);

    // A hung etcd (paused: it holds its socket and answers nothing) times out and is named.
    invalidations.borrow_and_update();
    etcd.process().pause()?;
    let t = Instant::now();
    match b.read_owned().await {
        Err(BackendError::Unreachable(m)) => {
            println!("read_owned with etcd paused, after {:?}: {m}", t.elapsed());
            assert!(
                m.contains(&format!("{} (no answer within", etcd.endpoint())),
                "{m}"
            );
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // Frozen for longer than the TTL: the lease expires when etcd runs again (no leader
    // election renews it this time), the backend grants a new one and the keys are put again.
    tokio::time::sleep(setup.ttl).await;
    etcd.process().resume()?;
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), invalidations.changed())
        .await
        .context("the lease expired during the pause is replaced")??;
    println!(
        "expired lease replaced {:?} after etcd resumed",
        t.elapsed()
    );
    let read = b.read_owned().await?;
    assert!(read.is_empty(), "{read:?}");
    b.apply(&plan(&desired, &read).ops).await?;
    assert_eq!(b.read_owned().await?, desired);
    let lease = lease_of(&b).await?;
    assert!(
        etcdctl_kvs(&env, &format!("{base}/"))?
            .iter()
            .all(|kv| kv.lease == lease)
    );
    Ok(())
}

/// A dead controller (the backend dropped: no more keep-alives) loses its keys after about the
/// lease TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_controllers_keys_expire_after_the_ttl() -> Result<()> {
    let env = shared_etcd().await?;
    let scope = env.scope("etcd-dead").await?;
    let setup = Setup::new(&env.etcd()?.endpoint(), &scope, EtcdLayout::Plain);
    let base = setup.base.clone().context("base")?;
    let b = setup.backend()?;
    b.apply(&puts(&b.render(&many("api_x", 5)))).await?;
    // Keep-alives for a while, so that expiry is measured from a renewed lease.
    tokio::time::sleep(setup.ttl).await;
    assert_eq!(etcdctl_kvs(env, &format!("{base}/"))?.len(), 5);
    drop(b);
    let gone = until(setup.ttl * 3, || {
        Ok(etcdctl_kvs(env, &format!("{base}/"))?.is_empty())
    })
    .await?;
    println!(
        "keys of a dead controller gone {gone:?} after it stopped (lease TTL {:?})",
        setup.ttl
    );
    assert!(
        gone >= Duration::from_secs(1) && gone <= setup.ttl + Duration::from_secs(2),
        "{gone:?}"
    );
    Ok(())
}

/// A changed lease TTL: a new lease with the new TTL is granted, the keys read as being on the
/// previous lease, the plan rewrites them onto the new one (in transactions whose guards are
/// the deepest there are, still within etcd's limit), and no key ever disappears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_ttl_moves_the_keys_to_a_new_lease_without_a_gap() -> Result<()> {
    let env = shared_etcd().await?;
    let etcd = env.etcd()?;
    let scope = env.scope("etcd-ttl-change").await?;
    let mut setup = Setup::new(&etcd.endpoint(), &scope, EtcdLayout::Plain);
    let base = setup.base.clone().context("base")?;
    let instances = many("api_x", 130);
    let before = setup.backend()?;
    let desired = before.render(&instances);
    before.apply(&puts(&desired)).await?;
    let old = lease_of(&before).await?;
    drop(before);

    setup.ttl = Duration::from_secs(7);
    let after = setup.backend()?;
    let read = after.read_owned().await?;
    let new = lease_of(&after).await?;
    assert_ne!(new, old);
    assert_eq!(read.len(), 130);
    assert!(read.values().all(|r| r["lease"] == "previous"), "{read:?}");
    assert_eq!(etcdctl_kvs(env, &format!("{base}/"))?.len(), 130);
    let p = plan(&after.render(&instances), &read);
    assert_eq!((p.creates, p.updates, p.deletes), (0, 130, 0));
    assert_eq!(after.apply(&p.ops).await?, 2);
    let kvs = etcdctl_kvs(env, &format!("{base}/"))?;
    assert_eq!(kvs.len(), 130);
    assert!(kvs.iter().all(|kv| kv.lease == new));
    assert_eq!(after.read_owned().await?, desired, "plain records again");
    // The old lease is revoked once no key is left on it.
    let ttl = etcd.etcdctl(&["lease", "timetolive", &format!("{old:x}")])?;
    assert!(ttl.contains("already expired"), "{ttl}");
    let out = etcd.etcdctl(&["lease", "timetolive", &format!("{new:x}")])?;
    assert!(out.contains("granted with TTL(7s)"), "{out}");
    Ok(())
}

/// With authentication enabled: wrong or missing credentials are Unauthorized, the right ones
/// work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_used_and_refusals_are_unauthorized() -> Result<()> {
    let env = Env::builder().etcd().start().await?;
    let etcd = env.etcd()?;
    let scope = env.scope("etcd-auth").await?;
    let setup = Setup::new(&etcd.endpoint(), &scope, EtcdLayout::Plain);
    // Credentials for an etcd without authentication: connects without them.
    let relaxed = Etcd::new(EtcdConfig {
        endpoints: setup.endpoints.clone(),
        username: Some("someone".into()),
        password: Some("pw".into()),
        base_path: Some(format!("/{}/relaxed", scope.prefix)),
        owner: setup.owner.clone(),
        catalog: "relaxed".into(),
        ..Default::default()
    })?;
    let records = relaxed.render(&many("api_x", 1));
    relaxed.apply(&puts(&records)).await?;
    assert_eq!(relaxed.read_owned().await?, records);
    drop(relaxed);

    etcd.etcdctl(&["user", "add", "root", "--new-user-password=rootpw"])?;
    etcd.etcdctl(&["user", "grant-role", "root", "root"])?;
    etcd.etcdctl(&["auth", "enable"])?;
    let with = |user: Option<&str>, password: &str| {
        Etcd::new(EtcdConfig {
            endpoints: setup.endpoints.clone(),
            username: user.map(str::to_string),
            password: Some(password.to_string()),
            lease_ttl: setup.ttl,
            base_path: setup.base.clone(),
            owner: setup.owner.clone(),
            catalog: setup.catalog.clone(),
            ..Default::default()
        })
    };
    for (user, password) in [(Some("root"), "wrong"), (None, "")] {
        match with(user, password)?.read_owned().await {
            Err(BackendError::Unauthorized(m)) => println!("{user:?}: {m}"),
            other => panic!("{user:?}: expected Unauthorized, got {other:?}"),
        }
    }
    let b = with(Some("root"), "rootpw")?;
    let desired = b.render(&many("api_x", 2));
    b.apply(&puts(&desired)).await?;
    assert_eq!(b.read_owned().await?, desired);
    Ok(())
}

/// The real writer on the etcd backend: it converges, and after the lease is revoked behind its
/// back it puts every entry again on its own (the backend's `invalidations()`), with no drift
/// check to help (its interval is an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_puts_everything_again_after_a_lost_lease() -> Result<()> {
    let env = shared_etcd().await?;
    let etcd = env.etcd()?;
    let scope = env.scope("etcd-writer").await?;
    let setup = Setup::new(&etcd.endpoint(), &scope, EtcdLayout::Plain);
    let base = setup.base.clone().context("base")?;
    let backend = Arc::new(setup.backend()?);
    let instances = many("api_x", 30);
    let (desired_tx, desired_rx) = tokio::sync::watch::channel(Arc::new(Snapshot::new(
        std::sync::Arc::new(instances.iter().cloned().collect::<DesiredCatalog>()),
        None,
    )));
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(true);
    let mut cfg = WriterConfig::new("etcd-test");
    cfg.drift_interval = Duration::from_secs(3600);
    cfg.min_backoff = Duration::from_millis(50);
    let (writer, mut report) = Writer::new(
        cfg,
        backend.clone(),
        desired_rx,
        gate_rx,
        Arc::new(Metrics::new()),
    );
    let task = tokio::spawn(writer.run());
    let count = || -> Result<usize> { Ok(etcdctl_kvs(env, &format!("{base}/"))?.len()) };

    tokio::time::timeout(
        Duration::from_secs(10),
        report.wait_for(|r| r.in_sync && r.entries == 30),
    )
    .await
    .context("the writer converges")??;
    assert_eq!(count()?, 30);
    let old = lease_of(&backend).await?;

    etcd.etcdctl(&["lease", "revoke", &format!("{old:x}")])?;
    assert_eq!(count()?, 0);
    let back = until(Duration::from_secs(10), || Ok(count()? == 30)).await?;
    println!("entries back {back:?} after the lease was revoked");
    let new = lease_of(&backend).await?;
    assert_ne!(new, old);
    assert!(
        etcdctl_kvs(env, &format!("{base}/"))?
            .iter()
            .all(|kv| kv.lease == new)
    );
    task.abort();
    drop((desired_tx, gate_tx));
    Ok(())
}

/// An etcd that serves clients over TLS only and verifies them (`--client-cert-auth`): with its
/// CA and a client certificate the backend writes, reads (on its lease) and looks up as in plain
/// text, at `https://` and at a scheme-less endpoint alike; without the certificate, or trusting
/// another CA, nothing gets through and the error names the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_etcd_is_reached_with_its_ca_and_a_client_certificate() -> Result<()> {
    let env = Env::builder().etcd_tls().start().await?;
    let tls = env.tls()?;
    let endpoint = env.etcd()?.endpoint();
    let authority = endpoint
        .strip_prefix("https://")
        .with_context(|| format!("a TLS endpoint: {endpoint}"))?
        .to_string();
    let scope = env.scope("etcd-tls").await?;
    let setup = Setup::new(&endpoint, &scope, EtcdLayout::Plain);
    let client_cert = ClientCert {
        cert_pem: tls.client_cert_pem.clone(),
        key_pem: tls.client_key_pem.clone(),
    };
    let with = |endpoint: &str, ca: &[u8], cert: Option<&ClientCert>| {
        Etcd::new(EtcdConfig {
            endpoints: vec![endpoint.to_string()],
            lease_ttl: setup.ttl,
            base_path: setup.base.clone(),
            owner: setup.owner.clone(),
            catalog: setup.catalog.clone(),
            ca_pem: Some(ca.to_vec()),
            client_cert: cert.cloned(),
            ..Default::default()
        })
    };

    let b = with(&endpoint, &tls.ca_pem, Some(&client_cert))?;
    b.probe().await?;
    let desired = b.render(&many("api_x", 2));
    b.apply(&puts(&desired)).await?;
    assert_eq!(b.read_owned().await?, desired);
    let found = b.lookup("api_x").await?;
    assert_eq!(found.len(), 2, "{found:?}");
    // host:port with a CA means TLS: the same entries, on the same lease.
    let again = with(&authority, &tls.ca_pem, Some(&client_cert))?;
    assert_eq!(again.read_owned().await?, desired);

    for (what, refused, hint) in [
        (
            "without a client certificate",
            with(&endpoint, &tls.ca_pem, None)?,
            "tls.clientCertSecretRef",
        ),
        (
            "trusting another CA",
            with(&endpoint, &tls.other_ca_pem, Some(&client_cert))?,
            "tls.caSecretRef",
        ),
    ] {
        match refused.read_owned().await {
            Err(e @ (BackendError::Unreachable(_) | BackendError::Rejected(_))) => {
                println!("{what}: {e:?}");
                ensure!(
                    e.to_string().contains(&authority),
                    "{what}: the endpoint is named: {e}"
                );
                ensure!(
                    e.to_string().contains(hint),
                    "{what}: says what to set: {e}"
                );
            }
            other => bail!("{what}: expected the connection to fail, got {other:?}"),
        }
    }
    Ok(())
}
