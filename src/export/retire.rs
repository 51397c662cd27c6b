//! Retiring what a catalog wrote: the entries at a location the catalog moved away from, and
//! those of a deleted ExternalCatalog ([`drain`]), removed before anything else is written.
//! A deleted ExternalCatalog held by the finalizer is retried until its entries are removed
//! (or the catalog is abandoned), and only then let go; other places are given up on after 30 s
//! of failures. [`remove_owned`] also serves `catalog-bridge cleanup`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::api::crd::ExternalCatalog;
use crate::api::labels::{ANNOTATION_ABANDON, holds_finalizer, is_abandoned};
use crate::backend::Backend;
use crate::export::plan::plan;
use crate::k8s::finalizers::Finalizers;
use crate::model::{BackendError, Op, Reason};
use crate::runtime::{Backoff, Metrics};

/// Backends of a catalog's previous configurations whose entries were not yet removed, oldest
/// first; shared with the controller, which hands what is left to the next writer.
pub type Retiring = Arc<std::sync::Mutex<Vec<Arc<dyn Backend>>>>;

/// How long a writer keeps trying to remove the entries of its catalog's previous location
/// before going on without (they then stay until removed by hand; etcd keys and ZooKeeper
/// nodes also expire unless their lease or session is still kept). A deleted ExternalCatalog
/// that its finalizer still holds is tried for as long as it takes.
pub const RETIRE_PATIENCE: Duration = Duration::from_secs(30);

/// How long counting what an abandoned catalog leaves behind may take.
const COUNT_PATIENCE: Duration = Duration::from_secs(5);

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

/// Where the removal of a deleted catalog's entries stands, for its status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Removal {
    /// Entries left there, as last counted; `None` while not counted.
    pub entries: Option<usize>,
    /// Where they are ([`Backend::describe`]).
    pub at: String,
    /// Why the last attempt failed.
    pub error: Option<BackendError>,
}

/// What a deleted ExternalCatalog's drain works with.
#[derive(Clone)]
pub struct Drain {
    pub catalog: String,
    /// What is left to remove, oldest first (the catalog's own backend last).
    pub retiring: Retiring,
    pub gate: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    pub dry_run: bool,
    /// The ExternalCatalog as the watch shows it now; `None` once it is gone.
    pub object: watch::Receiver<Option<Arc<ExternalCatalog>>>,
    /// The ExternalCatalog as last seen: its annotation says whether it is abandoned.
    pub last_seen: Option<Arc<ExternalCatalog>>,
    /// Lifts the finalizer once the entries are removed; `None` in a dry run, which writes
    /// nothing to Kubernetes.
    pub finalizers: Option<Arc<dyn Finalizers>>,
    pub progress: Arc<watch::Sender<Removal>>,
}

/// What is left of a deleted ExternalCatalog's writer: `stopped` (its task, told to stop) is
/// awaited, and once this replica leads, every entry the backends in `d.retiring` own (the
/// catalog's own backend last) is removed, then Consul's node once empty, and then the
/// finalizer is lifted. While the finalizer holds the object this is retried with backoff for as
/// long as it takes (the object's `Ready` says why); an object already gone is given up on after
/// [`RETIRE_PATIENCE`] of failures. With the annotation `catalog-bridge.io/abandon: "true"` the
/// entries are left where they are, said so (log and Event), and the object is let go. Paused
/// while not leading.
pub async fn drain(mut d: Drain, stopped: Option<JoinHandle<()>>) -> anyhow::Result<()> {
    // Told to stop when it was handed over: this waits until it has really stopped.
    if let Some(stopped) = stopped {
        let _ = stopped.await;
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut patience = Patience::new(RETIRE_PATIENCE);
    let why = "the ExternalCatalog was deleted";
    loop {
        if !*d.gate.borrow_and_update() {
            // Not leading: the patience starts again when this replica leads.
            patience.give_up_at = None;
            if d.gate.changed().await.is_err() {
                return Ok(());
            }
            continue;
        }
        let now = d.object.borrow_and_update().clone();
        if let Some(o) = &now {
            d.last_seen = Some(o.clone());
        }
        let held = d.finalizers.is_some()
            && now
                .as_ref()
                .is_some_and(|o| holds_finalizer(o.metadata.finalizers.as_ref()));
        // Held: no giving up, the object waits and says why.
        patience.after = (!held).then_some(RETIRE_PATIENCE);
        let outcome = if d
            .last_seen
            .as_ref()
            .is_some_and(|o| is_abandoned(o.metadata.annotations.as_ref()))
        {
            abandon(&d, now.as_deref()).await
        } else {
            // Abandoned while an attempt waits on a catalog that does not answer: let go at once.
            let mut object = d.object.clone();
            let abandoned = async move {
                let seen = object.wait_for(|o| {
                    o.as_ref()
                        .is_some_and(|o| is_abandoned(o.metadata.annotations.as_ref()))
                });
                if seen.await.is_err() {
                    // Nobody reports the object any more: nothing will abandon it.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                r = remove_then_let_go(&d, &mut patience, why, held.then_some(now).flatten()) => r,
                () = abandoned => continue,
            }
        };
        let Err(e) = outcome else {
            return Ok(());
        };
        warn!(catalog = %d.catalog, error = %format!("{e:#}"), "removing the entries of a deleted ExternalCatalog failed; retrying");
        tokio::select! {
            () = backoff.wait() => {}
            r = d.gate.changed() => if r.is_err() { return Ok(()) },
            r = d.object.changed() => if r.is_err() { return Ok(()) },
        }
    }
}

/// Removes what the drain's backends own, then lifts the finalizer from `held` (the object,
/// when the finalizer holds it).
async fn remove_then_let_go(
    d: &Drain,
    patience: &mut Patience,
    why: &str,
    held: Option<Arc<ExternalCatalog>>,
) -> anyhow::Result<()> {
    let removed = work_through(&d.retiring, patience, &d.catalog, |old| {
        let (catalog, metrics, dry_run) = (&d.catalog, &d.metrics, d.dry_run);
        d.progress.send_modify(|p| {
            if p.at != old.describe() {
                *p = Removal {
                    at: old.describe(),
                    ..Default::default()
                };
            }
        });
        async move { remove_all(old.as_ref(), catalog, why, metrics, dry_run).await }
    })
    .await;
    if let Err(e) = removed {
        d.progress.send_modify(|p| p.error = Some(e.clone()));
        return Err(anyhow::Error::new(e).context(format!(
            "its entries stay until they are removed, or until the annotation {ANNOTATION_ABANDON}=\"true\" lets it go"
        )));
    }
    d.progress.send_modify(|p| {
        p.entries = Some(0);
        p.error = None;
    });
    if let (Some(f), Some(o)) = (&d.finalizers, held) {
        f.remove(&o).await?;
        info!(catalog = %d.catalog, "its entries are removed: the ExternalCatalog goes");
    }
    Ok(())
}

/// Lets a deleted catalog go without removing its entries: counts what stays behind (or says
/// it could not), logs it, announces it on the object and lifts the finalizer.
async fn abandon(d: &Drain, now: Option<&ExternalCatalog>) -> anyhow::Result<()> {
    let list: Vec<Arc<dyn Backend>> = d.retiring.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let known = d.progress.borrow().entries;
    let mut left = Vec::new();
    for (i, b) in list.iter().enumerate() {
        let counted = match tokio::time::timeout(COUNT_PATIENCE, b.read_owned()).await {
            Ok(Ok(owned)) => Some(owned.len()),
            // The catalog's own backend is last: its writer counted it.
            _ => known.filter(|_| i + 1 == list.len()),
        };
        b.release().await;
        let stays = match b.kind() {
            "etcd" => "until their lease expires (leaseTTLSeconds)",
            "zookeeper" => "until their session times out (sessionTimeoutSeconds)",
            _ => "until removed by hand",
        };
        left.push(match counted {
            Some(n) => format!("{n} entries at {} stay {stays}", b.describe()),
            None => format!(
                "an unknown number of entries at {} (it did not answer) stay {stays}",
                b.describe()
            ),
        });
    }
    let note = format!(
        "abandoned ({ANNOTATION_ABANDON}): let go without removing its entries: {}",
        if left.is_empty() {
            "nothing was left to remove".to_string()
        } else {
            left.join("; ")
        }
    );
    if d.dry_run {
        info!(catalog = %d.catalog, "dry run: would be {note}");
        return Ok(());
    }
    warn!(catalog = %d.catalog, "{note}");
    if let (Some(f), Some(o)) = (&d.finalizers, now) {
        f.announce(o, Reason::Abandoned, &note).await;
        f.remove(o).await?;
        info!(catalog = %d.catalog, name = %o.name_any(), "the abandoned ExternalCatalog goes");
    }
    Ok(())
}

/// How long [`work_through`] keeps trying one backend, and the backends it gave up on.
pub struct Patience {
    /// `None`: never give up.
    pub after: Option<Duration>,
    /// Set at the first failure of the backend being tried; cleared when it is done, or when
    /// this replica stops leading (the time out of office does not count).
    pub give_up_at: Option<Instant>,
    /// Where and why, one per backend given up on.
    pub gave_up: Vec<String>,
}

impl Patience {
    pub fn new(after: Duration) -> Patience {
        Patience {
            after: Some(after),
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
            let Some(after) = patience.after else {
                return Err(e);
            };
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
