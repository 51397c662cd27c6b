//! What a plan is made of: records (an entry as a catalog stores it) and the operations that
//! put or delete them. Shared by the plan, which computes them, and the backends, which write
//! them.

use std::fmt;

use super::instance::Origin;

/// An entry as a backend stores it, in a canonical form that compares equal when the catalog
/// holds what would be written.
pub type Record = serde_json::Value;

/// One change to a catalog.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Create or replace the entry at `key`.
    Put { key: String, record: Record },
    /// Remove the entry at `key` (always one this controller owns).
    Delete { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// What an operation belongs to: the export that asked for the entry, or, for a deletion of an
/// entry whose export is gone (or unknown after a restart), the entry alone. A write the catalog
/// refuses holds back only the operations of its unit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    /// The instances of Service `origin` published under `name`.
    Export { origin: Origin, name: String },
    /// One entry, by key.
    Entry { key: String },
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unit::Export { origin, name } => write!(f, "{origin} as {name}"),
            Unit::Entry { key } => write!(f, "entry {key}"),
        }
    }
}
