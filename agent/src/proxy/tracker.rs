//! Open inbound connections and what they were authorized with, so that a policy change can
//! close the ones the new policy no longer allows (as ztunnel does): a revoked permission takes
//! effect on open connections too, not only on new ones.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use tokio::sync::oneshot;
use tracing::info;

use crate::{policy::ConnectionInput, schema::ObjectKey, state::Cluster};

struct Tracked {
    workload: ObjectKey,
    input: ConnectionInput,
    revoke: oneshot::Sender<String>,
}

/// The registry of open inbound connections.
#[derive(Default)]
pub struct Tracker {
    next: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    open: HashMap<u64, Tracked>,
    /// The snapshot open connections were last re-checked against: a connection decided on an
    /// older one registers after that re-check, and is checked against this one as it does.
    latest: Option<Arc<Cluster>>,
}

/// Keeps a connection registered; dropping it unregisters.
pub struct Registration {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tracker.inner.lock().unwrap_or_else(|e| e.into_inner()).open.remove(&self.id);
    }
}

impl Tracker {
    /// Registers a connection authorized with `input` on the snapshot `decided_on`; the
    /// receiver fires with the reason when a policy change revokes it, at once if a snapshot
    /// newer than `decided_on` already does.
    pub fn register(
        self: &Arc<Self>,
        workload: ObjectKey,
        input: ConnectionInput,
        decided_on: &Cluster,
        root_namespace: &str,
    ) -> (Registration, oneshot::Receiver<String>) {
        let id = self.next.fetch_add(1, Relaxed);
        let (revoke, revoked) = oneshot::channel();
        let tracked = Tracked { workload, input, revoke };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock the re-check takes too: either it ran before, and `latest` is what it
        // checked against, or it runs after and sees this connection.
        let missed = inner.latest.as_deref().filter(|latest| !std::ptr::eq(*latest, decided_on));
        match missed.and_then(|latest| refusal(latest, &tracked, root_namespace)) {
            Some(reason) => {
                drop(inner);
                info!(pod = %tracked.workload, src = %tracked.input.source_ip, dst = %tracked.input.destination, reason, "closing an open connection the new policy no longer allows");
                let _ = tracked.revoke.send(reason);
            }
            None => {
                inner.open.insert(id, tracked);
            }
        }
        (Registration { tracker: self.clone(), id }, revoked)
    }

    /// Re-evaluates every open connection against `cluster`: PeerAuthentication for plaintext
    /// ones, AuthorizationPolicy for all. Returns how many were revoked.
    pub fn revalidate(&self, cluster: &Arc<Cluster>, root_namespace: &str) -> usize {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.latest = Some(cluster.clone());
        let revoked: Vec<(u64, String)> = inner
            .open
            .iter()
            .filter_map(|(id, t)| Some((*id, refusal(cluster, t, root_namespace)?)))
            .collect();
        for (id, reason) in &revoked {
            if let Some(t) = inner.open.remove(id) {
                info!(pod = %t.workload, src = %t.input.source_ip, dst = %t.input.destination, reason, "closing an open connection the new policy no longer allows");
                let _ = t.revoke.send(reason.clone());
            }
        }
        revoked.len()
    }
}

/// Why `cluster` no longer allows the connection, if it does not.
fn refusal(cluster: &Cluster, t: &Tracked, root_namespace: &str) -> Option<String> {
    let workload = cluster.workloads.get(&t.workload)?;
    let decision = cluster.decide_inbound(workload, &t.input, root_namespace);
    (!decision.allowed()).then(|| decision.reason())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Change;

    const ROOT: &str = "istio-system";

    fn input() -> ConnectionInput {
        ConnectionInput {
            principal: Some("cluster.local/ns/a/sa/client".into()),
            namespace: Some("a".into()),
            source_ip: "10.0.0.1".parse().expect("ip"),
            destination: "10.0.0.2:80".parse().expect("addr"),
        }
    }

    /// `a/server`, and with `deny` a DENY of everything to it.
    fn cluster(deny: bool) -> Arc<Cluster> {
        let pod = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "server", "namespace": "a"}, "spec": {}}),
        )
        .expect("pod");
        let mut changes =
            vec![Change::Pod(ObjectKey { namespace: "a".into(), name: "server".into() }, Some(pod))];
        if deny {
            let policy: crate::policy::AuthorizationPolicy = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "deny", "namespace": "a"}, "spec": {"action": "DENY", "rules": [{}]},
            }))
            .expect("policy");
            let policy = policy.compile().expect("compiles");
            changes.push(Change::AuthorizationPolicy(policy.key(), Some(Arc::new(policy))));
        }
        Arc::new(Cluster::default().with(changes, ROOT))
    }

    /// A connection decided on an old snapshot that registers after the re-check against a new
    /// one (which denies it) is closed at once, not left open until the next change.
    #[test]
    fn a_connection_registered_after_the_recheck_it_missed_is_checked_on_registering() {
        let tracker = Arc::new(Tracker::default());
        let (old, new) = (cluster(false), cluster(true));
        let key = ObjectKey { namespace: "a".into(), name: "server".into() };
        assert_eq!(tracker.revalidate(&new, ROOT), 0, "nothing open yet");
        let (_registration, mut revoked) = tracker.register(key.clone(), input(), &old, ROOT);
        let reason = revoked.try_recv().expect("revoked on registering");
        assert!(reason.contains("denied by DENY policy a/deny"), "{reason}");

        // The control: decided on the snapshot the last re-check used, it stays open until a
        // re-check against the new one closes it.
        assert_eq!(tracker.revalidate(&old, ROOT), 0);
        let (_registration, mut kept) = tracker.register(key, input(), &old, ROOT);
        assert!(kept.try_recv().is_err(), "open");
        assert_eq!(tracker.revalidate(&new, ROOT), 1);
        assert!(kept.try_recv().is_ok(), "closed by the re-check");
    }
}
