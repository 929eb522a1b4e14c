//! The HBONE client: HTTP/2 CONNECT streams over pooled mutual-TLS connections, one pool entry
//! per (source identity, destination identity, destination address), as Istio defines it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::{PodSockets, ProxyError, connect_within, keep_alive};
use crate::{
    identity::{Identities, Identity},
    tls::TlsContext,
};

/// Streams per pooled connection before another connection is opened (ztunnel's limit).
pub const MAX_STREAMS: usize = 100;
/// Per-stream receive window (ztunnel's).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection receive window (ztunnel's).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame we accept.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// A pooled connection with no stream for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a handshake waits for its identity's first certificate from the CA service.
pub const CERT_WAIT: Duration = Duration::from_secs(5);
/// How long the TCP connect to a peer's HBONE port may take: peers are other nodes of the
/// cluster, a second is plenty; more means the node is gone.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a peer's HBONE port may refuse before a dial gives up: about the time an agent
/// takes to start again after a crash.
const RESTART_GRACE: Duration = Duration::from_millis(1500);
/// An idle pooled connection is pinged this often, and a CONNECT unanswered for
/// [`SLOW_ANSWER`] triggers a ping at once.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is taken for dead.
const PING_TIMEOUT: Duration = Duration::from_millis(1500);
/// A CONNECT answer this late makes the pool check the connection is alive.
const SLOW_ANSWER: Duration = Duration::from_millis(300);
/// How long a CONNECT answer may take in all: longer than the destination agent's own connect
/// to its application (10 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Pooled connections per key at most: room for this many × [`MAX_STREAMS`] concurrent
/// streams between one pair of identities and one address (a busy connection-pooled client
/// holds ten thousand and more), and a bound on what one pair can make the agent hold. Refused
/// streams never open connections (a 401 is final), and the descriptor reserve protects the
/// agent itself.
pub const MAX_CONNECTIONS_PER_KEY: usize = 1024;

/// Which pooled connection a stream may use.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity the source presents.
    pub src: Identity,
    /// The identity the destination must present.
    pub dst: Identity,
    /// The destination's HBONE address (`pod IP:15008`).
    pub addr: SocketAddr,
}

struct Pooled {
    sender: SendRequest<Bytes>,
    /// Serial of the source certificate the connection was opened with.
    serial: String,
    closed: Arc<AtomicBool>,
    /// Asks the connection's keepalive to ping now.
    probe: Arc<tokio::sync::Notify>,
    /// Streams open on this connection.
    active: AtomicUsize,
    /// Milliseconds since the pool's epoch when a stream last started.
    last_used: AtomicU64,
}

/// The pool of HBONE connections of the agent.
pub struct Pool {
    tls: Arc<TlsContext>,
    identities: Arc<Identities>,
    epoch: Instant,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Pooled>>>>,
    /// One dial at a time per key: a burst of new streams waits for the connection one of them
    /// opens instead of each opening its own.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// An open CONNECT stream.
pub struct Tunnel {
    /// Towards the destination.
    pub send: SendStream<Bytes>,
    /// From the destination.
    pub recv: RecvStream,
    /// Counts the stream against its connection until dropped.
    pub slot: StreamSlot,
}

/// One stream's place on a pooled connection; released when dropped.
pub struct StreamSlot(Arc<Pooled>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

impl Pooled {
    /// Takes a stream slot if the connection is live and has room.
    fn claim(self: &Arc<Self>) -> Option<StreamSlot> {
        if self.closed.load(Relaxed) {
            return None;
        }
        self.active
            .fetch_update(Relaxed, Relaxed, |n| (n < MAX_STREAMS).then_some(n + 1))
            .ok()
            .map(|_| StreamSlot(self.clone()))
    }
}

impl Pool {
    /// An empty pool.
    pub fn new(tls: Arc<TlsContext>, identities: Arc<Identities>) -> Self {
        Self {
            tls,
            identities,
            epoch: Instant::now(),
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a CONNECT stream to `authority` (the original destination) through the pool entry
    /// `key`, creating a TLS connection with `sockets` when none has room; `baggage` tells the
    /// peer's telemetry who the source is ([`crate::telemetry::baggage`]).
    pub async fn connect(
        &self,
        sockets: &dyn PodSockets,
        key: &PoolKey,
        authority: SocketAddr,
        baggage: &str,
    ) -> Result<Tunnel, ProxyError> {
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .header("baggage", baggage)
            .body(())
            .map_err(|e| ProxyError::Hbone(format!("building CONNECT {authority}: {e}")))?;
        if let Some(tunnel) = self.on_pooled(key, &request).await? {
            return Ok(tunnel);
        }
        let gate =
            self.dialing.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone();
        let _turn = gate.lock().await;
        // Whoever dialed while we waited may have made room.
        if let Some(tunnel) = self.on_pooled(key, &request).await? {
            return Ok(tunnel);
        }
        let open_now = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map_or(0, |list| list.iter().filter(|c| !c.closed.load(Relaxed)).count());
        if open_now >= MAX_CONNECTIONS_PER_KEY {
            return Err(ProxyError::Hbone(format!(
                "{open_now} HBONE connections to {} are open with every stream in use (limit {MAX_CONNECTIONS_PER_KEY} × {MAX_STREAMS})",
                key.addr
            )));
        }
        let pooled = self.dial(sockets, key).await?;
        let slot =
            pooled.claim().ok_or_else(|| ProxyError::Hbone("new HBONE connection closed at once".into()))?;
        let mut sender = pooled.sender.clone().ready().await.map_err(|e| ProxyError::Hbone(e.to_string()))?;
        open(&mut sender, request, slot, &pooled.probe).await.map_err(Failure::into_error)
    }

    /// Opens the stream on a pooled connection with room, if there is one. `Ok(None)`: none, or
    /// it failed as a connection (GOAWAY, closed), so another connection may work. An answer
    /// from the destination (401, 503...) is final: it would be the same on a new connection.
    async fn on_pooled(&self, key: &PoolKey, request: &Request<()>) -> Result<Option<Tunnel>, ProxyError> {
        let Some((sender, slot)) = self.reusable(key) else { return Ok(None) };
        let pooled = slot.0.clone();
        // A connection that refuses a stream as a connection (GOAWAY: its peer is draining, or
        // it broke) takes no more: the next stream must not pick it again.
        let Ok(mut sender) = sender.ready().await else {
            pooled.closed.store(true, Relaxed);
            return Ok(None);
        };
        match open(&mut sender, request.clone(), slot, &pooled.probe).await {
            Ok(tunnel) => Ok(Some(tunnel)),
            Err(Failure::Answered(e)) => Err(e),
            Err(Failure::Transport(e)) => {
                debug!(error = %e, "pooled HBONE connection failed; opening another");
                pooled.closed.store(true, Relaxed);
                Ok(None)
            }
        }
    }

    /// A sender of a live pooled connection with room for another stream, and the stream's slot.
    fn reusable(&self, key: &PoolKey) -> Option<(SendRequest<Bytes>, StreamSlot)> {
        // Once the source certificate is renewed, new streams go over new handshakes; existing
        // connections keep their open streams and are swept when idle.
        let serial = self.identities.svid(&key.src).ok()?.serial.clone();
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Relaxed) && (c.serial == serial || c.active.load(Relaxed) > 0));
        let list: Vec<&Arc<Pooled>> = list.iter().filter(|c| c.serial == serial).collect();
        let (pooled, slot) = list.iter().find_map(|c| Some((c, c.claim()?)))?;
        pooled.last_used.store(self.now_ms(), Relaxed);
        Some((pooled.sender.clone(), slot))
    }

    /// The TCP connection of a dial. A peer whose HBONE port refuses (its agent is restarting:
    /// between the old listener closing and the new one opening the kernel answers with a reset)
    /// is tried again for up to [`RESTART_GRACE`]; a peer that does not answer is not.
    async fn connect_retrying(
        &self,
        sockets: &dyn PodSockets,
        addr: SocketAddr,
    ) -> Result<tokio::net::TcpStream, ProxyError> {
        let deadline = Instant::now() + RESTART_GRACE;
        let mut pause = Duration::from_millis(20);
        loop {
            match connect_within(sockets, addr, DIAL_TIMEOUT).await {
                Err(ProxyError::Connect { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) && Instant::now() + pause < deadline =>
                {
                    debug!(%addr, error = %source, retry_in = ?pause, "HBONE port refused; its agent may be restarting");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    async fn dial(&self, sockets: &dyn PodSockets, key: &PoolKey) -> Result<Arc<Pooled>, ProxyError> {
        let config =
            self.tls.client_config(&key.src, &key.dst).map_err(|e| ProxyError::Hbone(e.to_string()))?;
        // A new identity's first connection waits for its certificate (one CA round trip).
        let serial = self
            .identities
            .wait(&key.src, CERT_WAIT)
            .await
            .map_err(|e| ProxyError::Identity { identity: key.src.to_string(), reason: e.to_string() })?
            .serial
            .clone();
        let tcp = self.connect_retrying(sockets, key.addr).await?;
        keep_alive(&tcp);
        // No SNI: the server name is only an address, which rustls does not send.
        let name = ServerName::IpAddress(key.addr.ip().into());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|_| ProxyError::Handshake { addr: key.addr, reason: "timed out".into() })?
            .map_err(|e| ProxyError::Handshake { addr: key.addr, reason: crate::error_chain(&e) })?;
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(crate::proxy::relay::MAX_CHUNK)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| ProxyError::Hbone(format!("HTTP/2 handshake with {}: {e}", key.addr)))?;
        let closed = Arc::new(AtomicBool::new(false));
        let probe = Arc::new(tokio::sync::Notify::new());
        let pooled = Arc::new(Pooled {
            sender,
            serial,
            closed: closed.clone(),
            probe: probe.clone(),
            active: AtomicUsize::new(0),
            last_used: AtomicU64::new(self.now_ms()),
        });
        let addr = key.addr;
        let ping_pong = connection.ping_pong();
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%addr, error = %e, "pooled HBONE connection ended");
            }
        });
        if let Some(ping_pong) = ping_pong {
            tokio::spawn(keepalive(addr, ping_pong, probe, closed, driver));
        }
        debug!(src = %key.src, dst = %key.dst, %addr, "new pooled HBONE connection");
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(pooled.clone());
        Ok(pooled)
    }

    /// Drops connections that closed or stayed idle past [`IDLE_TIMEOUT`]; dropping the last
    /// sender lets the connection shut down cleanly.
    pub fn sweep(&self) {
        let now = self.now_ms();
        let idle_ms = IDLE_TIMEOUT.as_millis() as u64;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for list in conns.values_mut() {
            list.retain(|c| {
                !c.closed.load(Relaxed)
                    && (c.active.load(Relaxed) > 0 || now.saturating_sub(c.last_used.load(Relaxed)) < idle_ms)
            });
        }
        conns.retain(|_, list| !list.is_empty());
        drop(conns);
        // A gate nobody holds or waits on.
        self.dialing.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, gate| Arc::strong_count(gate) > 1);
    }

    /// Closes every pooled connection without an open stream (a drain).
    pub fn close_idle(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for list in conns.values_mut() {
            list.retain(|c| c.active.load(Relaxed) > 0);
        }
        conns.retain(|_, list| !list.is_empty());
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Why a CONNECT gave no tunnel.
enum Failure {
    /// The connection failed before an answer: another connection may work.
    Transport(ProxyError),
    /// The destination answered with a refusal.
    Answered(ProxyError),
}

impl Failure {
    fn into_error(self) -> ProxyError {
        match self {
            Failure::Transport(e) | Failure::Answered(e) => e,
        }
    }
}

/// Keeps a pooled connection honest: pings it every [`KEEPALIVE`] and whenever `probe` asks,
/// and when a ping goes unanswered for [`PING_TIMEOUT`] takes it out of the pool and drops it,
/// so that its streams fail now and the next one dials afresh.
async fn keepalive(
    addr: SocketAddr,
    mut ping_pong: h2::PingPong,
    probe: Arc<tokio::sync::Notify>,
    closed: Arc<AtomicBool>,
    mut driver: tokio::task::JoinHandle<()>,
) {
    loop {
        tokio::select! {
            _ = &mut driver => break,
            () = tokio::time::sleep(KEEPALIVE) => {}
            () = probe.notified() => {}
        }
        if ping_pong.send_ping(h2::Ping::opaque()).is_err() {
            break;
        }
        let pong = std::future::poll_fn(|cx| ping_pong.poll_pong(cx));
        match tokio::time::timeout(PING_TIMEOUT, pong).await {
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => break,
            Err(_) => {
                warn!(%addr, timeout = ?PING_TIMEOUT, "HBONE peer does not answer pings; dropping the connection");
                driver.abort();
                break;
            }
        }
    }
    closed.store(true, Relaxed);
}

/// Sends the CONNECT request and waits for the answer; a slow answer makes the connection's
/// keepalive check it is alive (a dead peer fails the stream within seconds).
async fn open(
    sender: &mut SendRequest<Bytes>,
    request: Request<()>,
    slot: StreamSlot,
    probe: &tokio::sync::Notify,
) -> Result<Tunnel, Failure> {
    let transport = |e: h2::Error| Failure::Transport(ProxyError::Hbone(e.to_string()));
    let (response, send) = sender.send_request(request, false).map_err(transport)?;
    let mut response = std::pin::pin!(response);
    let answered = tokio::time::timeout(ANSWER_TIMEOUT, async {
        tokio::select! {
            answer = &mut response => answer,
            () = tokio::time::sleep(SLOW_ANSWER) => {
                probe.notify_one();
                response.await
            }
        }
    })
    .await;
    let response = match answered {
        Ok(answer) => answer.map_err(transport)?,
        Err(_) => {
            return Err(Failure::Transport(ProxyError::Hbone(format!(
                "no answer to CONNECT within {ANSWER_TIMEOUT:?}"
            ))));
        }
    };
    match response.status() {
        StatusCode::OK => Ok(Tunnel { send, recv: response.into_body(), slot }),
        StatusCode::UNAUTHORIZED => Err(Failure::Answered(ProxyError::Denied(
            "destination policy denied the connection (401)".into(),
        ))),
        StatusCode::SERVICE_UNAVAILABLE => Err(Failure::Answered(ProxyError::Hbone(
            "destination could not reach the application (503)".into(),
        ))),
        status => {
            warn!(%status, "HBONE CONNECT refused");
            Err(Failure::Answered(ProxyError::Hbone(format!("destination answered CONNECT with {status}"))))
        }
    }
}
