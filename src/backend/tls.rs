//! A TLS client configuration (rustls) from an ExternalCatalog's `tls`: the CA bundle to trust
//! (else the system's roots), a client certificate, or no verification at all. Used where the
//! catalog's client library brings no TLS of its own: ZooKeeper, reached through the session
//! relay, which speaks TLS to the servers.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::ClientCert;

/// The TLS side of a catalog connection, as the ExternalCatalog's `tls` asks for it.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// PEM CA bundle to trust; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    pub client_cert: Option<ClientCert>,
    pub insecure_skip_verify: bool,
}

/// Builds the rustls client configuration for `settings`; `what` names the catalog kind in
/// errors ("ZooKeeper").
pub fn client_config(what: &str, settings: &TlsSettings) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("choosing the TLS versions")?;
    let builder = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        match &settings.ca_pem {
            Some(pem) => {
                let certs = CertificateDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("reading the {what} CA bundle (PEM, ca.crt)"))?;
                if certs.is_empty() {
                    bail!("the {what} CA bundle holds no PEM certificate");
                }
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    bail!("no certificate of the {what} CA bundle could be used");
                }
            }
            None => {
                roots.add_parsable_certificates(system_roots().iter().cloned());
                if roots.is_empty() {
                    bail!(
                        "TLS to {what} without tls.caSecretRef needs the system's CA \
                         certificates, and none were found"
                    );
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    match &settings.client_cert {
        Some(c) => {
            let chain = CertificateDer::pem_slice_iter(&c.cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("reading the {what} client certificate (PEM, tls.crt)"))?;
            if chain.is_empty() {
                bail!("the {what} client certificate (tls.crt) holds no PEM certificate");
            }
            let key = PrivateKeyDer::from_pem_slice(&c.key_pem)
                .with_context(|| format!("reading the {what} client key (PEM, tls.key)"))?;
            builder
                .with_client_auth_cert(chain, key)
                .with_context(|| format!("using the {what} client certificate and key"))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The system's CA certificates, read from disk once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// `insecureSkipVerify`: any server certificate is accepted (the handshake signatures are
/// still checked, so the connection is encrypted, only not authenticated).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_refused_with_what_it_is() {
        let err =
            |s: TlsSettings| format!("{:#}", client_config("ZooKeeper", &s).expect_err("refused"));
        let e = err(TlsSettings {
            ca_pem: Some(b"not a certificate".to_vec()),
            ..Default::default()
        });
        assert!(
            e.contains("ZooKeeper CA bundle holds no PEM certificate"),
            "{e}"
        );
        let e = err(TlsSettings {
            insecure_skip_verify: true,
            client_cert: Some(ClientCert {
                cert_pem: b"nothing".to_vec(),
                key_pem: b"nothing".to_vec(),
            }),
            ..Default::default()
        });
        assert!(
            e.contains("client certificate (tls.crt) holds no PEM"),
            "{e}"
        );
    }

    #[test]
    fn insecure_skip_verify_needs_no_ca() {
        client_config(
            "ZooKeeper",
            &TlsSettings {
                insecure_skip_verify: true,
                ..Default::default()
            },
        )
        .expect("no CA needed when nothing is verified");
    }
}
