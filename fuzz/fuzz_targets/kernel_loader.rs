#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::kernel_loader`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::kernel_loader(data));
