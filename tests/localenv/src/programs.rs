//! Where the peer programs are. `tests/peers/setup.sh` (run by `make peers`, `make test`,
//! `make env`) builds or installs them and writes their paths to `tests/peers/.env`; a variable
//! of the same name in the environment overrides a line of that file.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};

/// The file written by `tests/peers/setup.sh`.
pub fn env_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peers/.env")
}

fn file_values() -> &'static HashMap<String, String> {
    static VALUES: OnceLock<HashMap<String, String>> = OnceLock::new();
    VALUES.get_or_init(|| {
        std::fs::read_to_string(env_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    })
}

/// The value of `key` (environment first, then `tests/peers/.env`), or an error that says how
/// to get it.
pub fn lookup(key: &str) -> Result<String> {
    if let Ok(v) = std::env::var(key)
        && !v.is_empty()
    {
        return Ok(v);
    }
    file_values().get(key).cloned().ok_or_else(|| {
        anyhow!(
            "{key} is not set and not in {}; run `make peers` to build and install the test peers",
            env_file().display()
        )
    })
}

fn program(key: &str) -> Result<PathBuf> {
    let p = PathBuf::from(lookup(key)?);
    if !p.exists() {
        return Err(anyhow!(
            "{key}={} does not exist; run `make peers` to build and install the test peers",
            p.display()
        ));
    }
    Ok(p)
}

pub fn kube_apiserver() -> Result<PathBuf> {
    program("CB_KUBE_APISERVER")
}
pub fn kube_controller_manager() -> Result<PathBuf> {
    program("CB_KUBE_CONTROLLER_MANAGER")
}
pub fn kubectl() -> Result<PathBuf> {
    program("CB_KUBECTL")
}
pub fn etcd() -> Result<PathBuf> {
    program("CB_ETCD")
}
pub fn etcdctl() -> Result<PathBuf> {
    program("CB_ETCDCTL")
}
/// Reads the etcd `naming` layout with the gRPC resolver's endpoints manager
/// (`tests/peers/etcd/naming-reader`).
pub fn etcd_naming_reader() -> Result<PathBuf> {
    program("CB_ETCD_NAMING_READER")
}
pub fn consul() -> Result<PathBuf> {
    program("CB_CONSUL")
}
pub fn helm() -> Result<PathBuf> {
    program("CB_HELM")
}
pub fn java() -> Result<PathBuf> {
    program("CB_JAVA")
}
/// The Java class path that holds ZooKeeper's server.
pub fn zookeeper_classpath() -> Result<String> {
    lookup("CB_ZOOKEEPER_CLASSPATH")
}
/// The Java class path of the Curator client (`tests/peers/curator-client`).
pub fn curator_classpath() -> Result<String> {
    lookup("CB_CURATOR_CLASSPATH")
}
/// A Python with the real catalog clients installed (kazoo, py-consul).
pub fn python() -> Result<PathBuf> {
    program("CB_PYTHON")
}
pub fn kubelet() -> Result<PathBuf> {
    program("CB_KUBELET")
}
pub fn kube_proxy() -> Result<PathBuf> {
    program("CB_KUBE_PROXY")
}
pub fn kube_scheduler() -> Result<PathBuf> {
    program("CB_KUBE_SCHEDULER")
}
/// Kubernetes' `pause` (build/pause/linux/pause.c), linked static: the Pods' sandbox process.
pub fn pause() -> Result<PathBuf> {
    program("CB_PAUSE")
}
pub fn containerd() -> Result<PathBuf> {
    program("CB_CONTAINERD")
}
/// containerd's own client (`ctr`), for loading images.
pub fn ctr() -> Result<PathBuf> {
    program("CB_CTR")
}
pub fn runc() -> Result<PathBuf> {
    program("CB_RUNC")
}
/// The directory of the CNI plugins (`bridge`, `host-local`, `portmap`).
pub fn cni_bin() -> Result<PathBuf> {
    program("CB_CNI_BIN")
}
