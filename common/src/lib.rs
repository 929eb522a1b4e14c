//! Plain `#[repr(C)]` types and constants shared by the kernel programs in `ambit-ebpf` and the
//! agent in `ambit`.
//!
//! Everything here is laid out for BPF maps: fixed size, no padding the verifier could read
//! uninitialised, addresses and ports in network byte order exactly as the kernel hands them out.
#![no_std]

/// `SO_MARK` the agent puts on every socket it opens inside a pod, so that the connect hooks do
/// not capture the agent's own connections again. Istio uses the same value.
pub const AGENT_MARK: u32 = 0x539;

/// `SO_MARK` of the agent's sockets that deliver a connection to an app from the client's own
/// address (`IP_TRANSPARENT`). The app's accepted socket inherits it from the SYN
/// (`net.ipv4.tcp_fwmark_accept` in the pod), and a rule in the pod routes what carries it
/// back to the agent inside the pod (table [`DELIVERY_TABLE`]), not out to the client.
pub const DELIVERY_MARK: u32 = 0x53a;

/// Routing table, inside an enrolled pod, for packets marked [`DELIVERY_MARK`]: every address
/// is local there.
pub const DELIVERY_TABLE: u32 = 0x53a;

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

/// A TCP connection as the socket that opened it sees it, ports in host byte order. Key of
/// `HOST_CONNECTIONS` (opened by a socket of the node's own network namespace, such as the
/// kubelet probing a pod) and `LOCAL_CONNECTIONS` (opened inside a pod to the pod's own address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    /// The host socket's address.
    pub src: IpAddr,
    /// The address it connected to.
    pub dst: IpAddr,
    /// The host socket's port.
    pub src_port: u32,
    /// The port it connected to.
    pub dst_port: u32,
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

/// The one entry of the `OWNER` map: which agent process owns this instance's pinned state.
/// A new agent writes itself there when it starts (an upgrade); the one it replaces sees it and
/// stops changing the shared state, while it finishes the connections it holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// Process id (as the host sees it).
    pub pid: u32,
    /// Keeps the struct free of padding.
    pub _pad: u32,
    /// The process's start time (`/proc/<pid>/stat` field 22, clock ticks since boot): with the
    /// pid, names one process even after pids are reused.
    pub start_ticks: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::{ConnectionKey, Enrolled, FlowEvent, IpAddr, OrigDstKey, Owner, SockAddr};

    // SAFETY: all these types are `#[repr(C)]`, made only of integers, and have no padding, so
    // every byte pattern is a valid value and no byte is uninitialised.
    unsafe impl aya::Pod for IpAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDstKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Enrolled {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnectionKey {}
    // SAFETY: as above (field sizes chosen so that no padding is left).
    unsafe impl aya::Pod for FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Owner {}
}

/// Kind of a [`FlowEvent`]: a traced socket reached ESTABLISHED.
pub const FLOW_OPEN: u32 = 1;
/// A traced socket reached CLOSE (from any state: also failed connection attempts).
pub const FLOW_CLOSE: u32 = 2;
/// The kernel sent a reset (`tcp/tcp_send_reset`), for any socket on the host.
pub const FLOW_RESET_SENT: u32 = 3;
/// The kernel received a reset (`tcp/tcp_receive_reset`), for any socket on the host.
pub const FLOW_RESET_RECEIVED: u32 = 4;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`), in
/// [`FlowEvent::old_state`] and [`FlowEvent::new_state`].
pub mod tcp_state {
    /// `TCP_ESTABLISHED`.
    pub const ESTABLISHED: u32 = 1;
    /// `TCP_SYN_SENT`.
    pub const SYN_SENT: u32 = 2;
    /// `TCP_SYN_RECV`.
    pub const SYN_RECV: u32 = 3;
    /// `TCP_FIN_WAIT2`.
    pub const FIN_WAIT2: u32 = 5;
    /// `TCP_CLOSE`.
    pub const CLOSE: u32 = 7;
    /// `TCP_CLOSE_WAIT`.
    pub const CLOSE_WAIT: u32 = 8;
    /// `TCP_LAST_ACK`.
    pub const LAST_ACK: u32 = 9;
    /// `TCP_CLOSING`.
    pub const CLOSING: u32 = 11;
}

/// [`FlowEvent::flags`]: the socket opened the connection (`connect()`).
pub const FLOW_ACTIVE: u32 = 1;
/// [`FlowEvent::flags`]: `orig_dst` holds the destination the capture program redirected.
pub const FLOW_HAS_ORIG: u32 = 2;

/// Index in the `TRACE_COUNTERS` per-CPU array: events lost because the ring buffer was full.
pub const COUNTER_RING_FULL: u32 = 0;
/// Size of the `DROP_REASONS` per-CPU array; larger kernel drop reasons count in the last slot.
pub const DROP_REASON_SLOTS: u32 = 256;

/// One event of the connection tracer, sent through the `FLOW_EVENTS` ring buffer.
///
/// Addresses are network byte order as in [`IpAddr`]; ports host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `FLOW_*` kind.
    pub kind: u32,
    /// `FLOW_ACTIVE | FLOW_HAS_ORIG`.
    pub flags: u32,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub time_ns: u64,
    /// Socket cookie (0 when the kernel gave none).
    pub socket_cookie: u64,
    /// Netns cookie of the socket (0 for reset events, which carry none).
    pub netns_cookie: u64,
    /// Local address.
    pub local: IpAddr,
    /// Remote address.
    pub remote: IpAddr,
    /// Local port.
    pub local_port: u32,
    /// Remote port.
    pub remote_port: u32,
    /// Destination before the capture program redirected it, when `FLOW_HAS_ORIG`.
    pub orig_dst: SockAddr,
    /// TCP state before (state change) or at (reset) the event.
    pub old_state: u32,
    /// TCP state after a state change.
    pub new_state: u32,
    /// Bytes received (at close).
    pub bytes_received: u64,
    /// Bytes sent and acknowledged (at close).
    pub bytes_acked: u64,
    /// Smoothed RTT, microseconds (at close).
    pub srtt_us: u32,
    /// Retransmitted segments (at close).
    pub total_retrans: u32,
    /// Reset reason (`enum sk_rst_reason`) for `FLOW_RESET_SENT`.
    pub reason: u32,
    /// Keeps the struct free of trailing padding.
    pub _pad: u32,
}
