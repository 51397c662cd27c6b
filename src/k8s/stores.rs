//! The watches: one reflector per kind (Services, EndpointSlices, ExternalCatalogs,
//! ExternalRegistrations, Namespaces) filling a store that every other part reads, never the API. Every
//! event marks [`Changes`], which wakes the desired-state loop.

use std::sync::Arc;
use std::time::Duration;

use crate::k8s::cached::CachedService;
use crate::k8s::cached::CachedSlice;
use anyhow::{Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::warn;

use super::prune::Prune;
use crate::runtime::backoff::Backoff;

use crate::api::crd::{ExternalCatalog, ExternalRegistration};
use crate::runtime::health::Changes;

/// Called with every event of a watch, before the store and `Changes` see the next one.
pub type Tap<K> = Box<dyn Fn(&watcher::Event<K>) + Send + Sync>;

/// A reflector (a watch feeding a store, each object pruned to what is read) whose every event
/// marks `changes` and is shown to `tap`. The task ends only with an error: a watch that stops is a replica that goes blind.
pub fn reflect<K>(
    api: Api<K>,
    changes: Arc<Changes>,
    tap: Option<Tap<K>>,
) -> (Store<K>, JoinHandle<Result<()>>)
where
    K: Resource + Prune + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default())
            .backoff(WatchBackoff::default())
            .modify(K::prune),
    );
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    if let Some(tap) = &tap {
                        tap(&ev);
                    }
                    changes.mark_event(&kind, &ev)
                }
                Err(e) => warn!(%kind, error = %e, "watch failed; retrying"),
            }
        }
        bail!("the {kind} watch ended")
    });
    (reader, task)
}

/// Retries of a failed watch: from 200 ms doubling to 5 s, and from the start again after any
/// success. kube's default climbs to 30 s and keeps that for two minutes after the API server is
/// back, so the first error after an outage (a 410 Gone, which only asks for a relist) made
/// every change wait up to half a minute more.
pub struct WatchBackoff(Backoff);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff(Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
        ))
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.0.next_pause())
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}

/// The stores every part reads from.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<CachedService>,
    pub slices: Store<CachedSlice>,
    pub catalogs: Store<ExternalCatalog>,
    pub registrations: Store<ExternalRegistration>,
    /// For their labels, which the catalogs' policies select namespaces by.
    pub namespaces: Store<Namespace>,
}

impl Stores {
    /// Resolves once every store holds its watch's first complete list.
    pub async fn wait_synced(&self) -> Result<()> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.catalogs.wait_until_ready().await?;
        self.registrations.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        Ok(())
    }
}
