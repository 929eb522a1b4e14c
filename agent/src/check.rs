//! `ambit check SRC DST:PORT`: what would happen to a connection, and why — the identities of
//! both ends, whether it would be mTLS or plaintext (and which PeerAuthentication decides), and
//! which AuthorizationPolicy allows or denies it. It runs the same evaluation the proxies run.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

pub mod what_if;

use crate::{
    identity::Identity,
    policy::{Action, ConnectionInput, InboundDecision, MtlsDecision, Verdict},
    schema::{ObjectKey, Workload},
    state::Cluster,
};

/// Why a check could not be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// SRC must be a pod, an IP address or a CIDR block.
    #[error("source {0:?} is not a pod this agent knows (use namespace/name), an IP address or a CIDR block")]
    UnknownSource(String),
    /// DST is neither a pod, a Service nor an IP.
    #[error("destination {0:?} is not a pod, Service or IP address this agent knows")]
    UnknownDestination(String),
    /// A Service without the port.
    #[error("Service {service} has no port {port}")]
    NoServicePort {
        /// The Service.
        service: String,
        /// The port asked for.
        port: u16,
    },
    /// A Service without pods.
    #[error("Service {0} selects no pod")]
    NoEndpoint(String),
    /// A Service without a virtual address: its pods are reached by their own addresses.
    #[error("Service {0} is headless (no ClusterIP): check one of its pods by name")]
    Headless(String),
    /// Several running pods claim the address; the agents refuse traffic to it.
    #[error("{ip} is claimed by several running pods ({pods}): the agents refuse connections to it")]
    AmbiguousAddress {
        /// The address.
        ip: IpAddr,
        /// The claimants, comma-separated.
        pods: String,
    },
}

/// One end of the connection.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct End {
    /// `namespace/name` of the pod, if it is one.
    pub pod: Option<String>,
    /// Its address.
    pub ip: IpAddr,
    /// Its SPIFFE ID, if it is in the mesh.
    pub identity: Option<String>,
    /// Whether it is in the mesh.
    pub in_mesh: bool,
}

/// The answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckReport {
    /// Source.
    pub source: End,
    /// Destination pod (after Service resolution).
    pub destination: End,
    /// The Service asked for, if any.
    pub service: Option<String>,
    /// Destination port on the pod.
    pub port: u16,
    /// `mtls`, `plaintext`, or `local` (a pod reaching itself).
    pub transport: String,
    /// Why that transport.
    pub transport_reason: String,
    /// The PeerAuthentication decision, for plaintext into the mesh.
    pub peer_authentication: Option<MtlsDecision>,
    /// The AuthorizationPolicy decision, when the destination enforces one.
    pub authorization: Option<Verdict>,
    /// What would happen.
    pub verdict: CheckVerdict,
    /// Hints about likely mistakes.
    pub hints: Vec<String>,
}

/// What would happen to the connection a check asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckVerdict {
    /// It reaches the app.
    Allowed,
    /// An AuthorizationPolicy denies it.
    Denied,
    /// Plaintext under STRICT mutual TLS.
    Refused,
    /// The destination is not in the mesh: nothing is enforced.
    NotEnforced,
}

impl std::fmt::Display for CheckVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Refused => "refused",
            Self::NotEnforced => "not-enforced",
        })
    }
}

/// Answers a check against `cluster`.
pub fn check(
    cluster: &Cluster,
    trust_domain: &str,
    root_namespace: &str,
    src: &str,
    dst: &str,
    port: u16,
) -> Result<CheckReport, CheckError> {
    let (source, src_ip) = match resolve_source(cluster, src)? {
        Source::Pod(pod) => {
            (Some(pod), pod.ips.first().copied().ok_or_else(|| CheckError::UnknownSource(src.to_owned()))?)
        }
        Source::Address(ip) => (None, ip),
        Source::Block { first, last } => {
            // Address rules (ipBlocks) may treat the block's ends differently: say so.
            let mut report = check(cluster, trust_domain, root_namespace, &first.to_string(), dst, port)?;
            let other = check(cluster, trust_domain, root_namespace, &last.to_string(), dst, port)?;
            report.hints.push(if other.verdict == report.verdict {
                format!("evaluated for {first} and {last}, the ends of {src}: the same answer")
            } else {
                format!(
                    "the answer depends on the address within {src}: {first} is {}, {last} is {}",
                    report.verdict, other.verdict
                )
            });
            return Ok(report);
        }
    };
    let (destination, service, port) = resolve_destination(cluster, dst, port)?;
    let identity = |w: &Workload| {
        w.enrollment.is_enrolled().then(|| Identity::new(trust_domain, &w.key.namespace, &w.service_account))
    };
    let src_id = source.and_then(identity);
    let (dst_pod, dst_ip, dst_id) = match &destination {
        Destination::Pod(w) => {
            (Some(*w), w.ips.first().copied().unwrap_or(IpAddr::from([0, 0, 0, 0])), identity(w))
        }
        Destination::Ip(ip) => (None, *ip, None),
    };
    // The datapath refuses such an address, whichever way it was named.
    if let Some(claimants) = cluster.ip_claimants(dst_ip) {
        let pods = claimants.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        return Err(CheckError::AmbiguousAddress { ip: dst_ip, pods });
    }
    let end = |w: Option<&Workload>, ip, id: &Option<Identity>| End {
        pod: w.map(|w| w.key.to_string()),
        ip,
        identity: id.as_ref().map(ToString::to_string),
        in_mesh: id.is_some(),
    };
    let mut report = CheckReport {
        source: end(source, src_ip, &src_id),
        destination: end(dst_pod, dst_ip, &dst_id),
        service,
        port,
        transport: "plaintext".into(),
        transport_reason: String::new(),
        peer_authentication: None,
        authorization: None,
        verdict: CheckVerdict::Allowed,
        hints: Vec::new(),
    };

    if let (Some(d), Some(s)) = (dst_pod, source)
        && d.key == s.key
    {
        report.transport = "local".into();
        report.transport_reason =
            "a pod reaching its own address stays inside its network namespace: not captured, no policy applies".into();
        return Ok(report);
    }
    let Some(dst_workload) = dst_pod.filter(|_| dst_id.is_some()) else {
        report.transport_reason =
            "the destination is not in the mesh: plaintext passthrough, no policy applies".into();
        report.verdict = CheckVerdict::NotEnforced;
        return Ok(report);
    };
    let destination = SocketAddr::new(dst_ip, port);
    let input = match &src_id {
        Some(src_id) => ConnectionInput {
            principal: Some(src_id.principal()),
            namespace: Some(src_id.namespace.clone()),
            source_ip: src_ip,
            destination,
        },
        None => ConnectionInput { principal: None, namespace: None, source_ip: src_ip, destination },
    };
    // The destination agent's own decision function.
    let decision = cluster.decide_inbound(dst_workload, &input, root_namespace);
    if src_id.is_some() {
        report.transport = "mtls".into();
        report.transport_reason = "both ends are in the mesh: HBONE over mutual TLS".into();
    } else if let Some(mtls) = decision.mtls() {
        report.transport_reason = format!(
            "the source is not in the mesh: plaintext, which the destination accepts unless mTLS is STRICT (mode {} set by {})",
            mtls.mode, mtls.decided_by
        );
        report.peer_authentication = Some(mtls.clone());
    }
    match decision {
        InboundDecision::Strict(_) => {
            report.verdict = CheckVerdict::Refused;
            report.hints.push(strict_hint(source, src_ip, port));
        }
        InboundDecision::Authorized { verdict, .. } => {
            if !verdict.allowed {
                report.verdict = CheckVerdict::Denied;
                report.hints.extend(hints(cluster, source, src_ip, dst_workload, &input));
            }
            report.authorization = Some(verdict);
        }
    }
    Ok(report)
}

/// What to do about a plaintext client `STRICT` refuses, in words.
pub(crate) fn strict_hint(source: Option<&Workload>, src_ip: IpAddr, port: u16) -> String {
    match source {
        Some(source) => format!(
            "enroll {} in the mesh (label its namespace or pod istio.io/dataplane-mode=ambient) or add a PERMISSIVE port-level exception",
            source.key
        ),
        None => format!(
            "{src_ip} is outside the mesh: a plaintext client there is refused under STRICT; a port-level PERMISSIVE exception for port {port} (portLevelMtls) admits it"
        ),
    }
}

/// Likely causes of a denial, in words.
pub(crate) fn hints(
    cluster: &Cluster,
    source: Option<&Workload>,
    src_ip: IpAddr,
    dst: &Workload,
    input: &ConnectionInput,
) -> Vec<String> {
    let who = source.map_or_else(|| src_ip.to_string(), |s| s.key.to_string());
    let named: Vec<&str> = cluster
        .authorization
        .for_workload(&dst.key)
        .filter(|p| p.action == Action::Allow)
        .flat_map(|p| p.principals.iter().map(String::as_str))
        .collect();
    let mut hints = Vec::new();
    match &input.principal {
        None if !named.is_empty() => hints.push(format!(
            "{who} is not in the mesh, so its connection has no identity; rules that name principals or namespaces never match it"
        )),
        Some(principal) => {
            let Some(source) = source else { return hints };
            let same_ns: Vec<&&str> =
                named.iter().filter(|p| p.split('/').nth(2) == Some(source.key.namespace.as_str())).collect();
            if !same_ns.is_empty() && !named.iter().any(|p| crate::policy::authorization::pattern_matches(p, principal)) {
                let sa = &source.service_account;
                let why = if sa == "default" {
                    " (the pod sets no spec.serviceAccountName, so it runs as \"default\")".to_owned()
                } else {
                    String::new()
                };
                hints.push(format!(
                    "{} runs as service account {sa}{why}: its identity is {principal}, but the ALLOW policies name {}",
                    source.key,
                    same_ns.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        None => {}
    }
    // A rule the writer meant to allow may have been dropped for an HTTP attribute.
    for policy in cluster.authorization.for_workload(&dst.key).filter(|p| p.action == Action::Allow) {
        hints.extend(policy.http_warnings().map(|w| format!("ALLOW policy {}: {w}", policy.name)));
    }
    hints
}

enum Source<'a> {
    Pod(&'a Workload),
    /// An address no pod has: a client outside the cluster's pods.
    Address(IpAddr),
    /// A CIDR block: its first and last addresses.
    Block {
        first: IpAddr,
        last: IpAddr,
    },
}

/// A pod (by name, or by one of its addresses), another address, or a CIDR block.
fn resolve_source<'a>(cluster: &'a Cluster, src: &str) -> Result<Source<'a>, CheckError> {
    if let Some(pod) = find_pod(cluster, src) {
        return Ok(Source::Pod(pod));
    }
    let unknown = || CheckError::UnknownSource(src.to_owned());
    if let Some((net, len)) = src.split_once('/')
        && let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>())
    {
        let (first, last) = match net {
            IpAddr::V4(v4) if len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                let base = u32::from(v4) & mask;
                (
                    IpAddr::from(std::net::Ipv4Addr::from(base)),
                    IpAddr::from(std::net::Ipv4Addr::from(base | !mask)),
                )
            }
            IpAddr::V6(v6) if len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                let base = u128::from(v6) & mask;
                (
                    IpAddr::from(std::net::Ipv6Addr::from(base)),
                    IpAddr::from(std::net::Ipv6Addr::from(base | !mask)),
                )
            }
            _ => return Err(unknown()),
        };
        return Ok(Source::Block { first, last });
    }
    let ip: IpAddr = src.parse().map_err(|_| unknown())?;
    Ok(match cluster.workload_by_ip(ip) {
        Some(pod) => Source::Pod(pod),
        None => Source::Address(ip),
    })
}

enum Destination<'a> {
    Pod(&'a Workload),
    Ip(IpAddr),
}

fn find_pod<'a>(cluster: &'a Cluster, name: &str) -> Option<&'a Workload> {
    match name.split_once('/') {
        Some((ns, pod)) => {
            cluster.workloads.get(&ObjectKey { namespace: ns.into(), name: pod.into() }).map(|w| &**w)
        }
        None => {
            let mut matches = cluster.workloads.values().filter(|w| w.key.name == name);
            let first = matches.next()?;
            // An unqualified name must be unambiguous.
            matches.next().is_none().then_some(first)
        }
    }
}

/// A pod, a pod IP, a Service (`ns/name`, resolved to a pod it selects), or another IP.
fn resolve_destination<'a>(
    cluster: &'a Cluster,
    dst: &str,
    port: u16,
) -> Result<(Destination<'a>, Option<String>, u16), CheckError> {
    if let Ok(ip) = dst.trim_matches(['[', ']']).parse::<IpAddr>() {
        if let Some(w) = cluster.workload_by_ip(ip) {
            return Ok((Destination::Pod(w), None, port));
        }
        for (key, svc) in &cluster.services {
            let vips = svc.spec.cluster_ip.iter().chain(&svc.spec.cluster_ips);
            if vips.filter_map(|v| v.parse::<IpAddr>().ok()).any(|v| v == ip) {
                return via_service(cluster, key, port);
            }
        }
        return Ok((Destination::Ip(ip), None, port));
    }
    if let Some(w) = find_pod(cluster, dst) {
        return Ok((Destination::Pod(w), None, port));
    }
    let key = match dst.split_once('/') {
        Some((ns, name)) => ObjectKey { namespace: ns.into(), name: name.into() },
        None => match dst.split_once('.') {
            Some((name, ns)) => {
                ObjectKey { namespace: ns.trim_end_matches(".svc.cluster.local").into(), name: name.into() }
            }
            None => return Err(CheckError::UnknownDestination(dst.to_owned())),
        },
    };
    if cluster.services.contains_key(&key) {
        return via_service(cluster, &key, port);
    }
    Err(CheckError::UnknownDestination(dst.to_owned()))
}

/// Where the datapath sends a connection to the Service's virtual address: its first ready
/// endpoint, from the same index the outbound proxy uses (without moving its round robin).
fn via_service<'a>(
    cluster: &'a Cluster,
    key: &ObjectKey,
    port: u16,
) -> Result<(Destination<'a>, Option<String>, u16), CheckError> {
    let svc = &cluster.services[key];
    if !svc.spec.ports.iter().any(|p| p.port == port) {
        return Err(CheckError::NoServicePort { service: key.to_string(), port });
    }
    let mut vips =
        svc.spec.cluster_ip.iter().chain(&svc.spec.cluster_ips).filter_map(|v| v.parse::<IpAddr>().ok());
    let Some(vip) = vips.next() else {
        return Err(CheckError::Headless(key.to_string()));
    };
    let endpoint = cluster
        .services_index
        .get(SocketAddr::new(vip, port))
        .and_then(|backends| backends.endpoints.first().copied())
        .ok_or_else(|| CheckError::NoEndpoint(key.to_string()))?;
    let destination = match cluster.workload_by_ip(endpoint.ip()) {
        Some(w) => Destination::Pod(w),
        None => Destination::Ip(endpoint.ip()),
    };
    Ok((destination, Some(key.to_string()), endpoint.port()))
}
