//! What a plan is made of: records (an entry as a catalog stores it) and the operations that
//! put or delete them. Shared by the plan, which computes them, and the backends, which write
//! them.

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
