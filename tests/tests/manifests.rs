//! The install manifests (`daemonset/`), judged by the Kubernetes schemas (PyPI
//! `kubernetes-validate`, strict) and, for the CRDs, by `jsonschema` against every policy example
//! the tests use. No cluster is needed.

use std::{path::PathBuf, process::Command};

use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// The manifests of one kustomization directory (`daemonset/`, `daemonset/ca/`).
fn manifests_in(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    files
}

fn manifests() -> Vec<PathBuf> {
    [manifests_in("daemonset"), manifests_in("daemonset/ca")].concat()
}

fn yaml(path: &str) -> Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(root().join(path)).expect("read")).expect("yaml")
}

/// Every document of a manifest file.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(path)).expect("read");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .collect()
}

#[test]
fn every_manifest_validates_strictly_against_the_kubernetes_schemas() {
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(manifests())
        .output()
        .expect("kubernetes-validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for kind in [
        "namespace/",
        "customresourcedefinition/",
        "serviceaccount/",
        "clusterrole/",
        "clusterrolebinding/",
        "configmap/",
        "daemonset/",
        "deployment/",
        "service/",
        "poddisruptionbudget/",
    ] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} not validated:\n{text}");
    }
    // The judge can fail: an unknown field is rejected in strict mode.
    let bad = std::env::temp_dir().join(format!("ambit-bad-manifest-{}.yaml", std::process::id()));
    std::fs::write(&bad, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndatta: {}\n").expect("write");
    let out =
        Command::new("kubernetes-validate").arg("--strict").arg(&bad).output().expect("kubernetes-validate");
    let _ = std::fs::remove_file(&bad);
    assert!(!out.status.success(), "strict validation rejects unknown fields");
}

#[test]
fn kustomization_lists_every_manifest() {
    for (dir, subdirs) in [("daemonset", &["ca"][..]), ("daemonset/ca", &[][..])] {
        let kustomization = yaml(&format!("{dir}/kustomization.yaml"));
        let listed: Vec<&str> = kustomization["resources"]
            .as_sequence()
            .expect("resources")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for file in manifests_in(dir) {
            let name = file.file_name().and_then(|n| n.to_str()).expect("name");
            assert!(listed.contains(&name), "{name} is not in {dir}/kustomization.yaml");
        }
        for sub in subdirs {
            assert!(listed.contains(sub), "{dir}/kustomization.yaml does not include {sub}/");
        }
    }
}

#[test]
fn the_crds_accept_every_policy_example_and_reject_a_bad_one() {
    let script = r#"
import glob, json, sys, yaml, jsonschema
crds = {}
for doc in yaml.safe_load_all(open(sys.argv[1])):
    for v in doc["spec"]["versions"]:
        crds[(doc["spec"]["names"]["kind"], doc["spec"]["group"] + "/" + v["name"])] = v["schema"]["openAPIV3Schema"]
checked = 0
for path in sorted(glob.glob(sys.argv[2] + "/**/*.yaml", recursive=True)):
    for doc in yaml.safe_load_all(open(path)):
        if not doc or (doc["kind"], doc["apiVersion"]) not in crds:
            continue
        # As the API server sees it: JSON, so map keys (ports) are strings.
        doc = json.loads(json.dumps(doc))
        jsonschema.validate(doc, crds[(doc["kind"], doc["apiVersion"])])
        checked += 1
bad = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "x"},
       "spec": {"mtls": {"mode": "STRICTT"}}}
try:
    jsonschema.validate(bad, crds[("PeerAuthentication", "security.istio.io/v1")])
    print("bad example accepted"); sys.exit(1)
except jsonschema.ValidationError:
    pass
print(checked)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(root().join("daemonset/crds.yaml"))
        .arg(root().join("examples"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let checked: usize = String::from_utf8_lossy(&out.stdout).trim().parse().expect("count");
    assert!(checked >= 6, "every example policy was checked ({checked})");
}

#[test]
fn the_daemonset_carries_what_the_agent_needs() {
    let ds: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("daemonset/daemonset.yaml")).expect("read"),
    )
    .expect("yaml");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], Value::Bool(true), "procfs netns discovery needs the host's PIDs");
    assert_eq!(pod["hostNetwork"], Value::Bool(true), "admin on the node's loopback, readiness on the node");
    assert_eq!(pod["priorityClassName"].as_str(), Some("system-node-critical"));
    // Upgrades: the new agent beside the old one (no host ports to block it), and the grace
    // period longer than the agent's drain.
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!((rolling["maxSurge"].as_u64(), rolling["maxUnavailable"].as_u64()), (Some(1), Some(0)));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("grace period");
    let config: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("daemonset/configmap.yaml")).expect("read"),
    )
    .expect("yaml");
    let drain =
        config["data"]["AMBIT_DRAIN_TIMEOUT"].as_str().and_then(|d| d.strip_suffix('s')?.parse::<u64>().ok());
    assert!(drain.is_some_and(|d| d < grace), "drain {drain:?} must end before the grace period ({grace}s)");
    assert!(pod["containers"][0]["ports"].is_null(), "no host ports: they would block maxSurge");
    assert!(pod["tolerations"].as_sequence().is_some_and(|t| !t.is_empty()));
    let agent = &pod["containers"][0];
    let security = &agent["securityContext"];
    assert_eq!(security["privileged"], Value::Bool(false), "capabilities, not privileged");
    let caps: Vec<&str> = security["capabilities"]["add"]
        .as_sequence()
        .expect("caps")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // Each is shown needed, and the set enough, by tests/tests/daemonset.rs.
    assert_eq!(caps, ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"], "exactly the capabilities the agent needs");
    let env = agent["env"].as_sequence().expect("env");
    let node = env.iter().find(|e| e["name"].as_str() == Some("NODE_NAME")).expect("NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("spec.nodeName"));
    assert_eq!(agent["readinessProbe"]["httpGet"]["port"].as_u64(), Some(15021));
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"].as_str(), Some("/healthz/ready"));
    let mounts: Vec<&str> = agent["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for path in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/sys/kernel/tracing",
        "/var/run/secrets/ambit/ca-root",
        "/var/run/secrets/tokens",
    ] {
        assert!(mounts.contains(&path), "{path} not mounted: {mounts:?}");
    }
    // No node holds the CA key: no Secret volume at all, a trust bundle and a projected token
    // for the CA's audience instead.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    assert!(volumes.iter().all(|v| v["secret"].is_null()), "the agent mounts a Secret: {volumes:?}");
    let token = volumes.iter().find(|v| v["name"] == "istio-token").expect("token volume");
    let source = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"].as_str(), Some("istio-ca"));
    assert!(source["expirationSeconds"].as_u64().is_some_and(|s| s <= 86_400));
    assert_eq!(
        volumes.iter().find(|v| v["name"] == "ca-root").expect("bundle")["configMap"]["name"].as_str(),
        Some("ambit-ca-root")
    );
    let data = &yaml("daemonset/configmap.yaml")["data"];
    assert_eq!(data["AMBIT_CA_ADDR"].as_str(), Some("https://ambit-ca.ambit-system.svc:15012"));
    for (key, file) in [("AMBIT_CA_ROOT", "root-cert.pem"), ("AMBIT_CA_TOKEN", "istio-token")] {
        let path = data[key].as_str().unwrap_or_default();
        assert!(
            path.ends_with(file) && mounts.iter().any(|m| path.starts_with(&format!("{m}/"))),
            "{key}={path} is not in a mounted volume"
        );
    }
    assert!(
        agent["resources"]["requests"]["cpu"].is_string()
            && agent["resources"]["requests"]["memory"].is_string()
    );
    // Every AMBIT_* setting in the ConfigMap is an option the agent reads.
    let help = Command::new(ambit_tests::ambit_binary())
        .args(["agent", "--help"])
        .output()
        .expect("ambit agent --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let config: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("daemonset/configmap.yaml")).expect("read"),
    )
    .expect("yaml");
    for key in config["data"]
        .as_mapping()
        .expect("data")
        .keys()
        .filter_map(Value::as_str)
        .filter(|k| k.starts_with("AMBIT_"))
    {
        assert!(help.contains(&format!("env: {key}")), "{key} is not an agent option:\n{help}");
    }
}

#[test]
fn only_the_ca_deployment_holds_the_key_and_may_review_tokens() {
    let deployment = yaml("daemonset/ca/deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let ca = &pod["containers"][0];
    let args: Vec<&str> = ca["args"].as_sequence().expect("args").iter().filter_map(Value::as_str).collect();
    assert_eq!(args, ["ca", "serve"]);
    assert_eq!(pod["serviceAccountName"].as_str(), Some("ambit-ca"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true));
    assert_eq!(ca["securityContext"]["readOnlyRootFilesystem"], Value::Bool(true));
    let secret = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| !v["secret"].is_null())
        .expect("secret");
    assert_eq!(secret["secret"]["secretName"].as_str(), Some("ambit-ca"));
    let mount = ca["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == secret["name"])
        .expect("mount");
    assert_eq!(mount["readOnly"], Value::Bool(true));
    let env = ca["env"].as_sequence().expect("env");
    let dir = env.iter().find(|e| e["name"] == "AMBIT_CA_DIR").expect("AMBIT_CA_DIR");
    assert_eq!(dir["value"], mount["mountPath"], "the CA reads the Secret's mount");
    // Every AMBIT_* variable is an option of `ambit ca serve`.
    let help =
        Command::new(ambit_tests::ambit_binary()).args(["ca", "serve", "--help"]).output().expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    for name in env.iter().filter_map(|e| e["name"].as_str()).filter(|n| n.starts_with("AMBIT_")) {
        assert!(help.contains(&format!("env: {name}")), "{name} is not a `ca serve` option:\n{help}");
    }
    // The Service and the budget select the CA's pods; the Service serves 15012.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let service = yaml("daemonset/ca/service.yaml");
    assert_eq!(service["metadata"]["name"].as_str(), Some("ambit-ca"));
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(15012));
    for selector in
        [&service["spec"]["selector"], &yaml("daemonset/ca/pdb.yaml")["spec"]["selector"]["matchLabels"]]
    {
        for (k, v) in selector.as_mapping().expect("selector") {
            assert_eq!(&labels[k], v, "selector {k:?} does not match the CA's pods");
        }
    }
    assert!(
        deployment["spec"]["replicas"].as_u64().is_some_and(|r| r >= 2),
        "two replicas: a drain keeps one"
    );
    // RBAC: the CA may create TokenReviews and read pods; the agents may do neither of the first.
    let rule = |docs: &[Value], role: &str, group: &str, resource: &str, verb: &str| {
        docs.iter().filter(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == role).any(|r| {
            r["rules"].as_sequence().into_iter().flatten().any(|rule| {
                let has = |field: &str, want: &str| {
                    rule[field].as_sequence().is_some_and(|s| s.iter().any(|x| x.as_str() == Some(want)))
                };
                has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
            })
        })
    };
    let ca_rbac = documents("daemonset/ca/rbac.yaml");
    assert!(rule(&ca_rbac, "ambit-ca", "authentication.k8s.io", "tokenreviews", "create"));
    for verb in ["get", "list", "watch"] {
        assert!(rule(&ca_rbac, "ambit-ca", "", "pods", verb), "pods {verb}");
    }
    let agent_rbac = documents("daemonset/rbac.yaml");
    assert!(!rule(&agent_rbac, "ambit-agent", "authentication.k8s.io", "tokenreviews", "create"));
    assert!(
        !agent_rbac.iter().any(|d| d["kind"] == "ClusterRole"
            && d["rules"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|r| r["resources"].as_sequence().is_some_and(|s| s.iter().any(|x| x == "secrets")))),
        "the agent may not read Secrets"
    );
}
