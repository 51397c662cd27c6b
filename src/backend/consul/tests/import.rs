//! Importing: blocking-query indexes, usable entries, health, and a watch of a Consul that
//! is down.

use super::*;

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
