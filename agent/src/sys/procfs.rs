//! Finding a pod's network namespace from procfs, as the agent must in a cluster (it runs with
//! `hostPID`): pod UID → the pod's cgroup → a process in it → `/proc/<pid>/ns/net`.
//!
//! Kubelet names pod cgroups after the pod UID, in one of two styles: the systemd driver's
//! `kubepods-burstable-pod<uid with _>.slice` and the cgroupfs driver's `pod<uid>`; with cgroup v1
//! every hierarchy line of `/proc/<pid>/cgroup` carries the path, with v2 the single `0::` line.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// The UID of the pod a cgroup path belongs to, in its canonical form (with dashes).
pub fn pod_uid_of_cgroup(path: &str) -> Option<String> {
    path.split('/').find_map(|segment| {
        let candidate = if let Some(rest) = segment.strip_suffix(".slice") {
            // systemd: kubepods-pod<uid>.slice, kubepods-burstable-pod<uid>.slice
            rest.rsplit_once("-pod").map(|(_, uid)| uid)?
        } else {
            segment.strip_prefix("pod")?
        };
        let uid = candidate.replace('_', "-");
        is_uid(&uid).then_some(uid)
    })
}

/// A Kubernetes UID: 36 characters, hex digits and dashes in UUID positions.
fn is_uid(text: &str) -> bool {
    text.len() == 36
        && text
            .char_indices()
            .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() })
}

/// Pod UID → a process of the pod, for every pod with a process on this host.
pub fn pod_processes(proc_root: &Path) -> HashMap<String, u32> {
    let mut found = HashMap::new();
    let Ok(processes) = ::procfs::process::all_processes_with_root(proc_root) else { return found };
    // Processes come and go while we read: a vanished one is simply skipped.
    for process in processes.flatten() {
        if let (Some(uid), Ok(pid)) = (pod_of(&process), u32::try_from(process.pid())) {
            found.entry(uid).or_insert(pid);
        }
    }
    found
}

/// The UID of the pod whose cgroup `process` is in, from any of its hierarchies.
fn pod_of(process: &::procfs::process::Process) -> Option<String> {
    process.cgroups().ok()?.into_iter().find_map(|cgroup| pod_uid_of_cgroup(&cgroup.pathname))
}

/// The network namespace file of the pod with `uid`, if a process of it runs here.
pub fn netns_of_pod(proc_root: &Path, processes: &HashMap<String, u32>, uid: &str) -> Option<PathBuf> {
    let pid = processes.get(&uid.replace('_', "-"))?;
    Some(proc_root.join(pid.to_string()).join("ns/net"))
}

/// Whether the process behind a netns path of [`netns_of_pod`] is (still) in a cgroup of the pod
/// `uid`. Called after the namespace is open: a pid reused since the walk belongs to another
/// process, whose namespace must not be taken for the pod's.
pub fn still_in_pod(netns_path: &Path, uid: &str) -> bool {
    let Some(process) = netns_path.parent().and_then(Path::parent) else { return false };
    let Ok(process) = ::procfs::process::Process::new_with_root(process.to_path_buf()) else { return false };
    pod_of(&process) == Some(uid.replace('_', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f2a9c1e-5b6d-4e8f-9a0b-1c2d3e4f5a6b";

    #[test]
    fn both_cgroup_drivers_and_versions() {
        for line in [
            // cgroup v2, systemd driver
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f2a9c1e_5b6d_4e8f_9a0b_1c2d3e4f5a6b.slice/cri-containerd-abc.scope",
            // guaranteed QoS, systemd
            "0::/kubepods.slice/kubepods-pod3f2a9c1e_5b6d_4e8f_9a0b_1c2d3e4f5a6b.slice/cri-containerd-abc.scope",
            // cgroup v1, cgroupfs driver
            "4:memory:/kubepods/burstable/pod3f2a9c1e-5b6d-4e8f-9a0b-1c2d3e4f5a6b/0123456789abcdef",
            // cgroup v2, cgroupfs driver, besteffort
            "0::/kubepods/besteffort/pod3f2a9c1e-5b6d-4e8f-9a0b-1c2d3e4f5a6b/0123456789abcdef",
        ] {
            let path = line.splitn(3, ':').nth(2).expect("path");
            assert_eq!(pod_uid_of_cgroup(path).as_deref(), Some(UID), "{line}");
        }
        for line in [
            "0::/system.slice/containerd.service",
            "0::/user.slice/user-0.slice",
            "0::/kubepods/burstable/podnotauid",
        ] {
            let path = line.splitn(3, ':').nth(2).expect("path");
            assert_eq!(pod_uid_of_cgroup(path), None, "{line}");
        }
    }

    #[test]
    fn this_process_is_in_no_pod() {
        let processes = pod_processes(Path::new("/proc"));
        assert!(!processes.values().any(|pid| *pid == std::process::id()));
    }
}
