//! catalog-bridge keeps Consul, etcd and ZooKeeper service catalogs in sync with Kubernetes,
//! both ways. The folders follow the data flow (docs/architecture.md):
//!
//! - [`api`]: the custom resources, annotations and labels (types only);
//! - [`model`]: the domain without clients: instances, records and operations, reasons and
//!   problems, the address rules;
//! - [`runtime`]: backoff, supervision, the loop's health, metrics;
//! - [`backend`]: one trait, one folder per catalog, an in-memory one for tests;
//! - [`k8s`]: watches and stores, Secrets, the session Secret, building a catalog's backend;
//! - [`export`]: desired state → plan → one writer per catalog;
//! - [`import`]: a catalog's instances → a Service and its EndpointSlices;
//! - [`status`]: conditions, status and Events;
//! - [`commands`]: `query` and `cleanup`;
//! - [`app`]: the command line and `run`, which wires and supervises everything.

#![deny(warnings)]

pub mod api;
pub mod app;
pub mod backend;
pub mod commands;
pub mod export;
pub mod import;
pub mod k8s;
pub mod model;
pub mod runtime;
pub mod status;

#[cfg(test)]
pub mod fixtures;
