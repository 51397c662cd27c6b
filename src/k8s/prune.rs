//! What the caches keep of each object: only what catalog-bridge reads. A watch hands every
//! object whole — `managedFields` alone is often larger than the rest, and a Service carries
//! its `kubectl.kubernetes.io/last-applied-configuration` — and a cluster of 10,000 Services
//! and their EndpointSlices held whole is most of a controller's memory. Each kind is pruned
//! before its store sees it (kube-runtime's `WatchStreamExt::modify`).

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;

use super::cached::{CachedService, CachedSlice};
use crate::api::labels::ANNOTATION_PREFIX;

/// Removes from `obj` what no part of catalog-bridge reads.
pub trait Prune {
    fn prune(&mut self);
}

/// Every kind: no `managedFields` (who changed which field, read from write responses only).
fn metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
}

/// Annotations other than catalog-bridge's own (the export settings, an import's external
/// name): a `last-applied-configuration` is a copy of the whole object.
fn own_annotations(meta: &mut ObjectMeta) {
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| k.starts_with(ANNOTATION_PREFIX));
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

impl Prune for CachedService {
    /// Kept: metadata (labels, owner references, uid, versions, times), catalog-bridge's
    /// annotations, the ports and `publishNotReadyAddresses` (the spec holds no more).
    fn prune(&mut self) {
        metadata(&mut self.metadata);
        own_annotations(&mut self.metadata);
    }
}

impl Prune for CachedSlice {
    /// Kept: the address type, the ports, and each endpoint's addresses and conditions (all
    /// the type holds; the rest of each endpoint is skipped while decoding).
    fn prune(&mut self) {
        metadata(&mut self.metadata);
        own_annotations(&mut self.metadata);
    }
}

impl Prune for Namespace {
    /// Kept: the name, uid and labels (the catalogs' policies select namespaces by label).
    fn prune(&mut self) {
        metadata(&mut self.metadata);
        self.metadata.annotations = None;
        self.spec = None;
        self.status = None;
    }
}

/// The custom resources are kept whole but for `managedFields`: their spec and status are read.
macro_rules! metadata_only {
    ($($kind:ty),*) => {
        $(impl Prune for $kind {
            fn prune(&mut self) {
                metadata(self.meta_mut());
            }
        })*
    };
}

metadata_only!(
    crate::api::crd::ExternalCatalog,
    crate::api::crd::ExternalRegistration
);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pruned_service_keeps_what_the_export_and_import_read() {
        let mut svc: CachedService = serde_json::from_value(json!({
            "metadata": {
                "name": "api", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                "labels": {"app": "api"},
                "annotations": {
                    "catalog-bridge.io/export": "consul",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"a\": 1}",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "o"}],
            },
            "spec": {"ports": [{"name": "http", "port": 80}], "publishNotReadyAddresses": true,
                     "selector": {"app": "api"}, "clusterIP": "10.96.0.1"},
            "status": {"loadBalancer": {}},
        }))
        .expect("a Service");
        svc.prune();
        assert_eq!(
            serde_json::to_value(&svc).expect("json"),
            json!({
                "metadata": {
                    "name": "api", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                    "labels": {"app": "api"},
                    "annotations": {"catalog-bridge.io/export": "consul"},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "o"}],
                },
                "spec": {"ports": [{"name": "http", "port": 80}], "publishNotReadyAddresses": true},
            })
        );
    }

    #[test]
    fn a_pruned_slice_keeps_addresses_conditions_and_ports() {
        let mut slice: CachedSlice = serde_json::from_value(json!({
            "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "api"},
                         "managedFields": [{"manager": "kcm"}]},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true},
                           "nodeName": "n1", "zone": "z", "hostname": "h",
                           "targetRef": {"kind": "Pod", "name": "p"}}],
        }))
        .expect("a slice");
        slice.prune();
        assert_eq!(
            serde_json::to_value(&slice).expect("json"),
            json!({
                "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "api"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
            })
        );
    }
}
