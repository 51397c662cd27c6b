//! The plan: a pure diff between what a catalog should hold and what this controller's entries
//! in it hold now. Only keys of the current, *owned* state can be deleted; an unchanged record
//! is never written again.

use std::collections::BTreeMap;

pub use crate::model::{Digested, Known, Op, Record};

/// The changes that turn `current` into `desired`, creates and updates first, deletions last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub creates: usize,
    pub updates: usize,
    pub deletes: usize,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} create(s), {} update(s), {} delete(s)",
            self.creates, self.updates, self.deletes
        )
    }
}

/// Diffs `desired` against `current` (the owned entries read from, or last written to, the
/// catalog: records or their digests).
pub fn plan(desired: &BTreeMap<String, Record>, current: &BTreeMap<String, impl Known>) -> Plan {
    plan_with(desired, current, |_, r| Some(r.clone()))
}

/// [`plan`] where the desired state is known by digest (or record), `record` rendering the
/// record of a key that must be written.
pub fn plan_with<D: Digested, K: Known>(
    desired: &BTreeMap<String, D>,
    current: &BTreeMap<String, K>,
    mut record: impl FnMut(&str, &D) -> Option<Record>,
) -> Plan {
    let mut p = Plan::default();
    for (key, want) in desired {
        p.put_if_differs(key, want, current.get(key), &mut record);
    }
    for key in current.keys() {
        if !desired.contains_key(key) {
            p.delete(key);
        }
    }
    p
}

/// The same diff restricted to `keys`, for when `current` is known to equal an earlier
/// desired state and only `keys` can have changed since: O(changes), not O(entries).
pub fn plan_keys<'a, D: Digested, K: Known>(
    desired: &BTreeMap<String, D>,
    current: &BTreeMap<String, K>,
    keys: impl IntoIterator<Item = &'a String>,
    mut record: impl FnMut(&str, &D) -> Option<Record>,
) -> Plan {
    let mut p = Plan::default();
    let mut deletes = Vec::new();
    for key in keys {
        match desired.get(key) {
            Some(want) => p.put_if_differs(key, want, current.get(key), &mut record),
            None if current.contains_key(key) => deletes.push(key),
            None => {}
        }
    }
    for key in deletes {
        p.delete(key);
    }
    p
}

impl Plan {
    fn put_if_differs<D: Digested>(
        &mut self,
        key: &str,
        want: &D,
        have: Option<&impl Known>,
        record: &mut impl FnMut(&str, &D) -> Option<Record>,
    ) {
        match have {
            Some(h) if h.digest() == want.digest() => return,
            Some(_) => self.updates += 1,
            None => self.creates += 1,
        }
        let Some(record) = record(key, want) else {
            return;
        };
        self.ops.push(Op::Put {
            key: key.to_string(),
            record,
        });
    }

    fn delete(&mut self, key: &str) {
        self.deletes += 1;
        self.ops.push(Op::Delete {
            key: key.to_string(),
        });
    }
}

/// Applies a plan to a map of records (or digests), as a successful write does to the catalog.
pub fn apply_to<K: Known>(current: &mut BTreeMap<String, K>, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Put { key, record } => {
                current.insert(key.clone(), K::of(record));
            }
            Op::Delete { key } => {
                current.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(entries: &[(&str, i64)]) -> BTreeMap<String, Record> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), json!({ "v": v })))
            .collect()
    }

    #[test]
    fn unchanged_state_plans_nothing() {
        let state = map(&[("a", 1), ("b", 2)]);
        assert!(plan(&state, &state).is_empty());
    }

    #[test]
    fn creates_updates_and_deletes_only_what_differs() {
        let desired = map(&[("a", 1), ("b", 3), ("c", 4)]);
        let current = map(&[("a", 1), ("b", 2), ("d", 5)]);
        let p = plan(&desired, &current);
        assert_eq!((p.creates, p.updates, p.deletes), (1, 1, 1));
        assert_eq!(p.ops.len(), 3);
        assert!(matches!(p.ops.last(), Some(Op::Delete { key }) if key == "d"));
        let mut after = current.clone();
        apply_to(&mut after, &p.ops);
        assert_eq!(after, desired);
    }

    #[test]
    fn a_plan_over_changed_keys_equals_the_full_plan() {
        let desired = map(&[("a", 1), ("b", 3), ("c", 4)]);
        let current = map(&[("a", 1), ("b", 2), ("d", 5)]);
        let keys: Vec<String> = ["b", "c", "d", "x"].iter().map(|k| k.to_string()).collect();
        assert_eq!(
            plan_keys(&desired, &current, &keys, |_, r| Some(r.clone())),
            plan(&desired, &current)
        );
    }

    #[test]
    fn nothing_outside_current_is_ever_deleted() {
        // Entries not in `current` (other owners', hand-made ones) are invisible to the plan.
        let p = plan(&BTreeMap::new(), &map(&[("mine", 1)]));
        assert_eq!(p.ops, vec![Op::Delete { key: "mine".into() }]);
    }
}
