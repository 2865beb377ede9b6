//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced, with reset and sleep registers),
//! DSDT (the S5 sleep package, COM1, the power button and the Generic Event Device that
//! presses it) and MADT (every vCPU and the IOAPIC).
//!
//! Built with the rust-vmm `acpi_tables` crate; this module only decides what goes in
//! them and where they live (the BIOS area, so a guest that scans for the RSDP finds it).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use crate::devices::ged;

const OEM_ID: [u8; 6] = *b"CELLVM";
const OEM_TABLE_ID: [u8; 8] = *b"CELLVM  ";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH: no VGA, no CMOS RTC, no 8042 keyboard (only its reset line).
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACPI tables need {0} bytes, more than the {1}-byte BIOS area")]
    TooLarge(u64, u64),
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
    #[error("{0} vCPUs exceed the {MAX_MADT_CPUS} the MADT is laid out for")]
    TooManyCpus(u32),
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port as u64,
    )
}

fn dsdt() -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // \_S5_: SLP_TYP 5 is what the guest writes to the sleep control register to power off.
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8, &0u8]));
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let resources = aml::ResourceTemplate::new(vec![&io, &irq]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    sdt.append_slice(&bytes(&s5));
    sdt.append_slice(&bytes(&com1));
    sdt.append_slice(&power_button());
    sdt.append_slice(&ged());
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// `\_SB.PWRB`: the control-method power button (the FADT's PWR_BUTTON flag says there is
/// no fixed-feature one). The GED notifies it with 0x80, "button pressed".
fn power_button() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    bytes(&aml::Device::new("_SB_.PWRB".into(), vec![&hid, &uid]))
}

/// `\_SB.GED_`, the Generic Event Device (src/devices/ged.rs): its interrupt, the
/// OperationRegion over its status register, and `_EVT`, which the OS runs on each
/// interrupt: read the status once (reading clears it) and notify the power button if
/// its bit is set.
fn ged() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    // Consumer, edge-triggered, active-high, exclusive.
    let irq = aml::Interrupt::new(true, true, false, false, layout::GED_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemIO,
        &layout::GED_PORT,
        &layout::GED_SIZE,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat = aml::Path::new("GDAT");
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let status = aml::Store::new(&aml::Local(0), &gdat);
    let pressed = aml::And::new(&aml::ZERO, &aml::Local(0), &ged::POWER_BUTTON);
    let notify = aml::Notify::new(&pwrb, &0x80u8);
    let on_press = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&status, &on_press]);
    bytes(&aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    ))
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io_register(layout::I8042_PORT + 4);
    fadt.reset_value = 0xfe;
    fadt.sleep_control_reg = io_register(layout::ACPI_SLEEP_PORT);
    fadt.sleep_status_reg = io_register(layout::ACPI_SLEEP_PORT + 1);
    fadt.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"CELLVM\0\0").into();
    bytes(&fadt.finalize())
}

/// APIC ids below this get xAPIC entries; the rest x2APIC ones (255 is xAPIC broadcast).
const FIRST_X2APIC_ID: u32 = 255;
/// Upper bound on the MADT's processors (KVM's own limit is lower on every host seen).
pub const MAX_MADT_CPUS: u32 = 4096;

/// MADT structure type 9, Processor Local x2APIC, which acpi_tables does not provide.
#[repr(C, packed)]
#[derive(Clone, Copy, zerocopy::IntoBytes, zerocopy::Immutable)]
struct LocalX2Apic {
    kind: u8,
    length: u8,
    reserved: u16,
    x2apic_id: u32,
    flags: u32,
    uid: u32,
}

impl Aml for LocalX2Apic {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(zerocopy::IntoBytes::as_bytes(self));
    }
}

fn madt(cpus: u32) -> Result<Vec<u8>, Error> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_BASE as u32),
    );
    if cpus > MAX_MADT_CPUS {
        return Err(Error::TooManyCpus(cpus));
    }
    for id in 0..cpus {
        if id < FIRST_X2APIC_ID {
            madt.add_structure(ProcessorLocalApic::new(
                id as u8,
                id as u8,
                EnabledStatus::Enabled,
            ));
        } else {
            madt.add_structure(LocalX2Apic {
                kind: 9,
                length: 16,
                reserved: 0,
                x2apic_id: id,
                flags: 1,
                uid: id,
            });
        }
    }
    // The IOAPIC takes the first id after the vCPUs' (8 bits; ACPI-mode guests do not
    // require it to differ from every LAPIC id).
    madt.add_structure(IoApic::new(
        cpus.min(254) as u8,
        layout::IOAPIC_BASE as u32,
        0,
    ));
    Ok(bytes(&madt))
}

fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_BASE, 0, 0, 0);
    bytes(&mcfg)
}

/// Writes every table into guest memory and returns the RSDP's address.
pub fn create_tables(mem: &GuestMemoryMmap, cpus: u32) -> Result<GuestAddress, Error> {
    let align = |x: u64| (x + 15) & !15;
    let rsdp_addr = layout::ACPI_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt();
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus)?;
    let mcfg_addr = align(madt_addr + madt.len() as u64);
    let mcfg = mcfg();
    let xsdt_addr = align(mcfg_addr + mcfg.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > layout::ACPI_END {
        return Err(Error::TooLarge(
            end - layout::ACPI_START,
            layout::ACPI_END - layout::ACPI_START,
        ));
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, data) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (mcfg_addr, &mcfg),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(Error::Write)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(any(test, feature = "fuzzing"))]
/// What a guest finds when it reads the tables back (used by tests and fuzzing).
#[derive(Debug)]
pub struct ParsedTables {
    pub signatures: Vec<[u8; 4]>,
    pub madt_cpus: u32,
    pub madt_ioapics: u32,
    pub dsdt_ok: bool,
}

#[cfg(any(test, feature = "fuzzing"))]
fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Result<Vec<u8>, String> {
    let len: u32 = mem
        .read_obj(GuestAddress(addr + 4))
        .map_err(|e| format!("table at {addr:#x}: {e}"))?;
    if !(36..=0x1_0000).contains(&len) {
        return Err(format!("table at {addr:#x}: length {len}"));
    }
    let mut t = vec![0u8; len as usize];
    mem.read_slice(&mut t, GuestAddress(addr))
        .map_err(|e| format!("table at {addr:#x}: {e}"))?;
    if t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) != 0 {
        return Err(format!(
            "table {:?} at {addr:#x}: bad checksum",
            String::from_utf8_lossy(&t[..4])
        ));
    }
    Ok(t)
}

#[cfg(any(test, feature = "fuzzing"))]
fn u64_at(t: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(t.get(off..off + 8)?.try_into().ok()?))
}

#[cfg(any(test, feature = "fuzzing"))]
/// Reads the tables from the RSDP as a guest would, checking every checksum.
pub fn parse_tables(mem: &GuestMemoryMmap, rsdp: GuestAddress) -> Result<ParsedTables, String> {
    let mut r = [0u8; 36];
    mem.read_slice(&mut r, rsdp)
        .map_err(|e| format!("RSDP: {e}"))?;
    let sum = |d: &[u8]| d.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    if &r[..8] != b"RSD PTR " || sum(&r[..20]) != 0 || sum(&r) != 0 {
        return Err("RSDP: bad signature or checksum".into());
    }
    let xsdt = read_table(mem, u64_at(&r, 24).unwrap_or(0))?;
    let mut parsed = ParsedTables {
        signatures: Vec::new(),
        madt_cpus: 0,
        madt_ioapics: 0,
        dsdt_ok: false,
    };
    for i in 0..(xsdt.len() - 36) / 8 {
        let t = read_table(mem, u64_at(&xsdt, 36 + i * 8).unwrap_or(0))?;
        let sig: [u8; 4] = t[..4].try_into().unwrap_or_default();
        match &sig {
            b"FACP" => {
                parsed.dsdt_ok = u64_at(&t, 140)
                    .is_some_and(|a| read_table(mem, a).is_ok_and(|d| &d[..4] == b"DSDT"))
            }
            b"APIC" => {
                let mut off = 44;
                while off + 2 <= t.len() {
                    let len = t[off + 1] as usize;
                    if len < 2 || off + len > t.len() {
                        return Err(format!("MADT: bad structure length {len} at {off}"));
                    }
                    match t[off] {
                        0 | 9 => parsed.madt_cpus += 1,
                        1 => parsed.madt_ioapics += 1,
                        _ => {}
                    }
                    off += len;
                }
            }
            _ => {}
        }
        parsed.signatures.push(sig);
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn every_table_has_a_valid_checksum_and_length() {
        for table in [dsdt(), fadt(0x1234), madt(4).unwrap(), mcfg()] {
            assert_eq!(checksum(&table), 0, "table {:?}", &table[..4]);
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
        }
    }

    #[test]
    fn madt_lists_every_vcpu_and_one_ioapic() {
        let t = madt(7).unwrap();
        let (mut cpus, mut ioapics, mut off) = (0, 0, 44);
        while off < t.len() {
            match t[off] {
                0 => cpus += 1,
                1 => ioapics += 1,
                _ => {}
            }
            off += t[off + 1] as usize;
        }
        assert_eq!((cpus, ioapics), (7, 1));
        assert!(matches!(
            madt(MAX_MADT_CPUS + 1),
            Err(Error::TooManyCpus(_))
        ));
    }

    #[test]
    fn apic_ids_past_254_get_x2apic_entries() {
        let t = madt(300).unwrap();
        let (mut xapic, mut x2apic, mut off, mut last) = (0, 0, 44, 0);
        while off < t.len() {
            match t[off] {
                0 => xapic += 1,
                9 => {
                    assert_eq!(t[off + 1], 16);
                    last = u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap());
                    x2apic += 1;
                }
                _ => {}
            }
            off += t[off + 1] as usize;
        }
        assert_eq!((xapic, x2apic, last), (255, 45, 299));
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    /// The body of the first `Device` in `aml` whose name string is `name` (e.g.
    /// `\x2e_SB_GED_`), by its PkgLength.
    fn device_body<'a>(aml: &'a [u8], name: &[u8]) -> &'a [u8] {
        let at = (0..aml.len() - 2)
            .find(|&i| {
                aml[i..].starts_with(&[0x5b, 0x82]) && {
                    let lead = aml[i + 2];
                    let n = 1 + (lead >> 6) as usize;
                    aml[i + 2 + n..].starts_with(name)
                }
            })
            .unwrap_or_else(|| panic!("no Device {name:x?} in {aml:x?}"));
        let lead = aml[at + 2];
        let extra = (lead >> 6) as usize;
        let mut len = if extra == 0 {
            (lead & 0x3f) as usize
        } else {
            (lead & 0x0f) as usize
        };
        for k in 0..extra {
            len |= (aml[at + 3 + k] as usize) << (4 + 8 * k);
        }
        // PkgLength counts itself and what follows it.
        &aml[at + 2 + 1 + extra..at + 2 + len]
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_has_the_ged_with_its_interrupt_region_and_event_method() {
        let t = dsdt();
        let aml = &t[36..];
        let ged = device_body(aml, b"\x2e_SB_GED_");
        assert!(contains(ged, b"\x08_HID\x0dACPI0013\x00"), "_HID ACPI0013");
        // _CRS: an Extended Interrupt descriptor: consumer, edge, active-high,
        // exclusive (flags 0x03), one interrupt, GED_IRQ.
        let mut irq = vec![0x89, 6, 0, 0x03, 1];
        irq.extend_from_slice(&layout::GED_IRQ.to_le_bytes());
        assert!(contains(ged, &irq), "_CRS interrupt {irq:x?} in {ged:x?}");
        // OperationRegion (GDST, SystemIO, GED_PORT, GED_SIZE).
        let mut region = b"\x5b\x80GDST\x01\x0b".to_vec();
        region.extend_from_slice(&layout::GED_PORT.to_le_bytes());
        region.push(0x01); // OneOp: GED_SIZE is 1
        assert_eq!(layout::GED_SIZE, 1);
        assert!(
            contains(ged, &region),
            "OperationRegion {region:x?} in {ged:x?}"
        );
        // Field (GDST, ByteAcc, NoLock, WriteAsZeros) { GDAT, 8 }.
        assert!(contains(ged, b"GDST\x41GDAT\x08"), "Field GDAT");
        // Method (_EVT, 1, Serialized) that notifies \_SB_.PWRB with 0x80.
        assert!(contains(ged, b"_EVT\x09"), "_EVT: 1 argument, serialized");
        assert!(
            contains(ged, b"\x86\\\x2e_SB_PWRB\x0a\x80"),
            "Notify(PWRB, 0x80)"
        );
        // And (Local0, POWER_BUTTON): the power-button bit the device latches.
        assert!(contains(ged, &[0x7b, 0x60, ged::POWER_BUTTON, 0x00]));
    }

    #[test]
    fn dsdt_has_the_power_button_and_s5() {
        let t = dsdt();
        let aml = &t[36..];
        let pwrb = device_body(aml, b"\x2e_SB_PWRB");
        // EISAID("PNP0C0C") compressed: 0x41d00c0c stored big-endian-ish as AML does.
        assert!(contains(
            pwrb,
            &[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0c, 0x0c]
        ));
        assert!(contains(aml, b"\x08_S5_\x12"), "_S5_ package");
    }

    /// The DSDT as ACPICA's compiler sees it: disassembled and recompiled with no error
    /// and no warning. Needs `iasl` (Debian: acpica-tools).
    #[test]
    fn dsdt_disassembles_and_recompiles_cleanly_with_iasl() {
        let dir = std::env::temp_dir().join(format!("cellvm-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dsdt.dat"), dsdt()).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("iasl")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| {
                    panic!("iasl (acpica-tools) is needed for this test and did not run: {e}")
                });
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl {args:?}: {text}");
            text
        };
        run(&["-d", "dsdt.dat"]);
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        for expected in [
            "ACPI0013",
            "PNP0C0C",
            "Notify (\\_SB.PWRB, 0x80)",
            "_EVT",
            "SystemIO",
        ] {
            assert!(dsl.contains(expected), "{expected} not in\n{dsl}");
        }
        let compiled = run(&["-p", "recompiled", "dsdt.dsl"]);
        assert!(
            compiled.contains(" 0 Errors, 0 Warnings"),
            "iasl recompile:\n{compiled}\n{dsl}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fadt_names_the_sleep_and_reset_registers() {
        let f = fadt(0x1000);
        assert_eq!(&f[0..4], b"FACP");
        // RESET_REG (offset 116): system I/O, the i8042 command port; RESET_VALUE 0xfe.
        assert_eq!(f[116], 1);
        assert_eq!(u64::from_le_bytes(f[120..128].try_into().unwrap()), 0x64);
        assert_eq!(f[128], 0xfe);
        // SLEEP_CONTROL_REG (offset 244).
        assert_eq!(
            u64::from_le_bytes(f[248..256].try_into().unwrap()),
            layout::ACPI_SLEEP_PORT as u64
        );
        // X_DSDT (offset 140).
        assert_eq!(u64::from_le_bytes(f[140..148].try_into().unwrap()), 0x1000);
    }
}
