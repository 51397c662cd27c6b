//! Supervision of the tasks that serve one object each (a catalog's writer, an import, the
//! drain of a deleted catalog): a task that panics, or ends with an error, is started again
//! after a backoff, counted in `catalog_bridge_task_restarts_total{task}` and reported in a
//! [`TaskState`] that the object's status shows. A task that ends with `Ok` has finished on
//! purpose (its inputs closed) and is not started again.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Backoff, Metrics};

/// The kinds of supervised task: the `task` label of the restarts metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// The writer of one ExternalCatalog.
    Writer,
    /// One import registration.
    Import,
    /// The removal of a deleted ExternalCatalog's entries.
    Drain,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Writer => "writer",
            TaskKind::Import => "import",
            TaskKind::Drain => "drain",
        }
    }
}

/// What the supervisor knows of its task, for the status of the object it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskState {
    /// Times the task stopped unexpectedly and was started again.
    pub restarts: u32,
    /// Why it stopped the last time: a panic's message, or the error it ended with.
    pub last_failure: Option<String>,
    /// Stopped, and waiting to be started again: meanwhile nothing serves the object.
    pub down: bool,
}

/// A task restarted after the pause of the backoff: 200 ms, doubling up to 30 s; a task that
/// ran this long before it failed starts again after the shortest pause.
const RESTART_MIN: Duration = Duration::from_millis(200);
const RESTART_MAX: Duration = Duration::from_secs(30);
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// A supervised task. Dropping it stops the task (its stop channel closes);
/// [`Supervised::stop`] also says when it has really stopped.
pub struct Supervised {
    stop: watch::Sender<bool>,
    state: watch::Receiver<TaskState>,
    handle: JoinHandle<()>,
}

impl Supervised {
    /// Runs the future `make` returns under supervision, and a new one from `make` after each
    /// failure. `name` identifies the object it serves, in logs.
    pub fn spawn<F, Fut>(kind: TaskKind, name: String, metrics: Arc<Metrics>, make: F) -> Supervised
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        metrics.task_supervised(kind.as_str());
        let (stop, stop_rx) = watch::channel(false);
        let (state_tx, state) = watch::channel(TaskState::default());
        let handle = tokio::spawn(supervise(kind, name, metrics, make, stop_rx, state_tx));
        Supervised {
            stop,
            state,
            handle,
        }
    }

    /// The task's state now.
    pub fn state(&self) -> TaskState {
        self.state.borrow().clone()
    }

    /// Whether the supervision has ended: the task finished on purpose, or was stopped.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops the task. The handle resolves once it has stopped: nothing it started still runs.
    pub fn stop(self) -> JoinHandle<()> {
        self.stop.send_replace(true);
        self.handle
    }
}

async fn supervise<F, Fut>(
    kind: TaskKind,
    name: String,
    metrics: Arc<Metrics>,
    mut make: F,
    mut stop: watch::Receiver<bool>,
    state: watch::Sender<TaskState>,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut backoff = Backoff::new(RESTART_MIN, RESTART_MAX);
    loop {
        // Told to stop, or the handle is gone.
        if *stop.borrow() || stop.has_changed().is_err() {
            return;
        }
        let started = Instant::now();
        let mut task = AbortOnDrop(tokio::spawn(make()));
        let ended = tokio::select! {
            biased;
            () = stopped(&mut stop) => {
                task.0.abort();
                let _ = (&mut task.0).await;
                return;
            }
            r = &mut task.0 => r,
        };
        let why = match ended {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            Err(_) => return, // cancelled from outside: nothing to start again
        };
        if started.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        let pause = backoff.next_pause();
        metrics.task_restarted(kind.as_str());
        warn!(task = kind.as_str(), %name, error = %why, ?pause, "task stopped unexpectedly; starting it again");
        state.send_modify(|s| {
            s.restarts += 1;
            s.last_failure = Some(why);
            s.down = true;
        });
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(pause) => {}
        }
        info!(task = kind.as_str(), %name, "task started again");
        state.send_modify(|s| s.down = false);
    }
}

/// Resolves once the supervision is told to stop, or its handle is dropped (the channel
/// closes).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A task that is aborted when its handle is dropped: when the supervision itself is
/// cancelled, its task does not run on, detached.
struct AbortOnDrop(JoinHandle<anyhow::Result<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The text a panic carried.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_string(),
            Err(_) => "(no message)".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn until(s: &Supervised, f: impl Fn(&TaskState) -> bool) -> TaskState {
        let mut rx = s.state.clone();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|st| f(st)))
            .await
            .expect("state in time")
            .expect("supervisor alive")
            .clone()
    }

    #[tokio::test]
    async fn a_task_that_panics_is_started_again_counted_and_reported() {
        let metrics = Arc::new(Metrics::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let s = Supervised::spawn(TaskKind::Writer, "c".into(), metrics.clone(), move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("injected");
                }
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        let st = until(&s, |st| st.restarts == 1 && !st.down).await;
        assert_eq!(st.last_failure.as_deref(), Some("panicked: injected"));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(metrics.task_restarts("writer"), 1);
        // Stopping waits for the task to end.
        s.stop().await.expect("stopped");
    }

    #[tokio::test]
    async fn a_task_that_finishes_on_purpose_is_not_started_again() {
        let metrics = Arc::new(Metrics::new());
        let s = Supervised::spawn(TaskKind::Import, "i".into(), metrics, || async { Ok(()) });
        tokio::time::timeout(Duration::from_secs(5), async {
            while !s.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("finished");
        assert_eq!(s.state().restarts, 0);
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_task() {
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let s = Supervised::spawn(TaskKind::Drain, "d".into(), metrics, move || {
            let tx = tx.clone();
            async move {
                let _keep = tx;
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        drop(s);
        // The task (and the sender it holds) is gone once it was stopped.
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the task stopped");
    }
}
