//! A Kubernetes node beside the API server, so that the chart runs as Pods: containerd with
//! runc, kubelet, kube-proxy (iptables) and kube-scheduler, with the CNI bridge for Pods.
//!
//! Everything runs inside a network namespace the harness creates ([`run`]): the API server,
//! the catalogs, the node and the test's own clients. The namespace holds loopback, which also
//! has the node's address ([`NODE_IP`], where every peer listens, see
//! [`crate::ports::host`]), and the Pods' bridge; it has no link to anything else, so nothing a
//! Pod sends can leave it. kube-proxy's and kubelet's iptables chains live and die with it.
//!
//! What the node changes outside its namespace is undone when it stops, also after a failed
//! test, and by the next run after a crash ([`sweep_stale`]): the kernel settings kubelet sets
//! (`kernel.panic`, `kernel.panic_on_oops`, `vm.overcommit_memory`), the container processes
//! and shims (by PID, found in the node's cgroups and by its containerd socket), mounts under
//! its directory (the Pods' network namespaces among them), its cgroups (`/<cgroup root>` in
//! every hierarchy), the CNI cache and log links that name it, and its network namespace.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::kube::Kube;
use crate::ports::free_port;
use crate::process::{Process, Spec};
use crate::programs;

/// The node's address: every peer of a process with a node listens here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The node's name.
pub const NODE_NAME: &str = "node-1";
/// The Pods' addresses, on the bridge `cbr0` (`10.88.0.1`, the Pods' gateway to the node).
pub const POD_CIDR: &str = "10.88.0.0/16";
/// The sandbox image, Kubernetes' pause program packaged by [`crate::image::pause`].
pub const PAUSE_IMAGE: &str = "localenv.local/pause:1";
/// The kernel settings kubelet sets on start, restored when the node goes.
const KUBELET_SYSCTLS: [&str; 3] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
];
/// Where the saved kernel settings are kept in the node's directory (read back after a crash).
const SAVED_SYSCTLS: &str = "sysctls.saved";
/// The prefix of the namespaces, cgroups and CNI networks of nodes: `<prefix><pid>`.
const PREFIX: &str = "cb-node-";

/// Runs `test` on a Tokio runtime of its own whose threads, and every process they start, are
/// in a new network namespace with the node's address; peers started there listen on
/// [`NODE_IP`]. One at a time per process; the namespace is deleted afterwards.
pub fn run<F, Fut>(test: F) -> Result<()>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<()>>,
{
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::create()?;
    std::thread::scope(|s| {
        let joined = std::thread::Builder::new()
            .name("localenv-node".into())
            .spawn_scoped(s, || -> Result<()> {
                ns.enter()?;
                crate::ports::set_host(NODE_IP)?;
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .context("building a Tokio runtime")?;
                rt.block_on(test())
            })
            .context("starting the node's thread")?
            .join();
        match joined {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A network namespace of this process (`/run/netns/cb-node-<pid>`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with loopback up, holding [`NODE_IP`] too.
    pub fn create() -> Result<Netns> {
        sweep_stale_namespaces();
        let name = netns_name();
        // Left by an earlier node of this process that failed before its drop.
        let _ = ip(&["netns", "delete", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // On loopback: the namespace's own address, local to whatever interface a packet for
        // it arrives on (the Pods' bridge).
        ns.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        Ok(ns)
    }

    /// Moves the calling thread into the namespace; threads it starts afterwards are there too.
    pub fn enter(&self) -> Result<()> {
        let path = Path::new("/run/netns").join(&self.name);
        let f =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns on a namespace file descriptor this function holds open; it changes
        // only the calling thread's network namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering network namespace {}", self.name));
        }
        Ok(())
    }

    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("localenv: deleting network namespace {}: {e:#}", self.name);
        }
    }
}

/// The name of this process's namespace (`/run/netns/cb-node-<pid>`), for `ip netns exec`.
pub fn netns_name() -> String {
    format!("{PREFIX}{}", std::process::id())
}

fn ip(args: &[&str]) -> Result<String> {
    crate::run_tool(Command::new("ip").args(args))
}

/// Whether `name` is `cb-node-<pid>` of a process that is gone.
fn stale(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

fn sweep_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if stale(&name) {
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}

/// A running node, registered and Ready. Dropping it stops everything it started and undoes
/// what it changed (see the module's documentation).
pub struct Node {
    dir: PathBuf,
    kubeconfig: PathBuf,
    socket: PathBuf,
    /// `/cb-node-<pid>`: kubelet's `cgroupRoot`, under which every Pod's cgroups are.
    cgroup_root: String,
    // Stopped in this order by `stop`.
    scheduler: Option<Process>,
    kubelet: Option<Process>,
    proxy: Option<Process>,
    containerd: Option<Process>,
}

impl Node {
    /// Starts the node in `dir/node` against `kube` (started with [`Kube::start_for_node`]),
    /// loads the sandbox image, and waits until the node is Ready. Must run inside [`run`].
    pub async fn start(dir: &Path, kube: &Kube) -> Result<Node> {
        if crate::ports::host() != NODE_IP {
            bail!("a node runs only inside localenv::node::run (its own network namespace)");
        }
        let dir = dir.join("node");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        save_sysctls(&dir)?;
        let mut node = Node {
            socket: dir.join("containerd.sock"),
            kubeconfig: kube.kubeconfig_path().to_path_buf(),
            cgroup_root: format!("/{PREFIX}{}", std::process::id()),
            dir,
            scheduler: None,
            kubelet: None,
            proxy: None,
            containerd: None,
        };
        node.containerd = Some(node.start_containerd().await?);
        let pause = node.dir.join("pause.tar");
        crate::image::pause(&programs::pause()?, PAUSE_IMAGE, &pause)?;
        node.load_image(&pause)?;
        node.write_cni()?;
        make_cgroups(&node.cgroup_root)?;
        node.scheduler = Some(node.start_scheduler()?);
        node.proxy = Some(node.start_proxy()?);
        node.kubelet = Some(node.start_kubelet()?);
        node.wait_ready(kube).await?;
        Ok(node)
    }

    /// Loads a docker-archive (or OCI) tarball into the node's image store, where Pods with
    /// `imagePullPolicy: Never` or `IfNotPresent` find it.
    pub fn load_image(&self, tarball: &Path) -> Result<()> {
        self.ctr(&["images", "import", &tarball.display().to_string()])
            .with_context(|| format!("loading {} into the node", tarball.display()))?;
        Ok(())
    }

    /// Runs containerd's `ctr` against the node's containerd, in the Kubernetes namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        crate::run_tool(
            Command::new(programs::ctr()?)
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", "k8s.io"])
                .args(args),
        )
    }

    /// The logs of the node's processes, for errors.
    pub fn logs(&self) -> String {
        [
            &self.containerd,
            &self.kubelet,
            &self.scheduler,
            &self.proxy,
        ]
        .into_iter()
        .flatten()
        .map(|p| format!("--- {} ---\n{}\n", p.name(), p.log_tail(30)))
        .collect()
    }

    async fn start_containerd(&self) -> Result<Process> {
        let d = &self.dir;
        let config = d.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "warn"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Without it every sandbox fails ("can't get final child's PID from pipe"): the node may
  # not lower the pause process's oom_score_adj.
  restrict_oom_score_adj = true
  disable_apparmor = true
  # The Pods' network namespaces are mounted in the node's directory, not /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
                root = d.join("containerd/root").display(),
                state = d.join("containerd/state").display(),
                socket = self.socket.display(),
                opt = d.join("containerd/opt").display(),
                runc = programs::runc()?.display(),
                runc_root = d.join("runc").display(),
                cni_bin = programs::cni_bin()?.display(),
                cni_conf = d.join("cni").display(),
            ),
        )
        .context("writing containerd's configuration")?;
        let p = Process::start(
            Spec::new("containerd", programs::containerd()?, d)
                .arg("--config")
                .arg(&config),
        )?;
        crate::ready::wait_ready(&p, Duration::from_secs(60), || async {
            Ok(self.socket.exists() && self.ctr(&["version"]).is_ok())
        })
        .await?;
        Ok(p)
    }

    /// The Pods' network: a bridge with the Pods' gateway, host-local addresses kept in the
    /// node's directory. Pods route everything to the node (`isDefaultGateway`), which has
    /// nowhere to send it but its own namespace.
    fn write_cni(&self) -> Result<()> {
        let conf = self.dir.join("cni");
        std::fs::create_dir_all(&conf)?;
        let list = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.network(),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cbr0",
                    "isGateway": true,
                    "isDefaultGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "dataDir": self.dir.join("cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        std::fs::write(
            conf.join("10-node.conflist"),
            serde_json::to_vec_pretty(&list)?,
        )
        .context("writing the CNI configuration")
    }

    /// The CNI network's name (the cache under `/var/lib/cni` is named after it).
    fn network(&self) -> String {
        self.cgroup_root.trim_start_matches('/').to_string()
    }

    fn start_scheduler(&self) -> Result<Process> {
        let kc = self.kubeconfig.display().to_string();
        Process::start(
            Spec::new("kube-scheduler", programs::kube_scheduler()?, &self.dir)
                .arg(format!("--kubeconfig={kc}"))
                .arg(format!("--authentication-kubeconfig={kc}"))
                .arg(format!("--authorization-kubeconfig={kc}"))
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--secure-port={}", free_port()?))
                .arg("--leader-elect=false")
                .arg("--v=1"),
        )
    }

    fn start_proxy(&self) -> Result<Process> {
        let config = self.dir.join("kube-proxy.yaml");
        // Zero conntrack settings: kube-proxy leaves the machine-wide table alone.
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
                 kind: KubeProxyConfiguration\n\
                 clientConnection:\n  kubeconfig: {kc}\n\
                 mode: iptables\n\
                 clusterCIDR: {POD_CIDR}\n\
                 hostnameOverride: {NODE_NAME}\n\
                 healthzBindAddress: 127.0.0.1:{healthz}\n\
                 metricsBindAddress: 127.0.0.1:{metrics}\n\
                 conntrack:\n  maxPerCore: 0\n  min: 0\n  tcpEstablishedTimeout: 0s\n  \
                 tcpCloseWaitTimeout: 0s\n",
                kc = self.kubeconfig.display(),
                healthz = free_port()?,
                metrics = free_port()?,
            ),
        )
        .context("writing kube-proxy's configuration")?;
        Process::start(
            Spec::new("kube-proxy", programs::kube_proxy()?, &self.dir)
                .arg(format!("--config={}", config.display()))
                .arg("--v=1"),
        )
    }

    fn start_kubelet(&self) -> Result<Process> {
        let d = &self.dir;
        let config = d.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\n\
                 kind: KubeletConfiguration\n\
                 address: {NODE_IP}\n\
                 port: {port}\n\
                 readOnlyPort: 0\n\
                 healthzBindAddress: 127.0.0.1\n\
                 healthzPort: {healthz}\n\
                 containerRuntimeEndpoint: unix://{socket}\n\
                 cgroupDriver: cgroupfs\n\
                 cgroupRoot: {cgroup_root}\n\
                 failCgroupV1: false\n\
                 failSwapOn: false\n\
                 authentication:\n  anonymous:\n    enabled: true\n  webhook:\n    enabled: false\n\
                 authorization:\n  mode: AlwaysAllow\n\
                 evictionHard: {{}}\n\
                 imageGCHighThresholdPercent: 100\n\
                 imageGCLowThresholdPercent: 99\n\
                 clusterDomain: cluster.local\n\
                 clusterDNS: []\n\
                 podLogsDir: {logs}\n\
                 serializeImagePulls: false\n\
                 registerNode: true\n",
                port = free_port()?,
                healthz = free_port()?,
                socket = self.socket.display(),
                cgroup_root = self.cgroup_root,
                logs = d.join("pod-logs").display(),
            ),
        )
        .context("writing kubelet's configuration")?;
        Process::start(
            Spec::new("kubelet", programs::kubelet()?, d)
                .arg(format!("--config={}", config.display()))
                .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .arg(format!("--root-dir={}", d.join("kubelet").display()))
                .arg(format!("--cert-dir={}", d.join("kubelet-pki").display()))
                .arg(format!("--hostname-override={NODE_NAME}"))
                .arg(format!("--node-ip={NODE_IP}"))
                .arg("--v=1"),
        )
    }

    async fn wait_ready(&self, kube: &Kube) -> Result<()> {
        let kubelet = self.kubelet.as_ref().context("kubelet is not running")?;
        crate::ready::wait_ready(kubelet, Duration::from_secs(120), || async {
            let ready = kube.kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            Ok(ready.is_ok_and(|r| r.trim() == "True"))
        })
        .await
        .with_context(|| self.logs())
    }

    /// Stops the node and undoes what it changed; every step runs even when one fails, and
    /// each failure is reported on standard error.
    fn stop(&mut self) {
        // No new Pods, then the running ones go the way kubelet removes them (containers
        // stopped, sandboxes' networks torn down by CNI).
        if let Some(s) = self.scheduler.take() {
            let _ = s.stop();
        }
        if self.kubelet.is_some() && self.containerd.is_some() {
            self.delete_pods();
        }
        for p in [
            self.kubelet.take(),
            self.proxy.take(),
            self.containerd.take(),
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = p.stop_with_grace(Duration::from_secs(5)) {
                eprintln!("localenv: stopping {}: {e:#}", p.name());
            }
        }
        clean_up(&self.dir, &self.socket, &self.cgroup_root);
    }

    fn delete_pods(&self) {
        let kubectl = |args: &[&str]| {
            crate::run_tool(
                Command::new(programs::kubectl()?)
                    .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                    .arg("--request-timeout=5s")
                    .args(args),
            )
        };
        if let Err(e) = kubectl(&[
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=0",
            "--force",
            "--wait=false",
        ]) {
            eprintln!("localenv: deleting the node's Pods: {e:#}");
            return;
        }
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            match self.ctr(&["tasks", "list", "--quiet"]) {
                Ok(out) if out.trim().is_empty() => return,
                Ok(_) => std::thread::sleep(Duration::from_millis(250)),
                Err(e) => {
                    eprintln!("localenv: listing the node's containers: {e:#}");
                    return;
                }
            }
        }
        eprintln!("localenv: the node's containers still ran 30 s after their Pods were deleted");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key)
}

/// Saves the kernel settings kubelet changes, in `dir` too (read back after a crash).
fn save_sysctls(dir: &Path) -> Result<()> {
    let mut saved = String::new();
    for key in KUBELET_SYSCTLS {
        let value =
            std::fs::read_to_string(sysctl_path(key)).with_context(|| format!("reading {key}"))?;
        saved.push_str(&format!("{key}={}\n", value.trim()));
    }
    std::fs::write(dir.join(SAVED_SYSCTLS), saved).context("saving the kernel settings")
}

fn restore_sysctls(dir: &Path) {
    let Ok(saved) = std::fs::read_to_string(dir.join(SAVED_SYSCTLS)) else {
        return;
    };
    for (key, value) in saved.lines().filter_map(|l| l.split_once('=')) {
        if !KUBELET_SYSCTLS.contains(&key) {
            continue;
        }
        if let Err(e) = std::fs::write(sysctl_path(key), value) {
            eprintln!("localenv: restoring {key}={value}: {e}");
        }
    }
}

/// Undoes what a node in `dir` changed once its processes are stopped (or gone in a crash):
/// kills what is left of its containers, unmounts, removes its cgroups, restores the kernel
/// settings. The Pods' network namespaces are mounted under `dir` (containerd's
/// `netns_mounts_under_state_dir`), so they go with the other mounts.
fn clean_up(dir: &Path, socket: &Path, cgroup_root: &str) {
    kill_leftovers(socket, cgroup_root);
    unmount_under(dir);
    remove_cgroups(cgroup_root);
    restore_sysctls(dir);
    remove_cni_cache(cgroup_root.trim_start_matches('/'));
    remove_log_links(dir);
}

/// SIGKILL to every process in the node's cgroups (containers, their pause processes) and to
/// every containerd shim of the node's socket (re-parented to PID 1, so found by their
/// command line).
fn kill_leftovers(socket: &Path, cgroup_root: &str) {
    let mut pids = BTreeSet::new();
    for hierarchy in cgroup_hierarchies() {
        collect_pids(
            &hierarchy.join(cgroup_root.trim_start_matches('/')),
            &mut pids,
        );
    }
    let socket = socket.to_string_lossy().into_owned();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .is_some_and(|a| String::from_utf8_lossy(a).contains("containerd-shim"));
            if is_shim && args.contains(&socket.as_bytes()) {
                pids.insert(pid);
            }
        }
    }
    for pid in &pids {
        // SAFETY: a plain kill(2) of a process found in the node's cgroups or by its socket.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    // Gone from their cgroups before the cgroups are removed.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until
        && pids
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every mounted cgroup hierarchy (`/sys/fs/cgroup/<controller>`, `unified`, or the one of a
/// pure cgroup v2 machine).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !p.is_symlink())
                .collect()
        })
        .unwrap_or_default()
}

fn collect_pids(cgroup: &Path, pids: &mut BTreeSet<i32>) {
    if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(children) = std::fs::read_dir(cgroup) {
        for c in children.flatten().filter(|c| c.path().is_dir()) {
            collect_pids(&c.path(), pids);
        }
    }
}

/// Creates kubelet's `cgroupRoot` in every hierarchy (kubelet wants it there); a cpuset
/// cgroup of cgroup v1 gets its parent's CPUs and memory nodes, without which nothing can
/// join it.
fn make_cgroups(cgroup_root: &str) -> Result<()> {
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(cgroup_root.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = hierarchy.join(file);
            if parent.exists() && !hierarchy.join("cgroup.controllers").exists() {
                let value = std::fs::read_to_string(&parent)
                    .with_context(|| format!("reading {}", parent.display()))?;
                std::fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}", dir.join(file).display()))?;
            }
        }
    }
    Ok(())
}

/// Removes the node's cgroups, deepest first, in every hierarchy.
fn remove_cgroups(cgroup_root: &str) {
    fn remove(dir: &Path) {
        if let Ok(children) = std::fs::read_dir(dir) {
            for c in children.flatten().filter(|c| c.path().is_dir()) {
                remove(&c.path());
            }
        }
        if let Err(e) = std::fs::remove_dir(dir) {
            eprintln!("localenv: removing cgroup {}: {e}", dir.display());
        }
    }
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(cgroup_root.trim_start_matches('/'));
        if dir.exists() {
            remove(&dir);
        }
    }
}

/// The mount points under `dir` (from `/proc/self/mountinfo`), deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// mountinfo writes a space, tab, newline and backslash in a path as octal escapes.
fn unescape_mount_path(raw: &str) -> PathBuf {
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&raw[i + 1..i + 4], 8)
        {
            out.push(b);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsString::from(String::from_utf8_lossy(&out).into_owned()))
}

fn unmount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a NUL-terminated path; MNT_DETACH never blocks on a busy mount.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            eprintln!("localenv: unmounting {}: {e}", path.display());
        }
    }
}

/// Unmounts everything mounted under `dir` (overlays of containers, Pods' volumes, shm).
fn unmount_under(dir: &Path) {
    for p in mounts_under(dir) {
        unmount(&p);
    }
}

/// libcni's cache of the node's network (`/var/lib/cni/results/<network>-*`).
fn remove_cni_cache(network: &str) {
    let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{network}-"))
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// kubelet's links in `/var/log/containers` to logs in the node's directory.
fn remove_log_links(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/var/log/containers") else {
        return;
    };
    for e in entries.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// After a crash of the process that ran it: undoes what the node of run directory `run_dir`
/// (a directory of a process that is gone) changed, before the directory is removed.
pub fn sweep_stale(run_dir: &Path, pid: u32) {
    let mut nodes = Vec::new();
    if let Ok(envs) = std::fs::read_dir(run_dir) {
        for env in envs.flatten() {
            let node = env.path().join("node");
            if node.is_dir() {
                nodes.push(node);
            }
        }
    }
    for node in nodes {
        clean_up(
            &node,
            &node.join("containerd.sock"),
            &format!("/{PREFIX}{pid}"),
        );
    }
    sweep_stale_namespaces();
}
