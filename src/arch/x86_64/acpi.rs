//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced, with reset and sleep registers),
//! DSDT (the S5 sleep package, the PCI host bridge with its windows, INTx routing and
//! `_OSC`, COM1, the i8042, the power button and the Generic Event Device that presses
//! it), MADT (every vCPU, the IOAPIC, the ISA interrupt overrides) and MCFG.
//! `cellvm run --dump-acpi DIR` writes the same bytes to files (dump_tables).
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

fn dsdt(ram_end: u64) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // \_S5_: SLP_TYP 5 is what the guest writes to the sleep control register to power off.
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8, &0u8]));
    sdt.append_slice(&bytes(&s5));
    sdt.append_slice(&pci_host_bridge(ram_end));
    sdt.append_slice(&com1());
    sdt.append_slice(&i8042());
    sdt.append_slice(&power_button());
    sdt.append_slice(&ged());
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// `\_SB.COM1`: the 16550A at COM1_PORT (8 ports) on ISA IRQ 4 (the IOAPIC pin of the
/// same number: edge-triggered, active-high).
fn com1() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let resources = aml::ResourceTemplate::new(vec![&io, &irq]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![&hid, &uid, &crs],
    ))
}

/// `\_SB.PS2K`: the i8042 keyboard controller, its data (0x60) and command/status (0x64)
/// ports and ISA IRQ 1. The VMM's i8042 is there for its reset line (the FADT's reset
/// register); it has no keyboard behind it, so IRQ 1 never fires.
fn i8042() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let data = aml::IO::new(layout::I8042_PORT, layout::I8042_PORT, 1, 1);
    let command = aml::IO::new(layout::I8042_PORT + 4, layout::I8042_PORT + 4, 1, 1);
    let irq = aml::Interrupt::new(true, true, false, false, layout::I8042_IRQ);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&data, &command, &irq]),
    );
    bytes(&aml::Device::new(
        "_SB_.PS2K".into(),
        vec![&hid, &uid, &crs],
    ))
}

/// PCI Firmware Specification's `_OSC` UUID for PCI host bridges.
const PCI_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// `_OSC` control bits the OS may take (PCI Firmware Spec 3.3, 4.5.2): PME (2), AER (3)
/// and the PCIe capability structure (4): nothing in the VMM handles them for the OS.
/// Native hot plug (0), SHPC (1), LTR (5) and later bits are refused: there is no hot
/// plug of any kind, no SHPC controller, no LTR.
pub const PCI_OSC_GRANTED: u32 = 0x1c;
/// `_OSC` status bits (first capabilities dword).
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;
const OSC_UNRECOGNIZED_REVISION: u8 = 1 << 3;
const OSC_CAPABILITIES_MASKED: u8 = 1 << 4;

/// `\_SB.PCI0`: the PCIe host bridge of segment 0, bus 0 (src/devices/pci.rs).
///
/// `_CRS`: bus 0 only (what the ECAM and the MCFG cover); the configuration ports
/// 0xCF8-0xCFF; the I/O window; the 32-bit memory window every BAR is placed in; the
/// 64-bit window above RAM (layout.rs). `_PRT`: every slot's four INTx pins, each to the
/// GSI the VMM raises for it (level-triggered, active-low, as GSI-form `_PRT` entries
/// are). `_OSC`: grants PCI_OSC_GRANTED.
fn pci_host_bridge(ram_end: u64) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);

    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let config = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io = aml::AddressSpace::<u16>::new_io(layout::PCI_IO_START, layout::PCI_IO_END, None);
    let mem32 = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        (layout::PCI_MMIO32_END - 1) as u32,
        None,
    );
    let (start64, end64) = layout::pci_mmio64(ram_end);
    let mem64 = aml::AddressSpace::<u64>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        start64,
        end64 - 1,
        None,
    );
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&bus, &config, &io, &mem32, &mem64]),
    );

    // _PRT: Package { Package { 0xSSSSFFFF, pin, 0, GSI } ... } for slots 1-31.
    let routes: Vec<(u32, u8, u32)> = (1..32u8)
        .flat_map(|slot| {
            (0..4u8).map(move |pin| {
                (
                    (slot as u32) << 16 | 0xffff,
                    pin,
                    layout::pci_intx_gsi(slot, pin),
                )
            })
        })
        .collect();
    let entries: Vec<aml::Package> = routes
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Name::new(
        "_PRT".into(),
        &aml::Package::new(entries.iter().map(|e| e as &dyn Aml).collect()),
    );

    let (cdw1, cdw2, cdw3) = (
        aml::Path::new("CDW1"),
        aml::Path::new("CDW2"),
        aml::Path::new("CDW3"),
    );
    let create1 = aml::CreateDWordField::new(&cdw1, &aml::Arg(3), &aml::ZERO);
    let create2 = aml::CreateDWordField::new(&cdw2, &aml::Arg(3), &4u8);
    let create3 = aml::CreateDWordField::new(&cdw3, &aml::Arg(3), &8u8);
    let uuid = aml::Uuid::new(PCI_OSC_UUID);
    let is_pci = aml::Equal::new(&aml::Arg(0), &uuid);
    let bad_revision = aml::NotEqual::new(&aml::Arg(1), &aml::ONE);
    let flag_revision = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let on_bad_revision = aml::If::new(&bad_revision, vec![&flag_revision]);
    let asked = aml::Store::new(&aml::Local(0), &cdw3);
    let grant = aml::And::new(&cdw3, &cdw3, &PCI_OSC_GRANTED);
    let masked = aml::NotEqual::new(&aml::Local(0), &cdw3);
    let flag_masked = aml::Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let on_masked = aml::If::new(&masked, vec![&flag_masked]);
    let on_pci = aml::If::new(
        &is_pci,
        vec![
            &create2,
            &create3,
            &on_bad_revision,
            &asked,
            &grant,
            &on_masked,
        ],
    );
    let flag_uuid = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let otherwise = aml::Else::new(vec![&flag_uuid]);
    let ret = aml::Return::new(&aml::Arg(3));
    let osc = aml::Method::new(
        "_OSC".into(),
        4,
        true,
        vec![&create1, &on_pci, &otherwise, &ret],
    );
    bytes(&aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &cid, &seg, &bbn, &uid, &crs, &prt, &osc],
    ))
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

/// MADT structure type 2, Interrupt Source Override (ISA bus).
#[repr(C, packed)]
#[derive(Clone, Copy, zerocopy::IntoBytes, zerocopy::Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(zerocopy::IntoBytes::as_bytes(self));
    }
}

/// MPS INTI flags: polarity active-high (bits 1:0 = 01), trigger edge (bits 3:2 = 01).
const INTI_EDGE_ACTIVE_HIGH: u16 = 0b0101;

/// ISA IRQs stated explicitly in the MADT: the GED's (the event interrupt of this
/// hardware-reduced platform, which has no SCI) and COM1's, each on the IOAPIC pin of the
/// same number, edge-triggered and active-high as their `_CRS` say.
const ISA_OVERRIDES: [u32; 2] = [layout::COM1_IRQ, layout::GED_IRQ];

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
    for irq in ISA_OVERRIDES {
        madt.add_structure(InterruptSourceOverride {
            kind: 2,
            length: 10,
            bus: 0,
            source: irq as u8,
            gsi: irq,
            flags: INTI_EDGE_ACTIVE_HIGH,
        });
    }
    Ok(bytes(&madt))
}

fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_BASE, 0, 0, 0);
    bytes(&mcfg)
}

/// One table as the guest gets it: the file stem `--dump-acpi` writes it under (as
/// ACPICA's acpidump -b names them), its guest-physical address and its bytes.
pub struct Table {
    pub name: &'static str,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// Every table for a VM of `cpus` vCPUs whose RAM ends at `ram_end`, laid out in the
/// BIOS area: RSDP, DSDT, FADT, MADT, MCFG, XSDT.
pub fn build_tables(cpus: u32, ram_end: u64) -> Result<Vec<Table>, Error> {
    let align = |x: u64| (x + 15) & !15;
    let rsdp_addr = layout::ACPI_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(ram_end);
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
    let t = |name, addr, bytes| Table { name, addr, bytes };
    Ok(vec![
        t("rsdp", rsdp_addr, rsdp),
        t("dsdt", dsdt_addr, dsdt),
        t("facp", fadt_addr, fadt),
        t("apic", madt_addr, madt),
        t("mcfg", mcfg_addr, mcfg),
        t("xsdt", xsdt_addr, xsdt),
    ])
}

/// Writes every table into guest memory and returns the RSDP's address. The 64-bit PCI
/// window lies above the highest byte of `mem`.
pub fn create_tables(mem: &GuestMemoryMmap, cpus: u32) -> Result<GuestAddress, Error> {
    use vm_memory::GuestMemoryBackend;
    let ram_end = mem.last_addr().0.saturating_add(1);
    let tables = build_tables(cpus, ram_end)?;
    for t in &tables {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(Error::Write)?;
    }
    Ok(GuestAddress(layout::ACPI_START))
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("--dump-acpi {0}: {1}")]
    Dir(String, String),
    #[error("--dump-acpi {0}: cannot write {1}: {2}")]
    Write(String, String, std::io::Error),
    #[error("cpus = {0}: must be between 1 and {MAX_MADT_CPUS}")]
    Cpus(u32),
    #[error("memory = {0} MiB: must be between {min} and {max} MiB", min = layout::MIN_MEMORY_MIB, max = u64::MAX >> 21)]
    Memory(u64),
    #[error(transparent)]
    Tables(#[from] Error),
}

impl DumpError {
    /// 2 for a refused configuration or directory, 1 for a failed write.
    pub fn exit_code(&self) -> i32 {
        match self {
            DumpError::Write(..) => 1,
            _ => 2,
        }
    }
}

/// `cellvm run --dump-acpi DIR`: writes the tables a VM of `cpus` vCPUs and `memory_mib`
/// MiB gets, one file per table (`<name>.dat`), into the existing directory `dir`.
/// Returns the files written.
pub fn dump_tables(
    dir: &std::path::Path,
    cpus: u32,
    memory_mib: u64,
) -> Result<Vec<std::path::PathBuf>, DumpError> {
    let shown = dir.display().to_string();
    if cpus == 0 || cpus > MAX_MADT_CPUS {
        return Err(DumpError::Cpus(cpus));
    }
    if !(layout::MIN_MEMORY_MIB..=u64::MAX >> 21).contains(&memory_mib) {
        return Err(DumpError::Memory(memory_mib));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(DumpError::Dir(shown, "not a directory".into())),
        Err(e) => return Err(DumpError::Dir(shown, e.to_string())),
    }
    let ram_end = layout::ram_end(memory_mib << 20);
    let mut written = Vec::new();
    for t in build_tables(cpus, ram_end)? {
        let path = dir.join(format!("{}.dat", t.name));
        std::fs::write(&path, &t.bytes)
            .map_err(|e| DumpError::Write(shown.clone(), path.display().to_string(), e))?;
        written.push(path);
    }
    Ok(written)
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
        for table in [dsdt(1 << 30), fadt(0x1234), madt(4).unwrap(), mcfg()] {
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
        let t = dsdt(1 << 30);
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
    fn dsdt_describes_the_pci_host_bridge_windows_and_routing() {
        let ram_end = 6u64 << 30;
        let t = dsdt(ram_end);
        let pci = device_body(&t[36..], b"\x2e_SB_PCI0");
        // EISAID("PNP0A08") and ("PNP0A03"), compressed.
        assert!(contains(pci, b"\x08_HID\x0c\x41\xd0\x0a\x08"));
        assert!(contains(pci, b"\x08_CID\x0c\x41\xd0\x0a\x03"));
        assert!(contains(pci, b"\x08_SEG\x00") && contains(pci, b"\x08_BBN\x00"));
        // WordBusNumber 0-0; IO 0xCF8 x 8; the 32-bit window; the 64-bit window.
        assert!(contains(
            pci,
            &[0x88, 0x0d, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0, 0]
        ));
        assert!(contains(pci, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        let mut mem32 = vec![0x87, 0x17, 0, 0, 0x0c, 0x01, 0, 0, 0, 0];
        mem32.extend_from_slice(&(layout::PCI_MMIO32_START as u32).to_le_bytes());
        mem32.extend_from_slice(&(layout::PCI_MMIO32_END as u32 - 1).to_le_bytes());
        assert!(contains(pci, &mem32), "32-bit window");
        let (start, end) = layout::pci_mmio64(ram_end);
        assert_eq!(start, 6 << 30);
        let mut mem64 = vec![0x8a, 0x2b, 0, 0, 0x0c, 0x01];
        mem64.extend_from_slice(&0u64.to_le_bytes());
        mem64.extend_from_slice(&start.to_le_bytes());
        mem64.extend_from_slice(&(end - 1).to_le_bytes());
        assert!(contains(pci, &mem64), "64-bit window");
        // _PRT: 31 slots x 4 pins; slot 9's INTA is GSI 16 again.
        assert!(contains(pci, b"_PRT\x12"));
        assert!(contains(
            pci,
            &[0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x09, 0x00, 0x00, 0x00, 0x0a, 0x10]
        ));
        assert!(contains(pci, b"_OSC\x0c"), "_OSC: 4 arguments, serialized");
    }

    #[test]
    fn dsdt_has_com1_and_the_i8042_with_their_resources() {
        let t = dsdt(1 << 30);
        let com1 = device_body(&t[36..], b"\x2e_SB_COM1");
        assert!(contains(com1, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
        assert!(contains(com1, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
        let kbd = device_body(&t[36..], b"\x2e_SB_PS2K");
        assert!(contains(kbd, b"\x08_HID\x0c\x41\xd0\x03\x03"), "PNP0303");
        assert!(contains(kbd, &[0x47, 1, 0x60, 0, 0x60, 0, 1, 1]));
        assert!(contains(kbd, &[0x47, 1, 0x64, 0, 0x64, 0, 1, 1]));
        assert!(contains(kbd, &[0x89, 6, 0, 0x03, 1, 1, 0, 0, 0]));
    }

    #[test]
    fn madt_states_the_ged_and_com1_irqs_as_edge_active_high() {
        let t = madt(2).unwrap();
        let mut off = 44;
        let mut overrides = Vec::new();
        while off < t.len() {
            if t[off] == 2 {
                assert_eq!(t[off + 1], 10);
                let gsi = u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap());
                let flags = u16::from_le_bytes([t[off + 8], t[off + 9]]);
                overrides.push((t[off + 2], t[off + 3] as u32, gsi, flags));
            }
            off += t[off + 1] as usize;
        }
        assert_eq!(
            overrides,
            [
                (0, layout::COM1_IRQ, layout::COM1_IRQ, 5),
                (0, layout::GED_IRQ, layout::GED_IRQ, 5)
            ]
        );
    }

    #[test]
    fn the_tables_in_guest_memory_are_the_ones_dumped() {
        let mem_size = 64u64 << 20;
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_size)
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let rsdp = create_tables(&mem, 3).unwrap();
        let dir = std::env::temp_dir().join(format!("cellvm-acpi-dump-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = dump_tables(&dir, 3, 64).unwrap();
        assert_eq!(files.len(), 6);
        for t in build_tables(3, layout::ram_end(mem_size)).unwrap() {
            let file = std::fs::read(dir.join(format!("{}.dat", t.name))).unwrap();
            let mut in_guest = vec![0u8; file.len()];
            mem.read_slice(&mut in_guest, GuestAddress(t.addr)).unwrap();
            assert_eq!(file, in_guest, "{}", t.name);
        }
        assert_eq!(rsdp.0, layout::ACPI_START);
        assert!(matches!(
            dump_tables(&dir.join("missing"), 1, 64),
            Err(DumpError::Dir(..))
        ));
        assert!(matches!(
            dump_tables(&files[0], 1, 64),
            Err(DumpError::Dir(..))
        ));
        assert!(matches!(dump_tables(&dir, 0, 64), Err(DumpError::Cpus(0))));
        assert!(matches!(dump_tables(&dir, 1, 1), Err(DumpError::Memory(1))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dsdt_has_the_power_button_and_s5() {
        let t = dsdt(1 << 30);
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
        std::fs::write(dir.join("dsdt.dat"), dsdt(1 << 30)).unwrap();
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
            "PNP0A08",
            "PNP0303",
            "_PRT",
            "_OSC",
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
