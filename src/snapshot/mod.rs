//! A paused VM, whole: the state model that snapshot, restore and (later) migration
//! share. A snapshot is two files: the state file (versioned sections, `format`) and the
//! memory file (guest RAM, sparse, `memory`). The sections:
//!
//! | tag    | what                                                        | count      |
//! |--------|-------------------------------------------------------------|------------|
//! | `VM`   | vCPU count, RAM size, virtio device count, TSC kHz          | 1          |
//! | `CLK`  | kvmclock (KVM_GET_CLOCK)                                    | 1          |
//! | `CPU`  | one vCPU: registers, special registers, XSAVE, XCRs, LAPIC, events, MP state, debug registers, MSRs | one per vCPU |
//! | `IOAP` | the IOAPIC: id, select, 24 redirection entries, line levels | 1          |
//! | `UART` | COM1's registers and receive FIFO                           | 1          |
//! | `GED`  | the power button's latched events                           | 1          |
//! | `RAM`  | the memory file's chunks and their CRC-32s                  | 1          |
//!
//! Everything decoded here is untrusted: sections are checked against their checksums,
//! each field against its bounds, and the whole against the VM it is restored into
//! (`Snapshot::check`), before any KVM object is touched.

pub mod format;
pub mod memory;
pub mod vcpu;

use kvm_bindings::kvm_clock_data;
use vm_superio::serial::SerialState;
use zerocopy::{FromBytes, IntoBytes};

use crate::devices::ioapic::{IoApicState, NUM_PINS};
use format::{Error, FileWriter, Reader, Section, Writer};
use memory::RamIndex;
use vcpu::VcpuState;

/// The most vCPUs a snapshot may hold (the MADT's limit).
pub const MAX_VCPUS: usize = crate::arch::x86_64::acpi::MAX_MADT_CPUS as usize;

/// What the VM is, for the check against the VM a snapshot is restored into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub virtio_devices: u32,
    pub tsc_khz: u32,
}

pub struct Snapshot {
    pub producer: String,
    pub vm: VmInfo,
    pub clock: kvm_clock_data,
    pub vcpus: Vec<VcpuState>,
    pub ioapic: IoApicState,
    pub serial: SerialState,
    pub ged: u8,
    pub ram: RamIndex,
}

/// This build's name in the files it writes.
pub fn producer() -> String {
    format!("cellvm {}", env!("CARGO_PKG_VERSION"))
}

/// The 16550's receive FIFO.
const UART_FIFO: usize = 64;

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut f = FileWriter::new(&self.producer);
        let mut w = Writer::default();
        w.u32(self.vm.cpus)
            .u64(self.vm.memory_bytes)
            .u32(self.vm.virtio_devices)
            .u32(self.vm.tsc_khz);
        f.section(*b"VM\0\0", 1, &w.0);
        let mut w = Writer::default();
        w.blob(self.clock.as_bytes());
        f.section(*b"CLK\0", 1, &w.0);
        for v in &self.vcpus {
            f.section(*b"CPU\0", vcpu::VERSION, &v.encode());
        }
        let mut w = Writer::default();
        w.u32(self.ioapic.id).u32(self.ioapic.select);
        for e in self.ioapic.table {
            w.u64(e);
        }
        w.u32(self.ioapic.level);
        f.section(*b"IOAP", 1, &w.0);
        let s = &self.serial;
        let mut w = Writer::default();
        for b in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            w.u8(b);
        }
        w.blob(&s.in_buffer);
        f.section(*b"UART", 1, &w.0);
        f.section(*b"GED\0", 1, &[self.ged]);
        f.section(*b"RAM\0", memory::VERSION, &self.ram.encode());
        f.finish()
    }

    pub fn decode(data: &[u8]) -> Result<Snapshot, Error> {
        let (producer, sections) = format::read_file(data)?;
        let mut vm = None;
        let mut clock = None;
        let mut vcpus = Vec::new();
        let mut ioapic = None;
        let mut serial = None;
        let mut ged = None;
        let mut ram = None;
        for s in &sections {
            let once = |slot: bool| {
                if slot {
                    Err(Error::Bad {
                        tag: s.name(),
                        what: "given twice".into(),
                    })
                } else {
                    Ok(())
                }
            };
            match &s.tag {
                b"VM\0\0" => {
                    once(vm.is_some())?;
                    vm = Some(decode_vm(s)?);
                }
                b"CLK\0" => {
                    once(clock.is_some())?;
                    version(s, 1)?;
                    let mut r = s.reader();
                    let b =
                        r.blob_exact("kvm_clock_data", std::mem::size_of::<kvm_clock_data>())?;
                    let c = kvm_clock_data::read_from_bytes(b)
                        .map_err(|_| r.bad("kvm_clock_data".into()))?;
                    r.end()?;
                    clock = Some(c);
                }
                b"CPU\0" => {
                    version(s, vcpu::VERSION)?;
                    if vcpus.len() >= MAX_VCPUS {
                        return Err(bad(s, format!("more than {MAX_VCPUS} vCPUs")));
                    }
                    vcpus.push(VcpuState::decode(s.reader())?);
                }
                b"IOAP" => {
                    once(ioapic.is_some())?;
                    ioapic = Some(decode_ioapic(s)?);
                }
                b"UART" => {
                    once(serial.is_some())?;
                    serial = Some(decode_serial(s)?);
                }
                b"GED\0" => {
                    once(ged.is_some())?;
                    version(s, 1)?;
                    let mut r = s.reader();
                    let status = r.u8("status")?;
                    r.end()?;
                    if status & !crate::devices::ged::POWER_BUTTON != 0 {
                        return Err(bad(s, format!("status {status:#x}: unknown events")));
                    }
                    ged = Some(status);
                }
                b"RAM\0" => {
                    once(ram.is_some())?;
                    version(s, memory::VERSION)?;
                    ram = Some(RamIndex::decode(s.reader())?);
                }
                _ => {
                    return Err(bad(
                        s,
                        format!(
                            "unknown section (version {}): written by another cellvm ({producer})?",
                            s.version
                        ),
                    ))
                }
            }
        }
        let missing = |what: &str| Error::Bad {
            tag: what.into(),
            what: "missing".into(),
        };
        let vm = vm.ok_or_else(|| missing("VM"))?;
        if vcpus.len() != vm.cpus as usize {
            return Err(Error::Bad {
                tag: "CPU".into(),
                what: format!(
                    "{} vCPU sections for a VM of {} vCPUs",
                    vcpus.len(),
                    vm.cpus
                ),
            });
        }
        for (i, v) in vcpus.iter().enumerate() {
            if v.id != i as u32 {
                return Err(Error::Bad {
                    tag: "CPU".into(),
                    what: format!("section {} is vCPU {}: expected vCPU {i}", i + 1, v.id),
                });
            }
        }
        let ram = ram.ok_or_else(|| missing("RAM"))?;
        if ram.size != vm.memory_bytes {
            return Err(Error::Bad {
                tag: "RAM".into(),
                what: format!("{} bytes of RAM for a VM of {}", ram.size, vm.memory_bytes),
            });
        }
        Ok(Snapshot {
            producer,
            vm,
            clock: clock.ok_or_else(|| missing("CLK"))?,
            vcpus,
            ioapic: ioapic.ok_or_else(|| missing("IOAP"))?,
            serial: serial.ok_or_else(|| missing("UART"))?,
            ged: ged.ok_or_else(|| missing("GED"))?,
            ram,
        })
    }

    /// The snapshot against the VM it is restored into: the same size and devices.
    pub fn check(&self, want: &VmInfo) -> Result<(), String> {
        let have = &self.vm;
        if have.cpus != want.cpus {
            return Err(format!(
                "the snapshot holds {} vCPUs; the VM spec says {}",
                have.cpus, want.cpus
            ));
        }
        if have.memory_bytes != want.memory_bytes {
            return Err(format!(
                "the snapshot holds {} MiB of RAM; the VM spec says {} MiB",
                have.memory_bytes >> 20,
                want.memory_bytes >> 20
            ));
        }
        if have.virtio_devices != want.virtio_devices {
            return Err(format!(
                "the snapshot holds {} virtio devices; the VM spec has {}",
                have.virtio_devices, want.virtio_devices
            ));
        }
        Ok(())
    }
}

fn bad(s: &Section, what: String) -> Error {
    Error::Bad {
        tag: s.name(),
        what,
    }
}

fn version(s: &Section, want: u16) -> Result<(), Error> {
    if s.version == want {
        Ok(())
    } else {
        Err(bad(
            s,
            format!("version {}: this cellvm reads version {want}", s.version),
        ))
    }
}

fn decode_vm(s: &Section) -> Result<VmInfo, Error> {
    version(s, 1)?;
    let mut r = s.reader();
    let vm = VmInfo {
        cpus: r.u32("cpus")?,
        memory_bytes: r.u64("memory")?,
        virtio_devices: r.u32("virtio devices")?,
        tsc_khz: r.u32("tsc khz")?,
    };
    r.end()?;
    if vm.cpus == 0 || vm.cpus as usize > MAX_VCPUS {
        return Err(bad(s, format!("cpus {}: 1 to {MAX_VCPUS}", vm.cpus)));
    }
    if vm.memory_bytes == 0 || vm.memory_bytes % (1 << 20) != 0 {
        return Err(bad(
            s,
            format!("memory {}: not a whole number of MiB", vm.memory_bytes),
        ));
    }
    Ok(vm)
}

fn decode_ioapic(s: &Section) -> Result<IoApicState, Error> {
    version(s, 1)?;
    let mut r: Reader = s.reader();
    let id = r.u32("id")?;
    let select = r.u32("select")?;
    let mut table = [0u64; NUM_PINS];
    for e in table.iter_mut() {
        *e = r.u64("redirection entry")?;
    }
    let level = r.u32("levels")?;
    r.end()?;
    if id > 0xf || level >> NUM_PINS != 0 || select > 0xff {
        return Err(bad(
            s,
            format!("id {id}, select {select:#x}, levels {level:#x}: out of range"),
        ));
    }
    Ok(IoApicState {
        id,
        select,
        table,
        level,
    })
}

fn decode_serial(s: &Section) -> Result<SerialState, Error> {
    version(s, 1)?;
    let mut r = s.reader();
    let mut b = [0u8; 9];
    for (i, x) in b.iter_mut().enumerate() {
        *x = r.u8([
            "dll", "dlm", "ier", "iir", "lcr", "lsr", "mcr", "msr", "scr",
        ][i])?;
    }
    let n = r.count("receive fifo", 1, UART_FIFO)?;
    let in_buffer = r.bytes(n)?.to_vec();
    r.end()?;
    Ok(SerialState {
        baud_divisor_low: b[0],
        baud_divisor_high: b[1],
        interrupt_enable: b[2],
        interrupt_identification: b[3],
        line_control: b[4],
        line_status: b[5],
        modem_control: b[6],
        modem_status: b[7],
        scratch: b[8],
        in_buffer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Snapshot {
        let v = VcpuState {
            id: 0,
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
            debugregs: Default::default(),
            msrs: vec![(0x10, 1234), (0x6e0, 0)],
        };
        let v1 = VcpuState {
            id: 1,
            msrs: v.msrs.clone(),
            ..VcpuState::decode_for_test(&v)
        };
        Snapshot {
            producer: producer(),
            vm: VmInfo {
                cpus: 2,
                memory_bytes: 64 << 20,
                virtio_devices: 0,
                tsc_khz: 2_000_000,
            },
            clock: Default::default(),
            vcpus: vec![v, v1],
            ioapic: IoApicState {
                id: 2,
                select: 0x10,
                table: [1 << 16; NUM_PINS],
                level: 0b101,
            },
            serial: SerialState {
                baud_divisor_low: 1,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0x5a,
                in_buffer: b"hi".to_vec(),
            },
            ged: 1,
            ram: RamIndex {
                size: 64 << 20,
                chunks: vec![(0, memory::CHUNK as u32, 7), (memory::CHUNK * 4, 4096, 9)],
            },
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let s = sample();
        let bytes = s.encode();
        let back = Snapshot::decode(&bytes).unwrap();
        assert_eq!(back.encode(), bytes);
        assert_eq!(back.vm, s.vm);
        assert_eq!(back.ioapic, s.ioapic);
        assert_eq!(back.serial, s.serial);
        assert_eq!(back.ram, s.ram);
        assert_eq!(back.vcpus[1].msrs, s.vcpus[1].msrs);
    }

    #[test]
    fn a_snapshot_is_checked_against_the_vm_it_goes_into() {
        let s = sample();
        assert!(s.check(&s.vm).is_ok());
        let mut other = s.vm.clone();
        other.memory_bytes = 128 << 20;
        assert!(s
            .check(&other)
            .unwrap_err()
            .contains("64 MiB of RAM; the VM spec says 128 MiB"));
        let mut other = s.vm.clone();
        other.cpus = 1;
        assert!(s.check(&other).unwrap_err().contains("2 vCPUs"));
    }

    #[test]
    fn inconsistent_snapshots_are_refused_with_the_section_named() {
        let mut s = sample();
        s.vcpus.pop();
        let e = Snapshot::decode(&s.encode()).err().unwrap().to_string();
        assert!(e.contains("1 vCPU sections for a VM of 2 vCPUs"), "{e}");
        let mut s = sample();
        s.ram.size = 32 << 20;
        let e = Snapshot::decode(&s.encode()).err().unwrap().to_string();
        assert!(e.contains("RAM"), "{e}");
        let mut s = sample();
        s.ram.chunks.push((memory::CHUNK, 4096, 0)); // out of order
        let e = Snapshot::decode(&s.encode()).err().unwrap().to_string();
        assert!(e.contains("not an aligned chunk"), "{e}");
        let mut s = sample();
        s.serial.in_buffer = vec![0; 65];
        assert!(Snapshot::decode(&s.encode()).is_err());
        let mut s = sample();
        s.ioapic.id = 16;
        assert!(Snapshot::decode(&s.encode()).is_err());
    }
}
