//! Container images without Docker: a docker-archive tarball — what `docker save` writes and
//! `docker load` and `ctr images import` read — of one layer holding the given files, with the
//! image's configuration. The same input gives the same bytes: entries sorted, times at 0,
//! owners root, modes fixed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ring::digest::{SHA256, digest};
use serde_json::json;

/// A file of the image: its absolute path there, its bytes and its mode.
pub struct ImageFile {
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

impl ImageFile {
    /// `source` on this machine (its target when it is a link) at `path` in the image.
    pub fn from_host(path: &str, source: &Path, mode: u32) -> Result<ImageFile> {
        Ok(ImageFile {
            path: path.to_string(),
            bytes: std::fs::read(source)
                .with_context(|| format!("reading {}", source.display()))?,
            mode,
        })
    }
}

/// What runs: the user, the entrypoint and arguments, ports, labels.
pub struct ImageConfig {
    pub user: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub exposed_ports: Vec<u16>,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    digest(&SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One entry of a tar: its path without a leading `/`, and its bytes and mode (`None`: a
/// directory).
type Entry<'a> = (String, Option<(&'a [u8], u32)>);

/// A tar of `entries`, in the order given: ustar headers with time 0, owner root and the
/// given modes, so that the same entries give the same bytes.
fn tar(entries: &[Entry<'_>]) -> Result<Vec<u8>> {
    let mut out = tar::Builder::new(Vec::new());
    for (path, body) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        let (bytes, mode, kind, path) = match body {
            None => (
                &[][..],
                0o755,
                tar::EntryType::Directory,
                format!("{path}/"),
            ),
            Some((bytes, mode)) => (*bytes, *mode, tar::EntryType::Regular, path.clone()),
        };
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(bytes.len() as u64);
        h.set_path(&path)
            .with_context(|| format!("{path}: not a path a tar holds"))?;
        h.set_cksum();
        out.append(&h, bytes)?;
    }
    Ok(out.into_inner()?)
}

/// The layer: every file and every directory above one, sorted.
fn layer(files: &[ImageFile]) -> Result<Vec<u8>> {
    let mut dirs = BTreeSet::new();
    let mut by_path = BTreeMap::new();
    for f in files {
        let p = f
            .path
            .strip_prefix('/')
            .with_context(|| format!("{}: image paths are absolute", f.path))?;
        let mut parent = Path::new(p).parent();
        while let Some(d) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.display().to_string());
            parent = d.parent();
        }
        if by_path.insert(p.to_string(), f).is_some() {
            bail!("{} is given twice", f.path);
        }
    }
    let mut entries: Vec<Entry<'_>> = dirs.into_iter().map(|d| (d, None)).collect();
    entries.extend(
        by_path
            .into_iter()
            .map(|(p, f)| (p, Some((f.bytes.as_slice(), f.mode)))),
    );
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    tar(&entries)
}

/// Writes the docker-archive of `files` with `config`, tagged `tag`, to `out`; returns the
/// image id (`sha256:` and the digest of its configuration).
pub fn write_docker_archive(
    out: &Path,
    tag: &str,
    files: &[ImageFile],
    config: &ImageConfig,
) -> Result<String> {
    let layer = layer(files)?;
    let diff_id = sha256_hex(&layer);
    let ports: serde_json::Map<String, serde_json::Value> = (config.exposed_ports.iter())
        .map(|p| (format!("{p}/tcp"), json!({})))
        .collect();
    let image_config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "User": config.user,
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd,
            "Env": config.env,
            "ExposedPorts": ports,
            "Labels": config.labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "localenv::image"}],
    }))?;
    let config_id = sha256_hex(&image_config);
    let manifest = serde_json::to_vec(&json!([{
        "Config": format!("{config_id}.json"),
        "RepoTags": [tag],
        "Layers": [format!("{diff_id}/layer.tar")],
    }]))?;
    let archive = tar(&[
        (diff_id.clone(), None),
        (format!("{diff_id}/layer.tar"), Some((&layer[..], 0o644))),
        (
            format!("{config_id}.json"),
            Some((&image_config[..], 0o644)),
        ),
        ("manifest.json".to_string(), Some((&manifest[..], 0o644))),
    ])?;
    let mut f =
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.write_all(&archive)?;
    Ok(format!("sha256:{config_id}"))
}

/// The shared libraries `binary` loads and its program interpreter, as `ldd` lists them:
/// where each is found on this machine and where the binary looks for it.
pub fn shared_libraries(binary: &Path) -> Result<Vec<(String, std::path::PathBuf)>> {
    let out = crate::run_tool(std::process::Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let real = std::fs::canonicalize(p).with_context(|| format!("resolving {p}"))?;
            libs.push((p.to_string(), real));
        }
    }
    Ok(libs)
}

const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The catalog-bridge image: `binary` with the shared libraries it loads (from this machine),
/// the CA bundle, `/etc/passwd` and `/etc/group` with the non-root user 65532 it runs as, and
/// `/etc/nsswitch.conf`; entrypoint `/catalog-bridge run`, port 8080. Written to `out` as a
/// docker-archive tagged `tag`; returns the image id.
pub fn catalog_bridge(binary: &Path, tag: &str, out: &Path) -> Result<String> {
    let text = |path: &str, body: &str| ImageFile {
        path: path.into(),
        bytes: body.as_bytes().to_vec(),
        mode: 0o644,
    };
    let mut files = vec![
        ImageFile::from_host("/catalog-bridge", binary, 0o755)?,
        ImageFile::from_host(CA_BUNDLE, Path::new(CA_BUNDLE), 0o644)?,
        text(
            "/etc/passwd",
            "root:x:0:0:root:/root:/sbin/nologin\n\
             nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        ),
        text("/etc/group", "root:x:0:\nnonroot:x:65532:\n"),
        // glibc resolves names from /etc/hosts, then DNS (/etc/resolv.conf, which the
        // container runtime mounts).
        text("/etc/nsswitch.conf", "hosts: files dns\n"),
    ];
    for (path, found) in shared_libraries(binary)? {
        files.push(ImageFile::from_host(&path, &found, 0o755)?);
    }
    let config = ImageConfig {
        user: "65532:65532".into(),
        entrypoint: vec!["/catalog-bridge".into()],
        cmd: vec!["run".into()],
        exposed_ports: vec![8080],
        env: vec![format!("SSL_CERT_FILE={CA_BUNDLE}")],
        labels: BTreeMap::from([
            (
                "org.opencontainers.image.title".into(),
                "catalog-bridge".into(),
            ),
            (
                "org.opencontainers.image.licenses".into(),
                "Apache-2.0".into(),
            ),
        ]),
    };
    write_docker_archive(out, tag, &files, &config)
}

/// The Pods' sandbox image: `binary` (a static pause program) at `/pause`, run as 65535.
pub fn pause(binary: &Path, tag: &str, out: &Path) -> Result<String> {
    let config = ImageConfig {
        user: "65535:65535".into(),
        entrypoint: vec!["/pause".into()],
        cmd: Vec::new(),
        exposed_ports: Vec::new(),
        env: Vec::new(),
        labels: BTreeMap::new(),
    };
    let files = [ImageFile::from_host("/pause", binary, 0o755)?];
    write_docker_archive(out, tag, &files, &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_files_give_the_same_bytes_and_the_tar_lists_every_directory() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let files = || {
            vec![
                ImageFile {
                    path: "/b/c/tool".into(),
                    bytes: b"#!x".to_vec(),
                    mode: 0o755,
                },
                ImageFile {
                    path: "/a".into(),
                    bytes: b"1".to_vec(),
                    mode: 0o644,
                },
            ]
        };
        let config = ImageConfig {
            user: "65532:65532".into(),
            entrypoint: vec!["/b/c/tool".into()],
            cmd: vec![],
            exposed_ports: vec![8080],
            env: vec![],
            labels: BTreeMap::new(),
        };
        let (one, two) = (dir.path().join("1.tar"), dir.path().join("2.tar"));
        let id1 = write_docker_archive(&one, "t:1", &files(), &config)?;
        let id2 = write_docker_archive(&two, "t:1", &files(), &config)?;
        assert_eq!(id1, id2);
        assert_eq!(std::fs::read(&one)?, std::fs::read(&two)?);
        let listed = crate::run_tool(std::process::Command::new("tar").arg("-tvf").arg(&one))?;
        assert!(listed.contains("manifest.json"), "{listed}");
        let layer = layer(&files())?;
        let path = dir.path().join("layer.tar");
        std::fs::write(&path, layer)?;
        let names = crate::run_tool(std::process::Command::new("tar").arg("-tf").arg(&path))?;
        assert_eq!(
            names.lines().collect::<Vec<_>>(),
            ["a", "b/", "b/c/", "b/c/tool"]
        );
        Ok(())
    }
}
