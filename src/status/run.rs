//! The status loop: while this replica leads, writes the status of every ExternalCatalog and
//! ExternalRegistration when it changed, and a Warning Event for each problem when it appears
//! (what users see with `kubectl get xcat,xreg` and `kubectl describe`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tracing::warn;

use super::catalog::catalog_status;
use super::events::{Announcer, MAX_NOTE, normal, warning};
use super::registration::{
    export_status, import_status, refusal_message, refused_for, same_ignoring_sync_time,
};
use crate::api::crd::{
    Direction, ExternalCatalog, ExternalCatalogStatus, ExternalRegistration,
    ExternalRegistrationStatus,
};
use crate::export::desired::{Desired, Export, Source};
use crate::export::writers::CatalogView;
use crate::import::ImportView;
use crate::k8s::stores::Stores;
use crate::model::{BackendError, Problem, Reason};

/// What the status loop reads: the desired state, every catalog's and every import's view.
pub struct Views {
    pub desired: watch::Receiver<Arc<Desired>>,
    pub catalogs: watch::Receiver<BTreeMap<String, CatalogView>>,
    pub imports: watch::Receiver<HashMap<(String, String), ImportView>>,
}

/// What was written and announced while leading; forgotten when this replica stops leading.
#[derive(Default)]
struct Written {
    catalogs: HashMap<String, ExternalCatalogStatus>,
    registrations: HashMap<(String, String), ExternalRegistrationStatus>,
    problems: HashSet<(Source, String, Reason, String)>,
    /// Refused exports announced: (source, catalog, message).
    refusals: HashSet<(Source, String, String)>,
    /// Each catalog's connection as last announced.
    connections: HashMap<String, super::connection::Health>,
    /// Owner ids claimed by another cluster, announced: (catalog, message).
    claims: HashSet<(String, String)>,
    skips: HashSet<(String, String, String, String)>,
    /// Import problems announced: (namespace, name, reason, message).
    import_problems: HashSet<(String, String, Reason, String)>,
    /// Restarts announced, by object uid.
    restarts: HashMap<String, u32>,
    /// When this replica was last seen not leading: hold notes from before belong to a term
    /// that ended (its imports, started again, note the holds they still keep).
    notes_after: Option<Instant>,
    /// The newest hold note announced, by import.
    holds: HashMap<(String, String), Instant>,
}

/// Writes status and Events while the gate (leadership) is open.
pub async fn run(
    client: kube::Client,
    stores: Stores,
    views: Views,
    mut gate: watch::Receiver<bool>,
) -> Result<()> {
    let mut recorder = Announcer::new(client.clone());
    let mut written = Written::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if !*gate.borrow_and_update() {
            // Taken before the gate opens again: the imports of the next term may note their
            // holds before this loop's first round in it.
            written = Written {
                notes_after: Some(Instant::now()),
                ..Written::default()
            };
            gate.changed().await?;
            continue;
        }
        let d = views.desired.borrow().clone();
        let v = views.catalogs.borrow().clone();
        let imp = views.imports.borrow().clone();
        catalogs(&client, &stores, &v, &imp, &mut written).await;
        registrations(&client, &stores, &d, &v, &imp, &mut written).await;
        problems(&stores, &d, &mut recorder, &mut written).await;
        import_problems(&stores, &imp, &mut recorder, &mut written).await;
        refusals(&stores, &d, &v, &mut recorder, &mut written).await;
        claims(&stores, &v, &mut recorder, &mut written).await;
        super::connection::announce(&stores, &v, &mut recorder, &mut written.connections).await;
        skips(&stores, &imp, &mut recorder, &mut written).await;
        restarts(&stores, &v, &imp, &mut recorder, &mut written).await;
        holds(&stores, &imp, &mut recorder, &mut written).await;
    }
}

/// The status of every ExternalCatalog, written when it changed.
async fn catalogs(
    client: &kube::Client,
    stores: &Stores,
    v: &BTreeMap<String, CatalogView>,
    imp: &HashMap<(String, String), ImportView>,
    written: &mut Written,
) {
    let mut imported: HashMap<&str, i64> = HashMap::new();
    for view in imp.values() {
        *imported.entry(view.catalog.as_str()).or_default() += view.endpoints as i64;
    }
    for cat in stores.catalogs.state() {
        let name = cat.name_any();
        let Some(view) = v.get(&name) else { continue };
        let status = catalog_status(
            &cat,
            view,
            imported.get(name.as_str()).copied().unwrap_or(0),
        );
        if cat.status.as_ref() == Some(&status) || written.catalogs.get(&name) == Some(&status) {
            continue;
        }
        let api: Api<ExternalCatalog> = Api::all(client.clone());
        match patch_status(&api, &name, &status).await {
            Ok(()) => {
                written.catalogs.insert(name, status);
            }
            Err(e) => warn!(catalog = %name, error = %e, "updating ExternalCatalog status failed"),
        }
    }
}

/// The status of every ExternalRegistration, written when it changed.
async fn registrations(
    client: &kube::Client,
    stores: &Stores,
    d: &Desired,
    v: &BTreeMap<String, CatalogView>,
    imp: &HashMap<(String, String), ImportView>,
    written: &mut Written,
) {
    let exports: HashMap<(String, String), &Export> = d
        .exports
        .values()
        .filter_map(|e| match &e.source {
            Source::Registration { namespace, name } => {
                Some(((namespace.clone(), name.clone()), e))
            }
            Source::Annotation { .. } => None,
        })
        .collect();
    for reg in stores.registrations.state() {
        let (Some(ns), name) = (reg.namespace(), reg.name_any()) else {
            continue;
        };
        let key = (ns.clone(), name.clone());
        let status = match reg.spec.direction {
            Direction::Export => match exports.get(&key).copied() {
                Some(export) => export_status(&reg, export, v.get(&reg.spec.catalog_ref.name)),
                None => continue, // not folded into desired state yet
            },
            Direction::Import => match imp.get(&key) {
                Some(view) => import_status(&reg, view),
                None => continue, // no task yet
            },
        };
        if same_ignoring_sync_time(reg.status.as_ref(), &status)
            || written
                .registrations
                .get(&key)
                .is_some_and(|w| same_ignoring_sync_time(Some(w), &status))
        {
            continue;
        }
        let api: Api<ExternalRegistration> = Api::namespaced(client.clone(), &ns);
        match patch_status(&api, &name, &status).await {
            Ok(()) => {
                written.registrations.insert(key, status);
            }
            Err(e) => {
                warn!(registration = %format!("{ns}/{name}"), error = %e, "updating ExternalRegistration status failed")
            }
        }
    }
}

/// A Warning Event for each problem of an export when it appears.
async fn problems(stores: &Stores, d: &Desired, recorder: &mut Announcer, written: &mut Written) {
    let mut current = HashSet::new();
    let findings = d
        .exports
        .values()
        .flat_map(|e| e.problem.iter().chain(&e.warnings).map(move |p| (e, p)))
        .collect::<Vec<(&Export, &Problem)>>();
    for (e, p) in findings {
        let id = (
            e.source.clone(),
            e.catalog.clone(),
            p.reason,
            p.message.clone(),
        );
        current.insert(id.clone());
        if written.problems.contains(&id) {
            continue;
        }
        let Some(reference) = export_object(stores, &e.source) else {
            continue;
        };
        recorder
            .publish(&warning(p.reason, &p.message, "Export"), &reference)
            .await;
    }
    written.problems = current;
}

/// A Warning Event for each problem of an import when it appears (a policy that refuses it,
/// a Service that belongs to someone else, a missing catalog).
async fn import_problems(
    stores: &Stores,
    imp: &HashMap<(String, String), ImportView>,
    recorder: &mut Announcer,
    written: &mut Written,
) {
    let mut current = HashSet::new();
    for ((ns, name), view) in imp {
        let Some(p) = &view.problem else { continue };
        let id = (ns.clone(), name.clone(), p.reason, p.message.clone());
        current.insert(id.clone());
        if written.import_problems.contains(&id) {
            continue;
        }
        if let Some(reg) = stores.registrations.get(&ObjectRef::new(name).within(ns)) {
            recorder
                .publish(
                    &warning(p.reason, &p.message, "Import"),
                    &reg.object_ref(&()),
                )
                .await;
        }
    }
    written.import_problems = current;
}

/// The object an export's Events go to: its Service (annotation) or its registration.
fn export_object(stores: &Stores, source: &Source) -> Option<ObjectReference> {
    match source {
        Source::Annotation { namespace, service } => stores
            .services
            .get(&ObjectRef::new(service).within(namespace))
            .map(|s| s.object_ref(&())),
        Source::Registration { namespace, name } => stores
            .registrations
            .get(&ObjectRef::new(name).within(namespace))
            .map(|r| r.object_ref(&())),
    }
}

/// A Warning Event for each export whose writes its catalog refuses, when it appears (and
/// when the catalog's words change).
async fn refusals(
    stores: &Stores,
    d: &Desired,
    v: &BTreeMap<String, CatalogView>,
    recorder: &mut Announcer,
    written: &mut Written,
) {
    let mut current = HashSet::new();
    for e in d.exports.values() {
        let Some(view) = v.get(&e.catalog) else {
            continue;
        };
        let Some(r) = refused_for(e, &view.report.refused) else {
            continue;
        };
        let note = refusal_message(&e.catalog, r);
        let id = (e.source.clone(), e.catalog.clone(), note.clone());
        current.insert(id.clone());
        if written.refusals.contains(&id) {
            continue;
        }
        warn!(catalog = %e.catalog, export = %r.unit, error = %r.error, "export refused by its catalog");
        if let Some(reference) = export_object(stores, &e.source) {
            recorder
                .publish(&warning(Reason::Refused, &note, "Write"), &reference)
                .await;
        }
    }
    written.refusals = current;
}

/// A Warning Event on each ExternalCatalog whose owner id another cluster claimed, when it
/// appears: the owner id, both clusters and the way out (`backend::claim`).
async fn claims(
    stores: &Stores,
    v: &BTreeMap<String, CatalogView>,
    recorder: &mut Announcer,
    written: &mut Written,
) {
    let mut current = HashSet::new();
    for (name, view) in v {
        let error = (view.report.error.as_ref())
            .or_else(|| view.removal.as_ref().and_then(|r| r.error.as_ref()));
        let Some(BackendError::OwnerClaimed(note)) = error else {
            continue;
        };
        let id = (name.clone(), note.clone());
        current.insert(id.clone());
        if written.claims.contains(&id) {
            continue;
        }
        let Some(cat) = stores.catalogs.get(&ObjectRef::new(name)) else {
            continue;
        };
        warn!(catalog = %name, "{note}");
        recorder
            .publish(
                &warning(Reason::OwnerClaimed, note, "Write"),
                &cat.object_ref(&()),
            )
            .await;
    }
    written.claims = current;
}

/// One Warning Event per import and change when entries it skips appear: how many, and a few
/// of them with why (a catalog with thousands of bad entries must not flood the namespace).
async fn skips(
    stores: &Stores,
    imp: &HashMap<(String, String), ImportView>,
    recorder: &mut Announcer,
    written: &mut Written,
) {
    let mut current = HashSet::new();
    for ((ns, name), view) in imp.iter().filter(|(_, v)| !v.skipped.is_empty()) {
        let Some(reg) = stores.registrations.get(&ObjectRef::new(name).within(ns)) else {
            continue;
        };
        let mut new = Vec::new();
        for (id, why) in &view.skipped {
            let key = (ns.clone(), name.clone(), id.clone(), why.clone());
            if !written.skips.contains(&key) {
                new.push((id.as_str(), why.as_str()));
            }
            current.insert(key);
        }
        if new.is_empty() {
            continue;
        }
        new.sort_unstable();
        let note = skipped_note(&view.catalog, view.skipped.len(), &new);
        recorder
            .publish(
                &warning(Reason::UnparsableEntry, &note, "Import"),
                &reg.object_ref(&()),
            )
            .await;
    }
    written.skips = current;
}

/// Examples named in a skipped-entries Event.
const SKIP_EXAMPLES: usize = 3;

/// `skipped <id> in etcd: <why>` for one entry, else `skipped 40 entries in etcd (40 new), e.g.
/// <id>: <why>; …; and 37 more new`.
fn skipped_note(catalog: &str, total: usize, new: &[(&str, &str)]) -> String {
    let mut note = match new {
        [(id, why)] if total == 1 => format!("skipped {id} in {catalog}: {why}"),
        _ => {
            let examples: Vec<String> = new
                .iter()
                .take(SKIP_EXAMPLES)
                .map(|(id, why)| format!("{id}: {why}"))
                .collect();
            let more = new.len().saturating_sub(SKIP_EXAMPLES);
            let more = if more > 0 {
                format!("; and {more} more new")
            } else {
                String::new()
            };
            format!(
                "skipped {total} entries in {catalog} ({} new), e.g. {}{more}",
                new.len(),
                examples.join("; ")
            )
        }
    };
    if note.len() > MAX_NOTE {
        let cut = (0..MAX_NOTE)
            .rev()
            .find(|&i| note.is_char_boundary(i))
            .unwrap_or(0);
        note.truncate(cut);
        note.push('…');
    }
    note
}

/// A Warning Event on an ExternalCatalog or an import registration whose task stopped
/// unexpectedly and was started again, once per restart.
async fn restarts(
    stores: &Stores,
    v: &BTreeMap<String, CatalogView>,
    imp: &HashMap<(String, String), ImportView>,
    recorder: &mut Announcer,
    written: &mut Written,
) {
    let catalogs = v.iter().filter_map(|(name, view)| {
        let cat = stores.catalogs.get(&ObjectRef::new(name))?;
        Some((cat.object_ref(&()), "the catalog's writer", &view.task))
    });
    let imports = imp.iter().filter_map(|((ns, name), view)| {
        let reg = stores.registrations.get(&ObjectRef::new(name).within(ns))?;
        Some((reg.object_ref(&()), "the import", &view.task))
    });
    let found: Vec<_> = catalogs.chain(imports).collect();
    for (reference, what, task) in found {
        let uid = reference.uid.clone().unwrap_or_default();
        let announced = written.restarts.entry(uid).or_insert(task.restarts);
        if task.restarts <= *announced {
            continue;
        }
        *announced = task.restarts;
        let note = format!(
            "{what} stopped unexpectedly ({}) and was started again (restart {})",
            task.last_failure.as_deref().unwrap_or("no reason given"),
            task.restarts
        );
        recorder
            .publish(
                &warning(Reason::TaskRestarted, &note, "Supervise"),
                &reference,
            )
            .await;
    }
}

/// An Event for each hold of an import that began (Warning `ImportHeld`), ran out (Warning
/// `ImportHoldExpired`) or was released (Normal `ImportHoldReleased`), once.
async fn holds(
    stores: &Stores,
    imp: &HashMap<(String, String), ImportView>,
    recorder: &mut Announcer,
    written: &mut Written,
) {
    written.holds.retain(|k, _| imp.contains_key(k));
    for ((ns, name), view) in imp.iter().filter(|(_, v)| !v.hold_notes.is_empty()) {
        let Some(reg) = stores.registrations.get(&ObjectRef::new(name).within(ns)) else {
            continue;
        };
        let key = (ns.clone(), name.clone());
        let announced = written.holds.get(&key).copied();
        let fresh: Vec<_> = view
            .hold_notes
            .iter()
            .filter(|n| {
                written.notes_after.is_none_or(|after| n.at > after)
                    && announced.is_none_or(|a| n.at > a)
            })
            .collect();
        for n in fresh {
            let ev = match n.reason {
                Reason::ImportHoldReleased => normal(n.reason, &n.note, "Import"),
                _ => warning(n.reason, &n.note, "Import"),
            };
            recorder.publish(&ev, &reg.object_ref(&())).await;
            written.holds.insert(key.clone(), n.at);
        }
    }
}

async fn patch_status<K>(api: &Api<K>, name: &str, status: &impl serde::Serialize) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn skipped_entries_are_counted_with_a_few_examples_in_one_note() {
        let one = super::skipped_note("etcd", 1, &[("/s/a/providers/x", "not host:port")]);
        assert_eq!(one, "skipped /s/a/providers/x in etcd: not host:port");
        let ids: Vec<String> = (0..40).map(|i| format!("bad-{i:02}")).collect();
        let new: Vec<(&str, &str)> = ids.iter().map(|i| (i.as_str(), "not an address")).collect();
        let many = super::skipped_note("etcd", 41, &new);
        assert_eq!(
            many,
            "skipped 41 entries in etcd (40 new), e.g. bad-00: not an address; bad-01: not an \
             address; bad-02: not an address; and 37 more new"
        );
        let long = "x".repeat(2000);
        let cut = super::skipped_note("etcd", 2, &[("a", &long), ("b", "y")]);
        assert!(cut.len() <= super::MAX_NOTE + '…'.len_utf8() && cut.ends_with('…'));
    }

    use super::*;
    use crate::export::Report;
    use crate::fixtures::{FakeApi, catalog, eventually};
    use crate::runtime::supervisor::TaskState;
    use kube::runtime::reflector;
    use serde_json::Value;

    const CATALOG: &str = "/apis/catalog-bridge.io/v1alpha1/externalcatalogs/c";

    fn view(task: TaskState) -> CatalogView {
        CatalogView {
            kind: "consul",
            report: Report {
                reachable: Some(true),
                in_sync: true,
                entries: 2,
                ..Default::default()
            },
            problem: None,
            task,
            removal: None,
        }
    }

    fn ready(api: &FakeApi) -> Option<(String, String)> {
        let c = api.get(CATALOG)?;
        let conditions = c.pointer("/status/conditions")?.as_array()?.clone();
        let ready = conditions.iter().find(|c| c["type"] == "Ready")?;
        Some((
            ready["status"].as_str()?.to_string(),
            ready["reason"].as_str()?.to_string(),
        ))
    }

    #[tokio::test]
    async fn catalog_status_follows_its_writer_and_a_restart_is_announced() {
        let (api, client) = FakeApi::start();
        let cat = catalog("c");
        api.put(CATALOG, serde_json::to_value(cat.as_ref()).expect("json"));
        let (cats, mut w) = reflector::store();
        w.apply_watcher_event(&kube::runtime::watcher::Event::Apply((*cat).clone()));
        let stores = Stores {
            services: reflector::store().0,
            slices: reflector::store().0,
            catalogs: cats,
            registrations: reflector::store().0,
            namespaces: reflector::store().0,
        };
        let (_d, desired) = watch::channel(Arc::new(Desired::default()));
        let (views, catalogs) = watch::channel(BTreeMap::from([(
            "c".to_string(),
            view(TaskState::default()),
        )]));
        let (_i, imports) = watch::channel(HashMap::new());
        let (_gate_tx, gate) = watch::channel(true);
        let task = tokio::spawn(run(
            client,
            stores,
            Views {
                desired,
                catalogs,
                imports,
            },
            gate,
        ));
        eventually("Ready=True InSync", || {
            ready(&api) == Some(("True".into(), "InSync".into()))
        })
        .await;

        // The writer panicked and waits to be started again.
        views.send_replace(BTreeMap::from([(
            "c".to_string(),
            view(TaskState {
                restarts: 1,
                last_failure: Some("panicked: boom".into()),
                down: true,
            }),
        )]));
        eventually("Ready=False TaskRestarted", || {
            ready(&api) == Some(("False".into(), "TaskRestarted".into()))
        })
        .await;
        eventually("a TaskRestarted Event", || {
            api.under("/apis/events.k8s.io/v1/namespaces/")
                .values()
                .any(|e| e["reason"] == "TaskRestarted")
        })
        .await;
        let restarts = api
            .get(CATALOG)
            .and_then(|c| c.pointer("/status/taskRestarts").cloned());
        assert_eq!(restarts, Some(Value::from(1)));
        task.abort();
    }
}
