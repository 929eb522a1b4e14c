//! The proxies: accept connections the kernel programs captured inside a pod, find where they
//! were going, and carry the bytes there from inside the pod's network namespace.
//!
//! - outbound (`15001` on the pod's loopback): the application's `connect()` was redirected here;
//!   the original destination comes from the `ORIG_DST` map.
//! - inbound (`15006`): `sk_lookup` handed us a connection to one of the pod's addresses; the
//!   original destination is the accepted socket's local address.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use ambit_common::{AGENT_MARK, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tracing::{Instrument as _, debug, info_span, warn};

use crate::{
    bpf::OrigDstMap,
    discovery::{Cluster, Workload},
    redirect::{from_kernel, netns::Netns},
    telemetry::{self, Direction},
};

/// How long the agent waits for the destination to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept()` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Errors of one proxied connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The kernel recorded no original destination for a captured connection.
    #[error("no original destination recorded for client port {0}")]
    NoOriginalDestination(u16),
    /// The connection targets one of the agent's own ports, which would loop.
    #[error("refusing a connection to the agent's own port {0}")]
    ReservedPort(u16),
    /// Creating the upstream socket inside the pod failed.
    #[error("opening a socket in the pod's network namespace: {0}")]
    Socket(io::Error),
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
    /// Copying bytes failed.
    #[error("relaying bytes: {0}")]
    Relay(io::Error),
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
    /// Inbound connections captured.
    pub inbound: u64,
    /// Connections that failed.
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

/// What a proxy task knows about the pod it serves.
pub struct PodContext {
    /// The pod.
    pub workload: Workload,
    /// Its network namespace.
    pub netns: Arc<Netns>,
    /// Its netns cookie.
    pub cookie: u64,
    /// Its counters.
    pub stats: Arc<PodStats>,
}

/// State shared by all proxies of the agent.
pub struct Proxy {
    orig_dst: OrigDstMap,
    cluster: watch::Receiver<Arc<Cluster>>,
}

impl Proxy {
    /// A proxy that reads original destinations from `orig_dst` and the cluster from `cluster`.
    pub fn new(orig_dst: OrigDstMap, cluster: watch::Receiver<Arc<Cluster>>) -> Self {
        Self { orig_dst, cluster }
    }

    /// Accepts the pod's captured outbound connections until aborted.
    pub async fn serve_outbound(self: Arc<Self>, pod: Arc<PodContext>, listener: TcpListener) {
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(pod = %pod.workload.key, error = %e, "outbound accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            pod.stats.outbound.fetch_add(1, Relaxed);
            let span = info_span!("outbound", pod = %pod.workload.key, client_port = peer.port());
            tokio::spawn(
                self.clone()
                    .outbound(pod.clone(), client, peer)
                    .instrument(span),
            );
        }
    }

    /// Accepts the pod's captured inbound plaintext connections until aborted.
    pub async fn serve_inbound(self: Arc<Self>, pod: Arc<PodContext>, listener: TcpListener) {
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(pod = %pod.workload.key, error = %e, "inbound accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            pod.stats.inbound.fetch_add(1, Relaxed);
            let span = info_span!("inbound", pod = %pod.workload.key, src = %peer);
            tokio::spawn(
                self.clone()
                    .inbound(pod.clone(), client, peer)
                    .instrument(span),
            );
        }
    }

    async fn outbound(self: Arc<Self>, pod: Arc<PodContext>, client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let mut record = telemetry::ConnectionRecord::new(Direction::Outbound);
        record.src_workload = Some(pod.workload.clone());
        let result = async {
            let dst = self
                .orig_dst
                .get(pod.cookie, peer.port())
                .map(from_kernel)
                .ok_or(ProxyError::NoOriginalDestination(peer.port()))?;
            record.dst_addr = Some(dst);
            record.dst_workload = self.cluster.borrow().workload_by_ip(dst.ip()).cloned();
            let upstream = connect_from(&pod.netns, dst).await?;
            record.src_addr = upstream.local_addr().ok();
            relay(client, upstream, &mut record).await
        }
        .await;
        self.finish(&pod, record, result, start);
    }

    async fn inbound(self: Arc<Self>, pod: Arc<PodContext>, client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let mut record = telemetry::ConnectionRecord::new(Direction::Inbound);
        record.src_addr = Some(peer);
        record.src_workload = self.cluster.borrow().workload_by_ip(peer.ip()).cloned();
        record.dst_workload = Some(pod.workload.clone());
        let result = async {
            // With sk_lookup the accepted socket keeps the address the client asked for.
            let dst = client.local_addr().map_err(ProxyError::Relay)?;
            record.dst_addr = Some(dst);
            if [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&dst.port()) {
                return Err(ProxyError::ReservedPort(dst.port()));
            }
            let upstream = connect_from(&pod.netns, dst).await?;
            relay(client, upstream, &mut record).await
        }
        .await;
        self.finish(&pod, record, result, start);
    }

    fn finish(
        &self,
        pod: &PodContext,
        mut record: telemetry::ConnectionRecord,
        result: Result<(), ProxyError>,
        start: Instant,
    ) {
        record.duration = start.elapsed();
        let (sent, received) = match record.direction {
            Direction::Outbound => (record.bytes_sent, record.bytes_received),
            Direction::Inbound => (record.bytes_received, record.bytes_sent),
        };
        pod.stats.bytes_sent.fetch_add(sent, Relaxed);
        pod.stats.bytes_received.fetch_add(received, Relaxed);
        if let Err(e) = result {
            pod.stats.failed.fetch_add(1, Relaxed);
            record.error = Some(e.to_string());
        }
        record.log();
    }
}

/// Opens a connection to `dst` from inside the pod's network namespace, so the wire shows the
/// pod's own address, marked so that the connect hooks leave it alone.
async fn connect_from(netns: &Netns, dst: SocketAddr) -> Result<TcpStream, ProxyError> {
    let socket = netns
        .run(|| -> io::Result<Socket> {
            let socket = Socket::new(
                Domain::for_address(dst),
                Type::STREAM.nonblocking(),
                Some(Protocol::TCP),
            )?;
            socket.set_mark(AGENT_MARK)?;
            Ok(socket)
        })
        .and_then(|r| r)
        .map_err(ProxyError::Socket)?;
    socket.set_tcp_nodelay(true).map_err(ProxyError::Socket)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ProxyError::Connect { addr: dst, source }),
        Err(_) => Err(ProxyError::ConnectTimeout(dst)),
    }
}

/// Copies bytes both ways until both sides are done, counting them into `record`.
async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    record: &mut telemetry::ConnectionRecord,
) -> Result<(), ProxyError> {
    let _ = client.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            record.bytes_sent = sent;
            record.bytes_received = received;
            debug!(sent, received, "relay done");
            Ok(())
        }
        Err(e) => Err(ProxyError::Relay(e)),
    }
}
