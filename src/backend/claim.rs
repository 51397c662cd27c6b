//! The owner marker: which cluster uses an owner id in a catalog.
//!
//! Entries are owned by the owner id (`--cluster-id`, by default the cluster's `kube-system`
//! UID). Two clusters configured with the same id would each take the other's entries for
//! stale ones of its own and delete them. So before its first write to a catalog, a writer
//! reads the marker of its owner id there ([`Backend::read_owner_marker`]) and, when there is
//! none, creates it atomically ([`Backend::create_owner_marker`]: Consul KV `cas=0`, an etcd
//! transaction on `create_revision == 0`, a ZooKeeper `create`), recording its cluster's
//! `kube-system` UID. A marker that records another cluster means: write nothing there — no
//! put, no delete — and say so ([`BackendError::OwnerClaimed`]). [`Claimed`] wraps a backend
//! with that check, made before anything that reads or writes owned entries (reading them may
//! itself write: an etcd lease and its marker), and made again every [`RECHECK`], so that a
//! marker removed by another catalog's cleanup is put back, and one removed by the operator
//! lets a refused writer go on at its next try. When a catalog's entries are all removed
//! ([`Backend::retire`], after a cleanup or the drain of a deleted ExternalCatalog), the
//! marker goes too if it still records this cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Backend, BackendError, ImportSnapshot, Record};
use crate::api::crd::ServerInfo;
use crate::model::{Instance, Op};

/// How long a claim found to be this cluster's is trusted before it is read again.
pub const RECHECK: Duration = Duration::from_secs(60);

/// What an owner marker holds (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerMarker {
    /// The `kube-system` namespace UID of the cluster that claimed the owner id.
    pub cluster: String,
    /// When, RFC 3339.
    pub claimed_at: String,
}

impl OwnerMarker {
    /// A marker for `cluster`, claimed now.
    pub fn now(cluster: &str) -> OwnerMarker {
        OwnerMarker {
            cluster: cluster.to_string(),
            claimed_at: k8s_openapi::jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a stored marker; an error names what is there.
    pub fn parse(bytes: &[u8], at: &str) -> Result<OwnerMarker, BackendError> {
        serde_json::from_slice::<OwnerMarker>(bytes)
            .ok()
            .filter(|m| !m.cluster.is_empty())
            .ok_or_else(|| {
                BackendError::Protocol(format!(
                    "the owner marker {at} holds {:?}, not {{\"cluster\":…,\"claimedAt\":…}}: \
                     nothing is written there until it is deleted (it is then created again)",
                    String::from_utf8_lossy(bytes)
                ))
            })
    }
}

/// An owner marker as stored: its value and the version to delete it at (Consul's
/// ModifyIndex, etcd's mod revision, ZooKeeper's data version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMarker {
    pub value: Vec<u8>,
    pub version: i64,
}

/// The owner marker of one catalog, as every backend keeps it (each backend's `owner`
/// module); a part of [`Backend`].
#[async_trait]
pub trait MarkerStore: Send + Sync {
    /// Where the owner marker of this owner id lives, for messages (`Consul KV
    /// catalog-bridge/owners/<owner>`): outside every layout's names, so no reader sees it
    /// (this module).
    fn owner_marker(&self) -> String;

    /// The owner marker of this owner id, if there is one.
    async fn read_owner_marker(&self) -> Result<Option<StoredMarker>, BackendError>;

    /// Creates the owner marker with `value` unless it exists (atomically): whether it was
    /// created.
    async fn create_owner_marker(&self, value: &[u8]) -> Result<bool, BackendError>;

    /// Deletes the owner marker if it is still at `version`: whether it was deleted.
    async fn delete_owner_marker(&self, version: i64) -> Result<bool, BackendError>;
}

/// Whose the owner id is in a catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This cluster's (found, or created now).
    Ours,
    /// Another cluster's.
    Other(OwnerMarker),
}

/// Reads the owner marker of `backend`, creating it for `cluster` when there is none.
pub async fn claim(backend: &dyn Backend, cluster: &str) -> Result<Claim, BackendError> {
    let at = backend.owner_marker();
    for _ in 0..3 {
        if let Some(stored) = backend.read_owner_marker().await? {
            let m = OwnerMarker::parse(&stored.value, &at)?;
            return Ok(if m.cluster == cluster {
                Claim::Ours
            } else {
                Claim::Other(m)
            });
        }
        let m = OwnerMarker::now(cluster);
        if backend.create_owner_marker(&m.to_bytes()).await? {
            tracing::info!(marker = %at, cluster, "claimed the owner id in this catalog");
            return Ok(Claim::Ours);
        }
        // Someone created it meanwhile: read whose it is.
    }
    Err(BackendError::Protocol(format!(
        "the owner marker {at} was neither found nor created"
    )))
}

/// Deletes the owner marker of `backend` if it records `cluster` (unchanged since read).
/// Returns whether it was deleted.
pub async fn release(backend: &dyn Backend, cluster: &str) -> Result<bool, BackendError> {
    let Some(stored) = backend.read_owner_marker().await? else {
        return Ok(false);
    };
    let at = backend.owner_marker();
    if OwnerMarker::parse(&stored.value, &at)?.cluster != cluster {
        return Ok(false);
    }
    backend.delete_owner_marker(stored.version).await
}

/// The error of a writer whose owner id another cluster claimed: both clusters, the owner id,
/// where the marker is and the two ways out.
pub fn claimed_error(owner: &str, at: &str, cluster: &str, other: &OwnerMarker) -> BackendError {
    BackendError::OwnerClaimed(format!(
        "owner id {owner:?} is claimed in this catalog by another cluster (kube-system UID {}, \
         since {}); this cluster is {cluster}. Nothing is written here, so that neither cluster \
         deletes the other's entries. Give this cluster another clusterId (--cluster-id), or, \
         if that cluster is gone for good, delete the owner marker {at}",
        other.cluster, other.claimed_at
    ))
}

/// A backend that writes only where its owner id is claimed for its cluster (module docs).
pub struct Claimed {
    inner: Arc<dyn Backend>,
    /// This cluster's `kube-system` UID.
    cluster: String,
    owner: String,
    /// When the claim was last found to be ours (or, lacking the rights, last tried).
    verified: Mutex<Option<Instant>>,
    /// Why the owner id could not be claimed although the catalog answers (the credentials
    /// lack the right on the marker): the writer goes on unprotected and says so.
    unclaimed: Mutex<Option<String>>,
}

impl Claimed {
    pub fn new(inner: Arc<dyn Backend>, owner: &str, cluster: &str) -> Claimed {
        Claimed {
            inner,
            cluster: cluster.to_string(),
            owner: owner.to_string(),
            verified: Mutex::new(None),
            unclaimed: Mutex::new(None),
        }
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unclaimed(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.unclaimed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ok when the owner id is this cluster's here (read, or created, at most [`RECHECK`] ago).
    /// Credentials without the right on the marker (the catalog refuses its read or creation)
    /// are not a reason to stop writing — the controller wrote without a marker before there
    /// was one — but the catalog's status says the owner id is unprotected, and why.
    async fn ensure(&self) -> Result<(), BackendError> {
        if self.verified().is_some_and(|t| t.elapsed() < RECHECK) {
            return Ok(());
        }
        let claimed = match claim(self.inner.as_ref(), &self.cluster).await {
            Err(e @ (BackendError::Unauthorized(_) | BackendError::Refused { .. })) => {
                let why = format!(
                    "the owner id {:?} is not claimed here, so another cluster given the same \
                     clusterId would not be refused: the catalog refuses the owner marker {} \
                     ({e}); grant the right on it (README, \"Two clusters\")",
                    self.owner,
                    self.inner.owner_marker()
                );
                if self.unclaimed().as_ref() != Some(&why) {
                    tracing::warn!(warning = %why, "writing without the owner marker");
                }
                *self.unclaimed() = Some(why);
                *self.verified() = Some(Instant::now());
                return Ok(());
            }
            other => other?,
        };
        *self.unclaimed() = None;
        match claimed {
            Claim::Ours => {
                *self.verified() = Some(Instant::now());
                Ok(())
            }
            Claim::Other(m) => {
                *self.verified() = None;
                Err(claimed_error(
                    &self.owner,
                    &self.inner.owner_marker(),
                    &self.cluster,
                    &m,
                ))
            }
        }
    }
}

#[async_trait]
impl Backend for Claimed {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn render(&self, instances: &[Instance]) -> BTreeMap<String, Record> {
        self.inner.render(instances)
    }

    async fn read_owned(&self) -> Result<BTreeMap<String, Record>, BackendError> {
        self.ensure().await?;
        self.inner.read_owned().await
    }

    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError> {
        self.ensure().await?;
        self.inner.apply(ops).await
    }

    async fn expect(&self, instances: &[Instance]) -> Result<(), BackendError> {
        self.ensure().await?;
        self.inner.expect(instances).await
    }

    async fn probe(&self) -> Result<ServerInfo, BackendError> {
        self.inner.probe().await
    }

    async fn location(&self) -> Result<String, BackendError> {
        self.inner.location().await
    }

    fn invalidations(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.invalidations()
    }

    async fn release(&self) {
        self.inner.release().await
    }

    async fn pause(&self) {
        self.inner.pause().await
    }

    /// What the backend retires, and then the owner marker, if it records this cluster. A
    /// marker that cannot be removed (with ZooKeeper digest auth, only the identity that made
    /// its directory may) stays, and is said to: the entries are gone all the same.
    async fn retire(&self) -> Result<Option<String>, BackendError> {
        self.ensure().await?;
        let retired = self.inner.retire().await?;
        *self.verified() = None;
        let at = self.owner_marker();
        let marker = match release(self.inner.as_ref(), &self.cluster).await {
            Ok(true) => Some(format!("owner marker {at} removed")),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(marker = %at, error = %e, "the owner marker could not be removed; it stays until deleted by hand");
                Some(format!("owner marker {at} stays (removing it failed: {e})"))
            }
        };
        Ok(match (retired, marker) {
            (Some(r), Some(m)) => Some(format!("{r}; {m}")),
            (r, m) => r.or(m),
        })
    }

    fn warning(&self) -> Option<String> {
        match (self.inner.warning(), self.unclaimed().clone()) {
            (Some(w), Some(u)) => Some(format!("{w}; {u}")),
            (w, u) => w.or(u),
        }
    }

    async fn watch_service(
        &self,
        name: &str,
        tx: tokio::sync::watch::Sender<ImportSnapshot>,
    ) -> Result<(), BackendError> {
        self.inner.watch_service(name, tx).await
    }

    async fn lookup(&self, name: &str) -> Result<Vec<String>, BackendError> {
        self.inner.lookup(name).await
    }
}

#[async_trait]
impl MarkerStore for Claimed {
    fn owner_marker(&self) -> String {
        self.inner.owner_marker()
    }

    async fn read_owner_marker(&self) -> Result<Option<StoredMarker>, BackendError> {
        self.inner.read_owner_marker().await
    }

    async fn create_owner_marker(&self, value: &[u8]) -> Result<bool, BackendError> {
        self.inner.create_owner_marker(value).await
    }

    async fn delete_owner_marker(&self, version: i64) -> Result<bool, BackendError> {
        self.inner.delete_owner_marker(version).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::Memory;

    #[tokio::test]
    async fn the_first_cluster_claims_and_another_is_refused_until_the_marker_goes() {
        let mem = Arc::new(Memory::new("shared", 64));
        let a = Claimed::new(mem.clone(), "shared", "uid-a");
        let b = Claimed::new(mem.clone(), "shared", "uid-b");
        assert!(a.read_owned().await.is_ok(), "the first one claims");
        let stored = mem
            .read_owner_marker()
            .await
            .expect("read")
            .expect("a marker");
        let m = OwnerMarker::parse(&stored.value, "m").expect("parses");
        assert_eq!(m.cluster, "uid-a");
        let Err(e) = b.apply(&[]).await else {
            panic!("another cluster with the same owner id may write")
        };
        assert_eq!(e.reason(), crate::model::Reason::OwnerClaimed);
        let text = e.to_string();
        assert!(
            text.contains("\"shared\"") && text.contains("uid-a") && text.contains("uid-b"),
            "{text}"
        );
        assert!(b.read_owned().await.is_err(), "nor read what it would own");

        // The first one cleans up: the marker goes with its entries, the second may claim.
        assert_eq!(
            a.retire().await.expect("retire"),
            Some("owner marker memory:owners/shared removed".into())
        );
        assert!(mem.read_owner_marker().await.expect("read").is_none());
        assert!(b.read_owned().await.is_ok());
        // A marker of someone else is never released.
        assert!(!release(mem.as_ref(), "uid-a").await.expect("release"));
        assert!(mem.read_owner_marker().await.expect("read").is_some());
    }

    #[tokio::test]
    async fn credentials_without_the_right_on_the_marker_write_unprotected_and_say_so() {
        let mem = Arc::new(Memory::new("x", 64));
        mem.refuse_prefix("memory:owners/", false);
        let claimed = Claimed::new(mem.clone(), "x", "uid");
        assert!(claimed.apply(&[]).await.is_ok(), "writes go on");
        let warning = claimed.warning().expect("a warning");
        assert!(
            warning.contains("not claimed") && warning.contains("memory:owners/x"),
            "{warning}"
        );
        assert!(mem.read_owner_marker().await.expect("read").is_none());
    }

    #[tokio::test]
    async fn a_marker_that_is_not_json_stops_writes_and_says_so() {
        let mem = Arc::new(Memory::new("x", 64));
        assert!(mem.create_owner_marker(b"garbage").await.expect("create"));
        let Err(e) = Claimed::new(mem, "x", "uid").apply(&[]).await else {
            panic!("written over an unreadable marker")
        };
        assert!(e.to_string().contains("garbage"), "{e}");
    }
}
