//! From an ExternalCatalog (and the Secrets it references) to a live [`Backend`]; and
//! [`Connect`], the one way the export and import supervisors get backends, which their tests
//! replace with in-memory catalogs.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::secrets::{self, Credentials};
use super::sessions::SecretSessionStore;
use crate::api::crd::ExternalCatalog;
use crate::backend::Backend;
use crate::backend::claim::Claimed;
use crate::backend::consul::{Consul, ConsulConfig};
use crate::backend::etcd::{Etcd, EtcdConfig};
use crate::backend::tls::TlsSettings;
use crate::backend::zookeeper::{MemorySessionStore, SessionStore, ZooKeeper, ZooKeeperConfig};
use crate::model::{Problem, Reason};

/// How the supervisors of writers and imports get the backend of an ExternalCatalog.
#[async_trait]
pub trait Connect: Send + Sync {
    /// The Secret material `catalog` references, read now; a change rebuilds its writer.
    async fn credentials(&self, catalog: &ExternalCatalog) -> Result<Credentials, Problem>;

    /// A backend for `catalog`. `read_only` ones never write (dry runs, import watches): etcd
    /// then neither grants a lease nor claims its marker, and ZooKeeper never attaches to the
    /// stored session.
    fn build(
        &self,
        catalog: &ExternalCatalog,
        credentials: Credentials,
        read_only: bool,
    ) -> Result<Arc<dyn Backend>, Problem>;
}

/// The real [`Connect`]: Secrets read through the API server, sessions kept in a Secret.
pub struct Catalogs {
    pub client: kube::Client,
    /// The owner id written into every entry.
    pub owner: String,
    /// This cluster's `kube-system` namespace UID, recorded in the owner marker of each catalog
    /// written to (`backend::claim`).
    pub cluster: String,
    /// Where ZooKeeper sessions are kept between processes.
    pub sessions: SessionSecret,
}

#[async_trait]
impl Connect for Catalogs {
    async fn credentials(&self, catalog: &ExternalCatalog) -> Result<Credentials, Problem> {
        secrets::credentials(&self.client, catalog).await
    }

    fn build(
        &self,
        catalog: &ExternalCatalog,
        credentials: Credentials,
        read_only: bool,
    ) -> Result<Arc<dyn Backend>, Problem> {
        let ctx = Context {
            owner: self.owner.clone(),
            cluster: Some(self.cluster.clone()),
            sessions: Some(self.sessions.clone()),
            read_only,
        };
        build(catalog, credentials, &ctx)
    }
}

/// What building a backend needs besides the ExternalCatalog and its credentials.
#[derive(Clone)]
pub struct Context {
    /// The owner id written into every entry.
    pub owner: String,
    /// This cluster's `kube-system` UID: a backend that writes does so only where the owner
    /// id is claimed for it ([`Claimed`]). `None`: no owner marker is read or written.
    pub cluster: Option<String>,
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

/// Builds the backend an ExternalCatalog describes, with its credentials, writing only where
/// the owner id is this cluster's ([`Claimed`], unless read only). Fails with a [`Problem`]
/// (shown in the catalog's status) when the configuration cannot be used.
pub fn build(
    catalog: &ExternalCatalog,
    credentials: Credentials,
    ctx: &Context,
) -> Result<Arc<dyn Backend>, Problem> {
    let backend = build_backend(catalog, credentials, ctx)?;
    Ok(match &ctx.cluster {
        Some(cluster) if !ctx.read_only => Arc::new(Claimed::new(backend, &ctx.owner, cluster)),
        _ => backend,
    })
}

fn build_backend(
    catalog: &ExternalCatalog,
    credentials: Credentials,
    ctx: &Context,
) -> Result<Arc<dyn Backend>, Problem> {
    let spec = &catalog.spec;
    let owner = ctx.owner.as_str();
    let name = catalog.metadata.name.clone().unwrap_or_default();
    let invalid = |e: anyhow::Error| Problem {
        reason: Reason::InvalidConfig,
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
            read_only: ctx.read_only,
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
            jute_max_buffer: z
                .jute_max_buffer
                .and_then(|b| usize::try_from(b).ok())
                .unwrap_or(crate::backend::zookeeper::DEFAULT_JUTE_MAX_BUFFER),
            session_path_budget: None,
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
        reason: Reason::InvalidConfig,
        message: "exactly one of consul, etcd, zookeeper must be set".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ClientCert;

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
            cluster: None,
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
