//! The `ambit` command line: `ambit agent` runs the node agent; the operator commands talk to a
//! running agent's admin API and print tables or JSON.

pub mod client;
pub mod table;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use self::table::Table;
use crate::{admin::StatusReport, redirect::PodReport};

/// Errors of the operator commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The admin API could not be reached or answered badly.
    #[error(transparent)]
    Client(#[from] client::ClientError),
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
    Agent(AgentArgs),
    /// Show the agent's state: source of truth, datapath, readiness.
    Status(OperatorArgs),
    /// List the pods of this node and whether they are captured.
    Workloads(OperatorArgs),
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
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Name of this agent's eBPF state under the bpffs directory; defaults to the node name, so
    /// several simulated nodes can share one host.
    #[arg(long)]
    pub instance: Option<String>,
    /// Where the eBPF state is pinned.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/ambit")]
    pub bpf_dir: PathBuf,
}

/// Options shared by the operator commands.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// The agent's admin API.
    #[arg(long, default_value = "127.0.0.1:15000")]
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
    let status: StatusReport =
        serde_json::from_slice(&body).map_err(|source| CliError::Decode {
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
    t.row([
        "ready",
        if status.ready {
            "yes"
        } else {
            "NO: not every enrolled pod is captured"
        },
    ]);
    t.row(["source", &a.source]);
    let config = match &status.config.error {
        None => format!("ok (generation {})", status.config.generation),
        Some(e) => format!(
            "LAST RELOAD FAILED, serving generation {}: {e}",
            status.config.generation
        ),
    };
    t.row(["config", &config]);
    t.row(["trust domain", &a.trust_domain]);
    t.row(["eBPF pins", &a.pin_dir]);
    t.row(["cgroup root", &a.cgroup_root]);
    let pods = format!(
        "{} captured, {} failed, {} not in the mesh",
        status.pods_captured, status.pods_failed, status.pods_not_enrolled
    );
    t.row(["pods", &pods]);
    Ok(t.render_plain())
}

/// `ambit workloads`.
pub async fn workloads(args: &OperatorArgs) -> Result<String, CliError> {
    let body = client::get(args.admin, "/workloads", TIMEOUT).await?;
    let pods: Vec<PodReport> =
        serde_json::from_slice(&body).map_err(|source| CliError::Decode {
            addr: args.admin,
            path: "/workloads",
            source,
        })?;
    if args.output == Output::Json {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let mut t = Table::new([
        "NAMESPACE",
        "POD",
        "IP",
        "SERVICE ACCOUNT",
        "MODE",
        "CAPTURE",
        "CONNS OUT/IN",
        "NOTE",
    ]);
    for p in &pods {
        let w = &p.workload;
        let ips = w
            .ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
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
