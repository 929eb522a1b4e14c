//! `ambit agent`'s arguments turned into the decisions they stand for, checked before anything
//! is built: where the cluster comes from, where certificates come from, what is traced.

use std::path::PathBuf;

use super::AgentError;
use crate::{cli::AgentArgs, redirect::Tracing};

/// Where the agent learns about the cluster.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ClusterSource {
    /// A local cluster file, by absolute path (it is re-read from there).
    File(PathBuf),
    /// The Kubernetes API.
    Kubernetes,
}

/// Where the pods' certificates come from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Certificates {
    /// The mesh CA service (`ambit ca serve`), trusted through the bundle at `root`.
    Service {
        /// Its address.
        addr: String,
        /// The trust bundle file.
        root: PathBuf,
    },
    /// A CA embedded in the agent, kept in this directory.
    Embedded(PathBuf),
}

/// A validated `ambit agent` configuration.
#[derive(Debug)]
pub(crate) struct Config {
    /// The pinning instance: the node name unless `--instance` says otherwise.
    pub(crate) instance: String,
    pub(crate) cluster: ClusterSource,
    pub(crate) certificates: Certificates,
    pub(crate) tracing: Tracing,
    /// Everything else, as given.
    pub(crate) args: AgentArgs,
}

impl Config {
    /// Checks `args` and derives what they decide; a usage error names the option at fault.
    pub(crate) fn from_args(args: AgentArgs) -> Result<Self, AgentError> {
        if args.node.trim().is_empty() {
            return Err(AgentError::Usage("--node (or NODE_NAME) must not be empty".into()));
        }
        // The instance names one directory under --bpf-dir: `..` or `a/b` would put the pins
        // (and what the next agent removes as stale) somewhere else.
        if let Some(instance) = args.instance.as_deref() {
            let mut parts = std::path::Path::new(instance).components();
            if !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) {
                return Err(AgentError::Usage(format!(
                    "--instance {instance:?} must be one directory name (no '/', not '.' or '..'): it names the pin directory under --bpf-dir"
                )));
            }
        }
        let cluster = match &args.local {
            Some(file) => ClusterSource::File(std::path::absolute(file).unwrap_or_else(|_| file.clone())),
            None => ClusterSource::Kubernetes,
        };
        // clap requires both or neither; a half-given pair must not fall back to a local CA.
        let certificates = match (&args.ca_addr, &args.ca_root) {
            (Some(addr), Some(root)) => Certificates::Service { addr: addr.clone(), root: root.clone() },
            (None, None) => Certificates::Embedded(args.ca_dir.clone()),
            _ => return Err(AgentError::Usage("--ca-addr and --ca-root go together".into())),
        };
        let tracing = match (args.no_flows, args.trace_all) {
            (true, true) => {
                return Err(AgentError::Usage("--no-flows and --trace-all contradict each other".into()));
            }
            (true, false) => Tracing::Off,
            (false, true) => Tracing::AllPods,
            (false, false) => Tracing::Enrolled,
        };
        let instance = args.instance.clone().unwrap_or_else(|| args.node.clone());
        Ok(Self { instance, cluster, certificates, tracing, args })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn config(line: &str) -> Result<Config, AgentError> {
        let cli = crate::cli::Cli::try_parse_from(format!("ambit agent {line}").split_whitespace())
            .map_err(|e| AgentError::Usage(e.to_string()))?;
        match cli.command {
            crate::cli::Command::Agent(args) => Config::from_args(*args),
            _ => unreachable!("an agent command line"),
        }
    }

    #[test]
    fn arguments_become_decisions() {
        let c = config("--node n1 --local cluster.yaml").expect("valid");
        assert_eq!(c.instance, "n1");
        assert!(
            matches!(c.cluster, ClusterSource::File(ref f) if f.is_absolute() && f.ends_with("cluster.yaml"))
        );
        assert!(matches!(c.certificates, Certificates::Embedded(_)));
        assert_eq!(c.tracing, Tracing::Enrolled);
        let c = config("--node n1 --instance i1 --ca-addr https://ca:15012 --ca-root /r.pem --trace-all")
            .expect("valid");
        assert_eq!(
            (c.instance.as_str(), c.cluster, c.tracing),
            ("i1", ClusterSource::Kubernetes, Tracing::AllPods)
        );
        assert!(
            matches!(c.certificates, Certificates::Service { ref addr, .. } if addr == "https://ca:15012")
        );
    }

    #[test]
    fn contradictions_are_usage_errors_naming_the_options() {
        for (line, named) in [
            ("--node=", "--node"),
            ("--node n1 --no-flows --trace-all", "--no-flows"),
            ("--node n1 --instance a/b", "--instance"),
            ("--node n1 --instance ..", "--instance"),
            ("--node n1 --instance .", "--instance"),
            ("--node n1 --instance=", "--instance"),
        ] {
            let error = config(line).expect_err(line).to_string();
            assert!(error.contains(named), "{line}: {error}");
        }
    }
}
