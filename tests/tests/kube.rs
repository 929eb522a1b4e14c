//! End to end, cluster mode: agents without `--local` learn the cluster from a (mock) Kubernetes
//! API server, list then watch, and keep enforcing what they last knew while the API server's
//! watch streams break, expire (`410 Gone`) or the server is away.

use std::{io::ErrorKind, net::SocketAddr, time::Duration};

use ambit_tests::{Agent, CgroupDriver, Cluster, MockApi, PodProcesses, PodSpec, wait_until};
use serde_json::json;

const HTTP: u16 = 8080;
const STEP: Duration = Duration::from_secs(5);
/// The watcher's backoff after a broken stream starts below a second; a re-list is quick.
const RESYNC: Duration = Duration::from_secs(15);

/// STRICT in shop; backend accepts only frontend-sa, db only backend-sa.
const POLICIES: &str = include_str!("../../examples/shop/policies.yaml");

/// Two nodes, the shop on them, and the pods' processes: in a cluster every pod's namespace is
/// found through its processes' cgroups, as on a real node. (The harness still writes its
/// `ambit.io/netns` annotations into the objects: cluster mode must ignore them.)
struct Shop {
    cluster: Cluster,
    api: MockApi,
    _processes: PodProcesses,
}

fn shop() -> Shop {
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("shop", true)
        .namespace("legacy", false)
        .pod(
            PodSpec::new("shop", "frontend", "a")
                .service_account("frontend-sa")
                .label("app", "frontend")
                .discovered(CgroupDriver::Systemd),
        )
        .pod(
            PodSpec::new("shop", "backend", "b")
                .service_account("backend-sa")
                .label("app", "backend")
                .discovered(CgroupDriver::Cgroupfs),
        )
        .pod(PodSpec::new("shop", "db", "b").service_account("db-sa").label("app", "db"))
        .pod(PodSpec::new("legacy", "outsider", "a"))
        .build()
        .expect("cluster");
    let processes = cluster.start_pod_processes().expect("pod processes");
    cluster.set_extra_yaml(POLICIES);
    let api = cluster.mock_api().expect("mock API server");
    api.sync_yaml(&cluster.manifest()).expect("objects");
    Shop { cluster, api, _processes: processes }
}

/// Connects, sends, reads the echo: `Ok` when it came back.
fn attempt(cluster: &Cluster, from: &str, to: SocketAddr) -> Result<(), ErrorKind> {
    cluster.pod(from).attempt(to)
}

/// Waits until `from` → `to` has the given outcome (`allowed` or not), as a watch delivers.
fn wait_for_verdict(cluster: &Cluster, from: &str, to: SocketAddr, allowed: bool, what: &str) {
    wait_until(RESYNC, what, || attempt(cluster, from, to).is_ok() == allowed);
}

fn status(agent: &Agent) -> serde_json::Value {
    agent.admin_json("/status").expect("status")
}

#[test]
fn agents_learn_the_cluster_from_the_api_and_apply_policy_changes_live() {
    let shop = shop();
    let cluster = &shop.cluster;
    let a = cluster.start_kube_agent("a").expect("agent a");
    let b = cluster.start_kube_agent("b").expect("agent b");
    assert_eq!(status(&a)["agent"]["source"], "kubernetes", "{}", status(&a));
    for (agent, pod) in [(&a, "frontend"), (&b, "backend"), (&b, "db")] {
        assert_eq!(agent.pod_state(pod).as_deref(), Some("captured"), "{pod}");
    }
    assert_eq!(a.pod_state("outsider").as_deref(), Some("not-captured"));
    let _apps: Vec<_> =
        ["backend", "db"].iter().map(|p| cluster.pod(p).echo_server(HTTP).expect("app")).collect();
    let (backend, db) = (cluster.pod("backend").addr(HTTP), cluster.pod("db").addr(HTTP));

    // The shop's policies, from the API: as with the local file.
    assert_eq!(attempt(cluster, "frontend", backend), Ok(()));
    assert!(attempt(cluster, "frontend", db).is_err(), "db admits only backend-sa");
    assert!(attempt(cluster, "outsider", backend).is_err(), "STRICT refuses plaintext");
    let allowed = b
        .wait_for_event(STEP, |e| {
            e["target"] == "access" && e["dst.workload"] == "backend" && e["authz.verdict"] == "allowed"
        })
        .expect("access record");
    assert_eq!(allowed["src.identity"], "spiffe://cluster.local/ns/shop/sa/frontend-sa", "{allowed}");

    // Policy deleted through the API: db opens up; created again: closed again.
    shop.api.delete("/apis/security.istio.io/v1/authorizationpolicies", "shop", "db");
    wait_for_verdict(cluster, "frontend", db, true, "db open once its policy is deleted");
    shop.api.sync_yaml(&cluster.manifest()).expect("objects");
    wait_for_verdict(cluster, "frontend", db, false, "db closed once its policy is back");

    // A new policy that does not compile: its pods are closed (never open), the error is
    // reported by name, and the rest of the cluster keeps working.
    shop.api.apply(
        "/apis/security.istio.io/v1/authorizationpolicies",
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "broken", "namespace": "shop"},
               "spec": {"selector": {"matchLabels": {"app": "backend"}}, "action": "MAYBE"}}),
    );
    wait_for_verdict(cluster, "frontend", backend, false, "backend closed by a broken new policy");
    wait_until(STEP, "error reported", || {
        status(&b)["config"]["error"].as_str().is_some_and(|e| e.contains("shop/broken"))
    });
    assert_eq!(attempt(cluster, "backend", db), Ok(()), "other pods unaffected");
    shop.api.delete("/apis/security.istio.io/v1/authorizationpolicies", "shop", "broken");
    wait_for_verdict(cluster, "frontend", backend, true, "backend open once the broken policy is gone");
}

#[test]
fn broken_or_expired_watches_relist_and_enforcement_never_lapses() {
    let shop = shop();
    let cluster = &shop.cluster;
    let _a = cluster.start_kube_agent("a").expect("agent a");
    let b = cluster.start_kube_agent("b").expect("agent b");
    let _db_app = cluster.pod("db").echo_server(HTTP).expect("app");
    let db = cluster.pod("db").addr(HTTP);
    assert!(attempt(cluster, "frontend", db).is_err());
    let lists = |api: &MockApi| {
        api.requests()
            .iter()
            .filter(|r| *r == "list /apis/security.istio.io/v1/authorizationpolicies")
            .count()
    };
    let watch_failing = |agent: &Agent| {
        status(agent)["config"]["error"].as_str().is_some_and(|e| e.contains("watching AuthorizationPolicy"))
    };

    // Streams cut and the server away: once the agent knows its watch is down, still denied; a
    // change made meanwhile arrives when the server is back (the watch resumes).
    shop.api.set_down(true, false);
    wait_until(RESYNC, "agent b sees its watch fail", || watch_failing(&b));
    assert!(attempt(cluster, "frontend", db).is_err(), "denied with the watch down");
    shop.api.delete("/apis/security.istio.io/v1/authorizationpolicies", "shop", "db");
    shop.api.set_down(false, false);
    wait_for_verdict(cluster, "frontend", db, true, "deletion seen after the watch resumed");
    wait_until(RESYNC, "watch failure cleared", || !watch_failing(&b));

    // Away long enough for the versions to expire (410 Gone): the agents list again from
    // scratch; until then what was known stays in force, and what changed arrives with the list.
    shop.api.sync_yaml(&cluster.manifest()).expect("objects");
    wait_for_verdict(cluster, "frontend", db, false, "policy back");
    let lists_before = lists(&shop.api);
    shop.api.set_down(true, true);
    wait_until(RESYNC, "agent b sees its watch fail", || watch_failing(&b));
    assert!(attempt(cluster, "frontend", db).is_err(), "denied while the server is away");
    shop.api.delete("/apis/security.istio.io/v1/authorizationpolicies", "shop", "db");
    shop.api.set_down(false, false);
    wait_for_verdict(cluster, "frontend", db, true, "deletion seen through the re-list");
    wait_until(RESYNC, "both agents listed again", || lists(&shop.api) >= lists_before + 2);
}

#[test]
fn labelling_a_namespace_enrolls_its_pods_and_unlabelling_releases_them() {
    let cluster = Cluster::builder()
        .node("a")
        .namespace("web", false)
        .pod(PodSpec::new("web", "client", "a"))
        .pod(PodSpec::new("web", "server", "a"))
        .build()
        .expect("cluster");
    let _processes = cluster.start_pod_processes().expect("pod processes");
    let api = cluster.mock_api().expect("mock API server");
    api.sync_yaml(&cluster.manifest()).expect("objects");
    let agent = cluster.start_kube_agent("a").expect("agent");
    let _app = cluster.pod("server").echo_server(HTTP).expect("app");
    let server = cluster.pod("server").addr(HTTP);
    assert_eq!(agent.pod_state("client").as_deref(), Some("not-captured"));

    let namespace = |labels: serde_json::Value| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web", "labels": labels}});
    api.apply("/api/v1/namespaces", namespace(json!({"istio.io/dataplane-mode": "ambient"})));
    wait_until(RESYNC, "pods enrolled", || {
        agent.pod_state("client").as_deref() == Some("captured")
            && agent.pod_state("server").as_deref() == Some("captured")
    });
    assert_eq!(attempt(&cluster, "client", server), Ok(()));
    let record = agent
        .wait_for_event(STEP, |e| {
            e["target"] == "access" && e["direction"] == "inbound" && e["dst.workload"] == "server"
        })
        .expect("through the mesh");
    assert_eq!(record["src.identity"], "spiffe://cluster.local/ns/web/sa/default", "{record}");

    api.apply("/api/v1/namespaces", namespace(json!({})));
    wait_until(RESYNC, "pods released", || agent.pod_state("client").as_deref() == Some("not-captured"));
    assert_eq!(attempt(&cluster, "client", server), Ok(()), "plain traffic flows again");

    // A pod labelled on its own joins alone.
    cluster.edit_pod("client", |p| p.labels.push(("istio.io/dataplane-mode".into(), "ambient".into())));
    api.sync_yaml(&cluster.manifest()).expect("objects");
    wait_until(RESYNC, "labelled pod enrolled", || agent.pod_state("client").as_deref() == Some("captured"));
    assert_eq!(agent.pod_state("server").as_deref(), Some("not-captured"));
}

/// Objects as the API server returns them (`kubectl get -o json`: managed fields, owner
/// references, status, probes...), in tests/fixtures/kube/: the bookinfo reviews pod, its
/// Service and EndpointSlice (one endpoint ready, one terminating), STRICT and an ALLOW policy.
#[test]
fn recorded_api_objects_enroll_a_new_pod_and_route_its_service() {
    const NAME: &str = "reviews-v1-5c6b9f7d8-x2k4q";
    let fixture = |name: &str| -> serde_json::Value {
        let path = format!("{}/fixtures/kube/{name}.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture JSON")
    };
    let cluster = Cluster::builder()
        .node("worker-1")
        .namespace("bookinfo", false)
        .pod(PodSpec::new("bookinfo", NAME, "worker-1").discovered(CgroupDriver::Cgroupfs))
        .pod(PodSpec::new("bookinfo", "productpage", "worker-1").service_account("bookinfo-productpage"))
        .pod(PodSpec::new("bookinfo", "ratings", "worker-1").service_account("bookinfo-ratings"))
        .build()
        .expect("cluster");
    let _processes = cluster.start_pod_processes().expect("pod processes");
    let api = cluster.mock_api().expect("mock API server");
    // Everything but the reviews pod, which the "scheduler" adds once the agent runs.
    let manifest = cluster.manifest();
    let manifest: Vec<&str> = manifest.split("---\n").filter(|d| !d.contains(NAME)).collect();
    api.sync_yaml(&manifest.join("---\n")).expect("objects");
    api.apply("/api/v1/namespaces", fixture("namespace"));
    api.apply("/apis/security.istio.io/v1/peerauthentications", fixture("peerauthentication"));
    api.apply("/apis/security.istio.io/v1/authorizationpolicies", fixture("authorizationpolicy"));
    let agent = cluster.start_kube_agent("worker-1").expect("agent");
    let _app = cluster.pod(NAME).echo_server(9080).expect("reviews app");

    // The recorded pod, with this run's UID and address.
    let reviews_ip = cluster.pod(NAME).ip().to_string();
    let mut pod = fixture("pod");
    pod["metadata"]["uid"] = json!(cluster.pod(NAME).uid());
    pod["status"]["podIP"] = json!(reviews_ip);
    pod["status"]["podIPs"] = json!([{"ip": reviews_ip}]);
    api.apply("/api/v1/pods", pod);
    let mut slice = fixture("endpointslice");
    slice["endpoints"][0]["addresses"] = json!([reviews_ip]);
    api.apply("/api/v1/services", fixture("service"));
    api.apply("/apis/discovery.k8s.io/v1/endpointslices", slice);
    wait_until(RESYNC, "recorded pod enrolled", || agent.pod_state(NAME).as_deref() == Some("captured"));

    // Through the Service's ClusterIP: always the ready endpoint, over mTLS, policy applied.
    let vip: SocketAddr = "10.96.118.42:9080".parse().expect("vip");
    for _ in 0..3 {
        assert_eq!(attempt(&cluster, "productpage", vip), Ok(()), "productpage → reviews");
    }
    let record = agent
        .wait_for_event(STEP, |e| {
            e["target"] == "access" && e["direction"] == "inbound" && e["dst.workload"] == NAME
        })
        .expect("access record");
    assert_eq!(
        record["src.identity"], "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
        "{record}"
    );
    assert_eq!(record["dst.identity"], "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews", "{record}");
    assert!(attempt(&cluster, "ratings", vip).is_err(), "reviews-viewer admits only productpage");
}

#[test]
fn an_agent_started_before_the_api_server_waits_unready_then_catches_up() {
    let cluster = Cluster::builder()
        .node("a")
        .namespace("shop", true)
        .pod(PodSpec::new("shop", "client", "a"))
        .build()
        .expect("cluster");
    let _processes = cluster.start_pod_processes().expect("pod processes");
    // Nothing answers yet: the API server is down.
    let agent = cluster.spawn_kube_agent("a", &[]).expect("agent");
    wait_until(STEP, "agent serving its admin API", || agent.readiness().ok().flatten().is_some());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.readiness().expect("readiness"), Some(503), "not ready before the first list");
    assert_eq!(agent.pod_state("client").as_deref(), None, "knows no pods yet");

    let api = cluster.mock_api().expect("mock API server");
    api.sync_yaml(&cluster.manifest()).expect("objects");
    agent.wait_ready(Duration::from_secs(40)).expect("ready once the API answers");
    assert_eq!(agent.pod_state("client").as_deref(), Some("captured"));
}

#[test]
fn policies_are_read_from_v1beta1_where_only_that_is_served() {
    let shop = shop();
    let cluster = &shop.cluster;
    shop.api.serve_istio(Some("v1beta1"));
    // The same objects, now under security.istio.io/v1beta1.
    shop.api.sync_yaml("").expect("clear");
    shop.api.sync_yaml(&cluster.manifest()).expect("objects");
    let _a = cluster.start_kube_agent("a").expect("agent a");
    let _b = cluster.start_kube_agent("b").expect("agent b");
    let _db = cluster.pod("db").echo_server(HTTP).expect("app");
    assert!(attempt(cluster, "frontend", cluster.pod("db").addr(HTTP)).is_err(), "db admits only backend-sa");
    assert_eq!(attempt(cluster, "backend", cluster.pod("db").addr(HTTP)), Ok(()));
    assert!(
        shop.api
            .requests()
            .iter()
            .any(|r| r == "watch /apis/security.istio.io/v1beta1/authorizationpolicies"),
        "{:?}",
        shop.api.requests()
    );
}

#[test]
fn without_istio_crds_the_agent_still_serves_and_says_why_no_policy_applies() {
    let cluster = Cluster::builder()
        .node("a")
        .namespace("shop", true)
        .pod(PodSpec::new("shop", "client", "a"))
        .pod(PodSpec::new("shop", "server", "a"))
        .build()
        .expect("cluster");
    let _processes = cluster.start_pod_processes().expect("pod processes");
    let api = cluster.mock_api().expect("mock API server");
    api.serve_istio(None);
    api.sync_yaml(&cluster.manifest()).expect("objects");
    let agent = cluster.start_kube_agent("a").expect("ready without the CRDs");
    let _app = cluster.pod("server").echo_server(HTTP).expect("app");
    assert_eq!(attempt(&cluster, "client", cluster.pod("server").addr(HTTP)), Ok(()), "mTLS, no policy");
    assert!(agent.log_text().contains("no security.istio.io CRDs"), "the log says why no policy applies");
}
