//! The DER reader behind the CA's key file: any bytes are wrapped or refused, never a panic or
//! a read past the input; what is wrapped is one PKCS#8 SEQUENCE holding the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Some(pkcs8) = ambit::fuzzing::sec1_to_pkcs8(bytes) {
        assert_eq!(pkcs8.first(), Some(&0x30));
        assert!(pkcs8.windows(bytes.len().max(1)).any(|w| w == bytes) || bytes.is_empty());
    }
});
