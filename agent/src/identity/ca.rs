//! The signing CA, in Istio's `cacerts` layout: `ca-cert.pem` and `ca-key.pem` (a root, or an
//! intermediate), optional `cert-chain.pem` (the signing CA up to the root) and `root-cert.pem`
//! (the trust anchors: one root, or old and new during a rotation). Created on first start when
//! neither file exists (an ECDSA P-256 root), or brought by the operator (ECDSA or RSA; PKCS#8,
//! SEC1 or PKCS#1 PEM). It issues X.509-SVIDs: for the agent's own pods (the embedded CA), or
//! from CSRs (`ambit ca serve`).

use std::{
    fs::{self, File},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{Identity, IdentityError};

/// File names inside `--ca-dir`.
pub const CA_CERT: &str = "ca-cert.pem";
/// See [`CA_CERT`].
pub const CA_KEY: &str = "ca-key.pem";
/// See [`CA_CERT`]; optional.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// See [`CA_CERT`]; optional.
pub const ROOT_CERT: &str = "root-cert.pem";

/// Lifetime of a CA the agent creates itself.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so a peer whose clock is slightly behind accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

/// The signing CA.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate.
    cert: CertificateDer<'static>,
    /// What a leaf is presented with after itself: the signing CA and the intermediates up to,
    /// not including, the root. Empty when the signing CA is the root.
    intermediates: Vec<CertificateDer<'static>>,
    /// The trust anchors peers are verified against.
    roots: Vec<CertificateDer<'static>>,
    /// The root the signing certificate chains to.
    own_root: CertificateDer<'static>,
    dir: PathBuf,
}

/// A freshly made end-entity certificate.
struct Leaf {
    serial: String,
    issued_at: SystemTime,
    certified_key: Arc<CertifiedKey>,
}

/// Lowercase hex, as serial numbers are shown.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An X.509-SVID and its private key, ready for rustls.
pub struct Svid {
    /// Whose.
    pub identity: Identity,
    /// Serial number, hex.
    pub serial: String,
    /// When it was issued (validity starts a little earlier, for clock skew).
    pub issued_at: SystemTime,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The root its chain ends at, when known: what a rotation waits on.
    pub root: Option<CertificateDer<'static>>,
    /// Certificate chain (leaf, then intermediates) and signing key.
    pub certified_key: Arc<CertifiedKey>,
}

impl Svid {
    /// The leaf certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.certified_key.cert[0]
    }

    /// The moment `fraction` of the lifetime since issue has passed.
    pub fn refresh_at(&self, fraction: f64) -> SystemTime {
        let life = self.not_after.duration_since(self.issued_at).unwrap_or_default();
        self.issued_at + life.mul_f64(fraction)
    }
}

impl Ca {
    /// Loads the CA from `dir`, creating it there first if neither file exists. Agents sharing a
    /// directory create it once between them (the directory is locked while checking).
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, IdentityError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io { path, source }
        };
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        // Both there: read as they are, without writing anything (a Secret is mounted
        // read-only). Only creating needs the directory locked against a sibling agent.
        let lock = if cert_path.exists() && key_path.exists() {
            None
        } else {
            fs::create_dir_all(dir).map_err(io(dir))?;
            let lock_path = dir.join(".lock");
            let lock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(io(&lock_path))?;
            // Released when the guard (and its file) is dropped.
            let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| io(&lock_path)(errno.into()))?;
            match (cert_path.exists(), key_path.exists()) {
                (false, false) => create(&cert_path, &key_path, trust_domain)?,
                (true, false) => {
                    return Err(bad(
                        &key_path,
                        "missing, but ca-cert.pem exists: bring both files or neither",
                    ));
                }
                (false, true) => {
                    return Err(bad(
                        &cert_path,
                        "missing, but ca-key.pem exists: bring both files or neither",
                    ));
                }
                (true, true) => {}
            }
            Some(lock)
        };
        let ca = Self::load(dir, trust_domain);
        drop(lock);
        ca
    }

    /// Loads the CA from `dir` as it is, writing nothing: both files must be there.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Self, IdentityError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io { path, source }
        };
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;

        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(&cert_path, &format!("no PEM certificate: {e}")))?;
        check_ca_cert(&cert_path, &cert)?;
        let key = load_key(&key_path, &key_pem)?;
        let (_, parsed) = X509Certificate::from_der(&cert).map_err(|e| bad(&cert_path, &e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(&key_path, "this key does not belong to ca-cert.pem"));
        }
        let Chain { intermediates, roots, own_root } = chain_and_roots(dir, &cert)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| bad(&cert_path, &e.to_string()))?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            cert,
            intermediates,
            roots,
            own_root,
            dir: dir.to_owned(),
        })
    }

    /// The trust domain identities are issued in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchors every agent sharing this CA verifies peers with: its root, and any
    /// other `root-cert.pem` holds (a rotation's overlap).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The root this CA's certificates chain to.
    pub fn own_root(&self) -> &CertificateDer<'static> {
        &self.own_root
    }

    /// The signing certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificates sent after a leaf: the signing CA and intermediates, not the root.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues an X.509-SVID for `identity`, valid for `ttl` from now, following the SPIFFE
    /// X509-SVID standard: one URI SAN, `cA=false`, critical key usage with digitalSignature
    /// only, EKU serverAuth and clientAuth.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<Svid, IdentityError> {
        let err = |message: String| IdentityError::Issue { identity: identity.to_string(), message };
        let uri = identity.to_string().try_into().map_err(|e: rcgen::Error| err(e.to_string()))?;
        let leaf = self.leaf(vec![SanType::URI(uri)], ttl).map_err(err)?;
        Ok(Svid {
            identity: identity.clone(),
            serial: leaf.serial,
            issued_at: leaf.issued_at,
            not_before: truncate_to_seconds(leaf.issued_at - BACKDATE),
            not_after: truncate_to_seconds(leaf.issued_at + ttl),
            root: Some(self.own_root.clone()),
            certified_key: leaf.certified_key,
        })
    }

    /// Issues the CA service's own serving certificate: DNS and IP names, as TLS clients check
    /// them, valid for `ttl`, sent with the intermediates.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<Arc<CertifiedKey>, IdentityError> {
        let err = |message: String| IdentityError::Issue { identity: dns_names.join(","), message };
        let mut names = Vec::new();
        for name in dns_names {
            names.push(SanType::DnsName(
                name.clone().try_into().map_err(|e: rcgen::Error| err(e.to_string()))?,
            ));
        }
        names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        Ok(self.leaf(names, ttl).map_err(err)?.certified_key)
    }

    /// A new key and an end-entity certificate for it with `names`, as [`Ca::issue`] describes.
    fn leaf(&self, names: Vec<SanType>, ttl: Duration) -> Result<Leaf, String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| e.to_string())?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = rustls::crypto::ring::default_provider();
        let signer = provider.key_provider.load_private_key(key_der).map_err(|e| e.to_string())?;
        Ok(Leaf {
            serial: hex(&serial),
            issued_at: now,
            certified_key: Arc::new(CertifiedKey::new(
                std::iter::once(cert.der().clone()).chain(self.intermediates.iter().cloned()).collect(),
                signer,
            )),
        })
    }

    /// Signs a CSR for exactly `identity`: the CSR must name that one SPIFFE ID as its only
    /// subject alternative name. The certificate is made as [`Ca::issue`] makes it (whatever
    /// else the CSR asks for is ignored), valid for `ttl`. Returns the chain, leaf first, root
    /// last, as Istio's protocol answers.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, String> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("not a PEM CSR: {e}"))?;
        let wanted = identity.to_string();
        match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] if uri.as_str() == wanted => {}
            [] => return Err("the CSR names no subject alternative name".into()),
            [SanType::URI(uri)] => return Err(format!("the CSR asks for {}, not {wanted}", uri.as_str())),
            names => {
                return Err(format!(
                    "the CSR asks for {} subject alternative names; exactly one SPIFFE ID is allowed",
                    names.len()
                ));
            }
        }
        let now = SystemTime::now();
        let serial = random_serial()?;
        let params = &mut csr.params;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.custom_extensions = Vec::new();
        params.name_constraints = None;
        params.crl_distribution_points = Vec::new();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        params.use_authority_key_identifier_extension = true;
        let leaf = csr.signed_by(&self.issuer).map_err(|e| format!("signing: {e}"))?;
        Ok(std::iter::once(leaf.der().clone())
            .chain(self.intermediates.iter().cloned())
            .chain(std::iter::once(self.own_root.clone()))
            .collect())
    }
}

/// The parts of a loaded CA's chain.
struct Chain {
    /// Sent after a leaf: the signing CA (unless a root) and the intermediates above it.
    intermediates: Vec<CertificateDer<'static>>,
    /// Every trust anchor: the CA's own root, and any other `root-cert.pem` holds.
    roots: Vec<CertificateDer<'static>>,
    /// The root this CA's certificates chain to.
    own_root: CertificateDer<'static>,
}

/// Whether `der` is self-signed (a root).
fn self_signed(der: &CertificateDer<'_>) -> bool {
    X509Certificate::from_der(der)
        .is_ok_and(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok())
}

/// Whether `issuer` signed `cert`.
fn signed_by(cert: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> bool {
    match (X509Certificate::from_der(cert), X509Certificate::from_der(issuer)) {
        (Ok((_, c)), Ok((_, i))) => {
            c.issuer() == i.subject() && c.verify_signature(Some(i.public_key())).is_ok()
        }
        _ => false,
    }
}

/// The chain of the signing certificate `cert`, from the optional `cert-chain.pem` and
/// `root-cert.pem` of `dir`.
fn chain_and_roots(dir: &Path, cert: &CertificateDer<'static>) -> Result<Chain, IdentityError> {
    let read_all = |name: &str| -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let path = dir.join(name);
        match fs::read(&path) {
            Ok(pem) => CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(&path, &format!("not PEM certificates: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    };
    let chain = read_all(CERT_CHAIN)?;
    let mut roots = read_all(ROOT_CERT)?;
    if self_signed(cert) {
        if !roots.contains(cert) {
            roots.insert(0, cert.clone());
        }
        return Ok(Chain { intermediates: Vec::new(), roots, own_root: cert.clone() });
    }
    // An intermediate: it and the chain's other intermediates go with every leaf.
    let mut intermediates = vec![cert.clone()];
    for c in &chain {
        if self_signed(c) {
            if !roots.contains(c) {
                roots.push(c.clone());
            }
        } else if c != cert {
            intermediates.push(c.clone());
        }
    }
    let top = intermediates.last().unwrap_or(cert);
    let Some(own_root) = roots.iter().find(|root| signed_by(top, root)).cloned() else {
        return Err(bad(
            &dir.join(CA_CERT),
            "is an intermediate CA, but no root in root-cert.pem or cert-chain.pem signed its chain",
        ));
    };
    Ok(Chain { intermediates, roots, own_root })
}

/// `ambit ca rotate`: a new root CA in `to`, whose `root-cert.pem` trusts it and the roots
/// of the CA in `from` (the overlap). Returns the new root.
pub fn rotate(from: &Path, to: &Path, trust_domain: &str) -> Result<CertificateDer<'static>, IdentityError> {
    let old = Ca::load(from, trust_domain)?;
    for name in [CA_CERT, CA_KEY] {
        if to.join(name).exists() {
            return Err(bad(&to.join(name), "exists: rotate writes a new CA into an empty directory"));
        }
    }
    fs::create_dir_all(to).map_err(|source| IdentityError::Io { path: to.to_owned(), source })?;
    create(&to.join(CA_CERT), &to.join(CA_KEY), trust_domain)?;
    let new = Ca::load(to, trust_domain)?;
    let bundle: String = std::iter::once(new.cert()).chain(old.roots()).map(pem).collect();
    write_new(&to.join(ROOT_CERT), bundle.as_bytes(), 0o644)?;
    Ok(new.cert().clone())
}

/// `ambit ca finish`: the CA in `dir` trusts only its own root again. Returns that root.
pub fn finish(dir: &Path, trust_domain: &str) -> Result<CertificateDer<'static>, IdentityError> {
    let ca = Ca::load(dir, trust_domain)?;
    write_new(&dir.join(ROOT_CERT), pem(ca.own_root()).as_bytes(), 0o644)?;
    Ok(ca.own_root().clone())
}

/// The SHA-256 fingerprint of a certificate, as `openssl x509 -fingerprint -sha256` shows it.
pub fn fingerprint(der: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// A certificate in PEM, as Istio's protocol and `openssl` want it.
pub fn pem(der: &CertificateDer<'_>) -> String {
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// X.509 times have whole seconds.
fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// A positive 128-bit serial (RFC 5280 allows up to 20 octets).
fn random_serial() -> Result<[u8; 16], String> {
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| "no randomness for a serial number".to_owned())?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    Ok(serial)
}

fn bad(path: &Path, message: &str) -> IdentityError {
    IdentityError::BadCa { path: path.to_owned(), message: message.to_owned() }
}

fn create(cert_path: &Path, key_path: &Path, trust_domain: &str) -> Result<(), IdentityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| bad(key_path, &e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "ambit root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let td = format!("spiffe://{trust_domain}")
        .try_into()
        .map_err(|e: rcgen::Error| bad(cert_path, &e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(td)];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_LIFETIME).into();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial().map_err(|e| bad(cert_path, &e))?));
    let cert = params.self_signed(&key).map_err(|e| bad(cert_path, &e.to_string()))?;
    write_new(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(cert = %cert_path.display(), "created a new root CA");
    Ok(())
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let mut file =
        File::options().create(true).truncate(true).write(true).mode(mode).open(&tmp).map_err(io)?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// The CA certificate must be a CA that may sign certificates and is valid now.
fn check_ca_cert(path: &Path, der: &CertificateDer<'_>) -> Result<(), IdentityError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| bad(path, &format!("not a valid X.509 certificate: {e}")))?;
    let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(bad(path, "not a CA certificate (basicConstraints cA is not true)"));
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(bad(path, "its key usage does not allow signing certificates (keyCertSign)"));
    }
    if !cert.validity().is_valid() {
        return Err(bad(
            path,
            &format!("not valid now (valid {} to {})", cert.validity().not_before, cert.validity().not_after),
        ));
    }
    Ok(())
}

/// Reads an ECDSA or RSA private key in PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or
/// PKCS#1 (`RSA PRIVATE KEY`) PEM.
fn load_key(path: &Path, pem: &str) -> Result<KeyPair, IdentityError> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(path, &format!("no PEM private key: {e}")))?;
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(der) => der.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Sec1(der) => der::sec1_to_pkcs8(der.secret_sec1_der())
            .ok_or_else(|| bad(path, "EC PRIVATE KEY without a named curve"))?,
        PrivateKeyDer::Pkcs1(der) => der::pkcs1_to_pkcs8(der.secret_pkcs1_der()),
        _ => return Err(bad(path, "unsupported private key format")),
    };
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
    KeyPair::try_from(&der)
        .map_err(|e| bad(path, &format!("unusable private key (ECDSA P-256/P-384 or RSA expected): {e}")))
}

/// Just enough DER to wrap SEC1 and PKCS#1 keys into PKCS#8, which the signer requires.
pub(crate) mod der {
    const RSA_ENCRYPTION: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

    pub(crate) fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
        let algorithm = tlv(0x30, &[RSA_ENCRYPTION, &[0x05, 0x00]].concat());
        pkcs8(&algorithm, pkcs1)
    }

    pub(crate) fn sec1_to_pkcs8(sec1: &[u8]) -> Option<Vec<u8>> {
        let curve = named_curve(sec1)?;
        let algorithm = tlv(0x30, &[EC_PUBLIC_KEY, curve].concat());
        Some(pkcs8(&algorithm, sec1))
    }

    fn pkcs8(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
        tlv(0x30, &[&[0x02, 0x01, 0x00][..], algorithm, &tlv(0x04, key)].concat())
    }

    /// The curve OID TLV from ECPrivateKey's `[0] parameters`.
    fn named_curve(sec1: &[u8]) -> Option<&[u8]> {
        let (tag, body, _) = read(sec1)?;
        if tag != 0x30 {
            return None;
        }
        let mut rest = body;
        while !rest.is_empty() {
            let (tag, value, next) = read(rest)?;
            if tag == 0xa0 {
                let (oid_tag, _, _) = read(value)?;
                return (oid_tag == 0x06).then_some(value);
            }
            rest = next;
        }
        None
    }

    /// One TLV: tag, value, and what follows.
    fn read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }

    fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = value.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(value);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ambit-ca-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn creates_once_and_reloads_the_same_root() {
        let dir = temp_dir("create");
        let first = Ca::load_or_create(&dir, "cluster.local").expect("create");
        let second = Ca::load_or_create(&dir, "cluster.local").expect("reload");
        assert_eq!(first.roots(), second.roots());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(dir.join(CA_KEY)).expect("key").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the CA key is private");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A Secret is mounted read-only: with both files there, loading writes nothing (it used to
    /// create `.lock`, and the DaemonSet could not start).
    #[test]
    fn a_brought_ca_is_read_without_writing_to_its_directory() {
        let (made, brought) = (temp_dir("made"), temp_dir("brought"));
        let ca = Ca::load_or_create(&made, "cluster.local").expect("create");
        fs::create_dir_all(&brought).expect("dir");
        for file in [CA_CERT, CA_KEY] {
            fs::copy(made.join(file), brought.join(file)).expect("copy");
        }
        let listing = || {
            let mut names: Vec<_> =
                fs::read_dir(&brought).expect("ls").flatten().map(|e| e.file_name()).collect();
            names.sort();
            names
        };
        let before = listing();
        let loaded = Ca::load_or_create(&brought, "cluster.local").expect("load");
        assert_eq!(loaded.roots(), ca.roots());
        assert_eq!(listing(), before, "nothing written next to a brought CA");
        let _ = fs::remove_dir_all(&made);
        let _ = fs::remove_dir_all(&brought);
    }

    #[test]
    fn half_a_ca_is_an_error_naming_the_missing_file() {
        let dir = temp_dir("half");
        Ca::load_or_create(&dir, "cluster.local").expect("create");
        fs::remove_file(dir.join(CA_KEY)).expect("rm");
        let err = Ca::load_or_create(&dir, "cluster.local").err().expect("half a CA").to_string();
        assert!(err.contains("ca-key.pem") && err.contains("missing"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let (a, b) = (temp_dir("a"), temp_dir("b"));
        Ca::load_or_create(&a, "cluster.local").expect("a");
        Ca::load_or_create(&b, "cluster.local").expect("b");
        fs::copy(b.join(CA_KEY), a.join(CA_KEY)).expect("swap key");
        let err = Ca::load_or_create(&a, "cluster.local").err().expect("mismatch").to_string();
        assert!(err.contains("does not belong"), "{err}");
        let _ = fs::remove_dir_all(&a);
        let _ = fs::remove_dir_all(&b);
    }

    #[test]
    fn issued_svids_follow_the_x509_svid_standard() {
        let dir = temp_dir("svid");
        let ca = Ca::load_or_create(&dir, "cluster.local").expect("ca");
        let id = Identity::new("cluster.local", "shop", "frontend-sa");
        let svid = ca.issue(&id, Duration::from_secs(3600)).expect("issue");
        let (_, cert) = X509Certificate::from_der(svid.cert()).expect("parse");
        let san = cert.subject_alternative_name().expect("ext").expect("san");
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, ["spiffe://cluster.local/ns/shop/sa/frontend-sa"]);
        assert_eq!(san.value.general_names.len(), 1, "exactly one SAN");
        assert!(!cert.basic_constraints().expect("ext").expect("bc").value.ca);
        let ku = cert.key_usage().expect("ext").expect("ku");
        assert!(ku.critical && ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = cert.extended_key_usage().expect("ext").expect("eku").value;
        assert!(eku.server_auth && eku.client_auth);
        assert_ne!(cert.subject(), cert.issuer(), "not self-signed");
        let life = svid.not_after.duration_since(svid.not_before).expect("order");
        assert!(life >= Duration::from_secs(3600) && life <= Duration::from_secs(3661), "{life:?}");
        let _ = fs::remove_dir_all(&dir);
    }

    /// An operator's own root made with openssl, in the traditional key formats openssl writes
    /// (SEC1 for ECDSA, PKCS#1 for RSA): used as it is.
    #[test]
    fn brings_your_own_openssl_root() {
        for (name, genkey) in [
            ("ec", vec!["ecparam", "-name", "prime256v1", "-genkey", "-noout"]),
            ("rsa", vec!["genrsa", "-traditional", "2048"]),
        ] {
            let dir = temp_dir(name);
            fs::create_dir_all(&dir).expect("dir");
            let key = std::process::Command::new("openssl").args(&genkey).output().expect("openssl");
            assert!(key.status.success(), "{}", String::from_utf8_lossy(&key.stderr));
            let key_pem = String::from_utf8(key.stdout).expect("pem");
            assert!(key_pem.contains(if name == "ec" { "EC PRIVATE KEY" } else { "RSA PRIVATE KEY" }));
            fs::write(dir.join(CA_KEY), &key_pem).expect("write key");
            let cert = std::process::Command::new("openssl")
                .args(["req", "-x509", "-new", "-key"])
                .arg(dir.join(CA_KEY))
                .args(["-subj", "/O=acme/CN=acme root", "-days", "30", "-out"])
                .arg(dir.join(CA_CERT))
                .args([
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ])
                .output()
                .expect("openssl req");
            assert!(cert.status.success(), "{}", String::from_utf8_lossy(&cert.stderr));
            let ca = Ca::load_or_create(&dir, "acme.internal").expect("own root loads");
            let svid =
                ca.issue(&Identity::new("acme.internal", "a", "b"), Duration::from_secs(60)).expect("issue");
            let (_, leaf) = X509Certificate::from_der(svid.cert()).expect("parse");
            let (_, root) = X509Certificate::from_der(&ca.roots()[0]).expect("parse root");
            leaf.verify_signature(Some(root.public_key())).expect("signed by the operator's root");
            let _ = fs::remove_dir_all(&dir);
        }
    }

    fn openssl(args: &[&str], dir: &Path) -> String {
        let out =
            std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Istio's `cacerts` with an intermediate, made by openssl: the leaf goes out with the
    /// intermediate, and openssl verifies leaf → intermediate → root.
    #[test]
    fn an_intermediate_ca_sends_its_chain_and_openssl_verifies_it() {
        let dir = temp_dir("intermediate");
        fs::create_dir_all(&dir).expect("dir");
        let ec = ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out"];
        openssl(&[&ec[..], &["root.key"]].concat(), &dir);
        openssl(
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "root.key",
                "-subj",
                "/O=acme/CN=acme root",
                "-days",
                "30",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                ROOT_CERT,
            ],
            &dir,
        );
        openssl(&[&ec[..], &[CA_KEY]].concat(), &dir);
        openssl(
            &["req", "-new", "-key", CA_KEY, "-subj", "/O=acme/CN=acme intermediate", "-out", "int.csr"],
            &dir,
        );
        fs::write(
            dir.join("int.ext"),
            "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
        )
        .expect("ext");
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                "int.csr",
                "-CA",
                ROOT_CERT,
                "-CAkey",
                "root.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                "int.ext",
                "-out",
                CA_CERT,
            ],
            &dir,
        );
        let chain = format!(
            "{}{}",
            fs::read_to_string(dir.join(CA_CERT)).expect("int"),
            fs::read_to_string(dir.join(ROOT_CERT)).expect("root")
        );
        fs::write(dir.join(CERT_CHAIN), chain).expect("chain");

        let ca = Ca::load_or_create(&dir, "acme.internal").expect("cacerts with an intermediate");
        assert_eq!(ca.intermediates().len(), 1, "the intermediate goes with every leaf");
        assert_eq!(ca.roots().len(), 1);
        let id = Identity::new("acme.internal", "shop", "web");
        let svid = ca.issue(&id, Duration::from_secs(600)).expect("issue");
        assert_eq!(svid.certified_key.cert.len(), 2, "leaf and intermediate in the handshake");
        fs::write(dir.join("leaf.pem"), pem(&svid.certified_key.cert[0])).expect("leaf");
        fs::write(dir.join("untrusted.pem"), pem(&svid.certified_key.cert[1])).expect("int");
        let verdict =
            openssl(&["verify", "-CAfile", ROOT_CERT, "-untrusted", "untrusted.pem", "leaf.pem"], &dir);
        assert!(verdict.contains("leaf.pem: OK"), "{verdict}");

        // A CSR made by rcgen: the answer is leaf, intermediate, root.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = |sans: Vec<SanType>| {
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans;
            params.serialize_request(&key).expect("csr").pem().expect("pem")
        };
        let uri = |u: &str| SanType::URI(u.try_into().expect("uri"));
        let answer =
            ca.sign(&csr(vec![uri(&id.to_string())]), &id, Duration::from_secs(600)).expect("signed");
        assert_eq!(answer.len(), 3, "leaf, intermediate, root");
        fs::write(dir.join("leaf.pem"), pem(&answer[0])).expect("leaf");
        let verdict =
            openssl(&["verify", "-CAfile", ROOT_CERT, "-untrusted", "untrusted.pem", "leaf.pem"], &dir);
        assert!(verdict.contains("leaf.pem: OK"), "{verdict}");
        assert_eq!(spiffe_id(&answer[0]), id.to_string());

        // Whatever else a CSR asks for is refused, naming what.
        let other = Identity::new("acme.internal", "shop", "admin");
        let refusals = [
            (csr(vec![uri(&other.to_string())]), "asks for"),
            (csr(vec![uri(&id.to_string()), uri(&other.to_string())]), "2 subject alternative names"),
            (
                csr(vec![uri(&id.to_string()), SanType::DnsName("db.shop".try_into().expect("dns"))]),
                "exactly one SPIFFE ID",
            ),
            (csr(vec![]), "no subject alternative name"),
            ("garbage".to_owned(), "not a PEM CSR"),
        ];
        for (request, why) in refusals {
            let err = ca.sign(&request, &id, Duration::from_secs(600)).expect_err("refused");
            assert!(err.contains(why), "{err} (expected {why:?})");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    fn spiffe_id(der: &CertificateDer<'_>) -> String {
        let (_, cert) = X509Certificate::from_der(der).expect("parse");
        let san = cert.subject_alternative_name().expect("ext").expect("san");
        san.value
            .general_names
            .iter()
            .find_map(|n| {
                if let x509_parser::extensions::GeneralName::URI(u) = n {
                    Some((*u).to_owned())
                } else {
                    None
                }
            })
            .unwrap_or_default()
    }
}
