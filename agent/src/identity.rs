//! Workload identities: SPIFFE IDs, the embedded CA, and the X.509-SVIDs the agent issues and
//! keeps fresh for the pods of its node.
//!
//! One SVID per identity (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`) on the
//! node, shared by every pod with that identity, issued on first use and re-issued at half its
//! lifetime. A connection keeps the certificate it was opened with; new handshakes use the
//! current one.

pub mod ca;
pub mod spiffe;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use self::{
    ca::{Ca, Svid},
    spiffe::{Identity, SpiffeError},
};

/// Errors of the identity layer.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A CA file could not be read or written.
    #[error("CA file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CA file does not hold what it should.
    #[error("CA file {path}: {message}")]
    BadCa {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Issuing a certificate failed.
    #[error("issuing a certificate for {identity}: {message}")]
    Issue {
        /// For whom.
        identity: String,
        /// Why.
        message: String,
    },
}

/// How far into its life a certificate is replaced: half, as ztunnel does, which leaves the
/// other half to retry if issuing fails.
const REFRESH_AT: f64 = 0.5;

/// The SVIDs of this node's workloads.
pub struct Identities {
    ca: Ca,
    ttl: Duration,
    svids: RwLock<HashMap<Identity, Arc<Svid>>>,
}

/// `ambit certs`: one certificate the agent holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertReport {
    /// SPIFFE ID.
    pub identity: String,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity, seconds since the epoch.
    pub not_before: u64,
    /// End of validity, seconds since the epoch.
    pub not_after: u64,
    /// When it will be replaced, seconds since the epoch.
    pub refresh_at: u64,
    /// Pods of this node that present it.
    pub pods: Vec<String>,
}

impl Identities {
    /// Certificates from `ca`, each valid for `ttl`.
    pub fn new(ca: Ca, ttl: Duration) -> Self {
        Self { ca, ttl, svids: RwLock::new(HashMap::new()) }
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The trust domain of the CA's identities.
    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// The current SVID of `identity`, issued now if there is none.
    pub fn svid(&self, identity: &Identity) -> Result<Arc<Svid>, IdentityError> {
        if let Some(svid) = self.read().get(identity) {
            return Ok(svid.clone());
        }
        let svid = Arc::new(self.ca.issue(identity, self.ttl)?);
        info!(identity = %identity, serial = %svid.serial, "certificate issued");
        let mut svids = self.svids.write().unwrap_or_else(|e| e.into_inner());
        Ok(svids.entry(identity.clone()).or_insert(svid).clone())
    }

    /// Re-issues every certificate past its refresh time. A failure keeps the old certificate
    /// (still valid) and is retried on the next call.
    pub fn refresh_due(&self, now: SystemTime) {
        let due: Vec<Identity> = self
            .read()
            .iter()
            .filter(|(_, svid)| svid.refresh_at(REFRESH_AT) <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for identity in due {
            match self.ca.issue(&identity, self.ttl) {
                Ok(svid) => {
                    info!(identity = %identity, serial = %svid.serial, "certificate refreshed");
                    self.svids.write().unwrap_or_else(|e| e.into_inner()).insert(identity, Arc::new(svid));
                }
                Err(e) => {
                    warn!(identity = %identity, error = %e, "certificate refresh failed; keeping the current one")
                }
            }
        }
    }

    /// Forgets certificates of identities no pod of this node uses any more.
    pub fn retain(&self, in_use: &HashSet<Identity>) {
        self.svids.write().unwrap_or_else(|e| e.into_inner()).retain(|id, _| in_use.contains(id));
    }

    /// How long until the next certificate must be refreshed (for the refresh timer).
    pub fn next_refresh(&self, now: SystemTime) -> Duration {
        self.read()
            .values()
            .map(|svid| svid.refresh_at(REFRESH_AT).duration_since(now).unwrap_or(Duration::ZERO))
            .min()
            .unwrap_or(Duration::from_secs(60))
    }

    /// Reports of every certificate held, with the pods that present it.
    pub fn reports(&self, pods: &HashMap<Identity, Vec<String>>) -> Vec<CertReport> {
        let mut reports: Vec<CertReport> = self
            .read()
            .values()
            .map(|svid| CertReport {
                identity: svid.identity.to_string(),
                serial: svid.serial.clone(),
                not_before: epoch(svid.not_before),
                not_after: epoch(svid.not_after),
                refresh_at: epoch(svid.refresh_at(REFRESH_AT)),
                pods: pods.get(&svid.identity).cloned().unwrap_or_default(),
            })
            .collect();
        reports.sort_by(|a, b| a.identity.cmp(&b.identity));
        reports
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Identity, Arc<Svid>>> {
        self.svids.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
