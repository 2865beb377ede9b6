#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::rng_chains`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::rng_chains(data));
