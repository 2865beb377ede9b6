#![no_main]
//! Thin wrapper: the logic is `cellvm_jailer::fuzzing::qcow2_header`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm_jailer::fuzzing::qcow2_header(data));
