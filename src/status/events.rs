//! Events (mostly Warnings): one per distinct message on an object, when it appears.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use serde_json::json;
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

/// Publishes Events, one per distinct message on an object: the first as a new Event, a
/// repeat within [`Announcer::SERIES`] as a count on it (`series`), the way kube's `Recorder`
/// does. kube's `Recorder` counts any Event with the reason of an earlier one on the same object
/// as a repeat of it, keeping the earlier note (two skipped entries of one import would show
/// only the first), and a recorder per message held a client and a whole Event each: 58 MB
/// after 10,000 Services were annotated for a catalog not yet created. This keeps a few words
/// per message, and forgets them after the series window.
pub struct Announcer {
    client: kube::Client,
    reporter: Reporter,
    /// Each message announced in the window: (object uid, reason, note).
    sent: HashMap<(String, String, String), Sent>,
    /// When `sent` was last cleared of expired messages.
    swept: Instant,
}

/// An Event created, for its repeats.
struct Sent {
    namespace: String,
    name: String,
    count: i32,
    last: Instant,
}

impl Announcer {
    /// A repeat this long after the last one is a new Event (kube's `Recorder` uses 6 minutes).
    pub const SERIES: Duration = Duration::from_secs(6 * 60);

    /// More messages than this in one window, and the oldest are forgotten (their repeats
    /// become new Events).
    const KEPT: usize = 10_000;

    pub fn new(client: kube::Client) -> Announcer {
        Announcer {
            client,
            reporter: Reporter {
                controller: "catalog-bridge".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            sent: HashMap::new(),
            swept: Instant::now(),
        }
    }

    /// Publishes `ev` about `reference`; a failure is logged (an Event is never worth stopping
    /// for).
    pub async fn publish(&mut self, ev: &Event, reference: &ObjectReference) {
        if let Err(err) = self.send(ev, reference).await {
            warn!(error = %format!("{err:#}"), reason = %ev.reason, "publishing an Event failed");
        }
    }

    async fn send(&mut self, ev: &Event, reference: &ObjectReference) -> anyhow::Result<()> {
        let now = Instant::now();
        self.sweep(now);
        let key = (
            reference.uid.clone().unwrap_or_default(),
            ev.reason.clone(),
            ev.note.clone().unwrap_or_default(),
        );
        let stamp = MicroTime(Timestamp::now());
        if let Some(sent) = self.sent.get_mut(&key) {
            sent.count += 1;
            sent.last = now;
            let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &sent.namespace);
            let series = json!({"series": {"count": sent.count, "lastObservedTime": stamp}});
            let patched = events
                .patch(&sent.name, &PatchParams::default(), &Patch::Merge(&series))
                .await;
            match patched {
                Ok(_) => return Ok(()),
                // The Event is gone (the API server keeps Events an hour by default): the
                // repeat becomes a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    self.sent.remove(&key);
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e))
                        .with_context(|| format!("counting a repeat on Event {}", sent.name));
                }
            }
        }
        let namespace = reference.namespace.clone().unwrap_or("default".into());
        let event = self.event(ev, reference, &namespace, stamp);
        let name = event.metadata.name.clone().unwrap_or_default();
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        events
            .create(&PostParams::default(), &event)
            .await
            .with_context(|| format!("creating Event {name} in {namespace}"))?;
        if self.sent.len() >= Self::KEPT {
            self.forget_oldest();
        }
        let sent = Sent {
            namespace,
            name,
            count: 1,
            last: now,
        };
        self.sent.insert(key, sent);
        Ok(())
    }

    /// The Event as kube's `Recorder` writes it (events.k8s.io/v1).
    fn event(
        &self,
        ev: &Event,
        reference: &ObjectReference,
        namespace: &str,
        stamp: MicroTime,
    ) -> K8sEvent {
        let of = reference
            .name
            .as_deref()
            .unwrap_or(&self.reporter.controller);
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            event_time: Some(stamp.clone()),
            regarding: Some(reference.clone()),
            related: ev.secondary.clone(),
            metadata: ObjectMeta {
                namespace: Some(namespace.to_string()),
                name: Some(format!("{of}.{:x}", stamp.0.as_nanosecond())),
                ..ObjectMeta::default()
            },
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                (self.reporter.instance.clone()).unwrap_or(self.reporter.controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..K8sEvent::default()
        }
    }

    /// Forgets the messages whose window has passed, at most once a second.
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.swept) < Duration::from_secs(1) {
            return;
        }
        self.swept = now;
        self.sent
            .retain(|_, s| now.duration_since(s.last) < Self::SERIES);
    }

    /// Forgets the older half of the messages (a burst of distinct messages larger than
    /// [`Self::KEPT`]).
    fn forget_oldest(&mut self) {
        let mut times: Vec<Instant> = self.sent.values().map(|s| s.last).collect();
        let (_, median, _) = times.select_nth_unstable(self.sent.len() / 2);
        let median = *median;
        self.sent.retain(|_, s| s.last > median);
    }
}
