//! The HTTP side: the client, one request sent to the first address that answers (through
//! [`Failover`](crate::backend::failover::Failover)), and what came back ([`Reply`]).

use std::convert::Infallible;
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::{Consul, ConsulConfig};
use crate::backend::BackendError;
use crate::backend::failover::{Attempt, Failed};
use crate::backend::transport::{brief, with_tls_hint};

/// Time for one request to one address in a first round over the addresses: a dead or hung
/// server costs no more than this before the next is asked.
const QUICK_TIMEOUT: Duration = Duration::from_secs(1);
/// Time for one request to one address in the second round, when none answered within
/// [`QUICK_TIMEOUT`] and one at least ran out of time: a slow Consul still gets its answers.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The addresses as configured (trailing `/` removed), for messages, and their URLs, in order.
pub(super) fn parse_addresses(addresses: &[String]) -> anyhow::Result<(Vec<String>, Vec<Url>)> {
    let mut names = Vec::with_capacity(addresses.len());
    let mut urls = Vec::with_capacity(addresses.len());
    for a in addresses {
        let a = a.trim().trim_end_matches('/').to_string();
        let url = Url::parse(&a)
            .with_context(|| format!("Consul address {a:?} is not an http(s)://host:port URL"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            bail!("Consul address {a:?} is not an http(s)://host:port URL");
        }
        if url.path() != "/" && !url.path().is_empty() {
            bail!("Consul address {a:?} must not have a path");
        }
        names.push(a);
        urls.push(url);
    }
    Ok((names, urls))
}

/// The HTTP client of `cfg`: timeouts, the CA(s) to trust, the client certificate.
pub(super) fn http_client(cfg: &ConsulConfig) -> anyhow::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("catalog-bridge/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = &cfg.ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .context("reading the Consul CA bundle (PEM)")?;
        if certs.is_empty() {
            bail!("the Consul CA bundle holds no PEM certificate");
        }
        builder = builder.tls_certs_only(certs);
    }
    if let Some(c) = &cfg.client_cert {
        let identity =
            reqwest::Identity::from_pem(&[&c.cert_pem[..], b"\n", &c.key_pem[..]].concat())
                .context("reading the Consul client certificate and key (PEM: tls.crt, tls.key)")?;
        builder = builder.identity(identity);
    }
    if cfg.insecure_skip_verify {
        builder = builder.danger_accept_invalid_certs(true);
    }
    builder
        .build()
        .context("building the HTTP client for Consul")
}

/// Whether a Consul server that answered `status` with `text` cannot serve now, where another
/// server may: 429, 502, 503, 504, and a 500 that says the cluster has no leader or that the
/// server could not reach another ("rpc error …"). Other 500s are the request's own answer
/// ("Connect must be enabled in order to use this endpoint"): every server would give it.
fn cannot_serve_now(status: StatusCode, text: &str) -> bool {
    const UNAVAILABLE: [&str; 5] = [
        "no cluster leader",
        "leadership lost",
        "rpc error",
        "connection refused",
        "i/o timeout",
    ];
    match status {
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => true,
        StatusCode::INTERNAL_SERVER_ERROR => {
            let t = text.to_ascii_lowercase();
            UNAVAILABLE.iter().any(|u| t.contains(u))
        }
        _ => false,
    }
}

/// One answer of one address.
pub(super) struct Reply {
    pub(super) address: String,
    pub(super) status: StatusCode,
    pub(super) body: Vec<u8>,
    /// The `X-Consul-Index` header, when present and a number.
    pub(super) index: Option<u64>,
}

impl Reply {
    fn text(&self) -> String {
        let t = String::from_utf8_lossy(&self.body);
        let t = t.trim();
        if t.chars().count() > 500 {
            format!("{}…", t.chars().take(500).collect::<String>())
        } else {
            t.to_string()
        }
    }

    pub(super) fn json(&self, what: &str) -> Result<Value, BackendError> {
        self.json_as(what)
    }

    /// The body parsed as `T` (fields `T` does not name are skipped, not kept).
    pub(super) fn json_as<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
    ) -> Result<T, BackendError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            BackendError::Protocol(format!(
                "{what} on {}: the answer is not JSON ({e}): {}",
                self.address,
                self.text()
            ))
        })
    }

    /// The error for an unexpected HTTP status.
    pub(super) fn status_error(&self, what: &str) -> BackendError {
        let msg = format!(
            "{what} on {}: HTTP {}: {}",
            self.address,
            self.status.as_u16(),
            self.text()
        );
        match self.status {
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => BackendError::Unauthorized(msg),
            _ => BackendError::Rejected(msg),
        }
    }
}

impl Consul {
    /// Sends one request to the first address that answers, starting with the one that
    /// answered last. An HTTP status is an answer, but for a server that cannot serve now —
    /// 500 "No cluster leader", 503, 429 ([`cannot_serve_now`]) — which moves on to the next
    /// address like a refused connection does; a 4xx is the request's own (403 ACL, 400) and
    /// ends the search.
    /// An address gets [`QUICK_TIMEOUT`], then, when none answered, [`REQUEST_TIMEOUT`].
    pub(super) async fn call(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        with_dc: bool,
        body: Option<&Value>,
    ) -> Result<Reply, BackendError> {
        self.call_with_timeout(method, path, query, with_dc, body, None)
            .await
    }

    /// [`Consul::call`] with a request timeout of its own, in one round (a blocking query
    /// waits longer than [`REQUEST_TIMEOUT`]).
    pub(super) async fn call_with_timeout(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        with_dc: bool,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<Reply, BackendError> {
        let patience = match timeout {
            Some(t) => vec![t],
            None => vec![QUICK_TIMEOUT, REQUEST_TIMEOUT],
        };
        let answered = self
            .failover
            .first_answer_within(&patience, move |idx, timeout| {
                let mut req = self
                    .http
                    .request(method.clone(), self.url(idx, path, query, with_dc))
                    .timeout(timeout);
                if let Some(t) = &self.token {
                    req = req.header("X-Consul-Token", t);
                }
                if let Some(b) = body {
                    req = req.json(b);
                }
                self.attempt(idx, req)
            })
            .await;
        match answered {
            Ok((reply, _)) => Ok(reply),
            Err(Failed::Unanswered(failures)) => Err(BackendError::Unreachable(format!(
                "no Consul address answered: {failures}"
            ))),
            Err(Failed::Stopped(never)) => match never {},
        }
    }

    /// The URL of `path` under `/v1` at address `idx`, with `query` (a key without a value
    /// when the value is empty) and the datacenter when `with_dc`.
    fn url(&self, idx: usize, path: &[&str], query: &[(&str, &str)], with_dc: bool) -> Url {
        let mut url = self.urls[idx].clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty().push("v1").extend(path);
        }
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                if v.is_empty() {
                    q.append_key_only(k);
                } else {
                    q.append_pair(k, v);
                }
            }
            if with_dc && let Some(dc) = &self.datacenter {
                q.append_pair("dc", dc);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        url
    }

    /// Sends `req` to address `idx`: its answer, or why there was none (a status that says
    /// the server cannot serve now counts as none). Never stops the failover: every address
    /// may answer where this one did not.
    async fn attempt(
        &self,
        idx: usize,
        req: reqwest::RequestBuilder,
    ) -> Attempt<Reply, Infallible> {
        let sent = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let index = resp
                    .headers()
                    .get("X-Consul-Index")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                resp.bytes().await.map(|b| (status, b.to_vec(), index))
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok((status, body, index)) => {
                let reply = Reply {
                    address: self.failover.addresses()[idx].clone(),
                    status,
                    body,
                    index,
                };
                let text = reply.text();
                if cannot_serve_now(status, &text) {
                    Attempt::Next(format!("HTTP {}: {text}", status.as_u16()))
                } else {
                    Attempt::Answer(reply)
                }
            }
            Err(e) if e.is_timeout() => Attempt::TimedOut(self.why_unanswered(idx, &e)),
            Err(e) => Attempt::Next(self.why_unanswered(idx, &e)),
        }
    }

    /// What went wrong with address `idx`, briefly, and the setting to check when an https
    /// address reached without a client certificate failed the way a refused one does.
    fn why_unanswered(&self, idx: usize, e: &reqwest::Error) -> String {
        let mut why = if e.is_timeout() {
            "timed out".to_string()
        } else {
            brief(e)
        };
        // A Consul that verifies clients either says so (an alert) or just closes the
        // connection, depending on timing: name the setting either way.
        if self.urls[idx].scheme() == "https" {
            why = with_tls_hint(why, "Consul", e, self.client_cert);
        }
        why
    }

    /// A GET whose answer must be a success, as JSON.
    pub(super) async fn get_json(
        &self,
        what: &str,
        path: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Value, BackendError> {
        let reply = self.call(Method::GET, path, query, true, None).await?;
        if !reply.status.is_success() {
            return Err(reply.status_error(what));
        }
        reply.json(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_cannot_serve_now_is_told_from_a_request_every_server_refuses() {
        for (status, text) in [
            (500, "No cluster leader"),
            (
                500,
                "rpc error getting client: failed to get conn: connection refused",
            ),
            (503, ""),
            (429, "slow down"),
        ] {
            let s = StatusCode::from_u16(status).expect("a status");
            assert!(cannot_serve_now(s, text), "{status} {text}");
        }
        for (status, text) in [
            (500, "Connect must be enabled in order to use this endpoint"),
            (403, "Permission denied"),
            (400, "Missing node registration"),
        ] {
            let s = StatusCode::from_u16(status).expect("a status");
            assert!(!cannot_serve_now(s, text), "{status} {text}");
        }
    }
}
