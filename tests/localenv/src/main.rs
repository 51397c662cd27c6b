//! `localenv`: starts every peer of the local environment and keeps it up until Ctrl-C, printing
//! how to reach each one (used by `make env`).

use anyhow::Result;
use clap::Parser;

/// Start the real kube-apiserver, kube-controller-manager, etcd, Consul and ZooKeeper on
/// loopback and keep them running until Ctrl-C.
#[derive(Parser)]
#[command(name = "localenv", version)]
struct Args {
    /// Leave kube-controller-manager out.
    #[arg(long)]
    no_controller_manager: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut b = localenv::Env::builder().kube().consul().etcd().zookeeper();
    if !args.no_controller_manager {
        b = b.controller_manager();
    }
    eprintln!(
        "starting kube-apiserver, etcd, Consul and ZooKeeper{}...",
        if args.no_controller_manager {
            ""
        } else {
            " and kube-controller-manager"
        }
    );
    let env = b.start().await?;
    let kube = env.kube()?;
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
    println!();
    println!("Press Ctrl-C to stop everything.");
    tokio::signal::ctrl_c().await?;
    eprintln!("stopping...");
    drop(env);
    Ok(())
}
