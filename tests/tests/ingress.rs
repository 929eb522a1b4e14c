//! End to end: the two ways into a STRICT namespace from outside the mesh, as README.md gives
//! them. An ingress proxy (Debian's real nginx) running as an enrolled pod takes plaintext from
//! outside and forwards over mTLS to a backend that admits only the ingress identity; and a
//! NodePort to a workload with a port-level PERMISSIVE exception.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ambit_tests::{Agent, Cluster, PodSpec};
use serde_json::Value;

const HTTP: u16 = 8080;
const STEP: Duration = Duration::from_secs(5);

/// Web's port 8080 is exposed through a NodePort: PERMISSIVE on that port only.
const NODE_PORT_EXCEPTION: &str = "\
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-nodeport, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
";

/// STRICT in shop; backend admits only the ingress gateway's identity.
fn policies() -> String {
    ambit_tests::strict_allowing_only("shop", "backend", "cluster.local/ns/ingress/sa/gateway-sa")
}

fn cluster() -> (Cluster, Agent, Agent) {
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("ingress", true)
        .namespace("shop", true)
        .namespace("outside", false)
        .pod(PodSpec::new("ingress", "gateway", "a").service_account("gateway-sa").label("app", "gateway"))
        .pod(PodSpec::new("shop", "backend", "b").service_account("backend-sa").label("app", "backend"))
        .pod(PodSpec::new("shop", "frontend", "a").service_account("frontend-sa").label("app", "frontend"))
        .pod(PodSpec::new("shop", "web", "b").service_account("web-sa").label("app", "web"))
        .pod(PodSpec::new("outside", "visitor", "a"))
        .build()
        .expect("cluster");
    cluster.set_extra_yaml(&policies());
    cluster.write_manifest().expect("write");
    let a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    (cluster, a, b)
}

/// A process in a pod, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Python's HTTP server in `pod` on 8080, serving a directory with `hello.txt`.
fn web_server(cluster: &Cluster, pod: &str, body: &str) -> Process {
    let dir = cluster.dir().join(format!("www-{pod}"));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("hello.txt"), body).expect("file");
    let mut python = Command::new("python3");
    python
        .args(["-m", "http.server", &HTTP.to_string(), "--bind", &cluster.pod(pod).ip().to_string()])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Process(cluster.pod(pod).spawn(python).expect("python3 -m http.server"))
}

/// nginx in the gateway pod: listens on 8080, proxies to the backend.
fn nginx(cluster: &Cluster, upstream: SocketAddr) -> Process {
    let dir = cluster.dir().join("nginx");
    std::fs::create_dir_all(&dir).expect("dir");
    let d = dir.display();
    let conf = format!(
        "daemon off; master_process on; worker_processes 1; user root; pid {d}/nginx.pid;\n\
         error_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n  \
         server {{ listen {}:{HTTP}; location / {{ proxy_pass http://{upstream}; }} }}\n}}\n",
        cluster.pod("gateway").ip()
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("conf");
    let mut nginx = Command::new("nginx");
    nginx
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Process(cluster.pod("gateway").spawn(nginx).expect("nginx (setup installs nginx-light)"))
}

/// `GET /hello.txt` from `pod` to `to`: the status and body, or why there is none.
fn get(cluster: &Cluster, pod: &str, to: SocketAddr) -> Result<(u16, String), String> {
    let mut stream = cluster.pod(pod).connect(to, STEP).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(STEP)).map_err(|e| e.to_string())?;
    write!(stream, "GET /hello.txt HTTP/1.0\r\nHost: shop\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(response.clone())?;
    Ok((status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
}

/// `get`, retried while the servers start.
fn get_when_up(cluster: &Cluster, pod: &str, to: SocketAddr) -> Result<(u16, String), String> {
    let deadline = Instant::now() + STEP;
    loop {
        let answer = get(cluster, pod, to);
        if matches!(answer, Ok((200, _))) || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn record(agent: &Agent, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    agent
        .wait_for_event(STEP, |e| e["target"] == "access" && matches(e))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[test]
fn an_ingress_proxy_in_the_mesh_forwards_outside_traffic_into_a_strict_namespace() {
    let (cluster, a, b) = cluster();
    let backend = cluster.pod("backend").addr(HTTP);
    let _web = web_server(&cluster, "backend", "hello from the backend\n");
    let _nginx = nginx(&cluster, backend);
    let gateway = cluster.pod("gateway").addr(HTTP);

    // From outside the mesh, through nginx, to the STRICT backend.
    let answer = get_when_up(&cluster, "visitor", gateway).expect("through the ingress");
    assert_eq!(answer, (200, "hello from the backend\n".to_owned()));
    let inbound = record(&b, "the backend's inbound record", |e| e["direction"] == "inbound");
    assert_eq!(inbound["security"], "mutual_tls", "{inbound}");
    assert_eq!(inbound["src.identity"], "spiffe://cluster.local/ns/ingress/sa/gateway-sa", "{inbound}");
    assert_eq!(inbound["dst.identity"], "spiffe://cluster.local/ns/shop/sa/backend-sa", "{inbound}");
    assert_eq!(inbound["authz.policy"], "shop/backend", "{inbound}");
    let entry = record(&a, "the gateway's plaintext entry", |e| {
        e["direction"] == "inbound" && e["dst.workload"] == "gateway"
    });
    assert_eq!(entry["security"], "plaintext", "{entry}");
    assert_eq!(
        entry["src.addr"].as_str().and_then(|s| s.parse::<SocketAddr>().ok()).map(|s| s.ip()),
        Some(cluster.pod("visitor").ip()),
        "{entry}"
    );
    let hop = record(&a, "the gateway's mTLS hop", |e| {
        e["direction"] == "outbound" && e["src.workload"] == "gateway"
    });
    assert_eq!(hop["security"], "mutual_tls", "{hop}");
    assert_eq!(hop["dst.identity"], "spiffe://cluster.local/ns/shop/sa/backend-sa", "{hop}");

    // The controls: the visitor cannot skip the ingress (STRICT), and another mesh workload is
    // not the ingress identity (denied).
    assert!(get(&cluster, "visitor", backend).is_err(), "plaintext straight to the backend is refused");
    assert!(get(&cluster, "frontend", backend).is_err(), "frontend-sa is not the ingress identity");
    let denied = record(&b, "the frontend's denial", |e| {
        e["direction"] == "inbound" && e["authz.verdict"] == "denied"
    });
    assert_eq!(denied["src.identity"], "spiffe://cluster.local/ns/shop/sa/frontend-sa", "{denied}");
}

#[test]
fn a_node_port_reaches_a_strict_workload_through_a_port_level_permissive_exception() {
    let (cluster, _a, b) = cluster();
    let web = cluster.pod("web").addr(HTTP);
    let _server = web_server(&cluster, "web", "hello from web\n");
    cluster.node("b").node_port(30080, web).expect("NodePort");
    let node_port = SocketAddr::new(cluster.node("b").ip(), 30080);
    // STRICT: the NodePort's plaintext is refused (the control: web answers the mesh).
    assert_eq!(get_when_up(&cluster, "frontend", web).expect("mesh client").0, 200);
    assert!(get(&cluster, "visitor", node_port).is_err(), "STRICT refuses the NodePort's plaintext");

    let generation = b.generation();
    cluster.set_extra_yaml(&format!("{}{NODE_PORT_EXCEPTION}", policies()));
    cluster.write_manifest().expect("write");
    b.wait_generation_after(generation, STEP).expect("reloaded");
    let answer = get(&cluster, "visitor", node_port).expect("through the NodePort");
    assert_eq!(answer, (200, "hello from web\n".to_owned()));
    let entry = record(&b, "the NodePort entry", |e| {
        e["direction"] == "inbound" && e["security"] == "plaintext" && e["authz.verdict"] == "allowed"
    });
    assert_eq!(entry["mtls.decided_by"], "shop/web-nodeport (port 8080)", "{entry}");
    // Only that port: the same workload's other ports stay STRICT.
    let other = cluster.pod("web").addr(9090);
    let echo = cluster.pod("web").echo_server(9090).expect("echo server");
    assert!(cluster.pod("visitor").attempt(other).is_err(), "port 9090 is still STRICT");
    assert!(echo.peers().is_empty(), "nothing of the visitor's reached port 9090: {:?}", echo.peers());
    // The control: the port answers the mesh.
    assert_eq!(cluster.pod("frontend").attempt(other), Ok(()), "port 9090 serves mesh clients");
    assert_eq!(echo.peers().len(), 1);
}
