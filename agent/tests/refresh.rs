//! When certificates are renewed, on a clock the test sets: not before half their life, right
//! after it, and at once (dropped, then issued again) once expired; and how long the refresh task
//! is told to sleep.

mod support;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use ambit::identity::{Identity, Svid};
use support::{TRUST_DOMAIN, TestCa};

const TTL: Duration = Duration::from_secs(3600);

/// A certificate for `identity`, as the proxies would ask for it.
fn issue(ca: &TestCa, identity: &Identity) -> Arc<Svid> {
    ca.identities.prefetch(identity).expect("certificate");
    ca.identities.svid(identity).expect("certificate")
}

#[test]
fn certificates_are_renewed_at_half_life_and_at_once_when_expired() {
    let id = Identity::new(TRUST_DOMAIN, "shop", "frontend");
    type At = fn(&Svid) -> SystemTime;
    let rows: [(&str, At, bool); 4] = [
        ("just issued", |s| s.issued_at, false),
        ("a second before half its life", |s| s.refresh_at(0.5) - Duration::from_secs(1), false),
        ("a second after half its life", |s| s.refresh_at(0.5) + Duration::from_secs(1), true),
        ("expired", |s| s.not_after + Duration::from_secs(1), true),
    ];
    for (when, at, renewed) in rows {
        let fixture = TestCa::new(&format!("refresh-{}", when.replace(' ', "-")), TTL);
        let first = issue(&fixture, &id);
        fixture.identities.refresh_due(at(&first));
        let now = fixture.identities.svid(&id).expect("a certificate is held");
        assert_eq!(now.serial != first.serial, renewed, "{when}: renewed is {renewed}");
    }
}

#[test]
fn the_refresh_task_sleeps_until_the_next_half_life() {
    let fixture = TestCa::new("refresh-sleep", TTL);
    let (a, b) = (Identity::new(TRUST_DOMAIN, "shop", "a"), Identity::new(TRUST_DOMAIN, "shop", "b"));
    let first = issue(&fixture, &a);
    let ten_before = first.refresh_at(0.5) - Duration::from_secs(10);
    assert_eq!(fixture.identities.next_refresh(ten_before), Duration::from_secs(10));
    // A second certificate, due later, does not move the wake-up; the earliest one decides.
    let second = issue(&fixture, &b);
    assert!(second.refresh_at(0.5) >= first.refresh_at(0.5));
    assert_eq!(fixture.identities.next_refresh(ten_before), Duration::from_secs(10));
    // Past every half-life: due now.
    assert_eq!(
        fixture.identities.next_refresh(second.refresh_at(0.5) + Duration::from_secs(1)),
        Duration::ZERO
    );
}
