//! End to end: `ambit check --what-if` predicts, from the flow history alone, what applying a
//! policy file then does to the same traffic — judged connection by connection against what
//! the agents really do once the file is applied. Bad files are named and change nothing;
//! AUDIT policies mark without deciding.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ambit_tests::{Agent, Cluster, PodSpec};
use serde_json::Value;

const HTTP: u16 = 8080;
const ADMIN: u16 = 9090;
const STEP: Duration = Duration::from_secs(5);

/// STRICT for shop.
const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
";

/// Backend admits frontend's identity on the HTTP port only.
const BACKEND_HTTP_FROM_FRONTEND: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend-sa]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

/// The shop example: STRICT, backend from frontend, db from backend.
const SHOP: &str = include_str!("../../examples/shop/policies.yaml");

/// The traffic: a mesh client, one under the wrong service account, a plaintext client, a port
/// outside the policy, and the database's two clients. Every destination is on node b.
const TRAFFIC: [(&str, &str, u16); 6] = [
    ("frontend", "backend", HTTP),
    ("lazy", "backend", HTTP),
    ("outsider", "backend", HTTP),
    ("frontend", "backend", ADMIN),
    ("backend", "db", HTTP),
    ("frontend", "db", HTTP),
];

type Outcomes = BTreeMap<(String, String, u16), String>;

struct Scenario {
    cluster: Cluster,
    b: Agent,
    _a: Agent,
    _apps: Vec<ambit_tests::EchoServer>,
    files: Vec<PathBuf>,
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl Scenario {
    fn new() -> Self {
        let cluster = Cluster::builder()
            .shop()
            // Forgot spec.serviceAccountName: runs as "default".
            .pod(PodSpec::new("shop", "lazy", "a").label("app", "lazy"))
            .build()
            .expect("cluster");
        cluster.write_manifest().expect("write");
        let a = cluster.start_agent("a").expect("agent a");
        let b = cluster.start_agent("b").expect("agent b");
        let apps = vec![
            cluster.pod("backend").echo_server(HTTP).expect("backend"),
            cluster.pod("backend").echo_server(ADMIN).expect("backend admin"),
            cluster.pod("db").echo_server(HTTP).expect("db"),
        ];
        Self { cluster, b, _a: a, _apps: apps, files: Vec::new() }
    }

    /// Sends the traffic; what each connection got: `allowed`, or the verdict of the destination
    /// agent's flow record for it (`denied`, `refused`).
    fn run_traffic(&self) -> Outcomes {
        let mut outcomes = Outcomes::new();
        for (from, to, port) in TRAFFIC {
            let dst = self.cluster.pod(to).addr(port);
            let earlier = self.refusals(from, dst).len();
            let outcome = match self.cluster.pod(from).attempt(dst) {
                Ok(()) => "allowed".to_owned(),
                Err(_) => {
                    self.refusal(from, dst, earlier).unwrap_or_else(|| "failed without a record".into())
                }
            };
            outcomes.insert((from.to_owned(), to.to_owned(), port), outcome);
        }
        outcomes
    }

    /// The verdicts of the connections `from` → `dst` node b stopped, oldest first.
    fn refusals(&self, from: &str, dst: SocketAddr) -> Vec<String> {
        let port = dst.port().to_string();
        let Ok(out) = self.cluster.node("b").ambit(&["trace", "--port", &port, "-o", "json"]) else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["event"] == "refused" && r["dst"]["ip"] == dst.ip().to_string())
            .filter(|r| r["src"]["pod"].as_str().is_some_and(|p| p.ends_with(&format!("/{from}"))))
            .filter_map(|r| r["verdict"].as_str().map(str::to_owned))
            .collect()
    }

    /// The verdict of the refusal node b records after the first `earlier` ones.
    fn refusal(&self, from: &str, dst: SocketAddr, earlier: usize) -> Option<String> {
        let deadline = std::time::Instant::now() + STEP;
        loop {
            if let Some(verdict) = self.refusals(from, dst).into_iter().nth(earlier) {
                return Some(verdict);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn file(&mut self, name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ambit-what-if-{}-{name}.yaml", std::process::id()));
        std::fs::write(&path, text).expect("candidate file");
        self.files.push(path.clone());
        path
    }

    /// `ambit check --what-if` on node b: exit code and JSON answer.
    fn what_if(&self, file: &Path, extra: &[&str]) -> (i32, Value) {
        let mut args = vec!["check", "--what-if", file.to_str().expect("path"), "-o", "json"];
        args.extend_from_slice(extra);
        let out = self.cluster.node("b").ambit(&args).expect("ambit check --what-if");
        let code = out.status.code().unwrap_or(-1);
        let answer = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        });
        (code, answer)
    }

    /// Puts `policies` in force (or none) and waits until node b has them.
    fn apply(&self, policies: &str) {
        let generation = self.b.generation();
        self.cluster.set_extra_yaml(policies);
        self.cluster.write_manifest().expect("write");
        self.b.wait_generation_after(generation, STEP).expect("reloaded");
    }
}

/// The outcome the what-if predicts for each connection of the traffic: what it says would
/// change, allowed for the rest (allowed today: no policy is in force when it is asked).
fn predicted(answer: &Value) -> Outcomes {
    let mut outcomes: Outcomes =
        TRAFFIC.iter().map(|(f, t, p)| ((f.to_string(), t.to_string(), *p), "allowed".to_owned())).collect();
    for shift in answer["nodes"][0]["breaks"].as_array().expect("breaks") {
        let from = shift["source"]["pod"].as_str().expect("a pod source").rsplit('/').next().expect("name");
        let to = shift["destination"].as_str().expect("destination").rsplit('/').next().expect("name");
        let port = shift["port"].as_u64().expect("port") as u16;
        let key = (from.to_owned(), to.to_owned(), port);
        assert!(outcomes.contains_key(&key), "a prediction for traffic that was never sent: {key:?}");
        outcomes.insert(key, shift["would"].as_str().expect("would").to_owned());
    }
    outcomes
}

#[test]
fn the_what_if_predicts_what_applying_each_file_does() {
    let mut s = Scenario::new();
    // Control: with no policy, everything passes, so every change below is the file's doing.
    let before = s.run_traffic();
    assert!(before.values().all(|o| o == "allowed"), "{before:?}");

    // STRICT breaks the plaintext client; the backend policy the wrong service account, the
    // plaintext client and the other port; the shop example those and frontend -> db.
    let candidates = [("strict", STRICT), ("backend", BACKEND_HTTP_FROM_FRONTEND), ("shop", SHOP)];
    for (name, text) in candidates {
        let file = s.file(name, text);
        let (code, answer) = s.what_if(&file, &[]);
        let prediction = predicted(&answer);
        assert_eq!(code, 1, "{name}: traffic breaks, so the gate fails: {answer:#}");
        // The prediction came from the history; now apply the file and send the same traffic.
        s.apply(text);
        let reality = s.run_traffic();
        assert_eq!(prediction, reality, "{name}: predicted (left) against what applying it did (right)");
        s.apply("");
    }

    // Each break names its rule and the hint `ambit check` gives.
    let file = s.file("shop-again", SHOP);
    let (_, answer) = s.what_if(&file, &[]);
    let breaks = answer["nodes"][0]["breaks"].as_array().expect("breaks").clone();
    let by_source = |pod: &str, to: &str| {
        breaks
            .iter()
            .find(|b| b["source"]["pod"] == pod && b["destination"] == to)
            .unwrap_or_else(|| panic!("{pod} -> {to} in {breaks:#?}"))
    };
    let outsider = by_source("legacy/outsider", "shop/backend");
    assert_eq!(
        (outsider["security"].as_str(), outsider["would"].as_str()),
        (Some("plaintext"), Some("refused"))
    );
    assert_eq!(outsider["decided_by"], "shop/default");
    assert!(
        outsider["hints"][0].as_str().is_some_and(|h| h.contains("enroll legacy/outsider")),
        "{outsider:#}"
    );
    let lazy = by_source("shop/lazy", "shop/backend");
    assert_eq!(lazy["decided_by"], "shop/backend");
    assert!(
        lazy["hints"]
            .as_array()
            .expect("hints")
            .iter()
            .any(|h| h.as_str().is_some_and(|h| h.contains("\"default\""))),
        "the wrong service account is named: {lazy:#}"
    );
    assert!(by_source("shop/frontend", "shop/db")["connections"].as_u64() >= Some(1));

    // A file that breaks nothing passes the gate; a removal can only open.
    let permissive = s.file("permissive", &STRICT.replace("STRICT", "PERMISSIVE"));
    let (code, answer) = s.what_if(&permissive, &[]);
    assert_eq!(code, 0, "{answer:#}");
    assert_eq!(answer["breaks_traffic"], false);
    s.apply(SHOP);
    let empty = s.file("empty", "");
    let (code, answer) =
        s.what_if(&empty, &["--delete", "shop/default", "--delete", "shop/backend", "--delete", "shop/db"]);
    assert_eq!(code, 0, "{answer:#}");
    let opens = answer["nodes"][0]["opens"].as_array().expect("opens");
    let reopened: Vec<&str> = opens.iter().filter_map(|o| o["source"]["pod"].as_str()).collect();
    for pod in ["legacy/outsider", "shop/lazy", "shop/frontend"] {
        assert!(reopened.contains(&pod), "{pod} would be let in again: {opens:#?}");
    }
    // Asking changed nothing: the policies in force are still the applied ones.
    assert_eq!(s.run_traffic().values().filter(|o| *o != "allowed").count(), 3);
}

#[test]
fn bad_files_are_named_and_nothing_is_applied() {
    let mut s = Scenario::new();
    s.apply(STRICT);
    let policies = s.b.admin_json("/policies").expect("policies");
    let generation = s.b.generation();
    let cases = [
        (
            "syntax",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: shop\n",
            "did not find expected",
        ),
        ("kind", "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n", "not a policy"),
        ("field", &BACKEND_HTTP_FROM_FRONTEND.replace("action: ALLOW", "action: MAYBE"), "MAYBE"),
        ("namespace", &STRICT.replace("namespace: shop", "namespace: istio-config"), "istio-config"),
    ];
    for (name, text, says) in cases {
        let file = s.file(name, text);
        let out = s
            .cluster
            .node("b")
            .ambit(&["check", "--what-if", file.to_str().expect("path")])
            .expect("ambit check --what-if");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: bad input: {stderr}");
        // `FILE:LINE:`, then what is wrong.
        let at = stderr.split(&format!("{}:", file.display())).nth(1).unwrap_or_default();
        assert!(at.starts_with(|c: char| c.is_ascii_digit()) && stderr.contains(says), "{name}: {stderr}");
    }
    let out = s.cluster.node("b").ambit(&["check", "--what-if", "/nonexistent.yaml"]).expect("ambit");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.yaml"));
    assert_eq!(s.b.generation(), generation, "nothing was loaded");
    assert_eq!(s.b.admin_json("/policies").expect("policies"), policies, "nothing changed");
    assert!(
        s.cluster.pod("outsider").attempt(s.cluster.pod("backend").addr(HTTP)).is_err(),
        "STRICT still holds"
    );
}

#[test]
fn an_audit_policy_marks_connections_without_deciding() {
    let s = Scenario::new();
    let audit = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: watch-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: AUDIT
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend-sa]}}]
";
    s.apply(audit);
    let outcomes = s.run_traffic();
    assert!(outcomes.values().all(|o| o == "allowed"), "AUDIT decides nothing: {outcomes:?}");
    let out = s.cluster.node("b").ambit(&["trace", "--audited", "-o", "json"]).expect("trace");
    let audited: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!audited.is_empty(), "frontend's connections to backend are audited");
    for record in &audited {
        assert_eq!(record["audit"][0], "shop/watch-frontend", "{record:#}");
        assert_eq!(record["src"]["identity"], "spiffe://cluster.local/ns/shop/sa/frontend-sa", "{record:#}");
        assert_eq!(record["verdict"], "allowed");
    }
    // The control: without --audited, lazy's and outsider's connections to backend are there too.
    let all = s.cluster.node("b").ambit(&["trace", "--to", "backend", "-o", "json"]).expect("trace");
    assert!(String::from_utf8_lossy(&all.stdout).lines().count() > audited.len());
}
