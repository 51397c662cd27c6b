//! The writes of an apply, and how they are cut into `multi`s: pure.

use std::collections::HashSet;

use super::layout::ancestors;
use crate::backend::Record;

/// At most this many operations (entries and the parents they need) in one `multi`: far below
/// `jute.maxbuffer` (1 MiB) for entries of the sizes written here.
pub const MAX_MULTI_OPS: usize = 100;
/// At most this many bytes of paths and data in one `multi`; an entry larger alone still goes,
/// alone.
pub const MAX_MULTI_BYTES: usize = 256 * 1024;

/// One write of an apply.
#[derive(Clone, Debug)]
pub(super) enum Write {
    Create {
        key: String,
        path: String,
        record: Record,
        data: Vec<u8>,
        registered: Option<u64>,
    },
    Set {
        key: String,
        path: String,
        record: Record,
        data: Vec<u8>,
        registered: Option<u64>,
        version: i32,
    },
    Delete {
        key: String,
        path: String,
        version: i32,
    },
}

impl Write {
    pub(super) fn key(&self) -> &str {
        match self {
            Write::Create { key, .. } | Write::Set { key, .. } | Write::Delete { key, .. } => key,
        }
    }

    pub(super) fn path(&self) -> &str {
        match self {
            Write::Create { path, .. } | Write::Set { path, .. } | Write::Delete { path, .. } => {
                path
            }
        }
    }

    fn size(&self) -> usize {
        let data = match self {
            Write::Create { data, .. } | Write::Set { data, .. } => data.len(),
            Write::Delete { .. } => 0,
        };
        self.path().len() + data + 64
    }
}

/// A `multi`: the parents it creates first, then `writes[range]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Batch {
    pub(super) parents: Vec<String>,
    pub(super) range: std::ops::Range<usize>,
}

/// Cuts `writes` into multis of at most [`MAX_MULTI_OPS`] operations and about `max_bytes`
/// (at most [`MAX_MULTI_BYTES`]; less with a small `jute.maxbuffer`), each creating the
/// parents not in `known` that its creates need (once).
pub(super) fn batches(writes: &[Write], known: &HashSet<String>, max_bytes: usize) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut created: HashSet<String> = HashSet::new();
    let mut i = 0;
    while i < writes.len() {
        let start = i;
        let mut parents: Vec<String> = Vec::new();
        let (mut ops, mut bytes) = (0, 0);
        while i < writes.len() {
            let w = &writes[i];
            let new: Vec<String> = match w {
                Write::Create { path, .. } => ancestors(path)
                    .into_iter()
                    .filter(|p| !known.contains(p) && !created.contains(p))
                    .collect(),
                _ => Vec::new(),
            };
            let n = 1 + new.len();
            let b = w.size() + new.iter().map(|p| p.len() + 64).sum::<usize>();
            if i > start && (ops + n > MAX_MULTI_OPS || bytes + b > max_bytes) {
                break;
            }
            ops += n;
            bytes += b;
            created.extend(new.iter().cloned());
            parents.extend(new);
            i += 1;
        }
        out.push(Batch {
            parents,
            range: start..i,
        });
    }
    out
}
