#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::vm_config`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::vm_config(data));
