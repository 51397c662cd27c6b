//! What one exported instance is, and where it came from.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

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
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instance {
    /// The name in the catalog (`api_x`).
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub origin: Origin,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredCatalog {
    pub instances: Vec<Instance>,
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
            },
            tags: vec![],
            meta: BTreeMap::new(),
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
