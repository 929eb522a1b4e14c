//! Enrolling pods: for each pod of this node that is in the mesh, enter its network namespace,
//! open the agent's listeners there, register them with the kernel programs, and start the
//! proxies; release pods that left the mesh. Driven by [`Redirector::reconcile`] whenever the
//! cluster snapshot changes.

pub mod netns;
pub mod procfs;

use std::{
    collections::{BTreeMap, HashSet},
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
};

use ambit_common::{Enrolled, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use self::netns::Netns;
use crate::{
    bpf::{self, BpfError, Datapath},
    discovery::{Cluster, ObjectKey, Workload},
    identity::{Identities, Identity},
    proxy::{PodContext, PodStats, Proxy},
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

/// A pod the agent captures.
struct Captured {
    workload: Arc<Workload>,
    netns_id: (u64, u64),
    cookie: u64,
    stats: Arc<PodStats>,
    tasks: Vec<JoinHandle<()>>,
}

/// Whether the agent captures a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureState {
    /// In the mesh and captured.
    Captured,
    /// In the mesh, but capturing it failed (see the error).
    Failed,
    /// Not in the mesh.
    NotCaptured,
}

impl std::fmt::Display for CaptureState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Captured => "captured",
            Self::Failed => "FAILED",
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
    /// The netns cookie, when captured.
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
    captured: BTreeMap<ObjectKey, Captured>,
    failed: BTreeMap<ObjectKey, String>,
    reconciled_once: bool,
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
            captured: BTreeMap::new(),
            failed: BTreeMap::new(),
            reconciled_once: false,
        }
    }

    /// The loaded datapath.
    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// True when every pod of this node that should be in the mesh is captured.
    pub fn all_captured(&self) -> bool {
        self.reconciled_once && self.failed.is_empty()
    }

    /// Brings capture in line with `cluster`.
    pub fn reconcile(&mut self, cluster: &Cluster) {
        let node = self.node.clone();
        let wanted: BTreeMap<ObjectKey, &Arc<Workload>> = cluster
            .workloads_on(&node)
            .filter(|w| w.enrollment.is_enrolled())
            .map(|w| (w.key.clone(), w))
            .collect();

        let gone: Vec<ObjectKey> = self
            .captured
            .iter()
            .filter(|(key, captured)| wanted.get(*key).is_none_or(|w| !same_capture(&captured.workload, w)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            if let Some(captured) = self.captured.remove(&key) {
                self.release(captured);
            }
        }

        let previous_failures = std::mem::take(&mut self.failed);
        for (key, workload) in &wanted {
            if let Some(captured) = self.captured.get_mut(key) {
                // Same pod, same netns and IPs: only labels or metadata changed.
                captured.workload = Arc::clone(workload);
                if let Ok(ns) = open_netns(workload)
                    && ns.id() == captured.netns_id
                {
                    continue;
                }
                if let Some(captured) = self.captured.remove(key) {
                    self.release(captured);
                }
            }
            match self.capture(workload) {
                Ok(captured) => {
                    info!(pod = %key, cookie = captured.cookie, ips = ?workload.ips, "pod captured");
                    self.captured.insert(key.clone(), captured);
                }
                Err(e) => {
                    let message = e.to_string();
                    // Failed pods are retried every few seconds; say so once per new reason.
                    if previous_failures.get(key) != Some(&message) {
                        warn!(pod = %key, error = %message, "pod not captured; will retry");
                    }
                    self.failed.insert(key.clone(), message);
                }
            }
        }

        if !self.reconciled_once {
            self.reconciled_once = true;
            self.forget_stale();
        }
        let in_use: HashSet<Identity> = self
            .captured
            .values()
            .map(|c| {
                Identity::new(
                    self.identities.trust_domain(),
                    &c.workload.key.namespace,
                    &c.workload.service_account,
                )
            })
            .collect();
        self.identities.retain(&in_use);
        self.trace_others(cluster);
    }

    /// Removes state that a previous agent of this instance left for pods that are no longer
    /// enrolled here (their entries would otherwise capture traffic no one serves).
    fn forget_stale(&mut self) {
        let live: HashSet<u64> = self.captured.values().map(|c| c.cookie).collect();
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
        self.captured
            .values()
            .map(|c| (c.cookie, c.workload.clone()))
            .chain(self.traced_only.values().map(|(w, cookie)| (*cookie, w.clone())))
            .collect()
    }

    /// With `--trace-all`, traces the pods of this node that are not captured.
    fn trace_others(&mut self, cluster: &Cluster) {
        let wanted: BTreeMap<ObjectKey, &Arc<Workload>> = if self.tracing == Tracing::AllPods {
            cluster
                .workloads_on(&self.node)
                .filter(|w| !self.captured.contains_key(&w.key))
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
        for (key, workload) in wanted {
            if self.traced_only.contains_key(&key) {
                continue;
            }
            // The cookie of a namespace is read from a socket created inside it.
            let cookie = open_netns(workload).and_then(|ns| {
                ns.run(|| Socket::new(Domain::IPV4, Type::STREAM, None))
                    .and_then(|s| s)
                    .and_then(|s| bpf::netns_cookie(&s))
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
        for c in self.captured.values() {
            let id = Identity::new(
                self.identities.trust_domain(),
                &c.workload.key.namespace,
                &c.workload.service_account,
            );
            map.entry(id).or_default().push(c.workload.key.to_string());
        }
        map
    }

    /// Reports of every pod of this node.
    pub fn reports(&self, cluster: &Cluster) -> Vec<PodReport> {
        cluster
            .workloads_on(&self.node)
            .map(|w| {
                let captured = self.captured.get(&w.key);
                let error = self.failed.get(&w.key).cloned();
                PodReport {
                    workload: (**w).clone(),
                    state: if captured.is_some() {
                        CaptureState::Captured
                    } else if error.is_some() {
                        CaptureState::Failed
                    } else {
                        CaptureState::NotCaptured
                    },
                    error,
                    netns_cookie: captured.map(|c| c.cookie),
                    stats: captured.map(|c| c.stats.clone()),
                }
            })
            .collect()
    }

    fn capture(&mut self, workload: &Arc<Workload>) -> Result<Captured, RedirectError> {
        let pod = workload.key.clone();
        if workload.ips.is_empty() {
            return Err(RedirectError::NoIp(pod));
        }
        let identity =
            Identity::new(self.identities.trust_domain(), &workload.key.namespace, &workload.service_account);
        // Issue the certificate now, so the first connection does not wait for it.
        self.identities
            .svid(&identity)
            .map_err(|e| RedirectError::Identity { pod: pod.clone(), reason: e.to_string() })?;
        let server_tls = self
            .tls
            .server_config(identity.clone())
            .map_err(|e| RedirectError::Identity { pod: pod.clone(), reason: e.to_string() })?;
        let netns = Arc::new(open_netns(workload)?);

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
        let outbound: Vec<(SocketAddr, Socket)> =
            outbound_addrs.iter().map(|a| Ok((*a, listen(*a)?))).collect::<Result<_, _>>()?;
        let inbound = listen(inbound_addr)?;
        let hbone = listen(hbone_addr)?;
        let cookie = bpf::netns_cookie(&inbound).map_err(|source| RedirectError::Listen {
            pod: pod.clone(),
            addr: inbound_addr,
            source,
        })?;

        // Order matters: the inbound listener is registered before steering starts, and
        // outbound capture starts last, once its listener is accepting.
        let bpf_err = |source: BpfError| RedirectError::Bpf { pod: pod.clone(), source: Box::new(source) };
        for ip in &workload.ips {
            self.datapath.set_listener(bpf::kernel_ip(*ip), &inbound).map_err(bpf_err)?;
        }
        self.datapath.link_netns(&*netns, cookie).map_err(bpf_err)?;

        let stats = Arc::new(PodStats::default());
        let context = Arc::new(PodContext {
            workload: workload.clone(),
            identity,
            netns: netns.clone(),
            cookie,
            stats: stats.clone(),
            server_tls,
        });
        let to_tokio = |(addr, socket): (SocketAddr, Socket)| {
            TcpListener::from_std(socket.into()).map_err(|source| RedirectError::Listen {
                pod: pod.clone(),
                addr,
                source,
            })
        };
        let mut tasks = Vec::new();
        for socket in outbound {
            let listener = to_tokio(socket)?;
            tasks.push(tokio::spawn(self.proxy.clone().serve_outbound(context.clone(), listener)));
        }
        let listener = to_tokio((inbound_addr, inbound))?;
        tasks.push(tokio::spawn(self.proxy.clone().serve_inbound(context.clone(), listener)));
        let listener = to_tokio((hbone_addr, hbone))?;
        tasks.push(tokio::spawn(self.proxy.clone().serve_hbone(context.clone(), listener)));

        let mut enrolled = Enrolled::default();
        for ip in &workload.ips {
            match ip {
                std::net::IpAddr::V4(v4) => enrolled.ipv4 = u32::from_ne_bytes(v4.octets()),
                std::net::IpAddr::V6(v6) => enrolled.ipv6 = bpf::kernel_ip((*v6).into()).addr,
            }
        }
        if let Err(e) = self.datapath.enroll(cookie, enrolled) {
            tasks.iter().for_each(JoinHandle::abort);
            return Err(bpf_err(e));
        }
        if self.tracing != Tracing::Off
            && let Err(e) = self.datapath.trace_netns(cookie, true)
        {
            warn!(pod = %pod, error = %e, "connections of this pod will not be traced");
        }
        Ok(Captured { workload: workload.clone(), netns_id: netns.id(), cookie, stats, tasks })
    }

    fn release(&mut self, captured: Captured) {
        let Captured { workload, cookie, tasks, .. } = captured;
        // Reverse order of capture: stop capturing outbound first, then inbound.
        if let Err(e) = self.datapath.unenroll(cookie) {
            warn!(pod = %workload.key, error = %e, "releasing outbound capture");
        }
        let _ = self.datapath.trace_netns(cookie, false);
        if let Err(e) = self.datapath.unlink_netns(cookie) {
            warn!(pod = %workload.key, error = %e, "releasing inbound capture");
        }
        for ip in &workload.ips {
            if let Err(e) = self.datapath.clear_listener(bpf::kernel_ip(*ip)) {
                warn!(pod = %workload.key, error = %e, "releasing inbound listener");
            }
        }
        // Stops accepting; connections already proxied run to their end.
        tasks.iter().for_each(JoinHandle::abort);
        info!(pod = %workload.key, "pod released");
    }
}

/// Two views of a pod need the same capture when they share netns path and IPs.
fn same_capture(a: &Workload, b: &Workload) -> bool {
    a.netns == b.netns && a.ips == b.ips && a.uid == b.uid && a.service_account == b.service_account
}

fn open_netns(workload: &Workload) -> Result<Netns, RedirectError> {
    let path = match &workload.netns {
        Some(path) => path.clone(),
        // No annotation: find it as in a cluster, through the pod's cgroup.
        None => {
            if workload.uid.is_empty() {
                return Err(RedirectError::NoNetns(workload.key.clone()));
            }
            let proc_root = Path::new("/proc");
            let processes = procfs::pod_processes(proc_root);
            procfs::netns_of_pod(proc_root, &processes, &workload.uid).ok_or_else(|| {
                RedirectError::NoProcess { pod: workload.key.clone(), uid: workload.uid.clone() }
            })?
        }
    };
    Netns::open(&path).map_err(|source| RedirectError::Netns {
        pod: workload.key.clone(),
        path: path.display().to_string(),
        source,
    })
}

/// A listening socket for one of the agent's ports inside a pod: created while the thread is
/// in the pod's netns, so the kernel delivers the pod's traffic to it.
fn listen_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Accepted sockets inherit the mark: the tracer then knows them as the agent's, not the app's.
    socket.set_mark(ambit_common::AGENT_MARK)?;
    if addr.is_ipv6() {
        // The inbound listener takes IPv4 too (through sk_lookup), the outbound one does not.
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}
