//! The same test guest under a real peer: QEMU's microvm boots the ELF that
//! `cellvm testguest --output` writes, so the guest is not tied to cellvm.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{cellvm, run, scratch_dir};

fn qemu(elf: &std::path::Path, append: &str) -> common::Outcome {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-enable-kvm",
        "-M",
        "microvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "64",
    ])
    .args(common::QEMU_HEADLESS)
    .arg("-kernel")
    .arg(elf)
    .args(["-append", append]);
    run(cmd, Duration::from_secs(60))
}

fn guest_elf(name: &str) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    let elf = dir.join("cellvm-testguest.elf");
    let mut cmd = cellvm();
    cmd.args(["testguest", "--output"]).arg(&elf);
    assert_eq!(run(cmd, Duration::from_secs(30)).code, Some(0));
    elf
}

#[test]
fn qemu_microvm_boots_the_test_guest_and_it_ends_cleanly() {
    let out = qemu(&guest_elf("qemu-none"), "tests=none");
    // isa-debug-exit with value 0 makes QEMU exit with (0 << 1) | 1.
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.replace('\r', "").trim_end(),
        "cellvm-testguest: up"
    );
}

#[test]
fn test_guest_checks_pass_under_qemu_where_they_do_not_depend_on_cellvm_layout() {
    let out = qemu(
        &guest_elf("qemu-checks"),
        "tests=serial,bootinfo,cmdline,acpi marker=q",
    );
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    for check in ["serial", "bootinfo", "cmdline", "acpi"] {
        out.passed(check);
    }
    assert!(out
        .passed("cmdline")
        .contains("\"tests=serial,bootinfo,cmdline,acpi marker=q\""));
}
