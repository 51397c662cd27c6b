//! Desired state: from Services, their EndpointSlices, the ExternalCatalogs and the Export
//! ExternalRegistrations, what every catalog should hold — and, for each export, whether it is
//! valid. Pure: no client, no clock; the same inputs give the same output.

mod endpoints;
mod memo;
mod policy;
mod request;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::api::crd::{ExternalCatalog, ExternalRegistration};
use crate::api::labels::{SERVICE_NAME_LABEL, is_imported};
use crate::model::{DesiredCatalog, Instance, Problem, Reason};
use endpoints::instances;
pub use memo::Memo;
use memo::{Memoized, fingerprint, withdraw};
pub use request::valid_external_name;
use request::{Request, request_from_annotations, request_from_registration};

/// The Kubernetes objects desired state is computed from.
#[derive(Clone, Copy, Default)]
pub struct Inputs<'a> {
    pub services: &'a [Arc<Service>],
    pub slices: &'a [Arc<EndpointSlice>],
    pub catalogs: &'a [Arc<ExternalCatalog>],
    pub registrations: &'a [Arc<ExternalRegistration>],
    /// For the labels the catalogs' policies select namespaces by.
    pub namespaces: &'a [Arc<Namespace>],
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
    pub exports: Vec<Export>,
}

/// Computes desired state from scratch. Invalid exports are reported in `exports` and
/// contribute nothing; every other export is unaffected by them.
pub fn compute(inputs: Inputs<'_>) -> Desired {
    compute_with(inputs, &mut Memo::default())
}

/// [`compute`], reusing what `memo` holds from the previous run for every export whose
/// Service, EndpointSlices and settings did not change; the result is the same.
pub fn compute_with(inputs: Inputs<'_>, memo: &mut Memo) -> Desired {
    let catalogs: BTreeSet<String> = inputs
        .catalogs
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    let services: HashMap<(&str, &str), &Service> = inputs
        .services
        .iter()
        .filter_map(|s| {
            Some((
                (
                    s.metadata.namespace.as_deref()?,
                    s.metadata.name.as_deref()?,
                ),
                s.as_ref(),
            ))
        })
        .collect();
    let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in inputs.slices {
        if let (Some(ns), Some(svc)) = (
            s.metadata.namespace.as_deref(),
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str),
        ) {
            slices.entry((ns, svc)).or_default().push(s);
        }
    }

    let mut requests: Vec<Request> = Vec::new();
    for svc in inputs.services {
        if let Some(r) = request_from_annotations(svc) {
            requests.push(r);
        }
    }
    for reg in inputs.registrations {
        if let Some(r) = request_from_registration(reg) {
            requests.push(r);
        }
    }

    let policies = policy::Policies::new(inputs.catalogs, inputs.namespaces, &requests, &services);
    let specs: HashMap<&str, &ExternalCatalog> = inputs
        .catalogs
        .iter()
        .filter_map(|c| Some((c.metadata.name.as_deref()?, c.as_ref())))
        .collect();
    let mut exports = Vec::new();
    let mut seen: HashSet<Source> = HashSet::new();
    for req in requests {
        let svc = services
            .get(&(req.namespace.as_str(), req.service.as_str()))
            .copied();
        let svc_slices = slices
            .get(&(req.namespace.as_str(), req.service.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let external_name = req.external_name.clone().unwrap_or(req.service.clone());
        let fingerprint = match (&req.problem, svc) {
            (None, Some(svc)) => fingerprint(svc, svc_slices, &req, &external_name),
            _ => None,
        };
        let previous = memo.sources.remove(&req.source);
        let resolved: Result<Arc<Vec<Instance>>, Problem> = match (&req.problem, svc) {
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
                svc_slices,
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
                source: req.source.clone(),
                catalog: catalog.clone(),
                service: req.service.clone(),
                external_name: external_name.clone(),
                endpoints: 0,
                problem: None,
                warnings: Vec::new(),
            };
            if let Some(cat) = specs.get(catalog.as_str()) {
                export.warnings = crate::backend::meta_left_out(&cat.spec, &req.meta)
                    .into_iter()
                    .map(|why| Problem {
                        reason: Reason::InvalidMeta,
                        message: format!("left out of the entries in {catalog}: {why}"),
                    })
                    .collect();
            }
            match &resolved {
                Err(p) => export.problem = Some(p.clone()),
                Ok(_) if !catalogs.contains(catalog) => {
                    export.problem = Some(Problem {
                        reason: Reason::CatalogNotFound,
                        message: format!("ExternalCatalog {catalog:?} does not exist"),
                    })
                }
                Ok(_) if let Some(p) = policies.refusal(&req, catalog, &external_name) => {
                    export.problem = Some(p)
                }
                Ok(list) => {
                    export.endpoints = list.len();
                    contributed.push(catalog.clone());
                }
            }
            exports.push(export);
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
                withdraw(&mut memo.catalogs, p);
            }
            if let Ok(list) = &resolved {
                for catalog in &contributed {
                    memo.catalogs.entry(catalog.clone()).or_default().add(list);
                }
            }
        }
        seen.insert(req.source.clone());
        memo.sources.insert(
            req.source,
            Memoized {
                fingerprint,
                resolved,
                contributed,
            },
        );
    }
    // Sources that are gone take their instances with them.
    let gone: Vec<Source> = memo
        .sources
        .keys()
        .filter(|s| !seen.contains(*s))
        .cloned()
        .collect();
    for source in gone {
        if let Some(p) = memo.sources.remove(&source) {
            withdraw(&mut memo.catalogs, &p);
        }
    }
    memo.catalogs.retain(|name, _| catalogs.contains(name));
    exports.sort_by(|a, b| (&a.source, &a.catalog).cmp(&(&b.source, &b.catalog)));
    Desired {
        catalogs: catalogs
            .iter()
            .map(|name| {
                let m = memo.catalogs.entry(name.clone()).or_default();
                if m.dirty {
                    m.built = Arc::new(DesiredCatalog {
                        instances: m.counts.keys().cloned().collect(),
                    });
                    m.dirty = false;
                }
                (name.clone(), m.built.clone())
            })
            .collect(),
        exports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::labels::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
    use serde_json::json;

    fn service(ns: &str, name: &str, annotations: serde_json::Value) -> Arc<Service> {
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
    ) -> Arc<EndpointSlice> {
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
            .instances
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
        assert!(d.catalogs["other"].instances.is_empty());
        let i = &d.catalogs["consul"].instances[0];
        assert_eq!(i.tags, ["v1", "blue"]);
        assert_eq!(i.meta.get("team").map(String::as_str), Some("shop"));
        assert_eq!(d.exports.len(), 1);
        assert_eq!(d.exports[0].endpoints, 3);
        assert_eq!(d.exports[0].problem, None);
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
            serde_json::from_value::<EndpointSlice>(json!({
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
        let by_catalog: BTreeMap<&str, &Export> =
            d.exports.iter().map(|e| (e.catalog.as_str(), e)).collect();
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
        let mut services: Vec<Arc<Service>> = Vec::new();
        let mut slices: Vec<Arc<EndpointSlice>> = Vec::new();
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
        let mut check = |services: &[Arc<Service>],
                         slices: &[Arc<EndpointSlice>],
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
            .iter()
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
                serde_json::from_value::<Service>(json!({
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
            .iter()
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

    fn created(svc: Arc<Service>, at: &str) -> Arc<Service> {
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
            .iter()
            .find(|e| {
                e.catalog == catalog
                    && matches!(&e.source, Source::Annotation { namespace, .. } if namespace == ns)
            })
            .expect("reported");
        e.problem.as_ref().map(|p| p.reason.as_str())
    }

    /// Two namespaces exporting `api_x`: `a` created later than `b`.
    fn two_namespaces(catalogs: &str) -> ([Arc<Service>; 2], [Arc<EndpointSlice>; 2]) {
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
            .iter()
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
        let p = d.exports[0].problem.as_ref().expect("a problem");
        assert!(p.message.contains("\"web_x\""), "{}", p.message);
    }
}
