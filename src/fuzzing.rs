//! Entry points for the fuzz targets in `fuzz/`: each takes arbitrary bytes and drives
//! one parser or device model with them. They live in the library so that `cargo test`
//! replays every committed corpus file and past crash on stable Rust
//! (tests/fuzz_replay.rs). None of them may panic, whatever the input.

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{acpi, boot, layout};
use crate::devices::acpi_pm::AcpiSleep;
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::ioapic::{IoApic, MsiSink};
use crate::devices::pci::{self, PciConfigIo, PciEcam, PciRoot};
use crate::devices::serial::{IrqLine, Serial};
use crate::vmm::config::VmConfig;

/// Every fuzz target, by name, for the replay test.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("kernel_loader", kernel_loader),
    ("cmdline", cmdline),
    ("acpi_tables", acpi_tables),
    ("vm_config", vm_config),
    ("platform_io", platform_io),
    ("ioapic", ioapic),
];

const FUZZ_MEM: u64 = 16 << 20;

fn guest_memory(size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("anonymous guest memory")
}

/// A kernel image from an untrusted file: ELF (PVH or not) or bzImage, then the boot
/// information for it. Every error must be an `Err`, never a panic or a write outside
/// guest memory.
pub fn kernel_loader(data: &[u8]) {
    let mem = guest_memory(FUZZ_MEM);
    for protocol in [boot::BootProtocol::Auto, boot::BootProtocol::Linux] {
        let mut image = Cursor::new(data);
        if let Ok(kernel) = boot::load_kernel(&mem, "fuzz", &mut image, FUZZ_MEM, protocol) {
            assert!(
                kernel.end <= layout::low_ram_end(FUZZ_MEM),
                "kernel end {:#x} beyond RAM",
                kernel.end
            );
            // A bzImage may declare a tiny cmdline_size; refusing then is correct.
            let len = match boot::load_cmdline(&mem, &kernel, "console=ttyS0") {
                Ok(len) => len,
                Err(boot::Error::CmdlineTooLong { len, max }) => {
                    assert!(len > max && boot::cmdline_limit(&kernel) == max + 1);
                    continue;
                }
                Err(e) => panic!("short command line refused: {e}"),
            };
            let rsdp = acpi::create_tables(&mem, 1).expect("tables for one vCPU");
            let _ = boot::write_boot_info(&mem, &kernel, len, None, rsdp, FUZZ_MEM);
        }
    }
}

/// A command line of arbitrary bytes: the limit check, and the test guest's additions.
pub fn cmdline(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mem = guest_memory(FUZZ_MEM);
    let mut image = Cursor::new(crate::testguest::IMAGE);
    let kernel = boot::load_kernel(
        &mem,
        "testguest",
        &mut image,
        FUZZ_MEM,
        boot::BootProtocol::Pvh,
    )
    .expect("test guest loads");
    match boot::load_cmdline(&mem, &kernel, &text) {
        Ok(len) => {
            // The reported length is exactly what is in guest memory, NUL after it.
            let mut back = vec![0u8; len as usize + 1];
            mem.read_slice(&mut back, GuestAddress(layout::CMDLINE))
                .expect("read back");
            assert_eq!(back[len as usize], 0);
            assert!(!back[..len as usize].contains(&0));
            // linux-loader trims blanks and re-joins boot and init arguments around
            // " -- ": only whitespace may differ from what was asked for.
            let written = String::from_utf8_lossy(&back[..len as usize]).into_owned();
            // A " -- " separator with no init arguments after it may be dropped.
            let asked: Vec<&str> = text.split_ascii_whitespace().collect();
            let got: Vec<&str> = written.split_ascii_whitespace().collect();
            let without_dashes = asked.last() == Some(&"--") && got[..] == asked[..asked.len() - 1];
            assert!(
                got == asked || without_dashes,
                "{written:?} is not {text:?} up to whitespace"
            );
        }
        Err(boot::Error::CmdlineTooLong { len, max }) => assert!(len > max),
        Err(boot::Error::CmdlineNotAscii { byte, offset }) => {
            assert_eq!(text.as_bytes()[offset], byte);
            assert!(!(b' '..=b'~').contains(&byte));
        }
        Err(_) => {}
    }
    let cfg = VmConfig {
        cmdline: Some(text.into_owned()),
        cpus: Some(2),
        memory_mib: Some(64),
        ..Default::default()
    };
    let full = cfg.effective_cmdline();
    assert!(full.contains("expect_mem=") && full.contains("expect_cpus="));
}

/// Builds the ACPI tables for a vCPU count taken from the input, then parses them back
/// as a guest would and compares: checksums, lengths, the MADT's processors.
pub fn acpi_tables(data: &[u8]) {
    let cpus = u16::from_le_bytes([
        data.first().copied().unwrap_or(1),
        data.get(1).copied().unwrap_or(0),
    ]) as u32;
    let mem = guest_memory(FUZZ_MEM);
    let rsdp = match acpi::create_tables(&mem, cpus) {
        Ok(addr) => addr,
        Err(acpi::Error::TooManyCpus(n)) => {
            assert!(n > acpi::MAX_MADT_CPUS);
            return;
        }
        Err(e) => panic!("building tables for {cpus} vCPUs: {e}"),
    };
    let parsed = acpi::parse_tables(&mem, rsdp).expect("the tables we built parse");
    assert_eq!(parsed.madt_cpus, cpus);
    assert_eq!(parsed.madt_ioapics, 1);
    assert!(parsed.signatures.iter().any(|s| s == b"FACP") && parsed.dsdt_ok);
}

/// Arbitrary TOML as a VM configuration.
pub fn vm_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = VmConfig::parse_toml(text) {
            let _ = cfg.effective_cmdline();
            let _ = cfg.clone().merge(cfg);
        }
    }
}

struct NoMsi;
impl MsiSink for NoMsi {
    fn send_msi(&self, _address: u64, _data: u32) {}
}

/// Reads and writes of every size to every platform port (serial, i8042, ACPI sleep,
/// PCI config mechanism #1) and to the IOAPIC's and the PCI ECAM's MMIO, as a guest
/// issues them. Input: 6-byte operations [kind, size, addr lo, addr hi, value lo, value hi].
pub fn platform_io(data: &[u8]) {
    let (events, _ended) = std::sync::mpsc::channel();
    let ioapic = Arc::new(Mutex::new(IoApic::new(1, NoMsi)));
    let irq = ioapic.clone();
    let serial = Serial::new(
        IrqLine::new(move || irq.lock().unwrap().assert_irq(4)),
        Box::new(std::io::sink()),
    );
    let pci = Arc::new(Mutex::new(PciRoot::new()));
    let mut pio = Bus::default();
    pio.insert(layout::COM1_PORT as u64, 8, Arc::new(Mutex::new(serial)))
        .unwrap();
    pio.insert(
        layout::I8042_PORT as u64,
        5,
        Arc::new(Mutex::new(I8042::new(events.clone()))),
    )
    .unwrap();
    pio.insert(
        layout::ACPI_SLEEP_PORT as u64,
        2,
        Arc::new(Mutex::new(AcpiSleep::new(events))),
    )
    .unwrap();
    pio.insert(
        pci::CONFIG_ADDRESS_PORT as u64,
        8,
        Arc::new(Mutex::new(PciConfigIo(pci.clone()))),
    )
    .unwrap();
    let mut mmio = Bus::default();
    mmio.insert(layout::IOAPIC_BASE, layout::IOAPIC_SIZE, ioapic)
        .unwrap();
    mmio.insert(
        layout::PCI_ECAM_BASE,
        pci::ECAM_SIZE,
        Arc::new(Mutex::new(PciEcam(pci))),
    )
    .unwrap();
    for op in data.chunks_exact(6) {
        let size = [1usize, 2, 4, 8][(op[1] & 3) as usize];
        let low = u16::from_le_bytes([op[2], op[3]]) as u64;
        let value = (u16::from_le_bytes([op[4], op[5]]) as u64).to_le_bytes();
        let ioapic_addr = layout::IOAPIC_BASE - 0x100 + (low & 0x1fff);
        // ECAM: the address bits pick the device (15..19) and register (0..11).
        let ecam_addr =
            layout::PCI_ECAM_BASE + ((low << 4 | (op[1] as u64 >> 2) & 0xf) & 0x10_ffff);
        match op[0] % 6 {
            0 => drop(pio.read(low, &mut [0u8; 8][..size])),
            1 => drop(pio.write(low, &value[..size])),
            2 => drop(mmio.read(ioapic_addr, &mut [0u8; 8][..size])),
            3 => drop(mmio.write(ioapic_addr, &value[..size])),
            4 => drop(mmio.read(ecam_addr, &mut [0u8; 8][..size])),
            _ => drop(mmio.write(ecam_addr, &value[..size])),
        }
    }
}

/// The IOAPIC's registers and pins: select/window accesses, pin assertions and EOIs in
/// any order. Input: 6-byte operations [kind, arg, value (4 bytes)].
pub fn ioapic(data: &[u8]) {
    use crate::devices::bus::BusDevice;
    let mut io = IoApic::new(0, NoMsi);
    for op in data.chunks_exact(6) {
        let value = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        match op[0] % 6 {
            0 => io.write(0x00, &value.to_le_bytes()),
            1 => io.write(0x10, &value.to_le_bytes()),
            2 => io.read((op[1] as u64) & 0x7f, &mut [0u8; 4]),
            3 => io.assert_irq(op[1] as usize),
            4 => io.deassert_irq(op[1] as usize),
            _ => io.end_of_interrupt(op[1]),
        }
    }
}
