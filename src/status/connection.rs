//! One Event per change of a catalog's connection, on its ExternalCatalog: a Warning when the
//! catalog becomes unreachable, refuses the credentials or refuses a write (an error of the whole
//! catalog, not of one export: those are announced on the export), and a Normal one when it
//! answers again. Not one per retry: a retry that fails the same way is no news.

use std::collections::{BTreeMap, HashMap};

use kube::Resource;
use kube::runtime::events::Event;
use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use super::events::{Announcer, normal, warning};
use crate::export::Report;
use crate::export::writers::CatalogView;
use crate::k8s::stores::Stores;
use crate::model::{BackendError, Reason};

/// What a catalog's report says of its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// It answers (a refused export or a claimed owner id is not the connection's fault).
    Good,
    /// It does not answer, refuses the credentials, or refuses the writes.
    Bad(Reason),
}

/// The connection's health as `r` reports it; `None` before the first contact.
pub fn health(r: &Report) -> Option<Health> {
    match (&r.error, r.reachable) {
        (
            Some(
                e @ (BackendError::Unreachable(_)
                | BackendError::Unauthorized(_)
                | BackendError::Rejected(_)),
            ),
            _,
        ) => Some(Health::Bad(e.reason())),
        (_, Some(true)) => Some(Health::Good),
        _ => None,
    }
}

/// The Event for the change from `before` (`None`: first seen) to `now`, with the catalog's
/// own words from `error`; `None` when there is no news.
pub fn event(before: Option<&Health>, now: &Health, error: Option<&BackendError>) -> Option<Event> {
    match (before, now) {
        (Some(b), n) if b == n => None,
        (_, Health::Bad(reason)) => {
            let why = error.map_or_else(String::new, |e| format!(": {e}"));
            let (what, action) = match reason {
                Reason::Unreachable => ("the catalog does not answer", "Connect"),
                Reason::Unauthorized => ("the catalog refuses the credentials", "Connect"),
                _ => ("the catalog refuses the writes", "Write"),
            };
            Some(warning(*reason, &format!("{what}{why}"), action))
        }
        (Some(Health::Bad(was)), Health::Good) => Some(normal(
            Reason::Connected,
            &format!("the catalog answers again (it was {was})"),
            "Connect",
        )),
        (None, Health::Good) | (Some(Health::Good), Health::Good) => None,
    }
}

/// Announces each catalog's connection change since the last call; `seen` keeps what was
/// announced (forgotten with leadership, so a new leader starts from what it finds).
pub async fn announce(
    stores: &Stores,
    views: &BTreeMap<String, CatalogView>,
    recorder: &mut Announcer,
    seen: &mut HashMap<String, Health>,
) {
    seen.retain(|name, _| views.contains_key(name));
    for (name, view) in views {
        let Some(now) = health(&view.report) else {
            continue;
        };
        let before = seen.insert(name.clone(), now.clone());
        let Some(e) = event(before.as_ref(), &now, view.report.error.as_ref()) else {
            continue;
        };
        match &now {
            Health::Bad(reason) => {
                warn!(catalog = %name, %reason, error = ?view.report.error.as_ref().map(ToString::to_string), "catalog connection lost")
            }
            Health::Good => info!(catalog = %name, "catalog answers again"),
        }
        if let Some(cat) = stores.catalogs.get(&ObjectRef::new(name)) {
            recorder.publish(&e, &cat.object_ref(&())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(reachable: Option<bool>, error: Option<BackendError>) -> Report {
        Report {
            reachable,
            error,
            ..Default::default()
        }
    }

    #[test]
    fn one_event_per_change_not_per_retry() {
        let down = BackendError::Unreachable("no etcd endpoint answered: a (refused)".into());
        let mut seen: Option<Health> = None;
        let mut events = Vec::new();
        for r in [
            report(None, None),
            report(Some(true), None),
            report(Some(false), Some(down.clone())),
            report(
                Some(false),
                Some(BackendError::Unreachable("other words".into())),
            ),
            report(Some(false), Some(down)),
            report(
                Some(true),
                Some(BackendError::Unauthorized("authentication failed".into())),
            ),
            report(Some(true), None),
            report(
                Some(true),
                Some(BackendError::refused("one export too large")),
            ),
        ] {
            let Some(now) = health(&r) else { continue };
            if let Some(e) = event(seen.as_ref(), &now, r.error.as_ref()) {
                events.push((e.reason.clone(), e.note.clone().unwrap_or_default()));
            }
            seen = Some(now);
        }
        assert_eq!(
            events,
            [
                (
                    "Unreachable".to_string(),
                    "the catalog does not answer: no etcd endpoint answered: a (refused)"
                        .to_string()
                ),
                (
                    "Unauthorized".to_string(),
                    "the catalog refuses the credentials: authentication failed".to_string()
                ),
                (
                    "Connected".to_string(),
                    "the catalog answers again (it was Unauthorized)".to_string()
                ),
            ]
        );
    }
}
