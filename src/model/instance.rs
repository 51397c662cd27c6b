//! What one exported instance is, and where it came from.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// The Kubernetes Service an exported instance belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub namespace: String,
    pub service: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service)
    }
}

/// One ready endpoint to publish in a catalog under `name`.
///
/// What all instances of one export have in common (name, origin, tags, meta) is shared
/// between them, not copied: a hundred thousand instances are kept in several places (each
/// export's, each catalog's, each writer's), and these were most of their size. Comparison and
/// order are by value, as if each field were owned.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instance {
    /// The name in the catalog (`api_x`).
    pub name: Arc<str>,
    pub address: IpAddr,
    pub port: u16,
    pub origin: Arc<Origin>,
    pub tags: Arc<[String]>,
    pub meta: Arc<BTreeMap<String, String>>,
}

impl Instance {
    /// `10.0.0.1:8080`, or `[fd00::1]:8080` for IPv6.
    pub fn host_port(&self) -> String {
        std::net::SocketAddr::new(self.address, self.port).to_string()
    }

    /// A deterministic identifier from (namespace, service, external name, address, port):
    /// readable, unique per origin and name, the same on every restart and every replica.
    pub fn stable_id(&self) -> String {
        let digest = fnv1a64(&format!(
            "{}\0{}\0{}\0{}\0{}",
            self.origin.namespace, self.origin.service, self.name, self.address, self.port
        ));
        let addr = self.address.to_string().replace([':', '.'], "-");
        format!(
            "{}-{addr}-{}-{:08x}",
            self.origin.service, self.port, digest as u32
        )
    }
}

/// FNV-1a, 64 bit: a stable, dependency-free hash for identifiers (not for security).
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Everything one catalog should hold for this controller, sorted and without duplicates.
///
/// A persistent set: the desired-state step changes one instance of a hundred thousand in
/// O(log n), a copy shares everything with its original, and [`DesiredCatalog::changes_from`]
/// skips what two versions share, so a writer's diff costs what changed, not the catalog's size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredCatalog {
    instances: imbl::OrdSet<Instance>,
}

impl DesiredCatalog {
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// The instances, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter()
    }

    pub fn contains(&self, i: &Instance) -> bool {
        self.instances.contains(i)
    }

    pub fn insert(&mut self, i: Instance) {
        self.instances.insert(i);
    }

    pub fn remove(&mut self, i: &Instance) {
        self.instances.remove(i);
    }

    /// What `self` has that `before` has not (added) and what `before` had that `self` has not
    /// (removed), in order; parts both share are skipped unread.
    pub fn changes_from<'a>(&'a self, before: &'a DesiredCatalog) -> Difference<'a> {
        let mut c = Difference::default();
        for d in before.instances.diff(&self.instances) {
            match d {
                imbl::ordset::DiffItem::Add(i) => c.added.push(i),
                imbl::ordset::DiffItem::Remove(i) => c.removed.push(i),
            }
        }
        c
    }
}

impl FromIterator<Instance> for DesiredCatalog {
    fn from_iter<T: IntoIterator<Item = Instance>>(iter: T) -> Self {
        DesiredCatalog {
            instances: iter.into_iter().collect(),
        }
    }
}

/// The difference between two [`DesiredCatalog`]s.
#[derive(Debug, Default)]
pub struct Difference<'a> {
    pub added: Vec<&'a Instance>,
    pub removed: Vec<&'a Instance>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(ns: &str, ip: &str) -> Instance {
        Instance {
            name: "api_x".into(),
            address: ip.parse().expect("test ip"),
            port: 8080,
            origin: Origin {
                namespace: ns.into(),
                service: "api-x".into(),
            }
            .into(),
            tags: Arc::new([]),
            meta: Arc::default(),
        }
    }

    #[test]
    fn stable_ids_are_deterministic_and_distinguish_origins() {
        let a = inst("shop", "10.0.0.1");
        assert_eq!(a.stable_id(), inst("shop", "10.0.0.1").stable_id());
        assert!(a.stable_id().starts_with("api-x-10-0-0-1-8080-"));
        assert_ne!(a.stable_id(), inst("other", "10.0.0.1").stable_id());
        assert_ne!(a.stable_id(), inst("shop", "10.0.0.2").stable_id());
        assert_eq!(inst("shop", "fd00::1").host_port(), "[fd00::1]:8080");
    }
}
