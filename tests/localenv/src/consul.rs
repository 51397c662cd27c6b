//! A real Consul agent (v1.14) on loopback: a `-dev` server, or one of three servers of a
//! cluster ([`Cluster::<Consul>::start`]). A dev agent keeps nothing on disk: starting it again
//! gives an empty catalog, which is exactly the fault a restart of a real Consul cluster that
//! lost its state would cause. A cluster's servers keep their state in data directories.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cluster::{Cluster, MEMBERS, Member, start_all};

use crate::ports::free_port;
use crate::process::{Process, Spec};
use crate::programs;
use crate::ready::wait_ready;
use crate::tls::TlsFiles;

/// The loopback ports of one agent that others need to know: its HTTP API, its Serf LAN
/// address (to join it) and its server RPC port (its Raft address, how a leader is named).
#[derive(Clone, Copy, Debug)]
struct AgentPorts {
    http: u16,
    serf_lan: u16,
    server: u16,
}

impl AgentPorts {
    fn free() -> Result<AgentPorts> {
        Ok(AgentPorts {
            http: free_port()?,
            serf_lan: free_port()?,
            server: free_port()?,
        })
    }
}

pub struct Consul {
    process: Process,
    http_port: u16,
    server_port: u16,
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
        let ports = AgentPorts::free()?;
        let consul = Self::spawn(dir, name, ports, acl_token, tls, hcl, None)?;
        consul.wait_ready().await?;
        Ok(consul)
    }

    /// Starts the agent without waiting: a `-dev` agent, or with `join`, one server of a
    /// cluster that expects three, its state in `dir/<name>`, joining the other servers' Serf
    /// LAN addresses.
    fn spawn(
        dir: &Path,
        name: &str,
        ports: AgentPorts,
        acl_token: Option<&str>,
        tls: Option<&TlsFiles>,
        hcl: Option<&str>,
        join: Option<&[String]>,
    ) -> Result<Consul> {
        let http_port = ports.http;
        let node = format!("{name}-{http_port}");
        let mut spec = Spec::new(name, programs::consul()?, dir).args([
            "agent",
            &format!("-bind={}", crate::ports::host()),
            &format!("-client={}", crate::ports::host()),
            "-log-level=warn",
            "-disable-host-node-id",
        ]);
        spec = match join {
            None => spec.arg("-dev"),
            Some(others) => {
                let data = dir.join(name);
                std::fs::create_dir_all(&data)
                    .with_context(|| format!("creating {}", data.display()))?;
                let mut spec = spec
                    .arg("-server")
                    .arg(format!("-bootstrap-expect={}", crate::cluster::MEMBERS))
                    .arg(format!("-data-dir={}", data.display()))
                    // Elections in about a second (raft_multiplier 1, as Consul advises for
                    // production), and a dead server stays a member until it comes back.
                    .arg("-hcl")
                    .arg(
                        "performance { raft_multiplier = 1 } \
                         autopilot { cleanup_dead_servers = false }",
                    );
                for o in others {
                    spec = spec.arg(format!("-retry-join={o}"));
                }
                spec
            }
        };
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
        for (flag, port) in [
            ("-dns-port", free_port()?),
            ("-grpc-port", free_port()?),
            ("-grpc-tls-port", free_port()?),
            ("-serf-lan-port", ports.serf_lan),
            ("-serf-wan-port", free_port()?),
            ("-server-port", ports.server),
        ] {
            spec = spec.arg(format!("{flag}={port}"));
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
        Ok(Consul {
            process: Process::start(spec)?,
            http_port,
            server_port: ports.server,
            node,
            http: match tls {
                Some(t) => crate::tls::https_client(t)?,
                None => crate::http_client()?,
            },
            acl_token: acl_token.map(str::to_string),
            tls: tls.is_some(),
        })
    }

    pub(crate) async fn wait_ready(&self) -> Result<()> {
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

    /// `<host>:<http port>` ([`crate::ports::host`], 127.0.0.1 but on a node).
    pub fn address(&self) -> String {
        format!("{}:{}", crate::ports::host(), self.http_port)
    }

    /// `http://<host>:<http port>`, or `https://…` for a TLS agent.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.address())
    }

    /// `<host>:<server port>`: the server's raft address, as `/v1/status/leader` and
    /// `/v1/status/peers` name it.
    pub fn server_address(&self) -> String {
        format!("{}:{}", crate::ports::host(), self.server_port)
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

    /// Starts the agent again (same ports; a dev agent's catalog empty, a cluster server's as
    /// the cluster has it) and waits until it is ready.
    pub async fn start_again(&self) -> Result<()> {
        self.process.restart_process()?;
        self.wait_ready().await
    }

    pub fn process(&self) -> &Process {
        &self.process
    }
}

impl Cluster<Consul> {
    /// Starts a 3-server Consul cluster (real servers with data directories, joined with
    /// `-bootstrap-expect=3`), servers `<name>-0` to `<name>-2`, and waits until each has a
    /// leader and has registered its own node.
    pub async fn start(dir: &Path, name: &str) -> Result<Cluster<Consul>> {
        crate::ports::retry_if_port_taken(|| async {
            let ports = (0..MEMBERS)
                .map(|_| AgentPorts::free())
                .collect::<Result<Vec<_>>>()?;
            let lan: Vec<String> = ports
                .iter()
                .map(|p| format!("{}:{}", crate::ports::host(), p.serf_lan))
                .collect();
            let members = start_all(|i| {
                let others: Vec<String> = (0..MEMBERS)
                    .filter(|j| *j != i)
                    .map(|j| lan[j].clone())
                    .collect();
                Consul::spawn(
                    dir,
                    &format!("{name}-{i}"),
                    ports[i],
                    None,
                    None,
                    None,
                    Some(&others),
                )
            })
            .await?;
            Ok(Cluster::new(members))
        })
        .await
    }

    /// Every server's HTTP address (`http://<host>:<port>`), in member order.
    pub fn urls(&self) -> Vec<String> {
        self.members().iter().map(Consul::url).collect()
    }
}

impl Member for Consul {
    fn process(&self) -> &Process {
        &self.process
    }

    async fn start_again(&self) -> Result<()> {
        Consul::start_again(self).await
    }

    async fn wait_serving(&self) -> Result<()> {
        self.wait_ready().await
    }

    async fn is_leader(&self) -> Result<bool> {
        let leader: String = self
            .http
            .get(format!("{}/v1/status/leader", self.url()))
            .timeout(Duration::from_secs(1))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(leader == self.server_address())
    }
}
