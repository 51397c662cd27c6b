//! Prometheus metrics (`/metrics`). Labels are bounded: catalog names, operation kinds,
//! results and reasons — never error text.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CatalogLabel {
    catalog: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    catalog: String,
    op: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EntriesLabels {
    catalog: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigErrorLabels {
    kind: String,
    reason: String,
}

/// Every metric catalog-bridge exports.
pub struct Metrics {
    registry: Registry,
    catalog_up: Family<CatalogLabel, Gauge>,
    operations: Family<OpLabels, Counter>,
    requests: Family<OpLabels, Counter>,
    entries: Family<EntriesLabels, Gauge>,
    propagation: Family<CatalogLabel, Histogram>,
    drift: Family<CatalogLabel, Counter>,
    refused_exports: Family<CatalogLabel, Gauge>,
    leader: Gauge,
    config_errors: Family<ConfigErrorLabels, Gauge>,
    import_skipped: Family<RegistrationLabels, Gauge>,
    import_held: Family<RegistrationLabels, Gauge>,
    import_holds: Family<HoldLabels, Counter>,
    task_restarts: Family<TaskLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HoldLabels {
    catalog: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistrationLabels {
    catalog: String,
    namespace: String,
    registration: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("catalog_bridge");
        let catalog_up = Family::<CatalogLabel, Gauge>::default();
        registry.register(
            "catalog_up",
            "1 while the catalog answers, 0 while it is unreachable",
            catalog_up.clone(),
        );
        let operations = Family::<OpLabels, Counter>::default();
        registry.register(
            "backend_operations",
            "Entries written to catalogs, by operation (put, delete) and result (ok; refused: the catalog refused that export's write; error: not written because of an outage)",
            operations.clone(),
        );
        let requests = Family::<OpLabels, Counter>::default();
        registry.register(
            "backend_requests",
            "Round trips to catalogs, by kind (read, write) and result",
            requests.clone(),
        );
        let entries = Family::<EntriesLabels, Gauge>::default();
        registry.register(
            "entries",
            "Entries this controller holds, per catalog and direction",
            entries.clone(),
        );
        let propagation = Family::<CatalogLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "propagation_delay_seconds",
            "Time from a Kubernetes change (EndpointSlice, Service, registration) being seen to its catalog commit",
            propagation.clone(),
        );
        let drift = Family::<CatalogLabel, Counter>::default();
        registry.register(
            "drift_repairs",
            "Entries found changed or missing in a catalog by the drift check, and repaired",
            drift.clone(),
        );
        let refused_exports = Family::<CatalogLabel, Gauge>::default();
        registry.register(
            "refused_exports",
            "Exports whose writes the catalog refuses now (an ACL or role on their name, a size limit), held back while every other export is written",
            refused_exports.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and writes",
            leader.clone(),
        );
        let config_errors = Family::<ConfigErrorLabels, Gauge>::default();
        registry.register(
            "invalid_exports",
            "Exports that cannot take effect now (bad annotation, unknown catalog, missing Service or port), by source kind and reason",
            config_errors.clone(),
        );
        let import_skipped = Family::<RegistrationLabels, Gauge>::default();
        registry.register(
            "import_skipped_entries",
            "Catalog entries an import could not parse and left out, per registration",
            import_skipped.clone(),
        );
        let import_held = Family::<RegistrationLabels, Gauge>::default();
        registry.register(
            "import_held_endpoints",
            "Endpoints an import keeps although its catalog suddenly stopped listing them (spec.import.emptyHoldSeconds), per registration",
            import_held.clone(),
        );
        let import_holds = Family::<HoldLabels, Counter>::default();
        registry.register(
            "import_holds",
            "Import empty-holds that started, were released (the catalog listed the instances again) or expired (their endpoints removed), per catalog",
            import_holds.clone(),
        );
        let task_restarts = Family::<TaskLabel, Counter>::default();
        registry.register(
            "task_restarts",
            "Writer, import and drain tasks that stopped unexpectedly (a panic, an error) and were started again, by kind of task",
            task_restarts.clone(),
        );
        Metrics {
            task_restarts,
            import_skipped,
            import_held,
            import_holds,
            registry,
            catalog_up,
            operations,
            requests,
            entries,
            propagation,
            drift,
            refused_exports,
            leader,
            config_errors,
        }
    }

    fn catalog(c: &str) -> CatalogLabel {
        CatalogLabel {
            catalog: c.to_string(),
        }
    }

    pub fn up(&self, catalog: &str, up: bool) {
        self.catalog_up
            .get_or_create(&Self::catalog(catalog))
            .set(i64::from(up));
    }

    /// Starts a catalog's counters at 0, so that `rate()` and `increase()` see its first failed
    /// write or drift repair (a series that first appears at 1 shows no increase).
    pub fn catalog_started(&self, catalog: &str) {
        for (family, op) in [
            (&self.operations, "put"),
            (&self.operations, "delete"),
            (&self.requests, "read"),
            (&self.requests, "write"),
        ] {
            for result in ["ok", "error", "refused"] {
                if op == "read" && result == "refused" {
                    continue;
                }
                drop(family.get_or_create(&OpLabels {
                    catalog: catalog.into(),
                    op: op.into(),
                    result: result.into(),
                }));
            }
        }
        drop(self.drift.get_or_create(&Self::catalog(catalog)));
        for outcome in ["started", "released", "expired"] {
            drop(self.import_holds.get_or_create(&HoldLabels {
                catalog: catalog.into(),
                outcome: outcome.into(),
            }));
        }
        self.refused_exports(catalog, 0);
    }

    /// How many exports' writes `catalog` refuses now.
    pub fn refused_exports(&self, catalog: &str, n: i64) {
        self.refused_exports
            .get_or_create(&Self::catalog(catalog))
            .set(n);
    }

    pub fn operations(&self, catalog: &str, op: &str, result: &str, n: u64) {
        if n > 0 {
            self.operations
                .get_or_create(&OpLabels {
                    catalog: catalog.into(),
                    op: op.into(),
                    result: result.into(),
                })
                .inc_by(n);
        }
    }

    pub fn round_trips(&self, catalog: &str, result: &str, n: u64) {
        self.requests
            .get_or_create(&OpLabels {
                catalog: catalog.into(),
                op: "write".into(),
                result: result.into(),
            })
            .inc_by(n);
    }

    pub fn reads(&self, catalog: &str, result: &str) {
        self.requests
            .get_or_create(&OpLabels {
                catalog: catalog.into(),
                op: "read".into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn entries(&self, catalog: &str, direction: &str, n: i64) {
        self.entries
            .get_or_create(&EntriesLabels {
                catalog: catalog.into(),
                direction: direction.into(),
            })
            .set(n);
    }

    pub fn propagation(&self, catalog: &str, d: Duration) {
        self.propagation
            .get_or_create(&Self::catalog(catalog))
            .observe(d.as_secs_f64());
    }

    pub fn drift(&self, catalog: &str, n: u64) {
        self.drift.get_or_create(&Self::catalog(catalog)).inc_by(n);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Replaces the counts of invalid exports with `counts` of `(source kind, reason)`.
    pub fn set_invalid_exports(&self, counts: &std::collections::BTreeMap<(String, String), i64>) {
        self.config_errors.clear();
        for ((kind, reason), n) in counts {
            self.config_errors
                .get_or_create(&ConfigErrorLabels {
                    kind: kind.clone(),
                    reason: reason.clone(),
                })
                .set(*n);
        }
    }

    /// Drops the gauges of a deleted catalog (its counters stay, as counters do).
    pub fn forget_catalog(&self, catalog: &str) {
        self.catalog_up.remove(&Self::catalog(catalog));
        self.refused_exports.remove(&Self::catalog(catalog));
        self.entries.remove(&EntriesLabels {
            catalog: catalog.into(),
            direction: "export".into(),
        });
    }

    /// Forgets the skipped-entries and held-endpoints gauges of a registration that is gone.
    pub fn forget_import(&self, catalog: &str, namespace: &str, registration: &str) {
        let labels = RegistrationLabels {
            catalog: catalog.into(),
            namespace: namespace.into(),
            registration: registration.into(),
        };
        self.import_skipped.remove(&labels);
        self.import_held.remove(&labels);
    }

    /// Endpoints import `namespace/registration` holds now (the empty-hold).
    pub fn import_held(&self, catalog: &str, namespace: &str, registration: &str, n: i64) {
        self.import_held
            .get_or_create(&RegistrationLabels {
                catalog: catalog.into(),
                namespace: namespace.into(),
                registration: registration.into(),
            })
            .set(n);
    }

    /// An import empty-hold in `catalog` started, was released or expired (`outcome`).
    pub fn import_hold_changed(&self, catalog: &str, outcome: &str) {
        self.import_holds
            .get_or_create(&HoldLabels {
                catalog: catalog.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Entries import `namespace/registration` skipped in `catalog`.
    pub fn import_skipped(&self, catalog: &str, namespace: &str, registration: &str, n: i64) {
        self.import_skipped
            .get_or_create(&RegistrationLabels {
                catalog: catalog.into(),
                namespace: namespace.into(),
                registration: registration.into(),
            })
            .set(n);
    }

    /// Starts the restarts counter of a kind of task at 0 (see [`Metrics::catalog_started`]).
    pub fn task_supervised(&self, task: &str) {
        drop(
            self.task_restarts
                .get_or_create(&TaskLabel { task: task.into() }),
        );
    }

    /// Restarts counted so far for a kind of task.
    pub fn task_restarts(&self, task: &str) -> u64 {
        self.task_restarts
            .get_or_create(&TaskLabel { task: task.into() })
            .get()
    }

    pub fn task_restarted(&self, task: &str) {
        self.task_restarts
            .get_or_create(&TaskLabel { task: task.into() })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out = format!("# encoding metrics failed: {e}\n");
        }
        out
    }
}
