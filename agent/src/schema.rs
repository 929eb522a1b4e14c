//! The objects the agent reads and reports, as data: Kubernetes objects as a source of truth
//! serves them ([`objects`]), and a pod as the mesh sees it ([`Workload`]), which the admin API
//! returns as is. A leaf: it names nothing else of the agent, so the policies, the snapshot and
//! the command line can all stand on it.

pub mod objects;

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Label that enrolls a Namespace or Pod (`ambient`) or opts a Pod out (`none`), as in Istio.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Local-mode annotation on a Pod: the path of its network namespace.
pub const NETNS_ANNOTATION: &str = "ambit.io/netns";

/// The entries of `map` in `namespace`, in name order.
pub(crate) fn in_namespace<'a, V>(
    map: &'a imbl::OrdMap<ObjectKey, V>,
    namespace: &'a str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a V)> + 'a {
    let from = ObjectKey { namespace: namespace.to_owned(), name: String::new() };
    map.range(from..).take_while(move |(k, _)| k.namespace == namespace)
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
    /// Whether the namespace's label decides the enrollment (the pod's own state and labels
    /// do not), so that a namespace change re-derives it.
    #[serde(skip, default)]
    pub(crate) namespace_decides: bool,
}

impl Workload {
    /// The SPIFFE ID of the workload in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.key.namespace, self.service_account)
    }
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
        namespace_decides: false,
    }
}
