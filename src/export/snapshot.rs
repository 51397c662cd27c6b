//! What the desired-state loop hands a catalog's writer (a [`Snapshot`] of what the catalog
//! should hold), and what the writer reports back (a [`Report`], for status and readiness).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

pub use super::held::Refused;
use crate::api::crd::ServerInfo;
use crate::model::{BackendError, DesiredCatalog};

/// Desired state of one catalog as published to its writer.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Shared with the desired-state loop: publishing it copies no instance.
    pub catalog: Arc<DesiredCatalog>,
    /// When the oldest Kubernetes change folded into this snapshot was seen.
    pub changed_at: Option<Instant>,
    /// Set when the writer takes it: a snapshot replaced before that passes its `changed_at`
    /// on ([`Snapshot::replacing`]), so the propagation delay counts from the oldest change.
    pub taken: std::sync::atomic::AtomicBool,
}

impl Snapshot {
    pub fn new(catalog: Arc<DesiredCatalog>, changed_at: Option<Instant>) -> Snapshot {
        Snapshot {
            catalog,
            changed_at,
            taken: Default::default(),
        }
    }

    /// The snapshot of `catalog` that replaces `self`, for a change seen at `changed_at`:
    /// while `self` was not taken yet, its older change is still the one waiting longest.
    pub fn replacing(&self, catalog: Arc<DesiredCatalog>, changed_at: Instant) -> Snapshot {
        let pending = self
            .changed_at
            .filter(|_| !self.taken.load(std::sync::atomic::Ordering::SeqCst));
        Snapshot::new(
            catalog,
            Some(pending.map_or(changed_at, |p| p.min(changed_at))),
        )
    }

    /// The writer took it: a snapshot that replaces it counts from its own change.
    pub fn take(&self) {
        self.taken.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What the writer last saw and did, for status and readiness.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// `None` until the first contact.
    pub reachable: Option<bool>,
    pub error: Option<BackendError>,
    /// The catalog holds exactly the desired state, but for the `refused` exports.
    pub in_sync: bool,
    /// Entries this controller holds there.
    pub entries: usize,
    pub last_contact: Option<SystemTime>,
    pub server: Option<ServerInfo>,
    /// Waiting for leadership or cache sync.
    pub idle: bool,
    /// [`Backend::warning`] after the last write.
    pub warning: Option<String>,
    /// The exports whose writes the catalog refuses, held back while the others are written.
    pub refused: Vec<Refused>,
}
