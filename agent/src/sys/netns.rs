//! Network namespaces: open a pod's namespace and run short, synchronous pieces of code inside
//! it (creating sockets), always returning to the agent's own namespace afterwards.
//!
//! A socket belongs to the namespace it was created in for its whole life, so the agent only
//! needs to be inside a pod's namespace for the `socket()` call itself. A thread may switch its
//! own network namespace with `setns`, so this is done on whichever thread asks, for a few
//! microseconds, with no await point while inside.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::OnceLock,
};

use super::capability::{self, Capability};

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    inode: (u64, u64),
}

static HOST: OnceLock<Netns> = OnceLock::new();
/// The network namespace of PID 1 (the node's, when the agent runs with `hostPID`), if readable.
static INIT: OnceLock<Option<(u64, u64)>> = OnceLock::new();

impl Netns {
    /// Opens the namespace at `path` (`/var/run/netns/NAME`, `/proc/PID/ns/net`, ...).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| capability::explain(e, Capability::SysPtrace))?;
        let meta = file.metadata()?;
        // A namespace file is on nsfs; anything else means a wrong path or a stale bind mount.
        if !is_nsfs(&file) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a network namespace (no nsfs file at that path)",
            ));
        }
        Ok(Self { file, path: path.to_owned(), inode: (meta.dev(), meta.ino()) })
    }

    /// Records the calling thread's namespace as the agent's own; every [`Netns::run`] returns
    /// there. Call once at start, before any runtime thread is created.
    pub fn init_host() -> io::Result<()> {
        let host = Self::open(Path::new("/proc/thread-self/ns/net"))?;
        let _ = HOST.set(host);
        let _ = INIT.set(Self::open(Path::new("/proc/1/ns/net")).ok().map(|ns| ns.id()));
        Ok(())
    }

    /// Why this namespace can never be a pod's: it is the agent's own (the node's, for a
    /// host-network agent) or PID 1's. Enrolling either would capture the node's own traffic.
    pub fn not_a_pod(&self) -> Option<&'static str> {
        // The initial network namespace has this fixed inode on current kernels, below the
        // range dynamic namespaces are numbered from: also recognised when PID 1's namespace
        // cannot be read (no hostPID, or a sandbox that hides PID 1).
        const INIT_NET_INODE: u64 = 0xEFFF_FFF9;
        if HOST.get().is_some_and(|host| host.id() == self.id()) {
            Some("it is the agent's own network namespace")
        } else if INIT.get().copied().flatten() == Some(self.id()) || self.inode.1 == INIT_NET_INODE {
            Some("it is the host's network namespace (that of PID 1)")
        } else {
            None
        }
    }

    /// Where it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the namespace: equal for two handles of the same namespace, new when
    /// a pod is re-created with the same name.
    pub fn id(&self) -> (u64, u64) {
        self.inode
    }

    /// Runs `f` with the calling thread inside this namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let host = HOST.get().ok_or_else(|| io::Error::other("host network namespace not recorded"))?;
        setns(self.file.as_fd())?;
        let guard = ReturnHome(host);
        let out = f();
        drop(guard);
        Ok(out)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Returns the thread to the agent's namespace, even when the closure panics.
struct ReturnHome(&'static Netns);

impl Drop for ReturnHome {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.file.as_fd()) {
            // A runtime thread stuck in a pod's namespace would open later sockets in the wrong
            // place; there is no safe way to continue.
            eprintln!("ambit: cannot return to the host network namespace: {e}; aborting");
            std::process::abort();
        }
    }
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // CLONE_NEWNET only changes this thread's network namespace.
    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|errno| capability::explain(errno.into(), Capability::SysAdmin))
}

fn is_nsfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file).is_ok_and(|stat| stat.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_a_path_that_is_not_a_namespace() {
        let err = Netns::open(Path::new("/etc/hostname")).expect_err("a plain file");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = Netns::open(Path::new("/nonexistent/netns")).expect_err("no such file");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    #[ignore = "needs root (setns); the privileged tier runs it"]
    fn own_namespace_opens_and_runs() {
        Netns::init_host().expect("host netns");
        let ns = Netns::open(Path::new("/proc/self/ns/net")).expect("own netns");
        assert_eq!(ns.run(|| 7).expect("run"), 7);
    }

    /// The paths a hostile pod spec would name: the agent's own namespace, PID 1's, by any of
    /// their procfs names. (Checked here, without enrolling them end to end: a regression would
    /// capture the test machine's own traffic.)
    #[test]
    #[ignore = "needs root (setns); the privileged tier runs it"]
    fn the_agents_and_the_hosts_namespaces_are_never_a_pod() {
        Netns::init_host().expect("host netns");
        for path in ["/proc/self/ns/net", "/proc/thread-self/ns/net", "/proc/1/ns/net"] {
            // PID 1's namespace may be unreadable (a sandbox hiding PID 1): then it cannot be
            // named by a pod spec either.
            let Ok(ns) = Netns::open(Path::new(path)) else { continue };
            assert!(ns.not_a_pod().is_some(), "{path} must be refused");
        }
        let own = format!("/proc/{}/ns/net", std::process::id());
        assert!(Netns::open(Path::new(&own)).expect("own pid").not_a_pod().is_some());
        // The control: a namespace of its own is a pod's.
        let pod = std::thread::spawn(|| {
            // Only this new thread's network namespace changes.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            Netns::open(Path::new("/proc/thread-self/ns/net")).expect("new netns").not_a_pod()
        })
        .join()
        .expect("thread");
        assert_eq!(pod, None);
    }
}
