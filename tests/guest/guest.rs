//! cellvm test guest: the CPL 3 program.
//!
//! `boot.S` leaves us at CPL 3 with IOPL 3, interrupts off, and all of the first 4 GiB
//! identity-mapped and user-accessible. From here the program checks what the VMM built
//! (boot information, command line, e820 map, ACPI tables, vCPUs), prints one line per
//! check on COM1 (`TEST <name> PASS|FAIL <detail>`), and ends the VM.
//!
//! Command line: `tests=a,b,...` (default: all; `none`: boot, print one line, end; with
//! the word `reset` it ends with a keyboard-controller reset, a reboot, instead),
//! `hold=SECONDS` (stay up that long before ending), `expect_mem=MiB` and
//! `expect_cpus=N` (what the e820, madt and smp checks compare against), `ecam=0xADDR`
//! (the PCI ECAM, for VMMs that have no MCFG table).
//!
//! `platform` in `tests=`: the DSDT's PCI host bridge against bus 0 and the e820 map.
//!
//! `restartloop` in `tests=`: for `bench_ms` ms, write the disk, ask the rng and ARP
//! over the net (each device that is there) while the host test kills their backends;
//! see restart.rs.
//!
//! `fs` and `fsbench` in `tests=`: a FUSE client on the virtio-fs device; see fs.rs.
//!
//! `memload` in `tests=`: fill and check all of RAM above 16 MiB, pass after pass
//! (`passes=N`, default until the host ends the VM): the workload of the snapshot
//! tests; see memload.rs.
//!
//! `ticks` in `tests=` (after any other checks named there): print `tick N` (N = 1, 2,
//! ...) every 50 ms of guest time, forever, while watching the ACPI power button (the
//! Generic Event Device the DSDT describes); on a press print
//! `TEST power-button PASS gsi=G status=S` and power off through \_S5. With the word
//! `ignore-power-button` on the command line a press prints `power-button ignored` and
//! the ticks go on. Bytes arriving on COM1 meanwhile are echoed as lines
//! `echo: <bytes>` (printable ASCII as is, others as `\xNN`), one per `\r` or `\n` or
//! 64 bytes.
#![no_std]
#![no_main]

core::arch::global_asm!(include_str!("boot.S"), options(att_syntax));

mod acpi;
mod console;
mod devices;
mod fs;
mod hw;
mod memload;
mod net;
mod restart;
mod virtio;
mod vsock;

use core::fmt::Write;
use hw::{Serial, StartInfo};

/// Every check the guest knows, in the order it runs them.
const CHECKS: [&str; 9] = ["serial", "bootinfo", "cmdline", "e820", "acpi", "madt", "smp", "pci", "irq"];

/// Checks that need something from outside the VM, run only when named in `tests=`:
/// `console` reads a line typed on the VMM's standard input; `virtio`, `blk`, `msix`,
/// `rng` and `net` need the devices (`blk` also an image laid out as tests/virtio.rs
/// makes it, `net` a tap whose host end is 10.77.0.1/24).
/// `platform` compares the DSDT's PCI host bridge (`_CRS` windows, `_PRT`) with the
/// functions on bus 0 and the e820 map.
/// `netgso` waits for a 64 KiB TCP segment the host sends whole (mergeable receive
/// buffers, guest TSO). `vsock` and `virtconsole` need those devices and a host peer
/// (tests/vsock.rs, tests/virtio_console.rs). `netmq` needs a net device with two or
/// more queue pairs on a multi-queue tap, with the UDP echo of `net`.
const OPT_IN: [&str; 21] = ["memload", "console", "virtio", "blk", "blkbad", "msix", "intx", "rng", "net", "blkbench", "netbench", "platform", "netgso", "vsock", "virtconsole", "netmq", "vsockbench", "netrxbench", "restartloop", "fs", "fsbench"];

/// The vector the irq check programs the serial's IOAPIC pin with.
const IRQ_VECTOR: u8 = 0x41;
/// The vector `ticks` programs the GED's IOAPIC pin with.
const GED_VECTOR: u8 = 0x42;
/// Guest time between two `tick` lines.
const TICK_MS: u64 = 50;

/// Size of the legacy hole between 640 KiB and 1 MiB that the VMM leaves out of RAM.
const LEGACY_HOLE: u64 = 0x10_0000 - 0xa_0000;
/// The 32-bit PCI hole: no RAM between 3 GiB and 4 GiB.
const HOLE_START: u64 = 0xc000_0000;
const HOLE_END: u64 = 0x1_0000_0000;

struct Args<'a> {
    cmdline: &'a str,
    tests: Option<&'a str>,
    hold_secs: u64,
    expect_mem_mib: Option<u64>,
    expect_cpus: Option<u64>,
    ecam: Option<u64>,
    bench_ms: u64,
    ignore_power_button: bool,
    reset: bool,
    /// `passes=N`: how many passes `memload` makes (0: until the host ends the VM).
    passes: u64,
}

impl<'a> Args<'a> {
    fn parse(cmdline: &'a str) -> Self {
        let mut args = Args { cmdline, tests: None, hold_secs: 0, expect_mem_mib: None, expect_cpus: None, ecam: None, bench_ms: 2000, ignore_power_button: false, reset: false, passes: 0 };
        for word in cmdline.split_ascii_whitespace() {
            if word == "ignore-power-button" {
                args.ignore_power_button = true;
            }
            if word == "reset" {
                args.reset = true;
            }
            let Some((key, value)) = word.split_once('=') else { continue };
            match key {
                "tests" => args.tests = Some(value),
                "hold" => args.hold_secs = value.parse().unwrap_or(0),
                "bench_ms" => args.bench_ms = value.parse().unwrap_or(2000),
                "passes" => args.passes = value.parse().unwrap_or(0),
                "expect_mem" => args.expect_mem_mib = value.parse().ok(),
                "expect_cpus" => args.expect_cpus = value.parse().ok(),
                "ecam" => args.ecam = value.strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok()),
                _ => {}
            }
        }
        args
    }

    /// Whether `check` is named in `tests=` (opt-in checks and modes).
    fn named(&self, check: &str) -> bool {
        self.tests.is_some_and(|l| l.split(',').any(|t| t == check))
    }

    fn selected(&self, check: &str) -> bool {
        match self.tests {
            None | Some("all") => true,
            Some(list) => list.split(',').any(|t| t == check),
        }
    }
}

/// Outcome of one check: pass or fail, with a detail line either way.
pub type Outcome = Result<(), ()>;

pub struct Report {
    serial: Serial,
    passed: u32,
    failed: u32,
}

impl Report {
    pub fn line(&mut self, name: &str, outcome: Outcome, detail: core::fmt::Arguments) {
        let verdict = if outcome.is_ok() { "PASS" } else { "FAIL" };
        match outcome {
            Ok(()) => self.passed += 1,
            Err(()) => self.failed += 1,
        }
        let _ = writeln!(self.serial, "TEST {name} {verdict} {detail}");
    }

    pub fn serial_mut(&mut self) -> &mut Serial {
        &mut self.serial
    }

    /// A line that is not a verdict (a check's progress, for the host test to act on).
    pub fn say(&mut self, text: core::fmt::Arguments) {
        let _ = writeln!(self.serial, "{text}");
    }
}

#[no_mangle]
pub extern "C" fn guest_main() -> ! {
    let mut serial = Serial::com1();
    let info = StartInfo::from_boot();
    let cmdline = info.and_then(|i| i.cmdline()).unwrap_or("");
    let args = Args::parse(cmdline);

    if args.tests == Some("none") {
        let _ = writeln!(serial, "cellvm-testguest: up");
        hold(args.hold_secs);
        if args.reset {
            // `reset`: end with a keyboard-controller reset instead (a reboot).
            hw::outb(0x64, 0xfe);
        }
        // Through \_S5 like every other ending: a keyboard-controller reset would be a
        // reboot, which a jailed VM answers by rebuilding itself.
        let tables = info.and_then(|i| acpi::Tables::locate(i.rsdp_paddr));
        hw::power_off(tables.as_ref());
    }
    let _ = writeln!(serial, "cellvm-testguest: running checks");
    let mut report = Report { serial, passed: 0, failed: 0 };
    let tables = info.and_then(|i| acpi::Tables::locate(i.rsdp_paddr));
    // `ecam=ADDR` names the ECAM for VMMs that have one but no MCFG (QEMU's microvm).
    virtio::use_ecam(tables.as_ref().and_then(|t| t.ecam_base()).or(args.ecam));
    for check in CHECKS.iter().filter(|c| args.selected(c)) {
        run_check(check, &args, info, tables.as_ref(), &mut report);
    }
    for check in OPT_IN.iter().filter(|c| args.named(c)) {
        run_check(check, &args, info, tables.as_ref(), &mut report);
    }
    if args.named("ticks") {
        ticks(&args, tables.as_ref(), &mut report.serial);
    }
    let (passed, failed) = (report.passed, report.failed);
    let _ = writeln!(report.serial, "cellvm-testguest: done, {passed} passed, {failed} failed");
    hold(args.hold_secs);
    hw::power_off(tables.as_ref());
}

fn run_check(name: &str, args: &Args, info: Option<StartInfo>, tables: Option<&acpi::Tables>, r: &mut Report) {
    match name {
        "serial" => {
            let (scratch, lsr) = r.serial.self_test(0x5a);
            let ok = scratch == 0x5a && lsr & 0x20 != 0;
            let tsc_mhz = hw::tsc_hz() / 1_000_000;
            r.line(name, ok.then_some(()).ok_or(()), format_args!("scratch={scratch:#x} lsr={lsr:#x} tsc_mhz={tsc_mhz}"));
        }
        "bootinfo" => match info {
            Some(i) => {
                let ok = i.version >= 1 && i.memmap_entries > 0 && i.cmdline_paddr != 0 && i.rsdp_paddr != 0;
                // The first module (an initrd): where it is, its size and an FNV-1a hash
                // of its bytes, so a test can compare it with the file it came from.
                let mut module = hw::Buf::<64>::new();
                if let Some((addr, size, hash)) = i.first_module() {
                    let _ = write!(module, " module0={addr:#x}+{size} fnv1a={hash:#018x}");
                }
                r.line(
                    name,
                    ok.then_some(()).ok_or(()),
                    format_args!(
                        "magic=0x336ec578 version={} memmap_entries={} cmdline={:#x} rsdp={:#x} modules={}{}",
                        i.version,
                        i.memmap_entries,
                        i.cmdline_paddr,
                        i.rsdp_paddr,
                        i.nr_modules,
                        module.as_str()
                    ),
                )
            }
            None => r.line(name, Err(()), format_args!("no hvm_start_info with the PVH magic")),
        },
        "cmdline" => match info.and_then(|i| i.cmdline()) {
            Some(c) => r.line(name, Ok(()), format_args!("len={} \"{}\"", c.len(), args.cmdline)),
            None => r.line(name, Err(()), format_args!("no NUL-terminated command line")),
        },
        "e820" => check_e820(args, info, r),
        "acpi" => match tables {
            Some(t) => {
                let mut sigs = hw::Buf::<96>::new();
                let mut ok = t.rsdp_ok && t.xsdt_ok;
                for table in t.iter() {
                    let _ = write!(sigs, "{} ", table.signature_str());
                    ok &= table.checksum_ok();
                }
                let dsdt = t.dsdt();
                ok &= dsdt.map(|d| d.checksum_ok()).unwrap_or(false);
                let fadt_ok = t.find(b"FACP").map(|f| f.len() >= 244).unwrap_or(false);
                ok &= fadt_ok;
                r.line(
                    name,
                    ok.then_some(()).ok_or(()),
                    format_args!(
                        "rsdp={:#x} rsdp_checksum={} xsdt_checksum={} tables: {}+ DSDT checksum={}",
                        t.rsdp_addr,
                        t.rsdp_ok,
                        t.xsdt_ok,
                        sigs.as_str(),
                        dsdt.map(|d| d.checksum_ok()).unwrap_or(false)
                    ),
                )
            }
            None => r.line(name, Err(()), format_args!("no RSDP found")),
        },
        "madt" => match tables.and_then(|t| t.madt()) {
            Some(m) => {
                let ok = m.ioapics == 1 && Some(m.cpus as u64) == args.expect_cpus;
                r.line(
                    name,
                    ok.then_some(()).ok_or(()),
                    format_args!("cpus={} ioapics={} expected_cpus={:?}", m.cpus, m.ioapics, args.expect_cpus),
                )
            }
            None => r.line(name, Err(()), format_args!("no MADT")),
        },
        "smp" => match tables.and_then(|t| t.madt()) {
            Some(m) if !hw::xapic_mmio_available() => r.line(
                name,
                Err(()),
                format_args!("cpus={}: the LAPICs are in x2APIC mode, so APs cannot be started from CPL 3", m.cpus),
            ),
            Some(m) => {
                let result = hw::start_aps(&m);
                let startable = m.cpus - m.x2apic_cpus;
                let ok = result.reported == startable && result.missing.is_none();
                r.line(
                    name,
                    ok.then_some(()).ok_or(()),
                    format_args!(
                        "cpus={} reported={} first_missing_apic_id={:?} wait_ms={} x2apic_only={}",
                        m.cpus, result.reported, result.missing, result.wait_ms, m.x2apic_cpus
                    ),
                )
            }
            None => r.line(name, Err(()), format_args!("no MADT to find the APs")),
        },
        "pci" => check_pci(tables, r),
        "platform" => check_platform(info, tables, r),
        "virtio" => devices::check_virtio(r),
        "blk" => devices::check_blk(r),
        "blkbad" => devices::check_blkbad(r),
        "blkbench" => devices::check_blkbench(r, args.bench_ms),
        "msix" => devices::check_msix(r),
        "intx" => devices::check_intx(r),
        "rng" => devices::check_rng(r),
        "net" => net::check_net(r),
        "netbench" => net::check_netbench(r, args.bench_ms),
        "netgso" => net::check_netgso(r),
        "netmq" => net::check_netmq(r),
        "netrxbench" => net::check_netrxbench(r, args.bench_ms),
        "vsock" => vsock::check_vsock(r),
        "vsockbench" => vsock::check_vsockbench(r, args.bench_ms),
        "virtconsole" => console::check_virtconsole(r),
        "restartloop" => restart::check_restartloop(r, args.bench_ms),
        "memload" => memload::run(r, info, args.passes),
        "fs" => fs::check_fs(r),
        "fsbench" => fs::check_fsbench(r, args.bench_ms),
        "console" => {
            let mut line = hw::Buf::<80>::new();
            let complete = r.serial.read_line(&mut line, 10);
            r.line(
                name,
                complete.then_some(()).ok_or(()),
                format_args!("got=\"{}\"{}", line.as_str(), if complete { "" } else { " (no newline within 10 s)" }),
            )
        }
        "irq" => {
            let outcome = hw::serial_irq_reaches_lapic(IRQ_VECTOR);
            match outcome {
                Ok(spins) => r.line(
                    name,
                    Ok(()),
                    format_args!("COM1 THRE -> IOAPIC pin 4 -> MSI -> LAPIC IRR vector {IRQ_VECTOR:#x} after {spins} polls"),
                ),
                Err(why) => r.line(name, Err(()), format_args!("{why}")),
            }
        }
        _ => {}
    }
}

/// Enumerates bus 0 twice, through ports 0xCF8/0xCFC and through the MCFG's ECAM, and
/// compares: the same functions must answer the same ids, and the rest read all-ones.
fn check_pci(tables: Option<&acpi::Tables>, r: &mut Report) {
    let Some(ecam) = tables.and_then(|t| t.ecam_base()) else {
        r.line("pci", Err(()), format_args!("no MCFG with an ECAM for bus 0"));
        return;
    };
    let (mut found, mut agree, mut list) = (0, true, hw::Buf::<128>::new());
    for dev in 0..32u32 {
        hw::outl(0xcf8, 0x8000_0000 | dev << 11);
        let io_id = hw::inl(0xcfc);
        let mm_id = hw::read_phys::<u32>(ecam + ((dev as u64) << 15)).unwrap_or(0);
        agree &= io_id == mm_id;
        if io_id != 0xffff_ffff {
            found += 1;
            hw::outl(0xcf8, 0x8000_0000 | dev << 11 | 8);
            let class = hw::inl(0xcfc) >> 8;
            let _ = write!(list, "{dev:02x}.0 {:04x}:{:04x} class {class:06x} ", io_id & 0xffff, io_id >> 16);
        }
    }
    hw::outl(0xcf8, 0x8000_0000);
    let bridge = hw::inl(0xcfc) != 0xffff_ffff;
    let ok = agree && found >= 1 && bridge;
    r.line("pci", ok.then_some(()).ok_or(()), format_args!("ecam={ecam:#x} cf8_and_ecam_agree={agree} functions={found}: {}", list.as_str()));
}

/// The PCI host bridge as the DSDT describes it, against what the guest finds: its bus
/// range holds bus 0 and it claims ports 0xCF8-0xCFF; no e820 RAM lies in a memory
/// window; every function's memory BARs (sized by the usual all-ones probe) lie inside
/// one, and every function's INTx pin is routed by `_PRT` to the GSI its interrupt line
/// register names (what the VMM raises).
fn check_platform(info: Option<StartInfo>, tables: Option<&acpi::Tables>, r: &mut Report) {
    let Some(host) = tables.and_then(|t| t.pci_host()) else {
        r.line("platform", Err(()), format_args!("no PNP0A08 host bridge with a _CRS and a _PRT in the DSDT"));
        return;
    };
    let mut text = hw::Buf::<512>::new();
    let mut ok = host.config_ports;
    let mut bus0 = false;
    for w in host.windows() {
        let kind = match w.kind {
            0 => "mem",
            1 => "io",
            2 => "bus",
            _ => "?",
        };
        bus0 |= w.kind == 2 && w.min == 0;
        let _ = write!(text, "{kind}={:#x}-{:#x} ", w.min, w.max);
    }
    ok &= bus0;
    let mut ram_in_window = false;
    if let Some(i) = info {
        for e in i.memmap().filter(|e| e.kind == 1) {
            let last = e.addr.saturating_add(e.size.saturating_sub(1));
            ram_in_window |= host.windows().iter().any(|w| w.kind == 0 && e.addr <= w.max && w.min <= last);
        }
    } else {
        ok = false;
    }
    ok &= !ram_in_window;
    let _ = write!(text, "config_ports={} prt={} ram_in_window={ram_in_window} functions:", host.config_ports, host.nprt);
    let mut functions = 0;
    for slot in 1..32u32 {
        if virtio::cfg_read(slot, 0) == 0xffff_ffff {
            continue;
        }
        functions += 1;
        let _ = write!(text, " {slot:02x}.0");
        let mut index = 0;
        while index < 6 {
            let reg = 0x10 + 4 * index;
            let low = virtio::cfg_read(slot, reg);
            let wide = low & 0x7 == 0x4;
            if low & 1 == 0 && low != 0 {
                let high = if wide { virtio::cfg_read(slot, reg + 4) as u64 } else { 0 };
                let addr = high << 32 | (low & !0xf) as u64;
                virtio::cfg_write(slot, reg, 0xffff_ffff);
                let mask = virtio::cfg_read(slot, reg) & !0xf;
                virtio::cfg_write(slot, reg, low);
                let size = (!mask).wrapping_add(1) as u64;
                let inside = host.in_memory_window(addr, size);
                ok &= inside;
                let _ = write!(text, " bar{index}={addr:#x}+{size:#x}{}", if inside { "" } else { "(outside)" });
            }
            index += if wide { 2 } else { 1 };
        }
        let reg = virtio::cfg_read(slot, 0x3c);
        let (line, pin) = (reg & 0xff, (reg >> 8) & 0xff);
        if (1..=4).contains(&pin) {
            let gsi = host.route(slot, pin);
            ok &= gsi == Some(line);
            let _ = write!(text, " INT{}->prt:{gsi:?} line={line}", (b'A' + pin as u8 - 1) as char);
        }
    }
    ok &= functions > 0;
    r.line("platform", ok.then_some(()).ok_or(()), format_args!("{}", text.as_str()));
}

fn check_e820(args: &Args, info: Option<StartInfo>, r: &mut Report) {
    let (Some(info), Some(mem_mib)) = (info, args.expect_mem_mib) else {
        r.line("e820", Err(()), format_args!("needs hvm_start_info and expect_mem= on the command line"));
        return;
    };
    let mem = mem_mib << 20;
    let (mut ram, mut top, mut prev_end, mut sorted, mut in_hole) = (0u64, 0u64, 0u64, true, false);
    let mut map = hw::Buf::<256>::new();
    for e in info.memmap() {
        let end = e.addr.saturating_add(e.size);
        sorted &= e.addr >= prev_end;
        prev_end = end;
        let _ = write!(map, "[{:#x}-{:#x} {}]", e.addr, end, e.kind);
        if e.kind == 1 {
            ram += e.size;
            top = top.max(end);
            in_hole |= e.addr < HOLE_END && end > HOLE_START;
        }
    }
    let expected_top = if mem <= HOLE_START { mem } else { HOLE_END + (mem - HOLE_START) };
    let ok = sorted && !in_hole && ram + LEGACY_HOLE == mem && top == expected_top;
    r.line(
        "e820",
        ok.then_some(()).ok_or(()),
        format_args!("ram={ram:#x} top={top:#x} expected_top={expected_top:#x} sorted={sorted} map={}", map.as_str()),
    );
}

/// The `ticks` mode: never returns, except by powering off on a power-button press.
///
/// The GED's IOAPIC pin is routed to `GED_VECTOR` before the first line; with interrupts
/// off the vector then shows (and stays) in the LAPIC's IRR, polled every millisecond.
/// Once it has shown, or where the IRR cannot be read (x2APIC mode), the GED's status
/// register is read at every tick instead. A press latched before the pin was routed
/// (whose edge the masked pin lost) is found by one status read right after routing.
/// A status register reading all-ones (no device there) is reported once and then left
/// alone. After a stall (the VM paused) the ticks resume at the period, without catching
/// up.
fn ticks(args: &Args, tables: Option<&acpi::Tables>, serial: &mut Serial) -> ! {
    let ged = tables.and_then(|t| t.ged());
    let irr_readable = hw::xapic_mmio_available();
    let routed = ged.is_some_and(|g| hw::route_irq(g.gsi, GED_VECTOR, g.edge, g.active_low));
    match ged {
        Some(g) => {
            let space = if g.space == 1 { "io" } else { "mem" };
            let _ = writeln!(
                serial,
                "cellvm-testguest: ticks every {TICK_MS} ms; power button: GED gsi={} status={space}:{:#x} routed={routed} irr={irr_readable}",
                g.gsi, g.address
            );
        }
        None => {
            let _ = writeln!(serial, "TEST power-button FAIL no GED (ACPI0013) with an interrupt and an OperationRegion in the DSDT");
        }
    }
    let mut irq_seen = !(routed && irr_readable);
    let mut answers = true;
    let mut on_status = |status: u8, serial: &mut Serial| {
        if status == 0 || !answers {
            return;
        }
        let gsi = ged.map(|g| g.gsi).unwrap_or(0);
        if status == 0xff {
            // All-ones: what an address no device claims reads as.
            answers = false;
            let _ = writeln!(serial, "TEST power-button FAIL gsi={gsi} status=0xff: no device answers at the GED's status register");
            return;
        }
        if args.ignore_power_button {
            let _ = writeln!(serial, "power-button ignored");
        } else {
            let _ = writeln!(serial, "TEST power-button PASS gsi={gsi} status={status:#x}");
            hw::power_off(tables);
        }
    };
    if let Some(status) = ged.and_then(|g| g.read_status()) {
        on_status(status, serial);
    }
    let hz = hw::tsc_hz();
    let (period, poll) = (hz / 1000 * TICK_MS, hz / 1000);
    let mut next = hw::rdtsc().saturating_add(period);
    let mut n = 0u64;
    let mut echo = Echo { bytes: [0; ECHO_MAX], len: 0, after_cr: false };
    loop {
        while let Some(byte) = serial.try_read() {
            echo.push(byte, serial);
        }
        let now = hw::rdtsc();
        if now >= next {
            n += 1;
            let _ = writeln!(serial, "tick {n}");
            next = next.saturating_add(period);
            if now >= next {
                next = now.saturating_add(period);
            }
            if irq_seen {
                if let Some(status) = ged.and_then(|g| g.read_status()) {
                    on_status(status, serial);
                }
            }
        }
        if !irq_seen && hw::irr_pending(GED_VECTOR) {
            irq_seen = true;
            if let Some(status) = ged.and_then(|g| g.read_status()) {
                on_status(status, serial);
            }
        }
        let until = hw::rdtsc().saturating_add(poll).min(next);
        while hw::rdtsc() < until {
            core::hint::spin_loop();
        }
    }
}

/// Bytes `ticks` collects from COM1 before echoing them without a line end.
const ECHO_MAX: usize = 64;

/// `ticks` echoes what arrives on COM1: `echo: <bytes>` once a `\r` or `\n` arrives (the
/// `\n` of a `\r\n` pair adds no empty line) or ECHO_MAX bytes collect; printable ASCII
/// as is, every other byte as `\xNN`.
struct Echo {
    bytes: [u8; ECHO_MAX],
    len: usize,
    after_cr: bool,
}

impl Echo {
    fn push(&mut self, byte: u8, serial: &mut Serial) {
        let after_cr = core::mem::replace(&mut self.after_cr, byte == b'\r');
        match byte {
            b'\n' if after_cr && self.len == 0 => {}
            b'\r' | b'\n' => self.flush(serial),
            _ => {
                self.bytes[self.len] = byte;
                self.len += 1;
                if self.len == ECHO_MAX {
                    self.flush(serial);
                }
            }
        }
    }

    fn flush(&mut self, serial: &mut Serial) {
        let _ = write!(serial, "echo: ");
        for &b in &self.bytes[..self.len] {
            let _ = if (0x20..0x7f).contains(&b) { write!(serial, "{}", b as char) } else { write!(serial, "\\x{b:02x}") };
        }
        let _ = writeln!(serial);
        self.len = 0;
    }
}

fn hold(secs: u64) {
    if secs == 0 {
        return;
    }
    let hz = hw::tsc_hz();
    let end = hw::rdtsc().saturating_add(secs.saturating_mul(hz));
    while hw::rdtsc() < end {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut serial = Serial::com1();
    let _ = writeln!(serial, "TEST panic FAIL {info}");
    hw::power_off(None)
}
