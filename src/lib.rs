//! catalog-bridge keeps Consul, etcd and ZooKeeper service catalogs in sync with Kubernetes,
//! both ways. See `docs/architecture.md` for how the pieces fit together.

#![deny(warnings)]

pub mod backend;
pub mod catalogs;
pub mod cleanup;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod desired;
pub mod http;
pub mod import;
pub mod importer;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod query;
pub mod sessions;
pub mod status;
pub mod writer;
