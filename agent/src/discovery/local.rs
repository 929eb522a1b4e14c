//! The local cluster file (`ambit agent --local FILE`): a multi-document YAML file of the same
//! Kubernetes objects the agent watches in a cluster. Re-read when it changes; a bad edit is
//! reported with file and line and the last good snapshot keeps serving.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::DiscoveryError;
use crate::{
    policy::{AuthorizationPolicy, PeerAuthentication},
    schema::{
        ObjectKey,
        objects::{EndpointSlice, Namespace, ObjectMeta, Pod, Service, TypeMeta},
    },
    state::{Change, Cluster, Kind, Object},
};

/// How often the file is checked for changes. Polling is immune to editors that replace the
/// file (rename over it) and to bind-mounted ConfigMaps, where inotify misses updates.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Reads and parses `file`.
pub fn load(file: &Path, root_namespace: &str) -> Result<Cluster, DiscoveryError> {
    Reader::new(file, root_namespace).read()
}

/// Parses the text of a cluster file; `file` only names it in errors. `root_namespace` is Istio's
/// root namespace, where policies apply mesh-wide.
pub fn parse(file: &Path, text: &str, root_namespace: &str) -> Result<Cluster, DiscoveryError> {
    Reader::new(file, root_namespace).parse(text)
}

/// The objects a document held (several for a `List`): their keys only. The objects live in the
/// snapshot; a document whose text did not change holds the same ones.
type Held = Arc<[(Kind, ObjectKey)]>;

/// Reads a cluster file again and again at the cost of what changed: a document whose text is
/// the same as at the last read is not decoded again, and only the objects that arrived,
/// changed or went reach the snapshot ([`Cluster::with`]).
pub struct Reader {
    file: PathBuf,
    root_namespace: String,
    /// The documents of the last good read, by the hash of their text.
    held: HashMap<u128, Held>,
    /// The objects of the last good read, by kind and key: the line each starts at, and the
    /// hash of the document that holds it.
    objects: BTreeMap<(Kind, ObjectKey), (usize, u128)>,
    cluster: Cluster,
}

impl Reader {
    /// A reader of `file` that has read nothing yet.
    pub fn new(file: &Path, root_namespace: &str) -> Self {
        Self {
            file: file.to_owned(),
            root_namespace: root_namespace.to_owned(),
            held: HashMap::new(),
            objects: BTreeMap::new(),
            cluster: Cluster::default(),
        }
    }

    /// Reads the file: the new snapshot, or why the file is not acceptable (then the last
    /// good one stays).
    pub fn read(&mut self) -> Result<Cluster, DiscoveryError> {
        let text = std::fs::read_to_string(&self.file)
            .map_err(|source| DiscoveryError::Read { file: self.file.clone(), source })?;
        self.parse(&text)
    }

    /// Takes `text` as the file's content.
    pub fn parse(&mut self, text: &str) -> Result<Cluster, DiscoveryError> {
        let parser = Parser { file: &self.file };
        let mut held = HashMap::new();
        let mut objects: BTreeMap<(Kind, ObjectKey), (usize, u128)> = BTreeMap::new();
        // Only what changed since the last good read: the objects of documents decoded anew.
        let mut arrived = Vec::new();
        for (line, doc) in documents(text) {
            let hash = text_hash(&doc);
            // The same text held the same objects, unless the last read had them elsewhere.
            let unchanged = self
                .held
                .get(&hash)
                .filter(|keys| keys.iter().all(|key| self.objects.get(key).is_some_and(|(_, h)| *h == hash)));
            let keys: Held = match unchanged {
                Some(keys) => keys.clone(),
                None => {
                    let mut items = Vec::new();
                    parser.document(line, doc, &mut items)?;
                    let keys = items.iter().map(|(key, object)| (object.kind(), key.clone())).collect();
                    arrived.extend(items);
                    keys
                }
            };
            for (kind, key) in keys.iter() {
                if let Some((first, _)) = objects.insert((*kind, key.clone()), (line, hash)) {
                    let name = if *kind == Kind::Namespace { key.name.clone() } else { key.to_string() };
                    return Err(parser.duplicate(line, first, format!("{kind:?} {name}")));
                }
            }
            held.insert(hash, keys);
        }
        let mut changes: Vec<Change> = self
            .objects
            .keys()
            .filter(|key| !objects.contains_key(key))
            .map(|(kind, key)| Change::gone(*kind, key.clone()))
            .collect();
        changes.extend(arrived.into_iter().map(|(key, object)| object.arrived(key)));
        self.cluster = self.cluster.with(changes, &self.root_namespace);
        self.held = held;
        self.objects = objects;
        Ok(self.cluster.clone())
    }
}

/// Reads a file of Istio policies, as a user would `kubectl apply` it (for `ambit check
/// --what-if`): PeerAuthentication and AuthorizationPolicy objects only, each with the line it
/// starts at and the change it makes. Anything else, or a policy twice, is an error naming file
/// and line; an AuthorizationPolicy for a waypoint (`targetRefs`) changes nothing here.
pub fn parse_policies(file: &Path, text: &str) -> Result<Vec<(usize, ObjectKey, Change)>, DiscoveryError> {
    let parser = Parser { file };
    let mut out: Vec<(usize, ObjectKey, Change)> = Vec::new();
    for (line, doc) in documents(text) {
        let meta: TypeMeta = parser.decode(line, &doc, "document")?;
        if !matches!(meta.kind.as_str(), "PeerAuthentication" | "AuthorizationPolicy" | "List") {
            let kind = if meta.kind.is_empty() { "an object without `kind`".to_owned() } else { meta.kind };
            return Err(parser.invalid(
                line,
                kind,
                "not a policy: the what-if takes PeerAuthentication and AuthorizationPolicy objects".into(),
            ));
        }
        let mut items = Vec::new();
        parser.document(line, doc, &mut items)?;
        for (key, object) in items {
            let kind = object.kind();
            if !matches!(kind, Kind::PeerAuthentication | Kind::AuthorizationPolicy) {
                return Err(parser.invalid(
                    line,
                    format!("{kind:?} {key}"),
                    "not a policy: the what-if takes PeerAuthentication and AuthorizationPolicy objects"
                        .into(),
                ));
            }
            let same = |(_, k, c): &&(usize, ObjectKey, Change)| *k == key && c.kind() == kind;
            if let Some((first, ..)) = out.iter().find(same) {
                return Err(parser.duplicate(line, *first, format!("{kind:?} {key}")));
            }
            out.push((line, key.clone(), object.arrived(key)));
        }
    }
    Ok(out)
}

/// A 128-bit hash of a document's text: two keyed 64-bit hashes, so that a different text
/// taken for an unchanged one is out of reach by accident.
fn text_hash(text: &str) -> u128 {
    use std::hash::BuildHasher as _;
    static KEYS: std::sync::OnceLock<(std::hash::RandomState, std::hash::RandomState)> =
        std::sync::OnceLock::new();
    let (a, b) = KEYS.get_or_init(|| (std::hash::RandomState::new(), std::hash::RandomState::new()));
    (u128::from(a.hash_one(text)) << 64) | u128::from(b.hash_one(text))
}

/// Splits a YAML stream at `---` lines, keeping the 1-based line where each document starts so
/// that errors inside a document name the line in the file.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (index, line) in text.lines().enumerate() {
        let marker =
            line.starts_with("---") && line[3..].trim_start().chars().next().is_none_or(|c| c == '#');
        if marker {
            docs.push((start, std::mem::take(&mut current)));
            start = index + 2;
        } else if line.trim_end() == "..." {
            continue;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs.retain(|(_, doc)| {
        doc.lines().any(|l| {
            let l = l.trim();
            !l.is_empty() && !l.starts_with('#')
        })
    });
    docs
}

struct Parser<'a> {
    file: &'a Path,
}

impl Parser<'_> {
    /// Decodes one document into `out`: its object, a List's items, or nothing for a kind
    /// ambit does not use.
    fn document(
        &self,
        line: usize,
        doc: String,
        out: &mut Vec<(ObjectKey, Object)>,
    ) -> Result<(), DiscoveryError> {
        let meta: TypeMeta = self.decode(line, &doc, "document")?;
        let group = meta.api_version.rsplit_once('/').map_or("", |(group, _)| group);
        let (key, object) = match (group, meta.kind.as_str()) {
            ("", "List") => {
                let list: ListOf = self.decode(line, &doc, "List")?;
                for item in list.items {
                    let item = serde_yaml_ng::to_string(&item).unwrap_or_default();
                    self.document(line, item, out)?;
                }
                return Ok(());
            }
            ("", "Namespace") => {
                let ns: Namespace = self.decode(line, &doc, "Namespace")?;
                let name = self.name(line, "Namespace", &ns.metadata)?;
                (ObjectKey { namespace: String::new(), name }, Object::Namespace(ns))
            }
            ("", "Pod") => {
                let pod: Pod = self.decode(line, &doc, "Pod")?;
                let key = self.key(line, "Pod", &pod.metadata)?;
                pod.validate().map_err(|m| self.invalid(line, format!("Pod {key}"), m))?;
                (key, Object::Pod(pod))
            }
            ("", "Service") => {
                let svc: Service = self.decode(line, &doc, "Service")?;
                (self.key(line, "Service", &svc.metadata)?, Object::Service(svc))
            }
            ("discovery.k8s.io", "EndpointSlice") => {
                let slice: EndpointSlice = self.decode(line, &doc, "EndpointSlice")?;
                (self.key(line, "EndpointSlice", &slice.metadata)?, Object::EndpointSlice(slice))
            }
            ("security.istio.io", "PeerAuthentication") => {
                self.istio_version(line, &meta)?;
                let policy: PeerAuthentication = self.decode(line, &doc, "PeerAuthentication")?;
                let key = self.key(line, "PeerAuthentication", &policy.metadata)?;
                policy.validate().map_err(|m| self.invalid(line, format!("PeerAuthentication {key}"), m))?;
                (key, Object::PeerAuthentication(policy))
            }
            ("security.istio.io", "AuthorizationPolicy") => {
                self.istio_version(line, &meta)?;
                let policy: AuthorizationPolicy = self.decode(line, &doc, "AuthorizationPolicy")?;
                let key = self.key(line, "AuthorizationPolicy", &policy.metadata)?;
                if policy.targets_waypoint() {
                    warn!(file = %self.file.display(), line, policy = %key, "ignoring an AuthorizationPolicy with targetRef(s): it is enforced by a waypoint, not the node agent");
                    return Ok(());
                }
                let compiled = policy
                    .compile()
                    .map_err(|m| self.invalid(line, format!("AuthorizationPolicy {key}"), m))?;
                for warning in compiled.http_warnings() {
                    warn!(file = %self.file.display(), line, policy = %key, action = %compiled.action, "{warning}");
                }
                (key, Object::AuthorizationPolicy(Arc::new(compiled)))
            }
            (_, "") => {
                return Err(self.invalid(line, "document".into(), "missing `kind`".into()));
            }
            (_, kind) => {
                warn!(file = %self.file.display(), line, kind, api_version = %meta.api_version, "ignoring an object of a kind ambit does not use");
                return Ok(());
            }
        };
        out.push((key, object));
        Ok(())
    }

    fn decode<T: DeserializeOwned>(&self, line: usize, doc: &str, what: &str) -> Result<T, DiscoveryError> {
        serde_yaml_ng::from_str(doc).map_err(|e| {
            let (l, c) = e.location().map_or((0, 0), |loc| (loc.line(), loc.column()));
            let message = e.to_string();
            // The location goes in front, file:line:column style; drop serde_yaml's own suffix.
            let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
            DiscoveryError::Syntax {
                file: self.file.to_owned(),
                line: line + l.saturating_sub(1),
                column: c.max(1),
                message: format!("{what}: {message}"),
            }
        })
    }

    /// Istio's security API is served as v1 and v1beta1; other versions have other schemas.
    fn istio_version(&self, line: usize, meta: &TypeMeta) -> Result<(), DiscoveryError> {
        match meta.api_version.as_str() {
            "security.istio.io/v1" | "security.istio.io/v1beta1" => Ok(()),
            other => Err(self.invalid(
                line,
                meta.kind.clone(),
                format!("apiVersion {other} is not supported (use security.istio.io/v1 or v1beta1)"),
            )),
        }
    }

    fn name(&self, line: usize, kind: &str, meta: &ObjectMeta) -> Result<String, DiscoveryError> {
        if meta.name.is_empty() {
            return Err(self.invalid(line, kind.to_owned(), "metadata.name is empty".into()));
        }
        Ok(meta.name.clone())
    }

    fn key(&self, line: usize, kind: &str, meta: &ObjectMeta) -> Result<ObjectKey, DiscoveryError> {
        let name = self.name(line, kind, meta)?;
        Ok(ObjectKey { namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()), name })
    }

    fn invalid(&self, line: usize, object: String, message: String) -> DiscoveryError {
        DiscoveryError::Invalid { file: self.file.to_owned(), line, object, message }
    }

    fn duplicate(&self, line: usize, first: usize, object: String) -> DiscoveryError {
        self.invalid(line, object, format!("defined twice (first at line {first})"))
    }
}

#[derive(serde::Deserialize)]
struct ListOf {
    #[serde(default)]
    items: Vec<serde_yaml_ng::Value>,
}

/// What the watcher reports about the file, for `ambit status`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SourceStatus {
    /// The file.
    pub file: PathBuf,
    /// Successful loads so far.
    pub generation: u64,
    /// When the serving snapshot was loaded (seconds since the epoch).
    pub loaded_at: u64,
    /// The error of the last attempt, if it failed: the last good snapshot is still serving.
    pub error: Option<String>,
}

/// Watches the reader's file and publishes each good snapshot on `tx`. Bad edits are logged and
/// recorded in `status`; the last good snapshot stays published. A change takes effect within
/// [`POLL_INTERVAL`] plus the read, which costs what changed.
pub async fn watch(mut reader: Reader, tx: watch::Sender<Arc<Cluster>>, status: watch::Sender<SourceStatus>) {
    let file = reader.file.clone();
    let mut last = fingerprint(&file);
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = fingerprint(&file);
        if now == last {
            continue;
        }
        last = now;
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let result = reader.read();
            crate::sys::release_freed_memory();
            (reader, result)
        })
        .await;
        let (back, result) = match result {
            Ok(done) => done,
            Err(e) => {
                // The reader went with the task: nothing can be read any more.
                error!(error = %e, "cluster file reload task failed");
                return;
            }
        };
        reader = back;
        match result {
            Ok(cluster) => {
                info!(file = %file.display(), pods = cluster.workloads.len(), took = ?started.elapsed(), "cluster file reloaded");
                tx.send_replace(Arc::new(cluster));
                status.send_modify(|s| {
                    s.generation += 1;
                    s.loaded_at = crate::sys::unix_now();
                    s.error = None;
                });
            }
            Err(e) => {
                error!(error = %e, "cluster file rejected; still serving the last good version");
                status.send_modify(|s| s.error = Some(e.to_string()));
            }
        }
    }
}

/// Identity of the file's current content as cheaply as the file system tells it.
fn fingerprint(file: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(file).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Enrollment;

    fn parse_str(text: &str) -> Result<Cluster, DiscoveryError> {
        parse(Path::new("cluster.yaml"), text, "istio-system")
    }

    const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: frontend
  namespace: shop
  uid: 1111
  annotations:
    ambit.io/netns: /var/run/netns/frontend
spec:
  nodeName: node-a
  serviceAccountName: frontend-sa
status:
  podIP: 10.0.0.2
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: shop
  labels:
    istio.io/dataplane-mode: none
spec:
  nodeName: node-b
status:
  podIPs: [{ip: 10.0.0.4}, {ip: "fd00::4"}]
--- # outsider
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: other}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.9}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    #[test]
    fn reads_pods_and_enrollment() {
        let cluster = parse_str(SHOP).expect("valid");
        let frontend = &cluster.workloads[&ObjectKey { namespace: "shop".into(), name: "frontend".into() }];
        assert_eq!(frontend.enrollment, Enrollment::Ambient);
        assert_eq!(frontend.spiffe_id("cluster.local"), "spiffe://cluster.local/ns/shop/sa/frontend-sa");
        assert_eq!(frontend.netns.as_deref(), Some(Path::new("/var/run/netns/frontend")));
        let db = cluster.workload_by_ip("fd00::4".parse().expect("ip")).expect("db by ip");
        assert_eq!(db.enrollment, Enrollment::OptedOut);
        assert_eq!(db.service_account, "default");
        let outsider = cluster.workload_by_ip("10.0.0.9".parse().expect("ip")).expect("outsider");
        assert_eq!(outsider.enrollment, Enrollment::NotEnrolled);
        assert_eq!(cluster.workloads_on("node-a").count(), 2);
    }

    #[test]
    fn host_network_pods_are_never_enrolled() {
        let cluster = parse_str(
            "kind: Pod\napiVersion: v1\nmetadata: {name: p, labels: {istio.io/dataplane-mode: ambient}}\nspec: {hostNetwork: true}\nstatus: {podIP: 192.0.2.1}\n",
        )
        .expect("valid");
        let pod = cluster.workloads.values().next().expect("one pod");
        assert_eq!(pod.enrollment, Enrollment::HostNetwork);
        assert!(cluster.workload_by_ip("192.0.2.1".parse().expect("ip")).is_none());
    }

    /// A finished pod keeps its podIP in the API while the address is reused: it must neither be
    /// enrolled nor own the address, in whichever order the two pods are listed.
    #[test]
    fn finished_pods_own_no_address_and_two_running_claimants_share_none() {
        let pod = |name: &str, phase: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\nspec: {{nodeName: node-a}}\nstatus: {{phase: {phase}, podIP: {ip}}}\n---\n"
            )
        };
        let key = |name: &str| ObjectKey { namespace: "shop".into(), name: name.into() };
        for phase in ["Succeeded", "Failed"] {
            let (done, running) = (pod("done", phase, "10.0.0.5"), pod("web", "Running", "10.0.0.5"));
            for text in [format!("{done}{running}"), format!("{running}{done}")] {
                let cluster = parse_str(&text).expect("valid");
                assert_eq!(cluster.workloads[&key("done")].enrollment, Enrollment::Finished);
                let owner = cluster.workload_by_ip("10.0.0.5".parse().expect("ip")).expect("owned");
                assert_eq!(owner.key, key("web"), "{phase}: the running pod owns the address");
                assert!(cluster.ip_claimants("10.0.0.5".parse().expect("ip")).is_none());
            }
        }
        let text = format!("{}{}", pod("one", "Running", "10.0.0.6"), pod("two", "Pending", "10.0.0.6"));
        let cluster = parse_str(&text).expect("valid");
        let ip = "10.0.0.6".parse().expect("ip");
        assert!(cluster.workload_by_ip(ip).is_none(), "neither claimant owns it");
        assert_eq!(cluster.ip_claimants(ip), Some(&[key("one"), key("two")][..]));
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n   bad: [\n";
        let err = parse_str(text).expect_err("broken YAML").to_string();
        assert!(err.starts_with("cluster.yaml:9:"), "{err}");
    }

    #[test]
    fn type_errors_name_the_kind_and_line() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  hostNetwork: maybe\n";
        let err = parse_str(text).expect_err("bad bool").to_string();
        assert!(err.starts_with("cluster.yaml:5:"), "{err}");
        assert!(err.contains("Pod:"), "{err}");
    }

    #[test]
    fn bad_ip_and_duplicates_are_rejected() {
        let err = parse_str("kind: Pod\napiVersion: v1\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.300}\n")
            .expect_err("bad ip")
            .to_string();
        assert!(err.contains("10.0.0.300"), "{err}");
        let err = parse_str("kind: Namespace\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Namespace\napiVersion: v1\nmetadata: {name: a}\n")
            .expect_err("duplicate")
            .to_string();
        assert_eq!(err, "cluster.yaml:5: Namespace a: defined twice (first at line 1)");
    }

    #[test]
    fn peer_authentications_are_read_and_checked() {
        let ok = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";
        let cluster = parse_str(ok).expect("valid");
        assert_eq!(cluster.peer_authentications.len(), 1);
        let text = format!(
            "{ok}---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: shop}}\nspec:\n  mtls:\n    mode: strict\n"
        );
        let err = parse_str(&text).expect_err("lowercase mode").to_string();
        assert!(
            err.starts_with("cluster.yaml:11:") && err.contains("spec.mtls.mode") && err.contains("strict"),
            "{err}"
        );
        let err = parse_str(
            "apiVersion: security.istio.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: p}\n",
        )
        .expect_err("old version")
        .to_string();
        assert!(err.contains("v1alpha1"), "{err}");
        let err = parse_str("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec: {portLevelMtls: {80: {mode: STRICT}}}\n")
            .expect_err("no selector")
            .to_string();
        assert_eq!(
            err,
            "cluster.yaml:1: PeerAuthentication shop/p: spec.portLevelMtls requires spec.selector (port-level settings apply to workloads)"
        );
    }

    #[test]
    fn lists_are_flattened() {
        let cluster = parse_str("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n")
            .expect("valid");
        assert!(cluster.namespaces.contains_key("a"));
    }

    #[test]
    fn a_reread_touches_only_what_changed_and_a_bad_edit_changes_nothing() {
        let mut reader = Reader::new(Path::new("cluster.yaml"), "istio-system");
        let before = reader.parse(SHOP).expect("valid");
        let key = |name: &str| ObjectKey { namespace: "shop".into(), name: name.into() };
        // The frontend moves to another node; the rest of the file is as it was.
        let edited = SHOP.replacen("nodeName: node-a", "nodeName: node-c", 1);
        assert_ne!(edited, SHOP);
        let after = reader.parse(&edited).expect("valid");
        assert_eq!(after.workloads[&key("frontend")].node.as_deref(), Some("node-c"));
        let unchanged: Vec<&ObjectKey> = before
            .workloads
            .keys()
            .filter(|k| **k != key("frontend"))
            .filter(|k| Arc::ptr_eq(&before.workloads[*k], &after.workloads[*k]))
            .collect();
        assert_eq!(
            unchanged.len(),
            before.workloads.len() - 1,
            "every other pod is the same entry, not rebuilt"
        );

        // A bad edit is refused whole, its good parts too (db moved in it): the next read is
        // compared with the last good one.
        let moved = edited.replacen("nodeName: node-b", "nodeName: node-z", 1);
        assert_ne!(moved, edited);
        let broken = format!("{moved}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: [}}\n");
        assert!(reader.parse(&broken).is_err());
        let again = reader.parse(&edited).expect("valid");
        assert_eq!(again.workloads[&key("db")].node.as_deref(), Some("node-b"), "nothing of the bad edit");
        let outsider = ObjectKey { namespace: "other".into(), name: "outsider".into() };
        assert!(Arc::ptr_eq(&again.workloads[&outsider], &after.workloads[&outsider]), "nothing read again");
        let without_frontend: String = edited
            .split("\n---\n")
            .filter(|doc| !doc.contains("name: frontend\n"))
            .collect::<Vec<_>>()
            .join("\n---\n");
        let last = reader.parse(&without_frontend).expect("valid");
        assert!(!last.workloads.contains_key(&key("frontend")), "the pod whose document went is gone");
        assert_eq!(last.workloads.len(), before.workloads.len() - 1);
        assert!(last.workload_by_ip("10.0.0.2".parse().expect("ip")).is_none(), "and its address with it");
    }
}
