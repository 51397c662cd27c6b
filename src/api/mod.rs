//! The API users write and read: the custom resources, and the annotations and labels
//! catalog-bridge reads and sets. Types only; no client.

pub mod crd;
pub mod labels;
pub mod policy;
