//! Replays every committed fuzz corpus file and every past crash through the same
//! library functions the cargo-fuzz targets call, on stable Rust, as part of
//! `cargo test`. A target without seeds, or a seed directory without a target, fails.

use std::path::Path;

/// The VMM's targets and the jailer's.
type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("kernel_loader", cellvm::fuzzing::kernel_loader),
    ("cmdline", cellvm::fuzzing::cmdline),
    ("acpi_tables", cellvm::fuzzing::acpi_tables),
    ("vm_config", cellvm::fuzzing::vm_config),
    ("platform_io", cellvm::fuzzing::platform_io),
    ("ioapic", cellvm::fuzzing::ioapic),
    ("blk_chains", cellvm::fuzzing::blk_chains),
    ("rng_chains", cellvm::fuzzing::rng_chains),
    ("net_tx_chains", cellvm::fuzzing::net_tx_chains),
    ("net_rx_chains", cellvm::fuzzing::net_rx_chains),
    ("vsock_chains", cellvm::fuzzing::vsock_chains),
    ("console_chains", cellvm::fuzzing::console_chains),
    ("virtio_pci", cellvm::fuzzing::virtio_pci),
    ("vhost_user_frontend", cellvm::fuzzing::vhost_user_frontend),
    ("vhost_user_backend", cellvm::fuzzing::vhost_user_backend),
    ("api_http", cellvm::fuzzing::api_http),
    ("qcow2_image", cellvm::fuzzing::qcow2_image),
    ("luks_header", cellvm::fuzzing::luks_header),
    ("snapshot_state", cellvm::fuzzing::snapshot_state),
    ("tenant_policy", cellvm_jailer::fuzzing::tenant_policy),
    ("mcs_label", cellvm_jailer::fuzzing::mcs_label),
    ("img_check", cellvm_img::fuzzing::img_check),
    ("qcow2_header", cellvm_jailer::fuzzing::qcow2_header),
];

#[test]
fn the_replay_list_covers_every_vmm_target() {
    for (name, _) in cellvm::fuzzing::TARGETS {
        assert!(
            TARGETS.iter().any(|(n, _)| n == name),
            "{name} is not replayed"
        );
    }
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    v.sort();
    v
}

#[test]
fn every_corpus_file_and_past_crash_replays_without_a_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in TARGETS {
        assert!(
            fuzz.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .exists(),
            "no cargo-fuzz target for {name}"
        );
        let seeds = files(&fuzz.join("corpus").join(name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} has no seeds");
        for file in seeds
            .iter()
            .chain(files(&fuzz.join("regressions").join(name)).iter())
        {
            let data = std::fs::read(file).unwrap();
            let result = std::panic::catch_unwind(|| target(&data));
            assert!(result.is_ok(), "{name}: {} panicked", file.display());
        }
    }
}

#[test]
fn every_fuzz_target_file_is_known_to_the_replay() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for file in files(&dir) {
        let stem = file.file_stem().unwrap().to_string_lossy().to_string();
        assert!(
            TARGETS.iter().any(|(n, _)| *n == stem),
            "fuzz target {stem} is not in cellvm::fuzzing::TARGETS"
        );
    }
}

#[test]
fn the_built_in_test_guest_goes_through_the_loader_target() {
    cellvm::fuzzing::kernel_loader(cellvm::testguest::IMAGE);
}
