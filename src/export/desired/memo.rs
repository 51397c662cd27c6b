//! What the desired-state step keeps between runs, so that a change to one Service recomputes
//! that Service only: each export's instances, keyed by the resource versions they came from,
//! and each catalog's instances with how many exports contribute each.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::Source;
use super::request::Request;
use crate::api::crd::PortRef;
use crate::model::{DesiredCatalog, Instance, Problem};

/// What [`compute_with`] keeps between runs so that a change to one Service recomputes that
/// Service only: each export's instances, keyed by the resource versions they came from, and
/// each catalog's instances with how many exports contribute each.
#[derive(Default)]
pub struct Memo {
    pub(super) sources: HashMap<Source, Memoized>,
    pub(super) catalogs: HashMap<String, CatalogMemo>,
}

/// One export source as of the last run.
pub(super) struct Memoized {
    /// What its instances were computed from; `None` (an object without a resource version)
    /// is never reused.
    pub(super) fingerprint: Option<Fingerprint>,
    pub(super) resolved: Result<Arc<Vec<Instance>>, Problem>,
    /// The catalogs its instances were added to (existing ones, when resolved).
    pub(super) contributed: Vec<String>,
}

/// The inputs of [`instances`], by identity: the Service's and its slices' resource versions
/// and the request's own settings.
#[derive(PartialEq, Eq)]
pub(super) struct Fingerprint {
    pub(super) service: (String, String),
    pub(super) slices: Vec<(String, String)>,
    pub(super) external_name: String,
    pub(super) port: Option<PortRef>,
    pub(super) tags: Vec<String>,
    pub(super) meta: BTreeMap<String, String>,
}

#[derive(Default)]
pub(super) struct CatalogMemo {
    /// Each instance and how many export sources contribute it.
    pub(super) counts: BTreeMap<Instance, u32>,
    pub(super) built: Arc<DesiredCatalog>,
    pub(super) dirty: bool,
}

impl CatalogMemo {
    pub(super) fn add(&mut self, instances: &[Instance]) {
        for i in instances {
            *self.counts.entry(i.clone()).or_default() += 1;
        }
        self.dirty |= !instances.is_empty();
    }

    pub(super) fn remove(&mut self, instances: &[Instance]) {
        for i in instances {
            if let Some(n) = self.counts.get_mut(i) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(i);
                }
            }
        }
        self.dirty |= !instances.is_empty();
    }
}

/// Takes what `source` added to the catalogs out of them again.
pub(super) fn withdraw(catalogs: &mut HashMap<String, CatalogMemo>, source: &Memoized) {
    if let Ok(list) = &source.resolved {
        for catalog in &source.contributed {
            if let Some(m) = catalogs.get_mut(catalog) {
                m.remove(list);
            }
        }
    }
}

/// What an export's instances depend on, or `None` when an object has no resource version
/// (then nothing is reused).
pub(super) fn fingerprint(
    svc: &Service,
    slices: &[&EndpointSlice],
    req: &Request,
    external_name: &str,
) -> Option<Fingerprint> {
    let version = |m: &kube::api::ObjectMeta| -> Option<(String, String)> {
        Some((
            m.uid.clone().unwrap_or_default(),
            m.resource_version.clone()?,
        ))
    };
    let mut slice_versions = slices
        .iter()
        .map(|s| {
            let (uid, rv) = version(&s.metadata)?;
            Some((
                format!("{}/{uid}", s.metadata.name.as_deref().unwrap_or_default()),
                rv,
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    slice_versions.sort();
    Some(Fingerprint {
        service: version(&svc.metadata)?,
        slices: slice_versions,
        external_name: external_name.to_string(),
        port: req.port.clone(),
        tags: req.tags.clone(),
        meta: req.meta.clone(),
    })
}
