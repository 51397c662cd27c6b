//! `make demo`: the scenario of the talk this product grew out of, on loopback, with the real
//! API server, kube-controller-manager and catalogs, and the controller binary.
//!
//! `api_x` runs as two Pods in Kubernetes and is exported to Consul; `memcache` runs as two
//! Pods and is exported to etcd. Anyone asking Consul "where is api_x?" gets
//! `api_x @ 10.0.0.1:8080 & 10.0.0.2:8080`, anyone reading etcd's `/services/memcache/providers`
//! gets `memcache @ 10.4.0.1:8080 & 10.4.0.2:8080`. `mysql_x`, registered in ZooKeeper by an
//! outside client, appears in Kubernetes as the Service `mysql-x` with an EndpointSlice. Then
//! one Pod turns unready and the answer follows.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use localenv::workload;
use support::{ConsulView, Controller, annotations, consul_catalog, deploy, kubectl_apply};

fn step(s: &str) {
    eprintln!("==> {s}");
}

#[tokio::main]
async fn main() -> Result<()> {
    step(
        "starting kube-apiserver, kube-controller-manager, etcd, Consul and ZooKeeper on loopback",
    );
    let env = localenv::Env::builder().all().start().await?;
    let kube = env.kube()?;
    let client = kube.client().await?;
    let consul_url = env.consul()?.url();

    step("installing the CRDs and the ExternalCatalogs `consul` and `etcd`");
    support::install_crds(&client).await?;
    kubectl_apply(
        &env,
        &consul_catalog("consul", std::slice::from_ref(&consul_url), "k8s-demo"),
    )?;
    kubectl_apply(
        &env,
        &serde_json::json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "etcd"},
            "spec": {"etcd": {"endpoints": [env.etcd()?.endpoint()], "layout": "plain"}},
        }),
    )?;

    step("starting catalog-bridge");
    let cb = Controller::start(&env, "catalog-bridge", "demo", &["--drift-interval=5s"]).await?;

    step("deploying api-x (2 Pods) in namespace shop, annotated catalog-bridge.io/export=consul");
    deploy(
        &client,
        "shop",
        "api-x",
        0,
        2,
        annotations(&[
            ("catalog-bridge.io/export", "consul"),
            ("catalog-bridge.io/name", "api_x"),
        ]),
    )
    .await?;

    step("deploying memcache (2 Pods) in namespace shop, annotated catalog-bridge.io/export=etcd");
    deploy(
        &client,
        "shop",
        "memcache",
        4,
        2,
        annotations(&[("catalog-bridge.io/export", "etcd")]),
    )
    .await?;

    let consul = ConsulView::new(consul_url.clone())?;
    consul
        .wait_passing(
            "api_x",
            &["10.0.0.1:8080", "10.0.0.2:8080"],
            Duration::from_secs(60),
        )
        .await
        .with_context(|| cb.log())?;
    let query = |env: &localenv::Env, catalog: &str, name: &str| -> Result<String> {
        let out = localenv::run_tool(
            std::process::Command::new(support::controller_bin()?)
                .env("KUBECONFIG", env.kube()?.kubeconfig_path())
                .args(["query", catalog, name]),
        )?;
        Ok(out.trim().to_string())
    };
    localenv::eventually("memcache in etcd", Duration::from_secs(60), || async {
        let a = query(&env, "etcd", "memcache")?;
        Ok(a.contains('&').then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    println!();
    println!("Consul answers:  {}", query(&env, "consul", "api_x")?);
    println!("etcd answers:    {}", query(&env, "etcd", "memcache")?);
    println!(
        "  (etcdctl get --prefix /services/memcache/providers/ reads the same keys, on the controller's lease)"
    );
    println!();

    step(
        "mysql_x registers itself in ZooKeeper from outside Kubernetes (kazoo, an ephemeral node)",
    );
    let zk = env.zookeeper()?.connect_string();
    kubectl_apply(
        &env,
        &serde_json::json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "zk"},
            "spec": {"zookeeper": {"connect": zk}},
        }),
    )?;
    let mut registrant = std::process::Command::new(localenv::programs::python()?)
        .arg("-c")
        .arg(
            "import sys\nfrom kazoo.client import KazooClient\n\
             zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
             zk.create('/services/mysql_x/providers/10.8.0.8:3306', b'{}', ephemeral=True, makepath=True)\n\
             print('READY', flush=True)\nsys.stdin.read()\n",
        )
        .arg(&zk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the kazoo registrant")?;
    {
        use std::io::BufRead;
        let out = registrant.stdout.take().context("kazoo output")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        anyhow::ensure!(
            line.starts_with("READY"),
            "kazoo did not register mysql_x: {line}"
        );
    }
    println!("ZooKeeper answers: {}", query(&env, "zk", "mysql_x")?);

    step("importing mysql_x into Kubernetes (ExternalRegistration, direction Import)");
    kubectl_apply(
        &env,
        &serde_json::json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": "mysql-x", "namespace": "shop"},
            "spec": {"catalogRef": {"name": "zk"}, "direction": "Import", "externalName": "mysql_x",
                     "target": {"ports": [{"name": "mysql", "port": 3306}]}},
        }),
    )?;
    let slices = localenv::eventually(
        "the imported EndpointSlice",
        Duration::from_secs(60),
        || async {
            let out = kube.kubectl(&[
                "get",
                "endpointslices",
                "-n",
                "shop",
                "-l",
                "kubernetes.io/service-name=mysql-x",
            ])?;
            Ok(out.contains("10.8.0.8").then_some(out))
        },
    )
    .await
    .with_context(|| cb.log())?;
    println!();
    println!("Service shop/mysql-x (pods reach it as mysql-x.shop.svc), its EndpointSlice:");
    print!("{slices}");
    println!();

    step("Pod api-x-2 turns unready");
    let t = Instant::now();
    workload::set_pod_ready(&client, "shop", "api-x-2", false).await?;
    consul
        .wait_passing("api_x", &["10.0.0.1:8080"], Duration::from_secs(60))
        .await?;
    let took = t.elapsed();
    println!();
    println!(
        "Consul answers:  {}   (updated {took:.0?} after the Pod turned unready)",
        query(&env, "consul", "api_x")?
    );
    println!();

    let kc = kube.kubeconfig_path().display();
    println!("Explore it (until Ctrl-C):");
    println!("  export KUBECONFIG={kc}");
    println!(
        "  alias kubectl={}",
        localenv::programs::kubectl()?.display()
    );
    println!(
        "  {} query consul api_x   # what a discovery client gets (also: etcd memcache, zk mysql_x)",
        support::controller_bin()?.display()
    );
    println!("  kubectl get xcat                      # catalogs, Reachable, entries");
    println!("  kubectl get xreg -A                   # the mysql-x import and its endpoints");
    println!("  kubectl get endpointslices -n shop    # what Kubernetes says is ready");
    println!("  curl -s {consul_url}/v1/health/service/api_x?passing   # what Consul says");
    println!("  Consul UI: {consul_url}/ui/");
    println!("  metrics:   http://127.0.0.1:{}/metrics", cb.metrics_port);
    println!("  controller log: {}", cb.process.log_path().display());
    println!(
        "  {} --endpoints={} get --prefix /services/   # what etcd holds",
        localenv::programs::etcdctl()?.display(),
        env.etcd()?.endpoint()
    );
    println!("  zookeeper: {}", env.zookeeper()?.connect_string());
    tokio::signal::ctrl_c().await?;
    let _ = registrant.kill();
    step("stopping");
    Ok(())
}
