//! Waiting until a server answers, failing fast (with its log) when it dies instead.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::process::Process;

/// Polls `probe` every 100 ms until it returns `Ok(true)`. Fails when `timeout` passes or the
/// process exits, with the last probe error and the tail of the process's log.
pub async fn wait_ready<F, Fut>(process: &Process, timeout: Duration, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(true) => {
                tracing::debug!(peer = process.name(), elapsed = ?start.elapsed(), "ready");
                return Ok(());
            }
            Ok(false) => "answered, but not ready yet".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if let Some(status) = process.exit_status() {
            bail!(
                "{} exited ({status}) before it was ready; last probe: {last}\n--- {} (tail) ---\n{}",
                process.name(),
                process.log_path().display(),
                process.log_tail(40)
            );
        }
        if start.elapsed() > timeout {
            bail!(
                "{} not ready after {timeout:?}; last probe: {last}\n--- {} (tail) ---\n{}",
                process.name(),
                process.log_path().display(),
                process.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` until it returns `Some`, for at most `timeout`; for tests waiting on an
/// outcome. The error names what was awaited and the last value seen.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "condition not met".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
