//! Writing and reading back what this owner holds. Ownership is the lease: the keys this
//! controller owns are the keys under the layout's prefix attached to its lease; keys without a
//! lease or with another lease are never changed or deleted. Every put and delete is guarded by
//! a compare on the key's lease inside the transaction (a put also goes through when the key
//! does not exist), so that holds even when someone else writes between our read and our write.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};
use futures::StreamExt;
use futures::future::BoxFuture;
use serde_json::Value;
use tracing::warn;

use super::Etcd;
use super::client::Fail;
use super::layout::{prefix_end, record_of, record_value};
use crate::backend::{BackendError, Record};
use crate::model::Op;

/// Transactions in flight at once while a plan is written. Measured with `make bench`: a
/// plain writer of 100,000 keys took 3.8 s with 1 in flight, 2.6 s with 4 and 1.7 s with 8
/// (10,000 keys: best with 8 too); see the README's benchmark table.
pub const WRITES_IN_FLIGHT: usize = 8;

/// One transaction of a write in flight: its plan operations and etcd's answer (None: not
/// sent, as an earlier one failed).
type InFlight<'a> = BoxFuture<'a, Option<(&'a [Op], Result<TxnResponse, Fail>)>>;
/// At most this many operations in one transaction (etcd's `--max-txn-ops` default).
///
/// etcd counts the operations of nested transactions against the same budget, level by level:
/// a nested transaction may hold at most 128 minus the operations of the levels above it. Each
/// plan operation is one guarded nested transaction chain of at most [`MAX_GUARD_DEPTH`]
/// levels of one operation each, so a transaction carries at most [`MAX_PLAN_OPS_PER_TXN`]
/// plan operations.
pub const MAX_TXN_OPS: usize = 128;
/// Levels of nested transactions that guard one put (key absent, on our lease, on our previous
/// lease).
pub const MAX_GUARD_DEPTH: usize = 3;
/// Plan operations in one transaction: `128 - 3`.
pub const MAX_PLAN_OPS_PER_TXN: usize = MAX_TXN_OPS - MAX_GUARD_DEPTH;
/// At most about this many bytes in one transaction (etcd's `--max-request-bytes` defaults to
/// 1.5 MiB); an operation larger than this alone still goes, alone.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// The transactions `apply` sends for `ops`, in order: consecutive slices of at most
/// [`MAX_PLAN_OPS_PER_TXN`] operations (so that with their guards they stay within etcd's
/// [`MAX_TXN_OPS`]) and about [`MAX_TXN_BYTES`].
pub fn batches(ops: &[Op]) -> Vec<&[Op]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, op) in ops.iter().enumerate() {
        let b = op_bytes(op);
        if i > start && (i - start >= MAX_PLAN_OPS_PER_TXN || bytes + b > MAX_TXN_BYTES) {
            out.push(&ops[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    if start < ops.len() {
        out.push(&ops[start..]);
    }
    out
}

/// Where the range of keys starting with `prefix` begins: the prefix, or for the empty one
/// (the `naming` layout without a base path) the first key there can be, as etcd takes no
/// empty key.
fn range_start(prefix: &str) -> Vec<u8> {
    if prefix.is_empty() {
        vec![0]
    } else {
        prefix.as_bytes().to_vec()
    }
}

/// An estimate of the bytes one operation takes in a transaction request: a guarded put holds
/// its key and value up to three times (create, ours, previous lease).
fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Put { key, record } => {
            let value = record
                .get("value")
                .and_then(Value::as_str)
                .map_or_else(|| record.to_string().len(), str::len);
            3 * (2 * key.len() + value) + 96
        }
        Op::Delete { key } => 2 * (2 * key.len()) + 64,
    }
}

/// A condition chain: the first of `conds` that holds runs `op`; none: nothing happens.
fn guarded(conds: &[Compare], op: &dyn Fn() -> TxnOp) -> TxnOp {
    let mut chain: Option<TxnOp> = None;
    for c in conds.iter().rev() {
        let txn = Txn::new().when([c.clone()]).and_then([op()]);
        let txn = match chain.take() {
            Some(next) => txn.or_else([next]),
            None => txn,
        };
        chain = Some(TxnOp::txn(txn));
    }
    chain.unwrap_or_else(op)
}

/// Whether a guarded operation ran (some condition of its chain held).
fn took_effect(r: &TxnResponse) -> bool {
    r.succeeded()
        || r.op_responses()
            .iter()
            .any(|o| matches!(o, TxnOpResponse::Txn(n) if took_effect(n)))
}

/// An error of a transaction that is the request's, not etcd's: a role without permission on
/// one of its keys, a request too large or with too many operations. etcd names no key: the
/// writer finds the refused ones by sending parts of the request.
pub(super) fn refusal(e: BackendError) -> BackendError {
    let request = |m: &str| {
        let m = m.to_ascii_lowercase();
        m.contains("permission denied")
            || m.contains("request is too large")
            || m.contains("too many operations")
    };
    match e {
        BackendError::Unauthorized(m) | BackendError::Rejected(m) if request(&m) => {
            BackendError::refused(m)
        }
        e => e,
    }
}

impl Etcd {
    /// The transaction of one batch, guarded so that only our keys change.
    pub(super) fn txn(
        &self,
        batch: &[Op],
        lease: i64,
        previous: Option<i64>,
    ) -> Result<Txn, BackendError> {
        let layout = &self.inner.layout;
        let mut ops = Vec::with_capacity(batch.len());
        for op in batch {
            let key = op.key();
            if !key.starts_with(&layout.prefix) || key == self.inner.marker || key.is_empty() {
                return Err(BackendError::Protocol(format!(
                    "refusing to write {key:?}: outside this catalog's prefix {:?}",
                    layout.prefix
                )));
            }
            let mut ours = vec![Compare::lease(key, CompareOp::Equal, lease)];
            if let Some(p) = previous {
                ours.push(Compare::lease(key, CompareOp::Equal, p));
            }
            match op {
                Op::Put { key, record } => {
                    let value = record_value(key, record)?;
                    let mut conds = vec![Compare::version(key.as_str(), CompareOp::Equal, 0)];
                    conds.extend(ours);
                    let put = || {
                        TxnOp::put(
                            key.as_str(),
                            value,
                            Some(PutOptions::new().with_lease(lease)),
                        )
                    };
                    ops.push(guarded(&conds, &put));
                }
                Op::Delete { key } => {
                    ops.push(guarded(&ours, &|| TxnOp::delete(key.as_str(), None)));
                }
            }
        }
        Ok(Txn::new().and_then(ops))
    }

    /// The records on our lease (and on the previous one during a TTL change), as `read_owned`
    /// returns them: the layout's keys read in pages, those on our lease(s) kept.
    pub(super) async fn owned(&self) -> Result<BTreeMap<String, Record>, BackendError> {
        self.require_owner()?;
        let inner = &self.inner;
        let mut attempts = 0;
        if inner.read_only && !inner.has_lease().await? {
            return Ok(BTreeMap::new());
        }
        let (current, previous) = loop {
            let (current, previous) = inner.ensure_lease().await?;
            match inner.lease_alive(current.id).await {
                Ok(()) => break (current, previous),
                Err(Fail::LeaseGone(_)) if inner.read_only => {
                    inner.lease.lock().await.current = None;
                    return Ok(BTreeMap::new());
                }
                Err(Fail::LeaseGone(m)) => {
                    // Its keys went with it. Read what the new lease holds (nothing, unless it
                    // was granted a moment ago and written to).
                    inner.replace_lost(current.id).await?;
                    attempts += 1;
                    if attempts > 1 {
                        return Err(BackendError::Rejected(format!(
                            "{m}: the etcd lease was lost twice in a row"
                        )));
                    }
                }
                Err(Fail::Backend(e)) => return Err(e),
            }
        };
        let previous = match previous {
            Some(p) => match inner.lease_alive(p.id).await {
                Ok(()) => Some(p),
                Err(Fail::LeaseGone(_)) => {
                    inner.drop_previous(p.id, false).await;
                    None
                }
                Err(Fail::Backend(e)) => return Err(e),
            },
            None => None,
        };
        // The layout's keys, in pages, those on our lease(s) kept: a read that never grows
        // past one page, whatever the size of the catalog.
        let kvs = inner
            .conn
            .range(
                "reading owned keys",
                range_start(&inner.layout.prefix),
                prefix_end(inner.layout.prefix.as_bytes()),
            )
            .await?;
        let mut out = BTreeMap::new();
        let mut any_on_previous = false;
        for kv in kvs {
            let on_previous = match kv.lease() {
                id if id == current.id => false,
                id if previous.is_some_and(|p| p.id == id) => true,
                _ => continue,
            };
            let Ok(key) = std::str::from_utf8(kv.key()) else {
                continue;
            };
            if key == inner.marker {
                continue;
            }
            any_on_previous |= on_previous;
            let value = String::from_utf8_lossy(kv.value());
            out.insert(key.to_string(), record_of(&value, on_previous));
        }
        // A previous lease that holds none of this layout's keys any more has done its work: it
        // is no longer kept alive, and revoked if nothing else is on it.
        if let Some(p) = previous
            && !any_on_previous
        {
            let empty = inner.lease_empty(p.id).await;
            inner.drop_previous(p.id, empty).await;
        }
        Ok(out)
    }

    /// Writes `ops` in as few guarded transactions as [`batches`] allows, up to
    /// [`WRITES_IN_FLIGHT`] at a time; the number sent. A plan names each key once, so no two
    /// transactions in flight touch the same key, and a later plan is written only after this
    /// one returns: a delete never overtakes the put it undoes. On a failure the transactions
    /// in flight finish, no new one starts, and the first error is returned.
    pub(super) async fn write(&self, ops: &[Op]) -> Result<usize, BackendError> {
        if ops.is_empty() {
            return Ok(0);
        }
        self.require_owner()?;
        let inner = &self.inner;
        if inner.read_only {
            return Err(BackendError::Rejected(format!(
                "{} operation(s) not written: this etcd client is read only",
                ops.len()
            )));
        }
        let (lease, previous) = inner.ensure_lease().await?;
        // Boxed, so that the stream's futures are one type whose lifetimes the async trait
        // method can name.
        // After a failure no transaction starts; those started run to their end, so that
        // nothing is left half known.
        let stop = AtomicBool::new(false);
        let stop = &stop;
        let mut sends: Vec<InFlight<'_>> = Vec::new();
        for batch in batches(ops) {
            let txn = self.txn(batch, lease.id, previous.map(|p| p.id))?;
            sends.push(Box::pin(async move {
                if stop.load(Ordering::SeqCst) {
                    return None;
                }
                let what = format!("transaction of {} operation(s)", batch.len());
                let resp = inner
                    .conn
                    .call(&what, move |mut c| {
                        let txn = txn.clone();
                        async move { c.txn(txn).await }
                    })
                    .await;
                Some((batch, resp))
            }));
        }
        let mut results = futures::stream::iter(sends).buffered(WRITES_IN_FLIGHT);
        let mut sent = 0;
        let mut skipped = Vec::new();
        let mut failed = None;
        let mut lease_gone = None;
        while let Some(r) = results.next().await {
            let Some((batch, resp)) = r else { continue };
            let resp = match resp {
                Ok(r) => r,
                Err(Fail::LeaseGone(m)) => {
                    stop.store(true, Ordering::SeqCst);
                    lease_gone.get_or_insert(m);
                    continue;
                }
                Err(Fail::Backend(e)) => {
                    stop.store(true, Ordering::SeqCst);
                    failed.get_or_insert(refusal(e));
                    continue;
                }
            };
            sent += 1;
            for (op, r) in batch.iter().zip(resp.op_responses()) {
                if let (Op::Put { key, .. }, TxnOpResponse::Txn(r)) = (op, &r)
                    && !took_effect(r)
                {
                    skipped.push(key.clone());
                }
            }
        }
        drop(results);
        if let Some(m) = lease_gone {
            inner.replace_lost(lease.id).await?;
            return Err(BackendError::Rejected(format!(
                "{m}: lease {:x} expired, its keys are gone; a new lease was granted \
                 and every entry is to be written again",
                lease.id
            )));
        }
        if !skipped.is_empty() {
            warn!(
                catalog = %inner.catalog,
                count = skipped.len(),
                keys = ?skipped.iter().take(5).collect::<Vec<_>>(),
                "etcd keys held by someone else (no lease or another lease) were left alone"
            );
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }
}
