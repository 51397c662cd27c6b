//! What the desired-state step keeps between runs, so that a change to one Service recomputes
//! that Service only: each export's request and instances, keyed by the resource versions they
//! came from; each catalog's instances as a persistent set; the indexes that find the exports a
//! changed object touches (slices by Service, registrations by the Service they name, the
//! exports that claim a name); and every export's outcome.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use smallvec::SmallVec;

use crate::k8s::cached::{CachedService, CachedSlice};

use super::policy::{Claim, Rules};
use super::request::Request;
use super::{Export, Source};
use crate::api::crd::PortRef;
use crate::api::labels::SERVICE_NAME_LABEL;
use crate::model::{DesiredCatalog, Instance, Problem};

/// A namespaced object's key: (namespace, name).
pub(super) type Key = (String, String);

/// What [`compute_with`](super::compute_with) and [`update`](super::update) keep between runs.
#[derive(Default)]
pub struct Memo {
    pub(super) rules: Rules,
    pub(super) sources: HashMap<Source, Memoized>,
    pub(super) catalogs: HashMap<String, CatalogMemo>,
    /// Each Service's EndpointSlices, by slice name.
    pub(super) slices_of: HashMap<Key, BTreeMap<String, Arc<CachedSlice>>>,
    /// The Service each slice belongs to, as last indexed.
    pub(super) slice_owner: HashMap<Key, String>,
    /// The registrations that export each Service.
    pub(super) registrations_of: HashMap<Key, BTreeSet<Source>>,
    /// Per (catalog, external name) in catalogs that do not merge, every export that claims
    /// it, oldest first: the first keeps the name.
    pub(super) claims: HashMap<Key, Claimants>,
    /// The names each source claims.
    pub(super) claimed_by: HashMap<Source, Vec<Key>>,
    pub(super) exports: imbl::OrdMap<(Source, String), Export>,
    /// Exports that cannot take effect, by (source kind, reason).
    pub(super) invalid: BTreeMap<(String, String), i64>,
}

/// The claims on one name, oldest first: mostly one, kept in place (a tree set allocated room
/// for eleven per name).
#[derive(Default)]
pub(super) struct Claimants(SmallVec<[Claim; 1]>);

impl Claimants {
    /// The claim that keeps the name.
    pub(super) fn first(&self) -> Option<&Claim> {
        self.0.first()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Claim> {
        self.0.iter()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn insert(&mut self, claim: Claim) {
        if let Err(at) = self.0.binary_search(&claim) {
            self.0.insert(at, claim);
        }
    }

    pub(super) fn remove(&mut self, claim: &Claim) {
        if let Ok(at) = self.0.binary_search(claim) {
            self.0.remove(at);
        }
    }
}

/// One export source as of the last run.
pub(super) struct Memoized {
    pub(super) request: Request,
    /// What its instances were computed from; `None` (an object without a resource version)
    /// is never reused.
    pub(super) fingerprint: Option<Fingerprint>,
    pub(super) resolved: Result<Arc<Vec<Instance>>, Problem>,
    /// The catalogs its instances were added to (existing ones, when resolved).
    pub(super) contributed: Vec<String>,
}

/// The inputs of [`instances`](super::endpoints::instances), by identity: the Service's and
/// its slices' resource versions and the request's own settings.
#[derive(PartialEq, Eq)]
pub(super) struct Fingerprint {
    pub(super) service: (String, String),
    pub(super) slices: Vec<(String, String)>,
    pub(super) external_name: String,
    pub(super) port: Option<PortRef>,
    pub(super) tags: Vec<String>,
    pub(super) meta: BTreeMap<String, String>,
}

/// One catalog's instances and the snapshot last handed out.
#[derive(Default)]
pub(super) struct CatalogMemo {
    pub(super) set: DesiredCatalog,
    /// Instances that more than one source contributes, with how many more.
    pub(super) shared: HashMap<Instance, u32>,
    pub(super) built: Arc<DesiredCatalog>,
    pub(super) dirty: bool,
}

impl CatalogMemo {
    pub(super) fn add(&mut self, instances: &[Instance]) {
        for i in instances {
            if self.set.contains(i) {
                *self.shared.entry(i.clone()).or_default() += 1;
            } else {
                self.set.insert(i.clone());
            }
        }
        self.dirty |= !instances.is_empty();
    }

    pub(super) fn remove(&mut self, instances: &[Instance]) {
        for i in instances {
            match self.shared.get_mut(i) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    self.shared.remove(i);
                }
                None => self.set.remove(i),
            }
        }
        self.dirty |= !instances.is_empty();
    }

    /// The snapshot of the set: the last one when nothing changed since.
    pub(super) fn snapshot(&mut self) -> Arc<DesiredCatalog> {
        if self.dirty {
            self.built = Arc::new(self.set.clone());
            self.dirty = false;
        }
        self.built.clone()
    }
}

impl Memo {
    /// Takes what `source` added to the catalogs out of them again.
    pub(super) fn withdraw(&mut self, source: &Memoized) {
        if let Ok(list) = &source.resolved {
            for catalog in &source.contributed {
                if let Some(m) = self.catalogs.get_mut(catalog) {
                    m.remove(list);
                }
            }
        }
    }

    /// Files `slice` (or its absence) under its Service; returns the Services whose slices
    /// changed (the one it left and the one it joined).
    pub(super) fn index_slice(&mut self, key: &Key, slice: Option<Arc<CachedSlice>>) -> Vec<Key> {
        let mut touched = Vec::new();
        if let Some(owner) = self.slice_owner.remove(key) {
            let svc = (key.0.clone(), owner);
            if let Some(m) = self.slices_of.get_mut(&svc) {
                m.remove(&key.1);
                if m.is_empty() {
                    self.slices_of.remove(&svc);
                }
            }
            touched.push(svc);
        }
        let owner = slice.as_ref().and_then(|s| {
            (s.metadata.labels.as_ref())
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .cloned()
        });
        if let (Some(slice), Some(owner)) = (slice, owner) {
            let svc = (key.0.clone(), owner.clone());
            (self.slices_of.entry(svc.clone()).or_default()).insert(key.1.clone(), slice);
            self.slice_owner.insert(key.clone(), owner);
            if !touched.contains(&svc) {
                touched.push(svc);
            }
        }
        touched
    }

    /// Moves one source's claims from the names it claimed before, as the claim it made then,
    /// to the names it claims now, as its claim now (the same names with a new creation time
    /// move its place among the claimants). Notes in `held_before` who held each name touched
    /// before it was touched.
    pub(super) fn move_claims(
        &mut self,
        (before, old): (&[Key], Option<Claim>),
        (now, new): (&[Key], Option<Claim>),
        held_before: &mut HashMap<Key, Option<Claim>>,
    ) {
        if before == now && old == new {
            return;
        }
        for key in before.iter().chain(now) {
            held_before
                .entry(key.clone())
                .or_insert_with(|| self.claims.get(key).and_then(|c| c.first().cloned()));
        }
        if let Some(old) = &old {
            for key in before {
                if let Some(set) = self.claims.get_mut(key) {
                    set.remove(old);
                    if set.is_empty() {
                        self.claims.remove(key);
                    }
                }
            }
        }
        if let Some(new) = &new {
            for key in now {
                (self.claims.entry(key.clone()).or_default()).insert(new.clone());
            }
        }
    }

    /// Counts `export` among the invalid ones (`by` 1) or takes it out again (`by` -1).
    pub(super) fn count_invalid(&mut self, export: &Export, by: i64) {
        let Some(p) = &export.problem else { return };
        let kind = match export.source {
            Source::Annotation { .. } => "annotation",
            Source::Registration { .. } => "registration",
        };
        let key = (kind.to_string(), p.reason.to_string());
        let n = self.invalid.entry(key.clone()).or_default();
        *n += by;
        if *n == 0 {
            self.invalid.remove(&key);
        }
    }
}

/// What an export's instances depend on, or `None` when an object has no resource version
/// (then nothing is reused).
pub(super) fn fingerprint(
    svc: &CachedService,
    slices: &[&CachedSlice],
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
