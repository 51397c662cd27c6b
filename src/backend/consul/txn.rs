//! Writing: plan operations become `/v1/txn` requests, as few as Consul's limits allow, the
//! synthetic node registered first when it is not known to be there; and the empty node
//! deregistered when this owner retires.

use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::Consul;
use super::layout::OWNER_META;
use crate::backend::{BackendError, Op, Record};

/// At most this many operations in one `/v1/txn` request (the limit of older Consul servers),
/// counting every operation: node, service and check.
pub const MAX_TXN_OPS: usize = 64;
/// Transactions in flight at once while a plan is written (the first one alone when it
/// registers the node). Measured with `make bench`: see the README's benchmark table.
pub const WRITES_IN_FLIGHT: usize = 4;
/// At most this many bytes of operations in one request (Consul's `txn_max_req_len` defaults
/// to 512 KiB); an instance whose operations alone exceed it still goes, alone.
pub const MAX_TXN_BYTES: usize = 256 * 1024;

/// The txn operations for a prefix of the plan.
struct Batch {
    ops: Vec<Value>,
    /// How many plan operations it covers.
    consumed: usize,
    with_node: bool,
}

/// Why a txn was refused: the node is not registered (register it and send it again), or
/// anything else.
enum TxnFailure {
    MissingNode(BackendError),
    Other(BackendError),
}

impl Consul {
    /// The service name of an entry we own, when known.
    fn known_name(&self, id: &str) -> Option<String> {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The txn operations of one plan operation: a service `set` (with the deletion of its
    /// check of before, if it has one), or a service `delete` (Consul removes the service's
    /// checks with it). The record's `NodeCheck` is the node's, written with the node.
    fn txn_ops(&self, op: &Op) -> Result<Vec<Value>, BackendError> {
        match op {
            Op::Put { key, record } => {
                let service = record
                    .get("Service")
                    .filter(|s| s.is_object())
                    .ok_or_else(|| {
                        BackendError::Protocol(format!(
                            "record {key} is not a Consul record (no Service object): {record}"
                        ))
                    })?;
                if service.get("ID").and_then(Value::as_str) != Some(key.as_str()) {
                    return Err(BackendError::Protocol(format!(
                        "record {key} has Service.ID {} instead of its key",
                        service.get("ID").unwrap_or(&Value::Null)
                    )));
                }
                let mut out = vec![json!({"Service": {
                    "Verb": "set", "Node": self.node, "Service": service,
                }})];
                out.extend(self.legacy_check_delete(key));
                // The same instance under its ID of before goes in the same commit.
                let name = service
                    .get("Service")
                    .and_then(Value::as_str)
                    .unwrap_or(key);
                out.extend(self.legacy_delete(key, name));
                Ok(out)
            }
            Op::Delete { key } => {
                // Consul deletes by ID but insists on a non-empty name.
                let id = self.legacy_id(key).unwrap_or_else(|| key.clone());
                let name = self.known_name(&id).unwrap_or_else(|| id.clone());
                Ok(vec![json!({"Service": {
                    "Verb": "delete", "Node": self.node,
                    "Service": {"ID": id, "Service": name},
                }})])
            }
        }
    }

    /// The next txn from the start of `ops`: as many whole plan operations as fit in
    /// [`MAX_TXN_OPS`] operations and [`MAX_TXN_BYTES`], after the node registration when
    /// `with_node`. Always covers at least one plan operation when `ops` is not empty.
    fn next_batch(&self, ops: &[Op], with_node: bool) -> Result<Batch, BackendError> {
        let mut batch = Batch {
            ops: Vec::new(),
            consumed: 0,
            with_node,
        };
        let mut bytes = 0;
        if with_node {
            for op in self.node_ops() {
                bytes += op.to_string().len() + 1;
                batch.ops.push(op);
            }
        }
        for op in ops {
            let unit = self.txn_ops(op)?;
            let unit_bytes: usize = unit.iter().map(|v| v.to_string().len() + 1).sum();
            let fits =
                batch.ops.len() + unit.len() <= MAX_TXN_OPS && bytes + unit_bytes <= MAX_TXN_BYTES;
            if !fits && batch.consumed > 0 {
                break;
            }
            bytes += unit_bytes;
            batch.ops.extend(unit);
            batch.consumed += 1;
        }
        Ok(batch)
    }

    /// The txn request bodies `apply` sends for `ops`, in order, the first one registering the
    /// node when `include_node`. No request holds more than [`MAX_TXN_OPS`] operations, and an
    /// instance's service and check are never split.
    pub fn txn_batches(
        &self,
        ops: &[Op],
        include_node: bool,
    ) -> Result<Vec<Vec<Value>>, BackendError> {
        let mut out = Vec::new();
        let mut next = 0;
        let mut with_node = include_node;
        while next < ops.len() {
            let b = self.next_batch(&ops[next..], with_node)?;
            next += b.consumed;
            out.push(b.ops);
            with_node = false;
        }
        Ok(out)
    }

    /// Keeps the service name of each owned entry read or written: a txn `delete` needs it.
    pub(super) fn remember_names<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a String, &'a Record)>,
    ) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        for (id, record) in entries {
            if let Some(name) = record.pointer("/Service/Service").and_then(Value::as_str) {
                names.insert(id.clone(), name.to_string());
            }
        }
    }

    /// Sends one txn. [`TxnFailure::MissingNode`] when Consul refused it because the node is
    /// not registered.
    async fn send_txn(&self, ops: &[Value]) -> Result<(), TxnFailure> {
        let body = Value::Array(ops.to_vec());
        let reply = self
            .call(Method::PUT, &["txn"], &[], true, Some(&body))
            .await
            .map_err(TxnFailure::Other)?;
        if reply.status.is_success() {
            return Ok(());
        }
        if reply.status == StatusCode::CONFLICT {
            let errors = txn_errors(&reply.body, ops);
            if let Some(errors) = errors {
                let missing_node = errors
                    .iter()
                    .any(|e| e.what.contains("Missing node registration"));
                let text = errors
                    .iter()
                    .map(|e| format!("{}: {}", e.op, e.what))
                    .collect::<Vec<_>>()
                    .join("; ");
                let message = format!(
                    "Consul at {} rejected the transaction of {} operation(s) on node {}: {text}",
                    reply.address,
                    ops.len(),
                    self.node
                );
                if missing_node {
                    return Err(TxnFailure::MissingNode(BackendError::Rejected(message)));
                }
                // Consul checks every operation (ACLs, values) and names each it refuses: the
                // others would go through without them.
                let keys = errors.into_iter().filter_map(|e| e.key).collect();
                return Err(TxnFailure::Other(BackendError::Refused { message, keys }));
            }
        }
        Err(TxnFailure::Other(refusal_or(
            reply.status,
            &reply.body,
            reply.status_error("PUT /v1/txn"),
        )))
    }

    /// Writes `ops` in batches ([`Backend::apply`](crate::backend::Backend::apply)): the first
    /// alone when it registers the node, the others up to [`WRITES_IN_FLIGHT`] at a time. A
    /// plan names each key once, so no two transactions in flight touch the same entry; a
    /// later plan is written only after this one returns, so a delete never overtakes the put
    /// it undoes. On a failure, the transactions already in flight finish, no new one starts,
    /// and the first error is returned.
    pub(super) async fn write(&self, ops: &[Op]) -> Result<usize, BackendError> {
        if ops.is_empty() {
            return Ok(0);
        }
        self.require_owner()?;
        let mut trips = 0;
        let mut next = 0;
        if !self.node_ok.load(Ordering::SeqCst) {
            let batch = self.next_batch(ops, true)?;
            let consumed = batch.consumed;
            trips += self.send_batch(&ops[..consumed], batch).await?;
            next = consumed;
        }
        let mut ranges = Vec::new();
        while next < ops.len() {
            let b = self.next_batch(&ops[next..], false)?;
            let end = next + b.consumed;
            ranges.push((next..end, b));
            next = end;
        }
        // After a failure no batch starts; those started run to their end (each is recorded
        // as committed or not), so nothing is left half known.
        let failed = AtomicBool::new(false);
        let mut results = futures::stream::iter(ranges)
            .map(|(range, batch)| {
                let failed = &failed;
                async move {
                    if failed.load(Ordering::SeqCst) {
                        return None;
                    }
                    Some(self.send_batch(&ops[range], batch).await)
                }
            })
            .buffered(WRITES_IN_FLIGHT);
        let mut first_error = None;
        while let Some(r) = results.next().await {
            match r {
                Some(Ok(t)) => trips += t,
                Some(Err(e)) => {
                    failed.store(true, Ordering::SeqCst);
                    first_error.get_or_insert(e);
                }
                None => {}
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(trips),
        }
    }

    /// Sends one batch, the txn of plan operations `done`; when Consul says the node is
    /// missing (a Consul that lost its state), once more with the node registered first (the
    /// txn was rolled back as a whole). Returns the round trips.
    async fn send_batch(&self, done: &[Op], batch: Batch) -> Result<usize, BackendError> {
        let mut batch = batch;
        let mut trips = 0;
        loop {
            trips += 1;
            match self.send_txn(&batch.ops).await {
                Ok(()) => {
                    if batch.with_node {
                        self.node_ok.store(true, Ordering::SeqCst);
                    }
                    self.committed(done);
                    tracing::debug!(
                        node = %self.node,
                        operations = batch.ops.len(),
                        entries = batch.consumed,
                        "Consul txn committed"
                    );
                    return Ok(trips);
                }
                Err(TxnFailure::MissingNode(e)) if !batch.with_node => {
                    tracing::info!(node = %self.node, error = %e, "Consul node missing, registering it again");
                    self.node_ok.store(false, Ordering::SeqCst);
                    let node = self.node_ops();
                    let bytes =
                        |ops: &[Value]| ops.iter().map(|v| v.to_string().len() + 1).sum::<usize>();
                    if batch.ops.len() + node.len() <= MAX_TXN_OPS
                        && bytes(&batch.ops) + bytes(&node) <= MAX_TXN_BYTES
                    {
                        batch.ops.splice(0..0, node);
                    } else {
                        // The node alone first, then the same operations.
                        trips += 1;
                        match self.send_txn(&node).await {
                            Ok(()) => {}
                            Err(TxnFailure::MissingNode(e)) | Err(TxnFailure::Other(e)) => {
                                return Err(e);
                            }
                        }
                    }
                    batch.with_node = true;
                }
                Err(TxnFailure::MissingNode(e)) | Err(TxnFailure::Other(e)) => {
                    if matches!(e, BackendError::Unreachable(_)) {
                        // Unknown whether it committed; re-register the node next time.
                        self.node_ok.store(false, Ordering::SeqCst);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// After a commit of the plan operations `done`: the names of the entries, and the
    /// entries and checks of before that are gone.
    fn committed(&self, done: &[Op]) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        for op in done {
            if let Some(old) = self.legacy_done(op.key()) {
                names.remove(&old);
            }
            self.legacy_check_done(op.key());
            match op {
                Op::Put { key, record } => {
                    if let Some(n) = record.pointer("/Service/Service").and_then(Value::as_str) {
                        names.insert(key.clone(), n.to_string());
                    }
                }
                Op::Delete { key } => {
                    names.remove(key);
                }
            }
        }
    }

    /// Deregisters the synthetic node when no service is left on it and its meta names this
    /// owner as the one that registered it. A node shared by several owners (the same
    /// `nodeName` in two clusters) stays while any of them has a service there.
    pub(super) async fn retire_node(&self) -> Result<Option<String>, BackendError> {
        self.require_owner()?;
        let what = format!("GET /v1/catalog/node/{}", self.node);
        let reply = self
            .call(
                Method::GET,
                &["catalog", "node", &self.node],
                &[],
                true,
                None,
            )
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !reply.status.is_success() {
            return Err(reply.status_error(&what));
        }
        let node: Value = reply.json(&what)?;
        let services = node
            .get("Services")
            .and_then(Value::as_object)
            .map_or(0, |s| s.len());
        let registered_by = node.pointer(&format!("/Node/Meta/{OWNER_META}"));
        if node.get("Node").is_none_or(Value::is_null)
            || services > 0
            || registered_by.and_then(Value::as_str) != Some(self.owner.as_str())
        {
            return Ok(None);
        }
        let mut body = json!({"Node": self.node});
        if let Some(dc) = &self.datacenter {
            body["Datacenter"] = Value::String(dc.clone());
        }
        let what = format!("PUT /v1/catalog/deregister node {}", self.node);
        let reply = self
            .call(
                Method::PUT,
                &["catalog", "deregister"],
                &[],
                true,
                Some(&body),
            )
            .await?;
        if !reply.status.is_success() {
            return Err(reply.status_error(&what));
        }
        self.node_ok.store(false, Ordering::SeqCst);
        Ok(Some(format!("deregistered the empty node {}", self.node)))
    }
}

/// One error of a 409 txn answer: the operation (`op 3 (service set api-x-…)`), what Consul
/// said, and the plan key of the operation when it is a service's or a check's.
pub(super) struct TxnError {
    pub(super) op: String,
    pub(super) what: String,
    pub(super) key: Option<String>,
}

/// The errors of a 409 txn answer, or None when it has none.
pub(super) fn txn_errors(body: &[u8], ops: &[Value]) -> Option<Vec<TxnError>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let errors = v.get("Errors")?.as_array()?;
    if errors.is_empty() {
        return None;
    }
    Some(
        errors
            .iter()
            .map(|e| {
                let what = e
                    .get("What")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string();
                let found = e
                    .get("OpIndex")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| ops.get(i).map(|op| (i, op)));
                let op = found
                    .map(|(i, op)| format!("op {i} ({})", describe_op(op)))
                    .unwrap_or_else(|| "op ?".into());
                let key = found.and_then(|(_, op)| {
                    op.pointer("/Service/Service/ID")
                        .or_else(|| op.pointer("/Check/Check/ServiceID"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                });
                TxnError { op, what, key }
            })
            .collect(),
    )
}

/// A txn answer other than 409 that refuses the request for what it holds: too large (413),
/// malformed or invalid (400), or an ACL that denies one name (403 "Permission denied"; a
/// token Consul does not know is "ACL not found", the credentials' fault). Else `otherwise`.
pub(super) fn refusal_or(status: StatusCode, body: &[u8], otherwise: BackendError) -> BackendError {
    let text = String::from_utf8_lossy(body);
    let refused = match status {
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::BAD_REQUEST => true,
        StatusCode::FORBIDDEN => text.contains("Permission denied"),
        _ => false,
    };
    if refused {
        BackendError::refused(otherwise.to_string())
    } else {
        otherwise
    }
}

/// `service set api-x-…`, `check set api-x-…:ready`, `node set k8s-x`.
fn describe_op(op: &Value) -> String {
    let Some((kind, inner)) = op.as_object().and_then(|o| o.iter().next()) else {
        return "?".into();
    };
    let verb = inner.get("Verb").and_then(Value::as_str).unwrap_or("?");
    let id = match kind.as_str() {
        "Service" => inner.pointer("/Service/ID"),
        "Check" => inner.pointer("/Check/CheckID"),
        "Node" => inner.pointer("/Node/Node"),
        _ => None,
    }
    .and_then(Value::as_str)
    .unwrap_or("?");
    format!("{} {verb} {id}", kind.to_lowercase())
}
