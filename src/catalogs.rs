//! From an ExternalCatalog (and the Secrets it references) to a live [`Backend`].

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::backend::consul::{Consul, ConsulConfig};
use crate::backend::etcd::{Etcd, EtcdConfig};
use crate::backend::tls::TlsSettings;
use crate::backend::zookeeper::{MemorySessionStore, SessionStore, ZooKeeper, ZooKeeperConfig};
use crate::backend::{Backend, ClientCert};
use crate::crd::{ExternalCatalog, SecretKeyRef, SecretRef, TlsConfig};
use crate::desired::Problem;
use crate::sessions::SecretSessionStore;

/// The Secret material an ExternalCatalog references, read at build time and re-read
/// periodically: a changed Secret rebuilds the backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Consul ACL token.
    pub token: Option<String>,
    /// etcd user or ZooKeeper digest user, and its password.
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_pem: Option<Vec<u8>>,
    pub insecure_skip_verify: bool,
    /// `tls.crt` and `tls.key` of `tls.clientCertSecretRef`.
    pub client_cert: Option<ClientCert>,
}

/// Reads the Secrets `catalog` references.
pub async fn credentials(
    client: &kube::Client,
    catalog: &ExternalCatalog,
) -> Result<Credentials, Problem> {
    let spec = &catalog.spec;
    let mut out = Credentials::default();
    let (user_ref, tls_cfg) = match (&spec.consul, &spec.etcd, &spec.zookeeper) {
        (Some(c), _, _) => {
            if let Some(r) = &c.token_secret_ref {
                out.token = Some(secret_key(client, r).await?);
            }
            (None, c.tls.as_ref())
        }
        (_, Some(e), _) => (e.credentials_secret_ref.as_ref(), e.tls.as_ref()),
        (_, _, Some(z)) => (z.digest_secret_ref.as_ref(), z.tls.as_ref()),
        _ => (None, None),
    };
    if let Some(r) = user_ref {
        let s = secret(client, &r.namespace, &r.name).await?;
        let text = |key: &str| -> Result<String, Problem> {
            String::from_utf8(field(&s, &r.namespace, &r.name, key)?).map_err(|_| Problem {
                reason: "InvalidSecret",
                message: format!("Secret {}/{} key {key:?} is not text", r.namespace, r.name),
            })
        };
        out.username = Some(text("username")?);
        out.password = Some(text("password")?);
    }
    (out.ca_pem, out.insecure_skip_verify, out.client_cert) = tls(client, tls_cfg).await?;
    Ok(out)
}

/// What building a backend needs besides the ExternalCatalog and its credentials.
#[derive(Clone)]
pub struct Context {
    /// The owner id written into every entry.
    pub owner: String,
    /// Where ZooKeeper sessions are kept between processes: a Secret in the controller's
    /// namespace, or nowhere (`catalog-bridge query` opens a throw-away session).
    pub sessions: Option<SessionSecret>,
    /// Only read, never write (`--dry-run`, `query`, import watches): etcd then neither grants
    /// a lease nor claims its marker.
    pub read_only: bool,
}

/// A Secret of the controller's namespace that holds ZooKeeper sessions, one key per catalog.
#[derive(Clone)]
pub struct SessionSecret {
    pub client: kube::Client,
    pub namespace: String,
    pub name: String,
}

/// Builds the backend an ExternalCatalog describes, with its credentials. Fails with a
/// [`Problem`] (shown in the catalog's status) when the configuration cannot be used.
pub fn build(
    catalog: &ExternalCatalog,
    credentials: Credentials,
    ctx: &Context,
) -> Result<Arc<dyn Backend>, Problem> {
    let spec = &catalog.spec;
    let owner = ctx.owner.as_str();
    let name = catalog.metadata.name.clone().unwrap_or_default();
    let invalid = |e: anyhow::Error| Problem {
        reason: "InvalidConfig",
        message: format!("{e:#}"),
    };
    if let Some(c) = &spec.consul {
        let cfg = ConsulConfig {
            addresses: c.addresses.clone(),
            datacenter: c.datacenter.clone(),
            token: credentials.token,
            node_name: c
                .node_name
                .clone()
                .unwrap_or_else(|| format!("k8s-{owner}")),
            owner: owner.to_string(),
            catalog: name,
            insecure_skip_verify: credentials.insecure_skip_verify,
            ca_pem: credentials.ca_pem,
            client_cert: credentials.client_cert,
        };
        return Ok(Arc::new(Consul::new(cfg).map_err(invalid)?));
    }
    if let Some(e) = &spec.etcd {
        let cfg = EtcdConfig {
            endpoints: e.endpoints.clone(),
            username: credentials.username,
            password: credentials.password,
            lease_ttl: e
                .lease_ttl_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(crate::backend::etcd::DEFAULT_LEASE_TTL),
            layout: e.layout,
            base_path: e.base_path.clone(),
            zone: e.zone.clone(),
            owner: owner.to_string(),
            catalog: name,
            ca_pem: credentials.ca_pem,
            insecure_skip_verify: credentials.insecure_skip_verify,
            client_cert: credentials.client_cert,
            read_only: ctx.read_only,
        };
        return Ok(Arc::new(Etcd::new(cfg).map_err(invalid)?));
    }
    if let Some(z) = &spec.zookeeper {
        let session_store: Arc<dyn SessionStore> = match &ctx.sessions {
            Some(s) => Arc::new(SecretSessionStore::new(
                s.client.clone(),
                &s.namespace,
                &s.name,
                &name,
            )),
            None => Arc::new(MemorySessionStore::default()),
        };
        let cfg = ZooKeeperConfig {
            connect: z.connect.clone(),
            session_timeout: z
                .session_timeout_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(crate::backend::zookeeper::DEFAULT_SESSION_TIMEOUT),
            digest: credentials.username.zip(credentials.password),
            layout: z.layout,
            base_path: z.base_path.clone(),
            owner: owner.to_string(),
            session_store,
            session_path_budget: crate::backend::zookeeper::DEFAULT_SESSION_PATH_BUDGET,
            read_only: ctx.read_only,
            tls: z.tls.as_ref().map(|_| TlsSettings {
                ca_pem: credentials.ca_pem,
                client_cert: credentials.client_cert,
                insecure_skip_verify: credentials.insecure_skip_verify,
            }),
        };
        return Ok(Arc::new(ZooKeeper::new(cfg).map_err(invalid)?));
    }
    Err(Problem {
        reason: "InvalidConfig",
        message: "exactly one of consul, etcd, zookeeper must be set".into(),
    })
}

/// `consul`, `etcd` or `zookeeper`.
pub fn kind(catalog: &ExternalCatalog) -> &'static str {
    if catalog.spec.consul.is_some() {
        "consul"
    } else if catalog.spec.etcd.is_some() {
        "etcd"
    } else {
        "zookeeper"
    }
}

async fn secret(client: &kube::Client, namespace: &str, name: &str) -> Result<Secret, Problem> {
    Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| {
            let forbidden = matches!(&e, kube::Error::Api(s) if s.code == 403);
            Problem {
                reason: if forbidden { "SecretForbidden" } else { "SecretNotFound" },
                message: if forbidden {
                    format!("reading Secret {namespace}/{name} is not allowed (with the Helm chart, list the namespace in rbac.secretNamespaces): {e}")
                } else {
                    format!("reading Secret {namespace}/{name}: {e}")
                },
            }
        })
}

fn field(s: &Secret, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, Problem> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .ok_or_else(|| Problem {
            reason: "SecretKeyNotFound",
            message: format!("Secret {namespace}/{name} has no key {key:?}"),
        })
}

async fn secret_key(client: &kube::Client, r: &SecretKeyRef) -> Result<String, Problem> {
    let s = secret(client, &r.namespace, &r.name).await?;
    let bytes = field(&s, &r.namespace, &r.name, &r.key)?;
    String::from_utf8(bytes)
        .map(|t| t.trim().to_string())
        .map_err(|_| Problem {
            reason: "InvalidSecret",
            message: format!(
                "Secret {}/{} key {:?} is not text",
                r.namespace, r.name, r.key
            ),
        })
}

/// The CA bundle to trust (`ca.crt` of `caSecretRef`), whether to skip verification, and the
/// client certificate (`tls.crt` and `tls.key` of `clientCertSecretRef`, e.g. a Secret of type
/// `kubernetes.io/tls`).
async fn tls(
    client: &kube::Client,
    tls: Option<&TlsConfig>,
) -> Result<(Option<Vec<u8>>, bool, Option<ClientCert>), Problem> {
    let Some(t) = tls else {
        return Ok((None, false, None));
    };
    let ca = match &t.ca_secret_ref {
        Some(SecretRef { namespace, name }) => {
            let s = secret(client, namespace, name).await?;
            Some(field(&s, namespace, name, "ca.crt")?)
        }
        None => None,
    };
    let client_cert = match &t.client_cert_secret_ref {
        Some(SecretRef { namespace, name }) => {
            let s = secret(client, namespace, name).await?;
            Some(ClientCert {
                cert_pem: field(&s, namespace, name, "tls.crt")?,
                key_pem: field(&s, namespace, name, "tls.key")?,
            })
        }
        None => None,
    };
    Ok((ca, t.insecure_skip_verify, client_cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(spec: serde_json::Value) -> ExternalCatalog {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "c"}, "spec": spec,
        }))
        .expect("test catalog")
    }

    fn ctx() -> Context {
        Context {
            owner: "cluster-a".into(),
            sessions: None,
            read_only: false,
        }
    }

    #[test]
    fn zookeeper_tls_settings_reach_the_backend() {
        let plain = catalog(serde_json::json!({"zookeeper": {"connect": "zk:2181"}}));
        assert!(build(&plain, Credentials::default(), &ctx()).is_ok());
        let tls = catalog(serde_json::json!({"zookeeper": {
            "connect": "zk:2281", "tls": {"insecureSkipVerify": true}}}));
        assert!(build(&tls, Credentials::default(), &ctx()).is_ok());
        // A CA bundle that is no PEM is refused when the backend is built.
        let credentials = Credentials {
            ca_pem: Some(b"not a certificate".to_vec()),
            ..Default::default()
        };
        let tls = catalog(serde_json::json!({"zookeeper": {
            "connect": "zk:2281", "tls": {"caSecretRef": {"namespace": "a", "name": "b"}}}}));
        let Err(problem) = build(&tls, credentials, &ctx()) else {
            panic!("an unusable ZooKeeper CA bundle was accepted")
        };
        assert_eq!(problem.reason, "InvalidConfig");
        assert!(
            problem.message.contains("ZooKeeper CA bundle"),
            "{problem:?}"
        );
    }

    #[test]
    fn a_client_certificate_reaches_the_backends() {
        let cert = ClientCert {
            cert_pem: b"not a certificate".to_vec(),
            key_pem: b"not a key".to_vec(),
        };
        let credentials = Credentials {
            client_cert: Some(cert),
            ..Default::default()
        };
        // Unusable material is refused when the backend is built, with the catalog's error.
        for spec in [
            serde_json::json!({"consul": {"addresses": ["https://consul:8501"]}}),
            serde_json::json!({"etcd": {"endpoints": ["etcd:2379"]}}),
            serde_json::json!({"zookeeper": {"connect": "zk:2281", "tls": {"insecureSkipVerify": true}}}),
        ] {
            let Err(problem) = build(&catalog(spec.clone()), credentials.clone(), &ctx()) else {
                panic!("{spec}: an unusable client certificate was accepted")
            };
            assert_eq!(problem.reason, "InvalidConfig", "{spec}");
            assert!(
                problem.message.contains("client certificate"),
                "{spec}: {problem:?}"
            );
        }
    }
}
