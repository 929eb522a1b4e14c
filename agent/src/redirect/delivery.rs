//! What a pod's network namespace needs for the agent to deliver each inbound connection to the
//! app from the client's own address, so that `getpeername()` in the app (its access log, rate
//! limits, allow-lists) sees the client and not the agent.
//!
//! The agent's delivering socket binds the client's address (`IP_TRANSPARENT`) and carries
//! [`DELIVERY_MARK`]. The app's replies go to that address, which is not the pod's: without
//! more they would be routed out of the pod to the real client. So, inside the pod:
//! `net.ipv4.tcp_fwmark_accept` makes the app's accepted socket take the mark of the SYN that
//! opened it (`fwmark_reflect` does the same for the resets and ICMP errors the kernel answers
//! itself, for a port nobody listens on), and a rule sends whatever carries the mark to [`DELIVERY_TABLE`], where every
//! address is local: the replies come back to the agent's socket, inside the pod. No iptables,
//! no connection tracking; nothing else in the pod carries the mark.

use std::io;

use ambit_common::{DELIVERY_MARK, DELIVERY_TABLE};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Priority of the rule: after `local` (0), before `main` (32766).
const RULE_PRIORITY: u32 = 100;
/// The loopback interface is ifindex 1 in every network namespace.
const LOOPBACK: u32 = 1;

/// Sets the namespace of the calling thread up for delivery from clients' addresses. Run inside
/// the pod's namespace; idempotent (what is already there is kept). `ipv6`: the pod has IPv6
/// addresses, so the IPv6 rule and table are needed too.
pub(crate) fn prepare(ipv6: bool) -> io::Result<()> {
    // The app's accepted socket takes the SYN's mark; what the kernel answers for a port nobody
    // listens on (a reset, an ICMP error) takes the mark of what it answers, or the agent would
    // wait for an answer that went out to the client instead.
    let mut settings = vec!["net/ipv4/tcp_fwmark_accept", "net/ipv4/fwmark_reflect"];
    if ipv6 {
        settings.push("net/ipv6/fwmark_reflect");
    }
    for setting in settings {
        std::fs::write(format!("/proc/sys/{setting}"), "1")
            .map_err(|e| io::Error::new(e.kind(), format!("setting {}: {e}", setting.replace('/', "."))))?;
    }
    let mut netlink = Netlink::open()?;
    let families: &[AddressFamily] =
        if ipv6 { &[AddressFamily::Inet, AddressFamily::Inet6] } else { &[AddressFamily::Inet] };
    for &family in families {
        netlink.request(RouteNetlinkMessage::NewRule(rule(family)))?;
        netlink.request(RouteNetlinkMessage::NewRoute(local_route(family)))?;
    }
    Ok(())
}

/// `ip rule add pref 100 fwmark DELIVERY_MARK lookup DELIVERY_TABLE`.
fn rule(family: AddressFamily) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::Priority(RULE_PRIORITY),
        RuleAttribute::FwMark(DELIVERY_MARK),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Table(DELIVERY_TABLE),
    ];
    rule
}

/// `ip route add local default dev lo table DELIVERY_TABLE`.
fn local_route(family: AddressFamily) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.table = RouteHeader::RT_TABLE_UNSPEC;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.attributes = vec![RouteAttribute::Table(DELIVERY_TABLE), RouteAttribute::Oif(LOOPBACK)];
    route
}

/// A route netlink socket of the calling thread's namespace.
struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, sequence: 0 })
    }

    /// Sends `message` to create something; an object that exists already is fine.
    fn request(&mut self, message: RouteNetlinkMessage) -> io::Result<()> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buffer = vec![0; packet.header.length as usize];
        packet.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        let mut answer = vec![0; 8192];
        let read = self.socket.recv(&mut &mut answer[..], 0)?;
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..read])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink answer: {e}")))?;
        match reply.payload {
            NetlinkPayload::Error(error) => match error.code {
                None => Ok(()),
                Some(code) if -code.get() == libc::EEXIST => Ok(()),
                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            },
            _ => Ok(()),
        }
    }
}
