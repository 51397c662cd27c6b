//! The configurations a writer replaced (an ExternalCatalog edited to write elsewhere): what
//! they own at their own locations is removed before this writer writes.

use tokio::task::JoinHandle;

use super::Writer;
use crate::backend::Backend;
use crate::export::retire::{self, Patience, Retiring};
use crate::model::BackendError;

/// A catalog's previous configurations, replaced by this writer's.
pub(super) struct Previous {
    pub(super) retiring: Retiring,
    /// The previous writer's task, stopped before anything is read through its backend.
    pub(super) stopped: Option<JoinHandle<()>>,
    /// How long each is tried (the old servers may be gone for good).
    pub(super) patience: Patience,
}

impl Writer {
    /// Removes what the previous configurations own at their locations, unless that is this
    /// configuration's location too. False when it should be tried again.
    pub(super) async fn retire_previous(&mut self) -> bool {
        let Some(prev) = self.previous.as_mut() else {
            return true;
        };
        if let Some(task) = prev.stopped.take() {
            // Told to stop by whoever handed it over: this waits until it has really stopped.
            let _ = task.await;
        }
        let retiring = prev.retiring.clone();
        if retire::first(&retiring).is_none() {
            self.previous = None;
            return true;
        }
        // Where this writer writes; while that is unknown (the new servers do not answer),
        // nothing is retired and the patience for the old ones does not run.
        let is = match self.backend.location().await {
            Ok(is) => is,
            Err(e) => {
                self.failed(&e);
                return false;
            }
        };
        // Out of `previous` while `retire` borrows the writer; put back if tried again.
        let fresh = Patience::new(self.cfg.retire_patience);
        let Some(mut patience) = self
            .previous
            .as_mut()
            .map(|p| std::mem::replace(&mut p.patience, fresh))
        else {
            return true;
        };
        let this = &*self;
        let result = retire::work_through(&retiring, &mut patience, &this.cfg.catalog, |old| {
            let is = &is;
            async move { this.retire(old.as_ref(), is).await }
        })
        .await;
        self.left_behind.append(&mut patience.gave_up);
        if let Err(e) = result {
            if let Some(p) = self.previous.as_mut() {
                p.patience = patience;
            }
            self.failed(&e);
            return false;
        }
        self.previous = None;
        true
    }

    /// Removes what `old` owns, if it writes somewhere else than this writer (at `is`).
    async fn retire(&self, old: &dyn Backend, is: &str) -> Result<(), BackendError> {
        // The same addresses, layout and place: only credentials (or TLS material) changed, and
        // the old ones may be the very reason for the change (refused): nothing to ask them.
        if old.describe() == self.backend.describe() {
            return Ok(());
        }
        let was = old.location().await?;
        if was == is {
            return Ok(());
        }
        let why = format!("the catalog moved to {is}");
        retire::remove_all(
            old,
            &self.cfg.catalog,
            &why,
            &self.metrics,
            self.cfg.dry_run,
        )
        .await
    }
}
