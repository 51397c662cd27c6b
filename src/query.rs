//! `catalog-bridge query <catalog> <name>`: asks a catalog what a discovery client would get.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use kube::Api;

use crate::backend::Backend;
use crate::backend::consul::{Consul, ConsulConfig};
use crate::crd::ExternalCatalog;

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
    if let Some(rest) = catalog.strip_prefix("consul://") {
        let (hostport, _) = rest.split_once('/').unwrap_or((rest, ""));
        return Ok(Arc::new(Consul::new(ConsulConfig {
            addresses: vec![format!("http://{hostport}")],
            datacenter: None,
            token: std::env::var("CONSUL_HTTP_TOKEN").ok(),
            node_name: String::new(),
            owner: String::new(),
            insecure_skip_verify: false,
            ca_pem: None,
        })?));
    }
    if catalog.contains("://") {
        bail!("{catalog:?}: this version queries consul:// URLs and ExternalCatalogs by name");
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes to read the ExternalCatalog")?;
    let cat = Api::<ExternalCatalog>::all(client.clone())
        .get(catalog)
        .await
        .with_context(|| format!("reading ExternalCatalog {catalog}"))?;
    let problem = |p: crate::desired::Problem| anyhow::anyhow!("{}: {}", p.reason, p.message);
    let credentials = crate::catalogs::credentials(&client, &cat)
        .await
        .map_err(problem)?;
    crate::catalogs::build(&cat, credentials, "query").map_err(problem)
}
