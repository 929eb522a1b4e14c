//! A harness for simulated clusters on one Linux host, for ambit's end-to-end tests, demo and
//! bench.
//!
//! A [`Cluster`] is made of real kernel objects: a "fabric" network namespace holding a bridge,
//! one network namespace per node (where that node's agent runs, as a DaemonSet pod with
//! `hostNetwork` would) and one per pod, each attached to the bridge with a veth pair, and one
//! cgroup v2 per pod. Agents are the real `ambit` binary. Everything is named after the run
//! (`ambit-t<pid>x<n>-...`) and removed when the [`Cluster`] is dropped, even when a test
//! panics; leftovers of runs whose process died are swept when the next run starts.

mod agent;
mod apps;
mod capture;
mod cluster;
mod kubeapi;
pub mod manifest;
pub mod podman;
mod sys;

pub use agent::{Agent, AgentOutput, Container};
pub use apps::{EchoServer, SourceServer, echo_roundtrip, pattern};
pub use capture::{Capture, contains};
pub use cluster::{
    CgroupDriver, Cluster, ClusterBuilder, Family, NodeHandle, PodHandle, PodProcesses, PodSpec,
};
pub use kubeapi::MockApi;
pub use sys::ambit_binary;

/// Polls `done` every 50 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(limit: std::time::Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Connects to `addr` from inside the network namespace at `netns` (a pod's, from
/// [`PodHandle::netns_path`]): for threads that outlive a borrow of the cluster.
pub fn connect_in(
    netns: &std::path::Path,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    sys::in_netns(netns, || std::net::TcpStream::connect_timeout(&addr, timeout))?
}

/// Cluster-file YAML: STRICT mTLS in `namespace`, and an AuthorizationPolicy named `app` there
/// that lets only `principal` (`cluster.local/ns/NS/sa/SA`) into the pods labelled `app=APP`.
pub fn strict_allowing_only(namespace: &str, app: &str, principal: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {namespace}}}\n\
         spec: {{mtls: {{mode: STRICT}}}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {app}, namespace: {namespace}}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  \
         action: ALLOW\n  rules:\n  - from: [{{source: {{principals: [{principal}]}}}}]\n"
    )
}
