//! Test applications that run inside pods: an echo server that records who connected, and a
//! client round trip.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// An echo server on a listener inside a pod. Every accepted connection's peer is recorded, so
/// a test can tell whether traffic reached the application at all.
pub struct EchoServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    _acceptor: Acceptor,
}

impl EchoServer {
    pub(crate) fn start(listener: TcpListener) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let acceptor = Acceptor::start(listener, {
            let peers = peers.clone();
            move |stream, peer| {
                peers.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                echo(stream);
            }
        })?;
        Ok(Self { addr, peers, _acceptor: acceptor })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peers of every connection accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends `payload` on `stream` and reads the same number of bytes back.
pub fn echo_roundtrip(stream: &mut TcpStream, payload: &[u8]) -> io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back)?;
    Ok(back)
}

/// A server that writes to each client, then ends the connection: `Some(n)` writes `n` bytes,
/// waits until the client's side has acknowledged them all (so none is lost in the server's own
/// send queue) and resets the connection (`SO_LINGER` 0); `None` writes until the client goes.
pub struct SourceServer {
    addr: SocketAddr,
    _acceptor: Acceptor,
}

impl SourceServer {
    pub(crate) fn start(listener: TcpListener, bytes: Option<usize>) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let acceptor = Acceptor::start(listener, move |mut stream, _| {
            let chunk = pattern(64 * 1024);
            match bytes {
                Some(total) => {
                    let mut left = total;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if stream.write_all(&chunk[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    while unacknowledged(&stream) > 0 && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    // SAFETY: a valid socket and a linger struct of the advertised size.
                    unsafe {
                        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                        libc::setsockopt(
                            stream.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            (&raw const linger).cast(),
                            size_of::<libc::linger>() as libc::socklen_t,
                        );
                    }
                }
                None => while stream.write_all(&chunk).is_ok() {},
            }
        })?;
        Ok(Self { addr, _acceptor: acceptor })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// `n` bytes of a pattern a reader can check (byte `i` is `i mod 251`).
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Bytes written to a TCP socket and not yet acknowledged by its peer (`SIOCOUTQ`).
fn unacknowledged(stream: &TcpStream) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: a valid socket fd and an out-pointer of the size the ioctl writes.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 { queued.max(0) as usize } else { 0 }
}

/// Accepts connections on a thread of its own, handing each to `serve` on a new thread, until
/// dropped. Accept blocks (no polling delay in connection-rate measurements); dropping shuts the
/// listener down, which wakes the blocked accept.
struct Acceptor {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    fn start(
        listener: TcpListener,
        serve: impl Fn(TcpStream, SocketAddr) + Send + Sync + Clone + 'static,
    ) -> io::Result<Self> {
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, stop) = (listener.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let serve = serve.clone();
                            std::thread::spawn(move || serve(stream, peer));
                        }
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Ok(Self { listener, stop, thread: Some(thread) })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: shutting down our own listening socket; it makes the blocked accept return.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
