//! Same-node connections: both pods are served by this agent, so it is both ends of what
//! would be an HBONE tunnel to itself. It decides the connection exactly as the destination
//! side of HBONE does (the source identity is the one this agent would have presented: it
//! captured the connection in the source pod's own network namespace), connects to the
//! destination app from the destination pod's namespace, and relays without TLS: the bytes
//! never leave the node's kernel and this process, whose root could read them on either path.
//! Both access records (outbound for the source, inbound for the destination), both flow notes
//! and the metrics are the ones the HBONE path writes. `--same-node-hbone` turns this off.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Weak},
    time::Instant,
};

use tokio::net::TcpStream;

use super::{Leg, PodContext, Proxy, ProxyError, count, inbound::Admitted, relay};
use crate::{
    listener::reset,
    schema::Workload,
    telemetry::flows::{FlowVerdict, Note},
    telemetry::{ConnectionRecord, Direction, Security},
};

type ByAddress = std::sync::RwLock<std::collections::HashMap<IpAddr, Weak<PodContext>>>;

/// The pods this agent serves, by address, for the same-node path: only while their listeners
/// run (a pod whose capture stopped is closed to same-node traffic too, as to any other).
#[derive(Default)]
pub(crate) struct LocalPods(Arc<ByAddress>);

/// A pod's place in [`LocalPods`], removed when dropped (with the pod's listeners).
pub(crate) struct Served(Arc<ByAddress>, Weak<PodContext>, Vec<IpAddr>);

impl LocalPods {
    /// Records that `pod` is served here, until the returned entry is dropped.
    pub(crate) fn insert(&self, pod: &Arc<PodContext>) -> Served {
        let mut pods = self.0.write().unwrap_or_else(|e| e.into_inner());
        for ip in &pod.workload.ips {
            pods.insert(*ip, Arc::downgrade(pod));
        }
        Served(self.0.clone(), Arc::downgrade(pod), pod.workload.ips.clone())
    }

    /// The served pod that is `workload` (the same pod, not merely one at its address).
    fn get(&self, workload: &Workload) -> Option<Arc<PodContext>> {
        let pods = self.0.read().unwrap_or_else(|e| e.into_inner());
        let pod = workload.ips.iter().find_map(|ip| pods.get(ip)?.upgrade())?;
        (pod.workload.key == workload.key && pod.workload.uid == workload.uid).then_some(pod)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let mut pods = self.0.write().unwrap_or_else(|e| e.into_inner());
        for ip in &self.2 {
            // Only this pod's entry: the address may belong to a newer pod by now.
            if pods.get(ip).is_some_and(|p| Weak::ptr_eq(p, &self.1)) {
                pods.remove(ip);
            }
        }
    }
}

impl Proxy {
    /// The context of `workload` when this agent serves it and same-node connections are
    /// joined here.
    pub(super) fn local_destination(&self, workload: &Workload) -> Option<Arc<PodContext>> {
        if self.settings.same_node_hbone {
            return None;
        }
        self.local.get(workload)
    }

    /// Serves a connection from `src` (captured on its outbound listener from client port
    /// `port`) to `dst` on `dst_pod`, also served here, decided on `cluster`, the snapshot the
    /// destination was found in. `record` is the outbound record.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn same_node(
        &self,
        cluster: &crate::state::Cluster,
        src: &PodContext,
        dst_pod: &PodContext,
        client: TcpStream,
        port: u16,
        dst: SocketAddr,
        record: &mut ConnectionRecord,
    ) -> Result<(), ProxyError> {
        let start = Instant::now();
        // The source's address on the pod network, as an HBONE connection from it would have.
        // Without one of that family there is nothing its ipBlocks rules could be judged by:
        // refused (outbound listeners only exist for the families a pod has, so this is a bug).
        let Some(source_ip) = src.workload.ips.iter().copied().find(|ip| ip.is_ipv4() == dst.is_ipv4())
        else {
            reset(client);
            return Err(ProxyError::Denied(format!("the source pod has no address of {dst}'s family")));
        };
        dst_pod.stats.inbound.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        record.security = Security::MutualTls;
        record.dst_identity = Some(dst_pod.identity.clone());
        let mut inbound = ConnectionRecord::new(Direction::Inbound);
        inbound.security = Security::MutualTls;
        inbound.src_addr = Some(SocketAddr::new(source_ip, port));
        inbound.src_identity = Some(src.identity.clone());
        inbound.src_workload = Some(src.workload.clone());
        inbound.dst_workload = Some(dst_pod.workload.clone());
        inbound.dst_identity = Some(dst_pod.identity.clone());
        inbound.dst_addr = Some(dst);
        let service = record.dst_service.clone();
        let outbound_note = |verdict, reason: Option<String>| Note {
            security: Security::MutualTls,
            peer: Some(dst),
            service: service.clone(),
            src_identity: Some(src.identity.to_string()),
            dst_identity: Some(dst_pod.identity.to_string()),
            verdict,
            policy: None,
            reason,
            audit: Vec::new(),
        };
        let result = async {
            // As a CONNECT to one of the agent's own ports is refused: it would loop into them.
            if super::inbound::is_reserved(dst.port()) {
                reset(client);
                return Err(ProxyError::ReservedPort(dst.port()));
            }
            let source = SocketAddr::new(source_ip, port);
            let admitted =
                match self.admit_mtls(cluster, dst_pod, &src.identity, source, dst, Leg::AppInside, &mut inbound).await {
                    Ok(admitted) => admitted,
                    Err(e) => {
                        reset(client);
                        return Err(e);
                    }
                };
            let Admitted { upstream, registration: _registration, revoked } = admitted;
            self.settings.flows.note(src.cookie, port, outbound_note(FlowVerdict::Allowed, None));
            record.mark_opened(&self.settings.metrics);
            let moved = tokio::select! {
                moved = relay::tcp_to_tcp(client, upstream) => moved.map_err(ProxyError::Relay)?,
                Ok(reason) = revoked => return Err(ProxyError::Denied(format!("closed by a policy change: {reason}"))),
            };
            for r in [&mut *record, &mut inbound] {
                r.bytes_sent = moved.sent;
                r.bytes_received = moved.received;
            }
            Ok(())
        }
        .await;
        if let Err(e) = &result
            && !record.opened
        {
            let verdict = FlowVerdict::of_error(e);
            self.settings.flows.note(src.cookie, port, outbound_note(verdict, Some(e.to_string())));
        }
        count(dst_pod, inbound.bytes_received, inbound.bytes_sent, result.is_err());
        // The destination's record, as its HBONE side would have written it; the caller
        // finishes the source's.
        inbound.finish(start, result.as_ref().err(), &self.settings.metrics);
        result
    }
}
