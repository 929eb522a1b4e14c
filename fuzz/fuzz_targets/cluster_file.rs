//! Cluster files and the policies in them, compiled as the agent compiles them: any text gives a
//! snapshot or an error that names the file, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = ambit::discovery::local::parse(Path::new("fuzz.yaml"), text, "istio-system") {
        let message = e.to_string();
        assert!(message.contains("fuzz.yaml") || message.starts_with("Kubernetes"), "{message}");
    }
});
