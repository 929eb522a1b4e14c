//! ambit: a sidecar-free service mesh node agent.
//!
//! One agent per node loads eBPF programs that steer the TCP traffic of enrolled pods into this
//! process, which forwards it (and, with identities, wraps it in mutual TLS). Modules, one per
//! domain noun:
//!
//! - [`schema`]: the objects read and reported, as data; [`state`]: the cluster snapshot built
//!   from them; [`discovery`]: the sources that feed it (local file or Kubernetes API);
//! - [`bpf`]: the kernel programs and their maps;
//! - [`identity`]: SPIFFE IDs, the embedded CA, certificates, the CA client; [`tls`]: rustls
//!   for HBONE; [`authority`]: `ambit ca serve`, the mesh CA as a service;
//! - [`redirect`]: enrolling pods (network namespaces, listeners, map entries);
//! - [`policy`]: Istio PeerAuthentication compiled for per-connection decisions;
//! - [`proxy`]: the outbound and inbound proxies (plaintext and HBONE);
//! - [`telemetry`]: logs and connection records;
//! - [`admin`]: the HTTP endpoints (admin API, readiness, metrics); `listener`: accepting
//!   connections under limits, for all of them and the pods' listeners;
//! - [`cli`]: the command line; [`agent`]: `ambit agent` itself;
//! - [`sys`]: the operating system below (namespaces, `/proc`, capabilities, raw system calls).

#![deny(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod authority;
pub mod bpf;
pub mod check;
pub mod cli;
pub mod discovery;
pub mod identity;
mod listener;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod schema;
pub mod state;
#[allow(unsafe_code, reason = "the system calls no crate wraps, each with its SAFETY comment")]
pub mod sys;
pub mod telemetry;
pub mod tls;

/// Entry points for the fuzz targets of `fuzz/` into parsers that are not public: built only
/// with `--cfg fuzzing`, which `cargo fuzz` sets.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use std::net::SocketAddr;

    /// A CONNECT authority, checked against the address its tunnel arrived on.
    pub fn connect_authority(authority: &str, local: SocketAddr) -> Result<SocketAddr, String> {
        crate::proxy::inbound::connect_authority(authority, local)
    }

    /// A query string component of the admin API.
    pub fn percent_decode(text: &str) -> String {
        crate::admin::percent_decode(text)
    }

    /// A SEC1 EC key wrapped into PKCS#8 (the CA's key file reader).
    pub fn sec1_to_pkcs8(sec1: &[u8]) -> Option<Vec<u8>> {
        crate::identity::ca::der::sec1_to_pkcs8(sec1)
    }
}

/// An error with all its causes, `outer: inner: innermost`, for messages that must say why.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // thiserror messages often embed their source already; don't say it twice.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
