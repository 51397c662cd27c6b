//! Conditions as typed values: their types, a [`Verdict`] (status, [`Reason`], message), and
//! the `Condition` they become, keeping `lastTransitionTime` while the status stays the same.

use crate::api::crd::Condition;
use crate::model::{Problem, Reason};

/// The types of condition catalog-bridge sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// ExternalCatalog: the catalog answers.
    Reachable,
    /// ExternalCatalog: it holds exactly the desired state. ExternalRegistration: it is valid
    /// and in effect.
    Ready,
    /// ExternalRegistration: the catalog (export) or the EndpointSlices (import) hold its
    /// entries.
    Synced,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Reachable => "Reachable",
            ConditionType::Ready => "Ready",
            ConditionType::Synced => "Synced",
        }
    }
}

/// What a condition says: `True` (`Some(true)`), `False` or `Unknown` (`None`), why, and the
/// message users read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub status: Option<bool>,
    pub reason: Reason,
    pub message: String,
}

impl Verdict {
    pub fn yes(reason: Reason, message: impl Into<String>) -> Verdict {
        Verdict {
            status: Some(true),
            reason,
            message: message.into(),
        }
    }

    pub fn no(reason: Reason, message: impl Into<String>) -> Verdict {
        Verdict {
            status: Some(false),
            reason,
            message: message.into(),
        }
    }

    pub fn unknown(reason: Reason, message: impl Into<String>) -> Verdict {
        Verdict {
            status: None,
            reason,
            message: message.into(),
        }
    }

    /// `False`, for `problem`.
    pub fn problem(problem: &Problem) -> Verdict {
        Verdict::no(problem.reason, problem.message.clone())
    }

    pub fn is_true(&self) -> bool {
        self.status == Some(true)
    }

    fn status_text(&self) -> &'static str {
        match self.status {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        }
    }
}

/// RFC 3339, seconds, UTC: the form of Kubernetes timestamps.
pub fn now() -> String {
    format_time(k8s_openapi::jiff::Timestamp::now())
}

fn format_time(t: k8s_openapi::jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `t` as a Kubernetes timestamp.
pub fn system_time(t: std::time::SystemTime) -> Option<String> {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .ok()
        .map(format_time)
}

/// The condition `type_` says `verdict`, keeping the previous `lastTransitionTime` when the
/// status did not change.
pub fn condition(
    previous: &[Condition],
    type_: ConditionType,
    verdict: Verdict,
    generation: Option<i64>,
) -> Condition {
    let status = verdict.status_text();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_.as_str() && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now);
    Condition {
        type_: type_.as_str().to_string(),
        status: status.to_string(),
        reason: verdict.reason.to_string(),
        message: verdict.message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// The status of condition `type_` in `conditions`, as written (`True`, `False`, `Unknown`).
pub fn status_of(conditions: &[Condition], type_: ConditionType) -> Option<&str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_.as_str())
        .map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transition_time_stays_while_the_status_does() {
        let first = condition(
            &[],
            ConditionType::Ready,
            Verdict::yes(Reason::InSync, "3 entries"),
            Some(1),
        );
        let mut earlier = first.clone();
        earlier.last_transition_time = "2020-01-01T00:00:00Z".into();
        let same = condition(
            std::slice::from_ref(&earlier),
            ConditionType::Ready,
            Verdict::yes(Reason::NeedsAttention, "4 entries"),
            Some(2),
        );
        assert_eq!(same.last_transition_time, "2020-01-01T00:00:00Z");
        assert_eq!(
            (same.reason.as_str(), same.status.as_str()),
            ("NeedsAttention", "True")
        );
        let flipped = condition(
            &[earlier],
            ConditionType::Ready,
            Verdict::no(Reason::Unreachable, "down"),
            Some(2),
        );
        assert_ne!(flipped.last_transition_time, "2020-01-01T00:00:00Z");
    }
}
