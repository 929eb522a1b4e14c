//! The HBONE TLS configurations against each other in one process, over an in-memory pipe:
//! who is accepted and who is refused, by which side, with which identity. Two CAs of the same
//! trust domain stand for this mesh and a stranger's.

mod support;

use std::{sync::Arc, time::Duration};

use ambit::{
    identity::{Identity, spiffe_id_of},
    tls::TlsContext,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use support::{TRUST_DOMAIN, TestCa};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// One CA and the TLS configurations of the agents it serves.
struct Mesh {
    ca: TestCa,
    tls: TlsContext,
}

impl Mesh {
    fn new(name: &str) -> Self {
        let ca = TestCa::new(&format!("tls-{name}"), Duration::from_secs(3600));
        let tls = TlsContext::new(ca.identities.clone()).expect("TLS context");
        Self { ca, tls }
    }

    fn client(&self, src: &Identity, expected: &Identity) -> Arc<ClientConfig> {
        self.ca.identities.prefetch(src).expect("certificate");
        self.tls.client_config(src, expected).expect("client config")
    }

    fn acceptor(&self, presents: &Identity) -> TlsAcceptor {
        self.ca.identities.prefetch(presents).expect("certificate");
        TlsAcceptor::from(self.tls.server_config(presents.clone()).expect("server config"))
    }
}

fn sa(name: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, "shop", name)
}

/// What each side made of one handshake: the client's error, or the server's view of the peer.
struct Outcome {
    client: Result<(), String>,
    server: Result<Identity, String>,
}

async fn handshake(client: Arc<ClientConfig>, server: TlsAcceptor) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let stream = server.accept(server_io).await.map_err(|e| e.to_string())?;
        let leaf =
            stream.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no client certificate")?;
        spiffe_id_of(leaf)
    });
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let client =
        tokio::time::timeout(Duration::from_secs(10), TlsConnector::from(client).connect(name, client_io))
            .await
            .expect("handshake in time")
            .map(drop)
            .map_err(|e| e.to_string());
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server in time")
        .expect("server task");
    Outcome { client, server }
}

#[tokio::test]
async fn who_is_accepted_and_who_is_refused() {
    let (ours, stranger) = (Mesh::new("ours"), Mesh::new("stranger"));
    let (frontend, backend, db) = (sa("frontend"), sa("backend"), sa("db"));

    // Control: both ends of this mesh, the identity the client asked for.
    let ok = handshake(ours.client(&frontend, &backend), ours.acceptor(&backend)).await;
    assert_eq!(ok.client, Ok(()));
    assert_eq!(ok.server, Ok(frontend.clone()), "the server sees the client's verified identity");

    // Each row changes one thing from the control; (what, client, server, the error names this).
    let rows: [(&str, Arc<ClientConfig>, TlsAcceptor, &str); 3] = [
        (
            "the server presents another workload's identity",
            ours.client(&frontend, &db),
            ours.acceptor(&backend),
            "spiffe://cluster.local/ns/shop/sa/backend",
        ),
        (
            "the server's certificate comes from another CA",
            ours.client(&frontend, &backend),
            stranger.acceptor(&backend),
            "",
        ),
        (
            "the client's certificate comes from another CA",
            stranger.client(&frontend, &backend),
            ours.acceptor(&backend),
            "",
        ),
    ];
    for (what, client, server, named) in rows {
        let outcome = handshake(client, server).await;
        assert!(
            outcome.client.is_err() || outcome.server.is_err(),
            "{what}: accepted (client {:?}, server {:?})",
            outcome.client,
            outcome.server
        );
        assert!(outcome.server.is_err(), "{what}: the server accepted the peer as {:?}", outcome.server);
        if !named.is_empty() {
            let error = outcome.client.expect_err(what);
            assert!(error.contains(named), "{what}: the client's error names the identity it got: {error}");
        }
    }

    // A client without a certificate, trusting anything: the server requires one.
    let anonymous = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustsAnything))
        .with_no_client_auth();
    let outcome = handshake(Arc::new(anonymous), ours.acceptor(&backend)).await;
    assert!(outcome.server.is_err(), "a client with no certificate was accepted as {:?}", outcome.server);
}

/// A server verifier that accepts any certificate: the anonymous client above must fail on the
/// server's side, not its own.
#[derive(Debug)]
struct TrustsAnything;

impl ServerCertVerifier for TrustsAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}
