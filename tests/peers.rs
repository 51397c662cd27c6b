//! Proof that every peer of the test environment is the real program, reached the way the
//! controller and the catalogs' own clients reach it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use localenv::{eventually, workload};
use serde_json::{Value, json};

#[tokio::test]
async fn apiserver_stores_and_returns_objects() -> Result<()> {
    let env = localenv::shared().await?;
    let scope = env.scope("apiserver").await?;
    let client = env.kube()?.client().await?;

    let version = client.apiserver_version().await?;
    assert_eq!(
        version.git_version, "v1.36.3",
        "the real v1.36.3 API server"
    );

    let cms: Api<ConfigMap> = Api::namespaced(client, &scope.namespace);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "data": {"api_x": "10.0.0.1:8080"},
    }))?;
    cms.create(&PostParams::default(), &cm).await?;
    let back = cms.get("hello").await?;
    assert_eq!(
        back.data.and_then(|d| d.get("api_x").cloned()).as_deref(),
        Some("10.0.0.1:8080")
    );
    assert!(back.metadata.uid.is_some(), "the server assigned a uid");
    env.drop_scope(&scope).await
}

/// The real path from Pods to EndpointSlices: a Node, a Service, Pods whose status we patch
/// (no kubelet exists), and kube-controller-manager's EndpointSlice controller in between.
#[tokio::test]
async fn controller_manager_writes_endpointslices_from_pod_readiness() -> Result<()> {
    let env = localenv::shared().await?;
    let scope = env.scope("endpointslices").await?;
    let ns = scope.namespace.as_str();
    let client = env.kube()?.client().await?;

    workload::ensure_node(&client, "node-1").await?;
    workload::create_service(&client, ns, "api-x", 8080, BTreeMap::new()).await?;
    for (name, ip) in [("api-x-1", "10.0.0.1"), ("api-x-2", "10.0.0.2")] {
        let pod = workload::PodSpec {
            name,
            app: "api-x",
            node: "node-1",
            ip,
            port: 8080,
            ready: true,
        };
        workload::create_pod(&client, ns, &pod).await?;
    }

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels("kubernetes.io/service-name=api-x");
    let ready_ips = || async {
        let mut ready = Vec::new();
        for s in slices.list(&lp).await?.items {
            for e in s.endpoints {
                if e.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                    ready.extend(e.addresses);
                }
            }
        }
        ready.sort();
        Ok::<_, anyhow::Error>(ready)
    };

    eventually("two ready endpoints", Duration::from_secs(30), || async {
        let ips = ready_ips().await?;
        Ok((ips == ["10.0.0.1", "10.0.0.2"]).then_some(()))
    })
    .await?;

    let flipped = Instant::now();
    workload::set_pod_ready(&client, ns, "api-x-2", false).await?;
    eventually("api-x-2 not ready", Duration::from_secs(30), || async {
        Ok((ready_ips().await? == ["10.0.0.1"]).then_some(()))
    })
    .await?;
    println!(
        "pod readiness -> EndpointSlice took {:?}",
        flipped.elapsed()
    );
    env.drop_scope(&scope).await
}

/// A service registered through Consul's catalog API on a synthetic node is read back through
/// the health endpoint, and by py-consul, the client users run.
#[tokio::test]
async fn consul_catalog_registers_and_answers_health_queries() -> Result<()> {
    let env = localenv::shared().await?;
    let scope = env.scope("consul").await?;
    let consul = env.consul()?;
    let http = localenv::http_client()?;
    let service = scope.name("api_x");
    let node = scope.name("node");

    for (id, ip, status) in [
        ("a", "10.0.0.1", "passing"),
        ("b", "10.0.0.2", "passing"),
        ("c", "10.0.0.3", "critical"),
    ] {
        let body = json!({
            "Node": node,
            "Address": "192.0.2.1",
            "NodeMeta": {"external-source": "kubernetes"},
            "Service": {"ID": format!("{service}-{id}"), "Service": service, "Address": ip, "Port": 8080},
            "Check": {"CheckID": format!("check-{id}"), "Name": "ready", "Status": status,
                      "ServiceID": format!("{service}-{id}")},
        });
        http.put(format!("{}/v1/catalog/register", consul.url()))
            .json(&body)
            .send()
            .await?
            .error_for_status()
            .context("registering in the catalog")?;
    }

    let passing: Vec<Value> = http
        .get(format!(
            "{}/v1/health/service/{service}?passing",
            consul.url()
        ))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut addrs: Vec<String> = passing
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["Service"]["Address"].as_str().unwrap_or(""),
                e["Service"]["Port"]
            )
        })
        .collect();
    addrs.sort();
    assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.2:8080"]);

    let py = localenv::python(
        "import sys, consul\n\
         host, port = sys.argv[1].split(':')\n\
         c = consul.Consul(host=host, port=int(port))\n\
         _, entries = c.health.service(sys.argv[2], passing=True)\n\
         print(' & '.join(sorted(f\"{e['Service']['Address']}:{e['Service']['Port']}\" for e in entries)))\n",
        &[&consul.address(), &service],
    )?;
    assert_eq!(
        py.trim(),
        "10.0.0.1:8080 & 10.0.0.2:8080",
        "py-consul sees the passing instances"
    );
    Ok(())
}

/// A key attached to a lease exists while the lease does and is gone once it is revoked, seen
/// through etcdctl, etcd's own client.
#[tokio::test]
async fn etcd_lease_revocation_removes_keys() -> Result<()> {
    let env = localenv::shared().await?;
    let scope = env.scope("etcd").await?;
    let etcd = env.etcd()?;
    let key = format!("/{}/services/api_x/providers/10.0.0.1:8080", scope.prefix);

    let grant = etcd.etcdctl(&["lease", "grant", "60"])?;
    // "lease 694d9a5a2e9c8f0b granted with TTL(60s)"
    let lease = grant
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("unexpected etcdctl output {grant:?}"))?
        .to_string();
    etcd.etcdctl(&["put", &format!("--lease={lease}"), &key, "10.0.0.1:8080"])?;
    let got = etcd.etcdctl(&["get", "--prefix", &format!("/{}/", scope.prefix)])?;
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        [key.as_str(), "10.0.0.1:8080"]
    );

    etcd.etcdctl(&["lease", "revoke", &lease])?;
    let after = etcd.etcdctl(&["get", "--prefix", &format!("/{}/", scope.prefix)])?;
    assert_eq!(after.trim(), "", "the key went with its lease");
    Ok(())
}

/// An ephemeral znode created by one session (the Rust client the controller uses) is listed by
/// kazoo and disappears when that session closes.
#[tokio::test]
async fn zookeeper_ephemeral_node_ends_with_its_session() -> Result<()> {
    use zookeeper_client as zk;
    let env = localenv::shared().await?;
    let scope = env.scope("zookeeper").await?;
    let zk_server = env.zookeeper()?;
    let base = format!("/{}/services/mysql_x/providers", scope.prefix);

    let session = zk::Client::connect(&zk_server.connect_string()).await?;
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let mut path = String::new();
    for part in base.trim_start_matches('/').split('/') {
        path.push('/');
        path.push_str(part);
        match session.create(&path, b"", &persistent).await {
            Ok(_) | Err(zk::Error::NodeExists) => {}
            Err(e) => return Err(e).with_context(|| format!("creating {path}")),
        }
    }
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    session
        .create(&format!("{base}/10.0.0.8:3306"), b"{}", &ephemeral)
        .await?;

    let list = "import sys\n\
                from kazoo.client import KazooClient\n\
                zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
                print(','.join(sorted(zk.get_children(sys.argv[2]))))\n\
                zk.stop()\n";
    let children = localenv::python(list, &[&zk_server.connect_string(), &base])?;
    assert_eq!(
        children.trim(),
        "10.0.0.8:3306",
        "kazoo lists the ephemeral node"
    );

    drop(session);
    let gone = eventually(
        "the ephemeral node to go",
        Duration::from_secs(15),
        || async {
            let c = localenv::python(list, &[&zk_server.connect_string(), &base])?;
            Ok(c.trim().is_empty().then_some(()))
        },
    )
    .await;
    gone?;
    let mntr = zk_server.four_letter("srvr").await?;
    ensure!(
        mntr.contains("Mode: standalone"),
        "zookeeper answers srvr: {mntr}"
    );
    Ok(())
}

/// kubectl and helm, the tools users run, talk to the test API server.
#[tokio::test]
async fn kubectl_and_helm_reach_the_apiserver() -> Result<()> {
    let env = localenv::shared().await?;
    let scope = env.scope("tools").await?;
    let kube = env.kube()?;

    let version: Value = serde_json::from_str(&kube.kubectl(&["version", "-o", "json"])?)?;
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.36.3");
    assert_eq!(version["clientVersion"]["gitVersion"], "v1.36.3");

    let chart = env.dir().join(format!("chart-{}", scope.prefix));
    std::fs::create_dir_all(chart.join("templates"))?;
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: smoke\nversion: 0.1.0\n",
    )?;
    std::fs::write(
        chart.join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
    )?;
    let chart_path = chart.display().to_string();
    kube.helm(&[
        "install",
        "smoke",
        &chart_path,
        "--namespace",
        &scope.namespace,
        "--set",
        "greeting=hello",
    ])?;
    let got = kube.kubectl(&[
        "get",
        "configmap",
        "smoke-cm",
        "-n",
        &scope.namespace,
        "-o",
        "jsonpath={.data.greeting}",
    ])?;
    assert_eq!(got, "hello");
    let releases = kube.helm(&["list", "-n", &scope.namespace, "-q"])?;
    assert_eq!(releases.trim(), "smoke");
    env.drop_scope(&scope).await
}
