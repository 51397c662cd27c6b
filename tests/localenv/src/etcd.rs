//! A real etcd server (v3.6) on loopback, alone or as a member of a 3-member cluster.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cluster::{Cluster, MEMBERS, Member, start_all};
use crate::ports::free_port;
use crate::process::{Process, Spec};
use crate::programs;
use crate::ready::wait_ready;
use crate::tls::TlsFiles;

/// The loopback ports of one etcd member.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemberPorts {
    pub client: u16,
    pub peer: u16,
}

impl MemberPorts {
    pub fn free() -> Result<MemberPorts> {
        Ok(MemberPorts {
            client: free_port()?,
            peer: free_port()?,
        })
    }

    pub fn peer_url(&self) -> String {
        format!("http://{}:{}", crate::ports::host(), self.peer)
    }
}

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
        let ports = MemberPorts::free()?;
        let cluster = format!("{name}={}", ports.peer_url());
        let etcd = Self::spawn(dir, name, ports, &cluster, tls)?;
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    /// Starts one member of the cluster `initial_cluster` (`name=http://<host>:<peer>,…`)
    /// without waiting: a member of a cluster is healthy only once a quorum of its peers runs.
    pub(crate) fn spawn(
        dir: &Path,
        name: &str,
        ports: MemberPorts,
        initial_cluster: &str,
        tls: Option<&TlsFiles>,
    ) -> Result<Etcd> {
        let data = dir.join(name);
        // A first start: nothing of a try that lost its port stays (its member's URLs).
        let _ = std::fs::remove_dir_all(data.join("data"));
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let client_port = ports.client;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}:{client_port}", crate::ports::host());
        let peer = ports.peer_url();
        let spec = Spec::new(name, programs::etcd()?, dir)
            .arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", data.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg(format!("--initial-cluster-token={}", dir.display()))
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
        Ok(Etcd {
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
        })
    }

    pub(crate) async fn wait_ready(&self) -> Result<()> {
        let url = format!("{}/health", self.url());
        wait_ready(&self.process, Duration::from_secs(60), || async {
            let body: serde_json::Value = self.http.get(&url).send().await?.json().await?;
            Ok(body["health"] == "true")
        })
        .await
    }

    /// `<host>:<port>` ([`crate::ports::host`]), the form etcd clients take as an endpoint;
    /// `https://<host>:<port>` for a TLS etcd.
    pub fn endpoint(&self) -> String {
        match self.tls {
            Some(_) => self.url(),
            None => format!("{}:{}", crate::ports::host(), self.client_port),
        }
    }

    /// `http://<host>:<port>`, or `https://…` for a TLS etcd.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", crate::ports::host(), self.client_port)
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

    /// What this member says of itself and its cluster (`/v3/maintenance/status`): its own
    /// member id and the leader's, both 0 when it does not answer in time.
    pub async fn member_and_leader(&self) -> Result<(u64, u64)> {
        let body: serde_json::Value = self
            .http
            .post(format!("{}/v3/maintenance/status", self.url()))
            .timeout(Duration::from_secs(1))
            .body("{}")
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        // The gateway renders 64-bit ids as decimal strings.
        let id = |v: &serde_json::Value| {
            v.as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .or_else(|| v.as_u64())
                .unwrap_or(0)
        };
        Ok((id(&body["header"]["member_id"]), id(&body["leader"])))
    }
}

impl Cluster<Etcd> {
    /// Starts a 3-member etcd cluster, members `<name>-0` to `<name>-2`, and waits until every
    /// member is healthy (has a leader).
    pub async fn start(dir: &Path, name: &str) -> Result<Cluster<Etcd>> {
        crate::ports::retry_if_port_taken(|| async {
            let ports = (0..MEMBERS)
                .map(|_| MemberPorts::free())
                .collect::<Result<Vec<_>>>()?;
            let initial = ports
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{name}-{i}={}", p.peer_url()))
                .collect::<Vec<_>>()
                .join(",");
            let members =
                start_all(|i| Etcd::spawn(dir, &format!("{name}-{i}"), ports[i], &initial, None))
                    .await?;
            Ok(Cluster::new(members))
        })
        .await
    }

    /// Every member's endpoint (`<host>:<port>`), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members().iter().map(Etcd::endpoint).collect()
    }
}

impl Member for Etcd {
    fn process(&self) -> &Process {
        &self.process
    }

    async fn start_again(&self) -> Result<()> {
        Etcd::start_again(self).await
    }

    async fn wait_serving(&self) -> Result<()> {
        self.wait_ready().await
    }

    async fn is_leader(&self) -> Result<bool> {
        let (me, leader) = self.member_and_leader().await?;
        Ok(me != 0 && me == leader)
    }
}
