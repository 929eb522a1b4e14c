//! rustls configurations for HBONE: TLS 1.3 only, AES-GCM suites, ALPN `h2`, no SNI; every
//! peer must present an X.509-SVID that chains to the trust bundle. The server accepts clients
//! of its own trust domain; the client accepts only the identity the destination should have.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use crate::identity::{Bundle, Identities, Identity, spiffe_id_of};

/// The ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The trust bundle was rejected.
    #[error("trust bundle: {0}")]
    Bundle(String),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Builds and caches the agent's TLS configurations.
pub struct TlsContext {
    identities: Arc<Identities>,
    provider: Arc<CryptoProvider>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    clients: Mutex<HashMap<(Identity, Identity), Arc<ClientConfig>>>,
}

impl TlsContext {
    /// Configurations backed by `identities`, trusting its bundle (as it is at each handshake:
    /// a changed bundle applies to new connections without rebuilding anything).
    pub fn new(identities: Arc<Identities>) -> Result<Self, TlsError> {
        let provider = Arc::new(provider());
        let client_verifier = Arc::new(SpiffeClientVerifier {
            bundle: identities.bundle().clone(),
            built: Mutex::new(None),
            provider: provider.clone(),
            trust_domain: identities.trust_domain().to_owned(),
        });
        // Fail at start, not at the first handshake, if the bundle cannot make a verifier.
        client_verifier.current().map_err(|e| TlsError::Bundle(e.to_string()))?;
        Ok(Self { identities, provider, client_verifier, clients: Mutex::new(HashMap::new()) })
    }

    /// The server side of a pod's HBONE listener: presents `identity`'s current SVID at every
    /// handshake (so rotation needs no restart), requires a client SVID of our trust domain.
    pub fn server_config(&self, identity: Identity) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.client_verifier.clone())
            .with_cert_resolver(Arc::new(CurrentSvid { identities: self.identities.clone(), identity }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Connections are pooled and long-lived; resumption tickets would only cost bytes.
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The client side from `src` to a destination that must present `dst`.
    pub fn client_config(&self, src: &Identity, dst: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
        let key = (src.clone(), dst.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = clients.get(&key) {
            return Ok(config.clone());
        }
        let verifier = Arc::new(SpiffeServerVerifier {
            bundle: self.identities.bundle().clone(),
            expected: dst.clone(),
            algorithms: self.provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(CurrentSvid {
                identities: self.identities.clone(),
                identity: src.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.enable_sni = false;
        let config = Arc::new(config);
        clients.insert(key, config.clone());
        Ok(config)
    }
}

/// ring with the suites HBONE uses: TLS 1.3 AES-256-GCM and AES-128-GCM.
fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    provider
}

fn rejection(message: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(std::io::Error::other(
        message,
    )))))
}

/// Presents the current SVID of one identity.
#[derive(Debug)]
struct CurrentSvid {
    identities: Arc<Identities>,
    identity: Identity,
}

impl CurrentSvid {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        match self.identities.svid(&self.identity) {
            Ok(svid) => Some(svid.certified_key.clone()),
            Err(e) => {
                tracing::warn!(identity = %self.identity, error = %e, "no certificate to present; handshake refused");
                None
            }
        }
    }
}

impl ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CurrentSvid {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities").field("trust_domain", &self.trust_domain()).finish_non_exhaustive()
    }
}

/// WebPKI chain validation against the current bundle, then: exactly one SPIFFE ID, in our
/// trust domain.
struct SpiffeClientVerifier {
    bundle: Arc<Bundle>,
    /// The WebPKI verifier of one bundle generation.
    built: Mutex<Option<(u64, Arc<dyn ClientCertVerifier>)>>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl std::fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        let anchors = self.bundle.current();
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((generation, verifier)) = built.as_ref()
            && *generation == anchors.generation
        {
            return Ok(verifier.clone());
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(anchors.store.clone(), self.provider.clone())
                .build()
                .map_err(|e| Error::General(format!("trust bundle: {e}")))?;
        *built = Some((anchors.generation, verifier.clone()));
        Ok(verifier)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle changes under us; hints are optional, and SVID clients have one
        // certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.current()?.verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of(end_entity).map_err(rejection)?;
        if id.trust_domain != self.trust_domain {
            return Err(rejection(format!("client {id} is not in trust domain {}", self.trust_domain)));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// WebPKI chain validation (no DNS names: SVIDs have none), then: the server is exactly the
/// identity the destination workload has. Anything else is an impersonation attempt.
struct SpiffeServerVerifier {
    bundle: Arc<Bundle>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeServerVerifier").field("expected", &self.expected).finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.current().store,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = spiffe_id_of(end_entity).map_err(rejection)?;
        if id != self.expected {
            return Err(rejection(format!("server presented {id}, expected {}", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
