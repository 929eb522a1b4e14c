//! The `ambit` command line: `ambit agent` runs the node agent; the operator commands talk to a
//! running agent's admin API and print tables or JSON.

pub mod client;
pub mod table;
mod what_if;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::identity::CertReport;

use clap::{Args, Parser, Subcommand, ValueEnum};

use self::table::Table;
use crate::{
    admin::StatusReport,
    check::CheckVerdict,
    redirect::PodReport,
    telemetry::{Security, flows::Event},
};

/// Errors of the operator commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The admin API could not be reached or answered badly.
    #[error(transparent)]
    Client(#[from] client::ClientError),
    /// The command line is wrong in a way clap cannot see.
    #[error("{0}")]
    Usage(String),
    /// Nothing matches what was asked for.
    #[error("{0}")]
    NotFound(String),
    /// Input the command cannot use (a file that does not parse, say), named in the message.
    #[error("{0}")]
    Input(String),
    /// The answer is "no": `ambit check --what-if` found traffic the candidate would break. The
    /// report is the output; the exit code is 1.
    #[error("{0}")]
    Breaks(String),
    /// The answer could not be decoded.
    #[error("the agent at {addr} answered {path} with something this ambit cannot read: {source}")]
    Decode {
        /// Admin address.
        addr: SocketAddr,
        /// Endpoint.
        path: &'static str,
        /// Why.
        source: serde_json::Error,
    },
}

/// ambit: a sidecar-free service mesh node agent.
#[derive(Debug, Parser)]
#[command(name = "ambit", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent (needs root).
    Agent(Box<AgentArgs>),
    /// Show the agent's state: source of truth, datapath, readiness.
    Status(OperatorArgs),
    /// List the pods of this node and whether they are captured.
    Workloads(OperatorArgs),
    /// Show the workload certificates the agent holds (all, or the one a pod presents).
    Certs(CertsArgs),
    /// List the PeerAuthentication and AuthorizationPolicies in force for each pod of the node.
    Policies(OperatorArgs),
    /// Will SRC reach DST:PORT? mTLS or plaintext, which policy allows or denies it, and why.
    Check(CheckArgs),
    /// Show flow records: who talked to whom, with which identity, the verdict, how it ended.
    Trace(TraceArgs),
    /// Manage the mesh's root CA.
    #[command(subcommand)]
    Ca(CaCommand),
}

/// `ambit agent` options.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Read the cluster from this multi-document YAML file (re-read when it changes) instead of
    /// the Kubernetes API.
    #[arg(long, value_name = "FILE")]
    pub local: Option<PathBuf>,
    /// The node this agent serves: it captures the enrolled pods with this spec.nodeName.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Admin API address (loopback only).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe address (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// SPIFFE trust domain.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Directory of the embedded CA (`ca-cert.pem`, `ca-key.pem`, Istio's `cacerts` layout):
    /// created on first start when absent, used as it is when present (bring your own root;
    /// read-only is fine). Agents sharing it share trust. Not read with --ca-addr.
    #[arg(long, value_name = "DIR", env = "AMBIT_CA_DIR", default_value = "/var/lib/ambit/ca")]
    pub ca_dir: PathBuf,
    /// Get certificates from this CA service (`ambit ca serve`, or istiod) instead of the
    /// embedded CA: keys are made on the node and never leave it, and no CA key is read.
    #[arg(long, value_name = "URL", env = "AMBIT_CA_ADDR", requires = "ca_root")]
    pub ca_addr: Option<String>,
    /// With --ca-addr: the trust bundle, one or more root PEMs (old and new during a root
    /// rotation). Re-read when it changes.
    #[arg(long, value_name = "FILE", env = "AMBIT_CA_ROOT", requires = "ca_addr")]
    pub ca_root: Option<PathBuf>,
    /// With --ca-addr: this agent's service-account token for the CA (audience `istio-ca`),
    /// read at every request.
    #[arg(
        long,
        value_name = "FILE",
        env = "AMBIT_CA_TOKEN",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub ca_token: PathBuf,
    /// Lifetime of workload certificates (e.g. 24h, 90m, 30s); they are renewed at half-life.
    #[arg(long, value_name = "DURATION", env = "AMBIT_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// Istio's root namespace: policies there apply mesh-wide.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// Trace the connections of every pod of the node, not only enrolled ones (unprotected
    /// traffic shows up as such).
    #[arg(long, env = "AMBIT_TRACE_ALL", conflicts_with = "no_flows")]
    pub trace_all: bool,
    /// Send connections between two pods of this node through HBONE (mutual TLS from the agent
    /// to itself) instead of joining them in the agent. The bytes stay in the node either way;
    /// this is for operators whose rules require TLS on every hop.
    #[arg(long, env = "AMBIT_SAME_NODE_HBONE")]
    pub same_node_hbone: bool,
    /// Deliver inbound connections to apps from the agent's address in the pod instead of the
    /// client's: by default the app's `getpeername()` returns the client (as with ztunnel), for
    /// its access logs, rate limits and allow-lists.
    #[arg(long, env = "AMBIT_NO_CLIENT_ADDRESS")]
    pub no_client_address: bool,
    /// Do not trace connections in the kernel (no flow records; capture and policy unchanged).
    #[arg(long)]
    pub no_flows: bool,
    /// Kinds of inbound connection remembered for `ambit check --what-if`: one entry per
    /// destination pod, source (identity and address), port and verdict, however many
    /// connections it stands for; the least recently seen is forgotten first. An entry costs
    /// at most 512 bytes (the default, about 5 MiB); the history is in memory only and starts
    /// empty when the agent starts. 0 turns it off.
    #[arg(long, env = "AMBIT_FLOW_HISTORY", value_name = "ENTRIES", default_value_t = crate::telemetry::history::DEFAULT_ENTRIES)]
    pub flow_history: usize,
    /// Size of the kernel's flow event buffer in bytes (a power of two, at least 4096); events
    /// beyond it are counted as dropped, never waited for. The default holds about 13,000
    /// events (2,000 connections opened in one burst); it is locked kernel memory, and shows
    /// twice in the agent's RSS (the ring is mapped twice).
    #[arg(long, default_value_t = 1 << 21, value_parser = parse_ring_size)]
    pub flow_buffer_bytes: u32,
    /// Name of this agent's eBPF state under the bpffs directory; defaults to the node name, so
    /// several simulated nodes can share one host.
    #[arg(long)]
    pub instance: Option<String>,
    /// Where the eBPF state is pinned.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/ambit")]
    pub bpf_dir: PathBuf,
    /// On SIGTERM, how long open connections may take to finish before the agent exits (new
    /// ones go to the agent that replaces this one, or fail closed). Keep it shorter than the
    /// pod's terminationGracePeriodSeconds.
    #[arg(long, value_name = "DURATION", env = "AMBIT_DRAIN_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// `ambit certs` options.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Only the certificate this pod presents (`namespace/name`, or `name` in any namespace).
    pub pod: Option<String>,
    /// Connection options.
    #[command(flatten)]
    pub operator: OperatorArgs,
}

/// `ambit ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root CA (ECDSA P-256) in DIR, unless one is there: `ca-cert.pem`, `ca-key.pem`.
    /// For a cluster: `kubectl -n ambit-system create secret generic ambit-ca --from-file=DIR`.
    Init {
        /// Where to write it.
        #[arg(long)]
        dir: PathBuf,
        /// The trust domain it serves (recorded in its subject and SAN).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Serve the mesh CA: Istio's certificate protocol on 15012, for node agents (and
    /// ztunnels) that authenticate with Kubernetes service-account tokens.
    Serve(Box<CaServeArgs>),
    /// Start a root rotation: a new root in TO, and the trust bundle of old and new roots that
    /// agents must trust before the CA switches (README, "Rotating the root").
    Rotate {
        /// The current CA directory (`ca-cert.pem`, and `root-cert.pem` if any).
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// Where the new CA is written; must not hold one.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// The trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// End a root rotation: the CA in DIR trusts only its own root again (rewrites
    /// `root-cert.pem`); give agents that file as their bundle once every certificate is
    /// renewed from the new root.
    Finish {
        /// The new CA directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

/// `ambit ca serve` options.
#[derive(Debug, Args)]
pub struct CaServeArgs {
    /// The CA's key material in Istio's `cacerts` layout: `ca-cert.pem` and `ca-key.pem` (a
    /// root, or an intermediate), optional `cert-chain.pem` and `root-cert.pem`. Read, never
    /// written; re-read when it changes (a rotated Secret).
    #[arg(long, value_name = "DIR", env = "AMBIT_CA_DIR", default_value = "/etc/cacerts")]
    pub ca_dir: PathBuf,
    /// Where the certificate service listens.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub addr: SocketAddr,
    /// Readiness (`/healthz/ready`: the pods of the cluster are listed) and `/metrics`.
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// SPIFFE trust domain of the identities issued.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Service accounts (`namespace/name`, comma-separated) of node agents: they may ask for the
    /// identity of any pod scheduled on their own node. Add `istio-system/ztunnel` for ztunnels.
    #[arg(
        long,
        env = "AMBIT_TRUSTED_NODE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "ambit-system/ambit"
    )]
    pub trusted_node_accounts: Vec<String>,
    /// The longest lifetime a certificate may be asked for; longer requests are refused.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,
    /// The audience callers' tokens must be issued for.
    #[arg(long, default_value = "istio-ca")]
    pub audience: String,
    /// DNS names of the serving certificate (comma-separated): what clients put in `--ca-addr`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ambit-ca.ambit-system.svc,ambit-ca.ambit-system.svc.cluster.local,ambit-ca.ambit-system,ambit-ca"
    )]
    pub server_names: Vec<String>,
    /// IP addresses of the serving certificate (comma-separated), for clients that dial an
    /// address.
    #[arg(long, value_delimiter = ',')]
    pub server_ips: Vec<std::net::IpAddr>,
}

/// `ambit ca init`.
pub fn ca_init(dir: &std::path::Path, trust_domain: &str) -> Result<String, crate::identity::IdentityError> {
    let existed = dir.join(crate::identity::ca::CA_CERT).exists();
    let ca = crate::identity::Ca::load_or_create(dir, trust_domain)?;
    let verb = if existed { "uses the existing" } else { "created a new" };
    Ok(format!("{} {verb} root CA ({} bytes of certificate)\n", dir.display(), ca.cert().len()))
}

/// `ambit ca rotate`.
pub fn ca_rotate(
    from: &std::path::Path,
    to: &std::path::Path,
    trust_domain: &str,
) -> Result<String, crate::identity::IdentityError> {
    use crate::identity::ca;
    let root = ca::rotate(from, to, trust_domain)?;
    let bundle = to.join(ca::ROOT_CERT);
    Ok(format!(
        "new root CA in {to} (SHA-256 {fp})\n\
         trust bundle (new and old roots): {bundle}\n\n\
         next:\n\
         1. give every agent the bundle (--ca-root; in a cluster the ambit-ca-root ConfigMap) and wait\n\
         \x20  until `ambit status` on each node lists both roots;\n\
         2. give the CA service {to} (the ambit-ca Secret); it reloads within seconds and signs with the new root;\n\
         3. wait until `ambit certs` shows every certificate on the new root (at most half the certificate lifetime);\n\
         4. `ambit ca finish --dir {to}`, then give agents and the CA the new root alone.\n",
        to = to.display(),
        fp = ca::fingerprint(&root),
        bundle = bundle.display(),
    ))
}

/// `ambit ca finish`.
pub fn ca_finish(
    dir: &std::path::Path,
    trust_domain: &str,
) -> Result<String, crate::identity::IdentityError> {
    use crate::identity::ca;
    let root = ca::finish(dir, trust_domain)?;
    Ok(format!(
        "{} now trusts only its own root (SHA-256 {}); give agents {} as their bundle\n",
        dir.display(),
        ca::fingerprint(&root),
        dir.join(ca::ROOT_CERT).display()
    ))
}

/// `ambit check` options.
#[derive(Debug, Args)]
#[command(after_help = "With --what-if, no SRC and DST: the connections the agents saw are the question.\n\
    Exit code 0 when nothing allowed today would be refused or denied, 1 otherwise, 2 for bad input.")]
pub struct CheckArgs {
    /// The source: a pod (`namespace/name`, or `name` when unambiguous), or a client outside
    /// the mesh by address (`10.0.0.5`) or CIDR block (`10.0.0.0/24`: both ends are checked).
    #[arg(required_unless_present = "what_if", conflicts_with = "what_if")]
    pub src: Option<String>,
    /// The destination and port: `namespace/pod:8080`, `namespace/service:80` or `10.0.0.3:8080`
    /// (`[fd00::3]:8080`).
    #[arg(required_unless_present = "what_if")]
    pub dst: Option<String>,
    /// What would these policies (PeerAuthentication and AuthorizationPolicy, as for `kubectl
    /// apply`; `-` for stdin) do to the connections the agent saw? They are added to the
    /// policies in force, replacing those of the same kind and name. Nothing is applied.
    #[arg(long, value_name = "FILE")]
    pub what_if: Option<PathBuf>,
    /// With --what-if: also take this policy out (`namespace/name`; repeatable).
    #[arg(long, value_name = "NS/NAME", requires = "what_if")]
    pub delete: Vec<String>,
    /// With --what-if: only connections seen this recently (e.g. 1h, 30m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "what_if")]
    pub since: Option<Duration>,
    /// With --what-if: also ask the agent at this admin address (repeatable); each answers for
    /// the pods of its node.
    #[arg(long, value_name = "ADDR", requires = "what_if")]
    pub agent: Vec<SocketAddr>,
    /// Connection options.
    #[command(flatten)]
    pub operator: OperatorArgs,
}

/// `ambit trace` options.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Keep printing new flows as they happen.
    #[arg(short, long)]
    pub follow: bool,
    /// Only flows from this pod (`namespace/name` or `name`).
    #[arg(long, value_name = "POD")]
    pub from: Option<String>,
    /// Only flows to this pod.
    #[arg(long, value_name = "POD")]
    pub to: Option<String>,
    /// Only flows with an end in this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only flows with this verdict.
    #[arg(long, value_parser = ["allowed", "denied", "refused", "error", "unprotected"])]
    pub verdict: Option<String>,
    /// Only flows to this destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// At most this many past flows (default: all kept; with --follow: none).
    #[arg(long)]
    pub last: Option<usize>,
    /// Only flows an AUDIT AuthorizationPolicy matched (Istio's AUDIT: marked, verdict
    /// unchanged): stage a policy as AUDIT and read what it would have matched.
    #[arg(long)]
    pub audited: bool,
    /// The agent's admin API (e.g. the local end of `kubectl port-forward`).
    #[arg(long, env = "AMBIT_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Output: one line per flow, JSON lines, or a table.
    #[arg(short, long, value_enum, default_value_t = TraceOutput::Compact)]
    pub output: TraceOutput,
}

/// `ambit trace` output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TraceOutput {
    /// One readable line per flow.
    Compact,
    /// One JSON object per line (stable field names).
    Json,
    /// Aligned columns (without --follow).
    Table,
}

fn parse_ring_size(text: &str) -> Result<u32, String> {
    let n: u32 = text.parse().map_err(|_| format!("{text:?} is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 4096"));
    }
    Ok(n)
}

/// Parses `24h`, `90m`, `30s`, `1h30m` or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86_400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(format!("{text:?}: unknown unit {c:?} (use d, h, m, s)")),
        };
        let n: u64 = number.parse().map_err(|_| format!("{text:?}: a number must come before {c:?}"))?;
        total += n * unit;
        number.clear();
    }
    if !number.is_empty() || total == 0 {
        return Err(format!("{text:?} is not a duration like 24h, 90m or 30s"));
    }
    Ok(Duration::from_secs(total))
}

/// Options shared by the operator commands.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// The agent's admin API (e.g. the local end of `kubectl port-forward`).
    #[arg(long, env = "AMBIT_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Output formats of the operator commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

const TIMEOUT: Duration = Duration::from_secs(5);

/// `ambit status`.
pub async fn status(args: &OperatorArgs) -> Result<String, CliError> {
    let body = client::get(args.admin, "/status", TIMEOUT).await?;
    let status: StatusReport = serde_json::from_slice(&body).map_err(|source| CliError::Decode {
        addr: args.admin,
        path: "/status",
        source,
    })?;
    if args.output == Output::Json {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let a = &status.agent;
    let mut t = Table::new(["", ""]);
    t.row(["node", &a.node]);
    t.row(["version", &a.version]);
    let not_ready = match (status.datapath.superseded_by, status.datapath.broken.is_empty()) {
        (Some(pid), _) => {
            format!("NO: a newer agent (pid {pid}) took this node over; this one finishes its connections")
        }
        (None, true) if !status.ca.pending.is_empty() => {
            format!("NO: waiting for certificates from the CA: {}", status.ca.pending.join(", "))
        }
        (None, true) => "NO: not every enrolled pod is captured".to_owned(),
        (None, false) => format!("NO: {}", status.datapath.broken.join("; ")),
    };
    t.row(["ready", if status.ready { "yes" } else { &not_ready }]);
    t.row(["source", &a.source]);
    let config = match &status.config.error {
        None => format!("ok (generation {})", status.config.generation),
        Some(e) => format!("LAST RELOAD FAILED, serving generation {}: {e}", status.config.generation),
    };
    t.row(["config", &config]);
    t.row(["trust domain", &a.trust_domain]);
    t.row(["eBPF pins", &a.pin_dir]);
    t.row(["cgroup root", &a.cgroup_root]);
    let mut pods = format!("{} captured, {} failed", status.pods_captured, status.pods_failed);
    if status.pods_refused > 0 {
        pods.push_str(&format!(", {} REFUSED (see ambit workloads)", status.pods_refused));
    }
    pods.push_str(&format!(", {} not in the mesh", status.pods_not_enrolled));
    t.row(["pods", &pods]);
    let datapath = match (status.datapath.repairs_total, status.datapath.last_repaired.is_empty()) {
        (0, _) => "intact".to_owned(),
        (n, true) => format!("intact ({n} repairs since start)"),
        (n, false) => {
            let last = &status.datapath.last_repaired;
            let more = if last.len() > 1 {
                format!(" and {} more, see -o json", last.len() - 1)
            } else {
                String::new()
            };
            format!("REPAIRED just now: {}{more} ({n} repairs since start)", last[0])
        }
    };
    t.row(["datapath", &datapath]);
    let ca = &status.ca;
    t.row(["CA", &ca_state(ca)]);
    let bundle = ca.bundle_file.as_deref().map(|f| format!(" from {f}")).unwrap_or_default();
    for (i, root) in ca.roots.iter().enumerate() {
        let label = if i == 0 { format!("trust bundle{bundle}") } else { String::new() };
        t.row([
            label.as_str(),
            &format!("{} ({}, until {})", root.fingerprint, root.subject, utc(root.not_after)),
        ]);
    }
    Ok(t.render_plain())
}

/// The CA's state in one line: where certificates come from, and whether that works.
fn ca_state(ca: &crate::identity::CaReport) -> String {
    let now = crate::sys::unix_now();
    let pending = if ca.pending.is_empty() {
        String::new()
    } else {
        format!("; waiting for {}", ca.pending.join(", "))
    };
    match (ca.failing_since, &ca.last_error, ca.last_issued) {
        (Some(since), Some(e), _) => {
            format!("{}: FAILING for {}: {e}{pending}", ca.issuer, human(now.saturating_sub(since)))
        }
        (_, _, Some(last)) => {
            format!("{}: ok (last certificate {} ago){pending}", ca.issuer, human(now.saturating_sub(last)))
        }
        _ => format!("{}{pending}", ca.issuer),
    }
}

/// `ambit workloads`.
pub async fn workloads(args: &OperatorArgs) -> Result<String, CliError> {
    let body = client::get(args.admin, "/workloads", TIMEOUT).await?;
    let pods: Vec<PodReport> = serde_json::from_slice(&body).map_err(|source| CliError::Decode {
        addr: args.admin,
        path: "/workloads",
        source,
    })?;
    if args.output == Output::Json {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let mut t =
        Table::new(["NAMESPACE", "POD", "IP", "SERVICE ACCOUNT", "MODE", "CAPTURE", "CONNS OUT/IN", "NOTE"]);
    for p in &pods {
        let w = &p.workload;
        let ips = w.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let conns = p
            .stats
            .as_ref()
            .map(|s| s.snapshot())
            .map(|s| format!("{}/{}", s.outbound, s.inbound))
            .unwrap_or_else(|| "-".into());
        t.row([
            w.key.namespace.as_str(),
            &w.key.name,
            &ips,
            &w.service_account,
            &w.enrollment.to_string(),
            &p.state.to_string(),
            &conns,
            p.error.as_deref().unwrap_or(""),
        ]);
    }
    Ok(t.render())
}

/// `ambit certs`.
pub async fn certs(args: &CertsArgs) -> Result<String, CliError> {
    let admin = args.operator.admin;
    let body = client::get(admin, "/certs", TIMEOUT).await?;
    let mut certs: Vec<CertReport> = serde_json::from_slice(&body).map_err(|source| CliError::Decode {
        addr: admin,
        path: "/certs",
        source,
    })?;
    if let Some(pod) = &args.pod {
        certs.retain(|c| c.pods.iter().any(|p| p == pod || p.rsplit('/').next() == Some(pod.as_str())));
        if certs.is_empty() {
            return Err(CliError::NotFound(format!(
                "no certificate for pod {pod} on this node (is it captured? see `ambit workloads`)"
            )));
        }
    }
    if args.operator.output == Output::Json {
        return serde_json::to_string_pretty(&certs).map(|s| s + "\n").map_err(|source| CliError::Decode {
            addr: admin,
            path: "/certs",
            source,
        });
    }
    let now = crate::sys::unix_now();
    // The CA's state heads the table: a certificate about to expire means more with it.
    let status = client::get(admin, "/status", TIMEOUT).await.ok();
    let header = match status.and_then(|b| serde_json::from_slice::<StatusReport>(&b).ok()) {
        Some(status) => format!("CA: {}\n\n", ca_state(&status.ca)),
        None => String::new(),
    };
    let mut t = Table::new(["IDENTITY", "SERIAL", "VALID FROM", "VALID UNTIL", "REFRESH IN", "ROOT", "PODS"]);
    for c in &certs {
        let refresh = c.refresh_at.saturating_sub(now);
        // The first bytes of the fingerprint tell roots apart during a rotation.
        let root = c.root.as_deref().map_or("-".to_owned(), |r| r.chars().take(11).collect());
        t.row([
            c.identity.as_str(),
            &c.serial,
            &utc(c.not_before),
            &utc(c.not_after),
            &human(refresh),
            &root,
            &c.pods.join(","),
        ]);
    }
    Ok(header + &t.render())
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SSZ`.
fn utc(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| secs.to_string())
}

/// `3h12m`, `45s`.
fn human(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// `ambit policies`.
pub async fn policies(args: &OperatorArgs) -> Result<String, CliError> {
    let body = client::get(args.admin, "/policies", TIMEOUT).await?;
    if args.output == Output::Json {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let listing: Vec<crate::policy::WorkloadPolicies> = serde_json::from_slice(&body)
        .map_err(|source| CliError::Decode { addr: args.admin, path: "/policies", source })?;
    let mut t = Table::new(["POD", "MTLS", "PORT EXCEPTIONS", "AUTHORIZATION (evaluation order)"]);
    for w in &listing {
        let mtls = format!("{} ({})", w.mtls.mode, w.mtls.decided_by);
        let ports = w.port_mtls.iter().map(|(p, d)| format!("{p}:{}", d.mode)).collect::<Vec<_>>().join(" ");
        let authz = if w.authorization.is_empty() {
            "none: all allowed".to_owned()
        } else {
            w.authorization
                .iter()
                .map(|p| {
                    let http =
                        if p.http_only.is_empty() { String::new() } else { " [HTTP-only fields]".to_owned() };
                    format!(
                        "{} {} ({} rule{}){http}",
                        p.action,
                        p.name,
                        p.rules,
                        if p.rules == 1 { "" } else { "s" }
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        t.row([w.pod.as_str(), &mtls, if ports.is_empty() { "-" } else { &ports }, &authz]);
    }
    Ok(t.render())
}

/// `ambit check`.
pub async fn check(args: &CheckArgs) -> Result<String, CliError> {
    if let Some(file) = &args.what_if {
        return what_if::run(args, file).await;
    }
    let admin = args.operator.admin;
    let (Some(src), Some(dst)) = (&args.src, &args.dst) else {
        return Err(CliError::Usage("SRC and DST:PORT are needed (or --what-if FILE)".into()));
    };
    let (dst, port) = dst
        .rsplit_once(':')
        .and_then(|(d, p)| Some((d, p.parse::<u16>().ok()?)))
        .ok_or_else(|| CliError::Usage(format!("destination {dst:?} needs a port: DST:PORT")))?;
    let path = format!("/check?src={}&dst={}&port={port}", encode(src), encode(dst));
    let body = client::get(admin, &path, TIMEOUT).await?;
    if args.operator.output == Output::Json {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let r: crate::check::CheckReport = serde_json::from_slice(&body).map_err(|source| CliError::Decode {
        addr: admin,
        path: "/check",
        source,
    })?;
    let end = |e: &crate::check::End| {
        let who = e.pod.clone().unwrap_or_else(|| "(not a pod)".into());
        let id = e.identity.clone().unwrap_or_else(|| "no identity (not in the mesh)".into());
        format!("{who}  {}  {id}", e.ip)
    };
    let mut t = Table::new(["", ""]);
    t.row(["source", &end(&r.source)]);
    let destination = match &r.service {
        Some(svc) => format!("{}  (via Service {svc})", end(&r.destination)),
        None => end(&r.destination),
    };
    t.row(["destination", &destination]);
    t.row(["port", &r.port.to_string()]);
    let transport = match r.transport.as_str() {
        "mtls" => format!("mTLS (HBONE): {}", r.transport_reason),
        "local" => format!("local: {}", r.transport_reason),
        _ => format!("plaintext: {}", r.transport_reason),
    };
    t.row(["transport", &transport]);
    let authz = match &r.authorization {
        Some(v) => {
            let audit = if v.audit.is_empty() {
                String::new()
            } else {
                format!(" (audited by {})", v.audit.join(", "))
            };
            format!("{}{audit}", v.reason)
        }
        None => "-".into(),
    };
    t.row(["authorization", &authz]);
    let verdict = match r.verdict {
        CheckVerdict::Allowed => "ALLOWED",
        CheckVerdict::Denied => "DENIED by AuthorizationPolicy",
        CheckVerdict::Refused => {
            "REFUSED: the destination requires mTLS (STRICT) and the source cannot provide it"
        }
        CheckVerdict::NotEnforced => "NOT ENFORCED (not-enforced): the destination is outside the mesh",
    };
    t.row(["verdict", verdict]);
    for hint in &r.hints {
        t.row(["hint", hint]);
    }
    Ok(t.render_plain())
}

/// `ambit trace`: prints as it receives, so `--follow` streams.
pub async fn trace(args: &TraceArgs) -> Result<String, CliError> {
    use std::io::Write as _;
    let mut query = vec![format!("follow={}", u8::from(args.follow))];
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            query.push(format!("{k}={}", encode(&v)));
        }
    };
    add("from", args.from.clone());
    add("to", args.to.clone());
    add("namespace", args.namespace.clone());
    add("verdict", args.verdict.clone());
    add("port", args.port.map(|p| p.to_string()));
    add("last", args.last.map(|l| l.to_string()));
    add("audited", args.audited.then(|| "1".to_owned()));
    let path = format!("/trace?{}", query.join("&"));
    let mut table = Table::new([
        "TIME",
        "EVENT",
        "SOURCE",
        "DESTINATION",
        "SECURITY",
        "VERDICT",
        "END",
        "SENT/RECV",
        "WHY",
    ]);
    let mut stdout = std::io::stdout().lock();
    let output = args.output;
    client::stream_lines(args.admin, &path, TIMEOUT, |line| {
        let Ok(record) = serde_json::from_slice::<crate::telemetry::flows::FlowRecord>(line) else { return };
        match output {
            TraceOutput::Json => {
                let _ = stdout.write_all(line);
                let _ = stdout.write_all(b"\n");
            }
            TraceOutput::Compact => {
                let _ = writeln!(stdout, "{}", compact(&record));
            }
            TraceOutput::Table => {
                let row = table_row(&record);
                table.row(
                    [&row[0], &row[1], &row[2], &row[3], &row[4], &row[5], &row[6], &row[7], &row[8]]
                        .map(String::as_str),
                );
            }
        }
        let _ = stdout.flush();
    })
    .await?;
    Ok(if output == TraceOutput::Table { table.render() } else { String::new() })
}

fn endpoint(peer: &crate::telemetry::flows::Peer) -> String {
    let at = match (&peer.pod, peer.ip) {
        (Some(pod), _) => format!("{pod}:{}", peer.port),
        (None, Some(ip)) => std::net::SocketAddr::new(ip, peer.port).to_string(),
        (None, None) => "?".into(),
    };
    match &peer.identity {
        Some(id) => format!("{at} ({})", id.rsplit("/sa/").next().unwrap_or(id)),
        None => at,
    }
}

fn why(record: &crate::telemetry::flows::FlowRecord) -> String {
    let why = match (&record.policy, &record.reason) {
        (Some(policy), Some(reason)) if !reason.contains(policy.as_str()) => format!("{policy}: {reason}"),
        (_, Some(reason)) => reason.clone(),
        (Some(policy), None) => policy.clone(),
        (None, None) => String::new(),
    };
    match record.audit.as_slice() {
        [] => why,
        audit => format!("{why} [audited by {}]", audit.join(", ")),
    }
}

fn table_row(r: &crate::telemetry::flows::FlowRecord) -> [String; 9] {
    let security = match r.security {
        Security::MutualTls => "mTLS".to_owned(),
        Security::Plaintext => r.security.to_string(),
    };
    let end = match (&r.end, &r.end_reason) {
        (Some(end), Some(why)) => format!("{end} ({why})"),
        (Some(end), None) => end.to_string(),
        _ => "-".into(),
    };
    [
        r.time.get(11..23).unwrap_or(&r.time).to_owned(),
        r.event.to_string(),
        endpoint(&r.src),
        endpoint(&r.dst),
        security,
        r.verdict.as_str().to_uppercase(),
        end,
        format!("{}/{}", r.bytes_sent, r.bytes_received),
        why(r),
    ]
}

/// One line per flow, like `hubble observe`.
fn compact(r: &crate::telemetry::flows::FlowRecord) -> String {
    let [time, event, src, dst, security, verdict, end, bytes, why] = table_row(r);
    let mut line = format!("{time} {event:<7} {src} -> {dst} {security} {verdict}");
    if r.event != Event::Open {
        line.push_str(&format!(" end={end} bytes={bytes}"));
    }
    if !why.is_empty() {
        line.push_str(&format!(" | {why}"));
    }
    line
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
