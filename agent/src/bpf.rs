//! The kernel side, seen from the agent: load ambit's eBPF programs, attach and pin them, and
//! give typed access to the maps they share with us.
//!
//! Everything is pinned under `<bpffs>/ambit/<instance>/` so that enforcement outlives the agent
//! process: a killed agent leaves its programs attached and its maps in place (new connections
//! then fail closed), and the next agent re-opens the same maps and replaces the links.

use std::{
    fs::{self, File},
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use ambit_common::{Enrolled, IpAddr, OrigDstKey, SockAddr};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use tracing::{debug, info};

/// The kernel programs, built by `build.rs` from the `ambit-ebpf` crate.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit"));

/// Where bpffs is mounted on every Linux distribution we know of.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Programs attached once at the cgroup v2 root, by name in the object file.
const CGROUP_SOCK_ADDR_PROGRAMS: [&str; 4] =
    ["capture_connect4", "capture_connect6", "restore_peername4", "restore_peername6"];
const SOCK_OPS_PROGRAM: &str = "track_established";
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
    /// No cgroup v2 hierarchy was found.
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); ambit needs cgroup v2 to capture connections"
    )]
    NoCgroup2,
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
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    enrolled: HashMap<MapData, u64, Enrolled>,
    listeners: SockHash<MapData, IpAddr>,
}

/// Read-only view of the original destinations of captured connections; cheap to share with
/// every proxy task.
pub struct OrigDstMap {
    map: HashMap<MapData, OrigDstKey, SockAddr>,
}

impl OrigDstMap {
    /// Where the connection from `port` on the loopback of netns `netns_cookie` was going.
    pub fn get(&self, netns_cookie: u64, port: u16) -> Option<SockAddr> {
        let key = OrigDstKey { netns_cookie, port: u32::from(port), _pad: 0 };
        self.map.get(&key, 0).ok()
    }
}

impl Datapath {
    /// Loads the programs with their maps pinned under `pin_root/<instance>`, re-using maps a
    /// previous agent of the same instance left there, and attaches the outbound programs at the
    /// cgroup v2 root, replacing that agent's links without a gap.
    pub fn load(pin_root: &Path, instance: &str) -> Result<(Self, OrigDstMap), BpfError> {
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
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&pin_dir).load(PROGRAMS)?;

        let cgroup = File::open(&cgroup_root).map_err(|source| BpfError::Io {
            what: "opening cgroup",
            path: cgroup_root.clone(),
            source,
        })?;
        // Through bpf_link_create a cgroup attachment always coexists with others (several
        // agents on one host each attach their own); `Single` only means "no legacy flags".
        for name in CGROUP_SOCK_ADDR_PROGRAMS {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            loaded(name, program.load())?;
            let id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| BpfError::Program { name, source })?;
            let link = program.take_link(id).map_err(|source| BpfError::Program { name, source })?;
            let link = FdLink::try_from(link)
                .map_err(|source| BpfError::Link { path: cgroup_root.clone(), source })?;
            replace_pin(link, &pin_dir.join("links").join(name))?;
        }
        {
            let name = SOCK_OPS_PROGRAM;
            let program: &mut SockOps = program_mut(&mut ebpf, name)?;
            loaded(name, program.load())?;
            let id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| BpfError::Program { name, source })?;
            let link = program.take_link(id).map_err(|source| BpfError::Program { name, source })?;
            let link = FdLink::try_from(link)
                .map_err(|source| BpfError::Link { path: cgroup_root.clone(), source })?;
            replace_pin(link, &pin_dir.join("links").join(name))?;
        }
        {
            let name = SK_LOOKUP_PROGRAM;
            let program: &mut SkLookup = program_mut(&mut ebpf, name)?;
            loaded(name, program.load())?;
        }

        let enrolled = take_map(&mut ebpf, "ENROLLED")?;
        let listeners = take_map(&mut ebpf, "INBOUND_LISTENERS")?;
        let orig_dst = OrigDstMap { map: take_map(&mut ebpf, "ORIG_DST")? };
        info!(pin_dir = %pin_dir.display(), cgroup = %cgroup_root.display(), "eBPF programs attached");
        Ok((Self { ebpf, pin_dir, cgroup_root, enrolled, listeners }, orig_dst))
    }

    /// The instance's pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The cgroup v2 root the outbound programs are attached to.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Steers new inbound TCP connections of the netns `netns` to the listener in
    /// [`Datapath::set_listener`]; pinned as `netns/<cookie>` so it survives the agent.
    pub fn link_netns(&mut self, netns: impl AsFd, cookie: u64) -> Result<(), BpfError> {
        let name = SK_LOOKUP_PROGRAM;
        let program: &mut SkLookup = program_mut(&mut self.ebpf, name)?;
        let id = program.attach(netns).map_err(|source| BpfError::Program { name, source })?;
        let link = program.take_link(id).map_err(|source| BpfError::Program { name, source })?;
        let link = FdLink::from(link);
        replace_pin(link, &self.netns_pin(cookie))
    }

    /// Removes the inbound steering of a netns (its pinned link).
    pub fn unlink_netns(&mut self, cookie: u64) -> Result<(), BpfError> {
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
        match self.enrolled.remove(&cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(BpfError::Map { map: "ENROLLED", source }),
        }
    }

    /// Cookies of all enrolled network namespaces, including ones a previous agent left.
    pub fn enrolled_netns(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Registers the inbound listener for a pod address.
    pub fn set_listener(&mut self, ip: IpAddr, listener: &impl std::os::fd::AsRawFd) -> Result<(), BpfError> {
        self.listeners
            .insert(ip, listener.as_raw_fd(), 0)
            .map_err(|source| BpfError::Map { map: "INBOUND_LISTENERS", source })
    }

    /// Forgets the inbound listener of a pod address.
    pub fn clear_listener(&mut self, ip: IpAddr) -> Result<(), BpfError> {
        match self.listeners.remove(&ip) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(BpfError::Map { map: "INBOUND_LISTENERS", source }),
        }
    }

    fn netns_pin(&self, cookie: u64) -> PathBuf {
        self.pin_dir.join("netns").join(cookie.to_string())
    }
}

/// The result of loading a program, with the verifier's log (often hundreds of lines) kept out of
/// the one-line error and logged at debug level.
fn loaded(name: &'static str, result: Result<(), ProgramError>) -> Result<(), BpfError> {
    match result {
        Ok(()) => Ok(()),
        Err(ProgramError::LoadError { io_error, verifier_log }) => {
            debug!(program = name, %verifier_log, "verifier log");
            Err(BpfError::Rejected { name, reason: io_error })
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

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { map: name, source })
}

/// Pins `link` at `path`; an older link pinned there is detached only after the new one is
/// attached, so there is no moment without the program.
fn replace_pin(link: FdLink, path: &Path) -> Result<(), BpfError> {
    remove_pin(path)?;
    link.pin(path).map_err(|source| BpfError::Pin { path: path.to_owned(), source })?;
    debug!(pin = %path.display(), "link pinned");
    Ok(())
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

/// Mounts bpffs at `path` unless it is already there (a fresh host or VM may not mount it).
fn ensure_bpffs(path: &Path) -> Result<(), BpfError> {
    if fs_magic(path) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| BpfError::Bpffs { path: path.to_owned(), source: io::Error::other(e) })?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(BpfError::Bpffs { path: path.to_owned(), source: io::Error::last_os_error() });
    }
    info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs is plain old data; zeroed is a valid initial value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and a valid out-pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between libcs")]
    (rc == 0).then_some(stat.f_type as i64)
}

/// Finds the cgroup v2 hierarchy: `/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified` on
/// hybrid hosts. Read from mountinfo rather than assumed.
pub fn cgroup2_root() -> Result<PathBuf, BpfError> {
    let path = Path::new("/proc/self/mountinfo");
    let mountinfo = fs::read_to_string(path).map_err(|source| BpfError::Io {
        what: "reading",
        path: path.to_owned(),
        source,
    })?;
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mount-point options ... - fstype source ...
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let root = pre.split_whitespace().nth(3)?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(mount_point))
        })
        .collect();
    found.sort_by_key(|p| p.components().count());
    found.into_iter().next().ok_or(BpfError::NoCgroup2)
}

/// The netns cookie (`SO_NETNS_COOKIE`) of the namespace a socket lives in.
pub fn netns_cookie(socket: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and an out-buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cgroup2_mount() {
        // Every machine this project runs on has cgroup v2 somewhere; the path must be a dir.
        let root = cgroup2_root().expect("cgroup2 mounted");
        assert!(root.join("cgroup.procs").exists(), "{} is not a cgroup2 root", root.display());
    }
}
