//! HBONE CONNECT authorities from a peer agent: whatever it sends, an accepted one names the
//! address the tunnel arrived on and none of the agent's own ports.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;

const AGENT_PORTS: [u16; 3] = [15001, 15006, 15008];

fuzz_target!(|text: &str| {
    for local in ["10.0.0.3:15008", "[fd00::3]:15008"] {
        let local: SocketAddr = local.parse().expect("address");
        if let Ok(dst) = ambit::fuzzing::connect_authority(text, local) {
            assert_eq!(dst.ip(), local.ip(), "{text:?} reached another address");
            assert!(!AGENT_PORTS.contains(&dst.port()), "{text:?} reached an agent port");
        }
    }
});
