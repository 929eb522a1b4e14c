//! Query strings of the admin API: decoding never panics and never grows the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let decoded = ambit::fuzzing::percent_decode(text);
    assert!(decoded.len() <= text.len(), "{text:?} grew to {decoded:?}");
});
