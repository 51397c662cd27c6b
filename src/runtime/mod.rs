//! What every long-running task runs with: backoff between attempts, supervision (a task that
//! ends or panics is started again, counted and reported), the health of the desired-state
//! loop, and the Prometheus metrics.

pub mod backoff;
pub mod changed;
pub mod health;
pub mod metrics;
pub mod supervisor;

pub use backoff::Backoff;
pub use metrics::Metrics;
