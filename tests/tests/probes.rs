//! End to end: kubelet health probes under STRICT. A connection opened by a process of the
//! node's own network namespace reaches an enrolled pod in spite of STRICT and of an
//! AuthorizationPolicy that admits only one identity; plaintext that the node merely forwards
//! (a NodePort: DNAT and masquerade, so it too arrives from the node's address) is refused.

use std::{net::SocketAddr, time::Duration};

use ambit_tests::{Cluster, PodSpec, echo_roundtrip};

const HTTP: u16 = 8080;
const NODE_PORT: u16 = 30080;
const STEP: Duration = Duration::from_secs(5);

fn cluster() -> Cluster {
    let cluster = Cluster::builder()
        .node("a")
        .namespace("shop", true)
        .namespace("legacy", false)
        .pod(PodSpec::new("shop", "app", "a").label("app", "app"))
        .pod(PodSpec::new("legacy", "outsider", "a"))
        .pod(PodSpec::new("legacy", "plain", "a"))
        .build()
        .expect("cluster");
    cluster.set_extra_yaml(&ambit_tests::strict_allowing_only(
        "shop",
        "app",
        "cluster.local/ns/shop/sa/frontend-sa",
    ));
    cluster.write_manifest().expect("write");
    cluster
}

fn roundtrip(stream: std::io::Result<std::net::TcpStream>) -> Result<(), std::io::ErrorKind> {
    let mut stream = stream.map_err(|e| e.kind())?;
    echo_roundtrip(&mut stream, b"healthz?").map(|_| ()).map_err(|e| e.kind())
}

fn source_ip(record: &serde_json::Value) -> Option<std::net::IpAddr> {
    record["src.addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok()).map(|a| a.ip())
}

#[test]
fn a_probe_from_the_node_passes_strict_and_a_nodeport_from_the_node_address_does_not() {
    let cluster = cluster();
    let agent = cluster.start_agent("a").expect("agent");
    let _app = cluster.pod("app").echo_server(HTTP).expect("app");
    let _plain = cluster.pod("plain").echo_server(HTTP).expect("plain app");
    let app = cluster.pod("app").addr(HTTP);
    let node = cluster.node("a");

    // The kubelet's probe: a socket of the node's own network namespace.
    for _ in 0..3 {
        assert_eq!(roundtrip(node.connect(app, STEP)), Ok(()), "probe from the node");
    }
    let probe = agent
        .wait_for_event(STEP, |e| e["target"] == "access" && e["dst.workload"] == "app")
        .expect("access record");
    assert_eq!(probe["security"], "plaintext", "{probe}");
    assert_eq!(probe["authz.verdict"], "allowed", "{probe}");
    assert!(
        probe["authz.reason"].as_str().is_some_and(|r| r.contains("node's own network namespace")),
        "{probe}"
    );
    assert_eq!(source_ip(&probe), Some(node.ip()), "{probe}");

    // Plaintext from a pod outside the mesh: refused, as STRICT says.
    assert!(roundtrip(cluster.pod("outsider").connect(app, STEP)).is_err(), "plaintext from a pod");

    // A NodePort: the node forwards, masquerading to its own address. The path works (to a pod
    // outside the mesh), and to the STRICT pod it is refused although its source is the node's.
    let nodeport = SocketAddr::new(node.ip(), NODE_PORT);
    node.node_port(NODE_PORT, cluster.pod("plain").addr(HTTP)).expect("NodePort to plain");
    assert_eq!(roundtrip(cluster.pod("outsider").connect(nodeport, STEP)), Ok(()), "NodePort path works");
    let forwarded = SocketAddr::new(node.ip(), NODE_PORT + 1);
    node.node_port(NODE_PORT + 1, app).expect("NodePort to app");
    assert!(roundtrip(cluster.pod("outsider").connect(forwarded, STEP)).is_err(), "forwarded plaintext");
    // The refusal names STRICT, and the source it saw is the node's address.
    agent
        .wait_for_event(STEP, |e| {
            e["target"] == "access"
                && e["dst.workload"] == "app"
                && e["error"].as_str().is_some_and(|r| r.contains("STRICT"))
                && source_ip(e) == Some(node.ip())
        })
        .expect("refusal of forwarded plaintext from the node's address");

    // The probe exemption is per connection: probes still pass afterwards.
    assert_eq!(roundtrip(node.connect(app, STEP)), Ok(()), "probe after the NodePort attempt");
}
