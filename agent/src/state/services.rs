//! Services: which endpoints stand behind a virtual IP and port, from EndpointSlices (ready
//! endpoints, the slice's resolved port) or, when a Service has none, from its selector and the
//! pods' container ports (named target ports resolved per pod).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use imbl::OrdMap;

use crate::schema::{
    ObjectKey, Workload, in_namespace,
    objects::{EndpointSlice, IntOrString, Service},
};

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The endpoints of one Service port.
#[derive(Debug, Default)]
pub struct Backends {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Ready endpoints.
    pub endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Backends {
    /// The next endpoint, round robin: connections spread over all of them.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Relaxed) % self.endpoints.len();
        Some(self.endpoints[i])
    }
}

/// Service virtual addresses and their endpoints, updated per changed Service.
#[derive(Clone, Debug, Default)]
pub struct ServiceIndex {
    /// The Services holding each address, by key: the last one serves it (two Services with
    /// one virtual address only happen in a hand-written file).
    by_vip: imbl::HashMap<SocketAddr, Vec<(ObjectKey, Arc<Backends>)>>,
    /// The virtual addresses each Service holds in `by_vip`.
    vips_of: OrdMap<ObjectKey, Arc<[SocketAddr]>>,
}

impl ServiceIndex {
    /// The Service behind a virtual address, if it is one.
    pub fn get(&self, vip: SocketAddr) -> Option<&Arc<Backends>> {
        self.by_vip.get(&vip)?.last().map(|(_, b)| b)
    }

    /// Recomputes the entries of Service `key` from the snapshot's Services, EndpointSlices
    /// (its ready endpoints) or, when it has none, the pods its selector picks.
    pub(crate) fn service_changed(
        &mut self,
        key: &ObjectKey,
        services: &OrdMap<ObjectKey, Service>,
        slices: &OrdMap<ObjectKey, EndpointSlice>,
        workloads: &OrdMap<ObjectKey, Arc<Workload>>,
    ) {
        for vip in self.vips_of.remove(key).iter().flat_map(|v| v.iter()) {
            let rest: Vec<_> =
                self.by_vip.get(vip).into_iter().flatten().filter(|(k, _)| k != key).cloned().collect();
            if rest.is_empty() {
                self.by_vip.remove(vip);
            } else {
                self.by_vip.insert(*vip, rest);
            }
        }
        let Some(svc) = services.get(key) else { return };
        let vips: Vec<IpAddr> = svc
            .spec
            .cluster_ip
            .iter()
            .chain(&svc.spec.cluster_ips)
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if vips.is_empty() {
            // Headless: clients connect to pod IPs, which need no translation.
            return;
        }
        let own_slices: Vec<&EndpointSlice> = in_namespace(slices, &key.namespace)
            .map(|(_, s)| s)
            .filter(|s| s.metadata.labels.get(SERVICE_NAME_LABEL).is_some_and(|n| *n == key.name))
            .collect();
        let mut held = Vec::new();
        for port in &svc.spec.ports {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let mut endpoints: Vec<SocketAddr> = if own_slices.is_empty() {
                from_selector(
                    key,
                    svc,
                    port.target_port.as_ref().unwrap_or(&IntOrString::Int(port.port)),
                    workloads,
                )
            } else {
                from_slices(&own_slices, port.name.as_deref())
            };
            endpoints.sort();
            endpoints.dedup();
            let backends =
                Arc::new(Backends { service: key.to_string(), endpoints, next: AtomicUsize::new(0) });
            for vip in &vips {
                let vip = SocketAddr::new(*vip, port.port);
                let holders = self.by_vip.entry(vip).or_default();
                holders.retain(|(k, _)| k != key);
                let at = holders.partition_point(|(k, _)| k < key);
                holders.insert(at, (key.clone(), backends.clone()));
                held.push(vip);
            }
        }
        self.vips_of.insert(key.clone(), held.into());
    }
}

/// The Services of `namespace` that select pods with `labels` (their endpoints may come from
/// such pods).
pub(crate) fn selecting<'a>(
    services: &'a OrdMap<ObjectKey, Service>,
    namespace: &'a str,
    labels: &'a BTreeMap<String, String>,
) -> impl Iterator<Item = &'a ObjectKey> + 'a {
    in_namespace(services, namespace)
        .filter(|(_, svc)| {
            !svc.spec.selector.is_empty() && svc.spec.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .map(|(k, _)| k)
}

/// The Service an EndpointSlice belongs to.
pub(crate) fn service_of(key: &ObjectKey, slice: &EndpointSlice) -> Option<ObjectKey> {
    let name = slice.metadata.labels.get(SERVICE_NAME_LABEL)?;
    Some(ObjectKey { namespace: key.namespace.clone(), name: name.clone() })
}

fn from_slices(slices: &[&EndpointSlice], port_name: Option<&str>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for slice in slices {
        // The slice's port with the Service port's name (both unnamed for single-port Services).
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or_default() == port_name.unwrap_or_default())
            .and_then(|p| p.port)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            if endpoint.conditions.ready == Some(false) {
                continue;
            }
            out.extend(
                endpoint
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, port)),
            );
        }
    }
    out
}

fn from_selector(
    key: &ObjectKey,
    svc: &Service,
    target: &IntOrString,
    workloads: &OrdMap<ObjectKey, Arc<Workload>>,
) -> Vec<SocketAddr> {
    if svc.spec.selector.is_empty() {
        return Vec::new();
    }
    in_namespace(workloads, &key.namespace)
        .map(|(_, w)| w)
        .filter(|w| svc.spec.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .filter_map(|w| {
            let port = match target {
                IntOrString::Int(p) => *p,
                IntOrString::String(name) => *w.named_ports.get(name)?,
            };
            Some(SocketAddr::new(*w.ips.first()?, port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::discovery::local::parse;

    const YAML: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: b1, namespace: shop, labels: {app: backend}}
spec: {containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: b2, namespace: shop, labels: {app: backend}}
spec: {containers: [{name: app, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 10.0.0.12}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: backend}
  ports: [{name: web, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: sliced, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: web, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sliced-abc, namespace: shop, labels: {kubernetes.io/service-name: sliced}}
addressType: IPv4
ports: [{name: web, port: 7000}]
endpoints:
- addresses: [10.0.0.21]
- addresses: [10.0.0.22]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, selector: {app: backend}, ports: [{port: 80}]}
";

    #[test]
    fn named_target_ports_resolve_per_pod_and_spread() {
        let cluster = parse(Path::new("c.yaml"), YAML, "istio-system").expect("valid");
        let backends = cluster.services_index.get("10.96.0.10:80".parse().expect("addr")).expect("vip");
        assert_eq!(backends.service, "shop/backend");
        assert_eq!(
            backends.endpoints,
            ["10.0.0.11:8080".parse().expect("a"), "10.0.0.12:9090".parse().expect("a")]
        );
        let picks: Vec<_> = (0..4).filter_map(|_| backends.pick()).collect();
        assert_eq!(picks[0], picks[2]);
        assert_ne!(picks[0], picks[1], "round robin");
    }

    #[test]
    fn slices_give_ready_endpoints_and_headless_needs_nothing() {
        let cluster = parse(Path::new("c.yaml"), YAML, "istio-system").expect("valid");
        let sliced = cluster.services_index.get("10.96.0.11:80".parse().expect("addr")).expect("vip");
        assert_eq!(
            sliced.endpoints,
            ["10.0.0.21:7000".parse().expect("a")],
            "not-ready endpoints are skipped"
        );
        assert!(cluster.services_index.get("10.96.0.11:81".parse().expect("addr")).is_none());
    }
}
