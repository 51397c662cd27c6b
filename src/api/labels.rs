//! Annotations users put on Services (SPEC §2), and labels catalog-bridge puts on the objects it
//! creates.

/// Comma-separated ExternalCatalog names to export the Service to.
pub const ANNOTATION_EXPORT: &str = "catalog-bridge.io/export";
/// The external name (default: the Service name).
pub const ANNOTATION_NAME: &str = "catalog-bridge.io/name";
/// The port name or number to export (default: the first).
pub const ANNOTATION_PORT: &str = "catalog-bridge.io/port";
/// Comma-separated tags.
pub const ANNOTATION_TAGS: &str = "catalog-bridge.io/tags";
/// One meta entry per annotation: `catalog-bridge.io/meta.<key>`.
pub const ANNOTATION_META_PREFIX: &str = "catalog-bridge.io/meta.";
/// On an imported Service: the name in the catalog.
pub const ANNOTATION_EXTERNAL_NAME: &str = "catalog-bridge.io/external-name";

/// The label on Services and EndpointSlices created by import; such Services are never
/// exported.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "catalog-bridge.io";
/// Labels every imported object with the registration it belongs to.
pub const REGISTRATION_LABEL: &str = "catalog-bridge.io/registration";
/// The Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Whether `labels` mark an object created by an import.
pub fn is_imported(labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY_VALUE)
}
