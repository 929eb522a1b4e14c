//! The Linux capabilities the agent needs, what each is for, and errors that name the one
//! missing. The DaemonSet drops every capability and adds exactly these; a container test
//! drops each in turn and shows the agent fails without it.

use std::io;

use tracing::{error, info};

/// A capability the agent needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Capability {
    /// `SO_MARK` on the agent's sockets (how the kernel programs tell them from the apps'),
    /// attaching `sk_lookup` to a pod's network namespace.
    NetAdmin,
    /// Opening another process's `/proc/<pid>/ns/net` (the pods' processes).
    SysPtrace,
    /// `setns` into a pod's network namespace; loading eBPF programs (it includes CAP_BPF and
    /// CAP_PERFMON); mounting bpffs or tracefs where the node has none.
    SysAdmin,
}

/// All of them, in the order the manifest lists them.
pub(crate) const NEEDED: [Capability; 3] =
    [Capability::NetAdmin, Capability::SysAdmin, Capability::SysPtrace];

impl Capability {
    /// Its number in the kernel's capability sets.
    fn bit(self) -> u32 {
        match self {
            Self::NetAdmin => 12,
            Self::SysPtrace => 19,
            Self::SysAdmin => 21,
        }
    }

    /// `CAP_…`, as the kernel and `capabilities(7)` name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::NetAdmin => "CAP_NET_ADMIN",
            Self::SysPtrace => "CAP_SYS_PTRACE",
            Self::SysAdmin => "CAP_SYS_ADMIN",
        }
    }

    fn purpose(self) -> &'static str {
        match self {
            Self::NetAdmin => "marking the agent's sockets and attaching to pods' network namespaces",
            Self::SysPtrace => "opening the network namespaces of pods' processes",
            Self::SysAdmin => "entering pods' network namespaces and loading eBPF programs",
        }
    }

    /// Whether this process holds it (in its effective set); `true` when that cannot be read,
    /// so that an unreadable `/proc` never invents a cause.
    pub(crate) fn held(self) -> bool {
        effective().is_none_or(|set| set & (1 << self.bit()) != 0)
    }
}

/// The effective set (`CapEff` of `/proc/self/status`).
fn effective() -> Option<u64> {
    procfs::process::Process::myself().and_then(|me| me.status()).ok().map(|status| status.capeff)
}

/// Logs each needed capability this process lacks, with what will fail without it.
pub(crate) fn report() {
    let missing: Vec<Capability> = NEEDED.into_iter().filter(|c| !c.held()).collect();
    if missing.is_empty() {
        info!(capabilities = ?NEEDED.map(Capability::name), "capabilities held");
    }
    for capability in missing {
        error!(
            capability = capability.name(),
            "missing capability {}: {} will fail, and the pods stay uncaptured (their traffic refused)",
            capability.name(),
            capability.purpose()
        );
    }
}

/// Whether `error` (or one it was caused by) is the kernel refusing the operation (`EPERM`,
/// `EACCES`) while this process lacks `capability`.
pub(crate) fn lacking(error: &(dyn std::error::Error + 'static), capability: Capability) -> bool {
    let refused = std::iter::successors(Some(error), |e| e.source())
        .filter_map(|e| e.downcast_ref::<io::Error>())
        .any(|e| matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)));
    refused && !capability.held()
}

/// `error`, naming `capability` when the kernel refused the operation (`EPERM`, `EACCES`) and
/// this process lacks it; unchanged otherwise.
pub(crate) fn explain(error: io::Error, capability: Capability) -> io::Error {
    if lacking(&error, capability) {
        io::Error::new(error.kind(), format!("{error} (needs {}, which the agent lacks)", capability.name()))
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_capability_only_when_it_is_the_cause() {
        let eperm = || io::Error::from_raw_os_error(libc::EPERM);
        // Whatever this process holds, an error that is not a refusal is never blamed on one.
        let other = explain(io::Error::from_raw_os_error(libc::ENOENT), Capability::SysAdmin);
        assert!(!other.to_string().contains("CAP_"), "{other}");
        for capability in NEEDED {
            let text = explain(eperm(), capability).to_string();
            assert_eq!(text.contains(capability.name()), !capability.held(), "{text}");
        }
        assert!(effective().is_some(), "CapEff is readable");
    }
}
