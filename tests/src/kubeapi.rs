//! A mock Kubernetes API server for cluster-mode tests: lists and watches over plain HTTP, from
//! an in-memory store the test edits, with the failure modes the agent must survive (watch
//! streams dropped mid-way, `410 Gone`). It answers inside the node network namespaces, where the
//! agents run, on `127.0.0.1:<port>`.

use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::Deserialize as _;
use serde_json::{Value, json};

/// The port it serves on, in every node.
const PORT: u16 = 6443;

/// The resource collections served, by URL path.
const RESOURCES: [(&str, &str); 8] = [
    ("/api/v1/namespaces", "NamespaceList"),
    ("/api/v1/pods", "PodList"),
    ("/api/v1/services", "ServiceList"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSliceList"),
    ("/apis/security.istio.io/v1/peerauthentications", "PeerAuthenticationList"),
    ("/apis/security.istio.io/v1/authorizationpolicies", "AuthorizationPolicyList"),
    ("/apis/security.istio.io/v1beta1/peerauthentications", "PeerAuthenticationList"),
    ("/apis/security.istio.io/v1beta1/authorizationpolicies", "AuthorizationPolicyList"),
];

#[derive(Default)]
struct State {
    version: u64,
    /// (collection path, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (version, collection path, type, object).
    events: Vec<(u64, String, &'static str, Value)>,
    /// Watch streams opened before this many drops end.
    drops: u64,
    /// Watches from a resource version older than this get `410 Gone`.
    gone_before: u64,
    /// Requests served, by path.
    requests: Vec<String>,
    /// While set, every request's connection is dropped unanswered and open watches end: the
    /// server is away.
    down: bool,
    /// The version of `security.istio.io` served ("v1" or "v1beta1"); empty: no Istio CRDs.
    istio_version: &'static str,
    /// Service-account tokens TokenReview knows: token → (user info, audiences).
    tokens: BTreeMap<String, (Value, Vec<String>)>,
    /// Events sent on watch streams, and their bytes (JSON, before HTTP chunking).
    watched: (u64, u64),
}

/// Where TokenReviews are created.
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// The mock API.
pub struct MockApi {
    state: Arc<(Mutex<State>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl MockApi {
    /// Serves on `127.0.0.1:6443` in each of `netns` (paths of network namespaces).
    pub(crate) fn start(netns: &[PathBuf]) -> io::Result<Self> {
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        state.0.lock().unwrap_or_else(|e| e.into_inner()).istio_version = "v1";
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for ns in netns {
            let listener = crate::sys::in_netns(ns, || TcpListener::bind(("127.0.0.1", PORT)))??;
            let (state, stop) = (state.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                listener.set_nonblocking(true).ok();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (state, stop) = (state.clone(), stop.clone());
                            std::thread::spawn(move || {
                                let _ = serve(stream, &state, &stop);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
        }
        Ok(Self { state, threads, stop })
    }

    /// Writes a kubeconfig that points at the server (whether or not it runs yet).
    pub fn write_kubeconfig(path: &Path) -> io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster: {{server: \"http://127.0.0.1:{PORT}\"}}\n\
                 users:\n- name: mock\n  user: {{token: mock-token}}\ncontexts:\n- name: mock\n  context: {{cluster: mock, user: mock}}\n\
                 current-context: mock\n"
            ),
        )
    }

    /// Creates or replaces an object (given as the API returns it), as ADDED or MODIFIED.
    pub fn apply(&self, collection: &str, mut object: Value) {
        let (lock, wake) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.version += 1;
        let version = state.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let key = key(collection, &object);
        let kind = if state.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        state.objects.insert(key, object.clone());
        state.events.push((version, collection.to_owned(), kind, object));
        wake.notify_all();
    }

    /// Makes the server hold exactly the objects of `yaml` (documents as in a cluster file):
    /// new ones ADDED, changed ones MODIFIED, missing ones DELETED; unchanged ones untouched.
    pub fn sync_yaml(&self, yaml: &str) -> io::Result<()> {
        let mut wanted = BTreeMap::new();
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let object = Value::deserialize(document).map_err(io::Error::other)?;
            if object.is_null() {
                continue;
            }
            let kind = object["kind"].as_str().unwrap_or_default();
            let collection = self
                .collection_of(kind)
                .ok_or_else(|| io::Error::other(format!("no collection for kind {kind:?}")))?;
            wanted.insert(key(&collection, &object), object);
        }
        let held: Vec<((String, String, String), Value)> = {
            let state = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
            state.objects.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        for ((collection, namespace, name), _) in held.iter().filter(|(k, _)| !wanted.contains_key(k)) {
            self.delete(collection, namespace, name);
        }
        for ((collection, _, _), object) in wanted {
            let unchanged = held.iter().any(|(k, v)| {
                let mut v = v.clone();
                if let Some(meta) = v["metadata"].as_object_mut() {
                    meta.remove("resourceVersion");
                }
                *k == key(&collection, &object) && v == object
            });
            if !unchanged {
                self.apply(&collection, object);
            }
        }
        Ok(())
    }

    /// Serves Istio's security API at `version` (`v1`, the default, or `v1beta1`), or not at all
    /// (`None`: a cluster without Istio's CRDs).
    pub fn serve_istio(&self, version: Option<&'static str>) {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).istio_version = version.unwrap_or("");
    }

    /// The collection path of an object kind, at the Istio version served.
    pub fn collection_of(&self, kind: &str) -> Option<String> {
        let plural = match kind {
            "Namespace" => "namespaces",
            "Pod" => "pods",
            "Service" => "services",
            "EndpointSlice" => "endpointslices",
            "PeerAuthentication" => "peerauthentications",
            "AuthorizationPolicy" => "authorizationpolicies",
            _ => return None,
        };
        let istio = format!(
            "/apis/security.istio.io/{}/",
            self.state.0.lock().unwrap_or_else(|e| e.into_inner()).istio_version
        );
        RESOURCES
            .iter()
            .map(|(path, _)| *path)
            .find(|path| {
                path.ends_with(&format!("/{plural}"))
                    && (!path.contains("istio.io") || path.starts_with(&istio))
            })
            .map(str::to_owned)
    }

    /// The object stored at `collection`, `namespace`, `name`, as the API would return it.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        state.objects.get(&(collection.to_owned(), namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Events sent on watch streams so far, and their bytes: what the watchers cost the server.
    pub fn watched(&self) -> (u64, u64) {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).watched
    }

    /// Deletes an object, as DELETED.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        let (lock, wake) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut object) =
            state.objects.remove(&(collection.to_owned(), namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        state.version += 1;
        let version = state.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        state.events.push((version, collection.to_owned(), "DELETED", object));
        wake.notify_all();
    }

    /// Ends every open watch stream abruptly, as a restarted API server or a lost connection
    /// would; with `gone`, the watchers' resource versions are also too old (`410 Gone`).
    pub fn drop_watches(&self, gone: bool) {
        let (lock, wake) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.drops += 1;
        if gone {
            // A fresh list then returns a version at or past the cut-off, as a real server would.
            state.version += 1;
            state.gone_before = state.version;
        }
        wake.notify_all();
    }

    /// Takes the server away (`true`: open watch streams end, requests go unanswered)
    /// or brings it back; `gone` also expires the watchers' resource versions (`410 Gone` on
    /// their next watch), as after a long outage.
    pub fn set_down(&self, down: bool, gone: bool) {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).down = down;
        self.drop_watches(gone);
    }

    /// Adds a running node-agent pod (`ambit-system`, service account `ambit`) on `node`, as
    /// the CA's pod index must see the DaemonSet's pods.
    pub fn add_agent_pod(&self, name: &str, node: &str) {
        self.apply(
            "/api/v1/pods",
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "ambit-system", "uid": format!("uid-{name}")},
                "spec": {"nodeName": node, "serviceAccountName": "ambit", "containers": [{"name": "agent", "image": "ambit"}]},
                "status": {"phase": "Running", "podIP": "10.90.0.99"},
            }),
        );
    }

    /// Makes `token` a valid token of service account `namespace/name` for `audiences`, bound
    /// to `pod` (and, if given, with the API server's `node` claim), as TokenReview reports it.
    pub fn add_token(
        &self,
        token: &str,
        namespace: &str,
        name: &str,
        pod: Option<&str>,
        node: Option<&str>,
        audiences: &[&str],
    ) {
        let mut extra = serde_json::Map::new();
        if let Some(pod) = pod {
            extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
        }
        if let Some(node) = node {
            extra.insert("authentication.kubernetes.io/node-name".into(), json!([node]));
        }
        let user = json!({
            "username": format!("system:serviceaccount:{namespace}:{name}"),
            "uid": format!("uid-{namespace}-{name}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
            "extra": extra,
        });
        self.state
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tokens
            .insert(token.to_owned(), (user, audiences.iter().map(|a| (*a).to_owned()).collect()));
    }

    /// Forgets `token` (as if its pod were deleted): reviews fail from now on.
    pub fn revoke_token(&self, token: &str) {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).tokens.remove(token);
    }

    /// Paths of the requests served so far (`?watch` ones marked), to see re-lists happen.
    pub fn requests(&self) -> Vec<String> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).requests.clone()
    }
}

impl Drop for MockApi {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.state.1.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn key(collection: &str, object: &Value) -> (String, String, String) {
    let meta = &object["metadata"];
    (
        collection.to_owned(),
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

fn serve(
    stream: TcpStream,
    state: &(Mutex<State>, Condvar),
    stop: &std::sync::atomic::AtomicBool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        // Headers: only the body's length matters.
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length.min(1 << 20)];
        std::io::Read::read_exact(&mut reader, &mut body)?;
        let target = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
        if request.starts_with("POST ") && target.split('?').next() == Some(TOKEN_REVIEWS) {
            state
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .requests
                .push(format!("create {TOKEN_REVIEWS}"));
            if state.0.lock().unwrap_or_else(|e| e.into_inner()).down {
                return Ok(());
            }
            let answer = review(state, &body);
            write!(
                out,
                "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                answer.len()
            )?;
            continue;
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let param = |name: &str| {
            query.split('&').find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
        };
        let watching = param("watch").is_some_and(|w| w == "true" || w == "1");
        state.0.lock().unwrap_or_else(|e| e.into_inner()).requests.push(if watching {
            format!("watch {path}")
        } else {
            format!("list {path}")
        });
        if state.0.lock().unwrap_or_else(|e| e.into_inner()).down {
            // Away: the connection drops without an answer (a 503 would be retried by clients).
            return Ok(());
        }
        let served = {
            let istio = state.0.lock().unwrap_or_else(|e| e.into_inner()).istio_version;
            !path.starts_with("/apis/security.istio.io/")
                || (!istio.is_empty() && path.starts_with(&format!("/apis/security.istio.io/{istio}/")))
        };
        let Some((_, list_kind)) = RESOURCES.iter().find(|(p, _)| *p == path && served) else {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).to_string();
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        };
        if !watching {
            let (items, version) = {
                let st = state.0.lock().unwrap_or_else(|e| e.into_inner());
                // As a real server does, list items carry no kind or apiVersion of their own.
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((c, ..), _)| c == path)
                    .map(|(_, o)| {
                        let mut item = o.clone();
                        if let Some(fields) = item.as_object_mut() {
                            fields.remove("kind");
                            fields.remove("apiVersion");
                        }
                        item
                    })
                    .collect();
                (items, st.version)
            };
            let body = json!({
                "kind": list_kind,
                "apiVersion": if path.starts_with("/api/") { "v1".to_owned() } else { path.split('/').skip(2).take(2).collect::<Vec<_>>().join("/") },
                "metadata": {"resourceVersion": version.to_string()},
                "items": items,
            })
            .to_string();
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        }
        // A watch: chunked JSON events from after the given resource version, until dropped.
        let mut seen: u64 = param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let timeout =
            Duration::from_secs(param("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        let started = Instant::now();
        let drops_at_start = state.0.lock().unwrap_or_else(|e| e.into_inner()).drops;
        {
            let st = state.0.lock().unwrap_or_else(|e| e.into_inner());
            if seen < st.gone_before && st.gone_before > 0 {
                let event = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "too old resource version", "reason": "Expired", "code": 410}});
                drop(st);
                chunk(&mut out, &format!("{event}\n"))?;
                return chunk(&mut out, "");
            }
        }
        loop {
            let pending: Vec<String> = {
                let (lock, wake) = state;
                let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if st.drops != drops_at_start || stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // Abrupt end: no final chunk, as a lost connection.
                        return Ok(());
                    }
                    if started.elapsed() > timeout {
                        drop(st);
                        return chunk(&mut out, "");
                    }
                    // Events are in version order: only the tail after `seen` can be new.
                    let from = st.events.partition_point(|(v, ..)| *v <= seen);
                    if st.events[from..].iter().any(|(_, c, ..)| c == path) {
                        break;
                    }
                    st = wake
                        .wait_timeout(st, Duration::from_millis(200))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                let from = st.events.partition_point(|(v, ..)| *v <= seen);
                let fresh: Vec<String> = st.events[from..]
                    .iter()
                    .filter(|(_, c, ..)| c == path)
                    .map(|(_, _, kind, object)| format!("{}\n", json!({"type": kind, "object": object})))
                    .collect();
                st.watched.0 += fresh.len() as u64;
                st.watched.1 += fresh.iter().map(|e| e.len() as u64).sum::<u64>();
                seen = st.version;
                fresh
            };
            for event in pending {
                chunk(&mut out, &event)?;
            }
        }
    }
}

/// The API server's answer to a TokenReview, as `authentication.k8s.io/v1` gives it.
fn review(state: &(Mutex<State>, Condvar), body: &[u8]) -> String {
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    let token = request["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = request["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let known = state.0.lock().unwrap_or_else(|e| e.into_inner()).tokens.get(token).cloned();
    let status = match known {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some((user, audiences)) => {
            let shared: Vec<&String> = if wanted.is_empty() {
                audiences.iter().collect()
            } else {
                wanted.iter().filter(|a| audiences.contains(a)).collect()
            };
            if shared.is_empty() {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            } else {
                json!({"authenticated": true, "user": user, "audiences": shared})
            }
        }
    };
    json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": null},
           "spec": request["spec"], "status": status})
    .to_string()
}

fn chunk(out: &mut TcpStream, data: &str) -> io::Result<()> {
    write!(out, "{:x}\r\n{data}\r\n", data.len())?;
    out.flush()
}
