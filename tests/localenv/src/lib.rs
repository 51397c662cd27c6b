//! The local environment of catalog-bridge: the real kube-apiserver, kube-controller-manager,
//! etcd, Consul and ZooKeeper, started on loopback with free ports in temporary directories,
//! for the integration tests, `make env` and `make demo`.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let env = localenv::Env::builder().kube().consul().start().await?;
//! let client = env.kube()?.client().await?;
//! let consul = env.consul()?.url();
//! # Ok(()) }
//! ```
//!
//! Nothing is ever skipped: a peer that cannot start is an error that carries its log.

pub mod cluster;
pub mod consul;
pub mod env;
pub mod etcd;
pub mod image;
pub mod kube;
pub mod node;
pub mod ports;
pub mod process;
pub mod programs;
pub mod proxy;
pub mod ready;
pub mod tls;
pub mod workload;
pub mod zookeeper;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub use cluster::Cluster;
pub use env::{Builder, Env, Scope, shared};
pub use ready::eventually;
pub use tls::{TlsFiles, https_client};

/// Makes ring the process's TLS crypto provider (reqwest is built without one of its own, so
/// that one provider serves kube, etcd and HTTP alike). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A plain HTTP client for probing peers and for tests.
pub fn http_client() -> Result<reqwest::Client> {
    install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("building an HTTP client")
}

/// Runs a command to completion; its standard output on success, an error with both streams
/// otherwise.
pub fn run_tool(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}):\n{}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Runs a Python snippet with the real catalog clients (kazoo, py-consul) installed; `args`
/// become `sys.argv[1:]`. Returns its standard output.
pub fn python(script: &str, args: &[&str]) -> Result<String> {
    run_tool(
        Command::new(programs::python()?)
            .arg("-c")
            .arg(script)
            .args(args),
    )
}
