#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::blk_chains`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::blk_chains(data));
