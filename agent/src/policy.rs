//! Istio's `security.istio.io` API, the L4 part: which inbound connections a workload accepts
//! in plaintext (PeerAuthentication) and from whom (AuthorizationPolicy). Objects are parsed by `discovery` and compiled here into
//! indexes the proxies query per connection.

pub mod authorization;
pub mod peer_authentication;

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use crate::schema::Workload;

pub use self::authorization::{
    Action, AuthorizationPolicies, AuthorizationPolicy, CompiledPolicy, ConnectionInput, Verdict,
};
pub use self::peer_authentication::{MtlsDecision, MtlsMode, PeerAuthentication, PeerAuthentications};

/// The destination's decision on an inbound connection: what its agent enforces, re-checks after
/// policy changes, and what `ambit check` predicts. One function, so the three cannot differ.
#[derive(Clone, Debug)]
pub enum InboundDecision {
    /// Plaintext, refused because mutual TLS is STRICT for the port.
    Strict(MtlsDecision),
    /// Decided by AuthorizationPolicy (after PeerAuthentication allowed plaintext, for plaintext).
    Authorized {
        /// PeerAuthentication's mode for the port, for plaintext; mutual TLS is always accepted.
        mtls: Option<MtlsDecision>,
        /// The verdict.
        verdict: Verdict,
    },
}

impl InboundDecision {
    /// Decides for a connection to `workload` described by `input`; plaintext when `input` has
    /// no verified principal.
    /// The snapshot calls it for every asker (`Cluster::decide_inbound`).
    pub fn new(
        peer_authentications: &PeerAuthentications,
        authorization: &AuthorizationPolicies,
        workload: &Workload,
        input: &ConnectionInput,
        root_namespace: &str,
    ) -> Self {
        let mtls = input
            .principal
            .is_none()
            .then(|| peer_authentications.decide(workload, input.destination.port(), root_namespace));
        match mtls {
            Some(mtls) if !mtls.mode.allows_plaintext() => Self::Strict(mtls),
            mtls => Self::Authorized { mtls, verdict: authorization.evaluate(&workload.key, input) },
        }
    }

    /// PeerAuthentication's decision, for plaintext.
    pub fn mtls(&self) -> Option<&MtlsDecision> {
        match self {
            Self::Strict(mtls) => Some(mtls),
            Self::Authorized { mtls, .. } => mtls.as_ref(),
        }
    }

    /// AuthorizationPolicy's verdict, unless STRICT refused first.
    pub fn verdict(&self) -> Option<&Verdict> {
        match self {
            Self::Strict(_) => None,
            Self::Authorized { verdict, .. } => Some(verdict),
        }
    }

    /// Whether the connection may reach the app.
    pub fn allowed(&self) -> bool {
        self.outcome() == Outcome::Allowed
    }

    /// What happens to the connection.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Strict(_) => Outcome::Refused,
            Self::Authorized { verdict, .. } if verdict.allowed => Outcome::Allowed,
            Self::Authorized { .. } => Outcome::Denied,
        }
    }

    /// Why, in words.
    pub fn reason(&self) -> String {
        match self {
            Self::Strict(mtls) => format!("plaintext refused: mTLS mode STRICT ({})", mtls.decided_by),
            Self::Authorized { verdict, .. } => verdict.reason.clone(),
        }
    }
}

/// What the destination does with an inbound connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It reaches the app.
    Allowed,
    /// An AuthorizationPolicy denies it.
    Denied,
    /// Plaintext under STRICT mutual TLS.
    Refused,
}

impl Outcome {
    /// As flow records and access logs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Refused => "refused",
        }
    }
}

/// `spec.selector` of Istio policies.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether a workload with `labels` is selected. An empty selector selects every workload.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A port number written as a YAML number or a string (`8080:` or `"8080":`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let n = match Raw::deserialize(deserializer)? {
            Raw::Number(n) => n,
            Raw::Text(s) => s
                .trim()
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("port {s:?} is not a number")))?,
        };
        match u16::try_from(n) {
            Ok(port) if port > 0 => Ok(Port(port)),
            _ => Err(serde::de::Error::custom(format!("port {n} is out of range 1-65535"))),
        }
    }
}

/// `ambit policies`: the policies in force for one workload.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WorkloadPolicies {
    /// `namespace/name`.
    pub pod: String,
    /// Its mTLS mode for ports without a port-level setting.
    pub mtls: MtlsDecision,
    /// Ports with their own mode.
    pub port_mtls: Vec<(u16, MtlsDecision)>,
    /// The AuthorizationPolicies that apply, in evaluation order (DENY before ALLOW).
    pub authorization: Vec<PolicySummary>,
}

/// One AuthorizationPolicy, summarized.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PolicySummary {
    /// `namespace/name`.
    pub name: String,
    /// Its action.
    pub action: Action,
    /// Number of rules.
    pub rules: usize,
    /// HTTP-only conditions this agent cannot evaluate.
    pub http_only: Vec<String>,
}
