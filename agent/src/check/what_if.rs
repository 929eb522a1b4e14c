//! `ambit check --what-if FILE`: what candidate policies would do to the traffic the agent saw.
//! The candidate is the snapshot in force with FILE's objects added (or replacing those of the
//! same kind and name) and `--delete`d ones taken out; every kind of connection in the flow
//! history is decided again on both, by the same function the proxies run, and what changes is
//! reported. Nothing is applied: the candidate snapshot is built, read, and dropped.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    discovery::{DiscoveryError, local},
    policy::{Action, InboundDecision, Outcome},
    schema::{ObjectKey, Workload},
    state::{Change, Cluster, Kind},
    telemetry::{Security, history::HistoryEntry},
};

/// Why a what-if could not be answered. Nothing was applied either way.
#[derive(Debug, thiserror::Error)]
pub enum WhatIfError {
    /// FILE does not parse, holds something other than policies, or a policy twice.
    #[error(transparent)]
    File(#[from] DiscoveryError),
    /// A policy for a namespace the cluster does not have: nothing would select it.
    #[error(
        "{file}:{line}: {object}: namespace {namespace:?} does not exist in the cluster, so the policy would select nothing (mesh-wide policies go in the root namespace, {root})"
    )]
    UnknownNamespace {
        /// FILE.
        file: String,
        /// Line of the object.
        line: usize,
        /// `Kind namespace/name`.
        object: String,
        /// The namespace.
        namespace: String,
        /// Istio's root namespace, as the agent is configured.
        root: String,
    },
    /// `--delete` names no policy in force.
    #[error("--delete {0}: no PeerAuthentication or AuthorizationPolicy of that name is in force")]
    NothingToDelete(String),
    /// `--delete` is not `namespace/name`.
    #[error("--delete {0:?} is not namespace/name")]
    BadDelete(String),
}

/// What the CLI sends an agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WhatIfRequest {
    /// FILE's name, for errors (`-` is stdin).
    pub file: String,
    /// FILE's text.
    pub text: String,
    /// Policies to take out, `namespace/name` (of either kind).
    #[serde(default)]
    pub delete: Vec<String>,
    /// Replay only connections seen this many seconds back; all kept when absent.
    #[serde(default)]
    pub since_secs: Option<u64>,
}

/// A source of connections, as the report names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Source {
    /// `namespace/name` of the pod at the address, when there is one.
    pub pod: Option<String>,
    /// The verified SPIFFE ID; none for plaintext.
    pub identity: Option<String>,
    /// The addresses the connections came from.
    pub ips: Vec<IpAddr>,
}

/// Connections of one source to one destination port whose outcome the candidate changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shift {
    /// Who connected.
    pub source: Source,
    /// The destination pod, `namespace/name`.
    pub destination: String,
    /// The destination port.
    pub port: u16,
    /// `mutual_tls` or `plaintext`.
    pub security: Security,
    /// Connections seen.
    pub connections: u64,
    /// First and last seen, seconds since the epoch.
    pub first_seen: u64,
    /// See `first_seen`.
    pub last_seen: u64,
    /// What the policies in force decide.
    pub today: Outcome,
    /// What the candidate would decide.
    pub would: Outcome,
    /// What decides under the candidate: the policy (`namespace/name`), or the
    /// PeerAuthentication that makes mTLS STRICT; the AUDIT policies for `audited`.
    pub decided_by: Option<String>,
    /// The candidate's reason, in words.
    pub reason: String,
    /// Likely fixes, as `ambit check` gives them.
    pub hints: Vec<String>,
}

/// The answer of one agent, for the pods of its node.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WhatIfReport {
    /// The node that answered.
    pub node: String,
    /// FILE.
    pub file: String,
    /// What the candidate changes, e.g. `AuthorizationPolicy shop/db: added`.
    pub changes: Vec<String>,
    /// The window replayed, in seconds; all the history when absent.
    pub since_secs: Option<u64>,
    /// The agent keeps no history (`--flow-history 0`): nothing to replay.
    #[serde(default)]
    pub history_off: bool,
    /// Kinds of connection replayed (entries of the history).
    pub replayed: usize,
    /// Connections they stand for.
    pub connections: u64,
    /// Allowed today, refused or denied under the candidate.
    pub breaks: Vec<Shift>,
    /// Refused or denied today, allowed under the candidate.
    pub opens: Vec<Shift>,
    /// Outcome unchanged, newly matched by an AUDIT policy of the candidate.
    pub audited: Vec<Shift>,
    /// Kinds of connection whose outcome does not change.
    pub unchanged: usize,
    /// Kinds of connection whose destination pod is gone (not replayed).
    pub destination_gone: usize,
}

impl WhatIfReport {
    /// Whether some connection allowed today would be refused or denied: the exit code 1.
    pub fn breaks_traffic(&self) -> bool {
        !self.breaks.is_empty()
    }
}

/// The candidate snapshot for `request`, and what it changes; errors name FILE and line.
pub fn candidate(
    cluster: &Cluster,
    request: &WhatIfRequest,
    root_namespace: &str,
) -> Result<(Cluster, Vec<String>), WhatIfError> {
    let file = Path::new(&request.file);
    let mut changes = Vec::new();
    let mut said = Vec::new();
    for (line, key, change) in local::parse_policies(file, &request.text)? {
        let kind = change.kind();
        if !cluster.has_namespace(&key.namespace, root_namespace) {
            return Err(WhatIfError::UnknownNamespace {
                file: request.file.clone(),
                line,
                object: format!("{kind:?} {key}"),
                namespace: key.namespace.clone(),
                root: root_namespace.to_owned(),
            });
        }
        let how = if cluster.has_policy(kind, &key) { "replaced" } else { "added" };
        said.push(format!("{kind:?} {key}: {how}"));
        changes.push(change);
    }
    for name in &request.delete {
        let key = match name.split_once('/') {
            Some((namespace, n)) if !namespace.is_empty() && !n.is_empty() && !n.contains('/') => {
                ObjectKey { namespace: namespace.to_owned(), name: n.to_owned() }
            }
            _ => return Err(WhatIfError::BadDelete(name.clone())),
        };
        let kinds: Vec<Kind> = [Kind::PeerAuthentication, Kind::AuthorizationPolicy]
            .into_iter()
            .filter(|kind| cluster.has_policy(*kind, &key))
            .collect();
        if kinds.is_empty() {
            return Err(WhatIfError::NothingToDelete(name.clone()));
        }
        for kind in kinds {
            said.push(format!("{kind:?} {key}: deleted"));
            changes.push(Change::gone(kind, key.clone()));
        }
    }
    Ok((cluster.with(changes, root_namespace), said))
}

/// Replays `history` on the snapshot in force and on `candidate`, into `report`.
pub fn replay(
    cluster: &Cluster,
    candidate: &Cluster,
    history: &[HistoryEntry],
    root_namespace: &str,
    report: &mut WhatIfReport,
) {
    /// Destination, source pod, source identity (or address, outside the pods), port, outcomes.
    type Group = (String, Option<String>, Option<String>, u16, Outcome, Outcome);
    let mut groups: BTreeMap<Group, (List, Shift)> = BTreeMap::new();
    for entry in history {
        report.replayed += 1;
        report.connections += entry.connections;
        let (Some(now), Some(then)) =
            (cluster.workloads.get(&entry.destination), candidate.workloads.get(&entry.destination))
        else {
            report.destination_gone += 1;
            continue;
        };
        let input = &entry.input;
        let today = cluster.decide_inbound(now, input, root_namespace);
        let would = candidate.decide_inbound(then, input, root_namespace);
        let audit = |d: &InboundDecision| d.verdict().map(|v| v.audit.clone()).unwrap_or_default();
        let newly_audited =
            audit(&would).into_iter().filter(|p| !audit(&today).contains(p)).collect::<Vec<_>>();
        let (list, decided_by) = match (today.outcome(), would.outcome()) {
            (a, b) if a == b && newly_audited.is_empty() => {
                report.unchanged += 1;
                continue;
            }
            (a, b) if a == b => (List::Audited, Some(newly_audited.join(", "))),
            (Outcome::Allowed, _) => (List::Breaks, deciding(candidate, then, &would)),
            _ => (List::Opens, deciding(candidate, then, &would)),
        };
        let source_pod = cluster.workload_by_ip(input.source_ip);
        let identity = input.principal.as_ref().map(|p| format!("spiffe://{p}"));
        let port = input.destination.port();
        let group: Group = (
            entry.destination.to_string(),
            source_pod.map(|w| w.key.to_string()),
            identity.clone().or_else(|| source_pod.is_none().then(|| input.source_ip.to_string())),
            port,
            today.outcome(),
            would.outcome(),
        );
        let hints = match &would {
            InboundDecision::Strict(_) => {
                vec![super::strict_hint(source_pod.map(|w| &**w), input.source_ip, port)]
            }
            InboundDecision::Authorized { verdict, .. } if !verdict.allowed => {
                super::hints(candidate, source_pod.map(|w| &**w), input.source_ip, then, input)
            }
            InboundDecision::Authorized { .. } => Vec::new(),
        };
        let (_, shift) = groups.entry(group).or_insert_with(|| {
            (
                list,
                Shift {
                    source: Source {
                        pod: source_pod.map(|w| w.key.to_string()),
                        identity: identity.clone(),
                        ips: Vec::new(),
                    },
                    destination: entry.destination.to_string(),
                    port,
                    security: Security::of(identity.as_ref()),
                    connections: 0,
                    first_seen: entry.first_seen,
                    last_seen: entry.last_seen,
                    today: today.outcome(),
                    would: would.outcome(),
                    decided_by,
                    reason: would.reason(),
                    hints,
                },
            )
        });
        if !shift.source.ips.contains(&input.source_ip) {
            shift.source.ips.push(input.source_ip);
        }
        shift.connections += entry.connections;
        shift.first_seen = shift.first_seen.min(entry.first_seen);
        shift.last_seen = shift.last_seen.max(entry.last_seen);
    }
    for (_, (list, shift)) in groups {
        match list {
            List::Breaks => report.breaks.push(shift),
            List::Opens => report.opens.push(shift),
            List::Audited => report.audited.push(shift),
        }
    }
}

/// Which list of the report a changed connection goes to.
#[derive(Clone, Copy)]
enum List {
    Breaks,
    Opens,
    Audited,
}

/// The policy that decides, or the PeerAuthentication that makes mTLS STRICT; for a denial by
/// no ALLOW policy matching, the ALLOW policies that apply.
fn deciding(cluster: &Cluster, workload: &Workload, decision: &InboundDecision) -> Option<String> {
    match decision {
        InboundDecision::Strict(mtls) => Some(mtls.decided_by.clone()),
        InboundDecision::Authorized { verdict, .. } if verdict.policy.is_some() => verdict.policy.clone(),
        InboundDecision::Authorized { verdict, .. } if verdict.allowed => None,
        InboundDecision::Authorized { .. } => {
            let allows: Vec<&str> = cluster
                .authorization
                .for_workload(&workload.key)
                .filter(|p| p.action == Action::Allow)
                .map(|p| p.name.as_str())
                .collect();
            (!allows.is_empty()).then(|| allows.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{discovery::local::parse, policy::ConnectionInput};

    const CLUSTER: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec: {serviceAccountName: frontend-sa}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {serviceAccountName: db-sa}
status: {podIP: 10.0.0.4}
";

    const DB_FROM_BACKEND: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/backend-sa]}}]}]
";

    fn request(text: &str, delete: &[&str]) -> WhatIfRequest {
        WhatIfRequest {
            file: "candidate.yaml".into(),
            text: text.into(),
            delete: delete.iter().map(|d| (*d).to_owned()).collect(),
            since_secs: None,
        }
    }

    fn seen(principal: Option<&str>, source: [u8; 4], connections: u64) -> HistoryEntry {
        HistoryEntry {
            destination: ObjectKey { namespace: "shop".into(), name: "db".into() },
            input: ConnectionInput {
                principal: principal.map(str::to_owned),
                namespace: principal.map(|_| "shop".to_owned()),
                source_ip: IpAddr::from(source),
                destination: "10.0.0.4:5432".parse().expect("addr"),
            },
            outcome: Outcome::Allowed,
            connections,
            first_seen: 10,
            last_seen: 20,
        }
    }

    #[test]
    fn a_candidate_breaks_what_it_no_longer_admits_and_a_removal_opens() {
        let cluster = parse(Path::new("c.yaml"), CLUSTER, "istio-system").expect("cluster");
        let history = [
            seen(Some("cluster.local/ns/shop/sa/frontend-sa"), [10, 0, 0, 2], 3),
            // The same source again from another entry (another outcome seen): one group.
            HistoryEntry {
                outcome: Outcome::Denied,
                ..seen(Some("cluster.local/ns/shop/sa/frontend-sa"), [10, 0, 0, 2], 2)
            },
            seen(None, [192, 0, 2, 7], 1),
        ];
        let (candidate, changes) =
            super::candidate(&cluster, &request(DB_FROM_BACKEND, &[]), "istio-system").expect("candidate");
        assert_eq!(changes, ["AuthorizationPolicy shop/db: added"]);
        assert!(cluster.authorization.is_empty(), "the snapshot in force is untouched");
        let mut report = WhatIfReport::default();
        replay(&cluster, &candidate, &history, "istio-system", &mut report);
        assert!(report.breaks_traffic());
        assert_eq!((report.replayed, report.connections, report.unchanged), (3, 6, 0));
        let frontend = report
            .breaks
            .iter()
            .find(|b| b.source.pod.as_deref() == Some("shop/frontend"))
            .expect("frontend");
        assert_eq!(
            (frontend.connections, frontend.would, frontend.security.as_str()),
            (5, Outcome::Denied, "mutual_tls")
        );
        assert_eq!(frontend.decided_by.as_deref(), Some("shop/db"));
        assert!(frontend.hints.iter().any(|h| h.contains("backend-sa")), "{:?}", frontend.hints);
        let outside = report.breaks.iter().find(|b| b.source.pod.is_none()).expect("outside client");
        assert_eq!(outside.source.ips, [IpAddr::from([192, 0, 2, 7])]);

        // With the policy in force, deleting it opens both again and breaks nothing.
        let applied = cluster.with(
            local::parse_policies(Path::new("p.yaml"), DB_FROM_BACKEND)
                .expect("policy")
                .into_iter()
                .map(|(_, _, c)| c),
            "istio-system",
        );
        let (without, changes) =
            super::candidate(&applied, &request("", &["shop/db"]), "istio-system").expect("delete");
        assert_eq!(changes, ["AuthorizationPolicy shop/db: deleted"]);
        let mut report = WhatIfReport::default();
        replay(&applied, &without, &history, "istio-system", &mut report);
        assert!(!report.breaks_traffic());
        assert_eq!(report.opens.len(), 2, "{:?}", report.opens);
    }

    #[test]
    fn bad_candidates_are_named() {
        let cluster = parse(Path::new("c.yaml"), CLUSTER, "istio-system").expect("cluster");
        let error = |text: &str, delete: &[&str]| {
            super::candidate(&cluster, &request(text, delete), "istio-system")
                .expect_err("an error")
                .to_string()
        };
        let elsewhere = error(&DB_FROM_BACKEND.replace("namespace: shop", "namespace: mesh-config"), &[]);
        assert!(
            elsewhere.starts_with("candidate.yaml:1:") && elsewhere.contains("istio-system"),
            "{elsewhere}"
        );
        assert!(error("", &["shop/none"]).contains("shop/none"));
        assert!(error("", &["shop"]).contains("not namespace/name"));
        assert!(error(CLUSTER, &[]).contains("not a policy"));
        let twice = format!("{DB_FROM_BACKEND}---\n{DB_FROM_BACKEND}");
        assert!(error(&twice, &[]).contains("defined twice (first at line 1)"), "{}", error(&twice, &[]));
        // Mesh-wide policies go in the root namespace, which needs no pods.
        let mesh = DB_FROM_BACKEND.replace("namespace: shop", "namespace: istio-system");
        assert!(super::candidate(&cluster, &request(&mesh, &[]), "istio-system").is_ok());
    }
}
