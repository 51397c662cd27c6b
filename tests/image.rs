//! The image `make image` writes, without Docker: the controller binary with what it loads, run
//! from the image's own files alone (a chroot of its layer) as the non-root user 65532; and
//! the same binary gives the same image, byte for byte.

use anyhow::{Context, Result, ensure};

#[test]
fn the_image_runs_from_its_own_files_as_non_root_and_is_reproducible() -> Result<()> {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_catalog-bridge"));
    let dir = tempfile::tempdir()?;
    let (one, two) = (dir.path().join("one.tar"), dir.path().join("two.tar"));
    let id = localenv::image::catalog_bridge(binary, "catalog-bridge:test", &one)?;
    let again = localenv::image::catalog_bridge(binary, "catalog-bridge:test", &two)?;
    ensure!(id == again, "{id} then {again}");
    ensure!(
        std::fs::read(&one)? == std::fs::read(&two)?,
        "the archives differ"
    );

    let archive = dir.path().join("archive");
    std::fs::create_dir(&archive)?;
    localenv::run_tool(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(&one)
            .arg("-C")
            .arg(&archive),
    )?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(archive.join("manifest.json"))?)?;
    let layer = manifest[0]["Layers"][0].as_str().context("one layer")?;
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(
        archive.join(manifest[0]["Config"].as_str().context("a config")?),
    )?)?;
    ensure!(config["config"]["User"] == "65532:65532", "{config}");
    ensure!(format!("sha256:{}", &id[7..]) == id, "{id}");
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    localenv::run_tool(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(archive.join(layer))
            .arg("-C")
            .arg(&root),
    )?;
    // Only the image's files: a library missing from the layer fails here.
    let out = localenv::run_tool(
        std::process::Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(&root)
            .args(["/catalog-bridge", "version"]),
    )?;
    println!("{id}: {out}");
    ensure!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    Ok(())
}
