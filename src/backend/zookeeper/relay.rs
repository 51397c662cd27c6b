//! The session relay.
//!
//! zookeeper-client 0.11 neither exposes a session's password nor builds a session from an id
//! and password, so every connection of the backend goes through a small relay on loopback
//! ([`Proxy`]) that reads the session handshake: it records the id and password the server
//! hands out and, to re-attach, puts the stored ones into the client's first connect request.
//! After the handshake it copies bytes and nothing else. With TLS, the relay speaks it to the
//! servers; the client speaks plain text to the relay on loopback.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use super::layout::Upstream;
use crate::backend::transport::{brief, with_tls_hint};

/// Bound on the connect handshake frames the relay reads (they are about 50 bytes).
const MAX_HANDSHAKE_FRAME: usize = 4096;

/// TLS to the servers (their `secureClientPort`).
#[derive(Clone)]
pub(super) struct Tls {
    pub(super) connector: TlsConnector,
    /// A client certificate is presented: a refused handshake is then not read as the server
    /// wanting one.
    pub(super) client_cert: bool,
}

/// What the server answered to a connect request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Handshake {
    pub(super) session_id: i64,
    pub(super) password: Vec<u8>,
    pub(super) timeout_ms: i32,
}

/// A jute `ConnectRequest`: `protocolVersion:int lastZxidSeen:long timeOut:int sessionId:long
/// passwd:buffer` and, from newer clients, `readOnly:bool`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ConnectRequest {
    pub(super) protocol_version: i32,
    pub(super) last_zxid_seen: i64,
    pub(super) timeout_ms: i32,
    pub(super) session_id: i64,
    pub(super) password: Vec<u8>,
    /// What follows the password (the readOnly flag).
    pub(super) rest: Vec<u8>,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn buffer(&mut self) -> Option<Vec<u8>> {
        let n = self.i32()?;
        if n < 0 {
            return Some(Vec::new());
        }
        Some(self.take(usize::try_from(n).ok()?)?.to_vec())
    }
}

impl ConnectRequest {
    pub(super) fn parse(b: &[u8]) -> Option<ConnectRequest> {
        let mut r = Reader(b);
        Some(ConnectRequest {
            protocol_version: r.i32()?,
            last_zxid_seen: r.i64()?,
            timeout_ms: r.i32()?,
            session_id: r.i64()?,
            password: r.buffer()?,
            rest: r.0.to_vec(),
        })
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.password.len() + self.rest.len());
        b.extend_from_slice(&self.protocol_version.to_be_bytes());
        b.extend_from_slice(&self.last_zxid_seen.to_be_bytes());
        b.extend_from_slice(&self.timeout_ms.to_be_bytes());
        b.extend_from_slice(&self.session_id.to_be_bytes());
        b.extend_from_slice(&(self.password.len() as i32).to_be_bytes());
        b.extend_from_slice(&self.password);
        b.extend_from_slice(&self.rest);
        b
    }
}

/// A jute `ConnectResponse`: `protocolVersion:int timeOut:int sessionId:long passwd:buffer`
/// (then `readOnly:bool`). Session id 0 means the session asked for has expired.
pub(super) fn parse_connect_response(b: &[u8]) -> Option<Handshake> {
    let mut r = Reader(b);
    let _protocol = r.i32()?;
    let timeout_ms = r.i32()?;
    let session_id = r.i64()?;
    let password = r.buffer()?;
    Some(Handshake {
        session_id,
        password,
        timeout_ms,
    })
}

async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let len = r.read_i32().await?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_HANDSHAKE_FRAME)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a handshake frame of {len} bytes"),
            )
        })?;
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(4 + body.len());
    b.extend_from_slice(&(body.len() as i32).to_be_bytes());
    b.extend_from_slice(body);
    w.write_all(&b).await
}

#[derive(Default)]
struct RelayState {
    /// Session id and password to put into connect requests that ask for a new session.
    attach: Option<(i64, Vec<u8>)>,
    /// The last session the server handed out.
    handshake: Option<Handshake>,
    /// The server of the last established connection.
    current: Option<usize>,
    /// Why each server could not be reached, last time it was tried.
    failures: Vec<Option<String>>,
    /// The servers whose connection was dropped for answering nothing: the client's next try
    /// of each is turned away at once, so that it moves to another server without waiting.
    silent: Vec<bool>,
}

struct RelayShared {
    upstreams: Vec<Upstream>,
    tls: Option<Tls>,
    connect_timeout: Duration,
    state: Mutex<RelayState>,
}

impl RelayShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A relay on loopback in front of each server of the connect string, through which the
/// client of one session connects: it sees the session handshake (see the module
/// documentation) and copies everything else unchanged.
pub(super) struct Proxy {
    listeners: Vec<SocketAddr>,
    shared: Arc<RelayShared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Each listener task owns its connections: aborting it closes them.
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Proxy {
    pub(super) async fn start(
        upstreams: &[Upstream],
        tls: Option<Tls>,
        attach: Option<(i64, Vec<u8>)>,
        connect_timeout: Duration,
    ) -> std::io::Result<Proxy> {
        let shared = Arc::new(RelayShared {
            upstreams: upstreams.to_vec(),
            tls,
            connect_timeout,
            state: Mutex::new(RelayState {
                attach,
                failures: vec![None; upstreams.len()],
                silent: vec![false; upstreams.len()],
                ..Default::default()
            }),
        });
        let mut proxy = Proxy {
            listeners: Vec::new(),
            shared: shared.clone(),
            tasks: Vec::new(),
        };
        for i in 0..upstreams.len() {
            let listener = match TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(_) => TcpListener::bind("[::1]:0").await?,
            };
            proxy.listeners.push(listener.local_addr()?);
            proxy
                .tasks
                .push(tokio::spawn(accept(listener, i, shared.clone())));
        }
        Ok(proxy)
    }

    /// The connect string of the relays, one per server, in the same order.
    pub(super) fn connect_string(&self) -> String {
        self.listeners
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// From now on, requests for a new session pass unchanged.
    pub(super) fn stop_attaching(&self) {
        self.shared.lock().attach = None;
    }

    pub(super) fn handshake(&self) -> Option<Handshake> {
        self.shared.lock().handshake.clone()
    }

    pub(super) fn current(&self) -> Option<Upstream> {
        let i = self.shared.lock().current?;
        self.shared.upstreams.get(i).cloned()
    }

    /// `host:port: why` of each server that failed last time, or None.
    pub(super) fn failures(&self) -> Option<String> {
        let state = self.shared.lock();
        let f: Vec<String> = state
            .failures
            .iter()
            .zip(&self.shared.upstreams)
            .filter_map(|(f, u)| f.as_ref().map(|f| format!("{u}: {f}")))
            .collect();
        (!f.is_empty()).then(|| f.join(", "))
    }

    /// ` (host:port: why, …)` for an error message, or nothing when no server failed.
    pub(super) fn failures_note(&self) -> String {
        self.failures()
            .map(|f| format!(" ({f})"))
            .unwrap_or_default()
    }
}

async fn accept(listener: TcpListener, upstream: usize, shared: Arc<RelayShared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((down, _)) => {
                    conns.spawn(relay(down, upstream, shared.clone()));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "session relay accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// `brief(e)` of a failure on the connection to a server, with what to set when it is a TLS
/// connection's failure the catalog's `tls` can fix (during the handshake, or at the first
/// read with TLS 1.3, where a refused client certificate arrives after the handshake).
fn server_failure(tls: Option<&Tls>, e: &std::io::Error) -> String {
    match tls {
        Some(t) => with_tls_hint(brief(e), "ZooKeeper", e, t.client_cert),
        None => brief(e),
    }
}

/// A connection to a ZooKeeper server: plain TCP or TLS.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to `u`, over TLS when `tls` is set (the server's `secureClientPort`).
pub(super) async fn dial(u: &Upstream, tls: Option<&Tls>) -> std::io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect((u.host.as_str(), u.port)).await?;
    let _ = tcp.set_nodelay(true);
    let Some(t) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = ServerName::try_from(u.host.clone()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{:?} is no TLS server name: {e}", u.host),
        )
    })?;
    let stream = t.connector.connect(name, tcp).await.map_err(|e| {
        // A text of its own (not shortened to its kind by `brief`): the hint must stay.
        std::io::Error::other(format!("TLS handshake: {}", server_failure(tls, &e)))
    })?;
    Ok(Box::new(stream))
}

async fn relay(mut down: TcpStream, i: usize, shared: Arc<RelayShared>) {
    let Some(target) = shared.upstreams.get(i).cloned() else {
        return;
    };
    if shared.lock().silent.get_mut(i).is_some_and(std::mem::take) {
        // Dropping the client's connection sends it to the next server at once.
        return;
    }
    let connected =
        tokio::time::timeout(shared.connect_timeout, dial(&target, shared.tls.as_ref())).await;
    let mut up = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.lock().failures[i] = Some(brief(&e));
            return;
        }
        Err(_) => {
            shared.lock().failures[i] = Some("timed out".into());
            return;
        }
    };
    shared.lock().failures[i] = None;
    let _ = down.set_nodelay(true);
    // A live server answers a session handshake at once (one without a quorum closes the
    // connection); a hung one is left for the next after [`SILENT`], as during a session.
    let handshake =
        tokio::time::timeout(SILENT, relay_handshake(&mut down, &mut up, i, &shared)).await;
    match handshake {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(server = %target, error = %e, "session handshake failed");
            // (TLS hints are in the message already.)
            let hint = if shared.tls.is_none() && e.kind() == std::io::ErrorKind::UnexpectedEof {
                " (a server without a quorum does that; so does a TLS port: if this is \
                 ZooKeeper's secureClientPort, set zookeeper.tls)"
            } else {
                ""
            };
            shared.lock().failures[i] = Some(format!("{e}{hint}"));
            return;
        }
        Err(_) => {
            shared.lock().failures[i] = Some("no answer to the session handshake".into());
            return;
        }
    }
    let (dr, dw) = down.into_split();
    let (ur, uw) = tokio::io::split(up);
    // Since when the client waits for the server: set by a request forwarded, cleared by any
    // answer. A ZooKeeper client pings when idle, so a hung server shows here too.
    let (waiting, watched) = tokio::sync::watch::channel(None::<Instant>);
    let asked = || {
        waiting.send_if_modified(|w| {
            let first = w.is_none();
            w.get_or_insert_with(Instant::now);
            first
        });
    };
    let answered = || {
        waiting.send_if_modified(|w| w.take().is_some());
    };
    // Either side closing ends the connection (ZooKeeper has no half-closed state).
    tokio::select! {
        _ = pump(dr, uw, asked) => {}
        _ = pump(ur, dw, answered) => {}
        silent = silent_for(watched) => {
            // The client moves the session to the next server on its own once this
            // connection is gone; the session stays the same.
            tracing::info!(server = %target, ?silent, "the ZooKeeper server answers nothing; moving the session to another server");
            let mut state = shared.lock();
            state.failures[i] = Some(format!("answered nothing for {silent:?}"));
            state.silent[i] = true;
        }
    }
}

/// How long a server may leave a request (a ping included) unanswered before the connection
/// to it is dropped and the session moves on: far above what a live server takes, far below
/// the two thirds of the session timeout after which the client would give up by itself.
pub(super) const SILENT: Duration = Duration::from_secs(1);

/// Copies `from` to `to`, calling `moved` after each chunk.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    moved: impl Fn(),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        moved();
    }
}

/// Resolves once a request has waited [`SILENT`] for an answer (`waiting`: since when one
/// waits, `None` while none does): how long. Sleeps until that deadline, or until told of a
/// change; nothing runs while the connection is idle or answered.
async fn silent_for(mut waiting: tokio::sync::watch::Receiver<Option<Instant>>) -> Duration {
    loop {
        let since = *waiting.borrow_and_update();
        match since {
            Some(since) => tokio::select! {
                () = tokio::time::sleep_until((since + SILENT).into()) => return since.elapsed(),
                changed = waiting.changed() => if changed.is_err() { std::future::pending::<()>().await },
            },
            None => {
                if waiting.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

async fn relay_handshake(
    down: &mut TcpStream,
    up: &mut Box<dyn Io>,
    i: usize,
    shared: &RelayShared,
) -> std::io::Result<()> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    // Failures towards the server may want a TLS hint; those of the local client may not.
    let context = |what: &'static str| {
        move |e: std::io::Error| {
            let why = server_failure(shared.tls.as_ref(), &e);
            std::io::Error::new(e.kind(), format!("{what}: {why}"))
        }
    };
    let request = read_frame(down).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("reading the client's connect request: {}", brief(&e)),
        )
    })?;
    let mut parsed =
        ConnectRequest::parse(&request).ok_or_else(|| invalid("malformed connect request"))?;
    let attach = shared.lock().attach.clone();
    let request = match attach {
        Some((id, password)) if parsed.session_id == 0 => {
            parsed.session_id = id;
            parsed.password = password;
            parsed.encode()
        }
        _ => request,
    };
    write_frame(up, &request)
        .await
        .map_err(context("sending the connect request"))?;
    // A server that is not serving yet (starting, or without a quorum) closes here.
    let response = read_frame(up).await.map_err(context(
        "the server closed the connection in the session handshake",
    ))?;
    let hs =
        parse_connect_response(&response).ok_or_else(|| invalid("malformed connect response"))?;
    {
        let mut state = shared.lock();
        if hs.session_id != 0 {
            state.handshake = Some(hs);
            state.current = Some(i);
        }
    }
    write_frame(down, &response).await
}

/// Mode and version from a `srvr` four-letter command, best effort (it may be disabled).
pub(super) async fn srvr(
    u: &Upstream,
    tls: Option<&Tls>,
) -> Option<(Option<String>, Option<String>)> {
    let ask = async {
        let mut s = dial(u, tls).await.ok()?;
        s.write_all(b"srvr").await.ok()?;
        let mut out = Vec::new();
        (&mut s).take(64 * 1024).read_to_end(&mut out).await.ok()?;
        Some(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()??;
    Some(parse_srvr(&text))
}

/// `(mode, version)` of a `srvr` answer.
pub(super) fn parse_srvr(text: &str) -> (Option<String>, Option<String>) {
    let mut mode = None;
    let mut version = None;
    for line in text.lines() {
        if let Some(m) = line.strip_prefix("Mode:") {
            mode = Some(m.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Zookeeper version:") {
            version = v.split(',').next().map(|v| v.trim().to_string());
        }
    }
    (
        mode.filter(|m| !m.is_empty()),
        version.filter(|v| !v.is_empty()),
    )
}
