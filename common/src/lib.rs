//! Plain `#[repr(C)]` types and constants shared by the kernel programs in `ambit-ebpf` and the
//! agent in `ambit`.
//!
//! Everything here is laid out for BPF maps: fixed size, no padding the verifier could read
//! uninitialised, addresses and ports in network byte order exactly as the kernel hands them out.
#![no_std]

/// `SO_MARK` the agent puts on every socket it opens inside a pod, so that the connect hooks do
/// not capture the agent's own connections again. Istio uses the same value.
pub const AGENT_MARK: u32 = 0x539;

/// Port of the outbound capture listener, bound to loopback inside each enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the inbound plaintext capture listener inside each enrolled pod.
pub const INBOUND_PORT: u16 = 15006;
/// Port of the HBONE (mTLS) listener inside each enrolled pod.
pub const HBONE_PORT: u16 = 15008;

/// Address family values as the kernel uses them (`AF_INET`, `AF_INET6`).
pub const AF_INET: u32 = 2;
/// See [`AF_INET`].
pub const AF_INET6: u32 = 10;

/// An IPv4 or IPv6 address as the kernel stores it: four 32-bit words in network byte order.
/// IPv4 uses only `addr[0]`; the other words stay zero so that keys compare byte for byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpAddr {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// The address words, network byte order.
    pub addr: [u32; 4],
}

/// A socket address: an [`IpAddr`] and a port in network byte order (as `sin_port` holds it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    /// The address.
    pub ip: IpAddr,
    /// Port, network byte order in the low 16 bits.
    pub port: u32,
}

/// Key of the `ORIG_DST` map: which captured connection, seen from the pod's loopback.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// The application's local port on the loopback connection to the outbound listener, host
    /// byte order.
    pub port: u32,
    /// Keeps the struct free of trailing padding.
    pub _pad: u32,
}

/// Value of the `ENROLLED` map, keyed by the netns cookie of an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrolled {
    /// The pod's own IPv4 address (network byte order, 0 if none): connections to it stay local.
    pub ipv4: u32,
    /// Reserved for flags; zero today.
    pub flags: u32,
    /// The pod's own IPv6 address (network byte order, all zero if none).
    pub ipv6: [u32; 4],
}

#[cfg(feature = "user")]
mod user {
    use super::{Enrolled, IpAddr, OrigDstKey, SockAddr};

    // SAFETY: all four types are `#[repr(C)]`, made only of integers, and have no padding, so
    // every byte pattern is a valid value and no byte is uninitialised.
    unsafe impl aya::Pod for IpAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDstKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Enrolled {}
}
