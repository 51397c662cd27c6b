//! The desired-state loop's pulse: Kubernetes changes seen and not yet folded into desired
//! state, and when the loop last turned. `/healthz` fails when changes have waited for
//! [`STALLED_AFTER`] and the loop has not turned for as long: a replica whose loop is stuck
//! publishes nothing, and its Pod is better restarted.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::runtime::changed::Changed;

/// How long changes may wait, with the loop not turning, before the replica is unhealthy: 60
/// turns of the loop's 500 ms tick. Slow API calls inside one turn stay below it.
pub const STALLED_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Marks {
    /// The oldest change not yet taken.
    since: Option<Instant>,
    /// `None` until the loop's first turn: while the caches sync, `/readyz` speaks, not
    /// `/healthz` (a first list of 100,000 objects may take longer than a stall).
    last_turn: Option<Instant>,
    /// The objects changed since the last take.
    objects: Changed,
}

/// Changes seen but not yet folded into desired state, shared by the watches (which mark
/// them), the desired-state loop (which takes them) and `/healthz`.
#[derive(Debug, Default)]
pub struct Changes {
    notify: Notify,
    marks: Mutex<Marks>,
}

impl Changes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change was seen, with no word of which objects it touched: everything is read again.
    pub fn mark(&self) {
        self.lock().objects.all = true;
        self.wake();
    }

    /// An event of a watch of `kind` was seen: notes the object it changed and wakes the loop.
    pub fn mark_event<K: kube::Resource>(&self, kind: &str, ev: &kube::runtime::watcher::Event<K>) {
        self.lock().objects.note(kind, ev);
        self.wake();
    }

    fn wake(&self) {
        self.lock().since.get_or_insert_with(Instant::now);
        self.notify.notify_one();
    }

    /// A turn of the loop: takes the changes waiting, returning when the oldest was seen.
    pub fn take(&self) -> Option<Instant> {
        let mut m = self.lock();
        m.last_turn = Some(Instant::now());
        m.since.take()
    }

    /// Takes the objects changed since the last take.
    pub fn take_objects(&self) -> Changed {
        std::mem::take(&mut self.lock().objects)
    }

    /// Resolves at the next [`Changes::mark`] (or at once when one came since the last take).
    pub async fn marked(&self) {
        self.notify.notified().await;
    }

    /// How long the loop has not turned while changes waited, when that is past
    /// [`STALLED_AFTER`] at `now`.
    pub fn stalled_at(&self, now: Instant) -> Option<Duration> {
        let m = self.lock();
        let waiting = now.saturating_duration_since(m.since?);
        let idle = now.saturating_duration_since(m.last_turn?);
        (waiting >= STALLED_AFTER && idle >= STALLED_AFTER).then_some(idle)
    }

    /// [`Changes::stalled_at`] now.
    pub fn stalled(&self) -> Option<Duration> {
        self.stalled_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_only_when_changes_wait_and_the_loop_does_not_turn() {
        let c = Changes::default();
        let later = Instant::now() + STALLED_AFTER + Duration::from_secs(1);
        c.mark();
        assert_eq!(c.stalled_at(later), None, "not started: the caches sync");
        assert!(c.take().is_some());
        assert_eq!(c.stalled_at(later), None, "nothing waits: idle is healthy");
        c.mark();
        assert!(
            c.stalled_at(later).is_some(),
            "a change waits, the loop is stuck"
        );
        assert_eq!(c.stalled_at(Instant::now()), None, "not for long yet");
        assert!(c.take().is_some());
        assert_eq!(c.stalled_at(later), None, "the loop took it");
    }
}
