//! Enrolling pods: for each pod of this node that is in the mesh, find and check its network
//! namespace, close it (inbound connections dropped unless the agent's listeners take them,
//! outbound ones captured), then open the agent's listeners there, register them with the kernel
//! programs, and start the proxies; release pods that left the mesh. Driven by
//! [`Redirector::reconcile`] whenever the cluster snapshot changes, and kept honest by
//! [`Redirector::verify`].
//!
//! A pod that should be enrolled is never released because something failed: a failure leaves
//! its namespace closed (refused traffic), not open. A namespace that cannot be a pod's (the
//! agent's own, the host's, one already enrolled for another pod) is refused and nothing is
//! installed for it.

mod delivery;

use std::{
    cell::OnceCell,
    collections::{BTreeMap, HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
};

use ambit_common::{Enrolled, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, error, info, warn};

use crate::sys::netns::Netns;
use crate::{
    bpf::{self, BpfError, Datapath, DatapathCheck},
    identity::{Identities, Identity},
    proxy::{PodContext, PodStats, Proxy},
    schema::{ObjectKey, Workload},
    state::Cluster,
    sys::capability::{self, Capability},
    tls::TlsContext,
};

/// Errors enrolling one pod. Each names the pod; other pods are not affected.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// Neither an annotation nor a UID to find the netns by.
    #[error(
        "pod {0} has neither an ambit.io/netns annotation nor a metadata.uid to find its network namespace by"
    )]
    NoNetns(ObjectKey),
    /// No process of the pod runs on this host (not started yet, or gone).
    #[error("pod {pod}: no process in a cgroup of pod UID {uid} on this host (not started yet, or exited)")]
    NoProcess {
        /// The pod.
        pod: ObjectKey,
        /// Its UID.
        uid: String,
    },
    /// The pod has no IP yet.
    #[error("pod {0} has no IP address yet (status.podIP is empty)")]
    NoIp(ObjectKey),
    /// The netns could not be opened.
    #[error("pod {pod}: network namespace {path}: {source}")]
    Netns {
        /// The pod.
        pod: ObjectKey,
        /// The path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The namespace named for the pod can never be enrolled for it.
    #[error("pod {pod}: refusing network namespace {path}: {reason}")]
    RefusedNetns {
        /// The pod.
        pod: ObjectKey,
        /// The path it was found at.
        path: String,
        /// Why.
        reason: String,
    },
    /// Another running pod claims one of the pod's addresses.
    #[error(
        "pod {pod}: address {ip} is also claimed by {others}; neither gets traffic until that is resolved"
    )]
    AddressConflict {
        /// The pod.
        pod: ObjectKey,
        /// The address.
        ip: IpAddr,
        /// The other claimants.
        others: String,
    },
    /// A listener could not be opened inside the pod.
    #[error("pod {pod}: opening listener {addr} in its network namespace: {source}")]
    Listen {
        /// The pod.
        pod: ObjectKey,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// No certificate could be issued for the pod's identity.
    #[error("pod {pod}: identity: {reason}")]
    Identity {
        /// The pod.
        pod: ObjectKey,
        /// Why.
        reason: String,
    },
    /// The kernel programs refused the pod.
    #[error("pod {pod}: {source}")]
    Bpf {
        /// The pod.
        pod: ObjectKey,
        /// Why.
        source: Box<BpfError>,
    },
}

impl RedirectError {
    /// The namespace itself was refused: nothing is installed for it, and the agent stays ready
    /// (a pod spec must not be able to hold the node's agent unready).
    fn is_refusal(&self) -> bool {
        matches!(self, Self::RefusedNetns { .. })
    }

    /// The namespace was not found (yet): no state can be installed or released for the pod.
    fn is_unresolved(&self) -> bool {
        matches!(self, Self::NoNetns(_) | Self::NoProcess { .. } | Self::NoIp(_) | Self::Netns { .. })
    }

    /// The pod may have state a previous agent left (it had an address, its namespace is just
    /// not found now): that state must not be taken for stale.
    fn may_own_stale_state(&self) -> bool {
        self.is_unresolved() && !matches!(self, Self::NoIp(_))
    }
}

/// A pod whose network namespace the agent holds closed: inbound connections are dropped unless
/// its listeners take them, outbound ones are captured.
struct Held {
    workload: Arc<Workload>,
    netns: Arc<Netns>,
    cookie: u64,
    /// Listeners and proxies, once opened.
    serving: Option<Serving>,
}

/// The agent's listeners in a pod and the tasks accepting on them.
struct Serving {
    /// What they were opened for: another identity or address needs new ones.
    workload: Arc<Workload>,
    stats: Arc<PodStats>,
    tasks: Vec<JoinHandle<()>>,
    /// Same-node connections reach the pod while this lives.
    _local: crate::proxy::local::Served,
}

impl Drop for Serving {
    /// Stops accepting (the listeners close, and leave the kernel's maps by themselves);
    /// connections already proxied run to their end.
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// Why a pod of this node that should be in the mesh is not served.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Failure {
    message: String,
    refused: bool,
    /// Its namespace was not found, but state a previous agent left may be its.
    may_own_stale_state: bool,
}

/// Whether the agent captures a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureState {
    /// In the mesh and captured.
    Captured,
    /// In the mesh, but capturing it failed (see the error); its traffic is refused.
    Failed,
    /// In the mesh, but the network namespace its spec leads to can never be a pod's.
    Refused,
    /// Not in the mesh.
    NotCaptured,
}

impl std::fmt::Display for CaptureState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Captured => "captured",
            Self::Failed => "FAILED",
            Self::Refused => "REFUSED",
            Self::NotCaptured => "-",
        })
    }
}

/// How one pod of this node stands, for the admin API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodReport {
    /// The pod.
    #[serde(flatten)]
    pub workload: Workload,
    /// Whether the agent captures it.
    pub state: CaptureState,
    /// Why enrolling failed.
    pub error: Option<String>,
    /// The netns cookie, when its namespace is held.
    pub netns_cookie: Option<u64>,
    /// Connection counters, when captured; read live when the report is serialised.
    pub stats: Option<Arc<PodStats>>,
}

/// Which pods' connections the kernel traces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracing {
    /// None (`--no-flows`).
    Off,
    /// Enrolled pods (the default).
    Enrolled,
    /// Every pod of the node (`--trace-all`).
    AllPods,
}

/// How much of a pod's state a reconcile round looks at again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// After a new snapshot: the pods whose entry changed, and those not served yet.
    Changes,
    /// The periodic retry: every pod, its namespace looked for again.
    Full,
}

/// Keeps the set of captured pods equal to the set of enrolled pods of this node.
pub struct Redirector {
    tracing: Tracing,
    /// Pods traced without being captured (`--trace-all`), with their netns cookie.
    traced_only: BTreeMap<ObjectKey, (Arc<Workload>, u64)>,
    node: String,
    datapath: Datapath,
    proxy: Arc<Proxy>,
    identities: Arc<Identities>,
    tls: Arc<TlsContext>,
    held: BTreeMap<ObjectKey, Held>,
    failed: BTreeMap<ObjectKey, Failure>,
    reconciled_once: bool,
    /// Whether state a previous agent left for pods no longer enrolled here was removed.
    stale_cleared: bool,
    /// The last [`Redirector::verify`] round's findings.
    check: DatapathCheck,
    /// Repairs made since start.
    repairs: u64,
    /// A newer agent owns the shared state (an upgrade): this one only serves what it holds.
    superseded_by: Option<u32>,
}

impl Redirector {
    /// A redirector for the pods of `node`.
    pub fn new(
        node: String,
        datapath: Datapath,
        proxy: Arc<Proxy>,
        identities: Arc<Identities>,
        tls: Arc<TlsContext>,
        tracing: Tracing,
    ) -> Self {
        Self {
            tracing,
            traced_only: BTreeMap::new(),
            node,
            datapath,
            proxy,
            identities,
            tls,
            held: BTreeMap::new(),
            failed: BTreeMap::new(),
            reconciled_once: false,
            stale_cleared: false,
            check: DatapathCheck::default(),
            repairs: 0,
            superseded_by: None,
        }
    }

    /// Whether a newer agent took the shared state over; said once when it happens.
    fn superseded(&mut self) -> bool {
        let now = self.datapath.superseded_by();
        if now != self.superseded_by {
            match now {
                Some(pid) => info!(
                    agent = pid,
                    "a newer agent took this node over; leaving the kernel state to it and serving only the connections held here"
                ),
                None => info!("this agent owns the node's state again"),
            }
            self.superseded_by = now;
        }
        now.is_some()
    }

    /// The newer agent that took over, if one did.
    pub fn successor(&self) -> Option<u32> {
        self.superseded_by
    }

    /// Closes every listener (connections already accepted run on), leaving the kernel state
    /// as it is: for a newer agent to serve, or to fail closed. The first step of a drain.
    pub fn stop_serving(&mut self) {
        for held in self.held.values_mut() {
            held.serving = None;
        }
    }

    /// The loaded datapath.
    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// True when every pod of this node that should be in the mesh is captured (refused pods
    /// aside) and nothing of the datapath is missing.
    pub fn all_captured(&self) -> bool {
        self.reconciled_once
            && self.superseded_by.is_none()
            && self.failed.values().all(|f| f.refused)
            && self.check.broken.is_empty()
    }

    /// What the last [`Redirector::verify`] found, and the repairs made since start.
    pub fn datapath_health(&self) -> (&DatapathCheck, u64) {
        (&self.check, self.repairs)
    }

    /// Brings capture in line with `cluster`. With `Round::Changes`, a pod already served whose
    /// workload is the same entry as when it was enrolled (the snapshot shares unchanged
    /// entries) is not looked for again; `Round::Full`, the periodic retry, also looks for new
    /// sandboxes of every pod. A new snapshot at a high event rate then costs no `/proc` walk.
    pub fn reconcile(&mut self, cluster: &Cluster, round: Round) {
        if self.superseded() {
            return;
        }
        let node = self.node.clone();
        let wanted: BTreeMap<ObjectKey, Arc<Workload>> = cluster
            .workloads_on(&node)
            .filter(|w| w.enrollment.is_enrolled())
            .map(|w| (w.key.clone(), w.clone()))
            .collect();

        let gone: Vec<ObjectKey> =
            self.held.keys().filter(|key| !wanted.contains_key(*key)).cloned().collect();
        for key in gone {
            if let Some(held) = self.held.remove(&key) {
                self.release(held);
            }
        }

        let previous_failures = std::mem::take(&mut self.failed);
        // One walk of /proc per round, and only when a pod needs it.
        let processes = OnceCell::new();
        let mut claimed: HashMap<(u64, u64), ObjectKey> =
            self.held.iter().map(|(key, held)| (held.netns.id(), key.clone())).collect();
        for (key, workload) in &wanted {
            let was_serving = self.held.get(key).is_some_and(|h| h.serving.is_some());
            let unchanged = self.held.get(key).is_some_and(|h| Arc::ptr_eq(&h.workload, workload));
            if round == Round::Changes && was_serving && unchanged && !previous_failures.contains_key(key) {
                continue;
            }
            match self.enroll(cluster, workload, &mut claimed, &processes) {
                Ok(()) => {
                    if !was_serving && let Some(held) = self.held.get(key) {
                        info!(pod = %key, cookie = held.cookie, ips = ?workload.ips, "pod captured");
                    }
                }
                Err(e) => {
                    let failure = Failure {
                        message: e.to_string(),
                        refused: e.is_refusal(),
                        may_own_stale_state: e.may_own_stale_state(),
                    };
                    // Failed pods are retried every few seconds; say so once per new reason.
                    if previous_failures.get(key) != Some(&failure) {
                        if failure.refused {
                            error!(pod = %key, error = %failure.message, "pod refused; nothing was installed for it");
                        } else {
                            warn!(pod = %key, error = %failure.message, held = self.held.contains_key(key), "pod not captured; its traffic is refused; will retry");
                        }
                    }
                    self.failed.insert(key.clone(), failure);
                }
            }
        }

        self.reconciled_once = true;
        // State a previous agent left may belong to a wanted pod whose namespace is not found
        // yet: removing it would open that pod. Wait until every wanted pod is resolved.
        if !self.stale_cleared && !self.failed.values().any(|f| f.may_own_stale_state) {
            self.stale_cleared = true;
            self.forget_stale();
        }
        let in_use: HashSet<Identity> = self.held.values().map(|h| self.identity_of(&h.workload)).collect();
        self.identities.retain(&in_use);
        self.trace_others(cluster);
    }

    /// Finds, checks, closes and serves one pod's network namespace.
    fn enroll(
        &mut self,
        cluster: &Cluster,
        workload: &Arc<Workload>,
        claimed: &mut HashMap<(u64, u64), ObjectKey>,
        processes: &OnceCell<HashMap<String, u32>>,
    ) -> Result<(), RedirectError> {
        let key = &workload.key;
        let netns = match open_netns(workload, processes) {
            Ok(netns) => netns,
            // Its namespace is already held: it stays closed (and served) as it is.
            Err(e) if e.is_unresolved() && self.held.contains_key(key) => return Ok(()),
            Err(e) => return Err(e),
        };
        let refuse = |reason: String| RedirectError::RefusedNetns {
            pod: key.clone(),
            path: netns.path().display().to_string(),
            reason,
        };
        if let Some(reason) = netns.not_a_pod() {
            return Err(refuse(reason.to_owned()));
        }
        if let Some(other) = claimed.get(&netns.id()).filter(|other| *other != key) {
            return Err(refuse(format!("it is already enrolled for pod {other}")));
        }
        if workload.ips.is_empty() {
            return Err(RedirectError::NoIp(key.clone()));
        }
        claimed.insert(netns.id(), key.clone());
        // A new sandbox: the old namespace is no longer this pod's.
        if self.held.get(key).is_some_and(|h| h.netns.id() != netns.id())
            && let Some(old) = self.held.remove(key)
        {
            self.release(old);
        }
        let bpf_err = |source: BpfError| RedirectError::Bpf { pod: key.clone(), source: Box::new(source) };
        if !self.held.contains_key(key) {
            let cookie = netns
                .run(|| {
                    Socket::new(Domain::IPV4, Type::DGRAM, None).and_then(|s| crate::sys::netns_cookie(&s))
                })
                .and_then(|r| r)
                .map_err(|source| RedirectError::Netns {
                    pod: key.clone(),
                    path: netns.path().display().to_string(),
                    source,
                })?;
            self.held.insert(
                key.clone(),
                Held { workload: workload.clone(), netns: Arc::new(netns), cookie, serving: None },
            );
        }
        let Some(held) = self.held.get_mut(key) else { return Ok(()) };
        held.workload = workload.clone();
        let (cookie, netns) = (held.cookie, held.netns.clone());
        // Closed first: from here on, inbound connections the agent does not take are dropped.
        if !self.datapath.holds_netns_link(cookie) {
            self.datapath.link_netns(&*netns, cookie).map_err(bpf_err)?;
        }
        let served = self.serve(cluster, workload);
        // Outbound capture whether or not the listeners opened: without them the app's
        // connections are refused, never sent around the agent.
        let mut enrolled = Enrolled::default();
        for ip in &workload.ips {
            match ip {
                IpAddr::V4(v4) => enrolled.ipv4 = u32::from_ne_bytes(v4.octets()),
                IpAddr::V6(v6) => enrolled.ipv6 = bpf::kernel_ip((*v6).into()).addr,
            }
        }
        self.datapath.enroll(cookie, enrolled).map_err(bpf_err)?;
        if self.tracing != Tracing::Off
            && let Err(e) = self.datapath.trace_netns(cookie, true)
        {
            warn!(pod = %key, error = %e, "connections of this pod will not be traced");
        }
        served
    }

    /// Opens the agent's listeners in a held pod and starts its proxies, unless the ones open
    /// already fit.
    fn serve(&mut self, cluster: &Cluster, workload: &Arc<Workload>) -> Result<(), RedirectError> {
        let key = &workload.key;
        let Some(held) = self.held.get_mut(key) else { return Ok(()) };
        let conflict = workload.ips.iter().find_map(|ip| Some((*ip, cluster.ip_claimants(*ip)?)));
        if let Some((ip, claimants)) = conflict {
            let others: Vec<String> =
                claimants.iter().filter(|k| *k != key).map(ToString::to_string).collect();
            let released = held.serving.take().map(|s| s.workload.ips.clone()).unwrap_or_default();
            for old in released {
                let _ = self.datapath.clear_listener(bpf::kernel_ip(old));
            }
            return Err(RedirectError::AddressConflict { pod: key.clone(), ip, others: others.join(", ") });
        }
        if held.serving.as_ref().is_some_and(|s| same_serving(&s.workload, workload)) {
            return Ok(());
        }
        let (netns, cookie) = (held.netns.clone(), held.cookie);
        // The listeners open for another identity or address stop before new ones start.
        let old = held.serving.take();
        let old_ips = old.as_ref().map(|s| s.workload.ips.clone()).unwrap_or_default();
        drop(old);
        let serving = self.open_listeners(workload, netns, cookie)?;
        for ip in old_ips.iter().filter(|ip| !workload.ips.contains(ip)) {
            let _ = self.datapath.clear_listener(bpf::kernel_ip(*ip));
        }
        if let Some(held) = self.held.get_mut(key) {
            held.serving = Some(serving);
        }
        Ok(())
    }

    /// The listeners and proxies of one pod, registered with the kernel programs.
    fn open_listeners(
        &mut self,
        workload: &Arc<Workload>,
        netns: Arc<Netns>,
        cookie: u64,
    ) -> Result<Serving, RedirectError> {
        let pod = workload.key.clone();
        let identity = self.identity_of(workload);
        // Ask for the certificate now, so the first connection does not wait for it.
        self.identities
            .prefetch(&identity)
            .map_err(|e| RedirectError::Identity { pod: pod.clone(), reason: e.to_string() })?;
        let server_tls = self
            .tls
            .server_config(identity.clone())
            .map_err(|e| RedirectError::Identity { pod: pod.clone(), reason: e.to_string() })?;

        let has_v4 = workload.ips.iter().any(|ip| ip.is_ipv4());
        let has_v6 = workload.ips.iter().any(|ip| ip.is_ipv6());
        let outbound_addrs: Vec<SocketAddr> = [
            has_v4.then_some(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT))),
            has_v6.then_some(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT))),
        ]
        .into_iter()
        .flatten()
        .collect();
        // Dual-stack pods get IPv6 listeners that take IPv4 too; IPv4-only pods may have no IPv6
        // at all, so they get IPv4 ones.
        let any = |port| {
            if has_v6 {
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
            } else {
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
            }
        };
        let (inbound_addr, hbone_addr) = (any(INBOUND_PORT), any(HBONE_PORT));

        let listen = |addr: SocketAddr| {
            netns.run(|| listen_socket(addr)).and_then(|r| r).map_err(|source| RedirectError::Listen {
                pod: pod.clone(),
                addr,
                source,
            })
        };
        // Connections queued on a listener that closes (the old agent's, in an upgrade) move to
        // another of its group rather than being reset. Best effort: a read-only /proc/sys only
        // costs the few connections queued at that instant.
        if let Ok(Err(e)) = netns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")) {
            debug!(pod = %pod, error = %e, "net.ipv4.tcp_migrate_req not set");
        }
        // Without the routes, the app's replies to a client's address would leave the pod: it
        // then gets connections from the agent's address, as with --no-client-address.
        let deliver_from_client = self.proxy.delivers_from_client()
            && match netns.run(|| delivery::prepare(has_v6)) {
                Ok(Ok(())) => true,
                Ok(Err(e)) | Err(e) => {
                    warn!(pod = %pod, error = %e, "apps of this pod will see connections from the agent's address, not the client's");
                    false
                }
            };
        let outbound: Vec<(SocketAddr, Socket)> =
            outbound_addrs.iter().map(|a| Ok((*a, listen(*a)?))).collect::<Result<_, _>>()?;
        let inbound = listen(inbound_addr)?;
        let hbone = listen(hbone_addr)?;

        let bpf_err = |source: BpfError| RedirectError::Bpf { pod: pod.clone(), source: Box::new(source) };
        for ip in &workload.ips {
            self.datapath.set_listener(bpf::kernel_ip(*ip), &inbound, &hbone).map_err(bpf_err)?;
        }

        let stats = Arc::new(PodStats::default());
        let context = Arc::new(PodContext {
            workload: workload.clone(),
            identity,
            sockets: netns,
            cookie,
            stats: stats.clone(),
            server_tls,
            baggage: crate::telemetry::baggage(workload),
            deliver_from_client,
        });
        let local = self.proxy.serving(&context);
        let to_tokio = |(addr, socket): (SocketAddr, Socket)| {
            TcpListener::from_std(socket.into()).map_err(|source| RedirectError::Listen {
                pod: pod.clone(),
                addr,
                source,
            })
        };
        let mut serving = Serving { workload: workload.clone(), stats, tasks: Vec::new(), _local: local };
        for socket in outbound {
            let listener = to_tokio(socket)?;
            serving.tasks.push(tokio::spawn(self.proxy.clone().serve_outbound(context.clone(), listener)));
        }
        let listener = to_tokio((inbound_addr, inbound))?;
        serving.tasks.push(tokio::spawn(self.proxy.clone().serve_inbound(context.clone(), listener)));
        let listener = to_tokio((hbone_addr, hbone))?;
        serving.tasks.push(tokio::spawn(self.proxy.clone().serve_hbone(context, listener)));
        Ok(serving)
    }

    /// Checks that the kernel still holds what the agent put there (pins, links, enrollment
    /// entries, listeners) and puts back what is missing. Run every few seconds.
    pub fn verify(&mut self, cluster: &Cluster) -> &DatapathCheck {
        if self.superseded() {
            self.check = DatapathCheck::default();
            return &self.check;
        }
        let netns: HashMap<u64, Arc<Netns>> =
            self.held.values().map(|h| (h.cookie, h.netns.clone())).collect();
        let mut check = self.datapath.verify(&|cookie| netns.get(&cookie).cloned());
        let enrolled: HashSet<u64> = self.datapath.enrolled_netns().into_iter().collect();
        let listening = self.datapath.listening();
        let mut reserve = Vec::new();
        for (key, held) in &mut self.held {
            if !enrolled.contains(&held.cookie) {
                check.repaired.push(format!("pod {key}: outbound capture entry was missing; restored"));
            }
            let lost = held.serving.as_ref().is_some_and(|s| {
                s.tasks.iter().any(JoinHandle::is_finished)
                    || s.workload.ips.iter().any(|ip| !listening.contains(ip))
            });
            if lost {
                held.serving = None;
                check.repaired.push(format!("pod {key}: its listeners were gone; opened again"));
                reserve.push(key.clone());
            } else if !enrolled.contains(&held.cookie) {
                reserve.push(key.clone());
            }
        }
        // One /proc walk for all the pods to serve again, not one each.
        let processes = OnceCell::new();
        for key in reserve {
            let Some(workload) = self.held.get(&key).map(|h| h.workload.clone()) else { continue };
            let mut claimed = HashMap::new();
            if let Err(e) = self.enroll(cluster, &workload, &mut claimed, &processes) {
                check.broken.push(e.to_string());
            }
        }
        for repair in &check.repaired {
            warn!(repair = %repair, "datapath repaired");
        }
        self.repairs += check.repaired.len() as u64;
        self.check = check;
        &self.check
    }

    fn identity_of(&self, workload: &Workload) -> Identity {
        Identity::new(self.identities.trust_domain(), &workload.key.namespace, &workload.service_account)
    }

    /// Removes state that a previous agent of this instance left for pods that are no longer
    /// enrolled here (their entries would otherwise capture traffic no one serves).
    fn forget_stale(&mut self) {
        let live: HashSet<u64> = self.held.values().map(|h| h.cookie).collect();
        for cookie in self.datapath.enrolled_netns() {
            if !live.contains(&cookie) {
                info!(cookie, "removing stale enrollment left by a previous agent");
                if let Err(e) = self.datapath.unenroll(cookie) {
                    warn!(cookie, error = %e, "stale enrollment not removed");
                }
            }
        }
        for cookie in self.datapath.linked_netns() {
            if !live.contains(&cookie)
                && let Err(e) = self.datapath.unlink_netns(cookie)
            {
                warn!(cookie, error = %e, "stale inbound link not removed");
            }
        }
        // Traced-only pods are set up after this; drop everything not captured.
        for cookie in self.datapath.traced_netns() {
            if !live.contains(&cookie) {
                let _ = self.datapath.trace_netns(cookie, false);
            }
        }
    }

    /// The traced pods by netns cookie, for flow records.
    pub fn traced_pods(&self) -> std::collections::HashMap<u64, Arc<Workload>> {
        self.held
            .values()
            .map(|h| (h.cookie, h.workload.clone()))
            .chain(self.traced_only.values().map(|(w, cookie)| (*cookie, w.clone())))
            .collect()
    }

    /// With `--trace-all`, traces the pods of this node that are not captured.
    fn trace_others(&mut self, cluster: &Cluster) {
        let wanted: BTreeMap<ObjectKey, &Arc<Workload>> = if self.tracing == Tracing::AllPods {
            cluster
                .workloads_on(&self.node)
                .filter(|w| !self.held.contains_key(&w.key) && !self.failed.contains_key(&w.key))
                .map(|w| (w.key.clone(), w))
                .collect()
        } else {
            BTreeMap::new()
        };
        let gone: Vec<ObjectKey> = self
            .traced_only
            .iter()
            .filter(|(k, (w, _))| wanted.get(*k).is_none_or(|now| now.netns != w.netns))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some((_, cookie)) = self.traced_only.remove(&key) {
                let _ = self.datapath.trace_netns(cookie, false);
            }
        }
        let processes = OnceCell::new();
        for (key, workload) in wanted {
            if self.traced_only.contains_key(&key) {
                continue;
            }
            // The cookie of a namespace is read from a socket created inside it.
            let cookie = open_netns(workload, &processes).and_then(|ns| {
                if let Some(reason) = ns.not_a_pod() {
                    return Err(RedirectError::RefusedNetns {
                        pod: key.clone(),
                        path: ns.path().display().to_string(),
                        reason: reason.to_owned(),
                    });
                }
                ns.run(|| Socket::new(Domain::IPV4, Type::STREAM, None))
                    .and_then(|s| s)
                    .and_then(|s| crate::sys::netns_cookie(&s))
                    .map_err(|source| RedirectError::Netns {
                        pod: key.clone(),
                        path: ns.path().display().to_string(),
                        source,
                    })
            });
            match cookie.and_then(|cookie| {
                self.datapath
                    .trace_netns(cookie, true)
                    .map(|()| cookie)
                    .map_err(|source| RedirectError::Bpf { pod: key.clone(), source: Box::new(source) })
            }) {
                Ok(cookie) => {
                    self.traced_only.insert(key, (workload.clone(), cookie));
                }
                Err(e) => warn!(error = %e, "pod not traced"),
            }
        }
    }

    /// The pods of this node that present each identity, for `ambit certs`.
    pub fn pods_by_identity(&self) -> std::collections::HashMap<Identity, Vec<String>> {
        let mut map: std::collections::HashMap<Identity, Vec<String>> = std::collections::HashMap::new();
        for held in self.held.values().filter(|h| h.serving.is_some()) {
            map.entry(self.identity_of(&held.workload)).or_default().push(held.workload.key.to_string());
        }
        map
    }

    /// Reports of every pod of this node.
    pub fn reports(&self, cluster: &Cluster) -> Vec<PodReport> {
        cluster
            .workloads_on(&self.node)
            .map(|w| {
                let held = self.held.get(&w.key);
                let serving = held.and_then(|h| h.serving.as_ref());
                let failure = self.failed.get(&w.key);
                PodReport {
                    workload: (**w).clone(),
                    state: match (serving, failure) {
                        (_, Some(f)) if f.refused => CaptureState::Refused,
                        (_, Some(_)) => CaptureState::Failed,
                        (Some(_), None) => CaptureState::Captured,
                        (None, None) => CaptureState::NotCaptured,
                    },
                    error: failure.map(|f| f.message.clone()),
                    netns_cookie: held.map(|h| h.cookie),
                    stats: serving.map(|s| s.stats.clone()),
                }
            })
            .collect()
    }

    fn release(&mut self, held: Held) {
        let Held { workload, cookie, serving, .. } = held;
        // Reverse order of capture: stop capturing outbound first, then inbound.
        if let Err(e) = self.datapath.unenroll(cookie) {
            warn!(pod = %workload.key, error = %e, "releasing outbound capture");
        }
        let _ = self.datapath.trace_netns(cookie, false);
        if let Err(e) = self.datapath.unlink_netns(cookie) {
            warn!(pod = %workload.key, error = %e, "releasing inbound capture");
        }
        // Another pod may hold one of the addresses by now (released pods go first).
        for ip in &workload.ips {
            if let Err(e) = self.datapath.clear_listener(bpf::kernel_ip(*ip)) {
                warn!(pod = %workload.key, error = %e, "releasing inbound listener");
            }
        }
        drop(serving);
        info!(pod = %workload.key, "pod released");
    }
}

/// Two views of a pod can share its listeners when they have the same addresses and identity.
fn same_serving(a: &Workload, b: &Workload) -> bool {
    a.ips == b.ips && a.uid == b.uid && a.service_account == b.service_account && a.key == b.key
}

/// The pod's network namespace: from the local file's annotation, or (in a cluster, where pod
/// specs cannot name it) from a process in the pod's cgroup, checked again once it is open.
fn open_netns(
    workload: &Workload,
    processes: &OnceCell<HashMap<String, u32>>,
) -> Result<Netns, RedirectError> {
    let pod = || workload.key.clone();
    let proc_root = Path::new("/proc");
    let (path, discovered) = match &workload.netns {
        Some(path) => (path.clone(), false),
        None => {
            if workload.uid.is_empty() {
                return Err(RedirectError::NoNetns(pod()));
            }
            let processes = processes.get_or_init(|| crate::sys::procfs::pod_processes(proc_root));
            let path = crate::sys::procfs::netns_of_pod(proc_root, processes, &workload.uid)
                .ok_or_else(|| RedirectError::NoProcess { pod: pod(), uid: workload.uid.clone() })?;
            (path, true)
        }
    };
    let netns = Netns::open(&path).map_err(|source| RedirectError::Netns {
        pod: pod(),
        path: path.display().to_string(),
        source,
    })?;
    if discovered && !crate::sys::procfs::still_in_pod(&path, &workload.uid) {
        return Err(RedirectError::NoProcess { pod: pod(), uid: workload.uid.clone() });
    }
    Ok(netns)
}

/// A listening socket for one of the agent's ports inside a pod: created while the thread is
/// in the pod's netns, so the kernel delivers the pod's traffic to it.
fn listen_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // A new agent binds beside the old one during an upgrade. Inbound connections reach exactly
    // the socket `sk_lookup` names (no reuseport choice); outbound ones are shared until the old
    // agent closes, and with `tcp_migrate_req` its queued ones move to the new one.
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit the mark: the tracer then knows them as the agent's, not the app's.
    socket.set_mark(ambit_common::AGENT_MARK).map_err(|e| capability::explain(e, Capability::NetAdmin))?;
    // And an abortive close: the applications' connections end with a reset unless the relay
    // ends them cleanly, so that an agent that dies never looks like a clean end of stream.
    // (HBONE's own connections are closed by TLS and HTTP/2.)
    if addr.port() != HBONE_PORT {
        socket.set_linger(Some(std::time::Duration::ZERO))?;
    }
    if addr.is_ipv6() {
        // The inbound listener takes IPv4 too (through sk_lookup), the outbound one does not.
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}
