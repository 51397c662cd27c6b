//! The gate every writer and import waits at: open while this replica leads and every
//! Kubernetes cache has synced, so that nothing is planned from a partial view.

use anyhow::Result;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A gate that follows `leader ∧ synced` (`leader` `None`: always leading, for dry runs, which
/// plan as if they led without taking part in the election), and the task that keeps it so. The
/// task ends with an error when an input is gone.
pub fn gate(
    mut leader: Option<watch::Receiver<bool>>,
    mut synced: watch::Receiver<bool>,
) -> (watch::Receiver<bool>, JoinHandle<Result<()>>) {
    let (tx, gate) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let leads = leader.as_mut().is_none_or(|l| *l.borrow_and_update());
            let open = leads && *synced.borrow_and_update();
            tx.send_if_modified(|g| std::mem::replace(g, open) != open);
            tokio::select! {
                r = async { leader.as_mut()?.changed().await.ok() }, if leader.is_some() => {
                    r.ok_or_else(|| anyhow::anyhow!("the leader election ended"))?
                }
                r = synced.changed() => r?,
            }
        }
    });
    (gate, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn open(gate: &mut watch::Receiver<bool>, want: bool) {
        tokio::time::timeout(Duration::from_secs(5), gate.wait_for(|g| *g == want))
            .await
            .expect("in time")
            .expect("gate alive");
    }

    #[tokio::test]
    async fn open_while_leading_and_synced() {
        let (lead, leader) = watch::channel(false);
        let (sync, synced) = watch::channel(false);
        let (mut g, _task) = gate(Some(leader), synced);
        sync.send_replace(true);
        lead.send_replace(true);
        open(&mut g, true).await;
        lead.send_replace(false);
        open(&mut g, false).await;
    }

    #[tokio::test]
    async fn a_dry_run_leads_once_synced() {
        let (sync, synced) = watch::channel(false);
        let (mut g, _task) = gate(None, synced);
        sync.send_replace(true);
        open(&mut g, true).await;
    }
}
