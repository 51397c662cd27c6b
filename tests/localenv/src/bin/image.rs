//! `image`: the catalog-bridge container image without Docker (used by `make image`): the
//! release binary with the shared libraries it loads, the CA bundle and the non-root user
//! 65532, as a docker-archive that `docker load` and `ctr images import` read. The same binary
//! on the same machine gives the same bytes.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(name = "image")]
struct Args {
    /// The catalog-bridge binary.
    #[arg(long)]
    binary: PathBuf,
    /// The image's name and tag.
    #[arg(long, default_value = concat!("catalog-bridge:", env!("CARGO_PKG_VERSION")))]
    tag: String,
    /// Where the docker-archive goes.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let id = localenv::image::catalog_bridge(&args.binary, &args.tag, &args.out)?;
    println!("{} {id} {}", args.tag, args.out.display());
    Ok(())
}
