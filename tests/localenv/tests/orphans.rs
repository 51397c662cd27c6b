//! A test binary that dies without unwinding (SIGKILL, abort) still leaves no server behind:
//! every peer carries a parent-death signal.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")
        .expect("/proc is readable")
        .flatten()
    {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Running, sleeping or stopped; not gone and not a zombie waiting for init to reap it.
fn is_live(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

#[test]
fn killing_the_owner_kills_every_peer() {
    let mut owner = Command::new(env!("CARGO_BIN_EXE_localenv"))
        .arg("--no-controller-manager")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("localenv starts");
    let stdout = owner.stdout.take().expect("piped stdout");
    let mut up = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("localenv output is text");
        if line.contains("Press Ctrl-C") {
            up = true;
            break;
        }
    }
    assert!(up, "localenv came up (its stderr above says why not)");
    let peers = children_of(owner.id());
    assert!(
        peers.len() >= 5,
        "expected kube-apiserver, its etcd, consul, etcd, zookeeper as children, got {peers:?}"
    );

    owner.kill().expect("SIGKILL the owner");
    owner.wait().expect("reap the owner");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut alive = peers.clone();
    while !alive.is_empty() && Instant::now() < deadline {
        alive.retain(|p| is_live(*p));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(alive.is_empty(), "peers outlived their owner: {alive:?}");
}
