//! A polling virtio-pci driver for CPL 3: finds a modern virtio function on bus 0,
//! walks its capabilities, negotiates features and drives one split queue at a time.
//! Guest addresses are physical addresses (the boot page tables are an identity map).

use core::sync::atomic::{fence, Ordering};

use crate::hw::{inl, outl, read_phys, rdtsc, tsc_hz, write_phys};

pub const TYPE_NET: u16 = 1;
pub const TYPE_BLOCK: u16 = 2;
pub const TYPE_RNG: u16 = 4;
pub const F_VERSION_1: u64 = 1 << 32;
pub const NO_VECTOR: u16 = 0xffff;
/// The queue size this driver uses (every cellvm device offers 256).
pub const QSIZE: usize = 128;

/// The ECAM of bus 0 from the MCFG, if there is one; else ports 0xCF8/0xCFC. (QEMU's
/// microvm has only ECAM; cellvm has both.)
static mut ECAM: u64 = 0;

pub fn use_ecam(base: Option<u64>) {
    // SAFETY: set once before any check runs; the guest is single-threaded.
    unsafe { ECAM = base.unwrap_or(0) };
}

fn ecam() -> u64 {
    // SAFETY: see use_ecam.
    unsafe { ECAM }
}

pub fn cfg_read(dev: u32, off: u32) -> u32 {
    if ecam() != 0 {
        return r32(ecam() + ((dev as u64) << 15) + (off & 0xffc) as u64);
    }
    outl(0xcf8, 0x8000_0000 | dev << 11 | (off & 0xfc));
    inl(0xcfc)
}

pub fn cfg_write(dev: u32, off: u32, value: u32) {
    if ecam() != 0 {
        return w32(ecam() + ((dev as u64) << 15) + (off & 0xffc) as u64, value);
    }
    outl(0xcf8, 0x8000_0000 | dev << 11 | (off & 0xfc));
    outl(0xcfc, value);
}

/// Where this driver places BARs that no firmware placed (QEMU's microvm leaves them to
/// the OS): slot N's BAR i at BAR_WINDOW + N MiB + i * 128 KiB, inside QEMU's 32-bit
/// MMIO window.
const BAR_WINDOW: u64 = 0xc000_0000;

fn r8(a: u64) -> u8 {
    read_phys::<u8>(a).unwrap_or(0xff)
}
fn r16(a: u64) -> u16 {
    read_phys::<u16>(a).unwrap_or(0xffff)
}
fn r32(a: u64) -> u32 {
    read_phys::<u32>(a).unwrap_or(!0)
}
fn w8(a: u64, v: u8) {
    write_phys(a, v)
}
fn w16(a: u64, v: u16) {
    write_phys(a, v)
}
fn w32(a: u64, v: u32) {
    write_phys(a, v)
}
fn w64(a: u64, v: u64) {
    w32(a, v as u32);
    w32(a + 4, (v >> 32) as u32);
}

#[derive(Clone, Copy)]
pub struct Device {
    pub slot: u32,
    pub bar: u64,
    pub common: u64,
    pub isr: u64,
    pub device: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub msix_cap: u32,
    pub msix_table: u64,
    pub msix_pba: u64,
    pub vectors: u16,
}

/// The `nth` (0-based) function with virtio device type `ty`.
pub fn find(ty: u16, nth: usize) -> Option<Device> {
    let mut seen = 0;
    for slot in 0..32 {
        let id = cfg_read(slot, 0);
        if id != (0x1040 + ty as u32) << 16 | 0x1af4 {
            continue;
        }
        if seen < nth {
            seen += 1;
            continue;
        }
        return probe(slot);
    }
    None
}

/// The address of memory BAR `index`, placing it first if nobody has.
fn bar_address(slot: u32, index: u32) -> Option<u64> {
    if index > 5 {
        return None;
    }
    let reg = 0x10 + 4 * index;
    let low = cfg_read(slot, reg);
    if low & 1 != 0 {
        return None; // an I/O BAR
    }
    let wide = low & 0x6 == 0x4;
    let high = if wide { cfg_read(slot, reg + 4) as u64 } else { 0 };
    let addr = high << 32 | (low & !0xf) as u64;
    if addr != 0 {
        return Some(addr);
    }
    let place = BAR_WINDOW + slot as u64 * 0x10_0000 + index as u64 * 0x2_0000;
    cfg_write(slot, reg, place as u32);
    if wide {
        cfg_write(slot, reg + 4, 0);
    }
    Some((cfg_read(slot, reg) & !0xf) as u64)
}

fn probe(slot: u32) -> Option<Device> {
    let mut d = Device { slot, bar: 0, common: 0, isr: 0, device: 0, notify: 0, notify_mult: 0, msix_cap: 0, msix_table: 0, msix_pba: 0, vectors: 0 };
    let mut cap = cfg_read(slot, 0x34) & 0xfc;
    let mut guard = 0;
    while cap != 0 && guard < 48 {
        guard += 1;
        let head = cfg_read(slot, cap);
        let (id, next) = (head & 0xff, (head >> 8) & 0xfc);
        if id == 0x11 {
            d.msix_cap = cap;
            d.vectors = ((head >> 16) & 0x7ff) as u16 + 1;
            let t = cfg_read(slot, cap + 4);
            let p = cfg_read(slot, cap + 8);
            d.msix_table = bar_address(slot, t & 7)? + (t & !7) as u64;
            d.msix_pba = bar_address(slot, p & 7)? + (p & !7) as u64;
        } else if id == 0x09 {
            let cfg_type = (head >> 24) & 0xff;
            let bar = bar_address(slot, cfg_read(slot, cap + 4) & 0xff)?;
            d.bar = bar;
            let offset = cfg_read(slot, cap + 8) as u64;
            match cfg_type {
                1 => d.common = bar + offset,
                2 => {
                    d.notify = bar + offset;
                    d.notify_mult = cfg_read(slot, cap + 16);
                }
                3 => d.isr = bar + offset,
                4 => d.device = bar + offset,
                _ => {}
            }
        }
        cap = next;
    }
    // Memory decoding and bus mastering on.
    cfg_write(slot, 0x04, cfg_read(slot, 0x04) | 0x6);
    (d.common != 0 && d.notify != 0 && d.isr != 0).then_some(d)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(4096))]
pub struct Ring {
    desc: [Desc; QSIZE],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QSIZE],
    used_event: u16,
    _pad: [u8; 4096 - (4 + 2 * QSIZE + 2) % 4096],
    used_flags: u16,
    used_idx: u16,
    used_ring: [(u32, u32); QSIZE],
    avail_event: u16,
}

impl Ring {
    pub const fn new() -> Ring {
        Ring {
            desc: [Desc { addr: 0, len: 0, flags: 0, next: 0 }; QSIZE],
            avail_flags: 0,
            avail_idx: 0,
            avail_ring: [0; QSIZE],
            used_event: 0,
            _pad: [0; 4096 - (4 + 2 * QSIZE + 2) % 4096],
            used_flags: 0,
            used_idx: 0,
            used_ring: [(0, 0); QSIZE],
            avail_event: 0,
        }
    }
}

pub struct Queue {
    pub index: u16,
    ring: *mut Ring,
    notify_addr: u64,
    last_used: u16,
}

pub const STATUS_ACK: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;

impl Device {
    pub fn status(&self) -> u8 {
        r8(self.common + 0x14)
    }

    pub fn set_status(&self, s: u8) {
        w8(self.common + 0x14, s)
    }

    pub fn num_queues(&self) -> u16 {
        r16(self.common + 0x12)
    }

    pub fn offered_features(&self) -> u64 {
        w32(self.common, 0);
        let lo = r32(self.common + 4) as u64;
        w32(self.common, 1);
        let hi = r32(self.common + 4) as u64;
        lo | hi << 32
    }

    /// Reset, acknowledge, and accept `wanted & offered`; Ok(features) once the device
    /// kept FEATURES_OK. `force` features are written even if not offered (to test that
    /// the device refuses them).
    pub fn negotiate(&self, wanted: u64, force: u64) -> Result<u64, u64> {
        self.set_status(0);
        if self.status() != 0 {
            return Err(0);
        }
        self.set_status(STATUS_ACK);
        self.set_status(STATUS_ACK | STATUS_DRIVER);
        let features = (self.offered_features() & wanted) | force;
        w32(self.common + 0x08, 0);
        w32(self.common + 0x0c, features as u32);
        w32(self.common + 0x08, 1);
        w32(self.common + 0x0c, (features >> 32) as u32);
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err(features);
        }
        Ok(features)
    }

    /// Sets up queue `index` on `ring` with MSI-X `vector`.
    pub fn setup_queue(&self, index: u16, ring: *mut Ring, vector: u16) -> Option<Queue> {
        let c = self.common;
        w16(c + 0x16, index);
        let max = r16(c + 0x18);
        if (max as usize) < QSIZE {
            return None;
        }
        w16(c + 0x18, QSIZE as u16);
        w16(c + 0x1a, vector);
        let notify_off = r16(c + 0x1e);
        // SAFETY: `ring` points at a static Ring owned by this queue alone.
        unsafe {
            core::ptr::write_bytes(ring, 0, 1);
            w64(c + 0x20, core::ptr::addr_of!((*ring).desc) as u64);
            w64(c + 0x28, core::ptr::addr_of!((*ring).avail_flags) as u64);
            w64(c + 0x30, core::ptr::addr_of!((*ring).used_flags) as u64);
        }
        w16(c + 0x1c, 1);
        Some(Queue {
            index,
            ring,
            notify_addr: self.notify + notify_off as u64 * self.notify_mult as u64,
            last_used: 0,
        })
    }

    pub fn queue_vector(&self, index: u16) -> u16 {
        w16(self.common + 0x16, index);
        r16(self.common + 0x1a)
    }

    pub fn driver_ok(&self) {
        self.set_status(self.status() | STATUS_DRIVER_OK);
    }

    /// Programs MSI-X table entry `entry` to deliver `vector` to APIC id `apic`.
    pub fn msix_entry(&self, entry: u16, apic: u32, vector: u8, masked: bool) {
        let e = self.msix_table + entry as u64 * 16;
        // Masked while it changes, as the PCI spec asks.
        w32(e + 12, 1);
        w32(e, 0xfee0_0000 | apic << 12);
        w32(e + 4, 0);
        w32(e + 8, vector as u32);
        w32(e + 12, masked as u32);
    }

    pub fn msix_pending(&self, entry: u16) -> bool {
        r32(self.msix_pba + (entry as u64 / 32) * 4) & (1 << (entry % 32)) != 0
    }

    /// MSI-X enable (and function mask) in the capability's message control.
    pub fn msix_control(&self, enable: bool, function_mask: bool) {
        let dword = cfg_read(self.slot, self.msix_cap);
        let ctl = ((enable as u32) << 15 | (function_mask as u32) << 14) << 16;
        cfg_write(self.slot, self.msix_cap, (dword & 0x3fff_ffff) | ctl);
    }

    pub fn isr_read(&self) -> u8 {
        r8(self.isr)
    }

    pub fn config8(&self, off: u64) -> u8 {
        r8(self.device + off)
    }
    pub fn config32(&self, off: u64) -> u32 {
        r32(self.device + off)
    }
    pub fn config64(&self, off: u64) -> u64 {
        r32(self.device + off) as u64 | (r32(self.device + off + 4) as u64) << 32
    }
}

/// One buffer of a request: (address, length, device-writable).
pub type Buf = (u64, u32, bool);

impl Queue {
    /// Posts one chain and kicks; returns the slot's head index.
    pub fn submit(&mut self, bufs: &[Buf]) {
        // SAFETY: the ring is this queue's own; the device reads it only after the
        // fence and the kick below.
        let ring = unsafe { &mut *self.ring };
        let n = bufs.len();
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let next = (i + 1 < n) as u16;
            ring.desc[i] = Desc { addr, len, flags: next | (write as u16) << 1, next: (i + 1) as u16 };
        }
        let idx = unsafe { core::ptr::read_volatile(&ring.avail_idx) };
        unsafe { core::ptr::write_volatile(&mut ring.avail_ring[idx as usize % QSIZE], 0) };
        fence(Ordering::SeqCst);
        unsafe { core::ptr::write_volatile(&mut ring.avail_idx, idx.wrapping_add(1)) };
        fence(Ordering::SeqCst);
        w16(self.notify_addr, self.index);
    }

    /// Posts a chain at descriptors `head..head + bufs.len()` without waiting, so
    /// several requests can be in flight; `kick` notifies the device.
    pub fn post(&mut self, head: u16, bufs: &[Buf], kick: bool) {
        // SAFETY: as in `submit`; the caller keeps in-flight chains on distinct slots.
        let ring = unsafe { &mut *self.ring };
        let n = bufs.len();
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let next = (i + 1 < n) as u16;
            ring.desc[head as usize + i] = Desc { addr, len, flags: next | (write as u16) << 1, next: head + i as u16 + 1 };
        }
        let idx = unsafe { core::ptr::read_volatile(&ring.avail_idx) };
        unsafe { core::ptr::write_volatile(&mut ring.avail_ring[idx as usize % QSIZE], head) };
        fence(Ordering::SeqCst);
        unsafe { core::ptr::write_volatile(&mut ring.avail_idx, idx.wrapping_add(1)) };
        fence(Ordering::SeqCst);
        if kick {
            w16(self.notify_addr, self.index);
        }
    }

    /// Sets VIRTQ_AVAIL_F_NO_INTERRUPT (virtio 1.2, 2.7.7): this driver polls the used
    /// ring, so the device need not interrupt it.
    pub fn poll_only(&mut self) {
        // SAFETY: the ring is this queue's own; a volatile store the device reads.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*self.ring).avail_flags), 1) };
        fence(Ordering::SeqCst);
    }

    pub fn kick(&self) {
        w16(self.notify_addr, self.index);
    }

    /// The next used entry (head, length), if one is there.
    pub fn poll(&mut self) -> Option<(u32, u32)> {
        fence(Ordering::SeqCst);
        let ring = self.ring;
        // SAFETY: reading the used ring the device writes; volatile, after a fence.
        let used = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ring).used_idx)) };
        if used == self.last_used {
            return None;
        }
        let e = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ring).used_ring[self.last_used as usize % QSIZE])) };
        self.last_used = self.last_used.wrapping_add(1);
        Some(e)
    }

    /// Waits up to `ms` for the next used entry; returns its length.
    pub fn wait(&mut self, ms: u64) -> Option<u32> {
        let ring = self.ring;
        let end = rdtsc() + ms * (tsc_hz() / 1000).max(1);
        loop {
            fence(Ordering::SeqCst);
            // SAFETY: reading the used ring the device writes; volatile, after a fence.
            let used = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ring).used_idx)) };
            if used != self.last_used {
                let e = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ring).used_ring[self.last_used as usize % QSIZE])) };
                self.last_used = self.last_used.wrapping_add(1);
                return Some(e.1);
            }
            if rdtsc() > end {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Submits and waits (5 s).
    pub fn request(&mut self, bufs: &[Buf]) -> Option<u32> {
        self.submit(bufs);
        self.wait(5000)
    }
}

/// The LAPIC IRR bit for `vector` on this CPU.
pub fn irr(vector: u8) -> bool {
    read_phys::<u32>(crate::hw::LAPIC_BASE + 0x200 + (vector as u64 / 32) * 0x10).unwrap_or(0) & (1 << (vector % 32)) != 0
}

pub fn own_apic_id() -> u32 {
    read_phys::<u32>(crate::hw::LAPIC_BASE + 0x20).unwrap_or(0) >> 24
}
