//! Status and Events: what users see with `kubectl get xcat,xreg` and `kubectl describe`.
//! Written by the leader only, and only when something changed (a condition keeps its
//! `lastTransitionTime` while its status stays the same).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tracing::warn;

use crate::controller::Stores;
use crate::crd::{
    Condition, Direction, ExternalCatalog, ExternalCatalogStatus, ExternalRegistration,
    ExternalRegistrationStatus,
};
use crate::desired::{Desired, Export, Problem, Source};
use crate::importer::ImportView;
use crate::writer::Report;

/// A catalog as the status loop sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogView {
    pub kind: &'static str,
    pub report: Report,
    /// Set when the backend could not even be built.
    pub problem: Option<Problem>,
}

/// RFC 3339, seconds, UTC: the form of Kubernetes timestamps.
pub fn now() -> String {
    format_time(k8s_openapi::jiff::Timestamp::now())
}

fn format_time(t: k8s_openapi::jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn system_time(t: std::time::SystemTime) -> Option<String> {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .ok()
        .map(format_time)
}

/// A condition, keeping the previous `lastTransitionTime` when the status did not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: Option<bool>,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = match ok {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now);
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

fn catalog_status(
    cat: &ExternalCatalog,
    view: &CatalogView,
    imported: i64,
) -> ExternalCatalogStatus {
    let prev = cat.status.clone().unwrap_or_default();
    let generation = cat.metadata.generation;
    let r = &view.report;
    let (reachable, reach_reason, reach_msg) = match (&view.problem, r.reachable, &r.error) {
        (Some(p), _, _) => (Some(false), p.reason, p.message.clone()),
        (None, Some(false), Some(e)) => (Some(false), e.reason(), e.to_string()),
        (None, Some(true), _) => (Some(true), "Connected", "the catalog answers".to_string()),
        _ => (None, "NotContacted", "not contacted yet".to_string()),
    };
    let (ready, ready_reason, ready_msg) = match (&view.problem, &r.error) {
        (Some(p), _) => (Some(false), p.reason, p.message.clone()),
        (None, Some(e)) => (Some(false), e.reason(), e.to_string()),
        (None, None) if r.in_sync => match &r.warning {
            None => (
                Some(true),
                "InSync",
                format!("{} exported entries in place", r.entries),
            ),
            Some(w) => (
                Some(true),
                "NeedsAttention",
                format!("{} exported entries in place, but {w}", r.entries),
            ),
        },
        _ => (None, "Syncing", "not in sync yet".to_string()),
    };
    ExternalCatalogStatus {
        conditions: vec![
            condition(
                &prev.conditions,
                "Reachable",
                reachable,
                reach_reason,
                reach_msg,
                generation,
            ),
            condition(
                &prev.conditions,
                "Ready",
                ready,
                ready_reason,
                ready_msg,
                generation,
            ),
        ],
        kind: Some(view.kind.to_string()),
        last_contact_time: r
            .last_contact
            .and_then(system_time)
            .or(prev.last_contact_time),
        server: r.server.clone().or(prev.server),
        exported_entries: r.entries as i64,
        imported_entries: imported,
        observed_generation: generation,
    }
}

/// A condition's inputs: status (`None` = Unknown), reason, message.
type Verdict = (Option<bool>, &'static str, String);

fn registration_status(
    reg: &ExternalRegistration,
    e: &Export,
    view: Option<&CatalogView>,
) -> ExternalRegistrationStatus {
    let catalog = &reg.spec.catalog_ref.name;
    let ready: Verdict = match &e.problem {
        Some(p) => (Some(false), p.reason, p.message.clone()),
        None => (
            Some(true),
            "Exported",
            format!(
                "{} endpoint(s) of Service {} exported to {catalog} as {}",
                e.endpoints, e.service, e.external_name
            ),
        ),
    };
    let synced: Verdict = match (ready.0, view) {
        (Some(false), _) => ready.clone(),
        (_, None) => (
            Some(false),
            "CatalogNotFound",
            format!("ExternalCatalog {catalog:?} does not exist"),
        ),
        (_, Some(v)) => match (&v.problem, &v.report.error) {
            (Some(p), _) => (
                Some(false),
                p.reason,
                format!("catalog {catalog}: {}", p.message),
            ),
            (None, Some(err)) => (
                Some(false),
                err.reason(),
                format!("catalog {catalog}: {err}"),
            ),
            (None, None) if v.report.in_sync => (
                Some(true),
                "InSync",
                format!("catalog {catalog} holds every exported endpoint"),
            ),
            _ => (
                None,
                "Syncing",
                format!("catalog {catalog} is being updated"),
            ),
        },
    };
    // Endpoints now in sync: while the catalog is not (down, being written), the count last
    // seen in sync stays.
    let endpoints = match (&e.problem, synced.0) {
        (Some(_), _) => 0,
        (None, Some(true)) => e.endpoints,
        (None, _) => reg
            .status
            .as_ref()
            .map_or(0, |s| usize::try_from(s.endpoints).unwrap_or(0)),
    };
    finish(reg, ready, synced, endpoints, &e.service, &e.external_name)
}

fn import_status(reg: &ExternalRegistration, v: &ImportView) -> ExternalRegistrationStatus {
    let catalog = &v.catalog;
    let external = reg.spec.external_name.clone().unwrap_or_default();
    let ready: Verdict = match (&v.problem, v.synced) {
        (Some(p), _) => (Some(false), p.reason, p.message.clone()),
        (None, false) => (
            None,
            "Waiting",
            format!("waiting for the first read of {external} from {catalog}"),
        ),
        (None, true) => (
            Some(true),
            "Imported",
            format!(
                "{} endpoint(s) of {external} from {catalog} in Service {}{}",
                v.endpoints,
                v.service_name,
                if v.skipped.is_empty() {
                    String::new()
                } else {
                    format!("; {} unparsable entries skipped", v.skipped.len())
                }
            ),
        ),
    };
    let synced: Verdict = match (&v.problem, &v.apply_error, &v.catalog_error) {
        (Some(p), _, _) => (Some(false), p.reason, p.message.clone()),
        (None, Some(err), _) => (Some(false), "ApplyFailed", err.clone()),
        (None, None, Some(err)) => (
            Some(false),
            err.reason(),
            format!(
                "catalog {catalog}: {err}; keeping the last known {} endpoint(s)",
                v.endpoints
            ),
        ),
        (None, None, None) if v.synced => (
            Some(true),
            "InSync",
            format!("the EndpointSlices hold the healthy instances {catalog} reports"),
        ),
        _ => (None, "Syncing", format!("reading {catalog}")),
    };
    finish(reg, ready, synced, v.endpoints, &v.service_name, &external)
}

/// Status from the two verdicts, keeping transition and sync times where nothing changed.
fn finish(
    reg: &ExternalRegistration,
    ready: Verdict,
    synced: Verdict,
    endpoints: usize,
    service: &str,
    external: &str,
) -> ExternalRegistrationStatus {
    let prev = reg.status.clone().unwrap_or_default();
    let generation = reg.metadata.generation;
    let endpoints = endpoints as i64;
    let in_sync = synced.0 == Some(true);
    let conditions = vec![
        condition(
            &prev.conditions,
            "Ready",
            ready.0,
            ready.1,
            ready.2,
            generation,
        ),
        condition(
            &prev.conditions,
            "Synced",
            synced.0,
            synced.1,
            synced.2,
            generation,
        ),
    ];
    let synced_changed = prev
        .conditions
        .iter()
        .find(|c| c.type_ == "Synced")
        .map(|c| c.status.as_str())
        != Some(conditions[1].status.as_str());
    let endpoints_changed = prev.endpoints != endpoints;
    ExternalRegistrationStatus {
        observed_generation: generation,
        conditions,
        service_name: Some(service.to_string()),
        external_name: Some(external.to_string()),
        endpoints,
        last_sync_time: if in_sync && (synced_changed || endpoints_changed) {
            Some(now())
        } else {
            prev.last_sync_time
        },
    }
}

/// Writes status and Events while the gate (leadership) is open.
pub async fn run(
    client: kube::Client,
    stores: Stores,
    desired: watch::Receiver<Arc<Desired>>,
    views: watch::Receiver<BTreeMap<String, CatalogView>>,
    imports: watch::Receiver<HashMap<(String, String), ImportView>>,
    mut gate: watch::Receiver<bool>,
) -> Result<()> {
    let mut recorder = Announcer::new(client.clone());
    let mut written_cat: HashMap<String, ExternalCatalogStatus> = HashMap::new();
    let mut written_reg: HashMap<(String, String), ExternalRegistrationStatus> = HashMap::new();
    let mut announced: HashSet<(Source, String, &'static str, String)> = HashSet::new();
    let mut skips_announced: HashSet<(String, String, String, String)> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if !*gate.borrow_and_update() {
            written_cat.clear();
            written_reg.clear();
            announced.clear();
            skips_announced.clear();
            gate.changed().await?;
            continue;
        }
        let d = desired.borrow().clone();
        let v = views.borrow().clone();
        let imp = imports.borrow().clone();
        let mut imported: HashMap<&str, i64> = HashMap::new();
        for view in imp.values() {
            *imported.entry(view.catalog.as_str()).or_default() += view.endpoints as i64;
        }

        for cat in stores.catalogs.state() {
            let name = cat.name_any();
            let status = match v.get(&name) {
                Some(view) => catalog_status(
                    &cat,
                    view,
                    imported.get(name.as_str()).copied().unwrap_or(0),
                ),
                None => continue,
            };
            if cat.status.as_ref() == Some(&status) || written_cat.get(&name) == Some(&status) {
                continue;
            }
            let api: Api<ExternalCatalog> = Api::all(client.clone());
            match patch_status(&api, &name, &status).await {
                Ok(()) => {
                    written_cat.insert(name, status);
                }
                Err(e) => {
                    warn!(catalog = %name, error = %e, "updating ExternalCatalog status failed")
                }
            }
        }

        let exports: HashMap<(String, String), &Export> = d
            .exports
            .iter()
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
                    Some(export) => {
                        registration_status(&reg, export, v.get(&reg.spec.catalog_ref.name))
                    }
                    None => continue, // not folded into desired state yet
                },
                Direction::Import => match imp.get(&key) {
                    Some(view) => import_status(&reg, view),
                    None => continue, // no task yet
                },
            };
            if same_ignoring_sync_time(reg.status.as_ref(), &status)
                || written_reg
                    .get(&key)
                    .is_some_and(|w| same_ignoring_sync_time(Some(w), &status))
            {
                continue;
            }
            let api: Api<ExternalRegistration> = Api::namespaced(client.clone(), &ns);
            match patch_status(&api, &name, &status).await {
                Ok(()) => {
                    written_reg.insert(key, status);
                }
                Err(e) => {
                    warn!(registration = %format!("{ns}/{name}"), error = %e, "updating ExternalRegistration status failed")
                }
            }
        }

        // A Warning Event for each problem when it appears.
        let mut current = HashSet::new();
        let findings = d
            .exports
            .iter()
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
            if announced.contains(&id) {
                continue;
            }
            let reference = match &e.source {
                Source::Annotation { namespace, service } => stores
                    .services
                    .state()
                    .into_iter()
                    .find(|s| {
                        s.namespace().as_deref() == Some(namespace) && s.name_any() == *service
                    })
                    .map(|s| s.object_ref(&())),
                Source::Registration { namespace, name } => stores
                    .registrations
                    .state()
                    .into_iter()
                    .find(|r| r.namespace().as_deref() == Some(namespace) && r.name_any() == *name)
                    .map(|r| r.object_ref(&())),
            };
            let Some(reference) = reference else { continue };
            let ev = Event {
                type_: EventType::Warning,
                reason: p.reason.to_string(),
                note: Some(p.message.chars().take(1000).collect()),
                action: "Export".into(),
                secondary: None,
            };
            recorder.publish(&ev, &reference).await;
        }
        announced = current;

        // A Warning Event for each catalog entry an import had to skip, when it appears.
        let mut current_skips = HashSet::new();
        for reg in stores.registrations.state() {
            let Some(ns) = reg.namespace() else { continue };
            let Some(view) = imp.get(&(ns.clone(), reg.name_any())) else {
                continue;
            };
            for (id, why) in &view.skipped {
                let key = (ns.clone(), reg.name_any(), id.clone(), why.clone());
                current_skips.insert(key.clone());
                if skips_announced.contains(&key) {
                    continue;
                }
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "UnparsableEntry".into(),
                    note: Some(
                        format!("skipped {id} in {}: {why}", view.catalog)
                            .chars()
                            .take(1000)
                            .collect(),
                    ),
                    action: "Import".into(),
                    secondary: None,
                };
                recorder.publish(&ev, &reg.object_ref(&())).await;
            }
        }
        skips_announced = current_skips;
    }
}

/// Publishes Events, one per distinct message on an object. kube's [`Recorder`] counts an Event
/// with the reason of an earlier one on the same object as a repeat of it (its series), keeping
/// the earlier note: two skipped entries of one import would show only the first. So each
/// (object, reason, note) has a recorder of its own; the same message again is still a repeat.
struct Announcer {
    client: kube::Client,
    reporter: Reporter,
    recorders: HashMap<(String, String, String), Recorder>,
}

impl Announcer {
    /// More distinct messages than this and the recorders start afresh (their repeats then
    /// become new Events).
    const KEPT: usize = 10_000;

    fn new(client: kube::Client) -> Announcer {
        Announcer {
            client,
            reporter: Reporter {
                controller: "catalog-bridge".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            recorders: HashMap::new(),
        }
    }

    async fn publish(&mut self, ev: &Event, reference: &ObjectReference) {
        let key = (
            reference.uid.clone().unwrap_or_default(),
            ev.reason.clone(),
            ev.note.clone().unwrap_or_default(),
        );
        if self.recorders.len() >= Self::KEPT && !self.recorders.contains_key(&key) {
            self.recorders.clear();
        }
        let (client, reporter) = (&self.client, &self.reporter);
        let recorder = self
            .recorders
            .entry(key)
            .or_insert_with(|| Recorder::new(client.clone(), reporter.clone()));
        if let Err(err) = recorder.publish(ev, reference).await {
            warn!(error = %err, reason = %ev.reason, "publishing an Event failed");
        }
    }
}

fn same_ignoring_sync_time(
    have: Option<&ExternalRegistrationStatus>,
    want: &ExternalRegistrationStatus,
) -> bool {
    have.is_some_and(|h| {
        ExternalRegistrationStatus {
            last_sync_time: None,
            ..h.clone()
        } == ExternalRegistrationStatus {
            last_sync_time: None,
            ..want.clone()
        }
    })
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
    use super::*;
    use crate::backend::BackendError;
    use crate::crd::ExternalCatalogSpec;

    #[test]
    fn an_export_counts_the_endpoints_in_sync_and_keeps_the_last_count_while_the_catalog_is_not() {
        let mut reg: ExternalRegistration = serde_json::from_value(json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": "api-x", "namespace": "shop"},
            "spec": {"catalogRef": {"name": "consul"}, "direction": "Export",
                     "service": {"name": "api-x"}},
        }))
        .expect("a registration");
        let export = |endpoints| Export {
            source: Source::Registration {
                namespace: "shop".into(),
                name: "api-x".into(),
            },
            catalog: "consul".into(),
            service: "api-x".into(),
            external_name: "api_x".into(),
            endpoints,
            problem: None,
            warnings: Vec::new(),
        };
        let view = |in_sync, error: Option<BackendError>| CatalogView {
            kind: "consul",
            report: Report {
                reachable: Some(error.is_none()),
                in_sync,
                error,
                ..Default::default()
            },
            problem: None,
        };
        let synced = registration_status(&reg, &export(2), Some(&view(true, None)));
        assert_eq!(synced.endpoints, 2);
        reg.status = Some(synced);
        let down = BackendError::Unreachable("connection refused".into());
        let during = registration_status(&reg, &export(3), Some(&view(false, Some(down))));
        assert_eq!(
            during.endpoints, 2,
            "the catalog still holds the last count"
        );
        let back = registration_status(&reg, &export(3), Some(&view(true, None)));
        assert_eq!(back.endpoints, 3);
    }

    #[test]
    fn a_catalog_warning_keeps_ready_and_says_what_needs_attention() {
        let cat = ExternalCatalog::new("zk", ExternalCatalogSpec::default());
        let view = |warning: Option<&str>| CatalogView {
            kind: "zookeeper",
            report: Report {
                reachable: Some(true),
                in_sync: true,
                entries: 3,
                warning: warning.map(str::to_string),
                ..Default::default()
            },
            problem: None,
        };
        let ready = |s: &ExternalCatalogStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .cloned()
                .expect("a Ready condition")
        };
        let plain = ready(&catalog_status(&cat, &view(None), 0));
        assert_eq!(
            (plain.status.as_str(), plain.reason.as_str()),
            ("True", "InSync")
        );
        let warned = ready(&catalog_status(
            &cat,
            &view(Some("the session is large")),
            0,
        ));
        assert_eq!(
            (warned.status.as_str(), warned.reason.as_str()),
            ("True", "NeedsAttention")
        );
        assert!(
            warned
                .message
                .contains("3 exported entries in place, but the session is large"),
            "{warned:?}"
        );
    }
}
