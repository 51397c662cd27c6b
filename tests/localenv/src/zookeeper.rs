//! A real ZooKeeper server (3.8, Debian's package) on loopback, standalone or as one server of
//! a 3-server ensemble ([`Cluster::<ZooKeeper>::start`]); with TLS, it also
//! serves a `secureClientPort` (Netty) that requires a client certificate of the environment's
//! CA, beside the plain port (kept for the four-letter commands and the test readers).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::{Cluster, MEMBERS, Member, start_all};
use crate::ports::free_port;
use crate::process::{Process, Spec};
use crate::programs;
use crate::ready::wait_ready;
use crate::tls::TlsFiles;

/// ZooKeeper's tick; sessions may time out between 2 and 120 ticks.
pub const TICK_MS: u64 = 500;

pub struct ZooKeeper {
    process: Process,
    port: u16,
    secure_port: Option<u16>,
}

/// Server limits a test lowers to reach them quickly.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// `jute.maxbuffer` (`-Djute.maxbuffer`): the largest request, transaction and node the
    /// server accepts; 1 MiB by default.
    pub max_buffer: Option<usize>,
    /// `maxClientCnxns`: connections one client address may hold (ZooKeeper's default is 60;
    /// unlimited when not given).
    pub max_client_connections: Option<usize>,
}

impl ZooKeeper {
    /// Starts ZooKeeper with its data in `dir/<name>` and waits until `ruok` answers `imok`.
    pub async fn start(dir: &Path, name: &str) -> Result<ZooKeeper> {
        Self::start_with(dir, name, None).await
    }

    /// [`ZooKeeper::start`], with a TLS port as well when `tls` is given: the server
    /// certificate of the set, and client certificates of its CA required.
    pub async fn start_with(dir: &Path, name: &str, tls: Option<&TlsFiles>) -> Result<ZooKeeper> {
        Self::start_configured(dir, name, tls, Limits::default()).await
    }

    /// [`ZooKeeper::start_with`], with the server's `limits` where given.
    pub async fn start_configured(
        dir: &Path,
        name: &str,
        tls: Option<&TlsFiles>,
        limits: Limits,
    ) -> Result<ZooKeeper> {
        crate::ports::retry_if_port_taken(|| Self::start_once(dir, name, tls, limits)).await
    }

    async fn start_once(
        dir: &Path,
        name: &str,
        tls: Option<&TlsFiles>,
        limits: Limits,
    ) -> Result<ZooKeeper> {
        let zk = Self::spawn(dir, name, free_port()?, tls, limits, None)?;
        zk.wait_ready()
            .await
            .map_err(|e| crate::ports::explain_exit(e, &zk.ports()))?;
        Ok(zk)
    }

    /// Starts the server without waiting; with `quorum`, as member `myid` of the ensemble
    /// whose `server.N=…` lines those are.
    fn spawn(
        dir: &Path,
        name: &str,
        port: u16,
        tls: Option<&TlsFiles>,
        limits: Limits,
        quorum: Option<(usize, &str)>,
    ) -> Result<ZooKeeper> {
        let data = dir.join(name);
        std::fs::create_dir_all(data.join("data"))
            .with_context(|| format!("creating {}", data.display()))?;
        let (secure_port, secure) = match tls {
            None => (None, String::new()),
            Some(t) => {
                // A PEM key store holds the key and the certificate in one file.
                let key_store = data.join("server.pem");
                let mut pem = std::fs::read(&t.server_key_file)?;
                pem.extend(std::fs::read(&t.server_cert_file)?);
                std::fs::write(&key_store, pem)
                    .with_context(|| format!("writing {}", key_store.display()))?;
                let secure_port = free_port()?;
                let secure = format!(
                    "secureClientPort={secure_port}\n\
                     secureClientPortAddress={host}\n\
                     serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
                     ssl.keyStore.location={}\n\
                     ssl.keyStore.type=PEM\n\
                     ssl.trustStore.location={}\n\
                     ssl.trustStore.type=PEM\n\
                     ssl.clientAuth=need\n",
                    key_store.display(),
                    t.ca_file.display(),
                    host = crate::ports::host(),
                );
                (Some(secure_port), secure)
            }
        };
        let ensemble = match quorum {
            None => String::new(),
            Some((myid, servers)) => {
                let file = data.join("data").join("myid");
                std::fs::write(&file, format!("{myid}\n"))
                    .with_context(|| format!("writing {}", file.display()))?;
                // A follower gives up on a silent leader after syncLimit ticks (2.5 s).
                format!("initLimit=20\nsyncLimit=5\nstandaloneEnabled=false\n{servers}")
            }
        };
        let cfg = data.join("zoo.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tickTime={TICK_MS}\n\
                 minSessionTimeout={}\n\
                 maxSessionTimeout={}\n\
                 dataDir={}\n\
                 clientPort={port}\n\
                 clientPortAddress={host}\n\
                 maxClientCnxns={}\n\
                 admin.enableServer=false\n\
                 4lw.commands.whitelist=*\n\
                 forceSync=no\n\
                 {secure}{ensemble}",
                2 * TICK_MS,
                120 * TICK_MS,
                data.join("data").display(),
                limits.max_client_connections.unwrap_or(0),
                host = crate::ports::host(),
            ),
        )
        .with_context(|| format!("writing {}", cfg.display()))?;
        let mut spec = Spec::new(name, programs::java()?, dir)
            .arg("-Xmx256m")
            .arg("-XX:+UseSerialGC")
            .arg("-Dzookeeper.jmx.log4j.disable=true");
        if let Some(n) = limits.max_buffer {
            spec = spec.arg(format!("-Djute.maxbuffer={n}"));
        }
        let spec = spec
            .arg("-cp")
            .arg(programs::zookeeper_classpath()?)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg);
        Ok(ZooKeeper {
            process: Process::start(spec)?,
            port,
            secure_port,
        })
    }

    fn ports(&self) -> Vec<u16> {
        std::iter::once(self.port).chain(self.secure_port).collect()
    }

    async fn wait_ready(&self) -> Result<()> {
        // `ruok` answers before the server accepts sessions; `srvr` shows a mode only once it
        // serves requests.
        wait_ready(&self.process, Duration::from_secs(90), || async {
            Ok(self.four_letter("ruok").await? == "imok"
                && self.four_letter("srvr").await?.contains("Mode:"))
        })
        .await
    }

    /// Sends a four-letter command (`ruok`, `srvr`, `mntr`, `cons`…) and returns the answer.
    pub async fn four_letter(&self, cmd: &str) -> Result<String> {
        if cmd.len() != 4 {
            bail!("four-letter commands have four letters, not {cmd:?}");
        }
        let mut s = tokio::net::TcpStream::connect((crate::ports::host(), self.port))
            .await
            .with_context(|| format!("connecting to zookeeper at {}", self.connect_string()))?;
        s.write_all(cmd.as_bytes()).await?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .context("zookeeper four-letter command timed out")??;
        Ok(out)
    }

    /// `<host>:<port>` ([`crate::ports::host`]), a ZooKeeper connect string.
    pub fn connect_string(&self) -> String {
        format!("{}:{}", crate::ports::host(), self.port)
    }

    /// `<host>:<secureClientPort>`: the TLS port of a ZooKeeper started with TLS.
    pub fn secure_connect_string(&self) -> Result<String> {
        let port = self
            .secure_port
            .context("this ZooKeeper was started without TLS (Builder::zookeeper_tls)")?;
        Ok(format!("{}:{port}", crate::ports::host()))
    }

    /// What Curator's `ServiceDiscovery.queryForInstances(name)` returns under `base_path`
    /// (`connect` may carry a chroot): `"<id> <address>:<port>"` per instance, sorted. Fails
    /// when Curator cannot read an instance.
    pub fn curator_instances(
        &self,
        connect: &str,
        base_path: &str,
        name: &str,
    ) -> Result<Vec<String>> {
        let out = crate::run_tool(&mut curator(&["query", connect, base_path, name])?)?;
        serde_json::from_str(out.trim()).with_context(|| format!("CuratorClient printed {out:?}"))
    }

    /// Registers `address:port` as an instance of `name` with Curator's
    /// `ServiceDiscovery.registerService` (an ephemeral node of Curator's own session), as a
    /// Curator application does. It stays registered until the returned value is dropped.
    pub fn curator_register(
        &self,
        connect: &str,
        base_path: &str,
        name: &str,
        address: &str,
        port: u16,
    ) -> Result<CuratorRegistration> {
        let mut cmd = curator(&[
            "register",
            connect,
            base_path,
            name,
            address,
            &port.to_string(),
        ])?;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("starting the Curator registrant")?;
        let stdout = child.stdout.take().context("the registrant's output")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let Some(id) = line.trim().strip_prefix("READY ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("Curator did not register {name}: {line:?}");
        };
        Ok(CuratorRegistration {
            id: id.to_string(),
            child,
        })
    }

    pub fn stop(&self) -> Result<()> {
        self.process.stop()
    }

    pub fn kill(&self) -> Result<()> {
        self.process.kill()
    }

    /// Starts ZooKeeper again (same port, same data: sessions that have not timed out survive).
    pub async fn start_again(&self) -> Result<()> {
        self.process.restart_process()?;
        self.wait_ready().await
    }

    pub fn process(&self) -> &Process {
        &self.process
    }
}

/// `java -cp <Curator client> io.catalogbridge.peers.CuratorClient <args…>`.
fn curator(args: &[&str]) -> Result<std::process::Command> {
    let mut cmd = std::process::Command::new(programs::java()?);
    cmd.arg("-cp")
        .arg(programs::curator_classpath()?)
        .arg("io.catalogbridge.peers.CuratorClient")
        .args(args);
    Ok(cmd)
}

/// An instance registered by Curator ([`ZooKeeper::curator_register`]); dropping it
/// unregisters it and ends Curator's session.
pub struct CuratorRegistration {
    /// The instance id Curator chose (a UUID), the name of its node.
    pub id: String,
    child: std::process::Child,
}

impl Drop for CuratorRegistration {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Cluster<ZooKeeper> {
    /// Starts a 3-server ensemble, servers `<name>-0` to `<name>-2` (myid 1 to 3), and waits
    /// until every server serves as leader or follower.
    pub async fn start(dir: &Path, name: &str) -> Result<Cluster<ZooKeeper>> {
        crate::ports::retry_if_port_taken(|| async {
            let mut ports = Vec::new();
            let mut servers = String::new();
            for i in 0..MEMBERS {
                let (client, quorum, election) = (free_port()?, free_port()?, free_port()?);
                ports.push(client);
                servers.push_str(&format!(
                    "server.{}={}:{quorum}:{election}\n",
                    i + 1,
                    crate::ports::host()
                ));
            }
            let members = start_all(|i| {
                ZooKeeper::spawn(
                    dir,
                    &format!("{name}-{i}"),
                    ports[i],
                    None,
                    Limits::default(),
                    Some((i + 1, &servers)),
                )
            })
            .await?;
            Ok(Cluster::new(members))
        })
        .await
    }

    /// `<host>:<a>,<host>:<b>,<host>:<c>`: the ensemble's connect string.
    pub fn connect_string(&self) -> String {
        self.members()
            .iter()
            .map(ZooKeeper::connect_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Member for ZooKeeper {
    fn process(&self) -> &Process {
        &self.process
    }

    async fn start_again(&self) -> Result<()> {
        ZooKeeper::start_again(self).await
    }

    async fn wait_serving(&self) -> Result<()> {
        self.wait_ready().await
    }

    async fn is_leader(&self) -> Result<bool> {
        let srvr = tokio::time::timeout(Duration::from_secs(1), self.four_letter("srvr"))
            .await
            .context("srvr: no answer within 1 s")??;
        Ok(srvr.contains("Mode: leader"))
    }
}
