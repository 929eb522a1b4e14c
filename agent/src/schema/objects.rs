//! The Kubernetes objects ambit reads, as serde types with only the fields it uses. Unknown
//! fields are ignored, as the API server's clients do, so real `kubectl get -o yaml` output
//! loads as it is.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `apiVersion` and `kind`, read first to pick the type of a document.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeMeta {
    /// e.g. `v1`, `discovery.k8s.io/v1`.
    #[serde(default)]
    pub api_version: String,
    /// e.g. `Pod`.
    #[serde(default)]
    pub kind: String,
}

/// The part of `metadata` we use.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    pub name: String,
    /// Namespace; `default` when absent on a namespaced object.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Unique id.
    #[serde(default)]
    pub uid: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Creation time (RFC 3339); the oldest policy wins a tie, as in Istio.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// `v1/Namespace`.
#[derive(Clone, Debug, Deserialize)]
pub struct Namespace {
    /// Metadata.
    pub metadata: ObjectMeta,
}

/// `v1/Pod`.
#[derive(Clone, Debug, Deserialize)]
pub struct Pod {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PodSpec,
    /// Status.
    #[serde(default)]
    pub status: PodStatus,
}

impl Pod {
    /// Checks what the agent relies on: every address in the status is an IP address.
    pub fn validate(&self) -> Result<(), String> {
        let ips = self.status.pod_ip.iter().chain(self.status.pod_ips.iter().map(|p| &p.ip));
        match ips.into_iter().find(|ip| ip.parse::<std::net::IpAddr>().is_err()) {
            Some(ip) => Err(format!("status.podIP: {ip:?} is not an IP address")),
            None => Ok(()),
        }
    }
}

/// The part of a pod's spec we use.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Node the pod is scheduled to.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Service account; Kubernetes defaults it to `default`.
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Pods on the host network are never enrolled.
    #[serde(default)]
    pub host_network: bool,
    /// Containers, for their named ports.
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// A container, for its ports.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Declared ports.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

/// A declared container port.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// Optional name, the target of named Service ports.
    #[serde(default)]
    pub name: Option<String>,
    /// The port.
    pub container_port: u16,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// The part of a pod's status we use.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Primary IP.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// All IPs (dual stack).
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
}

/// One entry of `status.podIPs`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: String,
}

/// `v1/Service`.
#[derive(Clone, Debug, Deserialize)]
pub struct Service {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: ServiceSpec,
}

/// The part of a Service's spec we use.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Virtual IP, or `None` for a headless Service.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// All virtual IPs (dual stack).
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Pod selector.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// A Service port.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Name, matched by EndpointSlice ports.
    #[serde(default)]
    pub name: Option<String>,
    /// The port on the virtual IP.
    pub port: u16,
    /// A number or a container port name.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// Kubernetes' int-or-string.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    /// A number.
    Int(u16),
    /// A name.
    String(String),
}

/// `discovery.k8s.io/v1/EndpointSlice`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Metadata; the `kubernetes.io/service-name` label names the Service.
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    #[serde(default)]
    pub address_type: Option<String>,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Addresses.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Readiness.
    #[serde(default)]
    pub conditions: EndpointConditions,
    /// The pod behind it.
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
}

/// Endpoint conditions; absent means ready.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointConditions {
    /// Ready to take traffic.
    #[serde(default)]
    pub ready: Option<bool>,
}

/// A reference to another object.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ObjectReference {
    /// Kind, e.g. `Pod`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointPort {
    /// Name, matching the Service port's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The endpoint port.
    #[serde(default)]
    pub port: Option<u16>,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}
