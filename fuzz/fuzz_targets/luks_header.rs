#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::luks_header`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::luks_header(data));
