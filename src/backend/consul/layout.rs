//! The layout: what an instance becomes in Consul and how the owned entries are read back.
//! Pure: no HTTP here.
//!
//! A record is the part of a catalog entry this controller decides, in the exact shape Consul
//! returns it, so that what [`Consul::read_owned`] reconstructs compares equal to what
//! [`Consul::render`] produces when nothing changed:
//!
//! ```json
//! {"Service": {"ID": "<owner>:<stable id>", "Service": "api_x", "Address": "10.0.0.1", "Port": 8080,
//!              "Tags": [], "Meta": {"catalog-bridge-owner": "…", "external-source": "kubernetes",
//!                                   "k8s-namespace": "shop", "k8s-service": "api-x"}},
//!  "NodeCheck": "passing"}
//! ```
//!
//! Health is one check on the synthetic node ([`NODE_CHECK_ID`], passing), not a check per
//! instance: readiness is carried by adding and removing instances, and Consul counts a node's
//! checks for every service on it, so `/v1/health/service/<name>?passing` lists every instance
//! while it passes and none when someone turns it critical. `NodeCheck` is that check's status
//! as read back: a node check that went missing or failing makes every record differ, and the
//! writes that follow register it again. A check per instance cost Consul 20–25 times the
//! time of the same instances without (10,000 instances: 15 s against 0.7 s), and no reader
//! needs one: health queries count node checks, catalog queries count no check at all.
//! Records read back with the check per instance of before (`"Check"`) differ too; the
//! transaction that puts such a service again deletes its check ([`Consul::legacy_check_delete`]).
//!
//! Ownership is the service meta `catalog-bridge-owner`: services on the node without it (or
//! with another owner) are never read as ours, so never changed or deleted.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value, json};

use super::Consul;
use crate::backend::{BackendError, Record};
use crate::model::Instance;

/// Service meta key that marks the owner of an entry.
pub const OWNER_META: &str = "catalog-bridge-owner";
/// Service meta key naming the ExternalCatalog that wrote an entry: two ExternalCatalogs of one
/// owner on one Consul node (one for import only, say) each own only their own entries.
pub const CATALOG_META: &str = "catalog-bridge-catalog";
/// Meta key (node and service) that marks entries synced from Kubernetes.
pub const SOURCE_META: &str = "external-source";
pub const SOURCE_VALUE: &str = "kubernetes";
/// Name of the check on the synthetic node, and of the per-instance checks of before.
pub const CHECK_NAME: &str = "Kubernetes readiness";
/// ID of the one check on the synthetic node; its status stands for every instance on it.
pub const NODE_CHECK_ID: &str = "catalog-bridge";
/// What the node check tells a person reading the Consul UI.
const NODE_CHECK_NOTES: &str = "Every service instance on this node is a ready Kubernetes \
     endpoint: catalog-bridge registers endpoints when they turn ready and deregisters them \
     when they stop being ready.";
/// Address of the synthetic node (it runs no agent; the services carry their own addresses).
pub const NODE_ADDRESS: &str = "127.0.0.1";

/// Consul's limits on service meta (`agent/structs`): pairs per service, key and value length.
pub const MAX_META_PAIRS: usize = 64;
const MAX_META_KEY_LEN: usize = 128;
const MAX_META_VALUE_LEN: usize = 512;
/// The meta keys every record carries besides the instance's own.
const OWN_META_KEYS: usize = 5;

/// Why Consul would refuse this service meta pair (and with it the whole transaction that
/// carries it), or None when it is valid. For the layer that reads annotations and
/// registrations, to report a bad key where the user wrote it.
pub fn meta_problem(key: &str, value: &str) -> Option<String> {
    if key.is_empty() {
        return Some("a Consul meta key cannot be empty".into());
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Some(format!(
            "Consul meta key {key:?} may only hold letters, digits, '_' and '-'"
        ));
    }
    if key.len() > MAX_META_KEY_LEN {
        return Some(format!(
            "Consul meta key {key:?} is longer than {MAX_META_KEY_LEN} characters"
        ));
    }
    if key.starts_with("consul-") {
        return Some(format!(
            "Consul meta key {key:?}: the prefix consul- is reserved"
        ));
    }
    if value.len() > MAX_META_VALUE_LEN {
        return Some(format!(
            "Consul meta value of {key:?} is longer than {MAX_META_VALUE_LEN} characters"
        ));
    }
    None
}

/// Why each meta pair of an instance is left out of its Consul entry ([`Consul::record`]): the
/// pairs Consul would refuse, and those beyond its limit of pairs. Empty when all are kept.
pub fn dropped_meta(meta: &BTreeMap<String, String>) -> Vec<String> {
    let mut kept = 0;
    let mut dropped = Vec::new();
    for (k, v) in meta {
        if let Some(why) = meta_problem(k, v) {
            dropped.push(why);
        } else if kept == MAX_META_PAIRS - OWN_META_KEYS {
            dropped.push(format!(
                "Consul meta key {k:?} is beyond the {} pairs an entry can carry besides catalog-bridge's own",
                MAX_META_PAIRS - OWN_META_KEYS
            ));
        } else {
            kept += 1;
        }
    }
    dropped
}

impl Consul {
    /// The service ID of `instance`: this owner's id, then the instance's identity from
    /// (namespace, service, name, address, port). With the owner in it, two clusters whose
    /// controllers share a `nodeName` never write the same ID. (Before, the ID was the
    /// instance's identity alone; [`Consul::adopt_legacy`] replaces such entries.)
    pub fn service_id(&self, instance: &Instance) -> String {
        format!("{}:{}", self.owner, instance.stable_id())
    }

    /// Whether `id` is a service ID of this owner's scheme ([`Consul::service_id`]). The IDs
    /// of before hold no `:`.
    fn is_current_id(&self, id: &str) -> bool {
        id.strip_prefix(self.owner.as_str())
            .is_some_and(|rest| rest.starts_with(':'))
    }

    /// Files the owned entries still under a service ID of before ([`Consul::service_id`])
    /// under the ID they have now, unless that one exists too (then the old one is an entry
    /// to delete). Their records keep the old IDs, so the plan puts them again, and the
    /// transaction that does it deletes the old entry with the same commit: readers never see
    /// the instance missing. Returns the records, and for each entry filed anew its key → its
    /// ID in Consul. Runs once after an upgrade: from then on there is nothing to adopt.
    pub(super) fn adopt_legacy(
        &self,
        owned: BTreeMap<String, Record>,
    ) -> (BTreeMap<String, Record>, HashMap<String, String>) {
        let mut legacy = HashMap::new();
        let mut out = BTreeMap::new();
        let (current, old): (Vec<_>, Vec<_>) = owned
            .into_iter()
            .partition(|(id, _)| self.is_current_id(id));
        out.extend(current);
        for (id, record) in old {
            let key = format!("{}:{id}", self.owner);
            if out.contains_key(&key) {
                out.insert(id, record);
            } else {
                legacy.insert(key.clone(), id);
                out.insert(key, record);
            }
        }
        (out, legacy)
    }

    /// The ID in Consul of the entry filed under `key` by [`Consul::adopt_legacy`], if any.
    pub(super) fn legacy_id(&self, key: &str) -> Option<String> {
        self.legacy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// The txn operation that deletes the entry of before that `key` replaces, if any:
    /// sent in the same transaction as the operations of `key`.
    pub(super) fn legacy_delete(&self, key: &str, name: &str) -> Option<Value> {
        let old = self.legacy_id(key)?;
        Some(json!({"Service": {
            "Verb": "delete", "Node": self.node,
            "Service": {"ID": old, "Service": name},
        }}))
    }

    /// After a commit that wrote or deleted `key`: its entry of before is gone.
    pub(super) fn legacy_done(&self, key: &str) -> Option<String> {
        self.legacy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
    }

    /// The ID of the per-instance check of before of the instance with service ID `service_id`.
    fn legacy_check_id(service_id: &str) -> String {
        format!("{service_id}:ready")
    }

    /// The txn operation that deletes the per-instance check of before of the entry `key`, if
    /// it has one: sent in the same transaction as the put of its service.
    pub(super) fn legacy_check_delete(&self, key: &str) -> Option<Value> {
        if !self
            .legacy_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
        {
            return None;
        }
        Some(json!({"Check": {"Verb": "delete", "Check": {
            "Node": self.node, "CheckID": Self::legacy_check_id(key),
        }}}))
    }

    /// After a commit that wrote or deleted `key`: its check of before is gone.
    pub(super) fn legacy_check_done(&self, key: &str) {
        self.legacy_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// The record of one instance (see the module documentation). Meta pairs Consul would
    /// refuse ([`meta_problem`], and those beyond its 64 pairs) are left out: one of them
    /// would fail the whole transaction, and with it every other instance in it.
    pub fn record(&self, instance: &Instance) -> Record {
        let id = self.service_id(instance);
        let mut meta: BTreeMap<String, String> = instance
            .meta
            .iter()
            .filter(|(k, v)| meta_problem(k, v).is_none())
            .take(MAX_META_PAIRS - OWN_META_KEYS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.insert(SOURCE_META.into(), SOURCE_VALUE.into());
        meta.insert(OWNER_META.into(), self.owner.clone());
        if !self.catalog.is_empty() {
            meta.insert(CATALOG_META.into(), self.catalog.clone());
        }
        meta.insert("k8s-namespace".into(), instance.origin.namespace.clone());
        meta.insert("k8s-service".into(), instance.origin.service.clone());
        json!({
            "Service": {
                "ID": id,
                "Service": instance.name,
                "Address": instance.address.to_string(),
                "Port": instance.port,
                "Tags": instance.tags,
                "Meta": meta,
            },
            "NodeCheck": "passing",
        })
    }

    /// The txn operations that register the synthetic node and its passing check.
    pub(super) fn node_ops(&self) -> [Value; 2] {
        [
            json!({"Node": {"Verb": "set", "Node": {
                "Node": self.node,
                "Address": NODE_ADDRESS,
                "Meta": {SOURCE_META: SOURCE_VALUE, OWNER_META: self.owner},
            }}}),
            json!({"Check": {"Verb": "set", "Check": {
                "Node": self.node,
                "CheckID": NODE_CHECK_ID,
                "Name": CHECK_NAME,
                "Notes": NODE_CHECK_NOTES,
                "Status": "passing",
            }}}),
        ]
    }

    /// The owned entries in the answers of `/v1/catalog/node-services/<node>` and
    /// `/v1/health/node/<node>` ([`OwnedEntries`]).
    pub(super) fn owned_records(
        &self,
        node_services: &Value,
        checks: &Value,
    ) -> Result<OwnedEntries, BackendError> {
        let checks: &[Value] = match checks {
            Value::Array(c) => c,
            Value::Null => &[],
            other => {
                return Err(BackendError::Protocol(format!(
                    "health of node {}: not a list of checks: {other}",
                    self.node
                )));
            }
        };
        let mut checks_by_id: HashMap<&str, &Value> = HashMap::new();
        for c in checks {
            if let Some(id) = c.get("CheckID").and_then(Value::as_str) {
                checks_by_id.insert(id, c);
            }
        }
        let node_check = checks_by_id
            .get(NODE_CHECK_ID)
            .filter(|c| {
                c.get("ServiceID")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
            })
            .and_then(|c| c.get("Status"))
            .cloned()
            .unwrap_or(Value::Null);

        let node = node_services.get("Node").unwrap_or(&Value::Null);
        let mut entries = OwnedEntries {
            node_ok: node.is_object()
                && node.get("Address").and_then(Value::as_str) == Some(NODE_ADDRESS)
                && node
                    .pointer(&format!("/Meta/{SOURCE_META}"))
                    .and_then(Value::as_str)
                    == Some(SOURCE_VALUE)
                && node
                    .pointer(&format!("/Meta/{OWNER_META}"))
                    .and_then(Value::as_str)
                    == Some(self.owner.as_str())
                && node_check == "passing",
            records: BTreeMap::new(),
            legacy_checks: HashSet::new(),
        };
        let services = match node_services.get("Services") {
            None | Some(Value::Null) => return Ok(entries),
            Some(Value::Array(s)) => s,
            Some(other) => {
                return Err(BackendError::Protocol(format!(
                    "node-services of {}: Services is not a list: {other}",
                    self.node
                )));
            }
        };
        for s in services {
            let meta = |key: &str| {
                s.get("Meta")
                    .and_then(|m| m.get(key))
                    .and_then(Value::as_str)
            };
            if meta(OWNER_META) != Some(self.owner.as_str()) {
                continue;
            }
            // Written by another ExternalCatalog of this owner on the same node. (Entries
            // without the key predate it and are this catalog's; a backend without a catalog
            // name owns every entry of its owner.)
            if !self.catalog.is_empty() && meta(CATALOG_META).is_some_and(|c| c != self.catalog) {
                continue;
            }
            let field = |name: &str| {
                s.get(name).ok_or_else(|| {
                    BackendError::Protocol(format!(
                        "a service on node {} has no {name}: {s}",
                        self.node
                    ))
                })
            };
            let id = field("ID")?.as_str().unwrap_or_default().to_string();
            if id.is_empty() {
                return Err(BackendError::Protocol(format!(
                    "a service on node {} has no ID: {s}",
                    self.node
                )));
            }
            let or_empty = |name: &str, empty: Value| match s.get(name) {
                None | Some(Value::Null) => empty,
                Some(v) => v.clone(),
            };
            let mut record = json!({
                "Service": {
                    "ID": id,
                    "Service": field("Service")?,
                    "Address": or_empty("Address", json!("")),
                    "Port": or_empty("Port", json!(0)),
                    "Tags": or_empty("Tags", json!([])),
                    "Meta": or_empty("Meta", json!({})),
                },
                "NodeCheck": node_check,
            });
            if let Some(c) = checks_by_id.get(Self::legacy_check_id(&id).as_str())
                && c.get("ServiceID").and_then(Value::as_str) == Some(id.as_str())
            {
                record["Check"] = json!({
                    "CheckID": c.get("CheckID"),
                    "Status": c.get("Status"),
                });
                entries.legacy_checks.insert(id.clone());
            }
            entries.records.insert(id, record);
        }
        Ok(entries)
    }
}

/// The answer of `/v1/catalog/node-services/<node>`, with only the fields
/// [`Consul::owned_records`] reads (the others, `Proxy`, `Connect`, `Weights`, indexes…, are
/// skipped while parsing).
#[derive(serde::Deserialize)]
pub(super) struct NodeServices {
    #[serde(rename = "Node", default)]
    node: Value,
    #[serde(rename = "Services", default)]
    services: Option<Vec<NodeService>>,
}

#[derive(serde::Deserialize)]
struct NodeService {
    #[serde(rename = "ID", default)]
    id: Value,
    #[serde(rename = "Service", default)]
    service: Value,
    #[serde(rename = "Address", default)]
    address: Value,
    #[serde(rename = "Port", default)]
    port: Value,
    #[serde(rename = "Tags", default)]
    tags: Value,
    #[serde(rename = "Meta", default)]
    meta: Value,
}

impl NodeServices {
    /// The answer as [`Consul::owned_records`] reads it; a field that was absent is left out.
    pub(super) fn into_value(self) -> Value {
        let services = self.services.map(|list| {
            list.into_iter()
                .map(|s| {
                    let mut out = serde_json::Map::new();
                    for (k, v) in [
                        ("ID", s.id),
                        ("Service", s.service),
                        ("Address", s.address),
                        ("Port", s.port),
                        ("Tags", s.tags),
                        ("Meta", s.meta),
                    ] {
                        if !v.is_null() {
                            out.insert(k.into(), v);
                        }
                    }
                    Value::Object(out)
                })
                .collect::<Vec<_>>()
        });
        json!({"Node": self.node, "Services": services})
    }
}

/// What [`Consul::owned_records`] reads: the entries of this owner (and catalog) by service ID,
/// whether the node and its check stand as registered, and the IDs of the entries that still
/// carry a per-instance check of before.
pub(super) struct OwnedEntries {
    pub node_ok: bool,
    pub records: BTreeMap<String, Record>,
    pub legacy_checks: HashSet<String>,
}
