//! The backend's unit tests: what needs no Consul (tests/consul_*.rs use a real one), by
//! concern, with the fixtures they share.

mod config;
mod import;
mod layout;
mod requests;

use serde_json::json;

use super::import::{health_addresses, import_entries, next_index, split_by_health};
use super::txn::txn_errors;
use super::*;
use crate::backend::External;
use crate::model::Origin;

pub(super) fn consul() -> Consul {
    Consul::new(ConsulConfig {
        addresses: vec!["http://127.0.0.1:8500/".into()],
        node_name: "k8s-c1".into(),
        owner: "c1".into(),
        catalog: "consul".into(),
        ..Default::default()
    })
    .expect("valid config")
}

pub(super) fn inst(ip: &str, tags: &[&str]) -> Instance {
    Instance {
        name: "api_x".into(),
        address: ip.parse().expect("test ip"),
        port: 8080,
        origin: Origin {
            namespace: "shop".into(),
            service: "api-x".into(),
        }
        .into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        meta: BTreeMap::from([
            ("version".to_string(), "1".to_string()),
            (OWNER_META.to_string(), "spoofed".to_string()),
        ])
        .into(),
    }
}

pub(super) fn puts(c: &Consul, n: usize) -> Vec<Op> {
    let instances: Vec<Instance> = (0..n)
        .map(|i| inst(&format!("10.1.{}.{}", i / 250, i % 250 + 1), &[]))
        .collect();
    c.render(&instances)
        .into_iter()
        .map(|(key, record)| Op::Put { key, record })
        .collect()
}
