use serde_json::json;

use super::import::{health_addresses, import_entries, next_index, split_by_health};
use super::txn::txn_errors;
use super::*;
use crate::backend::External;
use crate::model::Origin;

fn consul() -> Consul {
    Consul::new(ConsulConfig {
        addresses: vec!["http://127.0.0.1:8500/".into()],
        node_name: "k8s-c1".into(),
        owner: "c1".into(),
        catalog: "consul".into(),
        ..Default::default()
    })
    .expect("valid config")
}

fn inst(ip: &str, tags: &[&str]) -> Instance {
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

fn puts(c: &Consul, n: usize) -> Vec<Op> {
    let instances: Vec<Instance> = (0..n)
        .map(|i| inst(&format!("10.1.{}.{}", i / 250, i % 250 + 1), &[]))
        .collect();
    c.render(&instances)
        .into_iter()
        .map(|(key, record)| Op::Put { key, record })
        .collect()
}

#[test]
fn config_is_checked_without_contacting_anything() {
    let bad = |cfg: ConsulConfig| Consul::new(cfg).is_err();
    let ok = ConsulConfig {
        addresses: vec!["http://127.0.0.1:1".into()],
        node_name: "n".into(),
        owner: "o".into(),
        ..Default::default()
    };
    assert!(Consul::new(ok.clone()).is_ok(), "a dead address is fine");
    assert!(bad(ConsulConfig {
        addresses: vec![],
        ..ok.clone()
    }));
    assert!(bad(ConsulConfig {
        addresses: vec!["consul:8500".into()],
        ..ok.clone()
    }));
    assert!(bad(ConsulConfig {
        addresses: vec!["http://consul:8500/x".into()],
        ..ok.clone()
    }));
    assert!(bad(ConsulConfig {
        owner: " o".into(),
        ..ok.clone()
    }));
    assert!(bad(ConsulConfig {
        ca_pem: Some(b"not pem".to_vec()),
        ..ok.clone()
    }));
    assert!(bad(ConsulConfig {
        client_cert: Some(ClientCert {
            cert_pem: b"not pem".to_vec(),
            key_pem: b"not pem either".to_vec(),
        }),
        ..ok.clone()
    }));
    let dbg = format!(
        "{:?}",
        ConsulConfig {
            token: Some("secret-token".into()),
            ..ok
        }
    );
    assert!(!dbg.contains("secret-token"), "{dbg}");
}

#[tokio::test]
async fn a_client_without_owner_only_looks_up() {
    let c = Consul::new(ConsulConfig {
        addresses: vec!["http://127.0.0.1:1".into()],
        ..Default::default()
    })
    .expect("a lookup-only client");
    assert!(matches!(
        c.read_owned().await,
        Err(BackendError::Rejected(_))
    ));
    let ops = [Op::Delete { key: "x".into() }];
    assert!(matches!(
        c.apply(&ops).await,
        Err(BackendError::Rejected(_))
    ));
    assert_eq!(c.apply(&[]).await, Ok(0));
    // Lookups go to Consul (here: nobody answers).
    assert!(matches!(
        c.lookup("x").await,
        Err(BackendError::Unreachable(_))
    ));
}

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

#[test]
fn put_becomes_a_service_set_delete_a_service_delete_after_the_node_and_its_check() {
    let c = consul();
    let ops = puts(&c, 1);
    let Op::Put { key, .. } = &ops[0] else {
        panic!("a put")
    };
    let key = key.clone();
    let mut all = ops.clone();
    all.push(Op::Delete {
        key: "gone-1".into(),
    });
    let batches = c.txn_batches(&all, true).expect("valid records");
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(b.len(), 4);
    assert_eq!(
        b[0],
        json!({"Node": {"Verb": "set", "Node": {"Node": "k8s-c1", "Address": "127.0.0.1",
            "Meta": {"external-source": "kubernetes", "catalog-bridge-owner": "c1"}}}})
    );
    assert_eq!(b[1]["Check"]["Verb"], "set");
    assert_eq!(b[1]["Check"]["Check"]["CheckID"], NODE_CHECK_ID);
    assert_eq!(b[1]["Check"]["Check"]["Status"], "passing");
    assert_eq!(b[1]["Check"]["Check"].get("ServiceID"), None);
    assert_eq!(b[2]["Service"]["Verb"], "set");
    assert_eq!(b[2]["Service"]["Node"], "k8s-c1");
    assert_eq!(b[2]["Service"]["Service"]["ID"], json!(key));
    // Consul needs a non-empty name to delete; the ID stands in when none is known.
    assert_eq!(
        b[3],
        json!({"Service": {"Verb": "delete", "Node": "k8s-c1",
                           "Service": {"ID": "gone-1", "Service": "gone-1"}}})
    );
    c.remember_names([(
        &"gone-1".to_string(),
        &json!({"Service": {"Service": "api_x"}}),
    )]);
    let b = c.txn_batches(&all[1..], false).expect("valid");
    assert_eq!(b[0][0]["Service"]["Service"]["Service"], "api_x");

    let bad = [Op::Put {
        key: "k".into(),
        record: json!({"name": "api_x"}),
    }];
    assert!(matches!(
        c.txn_batches(&bad, false),
        Err(BackendError::Protocol(_))
    ));
}

#[test]
fn batches_hold_at_most_64_operations_the_node_first() {
    let c = consul();
    let mut ops = puts(&c, 150);
    ops.extend((0..10).map(|i| Op::Delete {
        key: format!("old-{i}"),
    }));
    let batches = c.txn_batches(&ops, true).expect("valid");
    // The node and its check + 150 puts + 10 deletes = 162 ops.
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 162);
    assert_eq!(batches.len(), 3, "162 ops in txns of at most 64");
    for b in &batches {
        assert!(b.len() <= MAX_TXN_OPS, "{} ops", b.len());
    }
    assert!(batches[0][0].get("Node").is_some());
    assert_eq!(
        batches[0][1].pointer("/Check/Check/CheckID"),
        Some(&json!(NODE_CHECK_ID))
    );
    assert!(
        batches
            .iter()
            .flatten()
            .skip(2)
            .all(|o| o.get("Node").is_none() && o.get("Check").is_none())
    );
    // Order is kept: the deletes come last.
    assert_eq!(
        batches
            .last()
            .and_then(|b| b.last())
            .and_then(|o| o.pointer("/Service/Service/ID")),
        Some(&json!("old-9"))
    );
    assert!(c.txn_batches(&[], true).expect("empty").is_empty());
}

#[test]
fn large_records_are_batched_by_size_too() {
    let c = consul();
    let mut i = inst("10.0.0.1", &[]);
    let big = "x".repeat(500);
    for k in 0..60 {
        std::sync::Arc::make_mut(&mut i.meta).insert(format!("k{k}"), big.clone());
    }
    let instances: Vec<Instance> = (0..40)
        .map(|n| Instance {
            address: format!("10.0.1.{}", n + 1).parse().expect("ip"),
            ..i.clone()
        })
        .collect();
    let ops: Vec<Op> = c
        .render(&instances)
        .into_iter()
        .map(|(key, record)| Op::Put { key, record })
        .collect();
    let batches = c.txn_batches(&ops, false).expect("valid");
    assert!(batches.len() > 2, "{} batches", batches.len());
    for b in &batches {
        let bytes: usize = b.iter().map(|o| o.to_string().len()).sum();
        assert!(bytes <= MAX_TXN_BYTES, "{bytes} bytes");
    }
}

#[test]
fn txn_errors_name_the_operation() {
    let ops = vec![
        json!({"Service": {"Verb": "set", "Node": "n", "Service": {"ID": "s1"}}}),
        json!({"Check": {"Verb": "set", "Check": {"CheckID": "s1:ready", "ServiceID": "s1"}}}),
    ];
    let body = br#"{"Results":null,"Errors":[{"OpIndex":0,"What":"Missing node registration"},{"OpIndex":1,"What":"Missing service registration"}]}"#;
    let errs = txn_errors(body, &ops).expect("errors");
    let seen: Vec<(&str, &str, Option<&str>)> = errs
        .iter()
        .map(|e| (e.op.as_str(), e.what.as_str(), e.key.as_deref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (
                "op 0 (service set s1)",
                "Missing node registration",
                Some("s1")
            ),
            (
                "op 1 (check set s1:ready)",
                "Missing service registration",
                Some("s1")
            ),
        ]
    );
    assert!(txn_errors(b"Permission denied", &ops).is_none());
}

#[test]
fn answers_that_refuse_the_request_are_refusals_and_an_unknown_token_is_not() {
    use super::txn::refusal_or;
    use reqwest::StatusCode;
    let other = || BackendError::Unauthorized("HTTP 403".into());
    for (status, body, refused) in [
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "Request body(10636 bytes) too large",
            true,
        ),
        (StatusCode::BAD_REQUEST, "Invalid service meta", true),
        (
            StatusCode::FORBIDDEN,
            "Permission denied: token lacks 'service:write' on \"x\"",
            true,
        ),
        (StatusCode::FORBIDDEN, "ACL not found", false),
        (StatusCode::INTERNAL_SERVER_ERROR, "rpc error", false),
    ] {
        let e = refusal_or(status, body.as_bytes(), other());
        assert_eq!(e.is_refusal(), refused, "{status} {body}: {e:?}");
    }
}

#[test]
fn blocking_query_index_follows_consuls_rules() {
    // First answer, then a change: block from the new index.
    assert_eq!(next_index(0, Some(12)), (12, false));
    assert_eq!(next_index(12, Some(15)), (15, false));
    // No change (the wait ran out): block again from the same index.
    assert_eq!(next_index(15, Some(15)), (15, false));
    // Backwards (a catalog that lost its state): start again from 0, at once.
    assert_eq!(next_index(15, Some(3)), (0, false));
    // Missing or zero: cannot block, so pause instead of spinning.
    assert_eq!(next_index(15, None), (0, true));
    assert_eq!(next_index(0, Some(0)), (0, true));
}

#[test]
fn import_keeps_usable_entries_and_says_why_it_skips_the_others() {
    let entry = |node: &str, node_addr: &str, id: &str, addr: &str, port: Value, meta: Value| {
        json!({"Node": {"Node": node, "Address": node_addr},
               "Service": {"ID": id, "Service": "db", "Address": addr, "Port": port,
                           "Meta": meta},
               "Checks": []})
    };
    let entries = json!([
        entry("n1", "192.0.2.1", "db-2", "10.0.0.2", json!(5432), Value::Null),
        entry("n1", "192.0.2.1", "db-1", "", json!(5432), json!({})),
        entry("n2", "192.0.2.2", "db-1", "fd00::1", json!(5433), json!({})),
        entry("n1", "192.0.2.1", "db-host", "db.example.", json!(1), json!({})),
        entry("n1", "192.0.2.1", "ours", "10.0.0.9", json!(1),
              json!({"catalog-bridge-owner": "c1"})),
        entry("n1", "192.0.2.1", "theirs", "10.0.0.8", json!(1),
              json!({"catalog-bridge-owner": "c2"})),
        entry("n1", "192.0.2.1", "no-port", "10.0.0.7", json!(0), json!({})),
        entry("n1", "192.0.2.1", "big-port", "10.0.0.7", json!(70000), json!({})),
        entry("n1", "192.0.2.1", "bad-addr", "not an address", json!(1), json!({})),
        entry("n3", "", "no-addr", "", json!(1), json!({})),
        entry("n1", "192.0.2.1", "ours-broken", "", json!(0),
              json!({"catalog-bridge-owner": "c1"})),
        {"Node": {"Node": "n1"}},
    ]);
    let (instances, skipped) = import_entries("db", "c1", &entries).expect("a list");
    let ext = |address: &str, port: u16, id: &str| External {
        address: address.into(),
        port,
        id: id.into(),
    };
    assert_eq!(
        instances,
        [
            ext("10.0.0.2", 5432, "db-2"),
            ext("10.0.0.8", 1, "theirs"),
            ext("192.0.2.1", 5432, "n1/db-1"),
            ext("db.example", 1, "db-host"),
            ext("fd00::1", 5433, "n2/db-1"),
        ]
    );
    let skipped_ids: Vec<&str> = skipped.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        skipped_ids,
        ["bad-addr", "big-port", "n1/entry-11", "no-addr", "no-port"]
    );
    assert!(skipped[0].1.contains("not an address"), "{skipped:?}");
    assert!(skipped[3].1.contains("no address"), "{skipped:?}");

    assert_eq!(
        import_entries("db", "c1", &Value::Null).expect("empty"),
        (vec![], vec![])
    );
    assert!(matches!(
        import_entries("db", "c1", &json!({"x": 1})),
        Err(BackendError::Protocol(_))
    ));
}

#[test]
fn an_entry_passes_when_every_check_passes_and_the_others_are_failing_not_gone() {
    let entry = |id: &str, statuses: &[&str]| {
        json!({"Node": {"Node": "n1", "Address": "192.0.2.1"},
               "Service": {"ID": id, "Service": "db", "Address": "10.0.0.1", "Port": 1},
               "Checks": statuses.iter().map(|s| json!({"Status": s})).collect::<Vec<_>>()})
    };
    let entries = json!([
        entry("up", &["passing", "passing"]),
        entry("no-checks", &[]),
        entry("warning", &["passing", "warning"]),
        entry("node-down", &["critical", "passing"]),
    ]);
    let (passing, failing) = split_by_health("db", &entries).expect("a list");
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["Service"]["ID"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(ids(&passing), ["up", "no-checks"]);
    assert_eq!(ids(&failing), ["warning", "node-down"]);
    let (p, f) = split_by_health("db", &Value::Null).expect("empty");
    assert_eq!((p, f), (json!([]), json!([])));
}

#[tokio::test]
async fn a_watch_of_an_unreachable_consul_reports_it_and_ends_with_its_receivers() {
    let c = Consul::new(ConsulConfig {
        addresses: vec!["http://127.0.0.1:1".into()],
        node_name: "n".into(),
        owner: "o".into(),
        ..Default::default()
    })
    .expect("valid config");
    let (tx, mut rx) = tokio::sync::watch::channel(ImportSnapshot::default());
    let task = tokio::spawn(async move { c.watch_service("db", tx).await });
    let snap = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.error.is_some()))
        .await
        .expect("an error in time")
        .expect("the watch runs")
        .clone();
    assert!(!snap.synced && snap.instances.is_empty());
    match snap.error {
        Some(BackendError::Unreachable(m)) => {
            assert!(m.contains("http://127.0.0.1:1") && m.contains("db"), "{m}")
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    drop(rx);
    let ended = tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the watch ends when its receivers are gone")
        .expect("no panic");
    assert_eq!(ended, Ok(()));
}

#[test]
fn lookup_formats_addresses_as_clients_dial_them() {
    let entries = json!([
        {"Node": {"Address": "192.0.2.1"}, "Service": {"Address": "10.0.0.2", "Port": 80}},
        {"Node": {"Address": "192.0.2.1"}, "Service": {"Address": "", "Port": 81}},
        {"Node": {"Address": "192.0.2.1"}, "Service": {"Address": "fd00::1", "Port": 82}},
        {"Node": {"Address": "192.0.2.1"}, "Service": {"Address": "db.example", "Port": 83}},
    ]);
    assert_eq!(
        health_addresses("s", &entries).expect("valid"),
        [
            "10.0.0.2:80",
            "192.0.2.1:81",
            "[fd00::1]:82",
            "db.example:83"
        ]
    );
    assert!(health_addresses("s", &json!([{"Service": {"Port": 1}}])).is_err());
    assert!(
        health_addresses("s", &Value::Null)
            .expect("empty")
            .is_empty()
    );
}
