//! Istio's `security.istio.io` API, the L4 part: which inbound connections a workload accepts
//! in plaintext (PeerAuthentication) and from whom (AuthorizationPolicy). Objects are parsed by `discovery` and compiled here into
//! indexes the proxies query per connection.

pub mod authorization;
pub mod peer_authentication;

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

pub use self::authorization::{
    Action, AuthorizationPolicies, AuthorizationPolicy, CompiledPolicy, ConnectionInput, Verdict,
};
pub use self::peer_authentication::{MtlsDecision, MtlsMode, PeerAuthentication, PeerAuthentications};

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
