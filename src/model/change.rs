//! What a plan is made of: records (an entry as a catalog stores it) and the operations that
//! put or delete them. Shared by the plan, which computes them, and the backends, which write
//! them.

use std::fmt;
use std::sync::Arc;

use super::instance::Origin;

/// An entry as a backend stores it, in a canonical form that compares equal when the catalog
/// holds what would be written.
pub type Record = serde_json::Value;

/// A record's fingerprint (128 bits): what the writer keeps of the entries a catalog holds, in
/// place of the records themselves. Equal records have equal digests, whatever the order of
/// their objects' keys; different ones differ but with a chance of 2^-128.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(u64, u64);

impl Digest {
    /// A placeholder for a digest about to be computed (all zeros; no record is expected to
    /// hash to it).
    pub const PENDING: Digest = Digest(0, 0);
}

impl Digest {
    pub fn of(record: &Record) -> Digest {
        use std::hash::Hasher;
        let mut h = Both::default();
        hash_value(record, &mut h);
        Digest(h.0.finish(), h.1.finish())
    }
}

/// Two independent 64-bit hashers fed the same bytes.
#[derive(Default)]
struct Both(fnv::FnvHasher, std::hash::DefaultHasher);

impl std::hash::Hasher for Both {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
        self.1.write(bytes);
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// Feeds `v` to `h`, objects' keys in sorted order, each value tagged with its kind.
fn hash_value(v: &Record, h: &mut impl std::hash::Hasher) {
    use serde_json::Value;
    use std::hash::Hash;
    match v {
        Value::Null => h.write_u8(0),
        Value::Bool(b) => {
            h.write_u8(1);
            b.hash(h);
        }
        Value::Number(n) => {
            h.write_u8(2);
            n.to_string().hash(h);
        }
        Value::String(s) => {
            h.write_u8(3);
            s.hash(h);
        }
        Value::Array(a) => {
            h.write_u8(4);
            h.write_usize(a.len());
            for x in a {
                hash_value(x, h);
            }
        }
        Value::Object(o) => {
            h.write_u8(5);
            h.write_usize(o.len());
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            for k in keys {
                k.hash(h);
                hash_value(&o[k.as_str()], h);
            }
        }
    }
}

/// An entry's record known by its [`Digest`] at least: what the plan compares.
pub trait Digested {
    fn digest(&self) -> Digest;
}

/// What the writer knows of an entry a catalog holds: the record itself, or its [`Digest`].
pub trait Known: Digested {
    fn of(record: &Record) -> Self;
}

impl Digested for Record {
    fn digest(&self) -> Digest {
        Digest::of(self)
    }
}

impl Known for Record {
    fn of(record: &Record) -> Self {
        record.clone()
    }
}

impl Digested for Digest {
    fn digest(&self) -> Digest {
        *self
    }
}

impl Known for Digest {
    fn of(record: &Record) -> Self {
        Digest::of(record)
    }
}

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
    Export { origin: Arc<Origin>, name: Arc<str> },
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn digests_follow_content_not_key_order() {
        let a = json!({"ID": "x", "Port": 80, "Tags": ["a", "b"], "Meta": {"k": "v", "j": null}});
        let b: Record = serde_json::from_str(
            r#"{"Meta": {"j": null, "k": "v"}, "Tags": ["a", "b"], "Port": 80, "ID": "x"}"#,
        )
        .expect("json");
        assert_eq!(Digest::of(&a), Digest::of(&b));
        for other in [
            json!({"ID": "x", "Port": 81, "Tags": ["a", "b"], "Meta": {"k": "v", "j": null}}),
            json!({"ID": "x", "Port": "80", "Tags": ["a", "b"], "Meta": {"k": "v", "j": null}}),
            json!({"ID": "x", "Port": 80, "Tags": ["b", "a"], "Meta": {"k": "v", "j": null}}),
            json!({"ID": "x", "Port": 80, "Tags": ["ab"], "Meta": {"k": "v", "j": null}}),
            json!({"ID": "x", "Port": 80, "Tags": ["a", "b"], "Meta": {"k": "v"}}),
        ] {
            assert_ne!(Digest::of(&a), Digest::of(&other), "{other}");
        }
    }
}
