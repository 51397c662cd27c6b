//! Where ZooKeeper sessions are kept between controller processes: one key per catalog in a
//! Secret of the controller's namespace (docs/architecture.md, "Where the session is kept").

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::backend::zookeeper::{SessionStore, StoredSession};

/// A [`SessionStore`] in the Secret `name` of `namespace`, under key `key`.
pub struct SecretSessionStore {
    api: Api<Secret>,
    name: String,
    key: String,
}

impl SecretSessionStore {
    pub fn new(client: kube::Client, namespace: &str, name: &str, catalog: &str) -> Self {
        SecretSessionStore {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            key: format!("{catalog}.json"),
        }
    }
}

#[async_trait]
impl SessionStore for SecretSessionStore {
    async fn load(&self) -> Result<Option<StoredSession>> {
        let Some(secret) = self
            .api
            .get_opt(&self.name)
            .await
            .with_context(|| format!("reading Secret {}", self.name))?
        else {
            return Ok(None);
        };
        let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&self.key)) else {
            return Ok(None);
        };
        let stored = serde_json::from_slice(&bytes.0)
            .with_context(|| format!("parsing {} in Secret {}", self.key, self.name))?;
        Ok(Some(stored))
    }

    async fn save(&self, s: &StoredSession) -> Result<()> {
        let mut data = BTreeMap::new();
        data.insert(self.key.clone(), ByteString(serde_json::to_vec(s)?));
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "catalog-bridge".to_string(),
                )])),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        };
        // Server-side apply with a field manager per key: other catalogs' keys are kept.
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(&format!("catalog-bridge-{}", self.key)).force(),
                &Patch::Apply(&secret),
            )
            .await
            .with_context(|| format!("saving the ZooKeeper session in Secret {}", self.name))?;
        Ok(())
    }
}
