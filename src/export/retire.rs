//! Retiring what a catalog wrote: the entries at a location the catalog moved away from, and
//! those of a deleted ExternalCatalog ([`drain`]), removed before anything else is written,
//! with a patience of 30 s of failures before giving up on a place that is gone for good.
//! [`remove_owned`] also serves `catalog-bridge cleanup`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::backend::Backend;
use crate::export::plan::plan;
use crate::model::{BackendError, Op};
use crate::runtime::{Backoff, Metrics};

/// Backends of a catalog's previous configurations whose entries were not yet removed, oldest
/// first; shared with the controller, which hands what is left to the next writer.
pub type Retiring = Arc<std::sync::Mutex<Vec<Arc<dyn Backend>>>>;

/// How long a writer keeps trying to remove the entries of its catalog's previous location
/// before going on without (they then stay until removed by hand; etcd keys and ZooKeeper
/// nodes also expire unless their lease or session is still kept).
pub const RETIRE_PATIENCE: Duration = Duration::from_secs(30);

/// What a cleanup found and removed.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub removed: usize,
    pub round_trips: usize,
    /// What the backend removed besides the entries (Consul's node once empty).
    pub retired: Option<String>,
}

/// Deletes every entry `backend` owns, then what held them once empty ([`Backend::retire`]:
/// Consul's node). With `dry_run`, only counts them. Used by `cleanup`, and by the writer of a
/// catalog that was deleted or moved elsewhere.
pub async fn remove_owned(backend: &dyn Backend, dry_run: bool) -> Result<Outcome, BackendError> {
    let owned = backend.read_owned().await?;
    let ops: Vec<Op> = plan(&Default::default(), &owned).ops;
    if dry_run {
        return Ok(Outcome {
            removed: ops.len(),
            round_trips: 0,
            retired: None,
        });
    }
    let round_trips = backend.apply(&ops).await?;
    let retired = backend.retire().await?;
    Ok(Outcome {
        removed: ops.len(),
        round_trips,
        retired,
    })
}

/// Removes every entry `old` owns, counting and logging it; `why` says what happened to the
/// catalog.
pub async fn remove_all(
    old: &dyn Backend,
    catalog: &str,
    why: &str,
    metrics: &Metrics,
    dry_run: bool,
) -> Result<(), BackendError> {
    let was = old.describe();
    let out = remove_owned(old, dry_run).await?;
    if dry_run {
        info!(catalog = %catalog, at = %was, entries = out.removed, "dry run: {why}; would remove its entries at {was}");
        return Ok(());
    }
    metrics.operations(catalog, "delete", "ok", out.removed as u64);
    metrics.round_trips(catalog, "ok", out.round_trips as u64);
    info!(catalog = %catalog, at = %was, removed = out.removed, retired = ?out.retired, "{why}: its entries at {was} are removed");
    Ok(())
}

/// What is left of a deleted ExternalCatalog's writer: `stopped` (its task, told to stop) is
/// awaited, and once this replica leads, every entry the backends in `retiring` own (the
/// catalog's own backend last) is removed, then Consul's node once empty. Retried with backoff for
/// [`RETIRE_PATIENCE`] of failures while leading; paused while not leading.
pub async fn drain(
    catalog: String,
    retiring: Retiring,
    stopped: Option<JoinHandle<()>>,
    mut gate: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    dry_run: bool,
) -> anyhow::Result<()> {
    // Told to stop when it was handed over: this waits until it has really stopped.
    if let Some(stopped) = stopped {
        let _ = stopped.await;
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    // What is given up on is only logged: the ExternalCatalog is gone.
    let mut patience = Patience::new(RETIRE_PATIENCE);
    let why = "the ExternalCatalog was deleted";
    loop {
        if !*gate.borrow_and_update() {
            // Not leading: the patience starts again when this replica leads.
            patience.give_up_at = None;
            if gate.changed().await.is_err() {
                return Ok(());
            }
            continue;
        }
        let removed = work_through(&retiring, &mut patience, &catalog, |old| {
            let (catalog, metrics) = (&catalog, &metrics);
            async move { remove_all(old.as_ref(), catalog, why, metrics, dry_run).await }
        })
        .await;
        let Err(e) = removed else {
            return Ok(());
        };
        warn!(catalog = %catalog, error = %e, reason = %e.reason(), "removing the entries of a deleted ExternalCatalog failed; retrying");
        tokio::select! {
            () = backoff.wait() => {}
            r = gate.changed() => if r.is_err() { return Ok(()) },
        }
    }
}

/// How long [`work_through`] keeps trying one backend, and the backends it gave up on.
pub struct Patience {
    after: Duration,
    /// Set at the first failure of the backend being tried; cleared when it is done, or when
    /// this replica stops leading (the time out of office does not count).
    pub give_up_at: Option<Instant>,
    /// Where and why, one per backend given up on.
    pub gave_up: Vec<String>,
}

impl Patience {
    pub fn new(after: Duration) -> Patience {
        Patience {
            after,
            give_up_at: None,
            gave_up: Vec::new(),
        }
    }
}

/// Works through `retiring`, oldest first: `remove` what each backend owns, let go of what
/// it attached to (a ZooKeeper session), take it off the list. A failure ends the pass (to be
/// tried again) until `patience.after` the first failure of that backend; then that backend
/// is given up on, with a warning, and noted in `patience.gave_up`.
pub async fn work_through<F, Fut>(
    retiring: &Retiring,
    patience: &mut Patience,
    catalog: &str,
    mut remove: F,
) -> Result<(), BackendError>
where
    F: FnMut(Arc<dyn Backend>) -> Fut,
    Fut: std::future::Future<Output = Result<(), BackendError>>,
{
    while let Some(old) = first(retiring) {
        if let Err(e) = remove(old.clone()).await {
            old.release().await;
            let after = patience.after;
            if Instant::now() < *patience.give_up_at.get_or_insert(Instant::now() + after) {
                return Err(e);
            }
            warn!(catalog = %catalog, error = %e, at = %old.describe(), "giving up removing this catalog's entries there; `catalog-bridge cleanup --catalog` on an ExternalCatalog with that spec removes them");
            patience.gave_up.push(format!("{}: {e}", old.describe()));
        }
        old.release().await;
        done(retiring, &old);
        patience.give_up_at = None;
    }
    Ok(())
}

/// Lets go of what every backend in `retiring` attached to.
pub async fn release_all(retiring: &Retiring) {
    let list: Vec<Arc<dyn Backend>> = retiring.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for b in list {
        b.release().await;
    }
}

/// Empties `retiring`, returning what it held (for the writer that takes over).
pub fn take_all(retiring: &Retiring) -> Vec<Arc<dyn Backend>> {
    std::mem::take(&mut *retiring.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The oldest backend still to retire.
pub fn first(retiring: &Retiring) -> Option<Arc<dyn Backend>> {
    retiring
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .first()
        .cloned()
}

/// `old` is retired: off the list (unless the list was taken over meanwhile).
fn done(retiring: &Retiring, old: &Arc<dyn Backend>) {
    let mut list = retiring.lock().unwrap_or_else(|e| e.into_inner());
    if list.first().is_some_and(|b| Arc::ptr_eq(b, old)) {
        list.remove(0);
    }
}
