//! The agent's HTTP endpoints: the admin API the CLI talks to (loopback only), readiness for
//! the kubelet, and Prometheus metrics.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info};

use crate::{
    discovery::local::SourceStatus,
    listener::{self, Admission, Limits},
    redirect::PodReport,
};

/// Errors of the HTTP endpoints.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Binding a listener failed.
    #[error("listening on {addr} for the {what} endpoint: {source}")]
    Bind {
        /// Which endpoint.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The admin address is not on loopback.
    #[error("--admin-addr {0} is not a loopback address: the admin API must not be reachable from pods")]
    NotLoopback(SocketAddr),
}

/// Facts about the agent that do not change while it runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentInfo {
    /// ambit's version.
    pub version: String,
    /// Node name.
    pub node: String,
    /// bpffs instance name.
    pub instance: String,
    /// Where the source of truth comes from (`local:FILE` or `kubernetes`).
    pub source: String,
    /// The pin directory.
    pub pin_dir: String,
    /// The cgroup v2 root the outbound programs are attached to.
    pub cgroup_root: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Istio's root namespace.
    pub root_namespace: String,
    /// Start time, seconds since the epoch.
    pub started_at: u64,
}

/// `GET /status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// Static facts.
    pub agent: AgentInfo,
    /// Whether every enrolled pod is captured.
    pub ready: bool,
    /// State of the source of truth.
    pub config: SourceStatus,
    /// Pods of this node in the mesh and captured.
    pub pods_captured: usize,
    /// Pods of this node in the mesh that could not be captured (their traffic is refused).
    pub pods_failed: usize,
    /// Pods of this node in the mesh whose network namespace was refused.
    #[serde(default)]
    pub pods_refused: usize,
    /// Whether the kernel still holds what the agent installed.
    #[serde(default)]
    pub datapath: DatapathHealth,
    /// Pods of this node not in the mesh.
    pub pods_not_enrolled: usize,
    /// Where certificates come from, and the trust bundle.
    #[serde(default)]
    pub ca: crate::identity::CaReport,
}

/// The agent's periodic check of its pins, links, enrollment entries and listeners.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DatapathHealth {
    /// What is missing and could not be put back: while not empty, the agent is not ready.
    pub broken: Vec<String>,
    /// What the last check found missing and put back.
    pub last_repaired: Vec<String>,
    /// Repairs since the agent started.
    pub repairs_total: u64,
    /// A newer agent (this pid) took the node's kernel state over: an upgrade is under way and
    /// this agent only finishes the connections it holds.
    #[serde(default)]
    pub superseded_by: Option<u32>,
}

/// What the endpoints read; updated by the agent's main loop.
#[derive(Clone)]
pub struct AdminState {
    /// Static facts.
    pub info: Arc<AgentInfo>,
    /// State of the source of truth.
    pub source: watch::Receiver<SourceStatus>,
    /// The pods of this node.
    pub pods: watch::Receiver<Arc<Vec<PodReport>>>,
    /// Readiness.
    pub ready: watch::Receiver<bool>,
    /// The datapath's health.
    pub datapath: watch::Receiver<DatapathHealth>,
    /// Certificates held.
    pub certs: watch::Receiver<Arc<Vec<crate::identity::CertReport>>>,
    /// Where certificates come from.
    pub ca: watch::Receiver<Arc<crate::identity::CaReport>>,
    /// The cluster as the agent sees it.
    pub cluster: watch::Receiver<Arc<crate::state::Cluster>>,
    /// Flow records.
    pub flows: Arc<crate::telemetry::flows::Flows>,
    /// The summary of inbound decisions, for `POST /what-if`.
    pub history: Arc<crate::telemetry::history::FlowHistory>,
    /// Tracer health and kernel drop counters.
    pub trace_stats: Arc<crate::bpf::TraceStats>,
    /// Istio's TCP metrics.
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
}

impl AdminState {
    fn status(&self) -> StatusReport {
        let pods = self.pods.borrow().clone();
        let count = |state| pods.iter().filter(|p| p.state == state).count();
        StatusReport {
            agent: (*self.info).clone(),
            ready: *self.ready.borrow(),
            config: self.source.borrow().clone(),
            pods_captured: count(crate::redirect::CaptureState::Captured),
            pods_failed: count(crate::redirect::CaptureState::Failed),
            pods_refused: count(crate::redirect::CaptureState::Refused),
            datapath: self.datapath.borrow().clone(),
            pods_not_enrolled: count(crate::redirect::CaptureState::NotCaptured),
            ca: (*self.ca.borrow().clone()).clone(),
        }
    }

    /// Everything the agent works from, without private keys.
    fn config_dump(&self) -> serde_json::Value {
        let cluster = self.cluster.borrow().clone();
        let policies: Vec<serde_json::Value> = cluster
            .authorization
            .all()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "action": p.action,
                    "selector": p.selector.as_ref().map(|s| &s.match_labels),
                    "rules": p.rule_count,
                    "http_only_fields": p.unsupported,
                })
            })
            .collect();
        let peer_authentications: Vec<serde_json::Value> = cluster
            .peer_authentications
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or("default"), p.metadata.name),
                    "selector": p.spec.selector.as_ref().map(|s| &s.match_labels),
                    "mode": p.spec.mtls.map(|m| m.mode),
                    "port_level_mtls": p.spec.port_level_mtls.iter().map(|(port, m)| (port.0.to_string(), m.mode)).collect::<std::collections::BTreeMap<_, _>>(),
                })
            })
            .collect();
        serde_json::json!({
            "agent": *self.info,
            "config": *self.source.borrow(),
            "workloads": cluster.workloads.values().collect::<Vec<_>>(),
            "services": cluster.services.keys().map(ToString::to_string).collect::<Vec<_>>(),
            "peer_authentications": peer_authentications,
            "authorization_policies": policies,
            "certificates": *self.certs.borrow().clone(),
            "tracing": { "missing_tracepoints": self.trace_stats.missing },
        })
    }

    fn metrics(&self) -> String {
        let status = self.status();
        let pods = self.pods.borrow().clone();
        let mut m = crate::telemetry::metrics::Scrape::default();
        m.gauge("ambit_ready", "1 when every enrolled pod of the node is captured.", i64::from(status.ready));
        m.gauge(
            "ambit_pods_captured",
            "Enrolled pods of the node that are captured.",
            status.pods_captured as i64,
        );
        m.gauge(
            "ambit_pods_failed",
            "Enrolled pods of the node that could not be captured.",
            status.pods_failed as i64,
        );
        m.gauge(
            "ambit_pods_refused",
            "Enrolled pods of the node whose network namespace was refused (the agent's own, the host's, another pod's).",
            status.pods_refused as i64,
        );
        m.counter(
            "ambit_datapath_repairs",
            "Pins, links, enrollment entries or listeners found missing and put back.",
            status.datapath.repairs_total,
        );
        m.gauge(
            "ambit_config_errors",
            "1 when the last reload of the source of truth failed (the last good one serves).",
            i64::from(status.config.error.is_some()),
        );
        let snapshots: Vec<_> = pods.iter().filter_map(|p| p.stats.as_ref()).map(|s| s.snapshot()).collect();
        let total = |f: fn(&crate::proxy::StatsSnapshot) -> u64| -> u64 { snapshots.iter().map(f).sum() };
        m.counters(
            "ambit_connections",
            "Connections proxied for the captured pods.",
            "direction",
            [("outbound".to_owned(), total(|s| s.outbound)), ("inbound".to_owned(), total(|s| s.inbound))],
        );
        m.counter(
            "ambit_connections_failed",
            "Proxied connections that failed or were refused.",
            total(|s| s.failed),
        );
        let certs: Vec<(String, i64)> =
            self.certs.borrow().iter().map(|c| (c.identity.clone(), c.not_after as i64)).collect();
        m.gauges(
            "ambit_certificate_expiry_timestamp_seconds",
            "When each workload certificate held by the agent expires (Unix time).",
            "identity",
            certs,
        );
        m.counter(
            "ambit_flow_events_dropped",
            "Kernel flow events lost because the ring buffer was full.",
            self.trace_stats.ring_full(),
        );
        let names = &self.trace_stats.drop_reason_names;
        let drops = self
            .trace_stats
            .drops()
            .into_iter()
            .map(|(reason, n)| (names.get(&reason).cloned().unwrap_or_else(|| reason.to_string()), n));
        m.counters(
            "ambit_kernel_packet_drops",
            "IP packets the kernel dropped, by drop reason (whole node).",
            "reason",
            drops,
        );
        m.gauge("ambit_flows_open", "Traced connections open now.", self.flows.open_count() as i64);
        let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as i64).unwrap_or(0);
        m.gauge("ambit_open_fds", "File descriptors the agent holds (sockets included).", fds);
        self.metrics.render(&m)
    }
}

/// Serves the admin API on `addr`, which must be a loopback address.
pub async fn bind_admin(addr: SocketAddr, state: AdminState) -> Result<impl Future<Output = ()>, AdminError> {
    if !addr.ip().is_loopback() {
        return Err(AdminError::NotLoopback(addr));
    }
    bind("admin", addr, ADMIN, move |req| match (req.method(), req.uri().path()) {
        (&Method::POST, "/what-if") => Box::pin(what_if(state.clone(), req)),
        _ => now(admin_route(&state, &req)),
    })
    .await
}

/// Serves `/healthz/ready` on `addr`: 200 when ready, 503 otherwise.
pub async fn bind_readiness(
    addr: SocketAddr,
    state: AdminState,
) -> Result<impl Future<Output = ()>, AdminError> {
    bind("readiness", addr, NODE_PORT, move |req| now(match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz/ready") => {
            if *state.ready.borrow() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: not every enrolled pod is captured with its certificate (see `ambit status`)\n".into(),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }))
    .await
}

/// Serves `/metrics` (Prometheus text format) on `addr`.
pub async fn bind_metrics(
    addr: SocketAddr,
    state: AdminState,
) -> Result<impl Future<Output = ()>, AdminError> {
    bind("metrics", addr, NODE_PORT, move |req| {
        now(match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => respond(StatusCode::OK, OPENMETRICS, state.metrics().into()),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        })
    })
    .await
}

/// Serves plain-text GET endpoints on a node-facing `addr` (the CA service's readiness and
/// metrics): `route` maps a path to a status and body, `None` for 404; `/metrics` is served as
/// OpenMetrics.
pub(crate) async fn bind_plain<F>(
    what: &'static str,
    addr: SocketAddr,
    route: F,
) -> Result<impl Future<Output = ()>, AdminError>
where
    F: Fn(&str) -> Option<(StatusCode, String)> + Send + Sync + 'static,
{
    bind(what, addr, NODE_PORT, move |req| {
        now(match (req.method(), route(req.uri().path())) {
            (&Method::GET, Some((status, body))) if req.uri().path() == "/metrics" => {
                respond(status, OPENMETRICS, body.into())
            }
            (&Method::GET, Some((status, body))) => text(status, body),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        })
    })
    .await
}

/// Response bodies: whole, or streamed (`/trace?follow=1`).
type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A response, once the request (and for a POST, its body) is read.
type Routed = std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// The service graph page: one file, no external assets (it must work offline), drawing
/// `/graph.json` and refreshing it every two seconds.
const GRAPH_PAGE: &str = include_str!("telemetry/graph.html");

/// A response known without reading the body.
fn now(response: Response<Body>) -> Routed {
    Box::pin(std::future::ready(response))
}

/// The largest what-if request: policies as a user would apply them.
const MAX_WHAT_IF: usize = 1024 * 1024;
/// How long a client may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// `POST /what-if`: candidate policies replayed against this node's flow history. Read-only:
/// the candidate snapshot is dropped once the answer is built.
async fn what_if(state: AdminState, req: Request<Incoming>) -> Response<Body> {
    use crate::check::what_if::{self, WhatIfReport, WhatIfRequest};
    let body = http_body_util::Limited::new(req.into_body(), MAX_WHAT_IF);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("reading the request: {e} (at most {MAX_WHAT_IF} bytes)\n"),
            );
        }
        Err(_) => {
            return text(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time\n".into());
        }
    };
    let request: WhatIfRequest = match serde_json::from_slice(&bytes) {
        Ok(request) => request,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("not a what-if request: {e}\n")),
    };
    let root = &state.info.root_namespace;
    let cluster = state.cluster.borrow().clone();
    let (candidate, changes) = match what_if::candidate(&cluster, &request, root) {
        Ok(built) => built,
        Err(e) => return text(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")),
    };
    let since = request.since_secs.map(Duration::from_secs);
    let mut report = WhatIfReport {
        node: state.info.node.clone(),
        file: request.file.clone(),
        changes,
        since_secs: request.since_secs,
        history_off: state.history.capacity() == 0,
        ..WhatIfReport::default()
    };
    what_if::replay(&cluster, &candidate, &state.history.entries(since), root, &mut report);
    json(&report)
}

/// A body fed line by line from a channel; ends when the sender is dropped.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|line| line.map(|l| Ok(hyper::body::Frame::data(l))))
    }
}

/// `/trace`: the flow history, or (`follow=1`) new flows as they come, as JSON lines.
fn trace(state: &AdminState, query: &[(String, String)]) -> Response<Body> {
    let filter = match crate::telemetry::flows::Filter::from_query(query) {
        Ok(filter) => filter,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let follow = query.iter().any(|(k, v)| k == "follow" && (v == "1" || v == "true"));
    let history: Vec<_> = state.flows.history().into_iter().filter(|r| filter.matches(r)).collect();
    let last = filter.last.unwrap_or(if follow { 0 } else { usize::MAX });
    let skip = history.len().saturating_sub(last);
    let mut lines: Vec<Bytes> = history[skip..].iter().filter_map(json_line).collect();
    if !follow {
        return respond(StatusCode::OK, "application/x-ndjson", lines.concat().into());
    }
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let mut updates = state.flows.subscribe();
    tokio::spawn(async move {
        for line in lines.drain(..) {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        loop {
            match updates.recv().await {
                Ok(record) if filter.matches(&record) => {
                    let Some(line) = json_line(&record) else { continue };
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                // A slow reader skips what it missed rather than slowing the agent.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let mut response = Response::new(ChannelBody(rx).boxed());
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/x-ndjson"));
    response
}

fn json_line<T: Serialize>(value: &T) -> Option<Bytes> {
    let mut line = serde_json::to_vec(value).ok()?;
    line.push(b'\n');
    Some(line.into())
}

fn admin_route(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/status") => json(&state.status()),
        (&Method::GET, "/workloads") => json(&*state.pods.borrow().clone()),
        (&Method::GET, "/certs") => json(&*state.certs.borrow().clone()),
        (&Method::GET, "/config_dump") => json(&state.config_dump()),
        (&Method::GET, "/trace") => trace(state, &query_params(req.uri().query().unwrap_or_default())),
        (&Method::GET, "/graph") => respond(StatusCode::OK, "text/html; charset=utf-8", GRAPH_PAGE.into()),
        (&Method::GET, "/graph.json") => {
            let query = query_params(req.uri().query().unwrap_or_default());
            let minutes = query.iter().find(|(k, _)| k == "minutes").map_or(Ok(15), |(_, v)| v.parse::<u64>());
            match minutes {
                Ok(minutes @ 1..=1440) => {
                    let cluster = state.cluster.borrow().clone();
                    let window = Duration::from_secs(minutes * 60);
                    json(&crate::telemetry::graph::draw(&state.flows.history(), &cluster, &state.info.node, window))
                }
                _ => text(StatusCode::BAD_REQUEST, "minutes must be a number from 1 to 1440\n".into()),
            }
        }
        (&Method::GET, "/policies") => {
            let cluster = state.cluster.borrow().clone();
            let listing: Vec<_> = cluster
                .workloads_on(&state.info.node)
                .filter(|w| w.enrollment.is_enrolled())
                .map(|w| cluster.policies_of(w, &state.info.root_namespace))
                .collect();
            json(&listing)
        }
        (&Method::GET, "/check") => {
            let query = query_params(req.uri().query().unwrap_or_default());
            let get =
                |k: &str| query.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str()).unwrap_or_default();
            let Ok(port) = get("port").parse::<u16>() else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("port {:?} is not a port number\n", get("port")),
                );
            };
            let cluster = state.cluster.borrow().clone();
            match crate::check::check(
                &cluster,
                &state.info.trust_domain,
                &state.info.root_namespace,
                get("src"),
                get("dst"),
                port,
            ) {
                Ok(report) => json(&report),
                Err(e) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
            }
        }
        (&Method::GET, "/") => text(
            StatusCode::OK,
            "ambit admin API: /status /workloads /certs /policies /check?src=&dst=&port= /trace /config_dump\n".into(),
        ),
        _ => text(StatusCode::NOT_FOUND, format!("no such endpoint: {}\n", req.uri().path())),
    }
}

/// `a=1&b=x%2Fy` → pairs, percent-decoded.
fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json<T: Serialize + ?Sized>(value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body.into()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}\n")),
    }
}

/// What Prometheus is told the metrics are (it scrapes OpenMetrics and the older text format).
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn text(status: StatusCode, body: String) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body.into())
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

/// A listener that a new agent can bind beside this one during an upgrade (`SO_REUSEPORT`: the
/// kernel spreads connections over both until the old one closes).
pub(crate) fn reusable_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// How one HTTP endpoint bounds its clients.
#[derive(Clone, Copy)]
struct Bounds {
    limits: Limits,
    /// The longest a connection may live; `None` for the admin API, which streams `ambit
    /// trace --follow` for as long as the operator watches.
    lifetime: Option<Duration>,
}

/// The node ports (15020, 15021) answer anyone who can reach the node: Prometheus and the
/// kubelet need a few connections each, a pod must not be able to hold them all.
const NODE_PORT: Bounds = Bounds {
    limits: Limits { open: 256, per_peer: 16, keep_free: 0 },
    lifetime: Some(Duration::from_secs(30)),
};
/// The admin API is on loopback: every client has the same address.
const ADMIN: Bounds = Bounds { limits: Limits { open: 64, per_peer: 64, keep_free: 0 }, lifetime: None };
/// Headers (and the wait for the next request on a kept-alive connection) must arrive within
/// this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests are GETs with a query string: a few KiB is plenty.
const MAX_BUF: usize = 16 * 1024;

async fn bind<F>(
    what: &'static str,
    addr: SocketAddr,
    bounds: Bounds,
    route: F,
) -> Result<impl Future<Output = ()>, AdminError>
where
    F: Fn(Request<Incoming>) -> Routed + Send + Sync + 'static,
{
    let listener = reusable_listener(addr).map_err(|source| AdminError::Bind { what, addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(endpoint = what, addr = %local, "listening");
    let route = Arc::new(route);
    let admission = Admission::new(what, bounds.limits);
    Ok(async move {
        loop {
            let (stream, peer, permit) = listener::accept(&listener, &admission).await;
            let route = route.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |req| {
                    let response = route(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_BUF)
                    .serve_connection(TokioIo::new(stream), service);
                let served = match bounds.lifetime {
                    Some(limit) => tokio::time::timeout(limit, connection).await.unwrap_or(Ok(())),
                    None => connection.await,
                };
                if let Err(e) = served {
                    debug!(endpoint = what, %peer, error = %e, "http connection ended with an error");
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            query_params("src=shop%2Ffrontend&dst=10.0.0.1&port=80&x=%zz+y"),
            [("src", "shop/frontend"), ("dst", "10.0.0.1"), ("port", "80"), ("x", "%zz y")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }
}
