//! Which objects the watches saw change since desired state was last computed: Services,
//! EndpointSlices and ExternalRegistrations by namespace and name, so that the desired-state
//! step reads those alone; a change to a catalog or a namespace, which the loop checks for
//! what desired state reads of them (a status update is not one); a relist asks for all.

use std::collections::HashSet;

use kube::Resource;
use kube::runtime::watcher;

/// The objects changed since the last take.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Something changed that is not named below: every object must be read again.
    pub all: bool,
    /// An ExternalCatalog changed (perhaps its status only).
    pub catalogs: bool,
    /// A Namespace changed (perhaps not its labels).
    pub namespaces: bool,
    pub services: HashSet<(String, String)>,
    pub slices: HashSet<(String, String)>,
    pub registrations: HashSet<(String, String)>,
}

impl Changed {
    /// Notes what an event of a watch of `kind` (`Service`, `EndpointSlice`, …) changed.
    pub fn note<K: Resource>(&mut self, kind: &str, ev: &watcher::Event<K>) {
        let object = match ev {
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => o,
            // A list starts or ends: deletions during a gap are not told one by one. Objects
            // listed are read when the list is done.
            watcher::Event::Init | watcher::Event::InitDone => {
                self.all = true;
                return;
            }
            watcher::Event::InitApply(_) => return,
        };
        let m = object.meta();
        let (ns, Some(name)) = (m.namespace.clone().unwrap_or_default(), m.name.clone()) else {
            self.all = true;
            return;
        };
        let set = match kind {
            "Service" => &mut self.services,
            "EndpointSlice" => &mut self.slices,
            "ExternalRegistration" => &mut self.registrations,
            "ExternalCatalog" => {
                self.catalogs = true;
                return;
            }
            "Namespace" => {
                self.namespaces = true;
                return;
            }
            _ => {
                self.all = true;
                return;
            }
        };
        set.insert((ns, name));
    }

    pub fn is_empty(&self) -> bool {
        !self.all
            && !self.catalogs
            && !self.namespaces
            && self.services.is_empty()
            && self.slices.is_empty()
            && self.registrations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Namespace, Service};

    fn service(ns: &str, name: &str) -> Service {
        let mut s = Service::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s
    }

    #[test]
    fn named_kinds_are_noted_by_key_and_anything_else_asks_for_all() {
        let mut c = Changed::default();
        assert!(c.is_empty());
        c.note("Service", &watcher::Event::Apply(service("a", "x")));
        c.note("Service", &watcher::Event::Delete(service("a", "y")));
        c.note("Service", &watcher::Event::InitApply(service("a", "z")));
        assert!(!c.all);
        assert_eq!(c.services.len(), 2);
        let mut ns = Namespace::default();
        ns.metadata.name = Some("a".into());
        c.note("Namespace", &watcher::Event::Apply(ns));
        assert!(c.namespaces && !c.all);
        c.note("Pod", &watcher::Event::Apply(service("a", "p")));
        assert!(c.all);
        let mut c = Changed::default();
        c.note::<Service>("Service", &watcher::Event::InitDone);
        assert!(c.all && c.services.is_empty());
    }
}
