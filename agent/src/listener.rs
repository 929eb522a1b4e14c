//! Accepting connections under limits, for every server the agent runs (admin, readiness,
//! metrics, and the pods' listeners).
//!
//! - A listener holds at most so many connections, and so many from one peer address; one
//!   over the limit is reset at once (it costs no descriptor beyond the moment of the accept).
//! - At the open-files limit `accept` fails with `EMFILE` while the connection waits in the
//!   backlog, and its client would hang until its own timeout. The agent keeps one spare
//!   descriptor: it gives it up to accept and reset that connection, then takes it back, so
//!   the client fails fast.
//! - Accept errors back off (10 ms doubling to 1 s) and are logged once per burst, with how
//!   many there were, instead of once per attempt.

use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// The shortest and the longest pause after a failed accept.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// A burst of failures is logged once per this interval.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How many connections a listener holds at once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// In all.
    pub(crate) open: usize,
    /// From one peer address.
    pub(crate) per_peer: usize,
    /// Descriptors to leave free below the open-files limit (a quarter of the limit at most):
    /// a connection whose descriptor lands in that reserve is refused. The kernel hands out the lowest free descriptor, so
    /// descriptor N means at least N are in use. Data-plane listeners keep a reserve, so that
    /// a flood of them never starves readiness, metrics, the admin API or the agent itself.
    pub(crate) keep_free: u64,
}

/// The connections one listener holds, by peer address.
#[derive(Debug)]
pub(crate) struct Admission {
    what: &'static str,
    limits: Limits,
    held: Arc<Mutex<Held>>,
}

#[derive(Debug, Default)]
struct Held {
    open: usize,
    by_peer: HashMap<IpAddr, usize>,
    refused: u64,
    last_log: Option<Instant>,
}

/// A connection's place under its listener's limits, given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    held: Arc<Mutex<Held>>,
    peer: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.open = held.open.saturating_sub(1);
        if let Some(n) = held.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                held.by_peer.remove(&self.peer);
            }
        }
    }
}

impl Admission {
    /// Limits for the listener named `what` in logs.
    pub(crate) fn new(what: &'static str, limits: Limits) -> Self {
        Self { what, limits, held: Arc::default() }
    }

    /// A place for a connection from `peer` on descriptor `fd`, unless a limit is reached.
    fn admit(&self, peer: IpAddr, fd: u64) -> Option<Permit> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let from_peer = held.by_peer.get(&peer).copied().unwrap_or(0);
        let reserve = in_reserve(fd, self.limits.keep_free);
        if held.open >= self.limits.open || from_peer >= self.limits.per_peer || reserve {
            held.refused += 1;
            let due = held.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY);
            if due {
                warn!(
                    listener = self.what,
                    %peer,
                    open = held.open,
                    from_peer,
                    descriptor = fd,
                    limit = self.limits.open,
                    limit_per_peer = self.limits.per_peer,
                    refused_total = held.refused,
                    "connection refused: over the listener's limit"
                );
                held.last_log = Some(Instant::now());
            }
            return None;
        }
        held.open += 1;
        *held.by_peer.entry(peer).or_insert(0) += 1;
        Some(Permit { held: self.held.clone(), peer })
    }

    /// Connections held now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).open
    }
}

/// Whether descriptor `fd` lies in the last `keep_free` below the open-files limit (a quarter
/// of the limit at most, so that a low limit still leaves the data plane most of it). The
/// kernel hands out the lowest free descriptor: a new one numbered N means N are in use.
pub(crate) fn in_reserve(fd: u64, keep_free: u64) -> bool {
    let limit = open_files_limit();
    let keep_free = keep_free.min(limit / 4);
    keep_free > 0 && fd.saturating_add(keep_free) >= limit
}

/// The soft limit on open files (`RLIMIT_NOFILE`). An operator may change it while the agent
/// runs, so it is read again when the last reading is older than `LIMIT_TTL`: not once per
/// accepted connection (a system call each).
fn open_files_limit() -> u64 {
    const LIMIT_TTL: Duration = Duration::from_secs(1);
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    static CACHED: AtomicU64 = AtomicU64::new(0);
    /// When `CACHED` was read, in milliseconds since `START` plus one (0: never).
    static READ_AT: AtomicU64 = AtomicU64::new(0);
    let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let read_at = READ_AT.load(Ordering::Relaxed);
    if read_at != 0 && now.saturating_sub(read_at) < LIMIT_TTL.as_millis() as u64 {
        return CACHED.load(Ordering::Relaxed);
    }
    let value = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft);
    CACHED.store(value, Ordering::Relaxed);
    READ_AT.store(now, Ordering::Relaxed);
    value
}

/// The spare descriptor given up at the open-files limit.
static SPARE: Mutex<Option<File>> = Mutex::new(None);

/// Takes the spare descriptor now, so that it exists when it is needed. Call once at start.
pub(crate) fn reserve_spare() {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    if spare.is_none() {
        *spare = File::open("/dev/null").ok();
    }
}

/// Closes a connection with a reset: the client learns at once.
pub(crate) fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Waits for the next connection `admission` lets in. Never fails: errors are logged (once
/// per burst) and retried after a pause, because a listener that stops accepting would take
/// its pod or endpoint down with it.
pub(crate) async fn accept(listener: &TcpListener, admission: &Admission) -> (TcpStream, SocketAddr, Permit) {
    let mut backoff = BACKOFF.0;
    let mut failures: u64 = 0;
    let mut last_log: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = BACKOFF.0;
                match admission.admit(peer.ip(), stream.as_raw_fd() as u64) {
                    Some(permit) => return (stream, peer, permit),
                    None => reset(stream),
                }
            }
            Err(e) => {
                failures += 1;
                if last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    warn!(listener = admission.what, error = %e, failures, "accept failed; backing off");
                    last_log = Some(Instant::now());
                }
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    refuse_one(listener).await;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// At the open-files limit: gives up the spare descriptor to accept one waiting connection and
/// reset it, then takes the spare back.
async fn refuse_one(listener: &TcpListener) {
    let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).take();
    if spare.is_none() {
        return;
    }
    drop(spare);
    // Only what is already waiting: never block here.
    if let Ok(Ok((stream, _))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await {
        reset(stream);
    }
    reserve_spare();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_per_peer_and_in_all_and_places_come_back() {
        let admission = Admission::new("test", Limits { open: 3, per_peer: 2, keep_free: 0 });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = admission.admit(a, 10).expect("a 1");
        let _second = admission.admit(a, 11).expect("a 2");
        assert!(admission.admit(a, 12).is_none(), "a third from one peer");
        let _third = admission.admit(b, 12).expect("another peer");
        assert!(admission.admit("10.0.0.3".parse().expect("ip"), 13).is_none(), "over the total");
        drop(first);
        assert_eq!(admission.open(), 2);
        assert!(admission.admit(a, 10).is_some(), "the place came back");
    }

    #[test]
    fn the_descriptor_reserve_refuses_near_the_limit() {
        let admission = Admission::new("test", Limits { open: 100, per_peer: 100, keep_free: 64 });
        let peer: IpAddr = "10.0.0.1".parse().expect("ip");
        let limit = open_files_limit();
        let reserve = 64.min(limit / 4);
        assert!(admission.admit(peer, 10).is_some());
        assert!(admission.admit(peer, limit - reserve - 1).is_some());
        assert!(admission.admit(peer, limit - reserve).is_none(), "in the reserve");
    }
}
