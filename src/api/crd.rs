//! The custom resources users apply: `ExternalCatalog` (how to reach one catalog) and
//! `ExternalRegistration` (one Service exported to, or one external service imported from, a
//! catalog). `catalog-bridge crds` prints their CRDs; `crds/` holds that output.
//!
//! Validation lives in the schema, so the API server rejects a bad object at `kubectl apply`:
//! enums, minimums, patterns, and CEL rules where a rule spans fields.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::policy::CatalogPolicy;

pub const GROUP: &str = "catalog-bridge.io";

/// The most tags one export carries (the CRD schema's `maxItems`, the annotation's limit): with
/// the other bounds, one entry stays far below every catalog's request limit.
pub const MAX_TAGS: usize = 64;
/// The longest tag.
pub const MAX_TAG_LENGTH: usize = 255;
/// The most meta pairs one export carries (Consul's limit).
pub const MAX_META: usize = 64;
/// The longest meta value (Consul's limit).
pub const MAX_META_VALUE_LENGTH: usize = 512;

// ---------------------------------------------------------------------------------------------
// ExternalCatalog

/// How to reach one external service catalog: exactly one of `consul`, `etcd`, `zookeeper`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "catalog-bridge.io",
    version = "v1alpha1",
    kind = "ExternalCatalog",
    shortname = "xcat",
    category = "catalog-bridge",
    status = "ExternalCatalogStatus",
    doc = "An external service catalog (Consul, etcd or ZooKeeper) that catalog-bridge exports Services to and imports services from.",
    printcolumn(name = "Kind", type_ = "string", json_path = ".status.kind"),
    printcolumn(name = "Reachable", type_ = "string", json_path = ".status.conditions[?(@.type==\"Reachable\")].status"),
    printcolumn(name = "Exported", type_ = "integer", json_path = ".status.exportedEntries"),
    printcolumn(name = "Imported", type_ = "integer", json_path = ".status.importedEntries"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("(has(self.spec.consul) ? 1 : 0) + (has(self.spec.etcd) ? 1 : 0) + (has(self.spec.zookeeper) ? 1 : 0) == 1").message("exactly one of spec.consul, spec.etcd, spec.zookeeper must be set"),
    validation = Rule::new("!has(self.spec.etcd) || !has(self.spec.etcd.basePath) || !self.spec.etcd.basePath.contains('//')").message("spec.etcd.basePath must not hold an empty segment (//)"),
    validation = Rule::new("!has(self.spec.etcd) || !has(self.spec.etcd.tls) || !has(self.spec.etcd.tls.insecureSkipVerify) || !self.spec.etcd.tls.insecureSkipVerify").message("spec.etcd.tls.insecureSkipVerify is not supported (etcd's gRPC client always verifies certificates): give the CA with tls.caSecretRef, or leave it out to trust the system's CA certificates")
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalCatalogSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<ConsulCatalog>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdCatalog>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zookeeper: Option<ZooKeeperCatalog>,
    /// Who may use this catalog: which namespaces may export to it and import from it, under
    /// which names, whether one name from several namespaces is merged, and which imported
    /// addresses are taken. Left out: every namespace and name; a name exported from two
    /// namespaces stays with the oldest export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<CatalogPolicy>,
}

/// A Consul cluster, reached through its HTTP API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsulCatalog {
    /// `http(s)://host:port` of Consul agents or servers; tried in turn, the next on failure.
    #[schemars(
        length(min = 1, max = 16),
        inner(regex(pattern = r"^https?://[^/]+$"), length(max = 253))
    )]
    pub addresses: Vec<String>,
    /// Datacenter to write to; default: the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// An ACL token with `node:write` and `service:write` on what is exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// The synthetic node that holds exported instances; default `k8s-<clusterId>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// An etcd v3 cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EtcdCatalog {
    /// `host:port` or `http(s)://host:port` of etcd members.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    pub endpoints: Vec<String>,
    /// A Secret with `username` and `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// TTL of the lease every exported key is attached to: how long a dead controller's entries
    /// stay. Default 15.
    #[serde(
        default,
        rename = "leaseTTLSeconds",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 5, max = 3600))]
    pub lease_ttl_seconds: Option<i64>,
    /// Key layout: `plain` (default), `naming` (etcd gRPC resolver), `coredns`.
    #[serde(default)]
    pub layout: EtcdLayout,
    /// Key prefix; default `/services` (plain), empty (naming), `/skydns` (coredns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub base_path: Option<String>,
    /// DNS zone of the `coredns` layout; default `bridge.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    ))]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// A ZooKeeper ensemble.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ZooKeeperCatalog {
    /// `host1:2181,host2:2181[/chroot]`.
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = r"^[^,/]+(,[^,/]+)*(/.*)?$")
    )]
    pub connect: String,
    /// Session timeout; default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 600))]
    pub session_timeout_seconds: Option<i64>,
    /// A Secret with `username` and `password` for digest authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_secret_ref: Option<SecretRef>,
    /// Node layout: `plain` (default) or `curator`.
    #[serde(default)]
    pub layout: ZooKeeperLayout,
    /// znode prefix; default `/services`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(/[^/]+)+$"))]
    pub base_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// The servers' `jute.maxbuffer` in bytes, when it is not ZooKeeper's default (1048576):
    /// each session of this controller owns at most half of it in entry paths (more sessions
    /// are used past that), and a `multi` holds at most a quarter of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16384, max = 2147483647))]
    pub jute_max_buffer: Option<i64>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EtcdLayout {
    /// `<basePath>/<name>/providers/<ip>:<port>` = `<ip>:<port>`.
    #[default]
    Plain,
    /// `<name>/<ip>:<port>` = `{"Op":0,"Addr":"<ip>:<port>"}` (etcd gRPC resolver).
    Naming,
    /// `/skydns/<zone reversed>/<namespace>/<name>/<id>` = `{"host","port","ttl"}` (CoreDNS).
    Coredns,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ZooKeeperLayout {
    /// `<basePath>/<name>/providers/<ip>:<port>` (kazoo, zc.zk).
    #[default]
    Plain,
    /// `<basePath>/<name>/<id>` with Curator `ServiceInstance` JSON (Curator, Spring Cloud).
    Curator,
}

/// A key of a Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

/// A Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

/// TLS towards the catalog.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TlsConfig {
    /// A Secret whose `ca.crt` holds the CA bundle to trust; default: the system's CA
    /// certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretRef>,
    /// A Secret with `tls.crt` and `tls.key` for client authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// What catalog-bridge knows about an ExternalCatalog.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalCatalogStatus {
    /// `Reachable` (the catalog answers) and `Ready` (what should be there is there).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// `consul`, `etcd` or `zookeeper`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact_time: Option<String>,
    /// What the catalog reports about itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerInfo>,
    #[serde(default)]
    pub exported_entries: i64,
    #[serde(default)]
    pub imported_entries: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Times the catalog's writer stopped unexpectedly and was started again, since this leader
    /// started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub task_restarts: i64,
}

/// What a catalog says about itself.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServerInfo {
    /// The address that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The member that leads the cluster: Consul's raft leader, etcd's leader, the ZooKeeper
    /// server in mode `leader`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Consul: the datacenter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// etcd: the cluster id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// The cluster's members: etcd's client URLs, Consul's raft peers, the ZooKeeper servers of
    /// the connect string that answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// ZooKeeper: `standalone`, `leader` or `follower`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// ExternalRegistration

/// One Service exported to a catalog, or one external service imported from it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "catalog-bridge.io",
    version = "v1alpha1",
    kind = "ExternalRegistration",
    namespaced,
    shortname = "xreg",
    category = "catalog-bridge",
    status = "ExternalRegistrationStatus",
    doc = "A Service exported to an ExternalCatalog, or a service of an ExternalCatalog imported as a Service.",
    printcolumn(name = "Catalog", type_ = "string", json_path = ".spec.catalogRef.name"),
    printcolumn(name = "Direction", type_ = "string", json_path = ".spec.direction"),
    printcolumn(name = "Service", type_ = "string", json_path = ".status.serviceName"),
    printcolumn(name = "External name", type_ = "string", json_path = ".status.externalName"),
    printcolumn(name = "Endpoints", type_ = "integer", json_path = ".status.endpoints"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.direction != 'Export' || has(self.spec.service)").message("direction Export needs spec.service"),
    validation = Rule::new("self.spec.direction != 'Import' || has(self.spec.externalName)").message("direction Import needs spec.externalName"),
    validation = Rule::new("self.spec.direction != 'Import' || !has(self.spec.service)").message("spec.service is for Export; Import maintains spec.target.serviceName"),
    validation = Rule::new("self.spec.direction != 'Export' || !has(self.spec.target)").message("spec.target is for Import"),
    validation = Rule::new("self.spec.direction != 'Export' || !has(self.spec.import)").message("spec.import is for Import"),
    validation = Rule::new("!has(self.spec.target) || !has(self.spec.target.ports) || self.spec.target.ports.all(p, self.spec.target.ports.exists_one(q, q.name == p.name))").message("spec.target.ports: each name once"),
    validation = Rule::new("!has(self.spec.target) || !has(self.spec.target.ports) || self.spec.target.ports.all(p, self.spec.target.ports.exists_one(q, q.port == p.port))").message("spec.target.ports: each port once")
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRegistrationSpec {
    pub catalog_ref: CatalogRef,
    pub direction: Direction,
    /// Export: the Service in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Export: the Service port (name or number) whose endpoints are published; default the
    /// first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
    /// The name in the catalog. Export: default the Service name. Import: required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")
    )]
    pub external_name: Option<String>,
    /// Export: Consul tags; carried in the payload where the layout has one. At most 64 tags
    /// of 1 to 255 characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 255)))]
    pub tags: Vec<String>,
    /// Export: Consul service meta; carried in the payload where the layout has one. At most
    /// 64 pairs, values of at most 512 characters (Consul's own limits).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 512}
    ))]
    pub meta: BTreeMap<String, String>,
    /// Import: the Service to maintain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ImportTarget>,
    /// Import: how the import follows its catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportOptions>,
}

impl ExternalRegistrationSpec {
    /// Import: `import.emptyHoldSeconds`, or its default.
    pub fn empty_hold(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(
            self.import
                .as_ref()
                .and_then(|i| i.empty_hold_seconds)
                .unwrap_or(DEFAULT_EMPTY_HOLD_SECONDS),
        ))
    }
}

/// The default of `spec.import.emptyHoldSeconds`.
pub const DEFAULT_EMPTY_HOLD_SECONDS: u32 = 30;

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CatalogRef {
    #[schemars(length(min = 1))]
    pub name: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Export,
    Import,
}

/// A port by name or number. The number is read as any integer (the schema bounds it to
/// 1-65535; an object stored before that rule must not stop the watch of every registration)
/// and a number out of range is simply a port no Service has.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortRef {
    Number(i64),
    Name(String),
}

impl JsonSchema for PortRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRef".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A port name or number.",
            "x-kubernetes-int-or-string": true,
            "x-kubernetes-validations": [{
                "rule": "type(self) == string || (self >= 1 && self <= 65535)",
                "message": "a port number is between 1 and 65535"
            }]
        })
    }
    fn inline_schema() -> bool {
        true
    }
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(s) => f.write_str(s),
        }
    }
}

/// Import: the Service kept equal to the catalog's healthy instances.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImportTarget {
    /// Default: `externalName` made DNS-1035 (`mysql_x` → `mysql-x`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub service_name: Option<String>,
    /// Ports of the Service; default the port(s) the catalog reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ports: Vec<NamedPort>,
}

/// Import: how the import follows its catalog.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImportOptions {
    /// A safety valve: when the catalog suddenly stops listing most of the instances it listed
    /// (none left, or fewer than half and more than half unknown to it: a Consul agent
    /// restarted empty, an etcd prefix or a ZooKeeper path deleted by mistake), the Service
    /// keeps the missing endpoints for this many seconds, and the registration says so
    /// (`Synced=False`, reason `ImportHeld`). Instances the catalog lists again, healthy or
    /// failing, follow it at once; the rest go when the hold runs out. Instances that are
    /// still registered but fail their health checks are never held. Default 30; 0 turns the
    /// hold off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3600))]
    pub empty_hold_seconds: Option<u32>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NamedPort {
    /// A Service port name: lower-case letters, digits and `-` (a DNS-1123 label).
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRegistrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `Synced`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The Kubernetes Service: exported from (Export) or maintained (Import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// The name in the catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    /// Endpoints now in sync.
    #[serde(default)]
    pub endpoints: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    /// Times the task that serves this registration (its catalog's writer, or its import)
    /// stopped unexpectedly and was started again, since this leader started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub task_restarts: i64,
}

/// A status condition, as `metav1.Condition`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word.
    pub reason: String,
    /// What happened, in words, with the real error.
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The CRDs as one YAML stream, the content of `crds/`.
pub fn crds_yaml() -> anyhow::Result<String> {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [ExternalCatalog::crd(), ExternalRegistration::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_bounds_tags_and_meta_as_the_constants_say() {
        let crd = serde_json::to_value(<ExternalRegistration as kube::CustomResourceExt>::crd())
            .expect("the CRD as JSON");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["tags"]["maxItems"], MAX_TAGS, "{}", spec["tags"]);
        assert_eq!(spec["tags"]["items"]["maxLength"], MAX_TAG_LENGTH);
        assert_eq!(spec["meta"]["maxProperties"], MAX_META, "{}", spec["meta"]);
        assert_eq!(
            spec["meta"]["additionalProperties"]["maxLength"],
            MAX_META_VALUE_LENGTH
        );
    }

    #[test]
    fn any_port_number_decodes_so_one_bad_object_cannot_stop_the_watch() {
        for (v, want) in [
            (serde_json::json!(8080), PortRef::Number(8080)),
            (serde_json::json!(70000), PortRef::Number(70000)),
            (serde_json::json!(-1), PortRef::Number(-1)),
            (serde_json::json!("http"), PortRef::Name("http".into())),
        ] {
            let got: PortRef = serde_json::from_value(v.clone()).expect("a port decodes");
            assert_eq!(got, want, "{v}");
        }
    }
}
