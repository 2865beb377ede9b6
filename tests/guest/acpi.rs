//! Finds and checks the ACPI tables the VMM built, reading them as Linux would.

use crate::hw::read_phys;

const MAX_TABLE_LEN: u32 = 1 << 20;

#[derive(Clone, Copy)]
pub struct Table {
    addr: u64,
    len: u32,
    sig: [u8; 4],
}

impl Table {
    fn at(addr: u64) -> Option<Table> {
        let sig: [u8; 4] = read_phys(addr)?;
        let len: u32 = read_phys(addr + 4)?;
        (36..=MAX_TABLE_LEN).contains(&len).then_some(Table { addr, len, sig })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn signature_str(&self) -> &str {
        core::str::from_utf8(&self.sig).unwrap_or("????")
    }

    pub fn checksum_ok(&self) -> bool {
        sum(self.addr, self.len as u64) == Some(0)
    }

    fn u8_at(&self, off: u32) -> Option<u8> {
        (off < self.len).then(|| read_phys(self.addr + off as u64)).flatten()
    }

    fn u32_at(&self, off: u32) -> Option<u32> {
        (off + 4 <= self.len).then(|| read_phys(self.addr + off as u64)).flatten()
    }

    fn u64_at(&self, off: u32) -> Option<u64> {
        (off + 8 <= self.len).then(|| read_phys(self.addr + off as u64)).flatten()
    }
}

fn sum(addr: u64, len: u64) -> Option<u8> {
    let mut s = 0u8;
    for i in 0..len {
        s = s.wrapping_add(read_phys::<u8>(addr + i)?);
    }
    Some(s)
}

pub struct Tables {
    pub rsdp_addr: u64,
    pub rsdp_ok: bool,
    pub xsdt_ok: bool,
    xsdt: Table,
}

/// A Generic Address Structure, as far as the guest uses it.
pub struct Gas {
    pub space: u8,
    pub address: u64,
}

pub struct Madt {
    /// Every enabled processor: xAPIC (type 0) and x2APIC (type 9) entries.
    pub cpus: u32,
    /// Processors with x2APIC ids (> 254): a CPL 3 guest cannot start them, since
    /// that needs x2APIC mode (MSR writes at CPL 0).
    pub x2apic_cpus: u32,
    pub ioapics: u32,
    xapic: u32,
    ids: [u8; 256],
}

impl Madt {
    /// APIC ids of the xAPIC-addressable processors.
    pub fn apic_ids(&self) -> &[u8] {
        &self.ids[..self.xapic as usize]
    }
}

impl Tables {
    /// Uses the RSDP address from the boot information, else scans the BIOS area.
    pub fn locate(hint: u64) -> Option<Tables> {
        let rsdp_addr = if is_rsdp(hint) {
            hint
        } else {
            (0xe_0000..0x10_0000u64).step_by(16).find(|&a| is_rsdp(a))?
        };
        let rsdp_ok = sum(rsdp_addr, 20) == Some(0) && sum(rsdp_addr, 36) == Some(0);
        let xsdt = Table::at(read_phys(rsdp_addr + 24)?)?;
        let xsdt_ok = &xsdt.sig == b"XSDT" && xsdt.checksum_ok();
        Some(Tables { rsdp_addr, rsdp_ok, xsdt_ok, xsdt })
    }

    pub fn iter(&self) -> impl Iterator<Item = Table> + '_ {
        let n = (self.xsdt.len - 36) / 8;
        (0..n).filter_map(move |i| Table::at(self.xsdt.u64_at(36 + i * 8)?))
    }

    pub fn find(&self, sig: &[u8; 4]) -> Option<Table> {
        self.iter().find(|t| &t.sig == sig)
    }

    pub fn dsdt(&self) -> Option<Table> {
        let fadt = self.find(b"FACP")?;
        let addr = match fadt.u64_at(140) {
            Some(x) if x != 0 => x,
            _ => fadt.u32_at(40)? as u64,
        };
        Table::at(addr).filter(|t| &t.sig == b"DSDT")
    }

    /// The ECAM base for segment 0, bus 0, from the MCFG.
    pub fn ecam_base(&self) -> Option<u64> {
        let t = self.find(b"MCFG")?;
        let base = t.u64_at(44)?;
        (t.u8_at(54)? == 0).then_some(base)
    }

    pub fn sleep_control_reg(&self) -> Option<Gas> {
        let fadt = self.find(b"FACP")?;
        let space = fadt.u8_at(244)?;
        let address = fadt.u64_at(248)?;
        (address != 0).then_some(Gas { space, address })
    }

    pub fn madt(&self) -> Option<Madt> {
        let t = self.find(b"APIC")?;
        let mut m = Madt { cpus: 0, x2apic_cpus: 0, ioapics: 0, xapic: 0, ids: [0; 256] };
        let mut off = 44;
        while off + 2 <= t.len {
            let (kind, len) = (t.u8_at(off)?, t.u8_at(off + 1)? as u32);
            if len < 2 {
                return None;
            }
            match kind {
                0 if t.u32_at(off + 4)? & 1 != 0 && (m.xapic as usize) < m.ids.len() => {
                    m.ids[m.xapic as usize] = t.u8_at(off + 3)?;
                    m.xapic += 1;
                    m.cpus += 1;
                }
                9 if t.u32_at(off + 8)? & 1 != 0 => {
                    m.x2apic_cpus += 1;
                    m.cpus += 1;
                }
                1 => m.ioapics += 1,
                _ => {}
            }
            off += len;
        }
        Some(m)
    }
}

fn is_rsdp(addr: u64) -> bool {
    read_phys::<[u8; 8]>(addr) == Some(*b"RSD PTR ")
}
