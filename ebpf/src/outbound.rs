//! Outbound capture: `connect()` from an enrolled pod goes to the agent instead.
//!
//! The `sock_ops` program that completes the bookkeeping lives in `trace`, which shares it.

use ambit_common::{
    AF_INET, AF_INET6, AGENT_MARK, DELIVERY_MARK, Enrolled, IpAddr, OUTBOUND_PORT, OrigDstKey, SockAddr,
};
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::{SockAddrContext, SockOpsContext},
};

use crate::{
    IPPROTO_TCP,
    maps::{ENROLLED, ORIG_DST, SOCK_ORIG},
};

/// Return value that lets the syscall proceed (cgroup programs: 1 = allow).
const ALLOW: i32 = 1;
/// `SOCK_STREAM` (`socket.h`, not in the BPF bindings).
const SOCK_STREAM: u32 = 1;

/// 127.0.0.1 as the kernel stores it (network byte order).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The `::ffff:0:0/96` prefix word of a v4-mapped IPv6 address.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr`; the verifier checks every field access.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(enrolled) = capture_target(&ctx) {
        let dst = sa.user_ip4;
        if is_loopback4(dst) || dst == enrolled.ipv4 {
            return ALLOW;
        }
        let orig = SockAddr { ip: IpAddr { family: AF_INET, addr: [dst, 0, 0, 0] }, port: sa.user_port };
        if remember(&ctx, &orig) {
            sa.user_ip4 = LOOPBACK4;
            sa.user_port = u32::from(OUTBOUND_PORT.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in `capture_connect4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(enrolled) = capture_target(&ctx) {
        let dst = crate::read_words(&sa.user_ip6);
        let orig;
        if dst[0] == 0 && dst[1] == 0 && dst[2] == V4_MAPPED {
            // A dual-stack socket talking IPv4: capture it like connect4 would.
            if is_loopback4(dst[3]) || dst[3] == enrolled.ipv4 {
                return ALLOW;
            }
            orig = SockAddr { ip: IpAddr { family: AF_INET, addr: [dst[3], 0, 0, 0] }, port: sa.user_port };
            if remember(&ctx, &orig) {
                crate::write_words(&mut sa.user_ip6, [0, 0, V4_MAPPED, LOOPBACK4]);
                sa.user_port = u32::from(OUTBOUND_PORT.to_be());
            }
            return ALLOW;
        }
        if is_loopback6(dst) || dst == enrolled.ipv6 {
            return ALLOW;
        }
        orig = SockAddr { ip: IpAddr { family: AF_INET6, addr: dst }, port: sa.user_port };
        if remember(&ctx, &orig) {
            crate::write_words(&mut sa.user_ip6, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
            sa.user_port = u32::from(OUTBOUND_PORT.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in `capture_connect4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = captured_orig(&ctx) {
        if orig.ip.family == AF_INET {
            sa.user_ip4 = orig.ip.addr[0];
            sa.user_port = orig.port;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_peername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in `capture_connect4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = captured_orig(&ctx) {
        let ip = if orig.ip.family == AF_INET { [0, 0, V4_MAPPED, orig.ip.addr[0]] } else { orig.ip.addr };
        crate::write_words(&mut sa.user_ip6, ip);
        sa.user_port = orig.port;
    }
    ALLOW
}

/// Copies the original destination of a captured socket to the key the agent looks up once
/// the connection is established (its client port is only known now), and returns it.
#[inline(always)]
pub(crate) fn remember_established(ctx: &SockOpsContext) -> Option<SockAddr> {
    // SAFETY: sock_ops may call both cookie helpers on its context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup in our own map; the value is copied out at once.
    let orig = unsafe { SOCK_ORIG.get(&cookie) }.copied()?;
    let key = OrigDstKey {
        // SAFETY: see above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: ctx.local_port(),
        _pad: 0,
    };
    let _ = ORIG_DST.insert(&key, &orig, 0);
    Some(orig)
}

/// The enrolment of the calling socket's netns, if this `connect()` is one to capture: a TCP
/// socket in an enrolled pod that the agent did not open itself.
#[inline(always)]
fn capture_target(ctx: &SockAddrContext) -> Option<Enrolled> {
    // SAFETY: as in `capture_connect4`; `sk` is always a valid socket for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return None;
    }
    // SAFETY: sock_addr programs may call this helper on their context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup in our own map; the value is copied out at once.
    let enrolled = unsafe { ENROLLED.get(&netns) }.copied()?;
    // SAFETY: see above.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // SAFETY: the verifier knows `sk` as a non-null socket pointer here.
    let mark = unsafe { (*sk).mark };
    if mark == AGENT_MARK || mark == DELIVERY_MARK {
        return None;
    }
    Some(enrolled)
}

/// Saves where the socket was going. Only a socket whose destination is saved is redirected:
/// without the record the agent could not forward it.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &SockAddr) -> bool {
    // SAFETY: sock_addr programs may call this helper on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    SOCK_ORIG.insert(&cookie, orig, 0).is_ok()
}

#[inline(always)]
fn captured_orig(ctx: &SockAddrContext) -> Option<SockAddr> {
    // SAFETY: see `capture_target`.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup in our own map.
    unsafe { ENROLLED.get(&netns) }?;
    // SAFETY: see `remember`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup in our own map; the value is copied out at once.
    unsafe { SOCK_ORIG.get(&cookie) }.copied()
}

#[inline(always)]
fn is_loopback4(addr: u32) -> bool {
    addr.to_ne_bytes()[0] == 127
}

#[inline(always)]
fn is_loopback6(addr: [u32; 4]) -> bool {
    addr == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
}
