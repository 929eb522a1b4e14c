//! End to end: IPv6-only and dual-stack pods through the mesh (capture, HBONE, STRICT, policy
//! by address, probes, flows, `ambit check`), in both families.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ambit_tests::{Agent, Cluster, PodSpec, wait_until};
use serde_json::Value;

const HTTP: u16 = 8080;
const STEP: Duration = Duration::from_secs(5);
const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n---\n";

fn inbound_to(agent: &Agent, dst: SocketAddr) -> Value {
    agent
        .wait_for_event(STEP, |e| {
            e["target"] == "access" && e["direction"] == "inbound" && e["dst.addr"] == dst.to_string()
        })
        .unwrap_or_else(|e| panic!("inbound record for {dst}: {e}"))
}

fn check(cluster: &Cluster, from: &str, to: SocketAddr) -> Value {
    let to = match to.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", to.port()),
        IpAddr::V4(_) => to.to_string(),
    };
    let out = cluster.node("a").ambit(&["check", from, &to, "-o", "json"]).expect("ambit check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Dual-stack client and server: mTLS over IPv4 and over IPv6 (before, IPv4 to a dual-stack pod
/// failed the CONNECT authority check on its v4-mapped local address), STRICT refusing plaintext
/// in both, kubelet probes from the node passing in both.
#[test]
fn dual_stack_pods_talk_over_both_families() {
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("shop", true)
        .namespace("other", false)
        .pod(PodSpec::new("shop", "client", "a").service_account("client-sa").ipv6())
        .pod(PodSpec::new("shop", "server", "b").service_account("server-sa").ipv6())
        .pod(PodSpec::new("other", "outsider", "a").ipv6())
        .build()
        .expect("cluster");
    cluster.set_extra_yaml(STRICT);
    cluster.write_manifest().expect("write");
    let _a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    let server = cluster.pod("server").echo_server_v6(HTTP).expect("server");
    let v4 = cluster.pod("server").addr(HTTP);
    let v6 = SocketAddr::new(cluster.pod("server").ipv6().expect("v6").into(), HTTP);
    for dst in [v4, v6] {
        assert_eq!(cluster.pod("client").attempt(dst), Ok(()), "client -> {dst}");
        let record = inbound_to(&b, dst);
        assert_eq!(record["security"], "mutual_tls", "{record}");
        assert_eq!(record["src.identity"], "spiffe://cluster.local/ns/shop/sa/client-sa", "{record}");
        assert!(cluster.pod("outsider").attempt(dst).is_err(), "STRICT refuses plaintext to {dst}");
        let c = check(&cluster, "shop/client", dst);
        assert_eq!((c["verdict"].as_str(), c["transport"].as_str()), (Some("allowed"), Some("mtls")), "{c}");
    }
    assert_eq!(server.peers().len(), 2, "only the two mesh connections reached the app");
    // The kubelet probes from the node's own namespace, in either family.
    for dst in [v4, v6] {
        let mut probe = cluster.node("b").connect(dst, STEP).expect("probe connects");
        assert_eq!(ambit_tests::echo_roundtrip(&mut probe, b"ok").expect("probe echo"), b"ok", "{dst}");
    }
    // Flow records carry the IPv6 destination.
    wait_until(STEP, "a flow record to the IPv6 address", || {
        let out = cluster.node("b").ambit(&["trace", "-o", "json"]).expect("trace");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|r| r["dst"]["ip"].as_str() == Some(&v6.ip().to_string()) && r["security"] == "mutual_tls")
    });
}

/// IPv6-only pods: mesh, plaintext passthrough to a pod outside the mesh, STRICT, and an
/// AuthorizationPolicy by IPv6 address.
#[test]
fn ipv6_only_pods_are_in_the_mesh() {
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("shop", true)
        .namespace("other", false)
        .pod(PodSpec::new("shop", "client", "a").service_account("client-sa").ipv6_only())
        .pod(
            PodSpec::new("shop", "server", "b")
                .service_account("server-sa")
                .label("app", "server")
                .ipv6_only(),
        )
        .pod(PodSpec::new("other", "outsider", "a").ipv6_only())
        .pod(PodSpec::new("other", "plain", "b").ipv6_only())
        .build()
        .expect("cluster");
    let outsider = cluster.pod("outsider").ip();
    // PERMISSIVE, but only from the client's identity or the outsider's IPv6 address.
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: server, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/client-sa]}}}}]\n  - from: [{{source: {{ipBlocks: ['{outsider}/128']}}}}]\n---\n"
    );
    cluster.set_extra_yaml(&policy);
    cluster.write_manifest().expect("write");
    let a = cluster.start_agent("a").expect("agent a");
    let b = cluster.start_agent("b").expect("agent b");
    let _server = cluster.pod("server").echo_server_v6(HTTP).expect("server");
    let _plain = cluster.pod("plain").echo_server_v6(HTTP).expect("plain");
    let dst = cluster.pod("server").addr(HTTP);
    assert!(dst.is_ipv6());
    assert_eq!(cluster.pod("client").attempt(dst), Ok(()));
    assert_eq!(inbound_to(&b, dst)["security"], "mutual_tls");
    assert_eq!(cluster.pod("outsider").attempt(dst), Ok(()), "plaintext from the allowed IPv6 address");
    assert!(cluster.pod("plain").attempt(dst).is_err(), "plaintext from another address is denied");
    // Outside the mesh: passthrough from the client, over IPv6.
    let plain = cluster.pod("plain").addr(HTTP);
    assert_eq!(cluster.pod("client").attempt(plain), Ok(()));
    let out = a
        .wait_for_event(STEP, |e| e["target"] == "access" && e["dst.addr"] == plain.to_string())
        .expect("outbound record");
    assert_eq!(out["security"], "plaintext", "{out}");
    // STRICT now: the outsider's plaintext is refused.
    let generation = b.generation();
    cluster.set_extra_yaml(&format!("{STRICT}{policy}"));
    cluster.write_manifest().expect("write");
    b.wait_generation_after(generation, STEP).expect("reloaded");
    assert!(cluster.pod("outsider").attempt(dst).is_err(), "STRICT refuses IPv6 plaintext");
    assert_eq!(cluster.pod("client").attempt(dst), Ok(()));
}
