//! The catalogs' policies applied to exports: whether a namespace may export to a catalog
//! under a name (`NotAllowed`), and, where a catalog does not merge one name from several
//! namespaces, which namespace keeps it (`NameConflict` for the others).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::Source;
use super::request::Request;
use crate::api::crd::ExternalCatalog;
use crate::model::{Problem, Reason};

/// An export's claim on a name in a catalog that does not merge: claims order oldest first
/// (unknown creation counts as newest), then by namespace and source; the first keeps the name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Claim {
    unknown: bool,
    created: Option<Time>,
    pub(super) namespace: String,
    pub(super) source: Source,
}

/// The catalogs' export rules, with the namespaces' labels they are read against.
#[derive(Default)]
pub(super) struct Rules {
    catalogs: HashMap<String, Arc<ExternalCatalog>>,
    labels: HashMap<String, BTreeMap<String, String>>,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl Rules {
    pub(super) fn new(catalogs: &[Arc<ExternalCatalog>], namespaces: &[Arc<Namespace>]) -> Rules {
        Rules {
            catalogs: catalogs
                .iter()
                .filter_map(|c| Some((c.metadata.name.clone()?, c.clone())))
                .collect(),
            labels: namespaces
                .iter()
                .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone()?)))
                .collect(),
        }
    }

    /// The catalog named `name`, if it exists.
    pub(super) fn catalog(&self, name: &str) -> Option<&ExternalCatalog> {
        self.catalogs.get(name).map(Arc::as_ref)
    }

    /// The (catalog, name) pairs `req` claims: where it would contribute (its Service exists
    /// and is not imported, `exported`) to a catalog that does not merge and lets it export.
    pub(super) fn claims(&self, req: &Request, exported: bool) -> Vec<(String, String)> {
        if req.problem.is_some() || !exported {
            return Vec::new();
        }
        let name = req.external_name.as_deref().unwrap_or(&req.service);
        (req.catalogs.iter())
            .filter(|c| !self.merges(c) && self.not_allowed(req, c, name).is_none())
            .map(|c| (c.clone(), name.to_string()))
            .collect()
    }

    /// `req`'s claim on its names.
    pub(super) fn claim(req: &Request) -> Claim {
        Claim {
            unknown: req.created.is_none(),
            created: req.created.clone(),
            namespace: req.namespace.clone(),
            source: req.source.clone(),
        }
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
            .unwrap_or(&NO_LABELS);
        policy
            .export()
            .refusal("export to", catalog, &req.namespace, labels, name)
            .map(|m| Problem::new(Reason::NotAllowed, m))
    }

    /// Why `req` may not export `name` to `catalog`: its policy does not allow it
    /// (`NotAllowed`), or another namespace's export, `holder`, keeps the name
    /// (`NameConflict`). None: it may.
    pub(super) fn refusal(
        &self,
        req: &Request,
        catalog: &str,
        name: &str,
        holder: Option<&Claim>,
    ) -> Option<Problem> {
        if let Some(p) = self.not_allowed(req, catalog, name) {
            return Some(p);
        }
        let holder = holder?;
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
