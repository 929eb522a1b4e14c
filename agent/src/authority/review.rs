//! Who is asking: the caller's Kubernetes service-account token, checked by the API server
//! (TokenReview, audience `istio-ca`), and the pods of each node, watched, to decide whether a
//! node agent may have a pod's identity.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::{info, warn};

/// How long a token's review is reused: a node agent asks for many identities at once.
const REVIEW_MEMORY: Duration = Duration::from_secs(30);
/// The `extra` keys of a pod-bound service-account token.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Why a caller is not known.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server did not accept the token.
    #[error("token not authenticated{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    NotAuthenticated(Option<String>),
    /// Authenticated, but not for this audience.
    #[error("token not meant for audience {0}")]
    WrongAudience(String),
    /// Authenticated, but not a service account.
    #[error("token of {0}, not of a service account")]
    NotServiceAccount(String),
    /// The API server could not be asked.
    #[error("TokenReview failed: {0}")]
    Unavailable(String),
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Its service account's namespace.
    pub namespace: String,
    /// Its service account.
    pub service_account: String,
    /// The pod its token is bound to, if it is.
    pub pod: Option<String>,
    /// That pod's node, when the API server says.
    pub node: Option<String>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)?;
        if let Some(pod) = &self.pod {
            write!(f, " (pod {pod})")?;
        }
        Ok(())
    }
}

/// A review's answer and when it was given.
type Remembered = (Instant, Result<Caller, ReviewError>);

/// Checks tokens with the API server, remembering each answer briefly.
pub struct Reviewer {
    client: Client,
    audience: String,
    memory: Mutex<HashMap<[u8; 32], Remembered>>,
}

impl Reviewer {
    /// Reviews for `audience`.
    pub fn new(client: Client, audience: String) -> Self {
        Self { client, audience, memory: Mutex::default() }
    }

    /// Who `token` belongs to.
    pub async fn review(&self, token: &str) -> Result<Caller, ReviewError> {
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]);
        if let Some((at, answer)) = self.memory.lock().unwrap_or_else(|e| e.into_inner()).get(&digest)
            && at.elapsed() < REVIEW_MEMORY
        {
            return answer.clone();
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), audiences: Some(vec![self.audience.clone()]) },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = match api.create(&PostParams::default(), &review).await {
            Ok(reviewed) => self.caller(reviewed),
            Err(e) => return Err(ReviewError::Unavailable(e.to_string())),
        };
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.retain(|_, (at, _)| at.elapsed() < REVIEW_MEMORY);
        memory.insert(digest, (Instant::now(), answer.clone()));
        answer
    }

    fn caller(&self, reviewed: TokenReview) -> Result<Caller, ReviewError> {
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::NotAuthenticated(status.error));
        }
        // An audience-aware API server says which audience it checked; one that is not says
        // none, and then the token is only good for the API server itself.
        if !status.audiences.unwrap_or_default().contains(&self.audience) {
            return Err(ReviewError::WrongAudience(self.audience.clone()));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) =
            username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'))
        else {
            return Err(ReviewError::NotServiceAccount(username));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        Ok(Caller {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod: first(POD_NAME),
            node: first(NODE_NAME),
        })
    }
}

/// The running pods of the cluster, by node: who may hold which identity where.
#[derive(Default)]
pub struct Pods {
    pods: RwLock<HashMap<(String, String), Placed>>,
    synced: AtomicBool,
}

/// Where a pod runs and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Placed {
    node: String,
    service_account: String,
}

impl Pods {
    /// Whether the first full list has arrived: before, every question would be answered "no".
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// The node of pod `namespace/name`, if it runs.
    pub fn node_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.read().get(&(namespace.to_owned(), name.to_owned())).map(|p| p.node.clone())
    }

    /// Whether a running pod of `namespace` with `service_account` is scheduled on `node`.
    pub fn runs_on(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.read()
            .iter()
            .any(|((ns, _), p)| ns == namespace && p.node == node && p.service_account == service_account)
    }

    /// Places a pod, as the watcher would (unit tests).
    #[cfg(test)]
    pub(crate) fn place_for_test(&self, namespace: &str, name: &str, node: &str, service_account: &str) {
        self.synced.store(true, Ordering::Relaxed);
        self.pods.write().unwrap_or_else(|e| e.into_inner()).insert(
            (namespace.to_owned(), name.to_owned()),
            Placed { node: node.to_owned(), service_account: service_account.to_owned() },
        );
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<(String, String), Placed>> {
        self.pods.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A pod as this index keeps it: scheduled, not finished.
    fn placed(pod: &Pod) -> Option<((String, String), Placed)> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone()?;
        let spec = pod.spec.as_ref()?;
        let node = spec.node_name.clone()?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let service_account =
            spec.service_account_name.clone().filter(|sa| !sa.is_empty()).unwrap_or_else(|| "default".into());
        Some(((namespace, name), Placed { node, service_account }))
    }

    /// Keeps the index in line with the API server until the process ends (the watcher lists
    /// again after any error, with backoff; the last complete list answers meanwhile).
    pub async fn watch(self: Arc<Self>, client: Client) {
        let api: Api<Pod> = Api::all(client);
        let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
        let mut staging: HashMap<(String, String), Placed> = HashMap::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => staging.clear(),
                Ok(watcher::Event::InitApply(pod)) => staging.extend(Self::placed(&pod)),
                Ok(watcher::Event::InitDone) => {
                    let count = staging.len();
                    *self.pods.write().unwrap_or_else(|e| e.into_inner()) = std::mem::take(&mut staging);
                    if !self.synced.swap(true, Ordering::Relaxed) {
                        info!(pods = count, "pods listed");
                    }
                }
                Ok(watcher::Event::Apply(pod)) => {
                    let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
                    let key = (
                        pod.metadata.namespace.clone().unwrap_or_default(),
                        pod.metadata.name.clone().unwrap_or_default(),
                    );
                    match Self::placed(&pod) {
                        Some((key, placed)) => pods.insert(key, placed),
                        None => pods.remove(&key),
                    };
                }
                Ok(watcher::Event::Delete(pod)) => {
                    let key = (
                        pod.metadata.namespace.clone().unwrap_or_default(),
                        pod.metadata.name.clone().unwrap_or_default(),
                    );
                    self.pods.write().unwrap_or_else(|e| e.into_inner()).remove(&key);
                }
                Err(e) => warn!(error = %e, "watching pods failed; listing again with backoff"),
            }
        }
    }
}
