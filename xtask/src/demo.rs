//! The "shop" demo: two simulated nodes, an enrolled namespace `shop` with `frontend`,
//! `backend` and `db`, and an `outsider` in a namespace outside the mesh. Starts the real agents,
//! sends real traffic between the pods, and shows what the mesh did with it.

use std::{net::SocketAddr, path::Path, time::Duration};

use ambit_tests::{Agent, Cluster, PodSpec, echo_roundtrip};
use anyhow::Context as _;

const HTTP: u16 = 8080;
const POSTGRES: u16 = 5432;

pub(crate) fn run(ambit: &Path) -> anyhow::Result<()> {
    println!("ambit demo: building the shop cluster (2 nodes, 4 pods as network namespaces)");
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
    let agents = [
        ("node-a", cluster.start_agent("node-a").context("starting the agent of node-a")?),
        ("node-b", cluster.start_agent("node-b").context("starting the agent of node-b")?),
    ];
    println!("  agents ready on node-a and node-b (cluster file {})\n", cluster.manifest_path().display());

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
    let mut rows = vec![["FROM", "TO", "RESULT", "PATH THROUGH THE MESH"].map(String::from).to_vec()];
    for (from, to, port) in flows {
        let dst = cluster.pod(to).addr(port);
        let result = cluster
            .pod(from)
            .connect(dst, Duration::from_secs(5))
            .and_then(|mut s| echo_roundtrip(&mut s, &[b'x'; 32]));
        std::thread::sleep(Duration::from_millis(150));
        let path = path_of(&agents, from, dst);
        let result = match result {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        rows.push(vec![from.to_string(), format!("{to}:{port}"), result, path]);
    }
    crate::table::print(&rows);

    println!("\nWhat each agent captured (`ambit workloads` on the node):");
    for (node, _) in &agents {
        let out = cluster.node(node).ambit(&["workloads"])?;
        println!("\n[{node}]\n{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("Agent state (`ambit status` on node-a):\n");
    let out = cluster.node("node-a").ambit(&["status"])?;
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "Every connection from or to a shop pod went through the agents (the kernel steered it there);\n\
         outsider is outside the mesh, so its own side was untouched, but backend's agent still\n\
         captured it on the way in. The next steps add mTLS identities and policy to this path."
    );
    Ok(())
}

/// Which agents saw a flow, from their access logs.
fn path_of(agents: &[(&str, Agent)], from: &str, dst: SocketAddr) -> String {
    let mut hops = Vec::new();
    for direction in ["outbound", "inbound"] {
        for (node, agent) in agents {
            for record in agent.access_records() {
                if record["dst.addr"] == dst.to_string()
                    && record["src.workload"] == from
                    && record["direction"] == direction
                {
                    hops.push(format!("{node} {direction}"));
                }
            }
        }
    }
    if hops.is_empty() { "not captured".into() } else { hops.join(" -> ") }
}
