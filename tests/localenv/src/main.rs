//! `localenv`: starts every peer of the local environment and keeps it up until Ctrl-C, printing
//! how to reach each one (used by `make env`; `make env NODE=1` adds a node that runs Pods).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

/// Start the real kube-apiserver, kube-controller-manager, etcd, Consul and ZooKeeper on
/// loopback and keep them running until Ctrl-C.
#[derive(Parser)]
#[command(name = "localenv", version)]
struct Args {
    /// Leave kube-controller-manager out (not with --node).
    #[arg(long, conflicts_with = "node")]
    no_controller_manager: bool,
    /// Also run a node (kubelet, containerd, kube-proxy, kube-scheduler) so that Deployments
    /// run as Pods: everything then lives in a network namespace of its own (needs root).
    #[arg(long)]
    node: bool,
    /// Container images (docker-archive tarballs, e.g. from `make image`) to load into the node.
    #[arg(long, requires = "node")]
    image: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.node {
        return localenv::node::run(|| serve(&args));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building a Tokio runtime")?
        .block_on(serve(&args))
}

async fn serve(args: &Args) -> Result<()> {
    let mut b = localenv::Env::builder().kube().consul().etcd().zookeeper();
    if args.node {
        b = b.node();
    } else if !args.no_controller_manager {
        b = b.controller_manager();
    }
    eprintln!(
        "starting kube-apiserver, etcd, Consul and ZooKeeper{}...",
        match (args.node, args.no_controller_manager) {
            (true, _) => ", kube-controller-manager and a node",
            (false, true) => "",
            (false, false) => " and kube-controller-manager",
        }
    );
    let env = b.start().await?;
    let kube = env.kube()?;
    if let Ok(node) = env.node() {
        for image in &args.image {
            node.load_image(image)?;
            eprintln!("loaded {} into the node", image.display());
        }
    }
    println!(
        "environment is up (files and logs in {})",
        env.dir().display()
    );
    println!();
    println!("  export KUBECONFIG={}", kube.kubeconfig_path().display());
    println!("  kube-apiserver   {}", kube.server_url());
    println!(
        "  consul           {}   (UI: {}/ui/)",
        env.consul()?.url(),
        env.consul()?.url()
    );
    println!("  etcd             {}", env.etcd()?.endpoint());
    println!("  zookeeper        {}", env.zookeeper()?.connect_string());
    if env.node().is_ok() {
        let ns = localenv::node::netns_name();
        println!(
            "  node             {} (Pods in {}), network namespace {ns}",
            localenv::node::NODE_NAME,
            localenv::node::POD_CIDR
        );
        println!();
        println!("Everything listens inside network namespace {ns}; run clients there:");
        println!("  ip netns exec {ns} kubectl get nodes");
        println!(
            "  ip netns exec {ns} helm install cb charts/catalog-bridge -n catalog-bridge \\\n    \
             --create-namespace --set image.pullPolicy=Never --wait"
        );
    }
    println!();
    println!("Press Ctrl-C to stop everything.");
    tokio::signal::ctrl_c().await?;
    eprintln!("stopping...");
    drop(env);
    Ok(())
}
