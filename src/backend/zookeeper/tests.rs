//! The backend's unit tests: what needs no ZooKeeper (tests/zookeeper_*.rs use a real one).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use super::batch::{Batch, Write, batches};
use super::layout::{
    Upstream, ancestors, curator_address, parse_connect, parse_curator, parse_provider,
    plain_owner_is,
};
use super::relay::{ConnectRequest, Handshake, parse_connect_response, parse_srvr};
use super::shards::{name_of, path_cost, sessions_needed, shard_of};
use super::*;
use crate::model::Origin;

fn zk(layout: ZooKeeperLayout) -> ZooKeeper {
    ZooKeeper::new(ZooKeeperConfig {
        connect: "127.0.0.1:2181".into(),
        layout,
        owner: "c1".into(),
        ..Default::default()
    })
    .expect("valid config")
}

fn inst(ip: &str, port: u16) -> Instance {
    Instance {
        name: "api_x".into(),
        address: ip.parse().expect("test ip"),
        port,
        origin: Origin {
            namespace: "shop".into(),
            service: "api-x".into(),
        }
        .into(),
        tags: vec!["t".into()].into(),
        meta: Default::default(),
    }
}

#[test]
fn connect_strings_hosts_and_chroot() {
    let up = |h: &str, p| Upstream {
        host: h.into(),
        port: p,
    };
    assert_eq!(
        parse_connect("zk1:2181,zk2:2182/app/x").expect("valid"),
        (vec![up("zk1", 2181), up("zk2", 2182)], "/app/x".into())
    );
    assert_eq!(
        parse_connect("[fd00::1]:2181,zk2,tcp://zk3:1/").expect("valid"),
        (
            vec![up("fd00::1", 2181), up("zk2", 2181), up("zk3", 1)],
            "".into()
        )
    );
    assert_eq!(
        parse_connect("tcp://zk3:1/c").expect("valid"),
        (vec![up("zk3", 1)], "/c".into())
    );
    assert_eq!(up("fd00::1", 2181).to_string(), "[fd00::1]:2181");
    for bad in [
        "",
        "zk:0",
        "zk:x",
        "zk1,,zk2",
        "tcp+tls://zk:2181",
        "zk/a//b",
        "[fd00::1",
    ] {
        assert!(parse_connect(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn config_is_checked_without_contacting_anything() {
    let ok = ZooKeeperConfig {
        connect: "127.0.0.1:1/chroot".into(),
        owner: "o".into(),
        ..Default::default()
    };
    let z = ZooKeeper::new(ok.clone()).expect("a dead address is fine");
    assert_eq!(z.root(), "/chroot/services");
    assert_eq!(z.describe(), "zookeeper 127.0.0.1:1/chroot plain /services");
    let bad = |cfg: ZooKeeperConfig| ZooKeeper::new(cfg).is_err();
    assert!(bad(ZooKeeperConfig {
        base_path: Some("services".into()),
        ..ok.clone()
    }));
    assert!(bad(ZooKeeperConfig {
        base_path: Some("/a/".into()),
        ..ok.clone()
    }));
    assert!(bad(ZooKeeperConfig {
        connect: "127.0.0.1:1".into(),
        base_path: Some("/zookeeper/x".into()),
        ..ok.clone()
    }));
    assert!(bad(ZooKeeperConfig {
        digest: Some(("a:b".into(), "p".into())),
        ..ok.clone()
    }));
    assert!(bad(ZooKeeperConfig {
        owner: "o ".into(),
        ..ok.clone()
    }));
    let dbg = format!(
        "{:?}",
        ZooKeeperConfig {
            digest: Some(("user".into(), "secret-pass".into())),
            ..ok
        }
    );
    assert!(
        !dbg.contains("secret-pass") && dbg.contains("user"),
        "{dbg}"
    );
    let s = StoredSession::single(SessionKey {
        id: 0x1234,
        password: b"secret".to_vec(),
        timeout_ms: 4000,
    });
    let dbg = format!("{s:?}");
    assert!(dbg.contains("0x1234") && !dbg.contains("115"), "{dbg}");
}

#[tokio::test]
async fn a_client_without_owner_only_looks_up() {
    let z = ZooKeeper::new(ZooKeeperConfig {
        connect: "127.0.0.1:1".into(),
        session_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .expect("a lookup-only client");
    assert!(matches!(
        z.read_owned().await,
        Err(BackendError::Rejected(_))
    ));
    let ops = [Op::Delete {
        key: "api_x/providers/10.0.0.1:1".into(),
    }];
    assert!(matches!(
        z.apply(&ops).await,
        Err(BackendError::Rejected(_))
    ));
    assert_eq!(z.apply(&[]).await, Ok(0));
    match z.lookup("x").await {
        Err(BackendError::Unreachable(m)) => {
            assert!(
                m.contains("127.0.0.1:1") && m.contains("connection refused"),
                "{m}"
            )
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
    assert!(matches!(
        z.lookup("a/b").await,
        Err(BackendError::Rejected(_))
    ));
}

#[test]
fn plain_records_read_back_equal() {
    let z = zk(ZooKeeperLayout::Plain);
    let a = inst("10.0.0.1", 8080);
    let b = inst("fd00::1", 8080);
    let recs = z.render(&[a, b]);
    let keys: Vec<&String> = recs.keys().collect();
    assert_eq!(
        keys,
        [
            "api_x/providers/10.0.0.1:8080",
            "api_x/providers/[fd00::1]:8080"
        ]
    );
    let r = &recs["api_x/providers/10.0.0.1:8080"];
    assert_eq!(
        r,
        &json!({"data": {"owner": "c1", "namespace": "shop", "service": "api-x"}})
    );
    let bytes = z
        .data_of("api_x/providers/10.0.0.1:8080", r, 5)
        .expect("valid");
    assert_eq!(z.record_from_data(&bytes), (r.clone(), None));
    assert_eq!(
        z.record_from_data(b"10.0.0.1:8080").0,
        json!({"raw": "10.0.0.1:8080"})
    );
    assert!(z.check_key("api_x/providers/10.0.0.1:8080").is_ok());
    for bad in [
        "api_x/10.0.0.1:8080",
        "api_x/x/1",
        "a/providers/b/c",
        "../providers/x",
    ] {
        assert!(z.check_key(bad).is_err(), "{bad}");
    }
    // Names that cannot be znode names are not rendered.
    let mut odd = inst("10.0.0.2", 1);
    odd.name = "a/b".into();
    assert!(z.render(&[odd]).is_empty());
}

#[test]
fn curator_records_are_service_instances_that_read_back_equal() {
    let z = zk(ZooKeeperLayout::Curator);
    let a = inst("10.0.0.1", 8080);
    let id = a.stable_id();
    let recs = z.render(std::slice::from_ref(&a));
    let key = format!("api_x/{id}");
    let r = &recs[&key];
    assert_eq!(r["data"]["id"], json!(id));
    assert_eq!(r["data"]["serviceType"], "DYNAMIC");
    assert_eq!(r["data"]["payload"], Value::Null);
    assert!(r["data"].get("enabled").is_none());
    assert!(r["data"].get("registrationTimeUTC").is_none());
    assert_eq!(
        r["data"]["uriSpec"]["parts"][0],
        json!({"value": "scheme", "variable": true})
    );

    let bytes = z.data_of(&key, r, 1_700_000_000_123).expect("valid");
    let written: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(written["registrationTimeUTC"], json!(1_700_000_000_123_u64));
    assert_eq!(written["address"], "10.0.0.1");
    assert_eq!(written["port"], 8080);
    assert_eq!(written["sslPort"], Value::Null);
    assert_eq!(
        z.record_from_data(&bytes),
        (r.clone(), Some(1_700_000_000_123))
    );
    assert_eq!(curator_address(&bytes).as_deref(), Some("10.0.0.1:8080"));

    // IPv6: no uriSpec (Curator would build an invalid URI); lookups bracket it.
    let v6 = inst("fd00::2", 9);
    let (k6, r6) = z.entry(&v6).expect("valid");
    assert_eq!(r6["data"]["uriSpec"], Value::Null);
    let b6 = z.data_of(&k6, &r6, 1).expect("valid");
    assert_eq!(curator_address(&b6).as_deref(), Some("[fd00::2]:9"));

    // A record whose id is not its key is refused.
    assert!(z.data_of("api_x/other", r, 1).is_err());
    assert!(z.data_of(&key, &json!({"name": "x"}), 1).is_err());
    // An invalid time stays in the record, so it differs and gets rewritten.
    let mut odd = written.clone();
    odd["registrationTimeUTC"] = json!("yesterday");
    let (rec, t) = z.record_from_data(odd.to_string().as_bytes());
    assert!(t.is_none() && &rec != r);
    assert!(curator_address(br#"{"address":"h","port":1,"enabled":false}"#).is_none());
    assert!(curator_address(b"garbage").is_none());
}

#[test]
fn import_parses_provider_names_and_curator_instances() {
    let ok = |h: &str, p| Ok((h.to_string(), p));
    assert_eq!(parse_provider("10.0.0.8:3306"), ok("10.0.0.8", 3306));
    assert_eq!(parse_provider("[fd00::8]:3306"), ok("fd00::8", 3306));
    assert_eq!(
        parse_provider("db-1.example:5432"),
        ok("db-1.example", 5432)
    );
    for bad in [
        "10.0.0.8",
        "fd00::8:3306",
        "[fd00::8]3306",
        "[nope]:1",
        "h:0",
        "h:70000",
        ":80",
        "a b:1",
    ] {
        assert!(parse_provider(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_curator(br#"{"address":"10.0.0.1","port":8080,"sslPort":null}"#),
        Ok(Some(("10.0.0.1".into(), 8080)))
    );
    assert_eq!(
        parse_curator(br#"{"address":"[fd00::1]","port":null,"sslPort":8443}"#),
        Ok(Some(("fd00::1".into(), 8443)))
    );
    assert_eq!(
        parse_curator(br#"{"address":"h","port":1,"enabled":false}"#),
        Ok(None)
    );
    for bad in [
        &b"garbage"[..],
        br#"[1]"#,
        br#"{"port":1}"#,
        br#"{"address":"h"}"#,
        br#"{"address":"h","port":"80"}"#,
        br#"{"address":"h","port":0}"#,
        br#"{"address":"h","port":1,"enabled":"no"}"#,
    ] {
        assert!(
            parse_curator(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(plain_owner_is(br#"{"owner":"c1"}"#, "c1"));
    assert!(!plain_owner_is(br#"{"owner":"c2"}"#, "c1"));
    assert!(!plain_owner_is(b"", "c1"));
    assert!(!plain_owner_is(br#"{"owner":""}"#, ""));
}

#[test]
fn names_and_paths() {
    assert!(name_problem("api_x").is_none());
    assert!(name_problem("[fd00::1]:80").is_none());
    for bad in ["", ".", "..", "a/b", "a\0b", "a\u{1}"] {
        assert!(name_problem(bad).is_some(), "{bad:?}");
    }
    assert_eq!(ancestors("/a/b/c"), ["/a", "/a/b"]);
    assert!(ancestors("/a").is_empty());
    // Lookups answer host:port, IPv6 in brackets.
    let at = |a: &str| curator_address(format!(r#"{{"address":"{a}","port":1}}"#).as_bytes());
    assert_eq!(at("fd00::1").as_deref(), Some("[fd00::1]:1"));
    assert_eq!(at("h").as_deref(), Some("h:1"));
}

fn create(path: &str, bytes: usize) -> Write {
    Write::Create {
        key: path.trim_start_matches('/').into(),
        path: path.into(),
        record: Value::Null,
        data: vec![b'x'; bytes],
        registered: None,
    }
}

#[test]
fn multis_hold_at_most_100_operations_parents_included_once() {
    let writes: Vec<Write> = (0..250)
        .map(|i| create(&format!("/r/services/api_x/providers/10.0.0.{i}:1"), 60))
        .collect();
    let b = batches(&writes, &HashSet::new(), MAX_MULTI_BYTES);
    assert_eq!(b.len(), 3);
    assert_eq!(
        b[0].parents,
        [
            "/r",
            "/r/services",
            "/r/services/api_x",
            "/r/services/api_x/providers"
        ]
    );
    assert_eq!(b[0].range, 0..96);
    assert!(b[1].parents.is_empty() && b[2].parents.is_empty());
    assert_eq!(b[2].range.end, 250);
    // Known parents are not created; deletes need none.
    let known: HashSet<String> = ancestors("/r/services/api_x/providers/x")
        .into_iter()
        .collect();
    let b = batches(&writes[..10], &known, MAX_MULTI_BYTES);
    assert_eq!(
        b,
        [Batch {
            parents: vec![],
            range: 0..10
        }]
    );
    let del = Write::Delete {
        key: "k".into(),
        path: "/r/x/y".into(),
        version: 0,
    };
    assert!(
        batches(&[del], &HashSet::new(), MAX_MULTI_BYTES)[0]
            .parents
            .is_empty()
    );
    // Large data cuts batches by size; an entry larger than the limit goes alone.
    let big: Vec<Write> = (0..10)
        .map(|i| create(&format!("/r/n{i}"), MAX_MULTI_BYTES / 3))
        .collect();
    let b = batches(&big, &known, MAX_MULTI_BYTES);
    assert!(b.len() >= 4, "{b:?}");
    let huge = [create("/r/a", MAX_MULTI_BYTES * 2), create("/r/b", 1)];
    assert_eq!(batches(&huge, &HashSet::new(), MAX_MULTI_BYTES).len(), 2);
    // A small jute.maxbuffer: smaller multis.
    let small = batches(&writes, &HashSet::new(), 4096);
    assert!(small.len() > 3, "{small:?}");
    assert!(
        small.iter().all(|b| b.range.len() <= 4096 / 160),
        "{small:?}"
    );
}

#[test]
fn handshake_frames_are_read_and_rewritten() {
    let req = ConnectRequest {
        protocol_version: 0,
        last_zxid_seen: 0,
        timeout_ms: 4000,
        session_id: 0,
        password: vec![0; 16],
        rest: vec![0],
    };
    let bytes = req.encode();
    assert_eq!(bytes.len(), 45);
    assert_eq!(ConnectRequest::parse(&bytes), Some(req.clone()));
    let mut attached = req.clone();
    attached.session_id = 0x0100_0000_0000_0042;
    attached.password = (1..=16).collect();
    let parsed = ConnectRequest::parse(&attached.encode()).expect("parses");
    assert_eq!(parsed.session_id, 0x0100_0000_0000_0042);
    assert_eq!(parsed.password, (1..=16).collect::<Vec<u8>>());
    assert_eq!(parsed.rest, [0]);
    assert!(ConnectRequest::parse(&bytes[..20]).is_none());

    let mut resp = Vec::new();
    resp.extend_from_slice(&0i32.to_be_bytes());
    resp.extend_from_slice(&4000i32.to_be_bytes());
    resp.extend_from_slice(&7i64.to_be_bytes());
    resp.extend_from_slice(&16i32.to_be_bytes());
    resp.extend_from_slice(&[9; 16]);
    resp.push(0);
    assert_eq!(
        parse_connect_response(&resp),
        Some(Handshake {
            session_id: 7,
            password: vec![9; 16],
            timeout_ms: 4000
        })
    );
    assert!(parse_connect_response(&resp[..10]).is_none());
}

#[test]
fn srvr_answers_give_mode_and_version() {
    let text = "Zookeeper version: 3.8.4-9316c2a7a97e1666d8f4593f34dd6fc36ecc436c, built on 2024-02-12 22:16 UTC\nLatency min/avg/max: 0/0.0/0\nMode: standalone\nNode count: 5\n";
    assert_eq!(
        parse_srvr(text),
        (
            Some("standalone".into()),
            Some("3.8.4-9316c2a7a97e1666d8f4593f34dd6fc36ecc436c".into())
        )
    );
    assert_eq!(
        parse_srvr("srvr is not executed because it is not in the whitelist.\n"),
        (None, None)
    );
}

#[tokio::test]
async fn the_memory_store_keeps_the_sessions() {
    let s = MemorySessionStore::default();
    assert_eq!(s.load().await.expect("load"), None);
    let one = StoredSession::single(key(1));
    s.save(&one).await.expect("save");
    assert_eq!(s.load().await.expect("load"), Some(one.clone()));
    assert_eq!(s.get(), Some(one));
}

fn key(id: i64) -> SessionKey {
    SessionKey {
        id,
        password: vec![1, 2, u8::try_from(id).unwrap_or(0)],
        timeout_ms: 10_000,
    }
}

/// What a version with one session stored is read as shard 0, and shard 0 of several is what
/// such a version reads.
#[test]
fn stored_sessions_read_one_session_as_shard_zero() {
    let old = r#"{"id":4660,"password":[7,8],"timeout_ms":4000}"#;
    let s: StoredSession = serde_json::from_str(old).expect("a stored single session");
    assert_eq!(s.first.id, 4660);
    assert!(s.shards.is_empty());
    assert_eq!(
        serde_json::to_string(&s).expect("json"),
        old,
        "written as before"
    );
    let many = StoredSession {
        first: key(1),
        shards: vec![key(2), key(3), key(4)],
    };
    let text = serde_json::to_string(&many).expect("json");
    let back: StoredSession = serde_json::from_str(&text).expect("parse");
    assert_eq!(back, many);
    assert_eq!(back.all().map(|k| k.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
    let first: SessionKey = serde_json::from_str(&text).expect("read as one session");
    assert_eq!(first, key(1));
    assert_eq!(
        StoredSession::from_slots(&[Some(key(1)), None]),
        None,
        "not stored while a shard has no session"
    );
}

/// A name keeps its shard while the count stays, and stays or moves up by the old count when
/// it doubles; the count doubles only while a session passes the budget and splitting helps.
#[test]
fn names_are_spread_over_sessions_within_the_budget() {
    let names: Vec<String> = (0..200).map(|i| format!("svc-{i}")).collect();
    for n in &names {
        assert_eq!(shard_of(n, 1), 0);
        let s4 = shard_of(n, 4);
        assert_eq!(shard_of(n, 4), s4, "stable");
        assert!(s4 == shard_of(n, 2) || s4 == shard_of(n, 2) + 2);
        assert!(shard_of(n, 8) < 8);
    }
    // FNV-1a 64 of "api_x": the same on every platform and version.
    assert_eq!(0xcfcd_76a4_d35e_a4d0_u64 % 64, 16);
    assert_eq!(shard_of("api_x", 64), 16);
    assert_eq!(name_of("api_x/providers/10.0.0.1:80"), "api_x");
    assert_eq!(
        path_cost("/services", "a/providers/1.2.3.4:5"),
        4 + 9 + 1 + 21
    );
    let per_name: HashMap<&str, usize> = names.iter().map(|n| (n.as_str(), 100)).collect();
    // 20,000 bytes in all.
    assert_eq!(sessions_needed(&per_name, 1, 30_000), 1);
    let needed = sessions_needed(&per_name, 1, 6_000);
    assert!((4..=16).contains(&needed), "{needed}");
    let mut bytes = vec![0; needed];
    for n in &names {
        bytes[shard_of(n, needed)] += 100;
    }
    assert!(bytes.iter().all(|&b| b <= 6_000), "{bytes:?}");
    assert_eq!(
        sessions_needed(&per_name, needed, 6_000),
        needed,
        "never shrinks"
    );
    // One name past the budget alone: more sessions cannot help.
    let one: HashMap<&str, usize> = [("big", 10_000)].into();
    assert_eq!(sessions_needed(&one, 1, 6_000), 1);
    let tiny: HashMap<&str, usize> = names.iter().map(|n| (n.as_str(), 1_000_000)).collect();
    assert_eq!(
        sessions_needed(&tiny, 1, 6_000),
        1,
        "every name too big alone"
    );
    let many: HashMap<&str, usize> = names.iter().map(|n| (n.as_str(), 5_000)).collect();
    assert_eq!(sessions_needed(&many, 1, 6_000), MAX_SESSIONS, "at most");
}
