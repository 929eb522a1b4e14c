//! SPIFFE IDs, as they arrive in a peer's certificate and in CSRs: any text parses or is
//! refused, and what parses prints back to itself.
#![no_main]

use ambit::identity::Identity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(id) = Identity::parse(text) {
        let again = Identity::parse(&id.to_string()).expect("a parsed ID parses again");
        assert_eq!(again, id);
    }
});
