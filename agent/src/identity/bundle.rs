//! The trust bundle: the roots peers (and the CA service) are verified against. One root
//! normally, old and new during a root rotation. From the embedded CA, or from `--ca-root`,
//! a PEM file re-read when it changes (a ConfigMap the operator updates), so that a rotation
//! needs no restart. A file that stops loading keeps the last good bundle: trust is never
//! dropped by a typo.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use rustls::{RootCertStore, pki_types::CertificateDer, pki_types::pem::PemObject as _};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::IdentityError;

/// One version of the bundle.
pub struct Anchors {
    /// The roots, in the file's order.
    pub roots: Vec<CertificateDer<'static>>,
    /// The same, for rustls.
    pub store: Arc<RootCertStore>,
    /// Bumped at every change, so verifiers built from an older version can be rebuilt.
    pub generation: u64,
}

/// `ambit status`: one root of the bundle.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootReport {
    /// Its subject.
    pub subject: String,
    /// SHA-256 fingerprint.
    pub fingerprint: String,
    /// End of validity, seconds since the epoch.
    pub not_after: u64,
}

/// The current bundle, and where it comes from.
pub struct Bundle {
    file: Option<PathBuf>,
    current: RwLock<Arc<Anchors>>,
    /// The file's bytes at the last look, loaded or not.
    seen: RwLock<Vec<u8>>,
}

impl Bundle {
    /// A bundle that does not change: the embedded CA's roots.
    pub fn fixed(roots: &[CertificateDer<'static>]) -> Result<Self, IdentityError> {
        let anchors = anchors(roots.to_vec(), 1)
            .map_err(|message| IdentityError::Bundle { path: PathBuf::from("(embedded CA)"), message })?;
        Ok(Self { file: None, current: RwLock::new(Arc::new(anchors)), seen: RwLock::default() })
    }

    /// The bundle of `file`: one or more PEM certificates, each a CA.
    pub fn from_file(file: &Path) -> Result<Self, IdentityError> {
        let bytes =
            std::fs::read(file).map_err(|source| IdentityError::Io { path: file.to_owned(), source })?;
        let roots =
            parse(&bytes).map_err(|message| IdentityError::Bundle { path: file.to_owned(), message })?;
        let anchors =
            anchors(roots, 1).map_err(|message| IdentityError::Bundle { path: file.to_owned(), message })?;
        Ok(Self {
            file: Some(file.to_owned()),
            current: RwLock::new(Arc::new(anchors)),
            seen: RwLock::new(bytes),
        })
    }

    /// The file the bundle is read from, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The bundle now.
    pub fn current(&self) -> Arc<Anchors> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the file again; `Ok(true)` when the bundle changed. A file that does not load
    /// leaves the bundle as it was and is reported once per change of the file.
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let Some(file) = &self.file else { return Ok(false) };
        let bytes = std::fs::read(file).map_err(|source| IdentityError::Io { path: file.clone(), source })?;
        if *self.seen.read().unwrap_or_else(|e| e.into_inner()) == bytes {
            return Ok(false);
        }
        *self.seen.write().unwrap_or_else(|e| e.into_inner()) = bytes.clone();
        let bad = |message| IdentityError::Bundle { path: file.clone(), message };
        let roots = parse(&bytes).map_err(bad)?;
        if roots == self.current().roots {
            return Ok(false);
        }
        let anchors = anchors(roots, self.current().generation + 1).map_err(bad)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(anchors);
        Ok(true)
    }

    /// What `ambit status` shows of each root.
    pub fn reports(&self) -> Vec<RootReport> {
        self.current().roots.iter().map(report).collect()
    }

    /// Whether `root` is one of the bundle's roots now.
    pub fn trusts(&self, root: &CertificateDer<'_>) -> bool {
        self.current().roots.iter().any(|r| r.as_ref() == root.as_ref())
    }
}

/// The report of one root certificate.
pub fn report(root: &CertificateDer<'_>) -> RootReport {
    let (subject, not_after) = X509Certificate::from_der(root)
        .map(|(_, c)| (c.subject().to_string(), c.validity().not_after.timestamp().max(0) as u64))
        .unwrap_or_default();
    RootReport { subject, fingerprint: super::ca::fingerprint(root), not_after }
}

fn parse(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let roots = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if roots.is_empty() {
        return Err("holds no certificate: a trust bundle needs at least one root".into());
    }
    for (i, root) in roots.iter().enumerate() {
        let (_, cert) =
            X509Certificate::from_der(root).map_err(|e| format!("certificate {}: not X.509: {e}", i + 1))?;
        if !cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca) {
            return Err(format!("certificate {} ({}) is not a CA", i + 1, cert.subject()));
        }
    }
    Ok(roots)
}

fn anchors(roots: Vec<CertificateDer<'static>>, generation: u64) -> Result<Anchors, String> {
    let mut store = RootCertStore::empty();
    for root in &roots {
        store.add(root.clone()).map_err(|e| e.to_string())?;
    }
    Ok(Anchors { roots, store: Arc::new(store), generation })
}
