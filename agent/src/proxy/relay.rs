//! Moving bytes: between two TCP sockets (plaintext passthrough), and between a TCP socket and
//! an HTTP/2 CONNECT stream (HBONE).
//!
//! Reads wait for readiness before they take a buffer, so an idle connection holds no buffer at
//! all; a buffer starts small and doubles while reads fill it, up to [`MAX_CHUNK`], so bulk
//! transfers move large chunks.

use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncWriteExt as _, copy_bidirectional_with_sizes},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// First read size of a direction.
const MIN_CHUNK: usize = 16 * 1024;
/// Largest read size.
pub const MAX_CHUNK: usize = 256 * 1024;

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transferred {
    /// From the side that opened the connection.
    pub sent: u64,
    /// Towards it.
    pub received: u64,
}

/// Copies both ways between two TCP sockets until both are done.
pub async fn tcp_to_tcp(mut client: TcpStream, mut upstream: TcpStream) -> io::Result<Transferred> {
    let (sent, received) =
        copy_bidirectional_with_sizes(&mut client, &mut upstream, 64 * 1024, 64 * 1024).await?;
    Ok(Transferred { sent, received })
}

/// Copies both ways between a TCP socket and an HTTP/2 stream until both are done. `sent`
/// counts TCP to HTTP/2.
pub async fn tcp_to_h2(tcp: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> io::Result<Transferred> {
    let (read, write) = tcp.into_split();
    let (up, down) = tokio::join!(tcp_into_stream(read, send), stream_into_tcp(recv, write));
    Ok(Transferred { sent: up?, received: down? })
}

/// TCP → HTTP/2 DATA frames; TCP EOF ends the stream (END_STREAM), a TCP error resets it.
async fn tcp_into_stream(read: OwnedReadHalf, mut send: SendStream<Bytes>) -> io::Result<u64> {
    let mut total = 0u64;
    let mut chunk = MIN_CHUNK;
    loop {
        if let Err(e) = read.readable().await {
            send.send_reset(h2::Reason::CANCEL);
            return Err(e);
        }
        let mut buf = BytesMut::with_capacity(chunk);
        match read.try_read_buf(&mut buf) {
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
                send_all(&mut send, buf.freeze()).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        }
    }
}

/// Sends `data` as the stream's flow-control window allows.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(h2_io(e)),
            None => {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed by the peer"));
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

/// HTTP/2 DATA frames → TCP; END_STREAM shuts down the TCP write side.
async fn stream_into_tcp(mut recv: RecvStream, mut write: OwnedWriteHalf) -> io::Result<u64> {
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
