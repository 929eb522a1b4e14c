//! The flow history stays within the memory `--flow-history` documents, however varied the
//! traffic: 100,000 distinct kinds of connection into a history of the default size, with a
//! counting allocator as the judge (this test binary's own global allocator).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicIsize, Ordering::Relaxed},
};

use ambit::{
    policy::{ConnectionInput, Outcome},
    schema::ObjectKey,
    telemetry::history::{DEFAULT_ENTRIES, ENTRY_BYTES, FlowHistory},
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only the sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_hundred_thousand_distinct_flows_stay_within_the_documented_bound() {
    let before = LIVE.load(Relaxed);
    let history = FlowHistory::new(DEFAULT_ENTRIES);
    for i in 0..100_000u32 {
        // The worst case: every connection from another address, under another identity
        // (Kubernetes allows 63-character names), into one of 100 pods.
        let namespace = format!("tenant-{:0>56}", i % 5000);
        let input = ConnectionInput {
            principal: Some(format!("cluster.local/ns/{namespace}/sa/{:0>63}", i)),
            namespace: Some(namespace),
            source_ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            destination: SocketAddr::from(([10, 1, 0, (i % 100) as u8], 8080)),
        };
        let pod = ObjectKey { namespace: "shop".into(), name: format!("backend-{:0>57}", i % 100) };
        history.record(&pod, &input, if i % 3 == 0 { Outcome::Denied } else { Outcome::Allowed });
    }
    let used = LIVE.load(Relaxed) - before;
    assert_eq!(history.len(), DEFAULT_ENTRIES, "full, not past full");
    let bound = (DEFAULT_ENTRIES * ENTRY_BYTES) as isize;
    assert!(used <= bound, "{used} bytes held for {DEFAULT_ENTRIES} entries; documented at most {bound}");
    // The entries kept are the most recent ones.
    let newest = history.entries(None).first().map(|e| e.input.source_ip);
    assert_eq!(newest, Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + 99_999))));
    println!("{} bytes per entry", used / DEFAULT_ENTRIES as isize);
}
