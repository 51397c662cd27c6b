//! Import, applied: the rendered Service and EndpointSlices written with server-side apply
//! (owned by the registration, so deleting it removes them), stale slices deleted, and what
//! was written remembered so that someone else's change can be told from ours.

use std::collections::{BTreeSet, HashSet};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};

use super::render::{Kind, Rendered, service_name};
use crate::api::crd::ExternalRegistration;
use crate::api::labels::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, REGISTRATION_LABEL};

const FIELD_MANAGER: &str = "catalog-bridge";

/// An object [`apply`] sent, as the API server stored it: later changes to it with another
/// resource version, or its deletion, were made by someone else.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    pub kind: Kind,
    pub name: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

impl Written {
    fn of(kind: Kind, obj: &impl Resource) -> Written {
        let meta = obj.meta();
        Written {
            kind,
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
        }
    }
}

/// Applies `r` (server-side apply, owned by the registration so deleting it removes them) and
/// deletes this registration's slices that are no longer rendered. Objects equal to what
/// `previous` (the last successful apply) held are not sent again: one changed endpoint
/// rewrites one slice. Objects in `force` (changed or deleted by someone else) are sent even
/// so. Returns the objects sent, as stored.
pub async fn apply(
    client: &kube::Client,
    reg: &ExternalRegistration,
    r: &Rendered,
    previous: Option<&Rendered>,
    force: &HashSet<(Kind, String)>,
) -> Result<Vec<Written>> {
    let mut written = Vec::new();
    let ns = reg
        .namespace()
        .context("an ExternalRegistration is namespaced")?;
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let selector = format!(
        "{REGISTRATION_LABEL}={},{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}",
        reg.name_any()
    );
    // A task's first apply, or a new target.serviceName: a Service this registration made
    // under another name goes.
    let name = service_name(reg);
    let renamed = previous
        .and_then(|p| p.service.as_ref())
        .map(|s| s.name_any())
        != r.service.as_ref().map(|s| s.name_any());
    if previous.is_none() || renamed {
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        for old in services
            .list(&ListParams::default().labels(&selector))
            .await
            .with_context(|| {
                format!(
                    "listing the Services of registration {ns}/{}",
                    reg.name_any()
                )
            })?
            .items
        {
            let old_name = old.name_any();
            if old_name != name {
                services
                    .delete(&old_name, &DeleteParams::default())
                    .await
                    .with_context(|| {
                        format!("deleting Service {ns}/{old_name}, renamed to {name}")
                    })?;
            }
        }
    }
    if let Some(svc) = &r.service
        && (previous.and_then(|p| p.service.as_ref()) != Some(svc)
            || force.contains(&(Kind::Service, svc.name_any())))
    {
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let name = svc.name_any();
        let stored = services
            .patch(&name, &pp, &Patch::Apply(svc))
            .await
            .with_context(|| format!("applying Service {ns}/{name}"))?;
        written.push(Written::of(Kind::Service, &stored));
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let mut keep = BTreeSet::new();
    for s in &r.slices {
        let n = s.name_any();
        let unchanged = previous.is_some_and(|p| p.slices.iter().any(|old| old == s))
            && !force.contains(&(Kind::EndpointSlice, n.clone()));
        if !unchanged {
            let stored = slices
                .patch(&n, &pp, &Patch::Apply(s))
                .await
                .with_context(|| format!("applying EndpointSlice {ns}/{n}"))?;
            written.push(Written::of(Kind::EndpointSlice, &stored));
        }
        keep.insert(n);
    }
    if previous.is_some_and(|p| p.slices.iter().all(|old| keep.contains(&old.name_any()))) {
        return Ok(written); // nothing to delete
    }
    for s in slices
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let n = s.name_any();
        if !keep.contains(&n) {
            slices
                .delete(&n, &DeleteParams::default())
                .await
                .with_context(|| format!("deleting stale EndpointSlice {ns}/{n}"))?;
        }
    }
    Ok(written)
}

/// Deletes the Service and EndpointSlices registration `ns/name` maintained.
pub async fn remove(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let selector = format!("{REGISTRATION_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}");
    let lp = ListParams::default().labels(&selector);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    for s in slices.list(&lp).await?.items {
        slices
            .delete(&s.name_any(), &DeleteParams::default())
            .await
            .with_context(|| format!("deleting EndpointSlice {ns}/{}", s.name_any()))?;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    for s in services.list(&lp).await?.items {
        services
            .delete(&s.name_any(), &DeleteParams::default())
            .await
            .with_context(|| format!("deleting Service {ns}/{}", s.name_any()))?;
    }
    Ok(())
}
