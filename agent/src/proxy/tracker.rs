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

use crate::{
    discovery::{Cluster, ObjectKey},
    policy::{ConnectionInput, InboundDecision},
};

struct Tracked {
    workload: ObjectKey,
    input: ConnectionInput,
    revoke: oneshot::Sender<String>,
}

/// The registry of open inbound connections.
#[derive(Default)]
pub struct Tracker {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Tracked>>,
}

/// Keeps a connection registered; dropping it unregisters.
pub struct Registration {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tracker.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl Tracker {
    /// Registers a connection authorized with `input`; the receiver fires with the reason when a
    /// policy change revokes it.
    pub fn register(
        self: &Arc<Self>,
        workload: ObjectKey,
        input: ConnectionInput,
    ) -> (Registration, oneshot::Receiver<String>) {
        let id = self.next.fetch_add(1, Relaxed);
        let (revoke, revoked) = oneshot::channel();
        self.open.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Tracked { workload, input, revoke });
        (Registration { tracker: self.clone(), id }, revoked)
    }

    /// Re-evaluates every open connection against `cluster`: PeerAuthentication for plaintext
    /// ones, AuthorizationPolicy for all. Returns how many were revoked.
    pub fn revalidate(&self, cluster: &Cluster, root_namespace: &str) -> usize {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let revoked: Vec<(u64, String)> = open
            .iter()
            .filter_map(|(id, t)| {
                let workload = cluster.workloads.get(&t.workload)?;
                let decision = InboundDecision::new(cluster, workload, &t.input, root_namespace);
                (!decision.allowed()).then(|| (*id, decision.reason()))
            })
            .collect();
        for (id, reason) in &revoked {
            if let Some(t) = open.remove(id) {
                info!(pod = %t.workload, src = %t.input.source_ip, dst = %t.input.destination, reason, "closing an open connection the new policy no longer allows");
                let _ = t.revoke.send(reason.clone());
            }
        }
        revoked.len()
    }
}
