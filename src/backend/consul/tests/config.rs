//! Configuration checks, a client without owner, and how lookups format addresses.

use super::*;

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
