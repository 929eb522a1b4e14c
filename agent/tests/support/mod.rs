//! What the in-process tests share: a temporary embedded CA. (A directory rather than
//! `support.rs`: cargo builds every file at the top of `tests/` as a test binary of its own.)

use std::{path::PathBuf, sync::Arc, time::Duration};

use ambit::identity::{Ca, Identities};

/// The trust domain of every test CA.
pub(crate) const TRUST_DOMAIN: &str = "cluster.local";

/// An embedded CA in a directory of its own, and the identities it issues; the directory is
/// removed when the test ends, however it ends.
pub(crate) struct TestCa {
    pub(crate) identities: Arc<Identities>,
    dir: PathBuf,
}

impl TestCa {
    /// A new CA, its directory named after `name` and this process; certificates live `ttl`.
    pub(crate) fn new(name: &str, ttl: Duration) -> Self {
        let dir = std::env::temp_dir().join(format!("ambit-test-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let ca = Ca::load_or_create(&dir, TRUST_DOMAIN).expect("CA");
        let identities = Identities::embedded(ca, ttl).expect("identities");
        Self { identities, dir }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
