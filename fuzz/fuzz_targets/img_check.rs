#![no_main]
//! Thin wrapper: the logic is `cellvm_img::fuzzing::img_check`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm_img::fuzzing::img_check(data));
