//! The service graph: the workloads this agent saw talk, and who talked to whom in the last
//! minutes, from its flow records: what `/graph` (a page for the browser, reached with
//! `kubectl port-forward`) draws and `/graph.json` serves. Each connection counts once: on the
//! destination's side when this agent serves the destination (its record has the verified
//! identity and the verdict), else on the source's.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    Direction, Security,
    flows::{Event, FlowRecord, FlowVerdict, Peer, rfc3339},
};
use crate::{schema::ObjectKey, state::Cluster};

/// The graph of the last `window`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Graph {
    /// The node (Kubernetes node) whose agent drew it.
    pub node: String,
    /// The window, in seconds.
    pub window_secs: u64,
    /// When it was drawn (RFC 3339).
    pub generated: String,
    /// The workloads and addresses seen.
    pub nodes: Vec<GraphNode>,
    /// Who talked to whom.
    pub edges: Vec<GraphEdge>,
}

/// A pod, or an address outside the cluster's pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphNode {
    /// `namespace/name` of a pod, else the address.
    pub id: String,
    /// The pod's namespace, if a pod.
    pub namespace: Option<String>,
    /// Whether it is in the mesh.
    pub in_mesh: bool,
}

/// Connections from one end to another with one outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphEdge {
    /// Source node id.
    pub src: String,
    /// Destination node id.
    pub dst: String,
    /// Whether the connections were stopped (denied by AuthorizationPolicy, refused by STRICT).
    pub denied: bool,
    /// Connections seen.
    pub connections: u64,
    /// Of which over mutual TLS.
    pub mutual_tls: u64,
    /// Of which plaintext.
    pub plaintext: u64,
    /// Bytes from source to destination, and back, of the connections that closed.
    pub bytes_sent: u64,
    /// See `bytes_sent`.
    pub bytes_received: u64,
    /// Destination ports.
    pub ports: BTreeSet<u16>,
    /// For stopped connections: the deciding policies (or PeerAuthentication) and why.
    pub reasons: BTreeSet<String>,
    /// Last seen (RFC 3339).
    pub last_seen: String,
}

/// Draws the graph of `records` (oldest first) within `window` of now, for the agent of `node`.
pub fn draw(records: &[impl AsRef<FlowRecord>], cluster: &Cluster, node: &str, window: Duration) -> Graph {
    let since = rfc3339(SystemTime::now().checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH));
    let mut nodes: BTreeMap<String, GraphNode> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String, bool), GraphEdge> = BTreeMap::new();
    for record in records.iter().map(AsRef::as_ref).filter(|r| r.time >= since) {
        if !counted_here(record, cluster, node) {
            continue;
        }
        let (src, dst) = (vertex(&record.src, cluster), vertex(&record.dst, cluster));
        let denied = matches!(record.verdict, FlowVerdict::Denied | FlowVerdict::Refused);
        let edge = edges.entry((src.id.clone(), dst.id.clone(), denied)).or_insert_with(|| GraphEdge {
            src: src.id.clone(),
            dst: dst.id.clone(),
            denied,
            connections: 0,
            mutual_tls: 0,
            plaintext: 0,
            bytes_sent: 0,
            bytes_received: 0,
            ports: BTreeSet::new(),
            reasons: BTreeSet::new(),
            last_seen: String::new(),
        });
        // A connection opens once (or is refused once); its bytes come with its close.
        if matches!(record.event, Event::Open | Event::Refused) {
            edge.connections += 1;
            if record.security == Security::MutualTls {
                edge.mutual_tls += 1;
            } else {
                edge.plaintext += 1;
            }
        }
        edge.bytes_sent += record.bytes_sent;
        edge.bytes_received += record.bytes_received;
        edge.ports.insert(record.dst.port);
        if denied {
            let why = match (&record.policy, &record.reason) {
                (Some(policy), Some(reason)) => format!("{policy}: {reason}"),
                (None, Some(reason)) => reason.clone(),
                (Some(policy), None) => policy.clone(),
                (None, None) => record.verdict.to_string(),
            };
            edge.reasons.insert(why);
        }
        edge.last_seen.clone_from(&record.time);
        for vertex in [src, dst] {
            nodes.entry(vertex.id.clone()).or_insert(vertex);
        }
    }
    Graph {
        node: node.to_owned(),
        window_secs: window.as_secs(),
        generated: rfc3339(SystemTime::now()),
        nodes: nodes.into_values().collect(),
        edges: edges.into_values().collect(),
    }
}

/// Whether this agent's record is the one that counts the connection: the destination side's
/// when this agent traces the destination (it knows the verified identity and the verdict),
/// else the source side's.
fn counted_here(record: &FlowRecord, cluster: &Cluster, node: &str) -> bool {
    if record.direction == Direction::Inbound {
        return true;
    }
    let destination = record.dst.pod.as_deref().and_then(|pod| {
        let (namespace, name) = pod.split_once('/')?;
        cluster.workloads.get(&ObjectKey { namespace: namespace.into(), name: name.into() })
    });
    !destination.is_some_and(|w| w.node.as_deref() == Some(node) && w.enrollment.is_enrolled())
}

fn vertex(peer: &Peer, cluster: &Cluster) -> GraphNode {
    let workload = peer.ip.and_then(|ip| cluster.workload_by_ip(ip));
    match (&peer.pod, workload) {
        (Some(pod), _) => GraphNode {
            id: pod.clone(),
            namespace: peer.namespace.clone(),
            in_mesh: peer.identity.is_some() || workload.is_some_and(|w| w.enrollment.is_enrolled()),
        },
        (None, _) => GraphNode {
            id: peer.ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string()),
            namespace: None,
            in_mesh: false,
        },
    }
}
