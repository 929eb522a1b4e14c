//! ambit's kernel programs.
//!
//! - `outbound`: `cgroup/connect4|6` steer connections opened in enrolled pods to the agent's
//!   outbound listener on the pod's loopback, `sock_ops` remembers where they were going, and
//!   `cgroup/getpeername4|6` shows the application the address it asked for.
//! - `inbound`: `sk_lookup`, linked into each enrolled pod's network namespace, hands new TCP
//!   connections to the agent's inbound listener and drops them when that listener is gone.
//! - `probes`: connections opened from the node's own network namespace (kubelet probes), which
//!   the agent exempts from STRICT.
//! - `local`: connections inside a pod to its own address, which `sk_lookup` lets through.
//! - `trace`: connection open/close events with TCP statistics, resets, and drop reasons.
#![no_std]
#![no_main]

mod inbound;
mod local;
mod maps;
mod outbound;
mod probes;
mod trace;

/// `IPPROTO_TCP` (`in.h`: not in the BPF bindings, which hold `bpf.h` only).
pub(crate) const IPPROTO_TCP: u32 = 6;

/// A `sock_ops` socket's (local address, local port, remote address, remote port), ports in host
/// byte order.
#[inline(always)]
pub(crate) fn sock_ops_endpoints(
    ctx: &aya_ebpf::programs::SockOpsContext,
) -> (ambit_common::IpAddr, u32, ambit_common::IpAddr, u32) {
    use ambit_common::{AF_INET, AF_INET6, IpAddr};
    // SAFETY: the context is valid for the whole program.
    let ops = unsafe { &*ctx.ops };
    let (local, remote) = if ops.family == AF_INET6 {
        let (local, remote) = (read_words(&ops.local_ip6), read_words(&ops.remote_ip6));
        // An IPv6 socket talking IPv4 (`::ffff:a.b.c.d`): its packets are IPv4, and so must its
        // keys be, to meet what sk_lookup and the agent see.
        let mapped = |a: [u32; 4]| a[0] == 0 && a[1] == 0 && a[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        if mapped(local) && mapped(remote) {
            (
                IpAddr { family: AF_INET, addr: [local[3], 0, 0, 0] },
                IpAddr { family: AF_INET, addr: [remote[3], 0, 0, 0] },
            )
        } else {
            (IpAddr { family: AF_INET6, addr: local }, IpAddr { family: AF_INET6, addr: remote })
        }
    } else {
        (
            IpAddr { family: AF_INET, addr: [ops.local_ip4, 0, 0, 0] },
            IpAddr { family: AF_INET, addr: [ops.remote_ip4, 0, 0, 0] },
        )
    };
    // The remote port is in network byte order in the upper half of the word, for historical
    // reasons; the local port is in host byte order.
    let remote_port = u32::from(u16::from_be((ops.remote_port >> 16) as u16));
    (local, ops.local_port, remote, remote_port)
}

/// Reads a four-word array of a context struct one word at a time. The verifier only accepts
/// context loads at a constant offset from the unmodified context pointer; a plain array copy
/// lets LLVM compute the array's address first, which it rejects.
#[inline(always)]
pub(crate) fn read_words(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: the references point into the program's context, valid for the whole call.
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}

/// Writes a four-word array of a context struct one word at a time; see [`read_words`].
#[inline(always)]
pub(crate) fn write_words(words: &mut [u32; 4], value: [u32; 4]) {
    // SAFETY: as in `read_words`.
    unsafe {
        core::ptr::write_volatile(&mut words[0], value[0]);
        core::ptr::write_volatile(&mut words[1], value[1]);
        core::ptr::write_volatile(&mut words[2], value[2]);
        core::ptr::write_volatile(&mut words[3], value[3]);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier proves the programs cannot panic; this only satisfies the linker.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
