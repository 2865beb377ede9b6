//! The ACPI platform: the tables `cellvm run --dump-acpi` writes, as ACPICA's own tools
//! (iasl, acpiexec from acpica-tools) read and run them; the PCI host bridge as the
//! built-in test guest checks it against the functions it finds; the Generic Event Device
//! that carries the power button, located from the DSDT, and the guest's `ticks` mode
//! that watches it (and echoes COM1 input). (The DSDT bytes themselves are also checked
//! by the unit tests in src/arch/x86_64/acpi.rs.)

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cellvm::arch::x86_64::layout;

/// Runs the test guest with `cmdline` until a line equal to `last` (or 20 s), then
/// kills it: every stdout line with the time it arrived.
fn lines_until(cmdline: &str, last: &str) -> Vec<(Instant, String)> {
    let mut child = common::cellvm()
        .args(["run", "--memory", "64", "--cmdline", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cellvm");
    let out = child.stdout.take().unwrap();
    let last = last.to_string();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_string();
            let done = line == last;
            lines.push((Instant::now(), line));
            if done {
                break;
            }
        }
        lines
    });
    let start = Instant::now();
    while !reader.is_finished() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap()
}

#[test]
fn ticks_mode_finds_the_ged_in_the_dsdt_and_ticks_every_50_ms() {
    let lines = lines_until("tests=ticks", "tick 8");
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    let header = format!(
        "cellvm-testguest: ticks every 50 ms; power button: GED gsi={} status=io:{:#x} routed=true irr=true",
        layout::GED_IRQ,
        layout::GED_PORT
    );
    assert!(
        text.contains(&header.as_str()),
        "no {header:?} in {text:#?}"
    );
    let ticks: Vec<_> = lines
        .iter()
        .filter(|(_, l)| l.starts_with("tick "))
        .collect();
    let numbers: Vec<&str> = ticks.iter().map(|(_, l)| &l[5..]).collect();
    assert_eq!(
        numbers,
        ["1", "2", "3", "4", "5", "6", "7", "8"],
        "{text:#?}"
    );
    // No press, no reaction (a VMM without the device makes the guest say so instead).
    assert!(
        !text
            .iter()
            .any(|l| l.starts_with("TEST power-button PASS") || l.contains("ignored")),
        "{text:#?}"
    );
    // Seven periods of guest time between tick 1 and tick 8, as the host sees them
    // arrive (lenient: the host is shared, and output is buffered on the way).
    let span = ticks[7].0 - ticks[0].0;
    assert!(
        span >= Duration::from_millis(250) && span <= Duration::from_secs(5),
        "tick 1 to tick 8 took {span:?}"
    );
}

/// A stopped VM (as a paused one) sees its TSC jump on resume: the guest prints one tick
/// and goes on at the period, instead of a burst of the ticks it missed.
#[test]
fn ticks_resume_at_the_period_after_the_vm_was_stopped() {
    let mut child = common::cellvm()
        .args(["run", "--memory", "64", "--cmdline", "tests=ticks"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cellvm");
    let pid = child.id() as i32;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx
                .send((Instant::now(), line.trim_end().to_string()))
                .is_err()
            {
                break;
            }
        }
    });
    let next_tick = |rx: &std::sync::mpsc::Receiver<(Instant, String)>| loop {
        let (at, line) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a tick within 20 s");
        if let Some(n) = line.strip_prefix("tick ") {
            break (at, n.parse::<u64>().unwrap());
        }
    };
    while next_tick(&rx).1 < 3 {}
    // SAFETY: kill(2) on the child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_millis(600));
    // Whatever was printed before the stop took effect.
    while rx.try_recv().is_ok() {}
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let (first_at, first) = next_tick(&rx);
    let after: Vec<(Instant, u64)> = (0..3).map(|_| next_tick(&rx)).collect();
    let _ = child.kill();
    let _ = child.wait();
    let numbers: Vec<u64> = after.iter().map(|t| t.1).collect();
    assert_eq!(
        numbers,
        [first + 1, first + 2, first + 3],
        "one number per line"
    );
    // 600 ms stopped is 12 periods: a catch-up would print them all at once.
    let burst = after
        .iter()
        .filter(|(at, _)| *at - first_at < Duration::from_millis(25))
        .count();
    assert!(
        burst <= 1,
        "{burst} ticks within 25 ms of the first after the stop"
    );
}

#[test]
fn hold_and_the_default_checks_do_not_tick() {
    let out = common::run(
        {
            let mut c = common::cellvm();
            c.args([
                "run",
                "--memory",
                "64",
                "--cmdline",
                "hold=1 ignore-power-button",
            ]);
            c.stdin(Stdio::null());
            c
        },
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.elapsed >= Duration::from_millis(900),
        "{:?}",
        out.elapsed
    );
    assert!(out.stdout.contains("9 passed, 0 failed"), "{}", out.stdout);
    assert!(!out.stdout.contains("tick"), "{}", out.stdout);
}

/// Guest RAM for the dump tests: more than fits below the 32-bit hole, so RAM continues
/// above 4 GiB and the 64-bit window must lie above that.
const DUMP_MEMORY_MIB: u64 = 4608;

/// `cellvm run --dump-acpi DIR` for a VM of 3 vCPUs with a disk, an rng and a net device:
/// the files it wrote, by table name.
fn dump(dir: &std::path::Path) -> Vec<String> {
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let tables = dir.join("tables");
    std::fs::create_dir_all(&tables).unwrap();
    let mut c = common::cellvm();
    c.args(["run", "--cpus", "3", "--memory"])
        .arg(DUMP_MEMORY_MIB.to_string())
        .arg("--disk")
        .arg(format!("path={}", img.display()))
        .args(["--rng", "--net", "tap=cellvm-none0", "--dump-acpi"])
        .arg(&tables)
        .stdin(Stdio::null());
    let out = common::run(c, Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        !out.stdout.contains("cellvm-testguest"),
        "no guest ran: {}",
        out.stdout
    );
    let mut names: Vec<String> = std::fs::read_dir(&tables)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["apic.dat", "dsdt.dat", "facp.dat", "mcfg.dat", "rsdp.dat", "xsdt.dat"]
    );
    // The files it printed are those.
    assert_eq!(out.stdout.lines().count(), 6, "{}", out.stdout);
    names
}

fn tool(name: &str, args: &[&str], dir: &std::path::Path) -> String {
    let out = std::process::Command::new(name)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{name} (acpica-tools) is needed for this test: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?}: {text}");
    text
}

#[test]
fn dumped_tables_disassemble_and_recompile_with_iasl_without_errors_or_warnings() {
    let dir = common::scratch_dir("acpi-dump-iasl");
    dump(&dir);
    let tables = dir.join("tables");
    // iasl (20200925 here) disassembles every table with a header; the RSDP has none.
    for name in ["dsdt", "facp", "apic", "mcfg", "xsdt"] {
        let text = tool("iasl", &["-d", &format!("{name}.dat")], &tables);
        assert!(
            !text.contains("Error") && !text.contains("Warning"),
            "iasl -d {name}.dat:\n{text}"
        );
        assert!(
            text.contains("Disassembly completed") || text.contains(".dsl"),
            "{text}"
        );
        let compiled = tool(
            "iasl",
            &["-p", &format!("re-{name}"), &format!("{name}.dsl")],
            &tables,
        );
        assert!(
            compiled.contains(" 0 Errors, 0 Warnings"),
            "iasl {name}.dsl:\n{compiled}"
        );
    }
    let dsl = std::fs::read_to_string(tables.join("dsdt.dsl")).unwrap();
    for expected in [
        "Device (_SB.PCI0)",
        "EisaId (\"PNP0A08\")",
        "EisaId (\"PNP0A03\")",
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "Method (_OSC, 4, Serialized)",
        "EisaId (\"PNP0303\")",
        "EisaId (\"PNP0501\")",
        "Device (_SB.GED)",
    ] {
        assert!(dsl.contains(expected), "{expected} not in\n{dsl}");
    }
    let apic = std::fs::read_to_string(tables.join("apic.dsl")).unwrap();
    assert_eq!(
        apic.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        3,
        "{apic}"
    );
    assert_eq!(
        apic.matches("[Interrupt Source Override]").count(),
        2,
        "{apic}"
    );
    // The RSDP: signature, both checksums, revision 2, 36 bytes.
    let rsdp = std::fs::read(tables.join("rsdp.dat")).unwrap();
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    assert_eq!(
        (&rsdp[..8], rsdp.len(), rsdp[15]),
        (&b"RSD PTR "[..], 36, 2)
    );
    assert_eq!((sum(&rsdp[..20]), sum(&rsdp)), (0, 0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// acpiexec's output split into (what was evaluated, what it printed).
fn evaluations(text: &str) -> Vec<(String, String)> {
    text.split("Evaluating ")
        .skip(1)
        .map(|part| {
            let (name, rest) = part.split_once('\n').unwrap_or((part, ""));
            (name.trim().to_string(), rest.to_string())
        })
        .collect()
}

/// The bytes of the buffer acpiexec printed as `NNNN: XX XX ...  // ascii` lines.
fn buffer_bytes(text: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in text.lines() {
        let Some(at) = line.find(": ") else { continue };
        let offset = line[..at].trim_start().rsplit(' ').next().unwrap_or("");
        if offset.len() != 4 || !offset.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let data = line[at + 2..].split("//").next().unwrap_or("");
        bytes.extend(
            data.split_whitespace()
                .map(|h| u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("{line}"))),
        );
    }
    bytes
}

/// The integers acpiexec printed (`[Integer] = HEX`), in order.
fn integers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("[Integer] = "))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .collect()
}

/// Address space descriptors in a resource template: (resource type, min, max).
/// Small I/O descriptors come back as type 0x100 | length.
fn resources(crs: &[u8]) -> Vec<(u32, u64, u64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < crs.len() {
        let tag = crs[i];
        if tag & 0x80 == 0 {
            let n = (tag & 7) as usize;
            match tag >> 3 {
                0x0f => break,
                0x08 => {
                    let min = u16::from_le_bytes([crs[i + 2], crs[i + 3]]) as u64;
                    let max = u16::from_le_bytes([crs[i + 4], crs[i + 5]]) as u64;
                    out.push((0x100 | crs[i + 7] as u32, min, max));
                }
                _ => panic!("unexpected small descriptor {tag:#x}"),
            }
            i += 1 + n;
        } else {
            let n = u16::from_le_bytes([crs[i + 1], crs[i + 2]]) as usize;
            let width = match tag {
                0x88 => 2,
                0x87 => 4,
                0x8a => 8,
                _ => panic!("unexpected large descriptor {tag:#x}"),
            };
            let field = |k: usize| {
                let at = i + 6 + k * width;
                crs[at..at + width]
                    .iter()
                    .rev()
                    .fold(0u64, |v, &x| (v << 8) | x as u64)
            };
            // Producer (general flags bit 0 clear): these are the bridge's windows.
            assert_eq!(crs[i + 4] & 1, 0, "descriptor {tag:#x} is a producer");
            out.push((crs[i + 3] as u32, field(1), field(2)));
            i += 3 + n;
        }
    }
    out
}

#[test]
fn acpiexec_loads_the_dumped_tables_and_evaluates_crs_prt_s5_osc_and_the_power_button() {
    let dir = common::scratch_dir("acpi-dump-exec");
    dump(&dir);
    let tables = dir.join("tables");
    let files = ["dsdt.dat", "facp.dat", "apic.dat", "mcfg.dat", "xsdt.dat"];
    let osc = "(5B 4D DB 33 F7 1F 1C 40 96 57 74 41 C0 3D D7 66) 1 3 (00 00 00 00 1F 00 00 00 3F 00 00 00)";
    let other_uuid = "(5B 4D DB 33 F7 1F 1C 40 96 57 74 41 C0 3D D7 67) 1 3 (00 00 00 00 1F 00 00 00 3F 00 00 00)";
    let batch = format!(
        "evaluate \\_SB.PCI0._CRS; evaluate \\_SB.PCI0._PRT; evaluate \\_S5_; \
         evaluate \\_SB.PCI0._OSC {osc}; evaluate \\_SB.PCI0._OSC {other_uuid}; \
         evaluate \\_SB.GED_._EVT 5"
    );
    // -fv 1: acpiexec's simulated operation regions read 1, the GED's "power button
    // pressed" status bit; the run without it reads 0 (no press).
    let pressed = tool(
        "acpiexec",
        &[&["-fv", "1", "-b", &batch][..], &files[..]].concat(),
        &tables,
    );
    for bad in ["AE_", "Error", "Warning"] {
        let bad_lines: Vec<&str> = pressed.lines().filter(|l| l.contains(bad)).collect();
        assert!(bad_lines.is_empty(), "{bad_lines:?} in\n{pressed}");
    }
    assert!(
        pressed.contains("DSDT: CELLVM") || pressed.contains("DSDT 0x"),
        "{pressed}"
    );
    let evals = evaluations(&pressed);
    let names: Vec<&str> = evals.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "\\_SB.PCI0._CRS",
            "\\_SB.PCI0._PRT",
            "\\_S5_",
            "\\_SB.PCI0._OSC",
            "\\_SB.PCI0._OSC",
            "\\_SB.GED_._EVT"
        ],
        "{pressed}"
    );

    // _CRS: bus 0 only, the config ports, the I/O window, the 32-bit window that holds
    // every BAR, and a 64-bit window above the RAM the e820 map lists.
    let crs = resources(&buffer_bytes(&evals[0].1));
    let mem = DUMP_MEMORY_MIB << 20;
    let (start64, end64) = layout::pci_mmio64(layout::ram_end(mem));
    assert_eq!(
        crs,
        [
            (2, 0, 0),
            (0x108, 0xcf8, 0xcf8),
            (1, layout::PCI_IO_START as u64, layout::PCI_IO_END as u64),
            (0, layout::PCI_MMIO32_START, layout::PCI_MMIO32_END - 1),
            (0, start64, end64 - 1),
        ],
        "{}",
        evals[0].1
    );
    let ram_top = layout::e820_map(mem)
        .iter()
        .filter(|e| e.2 == layout::E820_RAM)
        .map(|e| e.0 + e.1)
        .max()
        .unwrap();
    assert!(
        start64 >= ram_top && start64 > 1 << 32,
        "{start64:#x} {ram_top:#x}"
    );
    for (base, size, _) in layout::e820_map(mem) {
        for (kind, min, max) in &crs {
            if *kind == 0 {
                assert!(
                    base + size <= *min || base > *max,
                    "e820 {base:#x}+{size:#x} in a window"
                );
            }
        }
    }
    // Slot 31's BAR (the last the VMM may place) ends inside the 32-bit window.
    let last_bar =
        layout::PCI_BAR_BASE + 31 * layout::PCI_BAR_STRIDE + cellvm::virtio::pci::BAR_SIZE;
    assert!(last_bar <= layout::PCI_MMIO32_END);

    // _PRT: four integers per entry, 31 slots x 4 pins.
    let prt = integers(&evals[1].1);
    assert_eq!(prt.len(), 31 * 4 * 4, "{}", evals[1].1);
    let entries: Vec<&[u64]> = prt.chunks(4).collect();
    for (k, e) in entries.iter().enumerate() {
        let (slot, pin) = (k as u64 / 4 + 1, k as u64 % 4);
        assert_eq!(e[0], slot << 16 | 0xffff, "entry {k}");
        assert_eq!(e[1], pin, "entry {k}");
        assert_eq!(e[2], 0, "entry {k}: a GSI, no link device");
        assert_eq!(e[3], 16 + (slot - 1 + pin) % 8, "entry {k}");
    }
    // What the VMM does (src/vmm/virtio.rs): slot 1's INTA is pin 16, slot 2's 17.
    assert_eq!((entries[0][3], entries[4][3], entries[32][3]), (16, 17, 16));

    // \_S5: SLP_TYP 5.
    assert_eq!(integers(&evals[2].1), [5, 0], "{}", evals[2].1);

    // _OSC: the PCI UUID gets PME, AER and PCIe capability control (0x1c) with
    // "capabilities masked" set for the rest asked (0x3f); another UUID gets
    // "unrecognized UUID" and its request back.
    assert_eq!(
        buffer_bytes(&evals[3].1),
        [0x10, 0, 0, 0, 0x1f, 0, 0, 0, 0x1c, 0, 0, 0],
        "{}",
        evals[3].1
    );
    assert_eq!(
        buffer_bytes(&evals[4].1),
        [0x04, 0, 0, 0, 0x1f, 0, 0, 0, 0x3f, 0, 0, 0],
        "{}",
        evals[4].1
    );

    // The power button: _EVT reads the status, sees the bit, notifies \_SB.PWRB with 0x80.
    let evt = &evals[5].1;
    assert!(
        evt.contains("Notify on [PWRB]") && evt.contains("Value 0x80"),
        "{evt}"
    );
    let idle = tool(
        "acpiexec",
        &[&["-b", "evaluate \\_SB.GED_._EVT 5"][..], &files[..]].concat(),
        &tables,
    );
    assert!(!idle.contains("Notify"), "no press, no notify:\n{idle}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dump_acpi_refuses_a_missing_or_unwritable_directory_and_runs_no_guest() {
    let dir = common::scratch_dir("acpi-dump-bad");
    let dump_to = |target: &std::path::Path| {
        let mut c = common::cellvm();
        c.args(["run", "--memory", "64", "--dump-acpi"])
            .arg(target)
            .stdin(Stdio::null());
        common::run(c, Duration::from_secs(30))
    };
    let missing = dir.join("missing");
    let out = dump_to(&missing);
    assert_eq!(out.code, Some(2), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains(&format!("--dump-acpi {}", missing.display()))
            && out.stderr.contains("No such file"),
        "{}",
        out.stderr
    );
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = dump_to(&file);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("not a directory"), "{}", out.stderr);
    // /proc/sys: a directory in which even root cannot create files.
    let out = dump_to(std::path::Path::new("/proc/sys"));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot write /proc/sys/rsdp.dat"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("cellvm-testguest"), "{}", out.stdout);
    // A positive control: the same command into a writable directory succeeds.
    let out = dump_to(&dir);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(dir.join("dsdt.dat").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The test guest reads the host bridge from the DSDT and checks it against what it
/// finds: every function's BAR inside a memory window, every INTx pin routed by `_PRT`
/// to the GSI in the function's interrupt line register (the pin the VMM raises), no
/// RAM in a window.
#[test]
fn the_guest_finds_its_functions_inside_the_windows_and_routed_as_prt_says() {
    let dir = common::scratch_dir("acpi-platform");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut c = common::cellvm();
    c.args(["run", "--memory"])
        .arg(DUMP_MEMORY_MIB.to_string())
        .arg("--disk")
        .arg(format!("path={}", img.display()))
        .args(["--rng", "--cmdline", "tests=pci,platform"])
        .stdin(Stdio::null());
    let out = common::run(c, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let line = out.passed("platform");
    let (start64, end64) = layout::pci_mmio64(layout::ram_end(DUMP_MEMORY_MIB << 20));
    let windows = format!(
        "bus=0x0-0x0 io={:#x}-{:#x} mem={:#x}-{:#x} mem={start64:#x}-{:#x} config_ports=true prt=124 ram_in_window=false",
        layout::PCI_IO_START,
        layout::PCI_IO_END,
        layout::PCI_MMIO32_START,
        layout::PCI_MMIO32_END - 1,
        end64 - 1
    );
    assert!(line.contains(&windows), "{windows:?} not in {line}");
    for (slot, gsi) in [(1u64, 16), (2, 17)] {
        let function = format!(
            "{slot:02x}.0 bar0={:#x}+{:#x} INTA->prt:Some({gsi}) line={gsi}",
            layout::PCI_BAR_BASE + slot * layout::PCI_BAR_STRIDE,
            cellvm::virtio::pci::BAR_SIZE
        );
        assert!(line.contains(&function), "{function:?} not in {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tests=ticks` echoes what arrives on COM1 (cellvm's standard input): one `echo:` line
/// per `\r` or `\n` (a `\r\n` pair makes one), or per 64 bytes; printable ASCII as is,
/// other bytes as `\xNN`.
#[test]
fn ticks_echoes_com1_input_as_lines() {
    let mut child = common::cellvm()
        .args(["run", "--memory", "64", "--cmdline", "tests=ticks"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cellvm");
    let mut stdin = child.stdin.take().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    let wait_for = |pred: &dyn Fn(&str) -> bool, seen: &mut Vec<String>| loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no such line within 20 s: {seen:#?}"));
        let hit = pred(&line);
        seen.push(line);
        if hit {
            break;
        }
    };
    let mut seen = Vec::new();
    wait_for(&|l| l == "tick 1", &mut seen);
    use std::io::Write;
    let long: String = (0..70).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    stdin
        .write_all(format!("hello cellvm\r\nw\x01\x7f\\x\tz\n{long}\r").as_bytes())
        .unwrap();
    stdin.flush().unwrap();
    wait_for(&|l| l.starts_with("echo: ") && l.len() == 6 + 6, &mut seen);
    // The ticks go on after the echoes.
    wait_for(&|l| l.starts_with("tick "), &mut seen);
    let _ = child.kill();
    let _ = child.wait();
    let echoes: Vec<&str> = seen
        .iter()
        .filter(|l| l.starts_with("echo: "))
        .map(|l| &l[6..])
        .collect();
    assert_eq!(
        echoes,
        [
            "hello cellvm",
            "w\\x01\\x7f\\x\\x09z",
            &long[..64],
            &long[64..],
        ],
        "{seen:#?}"
    );
}
