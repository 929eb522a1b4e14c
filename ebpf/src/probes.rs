//! Kubelet health probes: a connection opened by a socket of the node's own network namespace is
//! remembered while it is open, so that the agent can let exactly those connections past STRICT.
//! A packet forwarded through the node (kube-proxy's NodePort or LoadBalancer DNAT, even
//! masqueraded to the node's address) has no socket there and is never remembered.

use ambit_common::ConnectionKey;
use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};

use crate::{maps::HOST_CONNECTIONS, sock_ops_endpoints};

/// Cookie of the node's own network namespace, where the agent runs; 0 remembers nothing. Set by
/// the agent at load.
#[unsafe(no_mangle)]
static HOST_NETNS: Global<u64> = Global::new(0);

/// Whether the socket lives in the node's own network namespace.
#[inline(always)]
pub(crate) fn from_host(ctx: &SockOpsContext) -> bool {
    let host = HOST_NETNS.load();
    // SAFETY: sock_ops may call this helper on its context.
    host != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == host
}

/// At `connect()` (`TCP_CONNECT_CB`, before the SYN leaves): the addresses and both ports are
/// set, and the entry exists before the destination can accept.
#[inline(always)]
pub(crate) fn remember(ctx: &SockOpsContext) {
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = HOST_CONNECTIONS.insert(&key(ctx), &cookie, 0);
}

/// When the socket closes: the same four-tuple may later belong to something else.
#[inline(always)]
pub(crate) fn forget(ctx: &SockOpsContext) {
    let _ = HOST_CONNECTIONS.remove(&key(ctx));
}

#[inline(always)]
fn key(ctx: &SockOpsContext) -> ConnectionKey {
    let (src, src_port, dst, dst_port) = sock_ops_endpoints(ctx);
    ConnectionKey { src, dst, src_port, dst_port }
}
