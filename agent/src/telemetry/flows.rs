//! Flow records: the kernel's view of every traced connection (opened, closed, TCP statistics,
//! resets) joined with the agent's (pods, identities, mTLS, verdicts), kept in a bounded history
//! and streamed to `ambit trace`.
//!
//! Which sockets the kernel reports: the applications' own, in the traced network namespaces
//! (enrolled pods; with `--trace-all` every pod of the node). On the source side that is the
//! app's connection to the agent (its original destination comes from the capture program); on
//! the destination side the app's connection from the agent, which the inbound proxy annotates
//! with the real source. Connections refused before reaching an app (STRICT, policy) have no app
//! socket there; the inbound proxy records them itself.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use ambit_common::{
    FLOW_ACTIVE, FLOW_CLOSE, FLOW_HAS_ORIG, FLOW_OPEN, FLOW_RESET_RECEIVED, FLOW_RESET_SENT, FlowEvent,
    tcp_state,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::{
    bpf::{from_kernel, kernel_to_ip},
    schema::Workload,
    state::Cluster,
    telemetry::{Direction, Security},
};

/// Records kept for `ambit trace` without `--follow`.
pub const HISTORY: usize = 10_000;
/// How long a reset waits for the close of its connection before it is forgotten.
const RESET_MEMORY: Duration = Duration::from_secs(5);
/// How long a proxy annotation waits for its socket's close.
const NOTE_MEMORY: Duration = Duration::from_secs(600);

/// One end of a flow.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Peer {
    /// Address.
    pub ip: Option<IpAddr>,
    /// Port.
    pub port: u16,
    /// Pod (`namespace/name`), when the address is one.
    pub pod: Option<String>,
    /// Namespace of that pod.
    pub namespace: Option<String>,
    /// SPIFFE ID: verified by mTLS, or the one the mesh gives the pod.
    pub identity: Option<String>,
}

/// What a flow record says happened to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// It opened.
    #[default]
    Open,
    /// It closed.
    Close,
    /// The agent stopped it before it reached an app.
    Refused,
}

/// What the mesh did with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowVerdict {
    /// Carried (and, in the mesh, allowed by the policies).
    #[default]
    Allowed,
    /// An AuthorizationPolicy denied it.
    Denied,
    /// Plaintext under STRICT mutual TLS.
    Refused,
    /// The agent could not carry it.
    Error,
    /// The traced pod is not in the mesh: nothing was enforced.
    Unprotected,
}

impl FlowVerdict {
    /// Every verdict, for errors that list them.
    pub const ALL: [Self; 5] = [Self::Allowed, Self::Denied, Self::Refused, Self::Error, Self::Unprotected];

    /// As flow records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Refused => "refused",
            Self::Error => "error",
            Self::Unprotected => "unprotected",
        }
    }

    /// The verdict for a connection that failed with `error`.
    pub fn of_error(error: &impl super::ConnectionError) -> Self {
        if error.denied() { Self::Denied } else { Self::Error }
    }
}

impl From<crate::policy::Outcome> for FlowVerdict {
    fn from(outcome: crate::policy::Outcome) -> Self {
        match outcome {
            crate::policy::Outcome::Allowed => Self::Allowed,
            crate::policy::Outcome::Denied => Self::Denied,
            crate::policy::Outcome::Refused => Self::Refused,
        }
    }
}

/// Whether the traced pod is in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mesh {
    /// Enrolled.
    Enrolled,
    /// Not enrolled.
    #[default]
    NotEnrolled,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Closed cleanly.
    Fin,
    /// The peer reset it.
    ResetReceived,
    /// The traced socket reset it.
    ResetSent,
    /// Reset in reply to the SYN, or refused by the agent under STRICT mutual TLS.
    Refused,
    /// No answer to the SYN.
    Timeout,
    /// Denied by the agent.
    Denied,
}

impl Event {
    /// As flow records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Close => "close",
            Self::Refused => "refused",
        }
    }
}

impl End {
    /// As flow records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::ResetReceived => "reset_received",
            Self::ResetSent => "reset_sent",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Denied => "denied",
        }
    }
}

impl From<crate::policy::Outcome> for End {
    fn from(outcome: crate::policy::Outcome) -> Self {
        match outcome {
            crate::policy::Outcome::Denied => Self::Denied,
            // An allowed connection has no end of the agent's making; it is never asked for one.
            crate::policy::Outcome::Refused | crate::policy::Outcome::Allowed => Self::Refused,
        }
    }
}

/// Text as the records spell it, for tables and logs.
macro_rules! display_as_str {
    ($($kind:ty),*) => {$(
        impl std::fmt::Display for $kind {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Event, End, FlowVerdict, Direction, Security);

/// A flow record. Field names are stable (documented in ARCHITECTURE.md).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowRecord {
    /// RFC 3339 UTC time of the event.
    pub time: String,
    /// `open`, `close`, or `refused` (stopped by the agent before reaching the app).
    pub event: Event,
    /// Node name.
    pub node: Arc<str>,
    /// `outbound` (opened by the traced pod) or `inbound`.
    pub direction: Direction,
    /// Source.
    pub src: Peer,
    /// Destination: the address the source asked for, or for a Service the endpoint chosen.
    pub dst: Peer,
    /// The Service (`namespace/name`) the source addressed, if any.
    pub service: Option<String>,
    /// `mutual_tls` or `plaintext`.
    pub security: Security,
    /// `enrolled` if the traced pod is in the mesh, else `not-enrolled`.
    pub mesh: Mesh,
    /// `allowed`, `denied` (AuthorizationPolicy), `refused` (STRICT mTLS), `error`, or
    /// `unprotected` (not in the mesh: nothing enforced).
    pub verdict: FlowVerdict,
    /// The deciding policy, if any.
    pub policy: Option<String>,
    /// Why, in words.
    pub reason: Option<String>,
    /// AUDIT policies that matched (Istio's AUDIT action: marked, verdict unchanged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<String>,
    /// Bytes from source to destination.
    pub bytes_sent: u64,
    /// Bytes from destination to source.
    pub bytes_received: u64,
    /// Smoothed RTT at close, microseconds.
    pub srtt_us: u32,
    /// Retransmitted segments.
    pub retransmits: u32,
    /// Lifetime, milliseconds (close only).
    pub duration_ms: u64,
    /// How it ended: `fin`, `reset_received`, `reset_sent`, `refused` (reset in reply to the
    /// SYN), `timeout` (no answer to the SYN), `denied` (by the agent).
    pub end: Option<End>,
    /// The kernel's reason for a reset it sent (`enum sk_rst_reason`).
    pub end_reason: Option<String>,
    /// Netns cookie of the traced socket.
    pub netns_cookie: u64,
    /// Socket cookie of the traced socket.
    pub socket_cookie: u64,
}

/// What the proxy learned about a connection, attached to the app socket's record.
#[derive(Clone, Debug, Default)]
pub struct Note {
    /// How the proxy carried it.
    pub security: Security,
    /// The real source (inbound) or destination (outbound: the endpoint, for a Service).
    pub peer: Option<SocketAddr>,
    /// The Service the source addressed.
    pub service: Option<String>,
    /// Source identity.
    pub src_identity: Option<String>,
    /// Destination identity.
    pub dst_identity: Option<String>,
    /// What the proxy did with it.
    pub verdict: FlowVerdict,
    /// Deciding policy.
    pub policy: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// AUDIT policies that matched.
    pub audit: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tuple {
    local: SocketAddr,
    remote: SocketAddr,
}

struct Open {
    /// The record as published (shared with the history).
    record: Arc<FlowRecord>,
    started: u64,
    /// The key of the proxy's note for this socket.
    key: (u64, u16),
    /// The key of the proxy's note for this socket, while its open record waits for it.
    waiting: Option<((u64, u16), Instant)>,
}

#[derive(Default)]
struct State {
    pods: HashMap<u64, Arc<Workload>>,
    open: HashMap<u64, Open>,
    notes: HashMap<(u64, u16), (Instant, Note)>,
    /// Sockets whose open record waits for a note, by the note's key.
    waiting: HashMap<(u64, u16), u64>,
    resets: HashMap<Tuple, (Instant, u32, String)>,
    resets_by_cookie: HashMap<u64, Instant>,
    /// Close records of aborts waiting for their reset event.
    aborting: Vec<(Instant, FlowRecord, FlowEvent)>,
    history: VecDeque<Arc<FlowRecord>>,
}

/// The agent's flow table.
pub struct Flows {
    /// False with `--no-flows`: the proxies' notes are then dropped at once.
    enabled: bool,
    node: Arc<str>,
    trust_domain: String,
    cluster: watch::Receiver<Arc<Cluster>>,
    reset_reasons: HashMap<u32, String>,
    state: Mutex<State>,
    stream: broadcast::Sender<Arc<FlowRecord>>,
}

impl Flows {
    /// An empty table.
    pub fn new(
        enabled: bool,
        node: String,
        trust_domain: String,
        cluster: watch::Receiver<Arc<Cluster>>,
        reset_reasons: HashMap<u32, String>,
    ) -> Self {
        Self {
            enabled,
            node: node.into(),
            trust_domain,
            cluster,
            reset_reasons,
            state: Mutex::new(State::default()),
            stream: broadcast::channel(4096).0,
        }
    }

    /// Which pod each traced netns belongs to.
    pub fn set_pods(&self, pods: HashMap<u64, Arc<Workload>>) {
        self.lock().pods = pods;
    }

    /// Records that the agent's outbound proxy handled the app connection from `port` in netns
    /// `cookie`, or that its inbound proxy delivered one to the app from its own port `port`.
    pub fn note(&self, cookie: u64, port: u16, note: Note) {
        if !self.enabled {
            return;
        }
        let mut state = self.lock();
        state.notes.insert((cookie, port), (Instant::now(), note));
        if let Some(socket) = state.waiting.remove(&(cookie, port)) {
            self.release_open(&mut state, socket);
        }
    }

    /// Publishes the open record of `socket`, enriched with its note if there is one.
    fn release_open(&self, state: &mut State, socket: u64) {
        let Some(open) = state.open.get_mut(&socket) else { return };
        let Some((key, _)) = open.waiting.take() else { return };
        state.waiting.remove(&key);
        let mut record = open.record.clone();
        if let Some((_, note)) = state.notes.get(&key) {
            let cluster = self.cluster.borrow().clone();
            self.apply(&cluster, Arc::make_mut(&mut record), note.clone());
        }
        let record = self.publish(state, record);
        if let Some(open) = state.open.get_mut(&socket) {
            open.record = record;
        }
    }

    fn apply(&self, cluster: &Cluster, record: &mut FlowRecord, note: Note) {
        record.security = note.security;
        record.verdict = note.verdict;
        record.policy = note.policy;
        record.reason = note.reason;
        record.audit = note.audit;
        match (record.direction, note.peer) {
            (Direction::Inbound, Some(peer)) => record.src = self.peer(cluster, Some(peer.ip()), peer.port()),
            // Through a Service, the endpoint the agent chose.
            (Direction::Outbound, Some(peer)) if note.service.is_some() => {
                record.dst = self.peer(cluster, Some(peer.ip()), peer.port());
            }
            _ => {}
        }
        if note.service.is_some() {
            record.service = note.service;
        }
        if note.src_identity.is_some() {
            record.src.identity = note.src_identity;
        }
        if note.dst_identity.is_some() {
            record.dst.identity = note.dst_identity;
        }
    }

    /// A connection the inbound proxy stopped before it reached an app.
    pub fn refused(&self, record: FlowRecord) {
        if !self.enabled {
            return;
        }
        let record =
            FlowRecord { time: now_rfc3339(), event: Event::Refused, node: self.node.clone(), ..record };
        self.publish(&mut self.lock(), Arc::new(record));
    }

    /// Follows new records.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.stream.subscribe()
    }

    /// The records kept, oldest first.
    pub fn history(&self) -> Vec<Arc<FlowRecord>> {
        self.lock().history.iter().cloned().collect()
    }

    /// Connections open now.
    pub fn open_count(&self) -> usize {
        self.lock().open.len()
    }

    /// Handles one kernel event.
    pub fn handle(&self, event: &FlowEvent) {
        let mut state = self.lock();
        match event.kind {
            FLOW_OPEN => {
                let record = self.open_record(&state, event);
                // An enrolled pod's connection is proxied: its open record waits (briefly) for the
                // proxy's note, which knows identities, verdict and, inbound, the real source.
                let waiting = (record.mesh == Mesh::Enrolled).then(|| (note_key(event), Instant::now()));
                let socket = event.socket_cookie;
                let mut record = Arc::new(record);
                if waiting.is_none() {
                    record = self.publish(&mut state, record);
                }
                if waiting.is_some() {
                    state.waiting.insert(note_key(event), socket);
                }
                state
                    .open
                    .insert(socket, Open { record, started: event.time_ns, key: note_key(event), waiting });
                if waiting.is_some() && state.notes.contains_key(&note_key(event)) {
                    self.release_open(&mut state, socket);
                }
            }
            FLOW_CLOSE => {
                self.release_open(&mut state, event.socket_cookie);
                let open = state.open.remove(&event.socket_cookie);
                let (mut record, started, key) = match open {
                    // The last holder of the open record (after the history) edits it in place.
                    Some(open) => (Arc::unwrap_or_clone(open.record), open.started, open.key),
                    // Closed without being established: a failed connection attempt, ours.
                    None => {
                        let mut event = *event;
                        if event.old_state == tcp_state::SYN_SENT {
                            event.flags |= FLOW_ACTIVE;
                        }
                        (self.open_record(&state, &event), event.time_ns, note_key(&event))
                    }
                };
                self.close_record(&mut state, &mut record, event, started, key);
                // An abort's reset event (with its reason) follows the state change: hold the
                // record back a moment to name it.
                if record.end == Some(End::ResetSent) && record.end_reason.is_none() {
                    state.aborting.push((Instant::now(), record, *event));
                } else {
                    self.publish(&mut state, Arc::new(record));
                }
            }
            FLOW_RESET_SENT | FLOW_RESET_RECEIVED => {
                let (Some(local), Some(remote)) =
                    (addr(&event.local, event.local_port), addr(&event.remote, event.remote_port))
                else {
                    return;
                };
                let how = if event.kind == FLOW_RESET_SENT { "reset_sent" } else { "reset_received" };
                let reason = self.reset_reasons.get(&event.reason).cloned().unwrap_or_default();
                let code = if event.kind == FLOW_RESET_SENT { 1 } else { 2 };
                state
                    .resets
                    .insert(Tuple { local, remote }, (Instant::now(), code, format!("{how}:{reason}")));
                if event.socket_cookie != 0 {
                    state.resets_by_cookie.insert(event.socket_cookie, Instant::now());
                }
                let waiting = std::mem::take(&mut state.aborting);
                for (at, mut record, close) in waiting {
                    if addr(&close.local, close.local_port) == Some(local)
                        && addr(&close.remote, close.remote_port) == Some(remote)
                    {
                        self.set_end(&mut state, &mut record, &close);
                        self.publish(&mut state, Arc::new(record));
                    } else {
                        state.aborting.push((at, record, close));
                    }
                }
            }
            _ => {}
        }
    }

    /// Publishes open records whose note is late, and forgets resets and notes that no close
    /// will claim.
    pub fn prune(&self) {
        let mut state = self.lock();
        // Only the records waiting for a note, not every open one: this runs 20 times a second,
        // with thousands of connections open.
        let late: Vec<u64> = state
            .waiting
            .values()
            .copied()
            .filter(|socket| {
                state
                    .open
                    .get(socket)
                    .is_some_and(|o| o.waiting.is_some_and(|(_, at)| at.elapsed() > NOTE_WAIT))
            })
            .collect();
        for socket in late {
            self.release_open(&mut state, socket);
        }
        let (done, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut state.aborting).into_iter().partition(|(at, ..)| at.elapsed() > RESET_WAIT);
        state.aborting = waiting;
        for (_, record, _) in done {
            self.publish(&mut state, Arc::new(record));
        }
        state.resets.retain(|_, (at, ..)| at.elapsed() < RESET_MEMORY);
        state.resets_by_cookie.retain(|_, at| at.elapsed() < RESET_MEMORY);
        state.notes.retain(|_, (at, _)| at.elapsed() < NOTE_MEMORY);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, state: &mut State, record: Arc<FlowRecord>) -> Arc<FlowRecord> {
        if state.history.len() >= HISTORY {
            state.history.pop_front();
        }
        state.history.push_back(record.clone());
        let _ = self.stream.send(record.clone());
        record
    }

    /// Describes an address: the pod behind it and the identity the mesh gives that pod.
    pub fn peer(&self, cluster: &Cluster, ip: Option<IpAddr>, port: u16) -> Peer {
        let pod = ip.and_then(|ip| cluster.workload_by_ip(ip));
        Peer {
            ip,
            port,
            pod: pod.map(|w| w.key.to_string()),
            namespace: pod.map(|w| w.key.namespace.clone()),
            identity: pod.filter(|w| w.enrollment.is_enrolled()).map(|w| w.spiffe_id(&self.trust_domain)),
        }
    }

    fn open_record(&self, state: &State, event: &FlowEvent) -> FlowRecord {
        let cluster = self.cluster.borrow().clone();
        let pod = state.pods.get(&event.netns_cookie);
        let active = event.flags & FLOW_ACTIVE != 0;
        let local_ip = kernel_to_ip(&event.local);
        let remote_ip = kernel_to_ip(&event.remote);
        let port = |p: u32| p as u16;
        // The traced socket is the app's: on a captured outbound connection its peer is the
        // agent on loopback, and the destination is the one the app asked for.
        let (mut src, mut dst) = if active {
            let orig = (event.flags & FLOW_HAS_ORIG != 0).then(|| from_kernel(event.orig_dst)).flatten();
            let dst = if let Some(orig) = orig {
                self.peer(&cluster, Some(orig.ip()), orig.port())
            } else {
                self.peer(&cluster, remote_ip, port(event.remote_port))
            };
            (self.peer(&cluster, local_ip, port(event.local_port)), dst)
        } else {
            (
                self.peer(&cluster, remote_ip, port(event.remote_port)),
                self.peer(&cluster, local_ip, port(event.local_port)),
            )
        };
        // Loopback-side addresses say nothing: name the pod that owns the netns instead.
        if let Some(pod) = pod {
            let own = if active { &mut src } else { &mut dst };
            if own.ip.is_none_or(|ip| ip.is_loopback()) {
                own.ip = pod.ips.first().copied();
            }
            own.pod = Some(pod.key.to_string());
            own.namespace = Some(pod.key.namespace.clone());
            own.identity = pod.enrollment.is_enrolled().then(|| pod.spiffe_id(&self.trust_domain));
        }
        let enrolled = pod.is_some_and(|p| p.enrollment.is_enrolled());
        FlowRecord {
            time: now_rfc3339(),
            event: Event::Open,
            node: self.node.clone(),
            direction: if active { Direction::Outbound } else { Direction::Inbound },
            src,
            dst,
            security: Security::Plaintext,
            mesh: if enrolled { Mesh::Enrolled } else { Mesh::NotEnrolled },
            verdict: if enrolled { FlowVerdict::Allowed } else { FlowVerdict::Unprotected },
            netns_cookie: event.netns_cookie,
            socket_cookie: event.socket_cookie,
            ..FlowRecord::default()
        }
    }

    fn close_record(
        &self,
        state: &mut State,
        record: &mut FlowRecord,
        event: &FlowEvent,
        started: u64,
        key: (u64, u16),
    ) {
        record.time = now_rfc3339();
        record.event = Event::Close;
        record.srtt_us = event.srtt_us;
        record.retransmits = event.total_retrans;
        record.duration_ms = event.time_ns.saturating_sub(started) / 1_000_000;
        let active = record.direction == Direction::Outbound;
        // The kernel's byte counters follow sequence numbers, which the SYN (active side) and
        // each FIN also consume: take those out to report application bytes.
        let state_before = event.old_state;
        let fin_acked =
            matches!(state_before, tcp_state::FIN_WAIT2 | tcp_state::LAST_ACK | tcp_state::CLOSING);
        let fin_received = matches!(
            state_before,
            tcp_state::FIN_WAIT2 | tcp_state::LAST_ACK | tcp_state::CLOSING | tcp_state::CLOSE_WAIT
        );
        let established = state_before != tcp_state::SYN_SENT;
        let sent = event
            .bytes_acked
            .saturating_sub(u64::from(active && established))
            .saturating_sub(u64::from(fin_acked));
        let received = event.bytes_received.saturating_sub(u64::from(fin_received));
        (record.bytes_sent, record.bytes_received) = if active { (sent, received) } else { (received, sent) };

        if let Some((_, note)) = state.notes.remove(&key) {
            let cluster = self.cluster.borrow().clone();
            self.apply(&cluster, record, note);
        }
        self.set_end(state, record, event);
    }

    /// How the connection ended, from the state it left and the resets seen for it.
    fn set_end(&self, state: &mut State, record: &mut FlowRecord, event: &FlowEvent) {
        let local = addr(&event.local, event.local_port);
        let remote = addr(&event.remote, event.remote_port);
        let reset =
            local.zip(remote).and_then(|(local, remote)| state.resets.remove(&Tuple { local, remote }));
        let reset_by_cookie = state.resets_by_cookie.remove(&event.socket_cookie).is_some();
        let (end, end_reason) = match (event.old_state, reset) {
            (tcp_state::SYN_SENT, Some(_)) => (End::Refused, None),
            (tcp_state::SYN_SENT, None) if reset_by_cookie => (End::Refused, None),
            (tcp_state::SYN_SENT, None) => (End::Timeout, None),
            (_, Some((_, 1, why))) => (End::ResetSent, why.split_once(':').map(|(_, r)| r.to_owned())),
            (_, Some(_)) => (End::ResetReceived, None),
            (_, None) if reset_by_cookie => (End::ResetReceived, None),
            // Leaving ESTABLISHED or CLOSE_WAIT straight for CLOSE is an abort: this socket reset
            // the connection (its reset event may not have arrived yet).
            (tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT | tcp_state::SYN_RECV, None) => {
                (End::ResetSent, None)
            }
            _ => (End::Fin, None),
        };
        record.end = Some(end);
        record.end_reason = end_reason.filter(|r| !r.is_empty());
        if record.verdict == FlowVerdict::Allowed && end == End::Refused && record.reason.is_none() {
            record.reason = Some("the destination refused the connection".into());
        }
    }
}

/// How long an abortive close waits for the reset event that names its reason.
const RESET_WAIT: Duration = Duration::from_millis(150);

/// How long an open record waits for the proxy's note before it is published without it.
const NOTE_WAIT: Duration = Duration::from_millis(300);

/// The proxy's key for the app socket of `event`: on the source side the app's own port, on the
/// destination side the agent's port (the app socket's peer).
fn note_key(event: &FlowEvent) -> (u64, u16) {
    let port = if event.flags & FLOW_ACTIVE != 0 { event.local_port } else { event.remote_port };
    (event.netns_cookie, port as u16)
}

fn addr(ip: &ambit_common::IpAddr, port: u32) -> Option<SocketAddr> {
    Some(SocketAddr::new(kernel_to_ip(ip)?, port as u16))
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `at` as the records' `time` field spells it (so that two compare as their times do).
pub fn rfc3339(at: SystemTime) -> String {
    let now = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let t = time::OffsetDateTime::from_unix_timestamp(now.as_secs() as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        now.subsec_millis()
    )
}

/// Reads kernel events until the ring buffer goes away, handing each to `flows`.
#[allow(unsafe_code, reason = "the ring buffer's descriptor and its records are the kernel's")]
pub async fn read_events(flows: Arc<Flows>, ring: aya::maps::RingBuf<aya::maps::MapData>) {
    // SAFETY: the ring buffer owns its map's descriptor for its whole life and always reports
    // that same descriptor.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the flow ring buffer; no flow records");
            return;
        }
    };
    // The kernel side wakes us only when its buffer fills up (a quarter of it); otherwise events
    // are collected on this timer, which also publishes late records.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                drain(&flows, guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = tick.tick() => {
                drain(&flows, ring.get_mut());
                flows.prune();
            }
        }
    }
}

#[allow(unsafe_code, reason = "a record is a FlowEvent the kernel program wrote")]
fn drain(flows: &Flows, ring: &mut aya::maps::RingBuf<aya::maps::MapData>) {
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<FlowEvent>() {
            // SAFETY: the kernel wrote a whole FlowEvent; read it unaligned.
            let event: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            flows.handle(&event);
        }
    }
}

/// Which records `ambit trace` wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Source pod (`ns/name` or `name`).
    pub from: Option<String>,
    /// Destination pod.
    pub to: Option<String>,
    /// Either end in this namespace.
    pub namespace: Option<String>,
    /// Verdict.
    pub verdict: Option<FlowVerdict>,
    /// Destination port.
    pub port: Option<u16>,
    /// At most this many past records.
    pub last: Option<usize>,
    /// Only records an AUDIT policy matched.
    pub audited: bool,
}

impl Filter {
    /// Reads `from`, `to`, `namespace`, `verdict`, `port`, `audited` and `last` query parameters.
    pub fn from_query(query: &[(String, String)]) -> Result<Self, String> {
        let mut filter = Self::default();
        for (key, value) in query {
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            match key.as_str() {
                "from" => filter.from = Some(value.into()),
                "to" => filter.to = Some(value.into()),
                "namespace" => filter.namespace = Some(value.into()),
                "verdict" => {
                    let verdict =
                        FlowVerdict::ALL.into_iter().find(|v| v.as_str() == value).ok_or_else(|| {
                            let all: Vec<&str> = FlowVerdict::ALL.iter().map(|v| v.as_str()).collect();
                            format!("verdict {value:?} is not one of {}", all.join(", "))
                        })?;
                    filter.verdict = Some(verdict);
                }
                "port" => {
                    filter.port = Some(value.parse().map_err(|_| format!("port {value:?} is not a port"))?)
                }
                "last" => {
                    filter.last = Some(value.parse().map_err(|_| format!("last {value:?} is not a number"))?)
                }
                "audited" => filter.audited = matches!(value, "1" | "true"),
                "follow" => {}
                other => return Err(format!("unknown trace filter {other:?}")),
            }
        }
        Ok(filter)
    }

    /// Whether `record` passes.
    pub fn matches(&self, record: &FlowRecord) -> bool {
        let pod_is = |peer: &Peer, wanted: &str| {
            peer.pod.as_deref().is_some_and(|p| p == wanted || p.rsplit('/').next() == Some(wanted))
        };
        self.from.as_deref().is_none_or(|f| pod_is(&record.src, f))
            && self.to.as_deref().is_none_or(|t| pod_is(&record.dst, t))
            && self.namespace.as_deref().is_none_or(|ns| {
                record.src.namespace.as_deref() == Some(ns) || record.dst.namespace.as_deref() == Some(ns)
            })
            && self.verdict.is_none_or(|v| record.verdict == v)
            && self.port.is_none_or(|p| record.dst.port == p)
            && (!self.audited || !record.audit.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(value: impl Serialize) -> String {
        serde_json::to_string(&value).expect("serializes").trim_matches('"').to_owned()
    }

    #[test]
    fn records_spell_every_kind_as_the_tables_do() {
        for v in FlowVerdict::ALL {
            assert_eq!(json(v), v.as_str());
        }
        for e in [End::Fin, End::ResetReceived, End::ResetSent, End::Refused, End::Timeout, End::Denied] {
            assert_eq!(json(e), e.as_str());
        }
        for e in [Event::Open, Event::Close, Event::Refused] {
            assert_eq!(json(e), e.as_str());
        }
        for d in [Direction::Outbound, Direction::Inbound] {
            assert_eq!(json(d), d.as_str());
        }
        for s in [Security::Plaintext, Security::MutualTls] {
            assert_eq!(json(s), s.as_str());
        }
        assert_eq!(
            (json(Mesh::Enrolled), json(Mesh::NotEnrolled)),
            ("enrolled".into(), "not-enrolled".into())
        );
    }
}
