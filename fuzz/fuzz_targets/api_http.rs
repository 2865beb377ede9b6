#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::api_http`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::api_http(data));
