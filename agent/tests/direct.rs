//! The proxies in one process, without root and without the kernel programs: two agents
//! ("node-a" and "node-b") on loopback, a pod on each, a temporary CA. A client of pod `a`
//! connects to its outbound listener; a table stands in for the kernel's original-destination
//! map, and plain loopback sockets for the pods' network namespaces. The connection crosses
//! outbound → HBONE (mutual TLS, HTTP/2 CONNECT) → inbound to an echo server of pod `b`,
//! through the same code the agent runs; only the two seams of `proxy` are replaced.
//!
//! Each test uses loopback addresses of its own (`127.0.<n>.x`), so they run in parallel.

mod support;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use ambit::{
    discovery,
    identity::{Identities, Identity},
    proxy::{ConnectionTable, PodContext, PodSockets, PodStats, Proxy, Settings},
    state::Cluster,
    telemetry::{
        flows::Flows,
        history::FlowHistory,
        metrics::{Metrics, Scrape},
    },
    tls::TlsContext,
};
use socket2::{Domain, Protocol, Socket, Type};
use support::{TRUST_DOMAIN, TestCa};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

const APP_PORT: u16 = 8080;
const HBONE_PORT: u16 = 15008;
/// Longer than any step of a test should take; a hang fails instead of blocking the run.
const LIMIT: Duration = Duration::from_secs(20);

/// Stands in for the kernel's `ORIG_DST` map: every captured connection of the pod was headed
/// for one address, and each answer is used up, as the kernel's is.
#[derive(Default)]
struct Table {
    destinations: Mutex<HashMap<(u64, u16), SocketAddr>>,
    all_to: Mutex<Option<SocketAddr>>,
}

impl ConnectionTable for Table {
    fn take_original_destination(&self, netns_cookie: u64, port: u16) -> Option<SocketAddr> {
        let recorded = self.destinations.lock().expect("table").remove(&(netns_cookie, port));
        recorded.or(*self.all_to.lock().expect("table"))
    }

    fn take_host_connection(&self, _src: SocketAddr, _dst: SocketAddr) -> bool {
        false
    }
}

/// A pod's "network namespace": the host's loopback. Marks need `CAP_NET_ADMIN` and are only
/// for the kernel programs, which are not here.
struct Loopback;

impl PodSockets for Loopback {
    fn tcp_socket(&self, domain: Domain, _mark: u32) -> io::Result<Socket> {
        Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))
    }
}

/// The two-node mesh of one test.
struct Mesh {
    /// The client's way in: pod `a`'s outbound listener.
    outbound: SocketAddr,
    /// Pod `b`'s application.
    app: SocketAddr,
    table_a: Arc<Table>,
    metrics_a: Arc<Metrics>,
    metrics_b: Arc<Metrics>,
    cluster: watch::Sender<Arc<Cluster>>,
    proxy_b: Arc<Proxy>,
    tasks: Vec<JoinHandle<()>>,
    _ca: TestCa,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn cluster_file(net: u8, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: shop, uid: a-{net}}}\n\
         spec: {{nodeName: node-a, serviceAccountName: client}}\nstatus: {{podIP: 127.0.{net}.2}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: shop, uid: b-{net}}}\n\
         spec: {{nodeName: node-b, serviceAccountName: server}}\nstatus: {{podIP: 127.0.{net}.3}}\n{extra}"
    )
}

fn parse(text: &str) -> Arc<Cluster> {
    Arc::new(discovery::local::parse(Path::new("direct.yaml"), text, "istio-system").expect("cluster file"))
}

fn proxy(
    table: Arc<Table>,
    cluster: &watch::Sender<Arc<Cluster>>,
    identities: &Arc<Identities>,
    tls: &Arc<TlsContext>,
) -> (Arc<Proxy>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let settings = Settings {
        root_namespace: "istio-system".into(),
        flows: Arc::new(Flows::new(
            false,
            "node".into(),
            TRUST_DOMAIN.into(),
            cluster.subscribe(),
            HashMap::new(),
        )),
        metrics: metrics.clone(),
        history: Arc::new(FlowHistory::new(64)),
        client_address: false,
        same_node_hbone: false,
    };
    (Arc::new(Proxy::new(table, cluster.subscribe(), identities.clone(), tls.clone(), settings)), metrics)
}

fn pod(
    cluster: &Cluster,
    name: &str,
    identities: &Identities,
    tls: &TlsContext,
    cookie: u64,
) -> Arc<PodContext> {
    let workload =
        cluster.workloads.values().find(|w| w.key.name == name).expect("pod in the cluster").clone();
    let identity = Identity::new(TRUST_DOMAIN, &workload.key.namespace, &workload.service_account);
    identities.prefetch(&identity).expect("certificate");
    Arc::new(PodContext {
        workload,
        identity: identity.clone(),
        sockets: Arc::new(Loopback),
        cookie,
        stats: Arc::new(PodStats::default()),
        server_tls: tls.server_config(identity).expect("server config"),
        baggage: String::new(),
        deliver_from_client: false,
    })
}

/// Echoes what it reads, for every connection, and tells each peer's address on a channel.
async fn echo(listener: TcpListener, peers: tokio::sync::mpsc::UnboundedSender<SocketAddr>) {
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else { return };
        let _ = peers.send(peer);
        tokio::spawn(async move {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn mesh(net: u8, extra: &str) -> (Mesh, tokio::sync::mpsc::UnboundedReceiver<SocketAddr>) {
    let ca = TestCa::new(&format!("direct-{net}"), Duration::from_secs(3600));
    let identities = ca.identities.clone();
    let tls = Arc::new(TlsContext::new(identities.clone()).expect("TLS context"));
    let snapshot = parse(&cluster_file(net, extra));
    let (cluster, _) = watch::channel(snapshot.clone());
    let (table_a, table_b) = (Arc::new(Table::default()), Arc::new(Table::default()));
    let (proxy_a, metrics_a) = proxy(table_a.clone(), &cluster, &identities, &tls);
    let (proxy_b, metrics_b) = proxy(table_b, &cluster, &identities, &tls);
    let (a, b) = (pod(&snapshot, "a", &identities, &tls, 1), pod(&snapshot, "b", &identities, &tls, 2));

    let ip = |host| IpAddr::V4(Ipv4Addr::new(127, 0, net, host));
    let outbound = TcpListener::bind((ip(2), 0)).await.expect("outbound listener");
    let hbone = TcpListener::bind((ip(3), HBONE_PORT)).await.expect("HBONE listener");
    let app = TcpListener::bind((ip(3), APP_PORT)).await.expect("app listener");
    let (outbound_addr, app_addr) = (outbound.local_addr().expect("addr"), app.local_addr().expect("addr"));
    let (peers_tx, peers) = tokio::sync::mpsc::unbounded_channel();
    let tasks = vec![
        tokio::spawn(proxy_a.clone().serve_outbound(a, outbound)),
        tokio::spawn(proxy_b.clone().serve_hbone(b, hbone)),
        tokio::spawn(echo(app, peers_tx)),
    ];
    let mesh = Mesh {
        outbound: outbound_addr,
        app: app_addr,
        table_a,
        metrics_a,
        metrics_b,
        cluster,
        proxy_b,
        tasks,
        _ca: ca,
    };
    (mesh, peers)
}

impl Mesh {
    /// Connects as an application of pod `a` would after the kernel captured its `connect()`
    /// to `dst`: the table records the destination for the client's port.
    async fn connect(&self, dst: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(self.outbound.ip(), 0)).expect("bind");
        let port = socket.local_addr().expect("addr").port();
        self.table_a.destinations.lock().expect("table").insert((1, port), dst);
        socket.connect(self.outbound).await.expect("connect to the outbound listener")
    }

    fn metrics(&self) -> (String, String) {
        let scrape = Scrape::default();
        (self.metrics_a.render(&scrape), self.metrics_b.render(&scrape))
    }
}

/// Writes `message` and reads back as much, or what arrives before the connection ends.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(message).await?;
    let mut back = vec![0; message.len()];
    let mut got = 0;
    while got < back.len() {
        match stream.read(&mut back[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    back.truncate(got);
    Ok(back)
}

fn series<'a>(metrics: &'a str, name: &str) -> Vec<&'a str> {
    metrics.lines().filter(|l| l.starts_with(name)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_hbone_inbound_carries_bytes_with_both_identities() {
    let (mesh, mut peers) = mesh(101, "").await;
    let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut stream = mesh.connect(mesh.app).await;
    let back =
        tokio::time::timeout(LIMIT, round_trip(&mut stream, &message)).await.expect("in time").expect("echo");
    assert_eq!(back.len(), message.len(), "every byte came back");
    assert!(back == message, "the bytes came back unchanged");
    let peer =
        tokio::time::timeout(LIMIT, peers.recv()).await.expect("in time").expect("the app saw a connection");
    // With client addresses off, the agent is the app's peer: never the client's own address.
    assert_ne!(
        peer.ip(),
        mesh.outbound.ip(),
        "delivered from the client's address with client addresses off"
    );
    drop(stream);

    // Both agents counted it as mutual TLS between the two identities.
    let (a, b) = mesh.metrics();
    for (side, metrics) in [("source", &a), ("destination", &b)] {
        let opened = series(metrics, "istio_tcp_connections_opened_total");
        assert!(
            opened
                .iter()
                .any(|l| l.contains(r#"source_principal="spiffe://cluster.local/ns/shop/sa/client""#)
                    && l.contains(r#"destination_principal="spiffe://cluster.local/ns/shop/sa/server""#)
                    && l.contains(r#"connection_security_policy="mutual_tls""#)),
            "{side} agent's opened connections: {opened:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_policy_stops_the_connection_before_the_app() {
    let deny = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                metadata: {name: no-client, namespace: shop}\n\
                spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}\n";
    let (mesh, mut peers) = mesh(102, deny).await;
    let mut stream = mesh.connect(mesh.app).await;
    let back = tokio::time::timeout(LIMIT, round_trip(&mut stream, b"hello")).await.expect("in time");
    assert!(!matches!(back, Ok(ref b) if !b.is_empty()), "a denied client got bytes back: {back:?}");
    assert!(peers.try_recv().is_err(), "the app saw a connection the policy denies");
    let (_, b) = mesh.metrics();
    let denied = series(&b, "istio_tcp_connections_failed_total");
    assert!(
        denied.iter().any(|l| l.contains(r#"response_flags="DENIED""#)),
        "destination's failures: {denied:#?}"
    );

    // Control: the same mesh without the policy lets the same client through.
    mesh.cluster.send_replace(parse(&cluster_file(102, "")));
    let mut stream = mesh.connect(mesh.app).await;
    let back =
        tokio::time::timeout(LIMIT, round_trip(&mut stream, b"hello")).await.expect("in time").expect("echo");
    assert_eq!(back, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_close_when_a_policy_change_denies_them() {
    let (mesh, _peers) = mesh(103, "").await;
    let mut stream = mesh.connect(mesh.app).await;
    let back = tokio::time::timeout(LIMIT, round_trip(&mut stream, b"before"))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(back, b"before");
    let deny = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                metadata: {name: deny-all, namespace: shop}\nspec: {action: DENY, rules: [{}]}\n";
    let snapshot = parse(&cluster_file(103, deny));
    mesh.cluster.send_replace(snapshot.clone());
    assert_eq!(mesh.proxy_b.revalidate(&snapshot), 1, "the destination closes the one open connection");
    let after = tokio::time::timeout(LIMIT, round_trip(&mut stream, b"after")).await.expect("in time");
    assert!(!matches!(after, Ok(ref b) if !b.is_empty()), "bytes still flow after the deny: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_no_recorded_destination_goes_nowhere() {
    let (mesh, mut peers) = mesh(104, "").await;
    // Straight to the outbound listener: the kernel never redirected it, so no record exists.
    let mut stream = TcpStream::connect(mesh.outbound).await.expect("connect");
    let back = tokio::time::timeout(LIMIT, round_trip(&mut stream, b"hello")).await.expect("in time");
    assert!(!matches!(back, Ok(ref b) if !b.is_empty()), "an unrecorded connection got bytes back: {back:?}");
    assert!(peers.try_recv().is_err(), "the app saw a connection that has no destination");
    // Control: with a destination recorded for every port, the same kind of connection passes.
    *mesh.table_a.all_to.lock().expect("table") = Some(mesh.app);
    let mut stream = TcpStream::connect(mesh.outbound).await.expect("connect");
    let back =
        tokio::time::timeout(LIMIT, round_trip(&mut stream, b"hello")).await.expect("in time").expect("echo");
    assert_eq!(back, b"hello");
}
