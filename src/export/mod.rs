//! Export, from Kubernetes to the catalogs: the desired state of every catalog (pure), the plan
//! (a pure diff against what this controller owns there), one writer per catalog, the removal
//! of what a moved or deleted catalog left behind, and the supervisor that starts, restarts and
//! stops the writers as ExternalCatalogs come and go.
//!
//! ```text
//! desired::compute ─▶ Snapshot per catalog ─▶ Writer: gate, read_owned, plan, Backend::apply
//!                                               │  isolate: a refused write holds back only
//!                                               │  its export (held), the rest is written
//!                                               └▶ Report (status, metrics)
//! ```

pub mod desired;
pub mod held;
pub mod isolate;
pub mod plan;
pub mod records;
pub mod retire;
pub mod snapshot;
pub mod writer;
pub mod writers;

pub use snapshot::{Report, Snapshot};
pub use writer::Writer;
