//! ambit: a sidecar-free service mesh node agent.
//!
//! One agent per node loads eBPF programs that steer the TCP traffic of enrolled pods into this
//! process, which forwards it (and, with identities, wraps it in mutual TLS). Modules, one per
//! domain noun:
//!
//! - [`discovery`]: the cluster as the agent knows it (local file or Kubernetes API);
//! - [`bpf`]: the kernel programs and their maps;
//! - [`identity`]: SPIFFE IDs, the embedded CA, certificates, the CA client; [`tls`]: rustls
//!   for HBONE; [`authority`]: `ambit ca serve`, the mesh CA as a service;
//! - [`redirect`]: enrolling pods (network namespaces, listeners, map entries);
//! - [`policy`]: Istio PeerAuthentication compiled for per-connection decisions;
//! - [`proxy`]: the outbound and inbound proxies (plaintext and HBONE);
//! - [`telemetry`]: logs and connection records;
//! - [`admin`]: the HTTP endpoints (admin API, readiness, metrics); `listener`: accepting
//!   connections under limits, for all of them and the pods' listeners;
//! - [`cli`]: the command line; [`agent`]: `ambit agent` itself.

pub mod admin;
pub mod agent;
pub mod authority;
pub mod bpf;
mod capability;
pub mod cli;
pub mod discovery;
pub mod identity;
mod listener;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod telemetry;
pub mod tls;
