//! Handing the sessions over to the next leader: a replica that stops writing lets them go
//! without closing them ([`ZooKeeper::release`]), or keeps them alive until the new leader
//! takes them ([`ZooKeeper::pause`]).

use std::sync::Arc;

use zookeeper_client as zk;

use super::{Inner, ZooKeeper};
use crate::backend::BackendError;

impl Inner {
    /// Ends a [`ZooKeeper::pause`]: the sessions are used again, or the backend is gone.
    pub(super) fn unpause(&self) {
        let paused = self.paused.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = paused {
            t.abort();
        }
    }
}

impl ZooKeeper {
    /// Stops using the sessions but keeps them alive, for a replica that stops writing while
    /// its leadership is in doubt (it cannot renew its Lease: the API server may be down for
    /// every replica, and the sessions' ephemeral nodes must outlive that) or lost. The
    /// connections stay until the first disconnection of any of them — the new leader
    /// re-attaching takes a session, and ZooKeeper closes this replica's connection of it —
    /// and the sessions are then let go as by [`Self::release`], so the two never take them
    /// from each other. Using the backend again ends the pause.
    pub async fn pause(&self) {
        let live = self.inner.live().await;
        if live.is_empty() {
            return;
        }
        let states: Vec<zk::StateWatcher> = live.iter().map(|c| c.client.state_watcher()).collect();
        drop(live);
        let inner = Arc::downgrade(&self.inner);
        let watch = tokio::spawn(async move {
            let disconnected = states.into_iter().map(|mut state| {
                Box::pin(async move {
                    loop {
                        let s = state.changed().await;
                        if !matches!(
                            s,
                            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
                        ) {
                            return s;
                        }
                    }
                })
            });
            let (s, _, _) = futures::future::select_all(disconnected).await;
            tracing::info!(state = %s, "ZooKeeper connection lost while not writing: letting the sessions go for the leader to re-attach to");
            if let Some(inner) = inner.upgrade() {
                inner.let_go().await;
            }
        });
        let old = self
            .inner
            .paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(watch);
        if let Some(t) = old {
            t.abort();
        }
    }

    /// Lets the sessions go without closing them: for a replica that stops writing (it lost
    /// leadership) while another takes them over. ZooKeeper moves a session to the connection
    /// that re-attached last and closes the others, so two live clients of one session would
    /// take it from each other endlessly; after `release` this one stays away until it is
    /// used again (and then re-attaches to the stored sessions).
    pub async fn release(&self) {
        self.inner.unpause();
        self.inner.let_go().await;
    }

    /// The id of the session of shard 0, establishing it if needed.
    pub async fn session_id(&self) -> Result<i64, BackendError> {
        Ok(self.inner.conn().await?.session.id)
    }

    /// The ids of the sessions of every shard, shard 0 first, establishing them if needed.
    pub async fn session_ids(&self) -> Result<Vec<i64>, BackendError> {
        Ok(self
            .inner
            .conns()
            .await?
            .iter()
            .map(|c| c.session.id)
            .collect())
    }
}
