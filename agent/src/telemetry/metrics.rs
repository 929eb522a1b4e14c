//! Prometheus metrics: Istio's TCP metrics with Istio's names and labels (so existing dashboards
//! work), and the agent's own health.

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex};

use super::{ConnectionRecord, Direction, Security};
use crate::discovery::Workload;

/// Label names of the Istio TCP metrics, in output order: Istio's standard set, every label
/// Kiali's graph groups or filters TCP traffic by.
const LABELS: [&str; N] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "connection_security_policy",
    "response_flags",
];
const N: usize = 23;

/// Istio's cluster ID when none is configured.
const CLUSTER: &str = "Kubernetes";

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    opened: u64,
    closed: u64,
    failed: u64,
    sent: u64,
    received: u64,
}

/// The agent's metric registry.
#[derive(Default)]
pub struct Metrics {
    tcp: Mutex<BTreeMap<[String; N], Counters>>,
}

/// Istio's `workload` label: the `app` label if the pod has one (the Deployment's pods share
/// it), else the pod's name.
fn workload_name(w: &Workload) -> String {
    w.labels.get("app").cloned().unwrap_or_else(|| w.key.name.clone())
}

fn labels(record: &ConnectionRecord, flags: &str) -> [String; N] {
    let unknown = || "unknown".to_owned();
    type Of<'a> = &'a Option<std::sync::Arc<Workload>>;
    let with = |w: Of<'_>, f: fn(&Workload) -> String| w.as_deref().map(f).unwrap_or_else(unknown);
    let label =
        |w: Of<'_>, key: &str| w.as_deref().and_then(|w| w.labels.get(key).cloned()).unwrap_or_else(unknown);
    let principal =
        |id: &Option<crate::identity::Identity>| id.as_ref().map(ToString::to_string).unwrap_or_else(unknown);
    // Only a verified peer identity counts: plaintext sources have none.
    let src_principal =
        if record.security == Security::MutualTls { principal(&record.src_identity) } else { unknown() };
    let cluster = |w: Of<'_>| if w.is_some() { CLUSTER.to_owned() } else { unknown() };
    let (src, dst) = (&record.src_workload, &record.dst_workload);
    // `namespace/name` as the proxies know it; Istio names the Service by its host name.
    let service = record.dst_service.as_deref().and_then(|s| s.split_once('/'));
    [
        match record.direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
        .to_owned(),
        with(src, workload_name),
        with(src, |w| w.key.namespace.clone()),
        src_principal,
        label(src, "app"),
        label(src, "version"),
        with(src, |w| super::canonical_service(w).to_owned()),
        with(src, |w| super::canonical_revision(w).to_owned()),
        cluster(src),
        with(dst, workload_name),
        with(dst, |w| w.key.namespace.clone()),
        principal(&record.dst_identity),
        label(dst, "app"),
        label(dst, "version"),
        with(dst, |w| super::canonical_service(w).to_owned()),
        with(dst, |w| super::canonical_revision(w).to_owned()),
        service.map_or_else(unknown, |(ns, name)| format!("{name}.{ns}.svc.cluster.local")),
        service.map_or_else(unknown, |(_, name)| name.to_owned()),
        service.map_or_else(unknown, |(ns, _)| ns.to_owned()),
        cluster(dst),
        "tcp".to_owned(),
        match record.security {
            Security::MutualTls => "mutual_tls",
            Security::Plaintext => "unknown",
        }
        .to_owned(),
        flags.to_owned(),
    ]
}

impl Metrics {
    /// Counts a connection that reached its destination.
    pub fn opened(&self, record: &ConnectionRecord) {
        let mut tcp = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        tcp.entry(labels(record, "-")).or_default().opened += 1;
    }

    /// Counts a finished connection: bytes, close, and failure with its response flag.
    pub fn closed(&self, record: &ConnectionRecord, opened: bool) {
        let flags = match &record.error {
            None => "-",
            Some(e) if e.starts_with("denied") || e.contains("(401)") => "DENIED",
            Some(_) if !opened => "UF",
            Some(_) => "-",
        };
        let mut tcp = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        let counters = tcp.entry(labels(record, flags)).or_default();
        counters.closed += 1;
        counters.sent += record.bytes_sent;
        counters.received += record.bytes_received;
        if !opened && record.error.is_some() {
            counters.failed += 1;
        }
    }

    /// The Istio TCP metrics in Prometheus text format.
    pub fn render_tcp(&self, out: &mut String) {
        let tcp = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        type Family = (&'static str, &'static str, fn(&Counters) -> u64);
        let families: [Family; 5] = [
            ("istio_tcp_connections_opened_total", "TCP connections opened.", |c| c.opened),
            ("istio_tcp_connections_closed_total", "TCP connections closed.", |c| c.closed),
            ("istio_tcp_connections_failed_total", "TCP connections that could not be established.", |c| {
                c.failed
            }),
            ("istio_tcp_sent_bytes_total", "Bytes sent by the source during TCP connections.", |c| c.sent),
            ("istio_tcp_received_bytes_total", "Bytes received by the source during TCP connections.", |c| {
                c.received
            }),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, counters) in tcp.iter() {
                let v = value(counters);
                // Series are created by any counter; an all-zero one would only be noise.
                if v == 0
                    && name != "istio_tcp_connections_opened_total"
                    && name != "istio_tcp_connections_closed_total"
                {
                    continue;
                }
                let _ = writeln!(out, "{name}{{{}}} {v}", label_text(labels));
            }
        }
    }
}

fn label_text(values: &[String; N]) -> String {
    LABELS.iter().zip(values).map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect::<Vec<_>>().join(",")
}

/// Escapes a label value for the text format.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes one gauge or counter sample with its HELP and TYPE lines.
pub fn sample(out: &mut String, name: &str, kind: &str, help: &str, series: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in series {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
    }
}
