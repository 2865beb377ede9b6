#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::ioapic`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::ioapic(data));
