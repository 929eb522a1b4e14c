//! Builds everything `ambit agent` runs from a validated [`Config`]: the source of truth, the
//! identities, the datapath, the telemetry, the endpoints, the proxies and the redirector, with
//! every long-lived task spawned into the agent's supervised set. What the main loop needs is
//! handed back as an [`App`].

use std::{sync::Arc, time::SystemTime};

use tokio::sync::watch;
use tracing::info;

use super::{
    AgentError, Tasks,
    config::{Certificates, ClusterSource, Config},
};
use crate::{
    admin::{self, AdminState, AgentInfo},
    bpf::{Datapath, TraceMaps},
    discovery::{self, local::SourceStatus},
    identity::{Bundle, Ca, CaClient, Identities},
    proxy::{Proxy, Settings},
    redirect::PodReport,
    redirect::{Redirector, Tracing},
    state::Cluster,
    telemetry::{
        flows::{self, Flows},
        history::FlowHistory,
        metrics::Metrics,
    },
    tls::TlsContext,
};

/// Where the agent learns about the cluster.
enum Source {
    /// A local cluster file.
    Local(Box<discovery::local::Reader>),
    /// The Kubernetes API.
    Kubernetes(::kube::Client),
}

/// What the main loop publishes for the endpoints to read.
pub(crate) struct Reports {
    pub(crate) pods: watch::Sender<Arc<Vec<PodReport>>>,
    pub(crate) ready: watch::Sender<bool>,
    pub(crate) datapath: watch::Sender<admin::DatapathHealth>,
    pub(crate) certs: watch::Sender<Arc<Vec<crate::identity::CertReport>>>,
    pub(crate) ca: watch::Sender<Arc<crate::identity::CaReport>>,
}

/// The running agent, as the main loop drives it.
pub(crate) struct App {
    pub(crate) redirector: Redirector,
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) identities: Arc<Identities>,
    pub(crate) flows: Arc<Flows>,
    /// New snapshots of the cluster.
    pub(crate) changes: watch::Receiver<Arc<Cluster>>,
    /// True once the source has been read in full.
    pub(crate) synced: watch::Receiver<bool>,
    /// Changes when a certificate is issued.
    pub(crate) issued: watch::Receiver<u64>,
    pub(crate) reports: Reports,
    pub(crate) tasks: Tasks,
    pub(crate) drain_timeout: std::time::Duration,
}

/// Builds the agent; binding a port, loading the programs or reading the source may fail.
pub(crate) async fn build(config: Config) -> Result<App, AgentError> {
    // The source of truth: the local file, or the Kubernetes API.
    let args = &config.args;
    let (source, cluster, source_name, source_file) = match &config.cluster {
        ClusterSource::File(file) => {
            let file = file.clone();
            let mut reader = discovery::local::Reader::new(&file, &args.root_namespace);
            let cluster = reader.read()?;
            info!(file = %file.display(), pods = cluster.workloads.len(), node = %args.node, "cluster file loaded");
            let name = format!("local:{}", file.display());
            (Source::Local(Box::new(reader)), cluster, name, file)
        }
        ClusterSource::Kubernetes => {
            let client = discovery::kube::client().await?;
            info!(node = %args.node, "watching the Kubernetes API");
            // Nothing is known until the first full list: nothing is captured, and not ready.
            (Source::Kubernetes(client), Cluster::default(), "kubernetes".to_owned(), "kubernetes".into())
        }
    };

    let identities = match &config.certificates {
        Certificates::Service { addr, root } => {
            let bundle = Arc::new(Bundle::from_file(root)?);
            let client = CaClient::new(addr, args.ca_token.clone(), bundle.clone())?;
            info!(ca = client.authority(), bundle = %root.display(), roots = bundle.current().roots.len(), "certificates from the CA service");
            Identities::remote(client, &args.trust_domain, args.cert_ttl, bundle)
        }
        Certificates::Embedded(dir) => {
            Identities::embedded(Ca::load_or_create(dir, &args.trust_domain)?, args.cert_ttl)?
        }
    };
    let tls = Arc::new(TlsContext::new(identities.clone())?);

    let instance = config.instance.clone();
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
    let issued = identities.subscribe();

    let TraceMaps { events, stats } = trace_maps;
    let metrics = Arc::new(Metrics::default());
    let tracing = config.tracing;
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
    let redirector =
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

    tasks.spawn("certificate refresh", refresh_certificates(identities.clone()));

    Ok(App {
        redirector,
        proxy,
        identities,
        flows,
        changes: cluster_rx,
        synced,
        issued,
        reports: Reports {
            pods: pods_tx,
            ready: ready_tx,
            datapath: datapath_tx,
            certs: certs_tx,
            ca: ca_tx,
        },
        tasks,
        drain_timeout: args.drain_timeout,
    })
}

/// Renews each certificate when it is due (at half its life), drops expired ones and retries
/// failed requests, on a clock of its own: a slow main loop never delays a renewal.
async fn refresh_certificates(identities: Arc<Identities>) {
    let mut issued = identities.subscribe();
    loop {
        let due = identities.next_refresh(SystemTime::now());
        tokio::select! {
            () = tokio::time::sleep(due) => identities.refresh_due(SystemTime::now()),
            // A certificate was issued (a new pod's, maybe due sooner than the one slept for).
            changed = issued.changed() => if changed.is_err() { return },
        }
    }
}
