//! Annotations users put on Services (SPEC §2), and labels catalog-bridge puts on the objects it
//! creates.

/// What every annotation catalog-bridge reads begins with.
pub const ANNOTATION_PREFIX: &str = "catalog-bridge.io/";
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

/// Whether `labels` mark an object the import of registration `registration` maintains.
pub fn imported_by(
    labels: Option<&std::collections::BTreeMap<String, String>>,
    registration: &str,
) -> bool {
    is_imported(labels)
        && labels
            .and_then(|l| l.get(REGISTRATION_LABEL))
            .map(String::as_str)
            == Some(registration)
}

/// The label selector of the objects the import of registration `registration` maintains.
pub fn import_selector(registration: &str) -> String {
    format!("{REGISTRATION_LABEL}={registration},{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")
}

/// The finalizer the leader puts on every ExternalCatalog: its deletion waits until what this
/// cluster wrote to the catalog is removed (SPEC §6.10).
pub const FINALIZER: &str = "catalog-bridge.io/cleanup";
/// On an ExternalCatalog: `"true"` lets it go when deleted without removing its entries (a
/// catalog gone for good); what stays behind is logged and announced in an Event.
pub const ANNOTATION_ABANDON: &str = "catalog-bridge.io/abandon";

/// Whether `annotations` ask for a deleted ExternalCatalog to be let go without cleaning.
pub fn is_abandoned(annotations: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(ANNOTATION_ABANDON))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Whether `finalizers` hold catalog-bridge's.
pub fn holds_finalizer(finalizers: Option<&Vec<String>>) -> bool {
    finalizers.is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}
