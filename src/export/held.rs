//! The exports whose writes a catalog refused, held back: each is tried again on its own, with
//! a backoff of its own, or at once when its entries change (the user may have fixed it); the
//! plan for everything else leaves their operations out. Pure: the writer says when it is.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::model::{BackendError, Digested, Op, Unit};

/// One refused unit, as the writer reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub unit: Unit,
    /// Operations held back.
    pub operations: usize,
    /// What the catalog said the last time.
    pub error: BackendError,
}

#[derive(Debug)]
struct Entry {
    /// The keys whose operations were refused.
    keys: BTreeSet<String>,
    error: BackendError,
    attempts: u32,
    next_try: Instant,
}

/// The refused units of one catalog.
#[derive(Debug, Default)]
pub struct Held {
    units: BTreeMap<Unit, Entry>,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// How many units are held back.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// The unit a refused key belongs to.
    pub fn unit_of_key(&self, key: &str) -> Option<&Unit> {
        self.units
            .iter()
            .find(|(_, e)| e.keys.contains(key))
            .map(|(u, _)| u)
    }

    /// Forgets the keys that need no write any more (the catalog holds what is desired, or
    /// the export is gone), and the units left without keys.
    pub fn prune(
        &mut self,
        desired: &BTreeMap<String, impl Digested>,
        current: &BTreeMap<String, impl Digested>,
    ) {
        for e in self.units.values_mut() {
            e.keys.retain(|k| match (desired.get(k), current.get(k)) {
                (None, None) => false,
                (Some(d), Some(c)) => c.digest() != d.digest(),
                _ => true,
            });
        }
        self.units.retain(|_, e| !e.keys.is_empty());
    }

    /// The keys of the units due for another try at `now`.
    pub fn due_keys(&self, now: Instant) -> BTreeSet<String> {
        self.units
            .values()
            .filter(|e| e.next_try <= now)
            .flat_map(|e| e.keys.iter().cloned())
            .collect()
    }

    /// When the next held unit is due.
    pub fn next_try(&self) -> Option<Instant> {
        self.units.values().map(|e| e.next_try).min()
    }

    /// `ops` without the puts of units held back and not due at `now`; a unit with an
    /// operation on a `touched` key is due (its entries changed). Deletions are never held
    /// back: an endpoint that left goes at once. Returns what is left and how many operations
    /// were held back.
    pub fn hold_back(
        &self,
        ops: Vec<Op>,
        touched: &BTreeSet<String>,
        now: Instant,
        unit_of: impl Fn(&Op) -> Unit,
    ) -> (Vec<Op>, usize) {
        if self.units.is_empty() {
            return (ops, 0);
        }
        let with_units: Vec<(Unit, Op)> = ops.into_iter().map(|op| (unit_of(&op), op)).collect();
        let woken: BTreeSet<&Unit> = with_units
            .iter()
            .filter(|(_, op)| touched.contains(op.key()))
            .map(|(u, _)| u)
            .collect();
        let waiting = |u: &Unit| {
            self.units
                .get(u)
                .is_some_and(|e| e.next_try > now && !woken.contains(u))
        };
        let before = with_units.len();
        let kept: Vec<Op> = with_units
            .iter()
            .filter(|(u, op)| matches!(op, Op::Delete { .. }) || !waiting(u))
            .map(|(_, op)| op.clone())
            .collect();
        let held = before - kept.len();
        (kept, held)
    }

    /// After an apply that wrote `written` and was refused `refused`: written keys are no
    /// longer held (a unit left without keys is not held at all); a refused unit waits twice as
    /// long as before, from `min` up to `max`.
    pub fn record(
        &mut self,
        written: &[Op],
        refused: &BTreeMap<Unit, (Vec<Op>, BackendError)>,
        now: Instant,
        (min, max): (Duration, Duration),
    ) {
        if !self.units.is_empty() {
            let written: BTreeSet<&str> = written.iter().map(Op::key).collect();
            for e in self.units.values_mut() {
                e.keys.retain(|k| !written.contains(k.as_str()));
            }
        }
        for (unit, (ops, error)) in refused {
            let e = self.units.entry(unit.clone()).or_insert_with(|| Entry {
                keys: BTreeSet::new(),
                error: error.clone(),
                attempts: 0,
                next_try: now,
            });
            e.keys.extend(ops.iter().map(|op| op.key().to_string()));
            e.error = error.clone();
            let factor = 2u32.saturating_pow(e.attempts.min(16));
            e.next_try = now + min.saturating_mul(factor).min(max);
            e.attempts = e.attempts.saturating_add(1);
        }
        self.units.retain(|_, e| !e.keys.is_empty());
    }

    /// Every refused unit, for the writer's report.
    pub fn report(&self) -> Vec<Refused> {
        self.units
            .iter()
            .map(|(unit, e)| Refused {
                unit: unit.clone(),
                operations: e.keys.len(),
                error: e.error.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Origin, Record};
    use serde_json::json;

    fn unit(s: &str) -> Unit {
        Unit::Export {
            origin: Origin {
                namespace: "shop".into(),
                service: s.into(),
            }
            .into(),
            name: s.into(),
        }
    }

    fn unit_of(op: &Op) -> Unit {
        unit(op.key().split('-').next().unwrap_or_default())
    }

    fn put(k: &str) -> Op {
        Op::Put {
            key: k.into(),
            record: json!(k),
        }
    }

    #[test]
    fn a_refused_unit_waits_longer_each_time_unless_its_entries_change() {
        let mut h = Held::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let refusal = BackendError::refused("denied");
        let refused = BTreeMap::from([(unit("d"), (vec![put("d-1")], refusal.clone()))]);
        h.record(&[put("a-1")], &refused, t0, (ms(100), ms(1000)));
        assert_eq!(h.next_try(), Some(t0 + ms(100)));
        h.record(&[], &refused, t0, (ms(100), ms(1000)));
        assert_eq!(h.next_try(), Some(t0 + ms(200)), "twice as long");

        let ops = vec![put("a-1"), put("d-1")];
        let (kept, held) = h.hold_back(ops.clone(), &BTreeSet::new(), t0, unit_of);
        assert_eq!((kept, held), (vec![put("a-1")], 1));
        let delete = vec![Op::Delete { key: "d-0".into() }];
        let (kept, _) = h.hold_back(delete.clone(), &BTreeSet::new(), t0, unit_of);
        assert_eq!(kept, delete, "a deletion goes at once");
        let touched = BTreeSet::from(["d-1".to_string()]);
        let (kept, _) = h.hold_back(ops.clone(), &touched, t0, unit_of);
        assert_eq!(kept.len(), 2, "changed entries are tried at once");
        let (kept, _) = h.hold_back(ops, &BTreeSet::new(), t0 + ms(200), unit_of);
        assert_eq!(kept.len(), 2, "due");
        assert_eq!(
            h.due_keys(t0 + ms(200)),
            BTreeSet::from(["d-1".to_string()])
        );

        // Written at last: no longer held.
        h.record(&[put("d-1")], &BTreeMap::new(), t0, (ms(100), ms(1000)));
        assert!(h.is_empty());
    }

    #[test]
    fn keys_that_need_no_write_are_forgotten() {
        let mut h = Held::default();
        let refused = BTreeMap::from([(
            unit("d"),
            (vec![put("d-1")], BackendError::refused("denied")),
        )]);
        let now = Instant::now();
        let d = (Duration::from_millis(1), Duration::from_millis(2));
        h.record(&[], &refused, now, d);
        let desired = BTreeMap::from([("d-1".to_string(), json!("d-1"))]);
        h.prune(&desired, &BTreeMap::<String, Record>::new());
        assert_eq!(h.len(), 1);
        assert_eq!(h.unit_of_key("d-1"), Some(&unit("d")));
        h.prune(
            &BTreeMap::<String, Record>::new(),
            &BTreeMap::<String, Record>::new(),
        );
        assert!(h.is_empty(), "the export is gone");
    }
}
