//! What the controller's watches tell the import tasks: a change to an object some import
//! maintains ([`Touched`]), and the stores to check whose a Service is ([`Watched`]).

use crate::k8s::cached::CachedService;
use crate::k8s::cached::CachedSlice;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::broadcast;

use super::render::{Kind, service_name};
use crate::api::crd::ExternalRegistration;
use crate::api::labels::{REGISTRATION_LABEL, imported_by, is_imported};
use crate::model::{Problem, Reason};

/// A change the controller's watches saw to an object some import maintains.
#[derive(Clone, Debug, PartialEq)]
pub enum Touched {
    Object(TouchedObject),
    /// A watch was listed again: deletions during the gap were not reported one by one.
    Relisted,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TouchedObject {
    pub namespace: String,
    /// The registration named by the object's label.
    pub registration: String,
    pub kind: Kind,
    pub name: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub deleted: bool,
}

impl Touched {
    /// What an event of the Service or EndpointSlice watch tells the imports, if anything.
    pub fn from_event<K: Resource>(kind: Kind, ev: &watcher::Event<K>) -> Option<Touched> {
        match ev {
            watcher::Event::Apply(o) => Touched::of(kind, o, false),
            watcher::Event::Delete(o) => Touched::of(kind, o, true),
            watcher::Event::InitDone => Some(Touched::Relisted),
            watcher::Event::Init | watcher::Event::InitApply(_) => None,
        }
    }

    /// The change to `obj`, if it is an object an import maintains.
    pub fn of(kind: Kind, obj: &impl Resource, deleted: bool) -> Option<Touched> {
        let meta = obj.meta();
        let labels = meta.labels.as_ref()?;
        if !is_imported(Some(labels)) {
            return None;
        }
        Some(Touched::Object(TouchedObject {
            namespace: meta.namespace.clone()?,
            registration: labels.get(REGISTRATION_LABEL)?.clone(),
            kind,
            name: meta.name.clone()?,
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            deleted,
        }))
    }
}

/// The controller's view of the objects imports maintain: its stores, and the changes its
/// watches see.
#[derive(Clone)]
pub struct Watched {
    pub services: Store<CachedService>,
    pub slices: Store<CachedSlice>,
    pub registrations: Store<ExternalRegistration>,
    pub touched: broadcast::Sender<Touched>,
}

impl Watched {
    /// The Service an import would write, when someone else's holds its name: a Service of the
    /// user's, or of another registration. An import never takes one over.
    pub fn conflict(&self, reg: &ExternalRegistration) -> Option<Problem> {
        let ns = reg.namespace()?;
        let name = service_name(reg);
        let svc = self.services.get(&ObjectRef::new(&name).within(&ns))?;
        let labels = svc.metadata.labels.as_ref();
        if imported_by(labels, &reg.name_any()) {
            return None;
        }
        let whose = match labels.and_then(|l| l.get(REGISTRATION_LABEL)) {
            Some(other) if is_imported(labels) => {
                format!("the import of ExternalRegistration {ns}/{other}")
            }
            _ => "someone else (it is not an imported Service)".to_string(),
        };
        Some(Problem {
            reason: Reason::ServiceConflict,
            message: format!(
                "Service {ns}/{name} already exists and belongs to {whose}; an import never takes \
                 a Service over: set target.serviceName to another name"
            ),
        })
    }

    /// Whether `reg` still exists, the same object, and is not being deleted.
    pub fn holds(&self, reg: &ExternalRegistration) -> bool {
        let Some(ns) = reg.namespace() else {
            return false;
        };
        self.registrations
            .get(&ObjectRef::new(&reg.name_any()).within(&ns))
            .is_some_and(|r| r.uid() == reg.uid() && r.metadata.deletion_timestamp.is_none())
    }
}
