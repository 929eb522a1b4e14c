//! What the agent knows about the cluster: namespaces, pods, services and policies, from one
//! source of truth (the local cluster file today, the Kubernetes API in a cluster), as one
//! immutable [`Cluster`] snapshot that the rest of the agent reads.

pub mod kube;
pub mod local;
pub mod objects;
pub mod services;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use self::objects::{EndpointSlice, Namespace, Pod, Service};
use crate::policy::{AuthorizationPolicies, CompiledPolicy, PeerAuthentication, PeerAuthentications};

/// Label that enrolls a Namespace or Pod (`ambient`) or opts a Pod out (`none`), as in Istio.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Local-mode annotation on a Pod: the path of its network namespace.
pub const NETNS_ANNOTATION: &str = "ambit.io/netns";

/// Errors reading a source of truth. Each names where the bad input came from.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid YAML, or a field of the wrong type.
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, with the object it belongs to when known.
        message: String,
    },
    /// The Kubernetes API could not be reached or configured.
    #[error("Kubernetes API: {0}")]
    Kubernetes(String),
    /// Well-formed YAML with a meaning we cannot accept.
    #[error("{file}:{line}: {object}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line of the document.
        line: usize,
        /// `Kind namespace/name`.
        object: String,
        /// What is wrong.
        message: String,
    },
}

/// Namespace and name of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Whether a pod is in the mesh, and why (or why not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enrollment {
    /// Labelled `istio.io/dataplane-mode=ambient` (pod or namespace).
    Ambient,
    /// No enrolling label.
    NotEnrolled,
    /// The pod carries `istio.io/dataplane-mode=none`.
    OptedOut,
    /// `hostNetwork: true` pods are never enrolled.
    HostNetwork,
    /// The pod has finished (phase `Succeeded` or `Failed`): its address may already belong to
    /// another pod, so it is neither enrolled nor known by address.
    Finished,
}

impl Enrollment {
    /// True for pods the mesh captures.
    pub fn is_enrolled(self) -> bool {
        self == Self::Ambient
    }

    /// Whether the pod's `status.podIPs` are its own: not for host-network pods (they share the
    /// node's) nor for finished ones (the address may be reused).
    pub fn owns_ips(self) -> bool {
        !matches!(self, Self::HostNetwork | Self::Finished)
    }
}

impl fmt::Display for Enrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ambient => "ambient",
            Self::NotEnrolled => "not enrolled",
            Self::OptedOut => "opted out",
            Self::HostNetwork => "host network",
            Self::Finished => "finished",
        })
    }
}

/// A pod as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Namespace and name.
    #[serde(flatten)]
    pub key: ObjectKey,
    /// `metadata.uid` (empty when the file does not give one).
    pub uid: String,
    /// Node it runs on.
    pub node: Option<String>,
    /// Service account, `default` when unset.
    pub service_account: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// Network namespace path (local mode annotation).
    pub netns: Option<PathBuf>,
    /// Enrollment.
    pub enrollment: Enrollment,
    /// Labels, for policy selectors.
    #[serde(skip, default)]
    pub labels: BTreeMap<String, String>,
    /// Named container ports, the targets of named Service ports.
    #[serde(skip, default)]
    pub named_ports: BTreeMap<String, u16>,
}

impl Workload {
    /// The SPIFFE ID of the workload in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.key.namespace, self.service_account)
    }
}

/// The objects a source of truth provides, before indexing.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Services.
    pub services: BTreeMap<ObjectKey, Service>,
    /// EndpointSlices.
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// PeerAuthentications.
    pub peer_authentications: Vec<PeerAuthentication>,
    /// AuthorizationPolicies, compiled.
    pub authorization_policies: Vec<CompiledPolicy>,
}

/// A workload for unit tests: enrolled, service account `default`, with `labels`.
#[cfg(test)]
pub(crate) fn test_workload(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        key: ObjectKey { namespace: namespace.into(), name: name.into() },
        uid: String::new(),
        node: None,
        service_account: "default".into(),
        ips: Vec::new(),
        netns: None,
        enrollment: Enrollment::Ambient,
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        named_ports: BTreeMap::new(),
    }
}

/// One consistent snapshot of the cluster.
#[derive(Debug, Default)]
pub struct Cluster {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods.
    pub workloads: BTreeMap<ObjectKey, Arc<Workload>>,
    /// Services.
    pub services: BTreeMap<ObjectKey, Service>,
    /// EndpointSlices.
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// Service virtual addresses and their endpoints.
    pub services_index: services::ServiceIndex,
    /// PeerAuthentications, indexed.
    pub peer_authentications: PeerAuthentications,
    /// AuthorizationPolicies, with the ones that apply to each workload.
    pub authorization: AuthorizationPolicies,
    by_ip: HashMap<IpAddr, ObjectKey>,
    /// Addresses that two or more running pods claim, with the claimants: such an address has no
    /// owner (no identity, no traffic) until the conflict is gone.
    ip_conflicts: HashMap<IpAddr, Vec<ObjectKey>>,
}

impl Cluster {
    /// Builds a snapshot from objects; pod IPs, enrollment and policy indexes are derived here
    /// once, not per connection.
    pub fn new(objects: Objects, root_namespace: &str) -> Self {
        let Objects {
            namespaces,
            pods,
            services,
            endpoint_slices,
            peer_authentications,
            authorization_policies,
        } = objects;
        let mut workloads = BTreeMap::new();
        let mut by_ip = HashMap::new();
        let mut ip_conflicts: HashMap<IpAddr, Vec<ObjectKey>> = HashMap::new();
        for pod in pods {
            let workload = workload_of(&pod, &namespaces);
            if workload.enrollment.owns_ips() {
                for ip in &workload.ips {
                    if let Some(first) = by_ip.insert(*ip, workload.key.clone()) {
                        ip_conflicts.entry(*ip).or_insert_with(|| vec![first]).push(workload.key.clone());
                    }
                }
            }
            workloads.insert(workload.key.clone(), Arc::new(workload));
        }
        // Whichever pod came last must not win: neither gets the address.
        for (ip, claimants) in &mut ip_conflicts {
            by_ip.remove(ip);
            claimants.sort();
            claimants.dedup();
        }
        let authorization = AuthorizationPolicies::new(
            authorization_policies,
            workloads.values().map(|w| &**w),
            root_namespace,
        );
        let services_index = services::ServiceIndex::new(&services, &endpoint_slices, &workloads);
        Self {
            namespaces,
            authorization,
            services_index,
            workloads,
            services,
            endpoint_slices,
            peer_authentications: PeerAuthentications::new(peer_authentications),
            by_ip,
            ip_conflicts,
        }
    }

    /// The pods scheduled to `node`.
    pub fn workloads_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads.values().filter(move |w| w.node.as_deref() == Some(node))
    }

    /// The number of a pod's named container port.
    pub fn container_port(&self, pod: &ObjectKey, name: &str) -> Option<u16> {
        self.workloads.get(pod)?.named_ports.get(name).copied()
    }

    /// The pod that owns `ip`, if any (host-network and finished pods own no IP, and neither of
    /// two running pods claiming one does).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(self.by_ip.get(&ip)?)
    }

    /// The running pods that claim `ip` when there is more than one.
    pub fn ip_claimants(&self, ip: IpAddr) -> Option<&[ObjectKey]> {
        self.ip_conflicts.get(&ip).map(Vec::as_slice)
    }
}

fn workload_of(pod: &Pod, namespaces: &BTreeMap<String, Namespace>) -> Workload {
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
    let pod_mode = pod.metadata.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
    let ns_mode = namespaces
        .get(&namespace)
        .and_then(|ns| ns.metadata.labels.get(DATAPLANE_MODE_LABEL))
        .map(String::as_str);
    let finished = matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let enrollment = if pod.spec.host_network {
        Enrollment::HostNetwork
    } else if finished {
        Enrollment::Finished
    } else if pod_mode == Some("none") {
        Enrollment::OptedOut
    } else if pod_mode == Some("ambient") || ns_mode == Some("ambient") {
        Enrollment::Ambient
    } else {
        Enrollment::NotEnrolled
    };
    let mut ips: Vec<IpAddr> = pod.status.pod_ips.iter().filter_map(|p| p.ip.parse().ok()).collect();
    if let Some(ip) = pod.status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    Workload {
        key: ObjectKey { namespace, name: pod.metadata.name.clone() },
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node: pod.spec.node_name.clone(),
        service_account: pod
            .spec
            .service_account_name
            .clone()
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        ips,
        netns: pod.metadata.annotations.get(NETNS_ANNOTATION).map(PathBuf::from),
        enrollment,
        labels: pod.metadata.labels.clone(),
        named_ports: pod
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect(),
    }
}
