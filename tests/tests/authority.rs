//! End to end: the mesh CA as a service (`ambit ca serve`) in a network namespace of its own,
//! the mock Kubernetes API answering its TokenReviews and pod lists, and node agents that hold
//! no CA key and get their pods' certificates from it over Istio's protocol. Who may have which
//! identity, checked with gRPC's own Python client and `openssl verify`; outages; a root
//! rotation under traffic; chains through an intermediate CA.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use ambit_tests::{Agent, Cluster, Container, MockApi, contains, echo_roundtrip};
use serde_json::Value;

const HTTP: u16 = 8080;
/// The node the CA service runs in (a namespace of its own, like a Deployment's pod).
const CA_NODE: &str = "ca";
const AUDIENCE: &str = "istio-ca";
const TRUST_DOMAIN: &str = "cluster.local";

/// A cluster whose agents use the CA service.
struct Mesh {
    cluster: Cluster,
    api: MockApi,
    ca: Option<Agent>,
    /// The directory the CA reads (a symlink, swapped atomically as a Secret volume is).
    ca_live: PathBuf,
    /// The agents' trust bundle.
    bundle: PathBuf,
}

fn ambit(args: &[&str]) -> std::process::Output {
    let out = Command::new(ambit_tests::ambit_binary()).args(args).output().expect("ambit runs");
    assert!(out.status.success(), "ambit {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn identity(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

impl Mesh {
    /// `client_server` plus a CA node; the CA's key material made by `make_ca` in the directory
    /// it is given; agent tokens: node a's carries the API server's node claim, node b's only
    /// its pod (the CA looks the node up).
    fn new(make_ca: impl FnOnce(&Path) -> PathBuf) -> Self {
        Self::on(Cluster::builder().client_server(), make_ca)
    }

    /// As [`Mesh::new`], on the cluster `builder` describes (nodes a and b among its nodes).
    fn on(builder: ambit_tests::ClusterBuilder, make_ca: impl FnOnce(&Path) -> PathBuf) -> Self {
        let cluster = builder.node(CA_NODE).build().expect("cluster");
        let first = cluster.dir().join("ca-v1");
        std::fs::create_dir_all(&first).expect("ca dir");
        // Where a rotation puts the next CA; exists from the start so agents can be kept from it.
        std::fs::create_dir_all(cluster.dir().join("ca-v2")).expect("ca dir");
        let root = make_ca(&first);
        let bundle = cluster.dir().join("bundle.pem");
        std::fs::copy(root, &bundle).expect("bundle");
        let ca_live = cluster.dir().join("ca-live");
        std::os::unix::fs::symlink(&first, &ca_live).expect("symlink");

        let api = cluster.mock_api().expect("mock API");
        api.sync_yaml(&cluster.manifest()).expect("pods into the API");
        api.add_agent_pod("ambit-a", "a");
        api.add_agent_pod("ambit-b", "b");
        api.add_token("token-a", "ambit-system", "ambit", Some("ambit-a"), Some("a"), &[AUDIENCE]);
        api.add_token("token-b", "ambit-system", "ambit", Some("ambit-b"), None, &[AUDIENCE]);
        for node in ["a", "b"] {
            std::fs::write(cluster.dir().join(format!("token-{node}")), format!("token-{node}\n"))
                .expect("token");
        }
        let mut mesh = Self { cluster, api, ca: None, ca_live, bundle };
        mesh.start_ca(&[]);
        mesh
    }

    /// With a root made by `ambit ca init`.
    fn with_root() -> Self {
        Self::new(|dir| {
            ambit(&["ca", "init", "--dir", dir.to_str().expect("utf-8")]);
            dir.join("ca-cert.pem")
        })
    }

    fn start_ca(&mut self, extra: &[&str]) {
        let ca = self.cluster.spawn_ca(CA_NODE, &self.ca_live, extra).expect("CA service");
        ca.wait_ready(Duration::from_secs(20)).expect("CA ready");
        self.ca = Some(ca);
    }

    fn ca(&self) -> &Agent {
        self.ca.as_ref().expect("CA running")
    }

    fn ca_url(&self) -> String {
        format!("https://{}:15012", self.cluster.node(CA_NODE).ip())
    }

    /// The agent of `node` with the CA service, unable to see the CA's directory.
    fn spawn_agent(&self, node: &str, extra: &[&str]) -> Agent {
        let token = self.cluster.dir().join(format!("token-{node}"));
        let (url, bundle, token) =
            (self.ca_url(), self.bundle.display().to_string(), token.display().to_string());
        let mut args = vec!["--ca-addr", &url, "--ca-root", &bundle, "--ca-token", &token];
        args.extend_from_slice(extra);
        let hidden = vec![self.cluster.dir().join("ca-v1"), self.cluster.dir().join("ca-v2")];
        let mounts = Container { hidden, ..Container::default() };
        self.cluster.spawn_agent_with(node, &args, &mounts).expect("agent")
    }

    fn start_agent(&self, node: &str, extra: &[&str]) -> Agent {
        let agent = self.spawn_agent(node, extra);
        agent.wait_ready(Duration::from_secs(20)).expect("agent ready");
        agent
    }

    /// Runs the Python gRPC client from `node` with `token` (a file name in the run directory).
    fn python(&self, node: &str, token: &str, args: &[&str]) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ca/client.py");
        let mut command = Command::new("python3");
        command
            .arg(script)
            .args(["--addr", &format!("{}:15012", self.cluster.node(CA_NODE).ip())])
            .arg("--root")
            .arg(&self.bundle)
            .arg("--token")
            .arg(self.cluster.dir().join(token))
            .args(args);
        let out =
            self.cluster.node(node).command_output(command, Duration::from_secs(30)).expect("python client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
            panic!("client output {stdout:?}, stderr {}", String::from_utf8_lossy(&out.stderr))
        })
    }

    fn roundtrip(&self, payload: &[u8]) -> std::io::Result<()> {
        let mut stream = self
            .cluster
            .pod("client")
            .connect(self.cluster.pod("server").addr(HTTP), Duration::from_secs(5))?;
        let back = echo_roundtrip(&mut stream, payload)?;
        if back != payload {
            return Err(std::io::Error::other("echo differs"));
        }
        Ok(())
    }
}

/// Replaces `path` with `contents` atomically, as the kubelet updates a ConfigMap volume.
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Steady traffic from client to server, a new connection every few milliseconds, counting
/// what worked and what failed until `stop`.
fn traffic(mesh: &Mesh, stop: &AtomicBool, ok: &AtomicU64, failed: &AtomicU64) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        match mesh.roundtrip(format!("AMBIT-STEADY-{n:08}").as_bytes()) {
            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("connection {n} failed: {e}");
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        std::thread::sleep(Duration::from_millis(40));
    }
}

/// The serial of the certificate an agent holds for `id`.
fn serial(agent: &Agent, id: &str) -> Option<String> {
    certs(agent)
        .into_iter()
        .find(|c| c["identity"] == id)
        .and_then(|c| c["serial"].as_str().map(str::to_owned))
}

/// The SHA-256 fingerprint of a PEM certificate file, as `ambit` prints it.
fn fingerprint(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem)
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().rsplit('=').next().unwrap_or_default().to_owned()
}

/// `ambit certs -o json` of an agent, by identity.
fn certs(agent: &Agent) -> Vec<Value> {
    agent.admin_json("/certs").and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn node_agents_get_their_pods_certificates_from_the_ca_and_hold_no_ca_key() {
    let mesh = Mesh::with_root();
    let agent_a = mesh.start_agent("a", &[]);
    let agent_b = mesh.start_agent("b", &[]);
    let _server = mesh.cluster.pod("server").echo_server(HTTP).expect("server");
    mesh.roundtrip(b"through the mesh, certificates from the CA").expect("client to server over mTLS");
    // The CONNECT carried the source's baggage, as ztunnel sends it (telemetry only).
    let inbound = agent_b
        .wait_for_event(Duration::from_secs(5), |e| e["target"] == "access" && e["direction"] == "inbound")
        .expect("inbound record");
    assert_eq!(inbound["security"], "mutual_tls");
    assert_eq!(
        inbound["peer.baggage"],
        "k8s.namespace.name=shop,k8s.pod.name=client,service.name=client,service.version=latest",
        "{inbound}"
    );

    let root = fingerprint(&mesh.bundle);
    for (agent, id) in [(&agent_a, identity("shop", "client-sa")), (&agent_b, identity("shop", "server-sa"))]
    {
        let held = certs(agent);
        let cert =
            held.iter().find(|c| c["identity"] == id.as_str()).unwrap_or_else(|| panic!("{id} in {held:?}"));
        assert_eq!(cert["root"], root.as_str(), "chains to the CA's root");
    }
    // The CA issued them on each node's behalf: node a by the token's node claim, node b by the
    // pod its token is bound to.
    let issued: Vec<Value> =
        mesh.ca().log_events().into_iter().filter(|e| e["message"] == "certificate issued").collect();
    for (node, id) in [("a", identity("shop", "client-sa")), ("b", identity("shop", "server-sa"))] {
        assert!(
            issued.iter().any(|e| e["node"] == node && e["identity"] == id.as_str()),
            "{id} issued for node {node}: {issued:?}"
        );
    }
    // No CA key where the agents run: the CA's directory is invisible to them (the same path is
    // there for this test process: the control), and no embedded CA was created.
    let key = mesh.cluster.dir().join("ca-v1/ca-key.pem");
    assert!(key.exists(), "control: the key exists for the CA");
    for agent in [&agent_a, &agent_b] {
        let seen = PathBuf::from(format!("/proc/{}/root{}", agent.pid(), key.display()));
        assert!(!seen.exists(), "agent {} can read {}", agent.pid(), key.display());
        assert!(!agent.log_text().contains("created a new root CA"));
    }
    assert!(!mesh.cluster.ca_dir().exists(), "no embedded CA was created");
    let status = agent_a.admin_json("/status").expect("status");
    assert_eq!(status["ca"]["issuer"], format!("{}:15012", mesh.cluster.node(CA_NODE).ip()));
    assert_eq!(status["ca"]["roots"][0]["fingerprint"], root.as_str());
}

#[test]
fn the_ca_refuses_identities_a_caller_may_not_have() {
    let mesh = Mesh::with_root();
    let client = identity("shop", "client-sa");
    let server = identity("shop", "server-sa");

    // Control: node a's agent gets the identity of a pod on node a; the chain verifies with
    // openssl against the root alone.
    let granted = mesh.python("a", "token-a", &["--identity", &client]);
    assert_eq!(granted["code"], "OK", "{granted}");
    let chain: Vec<&str> =
        granted["chain"].as_array().expect("chain").iter().filter_map(Value::as_str).collect();
    assert!(chain.len() >= 2, "leaf and root: {chain:?}");
    let leaf = mesh.cluster.dir().join("leaf.pem");
    std::fs::write(&leaf, chain[0]).expect("leaf");
    let untrusted = mesh.cluster.dir().join("untrusted.pem");
    std::fs::write(&untrusted, chain[1..chain.len() - 1].concat()).expect("chain");
    let mut verify = Command::new("openssl");
    verify.args(["verify", "-purpose", "sslclient", "-CAfile"]).arg(&mesh.bundle);
    if chain.len() > 2 {
        verify.arg("-untrusted").arg(&untrusted);
    }
    let verified = verify.arg(&leaf).output().expect("openssl verify");
    assert!(verified.status.success(), "openssl verify: {}", String::from_utf8_lossy(&verified.stdout));
    let text =
        Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&leaf).output().expect("x509");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("URI:{client}")), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");

    // Node a may not have the identity of a pod on node b; node b may.
    let refused = mesh.python("a", "token-a", &["--identity", &server]);
    assert_eq!(refused["code"], "PERMISSION_DENIED", "{refused}");
    assert!(refused["message"].as_str().unwrap_or_default().contains("node a"), "{refused}");
    assert_eq!(mesh.python("b", "token-b", &["--identity", &server])["code"], "OK");

    // A workload's token: its own identity, nothing else.
    mesh.api.add_token("token-client", "shop", "client-sa", Some("client"), Some("a"), &[AUDIENCE]);
    std::fs::write(mesh.cluster.dir().join("token-client"), "token-client").expect("token");
    assert_eq!(mesh.python("a", "token-client", &["--identity", &client])["code"], "OK");
    assert_eq!(mesh.python("a", "token-client", &["--identity", &client, "--no-impersonate"])["code"], "OK");
    let other = mesh.python("a", "token-client", &["--identity", &server]);
    assert_eq!(other["code"], "PERMISSION_DENIED", "{other}");
    // ...whose CSR must name that identity when it asks for none.
    let mismatch = mesh.python("a", "token-client", &["--identity", &server, "--no-impersonate"]);
    assert_eq!(mismatch["code"], "INVALID_ARGUMENT", "{mismatch}");

    // Tokens the API server does not vouch for this audience, or at all.
    mesh.api.add_token(
        "token-api",
        "ambit-system",
        "ambit",
        Some("ambit-a"),
        Some("a"),
        &["https://kubernetes.default.svc"],
    );
    std::fs::write(mesh.cluster.dir().join("token-api"), "token-api").expect("token");
    std::fs::write(mesh.cluster.dir().join("token-forged"), "not-a-token").expect("token");
    for token in ["token-api", "token-forged"] {
        let answer = mesh.python("a", token, &["--identity", &client]);
        assert_eq!(answer["code"], "UNAUTHENTICATED", "{token}: {answer}");
    }

    // CSRs and lifetimes the CA will not sign, from an otherwise allowed caller.
    let two_sans = mesh.python("a", "token-a", &["--identity", &client, "--san", &identity("shop", "extra")]);
    assert_eq!(two_sans["code"], "INVALID_ARGUMENT", "{two_sans}");
    let elsewhere = "spiffe://evil.example/ns/shop/sa/client-sa";
    let foreign = mesh.python("a", "token-a", &["--identity", elsewhere]);
    assert_eq!(foreign["code"], "INVALID_ARGUMENT", "{foreign}");
    let long = mesh.python("a", "token-a", &["--identity", &client, "--ttl", &(48 * 3600).to_string()]);
    assert_eq!(long["code"], "INVALID_ARGUMENT", "{long}");

    // Garbage on the port does not take the CA down.
    let addr = std::net::SocketAddr::from((mesh.cluster.node(CA_NODE).ip(), 15012));
    mesh.cluster
        .node("a")
        .in_netns(move || {
            use std::io::Write as _;
            if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                let _ = s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0, 1, 2, 3]);
                let _ = s.write_all(&[0u8; 4096]);
            }
        })
        .expect("netns");
    assert_eq!(mesh.python("a", "token-a", &["--identity", &client])["code"], "OK", "still serving");

    // Every refusal was logged with caller, node and identity.
    let refusals: Vec<Value> =
        mesh.ca().log_events().into_iter().filter(|e| e["message"] == "certificate refused").collect();
    assert!(
        refusals.iter().any(|e| e["caller"].as_str().is_some_and(|c| c.starts_with("ambit-system/ambit"))
            && e["node"] == "a"
            && e["identity"] == server.as_str()
            && e["code"] == "PERMISSION_DENIED"),
        "{refusals:?}"
    );
    assert!(refusals.len() >= 7, "{} refusals logged", refusals.len());
}

#[test]
fn issued_certificates_outlive_a_ca_outage_and_renewal_resumes() {
    let mut mesh = Mesh::with_root();
    // Renewed every 15 s; the outage below lasts longer than that.
    let agent_a = mesh.start_agent("a", &["--cert-ttl", "30s"]);
    let _agent_b = mesh.start_agent("b", &["--cert-ttl", "30s"]);
    let _server = mesh.cluster.pod("server").echo_server(HTTP).expect("server");
    let client = identity("shop", "client-sa");
    let before = serial(&agent_a, &client).expect("certificate held");
    let mut capture = mesh.cluster.capture().expect("tcpdump");
    let mut held = mesh
        .cluster
        .pod("client")
        .connect(mesh.cluster.pod("server").addr(HTTP), Duration::from_secs(5))
        .expect("held");

    mesh.ca.take().expect("CA").kill();
    let outage = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    let mut probe = |mesh: &Mesh, n: usize| {
        let payload = format!("AMBIT-OUTAGE-{n:06}");
        match mesh.roundtrip(payload.as_bytes()) {
            Ok(()) => ok += 1,
            Err(e) => {
                eprintln!("connection {n} failed: {e}");
                failed += 1;
            }
        }
        let back = echo_roundtrip(&mut held, payload.as_bytes()).expect("the held connection lives on");
        assert_eq!(back, payload.as_bytes());
    };
    let mut n = 0;
    while outage.elapsed() < Duration::from_secs(18) {
        n += 1;
        probe(&mesh, n);
        std::thread::sleep(Duration::from_millis(250));
    }
    // The renewal came due and failed; the agent says so, and still serves.
    let status = agent_a.admin_json("/status").expect("status");
    assert!(status["ca"]["failing_since"].is_u64(), "{}", status["ca"]);
    assert!(
        status["ca"]["last_error"].as_str().is_some_and(|e| e.contains("unreachable")),
        "{}",
        status["ca"]
    );
    assert_eq!(
        serial(&agent_a, &client).as_deref(),
        Some(before.as_str()),
        "the issued certificate keeps serving"
    );
    assert_eq!(
        agent_a.readiness().expect("readiness"),
        Some(200),
        "still ready on the certificates it holds"
    );
    for command in ["status", "certs"] {
        let out = mesh.cluster.node("a").ambit(&[command]).expect("ambit");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("FAILING for") && text.contains("unreachable"), "ambit {command}:\n{text}");
    }

    mesh.start_ca(&[]);
    let renewed = Instant::now();
    while serial(&agent_a, &client).as_deref() == Some(before.as_str()) {
        assert!(renewed.elapsed() < Duration::from_secs(20), "renewal did not resume after the CA came back");
        n += 1;
        probe(&mesh, n);
        std::thread::sleep(Duration::from_millis(250));
    }
    n += 1;
    probe(&mesh, n);
    let pcap = capture.finish().expect("capture");
    assert_eq!(failed, 0, "{failed} of {} connections failed across the outage", ok + failed);
    assert!(ok > 60, "{ok} connections");
    assert!(!contains(&pcap, b"AMBIT-OUTAGE-"), "no payload in plaintext on the wire at any point");
    let status = agent_a.admin_json("/status").expect("status");
    assert!(status["ca"]["failing_since"].is_null(), "{}", status["ca"]);
}

#[test]
fn a_root_rotation_under_traffic_loses_no_connection() {
    let mesh = Mesh::with_root();
    let agents =
        [mesh.start_agent("a", &["--cert-ttl", "20s"]), mesh.start_agent("b", &["--cert-ttl", "20s"])];
    let _server = mesh.cluster.pod("server").echo_server(HTTP).expect("server");
    let (old_dir, new_dir) = (mesh.cluster.dir().join("ca-v1"), mesh.cluster.dir().join("ca-v2"));
    let old_root = fingerprint(&old_dir.join("ca-cert.pem"));
    let (stop, ok, failed) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    let roots = |agent: &Agent| -> Vec<String> {
        agent.admin_json("/status").map_or_else(Vec::new, |s| {
            s["ca"]["roots"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["fingerprint"].as_str().map(str::to_owned))
                .collect()
        })
    };
    std::thread::scope(|scope| {
        scope.spawn(|| traffic(&mesh, &stop, &ok, &failed));
        std::thread::sleep(Duration::from_secs(1));

        // 1. A new root, and agents trusting both.
        ambit(&[
            "ca",
            "rotate",
            "--from",
            old_dir.to_str().expect("utf-8"),
            "--to",
            new_dir.to_str().expect("utf-8"),
        ]);
        let new_root = fingerprint(&new_dir.join("ca-cert.pem"));
        assert_ne!(new_root, old_root);
        replace(&mesh.bundle, &std::fs::read(new_dir.join("root-cert.pem")).expect("bundle"));
        wait_until("both agents trust both roots", Duration::from_secs(20), || {
            agents.iter().all(|a| {
                let r = roots(a);
                r.contains(&old_root) && r.contains(&new_root)
            })
        });
        // 2. The CA switches to the new root, as a Secret volume is swapped.
        let tmp = mesh.cluster.dir().join("ca-live.tmp");
        std::os::unix::fs::symlink(&new_dir, &tmp).expect("symlink");
        std::fs::rename(&tmp, &mesh.ca_live).expect("swap");
        // 3. Every certificate renewed from the new root.
        wait_until("every certificate chains to the new root", Duration::from_secs(40), || {
            agents.iter().all(|a| {
                let held = certs(a);
                !held.is_empty() && held.iter().all(|c| c["root"] == new_root.as_str())
            })
        });
        // 4. The old root goes.
        ambit(&["ca", "finish", "--dir", new_dir.to_str().expect("utf-8")]);
        replace(&mesh.bundle, &std::fs::read(new_dir.join("root-cert.pem")).expect("bundle"));
        wait_until("agents trust the new root alone", Duration::from_secs(20), || {
            agents.iter().all(|a| roots(a) == [new_root.clone()])
        });
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} connections failed during the rotation", ok + failed);
    assert!(ok > 100, "{ok} connections");
    // The CA itself serves from the new root: a client trusting only it gets through.
    let answer = mesh.python("a", "token-a", &["--identity", &identity("shop", "client-sa")]);
    assert_eq!(answer["code"], "OK", "{answer}");
    assert!(mesh.ca().log_text().contains("CA key material changed; reloaded"));
}

/// An offline root (its key kept away from the CA) and an intermediate signing CA in `dir`, in
/// Istio's `cacerts` layout, made with openssl. Returns the root certificate.
fn intermediate_ca(dir: &Path) -> PathBuf {
    let offline = dir.parent().expect("parent").join("offline-root");
    std::fs::create_dir_all(&offline).expect("dir");
    let openssl = |args: &[&str], cwd: &Path| {
        let out = Command::new("openssl").args(args).current_dir(cwd).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut root = vec!["req", "-x509"];
    root.extend(ec);
    root.extend([
        "-keyout",
        "root-key.pem",
        "-out",
        "root-cert.pem",
        "-days",
        "30",
        "-subj",
        "/O=ambit test/CN=offline root",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&root, &offline);
    let mut csr = vec!["req", "-new"];
    csr.extend(ec);
    csr.extend(["-keyout", "ca-key.pem", "-out", "ca.csr", "-subj", "/O=ambit test/CN=intermediate"]);
    openssl(&csr, dir);
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .expect("ext");
    let root_cert = offline.join("root-cert.pem");
    let root_key = offline.join("root-key.pem");
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            root_cert.to_str().expect("utf-8"),
            "-CAkey",
            root_key.to_str().expect("utf-8"),
            "-CAcreateserial",
            "-out",
            "ca-cert.pem",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
        ],
        dir,
    );
    for leftover in ["ca.csr", "ext.cnf"] {
        std::fs::remove_file(dir.join(leftover)).expect("remove");
    }
    let chain =
        [std::fs::read(dir.join("ca-cert.pem")).expect("int"), std::fs::read(&root_cert).expect("root")]
            .concat();
    std::fs::write(dir.join("cert-chain.pem"), chain).expect("chain");
    std::fs::copy(&root_cert, dir.join("root-cert.pem")).expect("root");
    root_cert
}

#[test]
fn chains_through_an_intermediate_ca_verify_at_both_ends() {
    let mesh = Mesh::new(intermediate_ca);
    let agent_a = mesh.start_agent("a", &[]);
    let _agent_b = mesh.start_agent("b", &[]);
    let _server = mesh.cluster.pod("server").echo_server(HTTP).expect("server");
    // Each agent trusts the offline root alone: the handshake works only if each side sends
    // its intermediate.
    mesh.roundtrip(b"root, intermediate, leaf").expect("mTLS through an intermediate");
    let root = fingerprint(&mesh.bundle);
    let client = certs(&agent_a)
        .into_iter()
        .find(|c| c["identity"] == identity("shop", "client-sa").as_str())
        .expect("cert");
    assert_eq!(client["intermediates"], 1, "{client}");
    assert_eq!(client["root"], root.as_str());

    // The CA answers leaf, intermediate, root; the leaf verifies with the intermediate and not
    // without it (the control).
    let answer = mesh.python("a", "token-a", &["--identity", &identity("shop", "client-sa")]);
    let chain: Vec<&str> =
        answer["chain"].as_array().expect("chain").iter().filter_map(Value::as_str).collect();
    assert_eq!(chain.len(), 3, "{answer}");
    let (leaf, intermediate) =
        (mesh.cluster.dir().join("leaf.pem"), mesh.cluster.dir().join("intermediate.pem"));
    std::fs::write(&leaf, chain[0]).expect("leaf");
    std::fs::write(&intermediate, chain[1]).expect("intermediate");
    let verify = |with_intermediate: bool| {
        let mut command = Command::new("openssl");
        command.args(["verify", "-CAfile"]).arg(&mesh.bundle);
        if with_intermediate {
            command.arg("-untrusted").arg(&intermediate);
        }
        command.arg(&leaf).output().expect("openssl").status.success()
    };
    assert!(verify(true), "leaf → intermediate → root verifies");
    assert!(!verify(false), "control: the leaf alone does not");
}

/// The process-level view of a pod template (`ambit_tests::manifest`): its environment, its
/// volumes bound where and as read-only as the manifest says (each non-host volume from
/// `sources`, by name; host paths as the host has them), its user. Returns its arguments.
fn as_manifest_starts(
    path: &str,
    node: &str,
    sources: &[(&str, PathBuf)],
    container: &mut Container,
) -> Vec<String> {
    let template = ambit_tests::manifest::pod_template(path, node).expect("pod template");
    container.env.extend(template.env);
    for mount in template.mounts {
        match mount.source {
            ambit_tests::manifest::Source::Host(host) => {
                assert_eq!(host, mount.target, "host paths are mounted where they are");
                if mount.read_only {
                    container.read_only.push(mount.target);
                }
            }
            ambit_tests::manifest::Source::Volume(name) => {
                let (_, source) = sources
                    .iter()
                    .find(|(n, _)| *n == name)
                    .unwrap_or_else(|| panic!("no source for volume {name}"));
                assert!(mount.read_only, "volume {name} must be mounted read-only");
                container.files.push((source.clone(), mount.target));
            }
        }
    }
    container.user = template.user;
    template.args
}

/// Both halves as `daemonset/` runs them: the CA as its Deployment starts it (arguments,
/// environment, the Secret read-only at its mount path, as its non-root user) and the agents as
/// the DaemonSet starts them (arguments, ConfigMap environment, the bundle ConfigMap and the
/// projected token read-only at their mount paths, cluster DNS standing in through /etc/hosts,
/// the in-cluster API through a kubeconfig): ready, and serving mTLS.
#[test]
fn the_agents_and_the_ca_started_as_the_manifests_start_them_serve_mtls() {
    let cluster = Cluster::builder().client_server().node(CA_NODE).build().expect("cluster");
    let api = cluster.mock_api().expect("mock API");
    api.sync_yaml(&cluster.manifest()).expect("pods");
    api.add_agent_pod("ambit-a", "a");
    api.add_agent_pod("ambit-b", "b");
    let processes = cluster.start_pod_processes().expect("pod processes");

    // The Secret, as the kubelet writes it for the Deployment (defaultMode, fsGroup).
    let deployment = ambit_tests::manifest::manifest("ca/deployment.yaml").expect("deployment");
    let ca_pod = &deployment["spec"]["template"]["spec"];
    let secret = cluster.dir().join("secret-ambit-ca");
    ambit(&["ca", "init", "--dir", secret.to_str().expect("utf-8")]);
    let fs_group = ca_pod["securityContext"]["fsGroup"].as_u64().expect("fsGroup") as u32;
    for file in std::fs::read_dir(&secret).expect("secret").flatten() {
        std::os::unix::fs::chown(file.path(), Some(0), Some(fs_group)).expect("chown");
        let mode = ambit_tests::manifest::default_mode(&ca_pod["volumes"][0]).expect("defaultMode");
        std::fs::set_permissions(file.path(), std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
    }
    let mut ca_container = Container::default();
    let ca_args =
        as_manifest_starts("ca/deployment.yaml", CA_NODE, &[("cacerts", secret.clone())], &mut ca_container);
    let ca_args: Vec<&str> = ca_args.iter().map(String::as_str).collect();
    let ca = cluster.spawn_ca_with(CA_NODE, &ca_args, &ca_container).expect("CA");
    ca.wait_ready(Duration::from_secs(20)).expect("the CA is ready as its Deployment starts it");
    assert!(ca.log_text().contains("serving Istio's certificate protocol"));

    // The agents' volumes: the bundle ConfigMap, the projected token; cluster DNS.
    let bundle = cluster.dir().join("configmap-ambit-ca-root");
    std::fs::create_dir_all(&bundle).expect("dir");
    std::fs::copy(secret.join("ca-cert.pem"), bundle.join("root-cert.pem")).expect("bundle");
    let hosts = cluster.dir().join("hosts");
    let ca_ip = cluster.node(CA_NODE).ip();
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1 localhost\n{ca_ip} ambit-ca.ambit-system.svc ambit-ca.ambit-system.svc.cluster.local\n"
        ),
    )
    .expect("hosts");
    let mut agents = Vec::new();
    for node in ["a", "b"] {
        api.add_token(
            &format!("projected-{node}"),
            "ambit-system",
            "ambit",
            Some(&format!("ambit-{node}")),
            Some(node),
            &[AUDIENCE],
        );
        let token = cluster.dir().join(format!("projected-{node}"));
        std::fs::create_dir_all(&token).expect("dir");
        std::fs::write(token.join("istio-token"), format!("projected-{node}")).expect("token");
        let mut container =
            Container { files: vec![(hosts.clone(), PathBuf::from("/etc/hosts"))], ..Container::default() };
        let args = as_manifest_starts(
            "daemonset.yaml",
            node,
            &[("ca-root", bundle.clone()), ("istio-token", token)],
            &mut container,
        );
        assert_eq!(args, ["agent"], "the harness runs `ambit agent`");
        // The CA's key material is nowhere the agent can see.
        container.hidden.push(secret.clone());
        agents.push(cluster.spawn_kube_agent_with(node, &[], &container).expect("agent"));
    }
    for agent in &agents {
        agent.wait_ready(Duration::from_secs(30)).expect("the agent is ready as the DaemonSet starts it");
    }
    let _server = cluster.pod("server").echo_server(HTTP).expect("server");
    let mut stream = cluster
        .pod("client")
        .connect(cluster.pod("server").addr(HTTP), Duration::from_secs(5))
        .expect("connect");
    assert_eq!(echo_roundtrip(&mut stream, b"as shipped").expect("echo"), b"as shipped");
    // The access record is written when the connection ends.
    drop(stream);
    let record = agents[0]
        .wait_for_event(Duration::from_secs(5), |e| e["target"] == "access" && e["direction"] == "outbound")
        .expect("outbound record");
    assert_eq!(record["security"], "mutual_tls");
    let status = agents[0].admin_json("/status").expect("status");
    assert_eq!(status["ca"]["issuer"], "ambit-ca.ambit-system.svc:15012");
    drop(processes);
}

/// Forty pods of forty service accounts start at once on one node: every identity is asked for
/// once (one CSR round trip each, all in flight together), the agent becomes ready, and its
/// endpoints answer throughout (a lock-order deadlock once froze it here).
#[test]
fn forty_new_identities_at_once_are_each_one_csr() {
    let mut builder = Cluster::builder().node("a").node("b").namespace("shop", true);
    for i in 0..40 {
        builder = builder
            .pod(ambit_tests::PodSpec::new("shop", &format!("p{i}"), "a").service_account(&format!("sa{i}")));
    }
    let mesh = Mesh::on(builder, |dir| {
        ambit(&["ca", "init", "--dir", dir.to_str().expect("utf-8")]);
        dir.join("ca-cert.pem")
    });
    let agent = mesh.spawn_agent("a", &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = agent.readiness().expect("the readiness endpoint answers once it listens");
        if ready == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "not ready:\n{}", agent.log_text());
        if ready.is_some() {
            assert!(agent.admin_json("/status").is_some(), "the admin API answers while certificates arrive");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = certs(&agent);
    assert_eq!(held.len(), 40, "{held:?}");
    // The CA's log is written in batches: wait for its lines rather than read it once.
    let issued = || -> Vec<Value> {
        mesh.ca().log_events().into_iter().filter(|e| e["message"] == "certificate issued").collect()
    };
    wait_until("the CA's records of 40 certificates", Duration::from_secs(5), || issued().len() >= 40);
    let issued = issued();
    for i in 0..40 {
        let id = identity("shop", &format!("sa{i}"));
        let n = issued.iter().filter(|e| e["identity"] == id.as_str()).count();
        assert_eq!(n, 1, "{id} asked for {n} times");
    }
}
