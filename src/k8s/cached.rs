//! Services and EndpointSlices as the caches keep them: only the fields catalog-bridge reads,
//! decoded straight from the watch. k8s-openapi's `Endpoint` is some 350 bytes even with every
//! optional field empty (target reference, hints, zone, node, topology), its `ServiceSpec`
//! some 700; 10,000 slices of 10 endpoints held 45 MB that way. These types are read and
//! watched like the real ones (same API group, kind and path); what they do not declare is
//! skipped while decoding.

use k8s_openapi::api::core::v1::ServicePort;
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer, Serialize};

/// An EndpointSlice (`discovery.k8s.io/v1`) with what the export and the imports read: its
/// metadata, address type, ports, and each endpoint's addresses and conditions.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedSlice {
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address_type: String,
    /// The API server sends `null` for a slice without endpoints.
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoints: Vec<CachedEndpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<EndpointPort>>,
}

/// One endpoint of a [`CachedSlice`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedEndpoint {
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<EndpointConditions>,
}

/// A field the API server may send as `null`, read as its default (as k8s-openapi reads it).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A Service (`v1`) with what the export and the imports read: its metadata, ports and
/// `publishNotReadyAddresses`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedService {
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<CachedServiceSpec>,
}

/// The part of a Service's spec a [`CachedService`] keeps.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedServiceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ServicePort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_not_ready_addresses: Option<bool>,
}

/// `$cached` is the resource `$real` is: the same API group, version, kind, path and scope,
/// taken from k8s-openapi's own definition, so the watch reads the same objects.
macro_rules! same_resource_as {
    ($cached:ty, $real:ty) => {
        impl k8s_openapi::Resource for $cached {
            const API_VERSION: &'static str = <$real as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$real as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$real as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$real as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$real as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$real as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $cached {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

same_resource_as!(CachedSlice, k8s_openapi::api::discovery::v1::EndpointSlice);
same_resource_as!(CachedService, k8s_openapi::api::core::v1::Service);

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::Resource;
    use serde_json::json;

    #[test]
    fn a_slice_decodes_to_what_is_read_and_is_watched_as_an_endpointslice() {
        let full = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "s", "namespace": "shop", "resourceVersion": "7",
                         "labels": {"kubernetes.io/service-name": "api"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.0.1"],
                           "conditions": {"ready": true, "serving": true, "terminating": false},
                           "nodeName": "n1", "zone": "z", "hostname": "h",
                           "targetRef": {"kind": "Pod", "name": "p", "namespace": "shop"}}],
        });
        let cached: CachedSlice = serde_json::from_value(full.clone()).expect("a slice");
        assert_eq!(cached.address_type, "IPv4");
        assert_eq!(cached.endpoints[0].addresses, ["10.0.0.1"]);
        let c = cached.endpoints[0].conditions.as_ref().expect("conditions");
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(true), Some(true), Some(false))
        );
        let ports = cached.ports.as_deref().unwrap_or_default();
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("http"), Some(8080))
        );
        assert_eq!(cached.metadata.resource_version.as_deref(), Some("7"));
        // The same resource as k8s-openapi's: the same URL and kind for the watch.
        assert_eq!(
            CachedSlice::url_path(&(), Some("shop")),
            EndpointSlice::url_path(&(), Some("shop"))
        );
        assert_eq!(CachedSlice::kind(&()), EndpointSlice::kind(&()));
    }

    #[test]
    fn a_slice_without_endpoints_decodes_as_the_api_server_sends_it() {
        // As a Service without ready Pods has it: `endpoints` and `ports` are null.
        let empty: CachedSlice = serde_json::from_value(json!({
            "metadata": {"name": "s", "namespace": "shop"},
            "addressType": "IPv4", "endpoints": null, "ports": null,
        }))
        .expect("a slice without endpoints");
        assert!(empty.endpoints.is_empty() && empty.ports.is_none());
        let service: CachedService = serde_json::from_value(json!({
            "metadata": {"name": "api"}, "spec": {"ports": null},
        }))
        .expect("a Service without ports");
        assert!(service.spec.is_some_and(|s| s.ports.is_none()));
    }

    #[test]
    fn a_service_decodes_to_its_ports_and_is_watched_as_a_service() {
        let cached: CachedService = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "api", "namespace": "shop", "uid": "u1"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                     "publishNotReadyAddresses": true, "selector": {"app": "api"},
                     "clusterIP": "10.96.0.1", "type": "ClusterIP"},
            "status": {"loadBalancer": {}},
        }))
        .expect("a Service");
        let spec = cached.spec.as_ref().expect("a spec");
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ports = spec.ports.as_deref().unwrap_or_default();
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("http"), 80)
        );
        assert_eq!(
            CachedService::url_path(&(), Some("shop")),
            Service::url_path(&(), Some("shop"))
        );
        assert_eq!(CachedService::kind(&()), Service::kind(&()));
        assert_eq!(CachedService::api_version(&()), Service::api_version(&()));
    }
}
