//! `ambit agent`: wires the source of truth, the datapath, the proxies and the admin endpoints
//! together, and runs until SIGTERM or SIGINT.
//!
//! Shutting down leaves the eBPF programs and maps pinned: enrolled pods stay captured and fail
//! closed until the next agent takes over.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info};

use crate::{
    admin::{self, AdminError, AdminState, AgentInfo},
    bpf::{BpfError, Datapath, TraceMaps},
    cli::AgentArgs,
    discovery::{self, DiscoveryError, local::SourceStatus},
    identity::{Bundle, Ca, CaClient, Identities, IdentityError},
    proxy::{Proxy, Settings},
    redirect::Tracing,
    redirect::{Redirector, Round},
    state::Cluster,
    sys::netns::Netns,
    telemetry::{
        flows::{self, Flows},
        history::FlowHistory,
        metrics::Metrics,
    },
    tls::{TlsContext, TlsError},
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

/// Where the agent learns about the cluster.
enum Source {
    /// A local cluster file.
    Local(Box<discovery::local::Reader>),
    /// The Kubernetes API.
    Kubernetes(::kube::Client),
}

/// Runs the agent until a termination signal.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    if args.node.is_empty() {
        return Err(AgentError::Usage("--node (or NODE_NAME) must not be empty".into()));
    }
    let uid = nix::unistd::geteuid().as_raw();
    if uid != 0 {
        return Err(AgentError::NotRoot(uid));
    }
    crate::sys::capability::report();
    raise_fd_limit();
    // The descriptor given up at the open-files limit to refuse a connection fast.
    crate::listener::reserve_spare();
    // The source of truth: the local file, or the Kubernetes API.
    let (source, cluster, source_name, source_file) = match args.local.clone() {
        Some(file) => {
            let file = std::path::absolute(&file).unwrap_or(file);
            let mut reader = discovery::local::Reader::new(&file, &args.root_namespace);
            let cluster = reader.read()?;
            info!(file = %file.display(), pods = cluster.workloads.len(), node = %args.node, "cluster file loaded");
            let name = format!("local:{}", file.display());
            (Source::Local(Box::new(reader)), cluster, name, file)
        }
        None => {
            let client = discovery::kube::client().await?;
            info!(node = %args.node, "watching the Kubernetes API");
            // Nothing is known until the first full list: nothing is captured, and not ready.
            (Source::Kubernetes(client), Cluster::default(), "kubernetes".to_owned(), "kubernetes".into())
        }
    };

    let identities = match (&args.ca_addr, &args.ca_root) {
        (Some(addr), Some(root)) => {
            let bundle = Arc::new(Bundle::from_file(root)?);
            let client = CaClient::new(addr, args.ca_token.clone(), bundle.clone())?;
            info!(ca = client.authority(), bundle = %root.display(), roots = bundle.current().roots.len(), "certificates from the CA service");
            Identities::remote(client, &args.trust_domain, args.cert_ttl, bundle)
        }
        _ => Identities::embedded(Ca::load_or_create(&args.ca_dir, &args.trust_domain)?, args.cert_ttl)?,
    };
    let tls = Arc::new(TlsContext::new(identities.clone())?);

    let instance = args.instance.clone().unwrap_or_else(|| args.node.clone());
    let (datapath, proxy_maps, trace_maps) =
        Datapath::load(&args.bpf_dir, &instance, args.flow_buffer_bytes)?;

    let (cluster_tx, cluster_rx) = watch::channel(Arc::new(cluster));
    let (source_tx, source_rx) = watch::channel(SourceStatus {
        file: source_file,
        generation: 1,
        loaded_at: crate::sys::unix_now(),
        error: None,
    });
    let (pods_tx, pods_rx) = watch::channel(Arc::new(Vec::new()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let (datapath_tx, datapath_rx) = watch::channel(admin::DatapathHealth::default());
    let (certs_tx, certs_rx) = watch::channel(Arc::new(Vec::new()));
    let (ca_tx, ca_rx) = watch::channel(Arc::new(identities.ca_report()));
    let mut issued = identities.subscribe();

    let TraceMaps { events, stats } = trace_maps;
    let metrics = Arc::new(Metrics::default());
    let tracing = if args.no_flows {
        Tracing::Off
    } else if args.trace_all {
        Tracing::AllPods
    } else {
        Tracing::Enrolled
    };
    let flows = Arc::new(Flows::new(
        tracing != Tracing::Off,
        args.node.clone(),
        args.trust_domain.clone(),
        cluster_rx.clone(),
        stats.reset_reason_names.clone(),
    ));
    let trace_stats = Arc::new(stats);
    let history = Arc::new(FlowHistory::new(args.flow_history));

    let info = AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        node: args.node.clone(),
        instance,
        source: source_name,
        pin_dir: datapath.pin_dir().display().to_string(),
        cgroup_root: datapath.cgroup_root().display().to_string(),
        trust_domain: args.trust_domain.clone(),
        root_namespace: args.root_namespace.clone(),
        started_at: crate::sys::unix_now(),
    };
    let state = AdminState {
        info: Arc::new(info),
        source: source_rx,
        pods: pods_rx,
        ready: ready_rx,
        datapath: datapath_rx,
        certs: certs_rx,
        ca: ca_rx,
        cluster: cluster_rx.clone(),
        flows: flows.clone(),
        history: history.clone(),
        trace_stats: trace_stats.clone(),
        metrics: metrics.clone(),
    };
    let admin = admin::bind_admin(args.admin_addr, state.clone()).await?;
    let readiness = admin::bind_readiness(args.readiness_addr, state.clone()).await?;
    let metrics_server = admin::bind_metrics(args.metrics_addr, state).await?;
    // Every long-lived task is owned here: if one ends (a bug: they retry their own errors),
    // the agent says which and exits non-zero, and the kubelet restarts it while the pinned
    // programs keep enforcing.
    let mut tasks = Tasks::default();
    tasks.spawn("admin API", admin);
    tasks.spawn("readiness endpoint", readiness);
    tasks.spawn("metrics endpoint", metrics_server);

    let settings = Settings {
        root_namespace: args.root_namespace.clone(),
        flows: flows.clone(),
        metrics: metrics.clone(),
        history: history.clone(),
        client_address: !args.no_client_address,
        same_node_hbone: args.same_node_hbone,
    };
    let proxy = Arc::new(Proxy::new(
        Arc::new(proxy_maps),
        cluster_rx.clone(),
        identities.clone(),
        tls.clone(),
        settings,
    ));
    let mut redirector =
        Redirector::new(args.node.clone(), datapath, proxy.clone(), identities.clone(), tls, tracing);
    let (synced_tx, synced) = watch::channel(false);
    match source {
        Source::Local(reader) => {
            synced_tx.send_replace(true);
            tasks.spawn("cluster file watcher", discovery::local::watch(*reader, cluster_tx, source_tx));
        }
        Source::Kubernetes(client) => {
            tasks.spawn(
                "Kubernetes watchers",
                discovery::kube::watch(client, args.root_namespace.clone(), cluster_tx, source_tx, synced_tx),
            );
        }
    }
    if tracing != Tracing::Off {
        tasks.spawn("flow reader", flows::read_events(flows.clone(), events));
    }
    let pool_owner = proxy.clone();
    tasks.spawn("HBONE pool sweeper", async move {
        let mut sweep = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            sweep.tick().await;
            pool_owner.pool().sweep();
        }
    });

    let mut changes = cluster_rx;
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
        let refresh = identities.next_refresh(std::time::SystemTime::now());
        wake = tokio::select! {
            () = tokio::time::sleep(refresh) => {
                identities.refresh_due(std::time::SystemTime::now());
                Wake::Refresh
            }
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
    drain(&mut redirector, &proxy, &ready_tx, args.drain_timeout).await;
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
    /// A certificate was due, or the CA answered.
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
