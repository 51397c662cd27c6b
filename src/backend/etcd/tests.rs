use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::client::{Kind, classify_status};
use super::layout::{
    coredns_host_port, naming_addr, parse_coredns, parse_naming, parse_plain, prefix_end,
    record_of, record_value,
};
use super::*;
use crate::model::Origin;
use crate::model::address::host_port;

fn inst(name: &str, ns: &str, ip: &str, port: u16) -> Instance {
    Instance {
        name: name.into(),
        address: ip.parse().expect("test ip"),
        port,
        origin: Origin {
            namespace: ns.into(),
            service: "api-x".into(),
        }
        .into(),
        tags: vec![].into(),
        meta: Default::default(),
    }
}

fn cfg(layout: EtcdLayout) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec!["127.0.0.1:2379".into()],
        layout,
        owner: "c1".into(),
        catalog: "etcd-main".into(),
        ..Default::default()
    }
}

fn etcd(layout: EtcdLayout) -> Etcd {
    Etcd::new(cfg(layout)).expect("valid config")
}

#[test]
fn config_is_checked_without_contacting_anything() {
    let ok = cfg(EtcdLayout::Plain);
    let bad = |c: EtcdConfig| Etcd::new(c).is_err();
    assert!(Etcd::new(ok.clone()).is_ok());
    for endpoints in [
        vec![],
        vec!["etcd".to_string()],
        vec!["etcd:x".to_string()],
        vec!["ftp://etcd:2379".to_string()],
        vec!["http://etcd:2379/path".to_string()],
        vec!["::1:2379".to_string()],
        vec![
            "https://etcd-0:2379".to_string(),
            "http://etcd-1:2379".to_string(),
        ],
    ] {
        assert!(
            bad(EtcdConfig {
                endpoints: endpoints.clone(),
                ..ok.clone()
            }),
            "{endpoints:?}"
        );
    }
    for endpoints in [
        vec!["http://etcd-0:2379".to_string(), "[::1]:2379".to_string()],
        vec!["etcd.example:2379/".to_string()],
        // TLS checked against the system's roots.
        vec!["https://etcd:2379".to_string(), "etcd-1:2379".to_string()],
    ] {
        assert!(!bad(EtcdConfig {
            endpoints,
            ..ok.clone()
        }));
    }
    assert!(bad(EtcdConfig {
        owner: "a/b".into(),
        ..ok.clone()
    }));
    assert!(bad(EtcdConfig {
        insecure_skip_verify: true,
        ..ok.clone()
    }));
    assert!(bad(EtcdConfig {
        ca_pem: Some(b"not pem".to_vec()),
        ..ok.clone()
    }));
    let cert = ClientCert {
        cert_pem: b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec(),
        key_pem: b"-----BEGIN PRIVATE KEY-----\nsecret-key\n-----END PRIVATE KEY-----\n".to_vec(),
    };
    assert!(
        bad(EtcdConfig {
            client_cert: Some(cert.clone()),
            ..ok.clone()
        }),
        "a client certificate without the CA"
    );
    assert!(bad(EtcdConfig {
        ca_pem: Some(cert.cert_pem.clone()),
        client_cert: Some(ClientCert {
            key_pem: b"not pem".to_vec(),
            ..cert.clone()
        }),
        ..ok.clone()
    }));
    assert!(
        !format!("{:?}", cert).contains("secret-key"),
        "the key is never printed"
    );
    assert!(bad(EtcdConfig {
        lease_ttl: Duration::ZERO,
        ..ok.clone()
    }));
    assert!(bad(EtcdConfig {
        zone: Some("Bad_Zone.local".into()),
        layout: EtcdLayout::Coredns,
        ..ok.clone()
    }));
    let dbg = format!(
        "{:?}",
        EtcdConfig {
            password: Some("secret-pw".into()),
            ..ok
        }
    );
    assert!(!dbg.contains("secret-pw"), "{dbg}");
}

#[test]
fn plain_keys_and_values_are_host_port() {
    let e = etcd(EtcdLayout::Plain);
    let recs = e.render(&[
        inst("api_x", "shop", "10.0.0.1", 8080),
        inst("api_x", "shop", "fd00::1", 8080),
    ]);
    assert_eq!(
        recs,
        BTreeMap::from([
            (
                "/services/api_x/providers/10.0.0.1:8080".to_string(),
                json!({"value": "10.0.0.1:8080"})
            ),
            (
                "/services/api_x/providers/[fd00::1]:8080".to_string(),
                json!({"value": "[fd00::1]:8080"})
            ),
        ])
    );
    assert_eq!(e.prefix(), "/services/");
    assert_eq!(e.marker_key(), "/catalog-bridge.io/leases/c1/etcd-main");
    assert_eq!(
        e.describe(),
        "etcd 127.0.0.1:2379 layout plain prefix /services/"
    );
    let e = Etcd::new(EtcdConfig {
        base_path: Some("/ep2016/".into()),
        ..cfg(EtcdLayout::Plain)
    })
    .expect("valid");
    let (key, _) = e.entry(&inst("api_x", "shop", "10.0.0.1", 80));
    assert_eq!(key, "/ep2016/api_x/providers/10.0.0.1:80");
}

#[test]
fn naming_values_are_endpoint_manager_updates() {
    let e = etcd(EtcdLayout::Naming);
    let mut i = inst("api_x", "shop", "10.0.0.1", 8080);
    let (key, value) = e.entry(&i);
    assert_eq!(key, "api_x/10.0.0.1:8080", "no leading slash");
    assert_eq!(
        value,
        r#"{"Op":0,"Addr":"10.0.0.1:8080","Metadata":{"owner":"c1","namespace":"shop","service":"api-x"}}"#
    );
    i.tags = vec!["v2".into()].into();
    std::sync::Arc::make_mut(&mut i.meta).insert("version".into(), "2".into());
    let (_, value) = e.entry(&i);
    let v: Value = serde_json::from_str(&value).expect("json");
    assert_eq!(v["Op"], json!(0));
    assert!(v["Op"].is_u64(), "Op is a number");
    assert_eq!(v["Metadata"]["tags"], json!(["v2"]));
    assert_eq!(v["Metadata"]["meta"]["version"], "2");
    assert_eq!(
        naming_addr(value.as_bytes()).as_deref(),
        Some("10.0.0.1:8080")
    );
    assert_eq!(naming_addr(br#"{"Op":1,"Addr":"10.0.0.1:1"}"#), None);
    assert_eq!(naming_addr(b"10.0.0.1:1"), None);
    assert_eq!(e.prefix(), "");
    let e = Etcd::new(EtcdConfig {
        base_path: Some("/grpc".into()),
        ..cfg(EtcdLayout::Naming)
    })
    .expect("valid");
    assert_eq!(e.entry(&i).0, "/grpc/api_x/10.0.0.1:8080");
}

#[test]
fn coredns_keys_are_lower_case_dns_paths() {
    let e = Etcd::new(EtcdConfig {
        zone: Some("Bridge.Example.".into()),
        ..cfg(EtcdLayout::Coredns)
    })
    .expect("valid");
    let i = inst("API_x", "Shop", "fd00::1", 8080);
    let (key, value) = e.entry(&i);
    let id = coredns_id("c1", &i);
    assert!(id.starts_with("fd00--1-8080-"), "{id}");
    assert_eq!(key, format!("/skydns/example/bridge/shop/api-x/{id}"));
    assert_eq!(key, key.to_ascii_lowercase());
    assert_eq!(value, r#"{"host":"fd00::1","port":8080,"ttl":30}"#);
    assert_eq!(
        coredns_host_port(value.as_bytes()).as_deref(),
        Some("[fd00::1]:8080")
    );
    assert_eq!(coredns_host_port(br#"{"port":1}"#), None);
    // The id is deterministic, and differs per owner and per origin.
    assert_eq!(id, coredns_id("c1", &i.clone()));
    assert_ne!(id, coredns_id("c2", &i));
    assert_ne!(
        id,
        coredns_id("c1", &inst("API_x", "other", "fd00::1", 8080))
    );
    assert_eq!(e.prefix(), "/skydns/example/bridge/");
    // Default zone.
    let (key, _) = etcd(EtcdLayout::Coredns).entry(&inst("api_x", "shop", "10.0.0.1", 80));
    assert!(
        key.starts_with("/skydns/local/bridge/shop/api-x/10-0-0-1-80-"),
        "{key}"
    );
}

#[test]
fn names_become_dns_labels() {
    assert_eq!(dns_label("api_x"), "api-x");
    assert_eq!(dns_label("API.v2"), "api-v2");
    assert_eq!(dns_label("-x-"), "x");
    assert_eq!(dns_label(&"a".repeat(80)).len(), 63);
    let odd = dns_label("___");
    assert!(odd.starts_with('x') && odd.len() == 9, "{odd}");
    assert_eq!(odd, dns_label("___"));
}

#[test]
fn coredns_lookups_take_a_name_or_a_dns_name() {
    let e = etcd(EtcdLayout::Coredns);
    let l = &e.inner.layout;
    assert_eq!(
        l.lookup_prefix("api_x"),
        (
            "/skydns/local/bridge/".to_string(),
            Some("api-x".to_string())
        )
    );
    for n in ["api_x.shop", "api-x.shop.bridge.local.", "API-X.Shop"] {
        assert_eq!(
            l.lookup_prefix(n),
            ("/skydns/local/bridge/shop/api-x/".to_string(), None),
            "{n}"
        );
    }
    let p = etcd(EtcdLayout::Plain);
    assert_eq!(
        p.inner.layout.lookup_prefix("api_x").0,
        "/services/api_x/providers/"
    );
    let n = etcd(EtcdLayout::Naming);
    assert_eq!(n.inner.layout.lookup_prefix("api_x").0, "api_x/");
}

#[test]
fn records_compare_equal_only_for_the_same_value_and_lease() {
    let e = etcd(EtcdLayout::Plain);
    let i = inst("api_x", "shop", "10.0.0.1", 8080);
    let rendered = e.render(std::slice::from_ref(&i));
    let (key, value) = e.entry(&i);
    let read = BTreeMap::from([(key.clone(), record_of(&value, false))]);
    assert!(crate::export::plan::plan(&rendered, &read).is_empty());
    let moved = BTreeMap::from([(key.clone(), record_of(&value, true))]);
    let p = crate::export::plan::plan(&rendered, &moved);
    assert_eq!((p.creates, p.updates, p.deletes), (0, 1, 0));
    assert_eq!(
        record_value(&key, &rendered[&key]).expect("value"),
        "10.0.0.1:8080"
    );
    assert!(record_value("k", &json!({"v": 1})).is_err());
}

fn puts(e: &Etcd, n: usize) -> Vec<Op> {
    let instances: Vec<Instance> = (0..n)
        .map(|i| {
            inst(
                "api_x",
                "shop",
                &format!("10.1.{}.{}", i / 250, i % 250 + 1),
                80,
            )
        })
        .collect();
    e.render(&instances)
        .into_iter()
        .map(|(key, record)| Op::Put { key, record })
        .collect()
}

#[test]
fn batches_stay_within_128_operations_guards_included() {
    let e = etcd(EtcdLayout::Plain);
    let mut ops = puts(&e, 300);
    ops.extend((0..10).map(|i| Op::Delete {
        key: format!("/services/old/providers/10.9.9.{i}:1"),
    }));
    let b = batches(&ops);
    assert_eq!(
        b.iter().map(|b| b.len()).collect::<Vec<_>>(),
        [125, 125, 60]
    );
    assert_eq!(b.concat(), ops);
    assert!(batches(&[]).is_empty());
    for batch in &b {
        assert!(e.txn(batch, 1, Some(2)).is_ok());
    }
    // Large values split by size too; one huge op still goes alone.
    let big = |n: usize| Op::Put {
        key: format!("/services/big/providers/{n}"),
        record: json!({"value": "x".repeat(300 * 1024)}),
    };
    let ops: Vec<Op> = (0..4).map(big).collect();
    assert_eq!(batches(&ops).len(), 4);
    let huge = [Op::Put {
        key: "/services/huge/providers/1".into(),
        record: json!({"value": "x".repeat(2 * MAX_TXN_BYTES)}),
    }];
    assert_eq!(batches(&huge).len(), 1);
}

#[test]
fn writes_outside_the_prefix_or_without_a_value_are_refused() {
    let e = etcd(EtcdLayout::Plain);
    let outside = [Op::Delete {
        key: "/elsewhere/x".into(),
    }];
    assert!(matches!(
        e.txn(&outside, 1, None),
        Err(BackendError::Protocol(_))
    ));
    let marker = [Op::Delete {
        key: e.marker_key().to_string(),
    }];
    assert!(e.txn(&marker, 1, None).is_err());
    let no_value = [Op::Put {
        key: "/services/a/providers/1".into(),
        record: json!({"Service": {}}),
    }];
    assert!(matches!(
        e.txn(&no_value, 1, None),
        Err(BackendError::Protocol(_))
    ));
    // naming without a base path: the marker is inside "every key" and still refused.
    let n = etcd(EtcdLayout::Naming);
    let marker = [Op::Delete {
        key: n.marker_key().to_string(),
    }];
    assert!(n.txn(&marker, 1, None).is_err());
}

#[test]
fn errors_are_classified() {
    assert_eq!(
        classify_status(14, "tcp connect error: Connection refused (os error 111)"),
        Kind::Transport
    );
    assert_eq!(
        classify_status(14, "etcdserver: no leader"),
        Kind::Transport
    );
    assert_eq!(classify_status(4, "deadline"), Kind::Transport);
    assert_eq!(
        classify_status(5, "etcdserver: requested lease not found"),
        Kind::LeaseGone
    );
    assert_eq!(
        classify_status(
            3,
            "etcdserver: authentication failed, invalid user ID or password"
        ),
        Kind::Unauthorized
    );
    assert_eq!(
        classify_status(3, "etcdserver: user name is empty"),
        Kind::Unauthorized
    );
    assert_eq!(
        classify_status(7, "etcdserver: permission denied"),
        Kind::Unauthorized
    );
    assert_eq!(
        classify_status(3, "etcdserver: too many operations in txn request"),
        Kind::Rejected
    );
    assert_eq!(
        classify_status(2, "transport error: broken pipe"),
        Kind::Transport
    );
    assert_eq!(classify_status(2, "something odd"), Kind::Rejected);
}

#[test]
fn prefix_ends_and_addresses() {
    assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
    assert_eq!(prefix_end(b""), vec![0]);
    assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
    assert_eq!(host_port("10.0.0.1", 80), "10.0.0.1:80");
    assert_eq!(host_port("fd00::2", 80), "[fd00::2]:80");
    assert_eq!(host_port("db.example", 80), "db.example:80");
}

#[test]
fn import_values_parse_per_layout() {
    let ok = |h: &str, p: u16| Ok((h.to_string(), p));
    assert_eq!(parse_plain(b"10.0.0.8:3306"), ok("10.0.0.8", 3306));
    assert_eq!(parse_plain(b" [fd00::8]:3306\n"), ok("fd00::8", 3306));
    assert_eq!(parse_plain(b"db-1.example:5432"), ok("db-1.example", 5432));
    for bad in [
        &b""[..],
        b"garbage",
        b"10.0.0.8",
        b"10.0.0.8:0",
        b"10.0.0.8:70000",
        b"fd00::8:3306",
        b"[nope]:1",
        b"10.0.0.300:1",
        b"a b:1",
        b"\xff:1",
    ] {
        assert!(
            parse_plain(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let (p, tagged) = parse_naming(br#"{"Op":0,"Addr":"10.0.0.9:3306"}"#, "c1");
    assert_eq!((p, tagged), (Some(ok("10.0.0.9", 3306)), false));
    let (p, _) = parse_naming(br#"{"Addr":"10.0.0.9:3306"}"#, "c1");
    assert_eq!(p, Some(ok("10.0.0.9", 3306)), "Op absent is Add");
    assert_eq!(parse_naming(br#"{"Op":1,"Addr":"x:1"}"#, "c1").0, None);
    for bad in [
        &b"garbage"[..],
        b"[1]",
        br#"{"Op":"0","Addr":"10.0.0.9:1"}"#,
        br#"{"Op":2,"Addr":"10.0.0.9:1"}"#,
        br#"{"Op":0}"#,
        br#"{"Op":0,"Addr":"10.0.0.9"}"#,
    ] {
        assert!(
            matches!(parse_naming(bad, "c1").0, Some(Err(_))),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let e = etcd(EtcdLayout::Naming);
    let (_, value) = e.entry(&inst("api_x", "shop", "10.0.0.1", 80));
    assert!(parse_naming(value.as_bytes(), "c1").1, "our own");
    assert!(!parse_naming(value.as_bytes(), "c2").1);
    assert_eq!(
        parse_coredns(br#"{"host":"fd00::1","port":80,"ttl":30}"#),
        ok("fd00::1", 80)
    );
    assert_eq!(
        parse_coredns(br#"{"host":"db.example.","port":80}"#),
        ok("db.example", 80)
    );
    for bad in [
        &b"x"[..],
        br#"{"port":80}"#,
        br#"{"host":"10.0.0.1"}"#,
        br#"{"host":"10.0.0.1","port":0}"#,
        br#"{"host":"10.0.0.1","port":"80"}"#,
    ] {
        assert!(
            parse_coredns(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[tokio::test]
async fn a_client_without_owner_only_looks_up_and_nothing_connects_early() {
    let e = Etcd::new(EtcdConfig {
        endpoints: vec!["127.0.0.1:1".into()],
        ..Default::default()
    })
    .expect("a lookup-only client");
    assert!(matches!(
        e.read_owned().await,
        Err(BackendError::Rejected(_))
    ));
    assert_eq!(e.apply(&[]).await, Ok(0));
    assert!(e.lease_id().await.is_none());
    match e.lookup("x").await {
        Err(BackendError::Unreachable(m)) => assert!(m.contains("127.0.0.1:1"), "{m}"),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(e.invalidations().is_some());
}

#[test]
fn a_transaction_refused_for_its_keys_or_size_is_a_refusal_and_bad_credentials_are_not() {
    use super::write::refusal;
    for (e, refused) in [
        (
            BackendError::Unauthorized("txn as \"bridge\": etcdserver: permission denied".into()),
            true,
        ),
        (
            BackendError::Rejected("txn: etcdserver: request is too large".into()),
            true,
        ),
        (
            BackendError::Rejected("txn: etcdserver: too many operations in txn request".into()),
            true,
        ),
        (
            BackendError::Unauthorized("etcdserver: authentication failed".into()),
            false,
        ),
        (
            BackendError::Unreachable("connection refused".into()),
            false,
        ),
    ] {
        assert_eq!(refusal(e.clone()).is_refusal(), refused, "{e:?}");
    }
}
