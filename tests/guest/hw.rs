//! Hardware access from CPL 3: ports (IOPL 3), identity-mapped physical memory, the
//! local APIC page, the TSC. The only place the guest touches raw addresses.

use core::arch::asm;
use core::fmt;

/// Highest physical address the boot page tables map.
pub const MAPPED_LIMIT: u64 = 0x1_0000_0000;
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Where the AP trampoline is copied; the SIPI vector is this address >> 12.
const TRAMPOLINE: u64 = 0x8000;

extern "C" {
    static start_info_paddr: u64;
    static pvclock: [u8; 32];
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_count: u8;
    static ap_tramp_slots: u8;
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: IOPL is 3, so port I/O from CPL 3 is allowed; it touches no memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) }
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) }
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags)) }
    value
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) }
    value
}

/// Reads `T` from guest-physical `addr`, if the identity map covers it.
pub fn read_phys<T: Copy>(addr: u64) -> Option<T> {
    let end = addr.checked_add(core::mem::size_of::<T>() as u64)?;
    if addr == 0 || end > MAPPED_LIMIT {
        return None;
    }
    // SAFETY: the boot page tables identity-map [0, 4 GiB) for CPL 3; memory the VMM
    // did not back reads as all-ones through MMIO exits rather than faulting.
    Some(unsafe { core::ptr::read_volatile(addr as *const T) })
}

pub fn write_phys<T: Copy>(addr: u64, value: T) {
    if addr == 0 || addr + core::mem::size_of::<T>() as u64 > MAPPED_LIMIT {
        return;
    }
    // SAFETY: see `read_phys`; callers pass the APIC page, the trampoline page or a
    // register address the firmware tables named.
    unsafe { core::ptr::write_volatile(addr as *mut T, value) }
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC is allowed at CPL 3 (CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    ((hi as u64) << 32) | lo as u64
}

/// TSC frequency from kvm-clock's scale factors (boot.S registered the structure; KVM
/// fills it). CPUID cannot tell: on nested PVM hosts CPUID at CPL 3 is not intercepted
/// and reports the host's leaves, not the ones the VMM set.
pub fn tsc_hz() -> u64 {
    // SAFETY: `pvclock` is a static KVM writes; volatile reads of plain bytes.
    let (mul, shift) = unsafe {
        let p = &raw const pvclock as *const u8;
        (core::ptr::read_volatile(p.add(24) as *const u32), core::ptr::read_volatile(p.add(28) as *const i8))
    };
    if mul == 0 {
        return 2_000_000_000; // no kvm-clock: a guess
    }
    // ns = (tsc << shift) * mul >> 32, so tsc_hz = 1e9 * 2^32 / (mul * 2^shift).
    let num: u128 = 1_000_000_000u128 << 32;
    let hz = if shift >= 0 { num / ((mul as u128) << shift) } else { (num << (-shift) as u32) / mul as u128 };
    hz as u64
}

/// COM1, polled.
pub struct Serial {
    base: u16,
}

impl Serial {
    pub fn com1() -> Self {
        Serial { base: 0x3f8 }
    }

    /// Writes `value` to the scratch register and reads it back, with the line status.
    pub fn self_test(&mut self, value: u8) -> (u8, u8) {
        outb(self.base + 7, value);
        (inb(self.base + 7), inb(self.base + 5))
    }

    /// Reads received bytes up to a newline (not stored), for at most `secs` seconds.
    /// Returns whether the newline came.
    pub fn read_line<const N: usize>(&mut self, line: &mut Buf<N>, secs: u64) -> bool {
        let deadline = rdtsc().saturating_add(secs.saturating_mul(tsc_hz()));
        while rdtsc() < deadline {
            if inb(self.base + 5) & 1 == 0 {
                core::hint::spin_loop();
                continue;
            }
            match inb(self.base) {
                b'\n' => return true,
                b'\r' => {}
                b => {
                    let _ = fmt::Write::write_char(line, if b.is_ascii_graphic() || b == b' ' { b as char } else { '?' });
                }
            }
        }
        false
    }

    /// A received byte, if one is waiting.
    pub fn try_read(&mut self) -> Option<u8> {
        (inb(self.base + 5) & 1 != 0).then(|| inb(self.base))
    }

    fn put(&mut self, byte: u8) {
        // Wait (boundedly) for the transmit holding register to empty.
        for _ in 0..100_000 {
            if inb(self.base + 5) & 0x20 != 0 {
                break;
            }
        }
        outb(self.base, byte);
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

/// A fixed-size text buffer for building detail strings without an allocator.
pub struct Buf<const N: usize> {
    data: [u8; N],
    len: usize,
}

impl<const N: usize> Buf<N> {
    pub fn new() -> Self {
        Buf { data: [0; N], len: 0 }
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.data[..self.len]).unwrap_or("?")
    }
}

impl<const N: usize> fmt::Write for Buf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let take = s.len().min(N - self.len);
        self.data[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// The PVH `hvm_start_info` (version 1) the VMM passed in %ebx.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct StartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

impl StartInfo {
    pub fn from_boot() -> Option<StartInfo> {
        // SAFETY: written once by boot.S before CPL 3 code runs.
        let paddr = unsafe { core::ptr::read_volatile(&raw const start_info_paddr) };
        let info: StartInfo = read_phys(paddr)?;
        (info.magic == 0x336e_c578).then_some(info)
    }

    /// The command line, if it is NUL-terminated within 4 KiB and valid UTF-8.
    pub fn cmdline(&self) -> Option<&'static str> {
        let base = self.cmdline_paddr;
        let len = (0..4096u64).find(|i| read_phys::<u8>(base + i) == Some(0))?;
        if base == 0 || base + len > MAPPED_LIMIT {
            return None;
        }
        // SAFETY: `len` bytes from `base` were just read through the identity map, and
        // the VMM does not change the command line after boot.
        let bytes = unsafe { core::slice::from_raw_parts(base as *const u8, len as usize) };
        core::str::from_utf8(bytes).ok()
    }

    /// The first module's address, size and FNV-1a hash (modules are at most 64 MiB here).
    pub fn first_module(&self) -> Option<(u64, u64, u64)> {
        if self.nr_modules == 0 {
            return None;
        }
        let addr: u64 = read_phys(self.modlist_paddr)?;
        let size: u64 = read_phys(self.modlist_paddr + 8)?;
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for i in 0..size.min(64 << 20) {
            hash = (hash ^ read_phys::<u8>(addr + i)? as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Some((addr, size, hash))
    }

    pub fn memmap(&self) -> impl Iterator<Item = MemmapEntry> + '_ {
        let count = if self.version >= 1 { self.memmap_entries.min(128) } else { 0 };
        (0..count as u64).filter_map(move |i| read_phys(self.memmap_paddr + i * 24))
    }
}

/// Whether the LAPIC answers at its xAPIC MMIO page. In x2APIC mode (what the VMM sets
/// for VMs with APIC ids past 255) the page is not decoded and reads as all-ones;
/// reaching the LAPIC then needs MSRs, i.e. CPL 0.
pub fn xapic_mmio_available() -> bool {
    read_phys::<u32>(LAPIC_BASE + 0x30).is_some_and(|version| version != 0xffff_ffff)
}

const IOAPIC_BASE: u64 = 0xfec0_0000;

fn ioapic_write(reg: u32, value: u32) {
    write_phys::<u32>(IOAPIC_BASE, reg);
    write_phys::<u32>(IOAPIC_BASE + 0x10, value);
}

fn ioapic_read(reg: u32) -> u32 {
    write_phys::<u32>(IOAPIC_BASE, reg);
    read_phys::<u32>(IOAPIC_BASE + 0x10).unwrap_or(0xffff_ffff)
}

/// This CPU's APIC id, from the LAPIC's ID register (CPUID at CPL 3 is not virtualized
/// on PVM hosts).
fn own_apic_id() -> u32 {
    read_phys::<u32>(LAPIC_BASE + 0x20).unwrap_or(0) >> 24
}

/// Routes IOAPIC `pin` to `vector` on this CPU (fixed delivery, physical destination),
/// software-enabling the LAPIC. False if the IOAPIC has no such pin.
pub fn route_irq(pin: u32, vector: u8, edge: bool, active_low: bool) -> bool {
    let pins = ((ioapic_read(0x01) >> 16) & 0xff) + 1;
    if pin >= pins || pins > 240 {
        return false;
    }
    write_phys::<u32>(LAPIC_BASE + 0xf0, 0x1ff); // software-enable the LAPIC
    ioapic_write(0x10 + 2 * pin + 1, own_apic_id() << 24); // destination: this CPU
    let flags = if edge { 0 } else { 1 << 15 } | if active_low { 1 << 13 } else { 0 };
    ioapic_write(0x10 + 2 * pin, vector as u32 | flags); // unmasked
    true
}

pub fn mask_irq(pin: u32) {
    ioapic_write(0x10 + 2 * pin, 1 << 16);
}

/// Whether `vector` is pending in this CPU's LAPIC IRR. With interrupts off it stays
/// there once raised: nothing at CPL 3 can accept it.
pub fn irr_pending(vector: u8) -> bool {
    let irr = LAPIC_BASE + 0x200 + (vector as u64 / 32) * 0x10;
    read_phys::<u32>(irr).unwrap_or(0) & (1 << (vector % 32)) != 0
}

/// The serial interrupt end to end, with interrupts off: program IOAPIC pin 4 with
/// `vector` for this CPU, enable the UART's transmitter-empty interrupt (which it raises
/// at once, the THR being empty), and wait for the vector to show in the LAPIC's IRR.
pub fn serial_irq_reaches_lapic(vector: u8) -> Result<u32, &'static str> {
    if !xapic_mmio_available() {
        return Err("the LAPICs are in x2APIC mode: IRR is not readable from CPL 3");
    }
    route_irq(4, vector, true, false);
    if irr_pending(vector) {
        return Err("vector already pending before the UART raised anything");
    }
    outb(0x3f9, 0x02); // IER: THR empty
    let mut result = Err("vector never appeared in the LAPIC IRR");
    for spins in 0..1_000_000u32 {
        if irr_pending(vector) {
            result = Ok(spins);
            break;
        }
        core::hint::spin_loop();
    }
    outb(0x3f9, 0x00);
    mask_irq(4); // mask the pin again
    result
}

pub struct ApStart {
    pub reported: u32,
    pub missing: Option<u8>,
    pub wait_ms: u64,
}

/// Starts every AP the MADT lists with INIT + SIPI through the user-mapped local APIC,
/// and waits (up to 20 s: CPL 0 code is emulated on nested hosts) for each to report.
pub fn start_aps(madt: &crate::acpi::Madt) -> ApStart {
    // Linker-provided symbols bounding the trampoline in the loaded image.
    let (start, end, count_at, slots_at) = (
            &raw const ap_tramp_start as u64,
            &raw const ap_tramp_end as u64,
            &raw const ap_tramp_count as u64,
            &raw const ap_tramp_slots as u64,
    );
    for off in 0..end - start {
        write_phys(TRAMPOLINE + off, read_phys::<u8>(start + off).unwrap_or(0));
    }
    let count_addr = TRAMPOLINE + (count_at - start);
    let slots_addr = TRAMPOLINE + (slots_at - start);
    // The LAPIC's ID register, not CPUID: CPL 3 CPUID is not virtualized on PVM hosts.
    let own_id = (read_phys::<u32>(LAPIC_BASE + 0x20).unwrap_or(0) >> 24) as u8;

    write_phys::<u32>(LAPIC_BASE + 0xf0, 0x1ff); // software-enable, spurious vector 0xff
    let sipi = 0x4600 | (TRAMPOLINE >> 12) as u32;
    for &id in madt.apic_ids() {
        if id == own_id {
            continue;
        }
        for command in [0x4500, sipi, sipi] {
            write_phys::<u32>(LAPIC_BASE + 0x310, (id as u32) << 24);
            write_phys::<u32>(LAPIC_BASE + 0x300, command);
            while read_phys::<u32>(LAPIC_BASE + 0x300).unwrap_or(0) & (1 << 12) != 0 {
                core::hint::spin_loop();
            }
        }
    }
    let hz = tsc_hz();
    let begin = rdtsc();
    let deadline = begin + 20 * hz;
    let expected = madt.apic_ids().len() as u32 - 1;
    while (read_phys::<u16>(count_addr).unwrap_or(0) as u32) < expected && rdtsc() < deadline {
        core::hint::spin_loop();
    }
    let wait_ms = (rdtsc() - begin) / (hz / 1000).max(1);
    let mut missing = None;
    for &id in madt.apic_ids() {
        if id != own_id && read_phys::<u8>(slots_addr + id as u64) != Some(1) {
            missing = missing.or(Some(id));
        }
    }
    ApStart { reported: read_phys::<u16>(count_addr).unwrap_or(0) as u32 + 1, missing, wait_ms }
}

/// Ends the VM: QEMU's isa-debug-exit (a port no other VMM claims), then the ACPI sleep
/// control register the FADT names (with the DSDT's \_S5 sleep type), then the i8042
/// reset line; whichever the VMM implements first.
pub fn power_off(tables: Option<&crate::acpi::Tables>) -> ! {
    // SLP_TYP from the DSDT's \_S5 package (5 where there is none), and SLP_EN.
    let slp_typ = tables.and_then(|t| t.s5_sleep_type()).unwrap_or(5);
    let s5: u8 = ((slp_typ & 7) << 2) | (1 << 5);
    outb(0xf4, 0);
    if let Some(reg) = tables.and_then(|t| t.sleep_control_reg()) {
        match reg.space {
            0 => write_phys::<u8>(reg.address, s5),
            1 if reg.address <= 0xffff => outb(reg.address as u16, s5),
            _ => {}
        }
    }
    outb(0x64, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}

// The freestanding build has no libc: the few memory functions the compiler calls.
// Written with inline `rep` string instructions so they cannot be turned back into
// calls to themselves.

#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap.
    unsafe { asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags)) };
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: copying forward never overwrites bytes not yet read.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: overlapping with dst above src: copy backwards with the direction flag set.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack))
    };
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe { asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") value as u8, options(nostack, preserves_flags)) };
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges hold n bytes.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `core` refers to the unwinder's personality routine; with
/// `panic = "abort"` nothing ever unwinds, so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
