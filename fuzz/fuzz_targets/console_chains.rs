#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::console_chains`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::console_chains(data));
