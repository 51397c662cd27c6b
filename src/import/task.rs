//! One import task: while this replica leads, it follows its external service in the catalog
//! (`Backend::watch_service`) and keeps the Service and EndpointSlices equal to the healthy
//! set (render, then apply).
//!
//! Nothing is deleted because a read failed: until the first successful read nothing is applied,
//! and while the catalog is unreachable the last known instances stay in place. The imported
//! objects are kept as rendered: when the controller's watches see one deleted or changed by
//! someone else ([`Touched`]), the task applies it again. A catalog that suddenly stops listing
//! most instances does not empty the Service at once: the empty-hold ([`hold`]) keeps the
//! missing endpoints for `spec.import.emptyHoldSeconds`.
//!
//! [`hold`]: super::hold

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use super::addresses::screened;
use super::apply::{self, Written};
use super::hold::{self, Answer, Change, Hold};
use super::render::{self, Kind, Rendered};
use super::touched::{Touched, TouchedObject, Watched};
use crate::api::crd::ExternalRegistration;
use crate::api::labels::{REGISTRATION_LABEL, SERVICE_NAME_LABEL};
use crate::api::policy::AddressRules;
use crate::backend::{Backend, BackendError, External, ImportSnapshot};
use crate::model::{Problem, Reason};
use crate::runtime::Metrics;
use crate::runtime::supervisor::TaskState;

/// What one import task last saw and did, for status, Events and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportView {
    pub catalog: String,
    pub service_name: String,
    /// Endpoints now in the EndpointSlices.
    pub endpoints: usize,
    /// Entries the catalog holds that could not be parsed: (id, why).
    pub skipped: Vec<(String, String)>,
    /// The catalog's last read failed (the last known endpoints stay).
    pub catalog_error: Option<BackendError>,
    /// Writing the Service or EndpointSlices failed.
    pub apply_error: Option<String>,
    /// The first read succeeded and its result was applied.
    pub synced: bool,
    /// The import cannot run (catalog missing, backend not buildable).
    pub problem: Option<Problem>,
    /// The import's task: restarts, and whether it is down right now.
    pub task: TaskState,
    /// The empty-hold running now: endpoints kept although the catalog no longer lists them.
    pub held: Option<Held>,
    /// How holds began and ended, the last few, oldest first: for Events.
    pub hold_notes: Vec<HoldNote>,
}

/// An empty-hold running: the catalog suddenly stopped listing most instances.
#[derive(Clone, Debug, PartialEq)]
pub struct Held {
    /// Endpoints kept that the catalog does not list.
    pub endpoints: usize,
    /// When they go unless the catalog lists them again.
    pub until: SystemTime,
    /// `spec.import.emptyHoldSeconds`.
    pub seconds: u64,
}

/// A hold that began or ended, as users read it.
#[derive(Clone, Debug, PartialEq)]
pub struct HoldNote {
    pub at: Instant,
    /// `ImportHeld`, `ImportHoldExpired` or `ImportHoldReleased`.
    pub reason: Reason,
    pub note: String,
}

/// Hold notes a view keeps.
const HOLD_NOTES_KEPT: usize = 8;

/// What users read about `change` of the hold of `external` in `catalog`.
fn hold_note(change: &Change, catalog: &str, external: &str, seconds: u64) -> HoldNote {
    let (reason, note) = match change {
        Change::Started {
            held,
            before,
            listed,
        } => (
            Reason::ImportHeld,
            format!(
                "catalog {catalog} suddenly lists {listed} healthy instance(s) of {external} \
                 where {before} endpoint(s) were published, and no longer knows {held} of them \
                 at all (a catalog restarted empty or wiped?): keeping those {held} endpoint(s) \
                 for {seconds} s (spec.import.emptyHoldSeconds) unless it lists them again"
            ),
        ),
        Change::Released { listed } => (
            Reason::ImportHoldReleased,
            format!(
                "catalog {catalog} lists the {listed} held instance(s) of {external} again: \
                 the hold is over"
            ),
        ),
        Change::Expired { removed } => (
            Reason::ImportHoldExpired,
            format!(
                "the hold of {external} ran out ({seconds} s) and catalog {catalog} still does \
                 not list {removed} instance(s): their endpoints were removed"
            ),
        ),
    };
    HoldNote {
        at: Instant::now(),
        reason,
        note,
    }
}

/// What the import's Service and EndpointSlices publish now, as the stores hold them: where a
/// task that starts again (a new leader, a changed registration) begins its hold.
fn stored_endpoints(watched: &Watched, reg: &ExternalRegistration) -> Vec<External> {
    let (Some(ns), name) = (reg.namespace(), reg.name_any()) else {
        return Vec::new();
    };
    let svc_name = render::service_name(reg);
    let service = watched
        .services
        .get(&ObjectRef::new(&svc_name).within(&ns))
        .filter(|s| s.labels().get(REGISTRATION_LABEL) == Some(&name));
    let slices: Vec<_> = watched
        .slices
        .state()
        .into_iter()
        .filter(|s| {
            let l = s.labels();
            s.namespace().as_deref() == Some(ns.as_str())
                && l.get(REGISTRATION_LABEL) == Some(&name)
                && l.get(SERVICE_NAME_LABEL) == Some(&svc_name)
        })
        .collect();
    hold::published(
        service.as_deref(),
        &slices,
        reg.spec.external_name.as_deref().unwrap_or_default(),
    )
}

/// Whether the API server still holds `reg`, the same object, not being deleted. An answer
/// that cannot be had counts as yes: undoing a change is the safe side, and an object
/// re-created for a registration that is gone goes again with it (owner reference).
async fn registration_stands(client: &kube::Client, reg: &ExternalRegistration) -> bool {
    let Some(ns) = reg.namespace() else {
        return false;
    };
    let api: kube::Api<ExternalRegistration> = kube::Api::namespaced(client.clone(), &ns);
    // A list by name: the role lists and watches registrations, it does not get them.
    let lp = kube::api::ListParams::default().fields(&format!("metadata.name={}", reg.name_any()));
    match api.list(&lp).await {
        Ok(live) => live
            .items
            .iter()
            .any(|r| r.uid() == reg.uid() && r.metadata.deletion_timestamp.is_none()),
        Err(e) => {
            warn!(registration = %format!("{ns}/{}", reg.name_any()), error = %e, "reading the registration before undoing a change; undoing it");
            true
        }
    }
}

/// The `outcome` label of a hold's change in `catalog_bridge_import_holds_total`.
fn hold_outcome(c: &Change) -> &'static str {
    match c {
        Change::Started { .. } => "started",
        Change::Released { .. } => "released",
        Change::Expired { .. } => "expired",
    }
}

/// Resource versions kept per object to recognise this import's own writes in the watch.
const VERSIONS_KEPT: usize = 8;
/// Someone else's changes are undone at once, up to this many times per [`REPAIR_WINDOW`] and
/// import; beyond that, after a pause, so that a controller fighting over the same fields is
/// not answered at full speed.
const REPAIR_BURST: usize = 5;
const REPAIR_WINDOW: Duration = Duration::from_secs(5);

/// When this import last undid someone else's changes.
#[derive(Default)]
struct Repairs(VecDeque<Instant>);

impl Repairs {
    /// Whether a repair may go now (and counts it if so).
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        while self
            .0
            .front()
            .is_some_and(|t| now.duration_since(*t) >= REPAIR_WINDOW)
        {
            self.0.pop_front();
        }
        if self.0.len() >= REPAIR_BURST {
            return false;
        }
        self.0.push_back(now);
        true
    }
}

/// What one import task wrote, to tell its own changes from someone else's.
#[derive(Default)]
struct Ours(HashMap<(Kind, String), Own>);

#[derive(Default)]
struct Own {
    uid: Option<String>,
    versions: VecDeque<String>,
}

impl Ours {
    fn record(&mut self, written: &[Written], applied: &Rendered) {
        for w in written {
            let own = self.0.entry((w.kind, w.name.clone())).or_default();
            own.uid.clone_from(&w.uid);
            if let Some(v) = &w.resource_version
                && !own.versions.contains(v)
            {
                if own.versions.len() == VERSIONS_KEPT {
                    own.versions.pop_front();
                }
                own.versions.push_back(v.clone());
            }
        }
        self.0.retain(|(kind, name), _| applied.holds(*kind, name));
    }

    /// Whether `t` was done by someone else: a deletion of the object this import wrote, or a
    /// version of it this import did not write.
    fn foreign(&self, t: &TouchedObject) -> bool {
        let Some(own) = self.0.get(&(t.kind, t.name.clone())) else {
            return true;
        };
        if t.deleted {
            own.uid.is_none() || t.uid.is_none() || own.uid == t.uid
        } else {
            !t.resource_version
                .as_ref()
                .is_some_and(|v| own.versions.contains(v))
        }
    }

    /// The objects of `applied` that the stores hold in a version this import did not write,
    /// or not at all.
    fn drifted(&self, applied: &Rendered, ns: &str, watched: &Watched) -> Vec<(Kind, String)> {
        applied
            .objects()
            .filter(|(kind, name)| {
                let stored = match kind {
                    Kind::Service => watched
                        .services
                        .get(&ObjectRef::new(name).within(ns))
                        .map(|o| o.resource_version()),
                    Kind::EndpointSlice => watched
                        .slices
                        .get(&ObjectRef::new(name).within(ns))
                        .map(|o| o.resource_version()),
                };
                let own = self.0.get(&(*kind, name.clone()));
                !matches!((stored, own), (Some(Some(v)), Some(own)) if own.versions.contains(&v))
            })
            .collect()
    }
}

/// What every import task shares.
#[derive(Clone)]
pub struct Task {
    pub client: kube::Client,
    pub metrics: Arc<Metrics>,
    pub watched: Watched,
    /// `--dry-run`: log what would be applied, apply nothing.
    pub dry_run: bool,
}

/// One import: while the gate is open, watch the catalog and apply every change. Ends when
/// the gate closes for good, or when the catalog's watch ends with an error (its view then says
/// why).
pub async fn run(
    task: Task,
    reg: Arc<ExternalRegistration>,
    backend: Arc<dyn Backend>,
    rules: Arc<AddressRules>,
    mut gate: watch::Receiver<bool>,
    view: watch::Sender<ImportView>,
) -> anyhow::Result<()> {
    let Task {
        client,
        metrics,
        watched,
        dry_run,
    } = task;
    let external = reg.spec.external_name.clone().unwrap_or_default();
    let ns = reg.namespace().unwrap_or_default();
    let name = reg.name_any();
    let catalog = reg.spec.catalog_ref.name.clone();
    loop {
        while !*gate.borrow_and_update() {
            if gate.changed().await.is_err() {
                return Ok(());
            }
        }
        let (tx, mut rx) = watch::channel(ImportSnapshot::default());
        let watcher = {
            let backend = backend.clone();
            let external = external.clone();
            tokio::spawn(async move { backend.watch_service(&external, tx).await })
        };
        // When to apply again after a failure or a paused repair (a deadline: wake-ups for
        // other imports' objects must not push it back).
        let mut retry_at: Option<tokio::time::Instant> = None;
        // What the last successful apply wrote (so unchanged objects are not sent again).
        let mut applied: Option<Rendered> = None;
        // Objects of `applied` someone else deleted or changed: sent again by the next apply.
        let mut dirty: HashSet<(Kind, String)> = HashSet::new();
        let mut ours = Ours::default();
        let mut touched = watched.touched.subscribe();
        let mut repairs = Repairs::default();
        let empty_hold = reg.spec.empty_hold();
        let mut hold = Hold::new(empty_hold);
        hold.seed(stored_endpoints(&watched, &reg));
        // When the running hold must be looked at again (its deadline).
        let mut hold_wake: Option<tokio::time::Instant> = None;
        // The running hold's deadline, and the same on the wall clock (for status), taken once.
        let mut hold_deadline: Option<(Instant, SystemTime)> = None;
        loop {
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                r = gate.changed() => if r.is_err() || !*gate.borrow() { break },
                _ = tokio::time::sleep_until(hold_wake.unwrap_or_else(tokio::time::Instant::now)), if hold_wake.is_some() => {
                    hold_wake = None;
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                    retry_at = None;
                }
                t = touched.recv() => {
                    let Some(a) = applied.as_ref() else { continue };
                    let undo: Vec<(Kind, String)> = match t {
                        Ok(Touched::Object(o)) => {
                            if o.namespace == ns && o.registration == name && a.holds(o.kind, &o.name) && ours.foreign(&o) {
                                vec![(o.kind, o.name)]
                            } else {
                                Vec::new()
                            }
                        }
                        Ok(Touched::Relisted) | Err(broadcast::error::RecvError::Lagged(_)) => ours.drifted(a, &ns, &watched),
                        Err(broadcast::error::RecvError::Closed) => break,
                    };
                    if undo.is_empty() {
                        continue;
                    }
                    // The garbage collector removing the objects of a registration being
                    // deleted is no one's change to undo. The registrations' watch may not
                    // have seen the delete yet (the collector acts on the owner's removal,
                    // and the watches are not ordered), so the API server is asked.
                    if !watched.holds(&reg) || !registration_stands(&client, &reg).await {
                        continue;
                    }
                    for (kind, object) in undo {
                        info!(registration = %format!("{ns}/{name}"), ?kind, object = %object, "imported object deleted or changed by someone else; applying it again");
                        dirty.insert((kind, object));
                    }
                    if !repairs.allow() {
                        retry_at.get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let snap = screened(rx.borrow_and_update().clone(), &rules);
            metrics.import_skipped(&catalog, &ns, &name, snap.skipped.len() as i64);
            view.send_modify(|v| {
                v.catalog_error = snap.error.clone();
                v.skipped = snap.skipped.clone();
            });
            if !snap.synced {
                continue; // nothing read yet: nothing to apply, nothing to delete
            }
            let conflict = watched.conflict(&reg);
            let blocked = conflict.is_some();
            view.send_if_modified(|v| {
                let keep = v
                    .problem
                    .as_ref()
                    .is_some_and(|p| p.reason != Reason::ServiceConflict);
                let new = if keep { v.problem.clone() } else { conflict };
                let changed = v.problem != new;
                v.problem = new;
                changed
            });
            if blocked {
                // Looked at again on the next change, or after a pause.
                retry_at
                    .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(2));
                continue;
            }
            let now = Instant::now();
            let (instances, changes) = hold.decide(
                Answer {
                    healthy: &snap.instances,
                    failing: &snap.failing,
                    fresh: snap.error.is_none(),
                },
                now,
            );
            // Woken at the deadline; a deadline passed while the catalog cannot be read waits
            // for its next answer.
            hold_wake = hold
                .until()
                .filter(|u| *u > now)
                .map(tokio::time::Instant::from_std);
            let seconds = empty_hold.as_secs();
            for c in &changes {
                match c {
                    Change::Released { .. } => {
                        info!(registration = %format!("{ns}/{name}"), change = ?c, "import hold over: the catalog lists the held instances again")
                    }
                    _ => {
                        warn!(registration = %format!("{ns}/{name}"), change = ?c, hold_seconds = seconds, "import hold")
                    }
                }
                metrics.import_hold_changed(&catalog, hold_outcome(c));
            }
            metrics.import_held(&catalog, &ns, &name, hold.held() as i64);
            hold_deadline = hold.until().map(|u| match hold_deadline {
                Some((seen, wall)) if seen == u => (seen, wall),
                _ => (u, SystemTime::now() + u.saturating_duration_since(now)),
            });
            let held = hold_deadline.map(|(_, until)| Held {
                endpoints: hold.held(),
                until,
                seconds,
            });
            view.send_if_modified(|v| {
                let changed = v.held != held || !changes.is_empty();
                v.held = held;
                for c in &changes {
                    if v.hold_notes.len() == HOLD_NOTES_KEPT {
                        v.hold_notes.remove(0);
                    }
                    v.hold_notes
                        .push(hold_note(c, &catalog, &external, seconds));
                }
                changed
            });
            let snap = ImportSnapshot { instances, ..snap };
            let result = match render::render(&reg, &snap, applied.as_ref()) {
                Ok(r) if dry_run => {
                    if applied.as_ref() != Some(&r) {
                        info!(registration = %format!("{ns}/{name}"), service = ?r.service.as_ref().map(|s| s.name_any()), slices = r.slices.len(), endpoints = r.endpoints, "dry run: would apply the imported Service and EndpointSlices");
                    }
                    let n = r.endpoints;
                    applied = Some(r);
                    Ok(n)
                }
                Ok(r) => {
                    match apply::apply(&client, &reg, &r, applied.as_ref(), &dirty).await {
                        Ok(written) => {
                            let n = r.endpoints;
                            ours.record(&written, &r);
                            applied = Some(r);
                            dirty.clear();
                            Ok(n)
                        }
                        Err(e) => {
                            applied = None; // unknown state: the next apply sends everything
                            dirty.clear();
                            Err(e)
                        }
                    }
                }
                Err(e) => Err(e),
            };
            retry_at = result
                .is_err()
                .then(|| tokio::time::Instant::now() + Duration::from_secs(1));
            match result {
                Ok(n) => {
                    // (`entries{direction="import"}` is the sum over imports: see `views`.)
                    view.send_modify(|v| {
                        v.endpoints = n;
                        v.apply_error = None;
                        v.synced = true;
                    });
                }
                Err(e) => {
                    warn!(registration = %reg.name_any(), error = %format!("{e:#}"), "applying the imported Service failed; retrying");
                    view.send_modify(|v| v.apply_error = Some(format!("{e:#}")));
                }
            }
        }
        watcher.abort();
        match tokio::time::timeout(Duration::from_millis(10), watcher).await {
            Ok(Ok(Err(e))) => {
                view.send_modify(|v| v.problem = Some(Problem::new(e.reason(), e.to_string())));
                return Ok(());
            }
            // A watch that panicked is a bug: this task fails with it, and its supervisor
            // counts it and starts the import again.
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn touched(kind: Kind, name: &str, uid: &str, version: &str, deleted: bool) -> TouchedObject {
        TouchedObject {
            namespace: "shop".into(),
            registration: "cache".into(),
            kind,
            name: name.into(),
            uid: Some(uid.into()),
            resource_version: Some(version.into()),
            deleted,
        }
    }

    fn written(kind: Kind, name: &str, uid: &str, version: &str) -> Written {
        Written {
            kind,
            name: name.into(),
            uid: Some(uid.into()),
            resource_version: Some(version.into()),
        }
    }

    fn rendered(slices: &[&str]) -> Rendered {
        Rendered {
            service: None,
            slices: slices
                .iter()
                .map(|n| EndpointSlice {
                    metadata: kube::api::ObjectMeta {
                        name: Some(n.to_string()),
                        ..Default::default()
                    },
                    address_type: "IPv4".into(),
                    endpoints: Vec::new(),
                    ports: None,
                })
                .collect(),
            endpoints: 0,
            placement: Default::default(),
        }
    }

    #[test]
    fn own_writes_are_told_from_someone_elses() {
        let s = Kind::EndpointSlice;
        let applied = rendered(&["a"]);
        let mut ours = Ours::default();
        ours.record(&[written(s, "a", "u1", "5")], &applied);
        ours.record(&[written(s, "a", "u1", "7")], &applied);
        // The watch reports this import's writes late, in any order: none is foreign.
        assert!(!ours.foreign(&touched(s, "a", "u1", "5", false)));
        assert!(!ours.foreign(&touched(s, "a", "u1", "7", false)));
        // A version it did not write, and the deletion of what it wrote, are.
        assert!(ours.foreign(&touched(s, "a", "u1", "9", false)));
        assert!(ours.foreign(&touched(s, "a", "u1", "9", true)));
        // The deletion of an earlier incarnation (reported after the object came back) is not.
        ours.record(&[written(s, "a", "u2", "11")], &applied);
        assert!(!ours.foreign(&touched(s, "a", "u1", "10", true)));
        // Objects no longer applied are forgotten; anything about them counts as foreign.
        ours.record(&[], &rendered(&[]));
        assert!(ours.foreign(&touched(s, "a", "u2", "11", false)));
    }

    #[test]
    fn a_rendering_holds_its_objects_by_kind_and_name() {
        let r = rendered(&["a", "b"]);
        assert!(r.holds(Kind::EndpointSlice, "a"));
        assert!(!r.holds(Kind::EndpointSlice, "c"));
        assert!(!r.holds(Kind::Service, "a"), "no Service rendered");
        assert_eq!(r.objects().count(), 2);
    }

    #[test]
    fn repairs_go_at_once_up_to_the_burst_then_wait() {
        let mut repairs = Repairs::default();
        for _ in 0..REPAIR_BURST {
            assert!(repairs.allow());
        }
        assert!(!repairs.allow(), "a fight is not answered at full speed");
    }
}
