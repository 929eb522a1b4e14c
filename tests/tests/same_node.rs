//! End to end: connections between two enrolled pods of one node, joined in the agent instead
//! of an HBONE tunnel from the agent to itself. Nothing goes on the wire; the destination's
//! policy decides as it would for HBONE; both access records say what the HBONE path says;
//! policy changes close open connections; `--same-node-hbone` brings the tunnel back.
//! The shop example: backend and db on node b, STRICT in shop, db allowing only backend-sa.

use std::{
    io::{ErrorKind, Read as _},
    time::{Duration, Instant},
};

use ambit_tests::{Agent, Cluster, PodSpec, contains, echo_roundtrip};
use serde_json::Value;

const HTTP: u16 = 8080;
const STEP: Duration = Duration::from_secs(5);
const POLICIES: &str = include_str!("../../examples/shop/policies.yaml");

/// The shop with an `intruder` in shop on node b (its own service account, which db does not
/// allow); only node b's agent runs, with `extra` arguments.
fn shop(extra: &[&str]) -> (Cluster, Agent) {
    let cluster = Cluster::builder()
        .shop()
        .pod(PodSpec::new("shop", "intruder", "b").service_account("intruder-sa"))
        .build()
        .expect("cluster");
    cluster.set_extra_yaml(POLICIES);
    cluster.write_manifest().expect("write");
    let b = cluster.spawn_agent("b", extra).expect("agent b");
    b.wait_ready(Duration::from_secs(20)).expect("agent b ready");
    (cluster, b)
}

fn record(agent: &Agent, direction: &str) -> Value {
    agent
        .wait_for_event(STEP, |e| e["target"] == "access" && e["direction"] == direction)
        .unwrap_or_else(|e| panic!("{direction} record: {e}"))
}

/// One echo of `secret` from backend to db, with a capture of the bridge meanwhile.
fn backend_to_db(cluster: &Cluster, secret: &[u8]) -> (ambit_tests::Capture, Vec<u8>) {
    let mut capture = cluster.capture().expect("tcpdump on the bridge");
    let mut stream = cluster.pod("backend").connect(cluster.pod("db").addr(HTTP), STEP).expect("connect");
    assert_eq!(echo_roundtrip(&mut stream, secret).expect("echo"), secret);
    drop(stream);
    let pcap = capture.finish().expect("capture");
    (capture, pcap)
}

/// The first closed flow of `direction` that `ambit trace` on node b shows.
fn flow(cluster: &Cluster, direction: &str) -> Value {
    let deadline = Instant::now() + STEP;
    loop {
        let out = cluster.node("b").ambit(&["trace", "-o", "json"]).expect("ambit trace");
        let found = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["event"] == "close" && r["direction"] == direction);
        if let Some(found) = found {
            return found;
        }
        assert!(Instant::now() < deadline, "no {direction} flow: {}", String::from_utf8_lossy(&out.stdout));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn same_node_connections_are_joined_in_the_agent_with_the_records_of_hbone() {
    let (cluster, b) = shop(&[]);
    let db = cluster.pod("db").echo_server(HTTP).expect("db");
    let secret = b"AMBIT-SAME-NODE-PAYLOAD-4c1d";
    let (capture, pcap) = backend_to_db(&cluster, secret);
    let (backend, db_ip) = (cluster.pod("backend").ip(), cluster.pod("db").ip());
    assert_eq!(
        capture.count(&format!("host {backend} and host {db_ip}")).expect("tcpdump"),
        0,
        "no packet between the two pods: the connection never left the node's kernel"
    );
    assert!(!contains(&pcap, secret));
    // The app sees the connection as HBONE delivers it: from the client's own address.
    assert_eq!(db.peers().last().map(|p| p.ip()), Some(backend));

    let outbound = record(&b, "outbound");
    assert_eq!(outbound["security"], "mutual_tls", "{outbound}");
    assert_eq!(outbound["dst.identity"], "spiffe://cluster.local/ns/shop/sa/db-sa", "{outbound}");
    assert!(outbound["dst.hbone_addr"].is_null(), "no tunnel: {outbound}");
    assert_eq!(outbound["bytes_sent"], secret.len(), "{outbound}");
    let inbound = record(&b, "inbound");
    assert_eq!(inbound["security"], "mutual_tls", "{inbound}");
    assert_eq!(inbound["src.identity"], "spiffe://cluster.local/ns/shop/sa/backend-sa", "{inbound}");
    assert_eq!(inbound["src.workload"], "backend", "{inbound}");
    assert_eq!(inbound["authz.verdict"], "allowed", "{inbound}");
    assert_eq!(inbound["authz.policy"], "shop/db", "{inbound}");
    assert_eq!(inbound["bytes_recv"], secret.len(), "{inbound}");
    // The kernel's flow records at both ends, joined with the agent's notes as for HBONE.
    for (direction, pod) in [("outbound", "backend"), ("inbound", "db")] {
        let flow = flow(&cluster, direction);
        assert_eq!(flow["src"]["pod"], "shop/backend", "{flow}");
        assert_eq!(flow["src"]["identity"], "spiffe://cluster.local/ns/shop/sa/backend-sa", "{flow}");
        assert_eq!(flow["dst"]["pod"], "shop/db", "{flow}");
        assert_eq!(flow["security"], "mutual_tls", "{flow}");
        assert_eq!(flow["verdict"], "allowed", "{pod}: {flow}");
        assert_eq!(flow["bytes_sent"], secret.len(), "{flow}");
    }
    let metrics = b.http_get(15020, "/metrics").expect("metrics").expect("answer").1;
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/backend-sa\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );
}

#[test]
fn the_destinations_policy_decides_same_node_connections_and_revokes_open_ones() {
    let (cluster, b) = shop(&[]);
    let db = cluster.pod("db").echo_server(HTTP).expect("db");
    let dst = cluster.pod("db").addr(HTTP);
    // A pod of the same namespace and node under another service account: denied, at once,
    // without reaching db (the control: backend, next to it, is allowed).
    let started = Instant::now();
    let denied = cluster.pod("intruder").attempt(dst);
    assert!(matches!(denied, Err(ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof)), "{denied:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "denied at once");
    assert!(db.peers().is_empty(), "not a connection reached db");
    let inbound = record(&b, "inbound");
    assert_eq!(inbound["authz.verdict"], "denied", "{inbound}");
    assert_eq!(inbound["src.identity"], "spiffe://cluster.local/ns/shop/sa/intruder-sa", "{inbound}");
    // The agent's own ports in db are not a destination (as an HBONE CONNECT to them is
    // refused); the control below is the same client reaching db's app port.
    for port in [15006, 15008] {
        assert!(cluster.pod("backend").attempt(cluster.pod("db").addr(port)).is_err(), "db:{port} refused");
    }
    let mut open = cluster.pod("backend").connect(dst, STEP).expect("allowed");
    assert_eq!(echo_roundtrip(&mut open, b"before").expect("echo"), b"before");

    // Revoked: backend is no longer allowed into db; the open connection is closed too.
    let generation = b.generation();
    cluster.set_extra_yaml(&POLICIES.replace("backend-sa]", "nobody]"));
    cluster.write_manifest().expect("write");
    b.wait_generation_after(generation, STEP).expect("reloaded");
    assert!(cluster.pod("backend").attempt(dst).is_err(), "new connections follow the new policy");
    open.set_read_timeout(Some(STEP)).expect("timeout");
    let read = open.read(&mut [0u8; 8]);
    let closed = match &read {
        Ok(0) => true,
        Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted),
        Ok(_) => false,
    };
    assert!(closed, "the open connection was closed: {read:?}");
}

#[test]
fn with_same_node_hbone_the_agent_tunnels_to_itself() {
    let (cluster, b) = shop(&["--same-node-hbone"]);
    let _db = cluster.pod("db").echo_server(HTTP).expect("db");
    let secret = b"AMBIT-SAME-NODE-TLS-PAYLOAD-9e2b";
    let (capture, pcap) = backend_to_db(&cluster, secret);
    let (backend, db_ip) = (cluster.pod("backend").ip(), cluster.pod("db").ip());
    assert!(
        capture
            .count(&format!("src host {backend} and dst host {db_ip} and dst port 15008"))
            .expect("tcpdump")
            > 0,
        "mutual TLS from the backend's address to db's HBONE port"
    );
    assert!(!contains(&pcap, secret), "and the payload only inside it");
    let outbound = record(&b, "outbound");
    assert_eq!(outbound["dst.hbone_addr"], format!("{db_ip}:15008"), "{outbound}");
}

/// A destination pod whose capture fails (an app holds the agent's ports in it) is closed to
/// same-node connections as to every other: the agent does not deliver to a pod it does not
/// serve. The control: once the ports are free and the pod is captured, the same connection
/// works.
#[test]
fn a_destination_whose_capture_failed_is_closed_to_same_node_connections() {
    let cluster = Cluster::builder().shop().build().expect("cluster");
    cluster.set_extra_yaml(POLICIES);
    cluster.write_manifest().expect("write");
    let squat_inbound = cluster.pod("db").echo_server(15006).expect("app on 15006");
    let squat_hbone = cluster.pod("db").echo_server(15008).expect("app on 15008");
    let db = cluster.pod("db").echo_server(HTTP).expect("db");
    let b = cluster.spawn_agent("b", &[]).expect("agent b");
    b.wait_for_event(STEP, |e| {
        e["message"] == "pod not captured; its traffic is refused; will retry" && e["pod"] == "shop/db"
    })
    .expect("db not captured");
    let dst = cluster.pod("db").addr(HTTP);
    wait_until_served(&cluster, "backend");
    assert!(cluster.pod("backend").attempt(dst).is_err(), "db is not served: nothing delivers to it");
    assert!(db.peers().is_empty() && squat_inbound.peers().is_empty() && squat_hbone.peers().is_empty());
    drop((squat_inbound, squat_hbone));
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.pod("backend").attempt(dst).is_err() {
        assert!(Instant::now() < deadline, "db captured and served once its ports are free");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `pod`'s outbound capture is in place (its agent lists it as captured).
fn wait_until_served(cluster: &Cluster, pod: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        let out = cluster.node("b").ambit(&["workloads", "-o", "json"]).expect("ambit workloads");
        let text = String::from_utf8_lossy(&out.stdout);
        let captured = serde_json::from_str::<Value>(&text).ok().is_some_and(|v| {
            v.as_array()
                .into_iter()
                .flatten()
                .any(|w| w["namespace"] == "shop" && w["name"] == pod && w["state"] == "captured")
        });
        if captured {
            return;
        }
        assert!(Instant::now() < deadline, "{pod} not captured: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A stale address table must not carry bytes that one pod's policy admitted to another pod:
/// the file says db is at the victim's address (as after an address was reused while the
/// table lagged) and knows no victim. backend may reach db, so the agent's decision allows it;
/// what must stop it is that the address is not db's own.
#[test]
fn a_destination_found_at_a_stale_address_is_refused_not_reached() {
    let cluster =
        Cluster::builder().shop().pod(PodSpec::new("legacy", "victim", "b")).build().expect("cluster");
    cluster.set_extra_yaml(POLICIES);
    let (victim_ip, db_ip) = (cluster.pod("victim").ip(), cluster.pod("db").ip());
    let stale: Vec<String> = cluster
        .manifest()
        .split("---\n")
        .filter(|doc| !doc.contains("  name: victim\n"))
        .map(|doc| doc.replace(&format!("podIP: \"{db_ip}\""), &format!("podIP: \"{victim_ip}\"")))
        .collect();
    let stale = stale.join("---\n");
    assert!(stale.contains(&format!("podIP: \"{victim_ip}\"")) && !stale.contains("name: victim\n"));
    cluster.write_raw_manifest(&stale).expect("write");
    let b = cluster.spawn_agent("b", &[]).expect("agent b");
    b.wait_ready(Duration::from_secs(20)).expect("agent b ready");
    let echo = cluster.pod("victim").echo_server(HTTP).expect("victim's server");
    let victim = cluster.pod("victim").addr(HTTP);
    // The control: the victim's server is there and answers whoever reaches it.
    assert_eq!(cluster.pod("outsider").attempt(victim), Ok(()), "the victim answers directly");
    let reached = echo.peers().len();

    assert!(cluster.pod("backend").attempt(victim).is_err(), "refused");
    assert_eq!(echo.peers().len(), reached, "nothing reached the victim: {:?}", echo.peers());
    let refused = b
        .wait_for_event(STEP, |e| {
            e["target"] == "access" && e["direction"] == "outbound" && e["dst.workload"] == "db"
        })
        .expect("the outbound record");
    assert!(
        refused.to_string().contains("is not an address of the destination pod's network namespace"),
        "the agent took db for the destination and refused on the address: {refused}"
    );
}
