//! End to end: flow records from the kernel, enriched by the agents; `ambit trace`; metrics.

use std::{
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use ambit_tests::{Agent, Cluster, PodSpec, echo_roundtrip};
use serde_json::Value;

const HTTP: u16 = 8080;
const STEP: Duration = Duration::from_secs(5);

fn shop(extra_agent_args: &[&str]) -> (Cluster, Agent, Agent) {
    let cluster =
        Cluster::builder().shop().pod(PodSpec::new("legacy", "plain", "b")).build().expect("cluster");
    cluster.set_extra_yaml(include_str!("../../examples/shop/policies.yaml"));
    cluster.write_manifest().expect("write");
    let a = cluster.spawn_agent("a", extra_agent_args).expect("agent a");
    let b = cluster.spawn_agent("b", extra_agent_args).expect("agent b");
    a.wait_ready(Duration::from_secs(20)).expect("a ready");
    b.wait_ready(Duration::from_secs(20)).expect("b ready");
    (cluster, a, b)
}

/// Flow records of `agent`, as `ambit trace -o json` prints them.
fn trace(cluster: &Cluster, node: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["trace", "-o", "json"];
    all.extend_from_slice(args);
    let out = cluster.node(node).ambit(&all).expect("ambit trace");
    assert!(out.status.success(), "ambit trace: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn wait_record(cluster: &Cluster, node: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(r) = trace(cluster, node, &[]).into_iter().find(|r| ok(r)) {
            return r;
        }
        assert!(Instant::now() < deadline, "no {what} record on {node}: {:#?}", trace(cluster, node, &[]));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_real_mtls_connection_is_recorded_at_both_ends() {
    let (cluster, _a, _b) = shop(&[]);
    let _backend = cluster.pod("backend").echo_server(HTTP).expect("app");
    let mut stream =
        cluster.pod("frontend").connect(cluster.pod("backend").addr(HTTP), STEP).expect("connect");
    let payload = vec![7u8; 3000];
    assert_eq!(echo_roundtrip(&mut stream, &payload).expect("echo"), payload);
    drop(stream);

    let out = wait_record(&cluster, "a", "outbound close", |r| {
        r["event"] == "close" && r["direction"] == "outbound"
    });
    assert_eq!(out["src"]["pod"], "shop/frontend");
    assert_eq!(out["dst"]["pod"], "shop/backend");
    assert_eq!(out["dst"]["port"], HTTP);
    assert_eq!(out["src"]["identity"], "spiffe://cluster.local/ns/shop/sa/frontend-sa");
    assert_eq!(out["dst"]["identity"], "spiffe://cluster.local/ns/shop/sa/backend-sa");
    assert_eq!(out["security"], "mutual_tls");
    assert_eq!(out["verdict"], "allowed");
    assert_eq!(out["bytes_sent"], 3000, "{out}");
    assert_eq!(out["bytes_received"], 3000, "{out}");
    assert_eq!(out["end"], "fin");

    let inbound =
        wait_record(&cluster, "b", "inbound close", |r| r["event"] == "close" && r["direction"] == "inbound");
    assert_eq!(inbound["src"]["pod"], "shop/frontend", "the real source, not the agent: {inbound}");
    assert_eq!(inbound["src"]["identity"], "spiffe://cluster.local/ns/shop/sa/frontend-sa");
    assert_eq!(inbound["dst"]["pod"], "shop/backend");
    assert_eq!(inbound["policy"], "shop/backend");
    assert_eq!(inbound["bytes_sent"], 3000);
    assert_eq!(inbound["bytes_received"], 3000);
    assert!(
        trace(&cluster, "a", &[]).iter().any(|r| r["event"] == "open" && r["direction"] == "outbound"),
        "open record"
    );
}

#[test]
fn denials_refusals_resets_and_closed_ports_have_their_reasons() {
    let (cluster, _a, _b) = shop(&[]);
    let _db = cluster.pod("db").echo_server(HTTP).expect("db");
    let _backend = cluster.pod("backend").echo_server(HTTP).expect("backend");
    // Denied by policy: frontend may not reach db.
    let _ = cluster
        .pod("frontend")
        .connect(cluster.pod("db").addr(HTTP), STEP)
        .and_then(|mut s| echo_roundtrip(&mut s, b"x"));
    let denied =
        wait_record(&cluster, "b", "denied", |r| r["verdict"] == "denied" && r["dst"]["pod"] == "shop/db");
    assert_eq!(denied["event"], "refused");
    assert_eq!(denied["src"]["identity"], "spiffe://cluster.local/ns/shop/sa/frontend-sa");
    assert!(denied["reason"].as_str().is_some_and(|r| r.contains("no ALLOW policy matched")), "{denied}");
    let source_side = wait_record(&cluster, "a", "denied at the source", |r| {
        r["event"] == "close" && r["verdict"] == "denied"
    });
    assert_eq!(source_side["dst"]["pod"], "shop/db");
    // Refused by STRICT: plaintext from outside the mesh.
    let _ = cluster
        .pod("outsider")
        .connect(cluster.pod("backend").addr(HTTP), STEP)
        .and_then(|mut s| echo_roundtrip(&mut s, b"x"));
    let refused = wait_record(&cluster, "b", "refused", |r| r["verdict"] == "refused");
    assert_eq!(refused["src"]["pod"], "legacy/outsider");
    assert_eq!(refused["security"], "plaintext");
    assert_eq!(refused["policy"], "shop/default");
    // Reset by the server app: it closes with unread data, which makes the kernel send a reset.
    let listener = cluster.pod("backend").listen(9000).expect("listen");
    let resetter = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
    });
    let policies = include_str!("../../examples/shop/policies.yaml").replace("  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend-sa]}}]", "  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend-sa]}}]\n  - to: [{operation: {ports: ['9000']}}]");
    let generation = _b.generation();
    cluster.set_extra_yaml(&policies);
    cluster.write_manifest().expect("write");
    _b.wait_generation_after(generation, STEP).expect("reloaded");
    let mut s = cluster.pod("frontend").connect(cluster.pod("backend").addr(9000), STEP).expect("connect");
    s.write_all(b"first and more unread bytes").expect("write");
    resetter.join().expect("server");
    let mut sink = [0u8; 16];
    let _ = s.read(&mut sink);
    drop(s);
    let reset = wait_record(&cluster, "b", "server reset", |r| {
        r["event"] == "close" && r["direction"] == "inbound" && r["dst"]["port"] == 9000
    });
    assert_eq!(reset["end"], "reset_sent", "the app's socket sent the reset: {reset}");
    // Nothing listens: the destination agent answers 503 and the app socket is reset.
    let _ = cluster
        .pod("frontend")
        .connect(cluster.pod("backend").addr(9001), STEP)
        .and_then(|mut s| echo_roundtrip(&mut s, b"x"));
    let closed =
        wait_record(&cluster, "a", "closed port", |r| r["event"] == "close" && r["dst"]["port"] == 9001);
    assert_eq!(closed["verdict"], "error");
    assert!(closed["reason"].as_str().is_some_and(|r| r.contains("503")), "{closed}");
}

#[test]
fn trace_all_shows_unprotected_traffic() {
    let (cluster, _a, _b) = shop(&["--trace-all"]);
    let _plain = cluster.pod("plain").echo_server(HTTP).expect("plain");
    let mut s = cluster.pod("outsider").connect(cluster.pod("plain").addr(HTTP), STEP).expect("connect");
    echo_roundtrip(&mut s, b"hello").expect("echo");
    drop(s);
    let r = wait_record(&cluster, "a", "unprotected", |r| {
        r["event"] == "close" && r["src"]["pod"] == "legacy/outsider"
    });
    assert_eq!(r["security"], "plaintext");
    assert_eq!(r["verdict"], "unprotected");
    assert_eq!(r["mesh"], "not-enrolled");
    assert_eq!(r["dst"]["pod"], "legacy/plain");
    assert_eq!(r["bytes_sent"], 5);
    // Without --trace-all, the same traffic is not traced.
    let (cluster, _a, _b) = shop(&[]);
    let _plain = cluster.pod("plain").echo_server(HTTP).expect("plain");
    let _backend = cluster.pod("backend").echo_server(HTTP).expect("backend");
    let mut s = cluster.pod("outsider").connect(cluster.pod("plain").addr(HTTP), STEP).expect("connect");
    echo_roundtrip(&mut s, b"hello").expect("echo");
    drop(s);
    // A traced connection afterwards: once its close is recorded, the outsider's would be too.
    let mut marker =
        cluster.pod("frontend").connect(cluster.pod("backend").addr(HTTP), STEP).expect("connect");
    echo_roundtrip(&mut marker, b"marker").expect("echo");
    drop(marker);
    wait_record(&cluster, "a", "the enrolled pod's flow", |r| {
        r["event"] == "close" && r["src"]["pod"] == "shop/frontend"
    });
    assert!(trace(&cluster, "a", &[]).iter().all(|r| r["src"]["pod"] != "legacy/outsider"));
}

#[test]
fn trace_filters_and_formats() {
    let (cluster, _a, _b) = shop(&[]);
    let _apps = [
        cluster.pod("backend").echo_server(HTTP).expect("app"),
        cluster.pod("db").echo_server(HTTP).expect("app"),
    ];
    for (from, to) in [("frontend", "backend"), ("frontend", "db")] {
        let _ = cluster
            .pod(from)
            .connect(cluster.pod(to).addr(HTTP), STEP)
            .and_then(|mut s| echo_roundtrip(&mut s, b"x"));
    }
    wait_record(&cluster, "b", "db denial", |r| r["verdict"] == "denied");
    // The denial is recorded by the agent at once, the allowed connection when the kernel
    // reports its close: wait for both.
    wait_record(&cluster, "b", "backend's flow", |r| {
        r["dst"]["pod"] == "shop/backend" && r["event"] == "close"
    });
    let denied = trace(&cluster, "b", &["--verdict", "denied"]);
    assert!(!denied.is_empty() && denied.iter().all(|r| r["verdict"] == "denied"));
    let to_backend = trace(&cluster, "b", &["--to", "shop/backend"]);
    assert!(
        !to_backend.is_empty() && to_backend.iter().all(|r| r["dst"]["pod"] == "shop/backend"),
        "{to_backend:?}"
    );
    assert!(trace(&cluster, "b", &["--port", "9999"]).is_empty());
    let out = cluster.node("b").ambit(&["trace", "--verdict", "denied"]).expect("compact");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("shop/frontend") && text.contains("DENIED") && text.contains("no ALLOW policy matched"),
        "{text}"
    );
    let out = cluster.node("b").ambit(&["trace", "--verdict", "bogus"]).expect("bad filter");
    assert_eq!(out.status.code(), Some(2), "clap refuses an unknown verdict");

    // --follow streams what happens next.
    let mut follow = std::process::Command::new(ambit_tests::ambit_binary());
    follow.args(["trace", "--follow", "-o", "json", "--to", "shop/backend"]);
    let started = std::thread::scope(|scope| {
        let handle =
            scope.spawn(|| cluster.node("b").command_output(follow, Duration::from_secs(3)).expect("follow"));
        std::thread::sleep(Duration::from_millis(800));
        let _ = cluster
            .pod("frontend")
            .connect(cluster.pod("backend").addr(HTTP), STEP)
            .and_then(|mut s| echo_roundtrip(&mut s, b"y"));
        handle.join().expect("thread")
    });
    let streamed = String::from_utf8_lossy(&started.stdout);
    assert!(streamed.lines().any(|l| l.contains("\"event\":\"close\"")), "followed: {streamed}");
}

/// Scrapes a node's metrics endpoint with Python's HTTP client and Prometheus' own text-format
/// parser (independent of our code), returning `(name, labels, value)` samples.
fn scrape(cluster: &Cluster, node: &str) -> Vec<(String, serde_json::Map<String, Value>, f64)> {
    let script = "import json, urllib.request\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        text = urllib.request.urlopen('http://127.0.0.1:15020/metrics', timeout=5).read().decode()\n\
        print(json.dumps([[s.name, s.labels, s.value] for f in text_string_to_metric_families(text) for s in f.samples]))\n";
    let mut python = std::process::Command::new("python3");
    python.args(["-c", script]);
    let out = cluster.node(node).command_output(python, STEP).expect("python3");
    assert!(out.status.success(), "scrape: {}", String::from_utf8_lossy(&out.stderr));
    let samples: Vec<(String, serde_json::Map<String, Value>, f64)> =
        serde_json::from_slice(&out.stdout).expect("samples");
    samples
}

#[test]
fn metrics_use_istio_names_and_labels() {
    let (cluster, _a, _b) = shop(&[]);
    let _backend = cluster.pod("backend").echo_server(HTTP).expect("app");
    let mut stream =
        cluster.pod("frontend").connect(cluster.pod("backend").addr(HTTP), STEP).expect("connect");
    echo_roundtrip(&mut stream, &[1u8; 1234]).expect("echo");
    drop(stream);
    let _ = cluster
        .pod("frontend")
        .connect(cluster.pod("db").addr(HTTP), STEP)
        .and_then(|mut s| echo_roundtrip(&mut s, b"x"));
    std::thread::sleep(Duration::from_millis(500));

    let samples = scrape(&cluster, "b");
    let find = |name: &str, want: &[(&str, &str)]| -> Vec<f64> {
        samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name && want.iter().all(|(k, v)| labels.get(*k).and_then(Value::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect()
    };
    let allowed = [
        ("reporter", "destination"),
        ("source_workload", "frontend"),
        ("source_workload_namespace", "shop"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/frontend-sa"),
        ("destination_workload", "backend"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/backend-sa"),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
        // What Kiali's graph groups TCP traffic by.
        ("source_app", "frontend"),
        ("source_canonical_service", "frontend"),
        ("source_canonical_revision", "latest"),
        ("source_cluster", "Kubernetes"),
        ("destination_app", "backend"),
        ("destination_canonical_service", "backend"),
        ("destination_canonical_revision", "latest"),
        ("destination_cluster", "Kubernetes"),
        ("destination_service", "unknown"),
    ];
    assert_eq!(find("istio_tcp_connections_opened_total", &allowed), [1.0], "{samples:?}");
    assert_eq!(find("istio_tcp_connections_closed_total", &allowed), [1.0]);
    assert_eq!(find("istio_tcp_sent_bytes_total", &allowed), [1234.0]);
    assert_eq!(find("istio_tcp_received_bytes_total", &allowed), [1234.0]);
    let denied = [("destination_workload", "db"), ("response_flags", "DENIED")];
    assert_eq!(find("istio_tcp_connections_closed_total", &denied), [1.0], "{samples:?}");
    assert_eq!(find("istio_tcp_connections_failed_total", &denied), [1.0]);
    // The agent's own health.
    assert_eq!(find("ambit_pods_captured", &[]), [2.0]);
    assert_eq!(find("ambit_certificate_expiry_timestamp_seconds", &[]).len(), 2);
    assert!(!find("ambit_open_fds", &[]).is_empty());
    assert_eq!(find("ambit_flow_events_dropped_total", &[]), [0.0]);
}

#[test]
fn a_flood_of_events_drops_events_not_traffic() {
    // A one-page event buffer, and an agent that reads none of it for a while (stopped): the
    // traced connections of unenrolled pods (which do not pass through the agent) overflow it.
    // Every connection still works, and the overflow is counted.
    let (cluster, a, _b) = shop(&["--trace-all", "--flow-buffer-bytes", "4096"]);
    let _plain = cluster.pod("plain").echo_server(HTTP).expect("app");
    let dst = cluster.pod("plain").addr(HTTP);
    a.pause();
    let started = Instant::now();
    let outcome = cluster.pod("outsider").in_netns(|| {
        for _ in 0..300 {
            let mut s = std::net::TcpStream::connect_timeout(&dst, STEP)?;
            s.set_read_timeout(Some(STEP))?;
            s.write_all(b"ping")?;
            let mut back = [0u8; 4];
            s.read_exact(&mut back)?;
        }
        Ok::<_, std::io::Error>(())
    });
    let took = started.elapsed();
    a.resume();
    outcome.expect("netns").expect("every connection works while events overflow");
    assert!(took < Duration::from_secs(10), "traffic did not wait for the tracer: {took:?}");
    let dropped: f64 = scrape(&cluster, "a")
        .iter()
        .filter(|(n, ..)| n == "ambit_flow_events_dropped_total")
        .map(|(.., v)| *v)
        .sum();
    assert!(dropped > 0.0, "the overflow is counted and visible");
}
