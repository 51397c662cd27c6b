//! The CRDs: `crds/` is what the binary prints, the real API server accepts them, and it rejects
//! invalid objects at the door (schema, enums, CEL rules).

mod support;

use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde_json::{Value, json};

use support::{CRDS_FILE, install_crds};

#[test]
fn committed_crds_match_the_rust_types() -> Result<()> {
    let generated = catalog_bridge::api::crd::crds_yaml()?;
    let committed =
        std::fs::read_to_string(CRDS_FILE).with_context(|| format!("reading {CRDS_FILE}"))?;
    assert!(
        generated == committed,
        "crds/crds.yaml is out of date with src/crd.rs; regenerate it with `make crds`"
    );
    Ok(())
}

fn api(client: &kube::Client, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("catalog-bridge.io", "v1alpha1", kind);
    let ar = ApiResource::from_gvk(&gvk);
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

async fn create(api: &Api<DynamicObject>, obj: Value) -> Result<(), String> {
    let obj: DynamicObject = serde_json::from_value(obj).map_err(|e| e.to_string())?;
    api.create(&PostParams::default(), &obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_apiserver_accepts_the_crds_and_rejects_invalid_objects() -> Result<()> {
    let env = localenv::Env::builder().kube().start().await?;
    let client = env.kube()?.client().await?;
    install_crds(&client).await?;
    let xcat = api(&client, "ExternalCatalog", None);
    let xreg = api(&client, "ExternalRegistration", Some("default"));

    let catalog = |name: &str, spec: Value| {
        json!({"apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
               "metadata": {"name": name}, "spec": spec})
    };
    let registration = |name: &str, spec: Value| {
        json!({"apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
               "metadata": {"name": name, "namespace": "default"}, "spec": spec})
    };

    // Valid objects of every kind are accepted.
    for (name, spec) in [
        (
            "consul",
            json!({"consul": {"addresses": ["http://127.0.0.1:8500", "https://consul-2:8501"]}}),
        ),
        (
            "etcd",
            json!({"etcd": {"endpoints": ["127.0.0.1:2379"], "layout": "coredns", "zone": "bridge.local"}}),
        ),
        (
            "zk",
            json!({"zookeeper": {"connect": "zk1:2181,zk2:2181/apps", "layout": "curator"}}),
        ),
    ] {
        create(&xcat, catalog(name, spec))
            .await
            .map_err(anyhow::Error::msg)?;
    }
    create(&xreg, registration("api-x", json!({
        "catalogRef": {"name": "consul"}, "direction": "Export",
        "service": {"name": "api-x"}, "port": "http", "externalName": "api_x", "tags": ["v1"],
    }))).await.map_err(anyhow::Error::msg)?;
    create(
        &xreg,
        registration(
            "mysql-x",
            json!({
                "catalogRef": {"name": "zk"}, "direction": "Import", "externalName": "mysql_x",
                "target": {"ports": [{"name": "mysql", "port": 3306}]},
                "import": {"emptyHoldSeconds": 0},
            }),
        ),
    )
    .await
    .map_err(anyhow::Error::msg)?;

    // Invalid ones are refused by the API server, each with a message that says why.
    let bad_catalogs = [
        (
            "two kinds",
            json!({"consul": {"addresses": ["http://a:8500"]}, "etcd": {"endpoints": ["a:2379"]}}),
            "exactly one of",
        ),
        ("no kind", json!({}), "exactly one of"),
        (
            "no addresses",
            json!({"consul": {"addresses": []}}),
            "addresses",
        ),
        (
            "address without scheme",
            json!({"consul": {"addresses": ["consul:8500"]}}),
            "addresses[0]",
        ),
        (
            "unknown layout",
            json!({"etcd": {"endpoints": ["a:2379"], "layout": "flat"}}),
            "layout",
        ),
        (
            "TTL too short",
            json!({"etcd": {"endpoints": ["a:2379"], "leaseTTLSeconds": 1}}),
            "leaseTTLSeconds",
        ),
        (
            "etcd base path with an empty segment",
            json!({"etcd": {"endpoints": ["a:2379"], "basePath": "/services//x"}}),
            "empty segment",
        ),
        (
            "etcd without certificate verification",
            json!({"etcd": {"endpoints": ["a:2379"], "tls": {"insecureSkipVerify": true}}}),
            "insecureSkipVerify is not supported",
        ),
        (
            "bad connect string",
            json!({"zookeeper": {"connect": ""}}),
            "connect",
        ),
    ];
    for (i, (what, spec, expect)) in bad_catalogs.into_iter().enumerate() {
        let err = create(&xcat, catalog(&format!("bad-{i}"), spec)).await;
        let err = err
            .err()
            .with_context(|| format!("catalog with {what} was accepted"))?;
        assert!(
            err.contains(expect),
            "catalog with {what}: {err:?} does not mention {expect:?}"
        );
    }
    let bad_registrations = [
        (
            "export without service",
            json!({"catalogRef": {"name": "consul"}, "direction": "Export"}),
            "needs spec.service",
        ),
        (
            "import without externalName",
            json!({"catalogRef": {"name": "zk"}, "direction": "Import"}),
            "needs spec.externalName",
        ),
        (
            "unknown direction",
            json!({"catalogRef": {"name": "zk"}, "direction": "Sideways", "externalName": "x"}),
            "direction",
        ),
        (
            "import with service",
            json!({"catalogRef": {"name": "zk"}, "direction": "Import", "externalName": "x", "service": {"name": "s"}}),
            "spec.service is for Export",
        ),
        (
            "bad external name",
            json!({"catalogRef": {"name": "consul"}, "direction": "Export", "service": {"name": "s"}, "externalName": "a b"}),
            "externalName",
        ),
        (
            "no catalog",
            json!({"direction": "Export", "service": {"name": "s"}}),
            "catalogRef",
        ),
        (
            "a port number out of range",
            json!({"catalogRef": {"name": "consul"}, "direction": "Export", "service": {"name": "s"}, "port": 70000}),
            "a port number is between 1 and 65535",
        ),
        (
            "a negative port number",
            json!({"catalogRef": {"name": "consul"}, "direction": "Export", "service": {"name": "s"}, "port": -1}),
            "a port number is between 1 and 65535",
        ),
        (
            "a Service port name a Service refuses",
            json!({"catalogRef": {"name": "zk"}, "direction": "Import", "externalName": "x", "target": {"ports": [{"name": "MySQL", "port": 3306}]}}),
            "spec.target.ports[0].name",
        ),
        (
            "a port name twice",
            json!({"catalogRef": {"name": "zk"}, "direction": "Import", "externalName": "x", "target": {"ports": [{"name": "db", "port": 3306}, {"name": "db", "port": 3307}]}}),
            "each name once",
        ),
        (
            "a port twice",
            json!({"catalogRef": {"name": "zk"}, "direction": "Import", "externalName": "x", "target": {"ports": [{"name": "a", "port": 3306}, {"name": "b", "port": 3306}]}}),
            "each port once",
        ),
        // Tags and meta bounded so that one entry fits every catalog's request limit.
        (
            "65 tags",
            json!({"catalogRef": {"name": "consul"}, "direction": "Export", "service": {"name": "s"},
                   "tags": (0..65).map(|i| format!("t{i}")).collect::<Vec<_>>()}),
            "spec.tags: Too many: 65: must have at most 64 items",
        ),
        (
            "a tag of 256 characters",
            json!({"catalogRef": {"name": "consul"}, "direction": "Export", "service": {"name": "s"},
                   "tags": ["x".repeat(256)]}),
            "spec.tags[0]: Too long",
        ),
        (
            "65 meta pairs",
            json!({"catalogRef": {"name": "consul"}, "direction": "Export", "service": {"name": "s"},
                   "meta": (0..65).map(|i| (format!("k{i}"), "v".to_string())).collect::<std::collections::BTreeMap<_, _>>()}),
            "spec.meta: Too many: 65: must have at most 64 items",
        ),
        (
            "a meta value of 513 characters",
            json!({"catalogRef": {"name": "consul"}, "direction": "Export", "service": {"name": "s"},
                   "meta": {"team": "x".repeat(513)}}),
            "spec.meta.team: Too long",
        ),
        (
            "a negative empty-hold",
            json!({"catalogRef": {"name": "zk"}, "direction": "Import", "externalName": "x", "import": {"emptyHoldSeconds": -1}}),
            "spec.import.emptyHoldSeconds",
        ),
        (
            "an empty-hold over an hour",
            json!({"catalogRef": {"name": "zk"}, "direction": "Import", "externalName": "x", "import": {"emptyHoldSeconds": 3601}}),
            "spec.import.emptyHoldSeconds",
        ),
        (
            "import settings on an export",
            json!({"catalogRef": {"name": "consul"}, "direction": "Export", "service": {"name": "s"}, "import": {"emptyHoldSeconds": 5}}),
            "spec.import is for Import",
        ),
    ];
    for (i, (what, spec, expect)) in bad_registrations.into_iter().enumerate() {
        let err = create(&xreg, registration(&format!("bad-{i}"), spec)).await;
        let err = err
            .err()
            .with_context(|| format!("registration with {what} was accepted"))?;
        assert!(
            err.contains(expect),
            "registration with {what}: {err:?} does not mention {expect:?}"
        );
    }

    // kubectl shows the columns users look for.
    let table = env.kube()?.kubectl(&["get", "xreg", "-n", "default"])?;
    let header = table.lines().next().unwrap_or_default();
    for col in [
        "NAME",
        "CATALOG",
        "DIRECTION",
        "SERVICE",
        "EXTERNAL NAME",
        "ENDPOINTS",
        "READY",
        "AGE",
    ] {
        assert!(
            header.contains(col),
            "`kubectl get xreg` header {header:?} lacks {col}"
        );
    }
    let cats = env.kube()?.kubectl(&["get", "xcat"])?;
    assert!(
        cats.lines()
            .next()
            .unwrap_or_default()
            .contains("REACHABLE"),
        "{cats}"
    );
    assert_eq!(cats.lines().count(), 4, "three catalogs listed: {cats}");
    Ok(())
}
