//! From an ExternalCatalog (and the Secrets it references) to a live [`Backend`].

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::backend::Backend;
use crate::backend::consul::{Consul, ConsulConfig};
use crate::crd::{ExternalCatalog, SecretKeyRef, SecretRef, TlsConfig};
use crate::desired::Problem;

/// The Secret material an ExternalCatalog references, read at build time and re-read
/// periodically: a changed Secret rebuilds the backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    pub token: Option<String>,
    pub ca_pem: Option<Vec<u8>>,
    pub insecure_skip_verify: bool,
}

/// Reads the Secrets `catalog` references.
pub async fn credentials(
    client: &kube::Client,
    catalog: &ExternalCatalog,
) -> Result<Credentials, Problem> {
    let Some(c) = &catalog.spec.consul else {
        return Ok(Credentials::default());
    };
    let token = match &c.token_secret_ref {
        Some(r) => Some(secret_key(client, r).await?),
        None => None,
    };
    let (ca_pem, insecure_skip_verify) = tls(client, c.tls.as_ref()).await?;
    Ok(Credentials {
        token,
        ca_pem,
        insecure_skip_verify,
    })
}

/// Builds the backend an ExternalCatalog describes, with its credentials. Fails with a
/// [`Problem`] (shown in the catalog's status) when the kind is not supported yet or the
/// configuration cannot be used.
pub fn build(
    catalog: &ExternalCatalog,
    credentials: Credentials,
    owner: &str,
) -> Result<Arc<dyn Backend>, Problem> {
    let spec = &catalog.spec;
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
            insecure_skip_verify: credentials.insecure_skip_verify,
            ca_pem: credentials.ca_pem,
        };
        let consul = Consul::new(cfg).map_err(|e| Problem {
            reason: "InvalidConfig",
            message: format!("{e:#}"),
        })?;
        return Ok(Arc::new(consul));
    }
    if spec.etcd.is_some() || spec.zookeeper.is_some() {
        return Err(Problem {
            reason: "Unsupported",
            message: "this version of catalog-bridge exports to Consul only; etcd and ZooKeeper come next".into(),
        });
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

/// The CA bundle to trust (`ca.crt` of `caSecretRef`) and whether to skip verification.
async fn tls(
    client: &kube::Client,
    tls: Option<&TlsConfig>,
) -> Result<(Option<Vec<u8>>, bool), Problem> {
    let Some(t) = tls else {
        return Ok((None, false));
    };
    let ca = match &t.ca_secret_ref {
        Some(SecretRef { namespace, name }) => {
            let s = secret(client, namespace, name).await?;
            Some(field(&s, namespace, name, "ca.crt")?)
        }
        None => None,
    };
    Ok((ca, t.insecure_skip_verify))
}
