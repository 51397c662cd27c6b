//! A real etcd server (v3.6) on loopback.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ports::free_port;
use crate::process::{Process, Spec};
use crate::programs;
use crate::ready::wait_ready;

pub struct Etcd {
    process: Process,
    client_port: u16,
    http: reqwest::Client,
}

impl Etcd {
    /// Starts etcd with its data in `dir/<name>` and waits until `/health` says true.
    pub async fn start(dir: &Path, name: &str) -> Result<Etcd> {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let spec = Spec::new(name, programs::etcd()?, dir)
            .arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", data.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={name}={peer}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let etcd = Etcd {
            process: Process::start(spec)?,
            client_port,
            http: crate::http_client()?,
        };
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    async fn wait_ready(&self) -> Result<()> {
        let url = format!("{}/health", self.url());
        wait_ready(&self.process, Duration::from_secs(60), || async {
            let body: serde_json::Value = self.http.get(&url).send().await?.json().await?;
            Ok(body["health"] == "true")
        })
        .await
    }

    /// `127.0.0.1:<port>`, the form etcd clients take as an endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.endpoint())
    }

    /// Runs `etcdctl` against this server and returns its standard output.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        crate::run_tool(
            std::process::Command::new(programs::etcdctl()?)
                .arg(format!("--endpoints={}", self.url()))
                .args(args),
        )
    }

    /// What etcd's gRPC resolver (`etcd:///<name>`) resolves `name` to, read with its own
    /// endpoints manager: the addresses, sorted. Fails when a key under the name does not
    /// decode as an endpoint.
    pub fn resolve(&self, name: &str) -> Result<Vec<String>> {
        let out = crate::run_tool(
            std::process::Command::new(programs::etcd_naming_reader()?)
                .arg(format!("--endpoints={}", self.endpoint()))
                .arg(name),
        )?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("etcd-naming-reader printed {out:?}"))
    }

    /// Stops etcd gracefully; [`Etcd::start_again`] brings it back with its data.
    pub fn stop(&self) -> Result<()> {
        self.process.stop()
    }

    /// Kills etcd with SIGKILL.
    pub fn kill(&self) -> Result<()> {
        self.process.kill()
    }

    /// Starts etcd again after a stop or kill (same port, same data) and waits until healthy.
    pub async fn start_again(&self) -> Result<()> {
        self.process.restart_process()?;
        self.wait_ready().await
    }

    pub fn process(&self) -> &Process {
        &self.process
    }
}
