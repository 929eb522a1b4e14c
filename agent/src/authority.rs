//! `ambit ca serve`: the mesh CA as a service of its own, so that no node holds the root key.
//!
//! It serves Istio's certificate protocol ([`crate::identity::protocol`]) over TLS on 15012.
//! Every call is authenticated by the caller's service-account token (TokenReview, audience
//! `istio-ca`) and authorized by one decision, [`authorize`]:
//!
//! - any caller may have a certificate for its own identity;
//! - a trusted node agent (`--trusted-node-accounts`) may have the identity of a pod scheduled on
//!   its own node (the node of the pod its token is bound to), and no other;
//! - the CSR must name exactly that one SPIFFE ID; the lifetime is capped.
//!
//! Everything else is refused with a gRPC status and a log line naming caller, node and
//! identity. The service keeps no state beyond caches: replicas behind one Service agree.

pub mod review;

use std::{
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{net::TcpStream, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, info, info_span, warn};

use self::review::{Caller, Pods, ReviewError, Reviewer};
use crate::{
    admin::{self, AdminError},
    cli::CaServeArgs,
    identity::{
        Ca, Identity, IdentityError,
        protocol::{self, CertificateRequest, CertificateResponse, Code},
    },
    listener::{self, Admission, Limits},
};

/// Why the CA service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// The key material could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// An option is wrong.
    #[error("{0}")]
    Usage(String),
    /// The Kubernetes API client could not be built.
    #[error("Kubernetes API: {0}")]
    Kubernetes(String),
    /// A listener could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The readiness endpoint could not be bound.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// TLS could not be configured.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A signal handler could not be installed.
    #[error("installing a signal handler: {0}")]
    Signal(std::io::Error),
}

impl AuthorityError {
    /// The process exit code: 2 for what the operator must fix, 1 for runtime failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Identity(_) | Self::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// A refused call: the gRPC status it is answered with, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The status.
    pub code: Code,
    /// Why, for the caller and the log.
    pub reason: String,
}

impl Refusal {
    fn new(code: Code, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into() }
    }
}

/// What a caller may have: one identity, and (for a node agent) the node it was granted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The identity the certificate is for.
    pub identity: Identity,
    /// The caller's node, when the grant rests on it.
    pub node: Option<String>,
}

/// Who may ask for whose identity.
#[derive(Clone, Debug)]
pub struct Rules {
    /// The trust domain identities are issued in.
    pub trust_domain: String,
    /// `(namespace, service account)` of node agents.
    pub trusted: Vec<(String, String)>,
}

impl Rules {
    /// The rules of `trust_domain` with node agents `accounts` (`namespace/name` each).
    pub fn new(trust_domain: &str, accounts: &[String]) -> Result<Self, AuthorityError> {
        let trusted = accounts
            .iter()
            .filter(|a| !a.trim().is_empty())
            .map(|account| match account.trim().split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                    Ok((ns.to_owned(), sa.to_owned()))
                }
                _ => Err(AuthorityError::Usage(format!(
                    "--trusted-node-accounts: {account:?} is not namespace/service-account"
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { trust_domain: trust_domain.to_owned(), trusted })
    }

    fn is_node_agent(&self, caller: &Caller) -> bool {
        self.trusted.iter().any(|(ns, sa)| *ns == caller.namespace && *sa == caller.service_account)
    }
}

/// Which identity `caller`, asking for `asked` (the `ImpersonatedIdentity`, if any), may have
/// a certificate for. The one authorization decision of the CA service.
pub fn authorize(rules: &Rules, caller: &Caller, asked: Option<&str>, pods: &Pods) -> Result<Grant, Refusal> {
    let own = Identity::new(&rules.trust_domain, &caller.namespace, &caller.service_account);
    let asked = match asked {
        None => return Ok(Grant { identity: own, node: None }),
        Some(uri) => Identity::parse(uri).map_err(|e| Refusal::new(Code::InvalidArgument, e.to_string()))?,
    };
    if asked.trust_domain != rules.trust_domain {
        return Err(Refusal::new(
            Code::InvalidArgument,
            format!("{asked} is not in trust domain {}", rules.trust_domain),
        ));
    }
    if asked == own {
        return Ok(Grant { identity: own, node: None });
    }
    if !rules.is_node_agent(caller) {
        return Err(Refusal::new(
            Code::PermissionDenied,
            format!("{caller} may only ask for its own identity {own}: it is not a trusted node agent"),
        ));
    }
    if !pods.synced() {
        return Err(Refusal::new(Code::Unavailable, "the pods of the cluster are not listed yet"));
    }
    // The API server's word on the token's node, or else the node of the pod it is bound to.
    let node = match (&caller.node, &caller.pod) {
        (Some(node), _) => node.clone(),
        (None, Some(pod)) => pods.node_of(&caller.namespace, pod).ok_or_else(|| {
            Refusal::new(
                Code::PermissionDenied,
                format!("{caller}: its pod {}/{pod} is not scheduled on any node", caller.namespace),
            )
        })?,
        (None, None) => {
            return Err(Refusal::new(
                Code::PermissionDenied,
                format!(
                    "{caller}: its token is not bound to a pod, so its node is unknown (use a projected token)"
                ),
            ));
        }
    };
    if !pods.runs_on(&node, &asked.namespace, &asked.service_account) {
        return Err(Refusal::new(
            Code::PermissionDenied,
            format!("no pod of {}/{} is scheduled on node {node}", asked.namespace, asked.service_account),
        ));
    }
    Ok(Grant { identity: asked, node: Some(node) })
}

/// How long the serving certificate lives; it is renewed at half-life.
const SERVING_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the key material is checked for a change (a rotated Secret).
const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// A call must be answered within this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS and HTTP/2 must be set up within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more are refused.
const MAX_HANDSHAKES: usize = 256;
/// Calls in flight on one connection.
const MAX_STREAMS: u32 = 128;
/// A token and a few headers fit.
const MAX_HEADER_LIST: u32 = 32 * 1024;

/// The CA service's state: key material (replaced on reload), serving certificate, callers.
struct Authority {
    ca: RwLock<Arc<Ca>>,
    /// The contents of the key files the CA was loaded from, to see a change.
    loaded_from: RwLock<Vec<u8>>,
    serving: Arc<Serving>,
    rules: Rules,
    max_ttl: Duration,
    reviewer: Reviewer,
    pods: Arc<Pods>,
    args_dir: std::path::PathBuf,
    issued: AtomicU64,
    refused: [AtomicU64; 8],
}

/// The codes counted in `ambit_ca_refused_total`, in that array's order.
const REFUSED_CODES: [Code; 8] = [
    Code::InvalidArgument,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::Unauthenticated,
    Code::Ok,
];

/// The serving certificate, re-issued at half-life and whenever the CA changes.
struct Serving {
    names: Vec<String>,
    ips: Vec<std::net::IpAddr>,
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").field("names", &self.names).field("ips", &self.ips).finish_non_exhaustive()
    }
}

impl Serving {
    fn issue(
        ca: &Ca,
        names: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<(Arc<CertifiedKey>, SystemTime), IdentityError> {
        let key = ca.issue_serving(names, ips, SERVING_TTL)?;
        Ok((key, SystemTime::now() + SERVING_TTL / 2))
    }

    fn renew(&self, ca: &Ca) -> Result<(), IdentityError> {
        let fresh = Self::issue(ca, &self.names, &self.ips)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    fn due(&self) -> bool {
        self.current.read().unwrap_or_else(|e| e.into_inner()).1 <= SystemTime::now()
    }
}

impl ResolvesServerCert for Serving {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).0.clone())
    }
}

/// The bytes of the key files of `dir`, to compare one look with the next.
fn key_files(dir: &std::path::Path) -> Vec<u8> {
    use crate::identity::ca::{CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
    let mut all = Vec::new();
    for name in [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT] {
        all.extend_from_slice(name.as_bytes());
        all.extend(std::fs::read(dir.join(name)).unwrap_or_default());
    }
    all
}

impl Authority {
    fn ca(&self) -> Arc<Ca> {
        self.ca.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the key material again if its files changed; a bad change keeps the old CA.
    fn reload(&self) {
        let files = key_files(&self.args_dir);
        if *self.loaded_from.read().unwrap_or_else(|e| e.into_inner()) != files {
            match Ca::load(&self.args_dir, &self.rules.trust_domain) {
                Ok(ca) => {
                    let ca = Arc::new(ca);
                    match self.serving.renew(&ca) {
                        Ok(()) => {
                            info!(
                                roots = ca.roots().len(),
                                intermediates = ca.intermediates().len(),
                                "CA key material changed; reloaded"
                            );
                            *self.ca.write().unwrap_or_else(|e| e.into_inner()) = ca;
                        }
                        Err(e) => {
                            warn!(error = %e, "CA key material changed but cannot sign; keeping the previous")
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "CA key material changed but does not load; keeping the previous")
                }
            }
            *self.loaded_from.write().unwrap_or_else(|e| e.into_inner()) = files;
        }
        if self.serving.due() {
            match self.serving.renew(&self.ca()) {
                Ok(()) => info!("serving certificate renewed"),
                Err(e) => warn!(error = %e, "renewing the serving certificate failed; will retry"),
            }
        }
    }

    /// One call, start to answer.
    async fn call(
        self: Arc<Self>,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: SocketAddr,
    ) {
        let mut seen = Seen::default();
        let result = match tokio::time::timeout(CALL_TIMEOUT, self.answer(request, &mut seen)).await {
            Ok(result) => result,
            Err(_) => Err(Refusal::new(Code::Unavailable, "the call took too long")),
        };
        let caller = seen.caller.as_ref().map_or_else(|| "unknown".to_owned(), ToString::to_string);
        let node = seen.node.as_deref().unwrap_or("-");
        let identity = seen.identity.as_deref().unwrap_or("-");
        let sent = match result {
            Ok((response, serial, ttl)) => {
                self.issued.fetch_add(1, Ordering::Relaxed);
                info!(%peer, %caller, node, identity, serial, ttl_secs = ttl.as_secs(), "certificate issued");
                send_ok(&mut respond, &response)
            }
            Err(refusal) => {
                if let Some(i) = REFUSED_CODES.iter().position(|c| *c == refusal.code) {
                    self.refused[i].fetch_add(1, Ordering::Relaxed);
                }
                warn!(%peer, %caller, node, identity, code = %refusal.code, reason = %refusal.reason, "certificate refused");
                send_status(&mut respond, refusal.code, &refusal.reason)
            }
        };
        if let Err(e) = sent {
            debug!(%peer, error = %e, "the caller left before the answer");
        }
    }

    async fn answer(
        &self,
        request: Request<RecvStream>,
        seen: &mut Seen,
    ) -> Result<(CertificateResponse, String, Duration), Refusal> {
        if request.method() != http::Method::POST || request.uri().path() != protocol::PATH {
            return Err(Refusal::new(
                Code::Unimplemented,
                format!("{} {}: only {} is served", request.method(), request.uri().path(), protocol::PATH),
            ));
        }
        let token = bearer(request.headers())?;
        let mut body = request.into_body();
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk
                .map_err(|e| Refusal::new(Code::InvalidArgument, format!("reading the request: {e}")))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
            if buf.len() > protocol::MAX_MESSAGE + 5 {
                return Err(Refusal::new(
                    Code::InvalidArgument,
                    format!("a request over {} bytes", protocol::MAX_MESSAGE),
                ));
            }
        }
        let message: CertificateRequest =
            protocol::unframe(&buf).map_err(|e| Refusal::new(Code::InvalidArgument, e))?;
        seen.identity = message.impersonated().map(str::to_owned);
        let caller = self.reviewer.review(&token).await.map_err(|e| match e {
            ReviewError::Unavailable(_) => Refusal::new(Code::Unavailable, e.to_string()),
            _ => Refusal::new(Code::Unauthenticated, e.to_string()),
        })?;
        seen.caller = Some(caller.clone());
        seen.node = caller.node.clone();
        let grant = authorize(&self.rules, &caller, message.impersonated(), &self.pods)?;
        seen.identity = Some(grant.identity.to_string());
        seen.node = grant.node.clone().or(seen.node.take());
        let ttl = match message.validity_duration {
            secs if secs <= 0 => self.max_ttl,
            secs if secs as u64 > self.max_ttl.as_secs() => {
                return Err(Refusal::new(
                    Code::InvalidArgument,
                    format!("a lifetime of {secs}s is longer than the {}s allowed", self.max_ttl.as_secs()),
                ));
            }
            secs => Duration::from_secs(secs as u64),
        };
        let chain = self
            .ca()
            .sign(&message.csr, &grant.identity, ttl)
            .map_err(|e| Refusal::new(Code::InvalidArgument, e))?;
        let serial = chain
            .first()
            .and_then(|leaf| {
                use x509_parser::prelude::FromDer as _;
                x509_parser::prelude::X509Certificate::from_der(leaf)
                    .ok()
                    .map(|(_, c)| c.raw_serial_as_string())
            })
            .unwrap_or_default();
        let cert_chain = chain.iter().map(crate::identity::ca::pem).collect();
        Ok((CertificateResponse { cert_chain }, serial, ttl))
    }

    fn metrics(&self) -> String {
        let mut m = crate::telemetry::metrics::Scrape::default();
        m.counter("ambit_ca_issued", "Certificates issued.", self.issued.load(Ordering::Relaxed));
        let refused = REFUSED_CODES
            .iter()
            .zip(&self.refused)
            .filter(|(c, _)| **c != Code::Ok)
            .map(|(code, count)| (code.to_string(), count.load(Ordering::Relaxed)));
        m.counters("ambit_ca_refused", "Certificate calls refused, by gRPC status.", "code", refused);
        m.gauge(
            "ambit_ca_pods_listed",
            "Whether the pods of the cluster are listed (1) or not yet (0).",
            i64::from(self.pods.synced()),
        );
        m.render()
    }
}

/// What a call revealed before it was answered, for its log line.
#[derive(Default)]
struct Seen {
    caller: Option<Caller>,
    node: Option<String>,
    identity: Option<String>,
}

/// The token of `authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Result<String, Refusal> {
    let value = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
        Refusal::new(Code::Unauthenticated, "no authorization header: a service-account token is required")
    })?;
    let value = value
        .to_str()
        .map_err(|_| Refusal::new(Code::Unauthenticated, "the authorization header is not text"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(token.trim().to_owned())
        }
        _ => Err(Refusal::new(Code::Unauthenticated, "the authorization header is not `Bearer <token>`")),
    }
}

fn grpc_response(extra: &[(&'static str, HeaderValue)]) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    for (name, value) in extra {
        headers.insert(*name, value.clone());
    }
    response
}

fn send_ok(respond: &mut SendResponse<Bytes>, message: &CertificateResponse) -> Result<(), h2::Error> {
    let mut stream = respond.send_response(grpc_response(&[]), false)?;
    stream.send_data(protocol::frame(message), false)?;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    stream.send_trailers(trailers)
}

/// A refusal as gRPC's trailers-only answer.
fn send_status(respond: &mut SendResponse<Bytes>, code: Code, reason: &str) -> Result<(), h2::Error> {
    let status = HeaderValue::from(code as u16);
    // Percent-encoding leaves only visible ASCII, which a header value always takes.
    let message =
        HeaderValue::from_str(&protocol::encode_message(reason)).unwrap_or(HeaderValue::from_static(""));
    respond
        .send_response(grpc_response(&[("grpc-status", status), ("grpc-message", message)]), true)
        .map(drop)
}

/// One TLS connection: HTTP/2, each stream a call.
async fn connection(authority: Arc<Authority>, acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_window_size((protocol::MAX_MESSAGE + 5) as u32)
        .handshake::<_, Bytes>(tls);
    let mut connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "no HTTP/2 preface");
            return;
        }
    };
    while let Some(next) = connection.accept().await {
        match next {
            Ok((request, respond)) => {
                tokio::spawn(authority.clone().call(request, respond, peer));
            }
            Err(e) => {
                debug!(%peer, error = %e, "connection ended");
                return;
            }
        }
    }
}

/// Runs the CA service until SIGTERM or SIGINT.
pub async fn serve(args: CaServeArgs) -> Result<(), AuthorityError> {
    let rules = Rules::new(&args.trust_domain, &args.trusted_node_accounts)?;
    if args.server_names.is_empty() && args.server_ips.is_empty() {
        return Err(AuthorityError::Usage(
            "--server-names and --server-ips are both empty: clients could not verify the CA".into(),
        ));
    }
    let loaded_from = key_files(&args.ca_dir);
    let ca = Arc::new(Ca::load(&args.ca_dir, &args.trust_domain)?);
    info!(
        dir = %args.ca_dir.display(),
        roots = ca.roots().len(),
        intermediates = ca.intermediates().len(),
        trust_domain = %args.trust_domain,
        trusted_node_accounts = ?args.trusted_node_accounts,
        "CA loaded"
    );
    let serving = Arc::new(Serving {
        names: args.server_names.clone(),
        ips: args.server_ips.clone(),
        current: RwLock::new(Serving::issue(&ca, &args.server_names, &args.server_ips)?),
    });
    let client =
        crate::discovery::kube::client().await.map_err(|e| AuthorityError::Kubernetes(e.to_string()))?;
    let pods = Arc::new(Pods::default());
    let authority = Arc::new(Authority {
        ca: RwLock::new(ca),
        loaded_from: RwLock::new(loaded_from),
        serving: serving.clone(),
        rules,
        max_ttl: args.max_ttl,
        reviewer: Reviewer::new(client.clone(), args.audience.clone()),
        pods: pods.clone(),
        args_dir: args.ca_dir.clone(),
        issued: AtomicU64::new(0),
        refused: Default::default(),
    });
    tokio::spawn(pods.clone().watch(client));

    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let probe = authority.clone();
    let readiness = admin::bind_plain("CA readiness", args.readiness_addr, move |path| match path {
        "/healthz/ready" if probe.pods.synced() => Some((StatusCode::OK, "ready\n".into())),
        "/healthz/ready" => Some((
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the pods of the cluster are not listed yet\n".into(),
        )),
        "/metrics" => Some((StatusCode::OK, probe.metrics())),
        _ => None,
    })
    .await?;
    tokio::spawn(readiness);

    let listener = admin::reusable_listener(args.addr)
        .map_err(|source| AuthorityError::Listen { addr: args.addr, source })?;
    info!(addr = %listener.local_addr().unwrap_or(args.addr), "serving Istio's certificate protocol");
    let admission = Admission::new("CA", Limits { open: 8192, per_peer: 512, keep_free: 64 });
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let mut reload = tokio::time::interval(RELOAD_EVERY);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AuthorityError::Signal)?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(AuthorityError::Signal)?;
    loop {
        tokio::select! {
            (tcp, peer, permit) = listener::accept(&listener, &admission) => {
                let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                    debug!(%peer, "too many handshakes in progress; refused");
                    listener::reset(tcp);
                    continue;
                };
                let (authority, acceptor) = (authority.clone(), acceptor.clone());
                tokio::spawn(
                    async move {
                        let _permit = permit;
                        let _handshake = handshake;
                        connection(authority, acceptor, tcp, peer).await;
                    }
                    .instrument(info_span!("ca", %peer)),
                );
            }
            _ = reload.tick() => authority.reload(),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!("stopping");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(ns: &str, sa: &str, pod: Option<&str>, node: Option<&str>) -> Caller {
        Caller {
            namespace: ns.into(),
            service_account: sa.into(),
            pod: pod.map(Into::into),
            node: node.map(Into::into),
        }
    }

    fn pods() -> Pods {
        let pods = Pods::default();
        pods.place_for_test("ambit-system", "ambit-a", "a", "ambit");
        pods.place_for_test("ambit-system", "ambit-b", "b", "ambit");
        pods.place_for_test("shop", "web-1", "a", "web");
        pods.place_for_test("shop", "db-1", "b", "db");
        pods
    }

    #[test]
    fn node_agents_get_only_the_identities_of_their_node() {
        let rules = Rules::new("td", &["ambit-system/ambit".into()]).expect("rules");
        let pods = pods();
        let agent_a = caller("ambit-system", "ambit", Some("ambit-a"), None);
        let web = "spiffe://td/ns/shop/sa/web";
        let db = "spiffe://td/ns/shop/sa/db";
        let granted = authorize(&rules, &agent_a, Some(web), &pods).expect("web runs on a");
        assert_eq!(granted.identity.to_string(), web);
        assert_eq!(granted.node.as_deref(), Some("a"));
        let refused = authorize(&rules, &agent_a, Some(db), &pods).expect_err("db runs on b only");
        assert_eq!(refused.code, Code::PermissionDenied);
        assert!(refused.reason.contains("node a"), "{}", refused.reason);
        // The API server's node claim wins over the pod lookup.
        let on_b = caller("ambit-system", "ambit", Some("ambit-a"), Some("b"));
        assert!(authorize(&rules, &on_b, Some(db), &pods).is_ok());
        // No pod binding, no node: refused.
        let unbound = caller("ambit-system", "ambit", None, None);
        assert_eq!(
            authorize(&rules, &unbound, Some(web), &pods).expect_err("unbound").code,
            Code::PermissionDenied
        );
    }

    #[test]
    fn others_get_their_own_identity_only() {
        let rules = Rules::new("td", &["ambit-system/ambit".into()]).expect("rules");
        let pods = pods();
        let web = caller("shop", "web", Some("web-1"), None);
        assert_eq!(
            authorize(&rules, &web, None, &pods).expect("own").identity.to_string(),
            "spiffe://td/ns/shop/sa/web"
        );
        assert!(authorize(&rules, &web, Some("spiffe://td/ns/shop/sa/web"), &pods).is_ok());
        let refused =
            authorize(&rules, &web, Some("spiffe://td/ns/shop/sa/db"), &pods).expect_err("not a node agent");
        assert_eq!(refused.code, Code::PermissionDenied);
        let other_domain =
            authorize(&rules, &web, Some("spiffe://evil/ns/shop/sa/web"), &pods).expect_err("domain");
        assert_eq!(other_domain.code, Code::InvalidArgument);
        let garbage = authorize(&rules, &web, Some("not a uri"), &pods).expect_err("garbage");
        assert_eq!(garbage.code, Code::InvalidArgument);
    }

    #[test]
    fn trusted_accounts_must_be_namespace_and_name() {
        assert!(Rules::new("td", &["ambit".into()]).is_err());
        assert!(Rules::new("td", &["a/b/c".into()]).is_err());
        assert_eq!(Rules::new("td", &["istio-system/ztunnel".into()]).expect("ok").trusted.len(), 1);
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers).expect_err("none").code, Code::Unauthenticated);
        headers.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(bearer(&headers).is_err());
        headers.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer tok.en"));
        assert_eq!(bearer(&headers).expect("token"), "tok.en");
    }
}
