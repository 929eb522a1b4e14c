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

const SINK: u16 = 5001;
const ECHO: u16 = 5002;

/// Bench options.
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Seconds per measure and path.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Idle connections opened to measure memory per connection.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// Only these measures (comma-separated): bulk, rr, cps, policies, memory, tracing.
    #[arg(long, value_delimiter = ',', default_value = "bulk,rr,cps,policies,memory,tracing")]
    only: Vec<String>,
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
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("mesh", true)
        .namespace("direct", false)
        .pod(PodSpec::new("mesh", "mclient", "a").service_account("client"))
        .pod(PodSpec::new("mesh", "mserver", "b").service_account("server"))
        .pod(PodSpec::new("direct", "dclient", "a"))
        .pod(PodSpec::new("direct", "dserver", "b"))
        .build()
        .context("building the bench cluster")?;
    let agent_a = cluster.start_agent("a")?;
    let agent_b = cluster.start_agent("b")?;
    let mut servers = Vec::new();
    for pod in ["mserver", "dserver"] {
        servers.push((cluster.pod(pod).sink_server(SINK)?, cluster.pod(pod).echo_server(ECHO)?));
    }
    for pod in ["mclient", "dclient", "mserver", "dserver"] {
        // Many short connections: every pod (and the agents inside them) may reuse TIME_WAIT
        // ports, alike on both paths.
        cluster.pod(pod).sysctl("ipv4/tcp_tw_reuse", "1")?;
        cluster.pod(pod).sysctl("ipv4/ip_local_port_range", "1024 65000")?;
    }
    let direct = Path2 { cluster: &cluster, client: "dclient", server: "dserver" };
    let mesh = Path2 { cluster: &cluster, client: "mclient", server: "mserver" };

    println!(
        "ambit bench: {}; {} s per measure and path; binary {}",
        machine(),
        options.seconds,
        ambit.display()
    );
    println!("  direct = pod to pod over veth and a bridge, no agent; mesh = the same through both agents\n");

    let mut rows: Vec<Vec<String>> = Vec::new();
    rows.push(["measure", "direct", "mesh", "mesh/direct", "ztunnel bar"].map(String::from).to_vec());

    let wanted = |m: &str| options.only.iter().any(|o| o == m);
    for streams in [1usize, 4].into_iter().filter(|_| wanted("bulk")) {
        let d = bulk(&direct, streams, secs)?;
        let m = bulk(&mesh, streams, secs)?;
        let bar = if streams == 1 { ">= 0.40" } else { ">= 0.18" };
        rows.push(vec![
            format!("bulk throughput, {streams} stream{}", if streams > 1 { "s" } else { "" }),
            gbps(d),
            gbps(m),
            format!("{:.2}", m / d),
            bar.into(),
        ]);
    }

    if wanted("rr") {
        let d = ping_pong(&direct, secs)?;
        let m = ping_pong(&mesh, secs)?;
        rows.push(vec![
            "request/response p50".into(),
            us(d.0),
            us(m.0),
            format!("+{:.0} us", m.0 - d.0),
            "<= +53 us".into(),
        ]);
        rows.push(vec![
            "request/response p99".into(),
            us(d.1),
            us(m.1),
            format!("+{:.0} us", m.1 - d.1),
            "<= +71 us".into(),
        ]);
    }

    if wanted("cps") {
        let d = connections_per_second(&direct, secs)?;
        let m = connections_per_second(&mesh, secs)?;
        rows.push(vec![
            "new connections/s (16 B echo)".into(),
            format!("{d:.0}"),
            format!("{m:.0}"),
            format!("{:.2}", m / d),
            ">= 2,100/s".into(),
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

    if wanted("tracing") {
        // The mesh path with the kernel tracer on and off, alternating agents three times and
        // keeping each side's best run: on this kind of machine the run-to-run noise is larger
        // than the effect being measured.
        let (mut on, mut off) = ((0f64, 0f64), (0f64, 0f64));
        let mut agents = vec![agent_a, agent_b];
        for round in 0..6 {
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
            let measured = (bulk(&mesh, 1, secs)?, connections_per_second(&mesh, secs)?);
            let best = if tracing { &mut on } else { &mut off };
            *best = (best.0.max(measured.0), best.1.max(measured.1));
        }
        rows.push(vec![
            "bulk 1 stream, tracing on vs off".into(),
            format!("{} (off)", gbps(off.0)),
            gbps(on.0),
            format!("{:.2}", on.0 / off.0),
            ">= 0.97 of off".into(),
        ]);
        rows.push(vec![
            "new connections/s, tracing on vs off".into(),
            format!("{:.0} (off)", off.1),
            format!("{:.0}", on.1),
            format!("{:.2}", on.1 / off.1),
            ">= 0.97 of off".into(),
        ]);
    }

    crate::table::print(&rows);
    println!("\nmesh = through both agents: HBONE (HTTP/2 CONNECT over mutual TLS 1.3) between the nodes.");
    drop(servers);
    Ok(())
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

/// Bytes per second over `streams` parallel connections for `time`.
fn bulk(path: &Path2<'_>, streams: usize, time: Duration) -> anyhow::Result<f64> {
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut connections = Vec::new();
    for _ in 0..streams {
        connections.push(path.connect(SINK)?);
    }
    let started = Instant::now();
    std::thread::scope(|scope| {
        for mut stream in connections {
            let (total, stop) = (total.clone(), stop.clone());
            scope.spawn(move || {
                let buf = vec![0x5au8; 128 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match stream.write(&buf) {
                        Ok(n) => total.fetch_add(n as u64, Ordering::Relaxed),
                        Err(_) => break,
                    };
                }
            });
        }
        std::thread::sleep(time);
        stop.store(true, Ordering::Relaxed);
    });
    Ok(total.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// p50 and p99 round-trip time in microseconds of 1-byte ping-pong on one connection.
fn ping_pong(path: &Path2<'_>, time: Duration) -> anyhow::Result<(f64, f64)> {
    let mut stream = path.connect(ECHO)?;
    let mut samples = Vec::with_capacity(100_000);
    let mut byte = [0u8; 1];
    let end = Instant::now() + time;
    while Instant::now() < end {
        let t = Instant::now();
        stream.write_all(b"p")?;
        stream.read_exact(&mut byte)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    Ok((pick(0.50), pick(0.99)))
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

fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer; then the same struct back in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores")
}

fn gbps(bytes_per_sec: f64) -> String {
    format!("{:.2} Gbit/s", bytes_per_sec * 8.0 / 1e9)
}

fn us(v: f64) -> String {
    format!("{v:.0} us")
}
