//! The three layouts (SPEC §4), pure: the key and value an instance becomes, where a reader
//! looks for a name, and how a value read back is parsed. No client here.
//!
//! - `plain` (base path `/services`): `<base>/<name>/providers/<ip>:<port>` = `<ip>:<port>`
//!   (`[addr]:port` for IPv6), what a prefix get returns.
//! - `naming` (base path empty): `<name>/<ip>:<port>` (no leading slash; `<base>/<name>/<addr>`
//!   with a base path) = `{"Op":0,"Addr":"<ip>:<port>","Metadata":{…}}`, read by the etcd gRPC
//!   resolver (`etcd:///<name>`) and the endpoints manager: `Op` is the number 0 (Add), only
//!   `Addr` is used by the resolver; `Metadata` carries owner, namespace, service, tags and meta.
//! - `coredns` (base path `/skydns`): `/skydns/<zone labels reversed>/<namespace>/<name>/<id>` =
//!   `{"host":"<ip>","port":<port>,"ttl":30}`, all lower case, so that
//!   `dig <name>.<namespace>.<zone>` answers. See [`dns_label`] for how names become DNS labels
//!   and [`coredns_id`] for the last segment.
//!
//! A [`Record`] is `{"value": "<the exact value string>"}`: what `read_owned` returns compares
//! equal to what `render` produces exactly when the key holds what would be written. A key still
//! attached to a previous lease of ours (a TTL change) reads as
//! `{"value": …, "lease": "previous"}`, so that the plan rewrites it onto the current lease.

use std::collections::BTreeMap;

use anyhow::bail;
use serde::Serialize;
use serde_json::{Value, json};

use crate::api::crd::EtcdLayout;
use crate::backend::{BackendError, Record};
use crate::model::address::{host_port, import_host, parse_host_port, port_number};
use crate::model::{Instance, fnv1a64};

/// Default DNS zone of the `coredns` layout.
pub const DEFAULT_ZONE: &str = "bridge.local";
/// The DNS TTL in `coredns` records.
pub const COREDNS_TTL: u32 = 30;

/// Makes a name one DNS label for the `coredns` layout: lower case; every character other than
/// `a-z`, `0-9` and `-` (so `_` and `.` too) becomes `-`; leading and trailing `-` are dropped;
/// at most 63 characters. `api_x` → `api-x`, `API.v2` → `api-v2`. A name with nothing left
/// (`___`) becomes `x` and 8 hex digits of its hash. Distinct names can map to one label
/// (`api_x` and `api-x`): their instances then answer the same DNS name.
pub fn dns_label(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed: String = mapped.trim_matches('-').chars().take(63).collect();
    let trimmed = trimmed.trim_end_matches('-');
    if trimmed.is_empty() {
        format!("x{:08x}", fnv1a64(s) as u32)
    } else {
        trimmed.to_string()
    }
}

/// The last key segment of an instance in the `coredns` layout: the address and port, readable,
/// and 8 hex digits of a hash of (owner, [`Instance::stable_id`]), all lower case, at most 63
/// characters: `10-0-0-1-8080-1a2b3c4d`, `fd00--1-8080-…`. Deterministic on every restart and
/// replica; distinct per origin and per owner, so two clusters exporting the same name never
/// write the same key.
pub fn coredns_id(owner: &str, instance: &Instance) -> String {
    let digest = fnv1a64(&format!("{owner}\0{}", instance.stable_id())) as u32;
    let addr = instance.address.to_string().replace([':', '.'], "-");
    format!("{addr}-{}-{digest:08x}", instance.port)
}

/// The record of a key holding `value` (attached to a previous lease of ours when `previous`).
pub(super) fn record_of(value: &str, previous: bool) -> Record {
    if previous {
        json!({"value": value, "lease": "previous"})
    } else {
        json!({"value": value})
    }
}

/// The value string a record stands for.
pub(super) fn record_value<'a>(key: &str, record: &'a Record) -> Result<&'a str, BackendError> {
    record.get("value").and_then(Value::as_str).ok_or_else(|| {
        BackendError::Protocol(format!(
            "record {key} is not an etcd record (no \"value\" string): {record}"
        ))
    })
}

/// The end of the range of keys starting with `prefix` (etcd's `WithPrefix`).
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty or all 0xff: to the end of the keyspace.
    vec![0]
}

/// `Addr` of a `naming` value, unless it is not one or says Delete (`Op` 1).
pub(super) fn naming_addr(value: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(value).ok()?;
    if v.get("Op").and_then(Value::as_u64).unwrap_or(0) != 0 {
        return None;
    }
    v.get("Addr")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
}

/// `host:port` of a `coredns` value, unless it is not one (CoreDNS drops records without host).
pub(super) fn coredns_host_port(value: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(value).ok()?;
    let host = v
        .get("host")
        .and_then(Value::as_str)
        .filter(|h| !h.is_empty())?;
    let port = v.get("port").and_then(Value::as_u64).unwrap_or(0);
    Some(host_port(host, port))
}

#[derive(Serialize)]
struct NamingValue<'a> {
    #[serde(rename = "Op")]
    op: u8,
    #[serde(rename = "Addr")]
    addr: &'a str,
    #[serde(rename = "Metadata")]
    metadata: NamingMetadata<'a>,
}

#[derive(Serialize)]
struct NamingMetadata<'a> {
    owner: &'a str,
    namespace: &'a str,
    service: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    tags: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    meta: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct CorednsValue<'a> {
    host: &'a str,
    port: u16,
    ttl: u32,
}

fn to_json<T: Serialize>(v: &T) -> String {
    // These types only have string keys: serialization cannot fail.
    serde_json::to_string(v).unwrap_or_else(|e| json!({ "error": e.to_string() }).to_string())
}

/// Where and how keys are written: pure.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    pub(super) kind: EtcdLayout,
    /// Without a trailing `/`; may be empty.
    base: String,
    /// `coredns`: the DNS zone, lower case, without a trailing dot.
    zone: String,
    /// Every key this layout writes starts with it.
    pub(super) prefix: String,
    owner: String,
}

impl Layout {
    pub(super) fn new(
        kind: EtcdLayout,
        base_path: Option<&str>,
        zone: Option<&str>,
        owner: &str,
    ) -> anyhow::Result<Layout> {
        let base = match base_path {
            Some(b) => b.trim().trim_end_matches('/').to_string(),
            None => match kind {
                EtcdLayout::Plain => "/services".to_string(),
                EtcdLayout::Naming => String::new(),
                EtcdLayout::Coredns => "/skydns".to_string(),
            },
        };
        if base.contains("//") {
            bail!("etcd base path {base:?} must not hold an empty segment (//)");
        }
        let zone = zone
            .map(|z| z.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|z| !z.is_empty())
            .unwrap_or_else(|| DEFAULT_ZONE.to_string());
        let labels: Vec<&str> = zone.split('.').collect();
        if labels
            .iter()
            .any(|l| l.is_empty() || l.len() > 63 || dns_label(l) != *l)
        {
            bail!("etcd zone {zone:?} is not a DNS name of lower-case labels");
        }
        let zone_path = labels.iter().rev().copied().collect::<Vec<_>>().join("/");
        let prefix = match kind {
            EtcdLayout::Plain => format!("{base}/"),
            EtcdLayout::Naming if base.is_empty() => String::new(),
            EtcdLayout::Naming => format!("{base}/"),
            EtcdLayout::Coredns => format!("{base}/{zone_path}/"),
        };
        Ok(Layout {
            kind,
            base,
            zone,
            prefix,
            owner: owner.to_string(),
        })
    }

    pub(super) fn name(&self) -> &'static str {
        match self.kind {
            EtcdLayout::Plain => "plain",
            EtcdLayout::Naming => "naming",
            EtcdLayout::Coredns => "coredns",
        }
    }

    /// The directory of `name`'s entries (`plain`, `naming`).
    fn name_dir(&self, name: &str) -> String {
        match self.kind {
            EtcdLayout::Plain => format!("{}/{name}/providers/", self.base),
            _ => format!("{}{name}/", self.prefix),
        }
    }

    pub(super) fn key(&self, i: &Instance) -> String {
        match self.kind {
            EtcdLayout::Plain | EtcdLayout::Naming => {
                format!("{}{}", self.name_dir(&i.name), i.host_port())
            }
            EtcdLayout::Coredns => format!(
                "{}{}/{}/{}",
                self.prefix,
                dns_label(&i.origin.namespace),
                dns_label(&i.name),
                coredns_id(&self.owner, i)
            ),
        }
    }

    pub(super) fn value(&self, i: &Instance) -> String {
        match self.kind {
            EtcdLayout::Plain => i.host_port(),
            EtcdLayout::Naming => to_json(&NamingValue {
                op: 0,
                addr: &i.host_port(),
                metadata: NamingMetadata {
                    owner: &self.owner,
                    namespace: &i.origin.namespace,
                    service: &i.origin.service,
                    tags: &i.tags,
                    meta: &i.meta,
                },
            }),
            EtcdLayout::Coredns => to_json(&CorednsValue {
                host: &i.address.to_string(),
                port: i.port,
                ttl: COREDNS_TTL,
            }),
        }
    }

    /// Where a reader looks for `name`, and for `coredns` without a namespace the DNS label the
    /// name segment must equal.
    pub(super) fn lookup_prefix(&self, name: &str) -> (String, Option<String>) {
        match self.kind {
            EtcdLayout::Plain | EtcdLayout::Naming => (self.name_dir(name), None),
            EtcdLayout::Coredns => {
                let mut n = name.trim().trim_end_matches('.').to_ascii_lowercase();
                if let Some(stripped) = n.strip_suffix(&format!(".{}", self.zone)) {
                    n = stripped.to_string();
                }
                let labels: Vec<String> = n.split('.').map(dns_label).collect();
                if labels.len() == 1 {
                    (self.prefix.clone(), labels.into_iter().next())
                } else {
                    let path: Vec<&str> = labels.iter().rev().map(String::as_str).collect();
                    (format!("{}{}/", self.prefix, path.join("/")), None)
                }
            }
        }
    }
}

/// `coredns` with a bare name: whether `key` (`<prefix><namespace>/<name>/<id>`) is an entry of
/// the name whose DNS label is `label`.
pub(super) fn names_label(key: &[u8], prefix: &str, label: &str) -> bool {
    let rest = key.get(prefix.len()..).unwrap_or_default();
    let segments: Vec<&[u8]> = rest.split(|b| *b == b'/').collect();
    segments.len() >= 3 && segments[1] == label.as_bytes()
}

/// An imported entry's host and port, or why it has none.
pub(super) type HostPort = Result<(String, u16), String>;

/// A `plain` value: `host:port`.
pub(super) fn parse_plain(value: &[u8]) -> HostPort {
    let v = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8".to_string())?;
    parse_host_port(v)
}

/// A `naming` value (an endpoints manager update): the entry unless `Op` is 1 (Delete), and
/// whether its metadata names `owner`.
pub(super) fn parse_naming(value: &[u8], owner: &str) -> (Option<HostPort>, bool) {
    let v: Value = match serde_json::from_slice(value) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) | Err(_) => {
            return (
                Some(Err(
                    "not an endpoints manager update (a JSON object with Op and Addr)".into(),
                )),
                false,
            );
        }
    };
    let tagged =
        !owner.is_empty() && v.pointer("/Metadata/owner").and_then(Value::as_str) == Some(owner);
    let parsed = match v.get("Op") {
        None => Some(Ok(())),
        Some(op) => match op.as_u64() {
            Some(0) => Some(Ok(())),
            Some(1) => None,
            _ => Some(Err(format!("Op {op} is neither 0 (Add) nor 1 (Delete)"))),
        },
    };
    let parsed = parsed.map(|r| {
        r.and_then(|()| match v.get("Addr").and_then(Value::as_str) {
            Some(a) => parse_host_port(a).map_err(|e| format!("Addr: {e}")),
            None => Err("no Addr string".into()),
        })
    });
    (parsed, tagged)
}

/// A `coredns` value: `{"host": …, "port": …}`.
pub(super) fn parse_coredns(value: &[u8]) -> HostPort {
    let v: Value =
        serde_json::from_slice(value).map_err(|e| format!("not a CoreDNS record (JSON): {e}"))?;
    let host = v
        .get("host")
        .and_then(Value::as_str)
        .filter(|h| !h.is_empty())
        .ok_or("no host")?;
    let host = import_host(host)?;
    let port = match v.get("port") {
        Some(p) => p
            .as_u64()
            .and_then(|p| port_number(p).ok())
            .ok_or_else(|| format!("port {p} is not a port (1-65535)"))?,
        None => return Err("no port".into()),
    };
    Ok((host, port))
}
