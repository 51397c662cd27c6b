//! The catalog's address rules (`spec.policy.import.addresses`) applied to what an import
//! reads: an instance outside them is skipped and counted like an unparsable entry, and the
//! rest of the import goes on.

use crate::api::policy::AddressRules;
use crate::backend::{External, ImportSnapshot};

/// `snap` without the instances `rules` refuse, which join its skipped entries.
pub fn screened(mut snap: ImportSnapshot, rules: &AddressRules) -> ImportSnapshot {
    if rules.is_empty() {
        return snap;
    }
    let mut skipped = Vec::new();
    let mut keep = |list: Vec<External>| -> Vec<External> {
        list.into_iter()
            .filter(|e| match rules.refusal(&e.address) {
                Some(why) => {
                    skipped.push((e.id.clone(), why));
                    false
                }
                None => true,
            })
            .collect()
    };
    snap.instances = keep(std::mem::take(&mut snap.instances));
    snap.failing = keep(std::mem::take(&mut snap.failing));
    snap.skipped.extend(skipped);
    snap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::policy::CatalogPolicy;

    #[test]
    fn refused_instances_join_the_skipped_entries() {
        let policy: CatalogPolicy = serde_json::from_value(
            serde_json::json!({"import": {"addresses": {"allow": ["198.18.0.0/15"]}}}),
        )
        .expect("a policy");
        let rules = AddressRules::of(Some(&policy)).expect("rules");
        let ext = |a: &str| External {
            address: a.into(),
            port: 80,
            id: format!("id-{a}"),
        };
        let snap = ImportSnapshot {
            instances: vec![ext("198.18.0.9"), ext("10.0.0.1")],
            failing: vec![ext("10.0.0.2")],
            skipped: vec![("bad".into(), "unparsable".into())],
            ..Default::default()
        };
        let out = screened(snap, &rules);
        assert_eq!(out.instances, [ext("198.18.0.9")]);
        assert!(out.failing.is_empty());
        let ids: Vec<&str> = out.skipped.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["bad", "id-10.0.0.1", "id-10.0.0.2"]);
    }
}
