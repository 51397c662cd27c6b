//! `catalog-bridge cleanup --catalog <name>`: removes every entry this owner id wrote to one
//! catalog — after an uninstall, or to retire a cluster id. Entries of other owners and
//! hand-made ones are untouched, exactly as in normal operation.
//! [`remove_owned`] is the same for a live backend.

use anyhow::{Context, Result};
use kube::Api;

use crate::backend::{Backend, BackendError};
use crate::catalogs::{self, SessionSecret};
use crate::crd::ExternalCatalog;
use crate::plan::{Op, plan};

/// What a cleanup found and removed.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub removed: usize,
    pub round_trips: usize,
    /// What the backend removed besides the entries (Consul's node once empty).
    pub retired: Option<String>,
}

/// Reads the owned entries of ExternalCatalog `name` for `owner` and deletes them all (or, with
/// `dry_run`, only counts them).
pub async fn cleanup(
    client: &kube::Client,
    name: &str,
    owner: &str,
    sessions: SessionSecret,
    dry_run: bool,
) -> Result<Outcome> {
    let cat = Api::<ExternalCatalog>::all(client.clone())
        .get(name)
        .await
        .with_context(|| format!("reading ExternalCatalog {name}"))?;
    let problem = |p: crate::desired::Problem| anyhow::anyhow!("{}: {}", p.reason, p.message);
    let credentials = catalogs::credentials(client, &cat).await.map_err(problem)?;
    let ctx = catalogs::Context {
        owner: owner.to_string(),
        sessions: Some(sessions),
        read_only: dry_run,
    };
    let backend = catalogs::build(&cat, credentials, &ctx).map_err(problem)?;
    remove_owned(backend.as_ref(), dry_run)
        .await
        .with_context(|| format!("removing what {owner} holds in {}", backend.describe()))
}

/// Deletes every entry `backend` owns, then what held them once empty ([`Backend::retire`]:
/// Consul's node). With `dry_run`, only counts them. Used by `cleanup`, and by the writer of a
/// catalog that was deleted or moved elsewhere.
pub async fn remove_owned(backend: &dyn Backend, dry_run: bool) -> Result<Outcome, BackendError> {
    let owned = backend.read_owned().await?;
    let ops: Vec<Op> = plan(&Default::default(), &owned).ops;
    if dry_run {
        return Ok(Outcome {
            removed: ops.len(),
            round_trips: 0,
            retired: None,
        });
    }
    let round_trips = backend.apply(&ops).await?;
    let retired = backend.retire().await?;
    Ok(Outcome {
        removed: ops.len(),
        round_trips,
        retired,
    })
}
