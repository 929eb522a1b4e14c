//! Prometheus metrics: Istio's TCP metrics with Istio's names and labels (so existing dashboards
//! work), and the agent's own health.

use std::borrow::Cow;

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{ConnectionRecord, Direction, Security};
use crate::schema::Workload;

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

/// One series' labels: Istio's names with this connection's values. Most values are one of a
/// few constants (`unknown`, `tcp`, ...), which borrow instead of allocating per connection.
pub(crate) type TcpLabels = [(&'static str, Cow<'static, str>); N];

/// The agent's metric registry: Istio's TCP metrics, kept as connections open and close.
pub struct Metrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let (opened, closed, failed, sent, received) =
            (Family::default(), Family::default(), Family::default(), Family::default(), Family::default());
        let mut registry = Registry::default();
        // The text encoding adds `_total` to counters' names.
        registry.register("istio_tcp_connections_opened", "TCP connections opened.", opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed.", closed.clone());
        registry.register(
            "istio_tcp_connections_failed",
            "TCP connections that could not be established.",
            failed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent by the source during TCP connections.",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received by the source during TCP connections.",
            received.clone(),
        );
        Self { opened, closed, failed, sent, received, registry }
    }
}

/// Istio's `workload` label: the `app` label if the pod has one (the Deployment's pods share
/// it), else the pod's name.
fn workload_name(w: &Workload) -> String {
    w.labels.get("app").cloned().unwrap_or_else(|| w.key.name.clone())
}

fn labels(record: &ConnectionRecord, flags: &'static str) -> TcpLabels {
    let unknown = || Cow::Borrowed("unknown");
    type Of<'a> = &'a Option<std::sync::Arc<Workload>>;
    let with = |w: Of<'_>, f: fn(&Workload) -> String| {
        w.as_deref().map(|w| Cow::Owned(f(w))).unwrap_or_else(unknown)
    };
    let label = |w: Of<'_>, key: &str| {
        w.as_deref().and_then(|w| w.labels.get(key).cloned()).map_or_else(unknown, Cow::Owned)
    };
    let principal = |id: &Option<crate::identity::Identity>| {
        id.as_ref().map(|i| Cow::Owned(i.to_string())).unwrap_or_else(unknown)
    };
    // Only a verified peer identity counts: plaintext sources have none.
    let src_principal =
        if record.security == Security::MutualTls { principal(&record.src_identity) } else { unknown() };
    let cluster = |w: Of<'_>| if w.is_some() { Cow::Borrowed(CLUSTER) } else { unknown() };
    let (src, dst) = (&record.src_workload, &record.dst_workload);
    // `namespace/name` as the proxies know it; Istio names the Service by its host name.
    let service = record.dst_service.as_deref().and_then(|s| s.split_once('/'));
    let values: [Cow<'static, str>; N] = [
        match record.direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
        .into(),
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
        service.map_or_else(unknown, |(ns, name)| format!("{name}.{ns}.svc.cluster.local").into()),
        service.map_or_else(unknown, |(_, name)| name.to_owned().into()),
        service.map_or_else(unknown, |(ns, _)| ns.to_owned().into()),
        cluster(dst),
        "tcp".into(),
        match record.security {
            Security::MutualTls => "mutual_tls",
            Security::Plaintext => "unknown",
        }
        .into(),
        flags.into(),
    ];
    let mut names = LABELS.iter();
    values.map(|value| (names.next().copied().unwrap_or_default(), value))
}

impl Metrics {
    /// Counts a connection that reached its destination.
    /// Returns its labels, which its close reuses: nothing they are made of changes once a
    /// connection is open.
    pub(crate) fn opened(&self, record: &ConnectionRecord) -> TcpLabels {
        let labels = labels(record, "-");
        self.opened.get_or_create(&labels).inc();
        labels
    }

    /// Counts a finished connection: bytes, close, and failure with its response flag.
    pub(crate) fn closed(&self, record: &mut ConnectionRecord) {
        let opened = record.opened;
        let flags = match &record.error {
            None => "-",
            Some(_) if record.denied => "DENIED",
            Some(_) if !opened => "UF",
            Some(_) => "-",
        };
        let mut labels = record.metric_labels.take().unwrap_or_else(|| labels(record, flags));
        // response_flags, the last label, is the one a close may change.
        labels[N - 1].1 = Cow::Borrowed(flags);
        self.closed.get_or_create(&labels).inc();
        // A series appears with its first non-zero count: all-zero ones would only be noise.
        if record.bytes_sent > 0 {
            self.sent.get_or_create(&labels).inc_by(record.bytes_sent);
        }
        if record.bytes_received > 0 {
            self.received.get_or_create(&labels).inc_by(record.bytes_received);
        }
        if !opened && record.error.is_some() {
            self.failed.get_or_create(&labels).inc();
        }
    }

    /// The TCP metrics and the values of `scrape`, in the OpenMetrics text format.
    pub fn render(&self, scrape: &Scrape) -> String {
        render(&[&self.registry, &scrape.registry])
    }
}

/// Encodes `registries` as one OpenMetrics exposition.
pub fn render(registries: &[&Registry]) -> String {
    let mut out = String::new();
    for registry in registries {
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, registry);
    }
    let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    out
}

/// Values read at scrape time (gauges of the agent's state, counters kept elsewhere), each
/// registered with its help text.
#[derive(Default)]
pub struct Scrape {
    registry: Registry,
}

impl Scrape {
    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        self.registry.register(name, help, gauge);
    }

    /// A counter without labels; `name` without its `_total`, which the encoding adds.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        self.registry.register(name, help, counter);
    }

    /// A gauge with one series per value of `label`.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        series: impl IntoIterator<Item = (String, i64)>,
    ) {
        let family = Family::<[(&'static str, String); 1], Gauge<i64>>::default();
        for (value, n) in series {
            family.get_or_create(&[(label, value)]).set(n);
        }
        self.registry.register(name, help, family);
    }

    /// A counter with one series per value of `label`; `name` without its `_total`.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        series: impl IntoIterator<Item = (String, u64)>,
    ) {
        let family = Family::<[(&'static str, String); 1], Counter<u64>>::default();
        for (value, n) in series {
            family.get_or_create(&[(label, value)]).inc_by(n);
        }
        self.registry.register(name, help, family);
    }

    /// The values, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        render(&[&self.registry])
    }
}
