//! Library target so that `agent/build.rs` can declare a build dependency on this crate; the
//! programs themselves live in the `ambit` binary target (`src/main.rs`).
#![no_std]
