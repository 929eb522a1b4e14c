//! The agent as a client of a CA service (`ambit ca serve`, or istiod): each key is made on the
//! node and never leaves it; a CSR for one identity goes out over Istio's protocol with the
//! agent's service-account token; the answer is checked (the identity, the key, the chain to the
//! trust bundle) before any handshake presents it.
//!
//! One HTTP/2 connection to the CA carries every call (a node full of new pods asks at once);
//! it is opened again when it fails.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::{HeaderValue, Request, Uri};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::{
    ClientConfig,
    client::verify_server_cert_signed_by_trust_anchor,
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime, pem::PemObject as _,
    },
    server::ParsedCertificate,
    sign::CertifiedKey,
};
use tokio_rustls::TlsConnector;
use tracing::debug;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{
    Identity, IdentityError, Svid,
    bundle::Bundle,
    protocol::{self, CertificateRequest, CertificateResponse, Code},
};

/// Dialing and setting up TLS and HTTP/2 must take no longer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A call must be answered within this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of one CA service.
pub struct CaClient {
    /// `host:port`, as given.
    authority: String,
    host: String,
    port: u16,
    token: PathBuf,
    bundle: Arc<Bundle>,
    connection: tokio::sync::Mutex<Option<Connection>>,
}

struct Connection {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl CaClient {
    /// A client of the CA at `url` (`https://host:port`, or `host:port`), verified against
    /// `bundle`, authenticating with the token in `token` (read at every call: projected tokens
    /// are rotated by the kubelet).
    pub fn new(url: &str, token: PathBuf, bundle: Arc<Bundle>) -> Result<Self, IdentityError> {
        let bad =
            |message: &str| IdentityError::CaAddress { url: url.to_owned(), message: message.to_owned() };
        let with_scheme = if url.contains("://") { url.to_owned() } else { format!("https://{url}") };
        let uri: Uri =
            with_scheme.parse().map_err(|_| bad("not a URL like https://ambit-ca.ambit-system.svc:15012"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the CA is reached over TLS: use https://"));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(15012);
        if !matches!(uri.path(), "" | "/") {
            return Err(bad("a CA address has no path"));
        }
        Ok(Self {
            authority: format!("{}:{port}", uri.host().unwrap_or_default()),
            host,
            port,
            token,
            bundle,
            connection: tokio::sync::Mutex::new(None),
        })
    }

    /// The CA's address, as `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// A fresh key and a certificate for `identity` from the CA, valid for `ttl`.
    pub async fn fetch(&self, identity: &Identity, ttl: Duration) -> Result<Svid, IdentityError> {
        let issue = |message: String| IdentityError::Issue { identity: identity.to_string(), message };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| issue(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(|e: rcgen::Error| issue(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&key).and_then(|c| c.pem()).map_err(|e| issue(e.to_string()))?;
        let token = std::fs::read_to_string(&self.token)
            .map_err(|source| IdentityError::Io { path: self.token.clone(), source })?;
        let request = CertificateRequest::new(csr, ttl.as_secs() as i64, &identity.to_string());
        let issued_at = SystemTime::now();
        let response = tokio::time::timeout(CALL_TIMEOUT, self.call(&request, token.trim()))
            .await
            .map_err(|_| self.unreachable("no answer within 10s".into()))??;
        self.accept(identity, &key, issued_at, &response)
    }

    fn unreachable(&self, message: String) -> IdentityError {
        IdentityError::CaUnreachable { addr: self.authority.clone(), message }
    }

    /// Checks an answer and makes it a usable certificate.
    fn accept(
        &self,
        identity: &Identity,
        key: &KeyPair,
        issued_at: SystemTime,
        response: &CertificateResponse,
    ) -> Result<Svid, IdentityError> {
        let bad = |message: String| IdentityError::BadAnswer { addr: self.authority.clone(), message };
        let chain: Vec<CertificateDer<'static>> = response
            .cert_chain
            .iter()
            .map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not PEM certificates: {e}")))?
            .into_iter()
            .flatten()
            .collect();
        let (leaf, rest) = chain.split_first().ok_or_else(|| bad("an empty certificate chain".into()))?;
        let (_, parsed) =
            X509Certificate::from_der(leaf).map_err(|e| bad(format!("the leaf is not X.509: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("the certificate is not for the key this agent sent".into()));
        }
        let named = crate::identity::spiffe_id_of(leaf).map_err(bad)?;
        if named != *identity {
            return Err(bad(format!("a certificate for {named}, not {identity}")));
        }
        let self_signed = |der: &CertificateDer<'_>| {
            X509Certificate::from_der(der).is_ok_and(|(_, c)| c.subject() == c.issuer())
        };
        let intermediates: Vec<CertificateDer<'static>> =
            rest.iter().filter(|c| !self_signed(c)).cloned().collect();
        // A chain peers cannot verify would fail every handshake: keep the old certificate.
        let anchors = self.bundle.current();
        let end_entity = ParsedCertificate::try_from(leaf).map_err(|e| bad(e.to_string()))?;
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &anchors.store,
            &intermediates,
            UnixTime::now(),
            algorithms.all,
        )
        .map_err(|e| bad(format!("the chain does not verify against the trust bundle: {e}")))?;
        let root = anchors.roots.iter().find(|root| {
            let top = intermediates.last().unwrap_or(leaf);
            match (X509Certificate::from_der(top), X509Certificate::from_der(root)) {
                (Ok((_, t)), Ok((_, r))) => {
                    t.issuer() == r.subject() && t.verify_signature(Some(r.public_key())).is_ok()
                }
                _ => false,
            }
        });
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| bad(e.to_string()))?;
        let time = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok(Svid {
            identity: identity.clone(),
            serial: parsed.raw_serial_as_string().replace(':', ""),
            issued_at,
            not_before: time(parsed.validity().not_before),
            not_after: time(parsed.validity().not_after),
            root: root.cloned(),
            certified_key: Arc::new(CertifiedKey::new(
                std::iter::once(leaf.clone()).chain(intermediates).collect(),
                signer,
            )),
        })
    }

    /// One unary call.
    async fn call(
        &self,
        request: &CertificateRequest,
        token: &str,
    ) -> Result<CertificateResponse, IdentityError> {
        let mut sender = self.sender().await?;
        sender = sender.ready().await.map_err(|e| self.unreachable(format!("connection lost: {e}")))?;
        let uri = format!("https://{}{}", self.authority, protocol::PATH);
        let mut http = Request::post(uri).body(()).map_err(|e| self.unreachable(e.to_string()))?;
        let headers = http.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        let bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| IdentityError::Io {
            path: self.token.clone(),
            source: std::io::Error::other("the token is not a valid header value"),
        })?;
        headers.insert(http::header::AUTHORIZATION, bearer);
        let (response, mut body) = sender
            .send_request(http, false)
            .map_err(|e| self.unreachable(format!("sending the call: {e}")))?;
        body.send_data(protocol::frame(request), true)
            .map_err(|e| self.unreachable(format!("sending the CSR: {e}")))?;
        let response = response.await.map_err(|e| self.unreachable(format!("the call failed: {e}")))?;
        // A refusal comes as headers only; an answer as headers, the message, then trailers.
        if let Some(refusal) = status(response.headers()) {
            return Err(refusal);
        }
        if response.status() != http::StatusCode::OK {
            return Err(self.unreachable(format!("HTTP status {}", response.status())));
        }
        let mut stream = response.into_body();
        let mut buf = BytesMut::new();
        while let Some(chunk) = stream.data().await {
            let chunk = chunk.map_err(|e| self.unreachable(format!("reading the answer: {e}")))?;
            let _ = stream.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
            if buf.len() > protocol::MAX_MESSAGE + 5 {
                return Err(IdentityError::BadAnswer {
                    addr: self.authority.clone(),
                    message: "an answer over 64 KiB".into(),
                });
            }
        }
        let trailers =
            stream.trailers().await.map_err(|e| self.unreachable(format!("reading the status: {e}")))?;
        match trailers.as_ref().and_then(status) {
            Some(refusal) => Err(refusal),
            None if trailers.as_ref().and_then(|t| t.get("grpc-status")).is_some() => protocol::unframe(&buf)
                .map_err(|message| IdentityError::BadAnswer { addr: self.authority.clone(), message }),
            None => Err(self.unreachable("the answer has no grpc-status".into())),
        }
    }

    /// The open connection, or a new one.
    async fn sender(&self) -> Result<SendRequest<Bytes>, IdentityError> {
        let mut held = self.connection.lock().await;
        if let Some(connection) = held.as_ref()
            && !connection.closed.load(Ordering::Relaxed)
        {
            return Ok(connection.sender.clone());
        }
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| self.unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))??;
        let sender = connection.sender.clone();
        *held = Some(connection);
        Ok(sender)
    }

    async fn connect(&self) -> Result<Connection, IdentityError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.unreachable(format!("resolving {}: {e}", self.host)))?
            .collect();
        let mut last = self.unreachable(format!("{} resolves to no address", self.host));
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(tcp) => return self.handshake(tcp).await,
                Err(e) => last = self.unreachable(format!("connecting to {addr}: {e}")),
            }
        }
        Err(last)
    }

    async fn handshake(&self, tcp: tokio::net::TcpStream) -> Result<Connection, IdentityError> {
        let _ = tcp.set_nodelay(true);
        let anchors = self.bundle.current();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| self.unreachable(e.to_string()))?
                .with_root_certificates(anchors.store.clone())
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(self.host.clone()).map_err(|e| self.unreachable(e.to_string()))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| self.unreachable(format!("TLS: {}", crate::error_chain(&e))))?;
        let (sender, connection) =
            h2::client::handshake(tls).await.map_err(|e| self.unreachable(format!("HTTP/2: {e}")))?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let authority = self.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(ca = %authority, error = %e, "connection to the CA ended");
            }
            flag.store(true, Ordering::Relaxed);
        });
        Ok(Connection { sender, closed })
    }
}

/// The refusal a `grpc-status` other than 0 stands for.
fn status(headers: &http::HeaderMap) -> Option<IdentityError> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    if value.trim() == "0" {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(protocol::decode_message)
        .unwrap_or_default();
    Some(IdentityError::Refused { code: Code::from_status(value), status: value.trim().to_owned(), message })
}
