//! A minimal HTTP/1.1 client for the agent's admin API.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Errors talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there.
    #[error(
        "cannot reach the ambit agent's admin API at {addr}: {source} (is `ambit agent` running on this node? use --admin to point elsewhere)"
    )]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("admin API at {addr}: {source}")]
    Http {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
    /// Non-success status.
    #[error("admin API at {addr} answered {path} with {status}: {body}")]
    Status {
        /// Address.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// Status.
        status: StatusCode,
        /// Body text.
        body: String,
    },
    /// No answer in time.
    #[error("admin API at {0} did not answer in time")]
    Timeout(SocketAddr),
}

/// `GET path` on the admin API at `addr`; the body of a 200 answer.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Bytes, ClientError> {
    tokio::time::timeout(timeout, get_inner(addr, path)).await.map_err(|_| ClientError::Timeout(addr))?
}

/// `POST path` with a JSON `body` on the admin API at `addr`; the body of a 200 answer.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, ClientError> {
    let exchange = async {
        let stream =
            TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
        let answer = send(stream, addr, Method::POST, path, body).await?;
        Ok(answer.collect().await.map_err(|source| ClientError::Http { addr, source })?.to_bytes())
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| ClientError::Timeout(addr))?
}

/// `GET path`, handing each complete line of a streamed answer to `line` as it arrives, until
/// the agent ends the stream.
pub async fn stream_lines(
    addr: SocketAddr,
    path: &str,
    connect_timeout: Duration,
    mut line: impl FnMut(&[u8]),
) -> Result<(), ClientError> {
    let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ClientError::Timeout(addr))?
        .map_err(|source| ClientError::Connect { addr, source })?;
    let mut body = send(stream, addr, Method::GET, path, Bytes::new()).await?;
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|source| ClientError::Http { addr, source })?;
        if let Some(data) = frame.data_ref() {
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                line(&pending[..end]);
                pending.drain(..=end);
            }
        }
    }
    Ok(())
}

async fn get_inner(addr: SocketAddr, path: &str) -> Result<Bytes, ClientError> {
    let stream = TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
    let body = send(stream, addr, Method::GET, path, Bytes::new()).await?;
    Ok(body.collect().await.map_err(|source| ClientError::Http { addr, source })?.to_bytes())
}

/// Sends `method path` with `body` over `stream`; the body of a 200 answer, or the status and
/// body of another.
async fn send(
    stream: TcpStream,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<Incoming, ClientError> {
    let http = |source| ClientError::Http { addr, source };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    tokio::spawn(connection);
    let mut request =
        Request::builder().method(method).uri(path).header(hyper::header::HOST, addr.to_string());
    if !body.is_empty() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(body)).map_err(|e| ClientError::Status {
        addr,
        path: path.into(),
        status: StatusCode::BAD_REQUEST,
        body: e.to_string(),
    })?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    if status != StatusCode::OK {
        let text = response.into_body().collect().await.map_err(http)?.to_bytes();
        return Err(ClientError::Status {
            addr,
            path: path.into(),
            status,
            body: String::from_utf8_lossy(&text).trim().to_owned(),
        });
    }
    Ok(response.into_body())
}
