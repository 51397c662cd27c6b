//! `catalog-bridge run`: wires the watches, the desired-state loop, the writers' and imports'
//! supervisors, status, leader election and the HTTP endpoints, and supervises them: if a
//! watch, the loop, the status loop, the gate or the HTTP server ends, `run` returns the error
//! (the Pod restarts) instead of limping on. Writers and imports are supervised one by one
//! (`runtime::supervisor`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::k8s::cached::CachedService;
use crate::k8s::cached::CachedSlice;
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::runtime::watcher;
use tokio::sync::{broadcast, watch};
use tracing::info;

use super::desired_loop::{self, Outputs};
use super::health::Health;
use super::options::Options;
use crate::api::crd::{ExternalCatalog, ExternalRegistration};
use crate::export::desired::Desired;
use crate::export::writers::{self, CatalogView, Writers};
use crate::import::render::Kind;
use crate::import::{ImportView, Importers, Touched, Watched};
use crate::k8s::catalogs::{Catalogs, SessionSecret};
use crate::k8s::finalizers::KubeFinalizers;
use crate::k8s::stores::{Stores, Tap, reflect};
use crate::runtime::Metrics;
use crate::runtime::health::Changes;

/// A tap that tells the imports about changes to the objects they maintain.
fn touched_by<K: kube::Resource + 'static>(kind: Kind, tx: broadcast::Sender<Touched>) -> Tap<K> {
    Box::new(move |ev: &watcher::Event<K>| {
        if let Some(t) = Touched::from_event(kind, ev) {
            let _ = tx.send(t); // no import running: nobody to tell
        }
    })
}

/// Runs the controller until a task fails or Ctrl-C / SIGTERM.
pub async fn run(client: kube::Client, opts: Options) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let changes = Arc::new(Changes::default());
    // Changes to imported objects, for the import tasks to undo someone else's.
    let (touched, _) = broadcast::channel(1024);
    let (services, t1) = reflect(
        Api::<CachedService>::all(client.clone()),
        changes.clone(),
        Some(touched_by(Kind::Service, touched.clone())),
    );
    let (slices, t2) = reflect(
        Api::<CachedSlice>::all(client.clone()),
        changes.clone(),
        Some(touched_by(Kind::EndpointSlice, touched.clone())),
    );
    let (catalogs, t3) = reflect(
        Api::<ExternalCatalog>::all(client.clone()),
        changes.clone(),
        None,
    );
    let (registrations, t4) = reflect(
        Api::<ExternalRegistration>::all(client.clone()),
        changes.clone(),
        None,
    );
    let (namespaces, t5) = reflect(Api::<Namespace>::all(client.clone()), changes.clone(), None);
    let stores = Stores {
        services,
        slices,
        catalogs,
        registrations,
        namespaces,
    };

    let (synced_tx, synced) = watch::channel(false);
    // A dry run writes nothing to Kubernetes either: it takes no part in the election (it
    // would take the Lease from the real replicas) and plans as if it led.
    let (leader, lease) = if opts.dry_run {
        info!("dry run: not joining the leader election; planning as if leading");
        (None, None)
    } else {
        let (leader, lease) = super::leader::elect(client.clone(), &opts, metrics.clone()).await?;
        (Some(leader), Some(lease))
    };
    // Writers open only while this replica leads and every cache is complete.
    let (gate, gate_task) = super::gate::gate(leader, synced.clone());

    let health = Health {
        metrics: metrics.clone(),
        synced: synced.clone(),
        changes: changes.clone(),
    };
    let http = tokio::spawn(super::http::serve(opts.metrics_addr, health));

    let connect = Arc::new(Catalogs {
        client: client.clone(),
        owner: opts.owner.clone(),
        cluster: opts.cluster.clone(),
        sessions: SessionSecret {
            client: client.clone(),
            namespace: opts.lease_namespace.clone(),
            name: opts.session_secret.clone(),
        },
    });
    let writers = Writers::new(
        connect.clone(),
        writers::Settings {
            dry_run: opts.dry_run,
            drift_interval: opts.drift_interval,
        },
        gate.clone(),
        metrics.clone(),
    );
    // A dry run writes nothing to Kubernetes: no finalizer.
    let writers = if opts.dry_run {
        writers
    } else {
        writers.finalizing(Arc::new(KubeFinalizers::new(client.clone())))
    };
    let importers = Importers::new(
        client.clone(),
        connect,
        gate.clone(),
        metrics.clone(),
        Watched {
            services: stores.services.clone(),
            slices: stores.slices.clone(),
            registrations: stores.registrations.clone(),
            touched,
        },
        opts.dry_run,
    );
    let (desired_tx, desired_rx) = watch::channel(Arc::new(Desired::default()));
    let (views_tx, views_rx) = watch::channel(BTreeMap::<String, CatalogView>::new());
    let (imports_tx, imports_rx) = watch::channel(HashMap::<(String, String), ImportView>::new());
    let desired_loop = tokio::spawn(desired_loop::run(
        stores.clone(),
        changes,
        writers,
        importers,
        metrics.clone(),
        Outputs {
            desired: desired_tx,
            catalogs: views_tx,
            imports: imports_tx,
            synced: synced_tx,
        },
    ));

    // No status and no Events from a dry run.
    let status_loop = if opts.dry_run {
        tokio::spawn(std::future::pending())
    } else {
        tokio::spawn(crate::status::run(
            client.clone(),
            stores.clone(),
            crate::status::Views {
                desired: desired_rx,
                catalogs: views_rx,
                imports: imports_rx,
            },
            gate.clone(),
        ))
    };

    let outcome = tokio::select! {
        r = t1 => flatten("Service watch", r),
        r = t2 => flatten("EndpointSlice watch", r),
        r = t3 => flatten("ExternalCatalog watch", r),
        r = t4 => flatten("ExternalRegistration watch", r),
        r = t5 => flatten("Namespace watch", r),
        r = gate_task => flatten("leader gate", r),
        r = desired_loop => flatten("desired-state loop", r),
        r = status_loop => flatten("status loop", r),
        r = http => flatten("HTTP server", r),
        r = shutdown_signal() => r.map(|()| info!("shutting down")),
    };
    if let Some(lease) = lease {
        lease.release().await;
    }
    outcome
}

fn flatten(what: &str, r: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match r {
        Ok(Ok(())) => bail!("{what} stopped"),
        Ok(Err(e)) => Err(e).with_context(|| format!("{what} failed")),
        Err(e) => Err(anyhow::Error::new(e)).with_context(|| format!("{what} panicked")),
    }
}

async fn shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
