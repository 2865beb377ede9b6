#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::platform_io`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::platform_io(data));
