//! The install manifests (`daemonset/`), judged by the Kubernetes schemas (PyPI
//! `kubernetes-validate`, strict) and, for the CRDs, by `jsonschema` against every policy example
//! the tests use. No cluster is needed.

use std::{path::PathBuf, process::Command};

use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("daemonset"))
        .expect("daemonset/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    files
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
    let kustomization: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("daemonset/kustomization.yaml")).expect("read"),
    )
    .expect("yaml");
    let listed: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for file in manifests() {
        let name = file.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(listed.contains(&name), "{name} is not in kustomization.yaml");
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
    for cap in ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"] {
        assert!(caps.contains(&cap), "{cap} missing: {caps:?}");
    }
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
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup", "/sys/kernel/tracing", "/var/lib/ambit/ca"] {
        assert!(mounts.contains(&path), "{path} not mounted: {mounts:?}");
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
