//! Entries spread over several sessions, pure: which session (shard) holds a name's entries,
//! when the number of sessions grows, what each session owns, and what the store keeps.
//!
//! ZooKeeper (3.6 and later, ZOOKEEPER-4306) writes the path of every ephemeral node of a
//! session into the transaction that closes it, and that transaction must fit in
//! `jute.maxbuffer` (1 MiB by default): past it the session can neither be closed nor expire
//! cleanly. So no session owns more than a budget of path bytes (half of `jute.maxbuffer` by
//! default). The entries are spread over `2^k` sessions by a stable hash of the service name
//! (FNV-1a, 64 bits, of its bytes; its low `k` bits pick the shard): every instance of a name
//! lives in the same session, and a name stays in its session while the number of sessions
//! stays. The number starts at one and only grows: when the writes of an apply would take a
//! session past the budget, it doubles (up to [`MAX_SESSIONS`]); a name of shard `s` then stays
//! in `s` or moves to `s + 2^k`. How an entry moves without a gap for readers is in
//! `rehome`. A name whose entries alone pass the budget cannot be split: its session stays over
//! the budget, and the catalog warns.

use std::collections::HashMap;
use std::hash::Hasher;

/// At most this many sessions per catalog (64 × 512 KiB of paths: about 700,000 plain
/// entries with the default `jute.maxbuffer`).
pub const MAX_SESSIONS: usize = 64;

/// The shard of `name` among `count` sessions (a power of two).
pub(super) fn shard_of(name: &str, count: usize) -> usize {
    let mut h = fnv::FnvHasher::default();
    h.write(name.as_bytes());
    // The low bits: doubling the count keeps a name in its shard or moves it up by the old
    // count, never elsewhere.
    (h.finish() % count.max(1) as u64) as usize
}

/// The service name of an entry key (`<name>/providers/<ip>:<port>`, `<name>/<id>`).
pub(super) fn name_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(name, _)| name)
}

/// The bytes an entry adds to the transaction that closes its session: a length and its path
/// from the root (`<root>/<key>`).
pub(super) fn path_cost(root: &str, key: &str) -> usize {
    4 + root.len() + 1 + key.len()
}

/// The number of sessions that keeps every session within `budget` bytes of paths, given the
/// bytes of each name, starting from `count` (a power of two): `count` while it does; else
/// doubled until it does, or until every session still over the budget holds a name that
/// passes it alone (splitting cannot help), or [`MAX_SESSIONS`].
pub(super) fn sessions_needed(
    per_name: &HashMap<&str, usize>,
    count: usize,
    budget: usize,
) -> usize {
    let mut count = count.max(1);
    while count < MAX_SESSIONS {
        let mut bytes = vec![0usize; count];
        let mut largest = vec![0usize; count];
        for (name, &b) in per_name {
            let s = shard_of(name, count);
            bytes[s] += b;
            largest[s] = largest[s].max(b);
        }
        let splittable = (0..count).any(|s| bytes[s] > budget && largest[s] <= budget);
        if !splittable {
            break;
        }
        count *= 2;
    }
    count
}

/// What one owned node is known to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Known {
    pub(super) version: i32,
    /// Curator: its `registrationTimeUTC`.
    pub(super) registered: Option<u64>,
    /// The session whose ephemeral node it is.
    pub(super) owner: i64,
}

/// The owned entries by key, with the bytes of paths each session owns kept up to date, so
/// that checking the budget costs nothing per entry.
#[derive(Default)]
pub(super) struct Entries {
    map: HashMap<String, Known>,
    /// Bytes of paths by owning session.
    bytes: HashMap<i64, usize>,
    /// `<root>/`, whose length every path adds.
    root: String,
}

impl Entries {
    pub(super) fn new(root: &str) -> Entries {
        Entries {
            root: root.to_string(),
            ..Default::default()
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<&Known> {
        self.map.get(key)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &Known)> {
        self.map.iter()
    }

    pub(super) fn insert(&mut self, key: String, known: Known) {
        let cost = path_cost(&self.root, &key);
        *self.bytes.entry(known.owner).or_default() += cost;
        if let Some(old) = self.map.insert(key, known) {
            self.forget_bytes(old.owner, cost);
        }
    }

    pub(super) fn remove(&mut self, key: &str) -> Option<Known> {
        let old = self.map.remove(key)?;
        self.forget_bytes(old.owner, path_cost(&self.root, key));
        Some(old)
    }

    /// Forgets every entry of `owner` (a session that is gone).
    pub(super) fn forget_session(&mut self, owner: i64) {
        if self.bytes.remove(&owner).is_some() {
            self.map.retain(|_, k| k.owner != owner);
        }
    }

    pub(super) fn clear(&mut self) {
        self.map.clear();
        self.bytes.clear();
    }

    /// Bytes of paths `owner` owns.
    pub(super) fn bytes_of(&self, owner: i64) -> usize {
        self.bytes.get(&owner).copied().unwrap_or(0)
    }

    /// Entries `owner` owns (counted: for messages only).
    pub(super) fn count_of(&self, owner: i64) -> usize {
        self.map.values().filter(|k| k.owner == owner).count()
    }

    fn forget_bytes(&mut self, owner: i64, cost: usize) {
        if let Some(b) = self.bytes.get_mut(&owner) {
            *b = b.saturating_sub(cost);
            if *b == 0 {
                self.bytes.remove(&owner);
            }
        }
    }
}

/// A ZooKeeper session as a client needs it to re-attach. The password lets anyone who has it
/// take the session over: keep it secret (it is left out of `Debug`).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionKey {
    pub id: i64,
    pub password: Vec<u8>,
    /// The negotiated session timeout.
    pub timeout_ms: u64,
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKey")
            .field("id", &format_args!("{:#x}", self.id))
            .field("password", &"<redacted>")
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// What a [`SessionStore`](super::SessionStore) keeps for one catalog: the session of every
/// shard. Shard 0 is at the top level, as a version with one session stored it: such a record
/// is read as one session (shard 0), and a version with one session reads shard 0 of this one.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredSession {
    #[serde(flatten)]
    pub first: SessionKey,
    /// Shards 1 and up, when there is more than one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<SessionKey>,
}

impl StoredSession {
    /// One session.
    pub fn single(s: SessionKey) -> StoredSession {
        StoredSession {
            first: s,
            shards: Vec::new(),
        }
    }

    /// Every session, shard 0 first.
    pub fn all(&self) -> impl Iterator<Item = &SessionKey> {
        std::iter::once(&self.first).chain(&self.shards)
    }

    /// The session of every shard, when there is one for each.
    pub(super) fn from_slots(slots: &[Option<SessionKey>]) -> Option<StoredSession> {
        let mut all = slots.iter().cloned();
        let first = all.next()??;
        let shards = all.collect::<Option<Vec<_>>>()?;
        Some(StoredSession { first, shards })
    }
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.all()).finish()
    }
}
