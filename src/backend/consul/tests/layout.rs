//! What an instance renders to, what Consul returns read back as that record, and the
//! migration from the ids of before.

use super::*;

#[test]
fn render_holds_identity_address_tags_meta_and_the_node_check() {
    let c = consul();
    let i = inst("fd00::1", &["b", "a"]);
    let recs = c.render(std::slice::from_ref(&i));
    // The owner id, then the instance's identity: two owners never write one ID.
    let id = format!("c1:{}", i.stable_id());
    assert_eq!(c.service_id(&i), id);
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[&id],
        json!({
            "Service": {
                "ID": id, "Service": "api_x", "Address": "fd00::1", "Port": 8080,
                "Tags": ["b", "a"],
                "Meta": {"version": "1", "catalog-bridge-owner": "c1",
                         "catalog-bridge-catalog": "consul",
                         "external-source": "kubernetes", "k8s-namespace": "shop",
                         "k8s-service": "api-x"},
            },
            "NodeCheck": "passing",
        })
    );
    assert_eq!(c.describe(), "consul http://127.0.0.1:8500 node k8s-c1");
}

#[test]
fn meta_consul_would_refuse_is_left_out() {
    assert_eq!(meta_problem("ok_key-1", "v"), None);
    for (k, v) in [
        ("a.b", "1"),
        ("", "1"),
        ("consul-x", "1"),
        ("has space", "1"),
    ] {
        assert!(meta_problem(k, v).is_some(), "{k:?}");
    }
    assert!(meta_problem(&"k".repeat(129), "").is_some());
    let mut meta: BTreeMap<String, String> = (0..62)
        .map(|i| (format!("k{i:02}"), "v".to_string()))
        .collect();
    meta.insert("app.kubernetes.io/name".into(), "x".into());
    let dropped = dropped_meta(&meta);
    assert_eq!(dropped.len(), 4, "{dropped:?}");
    assert!(dropped[0].contains("app.kubernetes.io/name"), "{dropped:?}");
    assert!(
        dropped[1].contains("\"k59\"")
            && dropped[2].contains("\"k60\"")
            && dropped[3].contains("\"k61\"")
    );
    assert!(dropped_meta(&BTreeMap::new()).is_empty());
    assert!(meta_problem("k", &"v".repeat(513)).is_some());

    let c = consul();
    let mut i = inst("10.0.0.1", &[]);
    std::sync::Arc::make_mut(&mut i.meta).clear();
    std::sync::Arc::make_mut(&mut i.meta).insert("app.kubernetes.io/name".into(), "x".into());
    std::sync::Arc::make_mut(&mut i.meta).insert("consul-version".into(), "1".into());
    std::sync::Arc::make_mut(&mut i.meta).insert("team".into(), "shop".into());
    let r = c.record(&i);
    let keys: Vec<&String> = r["Service"]["Meta"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    assert_eq!(
        keys,
        [
            "catalog-bridge-catalog",
            "catalog-bridge-owner",
            "external-source",
            "k8s-namespace",
            "k8s-service",
            "team"
        ]
    );
    for n in 0..100 {
        std::sync::Arc::make_mut(&mut i.meta).insert(format!("k{n:03}"), "v".into());
    }
    let r = c.record(&i);
    assert_eq!(
        r["Service"]["Meta"].as_object().map(|m| m.len()),
        Some(MAX_META_PAIRS)
    );
}

#[test]
fn what_consul_returns_reads_back_as_the_rendered_record() {
    let c = consul();
    let i = inst("10.0.0.1", &[]);
    let mut no_meta = inst("10.0.0.2", &[]);
    std::sync::Arc::make_mut(&mut no_meta.meta).clear();
    let rendered = c.render(&[i.clone(), no_meta.clone()]);
    // As Consul 1.14 answers: extra fields, Tags [] even when omitted, foreign services.
    let as_consul = |r: &Record| {
        let mut s = r["Service"].clone();
        s["Weights"] = json!({"Passing": 1, "Warning": 1});
        s["CreateIndex"] = json!(18);
        s
    };
    let node_services = json!({
        "Node": {"Node": "k8s-c1", "Address": "127.0.0.1",
                 "Meta": {"external-source": "kubernetes", "catalog-bridge-owner": "c1"}},
        "Services": [
            as_consul(&rendered[&c.service_id(&i)]),
            as_consul(&rendered[&c.service_id(&no_meta)]),
            {"ID": "by-hand", "Service": "api_x", "Tags": null, "Meta": null,
             "Address": "10.9.9.9", "Port": 1},
            {"ID": "other", "Service": "api_x", "Tags": [], "Address": "10.9.9.8",
             "Port": 1, "Meta": {"catalog-bridge-owner": "c2"}},
        ],
    });
    let node_check = |status: &str| {
        json!({"Node": "k8s-c1", "CheckID": NODE_CHECK_ID, "Name": CHECK_NAME,
               "Status": status, "ServiceID": "", "ServiceName": "", "Output": "",
               "ServiceTags": []})
    };
    let read = c
        .owned_records(&node_services, &json!([node_check("passing")]))
        .expect("parses");
    assert!(read.node_ok);
    assert!(read.legacy_checks.is_empty());
    assert_eq!(read.records, rendered);
    assert!(crate::export::plan::plan(&rendered, &read.records).is_empty());

    // A node check that is not passing, or missing, is drift: every instance is put again,
    // after the node and its check.
    for checks in [json!([node_check("critical")]), json!([])] {
        let read = c.owned_records(&node_services, &checks).expect("parses");
        assert!(!read.node_ok);
        let p = crate::export::plan::plan(&rendered, &read.records);
        assert_eq!((p.creates, p.updates, p.deletes), (0, 2, 0));
    }

    // A check of its own, as the layout of before had, is drift too: the put deletes it.
    let own_check = |id: &str| {
        json!({"Node": "k8s-c1", "CheckID": format!("{id}:ready"), "Name": CHECK_NAME,
               "Status": "passing", "ServiceID": id, "ServiceName": "api_x"})
    };
    let id = c.service_id(&i);
    let read = c
        .owned_records(
            &node_services,
            &json!([node_check("passing"), own_check(&id)]),
        )
        .expect("parses");
    assert_eq!(read.legacy_checks, HashSet::from([id.clone()]));
    let p = crate::export::plan::plan(&rendered, &read.records);
    assert_eq!((p.creates, p.updates, p.deletes), (0, 1, 0));
    *c.legacy_checks.lock().expect("lock") = read.legacy_checks;
    let batches = c.txn_batches(&p.ops, false).expect("valid");
    assert_eq!(
        batches,
        [vec![
            json!({"Service": {"Verb": "set", "Node": "k8s-c1", "Service": rendered[&id]["Service"]}}),
            json!({"Check": {"Verb": "delete", "Check": {"Node": "k8s-c1", "CheckID": format!("{id}:ready")}}}),
        ]]
    );

    // Null Tags and Meta read as empty ones.
    let odd = json!({"Node": null, "Services": [{"ID": "x", "Service": "s", "Tags": null,
        "Meta": {"catalog-bridge-owner": "c1"}, "Address": "10.0.0.3", "Port": 1}]});
    let read = c.owned_records(&odd, &Value::Null).expect("parses");
    assert!(!read.node_ok);
    assert_eq!(read.records["x"]["Service"]["Tags"], json!([]));
    assert_eq!(read.records["x"]["NodeCheck"], Value::Null);

    // A missing node is an empty catalog; a node registered differently gets re-registered.
    let read = c
        .owned_records(&json!({"Node": null, "Services": null}), &json!([]))
        .expect("parses");
    assert!(!read.node_ok && read.records.is_empty());
    let read = c
        .owned_records(
            &json!({"Node": {"Address": "127.0.0.1", "Meta": {}}, "Services": []}),
            &json!([node_check("passing")]),
        )
        .expect("parses");
    assert!(!read.node_ok);
}

/// Entries written before service IDs named the owner are filed under their IDs of now, and
/// each is replaced in the transaction that writes it again: the set of the new ID and the
/// delete of the old one commit together. Foreign entries, and an old ID whose new one exists
/// already, are not adopted.
#[test]
fn entries_under_the_ids_of_before_are_replaced_in_one_commit_each() {
    let c = consul();
    let (a, b) = (inst("10.0.0.1", &[]), inst("10.0.0.2", &[]));
    let rendered = c.render(&[a.clone(), b.clone()]);
    // As the previous version wrote them: the ID without the owner.
    let before = |i: &Instance| {
        let mut r = c.record(i);
        let old = i.stable_id();
        r["Service"]["ID"] = json!(old);
        r
    };
    let mut owned = BTreeMap::from([
        (a.stable_id(), before(&a)),
        (b.stable_id(), before(&b)),
        // `b` was written again already (a first run cut short): its old entry only goes.
        (c.service_id(&b), rendered[&c.service_id(&b)].clone()),
    ]);
    let (adopted, legacy) = c.adopt_legacy(std::mem::take(&mut owned));
    assert_eq!(
        legacy,
        HashMap::from([(c.service_id(&a), a.stable_id())]),
        "only a is filed anew"
    );
    let (ka, kb, old_b) = (c.service_id(&a), c.service_id(&b), b.stable_id());
    let keys: Vec<&String> = adopted.keys().collect();
    let mut want = vec![&ka, &kb, &old_b];
    want.sort();
    assert_eq!(keys, want);
    *c.legacy.lock().expect("lock") = legacy;

    let p = crate::export::plan::plan(&rendered, &adopted);
    assert_eq!((p.creates, p.updates, p.deletes), (0, 1, 1), "{p}");
    let batches = c.txn_batches(&p.ops, false).expect("valid");
    assert_eq!(batches.len(), 1);
    let ops: Vec<(String, String)> = batches[0]
        .iter()
        .map(|op| {
            let (kind, inner) = op.as_object().and_then(|o| o.iter().next()).expect("op");
            let id = inner
                .pointer("/Service/ID")
                .or_else(|| inner.pointer("/Check/CheckID"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            (
                format!("{kind} {}", inner["Verb"].as_str().unwrap_or_default()),
                id.to_string(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("Service set".to_string(), ka.clone()),
            ("Service delete".to_string(), a.stable_id()),
            ("Service delete".to_string(), old_b.clone()),
        ]
    );
    // An adopted entry no longer wanted is deleted under its ID in Consul.
    let gone = c
        .txn_batches(&[Op::Delete { key: ka.clone() }], false)
        .expect("valid");
    assert_eq!(gone[0][0]["Service"]["Service"]["ID"], json!(a.stable_id()));

    // Another owner's entry under an ID without an owner is not ours to adopt.
    let foreign = json!({"Node": null, "Services": [{"ID": a.stable_id(), "Service": "api_x",
        "Tags": [], "Meta": {"catalog-bridge-owner": "c2"}, "Address": "10.0.0.1", "Port": 8080}]});
    let read = c.owned_records(&foreign, &Value::Null).expect("parses");
    assert!(c.adopt_legacy(read.records).0.is_empty());
}
