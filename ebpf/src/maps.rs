//! The maps shared by the programs and the agent. All are pinned by name under the agent's
//! instance directory, so that they outlive the agent process and a restarted agent re-opens
//! the same state (enforcement never lapses).

use ambit_common::{ConnectionKey, Enrolled, IpAddr, OrigDstKey, Owner, SockAddr};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, SockHash},
};

/// Enrolled network namespaces, by netns cookie. Written by the agent only.
#[map]
pub(crate) static ENROLLED: HashMap<u64, Enrolled> = HashMap::pinned(16_384, 0);

/// Original destination of each captured socket, by socket cookie. Written at `connect()`,
/// read by `sock_ops` and `getpeername()`. LRU: entries of closed sockets age out by themselves.
#[map]
pub(crate) static SOCK_ORIG: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65_536, 0);

/// Original destination of each captured connection as the agent sees it: by (netns cookie,
/// client port on the pod loopback). Written when the connection is established.
#[map]
pub(crate) static ORIG_DST: LruHashMap<OrigDstKey, SockAddr> = LruHashMap::pinned(65_536, 0);

/// Connections opened by sockets of the node's own network namespace, while they are open: the
/// agent lets exactly these past STRICT (kubelet probes). Written and removed by `sock_ops`; the
/// agent removes an entry once it has seen its connection.
#[map]
pub(crate) static HOST_CONNECTIONS: LruHashMap<ConnectionKey, u64> = LruHashMap::pinned(16_384, 0);

/// The agent's inbound listener of each enrolled pod, by pod IP. A closed listener leaves the
/// map by itself, which is what makes a dead agent fail closed.
#[map]
pub(crate) static INBOUND_LISTENERS: SockHash<IpAddr> = SockHash::pinned(16_384, 0);

/// The agent's HBONE listener of each enrolled pod, by pod IP: port 15008 is steered too, so
/// that an application holding that port in a pod whose capture failed never receives it.
#[map]
pub(crate) static HBONE_LISTENERS: SockHash<IpAddr> = SockHash::pinned(16_384, 0);

/// Connections opened inside an enrolled pod to the pod's own address (the agent delivering to
/// the app, or the app reaching itself), while they are open: `sk_lookup` passes exactly these
/// and drops any other packet claiming the pod's own address as its source (IPv6 does not drop
/// such packets by itself). Written and removed by `sock_ops`.
#[map]
pub(crate) static LOCAL_CONNECTIONS: LruHashMap<ConnectionKey, u64> = LruHashMap::pinned(16_384, 0);

/// Which agent process owns this instance's state; read and written by agents only (a new
/// agent claims it when it starts, the one it replaces then leaves the shared state alone).
#[map]
pub(crate) static OWNER: Array<Owner> = Array::pinned(1, 0);
