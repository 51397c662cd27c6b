//! The scenario of the talk this product grew out of, on loopback, with the real API server,
//! kube-controller-manager and catalogs, and the controller binary. `make demo` runs it and
//! stays up; `tests/demo.rs` runs it and checks every line it prints.
//!
//! `api_x` runs as two Pods in Kubernetes and is exported to Consul; `memcache` runs as two
//! Pods and is exported to etcd. Anyone asking Consul "where is api_x?" gets
//! `api_x @ 10.0.0.1:8080 & 10.0.0.2:8080`, anyone reading etcd's `/services/memcache/providers`
//! gets `memcache @ 10.4.0.1:8080 & 10.4.0.2:8080`. `mysql_x`, registered in ZooKeeper by an
//! outside client, appears in Kubernetes as the Service `mysql-x` with an EndpointSlice. Then
//! one Pod turns unready and the answer follows.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use localenv::{Env, workload};

use crate::support::{
    self, ConsulView, Controller, annotations, consul_catalog, deploy, kubectl_apply,
};

/// The running scenario: the environment, the controller and the outside registrant stay up
/// until it is dropped. `make demo` only keeps it; `tests/demo.rs` reads it.
#[allow(dead_code)]
pub struct Demo {
    pub env: Env,
    pub cb: Controller,
    registrant: Child,
    /// Every line the scenario printed on stdout, in order.
    pub transcript: Vec<String>,
    /// How to explore it, as printed at the end.
    pub explore: Explore,
}

/// What the demo prints under "Explore it": the setup lines prepare a shell, each command
/// then runs in it as printed, and the addresses answer HTTP.
pub struct Explore {
    pub setup: Vec<String>,
    pub commands: Vec<(String, &'static str)>,
    pub addresses: Vec<(&'static str, String)>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.registrant.kill();
        let _ = self.registrant.wait();
    }
}

/// Progress on stderr, so that stdout holds only the answers.
fn step(s: &str) {
    eprintln!("==> {s}");
}

#[derive(Default)]
struct Out(Vec<String>);

impl Out {
    fn say(&mut self, line: impl Into<String>) {
        let line = line.into();
        println!("{line}");
        self.0.extend(line.lines().map(str::to_string));
        if line.is_empty() {
            self.0.push(String::new());
        }
    }
}

/// `catalog-bridge query <catalog> <name>`: the answer a discovery client reading the catalog
/// gets, as one line.
fn query(env: &Env, catalog: &str, name: &str) -> Result<String> {
    let out = localenv::run_tool(
        Command::new(support::controller_bin()?)
            .env("KUBECONFIG", env.kube()?.kubeconfig_path())
            .args(["query", catalog, name]),
    )?;
    Ok(out.trim().to_string())
}

pub async fn run() -> Result<Demo> {
    let mut out = Out::default();
    step(
        "starting kube-apiserver, kube-controller-manager, etcd, Consul and ZooKeeper on loopback",
    );
    let env = Env::builder().all().start().await?;
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
    localenv::eventually("memcache in etcd", Duration::from_secs(60), || async {
        let a = query(&env, "etcd", "memcache")?;
        Ok(a.contains('&').then_some(()))
    })
    .await
    .with_context(|| cb.log())?;
    out.say("");
    out.say(format!(
        "Consul answers:  {}",
        query(&env, "consul", "api_x")?
    ));
    out.say(format!(
        "etcd answers:    {}",
        query(&env, "etcd", "memcache")?
    ));
    out.say(
        "  (etcdctl get --prefix /services/memcache/providers/ reads the same keys, on the controller's lease)",
    );
    out.say("");

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
    let registrant = register_in_zookeeper(&zk)?;
    out.say(format!(
        "ZooKeeper answers: {}",
        query(&env, "zk", "mysql_x")?
    ));

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
    out.say("");
    out.say("Service shop/mysql-x (pods reach it as mysql-x.shop.svc), its EndpointSlice:");
    out.say(slices.trim_end());
    out.say("");

    step("Pod api-x-2 turns unready");
    let t = Instant::now();
    workload::set_pod_ready(&client, "shop", "api-x-2", false).await?;
    consul
        .wait_passing("api_x", &["10.0.0.1:8080"], Duration::from_secs(60))
        .await?;
    let took = t.elapsed();
    out.say(format!(
        "Consul answers:  {}   (updated {took:.0?} after the Pod turned unready)",
        query(&env, "consul", "api_x")?
    ));
    out.say("");

    let explore = explore(&env, &cb, &consul_url)?;
    out.say("Explore it (until Ctrl-C):");
    for line in &explore.setup {
        out.say(format!("  {line}"));
    }
    for (command, what) in &explore.commands {
        out.say(format!("  {command:<37} # {what}"));
    }
    for (what, address) in &explore.addresses {
        out.say(format!("  {what:<16}{address}"));
    }
    out.say(format!(
        "  controller log: {}",
        cb.process.log_path().display()
    ));
    out.say(format!(
        "  zookeeper:      {}",
        env.zookeeper()?.connect_string()
    ));
    Ok(Demo {
        env,
        cb,
        registrant,
        transcript: out.0,
        explore,
    })
}

/// An application outside Kubernetes registering itself the way the talk shows: kazoo, an
/// ephemeral node that lives as long as the process.
fn register_in_zookeeper(zk: &str) -> Result<Child> {
    let mut registrant = Command::new(localenv::programs::python()?)
        .arg("-c")
        .arg(
            "import signal, sys\nfrom kazoo.client import KazooClient\n\
             signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the demo, which stops this\n\
             zk = KazooClient(hosts=sys.argv[1]); zk.start(timeout=15)\n\
             zk.create('/services/mysql_x/providers/10.8.0.8:3306', b'{}', ephemeral=True, makepath=True)\n\
             print('READY', flush=True)\nsys.stdin.read()\n",
        )
        .arg(zk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the kazoo registrant")?;
    let stdout = registrant.stdout.take().context("kazoo output")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("READY") {
        let _ = registrant.kill();
        anyhow::bail!("kazoo did not register mysql_x: {line:?}");
    }
    Ok(registrant)
}

fn explore(env: &Env, cb: &Controller, consul_url: &str) -> Result<Explore> {
    let kube = env.kube()?;
    let bin = support::controller_bin()?;
    Ok(Explore {
        setup: vec![
            format!("export KUBECONFIG={}", kube.kubeconfig_path().display()),
            format!("alias kubectl={}", localenv::programs::kubectl()?.display()),
            format!("alias catalog-bridge={}", bin.display()),
            format!(
                "alias etcdctl='{} --endpoints={}'",
                localenv::programs::etcdctl()?.display(),
                env.etcd()?.endpoint()
            ),
        ],
        commands: vec![
            (
                "catalog-bridge query consul api_x".to_string(),
                "what a discovery client gets",
            ),
            (
                "catalog-bridge query etcd memcache".to_string(),
                "... from etcd",
            ),
            (
                "catalog-bridge query zk mysql_x".to_string(),
                "... from ZooKeeper",
            ),
            (
                "kubectl get xcat".to_string(),
                "catalogs, Reachable, entries",
            ),
            (
                "kubectl get xreg -A".to_string(),
                "the mysql-x import and its endpoints",
            ),
            (
                "kubectl get endpointslices -n shop".to_string(),
                "what Kubernetes says is ready",
            ),
            (
                format!("curl -s '{consul_url}/v1/health/service/api_x?passing'"),
                "what Consul says",
            ),
            (
                "etcdctl get --prefix /services/".to_string(),
                "what etcd holds",
            ),
        ],
        addresses: vec![
            ("Consul UI:", format!("{consul_url}/ui/")),
            (
                "metrics:",
                format!("http://127.0.0.1:{}/metrics", cb.metrics_port),
            ),
        ],
    })
}
