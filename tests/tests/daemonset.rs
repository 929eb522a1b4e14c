//! End to end: the agent's image (`cargo xtask image`) started by podman exactly as
//! `daemonset/daemonset.yaml` starts it on a node (read from that file): hostNetwork in the
//! node's namespace, hostPID, all capabilities dropped but the listed ones, the volumes with
//! their read-only flags, the ConfigMap's environment, the command and arguments. Two such
//! containers act as two nodes, with the mesh CA beside them and the mock Kubernetes API.
//! Least privilege: each listed capability is shown to be needed by dropping it.

use std::{
    ffi::OsString,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use ambit_tests::{
    Agent, Cluster, MockApi, PodProcesses, echo_roundtrip,
    manifest::{PodTemplate, pod_template},
    podman::{self, Running},
};
use serde_json::Value;

const HTTP: u16 = 8080;
const CA_NODE: &str = "ca";
const AUDIENCE: &str = "istio-ca";
/// Where the test's kubeconfig is mounted: the in-cluster API is a mock on the node's
/// loopback, reached through a kubeconfig instead of the service account's files.
const KUBECONFIG: &str = "/var/run/ambit-test/kubeconfig";

/// Two nodes whose agents are containers of the image, the CA service as a process in a node
/// of its own, pods with processes in kubelet-style cgroups.
struct Nodes {
    cluster: Cluster,
    _api: MockApi,
    _ca: Agent,
    _processes: PodProcesses,
    /// The `ambit-ca-root` ConfigMap volume.
    bundle: PathBuf,
}

impl Nodes {
    fn new() -> Self {
        podman::require_image().expect("the agent's image");
        let cluster = Cluster::builder().client_server().node(CA_NODE).build().expect("cluster");
        let api = cluster.mock_api().expect("mock API");
        api.sync_yaml(&cluster.manifest()).expect("pods");
        let ca_dir = cluster.dir().join("secret-ambit-ca");
        let init = Command::new(ambit_tests::ambit_binary())
            .args(["ca", "init", "--dir"])
            .arg(&ca_dir)
            .output()
            .expect("ambit ca init");
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        let ca = cluster.spawn_ca(CA_NODE, &ca_dir, &[]).expect("CA");
        ca.wait_ready(Duration::from_secs(20)).expect("CA ready");
        let bundle = cluster.dir().join("configmap-ambit-ca-root");
        std::fs::create_dir_all(&bundle).expect("dir");
        std::fs::copy(ca_dir.join("ca-cert.pem"), bundle.join("root-cert.pem")).expect("bundle");
        let kubeconfig = cluster.dir().join("kubeconfig");
        MockApi::write_kubeconfig(&kubeconfig).expect("kubeconfig");
        for node in ["a", "b"] {
            let pod = format!("ambit-{node}");
            api.add_agent_pod(&pod, node);
            let token = format!("projected-{node}");
            api.add_token(&token, "ambit-system", "ambit", Some(&pod), Some(node), &[AUDIENCE]);
            let dir = cluster.dir().join(&token);
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join("istio-token"), &token).expect("token");
        }
        let processes = cluster.start_pod_processes().expect("pod processes");
        Self { cluster, _api: api, _ca: ca, _processes: processes, bundle }
    }

    /// The DaemonSet's pod template on `node`, as shipped.
    fn template(&self, node: &str) -> PodTemplate {
        let template = pod_template("daemonset.yaml", node).expect("pod template");
        assert!(template.host_network && template.host_pid, "the agent shares the node's network and PIDs");
        assert!(template.drops_all, "the agent drops every capability it does not list");
        assert!(!template.privileged, "the agent is not privileged");
        template
    }

    /// Starts `template` as node `node`'s agent container (a second start of the same node
    /// replaces the first).
    fn start(&self, node: &str, template: &PodTemplate) -> Running {
        self.start_with(node, template, &[])
    }

    /// As [`Nodes::start`], with `extra` podman options before the image.
    fn start_with(&self, node: &str, template: &PodTemplate, extra: &[String]) -> Running {
        let handle = self.cluster.node(node);
        let mut options = podman::run_options(
            template,
            &handle.netns_path(),
            &[
                ("ca-root", self.bundle.clone()),
                ("istio-token", self.cluster.dir().join(format!("projected-{node}"))),
            ],
        )
        .expect("podman options");
        options.extend(extra.iter().map(OsString::from));
        let ca_ip = self.cluster.node(CA_NODE).ip();
        let kubeconfig = self.cluster.dir().join("kubeconfig");
        // Cluster DNS and the in-cluster API, standing in.
        for option in [
            format!("--add-host=ambit-ca.ambit-system.svc:{ca_ip}"),
            format!("--volume={}:{KUBECONFIG}:ro", kubeconfig.display()),
            format!("--env=KUBECONFIG={KUBECONFIG}"),
            // The harness's log level and a bpffs name of this run's own (for its sweeper).
            format!("--env=RUST_LOG={}", std::env::var("AMBIT_TEST_LOG").unwrap_or_else(|_| "info".into())),
        ] {
            options.push(option.into());
        }
        options.push(podman::IMAGE.into());
        options.extend(template.args.iter().map(OsString::from));
        options.extend(["--instance".into(), self.cluster.instance(node).into()]);
        let name = format!("{}-agent-{node}", self.cluster.run_id());
        Running::start(&name, &handle.netns_path(), &options).expect("podman run")
    }

    /// A round trip from pod `from` to the server's echo port.
    fn to_server(&self, from: &str, payload: &[u8]) -> std::io::Result<Vec<u8>> {
        let server = self.cluster.pod("server").addr(HTTP);
        let mut stream = self.cluster.pod(from).connect(server, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        echo_roundtrip(&mut stream, payload)
    }
}

fn wait_for_log(container: &Running, limit: Duration, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(event) = container.log_events().into_iter().find(|e| matches(e)) {
            return event;
        }
        assert!(Instant::now() < deadline, "no {what} in {}'s log:\n{}", container.name(), container.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The shipped DaemonSet's container on two nodes: ready, the pods captured, mTLS between the
/// nodes with both access records, traffic fails closed while one agent container is killed
/// (the mesh client and a plaintext outsider both), and works again once it is started again.
#[test]
fn the_daemonset_container_serves_mtls_fails_closed_when_killed_and_recovers() {
    let nodes = Nodes::new();
    let a = nodes.start("a", &nodes.template("a"));
    let b = nodes.start("b", &nodes.template("b"));
    a.wait_ready(Duration::from_secs(60)).expect("agent a ready in its container");
    b.wait_ready(Duration::from_secs(60)).expect("agent b ready in its container");
    let server = nodes.cluster.pod("server").echo_server(HTTP).expect("server");

    assert_eq!(nodes.to_server("client", b"as a DaemonSet").expect("mTLS across nodes"), b"as a DaemonSet");
    let outbound = wait_for_log(&a, Duration::from_secs(10), "outbound access record", |e| {
        e["target"] == "access" && e["direction"] == "outbound"
    });
    assert_eq!(outbound["security"], "mutual_tls", "{outbound}");
    let inbound = wait_for_log(&b, Duration::from_secs(10), "inbound access record", |e| {
        e["target"] == "access" && e["direction"] == "inbound"
    });
    assert_eq!(inbound["security"], "mutual_tls", "{inbound}");
    assert!(
        inbound["src.identity"].as_str().is_some_and(|p| p.ends_with("/ns/shop/sa/client-sa")),
        "{inbound}"
    );
    // Control for the outage below: a plaintext client outside the mesh gets through
    // (PERMISSIVE), so its failure during the outage is the outage's doing.
    assert_eq!(nodes.to_server("outsider", b"plain").expect("outsider, PERMISSIVE"), b"plain");

    b.kill().expect("kill agent b");
    assert!(!b.state().expect("state").0, "agent b is gone");
    let reached = server.peers().len();
    assert!(nodes.to_server("client", b"during the outage").is_err(), "mesh traffic fails while b is down");
    assert!(
        nodes.to_server("outsider", b"during the outage").is_err(),
        "plaintext fails closed while b is down"
    );
    assert_eq!(server.peers().len(), reached, "nothing reached the server while its agent was down");

    b.restart().expect("start agent b again");
    b.wait_ready(Duration::from_secs(60)).expect("agent b ready again");
    ambit_tests::wait_until(Duration::from_secs(20), "traffic recovers", || {
        nodes.to_server("client", b"recovered").is_ok_and(|r| r == b"recovered")
    });
    assert_eq!(a.state().expect("state"), (true, 0), "agent a ran throughout");
}

/// Whether the agent became ready without `capability`, and the lines of its log that are
/// failures naming it (not the start-up report of missing capabilities, which only predicts).
fn without(nodes: &Nodes, capability: &str) -> (bool, Vec<String>) {
    let mut template = nodes.template("a");
    template.capabilities.retain(|c| c != capability);
    let container = nodes.start("a", &template);
    let ready = container.wait_ready(Duration::from_secs(20)).is_ok();
    let name = format!("CAP_{capability}");
    let failures = container
        .log_events()
        .into_iter()
        .filter(|e| e["capability"].is_null())
        .map(|e| e.to_string())
        .filter(|l| l.contains(&name))
        .collect();
    (ready, failures)
}

/// Every capability the manifest lists is needed: without any one of them the agent does not
/// become ready, and the operation that failed says which capability it lacked. With all of
/// them it is ready and serves mTLS (the control: the set is enough).
#[test]
fn every_listed_capability_is_needed_and_the_set_is_enough() {
    let nodes = Nodes::new();
    let listed = nodes.template("a").capabilities;
    assert!(!listed.is_empty());
    let mut unexplained = Vec::new();
    for capability in &listed {
        let (ready, failures) = without(&nodes, capability);
        eprintln!("without CAP_{capability}: ready={ready}; {}", failures.first().map_or("", String::as_str));
        if ready || failures.is_empty() {
            unexplained
                .push(format!("without CAP_{capability}: ready={ready}, failures naming it: {failures:?}"));
        }
    }
    let control = nodes.start("a", &nodes.template("a"));
    control.wait_ready(Duration::from_secs(60)).expect("ready with exactly the listed capabilities");
    let b = nodes.start("b", &nodes.template("b"));
    b.wait_ready(Duration::from_secs(60)).expect("b ready");
    let _server = nodes.cluster.pod("server").echo_server(HTTP).expect("server");
    assert_eq!(nodes.to_server("client", b"enough").expect("mTLS"), b"enough");
    assert!(unexplained.is_empty(), "{}", unexplained.join("\n"));
}

/// A node without bpffs: the agent's container refuses to start, naming why, rather than mount
/// one inside the container that would vanish (and with it every pinned program) when the
/// container does. The control: the same container with the node's bpffs is ready.
#[test]
fn without_bpffs_on_the_node_the_agent_refuses_to_start() {
    let nodes = Nodes::new();
    // The host path as a node without bpffs has it: a plain directory.
    let empty = nodes.cluster.dir().join("no-bpffs");
    std::fs::create_dir_all(&empty).expect("dir");
    let mut template = nodes.template("a");
    for mount in &mut template.mounts {
        if mount.target == std::path::Path::new("/sys/fs/bpf") {
            mount.source = ambit_tests::manifest::Source::Host(empty.clone());
        }
    }
    let refused = nodes.start("a", &template);
    assert!(refused.wait_ready(Duration::from_secs(20)).is_err(), "not ready without bpffs");
    let logs = refused.logs();
    assert!(
        logs.contains("bpffs is not mounted at /sys/fs/bpf") && logs.contains("mount -t bpf bpf"),
        "{logs}"
    );
    assert_eq!(std::fs::read_dir(&empty).expect("dir").count(), 0, "nothing pinned into the plain directory");
    drop(refused);
    let control = nodes.start("a", &nodes.template("a"));
    control.wait_ready(Duration::from_secs(60)).expect("ready with the node's bpffs");
}
