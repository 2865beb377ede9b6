//! A real kernel, as far as this platform allows: Debian's cloud kernel booted as
//! bzImage, as ELF vmlinux through the 64-bit boot protocol, and as ELF vmlinux through
//! its PVH note. The assertions come from the kernel's own early log.
//!
//! On nested (PVM) KVM the guest kernel runs in KVM's instruction emulator, which stops
//! at `lock cmpxchg16b` well after the log lines checked here. That ending is accepted
//! only as a KVM emulation failure reported by cellvm; a triple fault, an unhandled exit,
//! a missing log line or any other ending is a VMM bug and fails the test. On a host
//! with hardware KVM the kernel instead boots until it finds no root filesystem and
//! (with panic=-1) reboots, which cellvm reports as exit 0.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::{cellvm, run};

const MEMORY_MIB: &str = "512";
const CPUS: &str = "2";
/// Decompressing the bzImage alone takes about two minutes in the emulator.
const LIMIT: Duration = Duration::from_secs(600);

struct Kernel {
    bzimage: PathBuf,
    vmlinux: PathBuf,
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Downloads (once, cached) the versioned package linux-image-cloud-amd64 depends on,
/// and extracts vmlinux from the bzImage's compressed payload.
fn kernel() -> &'static Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-cloud");
        let vmlinux = cache.join("vmlinux");
        let bzimage = cache.join("bzImage");
        if vmlinux.exists() && bzimage.exists() {
            return Kernel { bzimage, vmlinux };
        }
        std::fs::create_dir_all(&cache).unwrap();
        let deps = Command::new("apt-cache")
            .args(["depends", "linux-image-cloud-amd64"])
            .output()
            .expect("apt-cache");
        let deps = String::from_utf8_lossy(&deps.stdout);
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .unwrap_or_else(|| {
                panic!("linux-image-cloud-amd64 has no linux-image dependency: {deps}")
            })
            .to_string();
        sh(Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&cache));
        let deb = std::fs::read_dir(&cache)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .expect("downloaded .deb");
        let root = cache.join("root");
        sh(Command::new("dpkg").arg("-x").arg(&deb).arg(&root));
        let vmlinuz = std::fs::read_dir(root.join("boot"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("vmlinuz-")
            })
            .expect("vmlinuz in the package");
        std::fs::copy(&vmlinuz, &bzimage).unwrap();
        extract_vmlinux(&bzimage, &vmlinux);
        Kernel { bzimage, vmlinux }
    })
}

/// The setup header says where the compressed kernel is (payload_offset/length); its
/// magic says how it is compressed.
fn extract_vmlinux(bzimage: &Path, out: &Path) {
    let img = std::fs::read(bzimage).unwrap();
    let setup_sects = match img[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let off = u32::from_le_bytes(img[0x248..0x24c].try_into().unwrap()) as usize;
    let len = u32::from_le_bytes(img[0x24c..0x250].try_into().unwrap()) as usize;
    let start = (setup_sects + 1) * 512 + off;
    let payload = &img[start..start + len];
    let tool: &[&str] = match &payload[..4] {
        [0x02, 0x21, 0x4c, 0x18] => &["lz4", "-dc"],
        [0xfd, 0x37, 0x7a, 0x58] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd] => &["zstd", "-dc"],
        [0x1f, 0x8b, _, _] => &["gzip", "-dc"],
        m => panic!("unknown kernel compression, magic {m:02x?}"),
    };
    let packed = out.with_extension("payload");
    std::fs::write(&packed, payload).unwrap();
    let result = Command::new(tool[0])
        .args(&tool[1..])
        .arg(&packed)
        .output()
        .expect("decompressor");
    // lz4's legacy frames end with trailing data it warns about; the ELF is complete.
    assert!(
        result.stdout.starts_with(b"\x7fELF"),
        "{tool:?} gave no ELF: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::write(out, &result.stdout).unwrap();
}

/// `cellvm run` with the memory, vCPUs, boot protocol and command line of a kernel test.
fn run_command(memory: &str, cpus: &str, protocol: &str, cmdline: &str) -> Command {
    let mut cmd = cellvm();
    cmd.args([
        "run",
        "--memory",
        memory,
        "--cpus",
        cpus,
        "--boot-protocol",
        protocol,
        "--cmdline",
        cmdline,
    ]);
    cmd
}

fn boot(kernel: &Path, protocol: &str, marker: &str) -> (String, String) {
    boot_with(kernel, protocol, marker, CPUS, MEMORY_MIB)
}

fn boot_with(
    kernel: &Path,
    protocol: &str,
    marker: &str,
    cpus: &str,
    memory: &str,
) -> (String, String) {
    let cmdline = format!("console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 {marker}");
    let mut cmd = run_command(memory, cpus, protocol, &cmdline);
    cmd.arg("--kernel").arg(kernel);
    let out = run(cmd, LIMIT);
    let log = out.stdout.replace('\r', "");
    let ending = out.stderr.trim().to_string();
    match out.code {
        Some(1) => assert!(
            ending.starts_with("cellvm: vcpu ") && ending.contains("KVM emulation failure (KVM_EXIT_INTERNAL_ERROR, suberror 1)"),
            "the kernel stopped for a reason other than the platform's emulator limit: {ending}\n{log}"
        ),
        Some(0) => assert!(log.contains("Kernel panic - not syncing"), "exit 0 without the expected no-root panic:\n{log}"),
        other => panic!("cellvm exited with {other:?}: {ending}\n{log}"),
    }
    assert!(
        log.contains(&format!("Command line: {cmdline}\n")),
        "exact command line missing:\n{log}"
    );
    (log, ending)
}

fn assert_common(log: &str) {
    assert!(log.contains("Linux version 6."), "no banner:\n{log}");
    for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("ACPI: {table} 0x00000000000E")))
            .unwrap_or_else(|| panic!("no ACPI {table} line:\n{log}"));
        assert!(line.contains("CELLVM"), "{line}");
    }
    assert!(
        log.contains("ACPI: Using ACPI (MADT) for SMP configuration information"),
        "{log}"
    );
    assert!(
        log.contains(&format!("smpboot: Allowing {CPUS} CPUs, 0 hotplug CPUs")),
        "Linux did not find every vCPU:\n{log}"
    );
    assert!(
        log.contains("IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23"),
        "{log}"
    );
}

/// The e820 map as the 64-bit boot protocol hands it over, line for line.
fn assert_linux_e820(log: &str) {
    let e820: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("BIOS-e820:"))
        .map(|l| l.split_once("] ").map_or(l, |(_, rest)| rest))
        .collect();
    assert_eq!(
        e820,
        [
            "BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable",
            "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved",
            "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
            "BIOS-e820: [mem 0x00000000e0000000-0x00000000e00fffff] reserved",
        ]
    );
}

#[test]
fn debian_bzimage_boots_as_far_as_the_platform_allows() {
    let (log, _) = boot(&kernel().bzimage, "auto", "cellvm_marker=bz");
    assert_common(&log);
    assert_linux_e820(&log);
}

#[test]
fn debian_vmlinux_boots_through_the_64bit_protocol() {
    let (log, _) = boot(&kernel().vmlinux, "linux", "cellvm_marker=elf64");
    assert_common(&log);
    assert_linux_e820(&log);
}

#[test]
fn debian_vmlinux_boots_through_its_pvh_note() {
    let (log, _) = boot(&kernel().vmlinux, "pvh", "cellvm_marker=pvh");
    assert_common(&log);
    // Linux's PVH entry reserves the whole ISA range itself, so the hole prints as one.
    assert!(
        log.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable"),
        "{log}"
    );
    assert!(
        log.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        "{log}"
    );
}

/// Boots until the kernel has printed `until`, then stops the VM: with hundreds of
/// vCPUs the emulated per-CPU setup that follows takes many minutes on nested hosts.
fn boot_until(kernel: &Path, cpus: &str, memory: &str, until: &str) -> String {
    use std::io::BufRead;
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1";
    let mut child = run_command(memory, cpus, "linux", cmdline)
        .arg("--kernel")
        .arg(kernel)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + LIMIT;
    let mut log = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                log.push_str(&line.replace('\r', ""));
                log.push('\n');
                if line.contains(until) {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
                panic!("the VM ended before printing {until:?}: {err}\n{log}");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {until:?} within {LIMIT:?}:\n{log}"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    log
}

#[test]
fn debian_vmlinux_finds_300_vcpus_through_x2apic() {
    let log = boot_until(&kernel().vmlinux, "300", "1024", "smpboot: Allowing");
    assert!(
        log.contains("x2apic: enabled by BIOS, switching to x2apic ops"),
        "{log}"
    );
    assert!(!log.contains("x2apic entry ignored"), "{log}");
    assert!(
        log.contains("smpboot: Allowing 300 CPUs, 0 hotplug CPUs"),
        "Linux did not find every vCPU:\n{log}"
    );
}
