//! The benchmark still runs: one quick pass, every scenario present with real numbers.
//! (No timing is asserted: benchmarks are measured, not tested.)

#[test]
fn quick_mode_runs_every_scenario_against_its_peer() {
    let json = std::env::temp_dir().join(format!("cellvm-bench-quick-{}.json", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellvm-bench"))
        .args(["--quick", "--json"])
        .arg(&json)
        .output()
        .expect("run cellvm-bench");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("1. start-up, yardstick") && table.contains("tests=none"),
        "{table}"
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        rows.len(),
        56,
        "5 comparisons x 3 metrics (the jailed launch with and without devices), the launch rate, RSS and PSS with and without devices, 11 block rows (raw: 3 against qemu-storage-daemon, 2 against the host; qcow2: 3 against qemu-storage-daemon's qcow2, 3 against cellvm on raw), 3 net rows, 4 density rows, 2 vsock rows, 7 control-plane rows, 3 backend-restart rows, 3 virtio-fs rows, 3 snapshot rows"
    );
    // Scenario 11: snapshot and restore against QEMU's migration to a file.
    assert_eq!(
        rows.iter()
            .filter(|r| r["scenario"] == "11. snapshot, 128 MiB memload"
                && r["peer_name"] == "qemu migrate to file / -incoming")
            .count(),
        3
    );
    // Scenario 9: a restarted blk, net and rng backend, each against the same loop unkilled.
    let restart: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["scenario"] == "9. backend restart, jailed")
        .collect();
    assert_eq!(restart.len(), 3);
    for kind in ["blk", "net", "rng"] {
        assert!(
            restart.iter().any(|r| r["metric"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{kind}: "))),
            "{restart:?}"
        );
    }
    // Scenario 10: virtio-fs through our frontend and QEMU's, the same virtiofsd.
    assert_eq!(
        rows.iter()
            .filter(
                |r| r["scenario"].as_str().unwrap().starts_with("10. virtio-fs")
                    && r["peer_name"] == "qemu vhost-user-fs-pci, same virtiofsd"
            )
            .count(),
        3
    );
    // Scenario 4q: qcow2 against qemu-storage-daemon's own qcow2 driver, reads and writes.
    let qcow2: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["scenario"].as_str().unwrap().starts_with("4q. "))
        .collect();
    assert_eq!(qcow2.len(), 6);
    assert!(qcow2
        .iter()
        .any(|r| r["peer_name"] == "qemu-storage-daemon qcow2"
            && r["scenario"].as_str().unwrap().contains("random write")));
    // Scenario 7 against libvirt: the API, pause and resume, the shell, list.
    let control: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["scenario"].as_str().unwrap().starts_with("7. "))
        .collect();
    assert_eq!(control.len(), 7);
    assert!(control
        .iter()
        .any(|r| r["peer_name"] == "virsh dominfo (one session)" && r["metric"] == "us p99"));
    assert!(
        table.contains("goal vm.info median: ") && table.contains("goal pause -> paused: "),
        "{table}"
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r["peer_name"] == "qemu virtio-net (tap)")
            .count(),
        3
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r["scenario"].as_str().unwrap().starts_with("8. vsock"))
            .count(),
        2
    );
    assert!(rows.iter().any(|r| r["metric"] == "PSS MiB"));
    assert!(rows.iter().any(|r| r["metric"] == "VMs/s/core"));
    // Density from a handful of VMs is within the host's memory noise: only present.
    assert_eq!(
        rows.iter()
            .filter(|r| r["scenario"].as_str().unwrap().starts_with("6. density"))
            .count(),
        4
    );
    for r in rows
        .iter()
        .filter(|r| !r["scenario"].as_str().unwrap().starts_with("6. density"))
    {
        assert!(r["cellvm"]["median"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peer"]["median"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(rows.iter().any(|r| r["peer_name"] == "qemu microvm"));
    assert_eq!(
        rows.iter()
            .filter(|r| r["peer_name"] == "qemu-storage-daemon")
            .count(),
        3
    );
    assert!(rows
        .iter()
        .any(|r| r["scenario"] == "3. memory, 128 MiB VM, disk+net+rng"));
    assert!(rows.iter().any(|r| r["scenario"]
        .as_str()
        .unwrap()
        .starts_with("2. jailed launch")));
    assert!(
        table.contains("jailer supervisor RSS while a VM runs: "),
        "{table}"
    );
}
