//! `ambit agent`: wires the source of truth, the datapath, the proxies and the admin endpoints
//! together, and runs until SIGTERM or SIGINT.
//!
//! Shutting down leaves the eBPF programs and maps pinned: enrolled pods stay captured and fail
//! closed until the next agent takes over.

mod app;
mod config;

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info};

use self::{
    app::{App, Reports},
    config::Config,
};
use crate::{
    admin::{self, AdminError},
    bpf::BpfError,
    cli::AgentArgs,
    discovery::DiscoveryError,
    identity::IdentityError,
    proxy::Proxy,
    redirect::{Redirector, Round},
    state::Cluster,
    sys::netns::Netns,
    tls::TlsError,
};

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Configuration problem (exit code 2).
    #[error(transparent)]
    Config(#[from] DiscoveryError),
    /// Options that cannot work together (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// Not running as root.
    #[error(
        "ambit agent must run as root (it loads eBPF programs and enters pod network namespaces); running as uid {0}"
    )]
    NotRoot(u32),
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The kernel side failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// An endpoint could not be served.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// A long-lived task ended while the agent ran.
    #[error("the {task} ended: {reason}")]
    TaskEnded {
        /// Which.
        task: &'static str,
        /// How: returned, or the panic message.
        reason: String,
    },
    /// Something else at start.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

impl AgentError {
    /// The process exit code: 2 for configuration and usage errors, 1 for runtime failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Runs the agent until a termination signal.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let config = Config::from_args(args)?;
    let uid = nix::unistd::geteuid().as_raw();
    if uid != 0 {
        return Err(AgentError::NotRoot(uid));
    }
    crate::sys::capability::report();
    raise_fd_limit();
    // The descriptor given up at the open-files limit to refuse a connection fast.
    crate::listener::reserve_spare();
    let app = app::build(config).await?;
    serve(app).await
}

/// The main loop: reconciles the pods with each snapshot, keeps the datapath whole, publishes
/// the reports, and drains on SIGTERM or SIGINT.
async fn serve(app: App) -> Result<(), AgentError> {
    let App {
        mut redirector,
        proxy,
        identities,
        flows,
        changes,
        synced,
        mut issued,
        reports,
        mut tasks,
        drain_timeout,
    } = app;
    let Reports { pods: pods_tx, ready: ready_tx, datapath: datapath_tx, certs: certs_tx, ca: ca_tx } =
        reports;
    let mut changes = changes;
    let mut terminate = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = signal(tokio::signal::unix::SignalKind::interrupt())?;
    // Retry pods that failed (e.g. a netns that appears later) without waiting for an edit.
    let mut retry = tokio::time::interval(std::time::Duration::from_secs(2));
    // Pins can be removed and links detached under a running agent: check, and put them back.
    let mut verify = tokio::time::interval(VERIFY_EVERY);
    verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What woke the loop decides the work: a new snapshot is reconciled and re-checks open
    // connections, a retry only reconciles, a verify tick only checks the kernel's state.
    let mut wake = Wake::Changed;
    loop {
        let cluster: Arc<Cluster> = changes.borrow_and_update().clone();
        // Before the first full list the agent knows nothing: reconciling then would release
        // what a previous agent left enforcing. Wait for it.
        if *synced.borrow() {
            match wake {
                Wake::Changed => {
                    redirector.reconcile(&cluster, Round::Changes);
                    proxy.revalidate(&cluster);
                }
                Wake::Retry => redirector.reconcile(&cluster, Round::Full),
                Wake::Verify => {
                    redirector.verify(&cluster);
                    identities.reload_bundle();
                }
                Wake::Refresh => {}
            }
        }
        let (check, repairs_total) = redirector.datapath_health();
        datapath_tx.send_replace(admin::DatapathHealth {
            broken: check.broken.clone(),
            last_repaired: check.repaired.clone(),
            repairs_total,
            superseded_by: redirector.successor(),
        });
        flows.set_pods(redirector.traced_pods());
        pods_tx.send_replace(Arc::new(redirector.reports(&cluster)));
        // Ready once the source has been read in full, every enrolled pod is captured, the
        // datapath is whole and every enrolled pod's identity has its certificate.
        let by_identity = redirector.pods_by_identity();
        let missing = identities.missing(by_identity.keys());
        let ready = *synced.borrow() && redirector.all_captured() && missing.is_empty();
        if ready_tx.send_replace(ready) != ready {
            if ready {
                info!("ready: every enrolled pod of the node is captured");
            } else {
                info!(successor = redirector.successor(), without_certificate = ?missing.iter().map(ToString::to_string).collect::<Vec<_>>(), "not ready");
            }
        }
        certs_tx.send_replace(Arc::new(identities.reports(&by_identity)));
        ca_tx.send_replace(Arc::new(identities.ca_report()));
        wake = tokio::select! {
            _ = issued.changed() => Wake::Refresh,
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err(AgentError::TaskEnded { task: "source of truth", reason: "it stopped publishing".into() });
                }
                Wake::Changed
            }
            (task, reason) = tasks.ended() => {
                error!(task, %reason, "a task the agent depends on ended; exiting so that it is restarted (enrolled pods stay closed meanwhile)");
                return Err(AgentError::TaskEnded { task, reason });
            }
            _ = retry.tick(), if !redirector.all_captured() => Wake::Retry,
            _ = verify.tick() => Wake::Verify,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        };
    }
    drain(&mut redirector, &proxy, &ready_tx, drain_timeout).await;
    Ok(())
}

/// Stops the agent without losing a connection that can be kept: not ready any more, HBONE
/// peers told to go away (they reconnect to whoever serves the pods now), listeners closed
/// (queued connections move to a newer agent's), then open connections given up to `limit` to
/// finish. The pinned programs stay: enrolled pods are served by the newer agent, or fail
/// closed until one starts.
async fn drain(
    redirector: &mut Redirector,
    proxy: &Proxy,
    ready: &watch::Sender<bool>,
    limit: std::time::Duration,
) {
    info!(successor = redirector.successor(), timeout = ?limit, open = proxy.active(), "draining");
    ready.send_replace(false);
    proxy.drain();
    redirector.stop_serving();
    let deadline = tokio::time::Instant::now() + limit;
    while proxy.active() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    info!(
        cut = proxy.active(),
        "drained; exiting. Enrolled pods stay captured (fail closed) until an agent serves them"
    );
}

/// The agent's long-lived tasks, by name.
#[derive(Default)]
struct Tasks {
    set: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn spawn(&mut self, name: &'static str, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits until a task ends; its name and how. Pending forever while all run.
    async fn ended(&mut self) -> (&'static str, String) {
        match self.set.join_next_with_id().await {
            Some(Ok((id, ()))) => (self.names.get(&id).copied().unwrap_or("task"), "it returned".into()),
            Some(Err(e)) => {
                let name = self.names.get(&e.id()).copied().unwrap_or("task");
                let reason = if e.is_panic() {
                    let panic = e.into_panic();
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    format!("it panicked: {message}")
                } else {
                    "it was cancelled".into()
                };
                (name, reason)
            }
            None => std::future::pending().await,
        }
    }
}

/// Why the main loop woke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// A new snapshot of the cluster (or the first one).
    Changed,
    /// Time to retry pods that failed.
    Retry,
    /// Time to check the kernel's state.
    Verify,
    /// A certificate was issued: its report changed.
    Refresh,
}

/// How often the agent checks that the kernel still holds its pins, links and map entries.
const VERIFY_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Every proxied connection holds two sockets; the default soft limit of 1024 descriptors would
/// cap a node at a few hundred connections. Raise it to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let raised = getrlimit(Resource::RLIMIT_NOFILE)
        .and_then(|(_, hard)| setrlimit(Resource::RLIMIT_NOFILE, hard, hard));
    if let Err(errno) = raised {
        tracing::warn!(error = %errno, "could not raise the open-files limit");
    }
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal, AgentError> {
    tokio::signal::unix::signal(kind)
        .map_err(|source| AgentError::Io { what: "installing signal handler", source })
}

/// Records the host network namespace; must run on the main thread before the runtime starts.
pub fn init_host_netns() -> Result<(), AgentError> {
    Netns::init_host()
        .map_err(|source| AgentError::Io { what: "opening the agent's own network namespace", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ended_task_is_named_with_how_it_ended() {
        let mut tasks = Tasks::default();
        tasks.spawn("server", std::future::pending());
        tasks.spawn("reader", async { panic!("ring buffer vanished") });
        let (name, reason) = tasks.ended().await;
        assert_eq!(name, "reader");
        assert_eq!(reason, "it panicked: ring buffer vanished");
        tasks.spawn("watcher", async {});
        let (name, reason) = tasks.ended().await;
        assert_eq!((name, reason.as_str()), ("watcher", "it returned"));
    }
}
