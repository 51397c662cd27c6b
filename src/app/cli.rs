//! The command line: subcommands and their options.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;

use super::options::Options;

/// Keeps Consul, etcd and ZooKeeper service catalogs in sync with Kubernetes, both ways.
#[derive(Debug, Parser)]
#[command(name = "catalog-bridge", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CATALOG_BRIDGE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, global = true, default_value = "info", env = "RUST_LOG")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions (the content of `crds/`) as YAML.
    Crds,
    /// Ask a catalog where a service is: `api_x @ 10.0.0.1:8080 & 10.0.0.2:8080`.
    Query(QueryArgs),
    /// Remove every entry this owner id wrote to a catalog (after an uninstall); an
    /// ExternalCatalog being deleted is then let go (its finalizer lifted).
    Cleanup(CleanupArgs),
    /// Delete the ExternalCatalogs matching a label selector and wait until each is gone (the
    /// running controller removes their entries first): the chart's pre-delete hook.
    DeleteCatalogs(DeleteCatalogsArgs),
    /// Print the version and exit.
    Version,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Owner id written into every entry; default: the UID of the kube-system namespace, unique
    /// per cluster. Each catalog records which cluster claimed an owner id (that UID); one
    /// claimed by another cluster is not written to.
    #[arg(long, env = "CATALOG_BRIDGE_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Log the plan and write nothing to any catalog.
    #[arg(long)]
    pub dry_run: bool,
    /// How often each catalog's owned state is re-read to find and repair drift.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drift_interval: Duration,
    /// Namespace of the leader Lease; default: this Pod's namespace, else `default`.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    #[arg(long, default_value = "catalog-bridge")]
    pub lease_name: String,
    /// How long a Lease is held without renewal before another replica may take it. A crashed
    /// leader's catalog entries outlive it by etcd's `leaseTTLSeconds` (default 15) and
    /// ZooKeeper's `sessionTimeoutSeconds` (default 10): keep this, plus a few seconds to sync
    /// the caches, below both, so that the standby re-attaches before they expire.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// The Secret, in the Lease's namespace, that keeps ZooKeeper session ids and passwords so
    /// that a restarted controller or a new leader re-attaches to the live session.
    #[arg(long, default_value = "catalog-bridge-zk-sessions")]
    pub session_secret: String,
    /// This replica's identity in the Lease; default: the Pod name or host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
}

#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// An ExternalCatalog name, or a URL: `consul://host:port` (`consul+https://`),
    /// `etcd://host:port[,host:port][/basePath]?layout=plain|naming|coredns&zone=…`,
    /// `zk://host:port[,host:port][/basePath]?layout=plain|curator`.
    pub catalog: String,
    /// The service name in the catalog.
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// The ExternalCatalog to clean.
    #[arg(long)]
    pub catalog: String,
    /// The owner id whose entries go; default: this cluster's (the kube-system namespace UID).
    #[arg(long, env = "CATALOG_BRIDGE_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Namespace and name of the Secret holding ZooKeeper sessions (as given to `run`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub session_namespace: String,
    #[arg(long, default_value = "catalog-bridge-zk-sessions")]
    pub session_secret: String,
    /// Count what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct DeleteCatalogsArgs {
    /// Which ExternalCatalogs, as a label selector (`app.kubernetes.io/instance=cb`).
    #[arg(long)]
    pub selector: String,
    /// How long to wait until they are gone before failing with what is left.
    #[arg(long, default_value = "4m", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Parses `500ms`, `30s`, `5m`, `1h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 5m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// A client of the in-cluster API server, or of the one `KUBECONFIG` names.
async fn kube_client() -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")
}

/// Makes ring the TLS provider of the process (kube, reqwest and etcd share it).
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs the chosen subcommand.
pub async fn run(cli: Cli) -> Result<()> {
    install_crypto_provider();
    match cli.command {
        Command::Crds => {
            print!("{}", crate::api::crd::crds_yaml()?);
            Ok(())
        }
        Command::Version => {
            println!("catalog-bridge {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Query(q) => {
            init_logging(cli.log_format, "warn");
            let line = crate::commands::query::query(&q.catalog, &q.name).await?;
            println!("{line}");
            Ok(())
        }
        Command::DeleteCatalogs(args) => {
            init_logging(cli.log_format, "warn");
            let client = kube_client().await?;
            let names = crate::commands::delete_catalogs::delete_catalogs(
                &client,
                &args.selector,
                args.timeout,
            )
            .await?;
            if names.is_empty() {
                println!("no ExternalCatalog labelled {}", args.selector);
            } else {
                println!(
                    "deleted {}: this cluster's entries removed from each",
                    names.join(", ")
                );
            }
            Ok(())
        }
        Command::Cleanup(args) => {
            init_logging(cli.log_format, "warn");
            let client = kube_client().await?;
            let cluster = kube_system_uid(&client).await?;
            let owner = owner(args.cluster_id, &cluster);
            let sessions = crate::k8s::catalogs::SessionSecret {
                client: client.clone(),
                namespace: args.session_namespace,
                name: args.session_secret,
            };
            let cleaned = crate::commands::cleanup::cleanup(
                &client,
                &args.catalog,
                &owner,
                &cluster,
                sessions,
                args.dry_run,
            )
            .await?;
            let out = &cleaned.outcome;
            if args.dry_run {
                println!(
                    "{} entries of owner {owner} in {} (dry run: none removed)",
                    out.removed, args.catalog
                );
            } else {
                println!(
                    "removed {} entries of owner {owner} from {} in {} round trip(s)",
                    out.removed, args.catalog, out.round_trips
                );
                if let Some(retired) = &out.retired {
                    println!("{retired}");
                }
                if cleaned.let_go {
                    println!(
                        "ExternalCatalog {} was being deleted: its finalizer is lifted, it goes",
                        args.catalog
                    );
                }
            }
            Ok(())
        }
        Command::Run(args) => {
            init_logging(cli.log_format, &cli.log);
            let client = kube_client().await?;
            let cluster = kube_system_uid(&client).await?;
            let owner = owner(args.cluster_id, &cluster);
            let identity = args.identity.unwrap_or_else(|| {
                std::env::var("HOSTNAME")
                    .unwrap_or_else(|_| format!("catalog-bridge-{}", std::process::id()))
            });
            tracing::info!(%owner, %cluster, %identity, dry_run = args.dry_run, "catalog-bridge starting");
            let opts = Options {
                owner,
                cluster,
                dry_run: args.dry_run,
                drift_interval: args.drift_interval,
                lease_namespace: args.lease_namespace.unwrap_or_else(|| "default".into()),
                lease_name: args.lease_name,
                identity,
                lease_duration: args.lease_duration,
                session_secret: args.session_secret,
                metrics_addr: args.metrics_addr,
            };
            super::run::run(client, opts).await
        }
    }
}

/// The owner id: `--cluster-id` when given, else `cluster` (the kube-system UID).
fn owner(cluster_id: Option<String>, cluster: &str) -> String {
    match cluster_id {
        Some(id) if !id.trim().is_empty() => id.trim().to_string(),
        _ => cluster.to_string(),
    }
}

/// The UID of the kube-system namespace: stable for the life of the cluster and unique to it.
/// It is the default owner id, and names this cluster in the owner marker of every catalog
/// written to, whatever the owner id (`backend::claim`).
async fn kube_system_uid(client: &kube::Client) -> Result<String> {
    let ns = Api::<Namespace>::all(client.clone())
        .get("kube-system")
        .await
        .context("reading the kube-system namespace: its UID names this cluster (the default owner id, and the owner marker in each catalog); needs get on namespaces/kube-system")?;
    match ns.metadata.uid {
        Some(uid) => Ok(uid),
        None => bail!("the kube-system namespace has no uid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
