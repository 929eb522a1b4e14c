//! The "shop" demo: two simulated nodes, an enrolled namespace `shop` with `frontend`,
//! `backend` and `db` under STRICT mTLS, and an `outsider` in a namespace outside the mesh.
//! Starts the real agents, sends real traffic between the pods, and shows what the mesh did.

use std::{net::SocketAddr, path::Path, time::Duration};

use ambit_tests::{Agent, Cluster, PodSpec, echo_roundtrip};
use anyhow::Context as _;
use serde_json::Value;

const HTTP: u16 = 8080;
const POSTGRES: u16 = 5432;

/// The mission's example: STRICT mTLS in shop; backend accepts only frontend's identity and db
/// only backend's.
const POLICIES: &str = include_str!("../../examples/shop/policies.yaml");
/// The same file, for `ambit check --what-if`.
const POLICIES_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/shop/policies.yaml");

pub(crate) fn run(ambit: &Path) -> anyhow::Result<()> {
    println!("ambit demo: the shop cluster — 2 nodes, 4 pods as network namespaces");
    println!("  agent binary: {}", ambit.display());
    let cluster = Cluster::builder()
        .node("node-a")
        .node("node-b")
        .namespace("shop", true)
        .namespace("legacy", false)
        .pod(pod("frontend", "node-a").port("http", HTTP))
        .pod(pod("backend", "node-b").port("http", HTTP))
        .pod(pod("db", "node-b").port("postgres", POSTGRES))
        .pod(PodSpec::new("legacy", "outsider", "node-a"))
        .build()
        .context("building the simulated cluster")?;
    cluster.write_manifest()?;
    let agents = [
        ("node-a", cluster.start_agent("node-a").context("starting the agent of node-a")?),
        ("node-b", cluster.start_agent("node-b").context("starting the agent of node-b")?),
    ];
    println!("  agents ready on node-a and node-b; namespace shop is enrolled, with no policy yet");
    println!("  cluster file: {}\n", cluster.manifest_path().display());

    let _servers = [
        cluster.pod("frontend").echo_server(HTTP)?,
        cluster.pod("backend").echo_server(HTTP)?,
        cluster.pod("db").echo_server(POSTGRES)?,
    ];
    println!("Traffic between the pods (each: connect, send 32 bytes, read the echo):\n");
    traffic(&cluster, &agents);

    let node_b = cluster.node("node-b");
    println!("\nBefore applying the shop policies, what would they do to the traffic node-b saw?");
    println!("(STRICT mTLS in shop; backend admits only frontend-sa, db only backend-sa)");
    println!("\n[node-b] $ ambit check --what-if examples/shop/policies.yaml\n");
    let file = std::fs::canonicalize(POLICIES_FILE).context(POLICIES_FILE)?;
    let what_if = node_b.ambit(&["check", "--what-if", &file.display().to_string()])?;
    print!("{}", indent(&what_if.stdout));
    print!("{}", indent(&what_if.stderr));
    println!(
        "  (exit code {}: 1 means the file would break traffic that works today)",
        what_if.status.code().unwrap_or(-1)
    );

    println!("\nApplying them (writing the cluster file):");
    println!("    PeerAuthentication shop/default: STRICT mTLS");
    println!("    AuthorizationPolicy shop/backend: ALLOW from cluster.local/ns/shop/sa/frontend-sa");
    println!("    AuthorizationPolicy shop/db: ALLOW from cluster.local/ns/shop/sa/backend-sa");
    let generations: Vec<u64> = agents.iter().map(|(_, a)| a.generation()).collect();
    cluster.set_extra_yaml(POLICIES);
    cluster.write_manifest()?;
    for ((node, agent), generation) in agents.iter().zip(generations) {
        agent
            .wait_generation_after(generation, Duration::from_secs(5))
            .with_context(|| format!("the agent of {node} did not load the policies"))?;
    }
    println!("\nThe same traffic again, as the what-if predicted:\n");
    traffic(&cluster, &agents);

    let node_a = cluster.node("node-a");
    println!("\n$ ambit check shop/frontend shop/db:{POSTGRES}\n");
    print!("{}", indent(&node_a.ambit(&["check", "shop/frontend", &format!("shop/db:{POSTGRES}")])?.stdout));
    println!("\n[node-b] $ ambit policies\n");
    print!("{}", indent(&node_b.ambit(&["policies"])?.stdout));
    println!("\n[node-b] $ ambit certs\n");
    print!("{}", indent(&node_b.ambit(&["certs"])?.stdout));
    for (node, _) in &agents {
        println!("\n[{node}] $ ambit workloads\n");
        print!("{}", indent(&cluster.node(node).ambit(&["workloads"])?.stdout));
    }
    println!("\n[node-b] $ ambit trace   (flow records from the kernel, joined with the agent's view)\n");
    print!("{}", indent(&node_b.ambit(&["trace"])?.stdout));
    println!("\n[node-b] $ ambit trace --verdict denied\n");
    print!("{}", indent(&node_b.ambit(&["trace", "--verdict", "denied"])?.stdout));
    println!("\n[node-a] $ ambit status\n");
    print!("{}", indent(&node_a.ambit(&["status"])?.stdout));
    println!(
        "\nThe what-if read the flows the agents recorded and ran the agents' own evaluator on them:\n\
         it named outsider and frontend -> db before anything was applied, and the agents then did\n\
         exactly that. In a pipeline, its exit code gates the change.\n\
         \nshop pods talk over mutual TLS with SPIFFE identities from the agents' shared CA; the kernel\n\
         steers every connection to the agent and the apps did not change. Each destination's agent\n\
         checks the verified identity against its AuthorizationPolicies before a byte reaches the app;\n\
         outsider is outside the mesh and can only send plaintext, which STRICT refuses."
    );
    Ok(())
}

/// Sends the demo's four connections and prints what each got, on the wire and why.
fn traffic(cluster: &Cluster, agents: &[(&str, Agent)]) {
    let flows = [
        ("frontend", "backend", HTTP),
        ("backend", "db", POSTGRES),
        ("frontend", "db", POSTGRES),
        ("outsider", "backend", HTTP),
    ];
    let mut rows = vec![
        ["FROM", "TO", "RESULT", "ON THE WIRE (verified identities)", "WHY (ambit check)"]
            .map(String::from)
            .to_vec(),
    ];
    for (from, to, port) in flows {
        let dst = cluster.pod(to).addr(port);
        let earlier = inbound_records(agents, from, dst).len();
        let result = cluster
            .pod(from)
            .connect(dst, Duration::from_secs(5))
            .and_then(|mut s| echo_roundtrip(&mut s, &[b'x'; 32]));
        // The destination's agent logs the connection when it ends: wait for that record.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let record = loop {
            match inbound_records(agents, from, dst).into_iter().nth(earlier) {
                None if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                record => break record,
            }
        };
        let result = match (result, &record) {
            (Ok(_), _) => "ok".to_owned(),
            (Err(_), Some(r)) if r["authz.verdict"] == "denied" => "DENIED".to_owned(),
            (Err(_), Some(r)) if r["error"].as_str().is_some_and(|e| e.contains("STRICT")) => {
                "REFUSED".to_owned()
            }
            (Err(e), _) => format!("failed: {e}"),
        };
        let wire = match &record {
            Some(r) if r["security"] == "mutual_tls" => {
                format!("mTLS {} -> {}", short(&r["src.identity"]), short(&r["dst.identity"]))
            }
            Some(_) => "plaintext (no identity)".to_owned(),
            None => "-".to_owned(),
        };
        let why = why(cluster, from, to, port);
        rows.push(vec![from.to_string(), format!("{to}:{port}"), result, wire, why]);
    }
    crate::table::print(&rows);
}

fn pod(name: &str, node: &str) -> PodSpec {
    PodSpec::new("shop", name, node).service_account(&format!("{name}-sa")).label("app", name)
}

/// `ambit check`'s one-line reason for a flow.
fn why(cluster: &Cluster, from: &str, to: &str, port: u16) -> String {
    let src = if from == "outsider" { "legacy/outsider".to_owned() } else { format!("shop/{from}") };
    let out = cluster.node("node-a").ambit(&["check", &src, &format!("shop/{to}:{port}"), "-o", "json"]);
    let Ok(report) = out.map(|o| serde_json::from_slice::<Value>(&o.stdout).unwrap_or_default()) else {
        return "-".into();
    };
    match report["verdict"].as_str() {
        Some("refused") => {
            format!("STRICT mTLS ({})", report["peer_authentication"]["decided_by"].as_str().unwrap_or("?"))
        }
        _ => report["authorization"]["reason"].as_str().unwrap_or("-").to_owned(),
    }
}

/// The destination agent's records of a flow, oldest first: it saw the verified identities (or
/// the refusal).
fn inbound_records(agents: &[(&str, Agent)], from: &str, dst: SocketAddr) -> Vec<Value> {
    let matches = |r: &Value| {
        r["direction"] == "inbound" && r["dst.addr"] == dst.to_string() && r["src.workload"] == from
    };
    agents.iter().flat_map(|(_, agent)| agent.access_records()).filter(matches).collect()
}

/// `spiffe://cluster.local/ns/shop/sa/frontend-sa` → `shop/sa/frontend-sa`.
fn short(id: &Value) -> String {
    id.as_str().map_or("-".into(), |s| s.trim_start_matches("spiffe://cluster.local/ns/").to_owned())
}

fn indent(text: &[u8]) -> String {
    String::from_utf8_lossy(text).lines().map(|l| format!("  {l}\n")).collect()
}
