//! Events (mostly Warnings): one per distinct message on an object, when it appears.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

use crate::model::Reason;

/// The longest note an Event carries (the API server refuses longer ones).
pub const MAX_NOTE: usize = 1000;

/// A Warning Event with `reason` and `note`, for `action` (`Export`, `Import`, `Write`).
pub fn warning(reason: Reason, note: &str, action: &str) -> Event {
    Event {
        type_: EventType::Warning,
        reason: reason.to_string(),
        note: Some(note.chars().take(MAX_NOTE).collect()),
        action: action.into(),
        secondary: None,
    }
}

/// A Normal Event with `reason` and `note`, for `action`.
pub fn normal(reason: Reason, note: &str, action: &str) -> Event {
    Event {
        type_: EventType::Normal,
        ..warning(reason, note, action)
    }
}

/// Publishes Events, one per distinct message on an object. kube's [`Recorder`] counts an Event
/// with the reason of an earlier one on the same object as a repeat of it (its series), keeping
/// the earlier note: two skipped entries of one import would show only the first. So each
/// (object, reason, note) has a recorder of its own; the same message again is still a repeat.
pub struct Announcer {
    client: kube::Client,
    reporter: Reporter,
    recorders: HashMap<(String, String, String), Recorder>,
}

impl Announcer {
    /// More distinct messages than this and the recorders start afresh (their repeats then
    /// become new Events).
    const KEPT: usize = 10_000;

    pub fn new(client: kube::Client) -> Announcer {
        Announcer {
            client,
            reporter: Reporter {
                controller: "catalog-bridge".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            recorders: HashMap::new(),
        }
    }

    pub async fn publish(&mut self, ev: &Event, reference: &ObjectReference) {
        let key = (
            reference.uid.clone().unwrap_or_default(),
            ev.reason.clone(),
            ev.note.clone().unwrap_or_default(),
        );
        if self.recorders.len() >= Self::KEPT && !self.recorders.contains_key(&key) {
            self.recorders.clear();
        }
        let (client, reporter) = (&self.client, &self.reporter);
        let recorder = self
            .recorders
            .entry(key)
            .or_insert_with(|| Recorder::new(client.clone(), reporter.clone()));
        if let Err(err) = recorder.publish(ev, reference).await {
            warn!(error = %err, reason = %ev.reason, "publishing an Event failed");
        }
    }
}
