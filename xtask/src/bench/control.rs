//! `cargo xtask bench --only control`: the control path at cluster scale. One node with a client
//! and a server pod, and a cluster around it that exists only as API objects: 10,000 pods on
//! 100 other nodes and 1,000 AuthorizationPolicies, served by the mock API; then pod and policy
//! events at a steady rate. What it measures is what an operator feels: how long after an API
//! event real connections get the verdict the event implies, what each event costs the agent,
//! and what it holds per object. The same objects in a local cluster file, for the file path.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ambit_tests::{Agent, Cluster, MockApi, PodSpec};
use anyhow::Context as _;
use serde_json::{Value, json};

use super::{Options, cpu_seconds, datapath::percentile, rss_kib};

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
const ECHO: u16 = 7;
/// How long a flip may take before it counts as never enforced.
const FLIP_LIMIT: Duration = Duration::from_secs(10);

/// Runs both scenarios; one table row each per figure.
pub(super) fn run(options: &Options) -> anyhow::Result<Vec<Vec<String>>> {
    let mut rows = kubernetes(options)?;
    rows.extend(local_file(options)?);
    Ok(rows)
}

fn bench_cluster() -> anyhow::Result<Cluster> {
    Cluster::builder()
        .node("a")
        .namespace("bench", true)
        .pod(PodSpec::new("bench", "client", "a").service_account("client"))
        .pod(PodSpec::new("bench", "server", "a").service_account("server").label("app", "server"))
        .build()
        .context("building the control bench cluster")
}

/// The synthetic cluster: `pods` pods in 100 namespaces on 100 nodes (none on node a), and
/// `policies` AuthorizationPolicies spread over the same namespaces, each selecting an app.
fn synthetic_pod(i: usize, revision: u64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("pod-{i:05}"), "namespace": format!("ns{:02}", i % 100),
            "uid": format!("uid-{i}"),
            "labels": {"app": format!("app{}", i % 10), "revision": revision.to_string()},
        },
        "spec": {"nodeName": format!("node-{:02}", i / 100), "serviceAccountName": format!("sa{}", i % 7),
                 "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256)},
    })
}

fn synthetic_policy(i: usize) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("policy-{i:04}"), "namespace": format!("ns{:02}", i % 100)},
        "spec": {
            "selector": {"matchLabels": {"app": format!("app{}", i % 10)}},
            "action": if i.is_multiple_of(2) { "ALLOW" } else { "DENY" },
            "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/ns{:02}/sa/sa{}", (i + 1) % 100, i % 7)]}}],
                       "to": [{"operation": {"ports": ["8080"]}}]}],
        },
    })
}

fn synthetic_namespace(n: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": format!("ns{n:02}"), "labels": {"istio.io/dataplane-mode": "ambient"}}})
}

/// The DENY that selects the server while it carries `deny: "yes"`: a pod event flips it.
fn deny_labelled() -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": "deny-labelled", "namespace": "bench"},
           "spec": {"selector": {"matchLabels": {"deny": "yes"}}, "action": "DENY", "rules": [{}]}})
}

/// The DENY of the server whose creation and deletion a policy event flips.
fn deny_server() -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": "deny-server", "namespace": "bench"},
           "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY", "rules": [{}]}})
}

/// Waits until connections from `client` to `to` get `allowed`; the time since `since`.
fn enforced(cluster: &Cluster, to: SocketAddr, allowed: bool, since: Instant) -> anyhow::Result<Duration> {
    let client = cluster.pod("client");
    loop {
        if client.attempt(to).is_ok() == allowed {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(
            since.elapsed() < FLIP_LIMIT,
            "the agent did not enforce a flip within {FLIP_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Figures {
    latencies_ms: Vec<f64>,
    events: u64,
    cpu: f64,
}

fn latency_row(what: &str, figures: &mut Figures, target: &str) -> Vec<String> {
    let n = figures.latencies_ms.len();
    let (p50, p99) =
        (percentile(&mut figures.latencies_ms, 0.5), percentile(&mut figures.latencies_ms, 0.99));
    vec![
        format!("{what}: event to enforcement ({n} flips)"),
        "-".into(),
        format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
        format!(
            "{:.2} ms CPU/event ({} events)",
            figures.cpu * 1e3 / figures.events.max(1) as f64,
            figures.events
        ),
        target.into(),
    ]
}

fn memory_rows(
    what: &str,
    base: u64,
    with_pods: u64,
    with_policies: u64,
    pods: usize,
    policies: usize,
) -> Vec<Vec<String>> {
    let per =
        |after: u64, before: u64, n: usize| after.saturating_sub(before) as f64 * 1024.0 / n.max(1) as f64;
    vec![vec![
        format!("{what}: RSS, {pods} pods + {policies} policies"),
        format!("{:.1} MiB (none)", base as f64 / 1024.0),
        format!("{:.1} MiB", with_policies as f64 / 1024.0),
        format!(
            "{:.0} B/pod, {:.0} B/policy",
            per(with_pods, base, pods),
            per(with_policies, with_pods, policies)
        ),
        "<= 64 MiB".into(),
    ]]
}

/// The cluster through the mock API.
fn kubernetes(options: &Options) -> anyhow::Result<Vec<Vec<String>>> {
    let (pods, policies) = (options.control_pods, options.control_policies);
    let cluster = bench_cluster()?;
    let _processes = cluster.start_pod_processes()?;
    let api = cluster.mock_api()?;
    api.sync_yaml(&cluster.manifest())?;
    api.apply(POLICIES, deny_labelled());
    let _echo = cluster.pod("server").echo_server(ECHO)?;
    let to = cluster.pod("server").addr(ECHO);
    let agent = cluster.start_kube_agent("a")?;
    enforced(&cluster, to, true, Instant::now())?;
    std::thread::sleep(Duration::from_millis(500));
    let base = rss_kib(agent.pid());

    // The cluster arrives; a flip of the server after the last pod shows it was all taken in.
    for n in 0..100 {
        api.apply(NAMESPACES, synthetic_namespace(n));
    }
    for i in 0..pods {
        api.apply(PODS, synthetic_pod(i, 0));
    }
    let mut flipper = Flipper { api: &api, server: server_object(&api)?, labelled: false, policy: false };
    let since = flipper.pod_flip();
    enforced(&cluster, to, false, since)?;
    std::thread::sleep(Duration::from_millis(500));
    let with_pods = rss_kib(agent.pid());
    for i in 0..policies {
        api.apply(POLICIES, synthetic_policy(i));
    }
    let since = flipper.policy_flip();
    // Both DENYs apply now; each flip below toggles one of them from a state where neither does.
    enforced(&cluster, to, false, since)?;
    let since = flipper.pod_flip();
    enforced(&cluster, to, false, since)?;
    let since = flipper.policy_flip();
    enforced(&cluster, to, true, since)?;
    std::thread::sleep(Duration::from_millis(500));
    let with_policies = rss_kib(agent.pid());

    let (events_before, bytes_before) = api.watched();
    let started = Instant::now();
    let mut figures = churn(&cluster, &agent, &mut flipper, to, options)?;
    let seconds = started.elapsed().as_secs_f64();
    let (events, bytes) = api.watched();
    let (events, bytes) = ((events - events_before) as f64, (bytes - bytes_before) as f64);
    let mut rows = vec![latency_row("Kubernetes API", &mut figures, "p99 <= 100 ms, <= 1 ms CPU/event")];
    rows.push(vec![
        "Kubernetes API: one agent's watches under churn".into(),
        "-".into(),
        format!("{:.0} events/s, {:.1} KB/s", events / seconds, bytes / seconds / 1e3),
        format!("{:.0} B/event", bytes / events.max(1.0)),
        "x nodes = the API server's fan-out".into(),
    ]);
    rows.extend(memory_rows("Kubernetes API", base, with_pods, with_policies, pods, policies));
    Ok(rows)
}

fn server_object(api: &MockApi) -> anyhow::Result<Value> {
    api.get(PODS, "bench", "server").context("the server pod is not in the mock API")
}

/// Flips the verdict of client → server with one API event, alternating a pod event (the
/// server's `deny` label) and a policy event (`deny-server` created or deleted).
struct Flipper<'a> {
    api: &'a MockApi,
    server: Value,
    labelled: bool,
    policy: bool,
}

impl Flipper<'_> {
    fn pod_flip(&mut self) -> Instant {
        self.labelled = !self.labelled;
        self.server["metadata"]["labels"]["deny"] = json!(if self.labelled { "yes" } else { "no" });
        let since = Instant::now();
        self.api.apply(PODS, self.server.clone());
        since
    }

    fn policy_flip(&mut self) -> Instant {
        self.policy = !self.policy;
        let since = Instant::now();
        if self.policy {
            self.api.apply(POLICIES, deny_server());
        } else {
            self.api.delete(POLICIES, "bench", "deny-server");
        }
        since
    }

    fn allowed(&self) -> bool {
        !self.labelled && !self.policy
    }
}

/// `control_pod_rate` synthetic pod events per second in the background for `control_seconds`,
/// and twice a second one flip (pod and policy events by turns), each timed until enforced.
fn churn(
    cluster: &Cluster,
    agent: &Agent,
    flipper: &mut Flipper<'_>,
    to: SocketAddr,
    options: &Options,
) -> anyhow::Result<Figures> {
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds(agent.pid());
    let started = Instant::now();
    let mut latencies_ms = Vec::new();
    let mut flips = 0u64;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let (stop2, churned2, api) = (stop.clone(), churned.clone(), flipper.api);
        let gap = Duration::from_secs_f64(1.0 / f64::from(options.control_pod_rate.max(1)));
        let pods = options.control_pods.max(1);
        scope.spawn(move || {
            let mut next = Instant::now();
            let mut i = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                api.apply(PODS, synthetic_pod(i % pods, 1 + (i / pods) as u64));
                churned2.fetch_add(1, Ordering::Relaxed);
                i += 1;
                next += gap;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        let result = (|| {
            while started.elapsed() < Duration::from_secs(options.control_seconds) {
                let tick = Instant::now();
                let since = if flips.is_multiple_of(2) { flipper.pod_flip() } else { flipper.policy_flip() };
                flips += 1;
                latencies_ms.push(enforced(cluster, to, flipper.allowed(), since)?.as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(500).saturating_sub(tick.elapsed()));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    Ok(Figures {
        latencies_ms,
        events: churned.load(Ordering::Relaxed) + flips,
        cpu: cpu_seconds(agent.pid()) - cpu_before,
    })
}

/// The same objects in a local cluster file: each flip rewrites the file with one pod changed.
fn local_file(options: &Options) -> anyhow::Result<Vec<Vec<String>>> {
    let (pods, policies) = (options.control_pods, options.control_policies);
    let cluster = bench_cluster()?;
    let _echo = cluster.pod("server").echo_server(ECHO)?;
    let to = cluster.pod("server").addr(ECHO);
    let yaml_of = |objects: &mut dyn Iterator<Item = Value>| -> String {
        objects.map(|o| format!("{o}\n---\n")).collect()
    };
    let synthetic_pods =
        yaml_of(&mut (0..100).map(synthetic_namespace).chain((0..pods).map(|i| synthetic_pod(i, 0))));
    let synthetic_policies = yaml_of(&mut (0..policies).map(synthetic_policy));
    let deny = yaml_of(&mut std::iter::once(deny_labelled()));
    cluster.set_extra_yaml(&deny);
    cluster.write_manifest()?;
    let agent = cluster.start_agent("a")?;
    enforced(&cluster, to, true, Instant::now())?;
    std::thread::sleep(Duration::from_millis(500));
    let base = rss_kib(agent.pid());
    cluster.set_extra_yaml(&format!("{deny}{synthetic_pods}"));
    let generation = agent.generation();
    cluster.write_manifest()?;
    agent.wait_generation_after(generation, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));
    let with_pods = rss_kib(agent.pid());
    cluster.set_extra_yaml(&format!("{deny}{synthetic_pods}{synthetic_policies}"));
    let generation = agent.generation();
    cluster.write_manifest()?;
    agent.wait_generation_after(generation, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));
    let with_policies = rss_kib(agent.pid());
    let bytes = cluster.manifest().len();

    let cpu_before = cpu_seconds(agent.pid());
    let mut latencies_ms = Vec::new();
    let mut labelled = false;
    for _ in 0..options.control_file_flips {
        labelled = !labelled;
        cluster.edit_pod("server", |p| {
            p.labels.retain(|(k, _)| k != "deny");
            p.labels.push(("deny".into(), if labelled { "yes" } else { "no" }.into()));
        });
        let since = Instant::now();
        cluster.write_manifest()?;
        latencies_ms.push(enforced(&cluster, to, !labelled, since)?.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut figures = Figures {
        events: options.control_file_flips as u64,
        cpu: cpu_seconds(agent.pid()) - cpu_before,
        latencies_ms,
    };
    let what = format!("local file ({:.1} MB)", bytes as f64 / 1e6);
    let mut rows = vec![latency_row(&what, &mut figures, "one-pod change <= 200 ms")];
    rows.extend(memory_rows(&what, base, with_pods, with_policies, pods, policies));
    Ok(rows)
}
