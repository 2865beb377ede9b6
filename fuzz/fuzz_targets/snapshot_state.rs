#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::snapshot_state`, which `cargo test` also
//! replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::snapshot_state(data));
