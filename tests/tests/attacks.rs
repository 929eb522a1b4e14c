//! End to end: the attacks of SECURITY.md, as a hostile tenant (pod specs, floods, spoofed
//! packets) and a careless operator (pins removed, ports taken, restarts) would make them. Each
//! test first shows the setup is real (a control that would fail if the attack could not work
//! or the mechanism were not live), then that the attack is refused and named, and that the
//! node's own traffic and every other pod are unaffected.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use ambit_tests::{Agent, Cluster, PodSpec, echo_roundtrip, wait_until};

const HTTP: u16 = 8080;
const STEP: Duration = Duration::from_secs(5);
const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n---\n";

fn roundtrip(cluster: &Cluster, from: &str, to: SocketAddr) -> Result<(), ErrorKind> {
    cluster.pod(from).attempt(to)
}

fn state(agent: &Agent, pod: &str) -> (String, String) {
    let report = agent.pod_report(pod).unwrap_or_default();
    (report["state"].as_str().unwrap_or("").to_owned(), report["error"].as_str().unwrap_or("").to_owned())
}

/// A pod spec names the agent's own network namespace, or another pod's. Before, the agent
/// "captured" the node itself (all of its inbound TCP dropped, its outbound proxied under the
/// pod's identity) or steered another pod's traffic. Now both pods are refused by name and
/// nothing is installed for them.
#[test]
fn a_pod_spec_cannot_choose_the_namespace_the_agent_enters() {
    let cluster = Cluster::builder()
        .node("a")
        .namespace("shop", true)
        .namespace("other", false)
        .pod(PodSpec::new("shop", "client", "a"))
        .pod(PodSpec::new("shop", "server", "a"))
        .pod(PodSpec::new("shop", "hostile", "a"))
        .pod(PodSpec::new("shop", "thief", "a"))
        .pod(PodSpec::new("other", "plain", "a"))
        .build()
        .expect("cluster");
    let server_netns = cluster.pod("server").netns_path().display().to_string();
    cluster.edit_pod("hostile", |p| p.netns_override = Some("/proc/self/ns/net".into()));
    cluster.edit_pod("thief", |p| p.netns_override = Some(server_netns.clone()));
    cluster.write_manifest().expect("write");
    let agent = cluster.start_agent("a").expect("ready: refused pods do not hold the node unready");
    let _server = cluster.pod("server").echo_server(HTTP).expect("server");
    let plain = cluster.pod("plain").echo_server(HTTP).expect("plain");

    let (hostile, why) = state(&agent, "hostile");
    assert_eq!(hostile, "refused", "{why}");
    assert!(why.contains("/proc/self/ns/net") && why.contains("agent's own network namespace"), "{why}");
    let (thief, why) = state(&agent, "thief");
    assert_eq!(thief, "refused", "{why}");
    assert!(why.contains("already enrolled for pod shop/server"), "{why}");
    assert!(agent.pod_report("hostile").is_some_and(|r| r["netns_cookie"].is_null()), "nothing held");
    let out = cluster.node("a").ambit(&["workloads"]).expect("ambit workloads");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().any(|l| l.contains("hostile") && l.contains("REFUSED")), "{table}");
    let status = agent.admin_json("/status").expect("status");
    assert_eq!(status["pods_refused"], 2, "{status}");

    // The node's own traffic is its own: a host service takes connections from pods, and the
    // node's connections leave unproxied, from the node's address.
    let node_service = cluster.node("a").echo_server(9999).expect("host service");
    let node_addr = SocketAddr::new(cluster.node("a").ip(), 9999);
    assert_eq!(roundtrip(&cluster, "plain", node_addr), Ok(()), "inbound TCP to the node");
    assert_eq!(node_service.peers().len(), 1);
    let mut s = cluster.node("a").connect(cluster.pod("plain").addr(HTTP), STEP).expect("node outbound");
    assert_eq!(echo_roundtrip(&mut s, b"node").expect("echo"), b"node");
    assert_eq!(plain.peers()[0].ip(), cluster.node("a").ip(), "the node's connection was not proxied");
    // The real server keeps its own traffic, over mTLS with its own identity.
    assert_eq!(roundtrip(&cluster, "client", cluster.pod("server").addr(HTTP)), Ok(()));
    let record = agent
        .wait_for_event(STEP, |e| e["target"] == "access" && e["direction"] == "inbound")
        .expect("inbound record");
    assert_eq!(record["dst.workload"], "server", "{record}");
    assert_eq!(record["dst.identity"], "spiffe://cluster.local/ns/shop/sa/default", "{record}");

    // The control: the annotation is live in local mode. Pointed at its own namespace, the
    // thief is captured like any pod.
    let own = cluster.pod("thief").netns_path().display().to_string();
    cluster.edit_pod("thief", |p| p.netns_override = Some(own));
    cluster.write_manifest().expect("write");
    wait_until(STEP, "thief captured in its own netns", || state(&agent, "thief").0 == "captured");
}

/// In a cluster, whoever may create a pod must not choose the namespace at all: the
/// annotation is ignored, and the pod is found through its own processes.
#[test]
fn in_a_cluster_the_netns_annotation_is_ignored() {
    let cluster = Cluster::builder()
        .node("a")
        .namespace("shop", true)
        .pod(PodSpec::new("shop", "client", "a"))
        .pod(PodSpec::new("shop", "server", "a"))
        .pod(PodSpec::new("shop", "hostile", "a"))
        .build()
        .expect("cluster");
    let server_netns = cluster.pod("server").netns_path().display().to_string();
    cluster.edit_pod("hostile", |p| p.netns_override = Some(server_netns));
    let _processes = cluster.start_pod_processes().expect("pod processes");
    let api = cluster.mock_api().expect("mock API");
    api.sync_yaml(&cluster.manifest()).expect("objects");
    let agent = cluster.start_kube_agent("a").expect("agent");
    // Each pod is held in the namespace of its own processes.
    let cookie = |pod: &str| agent.pod_report(pod).map(|r| r["netns_cookie"].clone()).unwrap_or_default();
    wait_until(STEP, "all captured", || {
        ["client", "server", "hostile"].iter().all(|p| state(&agent, p).0 == "captured")
    });
    assert_ne!(cookie("hostile"), cookie("server"), "the hostile pod got its own namespace");
    agent
        .wait_for_event(STEP, |e| {
            e["pod"] == "shop/hostile"
                && e["message"].as_str().is_some_and(|m| m.contains("ignoring the annotation"))
        })
        .expect("the ignored annotation is logged");
    let _server = cluster.pod("server").echo_server(HTTP).expect("server");
    assert_eq!(roundtrip(&cluster, "client", cluster.pod("server").addr(HTTP)), Ok(()));
    let record = agent
        .wait_for_event(STEP, |e| e["target"] == "access" && e["direction"] == "inbound")
        .expect("inbound record");
    assert_eq!(record["dst.workload"], "server", "{record}");
}

/// A careless operator (or a cleanup script) removes ambit's pins while the agent runs. Before,
/// that detached the programs: plaintext reached a STRICT app and the client's traffic left
/// unencrypted while readiness said 200. Now the agent holds its own references, enforcement
/// never lapses, and the pins are back within seconds.
#[test]
fn removed_pins_do_not_open_anything_and_come_back() {
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    cluster.set_extra_yaml(STRICT);
    cluster.write_manifest().expect("write");
    let mut a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    let server = cluster.pod("server").echo_server(HTTP).expect("server");
    let dst = cluster.pod("server").addr(HTTP);
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
    assert!(roundtrip(&cluster, "outsider", dst).is_err(), "STRICT refuses plaintext");
    let seen = server.peers().len();

    let pins = |node: &str| -> Vec<std::path::PathBuf> {
        let dir = cluster.pin_dir(node);
        let mut all = Vec::new();
        for sub in ["links", "netns", "."] {
            for entry in std::fs::read_dir(dir.join(sub)).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    all.push(entry.path());
                }
            }
        }
        all
    };
    let before = (pins("a").len(), pins("b").len());
    assert!(before.0 > 5 && before.1 > 5, "links and maps are pinned: {before:?}");
    for path in pins("a").into_iter().chain(pins("b")) {
        std::fs::remove_file(&path).expect("remove pin");
    }
    // Still enforced at once: plaintext refused, the client's connection through mTLS.
    assert!(roundtrip(&cluster, "outsider", dst).is_err(), "STRICT still refuses plaintext");
    assert_eq!(server.peers().len(), seen, "no plaintext reached the app");
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
    let record = a
        .wait_for_event(STEP, |e| e["target"] == "access" && e["direction"] == "outbound")
        .expect("outbound record");
    assert_eq!(record["security"], "mutual_tls", "{record}");
    // Back within seconds, said in status and metrics, and readiness never dropped.
    wait_until(STEP, "pins back", || pins("a").len() == before.0 && pins("b").len() == before.1);
    wait_until(STEP, "repairs reported", || {
        a.admin_json("/status").is_some_and(|s| s["datapath"]["repairs_total"].as_u64() >= Some(5))
    });
    assert_eq!(a.readiness().expect("readiness"), Some(200));
    let metrics = a.http_get(15020, "/metrics").expect("metrics").expect("answer").1;
    assert!(metrics.lines().any(|l| l.starts_with("ambit_datapath_repairs_total ") && !l.ends_with(" 0")));
    let out = cluster.node("a").ambit(&["status"]).expect("ambit status");
    assert!(String::from_utf8_lossy(&out.stdout).contains("repairs since start"), "{:?}", out);

    // The control, that these are the files that matter: with no agent holding them, a pin is
    // the only reference. Agent a gone and its connect4 pin removed, the client's connections
    // are no longer captured.
    a.kill();
    let connect4 = cluster.pin_dir("a").join("links/capture_connect4");
    assert!(connect4.exists(), "re-pinned by the agent");
    std::fs::remove_file(&connect4).expect("remove");
    let plain = cluster.pod("plain").echo_server(HTTP).expect("plain");
    // The kernel detaches a link whose last reference went away asynchronously.
    wait_until(STEP, "the client's connection goes direct once the pin was the last reference", || {
        roundtrip(&cluster, "client", cluster.pod("plain").addr(HTTP)).is_ok()
    });
    assert_eq!(
        plain.peers()[0].ip(),
        cluster.pod("client").ip(),
        "not proxied: the pin was the last reference"
    );
    drop(b);
}

/// A careless operator (or an app) holds the agent's ports in a STRICT pod, and the agent
/// restarts. Before, its listener failed and the first reconcile unlinked the inbound program
/// a previous agent left enforcing: plaintext reached the app. Now the pod is failed, named,
/// and closed; and a pod whose namespace cannot be found keeps what was enforcing.
#[test]
fn a_pod_whose_capture_fails_stays_closed() {
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    cluster.set_extra_yaml(STRICT);
    cluster.write_manifest().expect("write");
    let _a = cluster.start_agent("a").expect("agent a");
    let mut b = cluster.start_agent("b").expect("agent b");
    let server = cluster.pod("server").echo_server(HTTP).expect("server");
    let dst = cluster.pod("server").addr(HTTP);
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
    assert!(roundtrip(&cluster, "outsider", dst).is_err(), "the control: STRICT refuses plaintext");

    // Agent b goes away; an app takes the inbound and HBONE ports in the server's netns.
    b.kill();
    let squat_inbound = cluster.pod("server").echo_server(15006).expect("app on 15006");
    let squat_hbone = cluster.pod("server").echo_server(15008).expect("app on 15008");
    let b = cluster.spawn_agent("b", &[]).expect("agent b again");
    wait_until(STEP, "server reported failed", || state(&b, "server").0 == "failed");
    let (_, why) = state(&b, "server");
    assert!(why.contains("opening listener") && why.contains("15006"), "{why}");
    assert_eq!(b.readiness().expect("readiness"), Some(503), "not ready while a pod is not served");
    let started = Instant::now();
    for port in [HTTP, 15006, 15008] {
        let to = cluster.pod("server").addr(port);
        assert!(roundtrip(&cluster, "outsider", to).is_err(), "plaintext to {to} refused");
        assert!(roundtrip(&cluster, "client", to).is_err(), "{to}: nothing serves the pod");
    }
    assert!(started.elapsed() < Duration::from_secs(6), "refused fast: {:?}", started.elapsed());
    let total = server.peers().len() + squat_inbound.peers().len() + squat_hbone.peers().len();
    assert_eq!(total, 1, "only the first, allowed connection ever reached an app in the pod");
    // The pod's own outbound traffic is captured too, into nothing: refused, never direct.
    let _plain = cluster.pod("plain").echo_server(HTTP).expect("plain");
    assert!(roundtrip(&cluster, "server", cluster.pod("plain").addr(HTTP)).is_err());
    // Retried every few seconds without issuing a certificate each time.
    std::thread::sleep(Duration::from_secs(5));
    let issued = b
        .log_events()
        .iter()
        .filter(|e| {
            e["message"] == "certificate issued"
                && e["identity"].as_str().is_some_and(|i| i.ends_with("/sa/server-sa"))
        })
        .count();
    assert!(issued <= 1, "issued {issued} certificates for a pod that keeps failing");

    // The ports are free again: captured at the next retry, and served.
    drop((squat_inbound, squat_hbone));
    wait_until(Duration::from_secs(8), "server captured", || state(&b, "server").0 == "captured");
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
    assert!(roundtrip(&cluster, "outsider", dst).is_err());
    assert_eq!(b.readiness().expect("readiness"), Some(200));

    // A namespace that cannot be found (late, or a procfs miss) after a restart: what the
    // previous agent left stays in force until it is found.
    let mut b = b;
    b.kill();
    let real = cluster.pod("server").netns_path().display().to_string();
    cluster.edit_pod("server", |p| p.netns_override = Some("/var/run/netns/not-yet".into()));
    cluster.write_manifest().expect("write");
    let b = cluster.spawn_agent("b", &[]).expect("agent b, third");
    wait_until(STEP, "server failed", || state(&b, "server").0 == "failed");
    assert!(roundtrip(&cluster, "outsider", dst).is_err(), "still closed");
    assert_eq!(server.peers().len(), 2, "no plaintext reached the app");
    cluster.edit_pod("server", |p| p.netns_override = Some(real));
    cluster.write_manifest().expect("write");
    wait_until(STEP, "server captured", || state(&b, "server").0 == "captured");
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
}

/// A connection made straight to the capture listener (or a later one from the same client
/// port) must not inherit where an earlier connection was going.
#[test]
fn an_original_destination_serves_one_connection() {
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    let a = cluster.start_agent("a").expect("agent a");
    let _b = cluster.start_agent("b").expect("agent b");
    let server = cluster.pod("server").echo_server(HTTP).expect("server");
    let dst = cluster.pod("server").addr(HTTP);
    const PORT: u16 = 40_123;
    let bound_connect = |to: SocketAddr| -> std::io::Result<TcpStream> {
        cluster.pod("client").in_netns(|| -> std::io::Result<TcpStream> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from(([0, 0, 0, 0], PORT)).into())?;
            socket.connect_timeout(&to.into(), STEP)?;
            Ok(socket.into())
        })?
    };
    // The control: a captured connection from that port reaches the server through the mesh.
    let mut first = bound_connect(dst).expect("captured connection");
    assert_eq!(echo_roundtrip(&mut first, b"first").expect("echo"), b"first");
    let _ = socket2::SockRef::from(&first).set_linger(Some(Duration::ZERO));
    drop(first);
    a.wait_for_event(STEP, |e| e["target"] == "access" && e["dst.addr"] == dst.to_string()).expect("proxied");
    // Straight to the outbound listener from the same port: nothing recorded for it.
    let seen = server.peers().len();
    let direct = bound_connect("127.0.0.1:15001".parse().expect("addr")).and_then(|mut s| {
        s.set_read_timeout(Some(STEP))?;
        echo_roundtrip(&mut s, b"again")
    });
    assert!(direct.is_err(), "a stale destination was reused: {direct:?}");
    assert_eq!(server.peers().len(), seen, "the server saw nothing");
}

/// One pod floods a destination with connections its policy denies. Before, each 401 made the
/// source agent dial a fresh TLS connection, retry there (two denials logged) and keep that
/// connection for 5 minutes: 3,500 denials exhausted a 3,000-descriptor agent. Now denials
/// share the pooled connection, each is logged once, and descriptors stay flat.
#[test]
fn a_flood_of_denied_connections_costs_no_descriptors() {
    let cluster = Cluster::builder().shop().build().expect("cluster");
    cluster.set_extra_yaml(include_str!("../../examples/shop/policies.yaml"));
    cluster.write_manifest().expect("write");
    let a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    let db_app = cluster.pod("db").echo_server(HTTP).expect("db");
    let db = cluster.pod("db").addr(HTTP);
    // The control: the policy is live (backend allowed, frontend denied).
    assert_eq!(roundtrip(&cluster, "backend", db), Ok(()));
    assert!(roundtrip(&cluster, "frontend", db).is_err());
    std::thread::sleep(Duration::from_millis(300));
    let before = (a.open_fds(), b.open_fds());
    let mut capture = cluster.capture().expect("tcpdump");

    const THREADS: usize = 8;
    const EACH: usize = 125;
    let refused: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| (0..EACH).filter(|_| roundtrip(&cluster, "frontend", db).is_err()).count())
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    assert_eq!(refused, THREADS * EACH, "every flood connection was denied");
    assert_eq!(db_app.peers().len(), 1, "only backend's connection reached db");
    capture.finish().expect("capture");
    let dials = capture
        .count(&format!(
            "dst host {} and tcp dst port 15008 and tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0",
            db.ip()
        ))
        .expect("tcpdump -r");
    assert!(dials <= 2, "{dials} TLS connections dialed for {refused} denials");
    std::thread::sleep(Duration::from_secs(1));
    let after = (a.open_fds(), b.open_fds());
    assert!(after.0 <= before.0 + 16 && after.1 <= before.1 + 16, "descriptors {before:?} -> {after:?}");
    let denials = b
        .access_records()
        .iter()
        .filter(|r| r["authz.verdict"] == "denied" && r["dst.workload"] == "db")
        .count();
    assert_eq!(denials, THREADS * EACH + 1, "one denial record per connection");
    // Legitimate traffic was never affected.
    assert_eq!(roundtrip(&cluster, "backend", db), Ok(()));
}

/// A pod opens thousands of idle connections to the node's metrics and readiness ports.
/// Before, none was ever closed and at the descriptor limit probes and mesh traffic failed.
/// Now one peer holds a few at most, those are closed after the header timeout, and readiness
/// and the mesh keep working throughout.
#[test]
fn idle_connections_to_node_ports_are_bounded_and_closed() {
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    let _a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    let _server = cluster.pod("server").echo_server(HTTP).expect("server");
    let before = b.open_fds();
    let node_b = cluster.node("b").ip();
    // 1,000 each to 15020 and 15021, from a pod on the other node.
    let idle: Vec<TcpStream> = cluster
        .pod("outsider")
        .in_netns(|| {
            (0..2000)
                .filter_map(|i| {
                    let port = if i % 2 == 0 { 15020 } else { 15021 };
                    TcpStream::connect_timeout(&SocketAddr::new(node_b, port), STEP).ok()
                })
                .collect()
        })
        .expect("netns");
    assert!(!idle.is_empty(), "the control: the node ports are reachable from a pod");
    std::thread::sleep(Duration::from_millis(300));
    let held = b.open_fds().saturating_sub(before);
    assert!(held <= 40, "the agent holds {held} descriptors for one idle peer");
    // Meanwhile: readiness, metrics and the mesh work.
    let started = Instant::now();
    assert_eq!(b.readiness().expect("readiness"), Some(200));
    assert!(b.http_get(15020, "/metrics").expect("metrics").is_some_and(|(s, _)| s == 200));
    assert!(started.elapsed() < Duration::from_secs(1), "answered at once: {:?}", started.elapsed());
    assert_eq!(roundtrip(&cluster, "client", cluster.pod("server").addr(HTTP)), Ok(()));
    // After the header timeout every idle connection is closed by the agent.
    std::thread::sleep(Duration::from_secs(7));
    let open = idle
        .iter()
        .filter(|s| {
            let _ = s.set_nonblocking(true);
            let mut byte = [0u8; 1];
            matches!(std::io::Read::read(&mut &**s, &mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
        })
        .count();
    assert_eq!(open, 0, "{open} of {} idle connections still open", idle.len());
    assert!(b.open_fds() <= before + 8, "descriptors back: {before} -> {}", b.open_fds());
}

/// At the open-files limit a new connection waits in the backlog while `accept` fails: before,
/// its client hung for its whole timeout and the agent logged every retry. Now it is refused
/// at once, and everything works again when the pressure goes.
#[test]
fn at_the_descriptor_limit_new_connections_fail_fast() {
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    let _a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    let _server = cluster.pod("server").echo_server(HTTP).expect("server");
    let dst = cluster.pod("server").addr(HTTP);
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
    std::thread::sleep(Duration::from_millis(200));
    let mut original = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit on our own child, reading into a valid struct.
    let rc = unsafe { libc::prlimit(b.pid() as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut original) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let limit = |soft: u64| {
        let new = libc::rlimit { rlim_cur: soft, rlim_max: original.rlim_max };
        // SAFETY: as above, setting only.
        let rc = unsafe { libc::prlimit(b.pid() as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        // The agent reads its limit again at most a second after it last did.
        std::thread::sleep(Duration::from_millis(1100));
    };
    limit(b.open_fds() as u64 + 100);
    // Plaintext connections into the server hold two descriptors each at the agent (PERMISSIVE).
    let mut held = Vec::new();
    for _ in 0..200 {
        let Ok(mut s) = cluster.pod("outsider").connect(dst, STEP) else { break };
        if echo_roundtrip(&mut s, b"hold").is_err() {
            break;
        }
        held.push(s);
    }
    assert!(
        !held.is_empty() && held.len() < 200,
        "the control: connections were taken until the limit ({} held)",
        held.len()
    );
    // A new data-plane connection now is refused at once, not left hanging (the kernel
    // completes the handshake; the agent resets it); readiness and metrics answer from the
    // reserve the data plane leaves them.
    for _ in 0..5 {
        let started = Instant::now();
        assert!(roundtrip(&cluster, "outsider", dst).is_err(), "no room for another connection");
        assert!(started.elapsed() < Duration::from_secs(1), "refused at once: {:?}", started.elapsed());
    }
    let started = Instant::now();
    let _ = roundtrip(&cluster, "client", dst);
    assert!(started.elapsed() < Duration::from_secs(2), "a mesh connection: {:?}", started.elapsed());
    assert_eq!(b.readiness().expect("readiness"), Some(200));
    assert!(b.http_get(15020, "/metrics").expect("metrics").is_some_and(|(s, _)| s == 200));
    // Pressure gone: everything works again.
    drop(held);
    limit(original.rlim_cur);
    wait_until(STEP, "readiness back", || b.readiness().ok().flatten() == Some(200));
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
    let warnings = b.log_events().iter().filter(|e| e["message"] == "accept failed; backing off").count();
    assert!(warnings <= 10, "{warnings} accept warnings: one per burst, not one per attempt");
}

/// A finished pod keeps its podIP in the API while the address goes to a new pod. Before, such
/// a pod listed after the running one took its address (connections to it went plaintext or
/// were refused) and, enrolled, held readiness at 503. And two running pods claiming one IP
/// steered each other's traffic. Now a finished pod owns nothing, and two claimants are both
/// closed and named until the conflict is gone.
#[test]
fn finished_pods_own_no_address_and_two_claimants_get_no_traffic() {
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    let server_ip = cluster.pod("server").ip();
    let pod_doc = |name: &str, phase: &str, netns: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, annotations: {{ambit.io/netns: {netns}}}}}\nspec: {{nodeName: b, serviceAccountName: {name}-sa}}\nstatus: {{phase: {phase}, podIP: {server_ip}}}\n---\n"
        )
    };
    let ghost = pod_doc("ghost", "Succeeded", "/var/run/netns/long-gone");
    cluster.set_extra_yaml(&format!("{STRICT}{ghost}"));
    cluster.write_manifest().expect("write");
    let a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b: a finished pod does not hold readiness");
    let server = cluster.pod("server").echo_server(HTTP).expect("server");
    let dst = cluster.pod("server").addr(HTTP);
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
    let record = a
        .wait_for_event(STEP, |e| e["target"] == "access" && e["direction"] == "outbound")
        .expect("outbound record");
    assert_eq!(record["security"], "mutual_tls", "{record}");
    assert_eq!(record["dst.identity"], "spiffe://cluster.local/ns/shop/sa/server-sa", "{record}");
    assert!(roundtrip(&cluster, "outsider", dst).is_err(), "STRICT: the running server owns the address");
    let ghost_report = b.pod_report("ghost").expect("ghost listed");
    assert_eq!(ghost_report["enrollment"], "finished", "{ghost_report}");
    assert_eq!(ghost_report["state"], "not-captured", "{ghost_report}");

    // A running twin claims the server's address (from another namespace's sandbox).
    let plain_netns = cluster.pod("plain").netns_path().display().to_string();
    let twin = pod_doc("twin", "Running", &plain_netns);
    let generation = (a.generation(), b.generation());
    cluster.set_extra_yaml(&format!("{STRICT}{ghost}{twin}"));
    cluster.write_manifest().expect("write");
    a.wait_generation_after(generation.0, STEP).expect("a reloaded");
    b.wait_generation_after(generation.1, STEP).expect("b reloaded");
    wait_until(STEP, "both claimants failed", || {
        state(&b, "server").0 == "failed" && state(&b, "twin").0 == "failed"
    });
    let (_, why) = state(&b, "server");
    assert!(why.contains(&server_ip.to_string()) && why.contains("shop/twin"), "{why}");
    let seen = server.peers().len();
    assert!(roundtrip(&cluster, "client", dst).is_err(), "no mesh traffic to a disputed address");
    assert!(roundtrip(&cluster, "outsider", dst).is_err(), "no plaintext either");
    assert_eq!(server.peers().len(), seen, "the server got nothing meanwhile");
    a.wait_for_event(STEP, |e| {
        e["target"] == "access"
            && e["error"].as_str().is_some_and(|m| m.contains("claimed by several running pods"))
    })
    .expect("the refusal names the conflict");
    assert_eq!(b.readiness().expect("readiness"), Some(503));

    // The twin goes: the server is captured again and reachable (once both agents know).
    let generation = (a.generation(), b.generation());
    cluster.set_extra_yaml(&format!("{STRICT}{ghost}"));
    cluster.write_manifest().expect("write");
    a.wait_generation_after(generation.0, STEP).expect("a reloaded");
    b.wait_generation_after(generation.1, STEP).expect("b reloaded");
    wait_until(STEP, "server captured again", || state(&b, "server").0 == "captured");
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
}

/// An IPv6 TCP SYN forged with an enrolled pod's own address as its source and destination.
/// IPv4 drops such a packet by itself; IPv6 does not, and before, sk_lookup let "the pod
/// talking to itself" through: the forged SYN reached the app's listener past every policy.
/// Now only own-address connections that a socket of the pod opened pass.
#[test]
fn an_ipv6_syn_spoofing_the_pods_own_address_never_reaches_the_app() {
    let cluster = Cluster::builder()
        .node("a")
        .namespace("shop", true)
        .namespace("other", false)
        .pod(PodSpec::new("shop", "server", "a").ipv6())
        .pod(PodSpec::new("other", "attacker", "a").ipv6())
        .pod(PodSpec::new("other", "plain", "a").ipv6())
        .build()
        .expect("cluster");
    cluster.set_extra_yaml(STRICT);
    cluster.write_manifest().expect("write");
    let _agent = cluster.start_agent("a").expect("agent");
    let _server = cluster.pod("server").echo_server_v6(HTTP).expect("server");
    let _plain = cluster.pod("plain").echo_server_v6(HTTP).expect("plain");
    let v6 = |pod: &str| cluster.pod(pod).ipv6().expect("dual stack");

    // The app may still reach itself over IPv6 (a connection its own socket opened).
    let own = SocketAddr::new(v6("server").into(), HTTP);
    assert_eq!(roundtrip(&cluster, "server", own), Ok(()), "the pod reaches its own IPv6 address");

    let syn_acks = |pod: &str| {
        let target = v6(pod);
        // A real connection first: the attacker reaches the pod over IPv6 (and has its link
        // address), whatever the pod answers.
        let _ = cluster.pod("attacker").connect(SocketAddr::new(target.into(), HTTP), STEP);
        let mut capture = cluster.capture_in_pod(pod, "lo").expect("tcpdump on the pod's loopback");
        cluster
            .pod("attacker")
            .in_netns(|| send_forged_syn(target, target, 40_000, HTTP))
            .expect("netns")
            .expect("forged SYN sent");
        capture.finish().expect("capture");
        // A SYN-ACK from the app's port: the forged SYN reached a listener. (IPv6 header of 40
        // bytes, then TCP: flags at byte 13.)
        capture.count(&format!("ip6 and src port {HTTP} and ip6[53] & 0x12 == 0x12")).expect("tcpdump -r")
    };
    // The control: the same packet to a pod outside the mesh reaches its listener.
    assert!(syn_acks("plain") >= 1, "the forged SYN would reach a listener");
    assert_eq!(syn_acks("server"), 0, "the forged SYN reached the enrolled pod's listener");
}

/// Sends one TCP SYN from `src`:`sport` to `dst`:`dport` on a raw IPv6 socket whose header we
/// write ourselves (IPPROTO_RAW), so that the source can be any address.
fn send_forged_syn(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    sport: u16,
    dport: u16,
) -> std::io::Result<()> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    // Checksum over the IPv6 pseudo-header and the segment.
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(tcp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 6]);
    add(&tcp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    packet.extend_from_slice(&[6, 64]); // next header TCP, hop limit
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(&tcp);
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )?;
    let to = socket2::SockAddr::from(SocketAddr::new(dst.into(), 0));
    socket.send_to(&packet, &to)?;
    Ok(())
}

/// A link detached under the running agent (`bpftool link detach`, which needs root on the
/// node) is attached again within seconds. Until then the namespace is open: root on a node is
/// outside what ambit can defend (SECURITY.md), so this shows the repair, not a guarantee.
#[test]
fn a_detached_link_is_attached_again() {
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    cluster.set_extra_yaml(STRICT);
    cluster.write_manifest().expect("write");
    let _a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    let _server = cluster.pod("server").echo_server(HTTP).expect("server");
    let dst = cluster.pod("server").addr(HTTP);
    assert!(roundtrip(&cluster, "outsider", dst).is_err(), "STRICT refuses plaintext");
    let cookie = b.pod_report("server").and_then(|r| r["netns_cookie"].as_u64()).expect("cookie");
    detach_link(&cluster.pin_dir("b").join("netns").join(cookie.to_string())).expect("detach");
    // The control: the detach took effect (the inbound program no longer runs).
    assert_eq!(roundtrip(&cluster, "outsider", dst), Ok(()), "detached: plaintext reaches the app");
    b.wait_for_event(STEP, |e| {
        e["repair"].as_str().is_some_and(|r| r.contains("was detached; linked again"))
    })
    .expect("the agent re-links it");
    assert!(roundtrip(&cluster, "outsider", dst).is_err(), "enforced again");
    assert_eq!(roundtrip(&cluster, "client", dst), Ok(()));
}

/// `BPF_LINK_DETACH` on the link pinned at `pin`, as `bpftool link detach` does.
fn detach_link(pin: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    let mut get = [0u64; 3];
    get[0] = path.as_ptr() as u64;
    // SAFETY: a valid attribute buffer for BPF_OBJ_GET.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_mut_ptr(), 24usize) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut detach = [0u32; 2];
    detach[0] = fd as u32;
    // SAFETY: a valid attribute buffer for BPF_LINK_DETACH.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_mut_ptr(), 8usize) };
    // SAFETY: closing the descriptor we opened.
    unsafe { libc::close(fd as i32) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}
