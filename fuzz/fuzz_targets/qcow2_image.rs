#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::qcow2_image`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::qcow2_image(data));
