//! Building and tearing down a simulated cluster.

use std::{
    fmt::Write as _,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::{
    agent::{Agent, Container, Source},
    apps::EchoServer,
    kubeapi::MockApi,
    sys::{self, PREFIX},
};

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// One pod of a simulated cluster.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// Pod name; unique within the cluster.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Node it runs on.
    pub node: String,
    /// Service account.
    pub service_account: String,
    /// Pod labels.
    pub labels: Vec<(String, String)>,
    /// Declared container ports, `(name, port)`.
    pub ports: Vec<(String, u16)>,
    /// Overrides the `ambit.io/netns` annotation (e.g. a path that does not exist).
    pub netns_override: Option<String>,
    /// No annotation: the agent must find the netns from the pod's cgroup, which is named as
    /// kubelet names it with this driver.
    pub discovered: Option<CgroupDriver>,
    /// The pod's address families.
    pub family: Family,
}

/// Which addresses a pod gets: IPv4 `10.90.1.<n>`, IPv6 `fd00:90::1:<n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4 only (the default).
    V4,
    /// Both, IPv4 first in `podIPs`.
    Dual,
    /// IPv6 only.
    V6,
}

/// Kubelet's cgroup naming styles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/…scope`
    Systemd,
    /// `kubepods/burstable/pod<uid>/<container>`
    Cgroupfs,
}

impl PodSpec {
    /// A pod `namespace/name` on `node`, with service account `default`.
    pub fn new(namespace: &str, name: &str, node: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            node: node.into(),
            service_account: "default".into(),
            labels: Vec::new(),
            ports: Vec::new(),
            netns_override: None,
            discovered: None,
            family: Family::V4,
        }
    }

    /// Gives the pod an IPv6 address as well (dual stack).
    pub fn ipv6(mut self) -> Self {
        self.family = Family::Dual;
        self
    }

    /// Gives the pod an IPv6 address only.
    pub fn ipv6_only(mut self) -> Self {
        self.family = Family::V6;
        self
    }

    /// Leaves the netns to be discovered through a kubelet-style cgroup (see [`CgroupDriver`]).
    pub fn discovered(mut self, driver: CgroupDriver) -> Self {
        self.discovered = Some(driver);
        self
    }

    /// Sets the service account.
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Declares a named container port.
    pub fn port(mut self, name: &str, port: u16) -> Self {
        self.ports.push((name.into(), port));
        self
    }
}

/// Describes a cluster to build.
#[derive(Default)]
pub struct ClusterBuilder {
    nodes: Vec<String>,
    namespaces: Vec<(String, Vec<(String, String)>)>,
    pods: Vec<PodSpec>,
}

impl ClusterBuilder {
    /// Adds a node.
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.into());
        self
    }

    /// Adds a namespace; `ambient` labels it `istio.io/dataplane-mode=ambient`.
    pub fn namespace(mut self, name: &str, ambient: bool) -> Self {
        let labels = if ambient {
            vec![("istio.io/dataplane-mode".to_owned(), "ambient".to_owned())]
        } else {
            Vec::new()
        };
        self.namespaces.push((name.into(), labels));
        self
    }

    /// Adds a pod.
    pub fn pod(mut self, pod: PodSpec) -> Self {
        self.pods.push(pod);
        self
    }

    /// The mission's example shop on nodes `a` and `b`: in the mesh, namespace `shop` with
    /// `frontend` (on a), `backend` and `db` (on b), each running as `<name>-sa` and labelled
    /// `app=<name>`; outside it, `legacy/outsider` on a. Tests add their own pods.
    pub fn shop(self) -> Self {
        let app = |name: &str, node: &str| {
            PodSpec::new("shop", name, node).service_account(&format!("{name}-sa")).label("app", name)
        };
        self.node("a")
            .node("b")
            .namespace("shop", true)
            .namespace("legacy", false)
            .pod(app("frontend", "a"))
            .pod(app("backend", "b"))
            .pod(app("db", "b"))
            .pod(PodSpec::new("legacy", "outsider", "a"))
    }

    /// One client and one server across nodes `a` and `b`: `shop/client` (a, `client-sa`) and
    /// `shop/server` (b, `server-sa`, `app=server`) in the mesh; `other/outsider` (a) and
    /// `other/plain` (b) outside it.
    pub fn client_server(self) -> Self {
        self.node("a")
            .node("b")
            .namespace("shop", true)
            .namespace("other", false)
            .pod(PodSpec::new("shop", "client", "a").service_account("client-sa"))
            .pod(PodSpec::new("shop", "server", "b").service_account("server-sa").label("app", "server"))
            .pod(PodSpec::new("other", "outsider", "a"))
            .pod(PodSpec::new("other", "plain", "b"))
    }

    /// Creates the namespaces, links and cgroups, and writes the cluster file.
    pub fn build(self) -> io::Result<Cluster> {
        sys::sweep_dead_runs();
        sys::node_bpffs()?;
        let run = format!("{PREFIX}{}x{}", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(&run);
        std::fs::create_dir_all(&dir)?;
        let cgroup = sys::cgroup2_root()?.join(&run);
        let mut cluster = Cluster {
            fabric: format!("{run}-net"),
            run,
            dir,
            cgroup,
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: self.namespaces,
            extra_yaml: Mutex::new(String::new()),
            agent_pids: Mutex::new(Vec::new()),
            netns: Vec::new(),
        };
        // From here on, Drop cleans up whatever was created, also when a step fails.
        cluster.create(&self.nodes, self.pods)?;
        cluster.write_manifest()?;
        Ok(cluster)
    }
}

/// A UUID-shaped pod UID, unique per run and pod, as Kubernetes gives them.
fn pod_uid(run: &str, index: usize) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in run.bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        hash >> 32,
        (hash >> 16) & 0xffff,
        hash & 0xfff,
        index,
        index
    )
}

/// A node of the cluster.
#[derive(Debug)]
struct Node {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    ipv6: Ipv6Addr,
}

/// A pod of the cluster.
#[derive(Debug)]
struct Pod {
    spec: Mutex<PodSpec>,
    name: String,
    netns: String,
    ip: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    cgroup: PathBuf,
    uid: String,
}

impl Pod {
    /// `status.podIP`: IPv4 unless the pod has none.
    fn primary(&self) -> IpAddr {
        match (self.ip, self.ipv6) {
            (Some(v4), _) => v4.into(),
            (None, Some(v6)) => v6.into(),
            (None, None) => IpAddr::from([0, 0, 0, 0]),
        }
    }
}

/// A simulated cluster; dropping it removes everything it created.
pub struct Cluster {
    run: String,
    dir: PathBuf,
    cgroup: PathBuf,
    fabric: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    namespaces: Vec<(String, Vec<(String, String)>)>,
    extra_yaml: Mutex<String>,
    agent_pids: Mutex<Vec<u32>>,
    netns: Vec<String>,
}

impl Cluster {
    /// Starts describing a cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    fn create(&mut self, nodes: &[String], pods: Vec<PodSpec>) -> io::Result<()> {
        std::fs::create_dir_all(&self.cgroup)?;
        let fabric = self.fabric.clone();
        self.add_netns(&fabric)?;
        sys::ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        sys::ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        for (i, name) in nodes.iter().enumerate() {
            let netns = format!("{}-node-{name}", self.run);
            let ip = Ipv4Addr::new(10, 90, 0, 1 + i as u8);
            let ipv6 = Ipv6Addr::new(0xfd00, 0x90, 0, 0, 0, 0, 0xff, 1 + i as u16);
            self.add_netns(&netns)?;
            self.plug(&netns, &format!("n{i}"), Some(ip), Some(ipv6))?;
            self.nodes.push(Node { name: name.clone(), netns, ip, ipv6 });
        }
        for (i, spec) in pods.into_iter().enumerate() {
            let netns = format!("{}-{}", self.run, spec.name);
            let ip = Ipv4Addr::new(10, 90, 1, 2 + i as u8);
            let ipv6 =
                (spec.family != Family::V4).then(|| Ipv6Addr::new(0xfd00, 0x90, 0, 0, 0, 0, 1, 2 + i as u16));
            self.add_netns(&netns)?;
            self.plug(&netns, &format!("p{i}"), (spec.family != Family::V6).then_some(ip), ipv6)?;
            let uid = pod_uid(&self.run, i);
            // Named as kubelet names pod cgroups, so that cluster mode finds every pod's
            // namespace through its processes ([`Cluster::start_pod_processes`]).
            let cgroup = match spec.discovered {
                None | Some(CgroupDriver::Cgroupfs) => {
                    self.cgroup.join("kubepods/besteffort").join(format!("pod{uid}")).join(&spec.name)
                }
                Some(CgroupDriver::Systemd) => self
                    .cgroup
                    .join("kubepods.slice/kubepods-burstable.slice")
                    .join(format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")))
                    .join(format!("cri-containerd-{}.scope", spec.name)),
            };
            std::fs::create_dir_all(&cgroup)?;
            let ip = (spec.family != Family::V6).then_some(ip);
            self.pods.push(Pod {
                name: spec.name.clone(),
                spec: Mutex::new(spec),
                netns,
                ip,
                ipv6,
                cgroup,
                uid,
            });
        }
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> io::Result<()> {
        sys::ip(&["netns", "add", name])?;
        self.netns.push(name.to_owned());
        sys::ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// Connects `netns` to the bridge with a veth pair (`eth0` inside, `port` on the bridge).
    fn plug(&self, netns: &str, port: &str, ip: Option<Ipv4Addr>, ipv6: Option<Ipv6Addr>) -> io::Result<()> {
        let fabric = self.fabric.as_str();
        sys::ip(&[
            "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", port, "netns", fabric,
        ])?;
        sys::ip(&["-n", fabric, "link", "set", port, "master", "br0", "up"])?;
        if let Some(ip) = ip {
            sys::ip(&["-n", netns, "addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
        }
        if let Some(v6) = ipv6 {
            // nodad: usable at once, without duplicate address detection's delay.
            sys::ip(&["-n", netns, "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        }
        sys::ip(&["-n", netns, "link", "set", "eth0", "up"])
    }

    /// This run's id (`ambit-t<pid>x<n>`): prefix of every object it created.
    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// The run's scratch directory (cluster file, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster file agents read.
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join("cluster.yaml")
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> NodeHandle<'_> {
        let node = self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"));
        NodeHandle { cluster: self, node }
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> PodHandle<'_> {
        let pod = self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"));
        PodHandle { pod }
    }

    /// Changes a pod's spec (labels, service account...); call [`Cluster::write_manifest`] to
    /// publish the change to the agents.
    pub fn edit_pod(&self, name: &str, edit: impl FnOnce(&mut PodSpec)) {
        let pod = self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"));
        edit(&mut pod.spec.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Sets YAML documents appended to the generated manifest (policies, services...).
    pub fn set_extra_yaml(&self, yaml: &str) {
        *self.extra_yaml.lock().unwrap_or_else(|e| e.into_inner()) = yaml.to_owned();
    }

    /// The cluster file as the current specs describe it.
    pub fn manifest(&self) -> String {
        let mut out = String::new();
        for (name, labels) in &self.namespaces {
            let _ = write!(out, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
            if !labels.is_empty() {
                out.push_str("  labels:\n");
                for (k, v) in labels {
                    let _ = writeln!(out, "    {k}: {v}");
                }
            }
            out.push_str("---\n");
        }
        for pod in &self.pods {
            let spec = pod.spec.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let netns = spec
                .netns_override
                .clone()
                .unwrap_or_else(|| sys::netns_path(&pod.netns).display().to_string());
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n",
                spec.name, spec.namespace, pod.uid
            );
            if spec.discovered.is_none() {
                let _ = write!(out, "  annotations:\n    ambit.io/netns: {netns}\n");
            }
            if !spec.labels.is_empty() {
                out.push_str("  labels:\n");
                for (k, v) in &spec.labels {
                    let _ = writeln!(out, "    {k}: \"{v}\"");
                }
            }
            let _ = write!(
                out,
                "spec:\n  nodeName: {}\n  serviceAccountName: {}\n  containers:\n  - name: app\n",
                spec.node, spec.service_account
            );
            if !spec.ports.is_empty() {
                out.push_str("    ports:\n");
                for (name, port) in &spec.ports {
                    let _ = writeln!(out, "    - name: {name}\n      containerPort: {port}");
                }
            }
            let _ = write!(out, "status:\n  phase: Running\n  podIP: \"{}\"\n", pod.primary());
            if let (Some(v4), Some(v6)) = (pod.ip, pod.ipv6) {
                let _ = writeln!(out, "  podIPs: [{{ip: {v4}}}, {{ip: \"{v6}\"}}]");
            }
            out.push_str("---\n");
        }
        out.push_str(&self.extra_yaml.lock().unwrap_or_else(|e| e.into_inner()));
        out
    }

    /// Writes the manifest atomically (agents never see half a file).
    pub fn write_manifest(&self) -> io::Result<()> {
        self.write_raw_manifest(&self.manifest())
    }

    /// Writes arbitrary text as the cluster file (e.g. broken YAML).
    pub fn write_raw_manifest(&self, text: &str) -> io::Result<()> {
        let tmp = self.dir.join("cluster.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifest_path())
    }

    /// Starts the agent of `node` and waits until it is ready.
    pub fn start_agent(&self, node: &str) -> io::Result<Agent> {
        let agent = self.spawn_agent(node, &[])?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts the agent of `node` with extra arguments, without waiting for readiness.
    pub fn spawn_agent(&self, node: &str, extra: &[&str]) -> io::Result<Agent> {
        self.spawn_agent_from(node, Source::Local(&self.manifest_path()), extra)
    }

    /// Starts the agent of `node` in cluster mode and waits until it is ready.
    pub fn start_kube_agent(&self, node: &str) -> io::Result<Agent> {
        let agent = self.spawn_kube_agent(node, &[])?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts the agent of `node` in cluster mode (no `--local`: the API server at
    /// `127.0.0.1:6443` of its node, see [`Cluster::mock_api`]), without waiting for readiness.
    pub fn spawn_kube_agent(&self, node: &str, extra: &[&str]) -> io::Result<Agent> {
        let kubeconfig = self.dir.join("kubeconfig");
        MockApi::write_kubeconfig(&kubeconfig)?;
        self.spawn_agent_from(node, Source::Kubernetes(&kubeconfig), extra)
    }

    /// Starts one long-lived process in every pod (in its netns and kubelet-style cgroup), as a
    /// pod's containers would be: what cluster mode finds pods' namespaces by. Stopped when the
    /// returned guard is dropped.
    pub fn start_pod_processes(&self) -> io::Result<PodProcesses> {
        let mut processes = PodProcesses(Vec::new());
        for pod in &self.pods {
            let mut sleep = Command::new("sleep");
            sleep.arg("600");
            processes.0.push(PodHandle { pod }.spawn(sleep)?);
        }
        Ok(processes)
    }

    /// Starts a mock Kubernetes API server reachable from every node at `127.0.0.1:6443`.
    pub fn mock_api(&self) -> io::Result<MockApi> {
        let netns: Vec<PathBuf> = self.nodes.iter().map(|n| sys::netns_path(&n.netns)).collect();
        MockApi::start(&netns)
    }

    /// Starts the agent of `node` with `read_only` paths (its CA directory, say) mounted
    /// read-only in a mount namespace of its own, as a pod's read-only volumes are.
    pub fn spawn_agent_read_only(
        &self,
        node: &str,
        extra: &[&str],
        read_only: &[PathBuf],
    ) -> io::Result<Agent> {
        let mounts = Container { read_only: read_only.to_vec(), ..Container::default() };
        self.spawn(node, Source::Local(&self.manifest_path()), extra, &mounts)
    }

    /// Starts the agent of `node` (with the cluster file) seeing the filesystem as `mounts`
    /// shape it, without waiting for readiness.
    pub fn spawn_agent_with(&self, node: &str, extra: &[&str], mounts: &Container) -> io::Result<Agent> {
        self.spawn(node, Source::Local(&self.manifest_path()), extra, mounts)
    }

    /// Starts the agent of `node` in cluster mode (see [`Cluster::spawn_kube_agent`]) shaped by
    /// `container`, without waiting for readiness.
    pub fn spawn_kube_agent_with(
        &self,
        node: &str,
        extra: &[&str],
        container: &Container,
    ) -> io::Result<Agent> {
        let kubeconfig = self.dir.join("kubeconfig");
        MockApi::write_kubeconfig(&kubeconfig)?;
        self.spawn(node, Source::Kubernetes(&kubeconfig), extra, container)
    }

    fn spawn_agent_from(&self, node: &str, source: Source<'_>, extra: &[&str]) -> io::Result<Agent> {
        self.spawn(node, source, extra, &Container::default())
    }

    fn spawn(&self, node: &str, source: Source<'_>, extra: &[&str], mounts: &Container) -> io::Result<Agent> {
        let node = self.node(node);
        let instance = self.instance(node.name());
        let mut pids = self.agent_pids.lock().unwrap_or_else(|e| e.into_inner());
        // One log per agent process: a restarted agent's log holds only what it did itself.
        let log = self.dir.join(format!("agent-{}-{}.log", node.name(), pids.len() + 1));
        let agent = Agent::spawn(
            &sys::netns_path(&node.node.netns),
            source,
            node.name(),
            &instance,
            &log,
            &self.ca_dir(),
            extra,
            mounts,
        )?;
        pids.push(agent.pid());
        Ok(agent)
    }

    /// Starts `ambit ca serve` in `node`'s network namespace (a node of its own, say), with the
    /// key material of `ca_dir`, the Kubernetes API at `127.0.0.1:6443` there (see
    /// [`Cluster::mock_api`]) and a serving certificate for the node's IP; handled like an agent
    /// process (readiness on 15021, logs, signals). Does not wait for readiness.
    pub fn spawn_ca(&self, node: &str, ca_dir: &Path, extra: &[&str]) -> io::Result<Agent> {
        let ip = self.node(node).ip().to_string();
        let dir = ca_dir.to_str().ok_or_else(|| io::Error::other("CA directory is not UTF-8"))?;
        let mut args = vec!["ca", "serve", "--ca-dir", dir, "--server-ips", &ip];
        args.extend_from_slice(extra);
        self.spawn_ca_with(node, &args, &Container::default())
    }

    /// Starts `ambit <args>` (the CA service) in `node`'s network namespace shaped by
    /// `container`, with the Kubernetes API of [`Cluster::mock_api`]; no readiness wait.
    pub fn spawn_ca_with(&self, node: &str, args: &[&str], container: &Container) -> io::Result<Agent> {
        let node = self.node(node);
        let kubeconfig = self.dir.join("kubeconfig");
        MockApi::write_kubeconfig(&kubeconfig)?;
        let mut pids = self.agent_pids.lock().unwrap_or_else(|e| e.into_inner());
        let log = self.dir.join(format!("agent-ca-{}-{}.log", node.name(), pids.len() + 1));
        let mut command = Command::new(sys::ambit_binary());
        command.args(args).env("KUBECONFIG", &kubeconfig);
        let ca = Agent::spawn_command(command, &sys::netns_path(&node.node.netns), &log, container)?;
        pids.push(ca.pid());
        Ok(ca)
    }

    /// Starts a packet capture (tcpdump) on the bridge every pod and node is attached to.
    pub fn capture(&self) -> io::Result<crate::Capture> {
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        crate::Capture::start(
            &sys::netns_path(&self.fabric),
            "br0",
            self.dir.join(format!("capture-{n}.pcap")),
        )
    }

    /// Starts a packet capture on interface `iface` inside a pod (e.g. its loopback, where the
    /// pod's traffic to itself goes).
    pub fn capture_in_pod(&self, pod: &str, iface: &str) -> io::Result<crate::Capture> {
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        crate::Capture::start(&self.pod(pod).netns_path(), iface, self.dir.join(format!("capture-{n}.pcap")))
    }

    /// The CA directory all agents of the cluster share (one trust domain).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The bpffs instance name of a node's agent.
    pub fn instance(&self, node: &str) -> String {
        // Pins live in /sys/fs/bpf/ambit/<instance>; the sweeper recognises the run in it.
        format!("{}-{node}", self.run.trim_start_matches("ambit-"))
    }

    /// Where a node's agent pins its kernel objects.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        Path::new(sys::BPF_DIR).join(self.instance(node))
    }

    /// The agent logs, for failure reports.
    pub fn agent_logs(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("agent-") && n.ends_with(".log"))
            })
            .collect();
        logs.sort();
        for path in logs {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                let _ = writeln!(out, "--- {} (last {} lines)", path.display(), tail.len());
                for line in tail.into_iter().rev() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.agent_logs());
        }
        for pid in self.agent_pids.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            // SAFETY: plain syscall; a pid that already exited is harmless here.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for pod in &self.pods {
            sys::remove_cgroup(&pod.cgroup);
        }
        sys::remove_cgroup(&self.cgroup);
        for name in self.netns.iter().rev() {
            let _ = sys::ip(&["netns", "del", name]);
        }
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(Path::new(sys::BPF_DIR).join(self.instance(&node.name)));
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The processes of [`Cluster::start_pod_processes`]; killed when dropped.
pub struct PodProcesses(Vec<Child>);

impl Drop for PodProcesses {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A node of a running cluster.
pub struct NodeHandle<'a> {
    cluster: &'a Cluster,
    node: &'a Node,
}

impl NodeHandle<'_> {
    /// Node name.
    pub fn name(&self) -> &str {
        &self.node.name
    }

    /// The node's network namespace (what `hostNetwork` pods of the node share).
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.node.netns)
    }

    /// The node's address on the cluster network.
    pub fn ip(&self) -> IpAddr {
        self.node.ip.into()
    }

    /// The node's IPv6 address on the cluster network.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.node.ipv6
    }

    /// Runs `ambit ARGS` on this node (in its network namespace, where the agent's admin API
    /// is), with a time limit.
    pub fn ambit(&self, args: &[&str]) -> io::Result<Output> {
        let mut command = Command::new(sys::ambit_binary());
        command.args(args);
        self.command_output(command, Duration::from_secs(20))
    }

    /// Runs a command in the node's network namespace and collects its output.
    pub fn command_output(&self, mut command: Command, limit: Duration) -> io::Result<Output> {
        let path = sys::netns_path(&self.node.netns);
        // SAFETY: the closure only makes async-signal-safe syscalls.
        unsafe {
            command.pre_exec(move || sys::enter_netns(&path));
        }
        crate::agent::output_with_timeout(command, limit)
    }

    /// Runs `f` inside the node's network namespace (for HTTP to its agent).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        sys::in_netns(&sys::netns_path(&self.node.netns), f)
    }

    /// Starts an echo server on `port` in the node's own network namespace (a host-network
    /// service).
    pub fn echo_server(&self, port: u16) -> io::Result<EchoServer> {
        EchoServer::start(self.in_netns(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))??)
    }

    /// Connects from the node's own network namespace, as a host-network process (the kubelet).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.in_netns(|| TcpStream::connect_timeout(&addr, timeout))?
    }

    /// Forwards TCP `port` of the node's address to `to`, as kube-proxy does for a NodePort:
    /// DNAT, and masquerade so that the target sees the node's address as the source.
    pub fn node_port(&self, port: u16, to: SocketAddr) -> io::Result<()> {
        let rules = format!(
            "add table ip nodeport; \
             add chain ip nodeport pre {{ type nat hook prerouting priority -100; }}; \
             add rule ip nodeport pre tcp dport {port} dnat to {to}; \
             add chain ip nodeport post {{ type nat hook postrouting priority 100; }}; \
             add rule ip nodeport post ip daddr {} tcp dport {} masquerade",
            to.ip(),
            to.port()
        );
        let mut sysctl = Command::new("sysctl");
        sysctl.args(["-qw", "net.ipv4.ip_forward=1"]);
        let mut nft = Command::new("nft");
        nft.arg(rules);
        for command in [sysctl, nft] {
            let out = self.command_output(command, Duration::from_secs(10))?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "NodePort setup: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        Ok(())
    }

    /// The run's cluster.
    pub fn cluster(&self) -> &Cluster {
        self.cluster
    }
}

/// A pod of a running cluster.
pub struct PodHandle<'a> {
    pod: &'a Pod,
}

impl PodHandle<'_> {
    /// Pod name.
    pub fn name(&self) -> &str {
        &self.pod.name
    }

    /// The pod's IP.
    pub fn ip(&self) -> IpAddr {
        self.pod.primary()
    }

    /// The pod's IPv6 address, for a dual-stack pod.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.pod.ipv6
    }

    /// `ip:port` of the pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(), port)
    }

    /// The pod's UID (UUID-shaped, as Kubernetes gives them; its cgroup is named after it).
    pub fn uid(&self) -> &str {
        &self.pod.uid
    }

    /// The path of the pod's network namespace.
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.pod.netns)
    }

    /// Runs `f` on a thread inside the pod's network namespace.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        sys::in_netns(&self.netns_path(), f)
    }

    /// Opens a TCP connection from inside the pod, as an application there would.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.in_netns(|| TcpStream::connect_timeout(&addr, timeout))?
    }

    /// Connects to an echo server at `addr` (5 s at most), sends a few bytes and reads them back:
    /// `Ok` when they came back, else how it failed (refused, reset, timed out...).
    pub fn attempt(&self, addr: SocketAddr) -> Result<(), io::ErrorKind> {
        let mut stream = self.connect(addr, Duration::from_secs(5)).map_err(|e| e.kind())?;
        match crate::echo_roundtrip(&mut stream, b"anyone there?") {
            Ok(back) if back == b"anyone there?" => Ok(()),
            Ok(_) => Err(io::ErrorKind::InvalidData),
            Err(e) => Err(e.kind()),
        }
    }

    /// Listens on `0.0.0.0:port` inside the pod.
    pub fn listen(&self, port: u16) -> io::Result<TcpListener> {
        self.in_netns(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
    }

    /// Starts an echo server on `[::]:port` (IPv6 and IPv4) inside the pod.
    pub fn echo_server_v6(&self, port: u16) -> io::Result<EchoServer> {
        EchoServer::start(self.in_netns(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))??)
    }

    /// Starts an echo server on `port` inside the pod.
    pub fn echo_server(&self, port: u16) -> io::Result<EchoServer> {
        EchoServer::start(self.listen(port)?)
    }

    /// Starts a [`crate::SourceServer`] on `port` inside the pod.
    pub fn source_server(&self, port: u16, bytes: Option<usize>) -> io::Result<crate::SourceServer> {
        crate::SourceServer::start(self.listen(port)?, bytes)
    }

    /// Takes the pod's network interface down or up: down, the pod is silently gone from the
    /// network (no reset, no answer), as a node that vanished.
    pub fn set_link(&self, up: bool) -> io::Result<()> {
        let netns = self.netns_path();
        let name = netns.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        sys::ip(&["-n", &name, "link", "set", "eth0", if up { "up" } else { "down" }])
    }

    /// Sets a network sysctl of the pod's namespace, e.g. `ipv4/tcp_tw_reuse`.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = Path::new("/proc/sys/net").join(key);
        self.in_netns(|| std::fs::write(&path, value))?
    }

    /// Runs a command inside the pod to completion (killed after `limit`) and collects its output.
    pub fn command_output(&self, mut command: Command, limit: Duration) -> io::Result<Output> {
        let path = self.netns_path();
        let procs = self.pod.cgroup.join("cgroup.procs");
        // SAFETY: the closure only makes simple syscalls (open/write/setns).
        unsafe {
            command.pre_exec(move || {
                std::fs::write(&procs, b"0")?;
                sys::enter_netns(&path)
            });
        }
        crate::agent::output_with_timeout(command, limit)
    }

    /// Spawns a command inside the pod: its network namespace and its cgroup.
    pub fn spawn(&self, mut command: Command) -> io::Result<Child> {
        let path = self.netns_path();
        let procs = self.pod.cgroup.join("cgroup.procs");
        // SAFETY: the closure only makes async-signal-safe syscalls (open/write/setns/prctl).
        unsafe {
            command.pre_exec(move || {
                std::fs::write(&procs, b"0")?;
                sys::enter_netns(&path)?;
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        command.spawn()
    }
}
