//! The kernel side, seen from the agent: load ambit's eBPF programs, attach and pin them, and
//! give typed access to the maps they share with us.
//!
//! Everything is pinned under `<bpffs>/ambit/<instance>/` so that enforcement outlives the agent
//! process: a killed agent leaves its programs attached and its maps in place (new connections
//! then fail closed), and the next agent re-opens the same maps and replaces the links.

use std::{
    fs::{self, File},
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

pub(crate) mod pin;
#[allow(unsafe_code, reason = "the bpf(2) commands aya lacks, each with its SAFETY comment")]
mod sys;
pub mod tracefs;

use ambit_common::{
    AF_INET, AF_INET6, COUNTER_RING_FULL, ConnectionKey, DROP_REASON_SLOTS, Enrolled, IpAddr, OrigDstKey,
    Owner, SockAddr,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps, TracePoint,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use tracing::{debug, info, warn};

use self::tracefs::Format;
use crate::sys::capability::{self, Capability};

/// The kernel programs, built by `build.rs` from the `ambit-ebpf` crate.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit"));

/// Where bpffs is mounted on every Linux distribution we know of.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Programs attached once at the cgroup v2 root, by name in the object file.
const CGROUP_SOCK_ADDR_PROGRAMS: [&str; 4] =
    ["capture_connect4", "capture_connect6", "restore_peername4", "restore_peername6"];
const SOCK_OPS_PROGRAM: &str = "sock_events";
/// Tracepoint programs: (program, category, event).
const TRACEPOINTS: [(&str, &str, &str); 3] = [
    ("tcp_send_reset", "tcp", "tcp_send_reset"),
    ("tcp_receive_reset", "tcp", "tcp_receive_reset"),
    ("kfree_skb", "skb", "kfree_skb"),
];
const SK_LOOKUP_PROGRAM: &str = "steer_inbound";

/// Errors of the eBPF layer.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// bpffs is not mounted and could not be mounted.
    #[error("bpffs is not mounted at {path} and mounting it failed: {source}")]
    Bpffs {
        /// The mount point.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// bpffs is not mounted, and a mount made here would not outlive this process's mount
    /// namespace (a container whose volume does not propagate mounts back to the host).
    #[error(
        "bpffs is not mounted at {path}, and a bpffs mounted from here would vanish with this \
         container (its mount is {propagation}, not shared with the host), taking the pinned \
         programs and their enforcement with it; mount it on the node (`mount -t bpf bpf {path}`; \
         systemd does on most distributions)"
    )]
    BpffsNotShared {
        /// The mount point.
        path: PathBuf,
        /// The propagation of the mount that holds it (`a slave of the host's`, `private`).
        propagation: &'static str,
    },
    /// This binary was built without its kernel programs.
    #[error(
        "this ambit was built with AYA_BUILD_SKIP=1 and holds no kernel programs; build it without that to run the agent"
    )]
    NotBuilt,
    /// No cgroup v2 hierarchy was found.
    #[error(
        "no mount of the cgroup v2 root in /proc/self/mountinfo{seen}; ambit needs cgroup v2 to \
         capture connections (in a container: the host's /sys/fs/cgroup as a volume)"
    )]
    NoCgroup2 {
        /// What was mounted instead (a namespace's part of the hierarchy), if anything.
        seen: String,
    },
    /// A file-system operation on a pin or cgroup failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The object file could not be loaded (usually a kernel without the needed features).
    #[error("loading ambit's eBPF programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// The object file could not be loaded, and the agent lacks the capability to load it.
    #[error("loading ambit's eBPF programs needs {capability}, which the agent lacks")]
    Unprivileged {
        /// `CAP_…`.
        capability: &'static str,
        /// What the kernel answered.
        #[source]
        source: aya::EbpfError,
    },
    /// A program is missing from the object file.
    #[error("eBPF program {0} is missing from the object file")]
    MissingProgram(&'static str),
    /// A map is missing from the object file.
    #[error("eBPF map {0} is missing from the object file")]
    MissingMap(&'static str),
    /// Loading (verifying) or attaching one program failed.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        source: ProgramError,
    },
    /// The kernel refused to load a program: usually a kernel without a feature ambit needs.
    #[error(
        "the kernel refused eBPF program {name} ({reason}); ambit needs BPF with BTF, cgroup v2 \
         sock_addr and sock_ops hooks and sk_lookup (Linux 5.15 or newer); run with RUST_LOG=debug \
         for the verifier's log"
    )]
    Rejected {
        /// The program.
        name: &'static str,
        /// The kernel's error.
        reason: std::io::Error,
    },
    /// A pinned link could not be opened or replaced.
    #[error("pinned link {path}: {source}")]
    Link {
        /// The pin.
        path: PathBuf,
        /// Why.
        source: LinkError,
    },
    /// Pinning failed.
    #[error("pinning {path}: {source}")]
    Pin {
        /// The pin.
        path: PathBuf,
        /// Why.
        source: aya::pin::PinError,
    },
    /// A map operation failed.
    #[error("eBPF map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// Why.
        source: MapError,
    },
}

/// The loaded datapath of one agent instance.
///
/// It holds its own reference to every link and map it pins: removing a pin while the agent
/// runs detaches nothing, and [`Datapath::verify`] puts the pin back.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    enrolled: HashMap<MapData, u64, Enrolled>,
    traced: HashMap<MapData, u64, u32>,
    listeners: SockHash<MapData, IpAddr>,
    hbone_listeners: SockHash<MapData, IpAddr>,
    /// The programs attached at the cgroup root, by program name.
    cgroup_links: Vec<(&'static str, pin::Held)>,
    /// The inbound program linked into each enrolled netns, by netns cookie.
    netns_links: std::collections::HashMap<u64, pin::Held>,
    maps: Vec<pin::Held>,
    owner: aya::maps::Array<MapData, Owner>,
    me: Owner,
}

/// What one [`Datapath::verify`] round found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathCheck {
    /// What was missing and is back (a pin removed, a link detached), in words.
    pub repaired: Vec<String>,
    /// What is missing and could not be put back.
    pub broken: Vec<String>,
}

impl DatapathCheck {
    /// Adds another round's findings.
    pub fn extend(&mut self, other: DatapathCheck) {
        self.repaired.extend(other.repaired);
        self.broken.extend(other.broken);
    }
}

/// The tracer's side of the datapath: the ring buffer for the flow reader, the rest for reports.
pub struct TraceMaps {
    /// Open and close events, resets.
    pub events: RingBuf<MapData>,
    /// Counters and names.
    pub stats: TraceStats,
}

/// Tracer health and kernel drop counters.
pub struct TraceStats {
    counters: PerCpuArray<MapData, u64>,
    drops: PerCpuArray<MapData, u64>,
    /// Names of kernel drop reasons, by value.
    pub drop_reason_names: std::collections::HashMap<u32, String>,
    /// Names of reset reasons, by value.
    pub reset_reason_names: std::collections::HashMap<u32, String>,
    /// Tracepoints that could not be attached, with why.
    pub missing: Vec<String>,
}

impl TraceStats {
    /// Events lost because the ring buffer was full (all CPUs).
    pub fn ring_full(&self) -> u64 {
        self.counters.get(&COUNTER_RING_FULL, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Kernel packet drops so far by reason value (all CPUs), non-zero only.
    pub fn drops(&self) -> Vec<(u32, u64)> {
        (0..DROP_REASON_SLOTS)
            .filter_map(|i| {
                let n: u64 = self.drops.get(&i, 0).ok()?.iter().sum();
                (n > 0).then_some((i, n))
            })
            .collect()
    }
}

/// What the proxies read from the kernel: where captured connections were going, and which
/// connections sockets of the node's own network namespace opened. Shared by every proxy task.
pub struct ProxyMaps {
    orig_dst: MapData,
    host_connections: MapData,
}

impl ProxyMaps {
    /// Where the connection from `port` on the loopback of netns `netns_cookie` was going. The
    /// record is used up: a later connection from the same port (or one made straight to the
    /// capture listener, which the kernel never redirected) finds none.
    pub fn take_orig_dst(&self, netns_cookie: u64, port: u16) -> Option<SockAddr> {
        let key = OrigDstKey { netns_cookie, port: u32::from(port), _pad: 0 };
        sys::take(self.orig_dst.fd().as_fd(), &key).ok().flatten()
    }

    /// Whether a socket of the node's own network namespace opened the connection from `src` to
    /// `dst` (a kubelet probe). The record is used up: it answers for one connection only.
    pub fn take_host_connection(&self, src: SocketAddr, dst: SocketAddr) -> bool {
        let key = ConnectionKey {
            src: kernel_ip(src.ip()),
            dst: kernel_ip(dst.ip()),
            src_port: u32::from(src.port()),
            dst_port: u32::from(dst.port()),
        };
        // One call answers and uses the record up at once.
        sys::take::<_, u64>(self.host_connections.fd().as_fd(), &key).ok().flatten().is_some()
    }
}

impl Datapath {
    /// Loads the programs with their maps pinned under `pin_root/<instance>`, re-using maps a
    /// previous agent of the same instance left there, and attaches the outbound programs at the
    /// cgroup v2 root, replacing that agent's links without a gap.
    pub fn load(
        pin_root: &Path,
        instance: &str,
        flow_buffer_bytes: u32,
    ) -> Result<(Self, ProxyMaps, TraceMaps), BpfError> {
        if PROGRAMS.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        ensure_bpffs(Path::new(BPFFS))?;
        let cgroup_root = cgroup2_root()?;
        let pin_dir = pin_root.join(instance);
        for dir in [pin_dir.clone(), pin_dir.join("links"), pin_dir.join("netns")] {
            fs::create_dir_all(&dir).map_err(|source| BpfError::Io {
                what: "creating",
                path: dir,
                source,
            })?;
        }
        let layouts = TracepointLayouts::read();
        // The event buffer holds nothing worth keeping across agents, and its size is a setting:
        // start it afresh rather than fail on a pin of another size.
        let _ = fs::remove_file(pin_dir.join("FLOW_EVENTS"));
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&pin_dir);
        loader.map_max_entries("FLOW_EVENTS", flow_buffer_bytes);
        for (global, value) in &layouts.globals {
            loader.override_global(global, value, true);
        }
        // The node's own network namespace is the agent's: connections its sockets open are
        // the ones exempt from STRICT (kubelet probes).
        let host_netns = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| crate::sys::netns_cookie(&s))
            .map_err(|source| BpfError::Io {
                what: "reading the netns cookie of",
                path: "/proc/self/ns/net".into(),
                source,
            })?;
        loader.override_global("HOST_NETNS", &host_netns, true);
        let mut ebpf = loader.load(PROGRAMS).map_err(|source| {
            if capability::lacking(&source, Capability::SysAdmin) {
                BpfError::Unprivileged { capability: Capability::SysAdmin.name(), source }
            } else {
                BpfError::Load(source)
            }
        })?;

        let cgroup = File::open(&cgroup_root).map_err(|source| BpfError::Io {
            what: "opening cgroup",
            path: cgroup_root.clone(),
            source,
        })?;
        for name in CGROUP_SOCK_ADDR_PROGRAMS {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            loaded(name, program.load())?;
        }
        {
            let program: &mut SockOps = program_mut(&mut ebpf, SOCK_OPS_PROGRAM)?;
            loaded(SOCK_OPS_PROGRAM, program.load())?;
        }
        let mut cgroup_links = Vec::new();
        for name in CGROUP_SOCK_ADDR_PROGRAMS.into_iter().chain([SOCK_OPS_PROGRAM]) {
            let held = attach_cgroup(&mut ebpf, name, &cgroup, &cgroup_root, &pin_dir)?;
            cgroup_links.push((name, held));
        }
        {
            let name = SK_LOOKUP_PROGRAM;
            let program: &mut SkLookup = program_mut(&mut ebpf, name)?;
            loaded(name, program.load())?;
        }

        // Tracing is observability, not enforcement: a kernel without one of these tracepoints
        // still gets capture and policy, and says what it is missing.
        let mut missing = layouts.missing.clone();
        for (name, category, event) in TRACEPOINTS {
            if layouts.missing.iter().any(|m| m.starts_with(event)) {
                continue;
            }
            let program: &mut TracePoint = program_mut(&mut ebpf, name)?;
            let attached = loaded(name, program.load()).and_then(|()| {
                program.attach(category, event).map(drop).map_err(|source| BpfError::Program { name, source })
            });
            if let Err(e) = attached {
                warn!(tracepoint = %format!("{category}/{event}"), error = %e, "tracepoint not attached; flows lack what it reports");
                missing.push(format!("{event}: {e}"));
            }
        }

        let enrolled = take_map(&mut ebpf, "ENROLLED")?;
        let traced = take_map(&mut ebpf, "TRACED")?;
        let listeners = take_map(&mut ebpf, "INBOUND_LISTENERS")?;
        let hbone_listeners = take_map(&mut ebpf, "HBONE_LISTENERS")?;
        let mut owner: aya::maps::Array<MapData, Owner> = take_map(&mut ebpf, "OWNER")?;
        // Claim the instance: an agent still running from before (an upgrade) sees this and
        // leaves the shared state to us.
        let me = this_process();
        owner.set(0, me, 0).map_err(|source| BpfError::Map { map: "OWNER", source })?;
        // The map pins are the regular entries of the pin directory (links live in subfolders).
        let mut maps = Vec::new();
        let entries = fs::read_dir(&pin_dir).map_err(|source| BpfError::Io {
            what: "listing",
            path: pin_dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let path = entry.path();
                let held = pin::Held::from_pin(&path).map_err(|source| BpfError::Io {
                    what: "opening pinned map",
                    path,
                    source,
                })?;
                maps.push(held);
            }
        }
        let proxy_maps = ProxyMaps {
            orig_dst: take_map_data(&mut ebpf, "ORIG_DST")?,
            host_connections: take_map_data(&mut ebpf, "HOST_CONNECTIONS")?,
        };
        let trace = TraceMaps {
            events: take_map(&mut ebpf, "FLOW_EVENTS")?,
            stats: TraceStats {
                counters: take_map(&mut ebpf, "TRACE_COUNTERS")?,
                drops: take_map(&mut ebpf, "DROP_REASONS")?,
                drop_reason_names: layouts.drop_reasons,
                reset_reason_names: layouts.reset_reasons,
                missing,
            },
        };
        info!(pin_dir = %pin_dir.display(), cgroup = %cgroup_root.display(), "eBPF programs attached");
        let datapath = Self {
            ebpf,
            pin_dir,
            cgroup_root,
            enrolled,
            traced,
            listeners,
            hbone_listeners,
            cgroup_links,
            netns_links: std::collections::HashMap::new(),
            maps,
            owner,
            me,
        };
        Ok((datapath, proxy_maps, trace))
    }

    /// Checks every pin and attachment this agent holds and puts back what is missing: a pin
    /// removed from bpffs is pinned again from the agent's own reference, a detached link is
    /// attached anew (for a netns, the one `netns_of` gives for its cookie).
    pub fn verify(
        &mut self,
        netns_of: &dyn Fn(u64) -> Option<std::sync::Arc<crate::sys::netns::Netns>>,
    ) -> DatapathCheck {
        let mut check = DatapathCheck::default();
        for held in &self.maps {
            record(&mut check, "pinned map", held.path(), held.check(false));
        }
        let detached = check_links(&mut check, "cgroup link", self.cgroup_links.iter().map(|(n, h)| (*n, h)));
        for name in detached {
            let cgroup = File::open(&self.cgroup_root);
            let attached = cgroup
                .map_err(|source| BpfError::Io {
                    what: "opening cgroup",
                    path: self.cgroup_root.clone(),
                    source,
                })
                .and_then(|cgroup| {
                    attach_cgroup(&mut self.ebpf, name, &cgroup, &self.cgroup_root, &self.pin_dir)
                });
            match attached {
                Ok(held) => {
                    if let Some(slot) = self.cgroup_links.iter_mut().find(|(n, _)| *n == name) {
                        slot.1 = held;
                    }
                    check.repaired.push(format!("cgroup program {name} was detached; attached again"));
                }
                Err(e) => check
                    .broken
                    .push(format!("cgroup program {name} is detached and re-attaching failed: {e}")),
            }
        }
        let detached = check_links(&mut check, "netns link", self.netns_links.iter().map(|(c, h)| (*c, h)));
        for cookie in detached {
            match netns_of(cookie) {
                Some(netns) => match self.link_netns(&*netns, cookie) {
                    Ok(()) => check
                        .repaired
                        .push(format!("inbound program of netns {cookie} was detached; linked again")),
                    Err(e) => check.broken.push(format!(
                        "inbound program of netns {cookie} is detached and re-linking failed: {e}"
                    )),
                },
                None => check.broken.push(format!("inbound program of netns {cookie} is detached")),
            }
        }
        check
    }

    /// Starts or stops tracing the sockets of a netns.
    pub fn trace_netns(&mut self, cookie: u64, on: bool) -> Result<(), BpfError> {
        let result = if on { self.traced.insert(cookie, 1, 0) } else { removed(self.traced.remove(&cookie)) };
        result.map_err(|source| BpfError::Map { map: "TRACED", source })
    }

    /// Cookies of traced network namespaces, including ones a previous agent left.
    pub fn traced_netns(&self) -> Vec<u64> {
        self.traced.keys().filter_map(Result::ok).collect()
    }

    /// The instance's pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The cgroup v2 root the outbound programs are attached to.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The pid of a newer agent that took this instance over (an upgrade), if one did and still
    /// runs; this agent must then leave the shared state alone. An owner that has gone (it
    /// crashed while starting) gives the instance back.
    pub fn superseded_by(&mut self) -> Option<u32> {
        let owner = self.owner.get(&0, 0).ok()?;
        if owner == self.me {
            return None;
        }
        if process(owner.pid).is_some_and(|alive| alive == owner) {
            return Some(owner.pid);
        }
        warn!(owner = owner.pid, "the agent that took this instance over is gone; taking it back");
        let _ = self.owner.set(0, self.me, 0);
        None
    }

    /// Steers new inbound TCP connections of the netns `netns` to the listeners of
    /// [`Datapath::set_listener`], dropping them while there is none; pinned as
    /// `netns/<cookie>` so it survives the agent. A link already held for the netns is replaced
    /// (the new one is attached before the old one goes).
    pub fn link_netns(&mut self, netns: impl AsFd, cookie: u64) -> Result<(), BpfError> {
        let name = SK_LOOKUP_PROGRAM;
        let program: &mut SkLookup = program_mut(&mut self.ebpf, name)?;
        let id = program.attach(netns).map_err(|source| BpfError::Program { name, source })?;
        let link = program.take_link(id).map_err(|source| BpfError::Program { name, source })?;
        let path = self.netns_pin(cookie);
        let held = pin_held(FdLink::from(link), &path)?;
        self.netns_links.insert(cookie, held);
        Ok(())
    }

    /// Whether this agent holds the inbound link of a netns.
    pub fn holds_netns_link(&self, cookie: u64) -> bool {
        self.netns_links.contains_key(&cookie)
    }

    /// Removes the inbound steering of a netns: our reference and its pin.
    pub fn unlink_netns(&mut self, cookie: u64) -> Result<(), BpfError> {
        self.netns_links.remove(&cookie);
        remove_pin(&self.netns_pin(cookie))
    }

    /// Cookies of the network namespaces that have a pinned inbound link, including ones a
    /// previous agent left.
    pub fn linked_netns(&self) -> Vec<u64> {
        let dir = self.pin_dir.join("netns");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
    }

    /// Turns outbound capture on for a netns.
    pub fn enroll(&mut self, cookie: u64, pod: Enrolled) -> Result<(), BpfError> {
        self.enrolled.insert(cookie, pod, 0).map_err(|source| BpfError::Map { map: "ENROLLED", source })
    }

    /// Turns outbound capture off for a netns; a missing entry is not an error.
    pub fn unenroll(&mut self, cookie: u64) -> Result<(), BpfError> {
        removed(self.enrolled.remove(&cookie)).map_err(|source| BpfError::Map { map: "ENROLLED", source })
    }

    /// Cookies of all enrolled network namespaces, including ones a previous agent left.
    pub fn enrolled_netns(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Registers the listeners of a pod address: plaintext capture (every port but HBONE's)
    /// and HBONE.
    pub fn set_listener(
        &mut self,
        ip: IpAddr,
        inbound: &impl std::os::fd::AsRawFd,
        hbone: &impl std::os::fd::AsRawFd,
    ) -> Result<(), BpfError> {
        self.hbone_listeners
            .insert(ip, hbone.as_raw_fd(), 0)
            .map_err(|source| BpfError::Map { map: "HBONE_LISTENERS", source })?;
        self.listeners
            .insert(ip, inbound.as_raw_fd(), 0)
            .map_err(|source| BpfError::Map { map: "INBOUND_LISTENERS", source })
    }

    /// Forgets the listeners of a pod address.
    pub fn clear_listener(&mut self, ip: IpAddr) -> Result<(), BpfError> {
        removed(self.listeners.remove(&ip))
            .map_err(|source| BpfError::Map { map: "INBOUND_LISTENERS", source })?;
        removed(self.hbone_listeners.remove(&ip))
            .map_err(|source| BpfError::Map { map: "HBONE_LISTENERS", source })
    }

    /// Pod addresses that have both listeners registered (a closed listener leaves by itself).
    pub fn listening(&self) -> std::collections::HashSet<std::net::IpAddr> {
        let keys = |map: &SockHash<MapData, IpAddr>| -> std::collections::HashSet<std::net::IpAddr> {
            map.keys().filter_map(Result::ok).filter_map(|k| kernel_to_ip(&k)).collect()
        };
        let hbone = keys(&self.hbone_listeners);
        keys(&self.listeners).into_iter().filter(|ip| hbone.contains(ip)).collect()
    }

    fn netns_pin(&self, cookie: u64) -> PathBuf {
        self.pin_dir.join("netns").join(cookie.to_string())
    }
}

/// Offsets for the tracepoint programs' globals, from tracefs.
struct TracepointLayouts {
    globals: Vec<(&'static str, u32)>,
    drop_reasons: std::collections::HashMap<u32, String>,
    reset_reasons: std::collections::HashMap<u32, String>,
    /// Events whose layout could not be read, with why.
    missing: Vec<String>,
}

/// The tracepoint fields each program reads: (category, event, [(global, field)]).
type FieldTable = [(&'static str, &'static str, &'static [(&'static str, &'static str)]); 3];

const TRACEPOINT_FIELDS: FieldTable = [
    (
        "tcp",
        "tcp_send_reset",
        &[
            ("SEND_RESET_STATE", "state"),
            ("SEND_RESET_REASON", "reason"),
            ("SEND_RESET_SADDR", "saddr"),
            ("SEND_RESET_DADDR", "daddr"),
        ],
    ),
    (
        "tcp",
        "tcp_receive_reset",
        &[
            ("RECV_RESET_SPORT", "sport"),
            ("RECV_RESET_DPORT", "dport"),
            ("RECV_RESET_FAMILY", "family"),
            ("RECV_RESET_SADDR", "saddr"),
            ("RECV_RESET_DADDR", "daddr"),
            ("RECV_RESET_SADDR6", "saddr_v6"),
            ("RECV_RESET_DADDR6", "daddr_v6"),
            ("RECV_RESET_COOKIE", "sock_cookie"),
        ],
    ),
    ("skb", "kfree_skb", &[("KFREE_PROTOCOL", "protocol"), ("KFREE_REASON", "reason")]),
];

impl TracepointLayouts {
    fn read() -> Self {
        let mut layouts = Self {
            globals: Vec::new(),
            drop_reasons: std::collections::HashMap::new(),
            reset_reasons: std::collections::HashMap::new(),
            missing: Vec::new(),
        };
        if let Err(e) = tracefs::ensure_mounted() {
            layouts
                .missing
                .extend(TRACEPOINTS.iter().map(|(_, _, ev)| format!("{ev}: tracefs not available: {e}")));
            return layouts;
        }
        for (category, event, wanted) in TRACEPOINT_FIELDS {
            let format = match Format::read(category, event) {
                Ok(format) => format,
                Err(e) => {
                    layouts.missing.push(format!("{event}: {e}"));
                    continue;
                }
            };
            let offsets: Result<Vec<_>, String> =
                wanted.iter().map(|(global, field)| Ok((*global, format.offset(field)?))).collect();
            match offsets {
                Ok(offsets) => layouts.globals.extend(offsets),
                Err(e) => {
                    layouts.missing.push(format!("{event}: {e}"));
                    continue;
                }
            }
            match event {
                "kfree_skb" => layouts.drop_reasons = format.symbols,
                "tcp_send_reset" => layouts.reset_reasons = format.symbols,
                _ => {}
            }
        }
        layouts
    }
}

/// This process as the `OWNER` map records it.
fn this_process() -> Owner {
    process(std::process::id()).unwrap_or(Owner { pid: std::process::id(), _pad: 0, start_ticks: 0 })
}

/// A running process's pid and start time (the `starttime` of `/proc/<pid>/stat`).
fn process(pid: u32) -> Option<Owner> {
    let stat = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    Some(Owner { pid, _pad: 0, start_ticks: stat.starttime })
}

/// A removal of a key that was already gone succeeded: the state asked for holds. (The kernel
/// answers ENOENT, which aya reports as a failed syscall.)
fn removed(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The result of loading a program, with the verifier's log (often hundreds of lines) kept out of
/// the one-line error and logged at debug level.
fn loaded(name: &'static str, result: Result<(), ProgramError>) -> Result<(), BpfError> {
    match result {
        Ok(()) => Ok(()),
        Err(ProgramError::LoadError { io_error, verifier_log }) => {
            debug!(program = name, %verifier_log, "verifier log");
            Err(BpfError::Rejected { name, reason: capability::explain(io_error, Capability::SysAdmin) })
        }
        Err(source) => Err(BpfError::Program { name, source }),
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(BpfError::MissingProgram(name))?;
    program.try_into().map_err(|source| BpfError::Program { name, source })
}

/// A map to use through [`sys`] calls only.
fn take_map_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, BpfError> {
    match ebpf.take_map(name).ok_or(BpfError::MissingMap(name))? {
        aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => Ok(data),
        _ => Err(BpfError::MissingMap(name)),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { map: name, source })
}

/// Pins `link` at `path` and returns our own reference to it. An older link pinned there is
/// detached only after the new one is attached, so there is no moment without the program.
fn pin_held(link: FdLink, path: &Path) -> Result<pin::Held, BpfError> {
    remove_pin(path)?;
    let pinned = link.pin(path).map_err(|source| BpfError::Pin { path: path.to_owned(), source })?;
    let held = pin::Held::from_pin(path).map_err(|source| BpfError::Io {
        what: "opening pinned link",
        path: path.to_owned(),
        source,
    });
    // aya's reference closes here; the pin and ours remain.
    drop(pinned);
    debug!(pin = %path.display(), "link pinned");
    held
}

/// Attaches a loaded cgroup program at the cgroup root and pins it under `links/<name>`.
/// Through bpf_link_create a cgroup attachment always coexists with others (several agents on
/// one host each attach their own); `Single` only means "no legacy flags".
fn attach_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    cgroup_root: &Path,
    pin_dir: &Path,
) -> Result<pin::Held, BpfError> {
    let link = if name == SOCK_OPS_PROGRAM {
        let program: &mut SockOps = program_mut(ebpf, name)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|source| BpfError::Program { name, source })?;
        FdLink::try_from(program.take_link(id).map_err(|source| BpfError::Program { name, source })?)
    } else {
        let program: &mut CgroupSockAddr = program_mut(ebpf, name)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|source| BpfError::Program { name, source })?;
        FdLink::try_from(program.take_link(id).map_err(|source| BpfError::Program { name, source })?)
    }
    .map_err(|source| BpfError::Link { path: cgroup_root.to_owned(), source })?;
    pin_held(link, &pin_dir.join("links").join(name))
}

/// Checks held links, recording what was re-pinned or is broken; returns the detached ones.
fn check_links<'a, K>(
    check: &mut DatapathCheck,
    what: &str,
    links: impl Iterator<Item = (K, &'a pin::Held)>,
) -> Vec<K> {
    let mut detached = Vec::new();
    for (key, held) in links {
        let result = held.check(true);
        if result == pin::Check::Detached {
            detached.push(key);
        }
        record(check, what, held.path(), result);
    }
    detached
}

/// Adds what one held object's check found to `check`.
fn record(check: &mut DatapathCheck, what: &str, path: &Path, result: pin::Check) {
    match result {
        pin::Check::Intact | pin::Check::Detached => {}
        pin::Check::Repinned => {
            warn!(pin = %path.display(), "{what} pin was removed while the agent runs; pinned again");
            check.repaired.push(format!("{what} {} was unpinned; pinned again", path.display()));
        }
        pin::Check::Unpinnable(e) => {
            check.broken.push(format!("{what} {} is not pinned and pinning it failed: {e}", path.display()))
        }
    }
}

fn remove_pin(path: &Path) -> Result<(), BpfError> {
    if !path.exists() {
        return Ok(());
    }
    let old =
        PinnedLink::from_pin(path).map_err(|source| BpfError::Link { path: path.to_owned(), source })?;
    // Dropping the unpinned link closes its last reference, which detaches it.
    old.unpin().map(drop).map_err(|source| BpfError::Io { what: "unpinning", path: path.to_owned(), source })
}

/// Mounts bpffs at `path` unless it is already there (a fresh host or VM may not mount it),
/// but only where the mount reaches the host: a bpffs mounted inside a container whose volume
/// only receives the host's mounts would die with the container, and every pinned program
/// with it, so the agent refuses instead (fail closed, not open).
fn ensure_bpffs(path: &Path) -> Result<(), BpfError> {
    if crate::sys::fs_magic(path) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let mounts = mountinfo()?;
    if let Some(holder) = mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
    {
        let propagation = match holder.propagation {
            Propagation::Shared => None,
            Propagation::Slave => Some("a slave of the host's"),
            // Private is the rule on a host without systemd; only a mount namespace other than
            // init's (a container's, seen through hostPID) is sure to end with this process.
            Propagation::Private if !in_init_mount_namespace() => Some("private"),
            Propagation::Private => None,
        };
        if let Some(propagation) = propagation {
            return Err(BpfError::BpffsNotShared { path: path.to_owned(), propagation });
        }
    }
    nix::mount::mount(Some("bpf"), path, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|errno| BpfError::Bpffs { path: path.to_owned(), source: errno.into() })?;
    info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

/// Whether this process shares the mount namespace of PID 1 and of its parent (the container
/// runtime's shim, for a container with hostPID): `false` when either is readable and differs,
/// which is a container's own mount namespace, ended with it, and when it cannot tell.
fn in_init_mount_namespace() -> bool {
    // In a PID namespace of its own (no hostPID), PID 1 is the container's init and the shim is
    // out of sight: nothing would tell a container's mount namespace from the node's.
    if !in_initial_pid_namespace() {
        return false;
    }
    let Ok(own) = fs::read_link("/proc/self/ns/mnt") else { return false };
    let parent = std::os::unix::process::parent_id();
    ["/proc/1/ns/mnt".to_owned(), format!("/proc/{parent}/ns/mnt")]
        .iter()
        .filter_map(|p| fs::read_link(p).ok())
        .all(|other| other == own)
}

/// Whether this process is in the node's PID namespace: its `NSpid` has one entry.
fn in_initial_pid_namespace() -> bool {
    let status = procfs::process::Process::myself().and_then(|me| me.status());
    status.is_ok_and(|status| status.nspid.is_some_and(|ids| ids.len() == 1))
}

/// One line of `/proc/self/mountinfo`, as far as the agent looks.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    /// The mounted directory of the file system, as seen from this process's namespaces
    /// (`/..` components when it lies above this process's cgroup namespace root).
    root: String,
    mount_point: PathBuf,
    propagation: Propagation,
    fstype: String,
}

#[derive(Debug, PartialEq, Eq)]
enum Propagation {
    /// Mounts made below it reach its peers (the host's, for a shared or bidirectional mount).
    Shared,
    /// It receives the host's mounts and sends none back (`HostToContainer`).
    Slave,
    Private,
}

impl Mount {
    fn parse(line: &str) -> Option<Self> {
        use procfs::process::{MountInfo, MountOptFields};
        let mount = MountInfo::from_line(line).ok()?;
        let propagation = if mount.opt_fields.iter().any(|f| matches!(f, MountOptFields::Shared(_))) {
            Propagation::Shared
        } else if mount.opt_fields.iter().any(|f| matches!(f, MountOptFields::Master(_))) {
            Propagation::Slave
        } else {
            Propagation::Private
        };
        // procfs leaves the kernel's octal escapes (`\040` for a space) in the mount point.
        let mount_point = PathBuf::from(unescape_octal(&mount.mount_point.to_string_lossy()));
        Some(Self { root: mount.root, mount_point, propagation, fstype: mount.fs_type })
    }

    /// Whether this is all of a cgroup v2 hierarchy: mounted from its root, or from above the
    /// cgroup namespace this process is in (a container's view of the host's hierarchy reads
    /// `/../..`), and with no `cgroup.events`, which every cgroup but the root has.
    fn is_cgroup2_root(&self) -> bool {
        self.fstype == "cgroup2"
            && self.root.split('/').all(|c| c.is_empty() || c == "..")
            && !self.mount_point.join("cgroup.events").exists()
    }
}

/// Mount points in mountinfo escape space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .and_then(|o| std::str::from_utf8(o).ok())
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match (bytes[i], code) {
            (b'\\', Some(code)) => {
                out.push(code);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mountinfo() -> Result<Vec<Mount>, BpfError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| BpfError::Io {
        what: "reading",
        path: path.to_owned(),
        source,
    })?;
    Ok(text.lines().filter_map(Mount::parse).collect())
}

/// Finds the cgroup v2 hierarchy: `/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified` on
/// hybrid hosts, the host's hierarchy mounted into a container. Read from mountinfo rather
/// than assumed; a cgroup namespace's own part of the hierarchy is not enough (programs
/// attached there would miss every other pod).
pub fn cgroup2_root() -> Result<PathBuf, BpfError> {
    let mounts = mountinfo()?;
    let mut found: Vec<&Mount> = mounts.iter().filter(|m| m.is_cgroup2_root()).collect();
    found.sort_by_key(|m| m.mount_point.components().count());
    if let Some(root) = found.first() {
        return Ok(root.mount_point.clone());
    }
    let partial: Vec<String> = mounts
        .iter()
        .filter(|m| m.fstype == "cgroup2")
        .map(|m| format!("{} (a cgroup's subtree, not the root)", m.mount_point.display()))
        .collect();
    let seen = if partial.is_empty() {
        String::new()
    } else {
        format!(", only a part of it: {}", partial.join(", "))
    };
    Err(BpfError::NoCgroup2 { seen })
}

/// An IP address in the layout the kernel programs use.
pub fn kernel_ip(ip: std::net::IpAddr) -> IpAddr {
    match ip {
        std::net::IpAddr::V4(v4) => {
            IpAddr { family: AF_INET, addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0] }
        }
        std::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            IpAddr { family: AF_INET6, addr: [word(0), word(4), word(8), word(12)] }
        }
    }
}

/// The inverse of [`kernel_ip`]; `None` for an unset address.
pub fn kernel_to_ip(ip: &IpAddr) -> Option<std::net::IpAddr> {
    match ip.family {
        AF_INET => Some(Ipv4Addr::from(ip.addr[0].to_ne_bytes()).into()),
        AF_INET6 => {
            let mut octets = [0u8; 16];
            for (i, w) in ip.addr.iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(Ipv6Addr::from(octets).into())
        }
        _ => None,
    }
}

/// The inverse of [`kernel_ip`] for a full socket address.
pub fn from_kernel(addr: SockAddr) -> Option<SocketAddr> {
    Some(SocketAddr::new(kernel_to_ip(&addr.ip)?, u16::from_be(addr.port as u16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mountinfo_lines_as_a_container_sees_them() {
        // A container's view (private cgroup namespace) of the host's hierarchy, podman's
        // own namespaced cgroup mount, a HostToContainer volume and a shared host mount.
        let host = Mount::parse("102 92 0:38 /../.. /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw")
            .expect("parses");
        assert_eq!(
            (host.root.as_str(), host.mount_point.as_path()),
            ("/../..", Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(host.propagation, Propagation::Private);
        let slave = Mount::parse("103 84 0:22 /fs/bpf /sys/fs/bpf rw,relatime master:7 - sysfs sysfs rw")
            .expect("parses");
        assert_eq!(slave.propagation, Propagation::Slave);
        let shared = Mount::parse("24 1 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw").expect("parses");
        assert_eq!(shared.propagation, Propagation::Shared);
        let spaced = Mount::parse(r"30 1 0:40 / /mnt/with\040space rw - tmpfs tmpfs rw").expect("parses");
        assert_eq!(spaced.mount_point, Path::new("/mnt/with space"));
        assert_eq!(Mount::parse("garbage"), None);
    }

    #[test]
    fn a_cgroup_namespaces_own_part_is_not_the_root() {
        let real = cgroup2_root().expect("cgroup2 mounted");
        let line = |root: &str, at: &Path| format!("1 1 0:1 {root} {} rw - cgroup2 cgroup2 rw", at.display());
        assert!(Mount::parse(&line("/", &real)).expect("parses").is_cgroup2_root());
        assert!(Mount::parse(&line("/../..", &real)).expect("parses").is_cgroup2_root());
        // A cgroup below the root, mounted as a namespace's root would be: it has cgroup.events
        // (the host may have no child cgroup to point at, and making one needs root).
        let child = std::env::temp_dir().join(format!("ambit-cgroup-child-{}", std::process::id()));
        std::fs::create_dir_all(&child).expect("temporary directory");
        std::fs::write(child.join("cgroup.events"), "populated 0\nfrozen 0\n").expect("cgroup.events");
        let below = Mount::parse(&line("/", &child)).expect("parses").is_cgroup2_root();
        std::fs::remove_dir_all(&child).expect("cleanup");
        assert!(!below);
        assert!(!Mount::parse(&line("/kubepods", &real)).expect("parses").is_cgroup2_root());
    }

    #[test]
    fn finds_a_cgroup2_mount() {
        // Every machine this project runs on has cgroup v2 somewhere; the path must be a dir.
        let root = cgroup2_root().expect("cgroup2 mounted");
        assert!(root.join("cgroup.procs").exists(), "{} is not a cgroup2 root", root.display());
    }

    #[test]
    fn removing_what_is_already_gone_succeeds() {
        let gone = |errno| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error: io::Error::from_raw_os_error(errno),
            })
        };
        assert!(removed(Err(gone(libc::ENOENT))).is_ok());
        assert!(removed(Err(gone(libc::EPERM))).is_err(), "other failures stay failures");
    }

    #[test]
    fn kernel_layout_round_trips() {
        for addr in ["10.1.2.3:8080", "[fd00::1:2]:443"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            let kernel = SockAddr { ip: kernel_ip(addr.ip()), port: u32::from(addr.port().to_be()) };
            assert_eq!(from_kernel(kernel), Some(addr));
        }
        // The kernel stores 10.1.2.3 with the first octet in the lowest byte in memory.
        assert_eq!(kernel_ip("10.1.2.3".parse().expect("ip")).addr[0].to_ne_bytes(), [10, 1, 2, 3]);
    }
}
