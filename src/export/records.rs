//! The records a catalog should hold, kept up to date incrementally: a snapshot that changes
//! one instance out of ten thousand renders one instance, and the plan looks at its keys only.
//! A test checks that it always equals a full render.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::model::{DesiredCatalog, Instance, Record, Unit};

/// At most this many keys are remembered for [`DesiredRecords::unit`] after their instances
/// left; beyond it they are forgotten (their deletions then belong to the entry alone).
const RELEASED_KEPT: usize = 10_000;

/// Desired records kept up to date incrementally: a snapshot that changes one instance out of
/// ten thousand renders one instance, and the plan looks at its keys only.
#[derive(Default)]
pub struct DesiredRecords {
    /// The instances rendered, sorted (snapshots are sorted).
    instances: Arc<DesiredCatalog>,
    pub records: BTreeMap<String, Record>,
    /// Which instances render to each key (several can, where a layout merges them).
    holders: HashMap<String, BTreeSet<Instance>>,
    /// The instance that last held a key no instance holds any more, until its deletion is
    /// written ([`DesiredRecords::forget`]): which export the deletion belongs to.
    released: HashMap<String, Instance>,
}

impl DesiredRecords {
    /// Moves to `next` (sorted), rendering with the layout's pure `render`, and returns the
    /// keys whose record may have changed.
    pub fn update(
        &mut self,
        render: impl Fn(&[Instance]) -> BTreeMap<String, Record>,
        next: &Arc<DesiredCatalog>,
    ) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        let mut left: HashMap<String, &Instance> = HashMap::new();
        let before = self.instances.clone();
        let changes = next.changes_from(&before);
        for inst in changes.removed {
            for key in render(std::slice::from_ref(inst)).into_keys() {
                if let Some(h) = self.holders.get_mut(&key) {
                    h.remove(inst);
                }
                left.insert(key.clone(), inst);
                touched.insert(key);
            }
        }
        for inst in changes.added {
            for key in render(std::slice::from_ref(inst)).into_keys() {
                self.holders
                    .entry(key.clone())
                    .or_default()
                    .insert(inst.clone());
                touched.insert(key);
            }
        }
        for key in &touched {
            // As a full render would: the last instance (in order) holding a key wins.
            match self.holders.get(key).and_then(|h| h.last()) {
                Some(inst) => {
                    if let Some(r) = render(std::slice::from_ref(inst)).remove(key) {
                        self.records.insert(key.clone(), r);
                    }
                    self.released.remove(key);
                }
                None => {
                    self.holders.remove(key);
                    self.records.remove(key);
                    if let Some(inst) = left.get(key) {
                        if self.released.len() >= RELEASED_KEPT {
                            self.released.clear();
                        }
                        self.released.insert(key.clone(), (*inst).clone());
                    }
                }
            }
        }
        self.instances = next.clone();
        touched
    }

    /// The export whose instance renders to `key`, or rendered to it last (a deletion).
    pub fn unit(&self, key: &str) -> Option<Unit> {
        self.holders
            .get(key)
            .and_then(|h| h.last())
            .or_else(|| self.released.get(key))
            .map(|i| Unit::Export {
                origin: i.origin.clone(),
                name: i.name.clone(),
            })
    }

    /// Forgets which export the deleted `keys` belonged to (their deletions are written).
    pub fn forget<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) {
        if self.released.is_empty() {
            return;
        }
        for k in keys {
            self.released.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::backend::memory::Memory;
    use crate::fixtures::instances;

    #[test]
    fn incremental_records_equal_a_full_render() {
        let mem = Memory::new("me", 64);
        let mut d = DesiredRecords::default();
        let all: Vec<Instance> = instances(30).iter().cloned().collect();
        let steps: [&[Instance]; 4] = [&all[..10], &all[5..20], &all[..0], &all[3..30]];
        for next in steps {
            let next = Arc::new(next.iter().cloned().collect::<DesiredCatalog>());
            let touched = d.update(|i| mem.render(i), &next);
            assert_eq!(
                d.records,
                mem.render(&next.iter().cloned().collect::<Vec<_>>())
            );
            assert!(touched.len() <= 30);
        }
    }
}
