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

/// The Generic Event Device (`_HID "ACPI0013"`) as the DSDT describes it: the first
/// interrupt of its `_CRS` and the OperationRegion inside it (its status register).
#[derive(Clone, Copy)]
pub struct Ged {
    pub gsi: u32,
    pub edge: bool,
    pub active_low: bool,
    /// OperationRegion space: 0 SystemMemory, 1 SystemIO.
    pub space: u8,
    pub address: u64,
    pub len: u64,
}

impl Ged {
    /// Reads the status register (the first byte of the region). Reading clears it.
    pub fn read_status(&self) -> Option<u8> {
        match self.space {
            0 => read_phys::<u8>(self.address),
            1 if self.address <= 0xffff => Some(crate::hw::inb(self.address as u16)),
            _ => None,
        }
    }
}

impl Table {
    /// The table's bytes, through the identity map.
    fn bytes(&self) -> Option<&'static [u8]> {
        if self.addr.checked_add(self.len as u64)? > crate::hw::MAPPED_LIMIT {
            return None;
        }
        // SAFETY: the range lies in the identity-mapped [0, 4 GiB) (checked above), and the
        // VMM does not change the ACPI tables after boot.
        Some(unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len as usize) })
    }
}

impl Tables {
    /// Finds the GED in the DSDT's AML.
    pub fn ged(&self) -> Option<Ged> {
        let aml = self.dsdt()?.bytes()?.get(36..)?;
        let hid = find(aml, b"\x08_HID\x0dACPI0013\x00", 0)?;
        // The innermost Device whose body holds that _HID.
        let mut body = None;
        let mut at = 0;
        while let Some(i) = find(aml, &[0x5b, 0x82], at) {
            at = i + 1;
            if let Some((start, end)) = device_body(aml, i) {
                if (start..end).contains(&hid) {
                    body = Some((start, end));
                }
            }
        }
        let (start, end) = body?;
        let dev = &aml[start..end];
        let (gsi, edge, active_low) = crs_interrupt(dev)?;
        let (space, address, len) = op_region(dev)?;
        Some(Ged { gsi, edge, active_low, space, address, len })
    }
}

impl Tables {
    /// SLP_TYP for S5: the first element of the DSDT's `Name (_S5_, Package () {...})`.
    pub fn s5_sleep_type(&self) -> Option<u8> {
        let aml = self.dsdt()?.bytes()?.get(36..)?;
        let at = find(aml, b"\x08_S5_\x12", 0)? + 6;
        let (_, taken) = pkg_length(aml, at)?;
        // PkgLength, NumElements, then the first element.
        let (value, _) = integer(aml, at + taken + 1)?;
        u8::try_from(value).ok()
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    (from..hay.len().checked_sub(needle.len())? + 1).find(|&i| hay[i..].starts_with(needle))
}

/// A PkgLength at `at`: (the length it encodes, the bytes it takes).
fn pkg_length(aml: &[u8], at: usize) -> Option<(usize, usize)> {
    let lead = *aml.get(at)?;
    let extra = (lead >> 6) as usize;
    if extra == 0 {
        return Some(((lead & 0x3f) as usize, 1));
    }
    let mut len = (lead & 0x0f) as usize;
    for k in 0..extra {
        len |= (*aml.get(at + 1 + k)? as usize) << (4 + 8 * k);
    }
    Some((len, 1 + extra))
}

/// Bytes taken by the NameString at `at` (root/parent prefixes, then one, two or N segments).
fn name_string(aml: &[u8], at: usize) -> Option<usize> {
    let mut i = at;
    while matches!(aml.get(i)?, b'\\' | b'^') {
        i += 1;
    }
    let segs = match *aml.get(i)? {
        0x00 => return Some(i + 1 - at),
        0x2e => {
            i += 1;
            2
        }
        0x2f => {
            i += 2;
            *aml.get(i - 1)? as usize
        }
        _ => 1,
    };
    let end = i + 4 * segs;
    aml.get(i..end)?.iter().all(|&c| c == b'_' || c.is_ascii_uppercase() || c.is_ascii_digit()).then_some(end - at)
}

/// The body of the Device whose DeviceOp is at `at`: (start, end) in `aml`, after its name.
fn device_body(aml: &[u8], at: usize) -> Option<(usize, usize)> {
    let (len, taken) = pkg_length(aml, at + 2)?;
    let end = (at + 2).checked_add(len)?;
    let name = name_string(aml, at + 2 + taken)?;
    let start = at + 2 + taken + name;
    (start <= end && end <= aml.len()).then_some((start, end))
}

/// An AML integer constant at `at`: (value, bytes taken).
fn integer(aml: &[u8], at: usize) -> Option<(u64, usize)> {
    let le = |n: usize| -> Option<u64> {
        let b = aml.get(at + 1..at + 1 + n)?;
        Some(b.iter().rev().fold(0u64, |v, &x| (v << 8) | x as u64))
    };
    match *aml.get(at)? {
        0x00 => Some((0, 1)),
        0x01 => Some((1, 1)),
        0xff => Some((u64::MAX, 1)),
        0x0a => Some((le(1)?, 2)),
        0x0b => Some((le(2)?, 3)),
        0x0c => Some((le(4)?, 5)),
        0x0e => Some((le(8)?, 9)),
        _ => None,
    }
}

/// `Name (_CRS, Buffer {...})` in `dev`: its first interrupt (extended or legacy IRQ
/// descriptor) as (GSI, edge-triggered, active-low).
fn crs_interrupt(dev: &[u8]) -> Option<(u32, bool, bool)> {
    let at = find(dev, b"\x08_CRS\x11", 0)? + 6;
    let (len, taken) = pkg_length(dev, at)?;
    let buf_end = (at + len).min(dev.len());
    let (size, int_len) = integer(dev, at + taken)?;
    let data = dev.get(at + taken + int_len..buf_end)?;
    let data = &data[..(size as usize).min(data.len())];
    let mut i = 0;
    while let Some(&tag) = data.get(i) {
        if tag & 0x80 == 0 {
            let (kind, n) = ((tag >> 3) & 0x0f, (tag & 7) as usize);
            if kind == 0x04 && n >= 2 {
                // IRQ descriptor: a 16-bit mask (ISA semantics: edge, active-high unless
                // the optional flags byte says otherwise).
                let mask = u16::from_le_bytes([*data.get(i + 1)?, *data.get(i + 2)?]);
                let flags = if n >= 3 { *data.get(i + 3)? } else { 1 };
                return (mask != 0).then(|| (mask.trailing_zeros(), flags & 1 != 0, flags & 8 != 0));
            }
            if kind == 0x0f {
                return None; // end tag
            }
            i += 1 + n;
        } else {
            let n = u16::from_le_bytes([*data.get(i + 1)?, *data.get(i + 2)?]) as usize;
            if tag == 0x89 && n >= 6 {
                let flags = *data.get(i + 3)?;
                let gsi = u32::from_le_bytes(data.get(i + 5..i + 9)?.try_into().ok()?);
                return Some((gsi, flags & 2 != 0, flags & 4 != 0));
            }
            i += 3 + n;
        }
    }
    None
}

/// `OperationRegion (NAME, space, offset, length)` in `dev`: (space, offset, length).
fn op_region(dev: &[u8]) -> Option<(u8, u64, u64)> {
    let mut from = 0;
    while let Some(i) = find(dev, &[0x5b, 0x80], from) {
        from = i + 1;
        let Some(name) = name_string(dev, i + 2) else { continue };
        let at = i + 2 + name;
        let Some(&space) = dev.get(at) else { continue };
        let Some((offset, n)) = integer(dev, at + 1) else { continue };
        let Some((len, _)) = integer(dev, at + 1 + n) else { continue };
        if len > 0 {
            return Some((space, offset, len));
        }
    }
    None
}

/// One address range of the PCI host bridge's `_CRS`.
#[derive(Clone, Copy, Default)]
pub struct Window {
    /// Address space descriptor resource type: 0 memory, 1 I/O, 2 bus numbers.
    pub kind: u8,
    pub min: u64,
    pub max: u64,
}

/// The PCI host bridge (`_HID` PNP0A08) as the DSDT describes it: its `_CRS` windows,
/// whether it claims the configuration ports 0xCF8-0xCFF, and its `_PRT`.
pub struct PciHost {
    pub windows: [Window; 8],
    pub nwindows: usize,
    pub config_ports: bool,
    /// `_PRT` entries: (address 0xSSSSFFFF, pin 0-3, GSI), GSI-form entries only.
    pub prt: [(u32, u8, u32); 128],
    pub nprt: usize,
}

impl PciHost {
    pub fn windows(&self) -> &[Window] {
        &self.windows[..self.nwindows]
    }

    /// The GSI `_PRT` routes INTx `pin` (1 = INTA .. 4 = INTD, as config 0x3d says) of
    /// device `slot` to.
    pub fn route(&self, slot: u32, pin: u32) -> Option<u32> {
        let want = (slot << 16 | 0xffff, pin.checked_sub(1)? as u8);
        self.prt[..self.nprt].iter().find(|e| (e.0, e.1) == want).map(|e| e.2)
    }

    /// Whether [start, start + len) lies inside one memory window.
    pub fn in_memory_window(&self, start: u64, len: u64) -> bool {
        let Some(last) = start.checked_add(len.saturating_sub(1)) else { return false };
        self.windows().iter().any(|w| w.kind == 0 && w.min <= start && last <= w.max)
    }
}

impl Tables {
    /// Finds the PCI host bridge in the DSDT and reads its `_CRS` and `_PRT`.
    pub fn pci_host(&self) -> Option<PciHost> {
        let aml = self.dsdt()?.bytes()?.get(36..)?;
        // Name (_HID, EisaId ("PNP0A08")).
        let dev = device_holding(aml, b"\x08_HID\x0c\x41\xd0\x0a\x08")?;
        let mut host = PciHost { windows: [Window::default(); 8], nwindows: 0, config_ports: false, prt: [(0, 0, 0); 128], nprt: 0 };
        let data = crs_data(dev)?;
        let mut i = 0;
        while let Some(&tag) = data.get(i) {
            if tag & 0x80 == 0 {
                let (kind, n) = ((tag >> 3) & 0x0f, (tag & 7) as usize);
                if kind == 0x0f {
                    break;
                }
                if kind == 0x08 && n == 7 {
                    let min = u16::from_le_bytes([*data.get(i + 2)?, *data.get(i + 3)?]);
                    host.config_ports |= min == 0xcf8 && *data.get(i + 7)? == 8;
                }
                i += 1 + n;
                continue;
            }
            let n = u16::from_le_bytes([*data.get(i + 1)?, *data.get(i + 2)?]) as usize;
            let width = match tag {
                0x88 => 2,
                0x87 => 4,
                0x8a => 8,
                _ => 0,
            };
            if width != 0 && host.nwindows < host.windows.len() {
                let field = |k: usize| -> Option<u64> {
                    let at = i + 6 + k * width;
                    let b = data.get(at..at + width)?;
                    Some(b.iter().rev().fold(0u64, |v, &x| (v << 8) | x as u64))
                };
                host.windows[host.nwindows] = Window { kind: *data.get(i + 3)?, min: field(1)?, max: field(2)? };
                host.nwindows += 1;
            }
            i += 3 + n;
        }
        // Name (_PRT, Package (N) { Package (4) { address, pin, source, index } ... }).
        let at = find(dev, b"\x08_PRT\x12", 0)? + 6;
        let (len, taken) = pkg_length(dev, at)?;
        let end = at.checked_add(len)?.min(dev.len());
        let count = *dev.get(at + taken)? as usize;
        let mut p = at + taken + 1;
        for _ in 0..count {
            if p >= end || *dev.get(p)? != 0x12 {
                return None;
            }
            let (elen, etaken) = pkg_length(dev, p + 1)?;
            let mut q = p + 1 + etaken + 1; // past PkgLength and NumElements
            let mut v = [0u64; 4];
            for x in v.iter_mut() {
                let (value, n) = integer(dev, q)?;
                *x = value;
                q += n;
            }
            if v[2] == 0 && host.nprt < host.prt.len() {
                host.prt[host.nprt] = (v[0] as u32, v[1] as u8, v[3] as u32);
                host.nprt += 1;
            }
            p += 1 + elen;
        }
        Some(host)
    }
}

/// The body of the (last, innermost) Device in `aml` whose body holds `needle`.
fn device_holding<'a>(aml: &'a [u8], needle: &[u8]) -> Option<&'a [u8]> {
    let hit = find(aml, needle, 0)?;
    let mut body = None;
    let mut at = 0;
    while let Some(i) = find(aml, &[0x5b, 0x82], at) {
        at = i + 1;
        if let Some((start, end)) = device_body(aml, i) {
            if (start..end).contains(&hit) {
                body = Some((start, end));
            }
        }
    }
    let (start, end) = body?;
    Some(&aml[start..end])
}

/// The resource data of `Name (_CRS, Buffer {...})` in `dev`.
fn crs_data(dev: &[u8]) -> Option<&[u8]> {
    let at = find(dev, b"\x08_CRS\x11", 0)? + 6;
    let (len, taken) = pkg_length(dev, at)?;
    let buf_end = at.checked_add(len)?.min(dev.len());
    let (size, int_len) = integer(dev, at + taken)?;
    let data = dev.get(at + taken + int_len..buf_end)?;
    Some(&data[..(size as usize).min(data.len())])
}
