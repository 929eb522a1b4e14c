//! SPIFFE IDs as the SPIFFE-ID standard defines them, and the workload identities ambit uses:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;

use x509_parser::prelude::FromDer as _;

/// Why a string is not a SPIFFE ID, or not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// Not `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// Bad trust domain.
    #[error("{0:?} has an invalid trust domain (lowercase letters, digits, '.', '-' and '_' only)")]
    TrustDomain(String),
    /// Bad path.
    #[error(
        "{0:?} has an invalid path (segments of letters, digits, '.', '-', '_'; no empty, '.' or '..' segments)"
    )]
    Path(String),
    /// Too long.
    #[error("SPIFFE ID of {0} bytes exceeds 2048")]
    TooLong(usize),
    /// Valid SPIFFE ID, but not `/ns/<ns>/sa/<sa>`.
    #[error(
        "{0:?} is not a workload identity of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    NotWorkload(String),
}

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Trust domain.
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

impl Identity {
    /// The identity of a service account.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses `spiffe://td/ns/x/sa/y`.
    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let (trust_domain, path) = parse_spiffe_id(uri)?;
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Ok(Self::new(trust_domain, namespace, service_account))
            }
            _ => Err(SpiffeError::NotWorkload(uri.to_owned())),
        }
    }

    /// The identity as Istio writes principals: without `spiffe://`.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

/// Validates a SPIFFE ID and splits it into trust domain and path (with its leading `/`, or
/// empty).
pub fn parse_spiffe_id(uri: &str) -> Result<(&str, &str), SpiffeError> {
    if uri.len() > 2048 {
        return Err(SpiffeError::TooLong(uri.len()));
    }
    let rest = uri.strip_prefix("spiffe://").ok_or_else(|| SpiffeError::Scheme(uri.to_owned()))?;
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let td_ok = !trust_domain.is_empty()
        && trust_domain.len() <= 255
        && trust_domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !td_ok {
        return Err(SpiffeError::TrustDomain(uri.to_owned()));
    }
    if !path.is_empty() {
        let ok = path.split('/').skip(1).all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
        if !ok {
            return Err(SpiffeError::Path(uri.to_owned()));
        }
    }
    Ok((trust_domain, path))
}

/// The one SPIFFE ID in a certificate's URI SANs.
pub fn spiffe_id_of(cert: &rustls::pki_types::CertificateDer<'_>) -> Result<Identity, String> {
    let (_, cert) = x509_parser::prelude::X509Certificate::from_der(cert)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("certificate has no subjectAltName")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| if let x509_parser::prelude::GeneralName::URI(uri) = n { Some(*uri) } else { None })
        .collect();
    match uris.as_slice() {
        [uri] => Identity::parse(uri).map_err(|e| e.to_string()),
        [] => Err("certificate has no URI SAN (not an X.509-SVID)".into()),
        _ => Err(format!("certificate has {} URI SANs; an X.509-SVID has exactly one", uris.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_identities_round_trip() {
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/frontend-sa").expect("valid");
        assert_eq!(id, Identity::new("cluster.local", "shop", "frontend-sa"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/frontend-sa");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/frontend-sa");
    }

    #[test]
    fn rejects_what_the_standard_rejects() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#frag",
            "spiffe://cluster.local/ns/a%20/sa/b",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(matches!(
            Identity::parse("spiffe://cluster.local/workload/x"),
            Err(SpiffeError::NotWorkload(_))
        ));
        assert!(parse_spiffe_id("spiffe://example.org").is_ok(), "a bare trust domain is a valid ID");
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        assert!(matches!(parse_spiffe_id(&long), Err(SpiffeError::TooLong(_))));
    }
}
