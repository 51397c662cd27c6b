//! Import: the instances of one service followed with blocking queries on
//! `/v1/health/service/<name>`, and what its answers import: an instance imports while all its
//! checks and its node's pass (what `?passing` would return), and entries carrying this owner's
//! meta (our own exports) never import. The others are reported as failing: still registered,
//! a health answer rather than a disappearance (the import's empty-hold tells them apart). And
//! the addresses a lookup returns.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tokio::sync::watch;

use super::Consul;
use super::client::REQUEST_TIMEOUT;
use super::layout::OWNER_META;
use crate::backend::{BackendError, External, ImportSnapshot, publish_error, publish_health_read};
use crate::model::address::{host_port, import_host, port_number};
use crate::runtime::backoff::Backoff;

/// How long an import watch's blocking query waits for a change (`wait=`) before Consul
/// answers anyway; [`Consul::with_watch_wait`] changes it.
pub const WATCH_WAIT: Duration = Duration::from_secs(30);
/// Consul's own cap on `wait`.
const MAX_WATCH_WAIT: Duration = Duration::from_secs(600);
/// After a failed read, the watch retries after this, doubling up to [`WATCH_BACKOFF_MAX`].
pub const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Pause after an answer without a usable `X-Consul-Index` (missing or 0): the next query
/// cannot block, and without a pause the watch would spin.
pub const WATCH_NO_INDEX_PAUSE: Duration = Duration::from_secs(1);

impl Consul {
    /// Sets how long the import watch's blocking queries wait for a change (default
    /// [`WATCH_WAIT`], at most Consul's 10 minutes, at least 1 s). Their HTTP timeout is
    /// longer by Consul's jitter (wait/16) plus the usual request timeout.
    pub fn with_watch_wait(mut self, wait: Duration) -> Consul {
        self.watch_wait = wait.clamp(Duration::from_secs(1), MAX_WATCH_WAIT);
        self
    }

    /// One read of the instances of `name`, healthy or not: a blocking query from `index` (a
    /// plain read when 0). Returns the entries and the answer's `X-Consul-Index`.
    async fn read_health(
        &self,
        name: &str,
        index: u64,
    ) -> Result<(Value, Option<u64>), BackendError> {
        let index_s = index.to_string();
        let wait_s = format!("{}ms", self.watch_wait.as_millis());
        let mut query = Vec::new();
        if index > 0 {
            query.push(("index", index_s.as_str()));
            query.push(("wait", wait_s.as_str()));
        }
        let timeout = self.watch_wait + self.watch_wait / 16 + REQUEST_TIMEOUT;
        let what = format!("GET /v1/health/service/{name}");
        let reply = self
            .call_with_timeout(
                Method::GET,
                &["health", "service", name],
                &query,
                true,
                None,
                Some(timeout),
            )
            .await
            .map_err(|e| match e {
                BackendError::Unreachable(m) => {
                    BackendError::Unreachable(format!("watching Consul service {name}: {m}"))
                }
                other => other,
            })?;
        if !reply.status.is_success() {
            return Err(reply.status_error(&what));
        }
        Ok((reply.json(&what)?, reply.index))
    }

    /// Follows `name` until `tx` is closed ([`Backend::watch_service`]): blocking queries on
    /// `/v1/health/service/<name>` (see [`next_index`] for how the index moves); after
    /// a failed read the next query is a plain one from index 0, so a Consul that came back
    /// empty is read at once.
    ///
    /// [`Backend::watch_service`]: crate::backend::Backend::watch_service
    pub(super) async fn watch(
        &self,
        name: &str,
        tx: watch::Sender<ImportSnapshot>,
    ) -> Result<(), BackendError> {
        let mut index = 0u64;
        let mut backoff = Backoff::new(WATCH_BACKOFF_MIN, WATCH_BACKOFF_MAX);
        let mut failing = false;
        loop {
            if tx.is_closed() {
                return Ok(());
            }
            let read = tokio::select! {
                biased;
                () = tx.closed() => return Ok(()),
                r = self.read_health(name, index) => r,
            };
            let read = read.and_then(|(entries, got)| {
                let (passing, failing) = split_by_health(name, &entries)?;
                let (instances, skipped) = import_entries(name, &self.owner, &passing)?;
                // Failing entries that cannot be parsed are not reported: they import nothing.
                let (unhealthy, _) = import_entries(name, &self.owner, &failing)?;
                Ok((instances, unhealthy, skipped, got))
            });
            let pause = match read {
                Ok((instances, unhealthy, skipped, got)) => {
                    if failing {
                        tracing::info!(service = name, "Consul import watch reads again");
                        failing = false;
                    }
                    backoff.reset();
                    publish_health_read(&tx, instances, unhealthy, skipped);
                    let (next_index, pause) = next_index(index, got);
                    if pause {
                        tracing::debug!(service = name, index = ?got, "Consul answered without a usable X-Consul-Index");
                    }
                    index = next_index;
                    pause.then_some(WATCH_NO_INDEX_PAUSE)
                }
                Err(e) => {
                    if failing {
                        tracing::debug!(service = name, error = %e, "Consul import watch still failing");
                    } else {
                        tracing::warn!(service = name, error = %e, "Consul import watch failed; keeping the last instances");
                        failing = true;
                    }
                    publish_error(&tx, e);
                    index = 0;
                    Some(backoff.next_pause())
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = tx.closed() => return Ok(()),
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// The index of the next blocking query after an answer with `got` to a query from `sent`,
/// by Consul's rules, and whether to pause before it: an index that went backwards (the
/// catalog was reset or another server answered) starts again from 0; a missing or zero index
/// cannot block, so the watch pauses instead of spinning; an unchanged one is simply reused.
pub(super) fn next_index(sent: u64, got: Option<u64>) -> (u64, bool) {
    match got {
        None | Some(0) => (0, true),
        Some(i) if i < sent => (0, false),
        Some(i) => (i, false),
    }
}

/// The instances an answer imports, and the entries skipped with why.
pub(super) type Imported = (Vec<External>, Vec<(String, String)>);

/// What the passing entries of a `/v1/health/service/<name>` answer import: the instances, sorted, and
/// the entries that cannot be used, with why. Entries whose owner meta is `owner` (this
/// controller's own exports) are left out of both. The id is the service ID, prefixed with
/// `<node>/` when that ID is on more than one node.
pub(super) fn import_entries(
    name: &str,
    owner: &str,
    entries: &Value,
) -> Result<Imported, BackendError> {
    let entries = health_entries(name, entries)?;
    let str_at = |e: &Value, p: &str| -> String {
        e.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut nodes_of_id: HashMap<String, HashSet<String>> = HashMap::new();
    for e in entries {
        nodes_of_id
            .entry(str_at(e, "/Service/ID"))
            .or_default()
            .insert(str_at(e, "/Node/Node"));
    }
    let mut instances = Vec::with_capacity(entries.len());
    let mut skipped = Vec::new();
    for (n, e) in entries.iter().enumerate() {
        let node = str_at(e, "/Node/Node");
        let sid = str_at(e, "/Service/ID");
        let id = if sid.is_empty() {
            format!("{node}/entry-{n}")
        } else if nodes_of_id.get(&sid).is_some_and(|nodes| nodes.len() > 1) {
            format!("{node}/{sid}")
        } else {
            sid.clone()
        };
        let Some(service) = e.get("Service").filter(|s| s.is_object()) else {
            skipped.push((id, "the entry has no Service object".to_string()));
            continue;
        };
        let entry_owner = service
            .pointer(&format!("/Meta/{OWNER_META}"))
            .and_then(Value::as_str);
        if !owner.is_empty() && entry_owner == Some(owner) {
            continue;
        }
        if sid.is_empty() {
            skipped.push((id, "the service has no ID".to_string()));
            continue;
        }
        let service_addr = str_at(e, "/Service/Address");
        let host = if service_addr.is_empty() {
            str_at(e, "/Node/Address")
        } else {
            service_addr
        };
        if host.is_empty() {
            skipped.push((
                id,
                "no address: Service.Address and Node.Address are empty".to_string(),
            ));
            continue;
        }
        let host = match import_host(&host) {
            Ok(h) => h,
            Err(why) => {
                skipped.push((id, why));
                continue;
            }
        };
        let port = match service.get("Port") {
            None | Some(Value::Null) => {
                skipped.push((id, "no port".to_string()));
                continue;
            }
            Some(p) => match p.as_u64().map(port_number) {
                Some(Ok(p)) => p,
                _ => {
                    skipped.push((id, format!("port {p} is not in 1-65535")));
                    continue;
                }
            },
        };
        instances.push(External {
            address: host,
            port,
            id,
        });
    }
    instances.sort();
    skipped.sort();
    Ok((instances, skipped))
}

/// A `/v1/health/service/<name>` answer split into the entries whose checks (the service's and
/// its node's) all pass, what `?passing` returns, and the others.
pub(super) fn split_by_health(name: &str, entries: &Value) -> Result<(Value, Value), BackendError> {
    let (passing, failing): (Vec<Value>, Vec<Value>) = health_entries(name, entries)?
        .iter()
        .cloned()
        .partition(|e| {
            e.get("Checks")
                .and_then(Value::as_array)
                .is_none_or(|checks| {
                    checks
                        .iter()
                        .all(|c| c.get("Status").and_then(Value::as_str) == Some("passing"))
                })
        });
    Ok((Value::Array(passing), Value::Array(failing)))
}

/// The entries of a `/v1/health/service/<name>` answer (none for `null`).
fn health_entries<'a>(name: &str, entries: &'a Value) -> Result<&'a [Value], BackendError> {
    match entries {
        Value::Array(e) => Ok(e.as_slice()),
        Value::Null => Ok(&[]),
        other => Err(BackendError::Protocol(format!(
            "health of service {name}: not a list: {other}"
        ))),
    }
}

/// `host:port` of every entry of a `/v1/health/service/<name>` answer, sorted.
pub(super) fn health_addresses(name: &str, entries: &Value) -> Result<Vec<String>, BackendError> {
    let entries = health_entries(name, entries)?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let service_addr = e
            .pointer("/Service/Address")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let host = if service_addr.is_empty() {
            e.pointer("/Node/Address")
                .and_then(Value::as_str)
                .unwrap_or_default()
        } else {
            service_addr
        };
        let port = e.pointer("/Service/Port").and_then(Value::as_u64);
        match port {
            Some(port) if !host.is_empty() => out.push(host_port(host, port)),
            _ => {
                return Err(BackendError::Protocol(format!(
                    "health of service {name}: an entry without address or port: {e}"
                )));
            }
        }
    }
    out.sort();
    Ok(out)
}
