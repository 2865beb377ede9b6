//! Per-vCPU state: CPUID (KVM's supported set, normalised), MSRs, FPU, LAPIC LVTs, and
//! the boot vCPU's registers for each boot protocol.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::Protocol;
use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("vcpu {0}: KVM_SET_CPUID2: {1}")]
    SetCpuid(u32, kvm_ioctls::Error),
    #[error("vcpu {0}: KVM_SET_MSRS: {1}")]
    SetMsrs(u32, String),
    #[error("vcpu {0}: {1}: {2}")]
    Ioctl(u32, &'static str, kvm_ioctls::Error),
    #[error("cannot write boot page tables: {0}")]
    PageTables(vm_memory::GuestMemoryError),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_TSC: u32 = 0x15;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// KVM's supported CPUID, fetched once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::SupportedCpuid)
}

fn bits_for(count: u32) -> u32 {
    32 - count.saturating_sub(1).leading_zeros()
}

/// Normalises KVM's supported CPUID for vCPU `id` of `cpus`: APIC ids, a flat topology
/// (one package, one core per vCPU, no SMT), the hypervisor bit and leaves, and the TSC
/// frequency (KVM's timing leaf and leaf 0x15) so guests need not calibrate.
pub fn vcpu_cpuid(base: &CpuId, id: u32, cpus: u32, tsc_khz: Option<u32>) -> CpuId {
    let mut cpuid = base.clone();
    let shift = bits_for(cpus);
    let mut has_timing = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (cpus.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // Cores per package - 1 in bits 31:26; each cache private to one core.
                e.eax = (e.eax & 0x3ff) | ((cpus - 1).min(63) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // SMT level
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = cpus;
                        e.ecx = (2 << 8) | 1; // core level
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            // The TSC/crystal ratio leaf, when the host CPU leaves it empty (AMD): a
            // 1 MHz "crystal" times tsc_khz / 1000. Nested PVM hosts replace the
            // hypervisor leaves below with their own, so this is the leaf a CPL 3 guest
            // can always read its TSC frequency from.
            LEAF_TSC if e.eax == 0 || e.ebx == 0 => {
                if let Some(khz) = tsc_khz {
                    (e.eax, e.ebx, e.ecx, e.edx) = (1000, khz, 1_000_000, 0);
                }
            }
            LEAF_HYPERVISOR if tsc_khz.is_some() => {
                e.eax = e.eax.max(LEAF_HYPERVISOR_TIMING);
            }
            LEAF_HYPERVISOR_TIMING => {
                has_timing = true;
                if let Some(khz) = tsc_khz {
                    e.eax = khz;
                    e.ebx = 1_000_000; // LAPIC bus: 1 GHz, as KVM's timer runs in ns
                }
            }
            _ => {}
        }
    }
    if let (false, Some(khz)) = (has_timing, tsc_khz) {
        let entry = kvm_bindings::kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_TIMING,
            eax: khz,
            ebx: 1_000_000,
            ..Default::default()
        };
        if let Err(e) = cpuid.push(entry) {
            log::warn!("cannot add the TSC frequency leaf to CPUID: {e:?}");
        }
    }
    cpuid
}

/// MSRs every vCPU starts with: fast strings on, SYSCALL/SYSENTER state cleared.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(IA32_MISC_ENABLE, 1),
        entry(IA32_SYSENTER_CS, 0),
        entry(IA32_SYSENTER_ESP, 0),
        entry(IA32_SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(LSTAR, 0),
        entry(CSTAR, 0),
        entry(SYSCALL_MASK, 0),
        entry(KERNEL_GS_BASE, 0),
    ]
}

/// Sets up everything every vCPU needs, boot vCPU or not.
pub fn configure_vcpu(vcpu: &VcpuFd, id: u32, cpuid: &CpuId) -> Result<(), Error> {
    vcpu.set_cpuid2(cpuid).map_err(|e| Error::SetCpuid(id, e))?;
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::SetMsrs(id, format!("{e:?}")))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::SetMsrs(id, e.to_string()))?;
    if set != entries.len() {
        return Err(Error::SetMsrs(
            id,
            format!("KVM refused MSR {:#x}", entries[set].index),
        ));
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| Error::Ioctl(id, "KVM_SET_FPU", e))?;
    set_lint(vcpu, id)
}

/// Switches the vCPU's LAPIC to x2APIC mode (IA32_APIC_BASE: EN | EXTD).
pub fn enable_x2apic(vcpu: &VcpuFd, id: u32) -> Result<(), Error> {
    const APIC_BASE_ENABLE: u64 = 1 << 11;
    const APIC_BASE_X2APIC: u64 = 1 << 10;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Ioctl(id, "KVM_GET_SREGS", e))?;
    sregs.apic_base |= APIC_BASE_ENABLE | APIC_BASE_X2APIC;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Ioctl(id, "KVM_SET_SREGS(x2APIC)", e))
}

/// LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them on a PC.
fn set_lint(vcpu: &VcpuFd, id: u32) -> Result<(), Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::Ioctl(id, "KVM_GET_LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = lapic.regs[reg..reg + 4]
            .iter()
            .map(|b| *b as u8)
            .collect::<Vec<_>>()
            .try_into()
            .unwrap_or([0; 4]);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::Ioctl(id, "KVM_SET_LAPIC", e))
}

fn segment(selector: u16, code: bool, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: (!long) as u8,
        s: 1,
        l: long as u8,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot vCPU at the kernel entry, in the mode its protocol asks for.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    protocol: Protocol,
    entry: GuestAddress,
) -> Result<(), Error> {
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Ioctl(0, "KVM_GET_SREGS", e))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        ..Default::default()
    };
    let mut tr = segment(0x18, false, false);
    tr.type_ = 0xb; // busy 32-bit TSS
    tr.s = 0;
    tr.limit = 0x67;
    tr.g = 0;
    match protocol {
        Protocol::Pvh => {
            sregs.cs = segment(0x08, true, false);
            let data = segment(0x10, false, false);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = tr;
            sregs.cr0 = 0x1 | 0x10; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = layout::PVH_START_INFO;
        }
        Protocol::Linux64 => {
            write_boot_gdt_and_page_tables(mem)?;
            sregs.gdt.base = layout::BOOT_GDT;
            sregs.gdt.limit = 4 * 8 - 1;
            sregs.idt.base = layout::BOOT_IDT;
            sregs.idt.limit = 7;
            sregs.cs = segment(0x08, true, true);
            let data = segment(0x10, false, false);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = tr;
            sregs.cr3 = layout::PML4;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0001 | 0x10; // PG | PE | ET
            sregs.efer = 0x500; // LME | LMA
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
            regs.rsi = layout::ZERO_PAGE;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Ioctl(0, "KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Ioctl(0, "KVM_SET_REGS", e))
}

/// GDT (null, 64-bit code, data, TSS) and page tables identity-mapping 1 GiB with 2 MiB
/// pages: what the Linux 64-bit boot protocol requires at entry.
fn write_boot_gdt_and_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(layout::BOOT_GDT + i as u64 * 8))
            .map_err(Error::PageTables)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))
        .map_err(Error::PageTables)?;
    mem.write_obj(layout::PDPT | 0x3, GuestAddress(layout::PML4))
        .map_err(Error::PageTables)?;
    mem.write_obj(layout::PD | 0x3, GuestAddress(layout::PDPT))
        .map_err(Error::PageTables)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(layout::PD + i * 8))
            .map_err(Error::PageTables)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(c: &CpuId, function: u32, index: u32) -> kvm_bindings::kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_topology_and_the_tsc_rate() {
        let entry = |function, index| kvm_bindings::kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        };
        let base = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x15, 0),
            entry(LEAF_HYPERVISOR, 0),
        ])
        .unwrap();
        let c = vcpu_cpuid(&base, 5, 6, Some(2_500_000));
        let l1 = leaf(&c, 1, 0);
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (5, 6));
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(
            (
                leaf(&c, 0xb, 1).eax,
                leaf(&c, 0xb, 1).ebx,
                leaf(&c, 0xb, 1).edx
            ),
            (3, 6, 5)
        );
        let tsc = leaf(&c, 0x15, 0);
        assert_eq!(
            tsc.ecx as u64 * tsc.ebx as u64 / tsc.eax as u64,
            2_500_000_000
        );
        assert_eq!(leaf(&c, LEAF_HYPERVISOR_TIMING, 0).eax, 2_500_000);
        assert_eq!(leaf(&c, LEAF_HYPERVISOR, 0).eax, LEAF_HYPERVISOR_TIMING);
    }

    #[test]
    fn topology_bits_cover_every_apic_id() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(254), 8);
    }
}
