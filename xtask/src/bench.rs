//! `cargo xtask bench`: the mesh against direct pod-to-pod TCP, in one run on one topology.
//!
//! Two nodes; a client pod on node a and a server pod on node b, once in a namespace outside the
//! mesh (direct) and once in an enrolled one (through both agents). Each measure runs for the
//! same time on both paths and is reported as a ratio, next to the bar ztunnel sets on this
//! machine kind. Numbers are printed, never asserted: they depend on the machine.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ambit_tests::{Cluster, PodSpec};
use anyhow::Context as _;

use self::datapath::{ECHO, Measure, Pair};

mod control;
mod datapath;

/// Bench options.
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Seconds per measure, path and run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Repetitions of the data-path measures (medians and ranges are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Idle connections opened to measure memory per connection.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// Only these measures (comma-separated): datapath (iperf3 1 and 4 streams, sockperf
    /// ping-pong closed loop and at 1,000 msg/s, new connections; cross-node and same-node,
    /// direct and mesh interleaved, the agents' CPU per unit), policies, memory, tracing (the
    /// data-path measures with the kernel tracer on and off), ca (the mesh CA: 100 new
    /// identities at once, and CSRs signed per CA core); and, not in the default set, `soak`
    /// (connections held open while others churn, for minutes, with the agents' memory,
    /// descriptors and CPU sampled) and `control` (10,000 pods and 1,000 policies from the
    /// mock API and from a local file, pod and policy events at a steady rate: event to
    /// enforcement, CPU per event, bytes per object).
    #[arg(long, value_delimiter = ',', default_value = "datapath,policies,memory,tracing,ca")]
    only: Vec<String>,
    /// Data path and tracing: only these measures.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = Measure::ALL)]
    measures: Vec<Measure>,
    /// Data path: only these topologies (cross-node, same-node).
    #[arg(long, value_delimiter = ',', default_value = "cross-node,same-node")]
    topologies: Vec<String>,
    /// CA: pods (each the first of its service account) starting at once on one node.
    #[arg(long, default_value_t = 100)]
    ca_pods: usize,
    /// Soak: connections held open throughout.
    #[arg(long, default_value_t = 10_000)]
    soak_connections: usize,
    /// Soak: minutes of churn.
    #[arg(long, default_value_t = 30)]
    soak_minutes: u64,
    /// Soak: new connections per second (connect, 16 B echo, close) during the churn.
    #[arg(long, default_value_t = 100)]
    soak_rate: u32,
    /// Control: pods of the synthetic cluster (on 100 nodes, none on the bench node).
    #[arg(long, default_value_t = 10_000)]
    control_pods: usize,
    /// Control: AuthorizationPolicies of the synthetic cluster.
    #[arg(long, default_value_t = 1_000)]
    control_policies: usize,
    /// Control: synthetic pod events per second during the churn.
    #[arg(long, default_value_t = 50)]
    control_pod_rate: u32,
    /// Control: seconds of churn (two timed flips a second, pod and policy events by turns).
    #[arg(long, default_value_t = 60)]
    control_seconds: u64,
    /// Control: one-pod edits of the local file, each timed until enforced.
    #[arg(long, default_value_t = 20)]
    control_file_flips: usize,
}

struct Path2<'a> {
    cluster: &'a Cluster,
    client: &'static str,
    server: &'static str,
}

impl Path2<'_> {
    fn addr(&self, port: u16) -> SocketAddr {
        self.cluster.pod(self.server).addr(port)
    }

    fn connect(&self, port: u16) -> anyhow::Result<TcpStream> {
        let stream = self.cluster.pod(self.client).connect(self.addr(port), Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

pub(crate) fn run(ambit: &Path, options: &Options) -> anyhow::Result<()> {
    raise_fd_limit();
    let secs = Duration::from_secs(options.seconds);
    let wanted = |m: &str| options.only.iter().any(|o| o == m);
    // On a cluster of its own, before the other one exists, so that the cores are free.
    let ca_rows = if wanted("ca") { ca(options)? } else { Vec::new() };
    if wanted("control") {
        let mut rows = vec![["control path", "before", "after", "cost", "bar"].map(String::from).to_vec()];
        rows.extend(control::run(options)?);
        crate::table::print(&rows);
    }
    let main = ["datapath", "policies", "memory", "tracing", "soak"];
    if !main.iter().any(|m| wanted(m)) {
        if !ca_rows.is_empty() {
            let mut rows = vec![["measure", "-", "value", "", "bar"].map(String::from).to_vec()];
            rows.extend(ca_rows);
            crate::table::print(&rows);
        }
        return Ok(());
    }
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("mesh", true)
        .namespace("direct", false)
        .pod(PodSpec::new("mesh", "mclient", "a").service_account("client"))
        .pod(PodSpec::new("mesh", "mserver", "b").service_account("server"))
        .pod(PodSpec::new("direct", "dclient", "a"))
        .pod(PodSpec::new("direct", "dserver", "b"))
        // Same-node servers, beside the clients on node a.
        .pod(PodSpec::new("mesh", "mlocal", "a").service_account("local"))
        .pod(PodSpec::new("direct", "dlocal", "a"))
        .build()
        .context("building the bench cluster")?;
    let agent_a = cluster.start_agent("a")?;
    let agent_b = cluster.start_agent("b")?;
    // Before any traffic: what an agent holds doing nothing.
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss = [agent_a.pid(), agent_b.pid()].map(rss_kib);
    let mut servers = Vec::new();
    for pod in ["mserver", "dserver", "mlocal", "dlocal"] {
        servers.push(cluster.pod(pod).echo_server(ECHO)?);
    }
    let tools = datapath::Servers::start(&cluster, &["mserver", "dserver", "mlocal", "dlocal"])?;
    for pod in ["mclient", "dclient", "mserver", "dserver", "mlocal", "dlocal"] {
        // Many short connections: every pod (and the agents inside them) may reuse TIME_WAIT
        // ports, alike on both paths.
        cluster.pod(pod).sysctl("ipv4/tcp_tw_reuse", "1")?;
        cluster.pod(pod).sysctl("ipv4/ip_local_port_range", "1024 65000")?;
    }
    let mesh = Path2 { cluster: &cluster, client: "mclient", server: "mserver" };

    println!(
        "ambit bench: {}; {} s per measure and path; binary {}",
        machine(),
        options.seconds,
        ambit.display()
    );
    println!("  direct = pod to pod over veth and a bridge, no agent; mesh = the same through both agents\n");

    let mut rows: Vec<Vec<String>> = Vec::new();
    rows.push(
        ["measure (medians)", "direct", "mesh", "mesh/direct (range)", "both agents' CPU / bar"]
            .map(String::from)
            .to_vec(),
    );

    let topologies = [
        (
            "cross-node",
            Pair { cluster: &cluster, client: "dclient", server: "dserver" },
            Pair { cluster: &cluster, client: "mclient", server: "mserver" },
        ),
        (
            "same-node",
            Pair { cluster: &cluster, client: "dclient", server: "dlocal" },
            Pair { cluster: &cluster, client: "mclient", server: "mlocal" },
        ),
    ];
    if wanted("datapath") {
        let topologies: Vec<_> =
            topologies.iter().filter(|t| options.topologies.iter().any(|o| o == t.0)).copied().collect();
        let results = datapath::measure(
            &topologies,
            &options.measures,
            &[agent_a.pid(), agent_b.pid()],
            options.runs,
            secs,
        )?;
        rows.extend(datapath::rows(&results));
        rows.push(vec![
            "idle RSS per agent".into(),
            "-".into(),
            format!("{:.1} / {:.1} MiB", idle_rss[0] as f64 / 1024.0, idle_rss[1] as f64 / 1024.0),
            "a / b".into(),
            String::new(),
        ]);
    }

    if wanted("policies") {
        // The same connection rate with 1,000 AuthorizationPolicies that all apply to the server
        // (999 that do not match the client, evaluated before the one that does).
        let without = connections_per_second(&mesh, secs)?;
        let generation = agent_b.generation();
        cluster.set_extra_yaml(&thousand_policies());
        cluster.write_manifest()?;
        agent_b.wait_generation_after(generation, Duration::from_secs(30))?;
        let with = connections_per_second(&mesh, secs)?;
        rows.push(vec![
            "new connections/s, 1,000 policies".into(),
            format!("{without:.0} (none)"),
            format!("{with:.0}"),
            format!("{:.2}", with / without),
            ">= 0.95 of none".into(),
        ]);
        cluster.set_extra_yaml("");
        cluster.write_manifest()?;
    }

    if wanted("memory") {
        let per_conn = idle_memory(&mesh, &[agent_a.pid(), agent_b.pid()], options.idle_connections)?;
        rows.push(vec![
            format!("memory per idle connection ({} open)", options.idle_connections),
            "-".into(),
            format!("{:.1} KiB", per_conn / 2.0),
            "per agent".into(),
            "<= 6 KiB".into(),
        ]);
    }

    if wanted("soak") {
        soak(&mesh, &[("a", agent_a.pid()), ("b", agent_b.pid())], options)?;
    }

    if wanted("tracing") {
        // The cross-node mesh path with the kernel tracer on and off, the agents restarted
        // between, alternating `runs` times each; medians, as for the data path.
        let mesh_pair = topologies[0].2;
        let mut samples: Vec<(bool, Measure, datapath::Sample)> = Vec::new();
        let mut agents = vec![agent_a, agent_b];
        for round in 0..2 * options.runs {
            let tracing = round % 2 == 0;
            for mut agent in agents.drain(..) {
                agent.kill();
            }
            let extra: &[&str] = if tracing { &[] } else { &["--no-flows"] };
            for node in ["a", "b"] {
                agents.push(cluster.spawn_agent(node, extra)?);
            }
            for agent in &agents {
                agent.wait_ready(Duration::from_secs(20))?;
            }
            for &measure in &options.measures {
                samples.push((tracing, measure, measure.run(mesh_pair, secs)?));
            }
        }
        for &measure in &options.measures {
            let median = |on: bool| {
                datapath::spread(
                    samples
                        .iter()
                        .filter(|(t, m, _)| *t == on && *m == measure)
                        .map(|(_, _, s)| s.value)
                        .collect(),
                )
                .0
            };
            let (on, off) = (median(true), median(false));
            let show = |v: f64| match measure {
                Measure::PingPong | Measure::PingPongPaced => format!("{v:.1} us"),
                Measure::Connections => format!("{v:.0}/s"),
                Measure::Iperf1 | Measure::Iperf4 => format!("{:.2} Gbit/s", v / 1e9),
            };
            // Higher is better for throughput and rates, lower for latency.
            let lower_is_better = matches!(measure, Measure::PingPong | Measure::PingPongPaced);
            let ratio = if lower_is_better { off / on } else { on / off };
            rows.push(vec![
                format!("tracing on vs off: {measure:?}"),
                format!("{} (off)", show(off)),
                show(on),
                format!("{ratio:.2}"),
                ">= 0.97 of off".into(),
            ]);
        }
    }

    rows.extend(ca_rows);
    if rows.len() > 1 {
        crate::table::print(&rows);
        println!(
            "\nmesh = through both agents: HBONE (HTTP/2 CONNECT over mutual TLS 1.3) between the nodes."
        );
    }
    drop(tools);
    drop(servers);
    Ok(())
}

/// Holds `soak_connections` open through the mesh while new connections churn at `soak_rate`
/// for `soak_minutes`, sampling both agents at the start, the middle and the end. Nothing may
/// grow without bound: the end is compared with the middle.
fn soak(path: &Path2<'_>, agents: &[(&str, u32)], options: &Options) -> anyhow::Result<()> {
    const HOLD: u16 = 5003;
    // The server side holds its ends in a process of its own: this one holds the clients'
    // (both would not fit under one process's descriptor limit).
    let mut holder = std::process::Command::new("python3");
    holder.args([
        "-c",
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', 5003))\ns.listen(4096)\nheld = []\nwhile True:\n    held.append(s.accept()[0])\n",
    ]);
    let mut holder = path.cluster.pod(path.server).spawn(holder).context("starting the holding server")?;
    std::thread::sleep(Duration::from_millis(500));
    let stop = Arc::new(AtomicBool::new(false));
    println!(
        "\nsoak: {} connections held, {} new connections/s for {} min",
        options.soak_connections, options.soak_rate, options.soak_minutes
    );
    let mut open = Vec::with_capacity(options.soak_connections);
    for i in 0..options.soak_connections {
        open.push(path.connect(HOLD).with_context(|| format!("holding connection {i}"))?);
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut samples = vec![("start".to_owned(), sample(agents), 0u64, 0u64)];
    let (tried, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let churn = {
        let (tried, failed, stop) = (tried.clone(), failed.clone(), stop.clone());
        let cluster_path = (path.client, path.addr(ECHO));
        let pause = Duration::from_secs(1) / options.soak_rate.max(1);
        let client = path.cluster.pod(cluster_path.0).netns_path();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                tried.fetch_add(1, Ordering::Relaxed);
                let ok = ambit_tests::connect_in(&client, cluster_path.1, Duration::from_secs(5))
                    .and_then(|mut s| ambit_tests::echo_roundtrip(&mut s, b"0123456789abcdef"))
                    .is_ok_and(|back| back == b"0123456789abcdef");
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                let next = started + pause * n;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };
    let total = Duration::from_secs(options.soak_minutes * 60);
    for label in ["middle", "end"] {
        std::thread::sleep(total / 2);
        samples.push((
            label.to_owned(),
            sample(agents),
            tried.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = churn.join();
    // The holder's sockets, less stdin, stdout, stderr and its listener.
    let still_held = fds(holder.id()).saturating_sub(4);
    let _ = holder.kill();
    let _ = holder.wait();
    let gone = |pid: &u32| {
        // An exited agent is a zombie until the harness reaps it: state Z in its stat line.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    };
    if agents.iter().any(|(_, pid)| gone(pid)) {
        println!("  AN AGENT DIED during the soak; its log:\n{}", path.cluster.agent_logs());
    }
    drop(open);

    let mut rows =
        vec![["when", "agent", "RSS", "fds", "CPU s", "churned", "failed"].map(String::from).to_vec()];
    for (label, per_agent, tried, failed) in &samples {
        for (name, (rss, fds, cpu)) in per_agent {
            rows.push(vec![
                label.clone(),
                (*name).to_owned(),
                format!("{:.1} MiB", *rss as f64 / 1024.0),
                fds.to_string(),
                format!("{cpu:.1}"),
                tried.to_string(),
                failed.to_string(),
            ]);
        }
    }
    crate::table::print(&rows);
    println!("  {still_held} of {} connections held by the server at the end", options.soak_connections);
    if still_held < options.soak_connections {
        println!(
            "  NOT ALL HELD: the mesh dropped {} of the held connections",
            options.soak_connections - still_held
        );
    }
    // Growth from the middle to the end: churn alone must not make anything climb.
    for (name, _) in agents {
        let at = |i: usize| samples[i].1.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap_or_default();
        let (middle, end) = (at(1), at(2));
        let grew = end.0 as f64 > middle.0 as f64 * 1.10 + 2048.0 || end.1 > middle.1 + 64;
        println!(
            "  agent {name}: middle -> end RSS {:+.1} MiB, fds {:+} {}",
            (end.0 as f64 - middle.0 as f64) / 1024.0,
            end.1 as i64 - middle.1 as i64,
            if grew { "GREW" } else { "flat" }
        );
    }
    Ok(())
}

/// (RSS KiB, open fds, CPU seconds) of each agent.
fn sample<'a>(agents: &[(&'a str, u32)]) -> Vec<(&'a str, (u64, usize, f64))> {
    agents.iter().map(|(name, pid)| (*name, (rss_kib(*pid), fds(*pid), cpu_seconds(*pid)))).collect()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// User + system CPU of a process, from `/proc/<pid>/stat` (fields 14 and 15, clock ticks).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// The mesh CA: `ca_pods` pods of as many service accounts start at once on node a, whose agent
/// gets their certificates from `ambit ca serve` in a node of its own (the mock API answering
/// TokenReview). Reports each new identity's wait (key, CSR, round trip, checks; from the
/// agent's log) and how many CSRs one CA core signs: the CA pinned to core 0, gRPC's Python
/// client on core 1 asking as fast as it can, issued certificates divided by the CA's CPU time.
fn ca(options: &Options) -> anyhow::Result<Vec<Vec<String>>> {
    let n = options.ca_pods.clamp(1, 250);
    let mut builder = Cluster::builder().node("a").node("ca").namespace("mesh", true);
    for i in 0..n {
        builder = builder.pod(PodSpec::new("mesh", &format!("p{i}"), "a").service_account(&format!("sa{i}")));
    }
    let cluster = builder.build().context("building the CA bench cluster")?;
    let dir = cluster.dir().join("mesh-ca");
    let init = std::process::Command::new(ambit_tests::ambit_binary())
        .args(["ca", "init", "--dir"])
        .arg(&dir)
        .output()?;
    anyhow::ensure!(init.status.success(), "ambit ca init: {}", String::from_utf8_lossy(&init.stderr));
    let api = cluster.mock_api().context("mock API")?;
    api.sync_yaml(&cluster.manifest()).context("pods into the mock API")?;
    api.apply(
        "/api/v1/pods",
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ambit-a", "namespace": "ambit-system", "uid": "uid-ambit-a"},
            "spec": {"nodeName": "a", "serviceAccountName": "ambit", "containers": [{"name": "agent", "image": "ambit"}]},
            "status": {"phase": "Running"},
        }),
    );
    api.add_token("bench-token", "ambit-system", "ambit", Some("ambit-a"), Some("a"), &["istio-ca"]);
    let token = cluster.dir().join("token");
    std::fs::write(&token, "bench-token")?;
    let ca = cluster.spawn_ca("ca", &dir, &[]).context("starting the CA")?;
    ca.wait_ready(Duration::from_secs(20)).context("CA readiness")?;
    let pin = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &ca.pid().to_string()])
        .output()?;
    anyhow::ensure!(pin.status.success(), "taskset: {}", String::from_utf8_lossy(&pin.stderr));

    let url = format!("https://{}:15012", cluster.node("ca").ip());
    let root = dir.join("ca-cert.pem");
    let started = Instant::now();
    let agent = cluster
        .spawn_agent(
            "a",
            &[
                "--ca-addr",
                &url,
                "--ca-root",
                &root.display().to_string(),
                "--ca-token",
                &token.display().to_string(),
            ],
        )
        .context("starting the agent")?;
    if let Err(e) = agent.wait_ready(Duration::from_secs(120)) {
        let log = agent.log_text();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        anyhow::bail!(
            "agent not ready: {e}; last log lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let ready = started.elapsed();
    let mut waits: Vec<f64> = agent
        .log_events()
        .iter()
        .filter(|e| e["message"] == "certificate issued by the CA")
        .filter_map(|e| e["took_ms"].as_f64())
        .collect();
    waits.sort_by(f64::total_cmp);
    anyhow::ensure!(waits.len() >= n, "{} of {n} identities issued", waits.len());
    let pct = |p: f64| waits[((waits.len() as f64 * p) as usize).min(waits.len() - 1)];
    drop(agent);

    let seconds = options.seconds.max(3) as f64;
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/ca/client.py");
    let mut load = std::process::Command::new("taskset");
    load.args(["-c", "1", "python3"])
        .arg(&client)
        .args(["--addr", &format!("{}:15012", cluster.node("ca").ip()), "--root"])
        .arg(&root)
        .arg("--token")
        .arg(&token)
        .args([
            "--identity",
            "spiffe://cluster.local/ns/mesh/sa/sa0",
            "--load",
            &seconds.to_string(),
            "--concurrency",
            "64",
        ]);
    let cpu_before = cpu_seconds(ca.pid());
    let out = cluster
        .node("a")
        .command_output(load, Duration::from_secs_f64(seconds + 60.0))
        .context("load client")?;
    let cpu = cpu_seconds(ca.pid()) - cpu_before;
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("load client: {}", String::from_utf8_lossy(&out.stderr)))?;
    let issued = counts["issued"].as_f64().unwrap_or(0.0);
    anyhow::ensure!(issued > 0.0 && counts["refused"] == 0, "load: {counts}");
    let dash = || "-".to_owned();
    Ok(vec![
        vec![
            format!("new identity waits (CSR round trip), p50 / p99, {n} pods at once"),
            dash(),
            format!("{:.1} / {:.1} ms", pct(0.5), pct(0.99)),
            format!("all ready in {:.2} s", ready.as_secs_f64()),
            "-".into(),
        ],
        vec![
            "CSRs signed per CA core-second".into(),
            dash(),
            format!("{:.0}", issued / cpu.max(1e-3)),
            format!("{:.0}/s at {:.0}% of the core", issued / seconds, cpu / seconds * 100.0),
            "-".into(),
        ],
    ])
}

/// 999 AuthorizationPolicies in the server's namespace that do not match the bench client
/// (half DENY, half ALLOW), and one ALLOW that does.
fn thousand_policies() -> String {
    let mut yaml = String::new();
    for i in 0..999 {
        let action = if i % 2 == 0 { "DENY" } else { "ALLOW" };
        yaml.push_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i:04}, namespace: mesh}}\n\
             spec:\n  action: {action}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/other{i}/sa/x]}}}}]\n    \
             to: [{{operation: {{ports: ['{}']}}}}]\n---\n",
            1000 + i
        ));
    }
    yaml.push_str(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: zz-client, namespace: mesh}\n\
         spec:\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]\n---\n",
    );
    yaml
}

/// Connect, 16-byte echo, close, as fast as one client can, for `time`.
fn connections_per_second(path: &Path2<'_>, time: Duration) -> anyhow::Result<f64> {
    let addr = path.addr(ECHO);
    let count = path.cluster.pod(path.client).in_netns(|| -> anyhow::Result<u64> {
        let mut count = 0u64;
        let mut buf = [0u8; 16];
        let started = Instant::now();
        while started.elapsed() < time {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.write_all(&[7u8; 16])?;
            stream.read_exact(&mut buf)?;
            count += 1;
        }
        Ok(count)
    })??;
    Ok(count as f64 / time.as_secs_f64())
}

/// KiB of agent memory (both agents) per idle proxied connection.
fn idle_memory(path: &Path2<'_>, agents: &[u32], n: usize) -> anyhow::Result<f64> {
    let rss = || agents.iter().map(|pid| rss_kib(*pid)).sum::<u64>();
    std::thread::sleep(Duration::from_millis(500));
    let before = rss();
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = path.connect(ECHO)?;
        ambit_tests::echo_roundtrip(&mut stream, b"x")?;
        open.push(stream);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss();
    drop(open);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The bench holds both ends of every connection (and its agents inherit the limit): as root,
/// up to the kernel's `nr_open`, else the hard limit.
fn raise_fd_limit() {
    let nr_open: u64 =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer; then the same struct back in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            let wanted = nr_open.min(1 << 20).max(limit.rlim_max);
            let raised = libc::rlimit { rlim_cur: wanted, rlim_max: wanted };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores")
}
