#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::vhost_user_backend`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::vhost_user_backend(data));
