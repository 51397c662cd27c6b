//! Operations as `/v1/txn` requests: their shape, batches, and errors and refusals.

use super::*;

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
