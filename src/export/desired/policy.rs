//! The catalogs' policies applied to exports: whether a namespace may export to a catalog
//! under a name (`NotAllowed`), and, where a catalog does not merge one name from several
//! namespaces, which namespace keeps it (`NameConflict` for the others).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::Source;
use super::request::Request;
use crate::api::crd::ExternalCatalog;
use crate::api::labels::is_imported;
use crate::model::{Problem, Reason};

/// The export that keeps a name in a catalog.
struct Holder {
    /// Creation time of the Service (annotation) or registration; unknown counts as newest.
    created: Option<Time>,
    namespace: String,
    source: Source,
}

impl Holder {
    fn key(&self) -> (bool, Option<&Time>, &str, &Source) {
        (
            self.created.is_none(),
            self.created.as_ref(),
            &self.namespace,
            &self.source,
        )
    }
}

/// The catalogs' export rules, with the namespaces' labels they are read against.
pub(super) struct Policies<'a> {
    catalogs: HashMap<&'a str, &'a ExternalCatalog>,
    labels: HashMap<&'a str, &'a BTreeMap<String, String>>,
    /// Per (catalog, external name), the export that keeps it, in catalogs that do not merge.
    holders: HashMap<(String, String), Holder>,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl<'a> Policies<'a> {
    /// Reads every request that would contribute, to find who keeps each name.
    pub(super) fn new(
        catalogs: &'a [Arc<ExternalCatalog>],
        namespaces: &'a [Arc<Namespace>],
        requests: &[Request],
        services: &HashMap<(&str, &str), &Service>,
    ) -> Policies<'a> {
        let mut p = Policies {
            catalogs: catalogs
                .iter()
                .filter_map(|c| Some((c.metadata.name.as_deref()?, c.as_ref())))
                .collect(),
            labels: namespaces
                .iter()
                .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
                .collect(),
            holders: HashMap::new(),
        };
        for req in requests {
            let exists = services
                .get(&(req.namespace.as_str(), req.service.as_str()))
                .is_some_and(|s| !is_imported(s.metadata.labels.as_ref()));
            if req.problem.is_some() || !exists {
                continue;
            }
            let name = req.external_name.as_deref().unwrap_or(&req.service);
            for catalog in &req.catalogs {
                if p.merges(catalog) || p.not_allowed(req, catalog, name).is_some() {
                    continue;
                }
                let candidate = Holder {
                    created: req.created.clone(),
                    namespace: req.namespace.clone(),
                    source: req.source.clone(),
                };
                match p.holders.entry((catalog.clone(), name.to_string())) {
                    Entry::Occupied(mut held) => {
                        if candidate.key() < held.get().key() {
                            held.insert(candidate);
                        }
                    }
                    Entry::Vacant(free) => {
                        free.insert(candidate);
                    }
                }
            }
        }
        p
    }

    fn merges(&self, catalog: &str) -> bool {
        self.catalogs
            .get(catalog)
            .and_then(|c| c.spec.policy.as_ref())
            .is_some_and(|p| p.merges_shared_names())
    }

    /// Why the catalog's policy does not let `req`'s namespace export `name` to `catalog`.
    fn not_allowed(&self, req: &Request, catalog: &str, name: &str) -> Option<Problem> {
        let policy = self.catalogs.get(catalog)?.spec.policy.as_ref()?;
        let labels = self
            .labels
            .get(req.namespace.as_str())
            .copied()
            .unwrap_or(&NO_LABELS);
        policy
            .export()
            .refusal("export to", catalog, &req.namespace, labels, name)
            .map(|m| Problem::new(Reason::NotAllowed, m))
    }

    /// Why `req` may not export `name` to `catalog`: its policy does not allow it
    /// (`NotAllowed`), or another namespace keeps the name (`NameConflict`). None: it may.
    pub(super) fn refusal(&self, req: &Request, catalog: &str, name: &str) -> Option<Problem> {
        if let Some(p) = self.not_allowed(req, catalog, name) {
            return Some(p);
        }
        let holder = self.holders.get(&(catalog.to_string(), name.to_string()))?;
        if holder.namespace == req.namespace {
            return None;
        }
        let by = match &holder.source {
            Source::Annotation { namespace, service } => format!("Service {namespace}/{service}"),
            Source::Registration { namespace, name } => {
                format!("ExternalRegistration {namespace}/{name}")
            }
        };
        let since = holder
            .created
            .as_ref()
            .map(|t| format!(", created {}", t.0))
            .unwrap_or_default();
        Some(Problem::new(
            Reason::NameConflict,
            format!(
                "the name {name:?} in ExternalCatalog {catalog} is exported by {by}{since}, an \
                 older export of another namespace; the catalog's policy does not merge one name \
                 from several namespaces (spec.policy.export.sharedNames: Refuse), so nothing of \
                 this export is written there"
            ),
        ))
    }
}
