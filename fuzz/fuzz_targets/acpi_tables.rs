#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::acpi_tables`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::acpi_tables(data));
