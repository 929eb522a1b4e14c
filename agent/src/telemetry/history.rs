//! The flow history: what the destination side decided for each kind of inbound connection
//! to this node's pods, in a bounded summary that `ambit check --what-if` replays against
//! candidate policies. One entry per (destination pod, what the policies see of the
//! connection, outcome): the same client reconnecting a thousand times is one entry with a
//! count, so the summary holds the variety of the traffic, not its volume.
//!
//! The history lives in memory only: it starts empty when the agent starts (an upgrade or a
//! restart forgets it), and when full it forgets the entry seen least recently.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::Duration,
};

use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::{
    policy::{ConnectionInput, Outcome},
    schema::ObjectKey,
    sys::unix_now,
};

/// Entries kept by default (`--flow-history`).
pub const DEFAULT_ENTRIES: usize = 10_000;

/// What one entry costs at most, in bytes, with identities and names of Kubernetes' longest
/// usual lengths: the bound `--flow-history` documents and the tests hold the history to.
pub const ENTRY_BYTES: usize = 512;

/// What the policies see of a connection, and what they decided.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Seen {
    /// The destination pod. Shared: every entry of a pod points at one name.
    destination: Arc<ObjectKey>,
    /// The verified principal (none for plaintext); its namespace follows from it.
    principal: Option<Arc<str>>,
    namespace: Option<Arc<str>>,
    source_ip: IpAddr,
    /// The address the client asked for (policies may name its port, and its address).
    target: SocketAddr,
    outcome: Outcome,
}

#[derive(Clone, Copy, Debug)]
struct Tally {
    connections: u64,
    first_seen: u64,
    last_seen: u64,
}

/// One kind of connection seen, as `ambit check --what-if` replays it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The destination pod.
    pub destination: ObjectKey,
    /// What the policies saw.
    pub input: ConnectionInput,
    /// What the agent decided.
    pub outcome: Outcome,
    /// Connections counted.
    pub connections: u64,
    /// First and last time seen, seconds since the epoch.
    pub first_seen: u64,
    /// See `first_seen`.
    pub last_seen: u64,
}

/// The bounded summary of inbound decisions.
pub struct FlowHistory {
    state: Mutex<State>,
}

struct State {
    /// None when the history is off.
    entries: Option<LruCache<Seen, Tally>>,
    /// Names shared between entries: the pods of the node and their clients' identities are
    /// few next to the entries that name them.
    names: Interned,
    /// Entries forgotten since the names were last swept.
    evicted: usize,
}

#[derive(Default)]
struct Interned {
    keys: std::collections::HashSet<Arc<ObjectKey>>,
    texts: std::collections::HashSet<Arc<str>>,
}

impl Interned {
    fn key(&mut self, key: &ObjectKey) -> Arc<ObjectKey> {
        if let Some(shared) = self.keys.get(key) {
            return shared.clone();
        }
        let shared = Arc::new(key.clone());
        self.keys.insert(shared.clone());
        shared
    }

    fn text(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.texts.get(text) {
            return shared.clone();
        }
        let shared: Arc<str> = text.into();
        self.texts.insert(shared.clone());
        shared
    }

    /// Forgets names no entry holds any more, so that churn of pods and identities cannot
    /// grow the table past what the entries name.
    fn sweep(&mut self) {
        self.keys.retain(|k| Arc::strong_count(k) > 1);
        self.texts.retain(|t| Arc::strong_count(t) > 1);
    }
}

impl FlowHistory {
    /// A history of at most `entries` entries; none keeps nothing.
    pub fn new(entries: usize) -> Self {
        let entries = NonZeroUsize::new(entries).map(LruCache::new);
        let state = State { entries, names: Interned::default(), evicted: 0 };
        Self { state: Mutex::new(state) }
    }

    /// Counts one decision on a connection to `destination`.
    pub fn record(&self, destination: &ObjectKey, input: &ConnectionInput, outcome: Outcome) {
        self.record_at(destination, input, outcome, unix_now());
    }

    fn record_at(&self, destination: &ObjectKey, input: &ConnectionInput, outcome: Outcome, now: u64) {
        let mut state = lock(&self.state);
        let State { entries: Some(entries), names, evicted } = &mut *state else { return };
        let seen = Seen {
            destination: names.key(destination),
            principal: input.principal.as_deref().map(|p| names.text(p)),
            namespace: input.namespace.as_deref().map(|n| names.text(n)),
            source_ip: input.source_ip,
            target: input.destination,
            outcome,
        };
        if let Some(tally) = entries.get_mut(&seen) {
            tally.connections += 1;
            tally.last_seen = now;
            return;
        }
        if entries.push(seen, Tally { connections: 1, first_seen: now, last_seen: now }).is_some() {
            *evicted += 1;
            // Now and then, not on every connection: dead names stay few next to the entries.
            if *evicted >= entries.cap().get() / 4 {
                names.sweep();
                *evicted = 0;
            }
        }
    }

    /// The entries last seen within `since`, most recent first.
    pub fn entries(&self, since: Option<Duration>) -> Vec<HistoryEntry> {
        let oldest = since.map_or(0, |since| unix_now().saturating_sub(since.as_secs()));
        lock(&self.state)
            .entries
            .iter()
            .flat_map(LruCache::iter)
            .filter(|(_, tally)| tally.last_seen >= oldest)
            .map(|(seen, tally)| HistoryEntry {
                destination: (*seen.destination).clone(),
                input: ConnectionInput {
                    principal: seen.principal.as_deref().map(str::to_owned),
                    namespace: seen.namespace.as_deref().map(str::to_owned),
                    source_ip: seen.source_ip,
                    destination: seen.target,
                },
                outcome: seen.outcome,
                connections: tally.connections,
                first_seen: tally.first_seen,
                last_seen: tally.last_seen,
            })
            .collect()
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        lock(&self.state).entries.as_ref().map_or(0, LruCache::len)
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries held.
    pub fn capacity(&self) -> usize {
        lock(&self.state).entries.as_ref().map_or(0, |e| e.cap().get())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(principal: Option<&str>, source: [u8; 4], port: u16) -> ConnectionInput {
        ConnectionInput {
            principal: principal.map(str::to_owned),
            namespace: principal.and_then(|p| p.split('/').nth(2)).map(str::to_owned),
            source_ip: IpAddr::from(source),
            destination: SocketAddr::from(([10, 0, 0, 9], port)),
        }
    }

    fn db() -> ObjectKey {
        ObjectKey { namespace: "shop".into(), name: "db".into() }
    }

    #[test]
    fn repeated_connections_are_one_entry_with_a_count() {
        let history = FlowHistory::new(100);
        let frontend = input(Some("cluster.local/ns/shop/sa/frontend"), [10, 0, 0, 2], 5432);
        for at in [100, 200, 300] {
            history.record_at(&db(), &frontend, Outcome::Allowed, at);
        }
        history.record_at(&db(), &frontend, Outcome::Denied, 400);
        history.record_at(&db(), &input(None, [10, 0, 0, 7], 5432), Outcome::Refused, 500);
        let entries = history.entries(None);
        assert_eq!(entries.len(), 3, "{entries:?}");
        let allowed = entries.iter().find(|e| e.outcome == Outcome::Allowed).expect("allowed entry");
        assert_eq!((allowed.connections, allowed.first_seen, allowed.last_seen), (3, 100, 300));
        assert_eq!(allowed.input, frontend, "replayable as it was seen");
        assert_eq!(entries[0].outcome, Outcome::Refused, "most recent first");
    }

    #[test]
    fn the_window_and_the_bound_hold() {
        let history = FlowHistory::new(3);
        let now = unix_now();
        history.record_at(&db(), &input(None, [10, 0, 0, 1], 1), Outcome::Allowed, now - 7200);
        for port in 2..6 {
            history.record_at(&db(), &input(None, [10, 0, 0, 1], port), Outcome::Allowed, now);
        }
        assert_eq!(history.len(), 3);
        let ports: Vec<u16> = history.entries(None).iter().map(|e| e.input.destination.port()).collect();
        assert_eq!(ports, [5, 4, 3], "the least recently seen went first");
        history.record_at(&db(), &input(None, [10, 0, 0, 1], 3), Outcome::Allowed, now - 7200);
        assert_eq!(history.entries(Some(Duration::from_secs(3600))).len(), 2, "an hour's window");
    }
}
