//! The TLS peers: Consul and etcd that serve only TLS and refuse clients without a certificate
//! signed by the environment's CA.

use anyhow::{Result, bail, ensure};
use localenv::Env;

#[tokio::test]
async fn tls_peers_require_a_client_certificate() -> Result<()> {
    let env = Env::builder().consul_tls().etcd_tls().start().await?;
    let tls = env.tls()?;

    // Consul: HTTPS with the client certificate answers; without it, or over HTTP, nothing.
    let consul = env.consul()?.url();
    ensure!(consul.starts_with("https://"), "{consul}");
    let leader: String = localenv::https_client(tls)?
        .get(format!("{consul}/v1/status/leader"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(!leader.is_empty(), "a leader over HTTPS");
    localenv::install_crypto_provider();
    let no_cert = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&tls.ca_pem)?])
        .build()?;
    if let Ok(r) = no_cert
        .get(format!("{consul}/v1/status/leader"))
        .send()
        .await
    {
        bail!(
            "Consul answered a client without a certificate: {}",
            r.status()
        );
    }
    let plain = consul.replacen("https://", "http://", 1);
    if let Ok(r) = localenv::http_client()?
        .get(format!("{plain}/v1/status/leader"))
        .send()
        .await
        && r.status().is_success()
    {
        bail!("Consul answered plain HTTP");
    }

    // etcd: etcdctl with the certificate works, without it fails.
    let etcd = env.etcd()?;
    ensure!(
        etcd.endpoint().starts_with("https://"),
        "{}",
        etcd.endpoint()
    );
    etcd.etcdctl(&["put", "k", "v"])?;
    ensure!(etcd.etcdctl(&["get", "--print-value-only", "k"])?.trim() == "v");
    let refused = localenv::run_tool(
        std::process::Command::new(localenv::programs::etcdctl()?)
            .arg(format!("--endpoints={}", etcd.endpoint()))
            .arg(format!("--cacert={}", tls.ca_file.display()))
            .arg("--command-timeout=3s")
            .args(["get", "k"]),
    );
    ensure!(
        refused.is_err(),
        "etcd answered a client without a certificate"
    );
    Ok(())
}
