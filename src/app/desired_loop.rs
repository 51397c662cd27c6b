//! The desired-state loop: on every Kubernetes change (coalesced) and every 500 ms, it
//! recomputes desired state, hands each writer its snapshot, brings the import tasks in line,
//! and publishes what the status loop and the metrics read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::k8s::cached::CachedService;
use crate::k8s::cached::CachedSlice;
use anyhow::Result;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;
use tracing::info;

use crate::api::crd::ExternalRegistration;
use crate::export::desired::{self, Desired, Inputs};
use crate::export::writers::{CatalogView, Writers};
use crate::import::{ImportView, Importers};
use crate::k8s::stores::Stores;
use crate::runtime::Metrics;
use crate::runtime::health::Changes;

/// How often the loop turns without a change: views refresh, broken catalogs are retried.
pub const TICK: Duration = Duration::from_millis(500);

/// Where the loop publishes.
pub struct Outputs {
    pub desired: watch::Sender<Arc<Desired>>,
    pub catalogs: watch::Sender<BTreeMap<String, CatalogView>>,
    pub imports: watch::Sender<HashMap<(String, String), ImportView>>,
    /// Set once every cache has synced.
    pub synced: watch::Sender<bool>,
}

/// Runs the loop; it ends only with an error.
pub async fn run(
    stores: Stores,
    changes: Arc<Changes>,
    mut writers: Writers,
    mut importers: Importers,
    metrics: Arc<Metrics>,
    out: Outputs,
) -> Result<()> {
    stores.wait_synced().await?;
    info!("Kubernetes caches synced");
    out.synced.send_replace(true);
    let mut tick = tokio::time::interval(TICK);
    let mut first = true;
    let mut memo = desired::Memo::default();
    let (mut last_catalogs, mut last_namespaces) = (Vec::new(), Vec::new());
    loop {
        let since = changes.take();
        let (cats, regs) = (stores.catalogs.state(), stores.registrations.state());
        let namespaces = stores.namespaces.state();
        // A catalog being deleted takes no exports and serves no imports; its writer drains it.
        let live: Vec<_> = (cats.iter())
            .filter(|c| c.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        // Recompute only when something changed; the tick alone refreshes views and retries
        // catalogs that could not be built. A change to Services, EndpointSlices or
        // registrations reads those objects alone; a new catalog spec or namespace labels, or
        // a relist, read everything.
        let d = if since.is_some() || first {
            let changed = changes.take_objects();
            // What desired state reads of catalogs and namespaces: their specs (a status
            // update moves no generation) and labels.
            let read_of_catalogs: Vec<_> = (live.iter())
                .map(|c| (c.metadata.uid.clone(), c.metadata.generation))
                .collect();
            let read_of_namespaces: Vec<_> = (namespaces.iter())
                .map(|n| (n.metadata.name.clone(), n.metadata.labels.clone()))
                .collect();
            let reread = changed.all
                || first
                || (changed.catalogs && read_of_catalogs != last_catalogs)
                || (changed.namespaces && read_of_namespaces != last_namespaces);
            last_catalogs = read_of_catalogs;
            last_namespaces = read_of_namespaces;
            Arc::new(if reread {
                first = false;
                let (svcs, sls) = (stores.services.state(), stores.slices.state());
                desired::compute_with(
                    Inputs {
                        services: &svcs,
                        slices: &sls,
                        catalogs: &live,
                        registrations: &regs,
                        namespaces: &namespaces,
                    },
                    &mut memo,
                )
            } else {
                desired::update(&stores, &changed, &mut memo)
            })
        } else {
            out.desired.borrow().clone()
        };
        writers.sync(&cats, &d, since).await;
        importers.sync(&regs, &live, &namespaces).await;
        out.imports.send_if_modified(|cur| {
            let v = importers.views();
            if *cur == v {
                return false;
            }
            *cur = v;
            true
        });
        metrics.set_invalid_exports(&d.invalid);
        out.desired.send_if_modified(|cur| {
            if Arc::ptr_eq(cur, &d) || **cur == *d {
                return false;
            }
            *cur = d;
            true
        });
        out.catalogs.send_if_modified(|cur| {
            let v = writers.views();
            if *cur == v {
                return false;
            }
            *cur = v;
            true
        });
        tokio::select! {
            () = changes.marked() => {}
            _ = tick.tick() => {}
        }
    }
}

/// The desired-state step reads the objects that changed from the watches' stores.
impl desired::Objects for Stores {
    fn service(&self, namespace: &str, name: &str) -> Option<Arc<CachedService>> {
        self.services.get(&ObjectRef::new(name).within(namespace))
    }

    fn slice(&self, namespace: &str, name: &str) -> Option<Arc<CachedSlice>> {
        self.slices.get(&ObjectRef::new(name).within(namespace))
    }

    fn registration(&self, namespace: &str, name: &str) -> Option<Arc<ExternalRegistration>> {
        self.registrations
            .get(&ObjectRef::new(name).within(namespace))
    }
}
