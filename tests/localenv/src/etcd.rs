//! A real etcd server (v3.6) on loopback.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ports::free_port;
use crate::process::{Process, Spec};
use crate::programs;
use crate::ready::wait_ready;
use crate::tls::TlsFiles;

pub struct Etcd {
    process: Process,
    client_port: u16,
    http: reqwest::Client,
    /// Client TLS material for etcdctl when etcd serves clients over TLS only.
    tls: Option<ClientTls>,
}

struct ClientTls {
    ca: String,
    cert: String,
    key: String,
}

impl Etcd {
    /// Starts etcd with its data in `dir/<name>` and waits until `/health` says true.
    pub async fn start(dir: &Path, name: &str) -> Result<Etcd> {
        Self::start_with(dir, name, None).await
    }

    /// Like [`Etcd::start`]; with `tls`, clients are served over TLS only with the set's server
    /// certificate, and each must present a certificate signed by the set's CA
    /// (`--client-cert-auth`). Peer traffic stays plain.
    pub async fn start_with(dir: &Path, name: &str, tls: Option<&TlsFiles>) -> Result<Etcd> {
        crate::ports::retry_if_port_taken(|| Self::start_once(dir, name, tls)).await
    }

    async fn start_once(dir: &Path, name: &str, tls: Option<&TlsFiles>) -> Result<Etcd> {
        let data = dir.join(name);
        // A first start: nothing of a try that lost its port stays (its member's URLs).
        let _ = std::fs::remove_dir_all(data.join("data"));
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{client_port}");
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
        let path = |p: &Path| p.display().to_string();
        let spec = match tls {
            Some(t) => spec
                .arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", path(&t.ca_file)))
                .arg(format!("--cert-file={}", path(&t.server_cert_file)))
                .arg(format!("--key-file={}", path(&t.server_key_file))),
            None => spec,
        };
        let etcd = Etcd {
            process: Process::start(spec)?,
            client_port,
            http: match tls {
                Some(t) => crate::tls::https_client(t)?,
                None => crate::http_client()?,
            },
            tls: tls.map(|t| ClientTls {
                ca: path(&t.ca_file),
                cert: path(&t.client_cert_file),
                key: path(&t.client_key_file),
            }),
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

    /// `127.0.0.1:<port>`, the form etcd clients take as an endpoint; `https://127.0.0.1:<port>`
    /// for a TLS etcd.
    pub fn endpoint(&self) -> String {
        match self.tls {
            Some(_) => self.url(),
            None => format!("127.0.0.1:{}", self.client_port),
        }
    }

    /// `http://127.0.0.1:<port>`, or `https://…` for a TLS etcd.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Runs `etcdctl` against this server and returns its standard output.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        crate::run_tool(
            std::process::Command::new(programs::etcdctl()?)
                .arg(format!("--endpoints={}", self.url()))
                .args(self.tls.iter().flat_map(|t| {
                    [
                        format!("--cacert={}", t.ca),
                        format!("--cert={}", t.cert),
                        format!("--key={}", t.key),
                    ]
                }))
                .args(args),
        )
    }

    /// What etcd's gRPC resolver (`etcd:///<name>`) resolves `name` to, read with its own
    /// endpoints manager: the addresses, sorted. Fails when a key under the name does not
    /// decode as an endpoint.
    pub fn resolve(&self, name: &str) -> Result<Vec<String>> {
        if self.tls.is_some() {
            anyhow::bail!("etcd-naming-reader speaks plain text only; this etcd requires TLS");
        }
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
