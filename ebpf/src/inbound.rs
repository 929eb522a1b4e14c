//! Inbound capture: new TCP connections to an enrolled pod go to the agent's inbound listener.

use ambit_common::{AF_INET, AF_INET6, ConnectionKey, HBONE_PORT, IpAddr};
use aya_ebpf::{
    bindings::{
        self,
        sk_action::{SK_DROP, SK_PASS},
    },
    macros::sk_lookup,
    programs::SkLookupContext,
};

use crate::{
    IPPROTO_TCP,
    maps::{HBONE_LISTENERS, INBOUND_LISTENERS, LOCAL_CONNECTIONS},
    read_words,
};

/// The loopback interface is always ifindex 1 in a network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// `bpf_sk_assign` flag: skip reuseport selection on the assigned socket.
const NO_REUSEPORT: u64 = bindings::BPF_SK_LOOKUP_F_NO_REUSEPORT as u64;

/// Linked into each enrolled pod's network namespace by the agent.
#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid `bpf_sk_lookup`; the verifier checks every access.
    let lookup = unsafe { &*ctx.lookup };
    // Connections to 127.0.0.1 or ::1 inside the pod (including to the agent's outbound
    // listener) are the pod's own business.
    if lookup.protocol != IPPROTO_TCP || lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let (local, remote) = match lookup.family {
        AF_INET => (
            IpAddr { family: AF_INET, addr: [lookup.local_ip4, 0, 0, 0] },
            IpAddr { family: AF_INET, addr: [lookup.remote_ip4, 0, 0, 0] },
        ),
        AF_INET6 => (
            IpAddr { family: AF_INET6, addr: read_words(&lookup.local_ip6) },
            IpAddr { family: AF_INET6, addr: read_words(&lookup.remote_ip6) },
        ),
        _ => return SK_PASS,
    };
    // A connection a socket of this netns opened to it and `sock_ops` remembered: the agent
    // delivering to the app (from the pod's address, or from the client's), or the app talking to
    // itself. IPv6 reports such a delivery as arriving on the pod's interface, not loopback.
    let key = ConnectionKey {
        src: remote,
        dst: local,
        src_port: u32::from(u16::from_be(lookup.remote_port)),
        dst_port: lookup.local_port,
    };
    // SAFETY: a lookup in our own map.
    if unsafe { LOCAL_CONNECTIONS.get(&key) }.is_some() {
        return SK_PASS;
    }
    // Anything else from the pod's own address came from outside (an IPv6 packet spoofing it).
    if local == remote {
        return SK_DROP;
    }
    let listeners =
        if lookup.local_port == u32::from(HBONE_PORT) { &HBONE_LISTENERS } else { &INBOUND_LISTENERS };
    // Exactly the agent's socket: its listeners share their ports (SO_REUSEPORT, so that a new
    // agent can start beside the old one), and a process of the pod running as the same user
    // could join that group; the kernel's reuseport choice would then hand it connections.
    match listeners.redirect_sk_lookup(&ctx, local, NO_REUSEPORT) {
        Ok(()) => SK_PASS,
        // No live listener for this pod: refuse rather than let traffic reach the app
        // without the agent (fail closed).
        Err(_) => SK_DROP,
    }
}
