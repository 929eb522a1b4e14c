//! Outbound: connections the pod's applications opened, captured to `15001`.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use ambit_common::HBONE_PORT;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument as _, info_span};

use super::{
    DATA_PLANE, PodContext, Proxy, ProxyError, accept_loop, connect_from, count, hbone::PoolKey, relay,
};
use crate::{
    identity::Identity,
    listener::reset,
    telemetry::flows::{FlowVerdict, Note},
    telemetry::{ConnectionRecord, Direction, Security},
};

impl Proxy {
    /// Accepts the pod's captured outbound connections until aborted.
    pub async fn serve_outbound(self: Arc<Self>, pod: Arc<PodContext>, listener: TcpListener) {
        accept_loop(listener, "outbound", DATA_PLANE, |client, peer| {
            pod.stats.outbound.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let span = info_span!("outbound", pod = %pod.workload.key, client_port = peer.port());
            self.clone().outbound(pod.clone(), client, peer).instrument(span)
        })
        .await;
    }

    async fn outbound(self: Arc<Self>, pod: Arc<PodContext>, client: TcpStream, peer: SocketAddr) {
        let _active = super::Active::new(&self.active);
        let start = Instant::now();
        let mut record = ConnectionRecord::new(Direction::Outbound);
        record.src_workload = Some(pod.workload.clone());
        record.src_identity = Some(pod.identity.clone());
        let result = self.forward(&pod, client, peer, &mut record).await;
        count(&pod, record.bytes_sent, record.bytes_received, result.is_err());
        record.finish(start, result.err(), &self.settings.metrics);
    }

    async fn forward(
        &self,
        pod: &PodContext,
        client: TcpStream,
        peer: SocketAddr,
        record: &mut ConnectionRecord,
    ) -> Result<(), ProxyError> {
        let dst = self
            .kernel
            .take_original_destination(pod.cookie, peer.port())
            .ok_or(ProxyError::NoOriginalDestination(peer.port()))?;
        let cluster = self.cluster();
        // A Service's virtual address: one of its endpoints, in turn.
        let dst = match cluster.services_index.get(dst) {
            Some(backends) => {
                record.dst_service = Some(backends.service.clone());
                match backends.pick() {
                    Some(endpoint) => endpoint,
                    None => {
                        let e = ProxyError::NoEndpoint(backends.service.clone());
                        self.settings.flows.note(
                            pod.cookie,
                            peer.port(),
                            Note {
                                security: Security::Plaintext,
                                verdict: FlowVerdict::Error,
                                reason: Some(e.to_string()),
                                service: Some(backends.service.clone()),
                                ..Note::default()
                            },
                        );
                        reset(client);
                        return Err(e);
                    }
                }
            }
            None => dst,
        };
        record.dst_addr = Some(dst);
        if let Some(claimants) = cluster.ip_claimants(dst.ip()) {
            let pods = claimants.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            let e = ProxyError::AmbiguousAddress { addr: dst, pods };
            let note = Note {
                security: Security::Plaintext,
                verdict: FlowVerdict::Error,
                reason: Some(e.to_string()),
                ..Note::default()
            };
            self.settings.flows.note(pod.cookie, peer.port(), note);
            reset(client);
            return Err(e);
        }
        let dst_workload = cluster.workload_by_ip(dst.ip()).cloned();
        record.dst_workload = dst_workload.clone();

        match dst_workload.filter(|w| w.enrollment.is_enrolled()) {
            Some(dst_workload) if let Some(local) = self.local_destination(&dst_workload) => {
                self.same_node(&cluster, pod, &local, client, peer.port(), dst, record).await?;
            }
            Some(dst_workload) => {
                // In the mesh: mutual TLS to the destination pod's HBONE port, which must present
                // the destination workload's identity.
                let dst_identity = Identity::new(
                    self.trust_domain(),
                    &dst_workload.key.namespace,
                    &dst_workload.service_account,
                );
                let key = PoolKey {
                    src: pod.identity.clone(),
                    dst: dst_identity.clone(),
                    addr: SocketAddr::new(dst.ip(), HBONE_PORT),
                };
                record.security = Security::MutualTls;
                record.dst_identity = Some(dst_identity);
                record.hbone_addr = Some(key.addr);
                let note = |verdict, reason: Option<String>| Note {
                    security: Security::MutualTls,
                    peer: Some(dst),
                    service: record.dst_service.clone(),
                    src_identity: Some(pod.identity.to_string()),
                    dst_identity: Some(key.dst.to_string()),
                    verdict,
                    policy: None,
                    reason,
                    audit: Vec::new(),
                };
                // Boxed: opening a tunnel may take a TLS and an HTTP/2 handshake, whose state
                // would otherwise stay in every connection's task for its whole life.
                let tunnel = match Box::pin(self.pool.connect(&*pod.sockets, &key, dst, &pod.baggage)).await {
                    Ok(tunnel) => tunnel,
                    Err(e) => {
                        let verdict = FlowVerdict::of_error(&e);
                        self.settings.flows.note(pod.cookie, peer.port(), note(verdict, Some(e.to_string())));
                        // The application learns at once, as from a refusing server.
                        reset(client);
                        return Err(e);
                    }
                };
                self.settings.flows.note(pod.cookie, peer.port(), note(FlowVerdict::Allowed, None));
                record.mark_opened(&self.settings.metrics);
                let moved =
                    relay::tcp_to_h2(client, tunnel.send, tunnel.recv).await.map_err(ProxyError::Relay)?;
                drop(tunnel.slot);
                record.bytes_sent = moved.sent;
                record.bytes_received = moved.received;
            }
            None => {
                // Not in the mesh: plaintext passthrough, as ztunnel does.
                let note = |verdict, reason: String| Note {
                    security: Security::Plaintext,
                    peer: Some(dst),
                    service: record.dst_service.clone(),
                    verdict,
                    reason: Some(reason),
                    ..Note::default()
                };
                let upstream = match connect_from(&*pod.sockets, dst).await {
                    Ok(upstream) => upstream,
                    Err(e) => {
                        self.settings.flows.note(
                            pod.cookie,
                            peer.port(),
                            note(FlowVerdict::Error, e.to_string()),
                        );
                        reset(client);
                        return Err(e);
                    }
                };
                let why = "the destination is not in the mesh: plaintext passthrough".to_owned();
                self.settings.flows.note(pod.cookie, peer.port(), note(FlowVerdict::Allowed, why));
                record.mark_opened(&self.settings.metrics);
                record.src_addr = upstream.local_addr().ok();
                let moved = relay::tcp_to_tcp(client, upstream).await.map_err(ProxyError::Relay)?;
                record.bytes_sent = moved.sent;
                record.bytes_received = moved.received;
            }
        }
        Ok(())
    }
}
