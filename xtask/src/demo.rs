//! The "shop" demo: two simulated nodes, an enrolled namespace `shop` with `frontend`,
//! `backend` and `db` under STRICT mTLS, and an `outsider` in a namespace outside the mesh.
//! Starts the real agents, sends real traffic between the pods, and shows what the mesh did.

use std::{net::SocketAddr, path::Path, time::Duration};

use ambit_tests::{Agent, Cluster, PodSpec, echo_roundtrip};
use anyhow::Context as _;
use serde_json::Value;

const HTTP: u16 = 8080;
const POSTGRES: u16 = 5432;

const POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
";

pub(crate) fn run(ambit: &Path) -> anyhow::Result<()> {
    println!("ambit demo: the shop cluster — 2 nodes, 4 pods as network namespaces");
    println!("  agent binary: {}", ambit.display());
    let cluster = Cluster::builder()
        .node("node-a")
        .node("node-b")
        .namespace("shop", true)
        .namespace("legacy", false)
        .pod(PodSpec::new("shop", "frontend", "node-a").service_account("frontend-sa").port("http", HTTP))
        .pod(PodSpec::new("shop", "backend", "node-b").service_account("backend-sa").port("http", HTTP))
        .pod(PodSpec::new("shop", "db", "node-b").service_account("db-sa").port("postgres", POSTGRES))
        .pod(PodSpec::new("legacy", "outsider", "node-a"))
        .build()
        .context("building the simulated cluster")?;
    cluster.set_extra_yaml(POLICIES);
    cluster.write_manifest()?;
    let agents = [
        ("node-a", cluster.start_agent("node-a").context("starting the agent of node-a")?),
        ("node-b", cluster.start_agent("node-b").context("starting the agent of node-b")?),
    ];
    println!(
        "  agents ready on node-a and node-b; namespace shop is enrolled, with PeerAuthentication STRICT"
    );
    println!("  cluster file: {}\n", cluster.manifest_path().display());

    let _servers = [
        cluster.pod("frontend").echo_server(HTTP)?,
        cluster.pod("backend").echo_server(HTTP)?,
        cluster.pod("db").echo_server(POSTGRES)?,
    ];

    let flows = [
        ("frontend", "backend", HTTP),
        ("backend", "db", POSTGRES),
        ("frontend", "db", POSTGRES),
        ("outsider", "backend", HTTP),
    ];
    println!("Traffic between the pods (each: connect, send 32 bytes, read the echo):\n");
    let mut rows = vec![
        ["FROM", "TO", "RESULT", "ON THE WIRE", "IDENTITIES (verified by mTLS)"].map(String::from).to_vec(),
    ];
    for (from, to, port) in flows {
        let dst = cluster.pod(to).addr(port);
        let result = cluster
            .pod(from)
            .connect(dst, Duration::from_secs(5))
            .and_then(|mut s| echo_roundtrip(&mut s, &[b'x'; 32]));
        std::thread::sleep(Duration::from_millis(150));
        let record = inbound_record(&agents, from, dst);
        let result = match (result, &record) {
            (Ok(_), _) => "ok".to_owned(),
            (Err(_), Some(r)) if r["error"].is_string() => {
                r["error"].as_str().unwrap_or_default().trim_start_matches("denied: ").to_owned()
            }
            (Err(e), _) => format!("failed: {e}"),
        };
        let (wire, identities) = match &record {
            Some(r) if r["security"] == "mutual_tls" => (
                "HBONE mTLS".to_owned(),
                format!("{} -> {}", short(&r["src.identity"]), short(&r["dst.identity"])),
            ),
            Some(_) => ("plaintext".to_owned(), "none (not in the mesh)".to_owned()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        rows.push(vec![from.to_string(), format!("{to}:{port}"), result, wire, identities]);
    }
    crate::table::print(&rows);

    for (node, _) in &agents {
        println!("\n[{node}] `ambit workloads`:\n");
        print!("{}", indent(&cluster.node(node).ambit(&["workloads"])?.stdout));
        println!("\n[{node}] `ambit certs`:\n");
        print!("{}", indent(&cluster.node(node).ambit(&["certs"])?.stdout));
    }
    println!("\n[node-a] `ambit status`:\n");
    print!("{}", indent(&cluster.node("node-a").ambit(&["status"])?.stdout));
    println!(
        "\nshop pods talk over mutual TLS with their SPIFFE identities, issued by the agents' shared CA\n\
         (the kernel steers every connection to the agent; the apps did not change). outsider is not in\n\
         the mesh, so it can only send plaintext, which STRICT refuses. Next: AuthorizationPolicy."
    );
    Ok(())
}

/// The destination agent's record of a flow: it saw the verified identities (or the refusal).
fn inbound_record(agents: &[(&str, Agent)], from: &str, dst: SocketAddr) -> Option<Value> {
    agents.iter().flat_map(|(_, agent)| agent.access_records()).find(|r| {
        r["direction"] == "inbound" && r["dst.addr"] == dst.to_string() && r["src.workload"] == from
    })
}

/// `spiffe://cluster.local/ns/shop/sa/frontend-sa` → `shop/sa/frontend-sa`.
fn short(id: &Value) -> String {
    id.as_str().map_or("-".into(), |s| s.trim_start_matches("spiffe://cluster.local/ns/").to_owned())
}

fn indent(text: &[u8]) -> String {
    String::from_utf8_lossy(text).lines().map(|l| format!("  {l}\n")).collect()
}
