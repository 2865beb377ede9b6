#![no_main]
//! Thin wrapper: the logic is `cellvm_jailer::fuzzing::mcs_label`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm_jailer::fuzzing::mcs_label(data));
