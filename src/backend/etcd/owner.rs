//! The owner marker in etcd (`backend::claim`): the key `/catalog-bridge.io/owners/<owner id>`
//! (beside the lease markers, outside every layout's prefix; no lease: it outlives the
//! controller), created in a transaction on `create_revision == 0` (only while it does not
//! exist), deleted in one on `mod_revision` (only if unchanged since read). Needs a role with
//! read-write on `/catalog-bridge.io/owners/`.

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::Etcd;
use crate::backend::BackendError;
use crate::backend::claim::{MarkerStore, StoredMarker};

/// Where owner markers live: `<OWNERS_PREFIX><owner>`.
pub const OWNERS_PREFIX: &str = "/catalog-bridge.io/owners/";

impl Etcd {
    fn owner_key(&self) -> String {
        format!("{OWNERS_PREFIX}{}", self.inner.owner)
    }

    fn require_marker_owner(&self) -> Result<(), BackendError> {
        if self.inner.owner.is_empty() {
            return Err(BackendError::Rejected(
                "this etcd client has no owner id: it has no owner marker".into(),
            ));
        }
        Ok(())
    }

    fn require_writable(&self) -> Result<(), BackendError> {
        if self.inner.read_only {
            return Err(BackendError::Rejected(
                "this etcd client is read only: it writes no owner marker".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl MarkerStore for Etcd {
    fn owner_marker(&self) -> String {
        format!("etcd key {}", self.owner_key())
    }

    async fn read_owner_marker(&self) -> Result<Option<StoredMarker>, BackendError> {
        self.require_marker_owner()?;
        let key = self.owner_key();
        let got = self
            .inner
            .conn
            .call("reading the owner marker", move |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(got.kvs().first().map(|kv| StoredMarker {
            value: kv.value().to_vec(),
            version: kv.mod_revision(),
        }))
    }

    async fn create_owner_marker(&self, value: &[u8]) -> Result<bool, BackendError> {
        self.require_marker_owner()?;
        self.require_writable()?;
        let (key, value) = (self.owner_key(), value.to_vec());
        let r = self
            .inner
            .conn
            .call("creating the owner marker", move |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(r.succeeded())
    }

    async fn delete_owner_marker(&self, version: i64) -> Result<bool, BackendError> {
        self.require_marker_owner()?;
        self.require_writable()?;
        let key = self.owner_key();
        let r = self
            .inner
            .conn
            .call("deleting the owner marker", move |mut c| {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        version,
                    )])
                    .and_then([TxnOp::delete(key.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(r.succeeded())
    }
}
