//! `catalog-bridge query <catalog> <name>`: asks a catalog what a discovery client would get.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use kube::Api;

use crate::api::crd::{
    ConsulCatalog, EtcdCatalog, EtcdLayout, ExternalCatalog, ExternalCatalogSpec, ZooKeeperCatalog,
    ZooKeeperLayout,
};
use crate::backend::Backend;
use crate::k8s::catalogs::{self, Context as BuildContext};
use crate::k8s::secrets::{self, Credentials};
use crate::model::Problem;

/// `api_x @ 10.0.0.1:8080 & 10.0.0.2:8080`, or `api_x @ (none)`.
pub fn format_answer(name: &str, addrs: &[String]) -> String {
    if addrs.is_empty() {
        format!("{name} @ (none)")
    } else {
        format!("{name} @ {}", addrs.join(" & "))
    }
}

/// Resolves `catalog` (a `consul://host:port` URL or an ExternalCatalog name) and asks it.
pub async fn query(catalog: &str, name: &str) -> Result<String> {
    let backend = backend_for(catalog).await?;
    let addrs = backend
        .lookup(name)
        .await
        .with_context(|| format!("asking {} for {name}", backend.describe()))?;
    Ok(format_answer(name, &addrs))
}

async fn backend_for(catalog: &str) -> Result<Arc<dyn Backend>> {
    let problem = |p: Problem| anyhow::anyhow!("{p}");
    if catalog.contains("://") {
        let cat = ExternalCatalog::new("query", spec_from_url(catalog)?);
        let credentials = Credentials {
            token: std::env::var("CONSUL_HTTP_TOKEN").ok(),
            ..Default::default()
        };
        return catalogs::build(&cat, credentials, &query_context()).map_err(problem);
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes to read the ExternalCatalog")?;
    let cat = Api::<ExternalCatalog>::all(client.clone())
        .get(catalog)
        .await
        .with_context(|| format!("reading ExternalCatalog {catalog}"))?;
    let credentials = secrets::credentials(&client, &cat).await.map_err(problem)?;
    catalogs::build(&cat, credentials, &query_context()).map_err(problem)
}

/// Queries write nothing and keep no session.
fn query_context() -> BuildContext {
    BuildContext {
        owner: "query".into(),
        cluster: None,
        sessions: None,
        read_only: true,
    }
}

/// An ExternalCatalog spec from a URL: `consul://host:port`,
/// `etcd://host:port[,host:port…][?layout=plain|naming|coredns&basePath=…&zone=…]`,
/// `zk://host:port[,host:port…][/basePath][?layout=plain|curator]`.
pub fn spec_from_url(url: &str) -> Result<ExternalCatalogSpec> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{url:?} is not a catalog URL"))?;
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let params: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let param = |k: &str| {
        params
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    };
    let known = |allowed: &[&str]| -> Result<()> {
        for (k, _) in &params {
            if !allowed.contains(k) {
                bail!(
                    "{url:?}: unknown parameter {k:?} (known: {})",
                    allowed.join(", ")
                );
            }
        }
        Ok(())
    };
    let (hosts, path) = match location.split_once('/') {
        Some((h, p)) => (h, Some(format!("/{p}"))),
        None => (location, None),
    };
    if hosts.is_empty() {
        bail!("{url:?} names no host");
    }
    let mut spec = ExternalCatalogSpec::default();
    match scheme {
        "consul" | "consul+https" => {
            known(&[])?;
            let proto = if scheme == "consul" { "http" } else { "https" };
            spec.consul = Some(ConsulCatalog {
                addresses: hosts.split(',').map(|h| format!("{proto}://{h}")).collect(),
                ..Default::default()
            });
        }
        "etcd" => {
            known(&["layout", "basePath", "zone"])?;
            let layout = match param("layout").as_deref() {
                None | Some("plain") => EtcdLayout::Plain,
                Some("naming") => EtcdLayout::Naming,
                Some("coredns") => EtcdLayout::Coredns,
                Some(other) => {
                    bail!("{url:?}: unknown etcd layout {other:?} (plain, naming, coredns)")
                }
            };
            spec.etcd = Some(EtcdCatalog {
                endpoints: hosts.split(',').map(str::to_string).collect(),
                layout,
                base_path: param("basePath").or(path),
                zone: param("zone"),
                ..Default::default()
            });
        }
        "zk" | "zookeeper" => {
            known(&["layout"])?;
            let layout = match param("layout").as_deref() {
                None | Some("plain") => ZooKeeperLayout::Plain,
                Some("curator") => ZooKeeperLayout::Curator,
                Some(other) => {
                    bail!("{url:?}: unknown ZooKeeper layout {other:?} (plain, curator)")
                }
            };
            spec.zookeeper = Some(ZooKeeperCatalog {
                connect: hosts.to_string(),
                layout,
                base_path: path,
                ..Default::default()
            });
        }
        other => bail!("{url:?}: unknown catalog scheme {other:?} (consul, etcd, zk)"),
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_become_catalog_specs() -> Result<()> {
        let c = spec_from_url("consul://127.0.0.1:8500,c2:8500")?;
        assert_eq!(
            c.consul.map(|c| c.addresses),
            Some(vec![
                "http://127.0.0.1:8500".to_string(),
                "http://c2:8500".to_string()
            ])
        );
        let e = spec_from_url("etcd://e1:2379?layout=coredns&zone=example.org")?
            .etcd
            .context("etcd")?;
        assert_eq!(
            (e.layout, e.zone.as_deref()),
            (EtcdLayout::Coredns, Some("example.org"))
        );
        let z = spec_from_url("zk://z1:2181,z2:2181/apps?layout=curator")?
            .zookeeper
            .context("zk")?;
        assert_eq!(z.connect, "z1:2181,z2:2181");
        assert_eq!(z.base_path.as_deref(), Some("/apps"));
        assert_eq!(z.layout, ZooKeeperLayout::Curator);
        assert!(spec_from_url("etcd://e1:2379?layout=flat").is_err());
        assert!(spec_from_url("redis://x:1").is_err());
        assert!(spec_from_url("zk://z1:2181?laoyut=plain").is_err());
        Ok(())
    }
}
