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
        fd::{AsFd, AsRawFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    inode: (u64, u64),
}

static HOST: OnceLock<Netns> = OnceLock::new();

impl Netns {
    /// Opens the namespace at `path` (`/var/run/netns/NAME`, `/proc/PID/ns/net`, ...).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
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
        Ok(())
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
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's network namespace.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn is_nsfs(file: &File) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    // SAFETY: statfs is plain old data; zeroed is a valid initial value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and out-pointer.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) };
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between libcs")]
    let magic = stat.f_type as i64;
    rc == 0 && magic == NSFS_MAGIC
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
    fn own_namespace_opens_and_runs() {
        Netns::init_host().expect("host netns");
        let ns = Netns::open(Path::new("/proc/self/ns/net")).expect("own netns");
        assert_eq!(ns.run(|| 7).expect("run"), 7);
    }
}
