//! An in-memory catalog for fast tests of the writer, the supervisors and the pipeline: entries
//! in a map, external services to import, and faults on demand (down, a panic in the next
//! write or watch). Never a stand-in for a real catalog in an integration test.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::watch;

use super::{Backend, BackendError, External, ImportSnapshot, Record};
use crate::api::crd::ServerInfo;
use crate::model::Instance;
use crate::model::Op;

/// A catalog in a map. Entries of other owners can be planted with [`Memory::put_foreign`];
/// [`Memory::set_down`] makes every call fail as an unreachable catalog would.
#[derive(Debug)]
pub struct Memory {
    owner: String,
    /// What [`Backend::location`] says: two Memory catalogs are one place when it is equal.
    location: String,
    batch: usize,
    entries: Mutex<BTreeMap<String, (String, Record)>>,
    down: AtomicBool,
    writes: AtomicUsize,
    round_trips: AtomicUsize,
    /// The next `apply` panics (a fault injected by a test).
    panic_on_apply: AtomicBool,
    /// The next `watch_service` panics.
    panic_on_watch: AtomicBool,
    /// External services to import, by name: what an import watch reports.
    external: watch::Sender<BTreeMap<String, Vec<External>>>,
    /// Batches with an operation on a key starting with this are refused as a whole, as an
    /// ACL refuses a name; with `true`, the refusal names the operations (as Consul does).
    refused: Mutex<Option<(String, bool)>>,
    /// The owner marker of this owner id: its value and version.
    marker: Mutex<Option<(Vec<u8>, i64)>>,
}

impl Memory {
    pub fn new(owner: &str, batch: usize) -> Memory {
        Memory {
            owner: owner.to_string(),
            location: "memory".to_string(),
            batch: batch.max(1),
            entries: Mutex::default(),
            down: AtomicBool::new(false),
            writes: AtomicUsize::new(0),
            round_trips: AtomicUsize::new(0),
            panic_on_apply: AtomicBool::new(false),
            panic_on_watch: AtomicBool::new(false),
            external: watch::channel(BTreeMap::new()).0,
            refused: Mutex::new(None),
            marker: Mutex::new(None),
        }
    }

    /// Refuses every batch holding an operation on a key that starts with `prefix`
    /// ([`BackendError::Refused`], naming those operations when `named`); the batches before
    /// it are written. An empty prefix refuses nothing.
    pub fn refuse_prefix(&self, prefix: &str, named: bool) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) =
            (!prefix.is_empty()).then(|| (prefix.to_string(), named));
    }

    /// The refusal of `chunk`, if it holds a refused key.
    fn refusal(&self, chunk: &[Op]) -> Option<BackendError> {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let (prefix, named) = refused.as_ref()?;
        let keys: Vec<String> = chunk
            .iter()
            .map(|op| op.key().to_string())
            .filter(|k| k.starts_with(prefix.as_str()))
            .collect();
        (!keys.is_empty()).then(|| BackendError::Refused {
            message: format!("permission denied on {}", keys.join(", ")),
            keys: if *named { keys } else { Vec::new() },
        })
    }

    /// The next write panics, as a bug in a writer would.
    pub fn panic_on_next_apply(&self) {
        self.panic_on_apply.store(true, Ordering::SeqCst);
    }

    /// The import watch panics at its next change.
    pub fn panic_on_next_watch(&self) {
        self.panic_on_watch.store(true, Ordering::SeqCst);
    }

    /// Registers the instances of external service `name`, as software outside Kubernetes
    /// would; import watches see them at once.
    pub fn register_external(&self, name: &str, mut instances: Vec<External>) {
        instances.sort();
        self.external.send_modify(|m| {
            m.insert(name.to_string(), instances);
        });
    }

    /// The same map, said to be at `location`.
    pub fn at(mut self, location: &str) -> Memory {
        self.location = location.to_string();
        self
    }

    fn lock_marker(&self) -> std::sync::MutexGuard<'_, Option<(Vec<u8>, i64)>> {
        self.marker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, Record)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An entry written by someone else.
    pub fn put_foreign(&self, key: &str, owner: &str, record: Record) {
        self.lock()
            .insert(key.to_string(), (owner.to_string(), record));
    }

    /// Every entry, whoever owns it.
    pub fn all(&self) -> BTreeMap<String, (String, Record)> {
        self.lock().clone()
    }

    /// Forgets everything, as a Consul dev agent does on restart.
    pub fn wipe(&self) {
        self.lock().clear();
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Entries put or deleted so far.
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// Write round trips (batches) so far.
    pub fn round_trips(&self) -> usize {
        self.round_trips.load(Ordering::SeqCst)
    }

    fn check_up(&self) -> Result<(), BackendError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(BackendError::Unreachable(
                "memory catalog is down (connection refused)".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for Memory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn describe(&self) -> String {
        format!("memory {} (owner {})", self.location, self.owner)
    }

    fn render(&self, instances: &[Instance]) -> BTreeMap<String, Record> {
        instances
            .iter()
            .map(|i| {
                (
                    i.stable_id(),
                    json!({"name": i.name, "address": i.host_port(), "origin": i.origin.to_string(),
                           "tags": i.tags, "meta": i.meta}),
                )
            })
            .collect()
    }

    /// Nothing is sized by the number of entries.
    async fn expect(&self, _: &[Instance]) -> Result<(), BackendError> {
        Ok(())
    }

    async fn read_owned(&self) -> Result<BTreeMap<String, Record>, BackendError> {
        self.check_up()?;
        Ok(self
            .lock()
            .iter()
            .filter(|(_, (owner, _))| *owner == self.owner)
            .map(|(k, (_, r))| (k.clone(), r.clone()))
            .collect())
    }

    async fn apply(&self, ops: &[Op]) -> Result<usize, BackendError> {
        if self.panic_on_apply.swap(false, Ordering::SeqCst) {
            panic!("injected: the memory catalog's apply panics");
        }
        let mut trips = 0;
        for chunk in ops.chunks(self.batch) {
            self.check_up()?;
            if let Some(e) = self.refusal(chunk) {
                self.round_trips.fetch_add(1, Ordering::SeqCst);
                return Err(e);
            }
            let mut entries = self.lock();
            for op in chunk {
                match op {
                    Op::Put { key, record } => {
                        entries.insert(key.clone(), (self.owner.clone(), record.clone()));
                    }
                    Op::Delete { key } => {
                        if entries.get(key).is_some_and(|(o, _)| *o == self.owner) {
                            entries.remove(key);
                        }
                    }
                }
            }
            self.writes.fetch_add(chunk.len(), Ordering::SeqCst);
            self.round_trips.fetch_add(1, Ordering::SeqCst);
            trips += 1;
        }
        Ok(trips)
    }

    async fn location(&self) -> Result<String, BackendError> {
        self.check_up()?;
        Ok(self.location.clone())
    }

    async fn probe(&self) -> Result<ServerInfo, BackendError> {
        self.check_up()?;
        Ok(ServerInfo {
            mode: Some("memory".into()),
            ..Default::default()
        })
    }

    async fn watch_service(
        &self,
        name: &str,
        tx: watch::Sender<ImportSnapshot>,
    ) -> Result<(), BackendError> {
        let mut external = self.external.subscribe();
        loop {
            if self.panic_on_watch.swap(false, Ordering::SeqCst) {
                panic!("injected: the memory catalog's import watch panics");
            }
            let instances = external.borrow_and_update().get(name).cloned();
            super::publish_read(&tx, instances.unwrap_or_default(), Vec::new());
            tokio::select! {
                r = external.changed() => if r.is_err() { return Ok(()) },
                () = tx.closed() => return Ok(()),
            }
        }
    }

    async fn lookup(&self, name: &str) -> Result<Vec<String>, BackendError> {
        self.check_up()?;
        let mut out: Vec<String> = self
            .lock()
            .values()
            .filter(|(_, r)| r["name"] == name)
            .filter_map(|(_, r)| r["address"].as_str().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }
}

#[async_trait]
impl super::claim::MarkerStore for Memory {
    fn owner_marker(&self) -> String {
        format!("{}:owners/{}", self.location, self.owner)
    }

    async fn read_owner_marker(&self) -> Result<Option<super::claim::StoredMarker>, BackendError> {
        self.check_up()?;
        Ok(self
            .lock_marker()
            .clone()
            .map(|(value, version)| super::claim::StoredMarker { value, version }))
    }

    async fn create_owner_marker(&self, value: &[u8]) -> Result<bool, BackendError> {
        self.check_up()?;
        let key = self.owner_marker();
        if let Some((prefix, _)) = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            && key.starts_with(prefix.as_str())
        {
            return Err(BackendError::Unauthorized(format!(
                "permission denied on {key}"
            )));
        }
        let mut m = self.lock_marker();
        if m.is_some() {
            return Ok(false);
        }
        *m = Some((value.to_vec(), 1));
        Ok(true)
    }

    async fn delete_owner_marker(&self, version: i64) -> Result<bool, BackendError> {
        self.check_up()?;
        let mut m = self.lock_marker();
        if m.as_ref().is_some_and(|(_, v)| *v == version) {
            *m = None;
            return Ok(true);
        }
        Ok(false)
    }
}
