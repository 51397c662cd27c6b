//! Certificates for catalogs that speak TLS and verify their clients, made with the openssl
//! command line: a CA, a server certificate for 127.0.0.1 and localhost, a client certificate,
//! and an unrelated CA that signed nothing the servers trust (to show a refused handshake).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

/// The certificate set of one environment, shared by its TLS Consul and TLS etcd.
pub struct TlsFiles {
    pub ca_pem: Vec<u8>,
    pub client_cert_pem: Vec<u8>,
    pub client_key_pem: Vec<u8>,
    /// A CA that signed neither the servers' nor the client's certificate.
    pub other_ca_pem: Vec<u8>,
    pub ca_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
}

/// Runs `openssl` with `args`.
pub(crate) fn openssl(args: &[&str]) -> Result<String> {
    crate::run_tool(Command::new("openssl").args(args))
}

/// A self-signed CA `<name>.crt` / `<name>.key` in `dir`.
pub(crate) fn make_ca(dir: &Path, name: &str, subject: &str) -> Result<(PathBuf, PathBuf)> {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={subject}"),
        "-keyout",
        &key.display().to_string(),
        "-out",
        &crt.display().to_string(),
    ])?;
    Ok((crt, key))
}

/// A certificate `<name>.crt` / `<name>.key` in `dir`, signed by the CA `(ca_crt, ca_key)`,
/// with the X.509 extensions `ext` (subjectAltName, usages).
pub(crate) fn make_signed(
    dir: &Path,
    name: &str,
    subject: &str,
    ext: &str,
    (ca_crt, ca_key): (&Path, &Path),
) -> Result<(PathBuf, PathBuf)> {
    let p = |suffix: &str| dir.join(format!("{name}.{suffix}"));
    let s = |path: &Path| path.display().to_string();
    std::fs::write(p("ext"), ext).with_context(|| format!("writing {}", s(&p("ext"))))?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={subject}"),
        "-keyout",
        &s(&p("key")),
        "-out",
        &s(&p("csr")),
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&p("csr")),
        "-CA",
        &s(ca_crt),
        "-CAkey",
        &s(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(&p("ext")),
        "-out",
        &s(&p("crt")),
    ])?;
    Ok((p("crt"), p("key")))
}

impl TlsFiles {
    /// Makes the set in `dir` (created if missing).
    pub fn generate(dir: &Path) -> Result<TlsFiles> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (ca_crt, ca_key) = make_ca(dir, "ca", "localenv-catalog-ca")?;
        let ca = (ca_crt.as_path(), ca_key.as_path());
        let (server_crt, server_key) = make_signed(
            dir,
            "server",
            "localhost",
            &format!(
                "subjectAltName=IP:127.0.0.1{},DNS:localhost\n\
                 basicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\n",
                crate::ports::host_san()
            ),
            ca,
        )?;
        let (client_crt, client_key) = make_signed(
            dir,
            "client",
            "catalog-bridge",
            "basicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
            ca,
        )?;
        let (other_ca, _) = make_ca(dir, "other-ca", "localenv-unrelated-ca")?;
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(TlsFiles {
            ca_pem: read(&ca_crt)?,
            client_cert_pem: read(&client_crt)?,
            client_key_pem: read(&client_key)?,
            other_ca_pem: read(&other_ca)?,
            ca_file: ca_crt,
            client_cert_file: client_crt,
            client_key_file: client_key,
            server_cert_file: server_crt,
            server_key_file: server_key,
        })
    }
}

/// An HTTPS client that trusts only the set's CA and presents its client certificate.
pub fn https_client(tls: &TlsFiles) -> Result<reqwest::Client> {
    crate::install_crypto_provider();
    let ca = reqwest::Certificate::from_pem(&tls.ca_pem).context("the CA certificate")?;
    let identity =
        reqwest::Identity::from_pem(&[&tls.client_cert_pem[..], &tls.client_key_pem[..]].concat())
            .context("the client certificate and key")?;
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tls_certs_only([ca])
        .identity(identity)
        .build()
        .context("building an HTTPS client")
}
