//! The layout, pure: where an entry lives and what its node holds, and how import reads the
//! entries of others. No connection here.
//!
//! Layouts (`<root>` is the chroot of the connect string followed by the base path, default
//! `/services`):
//!
//! - `plain`: `<root>/<name>/providers/<ip>:<port>` (IPv6 `[addr]:port`), data
//!   `{"owner": …, "namespace": …, "service": …}` — what kazoo's `get_children()` lists;
//! - `curator`: `<root>/<name>/<id>` with a Curator `ServiceInstance` as data: `name`, `id` (the
//!   znode name, [`Instance::stable_id`]), `address`, `port`, `sslPort` (null), `payload` (null:
//!   a payload without `@class` breaks Curator readers, and one with a class they do not have
//!   breaks them too), `registrationTimeUTC`, `serviceType: "DYNAMIC"` and `uriSpec`
//!   (`{scheme}://{address}:{port}` as Spring Cloud registers it; null for IPv6, whose address
//!   would make an invalid URI). `enabled` is left out (absent means enabled).
//!
//! A record is `{"data": <the node's data, parsed>}`, keyed by the path below `<root>`
//! (`api_x/providers/10.0.0.1:8080`, `api_x/<id>`). Curator's `registrationTimeUTC` is not part
//! of the record: it is set to the time of creation when the node is created and kept when its
//! data is updated, so an entry that exists compares equal to its rendering after any restart
//! (and the time means what Curator readers expect: when the entry was registered).

use std::net::IpAddr;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::ZooKeeper;
use crate::api::crd::ZooKeeperLayout;
use crate::backend::{BackendError, Record};
use crate::model::Instance;
use crate::model::address::{host_port, import_host, parse_host_port, parse_port, port_number};

/// The directory of the plain layout below each name.
pub const PROVIDERS: &str = "providers";
/// The `uriSpec` Spring Cloud Zookeeper registers: `{scheme}://{address}:{port}`.
const URI_SPEC_PARTS: [(&str, bool); 5] = [
    ("scheme", true),
    ("://", false),
    ("address", true),
    (":", false),
    ("port", true),
];

/// Why a name cannot be a znode name (and so not an external name in ZooKeeper), or None.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name == "." || name == ".." {
        return Some(format!("{name:?} is not a valid znode name"));
    }
    if name.contains('/') {
        return Some(format!("znode name {name:?} must not contain '/'"));
    }
    // ZooKeeper's PathUtils refuses these characters.
    let bad = |c: char| {
        c == '\0'
            || ('\u{1}'..='\u{1f}').contains(&c)
            || ('\u{7f}'..='\u{9f}').contains(&c)
            || ('\u{e000}'..='\u{f8ff}').contains(&c)
            || ('\u{fff0}'..='\u{ffff}').contains(&c)
    };
    if name.chars().any(bad) {
        return Some(format!(
            "znode name {name:?} holds a character ZooKeeper refuses"
        ));
    }
    None
}

/// One server of the connect string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Upstream {
    pub(super) host: String,
    pub(super) port: u16,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&host_port(&self.host, self.port))
    }
}

/// The servers and the chroot (`""` when none) of a connect string.
pub(super) fn parse_connect(s: &str) -> anyhow::Result<(Vec<Upstream>, String)> {
    let s = s.trim();
    let (hosts, chroot) = match s.find('/') {
        // `tcp://` prefixes hold slashes too: the chroot starts at the first '/' after them.
        _ if s.contains("://") => {
            let mut hosts = s;
            let mut chroot = "";
            let mut offset = 0;
            for part in s.split(',') {
                let body = part.split_once("://").map_or(part, |(_, b)| b);
                if let Some(i) = body.find('/') {
                    let start = offset + (part.len() - body.len()) + i;
                    hosts = &s[..start];
                    chroot = &s[start..];
                    break;
                }
                offset += part.len() + 1;
            }
            (hosts, chroot)
        }
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let chroot = if chroot == "/" { "" } else { chroot };
    if !chroot.is_empty() {
        check_path(chroot).with_context(|| format!("the chroot of {s:?}"))?;
    }
    let mut upstreams = Vec::new();
    for part in hosts.split(',') {
        let part = part.trim();
        let part = match part.split_once("://") {
            None => part,
            Some(("tcp", rest)) => rest,
            Some((scheme, _)) => bail!(
                "ZooKeeper address {part:?}: write host:port without {scheme}:// (for TLS, \
                 name the secureClientPort and set zookeeper.tls)"
            ),
        };
        if part.is_empty() {
            bail!("ZooKeeper connect string {s:?} has an empty address");
        }
        let (host, port) = if let Some(rest) = part.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .with_context(|| format!("ZooKeeper address {part:?}: no closing ']'"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(p.strip_prefix(':').with_context(|| {
                        format!("ZooKeeper address {part:?}: expected ':' after ']'")
                    })?),
                ),
            }
        } else {
            match part.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (part, None),
            }
        };
        if host.is_empty() || host.contains(['/', ' ']) {
            bail!("ZooKeeper address {part:?} has no valid host");
        }
        let port = match port {
            None => 2181,
            Some(p) => match parse_port(p) {
                Ok(p) => p,
                Err(_) => bail!("ZooKeeper address {part:?} has an invalid port"),
            },
        };
        upstreams.push(Upstream {
            host: host.to_string(),
            port,
        });
    }
    Ok((upstreams, chroot.to_string()))
}

/// An absolute znode path without a trailing slash, of valid names.
pub(super) fn check_path(p: &str) -> anyhow::Result<()> {
    let Some(rest) = p.strip_prefix('/') else {
        bail!("{p:?} is not an absolute path");
    };
    for part in rest.split('/') {
        if let Some(problem) = name_problem(part) {
            bail!("{p:?}: {problem}");
        }
    }
    Ok(())
}

/// Every proper ancestor of `path` except `/`, shallowest first.
pub(super) fn ancestors(path: &str) -> Vec<String> {
    path.match_indices('/')
        .filter(|(i, _)| *i > 0)
        .map(|(i, _)| path[..i].to_string())
        .collect()
}

impl ZooKeeper {
    /// The key [`ZooKeeper::entry`] gives `i`, without rendering its record.
    pub fn key_of(&self, i: &Instance) -> Option<String> {
        if name_problem(&i.name).is_some() {
            return None;
        }
        Some(match self.inner.layout {
            ZooKeeperLayout::Plain => format!("{}/{PROVIDERS}/{}", i.name, i.host_port()),
            ZooKeeperLayout::Curator => format!("{}/{}", i.name, i.stable_id()),
        })
    }

    /// The key (path below the root) and record of one instance, or None when its name
    /// cannot be a znode name ([`name_problem`]).
    pub fn entry(&self, i: &Instance) -> Option<(String, Record)> {
        let key = self.key_of(i)?;
        Some(match self.inner.layout {
            ZooKeeperLayout::Plain => (
                key,
                json!({"data": {
                    "owner": self.inner.owner,
                    "namespace": i.origin.namespace,
                    "service": i.origin.service,
                }}),
            ),
            ZooKeeperLayout::Curator => {
                let id = i.stable_id();
                let uri_spec = match i.address {
                    IpAddr::V4(_) => json!({"parts": URI_SPEC_PARTS
                        .iter()
                        .map(|(value, variable)| json!({"value": value, "variable": variable}))
                        .collect::<Vec<_>>()}),
                    IpAddr::V6(_) => Value::Null,
                };
                (
                    key,
                    json!({"data": {
                        "name": i.name,
                        "id": id,
                        "address": i.address.to_string(),
                        "port": i.port,
                        "sslPort": null,
                        "payload": null,
                        "serviceType": "DYNAMIC",
                        "uriSpec": uri_spec,
                    }}),
                )
            }
        })
    }

    /// The record a node's data reads back as, and its Curator registration time.
    pub(super) fn record_from_data(&self, data: &[u8]) -> (Record, Option<u64>) {
        match serde_json::from_slice::<Value>(data) {
            Ok(mut v) => {
                let mut registered = None;
                if self.inner.layout == ZooKeeperLayout::Curator
                    && let Some(obj) = v.as_object_mut()
                    && let Some(t) = obj.get("registrationTimeUTC").and_then(Value::as_u64)
                {
                    registered = Some(t);
                    obj.remove("registrationTimeUTC");
                }
                (json!({ "data": v }), registered)
            }
            Err(_) => (
                json!({"raw": String::from_utf8_lossy(data).into_owned()}),
                None,
            ),
        }
    }

    /// The bytes a record is written as.
    pub(super) fn data_of(
        &self,
        key: &str,
        record: &Record,
        registered: u64,
    ) -> Result<Vec<u8>, BackendError> {
        let data = record
            .get("data")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                BackendError::Protocol(format!(
                    "record {key} is not a ZooKeeper record (no data object): {record}"
                ))
            })?;
        let mut data = data.clone();
        if self.inner.layout == ZooKeeperLayout::Curator {
            let id = key.rsplit('/').next().unwrap_or_default();
            if data.get("id").and_then(Value::as_str) != Some(id) {
                return Err(BackendError::Protocol(format!(
                    "record {key}: a Curator instance's id must be its znode name {id:?}: {record}"
                )));
            }
            data.insert("registrationTimeUTC".into(), json!(registered));
        }
        serde_json::to_vec(&data).map_err(|e| BackendError::Protocol(format!("record {key}: {e}")))
    }

    /// Checks that `key` is an entry key of the layout.
    pub(super) fn check_key(&self, key: &str) -> Result<(), BackendError> {
        let parts: Vec<&str> = key.split('/').collect();
        let shape_ok = match self.inner.layout {
            ZooKeeperLayout::Plain => parts.len() == 3 && parts[1] == PROVIDERS,
            ZooKeeperLayout::Curator => parts.len() == 2,
        };
        if !shape_ok || parts.iter().any(|p| name_problem(p).is_some()) {
            return Err(BackendError::Protocol(format!(
                "{key:?} is not an entry key of the {:?} ZooKeeper layout",
                self.inner.layout
            )));
        }
        Ok(())
    }

    pub(super) fn path_of(&self, key: &str) -> String {
        format!("{}/{key}", self.inner.root)
    }

    /// The directory that holds the entries of `name`.
    pub(super) fn dir_of(&self, name: &str) -> String {
        match self.inner.layout {
            ZooKeeperLayout::Plain => format!("{}/{name}/{PROVIDERS}", self.inner.root),
            ZooKeeperLayout::Curator => format!("{}/{name}", self.inner.root),
        }
    }
}

/// Address and port of a plain-layout child name: `ip:port`, `[ipv6]:port` or `host:port`.
pub(super) fn parse_provider(child: &str) -> Result<(String, u16), String> {
    parse_host_port(child)
}

/// Address and port of a Curator `ServiceInstance` (`port`, or `sslPort` when `port` is null
/// or absent); `Ok(None)` when it is disabled (`enabled: false`).
pub(super) fn parse_curator(data: &[u8]) -> Result<Option<(String, u16)>, String> {
    let v: Value =
        serde_json::from_slice(data).map_err(|e| format!("not a JSON ServiceInstance: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "not a JSON object (a Curator ServiceInstance)".to_string())?;
    match obj.get("enabled") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Ok(None),
        Some(other) => return Err(format!("\"enabled\" is {other}, not a boolean")),
    }
    let address = match obj.get("address") {
        Some(Value::String(a)) if !a.trim().is_empty() => a.trim(),
        Some(other) => return Err(format!("\"address\" is {other}, not an address")),
        None => return Err("no \"address\"".into()),
    };
    let port_of = |key: &str| -> Result<Option<u16>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64().map(port_number) {
                Some(Ok(p)) => Ok(Some(p)),
                _ => Err(format!("\"{key}\" is {n}, not a port")),
            },
            Some(other) => Err(format!("\"{key}\" is {other}, not a port")),
        }
    };
    let port = match port_of("port")? {
        Some(p) => p,
        None => {
            port_of("sslPort")?.ok_or_else(|| "neither \"port\" nor \"sslPort\"".to_string())?
        }
    };
    Ok(Some((import_host(address)?, port)))
}

/// Whether plain-layout data names `owner` (`{"owner": …}`, as [`ZooKeeper::entry`] writes).
pub(super) fn plain_owner_is(data: &[u8], owner: &str) -> bool {
    !owner.is_empty()
        && serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v.get("owner").and_then(Value::as_str).map(|o| o == owner))
            .unwrap_or(false)
}

/// `host:port` of an enabled Curator `ServiceInstance` (`port`, or `sslPort` without one), as
/// a lookup answers it.
pub(super) fn curator_address(data: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(data).ok()?;
    if v.get("enabled").and_then(Value::as_bool) == Some(false) {
        return None;
    }
    let address = v.get("address").and_then(Value::as_str)?;
    let port = v
        .get("port")
        .and_then(Value::as_u64)
        .or_else(|| v.get("sslPort").and_then(Value::as_u64))?;
    (!address.is_empty()).then(|| host_port(address, port))
}
