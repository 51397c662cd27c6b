//! A TCP proxy on a free loopback port in front of one server, which a test can cut and
//! restore: the way to take one client's connection to a server away (a network partition of
//! one replica) while every other client keeps reaching it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards every connection to its target while open; [`Proxy::cut`] closes the connections it
/// carries and refuses new ones until [`Proxy::restore`]. Stops when dropped.
pub struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    // Bumped on every cut: the connections of an earlier generation close.
    cuts: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`. Must be called within a
    /// Tokio runtime, which runs the proxy.
    pub async fn start(target: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy's port")?;
        let port = listener.local_addr().context("the proxy's port")?.port();
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0u64);
        let accept = tokio::spawn(accept_loop(listener, target, open.clone(), cuts.clone()));
        Ok(Proxy {
            port,
            open,
            cuts,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        if !open.load(Ordering::SeqCst) {
            drop(inbound); // refused: closed at once
            continue;
        }
        let mut cut = cuts.subscribe();
        let generation = *cut.borrow_and_update();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.wait_for(|g| *g != generation) => {}
            }
            // Dropping both ends closes them: the client sees its connection gone.
        });
    }
}
