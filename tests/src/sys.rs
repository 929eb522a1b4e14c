//! Small system helpers: running `ip`, entering namespaces, cgroups, and sweeping what dead
//! runs left behind.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

/// Prefix of every kernel object a run creates.
pub(crate) const PREFIX: &str = "ambit-t";
/// Where bpffs state of agents lives.
pub(crate) const BPF_DIR: &str = "/sys/fs/bpf/ambit";

/// Runs `ip ARGS...`, failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The path of a named network namespace.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// Moves the calling thread into the network namespace at `path`.
pub(crate) fn enter_netns(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: a valid namespace fd; only this thread's network namespace changes.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a new mount namespace of the calling process: binds each `(source, target)` of `binds`
/// (read-only), and covers each of `hidden` with an empty read-only tmpfs. For use between fork
/// and exec (only syscalls).
pub(crate) fn private_mounts(
    binds: &[(std::ffi::CString, std::ffi::CString)],
    hidden: &[std::ffi::CString],
) -> io::Result<()> {
    let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
    // SAFETY: plain syscalls with valid NUL-terminated strings or nulls.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Changes stay in this namespace.
        check(libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        for (source, target) in binds {
            check(libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            ))?;
        }
        for path in hidden {
            check(libc::mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                c"size=4k".as_ptr().cast(),
            ))?;
        }
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside the network namespace at `path`. Sockets created by `f`
/// belong to that namespace for their whole life, wherever they are used afterwards.
pub(crate) fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(path)?;
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("thread in netns panicked"))?
    })
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub(crate) fn cgroup2_root() -> io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fields: Vec<&str> = pre.split_whitespace().collect();
            let mount_point = fields.get(4)?;
            (post.split_whitespace().next()? == "cgroup2" && fields.get(3) == Some(&"/"))
                .then(|| PathBuf::from(mount_point))
        })
        .collect();
    found.sort_by_key(|p| p.components().count());
    found.into_iter().next().ok_or_else(|| io::Error::other("no cgroup v2 mount"))
}

/// Removes a cgroup after killing everything in it.
pub(crate) fn remove_cgroup(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether a process id is alive.
pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The pid in a run id `t<pid>x<n>`.
pub(crate) fn run_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    rest.split('x').next()?.parse().ok()
}

/// Removes namespaces, cgroups and pins left by runs whose process is gone (a test killed by a
/// timeout cannot clean up after itself).
pub(crate) fn sweep_dead_runs() {
    let dead = |name: &str| run_owner(name).is_some_and(|pid| !pid_alive(pid));
    if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    if let Ok(root) = cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            if dead(&entry.file_name().to_string_lossy()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(BPF_DIR) {
        for entry in entries.flatten() {
            let name = format!("ambit-{}", entry.file_name().to_string_lossy());
            if dead(&name) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The `ambit` binary under test: `$AMBIT_BIN`, else `target/<profile>/ambit` next to the
/// running test executable (`target/<profile>/deps/...`).
pub fn ambit_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AMBIT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("ambit")
}

/// Mounts bpffs at `/sys/fs/bpf` on the host unless it is there, as systemd does on a node:
/// agents in mount namespaces of their own (containers, read-only volumes) see it, and refuse
/// to mount one themselves.
pub(crate) fn node_bpffs() -> io::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if !mounted {
        let out = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "mount -t bpf bpf /sys/fs/bpf: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}
