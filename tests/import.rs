//! Import end to end: services registered in Consul, etcd and ZooKeeper by their real clients
//! (py-consul, etcdctl, kazoo) appear in Kubernetes as selector-less Services with
//! EndpointSlices that follow the catalog's health, through the controller binary.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use localenv::Env;
use serde_json::{Value, json};
use support::{Controller, consul_catalog, kubectl_apply};

const WAIT: Duration = Duration::from_secs(30);

fn import(name: &str, catalog: &str, external: &str, target: Value) -> Value {
    json!({
        "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"catalogRef": {"name": catalog}, "direction": "Import",
                 "externalName": external, "target": target},
    })
}

/// `registration` with the empty-hold turned off (`spec.import.emptyHoldSeconds: 0`): for
/// tests of how promptly the last instances leave (the hold itself: tests/import_hold.rs).
fn without_hold(mut registration: Value) -> Value {
    registration["spec"]["import"] = json!({"emptyHoldSeconds": 0});
    registration
}

/// Sorted `ip:port` of the ready endpoints in the EndpointSlices of Service `shop/<svc>`.
async fn endpoints(client: &kube::Client, svc: &str) -> Result<Vec<String>> {
    support::ready_endpoints(client, "shop", svc).await
}

async fn wait_endpoints(client: &kube::Client, svc: &str, want: &[&str]) -> Result<Duration> {
    let start = Instant::now();
    localenv::eventually(
        &format!("Service {svc} endpoints {want:?}"),
        WAIT,
        || async {
            let got = endpoints(client, svc).await?;
            if got == want {
                Ok(Some(start.elapsed()))
            } else {
                anyhow::bail!("got {got:?}")
            }
        },
    )
    .await
}

/// ExternalCatalogs `etcd` and `zk` on the environment's etcd and ZooKeeper.
fn apply_etcd_and_zk_catalogs(env: &Env) -> Result<()> {
    kubectl_apply(
        env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "etcd"},
            "spec": {"etcd": {"endpoints": [env.etcd()?.endpoint()]}},
        }),
    )?;
    kubectl_apply(
        env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "zk"},
            "spec": {"zookeeper": {"connect": env.zookeeper()?.connect_string()}},
        }),
    )?;
    Ok(())
}

async fn setup() -> Result<(Env, kube::Client, Controller)> {
    let env = Env::builder().all().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, "shop").await?;
    kubectl_apply(
        &env,
        &consul_catalog("consul", &[env.consul()?.url()], "k8s-test"),
    )?;
    apply_etcd_and_zk_catalogs(&env)?;
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    Ok((env, client, cb))
}

#[tokio::test]
async fn consul_instances_with_passing_checks_become_endpoints() -> Result<()> {
    let (env, client, cb) = setup().await?;
    let consul = env.consul()?.address();
    let py = |script: &str| {
        localenv::python(
            &format!(
                "import sys, consul\nhost, port = sys.argv[1].split(':')\nc = consul.Consul(host=host, port=int(port))\n{script}\n"
            ),
            &[&consul],
        )
    };
    py("for i, ip in enumerate(['10.9.0.1', '10.9.0.2']):\n\
        \x20   c.agent.service.register('api_z', service_id='api_z-%d' % i, address=ip, port=7070, check=consul.Check.ttl('10m'))\n\
        \x20   c.agent.check.ttl_pass('service:api_z-%d' % i)")?;
    kubectl_apply(&env, &import("api-z", "consul", "api_z", json!({})))?;
    wait_endpoints(&client, "api-z", &["10.9.0.1:7070", "10.9.0.2:7070"])
        .await
        .with_context(|| cb.log())?;
    let svc = Api::<Service>::namespaced(client.clone(), "shop")
        .get("api-z")
        .await?;
    let spec = svc.spec.context("spec")?;
    assert!(spec.selector.is_none(), "selector-less");
    assert_eq!(
        spec.ports.context("ports")?[0].port,
        7070,
        "the port the catalog reports"
    );

    py("c.agent.check.ttl_fail('service:api_z-1')")?;
    let took = wait_endpoints(&client, "api-z", &["10.9.0.1:7070"]).await?;
    println!("Consul check critical -> endpoint gone in {took:?}");
    py("c.agent.check.ttl_pass('service:api_z-1')")?;
    let took = wait_endpoints(&client, "api-z", &["10.9.0.1:7070", "10.9.0.2:7070"]).await?;
    println!("Consul check passing -> endpoint back in {took:?}");

    // Deleting the registration removes the Service and its slices (owner references).
    let regs: Api<catalog_bridge::api::crd::ExternalRegistration> =
        Api::namespaced(client.clone(), "shop");
    regs.delete("api-z", &Default::default()).await?;
    localenv::eventually("the imported Service to go", WAIT, || async {
        let gone = Api::<Service>::namespaced(client.clone(), "shop")
            .get_opt("api-z")
            .await?
            .is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn etcd_keys_and_zookeeper_nodes_become_endpoints_while_they_live() -> Result<()> {
    let (env, client, cb) = setup().await?;
    let etcd = env.etcd()?;
    let grant = etcd.etcdctl(&["lease", "grant", "60"])?;
    let lease = grant
        .split_whitespace()
        .nth(1)
        .context("lease id")?
        .to_string();
    // Two IPs, a host name as registrars write it (upper case, trailing dot: the slice gets
    // it in lower case), and a name of one label, which no EndpointSlice takes: skipped,
    // and the rest import.
    for host in ["10.8.0.1", "10.8.0.2", "Cache-3.Example.", "vm1"] {
        etcd.etcdctl(&[
            "put",
            &format!("--lease={lease}"),
            &format!("/services/memcache/providers/{host}:11211"),
            &format!("{host}:11211"),
        ])?;
    }
    etcd.etcdctl(&[
        "put",
        "/services/memcache/providers/garbage",
        "not an address",
    ])?;
    kubectl_apply(
        &env,
        &without_hold(import(
            "memcache",
            "etcd",
            "memcache",
            json!({"ports": [{"name": "memcache", "port": 11211}]}),
        )),
    )?;
    wait_endpoints(
        &client,
        "memcache",
        &["10.8.0.1:11211", "10.8.0.2:11211", "cache-3.example:11211"],
    )
    .await
    .with_context(|| cb.log())?;
    let events = localenv::eventually("Warning Events for the skipped entries", WAIT, || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "events",
            "-n",
            "shop",
            "--field-selector",
            "type=Warning",
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.note}{.message}{\"\\n\"}{end}",
        ])?;
        Ok(
            (out.contains("not an address") && out.contains("\"vm1\" is not fully qualified"))
                .then_some(out),
        )
    })
    .await?;
    println!("{events}");
    let skipped = cb
        .metric(
            "catalog_bridge_import_skipped_entries",
            &["registration=\"memcache\""],
        )
        .await?;
    assert_eq!(skipped, 2.0, "the unparsable entry and vm1 are counted");
    etcd.etcdctl(&["lease", "revoke", &lease])?;
    let took = wait_endpoints(&client, "memcache", &[]).await?;
    println!("etcd lease revoked -> endpoints gone in {took:?}");

    // ZooKeeper: kazoo's ephemeral nodes live while its session does.
    let mut kazoo = std::process::Command::new(localenv::programs::python()?)
        .arg("-c")
        .arg("import sys\nfrom kazoo.client import KazooClient\n\
              zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
              zk.create('/services/mysql_x/providers/10.7.0.8:3306', b'{}', ephemeral=True, makepath=True)\n\
              print('READY', flush=True)\nsys.stdin.read()\nzk.stop(); zk.close()\n")
        .arg(env.zookeeper()?.connect_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::BufRead;
        let out = kazoo.stdout.take().context("kazoo stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        anyhow::ensure!(line.starts_with("READY"), "kazoo did not register: {line}");
    }
    kubectl_apply(
        &env,
        &without_hold(import(
            "mysql-x",
            "zk",
            "mysql_x",
            json!({"ports": [{"name": "mysql", "port": 3306}]}),
        )),
    )?;
    wait_endpoints(&client, "mysql-x", &["10.7.0.8:3306"])
        .await
        .with_context(|| cb.log())?;
    drop(kazoo.stdin.take()); // the registrant's session closes
    kazoo.wait()?;
    let took = wait_endpoints(&client, "mysql-x", &[]).await?;
    println!("kazoo session closed -> endpoint gone in {took:?}");
    Ok(())
}

/// Instances registered by Curator applications (`ServiceDiscovery.registerService`, as Spring
/// Cloud Zookeeper does) become endpoints, and leave when an application stops.
#[tokio::test]
async fn curator_registrations_become_endpoints_while_their_applications_run() -> Result<()> {
    let (env, client, cb) = setup().await?;
    let zk = env.zookeeper()?;
    let connect = zk.connect_string();
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "zk-curator"},
            "spec": {"zookeeper": {"connect": connect, "layout": "curator", "basePath": "/spring"}},
        }),
    )?;
    let first = zk.curator_register(&connect, "/spring", "billing", "10.6.0.1", 8443)?;
    let second = zk.curator_register(&connect, "/spring", "billing", "10.6.0.2", 8443)?;
    println!("Curator registered {} and {}", first.id, second.id);
    // No ports declared: the Service takes the port the catalog reports.
    kubectl_apply(&env, &import("billing", "zk-curator", "billing", json!({})))?;
    wait_endpoints(&client, "billing", &["10.6.0.1:8443", "10.6.0.2:8443"])
        .await
        .with_context(|| cb.log())?;
    let service: Service = Api::namespaced(client.clone(), "shop")
        .get("billing")
        .await?;
    let ports: Vec<i32> = service
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [8443], "the reported port");
    drop(second); // the application stops: Curator unregisters and its session ends
    let took = wait_endpoints(&client, "billing", &["10.6.0.1:8443"]).await?;
    println!("a Curator application stopped -> its endpoint gone in {took:?}");
    Ok(())
}

#[tokio::test]
async fn a_service_exported_to_and_imported_from_one_catalog_makes_no_loop() -> Result<()> {
    let (env, client, cb) = setup().await?;
    support::deploy_api_x(&client, "consul").await?;
    let consul = support::ConsulView::new(env.consul()?.url())?;
    consul
        .wait_passing("api_x", &["10.1.0.1:8080", "10.1.0.2:8080"], WAIT)
        .await?;
    // Someone else's instance of the same name, registered by hand.
    consul
        .register("vm-host", "api_x-vm", "api_x", json!({}))
        .await?;
    kubectl_apply(
        &env,
        &import(
            "api-x-imported",
            "consul",
            "api_x",
            json!({"serviceName": "api-x-imported"}),
        ),
    )?;
    // Only the foreign instance is imported; our own two exports are not.
    wait_endpoints(&client, "api-x-imported", &["192.0.2.10:1234"])
        .await
        .with_context(|| cb.log())?;
    // And the imported Service is never exported back.
    support::annotate(
        &client,
        "shop",
        "api-x-imported",
        json!({"catalog-bridge.io/export": "consul"}),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut all = consul.passing("api_x").await?;
    all.sort();
    assert_eq!(
        all,
        ["10.1.0.1:8080", "10.1.0.2:8080", "192.0.2.10:1234"],
        "no copy of a copy"
    );
    assert_eq!(
        endpoints(&client, "api-x-imported").await?,
        ["192.0.2.10:1234"]
    );

    // The same in ZooKeeper's curator layout, whose entries carry no owner: the controller's
    // own are the ephemeral nodes of its export session, which the import reads from the
    // session Secret. A Curator application registers the foreign instance.
    let zk = env.zookeeper()?;
    let connect = zk.connect_string();
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "zk-curator"},
            "spec": {"zookeeper": {"connect": connect, "layout": "curator", "basePath": "/curator"}},
        }),
    )?;
    support::annotate(
        &client,
        "shop",
        "api-x",
        json!({"catalog-bridge.io/export": "consul,zk-curator"}),
    )
    .await?;
    localenv::eventually("api_x exported to zk-curator", WAIT, || async {
        Ok((zk.curator_instances(&connect, "/curator", "api_x")?.len() == 2).then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    let _vm = zk.curator_register(&connect, "/curator", "api_x", "192.0.2.20", 4321)?;
    kubectl_apply(
        &env,
        &import(
            "api-x-curator",
            "zk-curator",
            "api_x",
            json!({"serviceName": "api-x-curator"}),
        ),
    )?;
    wait_endpoints(&client, "api-x-curator", &["192.0.2.20:4321"])
        .await
        .with_context(|| cb.log())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        endpoints(&client, "api-x-curator").await?,
        ["192.0.2.20:4321"],
        "only the Curator application's instance; the controller's own two are left out"
    );
    Ok(())
}

#[tokio::test]
async fn a_catalog_outage_keeps_the_last_known_endpoints() -> Result<()> {
    let (env, client, cb) = setup().await?;
    let consul = env.consul()?;
    let register = || {
        localenv::python(
            "import sys, consul\nhost, port = sys.argv[1].split(':')\n\
             c = consul.Consul(host=host, port=int(port))\n\
             c.catalog.register('vm-1', '10.6.0.1', service={'ID': 'db-1', 'Service': 'db', 'Address': '10.6.0.1', 'Port': 5432})\n",
            &[&consul.address()],
        )
    };
    register()?;
    kubectl_apply(&env, &import("db", "consul", "db", json!({})))?;
    wait_endpoints(&client, "db", &["10.6.0.1:5432"])
        .await
        .with_context(|| cb.log())?;

    consul.stop()?;
    let regs: Api<catalog_bridge::api::crd::ExternalRegistration> =
        Api::namespaced(client.clone(), "shop");
    let message = localenv::eventually("Synced=False naming the outage", WAIT, || async {
        let s = regs.get("db").await?.status.unwrap_or_default();
        Ok(s.conditions
            .into_iter()
            .find(|c| c.type_ == "Synced" && c.status == "False")
            .map(|c| c.message))
    })
    .await?;
    println!("while Consul is down: {message}");
    assert!(
        message.contains("keeping the last known 1 endpoint"),
        "{message}"
    );
    assert_eq!(
        endpoints(&client, "db").await?,
        ["10.6.0.1:5432"],
        "nothing deleted because a read failed"
    );

    // The dev agent comes back empty; the registrant registers again and the import follows.
    consul.start_again().await?;
    register()?;
    wait_endpoints(&client, "db", &["10.6.0.1:5432"]).await?;
    localenv::eventually("Synced=True again", WAIT, || async {
        let s = regs.get("db").await?.status.unwrap_or_default();
        Ok(s.conditions
            .iter()
            .any(|c| c.type_ == "Synced" && c.status == "True")
            .then_some(()))
    })
    .await?;
    Ok(())
}

/// The imported Service and EndpointSlices are kept as rendered: deleted or edited by hand, they
/// come back at once, not at the catalog's next change; a harmless change by someone else (a
/// label) is left alone and not answered with a write.
#[tokio::test]
async fn imported_objects_deleted_or_edited_by_hand_come_back() -> Result<()> {
    let (env, client, cb) = setup().await?;
    let kube = env.kube()?;
    for ip in ["10.7.1.1", "10.7.1.2"] {
        env.etcd()?.etcdctl(&[
            "put",
            &format!("/services/cache/providers/{ip}:6379"),
            &format!("{ip}:6379"),
        ])?;
    }
    kubectl_apply(
        &env,
        &import(
            "cache",
            "etcd",
            "cache",
            json!({"ports": [{"name": "redis", "port": 6379}]}),
        ),
    )?;
    let both = ["10.7.1.1:6379", "10.7.1.2:6379"];
    wait_endpoints(&client, "cache", &both)
        .await
        .with_context(|| cb.log())?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    let slice = "cache-ipv4-6379-0";

    kube.kubectl(&["delete", "endpointslice", "-n", "shop", slice])?;
    let took = wait_endpoints(&client, "cache", &both)
        .await
        .with_context(|| cb.log())?;
    println!("EndpointSlice deleted by hand -> back in {took:?}");

    kube.kubectl(&[
        "patch",
        "endpointslice",
        "-n",
        "shop",
        slice,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/endpoints/0/addresses/0","value":"10.66.6.6"}]"#,
    ])?;
    let took = wait_endpoints(&client, "cache", &both)
        .await
        .with_context(|| cb.log())?;
    println!("EndpointSlice edited by hand -> restored in {took:?}");

    let uid = services.get("cache").await?.metadata.uid;
    kube.kubectl(&["delete", "service", "-n", "shop", "cache", "--wait=false"])?;
    localenv::eventually("the Service applied again", WAIT, || async {
        let again = services.get_opt("cache").await?;
        Ok(again
            .filter(|s| s.metadata.uid != uid && s.metadata.deletion_timestamp.is_none())
            .map(|_| ()))
    })
    .await
    .with_context(|| cb.log())?;

    // A label added by someone else stays, and the controller does not write the slice again.
    // The controller's log names every object it applies again: once per change above.
    kube.kubectl(&["label", "endpointslice", "-n", "shop", slice, "team=db"])?;
    let labelled = slices
        .get(slice)
        .await?
        .metadata
        .resource_version
        .context("resourceVersion")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = slices.get(slice).await?;
    assert_eq!(
        after.metadata.labels.unwrap_or_default().get("team"),
        Some(&"db".to_string()),
        "the foreign label stays"
    );
    assert_eq!(
        after.metadata.resource_version.as_deref(),
        Some(labelled.as_str()),
        "a harmless foreign change is not answered with a changed object"
    );
    let log = cb.full_log()?;
    let again: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("applying it again"))
        .collect();
    let restored = again.len();
    println!("objects applied again:\n{}", again.join("\n"));
    assert!(
        (3..=4).contains(&restored),
        "3 restores (the deleted slice, the edited slice, the deleted Service) and at most one \
         no-op apply for the label; the log has {restored}:\n{}",
        cb.log()
    );
    wait_endpoints(&client, "cache", &both).await?;

    // Deleting the registration removes its objects, and their removal (by the controller or
    // the garbage collector) is not undone.
    kube.kubectl(&["delete", "externalregistration", "-n", "shop", "cache"])?;
    localenv::eventually("the imported Service and slices to go", WAIT, || async {
        let gone =
            services.get_opt("cache").await?.is_none() && slices.get_opt(slice).await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        services.get_opt("cache").await?.is_none() && slices.get_opt(slice).await?.is_none(),
        "the objects of a deleted registration came back:\n{}",
        cb.log()
    );
    assert_eq!(
        cb.full_log()?.matches("applying it again").count(),
        restored,
        "nothing applied again after the registration was deleted"
    );
    Ok(())
}

/// An import never takes over a Service it did not create: with the name of the user's own
/// Service, or of another registration's, it reports `ServiceConflict` and writes nothing; once
/// the name is free it imports. Renamed, its Service moves and nothing stays under the old
/// name.
#[tokio::test]
async fn an_import_never_takes_over_a_service_it_did_not_create() -> Result<()> {
    let (env, client, cb) = setup().await?;
    env.etcd()?.etcdctl(&[
        "put",
        "/services/billing/providers/10.7.2.1:9000",
        "10.7.2.1:9000",
    ])?;
    // The user's own Service of that name, with a selector.
    localenv::workload::create_service(&client, "shop", "billing", 9000, Default::default())
        .await?;
    kubectl_apply(
        &env,
        &import(
            "billing",
            "etcd",
            "billing",
            json!({"ports": [{"name": "http", "port": 9000}]}),
        ),
    )?;
    let regs: Api<catalog_bridge::api::crd::ExternalRegistration> =
        Api::namespaced(client.clone(), "shop");
    let ready = localenv::eventually("Ready=False ServiceConflict", WAIT, || async {
        let s = regs.get("billing").await?.status.unwrap_or_default();
        Ok(s.conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "ServiceConflict"))
    })
    .await
    .with_context(|| cb.log())?;
    println!("{}", ready.message);
    ensure!(
        ready.message.contains("target.serviceName"),
        "{}",
        ready.message
    );
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    let svc = services.get("billing").await?;
    ensure!(
        svc.metadata.owner_references.unwrap_or_default().is_empty()
            && !svc
                .metadata
                .labels
                .unwrap_or_default()
                .contains_key("endpointslice.kubernetes.io/managed-by")
            && svc.spec.and_then(|s| s.selector).is_some(),
        "the user's Service is untouched"
    );
    ensure!(
        endpoints(&client, "billing").await?.is_empty(),
        "no EndpointSlice joins the user's Service"
    );

    // The name freed, the import goes ahead.
    services.delete("billing", &Default::default()).await?;
    wait_endpoints(&client, "billing", &["10.7.2.1:9000"])
        .await
        .with_context(|| cb.log())?;

    // Renamed (target.serviceName): the Service moves, nothing stays under the old name.
    kubectl_apply(
        &env,
        &import(
            "billing",
            "etcd",
            "billing",
            json!({"serviceName": "billing-v2", "ports": [{"name": "http", "port": 9000}]}),
        ),
    )?;
    wait_endpoints(&client, "billing-v2", &["10.7.2.1:9000"])
        .await
        .with_context(|| cb.log())?;
    // The old Service goes before the new slices are written and its slices after them, so
    // both are waited for.
    localenv::eventually(
        "the Service and the slices under the old name to go",
        WAIT,
        || async {
            Ok((services.get_opt("billing").await?.is_none()
                && endpoints(&client, "billing").await?.is_empty())
            .then_some(()))
        },
    )
    .await
    .with_context(|| cb.log())?;

    // A second import from the same catalog: the catalog's import entries are the sum.
    for ip in ["10.7.2.2", "10.7.2.3"] {
        env.etcd()?.etcdctl(&[
            "put",
            &format!("/services/audit/providers/{ip}:9100"),
            &format!("{ip}:9100"),
        ])?;
    }
    kubectl_apply(
        &env,
        &import(
            "audit",
            "etcd",
            "audit",
            json!({"ports": [{"name": "http", "port": 9100}]}),
        ),
    )?;
    wait_endpoints(&client, "audit", &["10.7.2.2:9100", "10.7.2.3:9100"]).await?;
    let imported = || async {
        cb.metric(
            "catalog_bridge_entries",
            &["catalog=\"etcd\"", "direction=\"import\""],
        )
        .await
    };
    localenv::eventually("3 import entries for etcd", WAIT, || async {
        Ok((imported().await? == 3.0).then_some(()))
    })
    .await?;
    regs.delete("billing", &Default::default()).await?;
    localenv::eventually("2 import entries once billing is gone", WAIT, || async {
        Ok((imported().await? == 2.0).then_some(()))
    })
    .await?;
    Ok(())
}

/// `run --dry-run` logs what it would do and writes nothing: no entry in the catalog for an
/// export, no Service or EndpointSlice for an import.
#[tokio::test]
async fn dry_run_writes_neither_catalog_entries_nor_imported_services() -> Result<()> {
    let env = Env::builder().all().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, "shop").await?;
    apply_etcd_and_zk_catalogs(&env)?;
    let cb =
        Controller::start(&env, "cb", "cluster-a", &["--dry-run", "--log-format=json"]).await?;
    env.etcd()?.etcdctl(&[
        "put",
        "/services/ledger/providers/10.7.3.1:7000",
        "10.7.3.1:7000",
    ])?;
    kubectl_apply(
        &env,
        &import(
            "ledger",
            "etcd",
            "ledger",
            json!({"ports": [{"name": "tcp", "port": 7000}]}),
        ),
    )?;
    support::deploy(
        &client,
        "shop",
        "api-x",
        1,
        2,
        support::annotations(&[("catalog-bridge.io/export", "etcd,zk")]),
    )
    .await?;
    localenv::eventually("the dry-run plans in the log", WAIT, || async {
        let log = cb.full_log()?;
        let planned = |catalog: &str| {
            log.lines()
                .any(|l| l.contains("dry run: plan not applied") && l.contains(catalog))
        };
        Ok((log.contains("dry run: would apply the imported Service")
            && planned("\"catalog\":\"etcd\"")
            && planned("\"catalog\":\"zk\""))
        .then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    ensure!(
        services.get_opt("ledger").await?.is_none(),
        "no imported Service in a dry run"
    );
    // Not an entry, not a lease marker, not a lease.
    let keys = env
        .etcd()?
        .etcdctl(&["get", "--prefix", "--keys-only", ""])?;
    ensure!(
        keys.lines().filter(|l| !l.is_empty()).collect::<Vec<_>>()
            == ["/services/ledger/providers/10.7.3.1:7000"],
        "nothing written to etcd in a dry run: {keys}"
    );
    let leases = env.etcd()?.etcdctl(&["lease", "list"])?;
    ensure!(
        leases.contains("found 0 leases"),
        "no lease granted in a dry run: {leases}"
    );
    // Nor to ZooKeeper: not a node.
    let zk = localenv::python(
        "import sys\n\
         from kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         print(zk.exists('/services') is not None)\n\
         zk.stop()\n",
        &[&env.zookeeper()?.connect_string()],
    )?;
    ensure!(
        zk.trim() == "False",
        "nothing written to ZooKeeper in a dry run"
    );
    // Nothing written to Kubernetes either: no leader Lease taken (the real replicas keep
    // it), no status, no Event.
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "default")
            .get_opt("catalog-bridge")
            .await?;
    ensure!(lease.is_none(), "no leader Lease in a dry run: {lease:?}");
    let regs: Api<catalog_bridge::api::crd::ExternalRegistration> =
        Api::namespaced(client.clone(), "shop");
    let status = regs.get("ledger").await?.status;
    ensure!(status.is_none(), "no status in a dry run: {status:?}");
    let catalogs: Api<catalog_bridge::api::crd::ExternalCatalog> = Api::all(client.clone());
    let status = catalogs.get("etcd").await?.status;
    ensure!(status.is_none(), "no status in a dry run: {status:?}");
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone())
        .list(&Default::default())
        .await?;
    let ours: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("catalog-bridge"))
        .map(|e| format!("{:?}: {:?}", e.reason, e.note))
        .collect();
    ensure!(ours.is_empty(), "no Event in a dry run: {ours:?}");
    Ok(())
}

/// A `--dry-run` replica beside the real one, running as a Kubernetes user of its own, makes no
/// write to Kubernetes while an import is renamed, loses a catalog entry and is deleted; the API
/// server's audit log (every request that writes, by user) is the witness. The deletion is made
/// while the real replica is paused, so that the dry-run one is the only one to see it; no
/// kube-controller-manager runs, so no garbage collector removes the objects either.
#[tokio::test]
async fn a_dry_run_replica_beside_the_real_one_writes_nothing_to_kubernetes() -> Result<()> {
    let env = Env::builder().kube().etcd().start().await?;
    let kube = env.kube()?;
    let client = kube.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, "shop").await?;
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "etcd"},
            "spec": {"etcd": {"endpoints": [env.etcd()?.endpoint()]}},
        }),
    )?;
    for ip in ["10.7.4.1", "10.7.4.2"] {
        env.etcd()?.etcdctl(&[
            "put",
            &format!("/services/ledger/providers/{ip}:7000"),
            &format!("{ip}:7000"),
        ])?;
    }
    let cb = Controller::start(&env, "cb", "cluster-a", &["--drift-interval=1s"]).await?;
    let second = kube.second_kubeconfig_path().display().to_string();
    let dry = Controller::start_with_env(
        &env,
        "cb-dry",
        "cluster-a",
        &["--dry-run", "--log-format=json"],
        &[("KUBECONFIG", second.as_str())],
    )
    .await?;
    let logs = || format!("{}\n--- cb-dry:\n{}", cb.log(), dry.log());
    let dry_writes = || kube.writes_by(localenv::kube::SECOND_USER);

    let ports = json!([{"name": "tcp", "port": 7000}]);
    kubectl_apply(
        &env,
        &import("ledger", "etcd", "ledger", json!({"ports": ports})),
    )?;
    wait_endpoints(&client, "ledger", &["10.7.4.1:7000", "10.7.4.2:7000"])
        .await
        .with_context(logs)?;

    // Renamed: the real replica moves the Service to the new name.
    kubectl_apply(
        &env,
        &import(
            "ledger",
            "etcd",
            "ledger",
            json!({"serviceName": "ledger-v2", "ports": ports}),
        ),
    )?;
    wait_endpoints(&client, "ledger-v2", &["10.7.4.1:7000", "10.7.4.2:7000"])
        .await
        .with_context(logs)?;
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    localenv::eventually("the Service under the old name to go", WAIT, || async {
        Ok(services.get_opt("ledger").await?.is_none().then_some(()))
    })
    .await
    .with_context(logs)?;

    // A catalog entry goes away.
    env.etcd()?
        .etcdctl(&["del", "/services/ledger/providers/10.7.4.2:7000"])?;
    wait_endpoints(&client, "ledger-v2", &["10.7.4.1:7000"])
        .await
        .with_context(logs)?;
    localenv::eventually(
        "the dry-run replica to plan the one endpoint",
        WAIT,
        || async {
            let planned = dry.full_log()?.lines().any(|l| {
                l.contains("dry run: would apply the imported Service")
                    && l.contains("ledger-v2")
                    && l.contains("\"endpoints\":1")
            });
            Ok(planned.then_some(()))
        },
    )
    .await
    .with_context(logs)?;

    // Deleted while the real replica is paused: the dry-run replica alone sees it go.
    cb.process.pause()?;
    let regs: Api<catalog_bridge::api::crd::ExternalRegistration> =
        Api::namespaced(client.clone(), "shop");
    regs.delete("ledger", &Default::default()).await?;
    let seen = localenv::eventually(
        "the dry-run replica to act on the deletion",
        WAIT,
        || async {
            let writes = dry_writes()?;
            let planned = dry
                .full_log()?
                .lines()
                .any(|l| l.contains("dry run: would remove the imported Service"));
            Ok((planned || !writes.is_empty()).then_some(writes))
        },
    )
    .await;
    cb.process.resume()?;
    let writes = seen.with_context(logs)?;
    ensure!(
        writes.is_empty(),
        "the dry-run replica wrote to Kubernetes: {writes:#?}"
    );
    ensure!(
        services.get_opt("ledger-v2").await?.is_some(),
        "the imported Service stays until the real replica removes it"
    );

    // The real replica, running again, removes it.
    localenv::eventually("the real replica to remove the Service", WAIT, || async {
        Ok(services.get_opt("ledger-v2").await?.is_none().then_some(()))
    })
    .await
    .with_context(logs)?;
    let writes = dry_writes()?;
    ensure!(
        writes.is_empty(),
        "the dry-run replica wrote to Kubernetes: {writes:#?}"
    );
    // The witness works: it saw the real replica's writes.
    let real = kube.writes_by("admin")?;
    ensure!(
        real.iter()
            .any(|w| w.starts_with("delete services shop/ledger-v2")),
        "the audit log holds the real replica's deletion: {real:#?}"
    );
    Ok(())
}

/// Addresses an EndpointSlice refuses (loopback, link-local, unspecified, multicast) are
/// skipped and counted like unparsable entries; the rest of the import goes on. The catalog of
/// the report: one good entry and the cloud metadata address under one name.
#[tokio::test]
async fn addresses_an_endpointslice_refuses_are_skipped_and_the_rest_imports() -> Result<()> {
    let (env, client, cb) = setup().await?;
    let etcd = env.etcd()?;
    for (host, port) in [
        ("198.18.0.9", 8080),
        ("169.254.169.254", 80),
        ("127.0.0.1", 8080),
        ("0.0.0.0", 8080),
        ("[fe80::1]", 8080),
        ("224.0.0.251", 5353),
    ] {
        etcd.etcdctl(&[
            "put",
            &format!("/services/api_z/providers/{host}:{port}"),
            &format!("{host}:{port}"),
        ])?;
    }
    kubectl_apply(
        &env,
        &import(
            "api-z",
            "etcd",
            "api_z",
            json!({"ports": [{"name": "http", "port": 8080}]}),
        ),
    )?;
    wait_endpoints(&client, "api-z", &["198.18.0.9:8080"])
        .await
        .with_context(|| cb.log())?;
    let events = localenv::eventually("Warning Events for the refused addresses", WAIT, || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "events",
            "-n",
            "shop",
            "--field-selector",
            "type=Warning",
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.note}{.message}{\"\\n\"}{end}",
        ])?;
        Ok((out.contains("169.254.169.254") && out.contains("link-local")).then_some(out))
    })
    .await
    .with_context(|| cb.log())?;
    println!("{events}");
    let skipped = cb
        .metric(
            "catalog_bridge_import_skipped_entries",
            &["registration=\"api-z\""],
        )
        .await?;
    ensure!(
        skipped == 5.0,
        "the five refused addresses are counted: {skipped}"
    );
    Ok(())
}

/// Skipped entries are announced in one Event per import and change, with the count and a few
/// examples: a catalog with many bad entries does not flood the namespace.
#[tokio::test]
async fn many_skipped_entries_make_one_event_per_change() -> Result<()> {
    let (env, client, cb) = setup().await?;
    let etcd = env.etcd()?;
    etcd.etcdctl(&[
        "put",
        "/services/api_b/providers/198.18.0.7:8080",
        "198.18.0.7:8080",
    ])?;
    for i in 0..40 {
        etcd.etcdctl(&[
            "put",
            &format!("/services/api_b/providers/bad-{i:02}"),
            "not an address",
        ])?;
    }
    kubectl_apply(
        &env,
        &import(
            "api-b",
            "etcd",
            "api_b",
            json!({"ports": [{"name": "http", "port": 8080}]}),
        ),
    )?;
    wait_endpoints(&client, "api-b", &["198.18.0.7:8080"])
        .await
        .with_context(|| cb.log())?;
    let events = || async {
        let out = env.kube()?.kubectl(&[
            "get",
            "events",
            "-n",
            "shop",
            "--field-selector",
            "reason=UnparsableEntry,involvedObject.name=api-b",
            "-o",
            "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
        ])?;
        Ok::<_, anyhow::Error>(out.lines().map(str::to_string).collect::<Vec<_>>())
    };
    let first = localenv::eventually("the skipped entries announced", WAIT, || async {
        let e = events().await?;
        Ok((!e.is_empty()).then_some(e))
    })
    .await?;
    // Time for one Event per entry to arrive, if that is how they come.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = events().await?;
    println!("{all:#?}");
    ensure!(
        all.len() == 1,
        "one Event for 40 skipped entries, not {}",
        all.len()
    );
    ensure!(
        first[0].contains("40") && first[0].contains("bad-00"),
        "the Event counts them and gives examples: {first:?}"
    );

    etcd.etcdctl(&[
        "put",
        "/services/api_b/providers/bad-new",
        "still not an address",
    ])?;
    let second = localenv::eventually("the new skipped entry announced", WAIT, || async {
        let e = events().await?;
        Ok((e.len() == 2).then_some(e))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(events().await?.len() == 2, "one more Event for the change");
    ensure!(
        second.iter().any(|n| n.contains("bad-new")),
        "the new one names it: {second:?}"
    );
    Ok(())
}

/// The window between an import's check (the watch cache says the Service name is free) and its
/// write: a Service someone creates in between is never adopted. The test writes as the import
/// task does, after the check, with the user's Service already on the server.
#[tokio::test]
async fn a_service_created_between_the_check_and_the_write_is_not_adopted() -> Result<()> {
    use catalog_bridge::api::crd::ExternalRegistration;
    use catalog_bridge::backend::{External, ImportSnapshot};

    let env = Env::builder().kube().start().await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, "shop").await?;
    kubectl_apply(
        &env,
        &import(
            "pay",
            "etcd",
            "pay",
            json!({"ports": [{"name": "http", "port": 8080}]}),
        ),
    )?;
    let reg = Api::<ExternalRegistration>::namespaced(client.clone(), "shop")
        .get("pay")
        .await?;
    let snap = ImportSnapshot {
        instances: vec![External {
            address: "198.18.0.4".into(),
            port: 8080,
            id: "/services/pay/providers/198.18.0.4:8080".into(),
        }],
        synced: true,
        ..Default::default()
    };
    let rendered = catalog_bridge::import::render::render(&reg, &snap, None)?;
    // Checked: free. Then a user creates a Service of that name.
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "pay", "namespace": "shop"},
        "spec": {"selector": {"app": "pay"}, "ports": [{"name": "web", "port": 9090}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), "shop")
        .create(&Default::default(), &theirs)
        .await?;
    let wrote = catalog_bridge::import::apply::apply(
        &client,
        &reg,
        &rendered,
        None,
        &std::collections::HashSet::new(),
    )
    .await;
    let svc = Api::<Service>::namespaced(client.clone(), "shop")
        .get("pay")
        .await?;
    println!("the import's write: {wrote:?}");
    ensure!(
        svc.metadata.owner_references.is_none()
            && svc
                .metadata
                .labels
                .as_ref()
                .is_none_or(|l| !l.contains_key("catalog-bridge.io/registration")),
        "the user's Service was taken over: {:?}",
        svc.metadata
    );
    let spec = svc.spec.context("spec")?;
    ensure!(
        spec.selector.is_some()
            && spec.ports.as_ref().and_then(|p| p.first()).map(|p| p.port) == Some(9090),
        "the user's Service was changed: {spec:?}"
    );
    ensure!(wrote.is_err(), "the write says the name is taken");
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "shop")
        .list(&ListParams::default().labels("kubernetes.io/service-name=pay"))
        .await?;
    ensure!(
        slices.items.is_empty(),
        "no EndpointSlice for someone else's Service"
    );

    // The name free again, the import creates its Service, owned as if applied: a field a later
    // apply leaves out is removed, not kept by the create.
    let services = Api::<Service>::namespaced(client.clone(), "shop");
    services.delete("pay", &Default::default()).await?;
    localenv::eventually("the user's Service gone", WAIT, || async {
        Ok(services.get_opt("pay").await?.is_none().then_some(()))
    })
    .await?;
    catalog_bridge::import::apply::apply(
        &client,
        &reg,
        &rendered,
        None,
        &std::collections::HashSet::new(),
    )
    .await?;
    let ours = services.get("pay").await?;
    let managers: Vec<(String, String)> = ours
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            (
                f.manager.unwrap_or_default(),
                f.operation.unwrap_or_default(),
            )
        })
        .collect();
    println!("the import's own Service is managed by {managers:?}");
    ensure!(
        managers
            .iter()
            .any(|(m, o)| m == "catalog-bridge" && o == "Apply")
            && !managers
                .iter()
                .any(|(m, o)| m == "catalog-bridge" && o == "Update"),
        "created, then owned by the apply: {managers:?}"
    );
    Ok(())
}

/// The imports of one catalog read it through one client: more names than ZooKeeper lets one
/// address connect (`maxClientCnxns`, 60 by default; 8 here) all import, over a few
/// connections.
#[tokio::test]
async fn imports_of_more_names_than_a_catalog_takes_connections_share_one() -> Result<()> {
    const NAMES: usize = 20;
    let env = Env::builder()
        .kube()
        .zookeeper_max_client_connections(8)
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    support::install_crds(&client).await?;
    support::ensure_namespace(&client, "shop").await?;
    let connect = env.zookeeper()?.connect_string();
    localenv::python(
        "import sys\nfrom kazoo.client import KazooClient\n\
         zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
         for n in range(int(sys.argv[2])):\n    \
             zk.create('/services/db-%02d/providers/10.7.%d.1:5432' % (n, n), b'{}', makepath=True)\n\
         zk.stop(); zk.close()\n",
        &[&connect, &NAMES.to_string()],
    )?;
    kubectl_apply(
        &env,
        &json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "zk"},
            "spec": {"zookeeper": {"connect": connect}},
        }),
    )?;
    let cb = Controller::start(&env, "cb", "cluster-a", &[]).await?;
    for n in 0..NAMES {
        kubectl_apply(
            &env,
            &import(
                &format!("db-{n:02}"),
                "zk",
                &format!("db-{n:02}"),
                json!({"ports": [{"name": "pg", "port": 5432}]}),
            ),
        )?;
    }
    for n in 0..NAMES {
        wait_endpoints(
            &client,
            &format!("db-{n:02}"),
            &[&format!("10.7.{n}.1:5432")],
        )
        .await
        .with_context(|| cb.log())?;
    }
    // The controller's connections (its writer's session, the imports' one) and this command's.
    let cons = env.zookeeper()?.four_letter("cons").await?;
    let connections = cons.lines().filter(|l| l.contains("/127.0.0.1:")).count();
    println!("{NAMES} imports over {connections} connections to ZooKeeper:\n{cons}");
    ensure!(
        connections <= 5,
        "{connections} connections for {NAMES} imports"
    );
    Ok(())
}
