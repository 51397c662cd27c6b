//! Lease-based leader election: only the replica holding the Lease writes to catalogs; the
//! others keep their caches warm and take over when the Lease expires or is released.

use std::sync::Arc;

use anyhow::{Context, Result};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::options::Options;
use crate::runtime::Metrics;

/// The running election; [`Lease::release`] hands leadership over at shutdown.
pub struct Lease {
    channel: Option<watch::Receiver<bool>>,
    task: Option<JoinHandle<kube_lease_manager::Result<LeaseManager>>>,
    mirror: JoinHandle<()>,
}

impl Lease {
    /// Stops renewing and frees the Lease so another replica takes over at once.
    pub async fn release(mut self) {
        self.mirror.abort();
        drop(self.channel.take());
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(manager)) => {
                    if let Err(e) = manager.release().await {
                        warn!(error = %e, "releasing the leader Lease failed");
                    } else {
                        info!("leader Lease released");
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "leader election ended with an error"),
                Err(e) => warn!(error = %e, "leader election task failed"),
            }
        }
    }
}

/// Joins the election. The returned channel is true while this replica leads.
pub async fn elect(
    client: kube::Client,
    opts: &Options,
    metrics: Arc<Metrics>,
) -> Result<(watch::Receiver<bool>, Lease)> {
    let duration = opts.lease_duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client, &opts.lease_name)
        .with_namespace(&opts.lease_namespace)
        .with_identity(&opts.identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .build()
        .await
        .with_context(|| {
            format!(
                "preparing leader election on Lease {}/{}",
                opts.lease_namespace, opts.lease_name
            )
        })?;
    let (channel, task) = manager.watch().await;
    let (tx, rx) = watch::channel(false);
    let mut inner = channel.clone();
    let identity = opts.identity.clone();
    let mirror = tokio::spawn(async move {
        loop {
            let leading = *inner.borrow_and_update();
            if tx.send_replace(leading) != leading {
                metrics.set_leader(leading);
                if leading {
                    info!(%identity, "became the leader: writing to catalogs");
                } else {
                    info!(%identity, "not the leader: watching only");
                }
            }
            if inner.changed().await.is_err() {
                tx.send_replace(false);
                return;
            }
        }
    });
    Ok((
        rx,
        Lease {
            channel: Some(channel),
            task: Some(task),
            mirror,
        },
    ))
}
