//! Import, the Kubernetes side: from what a catalog reports about one external service (an
//! [`ImportSnapshot`]) to the selector-less Service and the EndpointSlices that make it
//! reachable by cluster DNS — rendered purely, then applied with server-side apply.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::backend::{External, ImportSnapshot};
use crate::crd::ExternalRegistration;
use crate::desired::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// Labels every imported object with the registration it belongs to.
pub const REGISTRATION_LABEL: &str = "catalog-bridge.io/registration";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The most endpoints one EndpointSlice holds (the Kubernetes default).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
const FIELD_MANAGER: &str = "catalog-bridge";

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

/// `snap` as an EndpointSlice can hold it: host names lower-cased (DNS ignores case, the API
/// server does not), and those Kubernetes refuses in a slice — a name of one label (`vm1`),
/// an underscore — moved to the skipped entries with why, so that one such entry is reported
/// and the rest import (a refused slice would stop the whole apply).
pub fn sliceable(mut snap: ImportSnapshot) -> ImportSnapshot {
    let mut skipped = Vec::new();
    let mut renamed = false;
    snap.instances.retain_mut(|i| {
        if i.address.parse::<IpAddr>().is_ok() {
            return true;
        }
        match slice_host(&i.address) {
            Ok(name) => {
                renamed |= name != i.address;
                i.address = name;
                true
            }
            Err(why) => {
                skipped.push((i.id.clone(), why));
                false
            }
        }
    });
    if renamed {
        // Sorted by address, as the catalogs give them.
        snap.instances
            .sort_by(|a, b| (&a.address, a.port, &a.id).cmp(&(&b.address, b.port, &b.id)));
    }
    snap.skipped.extend(skipped);
    snap
}

/// A host name as an EndpointSlice of type FQDN takes it: lower case, at least two labels of
/// `[a-z0-9-]` (a DNS-1123 subdomain).
fn slice_host(host: &str) -> Result<String, String> {
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "host name {host:?} cannot go in an EndpointSlice: Kubernetes takes lower-case \
             letters, digits, '-' and '.' only"
        ));
    }
    if !name.contains('.') {
        return Err(format!(
            "host name {host:?} is not fully qualified: an EndpointSlice takes a host name with \
             its domain only (like {name}.example.internal); register the full name"
        ));
    }
    Ok(name)
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
            "annotations": {"catalog-bridge.io/external-name": reg.spec.external_name},
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
                    "ownerReferences": [reg.controller_owner_ref(&())],
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
    fn host_names_an_endpoint_slice_refuses_are_skipped_with_why_and_the_rest_import() {
        let snap = ImportSnapshot {
            instances: vec![
                ext("10.0.0.1", 3306),
                ext("DB-1.Example.", 3306),
                ext("vm1", 3306),
                ext("db_2.example", 3306),
                ext("fd00::1", 3306),
            ],
            skipped: vec![("earlier".into(), "not JSON".into())],
            synced: true,
            error: None,
        };
        let out = sliceable(snap);
        let kept: Vec<&str> = out.instances.iter().map(|i| i.address.as_str()).collect();
        assert_eq!(kept, ["10.0.0.1", "db-1.example", "fd00::1"]);
        let skipped: Vec<&str> = out.skipped.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(skipped, ["earlier", "vm1:3306", "db_2.example:3306"]);
        assert!(
            out.skipped[1].1.contains("not fully qualified"),
            "{:?}",
            out.skipped
        );
        assert!(
            out.skipped[2].1.contains("lower-case letters"),
            "{:?}",
            out.skipped
        );
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
