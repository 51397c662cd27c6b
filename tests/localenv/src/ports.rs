//! Free loopback ports, never handed out twice by one process.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};

/// A TCP port on 127.0.0.1 that is free now and that this process has not handed out before.
pub fn free_port() -> Result<u16> {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let taken = TAKEN.get_or_init(Default::default);
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
        let port = l.local_addr().context("reading a bound port")?.port();
        let mut t = taken.lock().unwrap_or_else(|e| e.into_inner());
        if t.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free loopback port found in 100 tries")
}
