//! The address peers listen on, and free ports there, never handed out twice by one process.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};

static HOST: OnceLock<Ipv4Addr> = OnceLock::new();

/// The address every peer listens on and is reached at: 127.0.0.1, or the node's address in a
/// process that runs a node ([`crate::node`]), where Pods must reach the API server and the
/// catalogs and cannot reach a loopback address that is not theirs.
pub fn host() -> Ipv4Addr {
    HOST.get().copied().unwrap_or(Ipv4Addr::LOCALHOST)
}

/// `,IP:<host>` for a certificate's subjectAltName beside 127.0.0.1 when [`host`] is not
/// 127.0.0.1, else nothing.
pub fn host_san() -> String {
    match host() {
        h if h.is_loopback() => String::new(),
        h => format!(",IP:{h}"),
    }
}

/// Makes `ip` the address of [`host`] for the rest of the process; an error when peers were
/// already told another one.
pub fn set_host(ip: Ipv4Addr) -> Result<()> {
    let set = *HOST.get_or_init(|| ip);
    if set != ip {
        bail!("peers of this process already listen on {set}, not {ip}");
    }
    Ok(())
}

/// Runs `start` (which takes its ports from [`free_port`]) up to three times while it fails
/// because a port was taken between [`free_port`] and the peer's bind: any process's outgoing
/// connection may get that port from the same ephemeral range. Other failures end it at once.
pub async fn retry_if_port_taken<T, F, Fut>(mut start: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        match start().await {
            Err(e)
                if tries < 2
                    && format!("{e:#}")
                        .to_lowercase()
                        .contains("address already in use") =>
            {
                tries += 1;
                eprintln!(
                    "a port was taken before the peer bound it; starting again with new ports"
                );
            }
            other => return other,
        }
    }
}

/// `e`, the failure of a peer that exited before it was ready, with "address already in use"
/// added when one of its `ports` is now taken by another process: for peers whose log does not
/// say so (ZooKeeper's server logs nothing here), so that [`retry_if_port_taken`] tries again.
pub fn explain_exit(e: anyhow::Error, ports: &[u16]) -> anyhow::Error {
    if !format!("{e:#}").contains("exited") {
        return e;
    }
    match ports
        .iter()
        .find(|p| TcpListener::bind((host(), **p)).is_err())
    {
        Some(p) => e.context(format!("port {p}: address already in use")),
        None => e,
    }
}

/// A TCP port on [`host`] that is free now and that this process has not handed out before.
///
/// It is picked below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`): a port of
/// that range may be given to any process's outgoing connection, also while the server that
/// owns it is down for a restart, which then cannot bind it again.
pub fn free_port() -> Result<u16> {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    static NEXT: OnceLock<Mutex<u32>> = OnceLock::new();
    let taken = TAKEN.get_or_init(Default::default);
    let (lo, hi) = below_ephemeral();
    let span = u32::from(hi - lo) + 1;
    // Each process starts at its own place in the range: test binaries that overlap (a
    // benchmark beside the tests) rarely meet.
    let next = NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Mutex::new(std::process::id().wrapping_mul(7919).wrapping_add(nanos) % span)
    });
    let mut at = next.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..span {
        let port = lo + u16::try_from(*at % span).context("port offset")?;
        *at = (*at + 1) % span;
        let mut t = taken.lock().unwrap_or_else(|e| e.into_inner());
        if t.contains(&port) || TcpListener::bind((host(), port)).is_err() {
            continue;
        }
        t.insert(port);
        return Ok(port);
    }
    bail!("no free port of {} between {lo} and {hi}", host())
}

/// The ports below the ephemeral range, from 10000 (or from half of where it begins, when
/// that is lower).
fn below_ephemeral() -> (u16, u16) {
    let first = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(2048);
    ((first / 2).min(10000), first - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many times `retry_if_port_taken` starts something whose tries fail with `errors`
    /// in turn (then succeed), and whether it ends well.
    async fn tries(errors: &[&'static str]) -> (usize, bool) {
        let mut calls = 0;
        let got = retry_if_port_taken(|| {
            calls += 1;
            let err = errors.get(calls - 1).copied();
            async move {
                match err {
                    Some(e) => bail!("{e}"),
                    None => Ok(()),
                }
            }
        })
        .await;
        (calls, got.is_ok())
    }

    #[test]
    fn a_peer_that_exited_while_its_port_is_taken_is_said_to_have_lost_it() -> Result<()> {
        let held = TcpListener::bind("127.0.0.1:0")?;
        let port = held.local_addr()?.port();
        let exited = || anyhow::anyhow!("zookeeper exited (exit status: 1) before it was ready");
        let e = explain_exit(exited(), &[port]);
        assert!(format!("{e:#}").contains("address already in use"), "{e:#}");
        drop(held);
        let e = explain_exit(exited(), &[port]);
        assert!(
            !format!("{e:#}").contains("address already in use"),
            "{e:#}"
        );
        let slow = explain_exit(anyhow::anyhow!("not ready after 90 s"), &[port]);
        assert!(!format!("{slow:#}").contains("in use"));
        Ok(())
    }

    #[tokio::test]
    async fn a_start_that_lost_its_port_is_tried_again_and_nothing_else_is() {
        let taken = "consul exited\n--- log ---\nbind: Address already in use";
        assert_eq!(tries(&[taken, taken]).await, (3, true));
        assert_eq!(
            tries(&["etcd exited: permission denied"]).await,
            (1, false),
            "other failures are not retried"
        );
        assert_eq!(
            tries(&[taken, taken, taken]).await,
            (3, false),
            "three tries at most"
        );
    }
}
