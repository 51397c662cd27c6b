//! Applying a plan so that a write the catalog refuses fails only the export it belongs to
//! (SPEC §6.9). Deletions go first, then puts, each unit's (export's) operations together. A
//! request the catalog refuses for what it holds ([`BackendError::Refused`]: a permission on
//! one name, a size limit) is sent again without the operations the catalog named, or, when it
//! named none, in halves, until the refused operations are found; everything else is written.
//! Any other failure (the catalog unreachable, credentials refused, a lost lease) stops the
//! apply as before: the writer reads the catalog again and retries the whole plan.
//!
//! Sending a part again may repeat operations an earlier, partly committed request already
//! wrote; every backend writes the same record twice as once (and deletes a missing entry as
//! a no-op), so that costs a request, never an entry.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::backend::Backend;
use crate::model::{BackendError, Op, Unit};

/// The operations of one unit, in plan order.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub unit: Unit,
    pub ops: Vec<Op>,
}

/// `ops` grouped by unit: every deletion before every put, and within each kind the units in
/// the order they first appear.
pub fn groups(ops: Vec<Op>, unit_of: impl Fn(&Op) -> Unit) -> Vec<Group> {
    let (deletes, puts): (Vec<Op>, Vec<Op>) = ops
        .into_iter()
        .partition(|op| matches!(op, Op::Delete { .. }));
    let mut out = Vec::new();
    for kind in [deletes, puts] {
        let mut index: HashMap<Unit, usize> = HashMap::new();
        let first = out.len();
        for op in kind {
            let unit = unit_of(&op);
            match index.get(&unit) {
                Some(&i) => {
                    let g: &mut Group = &mut out[i];
                    g.ops.push(op);
                }
                None => {
                    index.insert(unit.clone(), out.len());
                    out.push(Group {
                        unit,
                        ops: vec![op],
                    });
                }
            }
        }
        debug_assert!(out[first..].iter().all(|g| !g.ops.is_empty()));
    }
    out
}

/// What an apply did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The operations written, in the order they were confirmed.
    pub written: Vec<Op>,
    /// The operations the catalog refused, by unit, with the first refusal's words.
    pub refused: BTreeMap<Unit, (Vec<Op>, BackendError)>,
    /// Round trips, as the backend counts them (a failed request counts one).
    pub round_trips: usize,
    /// Requests sent to the backend (`apply` calls).
    pub requests: usize,
    /// Of those, the ones refused.
    pub refusals: usize,
    /// The failure that stopped the apply, when it was not a refusal: what follows it was
    /// not tried, and what went before may or may not be written.
    pub stopped: Option<BackendError>,
}

impl Outcome {
    fn refuse(&mut self, unit: Unit, ops: Vec<Op>, e: &BackendError) {
        self.refused
            .entry(unit)
            .or_insert_with(|| (Vec::new(), e.clone()))
            .0
            .extend(ops);
    }

    /// After the parts `gs` were refused with `e`: the operations `e` names are refused and
    /// the rest is tried again; without names, the parts are halved (a single unit is split).
    fn after_refusal(&mut self, mut gs: Vec<Group>, e: BackendError, work: &mut Vec<Work>) {
        let named: HashSet<&str> = match &e {
            BackendError::Refused { keys, .. } => keys.iter().map(String::as_str).collect(),
            _ => HashSet::new(),
        };
        let names_some = gs
            .iter()
            .any(|g| g.ops.iter().any(|op| named.contains(op.key())));
        if names_some {
            let mut rest = Vec::new();
            for g in gs {
                let (bad, good): (Vec<Op>, Vec<Op>) =
                    g.ops.into_iter().partition(|op| named.contains(op.key()));
                if !bad.is_empty() {
                    self.refuse(g.unit.clone(), bad, &e);
                }
                if !good.is_empty() {
                    rest.push(Group {
                        unit: g.unit,
                        ops: good,
                    });
                }
            }
            work.push(Work::Try(rest));
        } else if gs.len() > 1 {
            let right = gs.split_off(gs.len() / 2);
            work.push(Work::Try(right));
            work.push(Work::Try(gs));
        } else if let Some(g) = gs.pop() {
            work.push(Work::Split(g, e));
        }
    }
}

/// What is left to do.
enum Work {
    /// Send these parts in one apply.
    Try(Vec<Group>),
    /// This unit's operations were refused together: send each half alone.
    Split(Group, BackendError),
}

/// What one apply came to. The operations move into [`Outcome::written`] when written and come
/// back when refused: a plan of 100,000 records is never copied.
enum Sent {
    Written,
    Refused(BackendError, Vec<Op>),
    Stopped(BackendError),
}

async fn send(backend: &dyn Backend, ops: Vec<Op>, out: &mut Outcome) -> Sent {
    out.requests += 1;
    match backend.apply(&ops).await {
        Ok(trips) => {
            out.round_trips += trips;
            out.written.extend(ops);
            Sent::Written
        }
        Err(e) if e.is_refusal() => {
            out.round_trips += 1;
            out.refusals += 1;
            Sent::Refused(e, ops)
        }
        Err(e) => {
            out.round_trips += 1;
            Sent::Stopped(e)
        }
    }
}

/// `ops` cut back into the groups of `shape` (each unit with its number of operations).
fn regroup(shape: Vec<(Unit, usize)>, ops: Vec<Op>) -> Vec<Group> {
    let mut ops = ops.into_iter();
    (shape.into_iter())
        .map(|(unit, n)| Group {
            unit,
            ops: ops.by_ref().take(n).collect(),
        })
        .collect()
}

/// Applies `groups` (see [`groups`]) so that only the refused operations are left out.
pub async fn apply(backend: &dyn Backend, groups: Vec<Group>) -> Outcome {
    let mut out = Outcome::default();
    let mut work = vec![Work::Try(groups)];
    while let Some(w) = work.pop() {
        match w {
            Work::Try(gs) => {
                let shape: Vec<(Unit, usize)> =
                    gs.iter().map(|g| (g.unit.clone(), g.ops.len())).collect();
                let ops: Vec<Op> = gs.into_iter().flat_map(|g| g.ops).collect();
                if ops.is_empty() {
                    continue;
                }
                match send(backend, ops, &mut out).await {
                    Sent::Written => {}
                    Sent::Refused(e, ops) => out.after_refusal(regroup(shape, ops), e, &mut work),
                    Sent::Stopped(e) => {
                        out.stopped = Some(e);
                        return out;
                    }
                }
            }
            Work::Split(mut g, e) => {
                if g.ops.len() <= 1 {
                    out.refuse(g.unit, g.ops, &e);
                    continue;
                }
                let b = g.ops.split_off(g.ops.len() / 2);
                let mut refused = Vec::with_capacity(2);
                for half in [g.ops, b] {
                    match send(backend, half, &mut out).await {
                        Sent::Stopped(e) => {
                            out.stopped = Some(e);
                            return out;
                        }
                        Sent::Refused(e, half) => refused.push((e, half)),
                        Sent::Written => {}
                    }
                }
                let unit = g.unit;
                let named = |e: &BackendError| matches!(e, BackendError::Refused { keys, .. } if !keys.is_empty());
                // Both halves refused, without naming operations: the unit as a whole is
                // refused (a name the catalog does not take), no need to go further.
                if refused.len() == 2 && refused.iter().all(|(e, _)| !named(e)) {
                    let mut halves = refused.into_iter();
                    if let Some((e, mut ops)) = halves.next() {
                        halves.for_each(|(_, rest)| ops.extend(rest));
                        out.refuse(unit, ops, &e);
                    }
                } else {
                    for (e, half) in refused {
                        let part = Group {
                            unit: unit.clone(),
                            ops: half,
                        };
                        out.after_refusal(vec![part], e, &mut work);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::Memory;
    use crate::fixtures::instances;
    use crate::model::Origin;

    fn unit(service: &str) -> Unit {
        Unit::Export {
            origin: Origin {
                namespace: "shop".into(),
                service: service.into(),
            }
            .into(),
            name: service.into(),
        }
    }

    fn put(key: &str) -> Op {
        Op::Put {
            key: key.into(),
            record: serde_json::json!({ "k": key }),
        }
    }

    /// The unit of a test key: what comes before its `-`.
    fn unit_of(op: &Op) -> Unit {
        unit(op.key().split('-').next().unwrap_or_default())
    }

    #[test]
    fn deletions_come_first_and_each_unit_stays_together() {
        let ops = vec![
            put("a-1"),
            put("b-1"),
            Op::Delete { key: "c-1".into() },
            put("a-2"),
            Op::Delete { key: "a-3".into() },
        ];
        let gs = groups(ops, unit_of);
        let shape: Vec<(Unit, Vec<&str>)> = gs
            .iter()
            .map(|g| (g.unit.clone(), g.ops.iter().map(Op::key).collect()))
            .collect();
        assert_eq!(
            shape,
            [
                (unit("c"), vec!["c-1"]),
                (unit("a"), vec!["a-3"]),
                (unit("a"), vec!["a-1", "a-2"]),
                (unit("b"), vec!["b-1"]),
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_unit_is_found_and_everything_else_is_written() {
        // Batches of 4, as a catalog with small requests: a refusal takes its whole batch.
        let mem = Memory::new("me", 4);
        mem.refuse_prefix("denied-", false);
        let mut ops: Vec<Op> = (0..20).map(|i| put(&format!("ok{}-{i}", i % 5))).collect();
        ops.insert(7, put("denied-1"));
        ops.insert(13, put("denied-2"));
        let out = apply(&mem, groups(ops, unit_of)).await;
        assert!(out.stopped.is_none());
        assert_eq!(out.written.len(), 20);
        let refused: Vec<(&Unit, usize)> =
            out.refused.iter().map(|(u, (o, _))| (u, o.len())).collect();
        assert_eq!(refused, [(&unit("denied"), 2)]);
        assert_eq!(mem.all().len(), 20);
        println!(
            "{} requests for 22 operations in batches of 4",
            out.requests
        );
    }

    #[tokio::test]
    async fn named_refusals_are_left_out_without_halving() {
        let mem = Memory::new("me", 64);
        mem.refuse_prefix("denied-", true);
        let ops: Vec<Op> = instances(10)
            .iter()
            .map(|i| put(&format!("ok-{}", i.stable_id())))
            .chain([put("denied-1")])
            .collect();
        let out = apply(&mem, groups(ops, unit_of)).await;
        assert_eq!(
            out.requests, 2,
            "one refused, one without the named operation"
        );
        assert_eq!(out.written.len(), 10);
        assert_eq!(out.refused.len(), 1);
    }

    #[tokio::test]
    async fn an_outage_stops_the_apply() {
        let mem = Memory::new("me", 64);
        mem.set_down(true);
        let out = apply(&mem, groups(vec![put("a-1"), put("b-1")], unit_of)).await;
        assert!(matches!(out.stopped, Some(BackendError::Unreachable(_))));
        assert!(out.written.is_empty() && out.refused.is_empty());
        assert_eq!(out.requests, 1);
    }
}
