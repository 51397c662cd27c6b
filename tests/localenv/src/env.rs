//! A set of peers started together: dedicated ones for a test that stops or kills them, or the
//! shared set that the tests of one test binary use side by side, each in its own [`Scope`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use tokio::sync::OnceCell;

use crate::cluster::Cluster;
use crate::consul::Consul;
use crate::etcd::Etcd;
use crate::kube::Kube;
use crate::node::Node;
use crate::tls::TlsFiles;
use crate::zookeeper::ZooKeeper;

/// Which peers to start.
#[derive(Clone, Copy, Debug, Default)]
pub struct Builder {
    kube: bool,
    controller_manager: bool,
    second_cluster: bool,
    consul: bool,
    consul_acl: Option<&'static str>,
    consul_hcl: Option<&'static str>,
    consul_tls: bool,
    etcd: bool,
    etcd_tls: bool,
    zookeeper: bool,
    zookeeper_tls: bool,
    zookeeper_limits: crate::zookeeper::Limits,
    consul_cluster: bool,
    etcd_cluster: bool,
    zookeeper_ensemble: bool,
    node: bool,
}

impl Builder {
    /// A node ([`crate::node`]): kubelet, containerd, kube-proxy and kube-scheduler beside the
    /// API server and its controller manager, so that Deployments run as Pods. Only inside
    /// [`crate::node::run`], whose network namespace every peer then listens in.
    pub fn node(mut self) -> Self {
        self.controller_manager = true;
        self.kube = true;
        self.node = true;
        self
    }
    /// The API server (with its own etcd for storage).
    pub fn kube(mut self) -> Self {
        self.kube = true;
        self
    }
    /// The API server plus kube-controller-manager (EndpointSlices from Pods).
    pub fn controller_manager(mut self) -> Self {
        self.kube = true;
        self.controller_manager = true;
        self
    }
    /// A second API server with its own storage etcd: another cluster, whose `kube-system`
    /// namespace has another UID ([`Env::second_cluster`]). The catalogs are shared.
    pub fn second_cluster(mut self) -> Self {
        self.kube = true;
        self.second_cluster = true;
        self
    }
    pub fn consul(mut self) -> Self {
        self.consul = true;
        self
    }
    /// Consul with ACLs enabled (default policy deny); `token` is the management token.
    pub fn consul_with_acl(mut self, token: &'static str) -> Self {
        self.consul = true;
        self.consul_acl = Some(token);
        self
    }
    /// Consul with `hcl` added to its configuration (`limits { txn_max_req_len = 8192 }`).
    pub fn consul_hcl(mut self, hcl: &'static str) -> Self {
        self.consul = true;
        self.consul_hcl = Some(hcl);
        self
    }
    /// Consul serving its API over HTTPS only and verifying client certificates; the
    /// certificates are in [`Env::tls`].
    pub fn consul_tls(mut self) -> Self {
        self.consul = true;
        self.consul_tls = true;
        self
    }
    /// etcd serving clients over TLS only (`--client-cert-auth`); the certificates are in
    /// [`Env::tls`].
    pub fn etcd_tls(mut self) -> Self {
        self.etcd = true;
        self.etcd_tls = true;
        self
    }
    /// An etcd used as a service catalog (separate from the API server's storage).
    pub fn etcd(mut self) -> Self {
        self.etcd = true;
        self
    }
    pub fn zookeeper(mut self) -> Self {
        self.zookeeper = true;
        self
    }
    /// ZooKeeper whose `jute.maxbuffer` is `bytes` (`-Djute.maxbuffer`): a lowered one makes
    /// the limits of a session's closing transaction show at a few hundred entries.
    pub fn zookeeper_max_buffer(mut self, bytes: usize) -> Self {
        self.zookeeper = true;
        self.zookeeper_limits.max_buffer = Some(bytes);
        self
    }
    /// ZooKeeper that accepts at most `n` connections from one address (`maxClientCnxns`;
    /// unlimited otherwise, 60 in ZooKeeper's own default).
    pub fn zookeeper_max_client_connections(mut self, n: usize) -> Self {
        self.zookeeper = true;
        self.zookeeper_limits.max_client_connections = Some(n);
        self
    }
    /// ZooKeeper with a TLS port too (`secureClientPort`, client certificates required; see
    /// [`ZooKeeper::secure_connect_string`]); the certificates are in [`Env::tls`].
    pub fn zookeeper_tls(mut self) -> Self {
        self.zookeeper = true;
        self.zookeeper_tls = true;
        self
    }
    /// A 3-server Consul cluster ([`Env::consul_cluster`]), beside or instead of the dev
    /// agent.
    pub fn consul_cluster(mut self) -> Self {
        self.consul_cluster = true;
        self
    }
    /// A 3-member etcd cluster ([`Env::etcd_cluster`]), beside or instead of the single etcd.
    pub fn etcd_cluster(mut self) -> Self {
        self.etcd_cluster = true;
        self
    }
    /// A 3-server ZooKeeper ensemble ([`Env::zookeeper_ensemble`]), beside or instead of the
    /// standalone server.
    pub fn zookeeper_ensemble(mut self) -> Self {
        self.zookeeper_ensemble = true;
        self
    }
    /// All three catalogs as 3-member clusters.
    pub fn clusters(self) -> Self {
        self.consul_cluster().etcd_cluster().zookeeper_ensemble()
    }
    /// Every peer.
    pub fn all(self) -> Self {
        self.controller_manager().consul().etcd().zookeeper()
    }

    /// Starts the chosen peers concurrently and waits until each is ready. Any peer that
    /// cannot start makes this fail with its log; nothing is skipped.
    pub async fn start(self) -> Result<Env> {
        let mut dir = new_run_dir()?;
        // LOCALENV_KEEP=1 keeps the peers' data and logs for a look after the test.
        if std::env::var_os("LOCALENV_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("localenv: keeping {}", dir.path().display());
        }
        let path = dir.path().to_path_buf();
        let tls = if self.consul_tls || self.etcd_tls || self.zookeeper_tls {
            Some(TlsFiles::generate(&path.join("tls")).context("making the TLS certificates")?)
        } else {
            None
        };
        let tls_for = |wanted: bool| tls.as_ref().filter(|_| wanted);
        let (kube, second, consul, etcd, zookeeper) = tokio::try_join!(
            maybe(self.kube, async {
                if self.node {
                    Kube::start_for_node(&path).await
                } else {
                    Kube::start(&path, self.controller_manager).await
                }
            }),
            maybe(
                self.second_cluster,
                Kube::start_in(&path, "kube-second", false, false)
            ),
            maybe(
                self.consul,
                Consul::start_configured(
                    &path,
                    "consul",
                    self.consul_acl,
                    tls_for(self.consul_tls),
                    self.consul_hcl
                )
            ),
            maybe(
                self.etcd,
                Etcd::start_with(&path, "etcd", tls_for(self.etcd_tls))
            ),
            maybe(
                self.zookeeper,
                ZooKeeper::start_configured(
                    &path,
                    "zookeeper",
                    tls_for(self.zookeeper_tls),
                    self.zookeeper_limits
                )
            ),
        )?;
        // The clusters after the single servers: three JVMs starting beside everything else
        // would only slow every start on two cores.
        let (consul_cluster, etcd_cluster, zookeeper_ensemble) = tokio::try_join!(
            maybe(
                self.consul_cluster,
                Cluster::<Consul>::start(&path, "consul-c")
            ),
            maybe(self.etcd_cluster, Cluster::<Etcd>::start(&path, "etcd-c")),
            maybe(
                self.zookeeper_ensemble,
                Cluster::<ZooKeeper>::start(&path, "zookeeper-c")
            ),
        )?;
        let node = match (&kube, self.node) {
            (Some(k), true) => Some(Node::start(&path, k).await?),
            _ => None,
        };
        Ok(Env {
            node,
            kube,
            second,
            consul,
            etcd,
            zookeeper,
            consul_cluster,
            etcd_cluster,
            zookeeper_ensemble,
            tls,
            dir,
        })
    }
}

async fn maybe<T>(
    wanted: bool,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<Option<T>> {
    if wanted {
        fut.await.map(Some)
    } else {
        Ok(None)
    }
}

/// Running peers. Dropping it stops them and removes their files.
pub struct Env {
    // First: the node's Pods go while the API server still answers.
    node: Option<Node>,
    kube: Option<Kube>,
    second: Option<Kube>,
    consul: Option<Consul>,
    etcd: Option<Etcd>,
    zookeeper: Option<ZooKeeper>,
    consul_cluster: Option<Cluster<Consul>>,
    etcd_cluster: Option<Cluster<Etcd>>,
    zookeeper_ensemble: Option<Cluster<ZooKeeper>>,
    tls: Option<TlsFiles>,
    // Last: the directory is removed after the processes are gone.
    dir: tempfile::TempDir,
}

impl Env {
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub fn node(&self) -> Result<&Node> {
        self.node
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was started without a node (Builder::node)"))
    }

    pub fn kube(&self) -> Result<&Kube> {
        self.kube
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was built without the API server"))
    }
    /// The second cluster's API server ([`Builder::second_cluster`]).
    pub fn second_cluster(&self) -> Result<&Kube> {
        self.second
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was built without a second cluster"))
    }
    pub fn consul(&self) -> Result<&Consul> {
        self.consul
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was built without Consul"))
    }
    pub fn etcd(&self) -> Result<&Etcd> {
        self.etcd
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was built without etcd"))
    }
    /// The certificates of the TLS peers ([`Builder::consul_tls`], [`Builder::etcd_tls`],
    /// [`Builder::zookeeper_tls`]).
    pub fn tls(&self) -> Result<&TlsFiles> {
        self.tls
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was built without TLS peers"))
    }
    pub fn zookeeper(&self) -> Result<&ZooKeeper> {
        self.zookeeper
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was built without ZooKeeper"))
    }

    pub fn consul_cluster(&self) -> Result<&Cluster<Consul>> {
        self.consul_cluster
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was built without a Consul cluster"))
    }
    pub fn etcd_cluster(&self) -> Result<&Cluster<Etcd>> {
        self.etcd_cluster
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was built without an etcd cluster"))
    }
    pub fn zookeeper_ensemble(&self) -> Result<&Cluster<ZooKeeper>> {
        self.zookeeper_ensemble
            .as_ref()
            .ok_or_else(|| anyhow!("this environment was built without a ZooKeeper ensemble"))
    }

    /// The directory that holds the peers' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh scope in this environment: a new namespace (when the API server runs) and a
    /// unique prefix for catalog data.
    pub async fn scope(&self, test: &str) -> Result<Scope> {
        let id = unique_suffix();
        let name = format!("{}-{id}", dns_label(test));
        if let Some(kube) = &self.kube {
            let client = kube.client().await?;
            let ns = Namespace {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            Api::<Namespace>::all(client)
                .create(&PostParams::default(), &ns)
                .await
                .with_context(|| format!("creating namespace {name}"))?;
        }
        Ok(Scope {
            namespace: name.clone(),
            prefix: name,
        })
    }

    /// Deletes the scope's namespace (its objects go with it).
    pub async fn drop_scope(&self, scope: &Scope) -> Result<()> {
        if let Some(kube) = &self.kube {
            let client = kube.client().await?;
            Api::<Namespace>::all(client)
                .delete(&scope.namespace, &DeleteParams::default())
                .await
                .with_context(|| format!("deleting namespace {}", scope.namespace))?;
        }
        Ok(())
    }
}

/// Where one test keeps its data in a shared environment.
#[derive(Clone, Debug)]
pub struct Scope {
    /// A Kubernetes namespace made for this test.
    pub namespace: String,
    /// A unique, DNS-safe prefix for names and paths in the catalogs (`/<prefix>/…` in etcd
    /// and ZooKeeper, `<prefix>-…` service names in Consul).
    pub prefix: String,
}

impl Scope {
    /// `<prefix>-<name>`: a catalog service name that no other test uses.
    pub fn name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }
}

/// The environment shared by every test of one test binary, with all peers running; started
/// by the first test that asks. Tests that stop, kill or restart a peer must build their own
/// with [`Env::builder`] instead.
pub async fn shared() -> Result<&'static Env> {
    static SHARED: OnceCell<Env> = OnceCell::const_new();
    SHARED
        .get_or_try_init(|| async { Env::builder().all().start().await })
        .await
        .context("starting the shared test environment")
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{n:x}", (t ^ std::process::id()) & 0xffff)
}

/// Lower case, `[a-z0-9-]`, at most 40 characters, starting with a letter.
fn dns_label(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert(0, 't');
    }
    out.trim_end_matches('-').to_string()
}

/// A temporary directory for one environment, under a per-process root; roots of processes
/// that are gone (killed test binaries) are removed on the way.
fn new_run_dir() -> Result<tempfile::TempDir> {
    let base = std::env::temp_dir().join("catalog-bridge-localenv");
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    sweep_stale(&base);
    let root = base.join(format!("pid-{}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    tempfile::Builder::new()
        .prefix("env-")
        .tempdir_in(&root)
        .with_context(|| format!("creating a directory in {}", root.display()))
}

fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pid-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            // A node of a process that crashed leaves mounts, cgroups and kernel settings.
            crate::node::sweep_stale(&e.path(), pid);
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
