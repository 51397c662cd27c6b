//! The safety valve of imports (SPEC §6.12): a catalog that had healthy instances of an
//! imported name and suddenly lists none of them (a Consul agent restarted empty, an etcd
//! prefix wiped by mistake) does not empty the Service at once. Its EndpointSlices keep the
//! endpoints for `spec.import.emptyHoldSeconds` (default 30 s), the registration says so
//! (`Synced=False`, reason `ImportHeld`) with a Warning Event and a metric, instances the
//! catalog lists again follow at once, and when the hold runs out the rest go, with an Event.
//! Real servers throughout: the controller binary, kube-apiserver, Consul, etcd.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use catalog_bridge::api::crd::{Condition, ExternalRegistration};
use kube::api::Api;
use localenv::Env;
use serde_json::{Value, json};
use support::{Controller, consul_catalog, kubectl_apply};

const WAIT: Duration = Duration::from_secs(30);
/// Longer than the default hold (30 s) plus a loaded machine.
const HOLD_WAIT: Duration = Duration::from_secs(120);

fn import(name: &str, catalog: &str, external: &str, extra: Value) -> Value {
    let mut spec = json!({"catalogRef": {"name": catalog}, "direction": "Import",
                          "externalName": external});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    json!({
        "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    })
}

/// Sorted `ip:port` of the ready endpoints in the EndpointSlices of Service `shop/<svc>`.
async fn endpoints(client: &kube::Client, svc: &str) -> Result<Vec<String>> {
    support::ready_endpoints(client, "shop", svc).await
}

async fn wait_endpoints(
    client: &kube::Client,
    svc: &str,
    want: &[&str],
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    localenv::eventually(
        &format!("Service {svc} endpoints {want:?}"),
        timeout,
        || async {
            let got = endpoints(client, svc).await?;
            if got == want {
                Ok(Some(start.elapsed()))
            } else {
                bail!("got {got:?}")
            }
        },
    )
    .await
}

/// Condition `type_` of registration `shop/name`, if it has one.
async fn condition(client: &kube::Client, name: &str, type_: &str) -> Result<Option<Condition>> {
    let regs: Api<ExternalRegistration> = Api::namespaced(client.clone(), "shop");
    Ok(regs
        .get(name)
        .await?
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_))
}

/// Waits until `Synced` of `shop/name` has `reason`; returns the condition.
async fn wait_synced_reason(
    client: &kube::Client,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> Result<Condition> {
    localenv::eventually(
        &format!("Synced reason {reason} on {name}"),
        timeout,
        || async {
            match condition(client, name, "Synced").await? {
                Some(c) if c.reason == reason => Ok(Some(c)),
                other => bail!(
                    "Synced is {other:?}; endpoints {:?}",
                    endpoints(client, name).await?
                ),
            }
        },
    )
    .await
}

/// `reason: note` of the Warning Events in `shop`.
fn warnings(env: &Env) -> Result<String> {
    env.kube()?.kubectl(&[
        "get",
        "events",
        "-n",
        "shop",
        "--field-selector",
        "type=Warning",
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.note}{.message}{\"\\n\"}{end}",
    ])
}

async fn wait_warning(env: &Env, reason: &str) -> Result<String> {
    localenv::eventually(&format!("a Warning Event {reason}"), WAIT, || async {
        let out = warnings(env)?;
        Ok(out
            .lines()
            .find(|l| l.starts_with(&format!("{reason}:")))
            .map(str::to_string))
    })
    .await
}

/// Endpoints seen, and when.
type Samples = Vec<(Duration, Vec<String>)>;

/// Samples the endpoints of a Service every 100 ms, with when each was seen.
struct Sampler {
    samples: Arc<Mutex<Samples>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(client: &kube::Client, svc: &str, from: Instant) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (client, svc, out) = (client.clone(), svc.to_string(), samples.clone());
        let task = tokio::spawn(async move {
            loop {
                if let Ok(e) = endpoints(&client, &svc).await
                    && let Ok(mut s) = out.lock()
                {
                    s.push((from.elapsed(), e));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Sampler { samples, task }
    }

    fn stop(self) -> Samples {
        self.task.abort();
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

async fn setup(env: &Env) -> Result<(kube::Client, Controller)> {
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, "shop").await?;
    if let Ok(consul) = env.consul() {
        kubectl_apply(env, &consul_catalog("consul", &[consul.url()], "k8s-test"))?;
    }
    if let Ok(etcd) = env.etcd() {
        kubectl_apply(
            env,
            &json!({
                "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
                "metadata": {"name": "etcd"},
                "spec": {"etcd": {"endpoints": [etcd.endpoint()]}},
            }),
        )?;
    }
    let cb = Controller::start(env, "cb", "cluster-a", &[]).await?;
    Ok((client, cb))
}

/// py-consul against the agent at `sys.argv[1]`.
fn py_consul(address: &str, script: &str) -> Result<String> {
    localenv::python(
        &format!(
            "import sys, consul\nhost, port = sys.argv[1].split(':')\nc = consul.Consul(host=host, port=int(port))\n{script}\n"
        ),
        &[address],
    )
}

/// Registers instance `id` of `name` at `ip:7070` with a passing TTL check.
fn register_as(address: &str, name: &str, id: &str, ip: &str) -> Result<()> {
    py_consul(
        address,
        &format!(
            "c.agent.service.register('{name}', service_id='{id}', address='{ip}', port=7070, check=consul.Check.ttl('10m'))\n\
             c.agent.check.ttl_pass('service:{id}')"
        ),
    )?;
    Ok(())
}

/// Registers instance `id` of `pay_h` at `ip:7070` with a passing TTL check.
fn register(address: &str, id: &str, ip: &str) -> Result<()> {
    register_as(address, "pay_h", id, ip)
}

/// A Consul dev agent restarted keeps nothing: every instance of `pay_h` disappears at once.
/// The Service keeps its three endpoints and says why; an instance registered during the hold
/// is added at once; the originals registered again leave the hold; the one that never comes
/// back goes when the hold (default 30 s) runs out.
#[tokio::test]
async fn a_consul_agent_restarted_empty_does_not_empty_the_imported_service() -> Result<()> {
    let env = Env::builder().kube().consul().start().await?;
    let (client, cb) = setup(&env).await?;
    let consul = env.consul()?;
    let addr = consul.address();
    let originals = ["10.20.0.1:7070", "10.20.0.2:7070", "10.20.0.3:7070"];
    for (i, ip) in ["10.20.0.1", "10.20.0.2", "10.20.0.3"].iter().enumerate() {
        register(&addr, &format!("pay_h-{i}"), ip)?;
    }
    kubectl_apply(&env, &import("pay-h", "consul", "pay_h", json!({})))?;
    wait_endpoints(&client, "pay-h", &originals, WAIT)
        .await
        .with_context(|| cb.log())?;

    consul.stop()?;
    consul.start_again().await?;
    let wiped = Instant::now();
    let sampler = Sampler::start(&client, "pay-h", wiped);
    let held = wait_synced_reason(&client, "pay-h", "ImportHeld", WAIT)
        .await
        .with_context(|| cb.log())?;
    println!(
        "Synced=False ImportHeld {:?} after Consul was back: {}",
        wiped.elapsed(),
        held.message
    );
    ensure!(held.status == "False", "{held:?}");
    assert_eq!(
        endpoints(&client, "pay-h").await?,
        originals,
        "the endpoints are held"
    );
    let event = wait_warning(&env, "ImportHeld").await?;
    println!("Event {event}");
    let gauge = cb
        .metric(
            "catalog_bridge_import_held_endpoints",
            &["registration=\"pay-h\""],
        )
        .await?;
    assert_eq!(gauge, 3.0, "catalog_bridge_import_held_endpoints");

    // A new instance during the hold is published at once, beside the held ones.
    let t = Instant::now();
    register(&addr, "pay_h-9", "10.20.0.9")?;
    let mut with_new = originals.to_vec();
    with_new.push("10.20.0.9:7070");
    wait_endpoints(&client, "pay-h", &with_new, WAIT).await?;
    println!(
        "an instance registered during the hold published in {:?}",
        t.elapsed()
    );
    // Two originals come back: they leave the hold; the third stays held.
    register(&addr, "pay_h-0", "10.20.0.1")?;
    register(&addr, "pay_h-1", "10.20.0.2")?;
    localenv::eventually("the held gauge at 1", WAIT, || async {
        let g = cb
            .metric(
                "catalog_bridge_import_held_endpoints",
                &["registration=\"pay-h\""],
            )
            .await?;
        Ok((g == 1.0).then_some(()))
    })
    .await?;
    assert_eq!(endpoints(&client, "pay-h").await?, with_new);

    // The third never comes back: it goes when the hold runs out.
    let finally = ["10.20.0.1:7070", "10.20.0.2:7070", "10.20.0.9:7070"];
    wait_endpoints(&client, "pay-h", &finally, HOLD_WAIT)
        .await
        .with_context(|| cb.log())?;
    let held_for = wiped.elapsed();
    let samples = sampler.stop();
    println!("10.20.0.3 was held {held_for:?} after Consul came back empty");
    let expired = wait_warning(&env, "ImportHoldExpired").await?;
    println!("Event {expired}");
    wait_synced_reason(&client, "pay-h", "InSync", WAIT).await?;
    // Until the hold ran out every sample held the three originals.
    ensure!(!samples.is_empty(), "no samples");
    for (at, e) in &samples {
        ensure!(
            e == &finally || originals.iter().all(|o| e.contains(&o.to_string())),
            "at {at:?} after the restart the Service had {e:?}"
        );
    }
    println!(
        "{} samples over {held_for:?}, none without the three originals before the hold ran out",
        samples.len()
    );
    Ok(())
}

/// `addrs` put under `/services/<external>/providers/` in etcd and imported as Service
/// `shop/<name>`: returns once the Service has them all.
async fn import_from_etcd(
    env: &Env,
    client: &kube::Client,
    cb: &Controller,
    name: &str,
    external: &str,
    addrs: &[&str],
) -> Result<()> {
    for a in addrs {
        env.etcd()?
            .etcdctl(&["put", &format!("/services/{external}/providers/{a}"), a])?;
    }
    kubectl_apply(env, &import(name, "etcd", external, json!({})))?;
    wait_endpoints(client, name, addrs, WAIT)
        .await
        .with_context(|| cb.log())?;
    Ok(())
}

/// `etcdctl del --prefix` of the layout's prefix: the imported Service keeps its four
/// endpoints for the hold (default 30 s), then they go, with an Event.
#[tokio::test]
async fn an_etcd_prefix_wiped_does_not_empty_the_imported_service_at_once() -> Result<()> {
    let env = Env::builder().kube().etcd().start().await?;
    let (client, cb) = setup(&env).await?;
    let etcd = env.etcd()?;
    let all = [
        "10.21.0.1:11211",
        "10.21.0.2:11211",
        "10.21.0.3:11211",
        "10.21.0.4:11211",
    ];
    import_from_etcd(&env, &client, &cb, "memcache-h", "memcache_h", &all).await?;

    let out = etcd.etcdctl(&["del", "--prefix", "/services/"])?;
    let wiped = Instant::now();
    println!("etcdctl del --prefix /services/: {}", out.trim());
    let sampler = Sampler::start(&client, "memcache-h", wiped);
    let held = wait_synced_reason(&client, "memcache-h", "ImportHeld", WAIT)
        .await
        .with_context(|| cb.log())?;
    println!("{:?} after the wipe: {}", wiped.elapsed(), held.message);
    assert_eq!(endpoints(&client, "memcache-h").await?, all);
    let event = wait_warning(&env, "ImportHeld")
        .await
        .with_context(|| cb.log())?;
    println!("Event {event}");

    wait_endpoints(&client, "memcache-h", &[], HOLD_WAIT)
        .await
        .with_context(|| cb.log())?;
    let held_for = wiped.elapsed();
    let samples = sampler.stop();
    println!("the four endpoints were held {held_for:?} after the wipe");
    println!("Event {}", wait_warning(&env, "ImportHoldExpired").await?);
    wait_synced_reason(&client, "memcache-h", "InSync", WAIT).await?;
    ensure!(!samples.is_empty(), "no samples");
    for (at, e) in &samples {
        ensure!(
            e.is_empty() || e == &all,
            "at {at:?} after the wipe the Service had {e:?}"
        );
    }
    let before = samples.iter().filter(|(_, e)| e == &all).count();
    println!(
        "{} samples over {held_for:?}: {before} with the four endpoints, the rest empty",
        samples.len()
    );
    Ok(())
}

/// A replica that begins to lead and finds an import's catalog wiped (the catalog was wiped
/// while no replica led, or during a handover) holds the endpoints and says so with the same
/// Warning Event as a leader that saw the wipe: its import task notes the hold the moment the
/// gate opens, before the status loop's first round as leader.
#[tokio::test]
async fn a_replica_that_begins_to_lead_over_a_wiped_prefix_holds_and_says_so() -> Result<()> {
    let env = Env::builder().kube().etcd().start().await?;
    let (client, cb) = setup(&env).await?;
    let etcd = env.etcd()?;
    let all = ["10.24.0.1:11211", "10.24.0.2:11211", "10.24.0.3:11211"];
    import_from_etcd(&env, &client, &cb, "memcache-l", "memcache_l", &all).await?;
    cb.process.stop()?;

    etcd.etcdctl(&["del", "--prefix", "/services/"])?;
    let next = Controller::start(&env, "cb-next", "cluster-a", &[]).await?;
    let held = wait_synced_reason(&client, "memcache-l", "ImportHeld", WAIT)
        .await
        .with_context(|| next.log())?;
    println!("the next leader holds: {}", held.message);
    assert_eq!(endpoints(&client, "memcache-l").await?, all);
    let event = wait_warning(&env, "ImportHeld")
        .await
        .with_context(|| next.log())?;
    println!("Event {event}");
    Ok(())
}

/// What the hold must never hold, each followed at once: every instance of a Consul service
/// failing its check (still registered: a health answer, a real outage), an etcd scale-down of
/// less than half at a time, and a wiped prefix under `emptyHoldSeconds: 0`. No hold starts
/// (`catalog_bridge_import_holds_total{outcome="started"}` stays 0, no `ImportHeld` Event).
#[tokio::test]
async fn health_answers_gradual_scale_downs_and_a_hold_of_zero_are_followed_at_once() -> Result<()>
{
    let env = Env::builder().kube().consul().etcd().start().await?;
    let (client, cb) = setup(&env).await?;
    let consul = env.consul()?;
    let addr = consul.address();
    let etcd = env.etcd()?;

    for i in 0..3 {
        register_as(
            &addr,
            "pay_f",
            &format!("pay_f-{i}"),
            &format!("10.22.0.{}", i + 1),
        )?;
    }
    let keys = [
        "10.23.0.1:11211",
        "10.23.0.2:11211",
        "10.23.0.3:11211",
        "10.23.0.4:11211",
    ];
    for a in keys {
        etcd.etcdctl(&["put", &format!("/services/memcache_f/providers/{a}"), a])?;
    }
    for a in ["10.24.0.1:6379", "10.24.0.2:6379"] {
        etcd.etcdctl(&["put", &format!("/services/cache_z/providers/{a}"), a])?;
    }
    kubectl_apply(&env, &import("pay-f", "consul", "pay_f", json!({})))?;
    kubectl_apply(&env, &import("memcache-f", "etcd", "memcache_f", json!({})))?;
    kubectl_apply(
        &env,
        &import(
            "cache-z",
            "etcd",
            "cache_z",
            json!({"import": {"emptyHoldSeconds": 0}}),
        ),
    )?;
    wait_endpoints(
        &client,
        "pay-f",
        &["10.22.0.1:7070", "10.22.0.2:7070", "10.22.0.3:7070"],
        WAIT,
    )
    .await
    .with_context(|| cb.log())?;
    wait_endpoints(&client, "memcache-f", &keys, WAIT).await?;
    wait_endpoints(
        &client,
        "cache-z",
        &["10.24.0.1:6379", "10.24.0.2:6379"],
        WAIT,
    )
    .await?;

    // Consul: all three fail their checks.
    py_consul(
        &addr,
        "for i in range(3):\n    c.agent.check.ttl_fail('service:pay_f-%d' % i)",
    )?;
    let took = wait_endpoints(&client, "pay-f", &[], WAIT).await?;
    println!("every Consul check critical -> endpoints gone in {took:?}");

    // etcd: one of four goes, then one of three: less than half at a time.
    etcd.etcdctl(&["del", "/services/memcache_f/providers/10.23.0.4:11211"])?;
    let took = wait_endpoints(&client, "memcache-f", &keys[..3], WAIT).await?;
    println!("one of four etcd keys deleted -> endpoint gone in {took:?}");
    etcd.etcdctl(&["del", "/services/memcache_f/providers/10.23.0.3:11211"])?;
    let took = wait_endpoints(&client, "memcache-f", &keys[..2], WAIT).await?;
    println!("one of three etcd keys deleted -> endpoint gone in {took:?}");

    // emptyHoldSeconds: 0: a wiped prefix empties the Service.
    etcd.etcdctl(&["del", "--prefix", "/services/cache_z/"])?;
    let took = wait_endpoints(&client, "cache-z", &[], WAIT).await?;
    println!("prefix wiped with emptyHoldSeconds 0 -> endpoints gone in {took:?}");

    for name in ["pay-f", "memcache-f", "cache-z"] {
        let c = wait_synced_reason(&client, name, "InSync", WAIT).await?;
        println!("{name}: Synced {} {}", c.status, c.reason);
    }
    let started = cb
        .metric(
            "catalog_bridge_import_holds_total",
            &["outcome=\"started\""],
        )
        .await?;
    assert_eq!(started, 0.0, "no hold started: {}", cb.log());
    let events = warnings(&env)?;
    ensure!(
        !events.contains("ImportHeld"),
        "an ImportHeld Event: {events}"
    );
    Ok(())
}
