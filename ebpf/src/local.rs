//! Connections inside a pod to the pod's own address: the agent delivering a connection to the
//! app (from the pod's address, or from the client's with `DELIVERY_MARK`), or the app reaching
//! itself. They are remembered while open, so that `sk_lookup` can tell them from a packet that
//! arrives from outside with the same addresses (IPv4 drops such packets by itself; IPv6 does
//! not, and reports a delivery through loopback as arriving on the pod's interface), and so that
//! the tracer can tell the agent's delivering socket from the app's.

use ambit_common::{ConnectionKey, DELIVERY_MARK};
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_netns_cookie, helpers::generated::bpf_get_socket_cookie,
    programs::SockOpsContext,
};

use crate::{
    maps::{ENROLLED, LOCAL_CONNECTIONS},
    sock_ops_endpoints,
};

/// At `connect()`: remembers the connection if it goes from an enrolled pod to the pod's own
/// address, or is the agent delivering from a client's address. True when remembered (it must
/// then be forgotten at close).
#[inline(always)]
pub(crate) fn remember(ctx: &SockOpsContext) -> bool {
    let (src, src_port, dst, dst_port) = sock_ops_endpoints(ctx);
    if src != dst && !delivering(ctx) {
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
    if src == dst || delivering(ctx) {
        let _ = LOCAL_CONNECTIONS.remove(&ConnectionKey { src, dst, src_port, dst_port });
    }
}

/// Whether this socket's own four-tuple was remembered at `connect()`: for a socket carrying
/// `DELIVERY_MARK`, that it is the agent's, delivering a connection from the client's address
/// (the app's accepted end carries the mark too, but its four-tuple is the reverse). A function
/// of its own: inlined into `traced`, LLVM spilled a register it never set, which the verifier
/// rejects.
#[inline(never)]
pub(crate) fn is_remembered(ctx: &SockOpsContext) -> bool {
    let (src, src_port, dst, dst_port) = sock_ops_endpoints(ctx);
    // SAFETY: a lookup in our own map.
    unsafe { LOCAL_CONNECTIONS.get(&ConnectionKey { src, dst, src_port, dst_port }) }.is_some()
}

/// Whether the socket carries `DELIVERY_MARK`.
#[inline(always)]
fn delivering(ctx: &SockOpsContext) -> bool {
    // SAFETY: the kernel hands a valid context; `sk` may be null and is checked.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    // SAFETY: non-null socket pointer from the context.
    !sk.is_null() && unsafe { (*sk).mark } == DELIVERY_MARK
}
