//! The status of an ExternalCatalog, from what its writer reports: `Reachable`, `Ready`, the
//! counts and what the catalog says about itself. Pure.

use super::conditions::{ConditionType, Verdict, condition, system_time};
use crate::api::crd::{ExternalCatalog, ExternalCatalogStatus};
use crate::api::labels::ANNOTATION_ABANDON;
use crate::export::retire::Removal;
use crate::export::snapshot::Refused;
use crate::export::writers::CatalogView;
use crate::model::{Problem, Reason};
use crate::runtime::supervisor::TaskState;

/// The verdict while the task behind an object (`what`) is down, waiting to be started again.
pub fn task_down(what: &str, task: &TaskState) -> Verdict {
    Verdict::no(
        Reason::TaskRestarted,
        format!(
            "{what} stopped unexpectedly ({}) and is being started again (restart {})",
            task.last_failure.as_deref().unwrap_or("no reason given"),
            task.restarts
        ),
    )
}

/// At most this many refused exports are named in `Ready`, each message cut to
/// [`STUCK_MESSAGE`] characters.
const STUCK_NAMED: usize = 10;
const STUCK_MESSAGE: usize = 300;

/// `Ready`'s message while the catalog refuses the writes of some exports: which, and why.
fn stuck(entries: usize, refused: &[Refused]) -> String {
    let named: Vec<String> = refused
        .iter()
        .take(STUCK_NAMED)
        .map(|r| {
            let why = r.error.to_string();
            let why: String = if why.chars().count() > STUCK_MESSAGE {
                format!("{}…", why.chars().take(STUCK_MESSAGE).collect::<String>())
            } else {
                why
            };
            format!("{} ({} write(s): {why})", r.unit, r.operations)
        })
        .collect();
    let more = refused.len().saturating_sub(STUCK_NAMED);
    format!(
        "the catalog refuses the writes of {} export(s), tried again on their own: {}{}; \
         every other export is written ({entries} entries desired)",
        refused.len(),
        named.join("; "),
        if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        }
    )
}

/// The verdict on a deleted catalog that waits until its entries are removed: how many, where,
/// why not yet, and how to let it go without.
pub fn removal_pending(removal: &Removal, problem: Option<&Problem>) -> Verdict {
    let what = match removal.entries {
        Some(1) => "1 entry".to_string(),
        Some(n) => format!("{n} entries"),
        None => "its entries (not counted yet)".to_string(),
    };
    let at = if removal.at.is_empty() {
        String::new()
    } else {
        format!(" at {}", removal.at)
    };
    let why = match (problem, &removal.error) {
        (Some(p), _) => format!("; they cannot be removed: {p}"),
        (None, Some(e)) => format!("; removing them failed: {e}"),
        (None, None) => String::new(),
    };
    Verdict::no(
        Reason::RemovalPending,
        format!(
            "deleted: waits until {what}{at} are removed{why}; tried again until then (the annotation {ANNOTATION_ABANDON}: \"true\" lets it go without removing them)"
        ),
    )
}

/// The status of `cat` as `view` shows it, with `imported` endpoints imported from it.
pub fn catalog_status(
    cat: &ExternalCatalog,
    view: &CatalogView,
    imported: i64,
) -> ExternalCatalogStatus {
    let prev = cat.status.clone().unwrap_or_default();
    let generation = cat.metadata.generation;
    let r = &view.report;
    let reachable = match (&view.problem, r.reachable, &r.error) {
        (Some(p), _, _) => Verdict::problem(p),
        (None, Some(false), Some(e)) => Verdict::no(e.reason(), e.to_string()),
        (None, Some(true), _) => Verdict::yes(Reason::Connected, "the catalog answers"),
        _ => Verdict::unknown(Reason::NotContacted, "not contacted yet"),
    };
    let ready = match (&view.problem, &r.error) {
        _ if let Some(removal) = &view.removal => removal_pending(removal, view.problem.as_ref()),
        (Some(p), _) => Verdict::problem(p),
        _ if view.task.down => task_down("the catalog's writer", &view.task),
        (None, Some(e)) => Verdict::no(e.reason(), e.to_string()),
        (None, None) if r.in_sync && !r.refused.is_empty() => {
            Verdict::no(Reason::Refused, stuck(r.entries, &r.refused))
        }
        (None, None) if r.in_sync => match &r.warning {
            None => Verdict::yes(
                Reason::InSync,
                format!("{} exported entries in place", r.entries),
            ),
            Some(w) => Verdict::yes(
                Reason::NeedsAttention,
                format!("{} exported entries in place, but {w}", r.entries),
            ),
        },
        _ => Verdict::unknown(Reason::Syncing, "not in sync yet"),
    };
    ExternalCatalogStatus {
        conditions: vec![
            condition(
                &prev.conditions,
                ConditionType::Reachable,
                reachable,
                generation,
            ),
            condition(&prev.conditions, ConditionType::Ready, ready, generation),
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
        task_restarts: i64::from(view.task.restarts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::crd::{Condition, ExternalCatalogSpec};
    use crate::export::Report;

    fn ready(s: &ExternalCatalogStatus) -> Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .cloned()
            .expect("a Ready condition")
    }

    fn view(warning: Option<&str>, task: TaskState) -> CatalogView {
        CatalogView {
            kind: "zookeeper",
            report: Report {
                reachable: Some(true),
                in_sync: true,
                entries: 3,
                warning: warning.map(str::to_string),
                ..Default::default()
            },
            problem: None,
            task,
            removal: None,
        }
    }

    #[test]
    fn a_catalog_warning_keeps_ready_and_says_what_needs_attention() {
        let cat = ExternalCatalog::new("zk", ExternalCatalogSpec::default());
        let plain = ready(&catalog_status(&cat, &view(None, TaskState::default()), 0));
        assert_eq!(
            (plain.status.as_str(), plain.reason.as_str()),
            ("True", "InSync")
        );
        let warned = ready(&catalog_status(
            &cat,
            &view(Some("the session is large"), TaskState::default()),
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

    #[test]
    fn refused_exports_turn_ready_false_and_are_named() {
        let cat = ExternalCatalog::new("consul", ExternalCatalogSpec::default());
        let mut v = view(None, TaskState::default());
        v.report.refused = (0..12)
            .map(|i| Refused {
                unit: crate::model::Unit::Export {
                    origin: crate::model::Origin {
                        namespace: "shop".into(),
                        service: format!("s{i}"),
                    }
                    .into(),
                    name: format!("s{i}").into(),
                },
                operations: 2,
                error: crate::model::BackendError::refused("Permission denied"),
            })
            .collect();
        let r = ready(&catalog_status(&cat, &v, 0));
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", "Refused"));
        assert!(
            r.message.contains("12 export(s)")
                && r.message
                    .contains("shop/s0 as s0 (2 write(s): Permission denied)")
                && r.message.contains("and 2 more"),
            "{}",
            r.message
        );
    }

    #[test]
    fn a_writer_down_after_a_panic_is_shown_and_its_restarts_counted() {
        let cat = ExternalCatalog::new("zk", ExternalCatalogSpec::default());
        let down = TaskState {
            restarts: 2,
            last_failure: Some("panicked: boom".into()),
            down: true,
        };
        let s = catalog_status(&cat, &view(None, down.clone()), 0);
        let r = ready(&s);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "TaskRestarted")
        );
        assert!(r.message.contains("panicked: boom"), "{r:?}");
        assert_eq!(s.task_restarts, 2);
        let back = catalog_status(
            &cat,
            &view(
                None,
                TaskState {
                    down: false,
                    ..down
                },
            ),
            0,
        );
        assert_eq!(ready(&back).reason, "InSync");
        assert_eq!(back.task_restarts, 2, "the count stays");
    }

    #[test]
    fn a_deleted_catalog_says_what_it_waits_for() {
        let cat = ExternalCatalog::new("c", ExternalCatalogSpec::default());
        let mut v = view(None, TaskState::default());
        v.removal = Some(Removal {
            entries: Some(2),
            at: "consul http://a:8500 node k8s-x".into(),
            error: Some(crate::model::BackendError::Unreachable(
                "connection refused".into(),
            )),
        });
        let r = ready(&catalog_status(&cat, &v, 0));
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "RemovalPending")
        );
        assert!(
            r.message
                .contains("2 entries at consul http://a:8500 node k8s-x")
                && r.message.contains("connection refused")
                && r.message.contains("catalog-bridge.io/abandon"),
            "{r:?}"
        );
    }
}
