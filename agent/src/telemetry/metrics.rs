//! Prometheus metrics: Istio's TCP metrics with Istio's names and labels (so existing dashboards
//! work), and the agent's own health.

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex};

use super::{ConnectionRecord, Direction, Security};
use crate::discovery::Workload;

/// Label names of the Istio TCP metrics, in output order.
const LABELS: [&str; 11] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "request_protocol",
    "connection_security_policy",
    "response_flags",
];

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
    tcp: Mutex<BTreeMap<[String; 11], Counters>>,
}

/// Istio's `workload` label: the `app` label if the pod has one (the Deployment's pods share
/// it), else the pod's name.
fn workload_name(w: &Workload) -> String {
    w.labels.get("app").cloned().unwrap_or_else(|| w.key.name.clone())
}

fn labels(record: &ConnectionRecord, flags: &str) -> [String; 11] {
    let unknown = || "unknown".to_owned();
    let name = |w: &Option<std::sync::Arc<Workload>>| w.as_deref().map(workload_name).unwrap_or_else(unknown);
    let ns = |w: &Option<std::sync::Arc<Workload>>| {
        w.as_ref().map(|w| w.key.namespace.clone()).unwrap_or_else(unknown)
    };
    let principal =
        |id: &Option<crate::identity::Identity>| id.as_ref().map(ToString::to_string).unwrap_or_else(unknown);
    // Only a verified peer identity counts: plaintext sources have none.
    let src_principal =
        if record.security == Security::MutualTls { principal(&record.src_identity) } else { unknown() };
    [
        match record.direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
        .to_owned(),
        name(&record.src_workload),
        ns(&record.src_workload),
        src_principal,
        name(&record.dst_workload),
        ns(&record.dst_workload),
        principal(&record.dst_identity),
        record.dst_service.clone().unwrap_or_else(unknown),
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

fn label_text(values: &[String; 11]) -> String {
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
