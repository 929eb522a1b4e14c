//! `cargo xtask bench --only control`: the control path at cluster scale. One node with a client
//! and a server pod, and a cluster around it that exists only as API objects: 10,000 pods on
//! 100 other nodes and 1,000 AuthorizationPolicies, served by the mock API; then pod and policy
//! events at a steady rate. What it measures is what an operator feels: how long after an API
//! event real connections get the verdict the event implies, what each event costs the agent,
//! and what it holds per object. The same objects in a local cluster file, for the file path.

use std::{
    io::ErrorKind,
    net::SocketAddr,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
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

/// What a connection from `client` to `to` shows: `Some(true)` echoed, `Some(false)` refused by
/// the agent (a reset or an end before the echo), `None` neither (a timeout, say): no verdict.
fn verdict(cluster: &Cluster, to: SocketAddr) -> Option<bool> {
    match cluster.pod("client").attempt(to) {
        Ok(()) => Some(true),
        Err(
            ErrorKind::ConnectionReset
            | ErrorKind::UnexpectedEof
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted,
        ) => Some(false),
        Err(_) => None,
    }
}

/// Waits until connections from `client` to `to` get `allowed`: the time since `since`, and
/// the connections it took to see it (each costs the agent CPU the events did not).
fn enforced(
    cluster: &Cluster,
    to: SocketAddr,
    allowed: bool,
    since: Instant,
) -> anyhow::Result<(Duration, u64)> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        if verdict(cluster, to) == Some(allowed) {
            return Ok((since.elapsed(), attempts));
        }
        anyhow::ensure!(
            since.elapsed() < FLIP_LIMIT,
            "the agent did not enforce a flip within {FLIP_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The agent's CPU for one probe connection (allowed), to take the probes out of the CPU the
/// events cost.
fn probe_cpu(cluster: &Cluster, agent: &Agent, to: SocketAddr) -> anyhow::Result<f64> {
    const PROBES: u32 = 500;
    let before = cpu_seconds(agent.pid());
    for _ in 0..PROBES {
        anyhow::ensure!(
            verdict(cluster, to) == Some(true),
            "a probe connection failed while nothing changed"
        );
    }
    Ok((cpu_seconds(agent.pid()) - before) / f64::from(PROBES))
}

struct Figures {
    latencies_ms: Vec<f64>,
    events: u64,
    /// The agent's CPU over the events, the probe connections' share taken out.
    cpu: f64,
}

fn latency_row(what: &str, figures: &mut Figures, target: &str) -> Vec<String> {
    let n = figures.latencies_ms.len();
    let (p50, p99) =
        (percentile(&mut figures.latencies_ms, 0.5), percentile(&mut figures.latencies_ms, 0.99));
    let max = figures.latencies_ms.iter().copied().fold(0.0, f64::max);
    vec![
        format!("{what}: event to enforcement ({n} flips)"),
        "-".into(),
        format!("p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"),
        format!(
            "{:.2} ms CPU/event ({} events)",
            figures.cpu * 1e3 / figures.events.max(1) as f64,
            figures.events
        ),
        target.into(),
    ]
}

/// RSS with none of the synthetic objects, with the pods, and with the pods and policies.
struct Memory {
    base: u64,
    with_pods: u64,
    with_policies: u64,
}

impl Memory {
    fn row(&self, what: &str, pods: usize, policies: usize) -> Vec<String> {
        let per = |after: u64, before: u64, n: usize| {
            after.saturating_sub(before) as f64 * 1024.0 / n.max(1) as f64
        };
        vec![
            format!("{what}: RSS, {pods} pods + {policies} policies"),
            format!("{:.1} MiB (none)", self.base as f64 / 1024.0),
            format!("{:.1} MiB", self.with_policies as f64 / 1024.0),
            format!(
                "{:.0} B/pod, {:.0} B/policy",
                per(self.with_pods, self.base, pods),
                per(self.with_policies, self.with_pods, policies)
            ),
            "<= 64 MiB".into(),
        ]
    }
}

/// RSS of `agent` once it has settled.
fn settled_rss(agent: &Agent) -> u64 {
    std::thread::sleep(Duration::from_millis(500));
    rss_kib(agent.pid())
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
    let base = settled_rss(&agent);

    // The cluster arrives. A flip that comes after the last pod (or policy) in the same watch
    // stream shows everything before it was taken in.
    for n in 0..100 {
        api.apply(NAMESPACES, synthetic_namespace(n));
    }
    for i in 0..pods {
        api.apply(PODS, synthetic_pod(i, 0));
    }
    let mut flipper =
        Flipper { api: &api, server: server_object(&api)?, labelled: false, policy: false, flips: 0 };
    for _ in 0..2 {
        flipper.flip(&cluster, to)?;
    }
    let with_pods = settled_rss(&agent);
    for i in 0..policies {
        api.apply(POLICIES, synthetic_policy(i));
    }
    for _ in 0..2 {
        flipper.flip(&cluster, to)?;
    }
    let memory = Memory { base, with_pods, with_policies: settled_rss(&agent) };

    let per_probe = probe_cpu(&cluster, &agent, to)?;
    let (events_before, bytes_before) = api.watched();
    let started = Instant::now();
    let mut figures = churn(&cluster, &agent, &mut flipper, to, per_probe, options)?;
    let seconds = started.elapsed().as_secs_f64();
    let (events, bytes) = api.watched();
    let (events, bytes) = ((events - events_before) as f64, (bytes - bytes_before) as f64);
    Ok(vec![
        latency_row("Kubernetes API", &mut figures, "p99 <= 100 ms, <= 1 ms CPU/event"),
        vec![
            "Kubernetes API: one agent's watches under churn".into(),
            "-".into(),
            format!("{:.0} events/s, {:.1} KB/s", events / seconds, bytes / seconds / 1e3),
            format!("{:.0} B/event", bytes / events.max(1.0)),
            "x nodes = the API server's fan-out".into(),
        ],
        memory.row("Kubernetes API", pods, policies),
    ])
}

fn server_object(api: &MockApi) -> anyhow::Result<Value> {
    api.get(PODS, "bench", "server").context("the server pod is not in the mock API")
}

/// Flips the verdict of client → server with one API event each time, in a cycle of four:
/// the server labelled `deny` (a pod event under `deny-labelled`: denied), unlabelled
/// (allowed), `deny-server` created (a policy event: denied), deleted (allowed).
struct Flipper<'a> {
    api: &'a MockApi,
    server: Value,
    labelled: bool,
    policy: bool,
    flips: u64,
}

impl Flipper<'_> {
    fn allowed(&self) -> bool {
        !self.labelled && !self.policy
    }

    /// Writes the next event: when it was written, and the verdict it implies.
    fn next(&mut self) -> (Instant, bool) {
        let step = self.flips % 4;
        self.flips += 1;
        let since = Instant::now();
        if step < 2 {
            self.labelled = step == 0;
            self.server["metadata"]["labels"]["deny"] = json!(if self.labelled { "yes" } else { "no" });
            self.api.apply(PODS, self.server.clone());
        } else {
            self.policy = step == 2;
            if self.policy {
                self.api.apply(POLICIES, deny_server());
            } else {
                self.api.delete(POLICIES, "bench", "deny-server");
            }
        }
        (since, self.allowed())
    }

    /// One flip, timed until connections show it: the time and the probe connections.
    fn flip(&mut self, cluster: &Cluster, to: SocketAddr) -> anyhow::Result<(Duration, u64)> {
        let before = self.allowed();
        let (since, allowed) = self.next();
        anyhow::ensure!(allowed != before, "flip {} does not change the verdict", self.flips);
        enforced(cluster, to, allowed, since)
    }
}

/// `control_pod_rate` synthetic pod events per second in the background for `control_seconds`,
/// and twice a second one flip, each timed until enforced.
fn churn(
    cluster: &Cluster,
    agent: &Agent,
    flipper: &mut Flipper<'_>,
    to: SocketAddr,
    per_probe: f64,
    options: &Options,
) -> anyhow::Result<Figures> {
    let stop = AtomicBool::new(false);
    let churned = AtomicU64::new(0);
    let cpu_before = cpu_seconds(agent.pid());
    let started = Instant::now();
    let mut latencies_ms = Vec::new();
    let mut probes = 0u64;
    let api = flipper.api;
    let gap = Duration::from_secs_f64(1.0 / f64::from(options.control_pod_rate.max(1)));
    let pods = options.control_pods.max(1);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(|| {
            let mut next = Instant::now();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                api.apply(PODS, synthetic_pod(i % pods, 1 + (i / pods) as u64));
                churned.fetch_add(1, Ordering::Relaxed);
                i += 1;
                next += gap;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        let result = (|| {
            while started.elapsed() < Duration::from_secs(options.control_seconds) {
                let tick = Instant::now();
                let (took, attempts) = flipper.flip(cluster, to)?;
                latencies_ms.push(took.as_secs_f64() * 1e3);
                probes += attempts;
                std::thread::sleep(Duration::from_millis(500).saturating_sub(tick.elapsed()));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let cpu = cpu_seconds(agent.pid()) - cpu_before - per_probe * probes as f64;
    Ok(Figures {
        events: churned.load(Ordering::Relaxed) + latencies_ms.len() as u64,
        cpu: cpu.max(0.0),
        latencies_ms,
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
    let base = settled_rss(&agent);
    let reload = |extra: String| -> anyhow::Result<u64> {
        cluster.set_extra_yaml(&extra);
        let generation = agent.generation();
        cluster.write_manifest()?;
        agent.wait_generation_after(generation, Duration::from_secs(60))?;
        Ok(settled_rss(&agent))
    };
    let with_pods = reload(format!("{deny}{synthetic_pods}"))?;
    let with_policies = reload(format!("{deny}{synthetic_pods}{synthetic_policies}"))?;
    let memory = Memory { base, with_pods, with_policies };
    let bytes = cluster.manifest().len();

    let per_probe = probe_cpu(&cluster, &agent, to)?;
    let cpu_before = cpu_seconds(agent.pid());
    let mut latencies_ms = Vec::new();
    let mut probes = 0;
    for flip in 0..options.control_file_flips {
        let labelled = flip % 2 == 0;
        cluster.edit_pod("server", |p| {
            p.labels.retain(|(k, _)| k != "deny");
            p.labels.push(("deny".into(), if labelled { "yes" } else { "no" }.into()));
        });
        // The file is rendered before the clock starts: only its writing and what follows count.
        let text = cluster.manifest();
        let since = Instant::now();
        cluster.write_raw_manifest(&text)?;
        let (took, attempts) = enforced(&cluster, to, !labelled, since)?;
        latencies_ms.push(took.as_secs_f64() * 1e3);
        probes += attempts;
        std::thread::sleep(Duration::from_millis(300));
    }
    let cpu = cpu_seconds(agent.pid()) - cpu_before - per_probe * probes as f64;
    let mut figures = Figures { events: latencies_ms.len() as u64, cpu: cpu.max(0.0), latencies_ms };
    let what = format!("local file ({:.1} MB)", bytes as f64 / 1e6);
    Ok(vec![latency_row(&what, &mut figures, "one-pod change <= 200 ms"), memory.row(&what, pods, policies)])
}
