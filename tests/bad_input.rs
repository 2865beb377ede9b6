//! Bad input to `cellvm run`: one line naming the problem, exit status 2, no panic.

mod common;

use std::time::Duration;

use common::{cellvm, run, scratch_dir};

fn refuse(args: &[&str], expect: &str) {
    let mut cmd = cellvm();
    cmd.arg("run").args(args);
    let out = run(cmd, Duration::from_secs(30));
    assert_eq!(
        out.code,
        Some(2),
        "args {args:?}: {}\n{}",
        out.stdout,
        out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "args {args:?}: want one line, got:\n{}",
        out.stderr
    );
    assert!(lines[0].starts_with("cellvm: error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(expect),
        "args {args:?}: {:?} lacks {expect:?}",
        lines[0]
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(
        out.stdout.is_empty(),
        "the guest must not have run: {}",
        out.stdout
    );
}

#[test]
fn missing_kernel_file() {
    refuse(
        &["--kernel", "/nonexistent/vmlinux"],
        "kernel /nonexistent/vmlinux: No such file or directory",
    );
}

#[test]
fn empty_kernel_file() {
    let dir = scratch_dir("empty");
    let k = dir.join("empty");
    std::fs::write(&k, b"").unwrap();
    refuse(&["--kernel", k.to_str().unwrap()], "file is empty");
}

#[test]
fn non_kernel_file() {
    let dir = scratch_dir("text");
    let k = dir.join("notes.txt");
    std::fs::write(&k, vec![b'a'; 4096]).unwrap();
    refuse(&["--kernel", k.to_str().unwrap()], "not a loadable kernel");
}

#[test]
fn truncated_elf_kernel() {
    let dir = scratch_dir("trunc");
    let mut out = cellvm();
    let full = dir.join("full.elf");
    out.args(["testguest", "--output", full.to_str().unwrap()]);
    assert_eq!(run(out, Duration::from_secs(30)).code, Some(0));
    let bytes = std::fs::read(&full).unwrap();
    for cut in [10, 100, bytes.len() / 2] {
        let k = dir.join(format!("cut{cut}.elf"));
        std::fs::write(&k, &bytes[..cut]).unwrap();
        refuse(&["--kernel", k.to_str().unwrap()], "kernel ");
    }
}

#[test]
fn truncated_bzimage() {
    let dir = scratch_dir("bz");
    let k = dir.join("bzImage");
    // A setup header claiming a kernel far longer than the file.
    let mut img = vec![0u8; 0x1000];
    img[0x1f1] = 4; // setup_sects
    img[0x1fe] = 0x55;
    img[0x1ff] = 0xaa;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    std::fs::write(&k, &img).unwrap();
    refuse(&["--kernel", k.to_str().unwrap()], "kernel ");
}

#[test]
fn initrd_larger_than_ram() {
    let dir = scratch_dir("initrd");
    let rd = dir.join("initrd.img");
    let f = std::fs::File::create(&rd).unwrap();
    f.set_len(64 << 20).unwrap(); // sparse: costs no disk
    refuse(
        &["--memory", "32", "--initrd", rd.to_str().unwrap()],
        "do not fit in guest RAM",
    );
}

#[test]
fn missing_initrd() {
    refuse(
        &["--initrd", "/nonexistent/initrd"],
        "initrd /nonexistent/initrd: No such file",
    );
}

#[test]
fn command_line_over_the_limit() {
    let long = "x".repeat(3000);
    refuse(&["--cmdline", &long], "the limit is 2047");
}

#[test]
fn zero_cpus() {
    refuse(&["--cpus", "0"], "cpus = 0: must be between 1 and");
}

#[test]
fn more_cpus_than_allowed() {
    refuse(
        &["--cpus", "100000"],
        "cpus = 100000: must be between 1 and",
    );
}

#[test]
fn memory_too_small() {
    refuse(&["--memory", "1"], "memory = 1 MiB: the minimum is 8 MiB");
}

#[test]
fn memory_beyond_the_host() {
    refuse(&["--memory", "100000000"], "more than the host's");
}

#[test]
fn malformed_config_file() {
    let dir = scratch_dir("cfg");
    let cfg = dir.join("vm.toml");
    std::fs::write(&cfg, "cpus = \"two\"\n").unwrap();
    refuse(&["--config", cfg.to_str().unwrap()], "config ");
    std::fs::write(&cfg, "vcpus = 2\n").unwrap();
    refuse(
        &["--config", cfg.to_str().unwrap()],
        "unknown field `vcpus`",
    );
}

#[test]
fn serial_file_in_a_missing_directory_leaves_nothing_behind() {
    refuse(
        &["--serial", "file=/nonexistent/dir/serial.log"],
        "serial output /nonexistent/dir/serial.log",
    );
}

#[test]
fn command_line_with_non_ascii_or_control_bytes() {
    refuse(
        &["--cmdline", "console=ttyS0 caf\u{e9}"],
        "byte 0xc3 at offset 17 is not printable ASCII",
    );
    refuse(
        &["--cmdline", "a\tb"],
        "byte 0x09 at offset 1 is not printable ASCII",
    );
}
