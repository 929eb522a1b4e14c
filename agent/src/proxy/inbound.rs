//! Inbound: HBONE streams on `15008` (mutual TLS, verified peer identity) and plaintext
//! connections steered to `15006` (refused under STRICT).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ambit_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, info_span, warn};

use super::tracker::Registration;
use super::{
    DATA_PLANE, HBONE, Leg, PodContext, Proxy, ProxyError, accept_loop, connect_app, count,
    hbone::{CERT_WAIT, CONNECTION_WINDOW, MAX_FRAME, MAX_STREAMS, STREAM_WINDOW},
    keep_alive, local_of, relay,
};
use crate::{
    identity::{Identity, spiffe_id_of},
    listener::reset,
    policy::{ConnectionInput, InboundDecision, Verdict},
    schema::Workload,
    state::Cluster,
    telemetry::flows::{FlowRecord, FlowVerdict, Mesh, Note},
    telemetry::{ConnectionRecord, Direction, Security},
};

/// How long a client may take to complete the TLS handshake, and then to start HTTP/2.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Handshakes in progress per pod at most.
const MAX_PENDING_HANDSHAKES: usize = 128;
/// A CONNECT carries a few short headers; h2's default would accept 16 MiB.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// A connection with no stream is closed after this long: twice as long as the client side
/// keeps an idle pooled connection ([`super::hbone::IDLE_TIMEOUT`]).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl Proxy {
    /// Accepts plaintext connections `sk_lookup` steered to the pod, until aborted.
    pub async fn serve_inbound(self: Arc<Self>, pod: Arc<PodContext>, listener: TcpListener) {
        accept_loop(listener, "inbound", DATA_PLANE, |client, peer| {
            pod.stats.inbound.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let span = info_span!("inbound", pod = %pod.workload.key, src = %peer);
            self.clone().inbound_plaintext(pod.clone(), client, peer).instrument(span)
        })
        .await;
    }

    async fn inbound_plaintext(self: Arc<Self>, pod: Arc<PodContext>, client: TcpStream, peer: SocketAddr) {
        let _active = super::Active::new(&self.active);
        let start = Instant::now();
        let mut record = ConnectionRecord::new(Direction::Inbound);
        record.src_addr = Some(peer);
        let cluster = self.cluster();
        record.src_workload = cluster.workload_by_ip(peer.ip()).cloned();
        record.dst_workload = Some(pod.workload.clone());
        record.dst_identity = Some(pod.identity.clone());
        let result = async {
            // With sk_lookup the accepted socket keeps the address the client asked for.
            let dst = local_of(&client).map_err(ProxyError::Relay)?;
            record.dst_addr = Some(dst);
            if is_reserved(dst.port()) {
                return Err(ProxyError::ReservedPort(dst.port()));
            }
            // Kubelet probes: opened by a socket of the node's own network namespace, as the
            // kernel recorded at connect(). Istio's ambient mode lets them bypass the mesh, and
            // so does ambit, or STRICT would fail every health check. Traffic merely forwarded
            // by the node (NodePort), even from the node's address, has no such record.
            let (verdict, tracked) = if self.kernel.take_host_connection(peer, dst) {
                let reason = "opened from the node's own network namespace (health probe): exempt from mesh policy";
                let verdict = Verdict { allowed: true, policy: None, reason: reason.into(), audit: Vec::new() };
                record.authorization = Some(verdict.clone());
                (verdict, None)
            } else {
                // Plaintext has no verified identity: only address and port rules can match it.
                let input =
                    ConnectionInput { principal: None, namespace: None, source_ip: peer.ip(), destination: dst };
                let decision = self.decide_inbound(&cluster, &pod.workload, &input);
                record.mtls_decided_by = decision.mtls().map(|m| m.decided_by.clone());
                record.authorization = decision.verdict().cloned();
                let verdict = match decision {
                    InboundDecision::Authorized { verdict, .. } if verdict.allowed => verdict,
                    refused => {
                        reset(client);
                        self.flow_refused(&pod, peer, None, dst, &refused);
                        return Err(ProxyError::Denied(refused.reason()));
                    }
                };
                // Re-checked when policies change; probes are outside policy.
                (verdict, Some(self.tracker.register(pod.workload.key.clone(), input, &cluster, &self.settings.root_namespace)))
            };
            let (_registration, revoked) = tracked.unzip();
            let from = pod.deliver_from_client.then_some(peer.ip());
            let upstream = Box::pin(connect_app(&*pod.sockets, dst, Leg::App, from)).await?;
            record.mark_opened(&self.settings.metrics);
            self.note_delivery(&pod, &upstream, Note {
                security: Security::Plaintext,
                peer: Some(peer),
                dst_identity: Some(pod.identity.to_string()),
                verdict: FlowVerdict::Allowed,
                policy: verdict.policy,
                reason: Some(verdict.reason),
                audit: verdict.audit,
                ..Note::default()
            });
            let revoked = async {
                match revoked {
                    Some(revoked) => revoked.await.ok(),
                    None => std::future::pending().await,
                }
            };
            let moved = tokio::select! {
                moved = relay::tcp_to_tcp(client, upstream) => moved.map_err(ProxyError::Relay)?,
                Some(reason) = revoked => return Err(ProxyError::Denied(format!("closed by a policy change: {reason}"))),
            };
            record.bytes_sent = moved.sent;
            record.bytes_received = moved.received;
            Ok(())
        }
        .await;
        count(&pod, record.bytes_received, record.bytes_sent, result.is_err());
        record.finish(start, result.err(), &self.settings.metrics);
    }

    /// Accepts HBONE connections to the pod, until aborted.
    pub async fn serve_hbone(self: Arc<Self>, pod: Arc<PodContext>, listener: TcpListener) {
        let acceptor = TlsAcceptor::from(pod.server_tls.clone());
        let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        accept_loop(listener, "hbone", HBONE, |tcp, peer| {
            let span = info_span!("hbone", pod = %pod.workload.key, peer = %peer);
            let handshake = handshakes.clone().try_acquire_owned().ok();
            self.clone()
                .hbone_connection(pod.clone(), acceptor.clone(), tcp, peer, handshake)
                .instrument(span)
        })
        .await;
    }

    async fn hbone_connection(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        acceptor: TlsAcceptor,
        tcp: TcpStream,
        peer: SocketAddr,
        handshake: Option<OwnedSemaphorePermit>,
    ) {
        // Handshakes cost CPU and memory before the peer proved anything: bounded, and one
        // over the bound is refused at once rather than queued.
        let Some(handshake) = handshake else {
            debug!(%peer, "too many HBONE handshakes in progress; refused");
            reset(tcp);
            return;
        };
        let Ok(local) = local_of(&tcp) else { return };
        let _ = tcp.set_nodelay(true);
        keep_alive(&tcp);
        // The pod's first certificate may still be on its way from the CA service.
        if let Err(e) = self.identities.wait(&pod.identity, CERT_WAIT).await {
            warn!(pod = %pod.workload.key, %peer, error = %e, "no certificate to answer an mTLS handshake with; refused");
            pod.stats.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            reset(tcp);
            return;
        }
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                warn!(pod = %pod.workload.key, %peer, error = %crate::error_chain(&e), "mTLS handshake refused");
                pod.stats.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            Err(_) => {
                warn!(pod = %pod.workload.key, %peer, "mTLS handshake timed out");
                return;
            }
        };
        // The verifier accepted exactly one SPIFFE ID in our trust domain; read it back.
        let peer_identity =
            match tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(spiffe_id_of) {
                Some(Ok(id)) => id,
                _ => return,
            };
        let handshaken = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_STREAMS as u32)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(relay::MAX_CHUNK)
            .handshake::<_, Bytes>(tls);
        // A client that completes TLS must speak HTTP/2 at once.
        let mut connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshaken).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                warn!(pod = %pod.workload.key, %peer, "no HTTP/2 preface after the TLS handshake; closed");
                return;
            }
        };
        drop(handshake);
        let peer_identity = Arc::new(peer_identity);
        let streams = Arc::new(());
        let mut draining = self.draining.subscribe();
        let mut told = false;
        loop {
            // Draining: no new streams here (HTTP/2 GOAWAY); the open ones finish.
            if !told && *draining.borrow_and_update() {
                connection.graceful_shutdown();
                told = true;
            }
            // No stream open: the connection may idle only so long (longer than the client
            // side keeps an idle pooled connection, so that it is the client that closes).
            let idle = if Arc::strong_count(&streams) == 1 { IDLE_TIMEOUT } else { Duration::MAX };
            let next = tokio::select! {
                next = connection.accept() => next,
                () = tokio::time::sleep(idle) => {
                    debug!(%peer, "idle HBONE connection closed");
                    connection.graceful_shutdown();
                    break;
                }
                _ = draining.changed(), if !told => continue,
            };
            match next {
                Some(Ok((request, respond))) => {
                    let this = self.clone();
                    let (pod, id, open) = (pod.clone(), peer_identity.clone(), streams.clone());
                    let stream = async move {
                        this.hbone_stream(pod, request, respond, peer, local, id).await;
                        drop(open);
                    };
                    tokio::spawn(stream.in_current_span());
                }
                Some(Err(e)) => {
                    debug!(%peer, error = %e, "HBONE connection error");
                    break;
                }
                None => break,
            }
        }
        // Keep driving the connection until its last stream is done.
        let _ = std::future::poll_fn(|cx| connection.poll_closed(cx)).await;
    }

    async fn hbone_stream(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: SocketAddr,
        local: SocketAddr,
        peer_identity: Arc<Identity>,
    ) {
        let _active = super::Active::new(&self.active);
        let start = Instant::now();
        pod.stats.inbound.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut record = ConnectionRecord::new(Direction::Inbound);
        record.security = Security::MutualTls;
        record.src_addr = Some(peer);
        record.src_identity = Some((*peer_identity).clone());
        // One snapshot for the whole decision.
        let cluster = self.cluster();
        record.src_workload = cluster.workload_by_ip(peer.ip()).cloned();
        record.dst_workload = Some(pod.workload.clone());
        record.dst_identity = Some(pod.identity.clone());
        record.hbone_addr = Some(local);
        record.peer_baggage =
            request.headers().get("baggage").and_then(|v| crate::telemetry::peer_baggage(v.as_bytes()));
        let result = async {
            let dst = match connect_target(&request, local) {
                Ok(dst) => dst,
                Err(message) => {
                    answer(&mut respond, StatusCode::BAD_REQUEST);
                    return Err(ProxyError::Hbone(message));
                }
            };
            record.dst_addr = Some(dst);
            // Identity comes from the verified certificate only, never from request headers.
            let admitted = match self.admit_mtls(&cluster, &pod, &peer_identity, peer, dst, Leg::App, &mut record).await {
                Ok(admitted) => admitted,
                Err(e) => {
                    let status = match e {
                        ProxyError::Denied(_) => StatusCode::UNAUTHORIZED,
                        _ => StatusCode::SERVICE_UNAVAILABLE,
                    };
                    answer(&mut respond, status);
                    return Err(e);
                }
            };
            let Admitted { upstream, registration: _registration, revoked } = admitted;
            let response =
                Response::builder().status(StatusCode::OK).body(()).map_err(|e| ProxyError::Hbone(e.to_string()))?;
            let send = respond.send_response(response, false).map_err(|e| ProxyError::Hbone(e.to_string()))?;
            let moved = tokio::select! {
                moved = relay::tcp_to_h2(upstream, send, request.into_body()) => moved.map_err(ProxyError::Relay)?,
                Ok(reason) = revoked => return Err(ProxyError::Denied(format!("closed by a policy change: {reason}"))),
            };
            // Seen from the pod: what the app sent is what went back to the client.
            record.bytes_sent = moved.received;
            record.bytes_received = moved.sent;
            Ok(())
        }
        .await;
        count(&pod, record.bytes_received, record.bytes_sent, result.is_err());
        record.finish(start, result.err(), &self.settings.metrics);
    }
}

/// A mutual-TLS connection the destination admitted: the connection to its app, and the
/// registration that re-checks it when policies change (closed when `revoked` fires).
pub(super) struct Admitted {
    pub(super) upstream: TcpStream,
    pub(super) registration: Registration,
    pub(super) revoked: oneshot::Receiver<String>,
}

impl Proxy {
    /// The destination side of a mutual-TLS connection from `identity` at `source` to `dst` on
    /// `pod`, decided on `cluster`: the decision (into `record`), a denial's flow note, the
    /// registration for re-checks, the connection to the app (a `leg` of its kind) and its
    /// flow note. HBONE and the same-node path both come through here, so they cannot decide
    /// differently. On `Err` the caller answers its client: `Denied`, or the app unreachable.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn admit_mtls(
        &self,
        cluster: &Cluster,
        pod: &PodContext,
        identity: &Identity,
        source: SocketAddr,
        dst: SocketAddr,
        leg: Leg,
        record: &mut ConnectionRecord,
    ) -> Result<Admitted, ProxyError> {
        let input = ConnectionInput {
            principal: Some(identity.principal()),
            namespace: Some(identity.namespace.clone()),
            source_ip: source.ip(),
            destination: dst,
        };
        let decision = self.decide_inbound(cluster, &pod.workload, &input);
        record.authorization = decision.verdict().cloned();
        let verdict = match decision {
            InboundDecision::Authorized { verdict, .. } if verdict.allowed => verdict,
            refused => {
                self.flow_refused(pod, source, Some(identity), dst, &refused);
                return Err(ProxyError::Denied(refused.reason()));
            }
        };
        let (registration, revoked) =
            self.tracker.register(pod.workload.key.clone(), input, cluster, &self.settings.root_namespace);
        let from = pod.deliver_from_client.then_some(source.ip());
        let upstream = Box::pin(connect_app(&*pod.sockets, dst, leg, from)).await?;
        record.mark_opened(&self.settings.metrics);
        self.note_delivery(
            pod,
            &upstream,
            Note {
                security: Security::MutualTls,
                peer: Some(source),
                src_identity: Some(identity.to_string()),
                dst_identity: Some(pod.identity.to_string()),
                verdict: FlowVerdict::Allowed,
                policy: verdict.policy,
                reason: Some(verdict.reason),
                audit: verdict.audit,
                ..Note::default()
            },
        );
        Ok(Admitted { upstream, registration, revoked })
    }

    /// The destination's decision on an inbound connection, counted in the flow history that
    /// `ambit check --what-if` replays.
    fn decide_inbound(
        &self,
        cluster: &Cluster,
        workload: &Workload,
        input: &ConnectionInput,
    ) -> InboundDecision {
        let decision = cluster.decide_inbound(workload, input, &self.settings.root_namespace);
        self.settings.history.record(&workload.key, input, decision.outcome());
        decision
    }

    /// Tells the flow table who is really behind the agent's connection to the app.
    pub(super) fn note_delivery(&self, pod: &PodContext, upstream: &TcpStream, note: Note) {
        if let Ok(local) = upstream.local_addr() {
            self.settings.flows.note(pod.cookie, local.port(), note);
        }
    }

    /// Records a connection `decision` stopped before it reached the app (no app socket to
    /// trace).
    pub(super) fn flow_refused(
        &self,
        pod: &PodContext,
        src: SocketAddr,
        src_identity: Option<&Identity>,
        dst: SocketAddr,
        decision: &InboundDecision,
    ) {
        let cluster = self.cluster();
        let flows = &self.settings.flows;
        let mut src_peer = flows.peer(&cluster, Some(src.ip()), src.port());
        if let Some(id) = src_identity {
            src_peer.identity = Some(id.to_string());
        }
        let mut dst_peer = flows.peer(&cluster, Some(dst.ip()), dst.port());
        dst_peer.identity = Some(pod.identity.to_string());
        flows.refused(FlowRecord {
            direction: Direction::Inbound,
            src: src_peer,
            dst: dst_peer,
            security: Security::of(src_identity),
            mesh: Mesh::Enrolled,
            verdict: decision.outcome().into(),
            policy: match decision {
                InboundDecision::Strict(mtls) => Some(mtls.decided_by.clone()),
                InboundDecision::Authorized { verdict, .. } => verdict.policy.clone(),
            },
            reason: Some(decision.reason()),
            audit: decision.verdict().map(|v| v.audit.clone()).unwrap_or_default(),
            end: Some(decision.outcome().into()),
            netns_cookie: pod.cookie,
            ..FlowRecord::default()
        });
    }
}

/// The original destination of a CONNECT request, which must be a port of the very address the
/// HBONE connection arrived on: a peer cannot use one pod's tunnel to reach another address.
fn connect_target(request: &Request<h2::RecvStream>, local: SocketAddr) -> Result<SocketAddr, String> {
    if request.method() != Method::CONNECT {
        return Err(format!("{} is not CONNECT", request.method()));
    }
    connect_authority(request.uri().authority().map(|a| a.as_str()).unwrap_or_default(), local)
}

/// The destination a CONNECT `authority` names, if it is allowed through a tunnel that arrived on
/// `local`: [`connect_target`] without the request around it (what the fuzz target drives).
pub(crate) fn connect_authority(authority: &str, local: SocketAddr) -> Result<SocketAddr, String> {
    let dst: SocketAddr =
        authority.parse().map_err(|_| format!("CONNECT authority {authority:?} is not ip:port"))?;
    if dst.ip() != local.ip() {
        return Err(format!(
            "CONNECT authority {dst} is not the address the connection arrived on ({})",
            local.ip()
        ));
    }
    if is_reserved(dst.port()) {
        return Err(format!("CONNECT to the agent's own port {}", dst.port()));
    }
    Ok(dst)
}

pub(super) fn is_reserved(port: u16) -> bool {
    [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&port)
}

fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    if let Ok(response) = Response::builder().status(status).body(()) {
        let _ = respond.send_response(response, true);
    }
}
