//! Connection tracing: one event when a traced socket is established and one when it closes,
//! with its TCP statistics, from `sock_ops`; every reset the kernel sends or receives, from the
//! `tcp` tracepoints; packet drops by reason, from `skb/kfree_skb`, counted in place (a drop
//! storm costs a per-CPU increment, never a ring-buffer event).
//!
//! Which sockets are traced: those in a network namespace of the `TRACED` map and not marked by
//! the agent (its own sockets, listeners included, carry `AGENT_MARK`; those delivering from a
//! client's address `DELIVERY_MARK`), i.e. the applications'.

use ambit_common::{
    AF_INET, AF_INET6, AGENT_MARK, COUNTER_RING_FULL, DELIVERY_MARK, DROP_REASON_SLOTS, FLOW_ACTIVE,
    FLOW_CLOSE, FLOW_HAS_ORIG, FLOW_OPEN, FLOW_RESET_RECEIVED, FLOW_RESET_SENT, FlowEvent, IpAddr, tcp_state,
};
use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{self, bpf_sock_ops},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::{map, sock_ops, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{SockOpsContext, TracePointContext},
};

use crate::{local, outbound::remember_established, probes, sock_ops_endpoints};

const TCP_CONNECT_CB: u32 = bindings::BPF_SOCK_OPS_TCP_CONNECT_CB;
const ACTIVE_ESTABLISHED_CB: u32 = bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
const PASSIVE_ESTABLISHED_CB: u32 = bindings::BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
const STATE_CB: u32 = bindings::BPF_SOCK_OPS_STATE_CB;
const STATE_CB_FLAG: i32 = bindings::BPF_SOCK_OPS_STATE_CB_FLAG as i32;
/// Ethernet protocol numbers (`if_ether.h`, not in the BPF bindings).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Network namespaces whose sockets are traced, by netns cookie. Written by the agent.
#[map]
static TRACED: HashMap<u64, u32> = HashMap::pinned(16_384, 0);

/// Events for the agent.
#[map]
static FLOW_EVENTS: RingBuf = RingBuf::pinned(1 << 22, 0);

/// Tracer health counters (`COUNTER_*`).
#[map]
static TRACE_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(4, 0);

/// Packets the kernel dropped, by drop reason (`enum skb_drop_reason`).
#[map]
static DROP_REASONS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASON_SLOTS, 0);

// Tracepoint field offsets, read by the agent from tracefs `format` files at load time: the
// layouts change between kernels, the formats say where each field is.
#[unsafe(no_mangle)]
static SEND_RESET_STATE: Global<u32> = Global::new(24);
#[unsafe(no_mangle)]
static SEND_RESET_REASON: Global<u32> = Global::new(28);
#[unsafe(no_mangle)]
static SEND_RESET_SADDR: Global<u32> = Global::new(32);
#[unsafe(no_mangle)]
static SEND_RESET_DADDR: Global<u32> = Global::new(60);
#[unsafe(no_mangle)]
static RECV_RESET_SPORT: Global<u32> = Global::new(16);
#[unsafe(no_mangle)]
static RECV_RESET_DPORT: Global<u32> = Global::new(18);
#[unsafe(no_mangle)]
static RECV_RESET_FAMILY: Global<u32> = Global::new(20);
#[unsafe(no_mangle)]
static RECV_RESET_SADDR: Global<u32> = Global::new(22);
#[unsafe(no_mangle)]
static RECV_RESET_DADDR: Global<u32> = Global::new(26);
#[unsafe(no_mangle)]
static RECV_RESET_SADDR6: Global<u32> = Global::new(30);
#[unsafe(no_mangle)]
static RECV_RESET_DADDR6: Global<u32> = Global::new(46);
#[unsafe(no_mangle)]
static RECV_RESET_COOKIE: Global<u32> = Global::new(64);
#[unsafe(no_mangle)]
static KFREE_PROTOCOL: Global<u32> = Global::new(32);
#[unsafe(no_mangle)]
static KFREE_REASON: Global<u32> = Global::new(36);

/// Completes capture bookkeeping and traces the applications' sockets.
#[sock_ops]
pub fn sock_events(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    let orig = if op == ACTIVE_ESTABLISHED_CB { remember_established(&ctx) } else { None };
    match op {
        TCP_CONNECT_CB => {
            // Ask for state callbacks from the start, so failed attempts report too, and so
            // that a remembered local connection is forgotten at close.
            if local::remember(&ctx) | traced(&ctx) {
                let _ = ctx.set_cb_flags(STATE_CB_FLAG);
            } else if probes::from_host(&ctx) {
                probes::remember(&ctx);
                // To forget it at close.
                let _ = ctx.set_cb_flags(STATE_CB_FLAG);
            }
        }
        ACTIVE_ESTABLISHED_CB | PASSIVE_ESTABLISHED_CB => {
            if traced(&ctx) {
                let _ = ctx.set_cb_flags(STATE_CB_FLAG);
                emit_sock(&ctx, FLOW_OPEN, op == ACTIVE_ESTABLISHED_CB, orig);
            }
        }
        // Other programs (another agent on the host, another tool) may have asked for state
        // callbacks on sockets we do not trace: check again.
        STATE_CB if ctx.arg(1) == tcp_state::CLOSE => {
            // Before forgetting: a delivering socket is told apart by its remembered tuple.
            let traced = traced(&ctx);
            local::forget(&ctx);
            if traced {
                emit_sock(&ctx, FLOW_CLOSE, false, None);
            } else if probes::from_host(&ctx) {
                probes::forget(&ctx);
            }
        }
        _ => {}
    }
    0
}

#[inline(always)]
fn traced(ctx: &SockOpsContext) -> bool {
    // SAFETY: sock_ops may call this helper on its context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup in our own map.
    if unsafe { TRACED.get(&netns) }.is_none() {
        return false;
    }
    // SAFETY: the kernel hands a valid context; `sk` may be null and is checked.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    // SAFETY: non-null socket pointer from the context.
    let mark = if sk.is_null() { 0 } else { unsafe { (*sk).mark } };
    match mark {
        AGENT_MARK => false,
        // The agent's socket delivering from a client's address, or the app's end of it.
        DELIVERY_MARK => !local::is_remembered(ctx),
        _ => true,
    }
}

#[inline(always)]
fn emit_sock(ctx: &SockOpsContext, kind: u32, active: bool, orig: Option<ambit_common::SockAddr>) {
    // SAFETY: the context is valid for the whole program.
    let ops: &bpf_sock_ops = unsafe { &*ctx.ops };
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        count(COUNTER_RING_FULL);
        return;
    };
    let (local, local_port, remote, remote_port) = sock_ops_endpoints(ctx);
    let mut flags = if active { FLOW_ACTIVE } else { 0 };
    if orig.is_some() {
        flags |= FLOW_HAS_ORIG;
    }
    entry.write(FlowEvent {
        kind,
        flags,
        // SAFETY: plain helpers on our own context.
        time_ns: unsafe { bpf_ktime_get_boot_ns() },
        // SAFETY: as above.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local,
        remote,
        local_port,
        remote_port,
        orig_dst: orig.unwrap_or_default(),
        old_state: ctx.arg(0),
        new_state: ctx.arg(1),
        bytes_received: ops.bytes_received,
        bytes_acked: ops.bytes_acked,
        srtt_us: ops.srtt_us >> 3,
        total_retrans: ops.total_retrans,
        reason: 0,
        _pad: 0,
    });
    entry.submit(wakeup_flags());
}

const BPF_RB_NO_WAKEUP: u64 = bindings::BPF_RB_NO_WAKEUP as u64;
const BPF_RB_FORCE_WAKEUP: u64 = bindings::BPF_RB_FORCE_WAKEUP as u64;
const BPF_RB_AVAIL_DATA: u64 = bindings::BPF_RB_AVAIL_DATA as u64;
const BPF_RB_RING_SIZE: u64 = bindings::BPF_RB_RING_SIZE as u64;

/// Waking the reader for every event would cost a context switch per connection; the agent
/// drains the buffer on a short timer instead, and is woken early only once a quarter of the
/// buffer is in use.
#[inline(always)]
fn wakeup_flags() -> u64 {
    if FLOW_EVENTS.query(BPF_RB_AVAIL_DATA) > FLOW_EVENTS.query(BPF_RB_RING_SIZE) / 4 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = TRACE_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot of our own map; no other writer on this CPU meanwhile.
        unsafe { *counter += 1 };
    }
}

/// Reads a `struct sockaddr_in` or `sockaddr_in6` stored in a tracepoint record.
#[inline(always)]
fn sockaddr_at(ctx: &TracePointContext, offset: usize) -> Option<(IpAddr, u32)> {
    // SAFETY: bounded reads from the tracepoint record, checked by the helper.
    let family: u16 = unsafe { ctx.read_at(offset) }.ok()?;
    // SAFETY: as above.
    let port = u16::from_be(unsafe { ctx.read_at::<u16>(offset + 2) }.ok()?);
    let ip = match u32::from(family) {
        AF_INET => IpAddr { family: AF_INET, addr: [unsafe { ctx.read_at(offset + 4) }.ok()?, 0, 0, 0] },
        // SAFETY: as above; sin6_addr follows family, port and flowinfo.
        AF_INET6 => IpAddr { family: AF_INET6, addr: unsafe { ctx.read_at(offset + 8) }.ok()? },
        _ => return None,
    };
    Some((ip, u32::from(port)))
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let at = |g: &Global<u32>| g.load() as usize;
    let (Some((local, local_port)), Some((remote, remote_port))) =
        (sockaddr_at(&ctx, at(&SEND_RESET_SADDR)), sockaddr_at(&ctx, at(&SEND_RESET_DADDR)))
    else {
        return 0;
    };
    // SAFETY: bounded reads from the tracepoint record.
    let state: u32 = unsafe { ctx.read_at(at(&SEND_RESET_STATE)) }.unwrap_or(0);
    // SAFETY: as above.
    let reason: u32 = unsafe { ctx.read_at(at(&SEND_RESET_REASON)) }.unwrap_or(0);
    emit_reset(FLOW_RESET_SENT, 0, local, local_port, remote, remote_port, state, reason);
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let at = |g: &Global<u32>| g.load() as usize;
    // SAFETY: bounded reads from the tracepoint record.
    let read16 = |o: usize| unsafe { ctx.read_at::<u16>(o) }.unwrap_or(0);
    let family = u32::from(read16(at(&RECV_RESET_FAMILY)));
    let (local, remote) = if family == AF_INET6 {
        // SAFETY: as above.
        let s: [u32; 4] = unsafe { ctx.read_at(at(&RECV_RESET_SADDR6)) }.unwrap_or_default();
        // SAFETY: as above.
        let d: [u32; 4] = unsafe { ctx.read_at(at(&RECV_RESET_DADDR6)) }.unwrap_or_default();
        (IpAddr { family, addr: s }, IpAddr { family, addr: d })
    } else {
        // SAFETY: as above.
        let s: u32 = unsafe { ctx.read_at(at(&RECV_RESET_SADDR)) }.unwrap_or(0);
        // SAFETY: as above.
        let d: u32 = unsafe { ctx.read_at(at(&RECV_RESET_DADDR)) }.unwrap_or(0);
        (IpAddr { family: AF_INET, addr: [s, 0, 0, 0] }, IpAddr { family: AF_INET, addr: [d, 0, 0, 0] })
    };
    // SAFETY: as above.
    let cookie: u64 = unsafe { ctx.read_at(at(&RECV_RESET_COOKIE)) }.unwrap_or(0);
    // The tracepoint stores ports in host order.
    let (sport, dport) = (u32::from(read16(at(&RECV_RESET_SPORT))), u32::from(read16(at(&RECV_RESET_DPORT))));
    emit_reset(FLOW_RESET_RECEIVED, cookie, local, sport, remote, dport, 0, 0);
    0
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn emit_reset(
    kind: u32,
    cookie: u64,
    local: IpAddr,
    lport: u32,
    remote: IpAddr,
    rport: u32,
    state: u32,
    reason: u32,
) {
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        count(COUNTER_RING_FULL);
        return;
    };
    entry.write(FlowEvent {
        kind,
        // SAFETY: a plain helper.
        time_ns: unsafe { bpf_ktime_get_boot_ns() },
        socket_cookie: cookie,
        local,
        remote,
        local_port: lport,
        remote_port: rport,
        old_state: state,
        reason,
        ..FlowEvent::default()
    });
    entry.submit(wakeup_flags());
}

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    // SAFETY: bounded reads from the tracepoint record.
    let protocol: u16 = unsafe { ctx.read_at(KFREE_PROTOCOL.load() as usize) }.unwrap_or(0);
    if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
        return 0;
    }
    // SAFETY: as above.
    let reason: u32 = unsafe { ctx.read_at(KFREE_REASON.load() as usize) }.unwrap_or(0);
    let slot = if reason < DROP_REASON_SLOTS { reason } else { DROP_REASON_SLOTS - 1 };
    if let Some(counter) = DROP_REASONS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot of our own map.
        unsafe { *counter += 1 };
    }
    0
}
