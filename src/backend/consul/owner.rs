//! The owner marker in Consul (`backend::claim`): the KV key
//! `catalog-bridge/owners/<owner id>`, created with `?cas=0` (only while it does not exist),
//! deleted with `?cas=<ModifyIndex>` (only if unchanged since read). Needs `key:write` on
//! `catalog-bridge/owners/`.

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::Consul;
use crate::backend::BackendError;
use crate::backend::claim::{MarkerStore, StoredMarker};

/// Where owner markers live in the KV store.
pub const OWNERS_PREFIX: &str = "catalog-bridge/owners/";

impl Consul {
    fn owner_path(&self) -> [&str; 4] {
        ["kv", "catalog-bridge", "owners", self.owner.as_str()]
    }

    /// A failed request on the marker; a refused token is told which right it lacks.
    fn marker_error(&self, reply: &super::client::Reply, what: &str) -> BackendError {
        match reply.status_error(what) {
            BackendError::Unauthorized(m) => BackendError::Unauthorized(format!(
                "{m} (the token needs key:write on {OWNERS_PREFIX}: the owner marker that keeps \
                 two clusters from using one owner id)"
            )),
            e => e,
        }
    }

    fn require_writable(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::Rejected(
                "this Consul client is read only: it writes no owner marker".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl MarkerStore for Consul {
    /// `Consul KV catalog-bridge/owners/<owner>`.
    fn owner_marker(&self) -> String {
        format!("Consul KV {OWNERS_PREFIX}{}", self.owner)
    }

    async fn read_owner_marker(&self) -> Result<Option<StoredMarker>, BackendError> {
        self.require_owner()?;
        let what = format!("GET /v1/kv/{OWNERS_PREFIX}{}", self.owner);
        let reply = self
            .call(Method::GET, &self.owner_path(), &[("raw", "")], true, None)
            .await?;
        match reply.status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                // For one key, the index is the key's ModifyIndex.
                let version = reply
                    .index
                    .and_then(|i| i64::try_from(i).ok())
                    .ok_or_else(|| {
                        BackendError::Protocol(format!(
                            "{what} on {}: no X-Consul-Index in the answer",
                            reply.address
                        ))
                    })?;
                Ok(Some(StoredMarker {
                    value: reply.body,
                    version,
                }))
            }
            _ => Err(self.marker_error(&reply, &what)),
        }
    }

    async fn create_owner_marker(&self, value: &[u8]) -> Result<bool, BackendError> {
        self.require_owner()?;
        self.require_writable()?;
        let body: Value = serde_json::from_slice(value).map_err(|e| {
            BackendError::Protocol(format!("an owner marker that is not JSON: {e}"))
        })?;
        let what = format!("PUT /v1/kv/{OWNERS_PREFIX}{}?cas=0", self.owner);
        let reply = self
            .call(
                Method::PUT,
                &self.owner_path(),
                &[("cas", "0")],
                true,
                Some(&body),
            )
            .await?;
        if !reply.status.is_success() {
            return Err(self.marker_error(&reply, &what));
        }
        Ok(String::from_utf8_lossy(&reply.body).trim() == "true")
    }

    async fn delete_owner_marker(&self, version: i64) -> Result<bool, BackendError> {
        self.require_owner()?;
        self.require_writable()?;
        let cas = version.to_string();
        let what = format!("DELETE /v1/kv/{OWNERS_PREFIX}{}?cas={cas}", self.owner);
        let reply = self
            .call(
                Method::DELETE,
                &self.owner_path(),
                &[("cas", &cas)],
                true,
                None,
            )
            .await?;
        if !reply.status.is_success() {
            return Err(self.marker_error(&reply, &what));
        }
        Ok(String::from_utf8_lossy(&reply.body).trim() == "true")
    }
}
