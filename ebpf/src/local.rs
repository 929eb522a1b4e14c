//! Connections inside a pod to the pod's own address: the agent delivering a connection to the
//! app, or the app reaching itself. They are remembered while open, so that `sk_lookup` can
//! tell them from a packet that arrives from outside claiming the pod's address as its source
//! (IPv4 drops such packets by itself; IPv6 does not).

use ambit_common::ConnectionKey;
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_netns_cookie, helpers::generated::bpf_get_socket_cookie,
    programs::SockOpsContext,
};

use crate::{
    maps::{ENROLLED, LOCAL_CONNECTIONS},
    sock_ops_endpoints,
};

/// At `connect()`: remembers the connection if it goes from an enrolled pod to the pod's own
/// address. True when remembered (it must then be forgotten at close).
#[inline(always)]
pub(crate) fn remember(ctx: &SockOpsContext) -> bool {
    let (src, src_port, dst, dst_port) = sock_ops_endpoints(ctx);
    if src != dst {
        return false;
    }
    // SAFETY: sock_ops may call this helper on its context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup in our own map.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return false;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    LOCAL_CONNECTIONS.insert(&ConnectionKey { src, dst, src_port, dst_port }, &cookie, 0).is_ok()
}

/// When a socket closes: the four-tuple may later belong to something else.
#[inline(always)]
pub(crate) fn forget(ctx: &SockOpsContext) {
    let (src, src_port, dst, dst_port) = sock_ops_endpoints(ctx);
    if src == dst {
        let _ = LOCAL_CONNECTIONS.remove(&ConnectionKey { src, dst, src_port, dst_port });
    }
}
