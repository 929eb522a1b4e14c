//! Logs and connection records: the agent's own log (text, or JSON lines with
//! `LOG_FORMAT=json`), and one structured `connection complete` access-log event per proxied
//! connection, with Istio's field names.

pub mod flows;
pub mod graph;
pub mod history;
pub mod metrics;
mod writer;

use std::{io::IsTerminal as _, net::SocketAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tracing::info;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::{identity::Identity, schema::Workload};

/// Keeps the log writer thread running; logs still buffered are written when it is dropped.
pub type LogGuard = writer::Flush;

/// Sets up logging: `RUST_LOG` filters (default `info`), `LOG_FORMAT=json` selects JSON lines;
/// colours only when stdout is a terminal (`kubectl logs` shows no escape codes). Lines are
/// written in batches by a thread of their own (see [`writer`]): a slow stdout never stalls a
/// proxy, and when the buffer is full loggers wait rather than drop records.
pub fn init_logging() -> std::io::Result<LogGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let colour = std::io::stdout().is_terminal();
    let (writer, guard) = writer::BatchWriter::new(std::io::stdout())?;
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .init();
    } else {
        registry.with(fmt::layer().with_target(true).with_ansi(colour).with_writer(writer)).init();
    }
    Ok(guard)
}

/// Which way a connection goes, seen from the pod the agent serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Opened by the pod.
    #[default]
    Outbound,
    /// Opened towards the pod.
    Inbound,
}

impl Direction {
    /// As access logs and flow records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// How a connection was protected on the wire, in Istio's words
/// (`connection_security_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Plaintext (outside the mesh, or let in by PERMISSIVE).
    #[default]
    Plaintext,
    /// HBONE over mutual TLS.
    MutualTls,
}

impl Security {
    /// As access logs and flow records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::MutualTls => "mutual_tls",
        }
    }

    /// Mutual TLS when the peer proved an identity, else plaintext.
    pub fn of<T>(identity: Option<T>) -> Self {
        if identity.is_some() { Self::MutualTls } else { Self::Plaintext }
    }
}

/// The error a failed connection ended with, as the records classify it.
pub trait ConnectionError: std::error::Error {
    /// Whether a policy stopped the connection (Istio's `DENIED` response flag, the `denied`
    /// verdict of flow records).
    fn denied(&self) -> bool;
}

impl<T: ConnectionError> ConnectionError for &T {
    fn denied(&self) -> bool {
        (**self).denied()
    }
}

/// What the agent knows about one connection when it ends.
#[derive(Debug)]
pub struct ConnectionRecord {
    /// Direction.
    pub direction: Direction,
    /// Protection on the wire.
    pub security: Security,
    /// Source address.
    pub src_addr: Option<SocketAddr>,
    /// Original destination.
    pub dst_addr: Option<SocketAddr>,
    /// The HBONE address the connection went through.
    pub hbone_addr: Option<SocketAddr>,
    /// Source pod, when known.
    pub src_workload: Option<Arc<Workload>>,
    /// Destination pod, when known.
    pub dst_workload: Option<Arc<Workload>>,
    /// The Service the source addressed, if it used a Service's virtual address.
    pub dst_service: Option<String>,
    /// Source identity: verified from its certificate (inbound) or our own (outbound).
    pub src_identity: Option<Identity>,
    /// Destination identity the source required.
    pub dst_identity: Option<Identity>,
    /// The PeerAuthentication that decided about a plaintext connection.
    pub mtls_decided_by: Option<String>,
    /// The AuthorizationPolicy decision.
    pub authorization: Option<crate::policy::Verdict>,
    /// Bytes from the client to the server.
    pub bytes_sent: u64,
    /// Bytes from the server to the client.
    pub bytes_received: u64,
    /// How long it lasted.
    pub duration: Duration,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Whether a policy stopped it.
    pub denied: bool,
    /// Whether it reached its destination (counted as opened).
    pub opened: bool,
    /// The peer's own account of its workload (HBONE `baggage`): telemetry, never trusted.
    pub peer_baggage: Option<String>,
    /// Its metric labels, made when it opened and reused when it closes.
    metric_labels: Option<metrics::TcpLabels>,
}

impl ConnectionRecord {
    /// An empty record.
    pub fn new(direction: Direction) -> Self {
        Self {
            direction,
            security: Security::Plaintext,
            src_addr: None,
            dst_addr: None,
            hbone_addr: None,
            src_workload: None,
            dst_workload: None,
            dst_service: None,
            src_identity: None,
            dst_identity: None,
            mtls_decided_by: None,
            authorization: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration: Duration::ZERO,
            error: None,
            denied: false,
            opened: false,
            peer_baggage: None,
            metric_labels: None,
        }
    }

    /// The connection reached its destination: count it as opened.
    pub fn mark_opened(&mut self, metrics: &metrics::Metrics) {
        self.opened = true;
        self.metric_labels = Some(metrics.opened(self));
    }

    /// Completes the record, counts it and logs it.
    pub fn finish(
        mut self,
        start: std::time::Instant,
        error: Option<impl ConnectionError>,
        metrics: &metrics::Metrics,
    ) {
        self.duration = start.elapsed();
        self.denied = error.as_ref().is_some_and(ConnectionError::denied);
        self.error = error.map(|e| crate::error_chain(&e));
        metrics.closed(&mut self);
        self.log();
    }

    /// Emits the access-log event (target `access`, Istio's field names).
    pub fn log(&self) {
        // Borrowed and displayed in place: no string is built for a record but the line itself.
        let addr = |a: Option<SocketAddr>| a.map(tracing::field::display);
        fn name(w: &Option<Arc<Workload>>) -> Option<&str> {
            w.as_deref().map(|w| w.key.name.as_str())
        }
        fn ns(w: &Option<Arc<Workload>>) -> Option<&str> {
            w.as_deref().map(|w| w.key.namespace.as_str())
        }
        fn id(i: &Option<Identity>) -> Option<tracing::field::DisplayValue<&Identity>> {
            i.as_ref().map(tracing::field::display)
        }
        info!(
            target: "access",
            direction = self.direction.as_str(),
            security = self.security.as_str(),
            src.addr = addr(self.src_addr),
            src.workload = name(&self.src_workload),
            src.namespace = ns(&self.src_workload),
            src.identity = id(&self.src_identity),
            dst.addr = addr(self.dst_addr),
            dst.hbone_addr = addr(self.hbone_addr),
            dst.service = self.dst_service.as_deref(),
            dst.workload = name(&self.dst_workload),
            dst.namespace = ns(&self.dst_workload),
            dst.identity = id(&self.dst_identity),
            mtls.decided_by = self.mtls_decided_by.as_deref(),
            authz.verdict = self.authorization.as_ref().map(|v| if v.allowed { "allowed" } else { "denied" }),
            authz.policy = self.authorization.as_ref().and_then(|v| v.policy.as_deref()),
            authz.reason = self.authorization.as_ref().map(|v| v.reason.as_str()),
            authz.audit = self.authorization.as_ref().filter(|v| !v.audit.is_empty()).map(|v| v.audit.join(",")),
            bytes_sent = self.bytes_sent,
            bytes_recv = self.bytes_received,
            duration_ms = self.duration.as_millis() as u64,
            error = self.error.as_deref(),
            peer.baggage = self.peer_baggage.as_deref(),
            "connection complete"
        );
    }
}

/// The longest `baggage` value kept from a peer.
const MAX_BAGGAGE: usize = 512;

/// The `baggage` header ambit sends on an HBONE CONNECT, as ztunnel does (W3C baggage with
/// OpenTelemetry's Kubernetes keys), so that the peer's telemetry names the source workload:
/// namespace, workload (the `app` label's Deployment-style name, else the pod), canonical
/// service and revision (Istio's label precedence).
pub fn baggage(workload: &Workload) -> String {
    // Kubernetes names and label values are plain ASCII; a hand-written cluster file may hold
    // anything, and one bad byte must not fail the connection.
    let clean = |v: &str| -> String {
        v.chars().filter(|c| c.is_ascii_graphic() && !matches!(c, ',' | ';' | '=' | '"' | '\\')).collect()
    };
    let workload_name = match workload.labels.get("app") {
        Some(app) => format!("k8s.deployment.name={}", clean(app)),
        None => format!("k8s.pod.name={}", clean(&workload.key.name)),
    };
    let service = clean(canonical_service(workload));
    let version = clean(canonical_revision(workload));
    [
        format!("k8s.namespace.name={}", clean(&workload.key.namespace)),
        workload_name,
        format!("service.name={service}"),
        format!("service.version={version}"),
    ]
    .join(",")
}

/// Istio's canonical service of a workload: its first label of `service.istio.io/canonical-name`,
/// `app.kubernetes.io/name`, `app`, else the pod's name. Telemetry (baggage, metrics) groups by it.
pub fn canonical_service(workload: &Workload) -> &str {
    ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| workload.labels.get(*k))
        .map_or(workload.key.name.as_str(), String::as_str)
}

/// Istio's canonical revision: `service.istio.io/canonical-revision`, `app.kubernetes.io/version`,
/// `version`, else `latest`.
pub fn canonical_revision(workload: &Workload) -> &str {
    ["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]
        .iter()
        .find_map(|k| workload.labels.get(*k))
        .map_or("latest", String::as_str)
}

/// A peer's `baggage`, kept for the access log: printable, and short.
pub fn peer_baggage(value: &[u8]) -> Option<String> {
    let text: String =
        String::from_utf8_lossy(value).chars().filter(|c| !c.is_control()).take(MAX_BAGGAGE).collect();
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Enrollment, ObjectKey};

    fn pod(labels: &[(&str, &str)]) -> Workload {
        Workload {
            key: ObjectKey { namespace: "shop".into(), name: "web-7d4".into() },
            uid: String::new(),
            node: None,
            service_account: "web".into(),
            ips: Vec::new(),
            netns: None,
            enrollment: Enrollment::Ambient,
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            named_ports: Default::default(),
            namespace_decides: false,
        }
    }

    #[test]
    fn baggage_names_the_workload_as_ztunnel_reads_it() {
        assert_eq!(
            baggage(&pod(&[("app", "web"), ("version", "v2")])),
            "k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web,service.version=v2"
        );
        assert_eq!(
            baggage(&pod(&[])),
            "k8s.namespace.name=shop,k8s.pod.name=web-7d4,service.name=web-7d4,service.version=latest"
        );
        let canonical = pod(&[("app", "web"), ("service.istio.io/canonical-name", "shop-web")]);
        assert!(baggage(&canonical).contains("service.name=shop-web"));
        // What would break the header or its format is left out.
        let hostile = baggage(&pod(&[("app", "a,b=c\r\nx: y")]));
        assert!(http::HeaderValue::from_str(&hostile).is_ok(), "{hostile}");
        assert!(hostile.contains("k8s.deployment.name=abcx:y"), "{hostile}");
        assert_eq!(peer_baggage(b"k8s.namespace.name=a\x00\x07"), Some("k8s.namespace.name=a".into()));
        assert_eq!(peer_baggage(&[b'x'; 4096]).map(|b| b.len()), Some(MAX_BAGGAGE));
    }
}
