//! Workload identities: SPIFFE IDs, the CA, and the X.509-SVIDs the agent keeps fresh for the
//! pods of its node.
//!
//! One SVID per identity (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`) on the
//! node, shared by every pod with that identity, asked for on first use and renewed at half its
//! lifetime. It comes from one of two issuers:
//!
//! - the embedded CA ([`ca`], `--ca-dir`): the agent signs itself (`--local`, the demo);
//! - a CA service ([`client`], `--ca-addr`): `ambit ca serve` or istiod; the key stays on the
//!   node, the CA decides. Asking takes a round trip, so it runs in the background: handshakes
//!   wait for it ([`Identities::wait`]), readiness waits for every enrolled pod's certificate.
//!
//! While the CA cannot be reached, certificates already held keep serving until they expire,
//! and renewals are retried with backoff; an expired certificate is dropped, so its pods' mTLS
//! fails closed. A connection keeps the certificate it was opened with; new handshakes use the
//! current one.

pub mod bundle;
pub mod ca;
pub mod client;
pub mod protocol;
pub mod spiffe;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, RwLock, Weak},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use self::{
    bundle::{Bundle, RootReport},
    ca::{Ca, Svid},
    client::CaClient,
    spiffe::{Identity, SpiffeError, spiffe_id_of},
};

/// Errors of the identity layer.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A CA or bundle file could not be read or written.
    #[error("{path}: {source}")]
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
    /// The trust bundle does not hold what it should.
    #[error("trust bundle {path}: {message}")]
    Bundle {
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
    /// `--ca-addr` is not an address.
    #[error("--ca-addr {url}: {message}")]
    CaAddress {
        /// As given.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The CA service could not be reached or did not answer.
    #[error("CA {addr} unreachable: {message}")]
    CaUnreachable {
        /// `host:port`.
        addr: String,
        /// Why.
        message: String,
    },
    /// The CA answered with something the agent will not present.
    #[error("CA {addr} answered with an unusable certificate: {message}")]
    BadAnswer {
        /// `host:port`.
        addr: String,
        /// What is wrong.
        message: String,
    },
    /// The CA refused.
    #[error("the CA refused ({}): {message}", .code.map_or_else(|| format!("gRPC status {status}"), |c| c.to_string()))]
    Refused {
        /// The status, when known.
        code: Option<protocol::Code>,
        /// The status as sent.
        status: String,
        /// The CA's reason.
        message: String,
    },
    /// The certificate is being asked for.
    #[error("no certificate for {0} yet: the CA has been asked")]
    Pending(String),
}

/// How far into its life a certificate is replaced: half, as ztunnel does, which leaves the
/// other half to retry if issuing fails.
const REFRESH_AT: f64 = 0.5;
/// Retries after a failed request: from this, doubling...
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// ...up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Where certificates come from.
enum Issuer {
    /// The embedded CA: signed here.
    Embedded(Box<Ca>),
    /// A CA service.
    Remote(CaClient),
}

/// A request to the CA service in flight, or the last one that failed.
#[derive(Clone, Debug, Default)]
struct Asking {
    in_flight: bool,
    failures: u32,
    retry_at: Option<SystemTime>,
    last_error: Option<String>,
}

/// The CA as the agent last found it.
#[derive(Clone, Debug, Default)]
struct CaHealth {
    last_issued: Option<SystemTime>,
    last_error: Option<String>,
    failing_since: Option<SystemTime>,
}

/// The SVIDs of this node's workloads. `svids`, `asking` and `health` are each locked alone,
/// never one while holding another: handshakes, the main loop and finished requests all take
/// them, from different threads.
pub struct Identities {
    me: Weak<Identities>,
    issuer: Issuer,
    trust_domain: String,
    ttl: Duration,
    bundle: Arc<Bundle>,
    svids: RwLock<HashMap<Identity, Arc<Svid>>>,
    asking: Mutex<HashMap<Identity, Asking>>,
    health: Mutex<CaHealth>,
    /// Bumped whenever a request ends: waiters and the agent's main loop look again.
    changed: watch::Sender<u64>,
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
    /// SHA-256 fingerprint of the root its chain ends at (what a root rotation waits on).
    #[serde(default)]
    pub root: Option<String>,
    /// Certificates sent after it in handshakes (intermediate CAs).
    #[serde(default)]
    pub intermediates: usize,
}

/// `ambit status`: where certificates come from and how that goes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaReport {
    /// `embedded` (`--ca-dir`) or the CA service's address.
    pub issuer: String,
    /// The last certificate the CA issued, seconds since the epoch.
    pub last_issued: Option<u64>,
    /// Since when requests fail (none: the last one worked).
    pub failing_since: Option<u64>,
    /// The last failure.
    pub last_error: Option<String>,
    /// Identities asked for and not yet held.
    pub pending: Vec<String>,
    /// The trust bundle.
    pub roots: Vec<RootReport>,
    /// Where the bundle is read from, if a file.
    pub bundle_file: Option<String>,
}

impl Identities {
    /// Certificates signed here by the embedded `ca`, each valid for `ttl`.
    pub fn embedded(ca: Ca, ttl: Duration) -> Result<Arc<Self>, IdentityError> {
        let bundle = Arc::new(Bundle::fixed(ca.roots())?);
        let trust_domain = ca.trust_domain().to_owned();
        Ok(Self::with(Issuer::Embedded(Box::new(ca)), trust_domain, ttl, bundle))
    }

    /// Certificates from the CA service `client`, of `trust_domain`, asked for `ttl`, verified
    /// (and peers verified) against `bundle`.
    pub fn remote(client: CaClient, trust_domain: &str, ttl: Duration, bundle: Arc<Bundle>) -> Arc<Self> {
        Self::with(Issuer::Remote(client), trust_domain.to_owned(), ttl, bundle)
    }

    fn with(issuer: Issuer, trust_domain: String, ttl: Duration, bundle: Arc<Bundle>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            issuer,
            trust_domain,
            ttl,
            bundle,
            svids: RwLock::default(),
            asking: Mutex::default(),
            health: Mutex::default(),
            changed: watch::Sender::new(0),
        })
    }

    /// The trust bundle peers are verified against.
    pub fn bundle(&self) -> &Arc<Bundle> {
        &self.bundle
    }

    /// The trust domain of the identities.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Changes whenever a request to the CA ends (to look at [`Identities::svid`] again).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The current SVID of `identity`. The embedded CA issues one now if there is none; with a
    /// CA service, the CA is asked in the background and this fails with `Pending` (or with why
    /// the last request failed, until its retry): see [`Identities::wait`].
    pub fn svid(&self, identity: &Identity) -> Result<Arc<Svid>, IdentityError> {
        if let Some(svid) = self.read().get(identity)
            && svid.not_after > SystemTime::now()
        {
            return Ok(svid.clone());
        }
        match &self.issuer {
            Issuer::Embedded(ca) => {
                let svid = Arc::new(ca.issue(identity, self.ttl)?);
                let mut svids = self.svids.write().unwrap_or_else(|e| e.into_inner());
                // Another thread may have issued one meanwhile: the first valid one stays.
                if let Some(held) = svids.get(identity)
                    && held.not_after > SystemTime::now()
                {
                    return Ok(held.clone());
                }
                info!(identity = %identity, serial = %svid.serial, "certificate issued");
                svids.insert(identity.clone(), svid.clone());
                Ok(svid)
            }
            Issuer::Remote(_) => {
                let asking = self.ask(identity, false);
                match asking.last_error {
                    Some(e) if !asking.in_flight => {
                        Err(IdentityError::Pending(format!("{identity} (last request failed: {e})")))
                    }
                    _ => Err(IdentityError::Pending(identity.to_string())),
                }
            }
        }
    }

    /// Makes sure a certificate for `identity` is held or asked for. Fails only where issuing
    /// is local (the embedded CA) and failed; a CA service's answer is awaited elsewhere.
    pub fn prefetch(&self, identity: &Identity) -> Result<(), IdentityError> {
        match (self.svid(identity), &self.issuer) {
            (Err(e), Issuer::Embedded(_)) => Err(e),
            _ => Ok(()),
        }
    }

    /// The SVID of `identity`, waiting up to `limit` for the CA if it is being asked for.
    pub async fn wait(&self, identity: &Identity, limit: Duration) -> Result<Arc<Svid>, IdentityError> {
        let mut changed = self.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            changed.borrow_and_update();
            match self.svid(identity) {
                Ok(svid) => return Ok(svid),
                Err(e) => {
                    let in_flight = self.asking_now(identity).is_some_and(|a| a.in_flight);
                    if !in_flight {
                        return Err(e);
                    }
                    if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn asking_now(&self, identity: &Identity) -> Option<Asking> {
        self.asking.lock().unwrap_or_else(|e| e.into_inner()).get(identity).cloned()
    }

    /// Starts a request for `identity` unless one is in flight or waiting for its retry time
    /// (`now`: a renewal that should not wait). Returns the request's state.
    fn ask(&self, identity: &Identity, now: bool) -> Asking {
        if !matches!(self.issuer, Issuer::Remote(_)) {
            return Asking::default();
        }
        let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
        let entry = asking.entry(identity.clone()).or_default();
        let due = now || entry.retry_at.is_none_or(|t| t <= SystemTime::now());
        if entry.in_flight || !due {
            return entry.clone();
        }
        let Some(me) = self.me.upgrade() else { return entry.clone() };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return entry.clone() };
        entry.in_flight = true;
        let state = entry.clone();
        let identity = identity.clone();
        runtime.spawn(async move {
            let Issuer::Remote(client) = &me.issuer else { return };
            let started = std::time::Instant::now();
            let result = client.fetch(&identity, me.ttl).await;
            me.finish(&identity, result, started.elapsed());
        });
        state
    }

    /// Records the end of a request that took `took` (key, CSR, round trip, checks).
    fn finish(&self, identity: &Identity, result: Result<Svid, IdentityError>, took: Duration) {
        let now = SystemTime::now();
        match result {
            Ok(svid) => {
                let serial = svid.serial.clone();
                let renewed = self
                    .svids
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(identity.clone(), Arc::new(svid))
                    .is_some();
                self.asking.lock().unwrap_or_else(|e| e.into_inner()).remove(identity);
                {
                    let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
                    health.last_issued = Some(now);
                    health.failing_since = None;
                }
                let took_ms = took.as_secs_f64() * 1000.0;
                info!(identity = %identity, serial = %serial, renewed, took_ms, "certificate issued by the CA");
            }
            Err(e) => {
                let held = self.read().get(identity).map(|s| s.not_after);
                // Back off, but try a few more times before the current certificate expires.
                let left = held.and_then(|until| until.duration_since(now).ok()).unwrap_or(RETRY_MAX);
                let pause = {
                    let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
                    let entry = asking.entry(identity.clone()).or_default();
                    let pause = RETRY_FIRST
                        .saturating_mul(1 << entry.failures.min(10))
                        .min(RETRY_MAX)
                        .min((left / 4).max(RETRY_FIRST));
                    entry.in_flight = false;
                    entry.failures += 1;
                    entry.retry_at = Some(now + pause);
                    entry.last_error = Some(e.to_string());
                    pause
                };
                {
                    let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
                    health.last_error = Some(e.to_string());
                    health.failing_since.get_or_insert(now);
                }
                match held {
                    Some(until) if until > now => {
                        warn!(identity = %identity, error = %e, retry_in = ?pause, "certificate renewal failed; the current one serves until it expires")
                    }
                    _ => {
                        error!(identity = %identity, error = %e, retry_in = ?pause, "no certificate: the CA did not issue one; this identity's mTLS fails closed")
                    }
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Renews every certificate past its refresh time and retries failed requests that are
    /// due; drops certificates that expired. A failure keeps the old certificate while valid.
    pub fn refresh_due(&self, now: SystemTime) {
        let mut expired = Vec::new();
        let due: Vec<Identity> = self
            .read()
            .iter()
            .filter(|(id, svid)| {
                if svid.not_after <= now {
                    expired.push((*id).clone());
                }
                svid.refresh_at(REFRESH_AT) <= now
            })
            .map(|(id, _)| id.clone())
            .collect();
        if !expired.is_empty() {
            let mut svids = self.svids.write().unwrap_or_else(|e| e.into_inner());
            for identity in &expired {
                error!(identity = %identity, "certificate expired before it could be renewed; dropped (its pods' mTLS fails closed until the CA answers)");
                svids.remove(identity);
            }
        }
        match &self.issuer {
            Issuer::Embedded(ca) => {
                for identity in due {
                    match ca.issue(&identity, self.ttl) {
                        Ok(svid) => {
                            info!(identity = %identity, serial = %svid.serial, "certificate refreshed");
                            self.svids
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(identity, Arc::new(svid));
                        }
                        Err(e) => {
                            warn!(identity = %identity, error = %e, "certificate refresh failed; keeping the current one")
                        }
                    }
                }
            }
            Issuer::Remote(_) => {
                let retries: Vec<Identity> = self
                    .asking
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|(_, a)| !a.in_flight && a.retry_at.is_some_and(|t| t <= now))
                    .map(|(id, _)| id.clone())
                    .collect();
                for identity in due.iter().chain(&retries).collect::<HashSet<_>>() {
                    self.ask(identity, false);
                }
            }
        }
    }

    /// Reads the trust bundle file again; certificates that no longer chain to it are renewed
    /// at once. Returns whether it changed.
    pub fn reload_bundle(&self) -> bool {
        match self.bundle.reload() {
            Ok(false) => false,
            Ok(true) => {
                let roots = self.bundle.reports();
                info!(roots = ?roots.iter().map(|r| &r.fingerprint).collect::<Vec<_>>(), "trust bundle changed");
                let orphans: Vec<Identity> = self
                    .read()
                    .iter()
                    .filter(|(_, svid)| svid.root.as_ref().is_none_or(|root| !self.bundle.trusts(root)))
                    .map(|(id, _)| id.clone())
                    .collect();
                for identity in orphans {
                    warn!(identity = %identity, "certificate does not chain to the new trust bundle; renewing now");
                    self.ask(&identity, true);
                }
                true
            }
            Err(e) => {
                error!(error = %e, "trust bundle changed but does not load; keeping the previous one");
                false
            }
        }
    }

    /// Forgets certificates (and requests) of identities no pod of this node uses any more.
    pub fn retain(&self, in_use: &HashSet<Identity>) {
        self.svids.write().unwrap_or_else(|e| e.into_inner()).retain(|id, _| in_use.contains(id));
        self.asking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, a| a.in_flight || in_use.contains(id));
    }

    /// Of `identities`, those without a valid certificate now.
    pub fn missing<'a>(&self, identities: impl IntoIterator<Item = &'a Identity>) -> Vec<Identity> {
        let now = SystemTime::now();
        let svids = self.read();
        identities
            .into_iter()
            .filter(|id| svids.get(*id).is_none_or(|s| s.not_after <= now))
            .cloned()
            .collect()
    }

    /// How long until the next certificate must be renewed, dropped or retried.
    pub fn next_refresh(&self, now: SystemTime) -> Duration {
        let left = |t: SystemTime| t.duration_since(now).unwrap_or(Duration::ZERO);
        let held: Vec<(Identity, SystemTime, SystemTime)> = self
            .read()
            .values()
            .map(|svid| (svid.identity.clone(), svid.refresh_at(REFRESH_AT), svid.not_after))
            .collect();
        let asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .flat_map(|(identity, refresh_at, not_after)| {
                // A renewal in flight or waiting for its retry is not due again; expiry still is.
                let renewing = asking.get(identity).is_some_and(|a| a.in_flight || a.retry_at.is_some());
                [(!renewing).then(|| left(*refresh_at)), Some(left(*not_after))]
            })
            .flatten()
            .chain(asking.values().filter(|a| !a.in_flight).filter_map(|a| a.retry_at.map(left)))
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
                root: svid.root.as_ref().map(ca::fingerprint),
                intermediates: svid.certified_key.cert.len().saturating_sub(1),
            })
            .collect();
        reports.sort_by(|a, b| a.identity.cmp(&b.identity));
        reports
    }

    /// The issuer's state, for `ambit status`.
    pub fn ca_report(&self) -> CaReport {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let held: HashSet<Identity> = self.read().keys().cloned().collect();
        let mut pending: Vec<String> = self
            .asking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|id| !held.contains(*id))
            .map(ToString::to_string)
            .collect();
        pending.sort();
        CaReport {
            issuer: match &self.issuer {
                Issuer::Embedded(ca) => format!("embedded ({})", ca.dir().display()),
                Issuer::Remote(client) => client.authority().to_owned(),
            },
            last_issued: health.last_issued.map(epoch),
            failing_since: health.failing_since.map(epoch),
            last_error: health.last_error.filter(|_| health.failing_since.is_some()),
            pending,
            roots: self.bundle.reports(),
            bundle_file: self.bundle.file().map(|f| f.display().to_string()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Identity, Arc<Svid>>> {
        self.svids.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
