//! The instances one export contributes: the ready endpoints of its Service on the chosen port.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::k8s::cached::{CachedService, CachedSlice};
use k8s_openapi::api::core::v1::ServicePort;

use crate::api::crd::PortRef;
use crate::model::address::export_address;
use crate::model::{Instance, Origin, Problem, Reason};

/// The Service port an export publishes: by name or number, else the first.
fn choose_port<'a>(
    svc: &'a CachedService,
    port: Option<&PortRef>,
) -> Result<&'a ServicePort, Problem> {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let found = match port {
        None => ports.first(),
        Some(PortRef::Number(n)) => ports.iter().find(|p| i64::from(p.port) == *n),
        Some(PortRef::Name(name)) => ports.iter().find(|p| p.name.as_deref() == Some(name)),
    };
    found.ok_or_else(|| Problem {
        reason: Reason::PortNotFound,
        message: match port {
            None => "the Service has no ports".to_string(),
            Some(p) => format!(
                "the Service has no port {p:?} (ports: {})",
                ports
                    .iter()
                    .map(|p| match &p.name {
                        Some(n) if !n.is_empty() => format!("{n}/{}", p.port),
                        _ => p.port.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    })
}

/// The ready endpoints of `svc` on the chosen port, as instances.
pub(super) fn instances(
    svc: &CachedService,
    slices: &[&CachedSlice],
    port: Option<&PortRef>,
    external_name: &str,
    tags: &[String],
    meta: &BTreeMap<String, String>,
) -> Result<Vec<Instance>, Problem> {
    let sp = choose_port(svc, port)?;
    let port_name = sp.name.clone().unwrap_or_default();
    let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
    let publish_not_ready = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    // Shared by every instance of the export.
    let origin = Arc::new(Origin {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        service: svc.metadata.name.clone().unwrap_or_default(),
    });
    let (name, tags, meta): (Arc<str>, Arc<[String]>, _) =
        (external_name.into(), tags.into(), Arc::new(meta.clone()));
    let mut out = BTreeSet::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let Some(ep_port) = slice.ports.as_deref().unwrap_or_default().iter().find(|p| {
            p.name.clone().unwrap_or_default() == port_name
                && p.protocol.clone().unwrap_or_else(|| "TCP".into()) == protocol
        }) else {
            continue;
        };
        let Some(number) = ep_port.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in &slice.endpoints {
            let c = ep.conditions.as_ref();
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            // A nil condition means "unknown", which the API says to read as true.
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let exported = !terminating && (ready || (publish_not_ready && serving));
            if !exported {
                continue;
            }
            for a in &ep.addresses {
                let Some(address) = export_address(a) else {
                    continue;
                };
                out.insert(Instance {
                    name: name.clone(),
                    address,
                    port: number,
                    origin: origin.clone(),
                    tags: tags.clone(),
                    meta: meta.clone(),
                });
            }
        }
    }
    Ok(out.into_iter().collect())
}
