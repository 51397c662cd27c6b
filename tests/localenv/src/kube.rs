//! A real kube-apiserver (v1.36) with its own etcd, and kube-controller-manager beside it so
//! that the real EndpointSlice controller turns Pods into EndpointSlices.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::etcd::Etcd;
use crate::ports::free_port;
use crate::process::{Process, Spec};
use crate::programs;
use crate::ready::wait_ready;

/// The bearer token of the admin identity (group `system:masters`).
const ADMIN_TOKEN: &str = "localenv-admin-token";
/// A second identity with the same rights, so that what one process writes can be told from
/// another's in the audit log ([`Kube::writes_by`]).
pub const SECOND_USER: &str = "second";
const SECOND_TOKEN: &str = "localenv-second-token";

/// The audit policy: every request that writes (whoever makes it, refused or not) at the
/// Metadata level; nothing else.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\n\
                            kind: Policy\n\
                            omitStages: [RequestReceived]\n\
                            rules:\n\
                            - level: Metadata\n  \
                              verbs: [create, update, patch, delete, deletecollection]\n\
                            - level: None\n";

pub struct Kube {
    // Field order is drop order: the controller manager and the API server stop before etcd.
    controller_manager: Option<Process>,
    apiserver: Process,
    storage: Etcd,
    port: u16,
    dir: PathBuf,
    kubeconfig: PathBuf,
    ca: PathBuf,
    /// The same cluster as [`SECOND_USER`].
    second_kubeconfig: PathBuf,
    audit_log: PathBuf,
    http: reqwest::Client,
}

impl Kube {
    /// Starts etcd, the API server and (when `controller_manager` is set) the controller
    /// manager, and waits until the API server's `/readyz` passes.
    pub async fn start(dir: &Path, controller_manager: bool) -> Result<Kube> {
        Kube::start_in(dir, "kube", controller_manager, false).await
    }

    /// The control plane of a cluster with a node ([`crate::node`]): as [`Self::start`] with
    /// the controller manager, and what Pods need — the `kubernetes` Service's endpoint (the
    /// API server's lease reconciler), ServiceAccount tokens, the Node authorizer, every
    /// controller of the controller manager (Deployments, ReplicaSets, the disruption
    /// controller, the `kube-root-ca.crt` publisher).
    pub async fn start_for_node(dir: &Path) -> Result<Kube> {
        Kube::start_in(dir, "kube", true, true).await
    }

    /// [`Self::start`] in sub-directory `name` of `dir`: another cluster, with its own storage
    /// etcd (so its own `kube-system` namespace UID), certificates and port.
    pub async fn start_in(
        dir: &Path,
        name: &str,
        controller_manager: bool,
        for_node: bool,
    ) -> Result<Kube> {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let storage = Etcd::start(&dir, "kube-etcd").await?;
        let certs = Certs::generate(&dir)?;
        let port = free_port()?;
        let tokens = dir.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!(
                "{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n\
                 {SECOND_TOKEN},{SECOND_USER},second-uid,\"system:masters\"\n"
            ),
        )
        .context("writing the token file")?;
        let audit_policy = dir.join("audit-policy.yaml");
        std::fs::write(&audit_policy, AUDIT_POLICY).context("writing the audit policy")?;
        let audit_log = dir.join("audit.log");
        let spec = Spec::new("kube-apiserver", programs::kube_apiserver()?, &dir)
            .arg(format!("--etcd-servers={}", storage.url()))
            .arg(format!("--cert-dir={}", dir.join("serving").display()))
            .arg(format!("--tls-cert-file={}", certs.server_crt.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                certs.server_key.display()
            ))
            .arg(format!("--client-ca-file={}", certs.ca_crt.display()))
            .arg(format!("--secure-port={port}"))
            .arg(format!("--bind-address={}", crate::ports::host()))
            .arg(format!("--advertise-address={}", crate::ports::host()))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=true")
            // As OpenShift and hardened clusters run: setting an ownerReference needs `delete`
            // on the object (imports own their Services and EndpointSlices by registration,
            // without blockOwnerDeletion, which would need `update` on its finalizers).
            .arg("--enable-admission-plugins=OwnerReferencesPermissionEnforcement")
            .args(if for_node {
                [
                    "--authorization-mode=Node,RBAC",
                    "--endpoint-reconciler-type=lease",
                    "--kubelet-preferred-address-types=InternalIP",
                ]
            } else {
                // No ServiceAccount admission (no Pods run; it would wait for `default`
                // ServiceAccounts no controller makes), no `kubernetes` Service endpoint.
                [
                    "--authorization-mode=RBAC",
                    "--endpoint-reconciler-type=none",
                    "--disable-admission-plugins=ServiceAccount",
                ]
            })
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                certs.sa_key.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                certs.sa_key.display()
            ))
            .arg("--enable-priority-and-fairness=false")
            .arg(format!("--audit-policy-file={}", audit_policy.display()))
            .arg(format!("--audit-log-path={}", audit_log.display()))
            .arg("--audit-log-mode=blocking")
            .arg("--v=1");
        let apiserver = Process::start(spec)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(port, &certs.ca_crt, "admin", ADMIN_TOKEN),
        )
        .context("writing the kubeconfig")?;
        let second_kubeconfig = dir.join("kubeconfig-second");
        std::fs::write(
            &second_kubeconfig,
            kubeconfig_yaml(port, &certs.ca_crt, SECOND_USER, SECOND_TOKEN),
        )
        .context("writing the second kubeconfig")?;
        let ca = std::fs::read(&certs.ca_crt).context("reading the CA certificate")?;
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(&ca).context("parsing the CA certificate")?,
            )
            .timeout(Duration::from_secs(10))
            .build()
            .context("building an HTTP client")?;
        let mut kube = Kube {
            controller_manager: None,
            apiserver,
            storage,
            port,
            dir: dir.clone(),
            kubeconfig,
            ca: certs.ca_crt.clone(),
            second_kubeconfig,
            audit_log,
            http,
        };
        kube.wait_apiserver_ready().await?;
        if controller_manager {
            kube.controller_manager = Some(kube.start_controller_manager(&certs, for_node).await?);
        }
        Ok(kube)
    }

    /// Kills the API server and the etcd that stores its objects (SIGKILL, as a crash of the
    /// control plane); the controller manager, if any, stays and reconnects on its own.
    pub fn kill(&self) -> Result<()> {
        self.apiserver.kill()?;
        self.storage.kill()
    }

    /// Starts etcd and the API server again after [`Self::kill`] (same ports, same data) and
    /// waits until the API server is ready.
    pub async fn start_again(&self) -> Result<()> {
        self.storage.start_again().await?;
        self.apiserver.restart_process()?;
        self.wait_apiserver_ready().await
    }

    async fn wait_apiserver_ready(&self) -> Result<()> {
        let url = format!("https://{}:{}/readyz", crate::ports::host(), self.port);
        wait_ready(&self.apiserver, Duration::from_secs(120), || async {
            let r = self.http.get(&url).bearer_auth(ADMIN_TOKEN).send().await?;
            Ok(r.status().is_success())
        })
        .await
    }

    async fn start_controller_manager(&self, certs: &Certs, for_node: bool) -> Result<Process> {
        let port = free_port()?;
        let kc = self.kubeconfig.display().to_string();
        let spec = Spec::new(
            "kube-controller-manager",
            programs::kube_controller_manager()?,
            &self.dir,
        )
        .arg(format!("--kubeconfig={kc}"))
        .arg(format!("--authentication-kubeconfig={kc}"))
        .arg(format!("--authorization-kubeconfig={kc}"))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg(format!(
            "--cert-dir={}",
            self.dir.join("kcm-serving").display()
        ))
        .arg("--leader-elect=false")
        .arg(if for_node {
            "--controllers=*"
        } else {
            "--controllers=endpointslice,endpointslicemirroring,garbagecollector,namespace"
        })
        .arg(format!("--root-ca-file={}", certs.ca_crt.display()))
        .arg(format!(
            "--service-account-private-key-file={}",
            certs.sa_key.display()
        ))
        .arg("--v=1");
        let kcm = Process::start(spec)?;
        let insecure = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(5))
            .build()
            .context("building an HTTP client")?;
        let url = format!("https://127.0.0.1:{port}/healthz");
        wait_ready(&kcm, Duration::from_secs(60), || async {
            Ok(insecure.get(&url).send().await?.status().is_success())
        })
        .await?;
        Ok(kcm)
    }

    /// A fresh client for the admin identity. Each call builds a new one, so a client never
    /// outlives the Tokio runtime it was made on (every `#[tokio::test]` has its own).
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig).context("reading the kubeconfig")?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .context("loading the kubeconfig")?;
        kube::Client::try_from(config).context("building a kube client")
    }

    /// A kubeconfig file (admin identity) for kubectl, helm and the controller.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig like [`Self::kubeconfig_path`] that reaches the API server on another
    /// local port (a [`crate::proxy::Proxy`] in front of it); the server's certificate names
    /// 127.0.0.1, so TLS passes through unchanged.
    pub fn kubeconfig_via(&self, port: u16, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        std::fs::write(&path, kubeconfig_yaml(port, &self.ca, "admin", ADMIN_TOKEN))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The API server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A kubeconfig file for [`SECOND_USER`]: the same rights as the admin, another name in the
    /// audit log.
    pub fn second_kubeconfig_path(&self) -> &Path {
        &self.second_kubeconfig
    }

    /// Every request to write that `user` made so far, refused or not, as
    /// `<verb> <resource>[/<subresource>] <namespace>/<name> -> <HTTP code>`, in order, from the
    /// API server's audit log.
    pub fn writes_by(&self, user: &str) -> Result<Vec<String>> {
        let text = match std::fs::read_to_string(&self.audit_log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", self.audit_log.display()));
            }
        };
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let ev: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("an audit event that is not JSON: {line}"))?;
            if ev.pointer("/user/username").and_then(|u| u.as_str()) != Some(user)
                || ev.get("stage").and_then(|s| s.as_str()) != Some("ResponseComplete")
            {
                continue;
            }
            let s = |p: &str| ev.pointer(p).and_then(|v| v.as_str()).unwrap_or("");
            let mut resource = s("/objectRef/resource").to_string();
            if !s("/objectRef/subresource").is_empty() {
                resource = format!("{resource}/{}", s("/objectRef/subresource"));
            }
            out.push(format!(
                "{} {resource} {}/{} -> {}",
                s("/verb"),
                s("/objectRef/namespace"),
                s("/objectRef/name"),
                ev.pointer("/responseStatus/code")
                    .map(|c| c.to_string())
                    .unwrap_or_default()
            ));
        }
        Ok(out)
    }

    /// `https://<host>:<port>` ([`crate::ports::host`]).
    pub fn server_url(&self) -> String {
        format!("https://{}:{}", crate::ports::host(), self.port)
    }

    /// Runs kubectl with this cluster's kubeconfig and returns its standard output.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        crate::run_tool(
            Command::new(programs::kubectl()?)
                .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .args(args),
        )
    }

    /// Runs helm with this cluster's kubeconfig (and private helm directories) and returns
    /// its standard output.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let home = self.dir.join("helm");
        crate::run_tool(
            Command::new(programs::helm()?)
                .env("KUBECONFIG", &self.kubeconfig)
                .env("HELM_CACHE_HOME", home.join("cache"))
                .env("HELM_CONFIG_HOME", home.join("config"))
                .env("HELM_DATA_HOME", home.join("data"))
                .args(args),
        )
    }

    pub fn apiserver(&self) -> &Process {
        &self.apiserver
    }

    pub fn controller_manager(&self) -> Option<&Process> {
        self.controller_manager.as_ref()
    }

    /// The etcd that stores the cluster's objects.
    pub fn storage(&self) -> &Etcd {
        &self.storage
    }
}

fn kubeconfig_yaml(port: u16, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: localenv\n  \
           cluster:\n    \
             server: https://{host}:{port}\n    \
             certificate-authority: {ca}\n\
         users:\n\
         - name: {user}\n  \
           user:\n    \
             token: {token}\n\
         contexts:\n\
         - name: localenv\n  \
           context:\n    \
             cluster: localenv\n    \
             user: {user}\n    \
             namespace: default\n\
         current-context: localenv\n",
        ca = ca.display(),
        host = crate::ports::host(),
    )
}

/// The key material the API server needs, made with the openssl command line.
struct Certs {
    ca_crt: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
    sa_key: PathBuf,
}

impl Certs {
    fn generate(dir: &Path) -> Result<Certs> {
        let (ca_crt, ca_key) = crate::tls::make_ca(dir, "ca", "localenv-ca")?;
        let (server_crt, server_key) = crate::tls::make_signed(
            dir,
            "server",
            "kube-apiserver",
            // 10.96.0.1: the `kubernetes` Service, how Pods of a node reach the API server.
            &format!(
                "subjectAltName=IP:127.0.0.1{},IP:10.96.0.1,DNS:localhost,DNS:kubernetes,\
                 DNS:kubernetes.default,DNS:kubernetes.default.svc,\
                 DNS:kubernetes.default.svc.cluster.local\n\
                 basicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\n",
                crate::ports::host_san()
            ),
            (&ca_crt, &ca_key),
        )?;
        let sa_key = dir.join("sa.key");
        crate::tls::openssl(&["genrsa", "-out", &sa_key.display().to_string(), "2048"])?;
        Ok(Certs {
            ca_crt,
            server_crt,
            server_key,
            sa_key,
        })
    }
}
