//! The status of an ExternalRegistration: `Ready` (valid and in effect) and `Synced` (its
//! entries are in the catalog, or its endpoints in the EndpointSlices), for an export from the
//! desired state and its catalog's writer, for an import from its task. Pure.

use super::catalog::task_down;
use super::conditions::{ConditionType, Verdict, condition, now, status_of, system_time};
use crate::api::crd::{ExternalRegistration, ExternalRegistrationStatus};
use crate::export::desired::{Export, Source};
use crate::export::snapshot::Refused;
use crate::export::writers::CatalogView;
use crate::import::ImportView;
use crate::model::{Reason, Unit};

/// The refusal of export `e` among what its catalog's writer holds back.
pub fn refused_for<'a>(e: &Export, refused: &'a [Refused]) -> Option<&'a Refused> {
    let namespace = match &e.source {
        Source::Annotation { namespace, .. } | Source::Registration { namespace, .. } => namespace,
    };
    refused.iter().find(|r| {
        matches!(&r.unit, Unit::Export { origin, name }
            if origin.namespace == *namespace && origin.service == e.service && **name == *e.external_name)
    })
}

/// What users read about a refused export (the condition's message, the Event's note).
pub fn refusal_message(catalog: &str, r: &Refused) -> String {
    format!(
        "catalog {catalog} refused {} write(s) of this export (tried again on its own; every \
         other export is written): {}",
        r.operations, r.error
    )
}

/// The status of export registration `reg`, whose outcome is `e`, written to the catalog
/// `view` shows (`None`: it does not exist).
pub fn export_status(
    reg: &ExternalRegistration,
    e: &Export,
    view: Option<&CatalogView>,
) -> ExternalRegistrationStatus {
    let catalog = &reg.spec.catalog_ref.name;
    let ready = match &e.problem {
        Some(p) => Verdict::problem(p),
        None => Verdict::yes(
            Reason::Exported,
            format!(
                "{} endpoint(s) of Service {} exported to {catalog} as {}",
                e.endpoints, e.service, e.external_name
            ),
        ),
    };
    let synced = match (ready.status, view) {
        (Some(false), _) => ready.clone(),
        (_, None) => Verdict::no(
            Reason::CatalogNotFound,
            format!("ExternalCatalog {catalog:?} does not exist"),
        ),
        (_, Some(v)) => match (&v.problem, &v.report.error) {
            (Some(p), _) => Verdict::no(p.reason, format!("catalog {catalog}: {}", p.message)),
            _ if v.task.down => task_down(&format!("the writer of catalog {catalog}"), &v.task),
            (None, Some(err)) => Verdict::no(err.reason(), format!("catalog {catalog}: {err}")),
            (None, None) => match refused_for(e, &v.report.refused) {
                Some(r) => Verdict::no(Reason::Refused, refusal_message(catalog, r)),
                None if v.report.in_sync => Verdict::yes(
                    Reason::InSync,
                    format!("catalog {catalog} holds every exported endpoint"),
                ),
                None => Verdict::unknown(
                    Reason::Syncing,
                    format!("catalog {catalog} is being updated"),
                ),
            },
        },
    };
    // Endpoints now in sync: while the catalog is not (down, being written), the count last
    // seen in sync stays.
    let endpoints = match (&e.problem, synced.status) {
        (Some(_), _) => 0,
        (None, Some(true)) => e.endpoints,
        (None, _) => reg
            .status
            .as_ref()
            .map_or(0, |s| usize::try_from(s.endpoints).unwrap_or(0)),
    };
    let restarts = view.map_or(0, |v| v.task.restarts);
    finish(
        reg,
        ready,
        synced,
        endpoints,
        &e.service,
        &e.external_name,
        restarts,
    )
}

/// The status of import registration `reg`, as its task `v` sees it.
pub fn import_status(reg: &ExternalRegistration, v: &ImportView) -> ExternalRegistrationStatus {
    let catalog = &v.catalog;
    let external = reg.spec.external_name.clone().unwrap_or_default();
    let ready = match (&v.problem, v.synced) {
        (Some(p), _) => Verdict::problem(p),
        (None, false) => Verdict::unknown(
            Reason::Waiting,
            format!("waiting for the first read of {external} from {catalog}"),
        ),
        (None, true) => Verdict::yes(
            Reason::Imported,
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
    let synced = match (&v.problem, &v.apply_error, &v.catalog_error) {
        (Some(p), _, _) => Verdict::problem(p),
        _ if v.task.down => task_down("the import", &v.task),
        (None, Some(err), _) => Verdict::no(Reason::ApplyFailed, err.clone()),
        (None, None, Some(err)) => Verdict::no(
            err.reason(),
            format!(
                "catalog {catalog}: {err}; keeping the last known {} endpoint(s)",
                v.endpoints
            ),
        ),
        (None, None, None) if v.held.is_some() => held(v),
        (None, None, None) if v.synced => Verdict::yes(
            Reason::InSync,
            format!("the EndpointSlices hold the healthy instances {catalog} reports"),
        ),
        _ => Verdict::unknown(Reason::Syncing, format!("reading {catalog}")),
    };
    finish(
        reg,
        ready,
        synced,
        v.endpoints,
        &v.service_name,
        &external,
        v.task.restarts,
    )
}

/// `Synced=False` for an import whose empty-hold runs: what is kept, and until when.
fn held(v: &ImportView) -> Verdict {
    let (endpoints, until, seconds) = v
        .held
        .as_ref()
        .map(|h| (h.endpoints, system_time(h.until), h.seconds))
        .unwrap_or_default();
    Verdict::no(
        Reason::ImportHeld,
        format!(
            "catalog {} suddenly stopped listing most instances: keeping {endpoints} endpoint(s) \
             it no longer lists until {} (spec.import.emptyHoldSeconds: {seconds}) unless it \
             lists them again",
            v.catalog,
            until.as_deref().unwrap_or("the hold runs out")
        ),
    )
}

/// Status from the two verdicts, keeping transition and sync times where nothing changed.
fn finish(
    reg: &ExternalRegistration,
    ready: Verdict,
    synced: Verdict,
    endpoints: usize,
    service: &str,
    external: &str,
    restarts: u32,
) -> ExternalRegistrationStatus {
    let prev = reg.status.clone().unwrap_or_default();
    let generation = reg.metadata.generation;
    let endpoints = endpoints as i64;
    let in_sync = synced.is_true();
    let conditions = vec![
        condition(&prev.conditions, ConditionType::Ready, ready, generation),
        condition(&prev.conditions, ConditionType::Synced, synced, generation),
    ];
    let synced_changed = status_of(&prev.conditions, ConditionType::Synced)
        != status_of(&conditions, ConditionType::Synced);
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
        task_restarts: i64::from(restarts),
    }
}

/// Whether `have` says what `want` says, but for `lastSyncTime`.
pub fn same_ignoring_sync_time(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::Report;
    use crate::export::desired::Source;
    use crate::model::BackendError;
    use crate::runtime::supervisor::TaskState;
    use serde_json::json;

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
            task: TaskState::default(),
            removal: None,
        };
        let synced = export_status(&reg, &export(2), Some(&view(true, None)));
        assert_eq!(synced.endpoints, 2);
        reg.status = Some(synced);
        let down = BackendError::Unreachable("connection refused".into());
        let during = export_status(&reg, &export(3), Some(&view(false, Some(down))));
        assert_eq!(
            during.endpoints, 2,
            "the catalog still holds the last count"
        );
        let back = export_status(&reg, &export(3), Some(&view(true, None)));
        assert_eq!(back.endpoints, 3);

        // The catalog refuses this export's writes, and writes the others.
        reg.status = Some(back);
        let mut refusing = view(true, None);
        refusing.report.refused = vec![Refused {
            unit: Unit::Export {
                origin: crate::model::Origin {
                    namespace: "shop".into(),
                    service: "api-x".into(),
                }
                .into(),
                name: "api_x".into(),
            },
            operations: 1,
            error: BackendError::refused("Permission denied on \"api_x\""),
        }];
        let s = export_status(&reg, &export(4), Some(&refusing));
        let synced = &s.conditions[1];
        assert_eq!(
            (synced.status.as_str(), synced.reason.as_str()),
            ("False", "Refused")
        );
        assert!(synced.message.contains("Permission denied"), "{synced:?}");
        assert_eq!(s.endpoints, 3, "the count last in sync");
        let mut other = export(4);
        other.external_name = "api_y".into();
        let s = export_status(&reg, &other, Some(&refusing));
        assert_eq!(
            s.conditions[1].reason, "InSync",
            "another export is not refused"
        );
    }

    #[test]
    fn an_import_whose_task_is_down_says_so_and_counts_its_restarts() {
        let reg: ExternalRegistration = serde_json::from_value(json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": "mysql-x", "namespace": "shop"},
            "spec": {"catalogRef": {"name": "zk"}, "direction": "Import",
                     "externalName": "mysql_x"},
        }))
        .expect("a registration");
        let v = ImportView {
            catalog: "zk".into(),
            service_name: "mysql-x".into(),
            endpoints: 1,
            synced: true,
            task: TaskState {
                restarts: 1,
                last_failure: Some("panicked: boom".into()),
                down: true,
            },
            ..Default::default()
        };
        let s = import_status(&reg, &v);
        let synced = &s.conditions[1];
        assert_eq!(
            (synced.status.as_str(), synced.reason.as_str()),
            ("False", "TaskRestarted")
        );
        assert_eq!(s.task_restarts, 1);
    }

    #[test]
    fn an_import_that_holds_endpoints_is_not_synced_and_says_until_when() {
        let reg: ExternalRegistration = serde_json::from_value(json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": "pay", "namespace": "shop"},
            "spec": {"catalogRef": {"name": "consul"}, "direction": "Import",
                     "externalName": "pay"},
        }))
        .expect("a registration");
        let v = ImportView {
            catalog: "consul".into(),
            service_name: "pay".into(),
            endpoints: 3,
            synced: true,
            held: Some(crate::import::Held {
                endpoints: 3,
                until: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
                seconds: 30,
            }),
            ..Default::default()
        };
        let s = import_status(&reg, &v);
        let (ready, synced) = (&s.conditions[0], &s.conditions[1]);
        assert_eq!(ready.status, "True", "still imported");
        assert_eq!(
            (synced.status.as_str(), synced.reason.as_str()),
            ("False", "ImportHeld")
        );
        assert!(
            synced.message.contains("keeping 3 endpoint(s)")
                && synced.message.contains("2027-01-15T08:00:00Z"),
            "{}",
            synced.message
        );
        assert_eq!(s.endpoints, 3);
    }
}
