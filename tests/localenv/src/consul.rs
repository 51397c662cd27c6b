//! A real Consul agent (v1.14, `-dev` server mode) on loopback. A dev agent keeps nothing on
//! disk: starting it again gives an empty catalog, which is exactly the fault a restart of a
//! real Consul cluster that lost its state would cause.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::ports::free_port;
use crate::process::{Process, Spec};
use crate::programs;
use crate::ready::wait_ready;
use crate::tls::TlsFiles;

pub struct Consul {
    process: Process,
    http_port: u16,
    node: String,
    http: reqwest::Client,
    acl_token: Option<String>,
    /// Serves HTTPS only, verifying client certificates.
    tls: bool,
}

impl Consul {
    /// Starts a dev agent with every port on a free loopback port and waits until it has a
    /// leader and has registered its own node.
    pub async fn start(dir: &Path, name: &str) -> Result<Consul> {
        Self::start_with_acl(dir, name, None).await
    }

    /// Like [`Consul::start`]; with `acl_token`, ACLs are enabled with default policy `deny`
    /// and `acl_token` is the initial management token.
    pub async fn start_with_acl(dir: &Path, name: &str, acl_token: Option<&str>) -> Result<Consul> {
        Self::start_with(dir, name, acl_token, None).await
    }

    /// Like [`Consul::start_with_acl`]; with `tls`, the HTTP API is served over HTTPS only
    /// (the plain HTTP port is off), with the set's server certificate, and every client must
    /// present a certificate signed by the set's CA (`verify_incoming`).
    pub async fn start_with(
        dir: &Path,
        name: &str,
        acl_token: Option<&str>,
        tls: Option<&TlsFiles>,
    ) -> Result<Consul> {
        Self::start_configured(dir, name, acl_token, tls, None).await
    }

    /// Like [`Consul::start_with`], with `hcl` added to the configuration.
    pub async fn start_configured(
        dir: &Path,
        name: &str,
        acl_token: Option<&str>,
        tls: Option<&TlsFiles>,
        hcl: Option<&str>,
    ) -> Result<Consul> {
        crate::ports::retry_if_port_taken(|| Self::start_once(dir, name, acl_token, tls, hcl)).await
    }

    /// Like [`Consul::start_with_acl`], with Connect (the service mesh, on in dev mode) turned
    /// off, as on servers before Consul 1.16 unless configured.
    pub async fn start_without_connect(
        dir: &Path,
        name: &str,
        acl_token: Option<&str>,
    ) -> Result<Consul> {
        Self::start_configured(
            dir,
            name,
            acl_token,
            None,
            Some("connect { enabled = false }"),
        )
        .await
    }

    async fn start_once(
        dir: &Path,
        name: &str,
        acl_token: Option<&str>,
        tls: Option<&TlsFiles>,
        hcl: Option<&str>,
    ) -> Result<Consul> {
        let http_port = free_port()?;
        let node = format!("{name}-{http_port}");
        let mut spec = Spec::new(name, programs::consul()?, dir).args([
            "agent",
            "-dev",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            "-log-level=warn",
            "-disable-host-node-id",
        ]);
        spec = spec.arg(format!("-node={node}"));
        if let Some(t) = tls {
            let path = |p: &Path| p.display().to_string();
            spec = spec.arg("-hcl").arg(format!(
                "ports {{ http = -1, https = {http_port} }} \
                 tls {{ https {{ ca_file = {:?}, cert_file = {:?}, key_file = {:?}, verify_incoming = true }} }}",
                path(&t.ca_file),
                path(&t.server_cert_file),
                path(&t.server_key_file),
            ));
        } else {
            spec = spec.arg(format!("-http-port={http_port}"));
        }
        for flag in [
            "-dns-port",
            "-grpc-port",
            "-grpc-tls-port",
            "-serf-lan-port",
            "-serf-wan-port",
            "-server-port",
        ] {
            spec = spec.arg(format!("{flag}={}", free_port()?));
        }
        if let Some(hcl) = hcl {
            spec = spec.arg("-hcl").arg(hcl);
        }
        if let Some(token) = acl_token {
            spec = spec.arg("-hcl").arg(format!(
                "acl {{ enabled = true, default_policy = \"deny\", tokens {{ initial_management = \"{token}\" }} }}"
            ));
        }
        if let Some(hcl) = hcl {
            spec = spec.arg("-hcl").arg(hcl);
        }
        let consul = Consul {
            process: Process::start(spec)?,
            http_port,
            node,
            http: match tls {
                Some(t) => crate::tls::https_client(t)?,
                None => crate::http_client()?,
            },
            acl_token: acl_token.map(str::to_string),
            tls: tls.is_some(),
        };
        consul.wait_ready().await?;
        Ok(consul)
    }

    async fn wait_ready(&self) -> Result<()> {
        let leader = format!("{}/v1/status/leader", self.url());
        let node = format!("{}/v1/catalog/node/{}", self.url(), self.node);
        let get = |url: String| {
            let mut r = self.http.get(url);
            if let Some(t) = &self.acl_token {
                r = r.header("X-Consul-Token", t);
            }
            r.send()
        };
        wait_ready(&self.process, Duration::from_secs(60), || async {
            let l: String = get(leader.clone())
                .await?
                .error_for_status()?
                .json()
                .await?;
            if l.is_empty() {
                return Ok(false);
            }
            let n: serde_json::Value = get(node.clone()).await?.error_for_status()?.json().await?;
            Ok(!n.is_null())
        })
        .await
    }

    /// `127.0.0.1:<http port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// `http://127.0.0.1:<http port>`, or `https://…` for a TLS agent.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.address())
    }

    /// The name of the agent's own node.
    pub fn agent_node(&self) -> &str {
        &self.node
    }

    pub fn stop(&self) -> Result<()> {
        self.process.stop()
    }

    pub fn kill(&self) -> Result<()> {
        self.process.kill()
    }

    /// Starts the agent again (same ports, empty catalog) and waits until it is ready.
    pub async fn start_again(&self) -> Result<()> {
        self.process.restart_process()?;
        self.wait_ready().await
    }

    pub fn process(&self) -> &Process {
        &self.process
    }
}
