//! `catalog-bridge cleanup --catalog <name>`: removes every entry this owner id wrote to one
//! catalog — after an uninstall, or to retire a cluster id. Entries of other owners and
//! hand-made ones are untouched, exactly as in normal operation (`export::retire::remove_owned`,
//! which the writer of a moved or deleted catalog uses too). An ExternalCatalog that is being
//! deleted while no controller runs stays, held by the finalizer: once its entries are
//! removed, `cleanup` lifts the finalizer and the deletion completes.

use anyhow::{Context, Result};
use kube::Api;

use crate::api::crd::ExternalCatalog;
use crate::api::labels::holds_finalizer;
pub use crate::export::retire::Outcome;
use crate::export::retire::remove_owned;
use crate::k8s::catalogs::{Catalogs, Connect, SessionSecret};
use crate::k8s::finalizers::{Finalizers, KubeFinalizers};
use crate::model::Problem;

/// What `cleanup` did: the entries removed, and whether it let a deleted ExternalCatalog go.
#[derive(Debug)]
pub struct Cleaned {
    pub outcome: Outcome,
    /// The ExternalCatalog was being deleted: its finalizer was lifted.
    pub let_go: bool,
}

/// Reads the owned entries of ExternalCatalog `name` for `owner` and deletes them all (or, with
/// `dry_run`, only counts them); lifts the finalizer of a catalog being deleted once they are.
pub async fn cleanup(
    client: &kube::Client,
    name: &str,
    owner: &str,
    cluster: &str,
    sessions: SessionSecret,
    dry_run: bool,
) -> Result<Cleaned> {
    let cat = Api::<ExternalCatalog>::all(client.clone())
        .get(name)
        .await
        .with_context(|| format!("reading ExternalCatalog {name}"))?;
    let problem = |p: Problem| anyhow::anyhow!("{p}");
    // As the controller builds it; a dry run only reads.
    let connect = Catalogs {
        client: client.clone(),
        owner: owner.to_string(),
        cluster: cluster.to_string(),
        sessions,
    };
    let credentials = connect.credentials(&cat).await.map_err(problem)?;
    let backend = connect.build(&cat, credentials, dry_run).map_err(problem)?;
    let outcome = remove_owned(backend.as_ref(), dry_run)
        .await
        .with_context(|| format!("removing what {owner} holds in {}", backend.describe()))?;
    backend.release().await;
    let deleting = cat.metadata.deletion_timestamp.is_some()
        && holds_finalizer(cat.metadata.finalizers.as_ref());
    if deleting && !dry_run {
        KubeFinalizers::new(client.clone()).remove(&cat).await?;
    }
    Ok(Cleaned {
        outcome,
        let_go: deleting && !dry_run,
    })
}
