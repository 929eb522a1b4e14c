//! PeerAuthentication: whether a workload accepts plaintext, per port.
//!
//! Scopes, narrowest first: workload (a policy with a selector, in the workload's namespace),
//! namespace (no selector), mesh (no selector, in the root namespace). Port-level settings of
//! the workload policy override its mode for that port. `UNSET` inherits from the next wider
//! scope; with nothing set the mode is PERMISSIVE, Istio's default. When several policies
//! compete at one scope the oldest wins (then the name), as in Istio.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{Port, WorkloadSelector};
use crate::schema::{Workload, objects::ObjectMeta};

/// `security.istio.io/v1` (or `v1beta1`) `PeerAuthentication`.
#[derive(Clone, Debug, Deserialize)]
pub struct PeerAuthentication {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// The spec. Unknown fields are errors: a typo must not silently weaken mTLS.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads the policy applies to; absent for namespace- or mesh-wide policies.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The mode for all ports.
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Per container port.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<Port, Mtls>,
}

/// `mtls:` of a policy or a port.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    /// The mode.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// mTLS modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the wider scope.
    #[default]
    Unset,
    /// Plaintext accepted.
    Disable,
    /// mTLS and plaintext accepted.
    Permissive,
    /// Only mTLS.
    Strict,
}

impl MtlsMode {
    /// Whether plaintext connections are let in.
    pub fn allows_plaintext(self) -> bool {
        self != Self::Strict
    }
}

impl std::fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unset => "UNSET",
            Self::Disable => "DISABLE",
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        })
    }
}

/// The effective mode for one workload and port, and what decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtlsDecision {
    /// STRICT, PERMISSIVE or DISABLE (never UNSET).
    pub mode: MtlsMode,
    /// `namespace/name` of the deciding policy (with `port N` for a port-level setting), or
    /// `default` when no policy sets a mode.
    pub decided_by: String,
}

impl PeerAuthentication {
    fn name(&self) -> String {
        format!("{}/{}", self.metadata.namespace.as_deref().unwrap_or("default"), self.metadata.name)
    }

    fn age_key(&self) -> (String, String) {
        (self.metadata.creation_timestamp.clone().unwrap_or_default(), self.metadata.name.clone())
    }

    fn has_selector(&self) -> bool {
        self.spec.selector.as_ref().is_some_and(|s| !s.match_labels.is_empty())
    }

    fn mode(&self) -> MtlsMode {
        self.spec.mtls.map(|m| m.mode).unwrap_or_default()
    }

    /// Semantic checks beyond the schema, as Istio's validation does them.
    pub fn validate(&self) -> Result<(), String> {
        if !self.spec.port_level_mtls.is_empty() && !self.has_selector() {
            return Err(
                "spec.portLevelMtls requires spec.selector (port-level settings apply to workloads)".into()
            );
        }
        Ok(())
    }
}

/// All PeerAuthentications, indexed by namespace.
#[derive(Clone, Debug, Default)]
pub struct PeerAuthentications {
    by_namespace: HashMap<String, Vec<PeerAuthentication>>,
}

impl PeerAuthentications {
    /// Indexes `policies`.
    pub fn new(policies: Vec<PeerAuthentication>) -> Self {
        let mut by_namespace: HashMap<String, Vec<PeerAuthentication>> = HashMap::new();
        for policy in policies {
            let ns = policy.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            by_namespace.entry(ns).or_default().push(policy);
        }
        for list in by_namespace.values_mut() {
            list.sort_by_key(PeerAuthentication::age_key);
        }
        Self { by_namespace }
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.by_namespace.values().map(Vec::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every policy, for listings.
    pub fn iter(&self) -> impl Iterator<Item = &PeerAuthentication> {
        self.by_namespace.values().flatten()
    }

    /// The ports of `workload` with a port-level setting, and the mode each ends up with.
    pub fn port_overrides(&self, workload: &Workload, root_namespace: &str) -> Vec<(u16, MtlsDecision)> {
        let in_ns = |ns: &str| self.by_namespace.get(ns).map(Vec::as_slice).unwrap_or_default();
        let workload_policy = in_ns(&workload.key.namespace).iter().find(|p| {
            p.has_selector() && p.spec.selector.as_ref().is_some_and(|s| s.matches(&workload.labels))
        });
        workload_policy
            .into_iter()
            .flat_map(|p| p.spec.port_level_mtls.keys())
            .map(|port| (port.0, self.decide(workload, port.0, root_namespace)))
            .collect()
    }

    /// The mode for inbound connections to `workload` on `port`.
    pub fn decide(&self, workload: &Workload, port: u16, root_namespace: &str) -> MtlsDecision {
        let in_ns = |ns: &str| self.by_namespace.get(ns).map(Vec::as_slice).unwrap_or_default();
        let workload_policy = in_ns(&workload.key.namespace).iter().find(|p| {
            p.has_selector() && p.spec.selector.as_ref().is_some_and(|s| s.matches(&workload.labels))
        });
        let namespace_policy = in_ns(&workload.key.namespace).iter().find(|p| !p.has_selector());
        let mesh_policy = in_ns(root_namespace).iter().find(|p| !p.has_selector());

        if let Some(policy) = workload_policy
            && let Some(mtls) = policy.spec.port_level_mtls.get(&Port(port))
            && mtls.mode != MtlsMode::Unset
        {
            return MtlsDecision { mode: mtls.mode, decided_by: format!("{} (port {port})", policy.name()) };
        }
        for policy in [workload_policy, namespace_policy, mesh_policy].into_iter().flatten() {
            if policy.mode() != MtlsMode::Unset {
                return MtlsDecision { mode: policy.mode(), decided_by: policy.name() };
            }
        }
        MtlsDecision { mode: MtlsMode::Permissive, decided_by: "default".into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
        crate::schema::test_workload(ns, "w", labels)
    }

    fn pa(yaml: &str) -> PeerAuthentication {
        let policy: PeerAuthentication = serde_yaml_ng::from_str(yaml).expect("valid policy");
        policy.validate().expect("semantically valid");
        policy
    }

    fn mode(policies: &[&str], w: &Workload, port: u16) -> MtlsMode {
        PeerAuthentications::new(policies.iter().map(|y| pa(y)).collect())
            .decide(w, port, "istio-system")
            .mode
    }

    const MESH_STRICT: &str =
        "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}";
    const NS_PERMISSIVE: &str =
        "metadata: {name: default, namespace: shop}\nspec: {mtls: {mode: PERMISSIVE}}";
    const NS_UNSET: &str = "metadata: {name: default, namespace: shop}\nspec: {}";
    const WL_STRICT_8080_PERMISSIVE: &str = "metadata: {name: db, namespace: shop}\nspec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n    \"9090\": {mode: UNSET}";
    const WL_PERMISSIVE_8080_STRICT: &str = "metadata: {name: db, namespace: shop}\nspec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    8080: {mode: STRICT}";

    #[test]
    fn default_is_permissive() {
        let d = PeerAuthentications::default().decide(&workload("shop", &[]), 80, "istio-system");
        assert_eq!(d, MtlsDecision { mode: MtlsMode::Permissive, decided_by: "default".into() });
    }

    #[test]
    fn narrowest_scope_wins_and_unset_inherits() {
        let db = workload("shop", &[("app", "db")]);
        let web = workload("shop", &[("app", "web")]);
        let other = workload("other", &[("app", "db")]);
        assert_eq!(mode(&[MESH_STRICT], &web, 80), MtlsMode::Strict);
        assert_eq!(mode(&[MESH_STRICT, NS_PERMISSIVE], &web, 80), MtlsMode::Permissive);
        assert_eq!(
            mode(&[MESH_STRICT, NS_UNSET], &web, 80),
            MtlsMode::Strict,
            "UNSET inherits the mesh mode"
        );
        assert_eq!(mode(&[MESH_STRICT, NS_PERMISSIVE, WL_STRICT_8080_PERMISSIVE], &db, 80), MtlsMode::Strict);
        assert_eq!(
            mode(&[NS_PERMISSIVE, WL_STRICT_8080_PERMISSIVE], &web, 80),
            MtlsMode::Permissive,
            "selector does not match"
        );
        assert_eq!(mode(&[WL_STRICT_8080_PERMISSIVE], &other, 80), MtlsMode::Permissive, "other namespace");
    }

    #[test]
    fn port_level_overrides_only_that_port() {
        let db = workload("shop", &[("app", "db"), ("version", "v1")]);
        let policies = [MESH_STRICT, WL_STRICT_8080_PERMISSIVE];
        assert_eq!(mode(&policies, &db, 8080), MtlsMode::Permissive, "the NodePort-style exception");
        assert_eq!(mode(&policies, &db, 8081), MtlsMode::Strict);
        assert_eq!(
            mode(&policies, &db, 9090),
            MtlsMode::Strict,
            "port-level UNSET inherits the workload mode"
        );
        let d = PeerAuthentications::new(policies.iter().map(|y| pa(y)).collect()).decide(
            &db,
            8080,
            "istio-system",
        );
        assert_eq!(d.decided_by, "shop/db (port 8080)");
        let policies = [NS_PERMISSIVE, WL_PERMISSIVE_8080_STRICT];
        assert_eq!(mode(&policies, &db, 8080), MtlsMode::Strict);
        assert_eq!(mode(&policies, &db, 80), MtlsMode::Permissive);
    }

    #[test]
    fn oldest_policy_wins_a_tie() {
        let older = "metadata: {name: b, namespace: shop, creationTimestamp: '2024-01-01T00:00:00Z'}\nspec: {mtls: {mode: STRICT}}";
        let newer = "metadata: {name: a, namespace: shop, creationTimestamp: '2025-01-01T00:00:00Z'}\nspec: {mtls: {mode: PERMISSIVE}}";
        assert_eq!(mode(&[newer, older], &workload("shop", &[]), 80), MtlsMode::Strict);
    }

    #[test]
    fn bad_policies_are_rejected_with_the_field() {
        let err = serde_yaml_ng::from_str::<PeerAuthentication>(
            "metadata: {name: x}\nspec: {mtls: {mode: STRICTT}}",
        )
        .expect_err("bad mode")
        .to_string();
        assert!(err.contains("STRICTT") && err.contains("STRICT"), "{err}");
        let err = serde_yaml_ng::from_str::<PeerAuthentication>(
            "metadata: {name: x}\nspec: {mtsl: {mode: STRICT}}",
        )
        .expect_err("typo")
        .to_string();
        assert!(err.contains("mtsl"), "{err}");
        let err = serde_yaml_ng::from_str::<PeerAuthentication>("metadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  portLevelMtls: {70000: {mode: STRICT}}")
            .expect_err("port")
            .to_string();
        assert!(err.contains("70000"), "{err}");
        let policy: PeerAuthentication =
            serde_yaml_ng::from_str("metadata: {name: x}\nspec:\n  portLevelMtls: {80: {mode: STRICT}}")
                .expect("schema-valid");
        assert!(policy.validate().expect_err("needs a selector").contains("spec.selector"));
    }

    /// Adding a STRICT policy anywhere never makes a workload accept plaintext it refused.
    #[test]
    fn adding_strict_never_widens() {
        let bases: [&[&str]; 5] = [
            &[],
            &[MESH_STRICT],
            &[NS_PERMISSIVE],
            &[MESH_STRICT, WL_STRICT_8080_PERMISSIVE],
            &[NS_UNSET, WL_PERMISSIVE_8080_STRICT],
        ];
        // New objects are the newest: at a tie between policies the oldest keeps deciding.
        let new = "creationTimestamp: '2099-01-01T00:00:00Z'";
        let additions = [
            format!(
                "metadata: {{name: aa, namespace: istio-system, {new}}}\nspec: {{mtls: {{mode: STRICT}}}}"
            ),
            format!("metadata: {{name: aa, namespace: shop, {new}}}\nspec: {{mtls: {{mode: STRICT}}}}"),
            format!(
                "metadata: {{name: aa, namespace: shop, {new}}}\nspec:\n  selector: {{matchLabels: {{app: db}}}}\n  mtls: {{mode: STRICT}}"
            ),
            format!(
                "metadata: {{name: aa, namespace: shop, {new}}}\nspec:\n  selector: {{matchLabels: {{app: db}}}}\n  portLevelMtls: {{8080: {{mode: STRICT}}}}"
            ),
        ];
        let workloads =
            [workload("shop", &[("app", "db")]), workload("shop", &[("app", "web")]), workload("other", &[])];
        for base in bases {
            for addition in &additions {
                let with: Vec<&str> = base.iter().copied().chain([addition.as_str()]).collect();
                for w in &workloads {
                    for port in [80, 8080, 9090] {
                        let before = mode(base, w, port);
                        let after = mode(&with, w, port);
                        assert!(
                            before.allows_plaintext() || !after.allows_plaintext(),
                            "adding {addition:?} to {base:?} widened {}:{port}: {before} -> {after}",
                            w.key
                        );
                    }
                }
            }
        }
    }
}
