use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    catalog_bridge::app::cli::run(catalog_bridge::app::cli::Cli::parse()).await
}
