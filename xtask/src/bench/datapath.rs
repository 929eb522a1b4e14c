//! The data path measured with the standard tools: iperf3 (bulk, 1 and 4 streams), sockperf
//! ping-pong (closed loop, and a fixed 1,000 messages/s), and a sequential connect + 16 B echo +
//! close client; direct and through the mesh interleaved (the order alternating run by run),
//! cross-node and same-node, with the agents' CPU from `/proc/<pid>/stat` per unit of work.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ambit_tests::Cluster;
use anyhow::{Context as _, bail};

const IPERF: u16 = 5201;
const SOCKPERF: u16 = 11111;
/// The echo port of the harness's echo server (the connection-rate client's peer).
pub(super) const ECHO: u16 = 5002;

/// A client pod and a server pod.
#[derive(Clone, Copy)]
pub(super) struct Pair<'a> {
    pub(super) cluster: &'a Cluster,
    pub(super) client: &'static str,
    pub(super) server: &'static str,
}

impl Pair<'_> {
    fn addr(&self, port: u16) -> SocketAddr {
        self.cluster.pod(self.server).addr(port)
    }

    /// Runs `command` in the client pod, bounded by `limit`; its stdout.
    fn run(&self, mut command: Command, limit: Duration) -> anyhow::Result<String> {
        command.stdin(Stdio::null());
        let out = self.cluster.pod(self.client).command_output(command, limit)?;
        if !out.status.success() {
            bail!(
                "{} in {}: {}{}",
                "benchmark client",
                self.client,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// iperf3 and sockperf servers in the server pods; stopped when dropped.
pub(super) struct Servers(Vec<Child>);

impl Servers {
    pub(super) fn start(cluster: &Cluster, pods: &[&str]) -> anyhow::Result<Self> {
        let mut children = Vec::new();
        for pod in pods {
            let ip = cluster.pod(pod).ip().to_string();
            let mut iperf = Command::new("iperf3");
            iperf.args(["--server", "--port", &IPERF.to_string(), "--bind", &ip]);
            let mut sockperf = Command::new("sockperf");
            sockperf.args(["server", "--tcp", "-i", &ip, "-p", &SOCKPERF.to_string()]);
            for mut command in [iperf, sockperf] {
                command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
                children
                    .push(cluster.pod(pod).spawn(command).context("iperf3/sockperf (setup installs them)")?);
            }
        }
        // Both listen within milliseconds; give a loaded machine some slack.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self(children))
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What one measure yields: its value, and how many units of work it did (bits, round trips,
/// connections) to divide the agents' CPU by.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sample {
    pub(super) value: f64,
    pub(super) p99: f64,
    pub(super) units: f64,
}

/// A data-path measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Measure {
    Iperf1,
    Iperf4,
    PingPong,
    PingPongPaced,
    Connections,
}

impl Measure {
    pub(super) const ALL: [Self; 5] =
        [Self::Iperf1, Self::Iperf4, Self::PingPong, Self::PingPongPaced, Self::Connections];

    pub(super) fn run(self, pair: Pair<'_>, time: Duration) -> anyhow::Result<Sample> {
        match self {
            Self::Iperf1 => iperf3(pair, 1, time),
            Self::Iperf4 => iperf3(pair, 4, time),
            Self::PingPong => sockperf(pair, time, None),
            Self::PingPongPaced => sockperf(pair, time, Some(1000)),
            Self::Connections => connections(pair, time),
        }
    }
}

/// Bits per second received by the server over `streams` parallel connections.
fn iperf3(pair: Pair<'_>, streams: usize, time: Duration) -> anyhow::Result<Sample> {
    let mut command = Command::new("iperf3");
    command.args(["--client", &pair.addr(IPERF).ip().to_string(), "--port", &IPERF.to_string()]).args([
        "--parallel",
        &streams.to_string(),
        "--time",
        &time.as_secs().max(1).to_string(),
        "--json",
    ]);
    let out = pair.run(command, time + Duration::from_secs(30))?;
    let report: serde_json::Value = serde_json::from_str(&out).context("iperf3's JSON report")?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3's report: {out}"))?;
    let seconds = report["end"]["sum_received"]["seconds"].as_f64().unwrap_or(time.as_secs_f64());
    Ok(Sample { value: bits, p99: 0.0, units: bits * seconds / 1e9 })
}

/// Round-trip p50 and p99 in microseconds of 64-byte TCP ping-pong, as fast as it goes or at
/// `mps` messages per second.
fn sockperf(pair: Pair<'_>, time: Duration, mps: Option<u32>) -> anyhow::Result<Sample> {
    let mut command = Command::new("sockperf");
    command
        .args(["ping-pong", "--tcp", "--full-rtt", "-m", "64", "-i", &pair.addr(SOCKPERF).ip().to_string()])
        .args(["-p", &SOCKPERF.to_string(), "-t", &time.as_secs().max(1).to_string()]);
    if let Some(mps) = mps {
        command.arg(format!("--mps={mps}"));
    }
    let out = pair.run(command, time + Duration::from_secs(30))?;
    // "sockperf: ---> percentile 50.000 =   35.123" (usec); "[Valid Duration] RunTime=… ; SentMessages=N; ReceivedMessages=M"
    let percentile = |p: &str| {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next()?.trim().parse::<f64>().ok())
            .with_context(|| format!("no percentile {p} in sockperf's output: {out}"))
    };
    let received = out
        .lines()
        .find(|l| l.contains("[Valid Duration]"))
        .and_then(|l| {
            l.split("ReceivedMessages=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .unwrap_or(0.0);
    Ok(Sample { value: percentile("50.000")?, p99: percentile("99.000")?, units: received })
}

/// Connect, 16-byte echo, close, sequentially, for `time`: connections per second.
fn connections(pair: Pair<'_>, time: Duration) -> anyhow::Result<Sample> {
    let addr = pair.addr(ECHO);
    let (count, p99) = pair.cluster.pod(pair.client).in_netns(|| -> anyhow::Result<(u64, f64)> {
        let mut count = 0u64;
        let mut buf = [0u8; 16];
        let mut samples = Vec::new();
        let started = std::time::Instant::now();
        while started.elapsed() < time {
            let t = std::time::Instant::now();
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_nodelay(true)?;
            stream.write_all(&[7u8; 16])?;
            stream.read_exact(&mut buf)?;
            drop(stream);
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            count += 1;
        }
        Ok((count, percentile(&mut samples, 0.99)))
    })??;
    Ok(Sample { value: count as f64 / time.as_secs_f64(), p99, units: count as f64 })
}

pub(super) fn percentile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 - 1.0) * q) as usize]
}

/// One run's direct and mesh samples of a measure, and the agents' CPU seconds during the mesh
/// one.
#[derive(Clone, Copy, Debug)]
pub(super) struct Paired {
    pub(super) direct: Sample,
    pub(super) mesh: Sample,
    pub(super) cpu: f64,
}

/// Every run of every measure, by topology and measure.
pub(super) type Results = BTreeMap<(&'static str, Measure), Vec<Paired>>;

/// Runs every measure `runs` times on each topology's pairs, direct and mesh interleaved,
/// their order alternating from run to run.
pub(super) fn measure(
    topologies: &[(&'static str, Pair<'_>, Pair<'_>)],
    measures: &[Measure],
    agents: &[u32],
    runs: usize,
    time: Duration,
) -> anyhow::Result<Results> {
    let mut results = Results::new();
    for run in 0..runs {
        for (topology, direct, mesh) in topologies {
            for &measure in measures {
                let one = |pair: Pair<'_>| -> anyhow::Result<(Sample, f64)> {
                    let before: f64 = agents.iter().map(|p| super::cpu_seconds(*p)).sum();
                    let sample =
                        measure.run(pair, time).with_context(|| format!("{measure:?}, {topology}"))?;
                    let after: f64 = agents.iter().map(|p| super::cpu_seconds(*p)).sum();
                    Ok((sample, after - before))
                };
                let (d, (m, cpu)) = if run % 2 == 0 {
                    let d = one(*direct)?.0;
                    (d, one(*mesh)?)
                } else {
                    let m = one(*mesh)?;
                    (one(*direct)?.0, m)
                };
                results.entry((topology, measure)).or_default().push(Paired { direct: d, mesh: m, cpu });
            }
        }
        eprintln!("bench: run {} of {runs} done", run + 1);
    }
    Ok(results)
}

/// Median and range of `values`.
pub(super) fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let median = percentile(&mut values, 0.5);
    (median, values.first().copied().unwrap_or(f64::NAN), values.last().copied().unwrap_or(f64::NAN))
}

/// Table rows: for each topology and measure, the medians of direct and mesh, the median
/// ratio (or added time) with its range, and the agents' CPU per unit.
pub(super) fn rows(results: &Results) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for ((topology, measure), runs) in results {
        let direct = |f: fn(&Sample) -> f64| spread(runs.iter().map(|r| f(&r.direct)).collect()).0;
        let mesh = |f: fn(&Sample) -> f64| spread(runs.iter().map(|r| f(&r.mesh)).collect()).0;
        let ratio = spread(runs.iter().map(|r| r.mesh.value / r.direct.value).collect());
        let cpu_per = |scale: f64| spread(runs.iter().map(|r| r.cpu / r.mesh.units * scale).collect()).0;
        let added = |f: fn(&Sample) -> f64| spread(runs.iter().map(|r| f(&r.mesh) - f(&r.direct)).collect());
        let label = |what: &str| format!("{topology}: {what}");
        match measure {
            Measure::Iperf1 | Measure::Iperf4 => rows.push(vec![
                label(if *measure == Measure::Iperf1 { "iperf3 1 stream" } else { "iperf3 4 streams" }),
                format!("{:.2} Gbit/s", direct(|s| s.value) / 1e9),
                format!("{:.2} Gbit/s", mesh(|s| s.value) / 1e9),
                format!("{:.2} ({:.2}-{:.2})", ratio.0, ratio.1, ratio.2),
                format!("{:.3} core per Gbit/s", cpu_per(1.0)),
            ]),
            Measure::PingPong | Measure::PingPongPaced => {
                let what = if *measure == Measure::PingPong { "closed loop" } else { "1,000 msg/s" };
                for (name, f) in
                    [("p50", (|s: &Sample| s.value) as fn(&Sample) -> f64), ("p99", |s: &Sample| s.p99)]
                {
                    let add = added(f);
                    let cpu = if name == "p50" {
                        format!("{:.1} core-us per round trip", cpu_per(1e6))
                    } else {
                        String::new()
                    };
                    rows.push(vec![
                        label(&format!("sockperf 64 B {what}, RTT {name}")),
                        format!("{:.1} us", direct(f)),
                        format!("{:.1} us", mesh(f)),
                        format!("{:+.0} us ({:+.0} to {:+.0})", add.0, add.1, add.2),
                        cpu,
                    ]);
                }
            }
            Measure::Connections => {
                rows.push(vec![
                    label("new connections/s (connect, 16 B echo, close)"),
                    format!("{:.0}", direct(|s| s.value)),
                    format!("{:.0}", mesh(|s| s.value)),
                    format!("{:.2} ({:.2}-{:.2})", ratio.0, ratio.1, ratio.2),
                    format!("{:.0} core-us per connection", cpu_per(1e6)),
                ]);
                let add = added(|s| s.p99);
                rows.push(vec![
                    label("new connection p99"),
                    format!("{:.0} us", direct(|s| s.p99)),
                    format!("{:.0} us", mesh(|s| s.p99)),
                    format!("{:+.0} us ({:+.0} to {:+.0})", add.0, add.1, add.2),
                    String::new(),
                ]);
            }
        }
    }
    rows
}
