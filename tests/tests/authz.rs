//! End to end: AuthorizationPolicy enforced by the destination agent, `ambit check` predicting
//! exactly what the agents do, runtime policy changes (including for open connections), and
//! bad policies keeping the last good set in force.

use std::{
    io::{ErrorKind, Read as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use ambit_tests::{Agent, Cluster, PodSpec, echo_roundtrip};
use serde_json::Value;

const HTTP: u16 = 8080;
const ADMIN: u16 = 9090;
const STEP: Duration = Duration::from_secs(5);

/// The mission's example (examples/shop): STRICT in shop; backend accepts only frontend-sa, db only backend-sa.
const POLICIES: &str = include_str!("../../examples/shop/policies.yaml");

fn shop() -> (Cluster, Agent, Agent) {
    let cluster = Cluster::builder()
        .shop()
        // Forgot spec.serviceAccountName: runs as "default".
        .pod(PodSpec::new("shop", "lazy", "a").label("app", "lazy"))
        .build()
        .expect("cluster");
    cluster.set_extra_yaml(POLICIES);
    cluster.write_manifest().expect("write");
    let a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    (cluster, a, b)
}

/// Connects, sends, reads the echo: `Ok` when it came back.
fn attempt(cluster: &Cluster, from: &str, to: SocketAddr) -> Result<(), ErrorKind> {
    cluster.pod(from).attempt(to)
}

fn check(cluster: &Cluster, from: &str, to: &str, port: u16) -> Value {
    let out = cluster
        .node("a")
        .ambit(&["check", from, &format!("{to}:{port}"), "-o", "json"])
        .expect("ambit check");
    assert!(out.status.success(), "ambit check: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn the_four_shop_connections_behave_as_stated_and_as_checked() {
    let (cluster, _a, b) = shop();
    let apps: Vec<_> = ["frontend", "backend", "db"]
        .into_iter()
        .map(|p| (p, cluster.pod(p).echo_server(HTTP).expect("app")))
        .collect();
    let seen = |pod: &str| apps.iter().find(|(p, _)| *p == pod).map_or(0, |(_, app)| app.peers().len());

    assert_eq!(attempt(&cluster, "frontend", cluster.pod("backend").addr(HTTP)), Ok(()));
    assert_eq!(attempt(&cluster, "backend", cluster.pod("db").addr(HTTP)), Ok(()));
    let db_before = seen("db");
    let started = Instant::now();
    let denied = attempt(&cluster, "frontend", cluster.pod("db").addr(HTTP));
    assert!(matches!(denied, Err(ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof)), "{denied:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "denied at once");
    assert_eq!(seen("db"), db_before, "not a byte reached db");
    let backend_before = seen("backend");
    assert!(attempt(&cluster, "outsider", cluster.pod("backend").addr(HTTP)).is_err());
    assert_eq!(seen("backend"), backend_before);

    // The denial is logged once, by the destination, with who, where and why.
    let denial = b
        .wait_for_event(STEP, |e| e["target"] == "access" && e["authz.verdict"] == "denied")
        .expect("denial record");
    assert_eq!(denial["src.workload"], "frontend");
    assert_eq!(denial["dst.workload"], "db");
    assert_eq!(denial["src.identity"], "spiffe://cluster.local/ns/shop/sa/frontend-sa");
    assert_eq!(denial["dst.addr"], cluster.pod("db").addr(HTTP).to_string());
    assert!(
        denial["authz.reason"]
            .as_str()
            .is_some_and(|r| r.contains("no ALLOW policy matched") && r.contains("shop/db"))
    );
    let denials = b.access_records().iter().filter(|e| e["authz.verdict"] == "denied").count();
    assert_eq!(denials, 1, "logged once");

    // `ambit check` says the same, with reasons.
    let c = check(&cluster, "shop/frontend", "shop/backend", HTTP);
    assert_eq!((c["verdict"].as_str(), c["transport"].as_str()), (Some("allowed"), Some("mtls")));
    assert_eq!(c["authorization"]["policy"], "shop/backend");
    assert_eq!(check(&cluster, "shop/backend", "shop/db", HTTP)["verdict"], "allowed");
    let c = check(&cluster, "shop/frontend", "shop/db", HTTP);
    assert_eq!(c["verdict"], "denied");
    assert_eq!(c["source"]["identity"], "spiffe://cluster.local/ns/shop/sa/frontend-sa");
    let c = check(&cluster, "legacy/outsider", "shop/backend", HTTP);
    assert_eq!(c["verdict"], "refused");
    assert_eq!(c["peer_authentication"]["decided_by"], "shop/default");

    // The table form fits one screen and says it in words.
    let out = cluster.node("a").ambit(&["check", "shop/frontend", "shop/db:8080"]).expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("DENIED") && text.contains("mTLS (HBONE)") && text.contains("no ALLOW policy matched"),
        "{text}"
    );
    assert!(text.lines().count() <= 12, "{text}");
}

#[test]
fn agents_verdicts_match_check_for_every_pair() {
    let (cluster, _a, _b) = shop();
    let _apps: Vec<_> = ["frontend", "backend", "db"]
        .into_iter()
        .flat_map(|p| {
            [cluster.pod(p).echo_server(HTTP).expect("app"), cluster.pod(p).echo_server(ADMIN).expect("app")]
        })
        .collect();
    let mut seen = Vec::new();
    for from in ["shop/frontend", "shop/backend", "shop/lazy", "legacy/outsider"] {
        for to in ["shop/frontend", "shop/backend", "shop/db"] {
            for port in [HTTP, ADMIN] {
                let predicted = check(&cluster, from, to, port);
                let pod = |s: &str| s.rsplit('/').next().unwrap_or(s).to_owned();
                let actual = attempt(&cluster, &pod(from), cluster.pod(&pod(to)).addr(port)).is_ok();
                let verdict = predicted["verdict"].as_str().unwrap_or_default().to_owned();
                assert_eq!(
                    actual,
                    verdict == "allowed",
                    "{from} -> {to}:{port}: check said {verdict}, the agents did {actual}"
                );
                seen.push(verdict);
            }
        }
    }
    for kind in ["allowed", "denied", "refused"] {
        assert!(seen.iter().any(|v| v == kind), "the grid covers {kind}: {seen:?}");
    }
}

#[test]
fn a_forgotten_service_account_is_denied_and_explained() {
    let (cluster, _a, _b) = shop();
    let _backend = cluster.pod("backend").echo_server(HTTP).expect("app");
    assert!(attempt(&cluster, "lazy", cluster.pod("backend").addr(HTTP)).is_err());
    let out = cluster.node("a").ambit(&["check", "shop/lazy", "shop/backend:8080"]).expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DENIED"), "{text}");
    assert!(text.contains("runs as service account default"), "{text}");
    assert!(text.contains("no spec.serviceAccountName"), "{text}");
    assert!(text.contains("cluster.local/ns/shop/sa/frontend-sa"), "{text}");
}

#[test]
fn policy_changes_apply_to_new_and_open_connections() {
    let (cluster, _a, b) = shop();
    let _backend = cluster.pod("backend").echo_server(HTTP).expect("app");
    let dst = cluster.pod("backend").addr(HTTP);
    let mut open = cluster.pod("frontend").connect(dst, STEP).expect("allowed");
    assert_eq!(echo_roundtrip(&mut open, b"before").expect("echo"), b"before");

    // Revoke: frontend is no longer allowed into backend.
    let generation = b.generation();
    cluster.set_extra_yaml(&POLICIES.replace("frontend-sa]", "nobody]"));
    cluster.write_manifest().expect("write");
    b.wait_generation_after(generation, STEP).expect("reloaded");
    assert!(attempt(&cluster, "frontend", dst).is_err(), "new connections follow the new policy at once");
    // The open connection is closed too.
    open.set_read_timeout(Some(STEP)).expect("timeout");
    let mut buf = [0u8; 8];
    let read = open.read(&mut buf);
    // Closed by the agent: end of stream or reset, not a read that merely timed out.
    let closed = match &read {
        Ok(0) => true,
        Err(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
        ),
        Ok(_) => false,
    };
    assert!(closed, "the open connection was closed: {read:?}");
    b.wait_for_event(STEP, |e| e["message"] == "closing an open connection the new policy no longer allows")
        .expect("logged");

    // Restore: allowed again.
    let generation = b.generation();
    cluster.set_extra_yaml(POLICIES);
    cluster.write_manifest().expect("write");
    b.wait_generation_after(generation, STEP).expect("reloaded");
    assert_eq!(attempt(&cluster, "frontend", dst), Ok(()));
}

#[test]
fn a_bad_policy_is_named_and_the_last_good_set_stays() {
    let (cluster, _a, b) = shop();
    let _apps = [
        cluster.pod("backend").echo_server(HTTP).expect("app"),
        cluster.pod("db").echo_server(HTTP).expect("app"),
    ];
    let broken = POLICIES.replace(
        "principals: [cluster.local/ns/shop/sa/backend-sa]",
        "principal: [cluster.local/ns/shop/sa/backend-sa]",
    );
    cluster.set_extra_yaml(&broken);
    cluster.write_manifest().expect("write");
    let event = b
        .wait_for_event(STEP, |e| e["message"].as_str().is_some_and(|m| m.contains("cluster file rejected")))
        .expect("rejected");
    let error = event["error"].as_str().unwrap_or_default();
    assert!(error.contains("AuthorizationPolicy") && error.contains("principal"), "{error}");
    // Still the last good policies: allowed stays allowed, denied stays denied (never open).
    assert_eq!(attempt(&cluster, "backend", cluster.pod("db").addr(HTTP)), Ok(()));
    assert!(attempt(&cluster, "frontend", cluster.pod("db").addr(HTTP)).is_err());

    let unsupported = POLICIES.replace(
        "action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend-sa]}}]",
        "action: CUSTOM\n  provider: {name: ext}",
    );
    cluster.set_extra_yaml(&unsupported);
    cluster.write_manifest().expect("write");
    b.wait_for_event(STEP, |e| e["error"].as_str().is_some_and(|m| m.contains("CUSTOM")))
        .expect("CUSTOM rejected");
    assert_eq!(attempt(&cluster, "frontend", cluster.pod("backend").addr(HTTP)), Ok(()));
}

#[test]
fn policies_lists_what_is_in_force() {
    let (cluster, _a, _b) = shop();
    let out = cluster.node("b").ambit(&["policies"]).expect("ambit policies");
    let text = String::from_utf8_lossy(&out.stdout);
    let db = text.lines().find(|l| l.starts_with("shop/db")).expect("db listed");
    assert!(db.contains("STRICT (shop/default)") && db.contains("ALLOW shop/db (1 rule)"), "{text}");
    let backend = text.lines().find(|l| l.starts_with("shop/backend")).expect("backend listed");
    assert!(backend.contains("ALLOW shop/backend"), "{text}");
}

#[test]
fn repeated_denials_reuse_one_mtls_connection() {
    let (cluster, _a, _b) = shop();
    let _db = cluster.pod("db").echo_server(HTTP).expect("app");
    let db = cluster.pod("db").addr(HTTP);
    let mut capture = cluster.capture().expect("tcpdump on the bridge");
    for _ in 0..5 {
        assert!(attempt(&cluster, "frontend", db).is_err(), "db admits only backend-sa");
    }
    capture.finish().expect("capture");
    // The destination's 401 is its answer to the stream, not a broken connection: the pooled
    // connection carries every attempt, and no new TLS handshake is made per denial.
    let syns = capture
        .count(&format!(
            "dst host {} and tcp dst port 15008 and tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0",
            db.ip()
        ))
        .expect("tcpdump -r");
    assert_eq!(syns, 1, "one connection to db's HBONE port for five denied attempts");
}

/// Istio's ambient rule for HTTP attributes in L4 policies: an ALLOW rule that uses one in any
/// `from`, `to` or `when` entry is dropped as a whole, even next to a plain L4 entry that would
/// match; a DENY rule is enforced on its L4 parts. `remoteIpBlocks` and `remote.ip` count as
/// HTTP attributes (the client behind proxies), not as the source address.
#[test]
fn allow_rules_with_http_attributes_are_dropped_as_istio_does() {
    let (cluster, a, b) = shop();
    // Both agents must have the edit: the destination enforces, node a answers `ambit check`.
    let reload = |yaml: &str| {
        let generations = (a.generation(), b.generation());
        cluster.set_extra_yaml(yaml);
        cluster.write_manifest().expect("write");
        a.wait_generation_after(generations.0, STEP).expect("a reloaded");
        b.wait_generation_after(generations.1, STEP).expect("b reloaded");
    };
    let _backend = cluster.pod("backend").echo_server(HTTP).expect("app");
    let dst = cluster.pod("backend").addr(HTTP);
    let frontend = cluster.pod("frontend").ip();
    // The control: the shop policy's plain rule admits frontend.
    assert_eq!(attempt(&cluster, "frontend", dst), Ok(()));
    let plain_rule = "  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend-sa]}}]";
    assert!(POLICIES.contains(plain_rule));
    let mixed = [
        (
            "from",
            format!(
                "  - from: [{{source: {{remoteIpBlocks: ['{frontend}']}}}}, {{source: {{principals: [cluster.local/ns/shop/sa/frontend-sa]}}}}]"
            ),
            "remoteIpBlocks",
        ),
        (
            "to",
            format!(
                "{plain_rule}\n    to: [{{operation: {{methods: [GET]}}}}, {{operation: {{ports: ['{HTTP}']}}}}]"
            ),
            "methods",
        ),
        (
            "when",
            format!(
                "{plain_rule}\n    when: [{{key: remote.ip, values: ['{frontend}']}}, {{key: source.namespace, values: [shop]}}]"
            ),
            "remote.ip",
        ),
    ];
    for (place, rule, field) in mixed {
        reload(&POLICIES.replace(plain_rule, &rule));
        assert!(
            attempt(&cluster, "frontend", dst).is_err(),
            "HTTP attribute in {place}: the rule is dropped"
        );
        let warning = b
            .wait_for_event(STEP, |e| {
                e["policy"] == "shop/backend"
                    && e["message"].as_str().is_some_and(|m| m.contains(field) && m.contains("dropped"))
            })
            .unwrap_or_else(|e| panic!("a warning naming the policy and {field}: {e}"));
        assert!(warning["message"].as_str().is_some_and(|m| m.contains("spec.rules[0]")), "{warning}");
        let c = check(&cluster, "shop/frontend", "shop/backend", HTTP);
        assert_eq!(c["verdict"], "denied", "ambit check agrees ({place}): {c}");
        assert!(c["hints"].to_string().contains(field), "ambit check says why: {c}");
    }

    // DENY: the HTTP part is ignored, the L4 part decides.
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  selector: {matchLabels: {app: backend}}\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n    to: [{operation: {paths: ['/admin']}}]\n";
    reload(&format!("{POLICIES}{deny}"));
    assert!(attempt(&cluster, "frontend", dst).is_err(), "a DENY with paths denies at L4");
    assert_eq!(
        check(&cluster, "shop/frontend", "shop/backend", HTTP)["authorization"]["policy"],
        "shop/no-admin"
    );
}

/// `ambit check` for clients that are not pods: an address, a CIDR block, and a pod named by
/// its address; STRICT refuses the plaintext client as the agents do (the control: a real
/// plaintext connection from the outsider pod is refused too).
#[test]
fn check_answers_for_addresses_outside_the_mesh() {
    let (cluster, _a, _b) = shop();
    let _backend = cluster.pod("backend").echo_server(HTTP).expect("app");
    let address = check(&cluster, "192.0.2.7", "shop/backend", HTTP);
    assert_eq!(address["verdict"], "refused", "{address}");
    assert!(address["source"]["pod"].is_null() && address["source"]["in_mesh"] == false, "{address}");
    assert_eq!(address["source"]["ip"], "192.0.2.7");
    let hints = address["hints"].to_string();
    assert!(hints.contains("192.0.2.7 is outside the mesh") && hints.contains("portLevelMtls"), "{hints}");
    let block = check(&cluster, "192.0.2.0/24", "shop/backend", HTTP);
    assert_eq!(block["verdict"], "refused", "{block}");
    assert!(block["hints"].to_string().contains("192.0.2.0 and 192.0.2.255"), "{block}");
    // A pod's address is that pod.
    let outsider_ip = cluster.pod("outsider").ip().to_string();
    let by_ip = check(&cluster, &outsider_ip, "shop/backend", HTTP);
    assert_eq!(by_ip["source"]["pod"], "legacy/outsider", "{by_ip}");
    assert_eq!(by_ip["verdict"], "refused");
    assert!(
        attempt(&cluster, "outsider", cluster.pod("backend").addr(HTTP)).is_err(),
        "and the agents refuse it"
    );
    let bad = cluster.node("a").ambit(&["check", "10.0.0.0/99", "shop/backend:8080"]).expect("check");
    assert_eq!(bad.status.code(), Some(1), "the agent names what it cannot answer, as for an unknown pod");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("10.0.0.0/99"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
