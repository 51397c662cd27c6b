//! Writing a plan: started in a task of its own (so that the next step is prepared
//! meanwhile), then taken in: the owned state, the metrics, the exports held back.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio::task::JoinHandle;
use tracing::warn;

use super::Writer;
use crate::export::isolate::{self, Outcome};
use crate::export::plan::{Plan, apply_to};
use crate::model::{BackendError, Digest, Op};

/// A plan being written by a task of its own; the task stops when this is dropped (the writer
/// stopped), as the write would if it were awaited in place.
pub(super) struct Sending {
    planned: [(&'static str, usize); 2],
    task: JoinHandle<Outcome>,
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one sync wrote, over its steps.
#[derive(Default)]
pub(super) struct Totals {
    pub(super) plan: Plan,
    pub(super) sent: usize,
    pub(super) written: usize,
    pub(super) refused: usize,
    pub(super) waiting: usize,
    pub(super) requests: usize,
    pub(super) round_trips: usize,
}

impl Writer {
    /// Starts writing `p` (grouped by export) in a task of its own, so that the next step is
    /// prepared meanwhile.
    pub(super) fn send(&self, p: Plan, done: &mut Totals) -> Sending {
        let puts = (p.ops.iter())
            .filter(|op| matches!(op, Op::Put { .. }))
            .count();
        let planned = [("put", puts), ("delete", p.ops.len() - puts)];
        done.plan.creates += p.creates;
        done.plan.updates += p.updates;
        done.plan.deletes += p.deletes;
        done.sent += 1;
        let groups = isolate::groups(p.ops, |op| self.unit_of(op));
        let backend = self.backend.clone();
        Sending {
            planned,
            task: tokio::spawn(async move { isolate::apply(backend.as_ref(), groups).await }),
        }
    }

    /// Waits for what `s` writes and takes it in: `current`, the metrics, the exports held
    /// back. The failure that stopped it, if any (the owned state is then read again).
    pub(super) async fn landed(
        &mut self,
        current: &mut BTreeMap<String, Digest>,
        mut s: Sending,
        done: &mut Totals,
    ) -> Result<(), BackendError> {
        let outcome = match (&mut s.task).await {
            Ok(o) => o,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(BackendError::Protocol(format!("writing: {e}"))),
        };
        self.count(s.planned, &outcome);
        apply_to(current, &outcome.written);
        self.desired_records.forget(
            (outcome.written.iter())
                .filter(|op| matches!(op, Op::Delete { .. }))
                .map(Op::key),
        );
        self.held.record(
            &outcome.written,
            &outcome.refused,
            Instant::now(),
            (self.cfg.min_backoff, self.cfg.max_backoff),
        );
        self.metrics
            .refused_exports(&self.cfg.catalog, self.held.len() as i64);
        for (unit, (ops, e)) in &outcome.refused {
            warn!(catalog = %self.cfg.catalog, export = %unit, operations = ops.len(), error = %e, "the catalog refused the writes of one export; the others are written and it is tried again on its own");
        }
        done.written += outcome.written.len();
        done.refused += (outcome.refused.values())
            .map(|(o, _)| o.len())
            .sum::<usize>();
        done.requests += outcome.requests;
        done.round_trips += outcome.round_trips;
        if let Some(e) = outcome.stopped {
            // Some batches may have been committed: re-read before the next plan.
            self.current = None;
            self.trusted = false;
            return Err(e);
        }
        Ok(())
    }

    /// The metrics of an apply of `ops`: operations by kind and result (`ok`, `refused`, and
    /// `error` for what an outage left unwritten), round trips.
    fn count(&self, planned: [(&str, usize); 2], o: &Outcome) {
        let label = &self.cfg.catalog;
        let kind = |op: &Op| match op {
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
        };
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let done = o.written.iter().map(|op| (op, "ok")).chain(
            o.refused
                .values()
                .flat_map(|(r, _)| r.iter().map(|op| (op, "refused"))),
        );
        for (op, result) in done {
            *counts.entry((kind(op), result)).or_default() += 1;
        }
        for (op, total) in planned {
            let done: u64 = ["ok", "refused"]
                .iter()
                .filter_map(|r| counts.get(&(op, *r)))
                .sum();
            counts.insert((op, "error"), (total as u64).saturating_sub(done));
        }
        for ((op, result), n) in counts {
            self.metrics.operations(label, op, result, n);
        }
        let failed = u64::from(o.stopped.is_some());
        let refused = o.refusals as u64;
        let ok = (o.round_trips as u64).saturating_sub(failed + refused);
        for (result, n) in [("ok", ok), ("refused", refused), ("error", failed)] {
            if n > 0 {
                self.metrics.round_trips(label, result, n);
            }
        }
    }
}
