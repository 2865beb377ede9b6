#![no_main]
//! Thin wrapper: the logic is `cellvm::fuzzing::virtio_pci`, which `cargo test` also replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellvm::fuzzing::virtio_pci(data));
