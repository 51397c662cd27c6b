//! The Secrets an ExternalCatalog references, read into [`Credentials`]: an ACL token, a user
//! and password, a CA bundle, a client certificate. A Secret that cannot be read is a
//! [`Problem`] the catalog's status shows.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::api::crd::{ExternalCatalog, SecretKeyRef, SecretRef, TlsConfig};
use crate::backend::ClientCert;
use crate::model::{Problem, Reason};

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
                reason: Reason::InvalidSecret,
                message: format!("Secret {}/{} key {key:?} is not text", r.namespace, r.name),
            })
        };
        out.username = Some(text("username")?);
        out.password = Some(text("password")?);
    }
    (out.ca_pem, out.insecure_skip_verify, out.client_cert) = tls(client, tls_cfg).await?;
    Ok(out)
}

async fn secret(client: &kube::Client, namespace: &str, name: &str) -> Result<Secret, Problem> {
    Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| {
            let forbidden = matches!(&e, kube::Error::Api(s) if s.code == 403);
            Problem {
                reason: if forbidden {
                    Reason::SecretForbidden
                } else {
                    Reason::SecretNotFound
                },
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
            reason: Reason::SecretKeyNotFound,
            message: format!("Secret {namespace}/{name} has no key {key:?}"),
        })
}

async fn secret_key(client: &kube::Client, r: &SecretKeyRef) -> Result<String, Problem> {
    let s = secret(client, &r.namespace, &r.name).await?;
    let bytes = field(&s, &r.namespace, &r.name, &r.key)?;
    String::from_utf8(bytes)
        .map(|t| t.trim().to_string())
        .map_err(|_| Problem {
            reason: Reason::InvalidSecret,
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
