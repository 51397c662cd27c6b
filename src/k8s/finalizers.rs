//! The finalizer on ExternalCatalogs (`catalog-bridge.io/cleanup`, SPEC §6.10): put on every
//! catalog by the leader, lifted once what this cluster wrote there is removed (or the catalog
//! is abandoned), and the Event that says what an abandoned catalog leaves behind. Behind the
//! [`Finalizers`] trait, which the writers' supervisor uses and its tests replace.
//!
//! Both changes are JSON patches guarded by a `test` op, so that a concurrent edit of the
//! finalizer list (another controller's finalizer added or removed) is never lost: adding tests
//! the resourceVersion the list was read at, removing tests that the entry at the index is
//! still ours. A failed test (422) is an error; the caller tries again with the object as the
//! watch reports it next.

use anyhow::{Context, Result};
use async_trait::async_trait;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::api::crd::ExternalCatalog;
use crate::api::labels::FINALIZER;
use crate::model::Reason;

/// How the writers' supervisor holds ExternalCatalogs until their entries are removed.
#[async_trait]
pub trait Finalizers: Send + Sync {
    /// Puts the finalizer on `catalog`, as last seen, unless it holds it or is being deleted
    /// (no finalizer may be added then).
    async fn add(&self, catalog: &ExternalCatalog) -> Result<()>;

    /// Lifts the finalizer from `catalog`, as last seen; nothing to do when it does not hold
    /// it, or is gone.
    async fn remove(&self, catalog: &ExternalCatalog) -> Result<()>;

    /// A Warning Event on `catalog` with `reason` and `note`.
    async fn announce(&self, catalog: &ExternalCatalog, reason: Reason, note: &str);
}

/// The finalizer patches that add ours to `catalog`: `None` when there is nothing to add.
pub fn add_patch(catalog: &ExternalCatalog) -> Option<serde_json::Value> {
    if catalog.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let guard = json!({"op": "test", "path": "/metadata/resourceVersion",
                       "value": catalog.resource_version()?});
    Some(match &catalog.metadata.finalizers {
        Some(list) if list.iter().any(|f| f == FINALIZER) => return None,
        Some(_) => {
            json!([guard, {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}])
        }
        None => json!([guard, {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}]),
    })
}

/// The patch that removes ours from `catalog`: `None` when it does not hold it.
pub fn remove_patch(catalog: &ExternalCatalog) -> Option<serde_json::Value> {
    let at = catalog
        .metadata
        .finalizers
        .as_ref()?
        .iter()
        .position(|f| f == FINALIZER)?;
    let path = format!("/metadata/finalizers/{at}");
    Some(json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))
}

/// Whether `e` says the object changed since it was read (the patch's `test` failed, 422, or
/// a conflict, 409): tried again with the object as the watch reports it next.
pub fn changed_meanwhile(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 422 || s.code == 409)
    })
}

/// The real [`Finalizers`], through the API server.
pub struct KubeFinalizers {
    client: kube::Client,
    reporter: Reporter,
}

impl KubeFinalizers {
    pub fn new(client: kube::Client) -> KubeFinalizers {
        KubeFinalizers {
            client,
            reporter: Reporter {
                controller: "catalog-bridge".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        }
    }

    async fn patch(&self, name: &str, patch: serde_json::Value, what: &str) -> Result<()> {
        let patch: json_patch::Patch =
            serde_json::from_value(patch).context("building the finalizer patch")?;
        let api: Api<ExternalCatalog> = Api::all(self.client.clone());
        match api
            .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => Ok(()),
            // Gone meanwhile: nothing left to hold.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => {
                Err(e).with_context(|| format!("{what} {FINALIZER} on ExternalCatalog {name}"))
            }
        }
    }
}

#[async_trait]
impl Finalizers for KubeFinalizers {
    async fn add(&self, catalog: &ExternalCatalog) -> Result<()> {
        let Some(patch) = add_patch(catalog) else {
            return Ok(());
        };
        self.patch(&catalog.name_any(), patch, "adding").await
    }

    async fn remove(&self, catalog: &ExternalCatalog) -> Result<()> {
        let Some(patch) = remove_patch(catalog) else {
            return Ok(());
        };
        self.patch(&catalog.name_any(), patch, "removing").await
    }

    async fn announce(&self, catalog: &ExternalCatalog, reason: Reason, note: &str) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: "Delete".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &catalog.object_ref(&())).await {
            tracing::warn!(catalog = %catalog.name_any(), error = %e, reason = %reason, "publishing an Event failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(finalizers: Option<Vec<&str>>, deleting: bool) -> ExternalCatalog {
        let mut c: ExternalCatalog = serde_json::from_value(json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
            "metadata": {"name": "c", "resourceVersion": "42"}, "spec": {},
        }))
        .expect("test catalog");
        c.metadata.finalizers = finalizers.map(|f| f.into_iter().map(String::from).collect());
        if deleting {
            c.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ));
        }
        c
    }

    #[test]
    fn adding_is_guarded_by_the_resource_version_and_keeps_other_finalizers() {
        let none = add_patch(&catalog(None, false)).expect("a patch");
        assert_eq!(
            none[0],
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "42"})
        );
        assert_eq!(none[1]["value"], json!([FINALIZER]));
        let other = add_patch(&catalog(Some(vec!["x.io/other"]), false)).expect("a patch");
        assert_eq!(other[1]["path"], "/metadata/finalizers/-");
        assert!(add_patch(&catalog(Some(vec![FINALIZER]), false)).is_none());
        assert!(
            add_patch(&catalog(None, true)).is_none(),
            "none after deletion"
        );
        for patch in [none, other] {
            serde_json::from_value::<json_patch::Patch>(patch).expect("a JSON patch");
        }
    }

    #[test]
    fn removing_tests_the_entry_it_removes() {
        let p = remove_patch(&catalog(Some(vec!["x.io/other", FINALIZER]), true)).expect("a patch");
        assert_eq!(
            p,
            json!([{"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER},
                   {"op": "remove", "path": "/metadata/finalizers/1"}])
        );
        assert!(remove_patch(&catalog(Some(vec!["x.io/other"]), true)).is_none());
        assert!(remove_patch(&catalog(None, true)).is_none());
    }
}
