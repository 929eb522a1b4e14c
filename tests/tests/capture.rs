//! End to end: eBPF capture of pod traffic into the agent, fail-closed behaviour, restarts,
//! enrollment changes and bad input. Real namespaces, real programs, real agents; run as root.

use std::{
    io::{self, ErrorKind},
    net::SocketAddr,
    time::{Duration, Instant},
};

use ambit_tests::{Cluster, PodSpec, echo_roundtrip, wait_until};
use serde_json::Value;

const PORT: u16 = 8080;
const STEP: Duration = Duration::from_secs(5);

/// Two nodes; `shop` is in the mesh, `other` is not.
fn shop() -> Cluster {
    Cluster::builder().client_server().build().expect("cluster")
}

fn outbound_records(agent: &ambit_tests::Agent, dst: SocketAddr) -> usize {
    access_to(&agent.access_records(), "outbound", dst).len()
}

fn inbound_records(agent: &ambit_tests::Agent, dst: SocketAddr) -> usize {
    access_to(&agent.access_records(), "inbound", dst).len()
}

fn access_to(records: &[Value], direction: &str, dst: SocketAddr) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["direction"] == direction && r["dst.addr"] == dst.to_string())
        .cloned()
        .collect()
}

fn roundtrip(cluster: &Cluster, from: &str, to: SocketAddr) -> io::Result<()> {
    let mut stream = cluster.pod(from).connect(to, STEP)?;
    let back = echo_roundtrip(&mut stream, b"ping through the mesh")?;
    assert_eq!(back, b"ping through the mesh");
    Ok(())
}

#[test]
fn enrolled_traffic_goes_through_both_agents_and_other_traffic_does_not() {
    let cluster = shop();
    let agent_a = cluster.start_agent("a").expect("agent a");
    let agent_b = cluster.start_agent("b").expect("agent b");
    let server = cluster.pod("server").echo_server(PORT).expect("server");
    let plain = cluster.pod("plain").echo_server(PORT).expect("plain");
    let dst = cluster.pod("server").addr(PORT);

    // The application sees an ordinary connection to the address it asked for.
    let mut stream = cluster.pod("client").connect(dst, STEP).expect("connect through the mesh");
    assert_eq!(stream.peer_addr().expect("peer"), dst, "getpeername shows the original destination");
    assert_eq!(echo_roundtrip(&mut stream, b"hello").expect("echo"), b"hello");
    drop(stream);

    // Agent a captured it outbound with the right original destination, agent b inbound.
    let out = agent_a
        .wait_for_event(STEP, |e| {
            e["target"] == "access" && e["direction"] == "outbound" && e["dst.addr"] == dst.to_string()
        })
        .expect("outbound record on node a");
    assert_eq!(out["src.workload"], "client");
    assert_eq!(out["dst.workload"], "server");
    assert_eq!(out["bytes_sent"], 5);
    let inbound = agent_b
        .wait_for_event(STEP, |e| {
            e["target"] == "access" && e["direction"] == "inbound" && e["dst.addr"] == dst.to_string()
        })
        .expect("inbound record on node b");
    assert_eq!(inbound["src.workload"], "client");
    assert_eq!(server.peers().len(), 1, "the server app saw exactly one connection");

    // Inbound is captured even though the app listens on that port: a non-enrolled client's
    // connection to the enrolled server also passes agent b.
    roundtrip(&cluster, "outsider", dst).expect("outsider to server");
    agent_b
        .wait_for_event(STEP, |e| {
            e["target"] == "access" && e["direction"] == "inbound" && e["src.workload"] == "outsider"
        })
        .expect("inbound record for the outsider");

    // Traffic between pods outside the mesh is untouched: no agent sees it.
    let plain_dst = cluster.pod("plain").addr(PORT);
    roundtrip(&cluster, "outsider", plain_dst).expect("outsider to plain");
    // A mesh connection afterwards: once both agents logged it, they would have logged the other.
    let before = (outbound_records(&agent_a, dst), inbound_records(&agent_b, dst));
    roundtrip(&cluster, "client", dst).expect("marker through the mesh");
    wait_until(STEP, "the marker logged by both agents", || {
        outbound_records(&agent_a, dst) > before.0 && inbound_records(&agent_b, dst) > before.1
    });
    for agent in [&agent_a, &agent_b] {
        assert!(access_to(&agent.access_records(), "outbound", plain_dst).is_empty());
        assert!(access_to(&agent.access_records(), "inbound", plain_dst).is_empty());
    }
    assert_eq!(plain.peers()[0].ip(), cluster.pod("outsider").ip(), "direct traffic keeps its source");

    // The operator's view matches.
    let out = cluster.node("a").ambit(&["workloads", "-o", "json"]).expect("ambit workloads");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pods: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    let client = pods.iter().find(|p| p["name"] == "client").expect("client listed on node a");
    assert_eq!(client["state"], "captured");
    assert_eq!(client["stats"]["outbound"], 2, "the first connection and the marker");
    let outsider = pods.iter().find(|p| p["name"] == "outsider").expect("outsider listed");
    assert_eq!(outsider["state"], "not-captured");
    assert_eq!(outsider["enrollment"], "not-enrolled");
}

#[test]
fn killed_agent_fails_closed_and_a_new_one_takes_over() {
    let cluster = shop();
    let mut agent_a = cluster.start_agent("a").expect("agent a");
    let mut agent_b = cluster.start_agent("b").expect("agent b");
    let server = cluster.pod("server").echo_server(PORT).expect("server");
    let _plain = cluster.pod("plain").echo_server(PORT).expect("plain");
    let dst = cluster.pod("server").addr(PORT);
    roundtrip(&cluster, "client", dst).expect("works with agents up");
    let seen = server.peers().len();

    agent_a.kill();
    agent_b.kill();

    // Out of an enrolled pod: the connection is refused at once (nothing serves the capture
    // listener), never sent around the agent.
    let started = Instant::now();
    let err = cluster.pod("client").connect(dst, STEP).expect_err("no agent, no connection");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "failed fast: {:?}", started.elapsed());

    // Into an enrolled pod: reset at once, and the app never sees it.
    let started = Instant::now();
    let err = cluster.pod("outsider").connect(dst, STEP).expect_err("no agent, no connection");
    assert!(matches!(err.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "failed fast: {:?}", started.elapsed());
    assert_eq!(server.peers().len(), seen, "no connection reached the app without the agent");

    // Pods outside the mesh are unaffected.
    roundtrip(&cluster, "outsider", cluster.pod("plain").addr(PORT)).expect("plain traffic still flows");

    // A new agent re-opens the pinned state and traffic flows again within seconds.
    let started = Instant::now();
    let new_a = cluster.start_agent("a").expect("agent a again");
    let new_b = cluster.start_agent("b").expect("agent b again");
    roundtrip(&cluster, "client", dst).expect("works again after restart");
    assert!(started.elapsed() < Duration::from_secs(5), "took over in {:?}", started.elapsed());
    assert_eq!(server.peers().len(), seen + 1);
    let record = new_a
        .wait_for_event(STEP, |e| e["target"] == "access" && e["dst.addr"] == dst.to_string())
        .expect("new agent a proxied it");
    assert_eq!(record["security"], "mutual_tls", "still mTLS after the restart");
    drop(new_b);
}

#[test]
fn labels_enroll_and_release_a_running_pod() {
    let cluster = Cluster::builder()
        .node("a")
        .namespace("apps", false)
        .pod(PodSpec::new("apps", "web", "a"))
        .pod(PodSpec::new("apps", "api", "a"))
        .build()
        .expect("cluster");
    let agent = cluster.start_agent("a").expect("agent");
    let _api = cluster.pod("api").echo_server(PORT).expect("api");
    let dst = cluster.pod("api").addr(PORT);
    let outbound_count = || access_to(&agent.access_records(), "outbound", dst).len();

    roundtrip(&cluster, "web", dst).expect("before enrollment");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(outbound_count(), 0, "not enrolled yet: not captured");

    // Label the running pod: captured from its next connection, no restart.
    cluster.edit_pod("web", |p| p.labels.push(("istio.io/dataplane-mode".into(), "ambient".into())));
    cluster.write_manifest().expect("write");
    wait_until(STEP, "web captured", || agent.pod_state("web").as_deref() == Some("captured"));
    roundtrip(&cluster, "web", dst).expect("after enrollment");
    wait_until(STEP, "outbound record", || outbound_count() == 1);

    // `none` on the pod opts it out again.
    cluster.edit_pod("web", |p| p.labels = vec![("istio.io/dataplane-mode".into(), "none".into())]);
    cluster.write_manifest().expect("write");
    wait_until(STEP, "web released", || agent.pod_state("web").as_deref() == Some("not-captured"));
    roundtrip(&cluster, "web", dst).expect("after release");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(outbound_count(), 1, "released: no longer captured");
}

#[test]
fn bad_input_is_named_and_the_rest_keeps_working() {
    let cluster = Cluster::builder()
        .node("a")
        .namespace("shop", true)
        .pod(PodSpec::new("shop", "client", "a"))
        .pod(PodSpec::new("shop", "server", "a"))
        .pod(PodSpec::new("shop", "ghost", "a"))
        .build()
        .expect("cluster");
    cluster.edit_pod("ghost", |p| p.netns_override = Some("/var/run/netns/does-not-exist".into()));
    cluster.write_manifest().expect("write");

    let agent = cluster.spawn_agent("a", &[]).expect("agent");
    let _server = cluster.pod("server").echo_server(PORT).expect("server");
    let dst = cluster.pod("server").addr(PORT);
    wait_until(STEP, "the two good pods captured", || {
        agent.admin_json("/status").is_some_and(|s| s["pods_captured"] == 2)
    });
    // The broken pod is reported by name and path; the node is not ready; the others work.
    let out = cluster.node("a").ambit(&["workloads"]).expect("ambit workloads");
    let table = String::from_utf8_lossy(&out.stdout);
    let ghost = table.lines().find(|l| l.contains("ghost")).expect("ghost listed");
    assert!(ghost.contains("FAILED") && ghost.contains("/var/run/netns/does-not-exist"), "{table}");
    assert_eq!(agent.readiness().expect("readiness"), Some(503));
    roundtrip(&cluster, "client", dst).expect("good pods still work");

    // A broken edit is rejected with file and line; the last good state keeps serving.
    let good = cluster.manifest();
    cluster
        .write_raw_manifest(&format!("{good}apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n   oops: [\n"))
        .expect("write");
    let error_line = good.lines().count() + 5;
    let event = agent
        .wait_for_event(STEP, |e| e["message"].as_str().is_some_and(|m| m.contains("cluster file rejected")))
        .expect("rejection logged");
    let expected = format!("{}:{error_line}:", cluster.manifest_path().display());
    assert!(
        event["error"].as_str().is_some_and(|e| e.starts_with(&expected)),
        "{event} (expected {expected})"
    );
    let out = cluster.node("a").ambit(&["status"]).expect("ambit status");
    assert!(String::from_utf8_lossy(&out.stdout).contains("LAST RELOAD FAILED"));
    roundtrip(&cluster, "client", dst).expect("still serving the last good state");
    drop(agent);

    // At start, a broken file is a configuration error: exit code 2, file and line.
    let failed = cluster.spawn_agent("a", &[]).expect("spawn").wait_exit(STEP).expect("exits");
    assert_eq!(failed.status.code(), Some(2), "{}", failed.log);
    assert!(failed.log.contains(&expected), "{}", failed.log);
}

#[test]
fn operator_commands_explain_what_is_wrong() {
    let cluster = Cluster::builder().node("a").build().expect("cluster");
    // No agent on this node: a clear message and exit code 1.
    let out = cluster.node("a").ambit(&["status"]).expect("ambit status");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the ambit agent's admin API at 127.0.0.1:15000"), "{stderr}");
    // Bad usage: exit code 2.
    let out = cluster.node("a").ambit(&["status", "-o", "yaml"]).expect("ambit status");
    assert_eq!(out.status.code(), Some(2));

    // Not root: one clear message at start.
    use std::os::unix::process::CommandExt as _;
    let out = std::process::Command::new(ambit_tests::ambit_binary())
        .args(["agent", "--local", "/dev/null", "--node", "a"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as root"));

    // An instance that is not one directory name would pin outside --bpf-dir/<instance>: refused
    // before anything is loaded. Control: `--instance a` passes the check and stops at the root
    // check, as above.
    let agent_with = |instance: &str| {
        std::process::Command::new(ambit_tests::ambit_binary())
            .args(["agent", "--local", "/dev/null", "--node", "a", "--instance", instance])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run as nobody")
    };
    let control = agent_with("a");
    assert_eq!(control.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&control.stderr).contains("must run as root"));
    let out = agent_with("..");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--instance \"..\" must be one directory name"));
}

#[test]
fn pods_without_annotation_are_found_through_kubelet_style_cgroups() {
    use ambit_tests::CgroupDriver;
    let cluster = Cluster::builder()
        .node("a")
        .namespace("shop", true)
        .pod(PodSpec::new("shop", "client", "a").discovered(CgroupDriver::Systemd))
        .pod(PodSpec::new("shop", "server", "a").discovered(CgroupDriver::Cgroupfs))
        .pod(PodSpec::new("shop", "late", "a").discovered(CgroupDriver::Systemd))
        .build()
        .expect("cluster");
    // The pods' processes, in their netns and their kubelet-named cgroups.
    let sleeper = |pod: &str| {
        let mut sleep = std::process::Command::new("sleep");
        sleep.arg("120");
        cluster.pod(pod).spawn(sleep).expect("process in the pod")
    };
    let mut processes = vec![sleeper("client"), sleeper("server")];
    let agent = cluster.spawn_agent("a", &[]).expect("agent");
    wait_until(STEP, "client and server found", || {
        agent.pod_state("client").as_deref() == Some("captured")
            && agent.pod_state("server").as_deref() == Some("captured")
    });
    // A pod whose process is not there is reported, and picked up once it is.
    let late = agent.admin_json("/workloads").expect("workloads");
    let late = late.as_array().expect("list").iter().find(|p| p["name"] == "late").cloned().expect("late");
    assert_eq!(late["state"], "failed");
    assert!(
        late["error"].as_str().is_some_and(|e| e.contains("no process in a cgroup of pod UID")),
        "{late}"
    );
    assert_eq!(agent.readiness().expect("readiness"), Some(503));

    let _server = cluster.pod("server").echo_server(PORT).expect("server");
    roundtrip(&cluster, "client", cluster.pod("server").addr(PORT)).expect("through the mesh");
    agent
        .wait_for_event(STEP, |e| {
            e["target"] == "access" && e["direction"] == "outbound" && e["dst.workload"] == "server"
        })
        .expect("captured");

    processes.push(sleeper("late"));
    wait_until(Duration::from_secs(8), "late pod captured on retry", || {
        agent.pod_state("late").as_deref() == Some("captured")
    });
    assert_eq!(agent.readiness().expect("readiness"), Some(200));
    for mut p in processes {
        let _ = p.kill();
        let _ = p.wait();
    }
}

/// The DaemonSet mounts the CA Secret read-only. Before, the agent could not start at all (it
/// created `.lock` in the CA directory). Now, with both files brought, it starts and serves
/// mTLS; the control: a write into that mount fails, so it really is read-only.
#[test]
fn an_agent_starts_with_its_ca_directory_read_only() {
    let cluster = shop();
    let out = std::process::Command::new(ambit_tests::ambit_binary())
        .args(["ca", "init", "--dir"])
        .arg(cluster.ca_dir())
        .output()
        .expect("ambit ca init");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ca = vec![cluster.ca_dir()];
    let a = cluster.spawn_agent_read_only("a", &[], &ca).expect("agent a");
    let b = cluster.spawn_agent_read_only("b", &[], &ca).expect("agent b");
    for agent in [&a, &b] {
        agent.wait_ready(STEP).expect("ready with a read-only CA directory");
    }
    let _server = cluster.pod("server").echo_server(PORT).expect("server");
    roundtrip(&cluster, "client", cluster.pod("server").addr(PORT)).expect("mTLS");
    let record = a
        .wait_for_event(STEP, |e| e["target"] == "access" && e["direction"] == "outbound")
        .expect("outbound record");
    assert_eq!(record["security"], "mutual_tls");
    // The control: in the agent's mount namespace the directory refuses writes.
    let probe = std::process::Command::new("nsenter")
        .arg(format!("--mount=/proc/{}/ns/mnt", a.pid()))
        .args(["sh", "-c"])
        .arg(format!("touch {}/x", cluster.ca_dir().display()))
        .output()
        .expect("nsenter");
    assert!(!probe.status.success(), "the CA directory is writable in the agent's namespace");
    assert!(String::from_utf8_lossy(&probe.stderr).contains("Read-only"), "{probe:?}");
}
