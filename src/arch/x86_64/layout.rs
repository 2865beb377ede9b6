//! Guest-physical memory layout. One table of addresses, so that the loader, the
//! firmware tables and the e820 map cannot disagree.

/// `hvm_start_info` for PVH boots, followed by its memory map and module list.
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MEMMAP: u64 = 0x6100;
pub const PVH_MODLIST: u64 = 0x6800;
/// Linux `boot_params` (the "zero page") for 64-bit boot-protocol boots.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack of the boot vCPU in 64-bit boots.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page tables identity-mapping the first 1 GiB for 64-bit boots.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// GDT and (empty) IDT for 64-bit boots.
pub const BOOT_GDT: u64 = 0x500;
pub const BOOT_IDT: u64 = 0x520;
/// The kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Linux's x86 COMMAND_LINE_SIZE, NUL included.
pub const CMDLINE_MAX: usize = 2048;
/// End of conventional memory; 640 KiB to 1 MiB is the legacy hole.
pub const LOW_RAM_END: u64 = 0xa_0000;
/// ACPI tables live in the BIOS area so that a guest scanning for the RSDP finds it.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Kernels load here (and above).
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// The 32-bit PCI hole: device MMIO (IOAPIC, LAPIC, later PCI BARs), never RAM.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Virtio-pci BARs: slot N's BAR 0 at PCI_BAR_BASE + N * PCI_BAR_STRIDE.
pub const PCI_BAR_BASE: u64 = 0xc000_0000;
pub const PCI_BAR_STRIDE: u64 = 0x1_0000;
/// The host bridge's 32-bit memory window (`\_SB.PCI0._CRS`): from the start of the hole
/// up to the ECAM. Every BAR the VMM places lies inside it; e820 has no RAM there.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_END: u64 = PCI_ECAM_BASE;
/// The host bridge's I/O window for PCI I/O BARs (none today): above every platform port
/// (COM1, the i8042, the ACPI sleep and GED registers, 0xCF8-0xCFF).
pub const PCI_IO_START: u16 = 0x1000;
pub const PCI_IO_END: u16 = 0xffff;
/// The host bridge's 64-bit memory window: this many bytes from the first GiB boundary
/// at or above both 4 GiB and the end of RAM. No BAR is placed there today (every BAR is
/// 32-bit, in the window below 4 GiB); it is there for guests that reassign BARs.
pub const PCI_MMIO64_SIZE: u64 = 32 << 30;
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
/// PCI ECAM (bus 0), described to the guest by the MCFG table.
pub const PCI_ECAM_BASE: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const LAPIC_BASE: u64 = 0xfee0_0000;

/// I/O ports of the platform devices.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
/// The i8042's ISA IRQ (keyboard), as the DSDT describes it; nothing raises it.
pub const I8042_IRQ: u32 = 1;
/// ACPI sleep control / status registers (hardware-reduced ACPI).
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// The ACPI Generic Event Device (GED, `\_SB.GED_` in the DSDT): a one-byte event status
/// register in port I/O space (the DSDT's OperationRegion `GDST` names it) ...
pub const GED_PORT: u16 = 0x610;
/// ... of this many bytes (the device's range on the port bus) ...
pub const GED_SIZE: u64 = 1;
/// ... and the IOAPIC pin (GSI) its interrupt arrives on: edge-triggered, active-high,
/// as its `_CRS` says. Free: COM1 has 4 and virtio INTx 16-23.
pub const GED_IRQ: u32 = 5;
// Slot 31's BAR ends inside the 32-bit window.
const _: () = assert!(
    PCI_BAR_BASE >= PCI_MMIO32_START
        && PCI_BAR_BASE + 32 * PCI_BAR_STRIDE <= PCI_MMIO32_END
        && PCI_BAR_STRIDE >= crate::virtio::pci::BAR_SIZE
);
// Checked when building: pins 16-23 are virtio INTx (src/vmm/virtio.rs), 4 is COM1.
const _: () = assert!(GED_IRQ < 16 && GED_IRQ != COM1_IRQ);

/// The smallest guest we accept: the low 1 MiB plus room for a kernel.
pub const MIN_MEMORY_MIB: u64 = 8;

/// RAM regions for `mem` bytes: below the 32-bit hole, then above 4 GiB.
pub fn ram_regions(mem: u64) -> Vec<(u64, u64)> {
    if mem <= MMIO_HOLE_START {
        vec![(0, mem)]
    } else {
        vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem - MMIO_HOLE_START)]
    }
}

/// E820 types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map the guest sees: (start, size, type), sorted and non-overlapping.
pub fn e820_map(mem: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, LOW_RAM_END, E820_RAM),
        (ACPI_START, ACPI_END - ACPI_START, E820_RESERVED),
    ];
    for (start, size) in ram_regions(mem) {
        let end = start + size;
        let start = start.max(HIGH_RAM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    // ECAM must be reserved in the firmware's map for guests to trust the MCFG.
    map.push((PCI_ECAM_BASE, PCI_ECAM_SIZE, E820_RESERVED));
    map.sort_by_key(|e| e.0);
    map
}

/// End (exclusive) of the highest RAM region for `mem` bytes of RAM.
pub fn ram_end(mem: u64) -> u64 {
    ram_regions(mem)
        .last()
        .map_or(0, |(start, size)| start + size)
}

/// The 64-bit PCI window [start, end) above RAM that ends at `ram_end` (exclusive).
pub fn pci_mmio64(ram_end: u64) -> (u64, u64) {
    let start = ram_end
        .max(MMIO_HOLE_END)
        .div_ceil(PCI_MMIO64_ALIGN)
        .saturating_mul(PCI_MMIO64_ALIGN);
    (start, start.saturating_add(PCI_MMIO64_SIZE))
}

/// Legacy INTx routing of bus 0: the GSI (IOAPIC pin) that `pin` (0 = INTA .. 3 = INTD)
/// of device `slot` (1-31) drives, the usual swizzle over the eight pins 16-23. Virtio
/// functions use INTA only, so slot N raises pin 16 + (N - 1) % 8 (src/vmm/virtio.rs);
/// the DSDT's `_PRT` lists every slot's four pins from this.
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSIS: u32 = 8;
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (slot.saturating_sub(1) as u32 + pin as u32) % PCI_INTX_GSIS
}

/// Highest address (exclusive) of RAM below 4 GiB.
pub fn low_ram_end(mem: u64) -> u64 {
    mem.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region_below_the_hole() {
        assert_eq!(ram_regions(64 << 20), vec![(0, 64 << 20)]);
        let map = e820_map(64 << 20);
        assert!(map.contains(&(HIGH_RAM_START, (64 << 20) - HIGH_RAM_START, E820_RAM)));
        assert_eq!(
            map.last(),
            Some(&(PCI_ECAM_BASE, PCI_ECAM_SIZE, E820_RESERVED))
        );
    }

    #[test]
    fn the_ged_has_ports_of_its_own() {
        let ged = (GED_PORT as u64, GED_PORT as u64 + GED_SIZE);
        for (base, len) in [
            (COM1_PORT, 8),
            (I8042_PORT, 5),
            (ACPI_SLEEP_PORT, 2),
            (0xcf8, 8), // PCI configuration mechanism #1
        ] {
            let (b, e) = (base as u64, base as u64 + len);
            assert!(
                ged.1 <= b || e <= ged.0,
                "GED ports overlap {base:#x}+{len}"
            );
        }
    }

    #[test]
    fn the_pci_windows_hold_no_ram_and_the_64_bit_one_lies_above_it() {
        for mem in [64u64 << 20, 3 << 30, (5 << 30) + (3 << 20), 100 << 30] {
            let (start, end) = pci_mmio64(ram_end(mem));
            assert!(start >= MMIO_HOLE_END && start % PCI_MMIO64_ALIGN == 0);
            assert_eq!(end - start, PCI_MMIO64_SIZE);
            for (base, size, kind) in e820_map(mem) {
                let e = base + size;
                assert!(
                    e <= start || kind != E820_RAM,
                    "{mem:#x}: RAM in the 64-bit window"
                );
                assert!(
                    e <= PCI_MMIO32_START || base >= PCI_MMIO32_END,
                    "{mem:#x}: e820 entry {base:#x}+{size:#x} in the 32-bit window"
                );
            }
        }
        assert_eq!(pci_mmio64(ram_end(5 << 30)).0, 6 << 30);
        assert_eq!(pci_mmio64(ram_end(64 << 20)).0, 4 << 30);
    }

    #[test]
    fn intx_pins_swizzle_over_the_eight_pci_gsis() {
        assert_eq!(pci_intx_gsi(1, 0), 16);
        assert_eq!(pci_intx_gsi(8, 0), 23);
        assert_eq!(pci_intx_gsi(9, 0), 16);
        assert_eq!(pci_intx_gsi(1, 3), 19);
        assert_eq!(pci_intx_gsi(31, 3), 16 + (30 + 3) % 8);
    }

    #[test]
    fn large_guest_skips_the_pci_hole() {
        let mem = 5u64 << 30;
        assert_eq!(ram_regions(mem), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        let ram: u64 = e820_map(mem)
            .iter()
            .filter(|e| e.2 == E820_RAM)
            .map(|e| e.1)
            .sum();
        assert_eq!(ram + (HIGH_RAM_START - LOW_RAM_END), mem);
        assert!(e820_map(mem)
            .iter()
            .filter(|e| e.2 == E820_RAM)
            .all(|e| e.0 + e.1 <= MMIO_HOLE_START || e.0 >= MMIO_HOLE_END));
        let map = e820_map(mem);
        assert!(
            map.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
            "sorted, disjoint: {map:x?}"
        );
    }
}
