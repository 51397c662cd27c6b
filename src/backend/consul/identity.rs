//! Which Consul cluster answers: the identity in [`Consul::location`], so that a catalog moved
//! to another cluster is a move even when both datacenters have the same name (`dc1`, as
//! almost everywhere) and the node name stays.
//!
//! In order, the first one the cluster gives:
//! 1. the trust domain of its Connect CA (`/v1/connect/ca/roots`, `<uuid>.consul`): made once
//!    by the cluster, kept across CA rotations and provider changes, readable without any ACL
//!    rights, nothing written. Missing only where Connect is turned off (the servers' default
//!    before Consul 1.16, answered with "Connect must be enabled");
//! 2. the marker key [`MARKER_KEY`] in the KV store, holding a random UUID written once with a
//!    check-and-set (`?cas=0`) so that concurrent writers agree on one; it needs `key:read`
//!    (and `key:write` to create it), and a read-only client (a dry run) never creates it;
//! 3. the addresses of the Raft servers (`/v1/status/peers`, no ACL rights needed): they
//!    change when servers are replaced, but the two locations compared are read together.
//!
//! An answer that is a failure (a cluster without a leader, a CA not yet initialised) is an
//! error, never a step down: the next step would name the same cluster differently, and a
//! move it does not make would remove its entries.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::Consul;
use crate::backend::BackendError;

/// The KV key that names a Consul cluster whose Connect is turned off.
pub const MARKER_KEY: &str = "catalog-bridge/cluster-id";

impl Consul {
    /// The cluster's identity, e.g. `trust-domain 7f42f496-….consul`, `marker 0b6e…` or
    /// `servers 10.0.0.1:8300,10.0.0.2:8300`.
    pub(super) async fn cluster_identity(&self) -> Result<String, BackendError> {
        if let Some(domain) = self.trust_domain().await? {
            return Ok(format!("trust-domain {domain}"));
        }
        if let Some(marker) = self.marker().await? {
            return Ok(format!("marker {marker}"));
        }
        self.servers().await.map(|s| format!("servers {s}"))
    }

    /// The Connect CA's trust domain, or None when Connect is turned off.
    async fn trust_domain(&self) -> Result<Option<String>, BackendError> {
        let what = "GET /v1/connect/ca/roots";
        let reply = self
            .call(Method::GET, &["connect", "ca", "roots"], &[], true, None)
            .await?;
        if !reply.status.is_success() {
            let body = String::from_utf8_lossy(&reply.body).to_lowercase();
            if body.contains("connect must be enabled") {
                return Ok(None);
            }
            return Err(reply.status_error(what));
        }
        match reply.json(what)?.get("TrustDomain").and_then(Value::as_str) {
            Some(d) if !d.is_empty() => Ok(Some(d.to_string())),
            _ => Err(BackendError::Unreachable(format!(
                "{what} on {}: the Connect CA has no trust domain yet",
                reply.address
            ))),
        }
    }

    /// The marker's value, created when missing (unless read-only); None when the token may
    /// not read or create it, or, read-only, when there is none.
    async fn marker(&self) -> Result<Option<String>, BackendError> {
        let path = ["kv", "catalog-bridge", "cluster-id"];
        let what = format!("GET /v1/kv/{MARKER_KEY}");
        for _ in 0..2 {
            let reply = self
                .call(Method::GET, &path, &[("raw", "")], true, None)
                .await?;
            match reply.status {
                s if s.is_success() => {
                    let raw = String::from_utf8_lossy(&reply.body).trim().to_string();
                    // What this controller writes, or any other non-empty value.
                    let v = serde_json::from_str::<Value>(&raw)
                        .ok()
                        .and_then(|v| v.get("clusterId")?.as_str().map(str::to_string))
                        .unwrap_or(raw);
                    if v.is_empty() {
                        return Err(BackendError::Protocol(format!(
                            "{what} on {}: the marker is empty; delete it and it is written again",
                            reply.address
                        )));
                    }
                    return Ok(Some(v));
                }
                StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => return Ok(None),
                StatusCode::NOT_FOUND if self.read_only => return Ok(None),
                StatusCode::NOT_FOUND => {}
                _ => return Err(reply.status_error(&what)),
            }
            // Written once: `cas=0` sets it only while it does not exist, so that of two
            // writers one wins and the other reads the winner's.
            let id = serde_json::json!({"clusterId": uuid::Uuid::new_v4().to_string()});
            let put = self
                .call(Method::PUT, &path, &[("cas", "0")], true, Some(&id))
                .await?;
            match put.status {
                s if s.is_success() => {}
                StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => return Ok(None),
                _ => return Err(put.status_error(&format!("PUT /v1/kv/{MARKER_KEY}?cas=0"))),
            }
        }
        Err(BackendError::Protocol(format!(
            "{what}: the marker was neither found nor written"
        )))
    }

    /// The Raft servers' addresses, sorted and joined.
    async fn servers(&self) -> Result<String, BackendError> {
        let what = "GET /v1/status/peers";
        let peers = self.get_json(what, &["status", "peers"], &[]).await?;
        let mut peers: Vec<&str> = peers
            .as_array()
            .map(|p| p.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if peers.is_empty() {
            return Err(BackendError::Unreachable(format!(
                "{what}: the Consul cluster names no server"
            )));
        }
        peers.sort_unstable();
        Ok(peers.join(","))
    }
}
