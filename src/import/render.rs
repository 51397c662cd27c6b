//! Import, rendered: from what a catalog reports about one external service (an
//! [`ImportSnapshot`]) to the selector-less Service and the EndpointSlices that make it
//! reachable by cluster DNS. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::api::crd::ExternalRegistration;
use crate::api::labels::{
    ANNOTATION_EXTERNAL_NAME, MANAGED_BY_LABEL, MANAGED_BY_VALUE, REGISTRATION_LABEL,
    SERVICE_NAME_LABEL,
};
use crate::backend::{External, ImportSnapshot};

/// The most endpoints one EndpointSlice holds (the Kubernetes default).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// `mysql_x` → `mysql-x`: lower case, `[a-z0-9-]`, starting with a letter, at most 63
/// characters (a DNS-1035 label, what a Service name must be).
pub fn dns1035(name: &str) -> String {
    let mut out: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let mut out = out.trim_matches('-').to_string();
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert_str(0, "x-");
    }
    out.truncate(63);
    out.trim_end_matches('-').to_string()
}

/// The Service an import registration maintains.
pub fn service_name(reg: &ExternalRegistration) -> String {
    reg.spec
        .target
        .as_ref()
        .and_then(|t| t.service_name.clone())
        .unwrap_or_else(|| dns1035(reg.spec.external_name.as_deref().unwrap_or_default()))
}

/// The objects one import keeps in the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// `None` until a port is known (declared in `target.ports`, or reported by the catalog):
    /// a ClusterIP Service needs one, and its cluster IP cannot be added later.
    pub service: Option<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Endpoints across all slices.
    pub endpoints: usize,
    /// Which slice each endpoint is in, by slice name prefix and address: the next render
    /// keeps endpoints where they are, so one change rewrites one slice.
    pub placement: BTreeMap<String, BTreeMap<String, usize>>,
}

/// The kinds of object an import maintains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl Rendered {
    /// Whether the object `kind`/`name` is part of this rendering.
    pub fn holds(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Service => self.service.as_ref().is_some_and(|s| s.name_any() == name),
            Kind::EndpointSlice => self.slices.iter().any(|s| s.name_any() == name),
        }
    }

    /// Every object of this rendering, by kind and name.
    pub fn objects(&self) -> impl Iterator<Item = (Kind, String)> + '_ {
        self.service
            .iter()
            .map(|s| (Kind::Service, s.name_any()))
            .chain(
                self.slices
                    .iter()
                    .map(|s| (Kind::EndpointSlice, s.name_any())),
            )
    }
}

/// A Service port: its name, the port clients use, and which instance port it reaches.
struct PortMap {
    name: String,
    port: i32,
}

/// Renders the Service and EndpointSlices for `reg` from `snap`. Pure.
pub fn render(
    reg: &ExternalRegistration,
    snap: &ImportSnapshot,
    previous: Option<&Rendered>,
) -> Result<Rendered> {
    let ns = reg
        .namespace()
        .context("an ExternalRegistration is namespaced")?;
    let svc_name = service_name(reg);
    let owner = reg
        .controller_owner_ref(&())
        .context("the registration has no uid yet")?;
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (REGISTRATION_LABEL.to_string(), reg.name_any()),
    ]);
    // Service ports: the ones asked for, else one per port the catalog reports.
    let declared: Vec<PortMap> = reg
        .spec
        .target
        .as_ref()
        .map(|t| {
            t.ports
                .iter()
                .map(|p| PortMap {
                    name: p.name.clone(),
                    port: p.port,
                })
                .collect()
        })
        .unwrap_or_default();
    let reported: BTreeSet<u16> = snap.instances.iter().map(|i| i.port).collect();
    let ports: Vec<PortMap> = if declared.is_empty() {
        reported
            .iter()
            .map(|p| PortMap {
                name: format!("port-{p}"),
                port: i32::from(*p),
            })
            .collect()
    } else {
        declared
    };
    // Which Service port an instance serves: the one with its number, else the first.
    let port_of = |i: &External| -> Option<&PortMap> {
        ports
            .iter()
            .find(|p| p.port == i32::from(i.port))
            .or_else(|| ports.first())
    };
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": svc_name, "namespace": ns, "labels": labels,
            "annotations": {ANNOTATION_EXTERNAL_NAME: reg.spec.external_name},
            "ownerReferences": [owner],
        },
        "spec": {
            "ports": ports.iter().map(|p| json!({
                "name": p.name, "port": p.port, "targetPort": p.port, "protocol": "TCP",
            })).collect::<Vec<_>>(),
        },
    }))
    .context("building the imported Service")?;

    // Endpoints grouped by (address type, service port name, instance port), chunked by 100.
    let mut groups: BTreeMap<(&str, String, u16), Vec<&External>> = BTreeMap::new();
    for i in &snap.instances {
        let Some(p) = port_of(i) else { continue };
        let kind = match i.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => "IPv4",
            Ok(IpAddr::V6(_)) => "IPv6",
            Err(_) => "FQDN",
        };
        groups
            .entry((kind, p.name.clone(), i.port))
            .or_default()
            .push(i);
    }
    let mut slices = Vec::new();
    let mut endpoints = 0;
    let mut placement = BTreeMap::new();
    for ((kind, port_name, port), members) in groups {
        let prefix = format!("{svc_name}-{}-{port}", kind.to_ascii_lowercase());
        let before = previous.and_then(|p| p.placement.get(&prefix));
        // Endpoints stay in the slice they were in; new ones go to the first slice with room.
        let mut bins: BTreeMap<usize, Vec<&External>> = BTreeMap::new();
        let mut new = Vec::new();
        for i in &members {
            match before.and_then(|b| b.get(&i.address)) {
                Some(n) => bins.entry(*n).or_default().push(i),
                None => new.push(*i),
            }
        }
        let mut n = 0;
        for i in new {
            while bins
                .get(&n)
                .is_some_and(|b| b.len() >= MAX_ENDPOINTS_PER_SLICE)
            {
                n += 1;
            }
            bins.entry(n).or_default().push(i);
        }
        let mut placed = BTreeMap::new();
        for (n, chunk) in bins {
            for i in &chunk {
                placed.insert(i.address.clone(), n);
            }
            endpoints += chunk.len();
            let slice_name = format!("{prefix}-{n}");
            let mut slice_labels = labels.clone();
            slice_labels.insert(SERVICE_NAME_LABEL.to_string(), svc_name.clone());
            let slice: EndpointSlice = serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": slice_name, "namespace": ns, "labels": slice_labels,
                    "ownerReferences": [&owner],
                },
                "addressType": kind,
                "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
                "endpoints": chunk.iter().map(|i| json!({
                    "addresses": [i.address],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                })).collect::<Vec<_>>(),
            }))
            .context("building an imported EndpointSlice")?;
            slices.push(slice);
        }
        placement.insert(prefix, placed);
    }
    Ok(Rendered {
        service: (!ports.is_empty()).then_some(service),
        slices,
        endpoints,
        placement,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(spec: serde_json::Value) -> ExternalRegistration {
        serde_json::from_value(json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"name": "mysql-x", "namespace": "shop", "uid": "u-1"},
            "spec": spec,
        }))
        .expect("test registration")
    }

    fn ext(address: &str, port: u16) -> External {
        External {
            address: address.into(),
            port,
            id: format!("{address}:{port}"),
        }
    }

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(dns1035("mysql_x"), "mysql-x");
        assert_eq!(dns1035("API.X__y"), "api-x-y");
        assert_eq!(dns1035("9lives"), "x-9lives");
        assert!(dns1035(&"a".repeat(100)).len() <= 63);
    }

    #[test]
    fn a_selectorless_service_with_slices_split_by_family_and_size() -> Result<()> {
        let r = reg(
            json!({"catalogRef": {"name": "zk"}, "direction": "Import", "externalName": "mysql_x",
                           "target": {"ports": [{"name": "mysql", "port": 3306}]}}),
        );
        let mut instances: Vec<External> = (0..150)
            .map(|i| ext(&format!("10.0.{}.{}", i / 200, i % 200 + 1), 3306))
            .collect();
        instances.push(ext("fd00::8", 3306));
        instances.push(ext("db.example.org", 3306));
        let snap = ImportSnapshot {
            instances,
            synced: true,
            ..Default::default()
        };
        let out = render(&r, &snap, None)?;
        let svc = out.service.clone().context("a Service")?;
        assert_eq!(svc.metadata.name.as_deref(), Some("mysql-x"));
        let spec = svc.spec.clone().context("spec")?;
        assert!(spec.selector.is_none(), "selector-less");
        assert_eq!(
            spec.ports.context("ports")?[0].name.as_deref(),
            Some("mysql")
        );
        assert_eq!(out.endpoints, 152);
        let kinds: Vec<(String, usize)> = out
            .slices
            .iter()
            .map(|s| (s.address_type.clone(), s.endpoints.len()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("FQDN".into(), 1),
                ("IPv4".into(), 100),
                ("IPv4".into(), 50),
                ("IPv6".into(), 1)
            ]
        );
        for s in &out.slices {
            let l = s.metadata.labels.clone().context("labels")?;
            assert_eq!(
                l.get(SERVICE_NAME_LABEL).map(String::as_str),
                Some("mysql-x")
            );
            assert_eq!(
                l.get(MANAGED_BY_LABEL).map(String::as_str),
                Some(MANAGED_BY_VALUE)
            );
            assert_eq!(
                s.metadata.owner_references.clone().context("owner")?[0].uid,
                "u-1"
            );
        }
        Ok(())
    }

    #[test]
    fn one_change_rewrites_one_slice() -> Result<()> {
        let r = reg(
            json!({"catalogRef": {"name": "c"}, "direction": "Import", "externalName": "db",
                           "target": {"ports": [{"name": "db", "port": 5432}]}}),
        );
        let all: Vec<External> = (0..1000)
            .map(|i| ext(&format!("10.1.{}.{}", i / 250, i % 250 + 1), 5432))
            .collect();
        let first = render(
            &r,
            &ImportSnapshot {
                instances: all.clone(),
                synced: true,
                ..Default::default()
            },
            None,
        )?;
        assert_eq!(first.slices.len(), 10);
        let mut fewer = all.clone();
        fewer.remove(5);
        let second = render(
            &r,
            &ImportSnapshot {
                instances: fewer,
                synced: true,
                ..Default::default()
            },
            Some(&first),
        )?;
        let changed = second
            .slices
            .iter()
            .filter(|s| !first.slices.contains(s))
            .count();
        assert_eq!(changed, 1, "removing one endpoint rewrites one slice");
        let third = render(
            &r,
            &ImportSnapshot {
                instances: all,
                synced: true,
                ..Default::default()
            },
            Some(&second),
        )?;
        let changed = third
            .slices
            .iter()
            .filter(|s| !second.slices.contains(s))
            .count();
        assert_eq!(changed, 1, "adding it back fills the gap");
        assert_eq!(third.endpoints, 1000);
        Ok(())
    }

    #[test]
    fn ports_come_from_the_catalog_when_none_are_declared() -> Result<()> {
        let r = reg(
            json!({"catalogRef": {"name": "c"}, "direction": "Import", "externalName": "api_x",
                           "target": {"serviceName": "api"}}),
        );
        let snap = ImportSnapshot {
            instances: vec![ext("10.0.0.1", 8080), ext("10.0.0.2", 9090)],
            synced: true,
            ..Default::default()
        };
        let out = render(&r, &snap, None)?;
        let svc = out.service.clone().context("a Service")?;
        assert_eq!(svc.metadata.name.as_deref(), Some("api"));
        let ports: Vec<i32> = svc
            .spec
            .context("spec")?
            .ports
            .context("ports")?
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [8080, 9090]);
        assert_eq!(out.slices.len(), 2);
        // Nothing reported and nothing declared: no port yet, so no Service and no slices.
        let empty = render(&r, &ImportSnapshot::default(), None)?;
        assert!(empty.service.is_none());
        assert!(empty.slices.is_empty());
        Ok(())
    }
}
