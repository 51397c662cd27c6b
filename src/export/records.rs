//! The records a catalog should hold, kept up to date incrementally: a snapshot that changes
//! one instance out of ten thousand renders one instance, and the plan looks at its keys only.
//! Each key keeps the digest of its record and the instances that render to it; the record
//! itself is rendered again when it is written, never kept. A test checks that it always
//! equals a full render.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use smallvec::SmallVec;

use crate::model::{DesiredCatalog, Digest, Digested, Instance, Record, Unit};

/// At most this many keys are remembered for [`DesiredRecords::unit`] after their instances
/// left; beyond it they are forgotten (their deletions then belong to the entry alone).
const RELEASED_KEPT: usize = 10_000;

/// Desired records kept up to date incrementally, by digest.
#[derive(Default)]
pub struct DesiredRecords {
    /// The instances rendered.
    instances: Arc<DesiredCatalog>,
    /// Every key a record should be at.
    pub entries: BTreeMap<String, DesiredEntry>,
    /// The instance that last held a key no instance holds any more, until its deletion is
    /// written ([`DesiredRecords::forget`]): which export the deletion belongs to.
    released: HashMap<String, Instance>,
}

/// One key's record: its digest and the instances that render to it.
#[derive(Debug)]
pub struct DesiredEntry {
    digest: Digest,
    /// Sorted. Several where a layout merges instances into one record; mostly one, kept in
    /// place.
    holders: SmallVec<[Instance; 1]>,
}

impl Digested for DesiredEntry {
    fn digest(&self) -> Digest {
        self.digest
    }
}

/// The catalogs a large addition passes through on its way to the catalog asked for: the
/// instances before, plus the added ones a step at a time, in order, each step twice the one
/// before (up to a limit): the first is written soon, and few steps mean few pauses between
/// them. The last step (the catalog asked for itself, with its removals) is not among them.
#[derive(Default)]
pub struct Steps {
    base: DesiredCatalog,
    added: Vec<Instance>,
    /// The next step starts here; the steps end at `until`.
    at: usize,
    until: usize,
    size: usize,
    max: usize,
}

impl Steps {
    /// The next catalog on the way, or None.
    pub fn next_step(&mut self) -> Option<Arc<DesiredCatalog>> {
        let end = self.until.min(self.at + self.size);
        if end <= self.at {
            return None;
        }
        for i in &self.added[self.at..end] {
            self.base.insert(i.clone());
        }
        self.at = end;
        self.size = (self.size * 2).min(self.max);
        Some(Arc::new(self.base.clone()))
    }

    /// Every instance the addition adds, the last step's too.
    pub fn added(&self) -> &[Instance] {
        &self.added
    }
}

impl DesiredRecords {
    /// Moves to `next`, rendering with the layout's pure `render`, and returns the keys whose
    /// record may have changed, with the records it rendered for them (each instance is
    /// rendered once; the writer writes these rather than render them again).
    pub fn update(
        &mut self,
        render: impl Fn(&[Instance]) -> BTreeMap<String, Record>,
        next: &Arc<DesiredCatalog>,
    ) -> (BTreeSet<String>, HashMap<String, Record>) {
        let mut touched = BTreeSet::new();
        // What the added instances rendered to, by key: the record of a key one of them holds.
        let mut rendered: HashMap<String, (&Instance, Record)> = HashMap::new();
        let mut left: HashMap<String, &Instance> = HashMap::new();
        let before = self.instances.clone();
        let changes = next.changes_from(&before);
        for inst in changes.removed {
            for key in render(std::slice::from_ref(inst)).into_keys() {
                if let Some(h) = self.entries.get_mut(&key)
                    && let Ok(at) = h.holders.binary_search(inst)
                {
                    h.holders.remove(at);
                }
                left.insert(key.clone(), inst);
                touched.insert(key);
            }
        }
        for inst in changes.added {
            for (key, record) in render(std::slice::from_ref(inst)) {
                let h = self
                    .entries
                    .entry(key.clone())
                    .or_insert_with(|| DesiredEntry {
                        // Every key added here is touched: its digest is set below, once.
                        digest: Digest::PENDING,
                        holders: SmallVec::new(),
                    });
                if let Err(at) = h.holders.binary_search(inst) {
                    h.holders.insert(at, inst.clone());
                }
                rendered.insert(key.clone(), (inst, record));
                touched.insert(key);
            }
        }
        let mut records = HashMap::new();
        for key in &touched {
            let holder = self.entries.get(key).and_then(|h| h.holders.last());
            let record = match (holder, rendered.remove(key)) {
                (Some(h), Some((inst, r))) if h == inst => Some(r),
                _ => self.record(key, &render),
            };
            match record {
                Some(r) => {
                    if let Some(h) = self.entries.get_mut(key) {
                        h.digest = Digest::of(&r);
                    }
                    self.released.remove(key);
                    records.insert(key.clone(), r);
                }
                None => {
                    self.entries.remove(key);
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
        (touched, records)
    }

    /// The way to `next` in steps of `first` added instances, then twice as many each step up
    /// to `max`, when it adds more than two first steps' worth; else no steps. The last
    /// `first` added instances are left to the last step.
    pub fn steps_to(&self, next: &DesiredCatalog, first: usize, max: usize) -> Steps {
        let changes = next.changes_from(&self.instances);
        let added = changes.added.len();
        if first == 0 || added <= 2 * first {
            return Steps::default();
        }
        Steps {
            base: (*self.instances).clone(),
            added: changes.added.into_iter().cloned().collect(),
            at: 0,
            until: added - first,
            size: first,
            max: max.max(first),
        }
    }

    /// The record at `key`, rendered as a full render would: the last instance (in order)
    /// holding a key wins.
    pub fn record(
        &self,
        key: &str,
        render: impl Fn(&[Instance]) -> BTreeMap<String, Record>,
    ) -> Option<Record> {
        let inst = self.entries.get(key).and_then(|h| h.holders.last())?;
        render(std::slice::from_ref(inst)).remove(key)
    }

    /// The export whose instance renders to `key`, or rendered to it last (a deletion).
    pub fn unit(&self, key: &str) -> Option<Unit> {
        self.entries
            .get(key)
            .and_then(|h| h.holders.last())
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
            let (touched, records) = d.update(|i| mem.render(i), &next);
            let full = mem.render(&next.iter().cloned().collect::<Vec<_>>());
            let digests: BTreeMap<String, Digest> = full
                .iter()
                .map(|(k, r)| (k.clone(), Digest::of(r)))
                .collect();
            let kept: BTreeMap<String, Digest> = (d.entries.iter())
                .map(|(k, h)| (k.clone(), h.digest()))
                .collect();
            assert_eq!(kept, digests);
            for (k, r) in &full {
                assert_eq!(d.record(k, |i| mem.render(i)).as_ref(), Some(r));
            }
            for (k, r) in &records {
                assert_eq!(full.get(k), Some(r), "{k}");
            }
            assert!(touched.len() <= 30);
        }
    }
}
