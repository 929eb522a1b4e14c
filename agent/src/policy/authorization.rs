//! AuthorizationPolicy at L4, as Istio's ambient data plane enforces it.
//!
//! Which policies apply to a workload: those in its namespace whose selector matches (no
//! selector: all of the namespace's workloads), and those in the root namespace likewise for
//! every namespace. Evaluation: any matching DENY denies; with no ALLOW policy applying the
//! connection is allowed; otherwise one matching ALLOW rule allows and no match denies. AUDIT
//! policies are only reported.
//!
//! A rule matches when its `from`, `to` and `when` all match; each list matches when any entry
//! does; within an entry every field set must match. Values match exactly, by prefix (`x*`),
//! suffix (`*x`) or anything (`*`). Principals are written without `spiffe://`; a plaintext
//! connection has no principal (and no namespace), so `principals` never matches it and
//! `notPrincipals` always does.
//!
//! Attributes only an HTTP proxy can evaluate (methods, paths, hosts, request principals,
//! `remoteIpBlocks` and `remote.ip` — the client behind HTTP proxies — and every `when` key but
//! the five L4 ones) are handled as istiod translates policies for ztunnel: in an ALLOW or AUDIT
//! policy, a rule that uses one anywhere (in any `from`, `to` or `when` entry) is dropped as a
//! whole; a DENY rule is enforced without its HTTP conditions. Both are stricter than written,
//! and each is reported at load.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use imbl::OrdMap;

use super::{Port, WorkloadSelector};
use crate::schema::{ObjectKey, Workload, in_namespace, objects::ObjectMeta};

/// `security.istio.io/v1` (or `v1beta1`) `AuthorizationPolicy`.
#[derive(Clone, Debug, Deserialize)]
pub struct AuthorizationPolicy {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// The spec. Unknown fields are errors: a typo must not silently open a hole.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Gateway API targets: such policies are for waypoints, not for the node agent.
    #[serde(default)]
    pub target_ref: Option<serde_yaml_ng::Value>,
    /// See `target_ref`.
    #[serde(default)]
    pub target_refs: Option<serde_yaml_ng::Value>,
    /// ALLOW (default), DENY, AUDIT or CUSTOM.
    #[serde(default)]
    pub action: Action,
    /// External authorizer of CUSTOM policies.
    #[serde(default)]
    pub provider: Option<serde_yaml_ng::Value>,
    /// Rules; none means the policy matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Policy actions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow matches (and deny the rest, once any ALLOW applies).
    #[default]
    Allow,
    /// Deny matches.
    Deny,
    /// Report matches.
    Audit,
    /// External authorization (not supported).
    Custom,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
            Self::Custom => "CUSTOM",
        })
    }
}

/// One rule.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Sources; any may match.
    #[serde(default)]
    pub from: Option<Vec<From>>,
    /// Operations; any may match.
    #[serde(default)]
    pub to: Option<Vec<To>>,
    /// Conditions; all must match.
    #[serde(default)]
    pub when: Option<Vec<Condition>>,
}

/// `from:` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// `source:` fields.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities (`cluster.local/ns/x/sa/y`).
    pub principals: Option<Vec<String>>,
    /// Negated principals.
    pub not_principals: Option<Vec<String>>,
    /// JWT principals (HTTP only).
    pub request_principals: Option<Vec<String>>,
    /// Negated JWT principals (HTTP only).
    pub not_request_principals: Option<Vec<String>>,
    /// Namespaces of the peer identity.
    pub namespaces: Option<Vec<String>>,
    /// Negated namespaces.
    pub not_namespaces: Option<Vec<String>>,
    /// Source IPs or CIDRs.
    pub ip_blocks: Option<Vec<String>>,
    /// Negated source IPs.
    pub not_ip_blocks: Option<Vec<String>>,
    /// Original client IPs behind HTTP proxies (HTTP only).
    pub remote_ip_blocks: Option<Vec<String>>,
    /// Negated remote IPs (HTTP only).
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

/// `to:` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// `operation:` fields.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Destination ports.
    pub ports: Option<Vec<Port>>,
    /// Negated ports.
    pub not_ports: Option<Vec<Port>>,
    /// Hosts (HTTP only).
    pub hosts: Option<Vec<String>>,
    /// Negated hosts (HTTP only).
    pub not_hosts: Option<Vec<String>>,
    /// Methods (HTTP only).
    pub methods: Option<Vec<String>>,
    /// Negated methods (HTTP only).
    pub not_methods: Option<Vec<String>>,
    /// Paths (HTTP only).
    pub paths: Option<Vec<String>>,
    /// Negated paths (HTTP only).
    pub not_paths: Option<Vec<String>>,
}

/// `when:` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// Attribute, e.g. `source.ip`.
    pub key: String,
    /// Values; any may match.
    pub values: Option<Vec<String>>,
    /// Negated values.
    pub not_values: Option<Vec<String>>,
}

/// What is known about a connection when it is authorized.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnectionInput {
    /// Verified peer principal (`td/ns/x/sa/y`), none for plaintext.
    pub principal: Option<String>,
    /// Namespace of the peer principal.
    pub namespace: Option<String>,
    /// Source IP.
    pub source_ip: IpAddr,
    /// Original destination.
    pub destination: SocketAddr,
}

/// The decision for one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Whether it may pass.
    pub allowed: bool,
    /// The deciding policy (`namespace/name`), if a policy decided.
    pub policy: Option<String>,
    /// Why, in words.
    pub reason: String,
    /// AUDIT policies that matched.
    pub audit: Vec<String>,
}

/// Whether an Istio string pattern (exact, `x*`, `*x`, `*`) matches `value`.
pub fn pattern_matches(pattern: &str, value: &str) -> bool {
    StringMatch::new(pattern).matches(value)
}

/// A string matcher as Istio writes them.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StringMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StringMatch {
    fn new(value: &str) -> Self {
        if value == "*" {
            Self::Any
        } else if let Some(prefix) = value.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else if let Some(suffix) = value.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else {
            Self::Exact(value.to_owned())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(s) => value == s,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

/// An IP block: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr =
            addr.trim().parse().map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// One compiled match condition.
#[derive(Clone, Debug)]
enum Match {
    Principal(Vec<StringMatch>),
    NotPrincipal(Vec<StringMatch>),
    Namespace(Vec<StringMatch>),
    NotNamespace(Vec<StringMatch>),
    SourceIp(Vec<Cidr>),
    NotSourceIp(Vec<Cidr>),
    DestinationIp(Vec<Cidr>),
    NotDestinationIp(Vec<Cidr>),
    Port(Vec<u16>),
    NotPort(Vec<u16>),
}

impl Match {
    fn eval(&self, c: &ConnectionInput) -> bool {
        let any_str = |ms: &[StringMatch], v: &Option<String>| {
            v.as_deref().is_some_and(|v| ms.iter().any(|m| m.matches(v)))
        };
        match self {
            Self::Principal(ms) => any_str(ms, &c.principal),
            Self::NotPrincipal(ms) => !any_str(ms, &c.principal),
            Self::Namespace(ms) => any_str(ms, &c.namespace),
            Self::NotNamespace(ms) => !any_str(ms, &c.namespace),
            Self::SourceIp(cidrs) => cidrs.iter().any(|n| n.contains(c.source_ip)),
            Self::NotSourceIp(cidrs) => !cidrs.iter().any(|n| n.contains(c.source_ip)),
            Self::DestinationIp(cidrs) => cidrs.iter().any(|n| n.contains(c.destination.ip())),
            Self::NotDestinationIp(cidrs) => !cidrs.iter().any(|n| n.contains(c.destination.ip())),
            Self::Port(ports) => ports.contains(&c.destination.port()),
            Self::NotPort(ports) => !ports.contains(&c.destination.port()),
        }
    }
}

/// A compiled rule: `from` alternatives × `to` alternatives × `when` conditions, holding only
/// the L4 conditions.
#[derive(Clone, Debug)]
struct CompiledRule {
    /// Any of these (each: all of its matches); empty means any source.
    from: Vec<Vec<Match>>,
    /// Any of these; empty means any operation.
    to: Vec<Vec<Match>>,
    /// All of these.
    when: Vec<Match>,
    /// The rule used an HTTP attribute somewhere (left out of the lists above).
    http: bool,
}

impl CompiledRule {
    /// Whether the rule matches in a policy with `action`. A rule that used HTTP attributes
    /// matches nothing in ALLOW and AUDIT policies, and matches on its L4 conditions alone in a
    /// DENY policy (both stricter than written).
    fn matches(&self, c: &ConnectionInput, action: Action) -> bool {
        if self.http && action != Action::Deny {
            return false;
        }
        let all = |ms: &[Match]| ms.iter().all(|m| m.eval(c));
        (self.from.is_empty() || self.from.iter().any(|s| all(s)))
            && (self.to.is_empty() || self.to.iter().any(|o| all(o)))
            && all(&self.when)
    }
}

/// A policy ready for evaluation.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    /// `namespace/name`.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Action.
    pub action: Action,
    /// Selector (none: the whole namespace, or the mesh for the root namespace).
    pub selector: Option<WorkloadSelector>,
    rules: Vec<CompiledRule>,
    /// Conditions this node agent cannot evaluate, for warnings and `ambit policies`.
    pub unsupported: Vec<String>,
    /// Number of rules.
    pub rule_count: usize,
    /// The principal patterns the policy names, for explanations.
    pub principals: Vec<String>,
}

impl CompiledPolicy {
    /// A DENY that matches every request to the workloads `selector` selects (or to the whole
    /// namespace): what stands in for a policy that could not be read, so that a mistake closes
    /// rather than opens.
    pub fn deny_all(namespace: &str, name: &str, selector: Option<WorkloadSelector>) -> Self {
        Self {
            name: format!("{namespace}/{name}"),
            namespace: namespace.to_owned(),
            action: Action::Deny,
            selector: selector.filter(|s| !s.match_labels.is_empty()),
            rules: vec![CompiledRule { from: Vec::new(), to: Vec::new(), when: Vec::new(), http: false }],
            unsupported: Vec::new(),
            rule_count: 1,
            principals: Vec::new(),
        }
    }
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.metadata.namespace.as_deref().unwrap_or("default"), self.metadata.name)
    }

    /// Whether the policy is for a waypoint (Gateway API `targetRef(s)`), not the node agent.
    pub fn targets_waypoint(&self) -> bool {
        self.spec.target_ref.is_some() || self.spec.target_refs.is_some()
    }

    /// Checks and compiles the policy; errors name the field.
    pub fn compile(&self) -> Result<CompiledPolicy, String> {
        if self.spec.action == Action::Custom {
            return Err("spec.action CUSTOM (external authorization) is not supported by ambit".into());
        }
        if self.spec.provider.is_some() {
            return Err("spec.provider is only valid with action CUSTOM".into());
        }
        let mut unsupported = Vec::new();
        let mut rules = Vec::new();
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            let mut from = Vec::new();
            for (j, f) in rule.from.iter().flatten().enumerate() {
                from.push(compile_source(&f.source, &format!("{at}.from[{j}].source"), &mut unsupported)?);
            }
            let mut to = Vec::new();
            for (j, t) in rule.to.iter().flatten().enumerate() {
                to.push(compile_operation(
                    &t.operation,
                    &format!("{at}.to[{j}].operation"),
                    &mut unsupported,
                )?);
            }
            let mut when = Vec::new();
            for (j, c) in rule.when.iter().flatten().enumerate() {
                when.extend(compile_condition(c, &format!("{at}.when[{j}]"), &mut unsupported)?);
            }
            // Each compile_* call above noted its HTTP attributes under this rule's path.
            let http = unsupported.iter().any(|field| field.starts_with(&format!("{at}.")));
            rules.push(CompiledRule { from, to, when, http });
        }
        let principals = self
            .spec
            .rules
            .iter()
            .flat_map(|r| {
                let from = r.from.iter().flatten().flat_map(|f| f.source.principals.iter().flatten());
                let when = r
                    .when
                    .iter()
                    .flatten()
                    .filter(|c| c.key == "source.principal")
                    .flat_map(|c| c.values.iter().flatten());
                from.chain(when).cloned().collect::<Vec<_>>()
            })
            .collect();
        Ok(CompiledPolicy {
            principals,
            name: self.name(),
            namespace: self.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            action: self.spec.action,
            selector: self.spec.selector.clone().filter(|s| !s.match_labels.is_empty()),
            rule_count: rules.len(),
            rules,
            unsupported,
        })
    }
}

fn strings(values: &Option<Vec<String>>) -> Option<Vec<StringMatch>> {
    values.as_ref().map(|vs| vs.iter().map(|v| StringMatch::new(v)).collect())
}

fn cidrs(values: &Option<Vec<String>>, at: &str) -> Result<Option<Vec<Cidr>>, String> {
    values
        .as_ref()
        .map(|vs| {
            vs.iter()
                .enumerate()
                .map(|(i, v)| Cidr::parse(v).map_err(|e| format!("{at}[{i}]: {e}")))
                .collect()
        })
        .transpose()
}

fn compile_source(s: &Source, at: &str, unsupported: &mut Vec<String>) -> Result<Vec<Match>, String> {
    let mut ms = Vec::new();
    ms.extend(strings(&s.principals).map(Match::Principal));
    ms.extend(strings(&s.not_principals).map(Match::NotPrincipal));
    ms.extend(strings(&s.namespaces).map(Match::Namespace));
    ms.extend(strings(&s.not_namespaces).map(Match::NotNamespace));
    ms.extend(cidrs(&s.ip_blocks, &format!("{at}.ipBlocks"))?.map(Match::SourceIp));
    ms.extend(cidrs(&s.not_ip_blocks, &format!("{at}.notIpBlocks"))?.map(Match::NotSourceIp));
    // Still checked for syntax: a typo in a field that is ignored today is still a typo.
    cidrs(&s.remote_ip_blocks, &format!("{at}.remoteIpBlocks"))?;
    cidrs(&s.not_remote_ip_blocks, &format!("{at}.notRemoteIpBlocks"))?;
    for (field, present) in [
        ("remoteIpBlocks", s.remote_ip_blocks.is_some()),
        ("notRemoteIpBlocks", s.not_remote_ip_blocks.is_some()),
        ("requestPrincipals", s.request_principals.is_some()),
        ("notRequestPrincipals", s.not_request_principals.is_some()),
    ] {
        if present {
            unsupported.push(format!("{at}.{field}"));
        }
    }
    Ok(ms)
}

fn compile_operation(o: &Operation, at: &str, unsupported: &mut Vec<String>) -> Result<Vec<Match>, String> {
    let mut ms = Vec::new();
    ms.extend(o.ports.as_ref().map(|ps| Match::Port(ps.iter().map(|p| p.0).collect())));
    ms.extend(o.not_ports.as_ref().map(|ps| Match::NotPort(ps.iter().map(|p| p.0).collect())));
    for (field, present) in [
        ("hosts", o.hosts.is_some()),
        ("notHosts", o.not_hosts.is_some()),
        ("methods", o.methods.is_some()),
        ("notMethods", o.not_methods.is_some()),
        ("paths", o.paths.is_some()),
        ("notPaths", o.not_paths.is_some()),
    ] {
        if present {
            unsupported.push(format!("{at}.{field}"));
        }
    }
    Ok(ms)
}

fn compile_condition(c: &Condition, at: &str, unsupported: &mut Vec<String>) -> Result<Vec<Match>, String> {
    if c.values.is_none() && c.not_values.is_none() {
        return Err(format!("{at}: needs values or notValues"));
    }
    let ports = |vs: &Option<Vec<String>>| -> Result<Option<Vec<u16>>, String> {
        vs.as_ref()
            .map(|vs| {
                vs.iter()
                    .map(|v| {
                        v.parse::<u16>()
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| format!("{at}: {v:?} is not a port"))
                    })
                    .collect()
            })
            .transpose()
    };
    let mut ms = Vec::new();
    match c.key.as_str() {
        "source.principal" => {
            ms.extend(strings(&c.values).map(Match::Principal));
            ms.extend(strings(&c.not_values).map(Match::NotPrincipal));
        }
        "source.namespace" => {
            ms.extend(strings(&c.values).map(Match::Namespace));
            ms.extend(strings(&c.not_values).map(Match::NotNamespace));
        }
        "source.ip" => {
            ms.extend(cidrs(&c.values, &format!("{at}.values"))?.map(Match::SourceIp));
            ms.extend(cidrs(&c.not_values, &format!("{at}.notValues"))?.map(Match::NotSourceIp));
        }
        "destination.ip" => {
            ms.extend(cidrs(&c.values, &format!("{at}.values"))?.map(Match::DestinationIp));
            ms.extend(cidrs(&c.not_values, &format!("{at}.notValues"))?.map(Match::NotDestinationIp));
        }
        "destination.port" => {
            ms.extend(ports(&c.values)?.map(Match::Port));
            ms.extend(ports(&c.not_values)?.map(Match::NotPort));
        }
        key => {
            unsupported.push(format!("{at}.key {key}"));
        }
    }
    Ok(ms)
}

impl CompiledPolicy {
    /// Namespace and name, as the snapshot keys it.
    pub fn key(&self) -> ObjectKey {
        let name = self.name.split_once('/').map_or(self.name.as_str(), |(_, name)| name);
        ObjectKey { namespace: self.namespace.clone(), name: name.to_owned() }
    }

    /// Whether the policy applies to `workload`, given Istio's root namespace.
    pub fn applies_to(&self, workload: &Workload, root_namespace: &str) -> bool {
        (self.namespace == workload.key.namespace || self.namespace == root_namespace)
            && self.selector.as_ref().is_none_or(|s| s.matches(&workload.labels))
    }

    /// The index of the first rule that matches the connection.
    fn matching_rule(&self, c: &ConnectionInput) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(c, self.action))
    }

    /// One line per HTTP attribute the policy uses, saying what ambit enforces instead; for the
    /// warning at load and `ambit policies`.
    pub fn http_warnings(&self) -> impl Iterator<Item = String> + '_ {
        let effect = match self.action {
            Action::Deny => "this DENY rule is enforced without its HTTP conditions",
            _ => "this rule is dropped as a whole and matches nothing",
        };
        self.unsupported.iter().map(move |field| {
            format!(
                "{field} is an HTTP attribute, which the node agent cannot see: {effect} (stricter than written; enforce HTTP rules with a waypoint)"
            )
        })
    }
}

/// Evaluates the policies that apply to a workload (as [`CompiledPolicy::applies_to`] selects
/// them) for one connection.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a CompiledPolicy> + Clone,
    c: &ConnectionInput,
) -> Verdict {
    let mut audit = Vec::new();
    for p in policies.clone() {
        if p.action == Action::Audit && p.matching_rule(c).is_some() {
            audit.push(p.name.clone());
        }
    }
    for p in policies.clone() {
        if p.action == Action::Deny
            && let Some(rule) = p.matching_rule(c)
        {
            return Verdict {
                allowed: false,
                policy: Some(p.name.clone()),
                reason: format!("denied by DENY policy {} (rule {})", p.name, rule + 1),
                audit,
            };
        }
    }
    let allows: Vec<&CompiledPolicy> = policies.into_iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() {
        return Verdict {
            allowed: true,
            policy: None,
            reason: "allowed: no ALLOW policy applies to the destination".into(),
            audit,
        };
    }
    for p in &allows {
        if let Some(rule) = p.matching_rule(c) {
            return Verdict {
                allowed: true,
                policy: Some(p.name.clone()),
                reason: format!("allowed by ALLOW policy {} (rule {})", p.name, rule + 1),
                audit,
            };
        }
    }
    let names: Vec<&str> = allows.iter().map(|p| p.name.as_str()).collect();
    Verdict {
        allowed: false,
        policy: None,
        reason: format!("denied: no ALLOW policy matched (ALLOW policies applying: {})", names.join(", ")),
        audit,
    }
}

/// AuthorizationPolicies with the ones that apply to each workload. A snapshot shares what did
/// not change with the one before it (cloning is cheap): a changed policy touches only the
/// workloads it selects or selected, a changed workload only its own list, and each workload's
/// memo of verdicts lives as long as its list of policies does.
#[derive(Clone, Debug, Default)]
pub struct AuthorizationPolicies {
    policies: OrdMap<ObjectKey, Arc<CompiledPolicy>>,
    /// Only workloads at least one policy applies to.
    by_workload: OrdMap<ObjectKey, Arc<Applying>>,
}

/// The policies that apply to one workload, by name, and the verdicts they gave.
#[derive(Debug, Default)]
struct Applying {
    policies: Vec<Arc<CompiledPolicy>>,
    memo: std::sync::Mutex<std::collections::HashMap<ConnectionInput, Verdict>>,
}

impl Applying {
    fn new(mut policies: Vec<Arc<CompiledPolicy>>) -> Arc<Self> {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Arc::new(Self { policies, memo: Default::default() })
    }

    fn same_policies(&self, other: &[Arc<CompiledPolicy>]) -> bool {
        self.policies.len() == other.len() && self.policies.iter().zip(other).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// Memoized verdicts kept per workload before its memo starts over.
const MEMO_LIMIT: usize = 1024;

impl AuthorizationPolicies {
    /// Indexes compiled policies for `workloads`, given the root namespace.
    pub fn new<'a>(
        policies: Vec<CompiledPolicy>,
        workloads: impl Iterator<Item = &'a Workload>,
        root_namespace: &str,
    ) -> Self {
        let mut this = Self::default();
        for p in policies {
            this.policies.insert(p.key(), Arc::new(p));
        }
        for w in workloads {
            this.workload_changed(&w.key, Some(w), root_namespace);
        }
        this
    }

    /// The policies that apply to `workload`.
    pub fn for_workload(&self, workload: &ObjectKey) -> impl Iterator<Item = &CompiledPolicy> + Clone {
        self.by_workload.get(workload).into_iter().flat_map(|a| a.policies.iter()).map(|p| &**p)
    }

    /// Decides a connection to `workload`.
    pub fn evaluate(&self, workload: &ObjectKey, c: &ConnectionInput) -> Verdict {
        let Some(applying) = self.by_workload.get(workload) else {
            return evaluate(std::iter::empty(), c);
        };
        if let Some(verdict) = applying.memo.lock().unwrap_or_else(|e| e.into_inner()).get(c) {
            return verdict.clone();
        }
        let verdict = evaluate(applying.policies.iter().map(|p| &**p), c);
        let mut memo = applying.memo.lock().unwrap_or_else(|e| e.into_inner());
        if memo.len() >= MEMO_LIMIT {
            memo.clear();
        }
        memo.insert(c.clone(), verdict.clone());
        verdict
    }

    /// Verdicts memoized for `workload`.
    #[cfg(test)]
    pub(crate) fn memo_len(&self, workload: &ObjectKey) -> usize {
        self.by_workload.get(workload).map_or(0, |a| a.memo.lock().unwrap_or_else(|e| e.into_inner()).len())
    }

    /// Every policy, by namespace and name.
    pub fn all(&self) -> impl Iterator<Item = &CompiledPolicy> {
        self.policies.values().map(|p| &**p)
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether a policy is in force at `key`.
    pub(crate) fn contains(&self, key: &ObjectKey) -> bool {
        self.policies.contains_key(key)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Replaces (or with `None` removes) the policy `key`, updating the lists of the workloads
    /// it selected or selects now; `workloads` is the snapshot's, `skip` those about to be
    /// recomputed whole anyway.
    pub(crate) fn policy_changed(
        &mut self,
        key: &ObjectKey,
        policy: Option<Arc<CompiledPolicy>>,
        workloads: &OrdMap<ObjectKey, Arc<Workload>>,
        skip: &impl Fn(&ObjectKey) -> bool,
        root_namespace: &str,
    ) {
        let new = policy;
        let old = match &new {
            Some(p) => self.policies.insert(key.clone(), p.clone()),
            None => self.policies.remove(key),
        };
        if old.is_none() && new.is_none() {
            return;
        }
        // A policy of the root namespace may select any workload; another only its own namespace's.
        let scope: Box<dyn Iterator<Item = &Arc<Workload>>> = if key.namespace == root_namespace {
            Box::new(workloads.values())
        } else {
            Box::new(in_namespace(workloads, &key.namespace).map(|(_, w)| w))
        };
        for w in scope {
            if skip(&w.key) {
                continue;
            }
            let current = self.by_workload.get(&w.key);
            let had = current
                .is_some_and(|a| a.policies.iter().any(|p| old.as_ref().is_some_and(|o| Arc::ptr_eq(p, o))));
            let applies = new.as_ref().is_some_and(|p| p.applies_to(w, root_namespace));
            if !had && !applies {
                continue;
            }
            let mut list: Vec<Arc<CompiledPolicy>> = current
                .into_iter()
                .flat_map(|a| a.policies.iter())
                .filter(|p| !old.as_ref().is_some_and(|o| Arc::ptr_eq(p, o)))
                .cloned()
                .collect();
            list.extend(new.iter().filter(|_| applies).cloned());
            self.set_list(&w.key, list);
        }
    }

    /// Recomputes the list of `key` (a workload that arrived, changed, or with `None` went).
    pub(crate) fn workload_changed(
        &mut self,
        key: &ObjectKey,
        workload: Option<&Workload>,
        root_namespace: &str,
    ) {
        let Some(w) = workload else {
            self.by_workload.remove(key);
            return;
        };
        let mut list: Vec<Arc<CompiledPolicy>> = in_namespace(&self.policies, &w.key.namespace)
            .map(|(_, p)| p)
            .chain(
                (w.key.namespace != root_namespace)
                    .then(|| in_namespace(&self.policies, root_namespace).map(|(_, p)| p))
                    .into_iter()
                    .flatten(),
            )
            .filter(|p| p.applies_to(w, root_namespace))
            .cloned()
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        // Unchanged: keep the memo.
        if self.by_workload.get(key).is_some_and(|a| a.same_policies(&list)) {
            return;
        }
        self.set_list(key, list);
    }

    fn set_list(&mut self, key: &ObjectKey, list: Vec<Arc<CompiledPolicy>>) {
        if list.is_empty() {
            self.by_workload.remove(key);
        } else {
            self.by_workload.insert(key.clone(), Applying::new(list));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "istio-system";

    fn workload(ns: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
        crate::schema::test_workload(ns, name, labels)
    }

    fn policy(yaml: &str) -> CompiledPolicy {
        let p: AuthorizationPolicy = serde_yaml_ng::from_str(yaml).expect("valid YAML");
        p.compile().expect("valid policy")
    }

    fn mtls(principal: &str, src: &str, dst: &str) -> ConnectionInput {
        let namespace = principal.split('/').nth(2).map(str::to_owned);
        ConnectionInput {
            principal: Some(principal.into()),
            namespace,
            source_ip: src.parse().expect("ip"),
            destination: dst.parse().expect("addr"),
        }
    }

    fn plaintext(src: &str, dst: &str) -> ConnectionInput {
        ConnectionInput {
            principal: None,
            namespace: None,
            source_ip: src.parse().expect("ip"),
            destination: dst.parse().expect("addr"),
        }
    }

    fn decide(policies: &[&str], w: &Workload, c: &ConnectionInput) -> Verdict {
        let compiled: Vec<CompiledPolicy> = policies.iter().map(|y| policy(y)).collect();
        AuthorizationPolicies::new(compiled, [w].into_iter(), ROOT).evaluate(&w.key, c)
    }

    const FRONTEND: &str = "cluster.local/ns/shop/sa/frontend-sa";
    const BACKEND: &str = "cluster.local/ns/shop/sa/backend-sa";
    const DST: &str = "10.0.0.3:8080";

    #[test]
    fn istio_reference_semantics() {
        let backend = workload("shop", "backend", &[("app", "backend")]);
        let allow_frontend = "metadata: {name: backend-allow, namespace: shop}\nspec:\n  selector: {matchLabels: {app: backend}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/shop/sa/frontend-sa]}";
        let deny_all = "metadata: {name: deny-all, namespace: shop}\nspec: {}";
        let allow_all = "metadata: {name: allow-all, namespace: shop}\nspec: {rules: [{}]}";
        let deny_everything =
            "metadata: {name: deny-everything, namespace: shop}\nspec: {action: DENY, rules: [{}]}";
        let deny_no_rules = "metadata: {name: deny-no-rules, namespace: shop}\nspec: {action: DENY}";
        let deny_plaintext = "metadata: {name: strict, namespace: istio-system}\nspec:\n  action: DENY\n  rules: [{from: [{source: {notPrincipals: ['*']}}]}]";
        let other_ns = "metadata: {name: x, namespace: other}\nspec: {}";
        let other_selector =
            "metadata: {name: db-only, namespace: shop}\nspec: {selector: {matchLabels: {app: db}}}";

        // (policies, connection, allowed, deciding policy)
        let table: Vec<(Vec<&str>, ConnectionInput, bool, Option<&str>)> = vec![
            (vec![], plaintext("10.0.0.9", DST), true, None),
            (vec![allow_frontend], mtls(FRONTEND, "10.0.0.2", DST), true, Some("shop/backend-allow")),
            (vec![allow_frontend], mtls(BACKEND, "10.0.0.2", DST), false, None),
            (vec![allow_frontend], plaintext("10.0.0.2", DST), false, None),
            (vec![deny_all], mtls(FRONTEND, "10.0.0.2", DST), false, None),
            (vec![allow_all], plaintext("10.0.0.2", DST), true, Some("shop/allow-all")),
            (vec![allow_all, deny_all], plaintext("10.0.0.2", DST), true, Some("shop/allow-all")),
            (
                vec![allow_all, deny_everything],
                mtls(FRONTEND, "10.0.0.2", DST),
                false,
                Some("shop/deny-everything"),
            ),
            (vec![deny_no_rules], mtls(FRONTEND, "10.0.0.2", DST), true, None),
            (
                vec![allow_frontend, deny_plaintext],
                plaintext("10.0.0.2", DST),
                false,
                Some("istio-system/strict"),
            ),
            (vec![allow_all, deny_plaintext], mtls(FRONTEND, "10.0.0.2", DST), true, Some("shop/allow-all")),
            (vec![other_ns], plaintext("10.0.0.2", DST), true, None),
            (vec![other_selector], plaintext("10.0.0.2", DST), true, None),
        ];
        for (i, (policies, conn, allowed, by)) in table.into_iter().enumerate() {
            let v = decide(&policies, &backend, &conn);
            assert_eq!(v.allowed, allowed, "case {i}: {v:?}");
            assert_eq!(v.policy.as_deref(), by, "case {i}: {v:?}");
        }
    }

    #[test]
    fn every_source_and_operation_field() {
        let w = workload("shop", "backend", &[]);
        let one = |source: &str| {
            format!(
                "metadata: {{name: p, namespace: shop}}\nspec:\n  rules:\n  - from:\n    - source: {source}"
            )
        };
        let allowed = |source: &str, c: &ConnectionInput| decide(&[&one(source)], &w, c).allowed;
        let f = mtls(FRONTEND, "10.1.2.3", DST);
        let b = mtls(BACKEND, "192.168.0.1", DST);
        let p = plaintext("10.1.2.3", DST);

        assert!(allowed("{principals: ['cluster.local/ns/shop/sa/frontend-sa']}", &f));
        assert!(!allowed("{principals: ['cluster.local/ns/shop/sa/frontend-sa']}", &b));
        assert!(allowed("{principals: ['cluster.local/ns/shop/*']}", &b), "prefix");
        assert!(allowed("{principals: ['*/sa/backend-sa']}", &b), "suffix");
        assert!(
            allowed("{principals: ['*']}", &b) && !allowed("{principals: ['*']}", &p),
            "* needs a principal"
        );
        assert!(
            !allowed("{notPrincipals: ['*']}", &f) && allowed("{notPrincipals: ['*']}", &p),
            "plaintext has none"
        );
        assert!(allowed("{notPrincipals: ['cluster.local/ns/shop/sa/frontend-sa']}", &b));
        assert!(allowed("{namespaces: [shop]}", &f) && !allowed("{namespaces: [shop]}", &p));
        assert!(!allowed("{namespaces: [other]}", &f) && allowed("{notNamespaces: [other]}", &f));
        assert!(allowed("{notNamespaces: [shop]}", &p), "plaintext has no namespace");
        assert!(allowed("{ipBlocks: ['10.0.0.0/8']}", &f) && !allowed("{ipBlocks: ['10.0.0.0/8']}", &b));
        assert!(allowed("{ipBlocks: ['10.1.2.3']}", &p) && !allowed("{notIpBlocks: ['10.1.2.3']}", &p));
        // remoteIpBlocks is the client behind HTTP proxies, not the L4 source: an HTTP attribute.
        assert!(
            !allowed("{remoteIpBlocks: ['10.1.0.0/16']}", &f)
                && !allowed("{notRemoteIpBlocks: ['10.9.0.0/16']}", &f)
        );
        assert!(allowed(
            "{principals: ['cluster.local/ns/shop/sa/frontend-sa'], ipBlocks: ['10.0.0.0/8']}",
            &f
        ));
        assert!(
            !allowed(
                "{principals: ['cluster.local/ns/shop/sa/frontend-sa'], ipBlocks: ['192.168.0.0/16']}",
                &f
            ),
            "fields AND"
        );

        let op = |operation: &str| {
            format!(
                "metadata: {{name: p, namespace: shop}}\nspec:\n  rules:\n  - to:\n    - operation: {operation}"
            )
        };
        let on = |port: u16| mtls(FRONTEND, "10.1.2.3", &format!("10.0.0.3:{port}"));
        assert!(decide(&[&op("{ports: ['8080', 9090]}")], &w, &on(9090)).allowed);
        assert!(!decide(&[&op("{ports: ['8080']}")], &w, &on(9091)).allowed);
        assert!(decide(&[&op("{notPorts: ['8080']}")], &w, &on(9091)).allowed);
        assert!(!decide(&[&op("{notPorts: ['8080']}")], &w, &on(8080)).allowed);

        let when = |cond: &str| {
            format!("metadata: {{name: p, namespace: shop}}\nspec:\n  rules:\n  - when:\n    - {cond}")
        };
        assert!(
            decide(&[&when("{key: source.principal, values: ['cluster.local/ns/shop/*']}")], &w, &f).allowed
        );
        assert!(!decide(&[&when("{key: source.namespace, notValues: [shop]}")], &w, &f).allowed);
        assert!(decide(&[&when("{key: source.ip, values: ['10.1.0.0/16']}")], &w, &f).allowed);
        assert!(decide(&[&when("{key: destination.ip, values: ['10.0.0.3']}")], &w, &f).allowed);
        assert!(decide(&[&when("{key: destination.port, values: ['8080']}")], &w, &f).allowed);
        assert!(!decide(&[&when("{key: destination.port, notValues: ['8080']}")], &w, &f).allowed);
    }

    #[test]
    fn http_only_fields_are_stricter_both_ways() {
        let w = workload("shop", "backend", &[]);
        let c = mtls(FRONTEND, "10.1.2.3", DST);
        let allow_get = policy(
            "metadata: {name: get, namespace: shop}\nspec:\n  rules:\n  - from: [{source: {principals: ['*']}}]\n    to: [{operation: {methods: [GET]}}]",
        );
        assert_eq!(allow_get.unsupported, ["spec.rules[0].to[0].operation.methods"]);
        let v = evaluate([&allow_get], &c);
        assert!(!v.allowed, "an ALLOW rule with methods matches nothing: {v:?}");
        let deny_post = policy(
            "metadata: {name: post, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n    to: [{operation: {methods: [POST], paths: ['/admin']}}]",
        );
        assert!(!evaluate([&deny_post], &c).allowed, "a DENY rule ignores methods and paths");
        assert!(
            evaluate([&deny_post], &mtls("cluster.local/ns/other/sa/x", "10.1.2.3", DST)).allowed,
            "the rest of the rule still counts"
        );
        let jwt = policy(
            "metadata: {name: jwt, namespace: shop}\nspec:\n  rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]",
        );
        assert!(!evaluate([&jwt], &c).allowed);
        let _ = w;
    }

    /// istiod's ambient translation: one HTTP attribute anywhere in an ALLOW (or AUDIT) rule
    /// drops the whole rule, also when another entry of the same list is plain L4; a DENY rule
    /// keeps its L4 parts and ignores the HTTP ones.
    #[test]
    fn an_http_attribute_drops_the_whole_allow_rule() {
        let c = mtls(FRONTEND, "10.1.2.3", DST);
        let rule = |action: &str, rule: &str| {
            policy(&format!(
                "metadata: {{name: p, namespace: shop}}\nspec:\n  action: {action}\n  rules:\n  - {rule}"
            ))
        };
        let mixed = [
            // from: an HTTP entry next to an L4 entry that matches.
            "from: [{source: {remoteIpBlocks: ['10.0.0.0/8']}}, {source: {principals: ['*']}}]",
            "from: [{source: {requestPrincipals: ['*']}}, {source: {namespaces: [shop]}}]",
            // to: likewise.
            "to: [{operation: {methods: [GET]}}, {operation: {ports: ['8080']}}]",
            // when: an HTTP key next to an L4 condition that holds.
            "when: [{key: remote.ip, values: ['10.1.2.3']}, {key: source.namespace, values: [shop]}]",
            "when: [{key: source.ip, values: ['10.1.2.3']}, {key: 'request.headers[x]', values: [y]}]",
            // The L4 parts alone would match.
            "{from: [{source: {principals: ['*']}}], to: [{operation: {ports: ['8080'], paths: ['/']}}]}",
        ];
        for r in mixed {
            let allow = rule("ALLOW", r);
            assert!(!allow.unsupported.is_empty(), "{r}: the HTTP attribute is reported");
            assert!(allow.http_warnings().all(|w| w.contains("dropped")), "{r}");
            assert!(!evaluate([&allow], &c).allowed, "ALLOW {r} must match nothing");
            let audit = rule("AUDIT", r);
            assert!(evaluate([&audit], &c).audit.is_empty(), "AUDIT {r} must match nothing");
            let deny = rule("DENY", r);
            assert!(!evaluate([&deny], &c).allowed, "DENY {r} is enforced on its L4 parts");
        }
        // The same rules without the HTTP attribute allow: the control that the L4 parts match.
        for r in [
            "from: [{source: {principals: ['*']}}]",
            "to: [{operation: {ports: ['8080']}}]",
            "when: [{key: source.namespace, values: [shop]}]",
        ] {
            assert!(evaluate([&rule("ALLOW", r)], &c).allowed, "{r}");
        }
        // Another rule of the same policy still counts.
        let two = rule(
            "ALLOW",
            "from: [{source: {remoteIpBlocks: ['10.0.0.0/8']}}]\n  - from: [{source: {principals: ['*']}}]",
        );
        let v = evaluate([&two], &c);
        assert!(v.allowed && v.reason.contains("rule 2"), "{v:?}");
        // DENY: the L4 parts still decide who is denied.
        let deny = rule("DENY", "from: [{source: {remoteIpBlocks: ['10.0.0.0/8'], namespaces: [other]}}]");
        assert!(evaluate([&deny], &c).allowed, "a shop client is outside the rule's L4 part");
        assert!(!evaluate([&deny], &mtls("cluster.local/ns/other/sa/x", "10.1.2.3", DST)).allowed);
        assert!(deny.http_warnings().all(|w| w.contains("without its HTTP conditions")));
        // Still a syntax error when malformed, though ignored.
        let bad: AuthorizationPolicy = serde_yaml_ng::from_str(
            "metadata: {name: p}\nspec: {rules: [{from: [{source: {remoteIpBlocks: [nope]}}]}]}",
        )
        .expect("yaml");
        assert!(
            bad.compile().expect_err("bad CIDR").contains("spec.rules[0].from[0].source.remoteIpBlocks[0]")
        );
    }

    #[test]
    fn audit_never_decides() {
        let audit = policy("metadata: {name: audit, namespace: shop}\nspec: {action: AUDIT, rules: [{}]}");
        let v = evaluate([&audit], &plaintext("10.0.0.1", DST));
        assert!(v.allowed);
        assert_eq!(v.audit, ["shop/audit"]);
    }

    #[test]
    fn root_namespace_policies_apply_everywhere() {
        let mesh = policy("metadata: {name: mesh, namespace: istio-system}\nspec: {}");
        let scoped = policy(
            "metadata: {name: dbs, namespace: istio-system}\nspec: {selector: {matchLabels: {app: db}}}",
        );
        assert!(mesh.applies_to(&workload("shop", "a", &[]), ROOT));
        assert!(scoped.applies_to(&workload("shop", "a", &[("app", "db")]), ROOT));
        assert!(!scoped.applies_to(&workload("shop", "a", &[("app", "web")]), ROOT));
        let local = policy("metadata: {name: l, namespace: shop}\nspec: {}");
        assert!(!local.applies_to(&workload("other", "a", &[]), ROOT));
    }

    #[test]
    fn bad_policies_name_the_field() {
        let err = |yaml: &str| -> String {
            match serde_yaml_ng::from_str::<AuthorizationPolicy>(yaml) {
                Err(e) => e.to_string(),
                Ok(p) => p.compile().expect_err("invalid"),
            }
        };
        assert!(err("metadata: {name: p}\nspec: {action: ALOW}").contains("ALOW"));
        assert!(
            err("metadata: {name: p}\nspec: {rules: [{from: [{source: {principal: [x]}}]}]}")
                .contains("principal")
        );
        assert!(
            err("metadata: {name: p}\nspec: {rules: [{from: [{source: {ipBlocks: ['10.0.0.0/40']}}]}]}")
                .contains("spec.rules[0].from[0].source.ipBlocks[0]")
        );
        assert!(
            err("metadata: {name: p}\nspec: {rules: [{to: [{operation: {ports: ['http']}}]}]}")
                .contains("http")
        );
        assert!(
            err("metadata: {name: p}\nspec: {rules: [{when: [{key: source.ip}]}]}")
                .contains("spec.rules[0].when[0]")
        );
        assert!(err("metadata: {name: p}\nspec: {action: CUSTOM, provider: {name: x}}").contains("CUSTOM"));
    }

    /// A tiny deterministic generator: property tests without a framework.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    const SOURCES: &[&str] = &[
        "{principals: ['cluster.local/ns/shop/sa/frontend-sa']}",
        "{principals: ['cluster.local/ns/shop/*']}",
        "{notPrincipals: ['*']}",
        "{namespaces: [other]}",
        "{ipBlocks: ['10.0.0.0/24']}",
        "{notIpBlocks: ['10.0.0.2']}",
    ];
    const OPERATIONS: &[&str] =
        &["{ports: ['8080']}", "{notPorts: ['9090']}", "{methods: [GET]}", "{ports: ['9090']}"];

    fn random_policy(rng: &mut Rng, name: &str, action: &str, selector: &str) -> String {
        let mut rules = String::new();
        for _ in 0..(rng.next() % 3) {
            rules.push_str(&format!(
                "  - from: [{{source: {}}}]\n    to: [{{operation: {}}}]\n",
                rng.pick(SOURCES),
                rng.pick(OPERATIONS)
            ));
        }
        let rules = if rules.is_empty() { "  rules: []\n".to_owned() } else { format!("  rules:\n{rules}") };
        format!(
            "metadata: {{name: {name}, namespace: shop}}\nspec:\n  action: {action}\n  selector: {{matchLabels: {{app: {selector}}}}}\n{rules}"
        )
    }

    fn connections() -> Vec<ConnectionInput> {
        let mut out = Vec::new();
        for principal in [Some(FRONTEND), Some(BACKEND), Some("cluster.local/ns/other/sa/x"), None] {
            for src in ["10.0.0.2", "10.0.0.7", "10.9.9.9"] {
                for port in [8080, 9090] {
                    let dst = format!("10.0.0.3:{port}");
                    out.push(match principal {
                        Some(p) => mtls(p, src, &dst),
                        None => plaintext(src, &dst),
                    });
                }
            }
        }
        out
    }

    /// Adding an ALLOW policy selecting one workload never widens what another accepts, and
    /// adding a DENY never widens what any accepts.
    #[test]
    fn adding_policies_never_widens_elsewhere() {
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        let a = workload("shop", "a", &[("app", "a")]);
        let b = workload("shop", "b", &[("app", "b")]);
        let conns = connections();
        for round in 0..120 {
            let mut base = Vec::new();
            for i in 0..(rng.next() % 4) {
                let action = rng.pick(&["ALLOW", "DENY"]);
                let selector = rng.pick(&["a", "b"]);
                base.push(random_policy(&mut rng, &format!("base{i}"), action, selector));
            }
            let added_allow = random_policy(&mut rng, "zz-allow", "ALLOW", "a");
            let selector = rng.pick(&["a", "b"]);
            let added_deny = random_policy(&mut rng, "zz-deny", "DENY", selector);
            let refs =
                |extra: Option<&'_ String>| -> Vec<String> { base.iter().chain(extra).cloned().collect() };
            for c in &conns {
                let decide_with = |extra: Option<&String>, w: &Workload| {
                    let policies = refs(extra);
                    let policies: Vec<&str> = policies.iter().map(String::as_str).collect();
                    decide(&policies, w, c).allowed
                };
                let before_b = decide_with(None, &b);
                assert!(
                    before_b || !decide_with(Some(&added_allow), &b),
                    "round {round}: an ALLOW for a widened b: {added_allow}\n{base:?}\n{c:?}"
                );
                for w in [&a, &b] {
                    let before = decide_with(None, w);
                    assert!(
                        before || !decide_with(Some(&added_deny), w),
                        "round {round}: a DENY widened {}: {added_deny}\n{base:?}\n{c:?}",
                        w.key
                    );
                }
            }
        }
    }
}
