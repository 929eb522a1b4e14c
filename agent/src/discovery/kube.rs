//! The cluster as the Kubernetes API says it: one watcher (list, then watch, re-list with backoff
//! after errors and `410 Gone`) per kind, feeding the same [`Cluster`] snapshots the local file
//! does. A re-list replaces a kind's objects only once it is complete, so enforcement never works
//! from a half-listed cluster; until every kind has been listed once, nothing is published.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures_util::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{
    Cluster, DiscoveryError, ObjectKey, Objects,
    local::{SourceStatus, unix_now},
    objects::{EndpointSlice, Namespace, Pod, Service},
};
use crate::policy::{AuthorizationPolicy, CompiledPolicy, PeerAuthentication};

/// After a change, wait this long for more before building a snapshot (a re-list brings many).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The longest wait between attempts to reach the API server.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// How often to look again for Istio's CRDs when they are missing.
const CRD_RECHECK: Duration = Duration::from_secs(30);

/// The kinds the agent watches.
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

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
    ];

    /// Istio's policy kinds, which exist only with its CRDs.
    fn is_istio(self) -> bool {
        matches!(self, Kind::PeerAuthentication | Kind::AuthorizationPolicy)
    }

    fn resource(self, istio_version: &str) -> ApiResource {
        let (group, version, kind, plural) = match self {
            Kind::Namespace => ("", "v1", "Namespace", "namespaces"),
            Kind::Pod => ("", "v1", "Pod", "pods"),
            Kind::Service => ("", "v1", "Service", "services"),
            Kind::EndpointSlice => ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
            Kind::PeerAuthentication => {
                ("security.istio.io", istio_version, "PeerAuthentication", "peerauthentications")
            }
            Kind::AuthorizationPolicy => {
                ("security.istio.io", istio_version, "AuthorizationPolicy", "authorizationpolicies")
            }
        };
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    }
}

enum Change {
    Begin(Kind),
    Stage(Kind, DynamicObject),
    Commit(Kind),
    Apply(Kind, DynamicObject),
    Delete(Kind, DynamicObject),
    Failed(Kind, String),
}

#[derive(Default)]
struct Store {
    current: HashMap<Kind, BTreeMap<ObjectKey, serde_json::Value>>,
    staging: HashMap<Kind, BTreeMap<ObjectKey, serde_json::Value>>,
    /// The last version of each policy that compiled: a bad edit keeps it in force.
    last_good_policies: BTreeMap<ObjectKey, CompiledPolicy>,
    last_good_peer_authentications: BTreeMap<ObjectKey, PeerAuthentication>,
    /// Why objects of the last snapshot were rejected.
    rejected: Vec<String>,
    /// Kinds whose watch failed and has not delivered since, with the error.
    failing: BTreeMap<Kind, String>,
}

fn key_of(object: &DynamicObject) -> ObjectKey {
    ObjectKey {
        namespace: object.metadata.namespace.clone().unwrap_or_default(),
        name: object.metadata.name.clone().unwrap_or_default(),
    }
}

/// Watches the API server until the process ends, publishing snapshots on `tx`; `synced`
/// turns true once every kind has been listed.
pub async fn watch(
    client: Client,
    root_namespace: String,
    tx: watch::Sender<Arc<Cluster>>,
    status: watch::Sender<SourceStatus>,
    synced: watch::Sender<bool>,
) {
    let istio_version = istio_version(&client).await;
    let (changes_tx, mut changes) = mpsc::channel(1024);
    let expected: Vec<Kind> =
        Kind::ALL.into_iter().filter(|k| istio_version.is_some() || !k.is_istio()).collect();
    for &kind in &expected {
        let api: Api<DynamicObject> =
            Api::all_with(client.clone(), &kind.resource(istio_version.unwrap_or("v1")));
        tokio::spawn(watch_kind(api, kind, changes_tx.clone()));
    }
    if istio_version.is_none() {
        // CRDs installed after the agent started must still take effect, without a restart.
        tokio::spawn(await_istio(client.clone(), changes_tx.clone()));
    }
    drop(changes_tx);

    let mut store = Store::default();
    let mut listed: Vec<Kind> = Vec::new();
    while let Some(change) = changes.recv().await {
        let mut dirty = store.apply(change, &mut listed);
        // Gather whatever else arrives shortly: one snapshot per burst.
        let deadline = tokio::time::Instant::now() + DEBOUNCE;
        while let Ok(Some(more)) = tokio::time::timeout_at(deadline, changes.recv()).await {
            dirty |= store.apply(more, &mut listed);
        }
        if dirty && expected.iter().all(|k| listed.contains(k)) {
            let (cluster, errors) = store.snapshot(&root_namespace);
            store.rejected = errors;
            // Synced first: the agent's loop wakes on the snapshot and must see it as complete.
            synced.send_replace(true);
            tx.send_replace(Arc::new(cluster));
            status.send_modify(|s| {
                s.generation += 1;
                s.loaded_at = unix_now();
            });
        }
        // Rejected objects and failing watches, until fixed or recovered.
        let errors: Vec<String> = store.rejected.iter().chain(store.failing.values()).cloned().collect();
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        status.send_if_modified(|s| {
            let changed = s.error != error;
            s.error = error;
            changed
        });
    }
    error!("all Kubernetes watchers ended");
}

/// The served version of Istio's security API (v1, else v1beta1), or none when the API server
/// answers that neither is (the CRDs are not installed). While the API server cannot be reached
/// it keeps asking: guessing "no CRDs" then would drop every policy.
async fn istio_version(client: &Client) -> Option<&'static str> {
    let mut delay = Duration::from_millis(200);
    'probe: loop {
        for version in ["v1", "v1beta1"] {
            let api: Api<DynamicObject> =
                Api::all_with(client.clone(), &Kind::PeerAuthentication.resource(version));
            match api.list(&kube::api::ListParams::default().limit(1)).await {
                Ok(_) => return Some(version),
                Err(kube::Error::Api(status)) if status.is_not_found() => {
                    info!(version, "security.istio.io not served at this version");
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "cannot ask the API server for security.istio.io");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY);
                    continue 'probe;
                }
            }
        }
        return None;
    }
}

/// Without Istio's CRDs, asks again now and then; once they are served, watches their kinds too.
async fn await_istio(client: Client, tx: mpsc::Sender<Change>) {
    warn!(
        "no security.istio.io CRDs: no PeerAuthentication or AuthorizationPolicy applies until they are installed (daemonset/crds.yaml)"
    );
    loop {
        tokio::time::sleep(CRD_RECHECK).await;
        if let Some(version) = istio_version(&client).await {
            info!(version, "security.istio.io now served; watching its policies");
            for kind in Kind::ALL.into_iter().filter(|k| k.is_istio()) {
                tokio::spawn(watch_kind(
                    Api::all_with(client.clone(), &kind.resource(version)),
                    kind,
                    tx.clone(),
                ));
            }
            return;
        }
    }
}

async fn watch_kind(api: Api<DynamicObject>, kind: Kind, tx: mpsc::Sender<Change>) {
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => Change::Begin(kind),
            Ok(watcher::Event::InitApply(o)) => Change::Stage(kind, slim(o)),
            Ok(watcher::Event::InitDone) => Change::Commit(kind),
            Ok(watcher::Event::Apply(o)) => Change::Apply(kind, slim(o)),
            Ok(watcher::Event::Delete(o)) => Change::Delete(kind, o),
            // The watcher re-lists after errors (410 Gone included) with backoff; the last
            // complete list stays in force meanwhile.
            Err(e) => Change::Failed(kind, e.to_string()),
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

/// Drops what the agent never reads and which is often most of an object: managed fields and
/// kubectl's copy of the last applied configuration. Every pod of the cluster is kept.
fn slim(mut object: DynamicObject) -> DynamicObject {
    object.metadata.managed_fields = None;
    if let Some(annotations) = object.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    object
}

impl Store {
    /// Applies a change; true if the objects changed.
    fn apply(&mut self, change: Change, listed: &mut Vec<Kind>) -> bool {
        let kind = match &change {
            Change::Begin(k)
            | Change::Stage(k, _)
            | Change::Commit(k)
            | Change::Apply(k, _)
            | Change::Delete(k, _) => *k,
            Change::Failed(k, _) => *k,
        };
        // Data from the server shows the watch works again (a restart alone does not).
        if !matches!(change, Change::Failed(..) | Change::Begin(_)) {
            self.failing.remove(&kind);
        }
        match change {
            Change::Begin(kind) => {
                self.staging.insert(kind, BTreeMap::new());
                false
            }
            Change::Stage(kind, object) => {
                if let Ok(value) = serde_json::to_value(&object) {
                    self.staging.entry(kind).or_default().insert(key_of(&object), value);
                }
                false
            }
            Change::Commit(kind) => {
                let listed_now = self.staging.remove(&kind).unwrap_or_default();
                info!(?kind, objects = listed_now.len(), "listed");
                self.current.insert(kind, listed_now);
                if !listed.contains(&kind) {
                    listed.push(kind);
                }
                true
            }
            Change::Apply(kind, object) => {
                if let Ok(value) = serde_json::to_value(&object) {
                    self.current.entry(kind).or_default().insert(key_of(&object), value);
                }
                true
            }
            Change::Delete(kind, object) => {
                self.current.entry(kind).or_default().remove(&key_of(&object));
                true
            }
            Change::Failed(kind, message) => {
                warn!(?kind, error = %message, "watch failed; re-listing with backoff");
                self.failing.insert(kind, format!("watching {kind:?}: {message}"));
                false
            }
        }
    }

    /// Builds a snapshot; objects that do not parse are reported by name and field, and a bad
    /// policy keeps its last good version (or, new, is replaced by one that denies everything
    /// it selects: never open).
    fn snapshot(&mut self, root_namespace: &str) -> (Cluster, Vec<String>) {
        let mut errors = Vec::new();
        let mut objects = Objects::default();
        for (key, value) in self.kind(Kind::Namespace) {
            if let Some(ns) = decode::<Namespace>(value, "Namespace", key, &mut errors) {
                objects.namespaces.insert(key.name.clone(), ns);
            }
        }
        for (key, value) in self.kind(Kind::Pod) {
            objects.pods.extend(decode::<Pod>(value, "Pod", key, &mut errors));
        }
        for (key, value) in self.kind(Kind::Service) {
            if let Some(svc) = decode::<Service>(value, "Service", key, &mut errors) {
                objects.services.insert(key.clone(), svc);
            }
        }
        for (key, value) in self.kind(Kind::EndpointSlice) {
            if let Some(slice) = decode::<EndpointSlice>(value, "EndpointSlice", key, &mut errors) {
                objects.endpoint_slices.insert(key.clone(), slice);
            }
        }
        let peer_authentications: Vec<(ObjectKey, serde_json::Value)> =
            self.kind(Kind::PeerAuthentication).map(|(k, v)| (k.clone(), v.clone())).collect();
        for (key, value) in peer_authentications {
            let parsed = decode::<PeerAuthentication>(&value, "PeerAuthentication", &key, &mut errors)
                .and_then(|p| {
                    p.validate()
                        .map(|()| p)
                        .map_err(|e| errors.push(format!("PeerAuthentication {key}: {e}")))
                        .ok()
                });
            match parsed {
                Some(p) => {
                    self.last_good_peer_authentications.insert(key, p.clone());
                    objects.peer_authentications.push(p);
                }
                None => objects
                    .peer_authentications
                    .extend(self.last_good_peer_authentications.get(&key).cloned()),
            }
        }
        let policies: Vec<(ObjectKey, serde_json::Value)> =
            self.kind(Kind::AuthorizationPolicy).map(|(k, v)| (k.clone(), v.clone())).collect();
        for (key, value) in policies {
            let compiled = decode::<AuthorizationPolicy>(&value, "AuthorizationPolicy", &key, &mut errors)
                .filter(|p| !p.targets_waypoint())
                .map(|p| p.compile().map_err(|e| errors.push(format!("AuthorizationPolicy {key}: {e}"))));
            match compiled {
                Some(Ok(policy)) => {
                    self.last_good_policies.insert(key, policy.clone());
                    objects.authorization_policies.push(policy);
                }
                None if value.pointer("/spec/targetRef").is_some()
                    || value.pointer("/spec/targetRefs").is_some() => {}
                _ => match self.last_good_policies.get(&key) {
                    Some(good) => objects.authorization_policies.push(good.clone()),
                    None => objects.authorization_policies.push(deny_all_in_place_of(&key, &value)),
                },
            }
        }
        for e in &errors {
            error!(error = %e, "object rejected; its last good version (if any) stays in force");
        }
        (Cluster::new(objects, root_namespace), errors)
    }

    fn kind(&self, kind: Kind) -> impl Iterator<Item = (&ObjectKey, &serde_json::Value)> {
        self.current.get(&kind).into_iter().flatten()
    }
}

/// A new policy that does not compile denies everything its selector selects (or its whole
/// namespace, when the selector is unreadable too): failing closed, never open.
fn deny_all_in_place_of(key: &ObjectKey, value: &serde_json::Value) -> CompiledPolicy {
    let selector = value.pointer("/spec/selector").and_then(|s| serde_json::from_value(s.clone()).ok());
    CompiledPolicy::deny_all(&key.namespace, &key.name, selector)
}

fn decode<T: DeserializeOwned>(
    value: &serde_json::Value,
    kind: &str,
    key: &ObjectKey,
    errors: &mut Vec<String>,
) -> Option<T> {
    match serde_json::from_value(value.clone()) {
        Ok(object) => Some(object),
        Err(e) => {
            errors.push(format!("{kind} {key}: {e}"));
            None
        }
    }
}

/// A client from the in-cluster service account or `$KUBECONFIG`.
pub async fn client() -> Result<Client, DiscoveryError> {
    Client::try_default().await.map_err(|e| DiscoveryError::Kubernetes(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Action;

    fn object(kind: &str, name: &str, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec,
        }))
        .expect("object")
    }

    fn policy_names(store: &mut Store) -> Vec<(String, Action)> {
        let (cluster, _) = store.snapshot("istio-system");
        cluster.authorization.all().iter().map(|p| (p.name.clone(), p.action)).collect()
    }

    #[test]
    fn a_relist_replaces_objects_only_once_complete() {
        let mut store = Store::default();
        let mut listed = Vec::new();
        let kind = Kind::AuthorizationPolicy;
        store.apply(Change::Begin(kind), &mut listed);
        store.apply(
            Change::Stage(kind, object("AuthorizationPolicy", "old", serde_json::json!({"rules": [{}]}))),
            &mut listed,
        );
        assert!(store.apply(Change::Commit(kind), &mut listed));
        assert_eq!(listed, [kind]);

        // Half-way through a re-list, the old list is still the truth.
        assert!(!store.apply(Change::Begin(kind), &mut listed));
        store.apply(
            Change::Stage(kind, object("AuthorizationPolicy", "new", serde_json::json!({"rules": [{}]}))),
            &mut listed,
        );
        assert_eq!(policy_names(&mut store), [("shop/old".to_owned(), Action::Allow)]);
        assert!(store.apply(Change::Commit(kind), &mut listed));
        assert_eq!(policy_names(&mut store), [("shop/new".to_owned(), Action::Allow)]);
    }

    #[test]
    fn a_bad_edit_keeps_the_last_good_policy_and_a_bad_new_one_denies() {
        let mut store = Store::default();
        let mut listed = Vec::new();
        let kind = Kind::AuthorizationPolicy;
        let good = serde_json::json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{}]});
        store.apply(Change::Apply(kind, object("AuthorizationPolicy", "db", good)), &mut listed);
        assert_eq!(policy_names(&mut store), [("shop/db".to_owned(), Action::Allow)]);

        let bad = serde_json::json!({"selector": {"matchLabels": {"app": "db"}}, "action": "MAYBE"});
        store.apply(Change::Apply(kind, object("AuthorizationPolicy", "db", bad.clone())), &mut listed);
        let (cluster, errors) = store.snapshot("istio-system");
        assert_eq!(cluster.authorization.all().len(), 1);
        assert_eq!(cluster.authorization.all()[0].action, Action::Allow, "last good version");
        assert!(
            errors.iter().any(|e| e.contains("AuthorizationPolicy shop/db") && e.contains("MAYBE")),
            "{errors:?}"
        );

        store.apply(Change::Apply(kind, object("AuthorizationPolicy", "fresh", bad)), &mut listed);
        let (cluster, _) = store.snapshot("istio-system");
        let fresh = cluster.authorization.all().iter().find(|p| p.name == "shop/fresh").expect("stand-in");
        assert_eq!(fresh.action, Action::Deny);
        assert_eq!(fresh.selector.as_ref().map(|s| s.match_labels.len()), Some(1), "same pods");
    }

    #[test]
    fn objects_are_kept_without_what_the_agent_never_reads() {
        let recorded = |text: &str| serde_json::from_str::<DynamicObject>(text).expect("recorded object");
        let pod = recorded(include_str!("../../../tests/fixtures/kube/pod.json"));
        assert!(pod.metadata.managed_fields.is_some());
        let pod = slim(pod);
        assert!(pod.metadata.managed_fields.is_none());
        assert_eq!(pod.metadata.annotations.map(|a| a.len()), Some(1), "other annotations kept");
        assert_eq!(pod.data["spec"]["serviceAccountName"], "bookinfo-reviews", "the rest is kept");
        let service = slim(recorded(include_str!("../../../tests/fixtures/kube/service.json")));
        assert!(service.metadata.annotations.unwrap_or_default().is_empty());
    }

    #[test]
    fn a_failed_watch_is_reported_until_data_flows_again() {
        let mut store = Store::default();
        let mut listed = Vec::new();
        store.apply(Change::Failed(Kind::Pod, "connection refused".into()), &mut listed);
        store.apply(Change::Begin(Kind::Pod), &mut listed);
        assert!(store.failing.get(&Kind::Pod).is_some_and(|e| e.contains("connection refused")));
        store.apply(Change::Commit(Kind::Pod), &mut listed);
        assert!(store.failing.is_empty());
    }
}
