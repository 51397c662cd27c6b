//! Desired state: from Services, their EndpointSlices, the ExternalCatalogs and the Export
//! ExternalRegistrations, what every catalog should hold — and, for each export, whether it is
//! valid. Pure: no client, no clock; the same inputs give the same output.
//!
//! Two ways in, one result: [`compute_with`] reads every object (the first run, a relist, a
//! changed catalog or namespace), [`update`] only the objects that changed since, so a readiness
//! flip among 100,000 instances costs what it touches. Both go through the same steps, and a
//! test checks that any sequence of updates ends where a computation from scratch does.

mod endpoints;
mod memo;
mod policy;
mod request;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::k8s::cached::{CachedService, CachedSlice};
use k8s_openapi::api::core::v1::Namespace;

use crate::api::crd::{ExternalCatalog, ExternalRegistration};
use crate::api::labels::is_imported;
use crate::model::{DesiredCatalog, Instance, Problem, Reason};
use crate::runtime::changed::Changed;
use endpoints::instances;
pub use memo::Memo;
use memo::{Key, Memoized, fingerprint};
use policy::Rules;
pub use request::valid_external_name;
use request::{Request, request_from_annotations, request_from_registration};

/// The Kubernetes objects desired state is computed from.
#[derive(Clone, Copy, Default)]
pub struct Inputs<'a> {
    pub services: &'a [Arc<CachedService>],
    pub slices: &'a [Arc<CachedSlice>],
    pub catalogs: &'a [Arc<ExternalCatalog>],
    pub registrations: &'a [Arc<ExternalRegistration>],
    /// For the labels the catalogs' policies select namespaces by.
    pub namespaces: &'a [Arc<Namespace>],
}

/// Where [`update`] reads the objects that changed, by namespace and name.
pub trait Objects {
    fn service(&self, namespace: &str, name: &str) -> Option<Arc<CachedService>>;
    fn slice(&self, namespace: &str, name: &str) -> Option<Arc<CachedSlice>>;
    fn registration(&self, namespace: &str, name: &str) -> Option<Arc<ExternalRegistration>>;
}

/// What asked for an export.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// `catalog-bridge.io/export` on a Service.
    Annotation { namespace: String, service: String },
    /// An ExternalRegistration with `direction: Export`.
    Registration { namespace: String, name: String },
}

/// The outcome of one export source towards one catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub source: Source,
    pub catalog: String,
    pub service: String,
    pub external_name: String,
    /// Instances it contributes (0 when it has a problem).
    pub endpoints: usize,
    pub problem: Option<Problem>,
    /// What does not stop the export but is not exported as asked (a meta key the catalog
    /// refuses): a Warning Event each.
    pub warnings: Vec<Problem>,
}

/// Desired state of every catalog, and how each export fared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// One entry per existing ExternalCatalog (empty when nothing is exported to it).
    pub catalogs: BTreeMap<String, Arc<DesiredCatalog>>,
    /// Every export, by (source, catalog); a persistent map, shared with the next state.
    pub exports: imbl::OrdMap<(Source, String), Export>,
    /// How many exports cannot take effect, by (source kind, reason).
    pub invalid: BTreeMap<(String, String), i64>,
}

/// Computes desired state from scratch. Invalid exports are reported in `exports` and
/// contribute nothing; every other export is unaffected by them.
pub fn compute(inputs: Inputs<'_>) -> Desired {
    compute_with(inputs, &mut Memo::default())
}

/// [`compute`] over every object, reusing what `memo` holds from the previous run for every
/// export whose Service, EndpointSlices and settings did not change; the result is the same.
pub fn compute_with(inputs: Inputs<'_>, memo: &mut Memo) -> Desired {
    memo.rules = Rules::new(inputs.catalogs, inputs.namespaces);
    memo.slices_of.clear();
    memo.slice_owner.clear();
    for s in inputs.slices {
        if let (Some(ns), Some(name)) = (&s.metadata.namespace, &s.metadata.name) {
            memo.index_slice(&(ns.clone(), name.clone()), Some(s.clone()));
        }
    }
    let objects = Listed::new(inputs);
    let mut sources: BTreeSet<Source> = memo.sources.keys().cloned().collect();
    sources.extend(objects.services.keys().map(|(ns, svc)| Source::Annotation {
        namespace: ns.to_string(),
        service: svc.to_string(),
    }));
    sources.extend(
        objects
            .registrations
            .keys()
            .map(|(ns, name)| Source::Registration {
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
    );
    let live: BTreeSet<&str> = (inputs.catalogs.iter())
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    memo.catalogs.retain(|name, _| live.contains(name.as_str()));
    for name in live {
        memo.catalogs.entry(name.to_string()).or_default();
    }
    refresh(&objects, sources, memo);
    desired(memo)
}

/// Desired state after `changed` objects changed (each read from `objects`), from what `memo`
/// holds: only the exports they touch are computed again. A change `changed` does not name
/// (a catalog, a namespace, a relist: [`Changed::all`]) needs [`compute_with`].
pub fn update(objects: &impl Objects, changed: &Changed, memo: &mut Memo) -> Desired {
    let mut services: BTreeSet<Key> = changed.services.iter().cloned().collect();
    for key in &changed.slices {
        services.extend(memo.index_slice(key, objects.slice(&key.0, &key.1)));
    }
    let mut sources = BTreeSet::new();
    for (ns, svc) in services {
        if let Some(regs) = memo.registrations_of.get(&(ns.clone(), svc.clone())) {
            sources.extend(regs.iter().cloned());
        }
        sources.insert(Source::Annotation {
            namespace: ns,
            service: svc,
        });
    }
    sources.extend(
        (changed.registrations.iter()).map(|(ns, name)| Source::Registration {
            namespace: ns.clone(),
            name: name.clone(),
        }),
    );
    refresh(objects, sources, memo);
    desired(memo)
}

/// The state `memo` holds, as published.
fn desired(memo: &mut Memo) -> Desired {
    Desired {
        catalogs: (memo.catalogs.iter_mut())
            .map(|(name, m)| (name.clone(), m.snapshot()))
            .collect(),
        exports: memo.exports.clone(),
        invalid: memo.invalid.clone(),
    }
}

/// Reads `sources` again: first what each asks and which names it claims, then, for them and
/// for every export whose claim on a name changed hands, the outcome.
fn refresh(objects: &impl Objects, sources: BTreeSet<Source>, memo: &mut Memo) {
    let mut asked: HashMap<Source, Option<Request>> = HashMap::new();
    // The holder of every claimed name before, to see which change hands.
    let mut held_before: HashMap<Key, Option<policy::Claim>> = HashMap::new();
    for source in &sources {
        let req = match source {
            Source::Annotation { namespace, service } => objects
                .service(namespace, service)
                .and_then(|s| request_from_annotations(&s)),
            Source::Registration { namespace, name } => objects
                .registration(namespace, name)
                .and_then(|r| request_from_registration(&r)),
        };
        // The registrations that export a Service.
        if let Source::Registration { .. } = source {
            let before = memo.sources.get(source).map(|m| target(&m.request));
            let after = req.as_ref().map(target);
            if before != after {
                if let Some(t) = before
                    && let Some(set) = memo.registrations_of.get_mut(&t)
                {
                    set.remove(source);
                    if set.is_empty() {
                        memo.registrations_of.remove(&t);
                    }
                }
                if let Some(t) = after {
                    (memo.registrations_of.entry(t).or_default()).insert(source.clone());
                }
            }
        }
        // The names it claims.
        let claims = req.as_ref().map_or_else(Vec::new, |r| {
            let exported = objects
                .service(&r.namespace, &r.service)
                .is_some_and(|s| !is_imported(s.metadata.labels.as_ref()));
            memo.rules.claims(r, exported)
        });
        let before = memo.claimed_by.remove(source).unwrap_or_default();
        let old = memo.sources.get(source).map(|m| Rules::claim(&m.request));
        let new = req.as_ref().map(Rules::claim);
        memo.move_claims((&before, old), (&claims, new), &mut held_before);
        if !claims.is_empty() {
            memo.claimed_by.insert(source.clone(), claims);
        }
        asked.insert(source.clone(), req);
    }
    // Where a name changed hands, every claimant's outcome changes.
    let mut outcomes = sources;
    for (key, before) in held_before {
        let set = memo.claims.get(&key);
        if set.and_then(|c| c.first()) != before.as_ref() {
            outcomes.extend(
                set.into_iter()
                    .flat_map(|c| c.iter())
                    .map(|c| c.source.clone()),
            );
        }
    }
    for source in outcomes {
        let req = match asked.remove(&source) {
            Some(req) => req,
            None => memo.sources.get(&source).map(|m| m.request.clone()),
        };
        outcome(objects, &source, req, memo);
    }
}

/// The Service a request exports.
fn target(req: &Request) -> Key {
    (req.namespace.clone(), req.service.clone())
}

/// Works out `source`'s exports and instances from its request `req` (none: it asks for
/// nothing any more), replacing what it had.
fn outcome(objects: &impl Objects, source: &Source, req: Option<Request>, memo: &mut Memo) {
    let previous = memo.sources.remove(source);
    if let Some(p) = &previous {
        for catalog in &p.request.catalogs {
            if let Some(e) = memo.exports.remove(&(source.clone(), catalog.clone())) {
                memo.count_invalid(&e, -1);
            }
        }
    }
    let Some(req) = req else {
        if let Some(p) = &previous {
            memo.withdraw(p);
        }
        return;
    };
    let svc = objects.service(&req.namespace, &req.service);
    let no_slices = BTreeMap::new();
    let svc_slices: Vec<&CachedSlice> = (memo.slices_of)
        .get(&target(&req))
        .unwrap_or(&no_slices)
        .values()
        .map(Arc::as_ref)
        .collect();
    let external_name = req.external_name.clone().unwrap_or(req.service.clone());
    let fingerprint = match (&req.problem, &svc) {
        (None, Some(svc)) => fingerprint(svc, &svc_slices, &req, &external_name),
        _ => None,
    };
    let resolved: Result<Arc<Vec<Instance>>, Problem> = match (&req.problem, &svc) {
        (Some(p), _) => Err(p.clone()),
        (None, None) => Err(Problem {
            reason: Reason::ServiceNotFound,
            message: format!("Service {}/{} does not exist", req.namespace, req.service),
        }),
        (None, Some(svc)) if is_imported(svc.metadata.labels.as_ref()) => Err(Problem {
            reason: Reason::ImportedService,
            message: format!(
                "Service {}/{} is maintained by an import and is never exported",
                req.namespace, req.service
            ),
        }),
        (None, Some(_))
            if fingerprint.is_some()
                && previous
                    .as_ref()
                    .is_some_and(|p| p.fingerprint == fingerprint) =>
        {
            previous
                .as_ref()
                .map(|p| p.resolved.clone())
                .unwrap_or_else(|| Ok(Arc::default()))
        }
        (None, Some(svc)) => instances(
            svc,
            &svc_slices,
            req.port.as_ref(),
            &external_name,
            &req.tags,
            &req.meta,
        )
        .map(Arc::new),
    };
    let mut contributed = Vec::new();
    for catalog in &req.catalogs {
        let mut export = Export {
            source: source.clone(),
            catalog: catalog.clone(),
            service: req.service.clone(),
            external_name: external_name.clone(),
            endpoints: 0,
            problem: None,
            warnings: Vec::new(),
        };
        let cat = memo.rules.catalog(catalog);
        if let Some(cat) = cat {
            export.warnings = crate::backend::meta_left_out(&cat.spec, &req.meta)
                .into_iter()
                .map(|why| Problem {
                    reason: Reason::InvalidMeta,
                    message: format!("left out of the entries in {catalog}: {why}"),
                })
                .collect();
        }
        let holder = (memo.claims)
            .get(&(catalog.clone(), external_name.clone()))
            .and_then(|c| c.first());
        match &resolved {
            Err(p) => export.problem = Some(p.clone()),
            Ok(_) if cat.is_none() => {
                export.problem = Some(Problem {
                    reason: Reason::CatalogNotFound,
                    message: format!("ExternalCatalog {catalog:?} does not exist"),
                })
            }
            Ok(_) if let Some(p) = memo.rules.refusal(&req, catalog, &external_name, holder) => {
                export.problem = Some(p)
            }
            Ok(list) => {
                export.endpoints = list.len();
                contributed.push(catalog.clone());
            }
        }
        memo.count_invalid(&export, 1);
        memo.exports
            .insert((source.clone(), catalog.clone()), export);
    }
    // Move this source's contribution in the catalogs, unless it is the same as before.
    let unchanged = previous.as_ref().is_some_and(|p| {
        p.contributed == contributed
            && match (&p.resolved, &resolved) {
                (Ok(a), Ok(b)) => Arc::ptr_eq(a, b),
                (Err(_), Err(_)) => contributed.is_empty(),
                _ => false,
            }
    });
    if !unchanged {
        if let Some(p) = &previous {
            memo.withdraw(p);
        }
        if let Ok(list) = &resolved {
            for catalog in &contributed {
                if let Some(m) = memo.catalogs.get_mut(catalog) {
                    m.add(list);
                }
            }
        }
    }
    memo.sources.insert(
        source.clone(),
        Memoized {
            request: req,
            fingerprint,
            resolved,
            contributed,
        },
    );
}

/// [`Inputs`] by key, for [`compute_with`].
struct Listed<'a> {
    services: HashMap<(&'a str, &'a str), &'a Arc<CachedService>>,
    registrations: HashMap<(&'a str, &'a str), &'a Arc<ExternalRegistration>>,
}

impl<'a> Listed<'a> {
    fn new(inputs: Inputs<'a>) -> Listed<'a> {
        fn by_key<K: kube::Resource>(objects: &[Arc<K>]) -> HashMap<(&str, &str), &Arc<K>> {
            (objects.iter())
                .filter_map(|o| {
                    let m = o.meta();
                    Some(((m.namespace.as_deref()?, m.name.as_deref()?), o))
                })
                .collect()
        }
        Listed {
            services: by_key(inputs.services),
            registrations: by_key(inputs.registrations),
        }
    }
}

impl Objects for Listed<'_> {
    fn service(&self, namespace: &str, name: &str) -> Option<Arc<CachedService>> {
        self.services.get(&(namespace, name)).map(|s| Arc::clone(s))
    }

    fn slice(&self, _: &str, _: &str) -> Option<Arc<CachedSlice>> {
        None // compute_with indexes every slice first
    }

    fn registration(&self, namespace: &str, name: &str) -> Option<Arc<ExternalRegistration>> {
        self.registrations
            .get(&(namespace, name))
            .map(|r| Arc::clone(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::labels::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
    use serde_json::json;

    fn service(ns: &str, name: &str, annotations: serde_json::Value) -> Arc<CachedService> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name, "annotations": annotations},
                "spec": {"ports": [
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                    {"name": "admin", "port": 9000, "targetPort": 9090, "protocol": "TCP"},
                ]},
            }))
            .expect("test service"),
        )
    }

    fn slice(
        ns: &str,
        svc: &str,
        name: &str,
        eps: &[(&str, Option<bool>, bool)],
    ) -> Arc<CachedSlice> {
        let endpoints: Vec<_> = eps
            .iter()
            .map(|(ip, ready, terminating)| {
                json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": terminating}})
            })
            .collect();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                          {"name": "admin", "port": 9090, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .expect("test slice"),
        )
    }

    fn catalog(name: &str) -> Arc<ExternalCatalog> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
                "metadata": {"name": name},
                "spec": {"consul": {"addresses": ["http://127.0.0.1:8500"]}},
            }))
            .expect("test catalog"),
        )
    }

    fn addrs(d: &Desired, catalog: &str) -> Vec<String> {
        d.catalogs[catalog]
            .iter()
            .map(|i| format!("{}@{}", i.name, i.host_port()))
            .collect()
    }

    #[test]
    fn annotated_service_exports_ready_endpoints_on_the_target_port() {
        let services = [service(
            "shop",
            "api-x",
            json!({
                "catalog-bridge.io/export": "consul", "catalog-bridge.io/name": "api_x",
                "catalog-bridge.io/tags": "v1, blue", "catalog-bridge.io/meta.team": "shop",
            }),
        )];
        let slices = [slice(
            "shop",
            "api-x",
            "s1",
            &[
                ("10.0.0.1", Some(true), false),
                ("10.0.0.2", Some(true), false),
                ("10.0.0.3", Some(false), false),
                ("10.0.0.4", Some(true), true),
                ("10.0.0.5", None, false),
            ],
        )];
        let catalogs = [catalog("consul"), catalog("other")];
        let d = compute(Inputs {
            services: &services,
            slices: &slices,
            catalogs: &catalogs,
            registrations: &[],
            namespaces: &[],
        });
        assert_eq!(
            addrs(&d, "consul"),
            [
                "api_x@10.0.0.1:8080",
                "api_x@10.0.0.2:8080",
                "api_x@10.0.0.5:8080"
            ]
        );
        assert!(d.catalogs["other"].is_empty());
        let i = d.catalogs["consul"].iter().next().expect("an instance");
        assert_eq!(i.tags.to_vec(), ["v1", "blue"]);
        assert_eq!(i.meta.get("team").map(String::as_str), Some("shop"));
        assert_eq!(d.exports.len(), 1);
        assert_eq!(d.exports.values().next().expect("an export").endpoints, 3);
        assert_eq!(d.exports.values().next().expect("an export").problem, None);
    }

    /// `publishNotReadyAddresses`: serving endpoints count even when not ready (a StatefulSet
    /// finding its peers); terminating ones never do.
    #[test]
    fn publish_not_ready_addresses_exports_serving_endpoints() {
        let eps = json!([
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true, "terminating": false}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": false}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false, "terminating": false}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        ]);
        let slices = [Arc::new(
            serde_json::from_value::<CachedSlice>(json!({
                "metadata": {"namespace": "shop", "name": "s1", "labels": {"kubernetes.io/service-name": "db"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps,
            }))
            .expect("test slice"),
        )];
        let catalogs = [catalog("consul")];
        let exported = |publish: bool| {
            let mut svc =
                (*service("shop", "db", json!({"catalog-bridge.io/export": "consul"}))).clone();
            if let Some(spec) = svc.spec.as_mut() {
                spec.publish_not_ready_addresses = Some(publish);
            }
            let d = compute(Inputs {
                services: &[Arc::new(svc)],
                slices: &slices,
                catalogs: &catalogs,
                registrations: &[],
                namespaces: &[],
            });
            addrs(&d, "consul")
        };
        assert_eq!(exported(false), ["db@10.0.0.1:8080"]);
        assert_eq!(exported(true), ["db@10.0.0.1:8080", "db@10.0.0.2:8080"]);
    }

    #[test]
    fn a_meta_key_consul_refuses_is_a_warning_for_consul_only() {
        let services = [service(
            "shop",
            "api-x",
            json!({
                "catalog-bridge.io/export": "consul,etcd",
                "catalog-bridge.io/meta.team": "shop",
                "catalog-bridge.io/meta.app.kubernetes.io/name": "api",
            }),
        )];
        let slices = [slice(
            "shop",
            "api-x",
            "s1",
            &[("10.0.0.1", Some(true), false)],
        )];
        let etcd: Arc<ExternalCatalog> = Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalCatalog",
                "metadata": {"name": "etcd"},
                "spec": {"etcd": {"endpoints": ["127.0.0.1:2379"]}},
            }))
            .expect("test catalog"),
        );
        let catalogs = [catalog("consul"), etcd];
        let d = compute(Inputs {
            services: &services,
            slices: &slices,
            catalogs: &catalogs,
            registrations: &[],
            namespaces: &[],
        });
        let by_catalog: BTreeMap<&str, &Export> = d
            .exports
            .values()
            .map(|e| (e.catalog.as_str(), e))
            .collect();
        let consul = by_catalog["consul"];
        assert_eq!(consul.problem, None, "the export goes ahead");
        assert_eq!(consul.endpoints, 1);
        assert_eq!(consul.warnings.len(), 1, "{:?}", consul.warnings);
        assert_eq!(consul.warnings[0].reason, "InvalidMeta");
        assert!(
            consul.warnings[0]
                .message
                .contains("app.kubernetes.io/name"),
            "{:?}",
            consul.warnings[0]
        );
        assert!(by_catalog["etcd"].warnings.is_empty());
    }

    /// The memo gives exactly what a computation from scratch gives, through readiness
    /// changes, renames, deletions, catalogs that go and come back, two sources of the same
    /// instances, and objects without a resource version.
    #[test]
    fn compute_with_a_memo_equals_compute_from_scratch() {
        fn versioned<T: kube::Resource>(mut o: T, rv: u64) -> Arc<T> {
            o.meta_mut().resource_version = Some(rv.to_string());
            o.meta_mut().uid = Some(format!("uid-{}", o.meta().name.clone().unwrap_or_default()));
            Arc::new(o)
        }
        let mut rv = 0u64;
        let mut next = || {
            rv += 1;
            rv
        };
        let mut services: Vec<Arc<CachedService>> = Vec::new();
        let mut slices: Vec<Arc<CachedSlice>> = Vec::new();
        for s in 0..40 {
            let export = if s % 2 == 0 { "consul,etcd" } else { "consul" };
            let svc = service(
                "shop",
                &format!("svc-{s}"),
                json!({"catalog-bridge.io/export": export}),
            );
            services.push(versioned((*svc).clone(), next()));
            let eps: Vec<(String, Option<bool>, bool)> = (0..3)
                .map(|e| (format!("10.0.{s}.{e}"), Some(true), false))
                .collect();
            let eps: Vec<(&str, Option<bool>, bool)> =
                eps.iter().map(|(a, r, t)| (a.as_str(), *r, *t)).collect();
            let sl = slice("shop", &format!("svc-{s}"), &format!("svc-{s}-a"), &eps);
            slices.push(versioned((*sl).clone(), next()));
        }
        let mut catalogs = vec![catalog("consul"), catalog("etcd")];
        let mut registrations: Vec<Arc<ExternalRegistration>> = Vec::new();
        let mut memo = Memo::default();
        let mut check = |services: &[Arc<CachedService>],
                         slices: &[Arc<CachedSlice>],
                         catalogs: &[Arc<ExternalCatalog>],
                         registrations: &[Arc<ExternalRegistration>],
                         step: &str| {
            let inputs = Inputs {
                services,
                slices,
                catalogs,
                registrations,
                namespaces: &[],
            };
            assert_eq!(compute_with(inputs, &mut memo), compute(inputs), "{step}");
        };
        check(&services, &slices, &catalogs, &registrations, "first");
        check(&services, &slices, &catalogs, &registrations, "unchanged");

        // One endpoint turns unready.
        let sl = slice(
            "shop",
            "svc-3",
            "svc-3-a",
            &[
                ("10.0.3.0", Some(true), false),
                ("10.0.3.1", Some(false), false),
            ],
        );
        slices[3] = versioned((*sl).clone(), next());
        check(&services, &slices, &catalogs, &registrations, "unready");

        // A new external name and other catalogs for one Service.
        let svc = service(
            "shop",
            "svc-4",
            json!({"catalog-bridge.io/export": "etcd", "catalog-bridge.io/name": "renamed"}),
        );
        services[4] = versioned((*svc).clone(), next());
        check(&services, &slices, &catalogs, &registrations, "renamed");

        // A Service and its slice deleted.
        services.remove(5);
        slices.remove(5);
        check(&services, &slices, &catalogs, &registrations, "deleted");

        // A catalog deleted, then back.
        let etcd = catalogs.pop().expect("etcd");
        check(
            &services,
            &slices,
            &catalogs,
            &registrations,
            "catalog gone",
        );
        catalogs.push(etcd);
        check(
            &services,
            &slices,
            &catalogs,
            &registrations,
            "catalog back",
        );

        // A registration exporting the same instances as an annotation, then removed: the
        // instances stay while either source remains.
        let reg: ExternalRegistration = serde_json::from_value(json!({
            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
            "metadata": {"namespace": "shop", "name": "dup"},
            "spec": {"catalogRef": {"name": "consul"}, "direction": "Export",
                     "service": {"name": "svc-6"}, "externalName": "svc-6"},
        }))
        .expect("test registration");
        registrations.push(versioned(reg, next()));
        check(
            &services,
            &slices,
            &catalogs,
            &registrations,
            "duplicate source",
        );
        let svc = service("shop", "svc-6", json!({}));
        services[5] = versioned((*svc).clone(), next()); // svc-6 sits at index 5 now
        check(
            &services,
            &slices,
            &catalogs,
            &registrations,
            "annotation removed",
        );
        registrations.clear();
        check(
            &services,
            &slices,
            &catalogs,
            &registrations,
            "registration removed",
        );

        // Objects without a resource version are recomputed every time.
        services[0] = service(
            "shop",
            "svc-0",
            json!({"catalog-bridge.io/export": "consul"}),
        );
        check(
            &services,
            &slices,
            &catalogs,
            &registrations,
            "no resource version",
        );
        slices[0] = slice(
            "shop",
            "svc-0",
            "svc-0-a",
            &[("10.9.9.9", Some(true), false)],
        );
        check(
            &services,
            &slices,
            &catalogs,
            &registrations,
            "slice without version",
        );
    }

    #[test]
    fn port_annotation_by_name_and_number() {
        let slices = [slice(
            "shop",
            "api-x",
            "s1",
            &[("10.0.0.1", Some(true), false)],
        )];
        let catalogs = [catalog("consul")];
        for port in ["admin", "9000"] {
            let services = [service(
                "shop",
                "api-x",
                json!({
                    "catalog-bridge.io/export": "consul", "catalog-bridge.io/port": port,
                }),
            )];
            let d = compute(Inputs {
                services: &services,
                slices: &slices,
                catalogs: &catalogs,
                registrations: &[],
                namespaces: &[],
            });
            assert_eq!(addrs(&d, "consul"), ["api-x@10.0.0.1:9090"], "port {port}");
        }
    }

    #[test]
    fn a_bad_annotation_is_reported_and_affects_nothing_else() {
        let services = [
            service(
                "shop",
                "bad-port",
                json!({"catalog-bridge.io/export": "consul", "catalog-bridge.io/port": "grpc"}),
            ),
            service(
                "shop",
                "bad-catalog",
                json!({"catalog-bridge.io/export": "nope,consul"}),
            ),
            service(
                "shop",
                "good",
                json!({"catalog-bridge.io/export": "consul"}),
            ),
        ];
        let slices = [
            slice("shop", "bad-port", "a", &[("10.0.0.1", Some(true), false)]),
            slice(
                "shop",
                "bad-catalog",
                "b",
                &[("10.0.0.2", Some(true), false)],
            ),
            slice("shop", "good", "c", &[("10.0.0.3", Some(true), false)]),
        ];
        let catalogs = [catalog("consul")];
        let d = compute(Inputs {
            services: &services,
            slices: &slices,
            catalogs: &catalogs,
            registrations: &[],
            namespaces: &[],
        });
        assert_eq!(
            addrs(&d, "consul"),
            ["bad-catalog@10.0.0.2:8080", "good@10.0.0.3:8080"]
        );
        let problems: Vec<_> = d
            .exports
            .values()
            .filter_map(|e| {
                e.problem
                    .as_ref()
                    .map(|p| (e.service.as_str(), p.reason.as_str()))
            })
            .collect();
        assert_eq!(
            problems,
            [
                ("bad-catalog", "CatalogNotFound"),
                ("bad-port", "PortNotFound")
            ]
        );
    }

    #[test]
    fn registrations_export_and_imported_services_never_do() {
        let services = [
            service("shop", "api-x", json!({})),
            Arc::new(
                serde_json::from_value::<CachedService>(json!({
                    "metadata": {"namespace": "shop", "name": "mysql-x",
                                 "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
                                 "annotations": {"catalog-bridge.io/export": "consul"}},
                    "spec": {"ports": [{"name": "http", "port": 80}]},
                }))
                .expect("svc"),
            ),
        ];
        let slices = [
            slice("shop", "api-x", "a", &[("10.0.0.1", Some(true), false)]),
            slice("shop", "mysql-x", "b", &[("10.0.0.8", Some(true), false)]),
        ];
        let regs = [Arc::new(
            serde_json::from_value::<ExternalRegistration>(json!({
                "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
                "metadata": {"namespace": "shop", "name": "api-x"},
                "spec": {"catalogRef": {"name": "consul"}, "direction": "Export",
                         "service": {"name": "api-x"}, "externalName": "api_x"},
            }))
            .expect("reg"),
        )];
        let catalogs = [catalog("consul")];
        let d = compute(Inputs {
            services: &services,
            slices: &slices,
            catalogs: &catalogs,
            registrations: &regs,
            namespaces: &[],
        });
        assert_eq!(addrs(&d, "consul"), ["api_x@10.0.0.1:8080"]);
        let imported = d
            .exports
            .values()
            .find(|e| e.service == "mysql-x")
            .expect("reported");
        assert_eq!(
            imported.problem.as_ref().map(|p| p.reason.as_str()),
            Some("ImportedService")
        );
    }

    fn with_policy(name: &str, policy: serde_json::Value) -> Arc<ExternalCatalog> {
        let mut c = (*catalog(name)).clone();
        c.spec.policy = Some(serde_json::from_value(policy).expect("a policy"));
        Arc::new(c)
    }

    fn created(svc: Arc<CachedService>, at: &str) -> Arc<CachedService> {
        let mut s = (*svc).clone();
        s.metadata.creation_timestamp = Some(serde_json::from_value(json!(at)).expect("a time"));
        Arc::new(s)
    }

    fn namespace(name: &str, labels: serde_json::Value) -> Arc<Namespace> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
                .expect("a namespace"),
        )
    }

    fn reason(d: &Desired, ns: &str, catalog: &str) -> Option<&'static str> {
        let e = d
            .exports
            .values()
            .find(|e| {
                e.catalog == catalog
                    && matches!(&e.source, Source::Annotation { namespace, .. } if namespace == ns)
            })
            .expect("reported");
        e.problem.as_ref().map(|p| p.reason.as_str())
    }

    /// Two namespaces exporting `api_x`: `a` created later than `b`.
    fn two_namespaces(catalogs: &str) -> ([Arc<CachedService>; 2], [Arc<CachedSlice>; 2]) {
        let ann = json!({"catalog-bridge.io/export": catalogs, "catalog-bridge.io/name": "api_x"});
        (
            [
                created(service("a", "api", ann.clone()), "2026-02-01T00:00:00Z"),
                created(service("b", "api", ann), "2026-01-01T00:00:00Z"),
            ],
            [
                slice("a", "api", "s", &[("10.0.0.1", Some(true), false)]),
                slice("b", "api", "s", &[("10.0.1.1", Some(true), false)]),
            ],
        )
    }

    #[test]
    fn one_name_from_two_namespaces_stays_with_the_oldest_unless_the_policy_merges() {
        let (services, slices) = two_namespaces("consul,shared");
        let catalogs = [
            catalog("consul"),
            with_policy("shared", json!({"export": {"sharedNames": "Merge"}})),
        ];
        let mut memo = Memo::default();
        let d = compute_with(
            Inputs {
                services: &services,
                slices: &slices,
                catalogs: &catalogs,
                ..Default::default()
            },
            &mut memo,
        );
        // The default: b's export is older and keeps the name; a's is refused.
        assert_eq!(addrs(&d, "consul"), ["api_x@10.0.1.1:8080"]);
        assert_eq!(reason(&d, "a", "consul"), Some("NameConflict"));
        assert_eq!(reason(&d, "b", "consul"), None);
        let message = d
            .exports
            .values()
            .find_map(|e| e.problem.as_ref())
            .expect("a problem");
        assert!(
            message.message.contains("Service b/api"),
            "{}",
            message.message
        );
        // Where the policy merges, both.
        assert_eq!(
            addrs(&d, "shared"),
            ["api_x@10.0.0.1:8080", "api_x@10.0.1.1:8080"]
        );
        // b stops exporting: a takes the name.
        let d = compute_with(
            Inputs {
                services: &services[..1],
                slices: &slices,
                catalogs: &catalogs,
                ..Default::default()
            },
            &mut memo,
        );
        assert_eq!(addrs(&d, "consul"), ["api_x@10.0.0.1:8080"]);
        assert_eq!(reason(&d, "a", "consul"), None);
    }

    #[test]
    fn a_policy_chooses_the_namespaces_and_names_that_may_export() {
        let (services, slices) = two_namespaces("consul");
        let catalogs = [with_policy(
            "consul",
            json!({"export": {
                "namespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "shop"}}},
                "names": [{"prefix": "api_"}],
            }}),
        )];
        let namespaces = [
            namespace("a", json!({"team": "shop"})),
            namespace("b", json!({"team": "pay"})),
        ];
        let d = compute(Inputs {
            services: &services,
            slices: &slices,
            catalogs: &catalogs,
            namespaces: &namespaces,
            ..Default::default()
        });
        // b is older, but may not export here: it keeps no name, and a exports.
        assert_eq!(reason(&d, "b", "consul"), Some("NotAllowed"));
        assert_eq!(reason(&d, "a", "consul"), None);
        assert_eq!(addrs(&d, "consul"), ["api_x@10.0.0.1:8080"]);
        // A name outside the rules.
        let other = [service(
            "a",
            "web",
            json!({"catalog-bridge.io/export": "consul", "catalog-bridge.io/name": "web_x"}),
        )];
        let d = compute(Inputs {
            services: &other,
            slices: &[],
            catalogs: &catalogs,
            namespaces: &namespaces,
            ..Default::default()
        });
        assert_eq!(reason(&d, "a", "consul"), Some("NotAllowed"));
        let p = d
            .exports
            .values()
            .next()
            .expect("an export")
            .problem
            .as_ref()
            .expect("a problem");
        assert!(p.message.contains("\"web_x\""), "{}", p.message);
    }

    /// The objects of a test cluster, by key, as the stores hold them.
    #[derive(Default)]
    struct World {
        services: BTreeMap<(String, String), Arc<CachedService>>,
        slices: BTreeMap<(String, String), Arc<CachedSlice>>,
        registrations: BTreeMap<(String, String), Arc<ExternalRegistration>>,
    }

    impl Objects for World {
        fn service(&self, ns: &str, name: &str) -> Option<Arc<CachedService>> {
            self.services.get(&(ns.into(), name.into())).cloned()
        }
        fn slice(&self, ns: &str, name: &str) -> Option<Arc<CachedSlice>> {
            self.slices.get(&(ns.into(), name.into())).cloned()
        }
        fn registration(&self, ns: &str, name: &str) -> Option<Arc<ExternalRegistration>> {
            self.registrations.get(&(ns.into(), name.into())).cloned()
        }
    }

    /// Random changes to Services (export on and off, names shared across namespaces, created
    /// again), their slices (readiness, moved to another Service, deleted) and registrations,
    /// each folded in by `update` with the keys a watch reports: after every step the state
    /// equals one computed from scratch.
    #[test]
    fn updates_by_changed_keys_equal_a_computation_from_scratch() {
        let catalogs = [
            catalog("consul"),
            with_policy("shared", json!({"export": {"sharedNames": "Merge"}})),
            with_policy(
                "strict",
                json!({"export": {
                    "namespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "shop"}}},
                }}),
            ),
        ];
        let namespaces = [
            namespace("a", json!({"team": "shop"})),
            namespace("b", json!({"team": "shop"})),
            namespace("c", json!({"team": "pay"})),
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut roll = move |n: usize| -> usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut rv = 0u64;
        let mut world = World::default();
        let mut memo = Memo::default();
        let (nss, names) = (["a", "b", "c"], ["x", "y", "z", "w"]);
        let mut first = true;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for step in 0..600 {
            let mut changed = Changed::default();
            let ns = nss[roll(3)];
            let svc = names[roll(4)];
            rv += 1;
            match roll(6) {
                // A Service exported (or not) under one of a few names, created at some time.
                0 | 1 => {
                    let annotations = match roll(4) {
                        0 => json!({}),
                        1 => json!({"catalog-bridge.io/export": "consul,shared,strict"}),
                        2 => json!({"catalog-bridge.io/export": "consul,strict",
                                    "catalog-bridge.io/name": "common"}),
                        _ => json!({"catalog-bridge.io/export": "shared,consul",
                                    "catalog-bridge.io/name": names[roll(4)]}),
                    };
                    let mut s = (*created(
                        service(ns, svc, annotations),
                        &format!("2026-01-0{}T00:00:00Z", 1 + roll(5)),
                    ))
                    .clone();
                    s.metadata.resource_version = Some(rv.to_string());
                    s.metadata.uid = Some(format!("{ns}-{svc}-{}", roll(2)));
                    world.services.insert((ns.into(), svc.into()), Arc::new(s));
                    changed.services.insert((ns.into(), svc.into()));
                }
                2 => {
                    world.services.remove(&(ns.into(), svc.into()));
                    changed.services.insert((ns.into(), svc.into()));
                }
                // A slice of one Service or another, its endpoints ready or not.
                3 | 4 => {
                    let name = format!("s{}", roll(6));
                    let eps: Vec<(String, Option<bool>, bool)> = (0..roll(4))
                        .map(|e| (format!("10.0.{}.{e}", roll(3)), Some(roll(3) > 0), false))
                        .collect();
                    let eps: Vec<(&str, Option<bool>, bool)> =
                        eps.iter().map(|(a, r, t)| (a.as_str(), *r, *t)).collect();
                    let mut sl = (*slice(ns, svc, &name, &eps)).clone();
                    sl.metadata.resource_version = Some(rv.to_string());
                    sl.metadata.uid = Some(format!("{ns}-{name}"));
                    if roll(4) == 0 {
                        world.slices.remove(&(ns.into(), name.clone()));
                    } else {
                        world.slices.insert((ns.into(), name.clone()), Arc::new(sl));
                    }
                    changed.slices.insert((ns.into(), name));
                }
                // A registration exporting a Service, or gone.
                _ => {
                    let name = format!("r{}", roll(3));
                    if roll(3) == 0 {
                        world.registrations.remove(&(ns.into(), name.clone()));
                    } else {
                        let target = ["consul", "strict"][roll(2)];
                        let external = ["common", svc][roll(2)];
                        let mut reg: ExternalRegistration = serde_json::from_value(json!({
                            "apiVersion": "catalog-bridge.io/v1alpha1", "kind": "ExternalRegistration",
                            "metadata": {"namespace": ns, "name": name, "resourceVersion": rv.to_string()},
                            "spec": {"catalogRef": {"name": target},
                                     "direction": "Export", "service": {"name": svc},
                                     "externalName": external},
                        }))
                        .expect("test registration");
                        reg.metadata.creation_timestamp = Some(
                            serde_json::from_value(json!(format!(
                                "2026-01-0{}T00:00:00Z",
                                1 + roll(5)
                            )))
                            .expect("a time"),
                        );
                        world
                            .registrations
                            .insert((ns.into(), name.clone()), Arc::new(reg));
                    }
                    changed.registrations.insert((ns.into(), name));
                }
            }
            let (services, slices, registrations): (Vec<_>, Vec<_>, Vec<_>) = (
                world.services.values().cloned().collect(),
                world.slices.values().cloned().collect(),
                world.registrations.values().cloned().collect(),
            );
            let inputs = Inputs {
                services: &services,
                slices: &slices,
                catalogs: &catalogs,
                registrations: &registrations,
                namespaces: &namespaces,
            };
            let got = if first {
                first = false;
                compute_with(inputs, &mut memo)
            } else {
                update(&world, &changed, &mut memo)
            };
            assert_eq!(got, compute(inputs), "step {step}: {changed:?}");
            for e in got.exports.values() {
                *seen
                    .entry(
                        e.problem
                            .as_ref()
                            .map_or("ok", |p| p.reason.as_str())
                            .to_string(),
                    )
                    .or_default() += 1;
            }
            for (name, c) in &got.catalogs {
                if !c.is_empty() {
                    *seen.entry(name.clone()).or_default() += 1;
                }
            }
        }
        // The run went through the cases it is meant to: names kept by one namespace and
        // refused to another, policies refusing, instances in every catalog.
        for case in [
            "NameConflict",
            "NotAllowed",
            "ServiceNotFound",
            "consul",
            "shared",
            "strict",
        ] {
            assert!(
                seen.get(case).copied().unwrap_or(0) > 0,
                "never {case}: {seen:?}"
            );
        }
    }

    /// A catalog named twice in the annotation is one export, counted once among the invalid
    /// ones and gone with it.
    #[test]
    fn a_catalog_named_twice_is_one_export() {
        let catalogs = [catalog("consul")];
        let services = [service(
            "shop",
            "api-x",
            json!({"catalog-bridge.io/export": "consul, consul, nowhere, nowhere"}),
        )];
        let slices = [slice(
            "shop",
            "api-x",
            "s1",
            &[("10.0.0.1", Some(true), false)],
        )];
        let mut memo = Memo::default();
        let inputs = Inputs {
            services: &services,
            slices: &slices,
            catalogs: &catalogs,
            ..Default::default()
        };
        let d = compute_with(inputs, &mut memo);
        assert_eq!(d.exports.len(), 2);
        assert_eq!(addrs(&d, "consul"), ["api-x@10.0.0.1:8080"]);
        let missing = ("annotation".to_string(), "CatalogNotFound".to_string());
        assert_eq!(d.invalid.get(&missing), Some(&1));
        let d = compute_with(
            Inputs {
                services: &[],
                ..inputs
            },
            &mut memo,
        );
        assert!(d.exports.is_empty() && d.invalid.is_empty(), "{d:?}");
        assert!(d.catalogs["consul"].is_empty());
    }
}
