use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    catalog_bridge::cli::run(catalog_bridge::cli::Cli::parse()).await
}
