//! Moving bytes: between two TCP sockets (plaintext passthrough and delivery), and between a TCP
//! socket and an HTTP/2 CONNECT stream (HBONE).
//!
//! Reads wait for readiness before they take a buffer, so an idle connection holds no buffer at
//! all; a buffer starts small and doubles while reads fill it, up to [`MAX_CHUNK`], so bulk
//! transfers move large chunks.
//!
//! How a connection ends travels with it. A FIN (or END_STREAM) ends that direction and the
//! other goes on (half-close). A reset on either end — a TCP RST, an HTTP/2 RST_STREAM, a
//! connection that broke — aborts both: first the bytes already on their way are delivered
//! (the TCP send queue drains, the HTTP/2 stream flushes, each for at most [`DRAIN_LIMIT`]),
//! then the other leg is reset. The applications' sockets are opened with an abortive close
//! (`SO_LINGER` 0), cleared only when both directions ended cleanly: a relay that fails, or an
//! agent that dies, shows the application a reset, never a clean end of a truncated stream.

use std::{io, time::Duration};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::AsyncWriteExt as _,
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

/// First read size of a direction.
const MIN_CHUNK: usize = 16 * 1024;
/// Largest read size, and the HTTP/2 send buffer per stream.
pub const MAX_CHUNK: usize = 256 * 1024;
/// How long bytes already accepted may take to reach the peer before a reset goes out anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transferred {
    /// From the side that opened the connection.
    pub sent: u64,
    /// Towards it.
    pub received: u64,
}

/// Copies both ways between two TCP sockets until both are done. A reset or error on either
/// side resets the other, after what was read before it is delivered.
pub async fn tcp_to_tcp(mut client: TcpStream, mut upstream: TcpStream) -> io::Result<Transferred> {
    let outcome = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        both(copy(client_read, upstream_write), copy(upstream_read, client_write)).await
    };
    finish(&[&client, &upstream], outcome).await
}

/// Copies both ways between a TCP socket and an HTTP/2 stream until both are done. `sent`
/// counts TCP to HTTP/2. A TCP reset resets the stream (RST_STREAM), a stream reset or broken
/// connection resets the TCP socket.
pub async fn tcp_to_h2(
    mut tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
) -> io::Result<Transferred> {
    let outcome = {
        let (read, write) = tcp.split();
        both(tcp_into_stream(read, send), stream_into_tcp(recv, write)).await
    };
    finish(&[&tcp], outcome).await
}

/// Runs both directions until each has ended; the first to fail ends the other.
async fn both(
    up: impl std::future::Future<Output = io::Result<u64>>,
    down: impl std::future::Future<Output = io::Result<u64>>,
) -> io::Result<Transferred> {
    tokio::pin!(up, down);
    let (mut sent, mut received) = (None, None);
    loop {
        tokio::select! {
            r = &mut up, if sent.is_none() => sent = Some(r?),
            r = &mut down, if received.is_none() => received = Some(r?),
        }
        if let (Some(sent), Some(received)) = (sent, received) {
            return Ok(Transferred { sent, received });
        }
    }
}

/// One direction between two TCP sockets: EOF shuts the write side down.
async fn copy(from: ReadHalf<'_>, mut to: WriteHalf<'_>) -> io::Result<u64> {
    let mut total = 0u64;
    let mut chunk = MIN_CHUNK;
    loop {
        from.as_ref().readable().await?;
        let mut buf = BytesMut::with_capacity(chunk);
        match from.as_ref().try_read_buf(&mut buf) {
            Ok(0) => {
                to.shutdown().await?;
                return Ok(total);
            }
            Ok(n) => {
                total += n as u64;
                if n == chunk {
                    chunk = (chunk * 2).min(MAX_CHUNK);
                }
                to.write_all(&buf).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// TCP → HTTP/2 DATA frames; TCP EOF ends the stream (END_STREAM), a TCP reset or error resets
/// it after the data read before it has left.
async fn tcp_into_stream(read: ReadHalf<'_>, mut send: SendStream<Bytes>) -> io::Result<u64> {
    let mut total = 0u64;
    let mut chunk = MIN_CHUNK;
    loop {
        if let Err(e) = read.as_ref().readable().await {
            abort_stream(&mut send).await;
            return Err(e);
        }
        let mut buf = BytesMut::with_capacity(chunk);
        match read.as_ref().try_read_buf(&mut buf) {
            Ok(0) => {
                // Half-close: tell the peer we are done sending; the other direction goes on.
                let _ = send.send_data(Bytes::new(), true);
                return Ok(total);
            }
            Ok(n) => {
                total += n as u64;
                if n == chunk {
                    chunk = (chunk * 2).min(MAX_CHUNK);
                }
                if let Err(e) = send_all(&mut send, buf.freeze()).await {
                    // The stream is gone (reset by the peer, or its connection): nothing to flush.
                    send.send_reset(h2::Reason::CANCEL);
                    return Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                abort_stream(&mut send).await;
                return Err(e);
            }
        }
    }
}

/// Resets a stream once the DATA already handed to it has been written out (HTTP/2 would
/// otherwise discard queued frames with the reset), or after [`DRAIN_LIMIT`].
async fn abort_stream(send: &mut SendStream<Bytes>) {
    // With capacity reserved up to the send buffer's size, the free capacity reaches that size
    // exactly when nothing of the stream is buffered any more.
    send.reserve_capacity(MAX_CHUNK);
    let flushed = tokio::time::timeout(DRAIN_LIMIT, async {
        while send.capacity() < MAX_CHUNK {
            match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    });
    let _ = flushed.await;
    send.send_reset(h2::Reason::CANCEL);
}

/// Sends `data` as the stream's flow-control window allows.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(h2_io(e)),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "HBONE stream closed by the peer",
                ));
            }
        };
        if capacity == 0 {
            continue;
        }
        let piece = data.split_to(capacity.min(data.len()));
        send.send_data(piece, false).map_err(h2_io)?;
    }
    Ok(())
}

/// HTTP/2 DATA frames → TCP; END_STREAM shuts down the TCP write side. A reset stream (or a
/// broken connection) is an error: the caller resets the socket once what arrived before it is
/// delivered.
async fn stream_into_tcp(mut recv: RecvStream, mut write: WriteHalf<'_>) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_io)?;
        let n = data.len();
        write.write_all(&data).await?;
        total += n as u64;
        // Open the window only once the bytes are handed to the kernel: back-pressure reaches
        // the sender instead of piling up here.
        let _ = recv.flow_control().release_capacity(n);
    }
    write.shutdown().await?;
    Ok(total)
}

/// Ends a relay: cleanly, the sockets close normally (their abortive close is cleared, the
/// kernel sends what is queued and the FIN already asked for); on error, each socket's queued
/// bytes drain (bounded by [`DRAIN_LIMIT`]), then it is reset when dropped.
async fn finish(sockets: &[&TcpStream], outcome: io::Result<Transferred>) -> io::Result<Transferred> {
    let linger = match &outcome {
        Ok(_) => None,
        Err(_) => {
            for socket in sockets {
                drain(socket).await;
            }
            Some(Duration::ZERO)
        }
    };
    for socket in sockets {
        let _ = socket2::SockRef::from(*socket).set_linger(linger);
    }
    outcome
}

/// Waits until everything written to `stream` was acknowledged by the peer, or
/// [`DRAIN_LIMIT`].
async fn drain(stream: &TcpStream) {
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    let mut pause = Duration::from_micros(200);
    while crate::sys::unacknowledged(stream) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// h2 errors as I/O errors, keeping resets recognisable.
pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else if e.reason().is_some() {
        io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
    } else {
        io::Error::other(e.to_string())
    }
}
