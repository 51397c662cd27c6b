//! Lease-based leader election: only the replica holding the Lease writes to catalogs; the
//! others keep their caches warm and take over when the Lease expires or is released.
//!
//! kube-lease-manager takes and renews the Lease, but its channel stays true while renewals
//! fail (a leader cut off from the API server would go on writing from frozen caches after
//! another replica took over). So this replica leads only while it has *seen* the Lease held
//! by itself with a renewal younger than the renew deadline, a fence shorter than the Lease
//! duration (client-go's `renewDeadline`): a leader that cannot renew stops writing before
//! another replica may take the Lease.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease as LeaseObject;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::options::Options;
use crate::k8s::stores::WatchBackoff;
use crate::runtime::Metrics;

/// The running election; [`Lease::release`] hands leadership over at shutdown.
pub struct Lease {
    channel: Option<watch::Receiver<bool>>,
    task: Option<JoinHandle<kube_lease_manager::Result<LeaseManager>>>,
    mirror: JoinHandle<()>,
    fence: JoinHandle<()>,
}

impl Lease {
    /// Stops renewing and frees the Lease so another replica takes over at once.
    pub async fn release(mut self) {
        self.mirror.abort();
        self.fence.abort();
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

/// How long after its last renewal a leader stops writing: two thirds of the Lease duration
/// (client-go: 10 s of 15), so it stops a third of the duration before another replica may
/// take the Lease; that third absorbs clock skew between replicas and a write in flight.
pub fn renew_deadline(duration: Duration) -> Duration {
    duration * 2 / 3
}

/// When the Lease renews: a third into its duration (kube-lease-manager renews `grace` before
/// expiry), which leaves a renewal that fails a third of the duration, and the manager's
/// retries (1 s apart at first), before the deadline.
fn grace_seconds(duration_seconds: u64) -> u64 {
    (duration_seconds - duration_seconds / 3).clamp(1, duration_seconds - 1)
}

/// Joins the election. The returned channel is true while this replica leads.
pub async fn elect(
    client: kube::Client,
    opts: &Options,
    metrics: Arc<Metrics>,
) -> Result<(watch::Receiver<bool>, Lease)> {
    let duration = opts.lease_duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client.clone(), &opts.lease_name)
        .with_namespace(&opts.lease_namespace)
        .with_identity(&opts.identity)
        .with_duration(duration)
        .with_grace(grace_seconds(duration))
        .build()
        .await
        .with_context(|| {
            format!(
                "preparing leader election on Lease {}/{}",
                opts.lease_namespace, opts.lease_name
            )
        })?;
    let (channel, task) = manager.watch().await;
    let deadline = renew_deadline(Duration::from_secs(duration));
    let (renewed_tx, renewed) = watch::channel(false);
    let fence = tokio::spawn(follow_renewals(
        Api::namespaced(client, &opts.lease_namespace),
        opts.lease_name.clone(),
        opts.identity.clone(),
        deadline,
        renewed_tx,
    ));
    let (tx, rx) = watch::channel(false);
    let mirror = tokio::spawn(mirror(
        channel.clone(),
        renewed,
        tx,
        opts.identity.clone(),
        deadline,
        metrics,
    ));
    Ok((
        rx,
        Lease {
            channel: Some(channel),
            task: Some(task),
            mirror,
            fence,
        },
    ))
}

/// Leads while the election says so and the fence is open; logs and counts every change.
async fn mirror(
    mut elected: watch::Receiver<bool>,
    mut renewed: watch::Receiver<bool>,
    tx: watch::Sender<bool>,
    identity: String,
    deadline: Duration,
    metrics: Arc<Metrics>,
) {
    metrics.set_leader(false);
    loop {
        let is_elected = *elected.borrow_and_update();
        let is_renewed = *renewed.borrow_and_update();
        let leading = is_elected && is_renewed;
        if tx.send_replace(leading) != leading {
            metrics.set_leader(leading);
            if leading {
                info!(%identity, "became the leader: writing to catalogs");
            } else if is_elected {
                warn!(%identity, ?deadline, "the leader Lease has not been renewed within the renew deadline: stopped writing to catalogs until it is");
            } else {
                info!(%identity, "not the leader: watching only");
            }
        }
        tokio::select! {
            r = elected.changed() => if r.is_err() { break },
            r = renewed.changed() => if r.is_err() { break },
        }
    }
    tx.send_replace(false);
    metrics.set_leader(false);
}

/// Keeps `renewed` true while the Lease, as last seen on the API server, is held by
/// `identity` and was renewed less than `deadline` ago. A replica cut off from the API server
/// sees no renewal, so its fence closes at the deadline whatever its election still believes.
async fn follow_renewals(
    api: Api<LeaseObject>,
    name: String,
    identity: String,
    deadline: Duration,
    renewed: watch::Sender<bool>,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut leases = std::pin::pin!(
        watcher(api, config)
            .backoff(WatchBackoff::default())
            .applied_objects()
    );
    let mut valid_until: Option<Instant> = None;
    let mut holder: Option<String> = None;
    loop {
        let expiry = async {
            match valid_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            next = leases.next() => match next {
                Some(Ok(lease)) => {
                    let spec = lease.spec.unwrap_or_default();
                    if spec.holder_identity != holder {
                        holder.clone_from(&spec.holder_identity);
                        info!("the leader Lease is held by {}", holder.as_deref().unwrap_or("nobody"));
                    }
                    let renewed_at = spec.renew_time.map(|t| SystemTime::from(t.0));
                    valid_until = fence_left(holder.as_deref(), &identity, renewed_at, deadline, SystemTime::now())
                        .map(|left| Instant::now() + left);
                }
                Some(Err(e)) => debug!(error = %e, "watching the leader Lease"),
                None => break,
            },
            () = expiry => valid_until = None,
        }
        let open = valid_until.is_some_and(|t| t > Instant::now());
        renewed.send_if_modified(|r| std::mem::replace(r, open) != open);
    }
    renewed.send_replace(false);
}

/// How much longer this replica may write after seeing the Lease held by `holder`, renewed at
/// `renewed_at`: none unless it is the holder and the renewal is younger than `deadline`.
/// `renewed_at` was written by this replica's own clock, so no skew enters here.
fn fence_left(
    holder: Option<&str>,
    identity: &str,
    renewed_at: Option<SystemTime>,
    deadline: Duration,
    now: SystemTime,
) -> Option<Duration> {
    if holder != Some(identity) {
        return None;
    }
    let age = now.duration_since(renewed_at?).unwrap_or(Duration::ZERO);
    deadline.checked_sub(age).filter(|left| !left.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(4);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + secs)
    }

    #[test]
    fn the_fence_is_open_for_the_holder_until_the_deadline_after_its_renewal() {
        assert_eq!(
            fence_left(Some("a"), "a", Some(at(0)), D, at(1)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(fence_left(Some("a"), "a", Some(at(0)), D, at(4)), None);
        assert_eq!(fence_left(Some("a"), "a", Some(at(0)), D, at(9)), None);
    }

    #[test]
    fn the_fence_is_closed_for_anyone_but_the_holder_and_without_a_renewal() {
        assert_eq!(fence_left(Some("b"), "a", Some(at(0)), D, at(0)), None);
        assert_eq!(fence_left(None, "a", Some(at(0)), D, at(0)), None);
        assert_eq!(fence_left(Some("a"), "a", None, D, at(0)), None);
    }

    #[test]
    fn a_renewal_stamped_ahead_of_the_clock_counts_from_now() {
        assert_eq!(fence_left(Some("a"), "a", Some(at(5)), D, at(4)), Some(D));
    }

    #[test]
    fn the_deadline_comes_before_the_lease_can_be_taken_and_after_the_renewal() {
        for secs in [2, 6, 15, 60] {
            let d = Duration::from_secs(secs);
            let renews_after = Duration::from_secs(secs - grace_seconds(secs));
            let deadline = renew_deadline(d);
            assert!(renews_after < deadline && deadline < d, "{secs}");
        }
    }
}
