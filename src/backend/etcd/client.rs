//! Connections to etcd and what its errors mean. One client per endpoint, connected lazily on
//! first use (never in `Etcd::new`); a request goes to the endpoint that answered last, then to
//! the others in turn ([`Failover`]). A connection that failed or timed out is dropped and made
//! again on the next request. Errors name every endpoint tried and why it failed.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::bail;
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KeyValue, TlsOptions,
};
use tracing::warn;

use super::EtcdConfig;
use crate::api::crd::ServerInfo;
use crate::backend::BackendError;
use crate::backend::failover::{Attempt, Failed, Failover};
use crate::backend::transport::{chain, chain_after, with_tls_hint};
use crate::model::address::parse_port;

/// Time for one request to one endpoint, connection included, in a first round over the
/// endpoints: a dead or hung member, or a write proposed to a leader that died (etcd drops it
/// and answers only after its own 5 s or more), costs no more than this before the next member
/// is asked.
const QUICK_TIMEOUT: Duration = Duration::from_secs(1);
/// Time for one request to one endpoint in the second round, when no endpoint answered within
/// [`QUICK_TIMEOUT`] and one at least did not answer at all: a cluster that is slow rather
/// than dead still gets its requests through.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings find a connection to a hung server (etcd refuses pings more often than 5 s,
/// its `--grpc-keepalive-min-time`).
const HTTP2_KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(6), Duration::from_secs(2));
/// Keys per page of a range read.
const PAGE: i64 = 1000;

/// Why a request failed, as far as the lease logic cares.
#[derive(Debug)]
pub(super) enum Fail {
    /// etcd says the lease does not exist (expired or revoked).
    LeaseGone(String),
    Backend(BackendError),
}

impl From<Fail> for BackendError {
    fn from(f: Fail) -> BackendError {
        match f {
            Fail::LeaseGone(m) => BackendError::Rejected(m),
            Fail::Backend(e) => e,
        }
    }
}

impl From<BackendError> for Fail {
    fn from(e: BackendError) -> Fail {
        Fail::Backend(e)
    }
}

/// The category of an etcd error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Nothing (useful) answered: try the next endpoint.
    Transport,
    Unauthorized,
    LeaseGone,
    /// The server answered with an error.
    Rejected,
}

/// The category of a gRPC status from etcd (`code` as in the gRPC spec).
pub(super) fn classify_status(code: i32, message: &str) -> Kind {
    let m = message.to_ascii_lowercase();
    if m.contains("lease not found") {
        return Kind::LeaseGone;
    }
    if code == 16
        || code == 7
        || m.contains("authentication failed")
        || m.contains("user name is empty")
        || m.contains("invalid auth token")
        || m.contains("permission denied")
    {
        return Kind::Unauthorized;
    }
    match code {
        // Unavailable (refused, no leader), DeadlineExceeded, Cancelled (client timeout).
        14 | 4 | 1 => Kind::Transport,
        2 if [
            "transport",
            "connect",
            "connection",
            "broken pipe",
            "h2 protocol",
        ]
        .iter()
        .any(|t| m.contains(t)) =>
        {
            Kind::Transport
        }
        _ => Kind::Rejected,
    }
}

/// The category of an error of the etcd client, and its text.
fn classify(e: &etcd_client::Error) -> (Kind, String) {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => {
            let mut text = chain_after(s.message(), std::error::Error::source(s));
            if text.is_empty() {
                text = format!("gRPC status {:?}", s.code());
            }
            (classify_status(i32::from(s.code()), &text), text)
        }
        E::TransportError(_) | E::IoError(_) => (Kind::Transport, chain(e)),
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => (Kind::LeaseGone, m.clone()),
        E::LeaseKeepAliveError(_) | E::WatchError(_) => (Kind::Transport, chain(e)),
        _ => (Kind::Rejected, chain(e)),
    }
}

/// The clients of every endpoint, and the endpoint that answered last.
pub(super) struct Connections {
    /// The endpoints as configured (so named in messages), tried from the one that answered
    /// last.
    failover: Failover,
    /// `http(s)://host:port`, as the client takes them.
    urls: Vec<String>,
    options: ConnectOptions,
    /// Without credentials, for an etcd that has authentication disabled.
    anonymous: Option<ConnectOptions>,
    user: Option<String>,
    clients: Mutex<Vec<Option<Client>>>,
    /// Every endpoint speaks TLS, and whether a client certificate is presented: for the hint
    /// a failed connection gets ([`Connections::failure`]).
    tls: bool,
    client_cert: bool,
}

/// `host:port` (or `[v6]:port`) with a numeric port.
fn valid_authority(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !host.contains('/')
        && parse_port(port).is_ok()
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')))
}

impl Connections {
    /// Checks the endpoints, TLS material and credentials of `cfg`; contacts nothing.
    pub(super) fn new(cfg: &EtcdConfig) -> anyhow::Result<Connections> {
        let https = cfg
            .endpoints
            .iter()
            .any(|e| e.trim().starts_with("https://"));
        if cfg.client_cert.is_some() && cfg.ca_pem.is_none() && !https {
            bail!(
                "a client certificate for etcd (tls.clientCertSecretRef) needs TLS: the CA that \
                 signed etcd's certificate (tls.caSecretRef), or https:// endpoints"
            );
        }
        // TLS with the CA given, or with the system's roots for https:// endpoints without one
        // (then every endpoint speaks TLS: host:port ones too).
        let tls = cfg.ca_pem.is_some() || https;
        let mut endpoints = Vec::with_capacity(cfg.endpoints.len());
        let mut urls = Vec::with_capacity(cfg.endpoints.len());
        for e in &cfg.endpoints {
            let e = e.trim().trim_end_matches('/').to_string();
            let (scheme, authority) = match e.split_once("://") {
                Some((s, a)) => (Some(s), a),
                None => (None, e.as_str()),
            };
            if !valid_authority(authority) {
                bail!("etcd endpoint {e:?} is not host:port or http(s)://host:port");
            }
            let url = match scheme {
                Some("http") if tls => bail!(
                    "etcd endpoint {e:?} is http:// but the others speak TLS (https:// or a CA \
                     in tls.caSecretRef): use https:// or host:port"
                ),
                Some("http") => format!("http://{authority}"),
                Some("https") => format!("https://{authority}"),
                Some(other) => bail!("etcd endpoint {e:?}: unknown scheme {other:?}"),
                None if tls => format!("https://{authority}"),
                None => format!("http://{authority}"),
            };
            endpoints.push(e);
            urls.push(url);
        }

        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(HTTP2_KEEP_ALIVE.0, HTTP2_KEEP_ALIVE.1)
            .with_keep_alive_while_idle(true);
        if let Some(pem) = &cfg.ca_pem {
            let text = String::from_utf8_lossy(pem);
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                bail!("the etcd CA bundle holds no PEM certificate");
            }
        }
        if tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut options_tls = match &cfg.ca_pem {
                Some(pem) => TlsOptions::new().ca_certificate(Certificate::from_pem(pem)),
                // No CA given: etcd's certificate is checked against the system's roots (the
                // image's CA bundle, or $SSL_CERT_FILE).
                None => TlsOptions::new().with_native_roots(),
            };
            if let Some(c) = &cfg.client_cert {
                for (what, bytes, marker) in [
                    ("certificate", &c.cert_pem, "-----BEGIN CERTIFICATE-----"),
                    ("key", &c.key_pem, "PRIVATE KEY-----"),
                ] {
                    if !String::from_utf8_lossy(bytes).contains(marker) {
                        bail!("the etcd client {what} (tls.clientCertSecretRef) is not PEM");
                    }
                }
                options_tls = options_tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
            }
            options = options.with_tls(options_tls);
        }
        let anonymous = options.clone();
        let user = cfg.username.clone().filter(|u| !u.is_empty());
        if let Some(u) = &user {
            options = options
                .with_user(u.clone(), cfg.password.clone().unwrap_or_default())
                .with_auto_token_refresh(true);
        }
        let n = endpoints.len();
        Ok(Connections {
            failover: Failover::new(endpoints),
            urls,
            options,
            anonymous: user.as_ref().map(|_| anonymous),
            user,
            clients: Mutex::new(vec![None; n]),
            tls,
            client_cert: cfg.client_cert.is_some(),
        })
    }

    /// What `e` on endpoint `idx` means: its category and text, with what to set in `tls` when
    /// a TLS connection failed for a reason the ExternalCatalog can fix. A broken connection,
    /// or one whose credentials were refused, is dropped: the next request connects again.
    fn failure(&self, idx: usize, e: &etcd_client::Error) -> (Kind, String) {
        let (kind, text) = classify(e);
        match kind {
            Kind::Transport if self.tls => {
                self.forget(idx);
                (kind, with_tls_hint(text, "etcd", e, self.client_cert))
            }
            Kind::Transport | Kind::Unauthorized => {
                self.forget(idx);
                (kind, text)
            }
            Kind::LeaseGone | Kind::Rejected => (kind, text),
        }
    }

    /// The endpoints as configured.
    pub(super) fn endpoints(&self) -> &[String] {
        self.failover.addresses()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Option<Client>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connect(&self, idx: usize) -> Result<Client, etcd_client::Error> {
        let url = self.urls[idx].as_str();
        match Client::connect([url], Some(self.options.clone())).await {
            Err(e)
                if self.anonymous.is_some()
                    && classify(&e).1.contains("authentication is not enabled") =>
            {
                warn!(endpoint = %self.endpoints()[idx], "etcd has authentication disabled; connecting without the configured credentials");
                Client::connect([url], self.anonymous.clone()).await
            }
            r => r,
        }
    }

    async fn client(&self, idx: usize) -> Result<Client, etcd_client::Error> {
        let cached = self.slots()[idx].clone();
        if let Some(c) = cached {
            return Ok(c);
        }
        let c = self.connect(idx).await?;
        self.slots()[idx] = Some(c.clone());
        Ok(c)
    }

    /// Drops the connection to endpoint `idx`; the next request connects again.
    pub(super) fn forget(&self, idx: usize) {
        self.slots()[idx] = None;
    }

    /// Runs `f` against the endpoint that answered last, then the others in turn, until one
    /// answers. Returns the answer and the index of the endpoint that gave it. An endpoint that
    /// does not answer within [`QUICK_TIMEOUT`], or whose connection broke, loses its connection
    /// and the next is tried at once; when none answered and one at least timed out, every
    /// endpoint is asked again with [`REQUEST_TIMEOUT`]. An error etcd answers with (refused
    /// credentials, a lost lease, a rejected request) is every endpoint's answer and ends the
    /// search. Requests are safe to repeat: a write that landed on a member that then did
    /// not answer in time lands again unchanged.
    pub(super) async fn call_at<T, F, Fut>(&self, what: &str, f: F) -> Result<(T, usize), Fail>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let f = &f;
        // A member that holds requests until their time is up may have no leader.
        let timed_out = &std::sync::atomic::AtomicBool::new(false);
        let answered = self
            .failover
            .first_answer_within(
                &[QUICK_TIMEOUT, REQUEST_TIMEOUT],
                |idx, timeout| async move {
                    let attempt = async {
                        let c = self.client(idx).await?;
                        f(c).await
                    };
                    let err = match tokio::time::timeout(timeout, attempt).await {
                        Ok(Ok(v)) => return Attempt::Answer(v),
                        Ok(Err(e)) => e,
                        Err(_) => {
                            self.forget(idx);
                            timed_out.store(true, std::sync::atomic::Ordering::Relaxed);
                            return Attempt::TimedOut(format!("no answer within {timeout:?}"));
                        }
                    };
                    let endpoint = &self.endpoints()[idx];
                    let (kind, text) = self.failure(idx, &err);
                    match kind {
                        Kind::Transport => Attempt::Next(text),
                        Kind::Unauthorized => {
                            let user = self.user.as_deref().map_or_else(
                                || "without credentials".to_string(),
                                |u| format!("as {u:?}"),
                            );
                            Attempt::Stop(Fail::Backend(BackendError::Unauthorized(format!(
                                "{what} on etcd {endpoint} {user}: {text}"
                            ))))
                        }
                        Kind::LeaseGone => Attempt::Stop(Fail::LeaseGone(format!(
                            "{what} on etcd {endpoint}: {text}"
                        ))),
                        Kind::Rejected => Attempt::Stop(Fail::Backend(BackendError::Rejected(
                            format!("{what} on etcd {endpoint}: {text}"),
                        ))),
                    }
                },
            )
            .await;
        match answered {
            Ok(v) => Ok(v),
            Err(Failed::Stopped(fail)) => Err(fail),
            Err(Failed::Unanswered(failures)) => {
                // A member that held a request until its time was up may still say why.
                let leaderless = if timed_out.load(std::sync::atomic::Ordering::Relaxed) {
                    self.leaderless().await
                } else {
                    Vec::new()
                };
                let why = match leaderless {
                    none if none.is_empty() => String::new(),
                    members => format!(
                        "; {} answer(s) that there is no leader: the cluster has lost its quorum",
                        members.join(", ")
                    ),
                };
                Err(Fail::Backend(BackendError::Unreachable(format!(
                    "{what}: no etcd endpoint answered: {failures}{why}"
                ))))
            }
        }
    }

    /// The endpoints whose member answers its status (which needs no leader) within
    /// [`QUICK_TIMEOUT`] and has no leader.
    async fn leaderless(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (idx, endpoint) in self.endpoints().iter().enumerate() {
            let status = tokio::time::timeout(QUICK_TIMEOUT, async {
                self.client(idx).await?.status().await
            })
            .await;
            if let Ok(Ok(s)) = status
                && s.leader() == 0
            {
                out.push(endpoint.clone());
            }
        }
        out
    }

    pub(super) async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Fail>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_at(what, f).await.map(|(v, _)| v)
    }

    /// Every key-value in `[start, end)`, read in pages at one revision.
    pub(super) async fn range(
        &self,
        what: &str,
        start: Vec<u8>,
        end: Vec<u8>,
    ) -> Result<Vec<KeyValue>, Fail> {
        self.range_at(what, start, end, 0).await.map(|(kvs, _)| kvs)
    }

    /// Every key-value in `[start, end)`, read in pages at `revision` (0: the latest), and the
    /// revision read.
    pub(super) async fn range_at(
        &self,
        what: &str,
        start: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
    ) -> Result<(Vec<KeyValue>, i64), Fail> {
        let mut out = Vec::new();
        let mut from = start;
        let mut revision = revision;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let key = from.clone();
            let mut resp = self
                .call(what, move |mut c| {
                    let (key, opts) = (key.clone(), opts.clone());
                    async move { c.get(key, Some(opts)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let next = kvs.last().map(|kv| {
                let mut k = kv.key().to_vec();
                k.push(0);
                k
            });
            out.extend(kvs);
            match next {
                Some(n) if more => from = n,
                _ => return Ok((out, revision)),
            }
        }
    }

    /// An error of a stream (an import watch) on endpoint `idx`; the connection is dropped
    /// when it is broken or its credentials were refused.
    pub(super) fn stream_error(
        &self,
        idx: usize,
        what: &str,
        e: &etcd_client::Error,
    ) -> BackendError {
        let endpoint = &self.endpoints()[idx];
        let (kind, text) = self.failure(idx, e);
        match kind {
            Kind::Transport => {
                BackendError::Unreachable(format!("{what} on etcd {endpoint}: {text}"))
            }
            Kind::Unauthorized => {
                BackendError::Unauthorized(format!("{what} on etcd {endpoint}: {text}"))
            }
            Kind::LeaseGone | Kind::Rejected => {
                BackendError::Rejected(format!("{what} on etcd {endpoint}: {text}"))
            }
        }
    }

    /// What the endpoint that answers says about itself and its cluster.
    pub(super) async fn status(&self) -> Result<ServerInfo, BackendError> {
        let ((status, members), idx) = self
            .call_at("status", |mut c| async move {
                let s = c.status().await?;
                let m = c.member_list().await?;
                Ok((s, m))
            })
            .await?;
        let members = members.members();
        let leader = members
            .iter()
            .find(|m| m.id() == status.leader())
            .map(|m| {
                if m.name().is_empty() {
                    format!("{:x}", m.id())
                } else {
                    m.name().to_string()
                }
            })
            .or_else(|| (status.leader() != 0).then(|| format!("{:x}", status.leader())));
        let mut urls: Vec<String> = members
            .iter()
            .flat_map(|m| m.client_urls().iter().cloned())
            .collect();
        urls.sort();
        urls.dedup();
        Ok(ServerInfo {
            address: Some(self.endpoints()[idx].clone()),
            leader,
            cluster_id: status.header().map(|h| format!("{:x}", h.cluster_id())),
            members: urls,
            version: Some(status.version().to_string()).filter(|v| !v.is_empty()),
            ..Default::default()
        })
    }
}
