//! The owner marker in ZooKeeper (`backend::claim`): the persistent node
//! `<chroot>/catalog-bridge/owners/<owner id>`, outside every layout's base path, created with
//! `create` (which fails when it exists) and deleted at the data version read. With digest
//! auth its ACL lets only this controller's identity change it (world: read), and its parents
//! get the directories' ACL (this identity: all; world: read and create), so that only the
//! identity that made `owners` may delete a marker in it; without, what every unauthenticated
//! client writes.

use async_trait::async_trait;
use zookeeper_client as zk;

use super::ZooKeeper;
use super::layout::ancestors;
use crate::backend::BackendError;
use crate::backend::claim::{MarkerStore, StoredMarker};

/// Where owner markers live, under the chroot.
pub const OWNERS_DIR: &str = "/catalog-bridge/owners";

impl ZooKeeper {
    /// The chroot of the connect string ("" without one).
    fn chroot(&self) -> &str {
        let (root, base) = (&self.inner.root, &self.inner.base);
        root.strip_suffix(base.as_str()).unwrap_or("")
    }

    fn owner_path(&self) -> String {
        format!("{}{OWNERS_DIR}/{}", self.chroot(), self.inner.owner)
    }

    fn marker_checks(&self, write: bool) -> Result<(), BackendError> {
        if !self.inner.has_owner() || self.inner.owner.contains('/') {
            return Err(BackendError::Rejected(format!(
                "owner id {:?}: no ZooKeeper owner marker for it (empty, or with a '/')",
                self.inner.owner
            )));
        }
        if write && self.inner.read_only {
            return Err(BackendError::Rejected(
                "this ZooKeeper client is read only: it writes no owner marker".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl MarkerStore for ZooKeeper {
    fn owner_marker(&self) -> String {
        format!("ZooKeeper node {}", self.owner_path())
    }

    async fn read_owner_marker(&self) -> Result<Option<StoredMarker>, BackendError> {
        self.marker_checks(false)?;
        let conn = self.inner.conn().await?;
        let path = self.owner_path();
        match conn.client.get_data(&path).await {
            Ok((value, stat)) => Ok(Some(StoredMarker {
                value,
                version: i64::from(stat.version),
            })),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(self
                .inner
                .error(&format!("reading {path}"), &e, Some(&conn.proxy))),
        }
    }

    async fn create_owner_marker(&self, value: &[u8]) -> Result<bool, BackendError> {
        self.marker_checks(true)?;
        let conn = self.inner.conn().await?;
        let path = self.owner_path();
        let marker = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&self.inner.entry_acls));
        let dir = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&self.inner.parent_acls));
        let error = |what: &str, e: &zk::Error| self.inner.error(what, e, Some(&conn.proxy));
        for first in [true, false] {
            match conn.client.create(&path, value, &marker).await {
                Ok(_) => return Ok(true),
                Err(zk::Error::NodeExists) => return Ok(false),
                Err(zk::Error::NoNode) if first => {
                    // The chroot too, as the entries' directories are made.
                    for p in ancestors(&path) {
                        match conn.client.create(&p, &[], &dir).await {
                            Ok(_) | Err(zk::Error::NodeExists) => {}
                            Err(e) => return Err(error(&format!("creating {p}"), &e)),
                        }
                    }
                }
                Err(e) => return Err(error(&format!("creating {path}"), &e)),
            }
        }
        Err(BackendError::Protocol(format!(
            "creating {path}: its directory is gone again"
        )))
    }

    async fn delete_owner_marker(&self, version: i64) -> Result<bool, BackendError> {
        self.marker_checks(true)?;
        let conn = self.inner.conn().await?;
        let path = self.owner_path();
        let version = i32::try_from(version)
            .map_err(|_| BackendError::Protocol(format!("{path}: version {version}")))?;
        match conn.client.delete(&path, Some(version)).await {
            Ok(()) => Ok(true),
            Err(zk::Error::NoNode | zk::Error::BadVersion) => Ok(false),
            Err(e) => Err(self
                .inner
                .error(&format!("deleting {path}"), &e, Some(&conn.proxy))),
        }
    }
}
