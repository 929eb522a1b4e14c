//! Istio's certificate protocol: the unary gRPC call
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, spoken over HTTP/2 with h2 (as
//! HBONE is), with the messages of Istio's public API (`security/v1alpha1/ca.proto`). One
//! request, one answer: a length-prefixed protobuf message each way and the status in the
//! response's trailers.

use bytes::{BufMut as _, Bytes, BytesMut};

/// The request path.
pub const PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The `metadata` key naming the identity a node agent asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Requests and answers are a CSR or a few certificates: anything larger is not one.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// `IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CertificateRequest {
    /// PEM-encoded certificate request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime, seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Extra fields; `ImpersonatedIdentity` for a node agent.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

impl CertificateRequest {
    /// A request for `csr`, valid `seconds`, on behalf of `identity` (a SPIFFE ID).
    pub fn new(csr: String, seconds: i64, identity: &str) -> Self {
        let value =
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())) };
        let metadata = prost_types::Struct { fields: [(IMPERSONATED_IDENTITY.to_owned(), value)].into() };
        Self { csr, validity_duration: seconds, metadata: Some(metadata) }
    }

    /// The identity asked for, if the request names one.
    pub fn impersonated(&self) -> Option<&str> {
        match self.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?.kind.as_ref()? {
            prost_types::value::Kind::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

/// `IstioCertificateResponse`: the chain, leaf first, root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CertificateResponse {
    /// PEM certificates.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The gRPC status codes this protocol answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// Issued.
    Ok = 0,
    /// The request is malformed (CSR, lifetime).
    InvalidArgument = 3,
    /// Authenticated, but not allowed this identity.
    PermissionDenied = 7,
    /// Too many requests at once.
    ResourceExhausted = 8,
    /// Not the certificate call.
    Unimplemented = 12,
    /// Something failed on the CA's side.
    Internal = 13,
    /// The CA cannot answer now (e.g. the Kubernetes API is away).
    Unavailable = 14,
    /// No valid token.
    Unauthenticated = 16,
}

impl Code {
    /// The code of a `grpc-status` value.
    pub fn from_status(value: &str) -> Option<Self> {
        Some(match value.trim() {
            "0" => Self::Ok,
            "3" => Self::InvalidArgument,
            "7" => Self::PermissionDenied,
            "8" => Self::ResourceExhausted,
            "12" => Self::Unimplemented,
            "13" => Self::Internal,
            "14" => Self::Unavailable,
            "16" => Self::Unauthenticated,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ok => "OK",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::Unauthenticated => "UNAUTHENTICATED",
        })
    }
}

/// A message as gRPC frames it: uncompressed flag, 4-byte length, the protobuf bytes.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = message.encode(&mut out);
    out.freeze()
}

/// The one message of a gRPC body.
pub fn unframe<M: prost::Message + Default>(body: &[u8]) -> Result<M, String> {
    let (header, rest) = body.split_at_checked(5).ok_or("a gRPC message shorter than its 5-byte header")?;
    if header[0] != 0 {
        return Err("compressed gRPC messages are not accepted".into());
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(format!("a gRPC message of {len} bytes (at most {MAX_MESSAGE})"));
    }
    let message = rest.get(..len).ok_or("the gRPC message is cut short")?;
    if rest.len() != len {
        return Err("more than one gRPC message in a unary call".into());
    }
    M::decode(message).map_err(|e| format!("not an Istio certificate message: {e}"))
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
pub fn encode_message(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}

/// The inverse of [`encode_message`].
pub fn decode_message(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn messages_round_trip_through_grpc_frames() {
        let request = CertificateRequest::new(
            "-----BEGIN CERTIFICATE REQUEST-----".into(),
            3600,
            "spiffe://td/ns/a/sa/b",
        );
        let back: CertificateRequest = unframe(&frame(&request)).expect("decode");
        assert_eq!(back, request);
        assert_eq!(back.impersonated(), Some("spiffe://td/ns/a/sa/b"));
        // Field numbers as in Istio's ca.proto: csr 1, validity_duration 3, metadata 4.
        let bytes = request.encode_to_vec();
        assert_eq!(bytes[0], 1 << 3 | 2, "csr is field 1, length-delimited");
        assert!(unframe::<CertificateRequest>(&[0, 0, 0, 0]).is_err());
        assert!(unframe::<CertificateRequest>(&[1, 0, 0, 0, 0]).is_err(), "compressed");
        assert_eq!(decode_message(&encode_message("100% no: ü")), "100% no: ü");
    }
}
