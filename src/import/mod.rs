//! Import, from the catalogs to Kubernetes: one supervised task per import registration that
//! follows its external service in the catalog and keeps a selector-less Service and its
//! EndpointSlices equal to the healthy instances.
//!
//! ```text
//! Backend::watch_service ─▶ ImportSnapshot ─▶ addresses ─▶ hold (pure) ─▶ render (pure) ─▶ apply (server-side apply)
//! ```

pub mod addresses;
pub mod apply;
pub mod hold;
pub mod importers;
pub mod render;
pub mod task;
pub mod touched;

pub use importers::Importers;
pub use task::{Held, HoldNote, ImportView};
pub use touched::{Touched, Watched};
