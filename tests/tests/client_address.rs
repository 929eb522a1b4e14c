//! End to end: an enrolled app sees each inbound connection from the client's own address
//! (`getpeername()` in a real server), over HBONE, plaintext and the same-node path, in IPv4
//! and IPv6, for many concurrent clients under load; and from the agent's address in the pod
//! with `--no-client-address`, the control that proves the default is the mesh's doing.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ambit_tests::{Cluster, PodSpec};

const HTTP: u16 = 8080;

fn cluster() -> Cluster {
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("shop", true)
        .namespace("other", false)
        .pod(PodSpec::new("shop", "client", "a").service_account("client-sa").ipv6())
        .pod(PodSpec::new("shop", "neighbour", "b").service_account("neighbour-sa").ipv6())
        .pod(PodSpec::new("shop", "server", "b").service_account("server-sa").ipv6())
        .pod(PodSpec::new("other", "outsider", "a").ipv6())
        .build()
        .expect("cluster");
    cluster.write_manifest().expect("write");
    cluster
}

fn v6(cluster: &Cluster, pod: &str) -> IpAddr {
    cluster.pod(pod).ipv6().expect("dual-stack pod").into()
}

#[test]
fn apps_see_the_clients_own_address() {
    let cluster = cluster();
    let _a = cluster.start_agent("a").expect("agent a");
    let _b = cluster.start_agent("b").expect("agent b");
    let server = cluster.pod("server").echo_server_v6(HTTP).expect("server");
    let v4_dst = cluster.pod("server").addr(HTTP);
    let v6_dst = SocketAddr::new(v6(&cluster, "server"), HTTP);
    // HBONE from another node, plaintext from outside the mesh, and the same-node path.
    let cases = [
        ("client", v4_dst, cluster.pod("client").ip()),
        ("client", v6_dst, v6(&cluster, "client")),
        ("outsider", v4_dst, cluster.pod("outsider").ip()),
        ("outsider", v6_dst, v6(&cluster, "outsider")),
        ("neighbour", v4_dst, cluster.pod("neighbour").ip()),
        ("neighbour", v6_dst, v6(&cluster, "neighbour")),
    ];
    for (from, dst, expected) in cases {
        let before = server.peers().len();
        assert_eq!(cluster.pod(from).attempt(dst), Ok(()), "{from} -> {dst}");
        let peers = server.peers();
        assert_eq!(peers.len(), before + 1, "{from} -> {dst}");
        let seen = peers[before].ip().to_canonical();
        assert_eq!(seen, expected, "{from} -> {dst}: the app's getpeername()");
    }

    // A port nobody listens on answers with a reset at once, on each path: the kernel's answer
    // comes back to the agent inside the pod rather than going out to the client.
    for (from, dst) in [("client", v4_dst), ("outsider", v6_dst), ("neighbour", v4_dst)] {
        let closed = SocketAddr::new(dst.ip(), 7);
        let started = std::time::Instant::now();
        assert!(cluster.pod(from).attempt(closed).is_err(), "{from} -> {closed}");
        assert!(started.elapsed() < Duration::from_secs(2), "{from} -> {closed}: refused at once");
    }

    // Many clients at once, each moving enough bytes to fill the windows both ways: every reply
    // finds its way back through the pod's routes, none leaks to the real client.
    let mut clients = Vec::new();
    for (from, dst) in [("client", v4_dst), ("client", v6_dst), ("outsider", v4_dst), ("neighbour", v6_dst)] {
        for _ in 0..25 {
            let pod = cluster.pod(from);
            let stream = pod
                .connect(dst, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{from} -> {dst} under load: {e}"));
            clients.push((from, dst, stream));
        }
    }
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let workers: Vec<_> = clients
        .into_iter()
        .map(|(from, dst, mut stream)| {
            let payload = payload.clone();
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
                let mut writer = stream.try_clone().expect("clone");
                let sent = payload.clone();
                let send = std::thread::spawn(move || writer.write_all(&sent));
                let mut back = vec![0; payload.len()];
                let read = stream.read_exact(&mut back);
                (
                    from,
                    dst,
                    send.join().map(|r| r.is_ok()).unwrap_or(false) && read.is_ok() && back == payload,
                )
            })
        })
        .collect();
    for worker in workers {
        let (from, dst, ok) = worker.join().expect("worker");
        assert!(ok, "{from} -> {dst}: the echo came back whole");
    }
    let expected: BTreeSet<IpAddr> = [
        cluster.pod("client").ip(),
        v6(&cluster, "client"),
        cluster.pod("outsider").ip(),
        v6(&cluster, "neighbour"),
    ]
    .into();
    let recent: BTreeSet<IpAddr> =
        server.peers().iter().rev().take(100).map(|p| p.ip().to_canonical()).collect();
    assert_eq!(recent, expected, "100 connections, each seen from its client");
}

#[test]
fn with_no_client_address_apps_see_the_pods_own_address() {
    let cluster = cluster();
    let _a = cluster.start_agent("a").expect("agent a");
    let b = cluster.spawn_agent("b", &["--no-client-address"]).expect("agent b");
    b.wait_ready(Duration::from_secs(20)).expect("ready");
    let server = cluster.pod("server").echo_server_v6(HTTP).expect("server");
    for (from, dst, own) in [
        ("client", cluster.pod("server").addr(HTTP), cluster.pod("server").ip()),
        ("outsider", SocketAddr::new(v6(&cluster, "server"), HTTP), v6(&cluster, "server")),
    ] {
        assert_eq!(cluster.pod(from).attempt(dst), Ok(()), "{from} -> {dst}");
        let seen = server.peers().last().expect("a peer").ip().to_canonical();
        assert_eq!(seen, own, "{from} -> {dst}: delivered from the agent in the pod");
    }
}

/// Connects from `from` to `dst` with the source port `port`, sends a line and reads the echo.
fn attempt_from_port(cluster: &Cluster, from: &str, port: u16, dst: SocketAddr) -> std::io::Result<()> {
    let source = SocketAddr::new(cluster.pod(from).ip(), port);
    let mut stream = cluster.pod(from).in_netns(|| -> std::io::Result<std::net::TcpStream> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&source.into())?;
        socket.connect_timeout(&dst.into(), Duration::from_secs(3))?;
        Ok(socket.into())
    })??;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"ping")?;
    let mut back = [0u8; 4];
    stream.read_exact(&mut back)?;
    Ok(())
}

/// The agent registers the four-tuple of each connection it delivers from a client's address,
/// and the pod's `sk_lookup` lets a SYN with a registered tuple through to the app. A plaintext
/// client that knows the tuple of its own delivered connection (its source port is what the
/// app sees) tries to use it to reach a STRICT port of the same pod past the agent, and the
/// delivered port itself directly. Control: the same bind, to the PERMISSIVE port through the
/// agent, works, so the client can send from those ports.
#[test]
fn a_client_reusing_the_tuple_of_its_delivered_connection_gets_nothing_past_the_agent() {
    const OPEN: u16 = 9090;
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("shop", true)
        .namespace("other", false)
        .pod(PodSpec::new("shop", "server", "b").service_account("server-sa").label("app", "server"))
        .pod(PodSpec::new("other", "outsider", "a"))
        .build()
        .expect("cluster");
    cluster.set_extra_yaml(&format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: server, namespace: shop}}\n\
         spec:\n  selector: {{matchLabels: {{app: server}}}}\n  mtls: {{mode: STRICT}}\n  portLevelMtls: {{\"{OPEN}\": {{mode: PERMISSIVE}}}}\n"
    ));
    cluster.write_manifest().expect("write");
    let _a = cluster.start_agent("a").expect("agent a");
    let _b = cluster.start_agent("b").expect("agent b");
    let strict_app = cluster.pod("server").echo_server(HTTP).expect("strict app");
    let open_app = cluster.pod("server").echo_server(OPEN).expect("open app");
    let (strict, open) = (cluster.pod("server").addr(HTTP), cluster.pod("server").addr(OPEN));

    // A delivered connection, held open: the app sees the tuple the agent registered.
    let mut held = cluster.pod("outsider").connect(open, Duration::from_secs(5)).expect("permissive port");
    held.write_all(b"hold").expect("send");
    let mut back = [0u8; 4];
    held.read_exact(&mut back).expect("echo");
    let delivered = *open_app.peers().last().expect("the app saw it");
    assert_eq!(delivered.ip(), cluster.pod("outsider").ip());
    let port = delivered.port();

    // Control: from another port of that range, through the agent to the PERMISSIVE port.
    let other = if port == 30_000 { 30_001 } else { 30_000 };
    attempt_from_port(&cluster, "outsider", other, open).expect("control: a bound source port gets through");

    // The attack: that very port, to the STRICT port, and to the delivered port itself.
    let strict_seen = strict_app.peers().len();
    assert!(attempt_from_port(&cluster, "outsider", port, strict).is_err(), "plaintext to STRICT is refused");
    assert_eq!(strict_app.peers().len(), strict_seen, "nothing reached the STRICT app");
    let open_seen = open_app.peers().len();
    let _ = attempt_from_port(&cluster, "outsider", port, open);
    assert!(
        open_app.peers()[open_seen..].iter().all(|p| p.port() != port || p.ip() != delivered.ip()),
        "no second connection with the delivered tuple reached the app directly"
    );
    // The held connection is untouched.
    held.write_all(b"more").expect("send");
    held.read_exact(&mut back).expect("the held connection still echoes");
    assert_eq!(&back, b"more");
}
