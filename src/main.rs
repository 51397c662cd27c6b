use clap::Parser;

/// jemalloc instead of the C library's allocator: the controller builds large short-lived
/// structures (a catalog's owned entries read back, a plan of 100,000 operations) between
/// long-lived ones, and glibc kept the freed memory resident, several times the live heap at
/// 100,000 instances; jemalloc's background threads return it (`make bench` prints the RSS).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    catalog_bridge::app::cli::run(catalog_bridge::app::cli::Cli::parse()).await
}
