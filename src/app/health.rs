//! What `/healthz` and `/readyz` read.

use std::sync::Arc;

use tokio::sync::watch;

use crate::runtime::Metrics;
use crate::runtime::health::Changes;

/// What the HTTP endpoints read.
#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// True once every Kubernetes cache has synced.
    pub synced: watch::Receiver<bool>,
    /// The desired-state loop's pulse: `/healthz` fails while it is stalled.
    pub changes: Arc<Changes>,
}
