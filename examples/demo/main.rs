//! `make demo`: runs the scenario (see `scenario.rs`), then stays up until Ctrl-C so that it
//! can be explored with the commands it prints.

mod scenario;
#[path = "../../tests/support/mod.rs"]
mod support;

use anyhow::Result;

#[tokio::main]
async fn main() -> Result<()> {
    let demo = scenario::run().await?;
    tokio::signal::ctrl_c().await?;
    eprintln!("==> stopping");
    drop(demo);
    Ok(())
}
