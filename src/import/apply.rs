//! Import, applied: the rendered Service and EndpointSlices written with server-side apply
//! (owned by the registration, so deleting it removes them), stale slices deleted, and what
//! was written remembered so that someone else's change can be told from ours.

use std::collections::{BTreeSet, HashSet};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use tracing::debug;

use super::render::{Kind, Rendered, service_name};
use crate::api::crd::ExternalRegistration;
use crate::api::labels::{import_selector, imported_by};

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
    let selector = import_selector(&reg.name_any());
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
        // Ours for sure only when the last apply wrote it under this name and nobody touched
        // it since; otherwise it is created first, so that a Service someone made after the
        // watch-cache check is refused, never taken over by a forced apply.
        let known = previous.and_then(|p| p.service.as_ref()).is_some()
            && !renamed
            && !force.contains(&(Kind::Service, svc.name_any()));
        let stored = write_service(&services, reg, svc, known, &pp)
            .await
            .with_context(|| format!("writing Service {ns}/{}", svc.name_any()))?;
        written.extend(stored.iter().map(|s| Written::of(Kind::Service, s)));
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

/// Writes the import's Service: applied when `known` to be this registration's; otherwise
/// created, and applied only if the Service found under its name is this registration's (its
/// labels, or its owner reference). Someone else's is left as it is, with an error. Returns
/// each version written, the last one last.
async fn write_service(
    services: &Api<Service>,
    reg: &ExternalRegistration,
    svc: &Service,
    known: bool,
    pp: &PatchParams,
) -> Result<Vec<Service>> {
    let name = svc.name_any();
    if !known {
        let post = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match services.create(&post, svc).await {
            Ok(created) => {
                let handed = as_applied(services, &created).await;
                return Ok([Some(created), handed].into_iter().flatten().collect());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let live = services
                    .get(&name)
                    .await
                    .context("reading the Service found under its name")?;
                if !made_by(&live, reg) {
                    bail!(
                        "Service {name} was created by someone else meanwhile; an import never \
                         takes a Service over: set target.serviceName to another name"
                    );
                }
            }
            Err(e) => return Err(e).context("creating it"),
        }
    }
    Ok(vec![
        services
            .patch(&name, pp, &Patch::Apply(svc))
            .await
            .context("applying it")?,
    ])
}

/// Whether `live` is the Service registration `reg` imports into.
fn made_by(live: &Service, reg: &ExternalRegistration) -> bool {
    let labelled = imported_by(live.metadata.labels.as_ref(), &reg.name_any());
    let owned = reg.uid().is_some_and(|uid| {
        live.owner_references()
            .iter()
            .any(|o| o.uid == uid && o.controller == Some(true))
    });
    labelled || owned
}

/// A Service just created, its fields handed from the create (an `Update` of this field
/// manager) to this field manager's server-side apply, as if the apply had created it: fields a
/// later apply leaves out are then removed, not kept by the create's ownership. When that fails
/// (changed meanwhile), the next apply co-owns them and the Service works the same: None.
async fn as_applied(services: &Api<Service>, created: &Service) -> Option<Service> {
    let handed = async {
        let mut fields = created.metadata.managed_fields.clone().unwrap_or_default();
        for f in &mut fields {
            if f.manager.as_deref() == Some(FIELD_MANAGER)
                && f.operation.as_deref() == Some("Update")
            {
                f.operation = Some("Apply".into());
            }
        }
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": created.resource_version()},
            {"op": "replace", "path": "/metadata/managedFields", "value": fields},
        ]))?;
        let params = PatchParams::default();
        anyhow::Ok(
            services
                .patch(&created.name_any(), &params, &Patch::Json::<()>(patch))
                .await?,
        )
    };
    handed
        .await
        .inspect_err(|e| debug!(error = %e, "handing a created Service's fields to the apply"))
        .ok()
}

/// Deletes the Service and EndpointSlices registration `ns/name` maintained.
pub async fn remove(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let lp = ListParams::default().labels(&import_selector(name));
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
