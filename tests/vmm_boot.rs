//! `cellvm run` end to end on the built-in test guest and on tiny hand-built guests.

mod common;

use std::time::Duration;

use common::{cellvm, print_code, pvh_elf, run, scratch_dir};

const LIMIT: Duration = Duration::from_secs(60);

fn run_guest(args: &[&str]) -> common::Outcome {
    let mut cmd = cellvm();
    cmd.arg("run").args(args);
    run(cmd, LIMIT)
}

#[test]
fn test_guest_passes_every_check_on_one_vcpu() {
    let out = run_guest(&["--cpus", "1", "--memory", "64"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    for check in [
        "serial", "bootinfo", "cmdline", "e820", "acpi", "madt", "smp", "pci", "irq",
    ] {
        out.passed(check);
    }
    assert!(out.stdout.contains("9 passed, 0 failed"), "{}", out.stdout);
    assert!(out
        .passed("irq")
        .contains("COM1 THRE -> IOAPIC pin 4 -> MSI -> LAPIC IRR vector 0x41"));
    assert!(
        out.passed("acpi").contains("tables: FACP APIC MCFG"),
        "{}",
        out.stdout
    );
    let pci = out.passed("pci");
    assert!(
        pci.contains("cf8_and_ecam_agree=true functions=1: 00.0 1b36:0008 class 060000"),
        "{pci}"
    );
}

#[test]
fn every_vcpu_is_started_by_init_sipi_and_reports_in() {
    let out = run_guest(&[
        "--cpus",
        "8",
        "--memory",
        "64",
        "--cmdline",
        "tests=madt,smp",
    ]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.passed("madt").contains("cpus=8 ioapics=1"));
    assert!(out
        .passed("smp")
        .contains("cpus=8 reported=8 first_missing_apic_id=None"));
}

#[test]
fn apic_ids_past_254_put_every_lapic_in_x2apic_mode_with_x2apic_madt_entries() {
    let out = run_guest(&[
        "--cpus",
        "300",
        "--memory",
        "256",
        "--cmdline",
        "tests=madt,smp",
    ]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.passed("madt").contains("cpus=300 ioapics=1"));
    // In x2APIC mode the xAPIC page is gone, and a CPL 3 guest cannot reach the LAPIC
    // MSRs: the guest says so rather than pretending to have started the APs.
    assert!(
        out.stdout
            .contains("TEST smp FAIL cpus=300: the LAPICs are in x2APIC mode"),
        "{}",
        out.stdout
    );
}

#[test]
fn the_largest_xapic_vm_starts_all_254_vcpus() {
    let out = run_guest(&[
        "--cpus",
        "254",
        "--memory",
        "128",
        "--cmdline",
        "tests=madt,smp",
    ]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out
        .passed("smp")
        .contains("cpus=254 reported=254 first_missing_apic_id=None"));
}

#[test]
fn memory_above_the_pci_hole_is_mapped_above_4g() {
    // 5 GiB of memfd is reserved lazily: only the pages the guest touches are used.
    let out = run_guest(&["--memory", "5120", "--cmdline", "tests=e820"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let detail = out.passed("e820");
    assert!(
        detail.contains(
            "[0x100000-0xc0000000 1][0xe0000000-0xe0100000 2][0x100000000-0x180000000 1]"
        ),
        "{detail}"
    );
}

#[test]
fn the_guest_sees_the_exact_command_line() {
    let line = "tests=cmdline marker=cellvm-7f3a expect_mem=128 expect_cpus=1";
    let out = run_guest(&["--cmdline", line]);
    assert_eq!(out.code, Some(0));
    assert_eq!(
        out.passed("cmdline"),
        format!("PASS len={} \"{line}\"", line.len())
    );
}

#[test]
fn tests_none_prints_one_line_and_powers_off() {
    let out = run_guest(&["--cmdline", "tests=none"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim_end(), "cellvm-testguest: up");
    assert!(out.stderr.is_empty(), "{}", out.stderr);
}

#[test]
fn hold_keeps_the_guest_running_that_long() {
    let out = run_guest(&["--cmdline", "tests=none hold=1"]);
    assert_eq!(out.code, Some(0));
    assert!(
        out.elapsed >= Duration::from_millis(900),
        "ended after {:?}",
        out.elapsed
    );
}

#[test]
fn config_file_fields_apply_and_flags_override_them() {
    let dir = scratch_dir("config");
    let cfg = dir.join("vm.toml");
    let serial = dir.join("serial.log");
    std::fs::write(
        &cfg,
        format!(
            "cpus = 2\nmemory_mib = 96\ncmdline = \"tests=madt,e820\"\nserial = \"file={}\"\n",
            serial.display()
        ),
    )
    .unwrap();
    let out = run_guest(&["--config", cfg.to_str().unwrap(), "--cpus", "3"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "serial went to the file, not stdout");
    let log = std::fs::read_to_string(&serial).unwrap();
    assert!(log.contains("TEST madt PASS cpus=3"), "{log}");
    assert!(log.contains("TEST e820 PASS"), "{log}");
    assert!(
        log.contains("expect_mem=96") || log.contains("top=0x6000000"),
        "{log}"
    );
}

#[test]
fn testguest_output_writes_a_pvh_elf_that_boots_from_a_file() {
    let dir = scratch_dir("testguest");
    let elf = dir.join("guest.elf");
    let mut cmd = cellvm();
    cmd.args(["testguest", "--output", elf.to_str().unwrap()]);
    assert_eq!(run(cmd, LIMIT).code, Some(0));
    let bytes = std::fs::read(&elf).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    let out = run_guest(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "tests=serial,acpi",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.passed("serial");
    out.passed("acpi");
}

/// Assembles tests/yardstick/yardstick.S (the whole ELF file, headers included) into
/// `dir`: `as` and `objcopy`, nothing else.
fn build_yardstick(dir: &std::path::Path) -> std::path::PathBuf {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/yardstick/yardstick.S");
    let (obj, elf) = (dir.join("yardstick.o"), dir.join("yardstick.elf"));
    for (tool, args) in [
        (
            "as",
            vec![
                "--64".as_ref(),
                "-o".as_ref(),
                obj.as_os_str(),
                src.as_os_str(),
            ],
        ),
        (
            "objcopy",
            vec![
                "-O".as_ref(),
                "binary".as_ref(),
                obj.as_os_str(),
                elf.as_os_str(),
            ],
        ),
    ] {
        let out = std::process::Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} (binutils): {e}"));
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    elf
}

#[test]
fn the_yardstick_guest_prints_ok_and_exits_zero() {
    let dir = scratch_dir("yardstick");
    let elf = build_yardstick(&dir);
    let out = run_guest(&["--kernel", elf.to_str().unwrap(), "--memory", "64"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "OK\n");
}

#[test]
fn a_guest_triple_fault_exits_nonzero_with_one_line_naming_it_and_the_rip() {
    let dir = scratch_dir("triple");
    let kernel = dir.join("fault.elf");
    // Print a marker, then ud2 with no IDT: #UD cannot be delivered -> triple fault.
    let mut code = print_code(b"x");
    code.extend_from_slice(&[0x0f, 0x0b]);
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let out = run_guest(&["--kernel", kernel.to_str().unwrap(), "--memory", "16"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(out.stdout, "x");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    // Either the CPU delivers the fault (triple fault), or a nested emulator gives up on
    // it; both must name the reason and the RIP.
    assert!(
        lines[0].starts_with(
            "cellvm: vcpu 0: guest stopped: triple fault (KVM_EXIT_SHUTDOWN) at RIP 0x"
        ) || lines[0].contains("KVM_EXIT_INTERNAL_ERROR"),
        "{}",
        lines[0]
    );
}

#[test]
fn acpi_sleep_register_powers_off_with_status_zero() {
    let dir = scratch_dir("s5");
    let kernel = dir.join("s5.elf");
    let mut code = print_code(b"bye");
    code.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee]); // out 0x600, 0x34
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp . (never reached)
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let out = run_guest(&["--kernel", kernel.to_str().unwrap(), "--memory", "16"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "bye");
}

#[test]
fn unclaimed_ports_and_mmio_read_as_all_ones() {
    let dir = scratch_dir("ports");
    let kernel = dir.join("ports.elf");
    // Print 'Y' or 'N' for: a byte from an unclaimed port, then a dword from unclaimed
    // MMIO in the PCI hole; then pulse the i8042 reset.
    let code = [
        0x66, 0xba, 0x34, 0x12, // mov dx, 0x1234
        0xec, // in al, dx
        0x3c, 0xff, // cmp al, 0xff
        0xb0, b'N', 0x75, 0x02, 0xb0, b'Y', // mov al,'N'; jne +2; mov al,'Y'
        0x66, 0xba, 0xf8, 0x03, 0xee, // mov dx, 0x3f8; out dx, al
        0xa1, 0x00, 0x00, 0x00, 0xd0, // mov eax, [0xd0000000]
        0x83, 0xf8, 0xff, // cmp eax, -1
        0xb0, b'N', 0x75, 0x02, 0xb0, b'Y', // mov al,'N'; jne +2; mov al,'Y'
        0xee, // out dx, al
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
        0xeb, 0xfe,
    ];
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let out = run_guest(&["--kernel", kernel.to_str().unwrap(), "--memory", "16"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "YY");
}

#[test]
fn an_initrd_reaches_the_guest_intact_as_its_pvh_module() {
    let dir = scratch_dir("initrd-ok");
    let rd = dir.join("initrd.img");
    let data: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&rd, &data).unwrap();
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let out = run_guest(&[
        "--memory",
        "64",
        "--initrd",
        rd.to_str().unwrap(),
        "--cmdline",
        "tests=bootinfo",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let detail = out.passed("bootinfo");
    assert!(detail.contains("modules=1 module0=0x"), "{detail}");
    assert!(
        detail.contains(&format!("+100000 fnv1a={hash:#018x}")),
        "{detail}"
    );
}

/// Platform finding, kept as a test: a guest's CPL 0 code (run by KVM's instruction
/// emulator on nested hosts) takes interrupts through its IDT. tests/probes/irq-idt.S
/// routes the serial interrupt through the IOAPIC to vector 0x41 and enables interrupts.
#[test]
fn a_cpl0_guest_takes_the_serial_interrupt_through_its_idt() {
    let dir = scratch_dir("irq-idt");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probes");
    let obj = dir.join("irq.o");
    let elf = dir.join("irq.elf");
    let cc = std::process::Command::new("gcc")
        .arg("-c")
        .arg(src.join("irq-idt.S"))
        .arg("-o")
        .arg(&obj)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let ld = std::process::Command::new("ld")
        .arg("-T")
        .arg(src.join("irq-idt.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&obj)
        .output()
        .unwrap();
    assert!(
        ld.status.success(),
        "{}",
        String::from_utf8_lossy(&ld.stderr)
    );
    let out = run_guest(&["--kernel", elf.to_str().unwrap(), "--memory", "16"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "I", "the handler ran (N: no interrupt arrived)");
}

#[test]
fn standard_input_reaches_the_guest_console() {
    use std::io::Write;
    let mut cmd = cellvm();
    cmd.args(["run", "--memory", "64", "--cmdline", "tests=console"])
        .stdin(std::process::Stdio::piped());
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello, cell\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("TEST console PASS got=\"hello, cell\""),
        "{stdout}"
    );
}

#[test]
fn a_vm_with_as_many_vcpus_as_kvm_allows_boots_and_lists_them_all() {
    // The refusal names the limit; then the limit itself must work.
    let refused = run_guest(&["--cpus", "100000"]);
    let max: u32 = refused
        .stderr
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no limit in {:?}", refused.stderr));
    assert!(max >= 255, "KVM allows only {max} vCPUs here");
    let max = max.to_string();
    let out = run_guest(&[
        "--cpus",
        &max,
        "--memory",
        "512",
        "--cmdline",
        "tests=madt,acpi",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out
        .passed("madt")
        .contains(&format!("cpus={max} ioapics=1")));
    out.passed("acpi");
}
