//! The empty-hold of an import (SPEC §6.12), a safety valve: when a catalog suddenly stops
//! listing most of the instances of an imported name, the Service keeps the missing endpoints
//! for `spec.import.emptyHoldSeconds` instead of emptying in milliseconds. Pure.
//!
//! What is held, and what confirms:
//!
//! - An instance the catalog no longer lists **at all** is *gone*. An instance it still lists
//!   with a failing health check (Consul) is a health answer: it leaves at once, never held.
//! - A *sudden loss*: of the `N > 0` endpoints published, the catalog now lists fewer than half
//!   as healthy, and more than half are gone. A wiped catalog (a Consul agent restarted empty,
//!   an etcd prefix or a ZooKeeper path deleted) looks like that; a scale-down of less than half
//!   at a time, instances turning unhealthy, and a replacement (old instances gone, as many
//!   new ones listed) do not, and are followed at once.
//! - On a sudden loss the gone instances are held until the deadline. Instances the catalog
//!   lists (again, or new) follow it at once: healthy ones are published, failing ones leave
//!   the hold. Instances that go while a hold runs join it, up to the same deadline.
//! - The hold ends when every held instance is listed again (released), or at the deadline,
//!   when the catalog's answer read after it confirms the loss: the held instances still missing
//!   then go (expired). A catalog that cannot be read at the deadline confirms nothing: the hold
//!   lasts until the next successful read.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::k8s::cached::CachedService;
use crate::k8s::cached::CachedSlice;

use crate::api::labels::ANNOTATION_EXTERNAL_NAME;
use crate::backend::External;

/// An endpoint: where an instance is reached.
type Key = (String, u16);

fn key(i: &External) -> Key {
    (i.address.clone(), i.port)
}

/// One answer of the catalog.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    /// The healthy instances.
    pub healthy: &'a [External],
    /// Instances listed, but failing their checks.
    pub failing: &'a [External],
    /// The answer of a successful read (not the last instances kept through a failed one).
    pub fresh: bool,
}

/// How a hold began or ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A sudden loss: the catalog lists `listed` healthy instances where `before` endpoints
    /// were published; `held` of them are kept.
    Started {
        held: usize,
        before: usize,
        listed: usize,
    },
    /// The catalog listed every held instance again (healthy or failing).
    Released { listed: usize },
    /// The hold ran out: `removed` endpoints the catalog still does not list went.
    Expired { removed: usize },
}

/// The hold of one imported name: what it published, and what it keeps.
#[derive(Debug)]
pub struct Hold {
    period: Duration,
    /// What the Service publishes, after the last answer.
    published: BTreeMap<Key, External>,
    /// Published although the catalog no longer lists them.
    held: BTreeMap<Key, External>,
    /// When the running hold ends.
    until: Option<Instant>,
}

impl Hold {
    /// A hold of `period` (zero: off).
    pub fn new(period: Duration) -> Hold {
        Hold {
            period,
            published: BTreeMap::new(),
            held: BTreeMap::new(),
            until: None,
        }
    }

    /// Starts from what the Service already publishes (an import task that starts again: a new
    /// leader, a changed registration), so that a catalog found empty then is a loss too.
    pub fn seed(&mut self, published: impl IntoIterator<Item = External>) {
        if self.published.is_empty() {
            self.published = published.into_iter().map(|i| (key(&i), i)).collect();
        }
    }

    /// Endpoints held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// When the running hold ends: the answer must be looked at again then.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// What to publish after `answer`, seen at `now`, and how the hold changed.
    pub fn decide(&mut self, answer: Answer<'_>, now: Instant) -> (Vec<External>, Vec<Change>) {
        let healthy: BTreeMap<Key, External> =
            answer.healthy.iter().map(|i| (key(i), i.clone())).collect();
        let listed: BTreeSet<Key> = answer
            .healthy
            .iter()
            .chain(answer.failing)
            .map(key)
            .collect();
        let mut changes = Vec::new();
        if self.period.is_zero() {
            self.held.clear();
            self.until = None;
            self.published = healthy;
            return (self.published.values().cloned().collect(), changes);
        }
        let mut base = std::mem::take(&mut self.published);
        // Held instances the catalog lists again follow it: the hold is over for them.
        if !self.held.is_empty() {
            let listed_again = self.held.keys().filter(|k| listed.contains(*k)).count();
            self.held.retain(|k, _| !listed.contains(k));
            if self.held.is_empty() {
                changes.push(Change::Released {
                    listed: listed_again,
                });
            }
        }
        // The deadline passed and a fresh answer confirms the loss.
        if self.until.is_some_and(|u| now >= u) && answer.fresh && !self.held.is_empty() {
            changes.push(Change::Expired {
                removed: self.held.len(),
            });
            for k in self.held.keys() {
                base.remove(k);
            }
            self.held.clear();
        }
        if self.held.is_empty() {
            self.until = None;
        }
        let gone: BTreeMap<Key, External> = base
            .iter()
            .filter(|(k, _)| !listed.contains(*k) && !self.held.contains_key(*k))
            .map(|(k, i)| (k.clone(), i.clone()))
            .collect();
        let n = base.len();
        if !gone.is_empty() {
            if self.until.is_some() {
                self.held.extend(gone);
            } else if 2 * healthy.len() < n && 2 * gone.len() > n {
                changes.push(Change::Started {
                    held: gone.len(),
                    before: n,
                    listed: healthy.len(),
                });
                self.held = gone;
                self.until = Some(now + self.period);
            }
        }
        self.published = healthy;
        self.published
            .extend(self.held.iter().map(|(k, i)| (k.clone(), i.clone())));
        (self.published.values().cloned().collect(), changes)
    }
}

/// The endpoints `slices` (the import's EndpointSlices, as stored) publish, when `service` (its
/// Service, as stored) was rendered for `external_name`: what a hold starts from. Only ready
/// endpoints count.
pub fn published(
    service: Option<&CachedService>,
    slices: &[std::sync::Arc<CachedSlice>],
    external_name: &str,
) -> Vec<External> {
    let same_name = service
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(ANNOTATION_EXTERNAL_NAME))
        .is_some_and(|n| n == external_name);
    if !same_name {
        return Vec::new();
    }
    let mut out = Vec::new();
    for s in slices {
        let Some(port) = s
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for e in &s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) != Some(true) {
                continue;
            }
            for address in &e.addresses {
                out.push(External {
                    address: address.clone(),
                    port,
                    id: format!("{address}:{port}"),
                });
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(n: u8) -> External {
        External {
            address: format!("10.0.0.{n}"),
            port: 80,
            id: format!("i-{n}"),
        }
    }

    fn set(ns: &[u8]) -> Vec<External> {
        ns.iter().map(|n| ext(*n)).collect()
    }

    fn fresh<'a>(healthy: &'a [External], failing: &'a [External]) -> Answer<'a> {
        Answer {
            healthy,
            failing,
            fresh: true,
        }
    }

    const PERIOD: Duration = Duration::from_secs(30);

    /// A hold that published `ns` already.
    fn publishing(ns: &[u8], t0: Instant) -> Hold {
        let mut h = Hold::new(PERIOD);
        let (out, changes) = h.decide(fresh(&set(ns), &[]), t0);
        assert_eq!(out, set(ns));
        assert!(changes.is_empty());
        h
    }

    #[test]
    fn a_catalog_that_answers_with_none_is_held_until_the_deadline_then_followed() {
        let t0 = Instant::now();
        let mut h = publishing(&[1, 2, 3], t0);
        let (out, changes) = h.decide(fresh(&[], &[]), t0);
        assert_eq!(out, set(&[1, 2, 3]), "held");
        assert_eq!(
            changes,
            [Change::Started {
                held: 3,
                before: 3,
                listed: 0
            }]
        );
        assert_eq!(h.held(), 3);
        assert_eq!(h.until(), Some(t0 + PERIOD));
        // The same answer before the deadline changes nothing.
        let (out, changes) = h.decide(fresh(&[], &[]), t0 + PERIOD / 2);
        assert_eq!(out, set(&[1, 2, 3]));
        assert!(changes.is_empty());
        // At the deadline the same answer confirms it.
        let (out, changes) = h.decide(fresh(&[], &[]), t0 + PERIOD);
        assert!(out.is_empty());
        assert_eq!(changes, [Change::Expired { removed: 3 }]);
        assert_eq!((h.held(), h.until()), (0, None));
        // And nothing starts again from the empty Service.
        let (out, changes) = h.decide(fresh(&[], &[]), t0 + PERIOD * 2);
        assert!(out.is_empty() && changes.is_empty());
    }

    #[test]
    fn a_single_instance_that_vanishes_is_held() {
        let t0 = Instant::now();
        let mut h = publishing(&[1], t0);
        let (out, changes) = h.decide(fresh(&[], &[]), t0);
        assert_eq!(out, set(&[1]));
        assert_eq!(changes.len(), 1);
    }

    #[test]
    fn a_gradual_scale_down_of_less_than_half_at_a_time_is_never_held() {
        let t0 = Instant::now();
        let mut h = publishing(&[1, 2, 3, 4, 5, 6, 7, 8], t0);
        let mut now = t0;
        for left in [&[1, 2, 3, 4, 5][..], &[1, 2, 3], &[1, 2], &[1]] {
            now += Duration::from_secs(1);
            let (out, changes) = h.decide(fresh(&set(left), &[]), now);
            assert_eq!(out, set(left), "followed at once");
            assert!(changes.is_empty(), "{changes:?}");
        }
        assert_eq!(h.held(), 0);
        // Exactly half is not more than half.
        let mut h = publishing(&[1, 2, 3, 4], t0);
        let (out, _) = h.decide(fresh(&set(&[1, 2]), &[]), t0);
        assert_eq!(out, set(&[1, 2]));
    }

    #[test]
    fn losing_more_than_half_at_once_holds_the_missing_ones_only() {
        let t0 = Instant::now();
        let mut h = publishing(&[1, 2, 3, 4, 5], t0);
        let (out, changes) = h.decide(fresh(&set(&[1]), &[]), t0);
        assert_eq!(out, set(&[1, 2, 3, 4, 5]));
        assert_eq!(
            changes,
            [Change::Started {
                held: 4,
                before: 5,
                listed: 1
            }]
        );
    }

    #[test]
    fn failing_checks_are_a_health_answer_and_never_held() {
        let t0 = Instant::now();
        let mut h = publishing(&[1, 2, 3], t0);
        // All three still registered, all failing: a real outage, followed at once.
        let (out, changes) = h.decide(fresh(&[], &set(&[1, 2, 3])), t0);
        assert!(out.is_empty());
        assert!(changes.is_empty());
        // Three of four failing and one gone: not a disappearance of most, followed.
        let mut h = publishing(&[1, 2, 3, 4], t0);
        let (out, changes) = h.decide(fresh(&[], &set(&[1, 2, 3])), t0);
        assert!(out.is_empty() && changes.is_empty());
    }

    #[test]
    fn a_replacement_by_as_many_new_instances_is_not_a_loss() {
        let t0 = Instant::now();
        let mut h = publishing(&[1, 2, 3], t0);
        let (out, changes) = h.decide(fresh(&set(&[7, 8, 9]), &[]), t0);
        assert_eq!(out, set(&[7, 8, 9]));
        assert!(changes.is_empty());
    }

    #[test]
    fn instances_listed_during_the_hold_follow_at_once() {
        let t0 = Instant::now();
        let mut h = publishing(&[1, 2, 3], t0);
        h.decide(fresh(&[], &[]), t0);
        // A new instance: published beside the held ones.
        let (out, changes) = h.decide(fresh(&set(&[9]), &[]), t0 + Duration::from_secs(1));
        assert_eq!(out, set(&[1, 2, 3, 9]));
        assert!(changes.is_empty());
        // One comes back healthy, one comes back failing: it leaves at once.
        let (out, changes) = h.decide(
            fresh(&set(&[1, 9]), &set(&[2])),
            t0 + Duration::from_secs(2),
        );
        assert_eq!(out, set(&[1, 3, 9]));
        assert!(changes.is_empty());
        assert_eq!(h.held(), 1);
        // The last one comes back: the hold is over.
        let (out, changes) = h.decide(
            fresh(&set(&[1, 3, 9]), &set(&[2])),
            t0 + Duration::from_secs(3),
        );
        assert_eq!(out, set(&[1, 3, 9]));
        assert_eq!(changes, [Change::Released { listed: 1 }]);
        assert_eq!(h.until(), None);
    }

    #[test]
    fn what_goes_during_a_hold_joins_it_up_to_the_same_deadline() {
        let t0 = Instant::now();
        let mut h = publishing(&[1, 2, 3], t0);
        h.decide(fresh(&[], &[]), t0);
        h.decide(fresh(&set(&[9]), &[]), t0 + Duration::from_secs(1));
        let (out, _) = h.decide(fresh(&[], &[]), t0 + Duration::from_secs(2));
        assert_eq!(out, set(&[1, 2, 3, 9]));
        assert_eq!(h.until(), Some(t0 + PERIOD), "the deadline does not move");
        let (out, changes) = h.decide(fresh(&[], &[]), t0 + PERIOD);
        assert!(out.is_empty());
        assert_eq!(changes, [Change::Expired { removed: 4 }]);
    }

    #[test]
    fn a_catalog_that_cannot_be_read_at_the_deadline_confirms_nothing() {
        let t0 = Instant::now();
        let mut h = publishing(&[1, 2], t0);
        h.decide(fresh(&[], &[]), t0);
        let stale = Answer {
            healthy: &[],
            failing: &[],
            fresh: false,
        };
        let (out, changes) = h.decide(stale, t0 + PERIOD * 2);
        assert_eq!(out, set(&[1, 2]));
        assert!(changes.is_empty());
        let (out, changes) = h.decide(fresh(&[], &[]), t0 + PERIOD * 2);
        assert!(out.is_empty());
        assert_eq!(changes, [Change::Expired { removed: 2 }]);
    }

    #[test]
    fn zero_turns_the_hold_off() {
        let t0 = Instant::now();
        let mut h = Hold::new(Duration::ZERO);
        h.decide(fresh(&set(&[1, 2, 3]), &[]), t0);
        let (out, changes) = h.decide(fresh(&[], &[]), t0);
        assert!(out.is_empty() && changes.is_empty());
        assert_eq!(h.until(), None);
    }

    #[test]
    fn a_task_that_starts_again_holds_from_what_the_service_publishes() {
        let t0 = Instant::now();
        let mut h = Hold::new(PERIOD);
        h.seed(set(&[1, 2]));
        let (out, changes) = h.decide(fresh(&[], &[]), t0);
        assert_eq!(out, set(&[1, 2]));
        assert_eq!(changes.len(), 1);
        // The catalog as it was: nothing held, and the seed is followed.
        let mut h = Hold::new(PERIOD);
        h.seed(set(&[1, 2]));
        let (out, changes) = h.decide(fresh(&set(&[1, 2, 3]), &[]), t0);
        assert_eq!(out, set(&[1, 2, 3]));
        assert!(changes.is_empty());
    }

    #[test]
    fn the_published_endpoints_are_read_from_the_stored_slices_of_the_same_name() {
        let svc: CachedService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "annotations": {ANNOTATION_EXTERNAL_NAME: "db_x"}},
        }))
        .expect("a Service");
        let slice: CachedSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db-ipv4-5432-0"},
            "addressType": "IPv4",
            "ports": [{"name": "db", "port": 5432}],
            "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
            ],
        }))
        .expect("a slice");
        let slices = [std::sync::Arc::new(slice)];
        let got: Vec<String> = published(Some(&svc), &slices, "db_x")
            .iter()
            .map(|i| format!("{}:{}", i.address, i.port))
            .collect();
        assert_eq!(got, ["10.0.0.1:5432", "10.0.0.2:5432"]);
        assert!(
            published(Some(&svc), &slices, "other").is_empty(),
            "rendered for another name"
        );
        assert!(published(None, &slices, "db_x").is_empty());
    }
}
