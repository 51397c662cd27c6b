//! Transport errors explained, in one place for every catalog: what went wrong with one
//! address, briefly, and what to set in the ExternalCatalog's `tls` when a TLS connection
//! failed for a reason it can fix.

use std::error::Error;

use rustls::{AlertDescription, CertificateError};

/// What went wrong with one address, briefly: `connection refused`, `connection reset`,
/// `timed out`, or the innermost error's text.
pub fn brief(e: &(dyn Error + 'static)) -> String {
    let mut source: Option<&(dyn Error + 'static)> = Some(e);
    let mut innermost = e.to_string();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => return "connection reset".into(),
                std::io::ErrorKind::TimedOut => return "timed out".into(),
                _ => {}
            }
        }
        innermost = s.to_string();
        source = s.source();
    }
    innermost
}

/// An error and its sources, each part once, joined by `: ` (parts that say nothing new, such
/// as `transport error`, left out).
pub fn chain(e: &(dyn Error + 'static)) -> String {
    chain_after(&e.to_string(), e.source())
}

/// [`chain`] for an error whose own text is `head` (a gRPC status's message), followed by
/// `source` and its sources.
pub fn chain_after(head: &str, source: Option<&(dyn Error + 'static)>) -> String {
    let mut parts: Vec<String> = Vec::new();
    push_part(&mut parts, head);
    let mut cur = source;
    while let Some(err) = cur {
        push_part(&mut parts, &err.to_string());
        cur = err.source();
    }
    parts.join(": ")
}

/// Adds a part of an error text unless it says nothing new (`transport error`, a repeat).
fn push_part(parts: &mut Vec<String>, s: &str) {
    let s = s.trim();
    if !s.is_empty() && s != "transport error" && !parts.iter().any(|p| p.contains(s)) {
        parts.push(s.to_string());
    }
}

/// The forms a server's refusal of a TLS client without a certificate takes, depending on
/// timing: an alert, or the connection closed under the client's first request (with TLS 1.3
/// the client believes the handshake done before the server has checked it).
const REFUSED_FORMS: [&str; 8] = [
    "CertificateRequired",
    "certificate required",
    "connection closed",
    "connection reset",
    "broken pipe",
    "close_notify",
    "unexpected eof",
    "UnexpectedEof",
];

/// Whether `text`, the failure of a TLS connection made without a client certificate, may be
/// the server refusing it for want of one.
fn may_want_client_cert(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    !lower.contains("invalid peer certificate")
        && REFUSED_FORMS
            .iter()
            .any(|f| text.contains(f) || lower.contains(&f.to_ascii_lowercase()))
}

/// `text` (what went wrong with a TLS connection to `catalog`: `Consul`, `etcd`, `ZooKeeper`),
/// and `; what to set` when [`tls_hint`] finds something the ExternalCatalog's `tls` can fix.
/// Every catalog writes its hints this way.
pub fn with_tls_hint(
    text: String,
    catalog: &str,
    e: &(dyn Error + 'static),
    client_cert: bool,
) -> String {
    match tls_hint(catalog, e, client_cert) {
        Some(hint) => format!("{text}; {hint}"),
        None => text,
    }
}

/// What to set when a TLS connection to `catalog` failed with `e`: read from rustls' own error
/// inside `e` (or its text), else from the forms a refused client certificate takes (only when
/// `client_cert` is false: none was presented).
pub fn tls_hint(catalog: &str, e: &(dyn Error + 'static), client_cert: bool) -> Option<String> {
    let mut cur: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = cur {
        // An io::Error hides the error it wraps from `source()`: look inside.
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map(|i| i as &(dyn Error + 'static));
        if let Some(hint) = [Some(err), inner]
            .into_iter()
            .flatten()
            .find_map(|e| e.downcast_ref::<rustls::Error>())
            .and_then(|r| rustls_hint(catalog, r))
        {
            return Some(hint);
        }
        cur = err.source();
    }
    // Wrapped where the chain does not reach it (a boxed connector error): its text.
    let text = chain(e);
    if text.contains("UnknownIssuer") {
        return Some(UNKNOWN_ISSUER.to_string());
    }
    if text.contains("NotValidForName") || text.contains("not valid for name") {
        return Some(NOT_VALID_FOR_NAME.to_string());
    }
    if text.contains("received fatal alert")
        && [
            "BadCertificate",
            "CertificateRequired",
            "UnknownCA",
            "CertificateUnknown",
        ]
        .iter()
        .any(|a| text.contains(a))
    {
        return Some(client_cert_hint(catalog));
    }
    (!client_cert && (cut_short(e) || may_want_client_cert(&text)))
        .then(|| client_cert_hint(catalog))
}

const UNKNOWN_ISSUER: &str =
    "the server's certificate is not signed by a CA this controller trusts (tls.caSecretRef)";
const NOT_VALID_FOR_NAME: &str = "the server's certificate does not name the host of the \
                                  address: connect by a name the certificate carries";

/// Whether an io::Error in `e`'s chain says the connection was cut: closed before its end,
/// reset, broken or aborted — how a refusal for want of a client certificate may show.
fn cut_short(e: &(dyn Error + 'static)) -> bool {
    use std::io::ErrorKind as K;
    let mut cur: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted
            )
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The hint for a refused client certificate.
fn client_cert_hint(catalog: &str) -> String {
    format!(
        "{catalog} may require a client certificate of a CA it trusts (tls.clientCertSecretRef)"
    )
}

fn rustls_hint(catalog: &str, e: &rustls::Error) -> Option<String> {
    use rustls::Error as E;
    Some(match e {
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => client_cert_hint(catalog),
        E::InvalidCertificate(CertificateError::UnknownIssuer) => UNKNOWN_ISSUER.to_string(),
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => NOT_VALID_FOR_NAME.to_string(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server with `verify_incoming` refuses a client without a certificate with an alert or
    /// by closing the connection, depending on timing; every form the refusal takes gets the
    /// hint (one cold run of `make test` saw the broken pipe).
    #[test]
    fn every_form_of_a_refused_client_certificate_is_recognised() {
        for why in [
            "connection closed before message completed",
            "received fatal alert: CertificateRequired",
            "http2 error: stream closed because of a broken pipe",
            "connection reset",
            "peer closed connection without sending TLS close_notify",
            "tls handshake eof: unexpected EOF",
        ] {
            assert!(may_want_client_cert(why), "not recognised: {why}");
        }
        for why in [
            "connection refused",
            "timed out",
            "invalid peer certificate: UnknownIssuer",
        ] {
            assert!(!may_want_client_cert(why), "not a refusal: {why}");
        }
    }

    #[test]
    fn rustls_errors_say_what_to_set() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let alert = io(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        let hint = tls_hint("ZooKeeper", &alert, false).expect("a hint");
        assert!(hint.contains("tls.clientCertSecretRef"), "{hint}");
        let issuer = io(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let hint = tls_hint("etcd", &issuer, true).expect("a hint");
        assert!(hint.contains("tls.caSecretRef"), "{hint}");
        let boxed: Box<dyn Error + Send + Sync> = "invalid peer certificate: UnknownIssuer".into();
        let hint = tls_hint("Consul", boxed.as_ref(), true).expect("a hint from the text");
        assert!(hint.contains("tls.caSecretRef"), "{hint}");
        let closed = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        assert!(tls_hint("Consul", &closed, false).is_some());
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert!(
            tls_hint("ZooKeeper", &eof, false).is_some(),
            "an EOF by its kind"
        );
        assert!(
            tls_hint("Consul", &closed, true).is_none(),
            "a client certificate was presented"
        );
    }

    #[test]
    fn brief_names_the_common_failures() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "os error 111");
        assert_eq!(brief(&refused), "connection refused");
        let other = std::io::Error::other("no route");
        assert_eq!(brief(&other), "no route");
    }
}
