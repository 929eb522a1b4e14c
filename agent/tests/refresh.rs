//! When certificates are renewed, on a clock the test sets: not before half their life, right
//! after it, and at once (dropped, then issued again) once expired; and how long the refresh task
//! is told to sleep.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ambit::identity::{Ca, Identities, Identity, Svid};

const TTL: Duration = Duration::from_secs(3600);

/// A CA in a directory removed when the test ends, however it ends.
struct Fixture {
    identities: Arc<Identities>,
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ambit-refresh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let identities = Identities::embedded(Ca::load_or_create(&dir, "cluster.local").expect("CA"), TTL)
            .expect("identities");
        Self { identities, dir }
    }

    fn issue(&self, identity: &Identity) -> Arc<Svid> {
        self.identities.prefetch(identity).expect("certificate");
        self.identities.svid(identity).expect("certificate")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn certificates_are_renewed_at_half_life_and_at_once_when_expired() {
    let id = Identity::new("cluster.local", "shop", "frontend");
    type At = fn(&Svid) -> SystemTime;
    let rows: [(&str, At, bool); 4] = [
        ("just issued", |s| s.issued_at, false),
        ("a second before half its life", |s| s.refresh_at(0.5) - Duration::from_secs(1), false),
        ("a second after half its life", |s| s.refresh_at(0.5) + Duration::from_secs(1), true),
        ("expired", |s| s.not_after + Duration::from_secs(1), true),
    ];
    for (when, at, renewed) in rows {
        let fixture = Fixture::new(&when.replace(' ', "-"));
        let first = fixture.issue(&id);
        fixture.identities.refresh_due(at(&first));
        let now = fixture.identities.svid(&id).expect("a certificate is held");
        assert_eq!(now.serial != first.serial, renewed, "{when}: renewed is {renewed}");
    }
}

#[test]
fn the_refresh_task_sleeps_until_the_next_half_life() {
    let fixture = Fixture::new("sleep");
    let (a, b) = (Identity::new("cluster.local", "shop", "a"), Identity::new("cluster.local", "shop", "b"));
    let first = fixture.issue(&a);
    let ten_before = first.refresh_at(0.5) - Duration::from_secs(10);
    assert_eq!(fixture.identities.next_refresh(ten_before), Duration::from_secs(10));
    // A second certificate, due later, does not move the wake-up; the earliest one decides.
    let second = fixture.issue(&b);
    assert!(second.refresh_at(0.5) >= first.refresh_at(0.5));
    assert_eq!(fixture.identities.next_refresh(ten_before), Duration::from_secs(10));
    // Past every half-life: due now.
    assert_eq!(
        fixture.identities.next_refresh(second.refresh_at(0.5) + Duration::from_secs(1)),
        Duration::ZERO
    );
}
