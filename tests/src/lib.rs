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
mod sys;

pub use agent::{Agent, AgentOutput};
pub use apps::{EchoServer, SinkServer, echo_roundtrip};
pub use capture::{Capture, contains};
pub use cluster::{CgroupDriver, Cluster, ClusterBuilder, NodeHandle, PodHandle, PodSpec};
pub use kubeapi::MockApi;
pub use sys::ambit_binary;
