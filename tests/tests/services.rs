//! End to end: connections to a Service's virtual IP reach its endpoints over mTLS, spread over
//! all of them, with the endpoint's identity checked.

use std::time::Duration;

use ambit_tests::{Cluster, PodSpec, echo_roundtrip};

const STEP: Duration = Duration::from_secs(5);

#[test]
fn a_service_vip_spreads_over_its_endpoints_over_mtls() {
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("shop", true)
        .pod(PodSpec::new("shop", "frontend", "a").service_account("frontend-sa"))
        .pod(
            PodSpec::new("shop", "backend-1", "b")
                .service_account("backend-sa")
                .label("app", "backend")
                .port("http", 8080),
        )
        .pod(
            PodSpec::new("shop", "backend-2", "a")
                .service_account("backend-sa")
                .label("app", "backend")
                .port("http", 8080),
        )
        .build()
        .expect("cluster");
    cluster.set_extra_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: backend, namespace: shop}\n\
         spec:\n  clusterIP: 10.96.0.10\n  selector: {app: backend}\n  ports: [{name: web, port: 80, targetPort: http}]\n",
    );
    cluster.write_manifest().expect("write");
    let a = cluster.start_agent("a").expect("agent a");
    let _b = cluster.start_agent("b").expect("agent b");
    let apps = [
        cluster.pod("backend-1").echo_server(8080).expect("app"),
        cluster.pod("backend-2").echo_server(8080).expect("app"),
    ];

    let vip = "10.96.0.10:80".parse().expect("vip");
    for _ in 0..6 {
        let mut s = cluster.pod("frontend").connect(vip, STEP).expect("connect to the Service");
        assert_eq!(s.peer_addr().expect("peer"), vip, "the app sees the Service address it asked for");
        assert_eq!(echo_roundtrip(&mut s, b"via the service").expect("echo"), b"via the service");
    }
    let counts: Vec<usize> = apps.iter().map(|app| app.peers().len()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 6);
    assert!(counts.iter().all(|c| *c >= 2), "spread over both endpoints: {counts:?}");

    let records = |agent: &ambit_tests::Agent| -> Vec<serde_json::Value> {
        agent
            .access_records()
            .into_iter()
            .filter(|r| r["direction"] == "outbound" && r["dst.service"] == "shop/backend")
            .collect()
    };
    let deadline = std::time::Instant::now() + STEP;
    while records(&a).len() < 6 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let records = records(&a);
    assert_eq!(records.len(), 6, "{records:?}");
    for r in &records {
        assert_eq!(r["security"], "mutual_tls");
        assert_eq!(r["dst.identity"], "spiffe://cluster.local/ns/shop/sa/backend-sa");
        assert!(r["dst.addr"].as_str().is_some_and(|d| d.ends_with(":8080")), "the named target port: {r}");
    }
}
