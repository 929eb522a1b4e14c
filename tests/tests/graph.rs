//! End to end: the service graph page on the agent's admin port, loaded by a real browser
//! (Debian's headless Chromium, in the node's network namespace as `kubectl port-forward` would
//! reach it) during a running scenario: the rendered DOM has the workloads and the edges, the
//! mTLS edge with its lock, the denied and refused edges marked with their deciding policy, and
//! the page refreshes itself. A screenshot is kept for people.

use std::{path::PathBuf, process::Command, time::Duration};

use ambit_tests::Cluster;
use serde_json::Value;

const HTTP: u16 = 8080;
const POLICIES: &str = include_str!("../../examples/shop/policies.yaml");

/// Runs headless Chromium on node `b` against the graph page with `args`.
fn chromium(cluster: &Cluster, profile: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut command = Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        // Long enough for the first draw and a few refreshes (every 2 s of the page's time).
        "--virtual-time-budget=7000",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command.args(args);
    command.arg("http://127.0.0.1:15000/graph");
    let out = cluster.node("b").command_output(command, Duration::from_secs(90)).expect("chromium runs");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The opening tag of the element whose attributes start with `start`, if the DOM has one.
fn tag<'a>(dom: &'a str, start: &str) -> Option<&'a str> {
    let at = dom.find(start)?;
    let end = dom[at..].find('>')? + at;
    Some(&dom[at..end])
}

/// The `<title>` text of the edge whose opening tag is `opening`.
fn title_after<'a>(dom: &'a str, opening: &str) -> &'a str {
    let at = dom.find(opening).expect("edge");
    let rest = &dom[at..];
    let start = rest.find("<title>").expect("title") + "<title>".len();
    let end = rest.find("</title>").expect("title end");
    &rest[start..end]
}

#[test]
fn the_graph_page_draws_the_traffic_in_a_real_browser() {
    let cluster = Cluster::builder().shop().build().expect("cluster");
    cluster.set_extra_yaml(POLICIES);
    cluster.write_manifest().expect("write");
    let _a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    let _apps: Vec<_> =
        ["backend", "db"].into_iter().map(|p| cluster.pod(p).echo_server(HTTP).expect("app")).collect();

    for _ in 0..3 {
        assert_eq!(cluster.pod("frontend").attempt(cluster.pod("backend").addr(HTTP)), Ok(()));
    }
    assert!(cluster.pod("frontend").attempt(cluster.pod("db").addr(HTTP)).is_err(), "denied by shop/db");
    assert!(cluster.pod("outsider").attempt(cluster.pod("backend").addr(HTTP)).is_err(), "refused by STRICT");
    assert_eq!(cluster.pod("backend").attempt(cluster.pod("db").addr(HTTP)), Ok(()));

    // What the page draws, as the agent serves it: each connection counted once.
    let mut graph = Value::Null;
    ambit_tests::wait_until(
        Duration::from_secs(5),
        "the three connections to backend, closed, in the graph",
        || {
            graph = b.admin_json("/graph.json?minutes=5").unwrap_or_default();
            let edges = graph["edges"].as_array().cloned().unwrap_or_default();
            edges.iter().any(|e| {
                e["src"] == "shop/frontend"
                    && e["dst"] == "shop/backend"
                    && e["denied"] == false
                    && e["connections"] == 3
                    && e["bytes_sent"].as_u64() > Some(0)
            })
        },
    );
    let ids: Vec<&str> =
        graph["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["id"].as_str()).collect();
    for pod in ["shop/frontend", "shop/backend", "shop/db", "legacy/outsider"] {
        assert!(ids.contains(&pod), "{pod} in {ids:?}");
    }

    let profile = tempdir("profile");
    let out = chromium(&cluster, &profile, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout);
    for pod in ["shop/frontend", "shop/backend", "shop/db", "legacy/outsider"] {
        assert!(dom.contains(&format!("data-id=\"{pod}\"")), "node {pod} drawn:\n{dom}");
    }
    let allowed = r#"<g class="edge mtls" data-src="shop/frontend" data-dst="shop/backend""#;
    let allowed_tag = tag(&dom, allowed).unwrap_or_else(|| panic!("the mTLS edge:\n{dom}"));
    assert!(allowed_tag.contains(r#"data-connections="3""#), "{allowed_tag}");
    let allowed_at = dom.find(allowed).expect("edge");
    let allowed_edge = dom[allowed_at..].split("</g>").next().unwrap_or_default();
    assert!(allowed_edge.contains(r#"<g class="lock""#), "with a lock: {allowed_edge}");
    let plain_at = dom.find(r#"data-src="legacy/outsider""#).expect("outsider's edge");
    let plain_edge = dom[plain_at..].split("</title>").next().unwrap_or_default();
    assert!(!plain_edge.contains(r#"class="lock""#), "plaintext has no lock: {plain_edge}");

    let denied = r#"<g class="edge mtls denied" data-src="shop/frontend" data-dst="shop/db""#;
    assert!(tag(&dom, denied).is_some(), "the denied edge, in red:\n{dom}");
    assert!(title_after(&dom, denied).contains("shop/db"), "its deciding policy on hover");
    let refused = r#"<g class="edge plaintext denied" data-src="legacy/outsider" data-dst="shop/backend""#;
    assert!(tag(&dom, refused).is_some(), "the refused plaintext edge:\n{dom}");
    assert!(title_after(&dom, refused).contains("STRICT"), "{}", title_after(&dom, refused));
    // The control: what was allowed is not marked denied.
    assert!(
        tag(&dom, r#"<g class="edge mtls" data-src="shop/backend" data-dst="shop/db""#).is_some(),
        "{dom}"
    );
    // Live: the page fetched the graph again on its own.
    let refreshes = tag(&dom, "<svg id=\"graph\"")
        .and_then(|t| t.split("data-refreshes=\"").nth(1))
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse::<u32>().ok());
    assert!(refreshes >= Some(2), "refreshed: {refreshes:?}");

    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("service-graph.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(
        &cluster,
        &profile,
        &[&format!("--screenshot={}", screenshot.display()), "--window-size=1280,800"],
    );
    let png = std::fs::read(&screenshot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real picture ({} bytes)", png.len());
    let _ = std::fs::remove_dir_all(&profile);
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ambit-graph-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}
