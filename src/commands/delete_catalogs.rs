//! `catalog-bridge delete-catalogs --selector <labels>`: deletes the ExternalCatalogs that
//! match and waits until each is gone. The chart runs it as its pre-delete hook, so that
//! `helm uninstall` first lets the running controller remove this cluster's entries from every
//! catalog declared in the release's values (the finalizer lets each go once its catalog is
//! clean), and only then removes the controller.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::future::join_all;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, ResourceExt};

use crate::api::crd::ExternalCatalog;
use crate::api::labels::ANNOTATION_ABANDON;

/// Deletes the ExternalCatalogs matching `selector` and waits up to `timeout` until every one is
/// gone; returns their names. After `timeout`, fails naming each that is left and why.
pub async fn delete_catalogs(
    client: &kube::Client,
    selector: &str,
    timeout: Duration,
) -> Result<Vec<String>> {
    let api = Api::<ExternalCatalog>::all(client.clone());
    let list = ListParams::default().labels(selector);
    let found = api
        .list(&list)
        .await
        .with_context(|| format!("listing the ExternalCatalogs labelled {selector}"))?;
    let mut names = Vec::new();
    for cat in &found.items {
        let name = cat.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(e).with_context(|| format!("deleting ExternalCatalog {name}"));
            }
        }
        names.push(name);
    }
    let gone = join_all(found.items.iter().map(|cat| {
        let (api, name, uid) = (api.clone(), cat.name_any(), cat.uid().unwrap_or_default());
        async move { await_condition(api, &name, conditions::is_deleted(&uid)).await }
    }));
    if tokio::time::timeout(timeout, gone).await.is_ok() {
        return Ok(names);
    }
    let left = api
        .list(&list)
        .await
        .with_context(|| format!("listing the ExternalCatalogs labelled {selector}"))?;
    if left.items.is_empty() {
        return Ok(names);
    }
    bail!("{}", not_gone(&left.items, timeout))
}

/// Why the catalogs in `left` are still there after `timeout`, and the ways out.
fn not_gone(left: &[ExternalCatalog], timeout: Duration) -> String {
    let each: Vec<String> = left
        .iter()
        .map(|cat| {
            let ready = cat
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                .map_or_else(
                    || "no status (is the controller running?)".to_string(),
                    |c| format!("{}: {}", c.reason, c.message),
                );
            format!("{}: {ready}", cat.name_any())
        })
        .collect();
    format!(
        "{} ExternalCatalog(s) not gone after {timeout:?}: their entries are not removed yet\n  {}\n\
         They go as soon as their catalogs are clean. To let one go without removing its \
         entries: kubectl annotate xcat <name> {ANNOTATION_ABANDON}=true; to uninstall without \
         this step: helm uninstall --no-hooks (the catalogs then stay, held by their finalizer, \
         until `catalog-bridge cleanup --catalog <name>`)",
        left.len(),
        each.join("\n  ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::crd::{Condition, ExternalCatalogStatus};

    #[test]
    fn what_is_left_names_each_catalog_why_and_the_ways_out() {
        let mut stuck = ExternalCatalog::new("consul", Default::default());
        stuck.status = Some(ExternalCatalogStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "RemovalPending".into(),
                message: "deleted: waits until 2 entries are removed".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let silent = ExternalCatalog::new("etcd", Default::default());
        let text = not_gone(&[stuck, silent], Duration::from_secs(300));
        assert!(
            text.starts_with("2 ExternalCatalog(s) not gone after 300s"),
            "{text}"
        );
        assert!(
            text.contains("consul: RemovalPending: deleted: waits until 2 entries are removed"),
            "{text}"
        );
        assert!(
            text.contains("etcd: no status (is the controller running?)"),
            "{text}"
        );
        assert!(text.contains("catalog-bridge.io/abandon=true"), "{text}");
        assert!(text.contains("helm uninstall --no-hooks"), "{text}");
    }
}
