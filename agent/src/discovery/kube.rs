//! The cluster as the Kubernetes API says it: one watcher (list, then watch, re-list with backoff
//! after errors and `410 Gone`) per kind, feeding the same [`Cluster`] snapshots the local file
//! does. A re-list replaces a kind's objects only once it is complete, so enforcement never works
//! from a half-listed cluster; until every kind has been listed once, nothing is published.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
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
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{error, info, warn};

use super::{DiscoveryError, local::SourceStatus};
use crate::{
    policy::{AuthorizationPolicy, CompiledPolicy, PeerAuthentication},
    schema::{NETNS_ANNOTATION, ObjectKey, objects::Pod},
    state::{Change, Cluster, Kind, Object},
};

/// After a change, wait this long for more before building the next snapshot: events that
/// arrive together (a rollout, a re-list) cost one snapshot, and a lone event waits no longer.
const DEBOUNCE: Duration = Duration::from_millis(10);

/// The longest wait between attempts to reach the API server.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// How often to look again for Istio's CRDs when they are missing.
const CRD_RECHECK: Duration = Duration::from_secs(30);

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

enum Event {
    Begin(Kind),
    Stage(Kind, DynamicObject),
    Commit(Kind),
    Apply(Kind, DynamicObject),
    Delete(Kind, DynamicObject),
    Failed(Kind, String),
}

/// The objects of one kind in force, and why some were rejected. Only their keys: the objects
/// themselves live in the snapshot, which is also where a rejected edit's last good version
/// stays (no change is published for it). Keeping every pod of the cluster twice, decoded here
/// and as a workload there, was most of the agent's memory at 10,000 pods.
#[derive(Default)]
struct Listed {
    keys: BTreeSet<ObjectKey>,
    rejected: BTreeMap<ObjectKey, String>,
    /// What arrived, changed or went since the last snapshot (for a re-list in progress: what
    /// the list will change once complete).
    pending: BTreeMap<ObjectKey, Change>,
}

#[derive(Default)]
struct Store {
    /// What enforcement works from.
    current: HashMap<Kind, Listed>,
    /// A re-list in progress, replacing `current` of its kind once complete.
    staging: HashMap<Kind, Listed>,
    /// Kinds whose watch failed and has not delivered since, with the error.
    failing: BTreeMap<Kind, String>,
    /// The last snapshot published.
    cluster: Cluster,
}

fn key_of(object: &DynamicObject) -> ObjectKey {
    ObjectKey {
        namespace: object.metadata.namespace.clone().unwrap_or_default(),
        name: object.metadata.name.clone().unwrap_or_default(),
    }
}

/// Watches the API server, publishing snapshots on `tx`; `synced` turns true once every kind
/// has been listed. Returns only if a watcher ended (they retry errors themselves, so that is a
/// bug the agent must not hide): the caller exits and the kubelet restarts it.
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
    let mut watchers = JoinSet::new();
    for &kind in &expected {
        let api: Api<DynamicObject> =
            Api::all_with(client.clone(), &kind.resource(istio_version.unwrap_or("v1")));
        watchers.spawn(watch_kind(api, kind, changes_tx.clone()));
    }
    // CRDs installed after the agent started must still take effect, without a restart.
    let mut awaiting = istio_version.is_none().then(|| tokio::spawn(await_istio(client.clone())));

    let mut store = Store::default();
    let mut listed: Vec<Kind> = Vec::new();
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            Some(ended) = watchers.join_next() => {
                let why = ended.err().map_or_else(|| "its stream ended".to_owned(), |e| e.to_string());
                error!(reason = %why, "a Kubernetes watcher ended");
                return;
            }
            version = async {
                match awaiting.as_mut() {
                    Some(probe) => probe.await,
                    None => std::future::pending().await,
                }
            }, if awaiting.is_some() => {
                awaiting = None;
                let Ok(version) = version else {
                    error!("the Istio CRD probe ended");
                    return;
                };
                for kind in Kind::ALL.into_iter().filter(|k| k.is_istio()) {
                    watchers.spawn(watch_kind(Api::all_with(client.clone(), &kind.resource(version)), kind, changes_tx.clone()));
                }
                continue;
            }
        };
        let Some(change) = change else { break };
        let mut relisted = matches!(change, Event::Commit(_));
        let mut dirty = store.apply(change, &mut listed);
        // Gather whatever else arrives shortly: one snapshot per burst.
        let deadline = tokio::time::Instant::now() + DEBOUNCE;
        while let Ok(Some(more)) = tokio::time::timeout_at(deadline, changes.recv()).await {
            relisted |= matches!(more, Event::Commit(_));
            dirty |= store.apply(more, &mut listed);
        }
        if dirty && expected.iter().all(|k| listed.contains(k)) {
            let cluster = store.publish(&root_namespace);
            // Synced first: the agent's loop wakes on the snapshot and must see it as complete.
            synced.send_replace(true);
            tx.send_replace(Arc::new(cluster));
            status.send_modify(|s| {
                s.generation += 1;
                s.loaded_at = crate::sys::unix_now();
            });
            if relisted {
                crate::sys::release_freed_memory();
            }
        }
        // Rejected objects and failing watches, until fixed or recovered.
        let errors = store.errors();
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

/// Without Istio's CRDs, asks again now and then; returns the version once it is served.
async fn await_istio(client: Client) -> &'static str {
    warn!(
        "no security.istio.io CRDs: no PeerAuthentication or AuthorizationPolicy applies until they are installed (daemonset/crds.yaml)"
    );
    loop {
        tokio::time::sleep(CRD_RECHECK).await;
        if let Some(version) = istio_version(&client).await {
            info!(version, "security.istio.io now served; watching its policies");
            return version;
        }
    }
}

async fn watch_kind(api: Api<DynamicObject>, kind: Kind, tx: mpsc::Sender<Event>) {
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => Event::Begin(kind),
            Ok(watcher::Event::InitApply(o)) => Event::Stage(kind, slim(o)),
            Ok(watcher::Event::InitDone) => Event::Commit(kind),
            Ok(watcher::Event::Apply(o)) => Event::Apply(kind, slim(o)),
            Ok(watcher::Event::Delete(o)) => Event::Delete(kind, o),
            // The watcher re-lists after errors (410 Gone included) with backoff; the last
            // complete list stays in force meanwhile.
            Err(e) => Event::Failed(kind, e.to_string()),
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
    fn apply(&mut self, change: Event, listed: &mut Vec<Kind>) -> bool {
        let kind = match &change {
            Event::Begin(k)
            | Event::Stage(k, _)
            | Event::Commit(k)
            | Event::Apply(k, _)
            | Event::Delete(k, _)
            | Event::Failed(k, _) => *k,
        };
        // Data from the server shows the watch works again (a restart alone does not).
        if !matches!(change, Event::Failed(..) | Event::Begin(_)) {
            self.failing.remove(&kind);
        }
        match change {
            Event::Begin(kind) => {
                self.staging.insert(kind, Listed::default());
                false
            }
            Event::Stage(kind, object) => {
                let key = key_of(&object);
                let has_good = self.current.get(&kind).is_some_and(|l| l.keys.contains(&key));
                let admitted = admit(kind, &key, &object, has_good);
                self.staging.entry(kind).or_default().keep(kind, key, admitted);
                false
            }
            Event::Commit(kind) => {
                let mut listed_now = self.staging.remove(&kind).unwrap_or_default();
                info!(?kind, objects = listed_now.keys.len(), "listed");
                let before = self.current.remove(&kind).unwrap_or_default();
                for key in before.keys.difference(&listed_now.keys) {
                    listed_now.pending.insert(key.clone(), Change::gone(kind, key.clone()));
                }
                // Changes of the old list not yet published, for objects the new list still has
                // and left unchanged (kept their last good version), must still be published.
                for (key, change) in before.pending {
                    listed_now.pending.entry(key).or_insert(change);
                }
                self.current.insert(kind, listed_now);
                if !listed.contains(&kind) {
                    listed.push(kind);
                }
                true
            }
            Event::Apply(kind, object) => {
                let key = key_of(&object);
                let current = self.current.entry(kind).or_default();
                let admitted = admit(kind, &key, &object, current.keys.contains(&key));
                current.keep(kind, key, admitted);
                true
            }
            Event::Delete(kind, object) => {
                let key = key_of(&object);
                let current = self.current.entry(kind).or_default();
                current.keys.remove(&key);
                current.rejected.remove(&key);
                current.pending.insert(key.clone(), Change::gone(kind, key));
                true
            }
            Event::Failed(kind, message) => {
                warn!(?kind, error = %message, "watch failed; re-listing with backoff");
                self.failing.insert(kind, format!("watching {kind:?}: {message}"));
                false
            }
        }
    }

    /// The next snapshot: the last one with what arrived or went since applied.
    fn publish(&mut self, root_namespace: &str) -> Cluster {
        let changes: Vec<Change> =
            self.current.values_mut().flat_map(|l| std::mem::take(&mut l.pending).into_values()).collect();
        self.cluster = self.cluster.with(changes, root_namespace);
        self.cluster.clone()
    }

    /// Rejected objects and failing watches, until fixed or recovered.
    fn errors(&self) -> Vec<String> {
        let mut kinds: Vec<_> = self.current.iter().collect();
        kinds.sort_by_key(|(kind, _)| **kind);
        let rejected = kinds
            .into_iter()
            .flat_map(|(kind, l)| l.rejected.iter().map(move |(key, e)| format!("{kind:?} {key}: {e}")));
        rejected.chain(self.failing.values().cloned()).collect()
    }
}

/// What an arrived object does to the objects in force.
#[expect(clippy::large_enum_variant, reason = "one lives per event, for a moment; a box would cost more")]
enum Admitted {
    /// It is in force now (decoded, and compiled), or stands in for a rejected one.
    Set(Object),
    /// Rejected: its last good version stays in force.
    KeepLastGood,
    /// Nothing to keep: a waypoint's policy, or a bad object never seen good.
    Drop,
}

/// What an object that arrived means for enforcement: the decoded (and compiled) object, or why
/// it was rejected together with what stands in its place: its last good version (when
/// `has_good`), or for a new AuthorizationPolicy, a DENY of everything it selects (never open).
fn admit(kind: Kind, key: &ObjectKey, object: &DynamicObject, has_good: bool) -> (Admitted, Option<String>) {
    let rejected = if has_good { Admitted::KeepLastGood } else { Admitted::Drop };
    let value = match serde_json::to_value(object) {
        Ok(value) => value,
        Err(e) => return (rejected, Some(e.to_string())),
    };
    let decoded = match kind {
        Kind::Namespace => decode(&value).map(|ns| Some(Object::Namespace(ns))),
        Kind::Pod => decode::<Pod>(&value).and_then(|mut pod| {
            // Whoever may create a pod must not choose the namespace the agent enters: in a
            // cluster the netns is found only through the pod's own processes.
            if pod.metadata.annotations.remove(NETNS_ANNOTATION).is_some() {
                warn!(pod = %key, annotation = NETNS_ANNOTATION, "ignoring the annotation: only a local cluster file may name a pod's network namespace");
            }
            // That was the one annotation the agent reads; every pod of the cluster is kept.
            pod.metadata.annotations.clear();
            pod.validate().map(|()| Some(Object::Pod(pod)))
        }),
        Kind::Service => decode(&value).map(|svc| Some(Object::Service(svc))),
        Kind::EndpointSlice => decode(&value).map(|slice| Some(Object::EndpointSlice(slice))),
        Kind::PeerAuthentication => decode::<PeerAuthentication>(&value)
            .and_then(|p| p.validate().map(|()| Some(Object::PeerAuthentication(p)))),
        Kind::AuthorizationPolicy => decode::<AuthorizationPolicy>(&value).and_then(|p| {
            if p.targets_waypoint() {
                warn!(policy = %key, "ignoring an AuthorizationPolicy with targetRef(s): it is enforced by a waypoint, not the node agent");
                return Ok(None);
            }
            let compiled = p.compile()?;
            for warning in compiled.http_warnings() {
                warn!(policy = %key, action = %compiled.action, "{warning}");
            }
            Ok(Some(Object::AuthorizationPolicy(Arc::new(compiled))))
        }),
    };
    match decoded {
        Ok(Some(object)) => (Admitted::Set(object), None),
        Ok(None) => (Admitted::Drop, None),
        Err(e) => {
            error!(kind = ?kind, object = %key, error = %e, "object rejected; its last good version (if any) stays in force");
            if kind == Kind::AuthorizationPolicy && !has_good {
                let selector =
                    value.pointer("/spec/selector").and_then(|s| serde_json::from_value(s.clone()).ok());
                let stand_in = CompiledPolicy::deny_all(&key.namespace, &key.name, selector);
                return (Admitted::Set(Object::AuthorizationPolicy(Arc::new(stand_in))), Some(e));
            }
            (rejected, Some(e))
        }
    }
}

impl Listed {
    /// Records what `admit` made of the object at `key`, and its rejection if any.
    fn keep(&mut self, kind: Kind, key: ObjectKey, (admitted, rejected): (Admitted, Option<String>)) {
        match admitted {
            Admitted::Set(object) => {
                self.keys.insert(key.clone());
                self.pending.insert(key.clone(), object.arrived(key.clone()));
            }
            Admitted::KeepLastGood => {
                self.keys.insert(key.clone());
            }
            Admitted::Drop => {
                self.keys.remove(&key);
                self.pending.insert(key.clone(), Change::gone(kind, key.clone()));
            }
        }
        match rejected {
            Some(e) => self.rejected.insert(key, e),
            None => self.rejected.remove(&key),
        };
    }
}

fn decode<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, String> {
    T::deserialize(value).map_err(|e| e.to_string())
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
        let cluster = store.publish("istio-system");
        cluster.authorization.all().map(|p| (p.name.clone(), p.action)).collect()
    }

    #[test]
    fn a_relist_replaces_objects_only_once_complete() {
        let mut store = Store::default();
        let mut listed = Vec::new();
        let kind = Kind::AuthorizationPolicy;
        store.apply(Event::Begin(kind), &mut listed);
        store.apply(
            Event::Stage(kind, object("AuthorizationPolicy", "old", serde_json::json!({"rules": [{}]}))),
            &mut listed,
        );
        assert!(store.apply(Event::Commit(kind), &mut listed));
        assert_eq!(listed, [kind]);

        // Half-way through a re-list, the old list is still the truth.
        assert!(!store.apply(Event::Begin(kind), &mut listed));
        store.apply(
            Event::Stage(kind, object("AuthorizationPolicy", "new", serde_json::json!({"rules": [{}]}))),
            &mut listed,
        );
        assert_eq!(policy_names(&mut store), [("shop/old".to_owned(), Action::Allow)]);
        assert!(store.apply(Event::Commit(kind), &mut listed));
        assert_eq!(policy_names(&mut store), [("shop/new".to_owned(), Action::Allow)]);
    }

    #[test]
    fn a_bad_edit_keeps_the_last_good_policy_and_a_bad_new_one_denies() {
        let mut store = Store::default();
        let mut listed = Vec::new();
        let kind = Kind::AuthorizationPolicy;
        let good = serde_json::json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{}]});
        store.apply(Event::Apply(kind, object("AuthorizationPolicy", "db", good)), &mut listed);
        assert_eq!(policy_names(&mut store), [("shop/db".to_owned(), Action::Allow)]);

        let bad = serde_json::json!({"selector": {"matchLabels": {"app": "db"}}, "action": "MAYBE"});
        store.apply(Event::Apply(kind, object("AuthorizationPolicy", "db", bad.clone())), &mut listed);
        let (cluster, errors) = (store.publish("istio-system"), store.errors());
        assert_eq!(cluster.authorization.len(), 1);
        assert_eq!(
            cluster.authorization.all().next().expect("one").action,
            Action::Allow,
            "last good version"
        );
        assert!(
            errors.iter().any(|e| e.contains("AuthorizationPolicy shop/db") && e.contains("MAYBE")),
            "{errors:?}"
        );

        store.apply(Event::Apply(kind, object("AuthorizationPolicy", "fresh", bad.clone())), &mut listed);
        let cluster = store.publish("istio-system");
        let fresh = cluster.authorization.all().find(|p| p.name == "shop/fresh").expect("stand-in");
        assert_eq!(fresh.action, Action::Deny);
        assert_eq!(fresh.selector.as_ref().map(|s| s.match_labels.len()), Some(1), "same pods");

        // Deleted, then created again broken: the deleted version does not come back.
        store.apply(Event::Delete(kind, object("AuthorizationPolicy", "db", bad.clone())), &mut listed);
        assert!(store.errors().iter().all(|e| !e.contains("shop/db")), "{:?}", store.errors());
        store.apply(Event::Apply(kind, object("AuthorizationPolicy", "db", bad)), &mut listed);
        let db: Vec<_> = policy_names(&mut store).into_iter().filter(|(name, _)| name == "shop/db").collect();
        assert_eq!(db, [("shop/db".to_owned(), Action::Deny)], "stand-in, not the deleted version");
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
        store.apply(Event::Failed(Kind::Pod, "connection refused".into()), &mut listed);
        store.apply(Event::Begin(Kind::Pod), &mut listed);
        assert!(store.failing.get(&Kind::Pod).is_some_and(|e| e.contains("connection refused")));
        store.apply(Event::Commit(Kind::Pod), &mut listed);
        assert!(store.failing.is_empty());
    }
}
