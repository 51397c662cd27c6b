//! The command line: subcommands and their options.

use clap::{Parser, Subcommand};

/// Keeps Consul, etcd and ZooKeeper service catalogs in sync with Kubernetes, both ways.
#[derive(Debug, Parser)]
#[command(name = "catalog-bridge", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions (the content of `crds/`) as YAML.
    Crds,
    /// Print the version and exit.
    Version,
}

/// Runs the chosen subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crds => {
            print!("{}", crate::crd::crds_yaml()?);
            Ok(())
        }
        Command::Version => {
            println!("catalog-bridge {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
