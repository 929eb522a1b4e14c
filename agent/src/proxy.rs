//! The proxies: accept connections the kernel programs captured inside a pod, find where they
//! were going, and carry them there from inside the pod's network namespace.
//!
//! - [`outbound`] (`15001` on the pod's loopback): the application's `connect()` was redirected
//!   here; to a destination in the mesh it goes as an HBONE stream over mutual TLS with the
//!   pod's identity, to anything else as plaintext.
//! - [`inbound`]: HBONE on `15008` (verified peer identity), and plaintext steered to `15006`
//!   by `sk_lookup`, which PeerAuthentication may refuse.

pub mod hbone;
pub mod inbound;
pub(crate) mod local;
pub mod outbound;
pub mod relay;
pub mod tracker;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use ambit_common::{AGENT_MARK, DELIVERY_MARK};
use rustls::ServerConfig;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};

use crate::{
    bpf::{ProxyMaps, from_kernel},
    identity::{Identities, Identity},
    listener::{self, Admission, Limits},
    schema::Workload,
    state::Cluster,
    sys::capability::{self, Capability},
    sys::netns::Netns,
    tls::TlsContext,
};

/// How long the agent waits for a destination to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors the data plane leaves free for the agent's endpoints and its own work: the
/// node ports and the admin API hold at most 576 together, the rest is for pins, namespaces
/// and new listeners.
const KEEP_FREE: u64 = 1024;
/// A pod's own applications (outbound) and plaintext clients (inbound) are bounded by the
/// agent's descriptors only: a per-peer cap would break a legitimately busy client.
const DATA_PLANE: Limits = Limits { open: usize::MAX, per_peer: usize::MAX, keep_free: KEEP_FREE };
/// HBONE connections are pooled (a handful per pair of identities), so one peer address holding
/// hundreds is an attack, not a workload.
const HBONE: Limits = Limits { open: 16_384, per_peer: 512, keep_free: KEEP_FREE };

/// Errors of one proxied connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The kernel recorded no original destination for a captured connection.
    #[error("no original destination recorded for client port {0}")]
    NoOriginalDestination(u16),
    /// The connection targets one of the agent's own ports, which would loop.
    #[error("refusing a connection to the agent's own port {0}")]
    ReservedPort(u16),
    /// The same-node path found the destination pod by address, and the address is not its own.
    #[error("{0} is not an address of the destination pod's network namespace")]
    NotInPod(SocketAddr),
    /// Creating the upstream socket inside the pod failed.
    #[error("opening a socket in the pod's network namespace: {0}")]
    Socket(io::Error),
    /// The socket delivering to the app could not take the client's address.
    #[error("delivering from the client's address {client}: {source}")]
    Deliver {
        /// The client's address.
        client: IpAddr,
        /// Why.
        source: io::Error,
    },
    /// The destination did not accept the connection.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The destination.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The destination did not answer in time.
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    /// The mTLS handshake failed (wrong identity, untrusted certificate...).
    #[error("mTLS handshake with {addr}: {reason}")]
    Handshake {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// HBONE protocol failure.
    #[error("HBONE: {0}")]
    Hbone(String),
    /// A Service without a ready endpoint.
    #[error("Service {0} has no ready endpoint")]
    NoEndpoint(String),
    /// Two running pods claim the destination address: neither may get the traffic.
    #[error("refusing {addr}: the address is claimed by several running pods ({pods})")]
    AmbiguousAddress {
        /// The destination.
        addr: SocketAddr,
        /// The claimants, comma-separated.
        pods: String,
    },
    /// The connection is refused by policy.
    #[error("denied: {0}")]
    Denied(String),
    /// No certificate for the pod's identity.
    #[error("no certificate for {identity}: {reason}")]
    Identity {
        /// Whose.
        identity: String,
        /// Why.
        reason: String,
    },
    /// Copying bytes failed.
    #[error("relaying bytes: {0}")]
    Relay(io::Error),
}

impl crate::telemetry::ConnectionError for ProxyError {
    fn denied(&self) -> bool {
        matches!(self, Self::Denied(_))
    }
}

/// Connection counters of one captured pod.
#[derive(Debug, Default)]
pub struct PodStats {
    outbound: AtomicU64,
    inbound: AtomicU64,
    failed: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

/// A copy of [`PodStats`] for reports.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// Outbound connections captured.
    pub outbound: u64,
    /// Inbound connections captured (HBONE and plaintext).
    pub inbound: u64,
    /// Connections that failed or were refused.
    pub failed: u64,
    /// Bytes the pod sent.
    pub bytes_sent: u64,
    /// Bytes the pod received.
    pub bytes_received: u64,
}

impl Serialize for PodStats {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for PodStats {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = StatsSnapshot::deserialize(deserializer)?;
        Ok(Self {
            outbound: s.outbound.into(),
            inbound: s.inbound.into(),
            failed: s.failed.into(),
            bytes_sent: s.bytes_sent.into(),
            bytes_received: s.bytes_received.into(),
        })
    }
}

impl PodStats {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            outbound: self.outbound.load(Relaxed),
            inbound: self.inbound.load(Relaxed),
            failed: self.failed.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
        }
    }
}

/// What the proxies ask of the kernel programs about a connection they accepted. The kernel's
/// maps answer in the agent ([`ProxyMaps`]); an in-process test answers with its own table.
pub trait ConnectionTable: Send + Sync {
    /// Where the connection from `port` on the loopback of netns `netns_cookie` was going. The
    /// answer is used up: a later connection from the same port (or one made straight to the
    /// capture listener, which the kernel never redirected) finds none.
    fn take_original_destination(&self, netns_cookie: u64, port: u16) -> Option<SocketAddr>;

    /// Whether a socket of the node's own network namespace opened the connection from `src` to
    /// `dst` (a kubelet probe). Used up too: it answers for one connection only.
    fn take_host_connection(&self, src: SocketAddr, dst: SocketAddr) -> bool;
}

impl ConnectionTable for ProxyMaps {
    fn take_original_destination(&self, netns_cookie: u64, port: u16) -> Option<SocketAddr> {
        self.take_orig_dst(netns_cookie, port).and_then(from_kernel)
    }

    fn take_host_connection(&self, src: SocketAddr, dst: SocketAddr) -> bool {
        ProxyMaps::take_host_connection(self, src, dst)
    }
}

/// Where the proxies open the sockets of a pod: inside its network namespace ([`Netns`]), so
/// that the wire shows the pod's addresses, carrying a mark that the kernel programs leave
/// alone. An in-process test opens plain sockets on loopback instead.
pub trait PodSockets: Send + Sync {
    /// A new non-blocking TCP socket of `domain`, marked `mark` (`SO_MARK`).
    fn tcp_socket(&self, domain: Domain, mark: u32) -> io::Result<Socket>;
}

impl PodSockets for Netns {
    fn tcp_socket(&self, domain: Domain, mark: u32) -> io::Result<Socket> {
        // A socket stays in the namespace it was created in: only `socket()` runs inside.
        let socket = self.run(|| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))??;
        socket.set_mark(mark).map_err(|e| capability::explain(e, Capability::NetAdmin))?;
        Ok(socket)
    }
}

/// What a proxy task knows about the pod it serves.
pub struct PodContext {
    /// The pod.
    pub workload: Arc<Workload>,
    /// Its identity.
    pub identity: Identity,
    /// Where its sockets are opened: inside its network namespace.
    pub sockets: Arc<dyn PodSockets>,
    /// Its netns cookie.
    pub cookie: u64,
    /// Its counters.
    pub stats: Arc<PodStats>,
    /// The TLS server side of its HBONE listener.
    pub server_tls: Arc<ServerConfig>,
    /// The `baggage` its outbound CONNECTs carry.
    pub baggage: String,
    /// Inbound connections reach the app from the client's address (the pod is set up for it),
    /// else from the pod's own.
    pub deliver_from_client: bool,
}

/// Settings of the proxies.
#[derive(Clone)]
pub struct Settings {
    /// Istio's root namespace (mesh-wide policies).
    pub root_namespace: String,
    /// Where the proxies annotate the kernel's flow records.
    pub flows: Arc<crate::telemetry::flows::Flows>,
    /// Istio's TCP metrics.
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
    /// The summary of inbound decisions that `ambit check --what-if` replays.
    pub history: Arc<crate::telemetry::history::FlowHistory>,
    /// Deliver inbound connections to apps from the client's address (`IP_TRANSPARENT`), as
    /// ztunnel does; off: from the pod's own address.
    pub client_address: bool,
    /// Connections between two pods of this node go through HBONE (mutual TLS to the agent
    /// itself) instead of being joined in the agent ([`local`]).
    pub same_node_hbone: bool,
}

/// State shared by all proxies of the agent.
pub struct Proxy {
    tracker: Arc<tracker::Tracker>,
    kernel: Arc<dyn ConnectionTable>,
    cluster: watch::Receiver<Arc<Cluster>>,
    identities: Arc<Identities>,
    pool: hbone::Pool,
    local: local::LocalPods,
    settings: Settings,
    /// Connections being relayed (outbound, inbound plaintext, HBONE streams).
    active: Arc<AtomicU64>,
    /// Turns true when the agent drains: HBONE connections are told to go away.
    draining: watch::Sender<bool>,
}

impl Proxy {
    /// Whether inbound connections are to reach apps from the client's address.
    pub fn delivers_from_client(&self) -> bool {
        self.settings.client_address
    }
}

/// One relayed connection, counted in [`Proxy::active`] while it lives.
struct Active(Arc<AtomicU64>);

impl Active {
    fn new(count: &Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Relaxed);
        Self(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Proxy {
    /// The proxies of one agent.
    pub fn new(
        kernel: Arc<dyn ConnectionTable>,
        cluster: watch::Receiver<Arc<Cluster>>,
        identities: Arc<Identities>,
        tls: Arc<TlsContext>,
        settings: Settings,
    ) -> Self {
        Self {
            tracker: Arc::default(),
            kernel,
            cluster,
            pool: hbone::Pool::new(tls, identities.clone()),
            local: local::LocalPods::default(),
            identities,
            settings,
            active: Arc::default(),
            draining: watch::Sender::new(false),
        }
    }

    /// Connections being relayed now.
    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    /// Starts a drain: every HBONE connection served here is told to go away (HTTP/2 GOAWAY,
    /// its open streams finish; peers open new connections, to whoever serves the pod now), and
    /// idle pooled connections are closed.
    pub fn drain(&self) {
        self.draining.send_replace(true);
        self.pool.close_idle();
    }

    /// Records that this agent serves `pod`, for same-node connections, until the returned
    /// entry is dropped (with the pod's listeners).
    pub(crate) fn serving(&self, pod: &Arc<PodContext>) -> local::Served {
        self.local.insert(pod)
    }

    /// The HBONE connection pool.
    pub fn pool(&self) -> &hbone::Pool {
        &self.pool
    }

    /// Closes open inbound connections that `cluster`'s policies no longer allow.
    pub fn revalidate(&self, cluster: &Arc<Cluster>) -> usize {
        self.tracker.revalidate(cluster, &self.settings.root_namespace)
    }

    fn cluster(&self) -> Arc<Cluster> {
        self.cluster.borrow().clone()
    }

    fn trust_domain(&self) -> &str {
        self.identities.trust_domain()
    }
}

/// Accepts connections on one of a pod's listeners until aborted, handing each to `handle`
/// with its place under `limits`. Accept errors (e.g. out of file descriptors) back off and are
/// retried: a listener must never die while its pod is captured, or the pod would lose its
/// traffic.
async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, limits: Limits, mut handle: F)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let admission = Admission::new(what, limits);
    loop {
        let (stream, peer, permit) = listener::accept(&listener, &admission).await;
        let connection = handle(stream, canonical(peer));
        tokio::spawn(async move {
            let _permit = permit;
            connection.await;
        });
    }
}

/// An address as the rest of the agent knows it: IPv4 on a dual-stack socket shows up as
/// `::ffff:a.b.c.d`, which no policy, map key or CONNECT authority names.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The local address of an accepted socket (the original destination, under `sk_lookup`).
fn local_of(stream: &TcpStream) -> io::Result<SocketAddr> {
    stream.local_addr().map(canonical)
}

/// Keepalive on a connection between agents: the kernel probes an idle peer, and gives up on
/// unacknowledged data, so that a node that vanished without a word is noticed in seconds.
fn keep_alive(stream: &TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(3))
        .with_retries(3);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(Duration::from_secs(10)));
}

/// Counts a finished connection into the pod's stats.
fn count(pod: &PodContext, sent: u64, received: u64, failed: bool) {
    pod.stats.bytes_sent.fetch_add(sent, Relaxed);
    pod.stats.bytes_received.fetch_add(received, Relaxed);
    if failed {
        pod.stats.failed.fetch_add(1, Relaxed);
    }
}

/// Opens a connection to an application (`dst`) from inside the pod's network namespace, so the
/// wire shows the pod's own address, marked so that the connect hooks leave it alone. The
/// socket closes with a reset unless the relay ends cleanly ([`relay`]): if the agent dies, the
/// application sees an error, never a clean end of a truncated stream.
pub async fn connect_from(sockets: &dyn PodSockets, dst: SocketAddr) -> Result<TcpStream, ProxyError> {
    open(sockets, dst, CONNECT_TIMEOUT, Leg::App, None).await
}

/// [`connect_from`] for a leg of `leg`'s kind, from the client's address `client` when the pod
/// is set up for it (see the redirector's delivery setup), else from the pod's.
pub(crate) async fn connect_app(
    sockets: &dyn PodSockets,
    dst: SocketAddr,
    leg: Leg,
    client: Option<IpAddr>,
) -> Result<TcpStream, ProxyError> {
    // Only an address of the same family, and one that is not the pod's loopback, can be bound.
    let client = client.filter(|ip| ip.is_ipv4() == dst.is_ipv4() && !ip.is_loopback() && *ip != dst.ip());
    open(sockets, dst, CONNECT_TIMEOUT, leg, client).await
}

/// A connection to a peer agent's HBONE port (closed as TLS and HTTP/2 close it).
async fn connect_within(
    sockets: &dyn PodSockets,
    dst: SocketAddr,
    limit: Duration,
) -> Result<TcpStream, ProxyError> {
    open(sockets, dst, limit, Leg::Peer, None).await
}

/// What an opened connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leg {
    /// To an application at the address a connection arrived on: closed with a reset unless
    /// the relay ends cleanly.
    App,
    /// To an application at an address found in the cluster's address table (the same-node
    /// path): only if it is an address of the namespace itself, so that a stale table does not
    /// send the bytes to whoever holds the address now.
    AppInside,
    /// To a peer agent.
    Peer,
}

/// Source ports of the connections delivered from a client's address: below Linux's default
/// ephemeral range (32768-60999) and Windows' and macOS's (49152-65535), so that the client's
/// own connections to the same pod port, whose four-tuples the agent holds in the pod too, do
/// not meet one of them with the ends swapped (which the kernel does not check at connect).
const DELIVERY_PORTS: std::ops::RangeInclusive<u16> = 16_384..=32_767;

/// Binds `client` and a free port of [`DELIVERY_PORTS`], chosen at random.
fn bind_delivery_port(socket: &Socket, client: IpAddr) -> io::Result<()> {
    use std::hash::{BuildHasher as _, RandomState};
    socket.set_reuse_address(true)?;
    let span = u64::from(DELIVERY_PORTS.end() - DELIVERY_PORTS.start()) + 1;
    let mut last = io::Error::from_raw_os_error(libc::EADDRINUSE);
    for attempt in 0..16u64 {
        let port = DELIVERY_PORTS.start() + (RandomState::new().hash_one(attempt) % span) as u16;
        match socket.bind(&SocketAddr::new(client, port).into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

async fn open(
    sockets: &dyn PodSockets,
    dst: SocketAddr,
    limit: Duration,
    leg: Leg,
    client: Option<IpAddr>,
) -> Result<TcpStream, ProxyError> {
    let mut attempts = 0;
    loop {
        match open_once(sockets, dst, limit, leg, client).await {
            // The port drawn makes a four-tuple another delivery holds: draw again.
            Err(ProxyError::Connect { source, .. })
                if client.is_some() && source.raw_os_error() == Some(libc::EADDRNOTAVAIL) && attempts < 8 =>
            {
                attempts += 1;
            }
            result => return result,
        }
    }
}

async fn open_once(
    sockets: &dyn PodSockets,
    dst: SocketAddr,
    limit: Duration,
    leg: Leg,
    client: Option<IpAddr>,
) -> Result<TcpStream, ProxyError> {
    let mark = if client.is_some() { DELIVERY_MARK } else { AGENT_MARK };
    let new_socket = || sockets.tcp_socket(Domain::for_address(dst), mark).map_err(ProxyError::Socket);
    // The port is chosen at connect time, per 4-tuple, as without a bind.
    let bind = |socket: &Socket, ip: IpAddr| -> io::Result<()> {
        nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
        socket.bind(&SocketAddr::new(ip, 0).into())
    };
    let in_pod = |socket: &Socket| {
        bind(socket, dst.ip()).map_err(|e| match e.raw_os_error() {
            Some(libc::EADDRNOTAVAIL) => ProxyError::NotInPod(dst),
            _ => ProxyError::Socket(e),
        })
    };
    let socket = new_socket()?;
    if leg != Leg::Peer {
        socket.set_linger(Some(Duration::ZERO)).map_err(ProxyError::Socket)?;
    }
    match (leg, client) {
        (Leg::Peer, _) => {}
        (_, Some(client)) => {
            if leg == Leg::AppInside {
                // The socket binds the client's address: ask with another whether the
                // destination is the pod's own.
                in_pod(&new_socket()?)?;
            }
            let transparent = match client {
                IpAddr::V4(_) => socket.set_ip_transparent_v4(true),
                IpAddr::V6(_) => socket.set_ip_transparent_v6(true),
            };
            transparent.map_err(|e| ProxyError::Socket(capability::explain(e, Capability::NetAdmin)))?;
            bind_delivery_port(&socket, client).map_err(|source| ProxyError::Deliver { client, source })?;
        }
        (Leg::AppInside, None) => in_pod(&socket)?,
        (Leg::App, None) => {}
    }
    // The data plane never eats into the descriptors kept for the agent's endpoints.
    if listener::in_reserve(std::os::fd::AsRawFd::as_raw_fd(&socket) as u64, KEEP_FREE) {
        return Err(ProxyError::Socket(io::Error::from_raw_os_error(libc::EMFILE)));
    }
    socket.set_tcp_nodelay(true).map_err(ProxyError::Socket)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(limit, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ProxyError::Connect { addr: dst, source }),
        Err(_) => Err(ProxyError::ConnectTimeout(dst)),
    }
}
