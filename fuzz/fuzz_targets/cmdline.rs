#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::cmdline`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::cmdline(data));
