//! The snapshot: one consistent view of the cluster that the proxies, the redirector and the
//! admin API read, and how the sources update it. A source hands over the objects that arrived
//! or went ([`Change`]); [`Cluster::with`] returns the next snapshot, recomputing only what
//! depends on them: a pod's own entry, address claims and list of policies, the Services that
//! select it; a policy's workloads; a namespace's pods. The maps are persistent (`imbl`), so
//! a snapshot shares everything unchanged with the one before it and is cheap to clone, and
//! readers holding the old one are never disturbed.

pub mod services;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use imbl::{OrdMap, OrdSet};

use self::services::ServiceIndex;
use crate::{
    policy::{
        Action, AuthorizationPolicies, CompiledPolicy, ConnectionInput, InboundDecision, PeerAuthentication,
        PeerAuthentications, PolicySummary, WorkloadPolicies,
    },
    schema::{
        DATAPLANE_MODE_LABEL, Enrollment, NETNS_ANNOTATION, ObjectKey, Workload, in_namespace,
        objects::{EndpointSlice, Namespace, Pod, Service},
    },
};

/// An object that arrived or changed (`Some`), or went (`None`).
#[derive(Clone, Debug)]
pub enum Change {
    /// A Namespace, by name.
    Namespace(String, Option<Namespace>),
    /// A Pod.
    Pod(ObjectKey, Option<Pod>),
    /// A Service.
    Service(ObjectKey, Option<Service>),
    /// An EndpointSlice.
    EndpointSlice(ObjectKey, Option<EndpointSlice>),
    /// A PeerAuthentication.
    PeerAuthentication(ObjectKey, Option<PeerAuthentication>),
    /// An AuthorizationPolicy, compiled (shared with the source that keeps it).
    AuthorizationPolicy(ObjectKey, Option<Arc<CompiledPolicy>>),
}

/// The kinds of object the agent reads, from either source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// v1 Namespace.
    Namespace,
    /// v1 Pod.
    Pod,
    /// v1 Service.
    Service,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// security.istio.io PeerAuthentication.
    PeerAuthentication,
    /// security.istio.io AuthorizationPolicy.
    AuthorizationPolicy,
}

impl Change {
    /// The kind of object changed.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Self::Namespace(..) => Kind::Namespace,
            Self::Pod(..) => Kind::Pod,
            Self::Service(..) => Kind::Service,
            Self::EndpointSlice(..) => Kind::EndpointSlice,
            Self::PeerAuthentication(..) => Kind::PeerAuthentication,
            Self::AuthorizationPolicy(..) => Kind::AuthorizationPolicy,
        }
    }

    /// The change that takes the object of `kind` at `key` out (a Namespace's key has only a
    /// name).
    pub(crate) fn gone(kind: Kind, key: ObjectKey) -> Self {
        match kind {
            Kind::Namespace => Self::Namespace(key.name, None),
            Kind::Pod => Self::Pod(key, None),
            Kind::Service => Self::Service(key, None),
            Kind::EndpointSlice => Self::EndpointSlice(key, None),
            Kind::PeerAuthentication => Self::PeerAuthentication(key, None),
            Kind::AuthorizationPolicy => Self::AuthorizationPolicy(key, None),
        }
    }
}

/// One consistent snapshot of the cluster.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Namespaces by name.
    pub namespaces: OrdMap<String, Namespace>,
    /// Pods.
    pub workloads: OrdMap<ObjectKey, Arc<Workload>>,
    /// Services.
    pub services: OrdMap<ObjectKey, Service>,
    /// EndpointSlices.
    pub endpoint_slices: OrdMap<ObjectKey, EndpointSlice>,
    /// Service virtual addresses and their endpoints.
    pub services_index: ServiceIndex,
    /// PeerAuthentications, indexed.
    pub peer_authentications: Arc<PeerAuthentications>,
    /// AuthorizationPolicies, with the ones that apply to each workload.
    pub authorization: AuthorizationPolicies,
    peer_authentication_objects: OrdMap<ObjectKey, PeerAuthentication>,
    /// The running pods that claim each address, sorted: an address has an owner only while
    /// exactly one pod claims it (no identity, no traffic while two do).
    claims: imbl::HashMap<IpAddr, Arc<[ObjectKey]>>,
    on_node: OrdMap<String, OrdSet<ObjectKey>>,
}

impl Cluster {
    /// The destination's decision on an inbound connection to `workload`: the one function the
    /// proxies, the open-connection tracker, `ambit check` and what-if all call.
    pub fn decide_inbound(
        &self,
        workload: &Workload,
        input: &ConnectionInput,
        root_namespace: &str,
    ) -> InboundDecision {
        InboundDecision::new(&self.peer_authentications, &self.authorization, workload, input, root_namespace)
    }

    /// The policies in force for `workload`.
    pub fn policies_of(&self, workload: &Workload, root_namespace: &str) -> WorkloadPolicies {
        let mut authorization: Vec<PolicySummary> = self
            .authorization
            .for_workload(&workload.key)
            .map(|p| PolicySummary {
                name: p.name.clone(),
                action: p.action,
                rules: p.rule_count,
                http_only: p.unsupported.clone(),
            })
            .collect();
        let order = |a: Action| match a {
            Action::Deny => 0,
            Action::Allow => 1,
            Action::Audit | Action::Custom => 2,
        };
        authorization.sort_by_key(|p| order(p.action));
        WorkloadPolicies {
            pod: workload.key.to_string(),
            // Port 0 is never a port-level key: the workload-wide mode.
            mtls: self.peer_authentications.decide(workload, 0, root_namespace),
            port_mtls: self.peer_authentications.port_overrides(workload, root_namespace),
            authorization,
        }
    }

    /// Builds a snapshot from objects; pod IPs, enrollment and policy indexes are derived here
    /// once, not per connection.
    pub fn new(objects: Objects, root_namespace: &str) -> Self {
        Self::default().with(objects.into_changes(), root_namespace)
    }

    /// The next snapshot: this one with `changes` applied, in order. Costs what the changes
    /// touch, not the size of the cluster.
    #[must_use]
    pub fn with(&self, changes: impl IntoIterator<Item = Change>, root_namespace: &str) -> Self {
        let mut next = self.clone();
        let mut pods = Vec::new();
        let mut namespaces = BTreeSet::new();
        let mut services = BTreeSet::new();
        let mut policies = Vec::new();
        let mut peer_authentications = false;
        for change in changes {
            match change {
                Change::Namespace(name, ns) => {
                    match ns {
                        Some(ns) => next.namespaces.insert(name.clone(), ns),
                        None => next.namespaces.remove(&name),
                    };
                    namespaces.insert(name);
                }
                Change::Pod(key, pod) => pods.push((key, pod)),
                Change::Service(key, svc) => {
                    match svc {
                        Some(svc) => next.services.insert(key.clone(), svc),
                        None => next.services.remove(&key),
                    };
                    services.insert(key);
                }
                Change::EndpointSlice(key, slice) => {
                    let old = match slice {
                        Some(slice) => {
                            services.extend(services::service_of(&key, &slice));
                            next.endpoint_slices.insert(key.clone(), slice)
                        }
                        None => next.endpoint_slices.remove(&key),
                    };
                    services.extend(old.and_then(|old| services::service_of(&key, &old)));
                }
                Change::PeerAuthentication(key, policy) => {
                    match policy {
                        Some(p) => next.peer_authentication_objects.insert(key, p),
                        None => next.peer_authentication_objects.remove(&key),
                    };
                    peer_authentications = true;
                }
                Change::AuthorizationPolicy(key, policy) => policies.push((key, policy)),
            }
        }

        // Workloads, with the namespaces as they are now: the changed pods, then the pods whose
        // enrollment their changed namespace decides.
        let mut changed: std::collections::BTreeMap<ObjectKey, Option<Arc<Workload>>> = Default::default();
        for (key, pod) in pods {
            let old = match pod {
                Some(pod) => {
                    next.workloads.insert(key.clone(), Arc::new(workload_of(&pod, &next.namespaces)))
                }
                None => next.workloads.remove(&key),
            };
            changed.entry(key).or_insert(old);
        }
        for ns in &namespaces {
            // What the namespace alone makes of a pod that leaves it the decision.
            let inherited = enrollment(false, false, None, namespace_mode(next.namespaces.get(ns)));
            let rederived: Vec<Arc<Workload>> = in_namespace(&next.workloads, ns)
                .filter(|(_, w)| w.namespace_decides && w.enrollment != inherited)
                .map(|(_, w)| Arc::new(Workload { enrollment: inherited, ..(**w).clone() }))
                .collect();
            for w in rederived {
                let old = next.workloads.insert(w.key.clone(), w.clone());
                changed.entry(w.key.clone()).or_insert(old);
            }
        }

        // Policies first, leaving out the workloads recomputed whole below.
        for (key, policy) in policies {
            next.authorization.policy_changed(
                &key,
                policy,
                &next.workloads,
                &|w| changed.contains_key(w),
                root_namespace,
            );
        }
        for (key, old) in &changed {
            let new = next.workloads.get(key).cloned();
            next.authorization.workload_changed(key, new.as_deref(), root_namespace);
            next.reindex(key, old.as_deref(), new.as_deref());
            for w in old.iter().chain(&new) {
                services.extend(services::selecting(&next.services, &key.namespace, &w.labels).cloned());
            }
        }
        for key in &services {
            next.services_index.service_changed(key, &next.services, &next.endpoint_slices, &next.workloads);
        }
        if peer_authentications {
            next.peer_authentications = Arc::new(PeerAuthentications::new(
                next.peer_authentication_objects.values().cloned().collect(),
            ));
        }
        next
    }

    /// Moves a workload's address claims and node entry from `old` to `new`.
    fn reindex(&mut self, key: &ObjectKey, old: Option<&Workload>, new: Option<&Workload>) {
        let claimed = |w: Option<&Workload>| -> Vec<IpAddr> {
            w.filter(|w| w.enrollment.owns_ips()).map(|w| w.ips.clone()).unwrap_or_default()
        };
        let (before, after) = (claimed(old), claimed(new));
        for ip in before.iter().filter(|ip| !after.contains(ip)) {
            let rest: Vec<ObjectKey> = self
                .claims
                .get(ip)
                .into_iter()
                .flat_map(|c| c.iter())
                .filter(|k| *k != key)
                .cloned()
                .collect();
            if rest.is_empty() {
                self.claims.remove(ip);
            } else {
                self.claims.insert(*ip, rest.into());
            }
        }
        for ip in after.iter().filter(|ip| !before.contains(ip)) {
            let mut all: Vec<ObjectKey> =
                self.claims.get(ip).into_iter().flat_map(|c| c.iter()).cloned().collect();
            if let Err(at) = all.binary_search(key) {
                all.insert(at, key.clone());
            }
            self.claims.insert(*ip, all.into());
        }
        let node = |w: Option<&Workload>| w.and_then(|w| w.node.clone());
        let (was, is) = (node(old), node(new));
        if was != is {
            if let Some(was) = was
                && let Some(set) = self.on_node.get_mut(&was)
            {
                set.remove(key);
                if set.is_empty() {
                    self.on_node.remove(&was);
                }
            }
            if let Some(is) = is {
                self.on_node.entry(is).or_default().insert(key.clone());
            }
        }
    }

    /// The pods scheduled to `node`.
    pub fn workloads_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.on_node.get(node).into_iter().flatten().filter_map(|key| self.workloads.get(key))
    }

    /// The number of a pod's named container port.
    pub fn container_port(&self, pod: &ObjectKey, name: &str) -> Option<u16> {
        self.workloads.get(pod)?.named_ports.get(name).copied()
    }

    /// The pod that owns `ip`, if any (host-network and finished pods own no IP, and neither of
    /// two running pods claiming one does).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        match self.claims.get(&ip).map(|c| &c[..]) {
            Some([only]) => self.workloads.get(only),
            _ => None,
        }
    }

    /// The running pods that claim `ip` when there is more than one.
    pub fn ip_claimants(&self, ip: IpAddr) -> Option<&[ObjectKey]> {
        self.claims.get(&ip).map(|c| &c[..]).filter(|c| c.len() > 1)
    }

    /// Whether a policy of `kind` is in force at `key`.
    pub(crate) fn has_policy(&self, kind: Kind, key: &ObjectKey) -> bool {
        match kind {
            Kind::PeerAuthentication => self.peer_authentication_objects.contains_key(key),
            Kind::AuthorizationPolicy => self.authorization.contains(key),
            _ => false,
        }
    }

    /// Whether `namespace` exists: declared, holding pods, or Istio's root namespace.
    pub(crate) fn has_namespace(&self, namespace: &str, root_namespace: &str) -> bool {
        namespace == root_namespace
            || self.namespaces.contains_key(namespace)
            || in_namespace(&self.workloads, namespace).next().is_some()
    }
}

impl Objects {
    /// The objects as changes to an empty snapshot.
    pub fn into_changes(self) -> Vec<Change> {
        let Self {
            namespaces,
            pods,
            services,
            endpoint_slices,
            peer_authentications,
            authorization_policies,
        } = self;
        let mut changes = Vec::new();
        changes.extend(namespaces.into_iter().map(|(name, ns)| Change::Namespace(name, Some(ns))));
        changes.extend(pods.into_iter().map(|pod| Change::Pod(pod_key(&pod), Some(pod))));
        changes.extend(services.into_iter().map(|(key, svc)| Change::Service(key, Some(svc))));
        changes.extend(endpoint_slices.into_iter().map(|(key, s)| Change::EndpointSlice(key, Some(s))));
        changes.extend(peer_authentications.into_iter().map(|p| {
            let key = ObjectKey {
                namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                name: p.metadata.name.clone(),
            };
            Change::PeerAuthentication(key, Some(p))
        }));
        changes.extend(
            authorization_policies
                .into_iter()
                .map(|p| Change::AuthorizationPolicy(p.key(), Some(Arc::new(p)))),
        );
        changes
    }
}

/// A pod's namespace (`default` when unset) and name.
pub(crate) fn pod_key(pod: &Pod) -> ObjectKey {
    ObjectKey {
        namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        name: pod.metadata.name.clone(),
    }
}

fn namespace_mode(ns: Option<&Namespace>) -> Option<&str> {
    ns?.metadata.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str)
}

/// Whether a pod is in the mesh, from its own state and label and its namespace's label: the
/// one place this is decided.
fn enrollment(
    host_network: bool,
    finished: bool,
    pod_mode: Option<&str>,
    ns_mode: Option<&str>,
) -> Enrollment {
    if host_network {
        Enrollment::HostNetwork
    } else if finished {
        Enrollment::Finished
    } else if pod_mode == Some("none") {
        Enrollment::OptedOut
    } else if pod_mode == Some("ambient") || ns_mode == Some("ambient") {
        Enrollment::Ambient
    } else {
        Enrollment::NotEnrolled
    }
}

fn workload_of(pod: &Pod, namespaces: &OrdMap<String, Namespace>) -> Workload {
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
    let pod_mode = pod.metadata.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
    let finished = matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let decide = |ns_mode| enrollment(pod.spec.host_network, finished, pod_mode, ns_mode);
    let enrollment = decide(namespace_mode(namespaces.get(&namespace)));
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
        // Whether the namespace's label could change the outcome.
        namespace_decides: decide(Some("ambient")) != decide(None),
        named_ports: pod
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect(),
    }
}

/// An object as a source keeps it between snapshots: decoded once when it arrives, policies
/// compiled.
#[derive(Clone, Debug)]
pub(crate) enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(Arc<CompiledPolicy>),
}

impl Object {
    /// Its kind.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Self::Namespace(_) => Kind::Namespace,
            Self::Pod(_) => Kind::Pod,
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::PeerAuthentication(_) => Kind::PeerAuthentication,
            Self::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// The change that puts this object at `key` (a Namespace's key has only a name).
    pub(crate) fn arrived(self, key: ObjectKey) -> Change {
        match self {
            Self::Namespace(ns) => Change::Namespace(key.name, Some(ns)),
            Self::Pod(pod) => Change::Pod(key, Some(pod)),
            Self::Service(svc) => Change::Service(key, Some(svc)),
            Self::EndpointSlice(slice) => Change::EndpointSlice(key, Some(slice)),
            Self::PeerAuthentication(p) => Change::PeerAuthentication(key, Some(p)),
            Self::AuthorizationPolicy(p) => Change::AuthorizationPolicy(key, Some(p)),
        }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ROOT: &str = "istio-system";

    /// A small deterministic generator (xorshift), so a failure reproduces.
    struct Dice(u64);

    impl Dice {
        fn roll(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.roll(of.len())]
        }
    }

    const NAMESPACES: [&str; 3] = ["a", "b", ROOT];
    const APPS: [&str; 3] = ["x", "y", "z"];

    fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).expect("test object")
    }

    /// One object that arrives or goes, at random.
    fn random_change(dice: &mut Dice) -> Change {
        let ns = dice.pick(&NAMESPACES).to_owned();
        let name = format!("o{}", dice.roll(8));
        let key = ObjectKey { namespace: ns.clone(), name: name.clone() };
        let app = dice.pick(&APPS);
        let gone = dice.roll(6) == 0;
        match dice.roll(6) {
            0 => Change::Namespace(
                ns.clone(),
                (!gone).then(|| {
                    let mode = dice.pick(&["ambient", "none", ""]);
                    decode(json!({"metadata": {"name": ns, "labels": {DATAPLANE_MODE_LABEL: mode}}}))
                }),
            ),
            1 | 2 => Change::Pod(
                key,
                (!gone).then(|| {
                    let mode = dice.pick(&["ambient", "none", "", ""]);
                    decode(json!({
                        "metadata": {"name": name, "namespace": ns, "labels": {"app": app, DATAPLANE_MODE_LABEL: mode}},
                        "spec": {
                            "nodeName": dice.pick(&["n0", "n1", "n2"]),
                            "hostNetwork": dice.roll(8) == 0,
                            "serviceAccountName": dice.pick(&["sa1", "sa2"]),
                            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8000 + dice.roll(3)}]}],
                        },
                        "status": {
                            "podIP": format!("10.0.0.{}", dice.roll(12)),
                            "phase": dice.pick(&["Running", "Running", "Succeeded"]),
                        },
                    }))
                }),
            ),
            3 => Change::Service(
                key,
                (!gone).then(|| {
                    decode(json!({
                        "metadata": {"name": name, "namespace": ns},
                        "spec": {
                            "clusterIP": format!("10.96.0.{}", dice.roll(6)),
                            "selector": {"app": app},
                            "ports": [{"port": 80, "targetPort": dice.pick(&["http", "8080"])}],
                        },
                    }))
                }),
            ),
            4 => Change::EndpointSlice(
                key,
                (!gone).then(|| {
                    decode(json!({
                        "metadata": {"name": name, "namespace": ns, "labels": {services::SERVICE_NAME_LABEL: format!("o{}", dice.roll(8))}},
                        "addressType": "IPv4",
                        "ports": [{"port": 7000}],
                        "endpoints": [{"addresses": [format!("10.1.0.{}", dice.roll(9))]}],
                    }))
                }),
            ),
            _ if dice.roll(2) == 0 => Change::PeerAuthentication(
                key,
                (!gone).then(|| {
                    let selector = if dice.roll(2) == 0 { json!({"matchLabels": {"app": app}}) } else { json!(null) };
                    decode(json!({
                        "metadata": {"name": name, "namespace": ns},
                        "spec": {"selector": selector, "mtls": {"mode": dice.pick(&["STRICT", "PERMISSIVE"])}},
                    }))
                }),
            ),
            _ => Change::AuthorizationPolicy(
                key,
                (!gone).then(|| {
                    let selector = if dice.roll(2) == 0 { json!({"matchLabels": {"app": app}}) } else { json!(null) };
                    let policy: crate::policy::AuthorizationPolicy = decode(json!({
                        "metadata": {"name": name, "namespace": ns},
                        "spec": {"selector": selector, "action": dice.pick(&["ALLOW", "DENY"]), "rules": [{}]},
                    }));
                    Arc::new(policy.compile().expect("compiles"))
                }),
            ),
        }
    }

    /// What a reader of the snapshot can observe, in one comparable value.
    fn observed(c: &Cluster) -> Vec<String> {
        let mut out: Vec<String> = c.workloads.iter().map(|(k, w)| format!("workload {k} {w:?}")).collect();
        for i in 0..12 {
            let ip: IpAddr = format!("10.0.0.{i}").parse().expect("ip");
            out.push(format!("ip {ip} {:?} {:?}", c.workload_by_ip(ip).map(|w| &w.key), c.ip_claimants(ip)));
        }
        for node in ["n0", "n1", "n2"] {
            out.push(format!("node {node} {:?}", c.workloads_on(node).map(|w| &w.key).collect::<Vec<_>>()));
        }
        for w in c.workloads.values() {
            let names: Vec<&str> = c.authorization.for_workload(&w.key).map(|p| p.name.as_str()).collect();
            out.push(format!("policies of {} {names:?}", w.key));
            out.push(format!("mtls of {} {:?}", w.key, c.peer_authentications.decide(w, 80, ROOT)));
        }
        out.push(format!("all {:?}", c.authorization.all().map(|p| &p.name).collect::<Vec<_>>()));
        for i in 0..6 {
            let vip: std::net::SocketAddr = format!("10.96.0.{i}:80").parse().expect("vip");
            out.push(format!(
                "vip {vip} {:?}",
                c.services_index.get(vip).map(|b| (&b.service, &b.endpoints))
            ));
        }
        out
    }

    /// The indexes against a search of the objects themselves, without them: which policies
    /// select each workload, who owns each address, which pods are on each node.
    fn brute_force<'a>(c: &Cluster, objects: impl Iterator<Item = &'a Change> + Clone) {
        for w in c.workloads.values() {
            let mut expected: Vec<&str> = objects
                .clone()
                .filter_map(|o| match o {
                    Change::AuthorizationPolicy(_, Some(p)) if p.applies_to(w, ROOT) => Some(p.name.as_str()),
                    _ => None,
                })
                .collect();
            expected.sort_unstable();
            let indexed: Vec<&str> = c.authorization.for_workload(&w.key).map(|p| p.name.as_str()).collect();
            assert_eq!(indexed, expected, "policies of {}", w.key);
        }
        for i in 0..12 {
            let ip: IpAddr = format!("10.0.0.{i}").parse().expect("ip");
            let claimants: Vec<&ObjectKey> = c
                .workloads
                .values()
                .filter(|w| w.enrollment.owns_ips() && w.ips.contains(&ip))
                .map(|w| &w.key)
                .collect();
            let owner = match claimants[..] {
                [only] => Some(only),
                _ => None,
            };
            assert_eq!(c.workload_by_ip(ip).map(|w| &w.key), owner, "owner of {ip}");
            let conflict = (claimants.len() > 1).then(|| claimants.into_iter().cloned().collect::<Vec<_>>());
            assert_eq!(c.ip_claimants(ip).map(<[ObjectKey]>::to_vec), conflict, "claimants of {ip}");
        }
        for node in ["n0", "n1", "n2"] {
            let on: Vec<&ObjectKey> =
                c.workloads.values().filter(|w| w.node.as_deref() == Some(node)).map(|w| &w.key).collect();
            assert_eq!(c.workloads_on(node).map(|w| &w.key).collect::<Vec<_>>(), on, "pods on {node}");
        }
    }

    /// The incremental path against a snapshot built whole from the same objects, after every
    /// batch of a long random sequence of changes.
    #[test]
    fn a_snapshot_updated_change_by_change_equals_one_built_whole() {
        let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
        let mut incremental = Cluster::default();
        let mut truth: std::collections::BTreeMap<(u8, ObjectKey), Change> = Default::default();
        for _ in 0..400 {
            let batch: Vec<Change> = (0..1 + dice.roll(4)).map(|_| random_change(&mut dice)).collect();
            for change in &batch {
                let (tag, key, present) = match change {
                    Change::Namespace(n, o) => {
                        (0, ObjectKey { namespace: String::new(), name: n.clone() }, o.is_some())
                    }
                    Change::Pod(k, o) => (1, k.clone(), o.is_some()),
                    Change::Service(k, o) => (2, k.clone(), o.is_some()),
                    Change::EndpointSlice(k, o) => (3, k.clone(), o.is_some()),
                    Change::PeerAuthentication(k, o) => (4, k.clone(), o.is_some()),
                    Change::AuthorizationPolicy(k, o) => (5, k.clone(), o.is_some()),
                };
                if present {
                    truth.insert((tag, key), change.clone());
                } else {
                    truth.remove(&(tag, key));
                }
            }
            incremental = incremental.with(batch, ROOT);
            let whole = Cluster::default().with(truth.values().cloned(), ROOT);
            assert_eq!(observed(&incremental), observed(&whole));
            brute_force(&incremental, truth.values());
        }
        assert!(incremental.workloads.len() > 5, "the sequence exercised pods");
        assert!(incremental.authorization.len() > 3, "and policies");
    }

    /// A change leaves the rest shared: the memo of an unaffected workload survives it.
    #[test]
    fn an_unrelated_change_keeps_other_workloads_verdict_memos() {
        let pod = |name: &str, app: &str| -> Change {
            Change::Pod(
                ObjectKey { namespace: "a".into(), name: name.into() },
                Some(decode(
                    json!({"metadata": {"name": name, "namespace": "a", "labels": {"app": app}}, "spec": {}}),
                )),
            )
        };
        let allow: crate::policy::AuthorizationPolicy = decode(json!({
            "metadata": {"name": "allow-x", "namespace": "a"},
            "spec": {"selector": {"matchLabels": {"app": "x"}}, "rules": [{}]},
        }));
        let policy = allow.compile().expect("compiles");
        let before = Cluster::default().with(
            [
                pod("p1", "x"),
                pod("p2", "y"),
                Change::AuthorizationPolicy(policy.key(), Some(Arc::new(policy))),
            ],
            ROOT,
        );
        let p1 = ObjectKey { namespace: "a".into(), name: "p1".into() };
        let input = crate::policy::ConnectionInput {
            principal: Some("cluster.local/ns/a/sa/default".into()),
            namespace: Some("a".into()),
            source_ip: "10.0.0.1".parse().expect("ip"),
            destination: "10.0.0.2:80".parse().expect("addr"),
        };
        assert!(before.authorization.evaluate(&p1, &input).allowed);
        assert_eq!(before.authorization.memo_len(&p1), 1, "the verdict is memoized");
        let after = before.with([pod("p2", "z")], ROOT);
        assert_eq!(after.authorization.memo_len(&p1), 1, "another pod's change keeps p1's memo");
        // The control: a change of what applies to p1 starts its memo over.
        let deny: crate::policy::AuthorizationPolicy = decode(json!({
            "metadata": {"name": "deny-x", "namespace": "a"},
            "spec": {"selector": {"matchLabels": {"app": "x"}}, "action": "DENY", "rules": [{}]},
        }));
        let deny = deny.compile().expect("compiles");
        let denied = after.with([Change::AuthorizationPolicy(deny.key(), Some(Arc::new(deny)))], ROOT);
        assert_eq!(denied.authorization.memo_len(&p1), 0, "a policy selecting p1 starts its memo over");
        assert!(!denied.authorization.evaluate(&p1, &input).allowed);
    }
}
