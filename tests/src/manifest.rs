//! The pod templates of `daemonset/` as the kubelet would start them: read from the shipped
//! files (never a copy), so that a test runs what users install.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde_yaml_ng::Value;

/// A manifest of `daemonset/` (`daemonset.yaml`, `ca/deployment.yaml`...), parsed.
pub fn manifest(path: &str) -> io::Result<Value> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset").join(path);
    let text =
        std::fs::read_to_string(&file).map_err(|e| io::Error::other(format!("{}: {e}", file.display())))?;
    serde_yaml_ng::from_str(&text).map_err(|e| io::Error::other(format!("{}: {e}", file.display())))
}

/// Where a volume's content comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A `hostPath` volume: this path of the host.
    Host(PathBuf),
    /// A ConfigMap, Secret or projected volume, by volume name: the test supplies a directory.
    Volume(String),
}

/// One `volumeMounts` entry with its volume.
#[derive(Clone, Debug)]
pub struct Mount {
    /// `mountPath`.
    pub target: PathBuf,
    /// What is mounted there.
    pub source: Source,
    /// `readOnly`.
    pub read_only: bool,
    /// `mountPropagation: HostToContainer` (host mounts appear inside later).
    pub host_to_container: bool,
}

/// How a pod template's first container is started.
#[derive(Clone, Debug, Default)]
pub struct PodTemplate {
    /// The container's `args` (the image's entrypoint is `ambit`).
    pub args: Vec<String>,
    /// Its environment: values, the node name for `spec.nodeName`, ConfigMap keys and `envFrom`
    /// of `ambit-config`.
    pub env: Vec<(String, String)>,
    /// Its mounts.
    pub mounts: Vec<Mount>,
    /// `runAsUser` / `runAsGroup` of the pod or the container.
    pub user: Option<(u32, u32)>,
    /// `capabilities.add`, without the `CAP_` prefix (all others are dropped).
    pub capabilities: Vec<String>,
    /// Whether `capabilities.drop` is `[ALL]`.
    pub drops_all: bool,
    /// `privileged`.
    pub privileged: bool,
    /// `hostNetwork`, `hostPID`.
    pub host_network: bool,
    /// See `host_network`.
    pub host_pid: bool,
}

/// The pod template of a DaemonSet or Deployment manifest, as started on `node`.
pub fn pod_template(path: &str, node: &str) -> io::Result<PodTemplate> {
    let workload = manifest(path)?;
    let config = manifest("configmap.yaml")?;
    let pod = &workload["spec"]["template"]["spec"];
    let spec = &pod["containers"][0];
    let bad = |what: String| io::Error::other(format!("{path}: {what}"));
    let data = |key: &str| config["data"][key].as_str().map(str::to_owned);
    let mut template = PodTemplate {
        host_network: pod["hostNetwork"] == Value::Bool(true),
        host_pid: pod["hostPID"] == Value::Bool(true),
        privileged: spec["securityContext"]["privileged"] == Value::Bool(true),
        ..PodTemplate::default()
    };
    for entry in spec["env"].as_sequence().into_iter().flatten() {
        let name = entry["name"].as_str().ok_or_else(|| bad("env without a name".into()))?.to_owned();
        let value = match (&entry["value"], &entry["valueFrom"]) {
            (Value::String(v), _) => v.clone(),
            (_, from) if from["fieldRef"]["fieldPath"] == "spec.nodeName" => node.to_owned(),
            (_, from) if from["configMapKeyRef"]["name"] == "ambit-config" => from["configMapKeyRef"]["key"]
                .as_str()
                .and_then(data)
                .ok_or_else(|| bad(format!("env {name}: no such ConfigMap key")))?,
            other => return Err(bad(format!("env {name}: no stand-in for {other:?}"))),
        };
        template.env.push((name, value));
    }
    for from in spec["envFrom"].as_sequence().into_iter().flatten() {
        if from["configMapRef"]["name"] != "ambit-config" {
            return Err(bad(format!("envFrom {from:?}: only ambit-config is known")));
        }
        for (k, v) in config["data"].as_mapping().into_iter().flatten() {
            if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                template.env.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
    for mount in spec["volumeMounts"].as_sequence().into_iter().flatten() {
        let name = mount["name"].as_str().ok_or_else(|| bad("a mount without a name".into()))?;
        let target =
            PathBuf::from(mount["mountPath"].as_str().ok_or_else(|| bad(format!("mount {name}: no path")))?);
        let volume = volumes
            .iter()
            .find(|v| v["name"] == name)
            .ok_or_else(|| bad(format!("mount {name}: no such volume")))?;
        let source = match volume["hostPath"]["path"].as_str() {
            Some(host) => Source::Host(PathBuf::from(host)),
            None => Source::Volume(name.to_owned()),
        };
        template.mounts.push(Mount {
            target,
            source,
            read_only: mount["readOnly"] == Value::Bool(true),
            host_to_container: mount["mountPropagation"] == "HostToContainer",
        });
    }
    let context =
        |key: &str| spec["securityContext"][key].as_u64().or_else(|| pod["securityContext"][key].as_u64());
    if let Some(uid) = context("runAsUser") {
        template.user = Some((uid as u32, context("runAsGroup").unwrap_or(uid) as u32));
    }
    let caps = &spec["securityContext"]["capabilities"];
    template.capabilities = caps["add"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    template.drops_all = caps["drop"].as_sequence().is_some_and(|d| d.iter().any(|c| c == "ALL"));
    template.args = spec["args"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    Ok(template)
}

/// A Secret's `defaultMode` (octal to Kubernetes, which reads YAML 1.1, whichever way this
/// parser reads `0440`).
pub fn default_mode(volume: &Value) -> Option<u32> {
    let mode = match &volume["secret"]["defaultMode"] {
        Value::Number(n) => n.to_string(),
        other => other.as_str()?.to_owned(),
    };
    u32::from_str_radix(&mode, 8).ok()
}
