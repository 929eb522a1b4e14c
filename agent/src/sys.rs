//! The operating system below the agent: network namespaces, `/proc`, capabilities and the few
//! system calls no crate wraps. Every `unsafe` block of the agent outside `bpf::sys` (the
//! `bpf(2)` commands) and the flow ring buffer lives here, each with the reason it is sound.

pub mod capability;
pub mod netns;
pub mod procfs;

use std::{io, os::fd::AsRawFd, path::Path, time::SystemTime};

/// The netns cookie (`SO_NETNS_COOKIE`) of the namespace a socket lives in.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and an out-buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(io::Error::last_os_error()) }
}

/// Bytes written to a TCP socket and not yet acknowledged by the peer (`SIOCOUTQ`); 0 when
/// the socket cannot say.
pub fn unacknowledged(socket: &impl AsRawFd) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: a valid socket fd and an out-pointer of the size the ioctl writes.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 { queued.max(0) as usize } else { 0 }
}

/// Gives the memory freed after a large read (a full list, a big cluster file) back to the
/// system: its transient JSON and YAML trees would otherwise stay in the allocator's arenas
/// and count in the agent's RSS for its whole life.
pub(crate) fn release_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The magic number of the file system `path` is on (`statfs`'s `f_type`).
pub(crate) fn fs_magic(path: &Path) -> Option<i64> {
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between libcs")]
    nix::sys::statfs::statfs(path).ok().map(|stat| stat.filesystem_type().0 as i64)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
