//! The few `bpf(2)` commands aya 0.14 does not offer on the objects the agent needs them for:
//! pinning a link by descriptor, opening a pin, reading whether a link is still attached, and
//! looking up and deleting a map entry in one call (without `&mut` on the map).

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// `union bpf_attr` for the map element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The start of `struct bpf_link_info`: the type-specific union begins at byte 16.
#[repr(C)]
#[derive(Default)]
struct LinkInfoHead {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// `netns.netns_ino`, or the first half of `cgroup.cgroup_id`: zero once detached.
    word0: u32,
    /// `netns.attach_type`, or the second half of `cgroup.cgroup_id`.
    word1: u32,
    _tail: [u32; 10],
}

const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_NETNS: u32 = 5;

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points to a live, initialised attribute struct of `size` bytes that the
    // kernel reads (and, for info, writes through the pointer it contains).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a pin path"))
}

/// Opens the object pinned at `path` (a new reference of our own).
pub(crate) fn get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr { pathname: path.as_ptr() as u64, ..ObjAttr::default() };
    let fd = bpf(BPF_OBJ_GET, (&raw mut attr).cast(), size_of::<ObjAttr>())?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object behind `fd` at `path`, which must not exist.
pub(crate) fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr =
        ObjAttr { pathname: path.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, ..ObjAttr::default() };
    bpf(BPF_OBJ_PIN, (&raw mut attr).cast(), size_of::<ObjAttr>()).map(drop)
}

/// What the kernel says about a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LinkState {
    /// The link's id.
    pub(crate) id: u32,
    /// False once the link was detached (`bpftool link detach`, or its cgroup or netns is gone).
    pub(crate) attached: bool,
}

/// Reads a link's id and whether it is still attached to its target.
pub(crate) fn link_state(fd: BorrowedFd<'_>) -> io::Result<LinkState> {
    let mut info = LinkInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<LinkInfoHead>() as u32,
        info: (&raw mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, (&raw mut attr).cast(), size_of::<InfoAttr>())?;
    // The kernel clears the target (cgroup id, netns inode) when a link is detached.
    let attached = match info.link_type {
        BPF_LINK_TYPE_CGROUP => info.word0 != 0 || info.word1 != 0,
        BPF_LINK_TYPE_NETNS => info.word0 != 0,
        _ => true,
    };
    Ok(LinkState { id: info.id, attached })
}

/// The id of the object pinned at `path`, if it is a link.
pub(crate) fn pinned_link_id(path: &Path) -> io::Result<u32> {
    Ok(link_state(get(path)?.as_fd())?.id)
}

/// Looks up the entry `key` and deletes it in one step: the value, or `None` if there was none.
pub(crate) fn take<K: aya::Pod, V: aya::Pod + Default>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: (&raw mut value) as u64,
        ..ElemAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, (&raw mut attr).cast(), size_of::<ElemAttr>()) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
