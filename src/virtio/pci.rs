//! The virtio-pci transport (virtio 1.2, 4.1): a modern-only PCI function whose BAR 0
//! holds the common configuration, ISR, device configuration and notify regions and the
//! MSI-X table, described to the driver by vendor capabilities.
//!
//! BAR 0 is placed by the VMM (there is no firmware to do it) and cannot be moved: the
//! sizing probe (all-ones) reads back the size, and any other address written is
//! answered with the VMM's. Queue notifications never reach this code when the VMM
//! registered the notify addresses as ioeventfds; a write that does arrive (a guest on
//! a path KVM does not cover) is passed on to the same eventfd.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::irq::MsiRouter;
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::pci::PciFunction;

pub const BAR_SIZE: u64 = 0x4000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x0800;
const DEVICE_CFG: u64 = 0x1000;
const DEVICE_CFG_LEN: u64 = 0x800;
const NOTIFY: u64 = 0x2000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x3000;
const MSIX_PBA: u64 = 0x3800;
/// Vectors per function: one per queue and one for configuration changes.
pub const MAX_VECTORS: u16 = 64;
const NO_VECTOR: u16 = 0xffff;

const VENDOR_VIRTIO: u16 = 0x1af4;
/// Capability offsets in config space, in list order.
const CAP_MSIX: usize = 0x40;
const CAP_COMMON: usize = 0x4c;
const CAP_ISR: usize = 0x5c;
const CAP_DEVICE: usize = 0x6c;
const CAP_NOTIFY: usize = 0x7c;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// INTx for drivers that do not enable MSI-X: while MSI-X is off, the relay thread
/// (IntxRelay) watches each queue's call eventfd; a signal sets ISR bit 0 and raises
/// the function's IOAPIC pin (level-triggered) until the driver reads the ISR.
pub struct Intx {
    pub pin: u8,
    pub set_level: Box<dyn Fn(bool) + Send>,
    pub relay: Arc<IntxRelay>,
    /// This function's index in the relay's device list.
    pub index: u16,
}

/// One epoll set over the call eventfds of every queue in INTx mode.
pub struct IntxRelay {
    epoll: vmm_sys_util::epoll::Epoll,
}

impl IntxRelay {
    pub fn new() -> std::io::Result<Self> {
        Ok(IntxRelay {
            epoll: vmm_sys_util::epoll::Epoll::new()?,
        })
    }

    fn set(&self, fd: &EventFd, key: u64, on: bool) {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        if let Err(e) = self
            .epoll
            .ctl(op, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, key))
        {
            log::warn!("intx: epoll_ctl: {e}");
        }
    }

    /// The relay thread's loop: forwards call signals of INTx-mode queues.
    pub fn run(&self, devices: &[Arc<std::sync::Mutex<VirtioPci>>]) {
        use vmm_sys_util::epoll::EpollEvent;
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("intx: epoll_wait: {e}");
                    return;
                }
            };
            for e in &events[..n] {
                let key = e.data();
                if let Some(d) = devices.get((key >> 16) as usize) {
                    d.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .intx_signal((key & 0xffff) as usize);
                }
            }
        }
    }
}

struct Queue {
    max: u16,
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    /// The GSI the call eventfd is bound to as an irqfd, if any.
    bound: Option<u32>,
    /// Whether the INTx relay watches the call eventfd.
    relayed: bool,
}

pub struct VirtioPci {
    device: Box<dyn VirtioDevice>,
    config: [u8; 256],
    bar: u32,
    bar_sizing: bool,
    offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    generation: u8,
    queue_select: u16,
    msix_config: u16,
    queues: Vec<Queue>,
    msix_table: Vec<[u32; 4]>,
    router: Arc<MsiRouter>,
    gsi_base: u32,
    name: String,
    intx: Option<Intx>,
    isr: u8,
}

fn put(config: &mut [u8], at: usize, bytes: &[u8]) {
    config[at..at + bytes.len()].copy_from_slice(bytes);
}

fn virtio_cap(config: &mut [u8], at: usize, next: usize, cfg_type: u8, offset: u64, len: u64) {
    let cap_len = if cfg_type == 2 { 20 } else { 16 };
    put(
        config,
        at,
        &[0x09, next as u8, cap_len, cfg_type, 0, 0, 0, 0],
    );
    put(config, at + 8, &(offset as u32).to_le_bytes());
    put(config, at + 12, &(len as u32).to_le_bytes());
}

impl VirtioPci {
    /// A function for `device` with BAR 0 at `bar` (BAR_SIZE-aligned, below 4 GiB).
    pub fn new(
        name: String,
        device: Box<dyn VirtioDevice>,
        bar: u32,
        router: Arc<MsiRouter>,
    ) -> Result<Self, String> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() || sizes.len() >= MAX_VECTORS as usize {
            return Err(format!(
                "{name}: {} queues (1 to {} supported)",
                sizes.len(),
                MAX_VECTORS - 1
            ));
        }
        let vectors = sizes.len() as u16 + 1;
        let gsi_base = router
            .allocate(vectors as u32)
            .map_err(|e| format!("{name}: {e}"))?;
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(|e| format!("{name}: eventfd: {e}"));
        let mut queues = Vec::new();
        for max in sizes {
            queues.push(Queue {
                max,
                size: max,
                vector: NO_VECTOR,
                enabled: false,
                desc: 0,
                avail: 0,
                used: 0,
                kick: eventfd()?,
                call: eventfd()?,
                bound: None,
                relayed: false,
            });
        }
        let ty = device.device_type();
        let class: u32 = match ty {
            TYPE_NET => 0x02_00_00,
            TYPE_BLOCK => 0x01_80_00,
            // Communication controller, other (as QEMU's virtio-serial).
            TYPE_CONSOLE => 0x07_80_00,
            _ => 0xff_00_00,
        };
        let mut c = [0u8; 256];
        put(&mut c, 0x00, &VENDOR_VIRTIO.to_le_bytes());
        put(&mut c, 0x02, &(0x1040 + ty as u16).to_le_bytes());
        put(&mut c, 0x06, &0x0010u16.to_le_bytes()); // status: capabilities list
        put(&mut c, 0x08, &(class << 8 | 1).to_le_bytes()); // revision 1: modern
        put(&mut c, 0x2c, &VENDOR_VIRTIO.to_le_bytes());
        put(&mut c, 0x2e, &0x0040u16.to_le_bytes());
        c[0x34] = CAP_MSIX as u8;
        c[0x3d] = 1; // INTA
        put(&mut c, CAP_MSIX, &[0x11, CAP_COMMON as u8]);
        put(&mut c, CAP_MSIX + 2, &(vectors - 1).to_le_bytes());
        put(&mut c, CAP_MSIX + 4, &(MSIX_TABLE as u32).to_le_bytes());
        put(&mut c, CAP_MSIX + 8, &(MSIX_PBA as u32).to_le_bytes());
        virtio_cap(&mut c, CAP_COMMON, CAP_ISR, 1, COMMON, COMMON_LEN);
        virtio_cap(&mut c, CAP_ISR, CAP_DEVICE, 3, ISR, 1);
        virtio_cap(
            &mut c,
            CAP_DEVICE,
            CAP_NOTIFY,
            4,
            DEVICE_CFG,
            DEVICE_CFG_LEN,
        );
        virtio_cap(&mut c, CAP_NOTIFY, 0, 2, NOTIFY, NOTIFY_LEN);
        put(&mut c, CAP_NOTIFY + 16, &NOTIFY_MULTIPLIER.to_le_bytes());
        // Packed rings, notification data, ring reset and IOMMU platforms are not
        // offered: the transport implements none of them.
        let offered = (device.features() | F_VERSION_1)
            & !(F_RING_PACKED | F_NOTIFICATION_DATA | F_RING_RESET | F_ACCESS_PLATFORM);
        Ok(VirtioPci {
            device,
            config: c,
            bar,
            bar_sizing: false,
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            generation: 0,
            queue_select: 0,
            msix_config: NO_VECTOR,
            queues,
            msix_table: vec![[0, 0, 0, VECTOR_MASKED]; vectors as usize],
            router,
            gsi_base,
            name,
            intx: None,
            isr: 0,
        })
    }

    /// Gives the function an INTx line (IOAPIC pin `intx.pin`, shown in config 0x3c).
    pub fn set_intx(&mut self, intx: Intx) {
        self.config[0x3c] = intx.pin;
        self.intx = Some(intx);
        self.update_irqfds();
    }

    /// The relay saw queue `index` signal while in INTx mode.
    fn intx_signal(&mut self, index: usize) {
        let Some(q) = self.queues.get(index) else {
            return;
        };
        if q.call.read().is_ok() {
            self.isr |= 1;
            if let Some(i) = &self.intx {
                (i.set_level)(true);
            }
        }
    }

    /// The device's backend was replaced by the one at the other end of `stream`. On an
    /// error the caller decides: another backend may yet come (this one died during the
    /// handshake), or the device needs a reset.
    pub fn reconnect(&mut self, stream: std::os::unix::net::UnixStream) -> Result<(), String> {
        self.device.reconnect(stream)
    }

    /// The device cannot go on until the driver resets it (virtio 1.2, 2.1.1): the
    /// status says NEEDS_RESET and, in INTx mode, a configuration change interrupt says
    /// to look (with MSI-X the driver sees it at its next look at the status: the VMM
    /// raises no configuration vector yet).
    pub fn needs_reset(&mut self) {
        // A device not yet started finds out at DRIVER_OK, which then fails.
        if self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        self.status |= STATUS_NEEDS_RESET;
        if self.msix_control() & MSIX_ENABLE == 0 {
            self.isr |= 2;
            if let Some(i) = &self.intx {
                (i.set_level)(true);
            }
        }
    }

    pub fn bar_address(&self) -> u64 {
        self.bar as u64
    }

    /// (guest address, eventfd) of each queue's notify register, for KVM ioeventfds.
    pub fn notifiers(&self) -> Vec<(u64, &EventFd)> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                (
                    self.bar as u64 + NOTIFY + i as u64 * NOTIFY_MULTIPLIER as u64,
                    &q.kick,
                )
            })
            .collect()
    }

    fn msix_control(&self) -> u16 {
        u16::from_le_bytes([self.config[CAP_MSIX + 2], self.config[CAP_MSIX + 3]])
    }

    fn vector_can_fire(&self, vector: u16) -> bool {
        let ctl = self.msix_control();
        ctl & MSIX_ENABLE != 0
            && ctl & MSIX_FUNCTION_MASK == 0
            && self
                .msix_table
                .get(vector as usize)
                .is_some_and(|e| e[3] & VECTOR_MASKED == 0)
    }

    /// Binds each queue's call eventfd to its vector's GSI exactly while that vector
    /// can fire; with MSI-X off (and INTx not disabled in the command register) the
    /// INTx relay watches it instead.
    fn update_irqfds(&mut self) {
        let intx_mode = self.msix_control() & MSIX_ENABLE == 0 && self.config[0x05] & 0x04 == 0;
        if let Some(intx) = &self.intx {
            for (i, q) in self.queues.iter_mut().enumerate() {
                if q.relayed != intx_mode {
                    intx.relay
                        .set(&q.call, (intx.index as u64) << 16 | i as u64, intx_mode);
                    q.relayed = intx_mode;
                }
            }
        }
        for i in 0..self.queues.len() {
            let vector = self.queues[i].vector;
            let want = self
                .vector_can_fire(vector)
                .then(|| self.gsi_base + vector as u32);
            let q = &mut self.queues[i];
            if q.bound == want {
                continue;
            }
            let chip = self.router.chip();
            if let Some(old) = q.bound.take() {
                if let Err(e) = chip.unbind(&q.call, old) {
                    log::warn!("{}: queue {i}: {e}", self.name);
                }
            }
            if let Some(gsi) = want {
                match chip.bind(&q.call, gsi) {
                    Ok(()) => q.bound = Some(gsi),
                    Err(e) => log::warn!("{}: queue {i}: {e}", self.name),
                }
            }
        }
    }

    fn update_route(&mut self, vector: usize) {
        let e = self.msix_table[vector];
        let msg = (e[0] as u64 | (e[1] as u64) << 32, e[2]);
        if let Err(e) = self
            .router
            .set_route(self.gsi_base + vector as u32, Some(msg))
        {
            log::warn!("{}: vector {vector}: {e}", self.name);
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.isr = 0;
        if let Some(i) = &self.intx {
            (i.set_level)(false);
        }
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.msix_config = NO_VECTOR;
        for q in &mut self.queues {
            q.size = q.max;
            q.vector = NO_VECTOR;
            q.enabled = false;
            q.desc = 0;
            q.avail = 0;
            q.used = 0;
            // Drop counts left from before the reset.
            let _ = q.kick.read();
            let _ = q.call.read();
        }
        self.update_irqfds();
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            // Accepted features must be a subset of the offer, with VERSION_1.
            let ok = self.driver_features & !self.offered == 0
                && self.driver_features & F_VERSION_1 != 0;
            if !ok {
                log::debug!(
                    "{}: driver features {:#x} not acceptable (offered {:#x})",
                    self.name,
                    self.driver_features,
                    self.offered
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && self.status & STATUS_FEATURES_OK != 0 {
            if let Err(e) = self.activate() {
                crate::warn_limited(format_args!("{}: {e}", self.name));
                value |= STATUS_NEEDS_RESET;
            }
        }
        self.status = value;
    }

    fn activate(&mut self) -> Result<(), String> {
        let mut setups = Vec::new();
        for (index, q) in self.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let clone = |fd: &EventFd| fd.try_clone().map_err(|e| format!("eventfd: {e}"));
            setups.push(QueueSetup {
                index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: clone(&q.kick)?,
                call: clone(&q.call)?,
            });
        }
        if setups.is_empty() {
            return Err("DRIVER_OK with no queue enabled".into());
        }
        self.device.activate(self.driver_features, &setups)
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let mut regs = [0u8; COMMON_LEN as usize];
        let feature_word = match self.device_feature_select {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        };
        let driver_word = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut regs, 0x00, &self.device_feature_select.to_le_bytes());
        put(&mut regs, 0x04, &feature_word.to_le_bytes());
        put(&mut regs, 0x08, &self.driver_feature_select.to_le_bytes());
        put(&mut regs, 0x0c, &driver_word.to_le_bytes());
        put(&mut regs, 0x10, &self.msix_config.to_le_bytes());
        put(&mut regs, 0x12, &(self.queues.len() as u16).to_le_bytes());
        regs[0x14] = self.status;
        regs[0x15] = self.generation;
        put(&mut regs, 0x16, &self.queue_select.to_le_bytes());
        let select = self.queue_select;
        if let Some(q) = self.queues.get(select as usize) {
            put(&mut regs, 0x18, &q.size.to_le_bytes());
            put(&mut regs, 0x1a, &q.vector.to_le_bytes());
            put(&mut regs, 0x1c, &(q.enabled as u16).to_le_bytes());
            put(&mut regs, 0x1e, &select.to_le_bytes());
            put(&mut regs, 0x20, &q.desc.to_le_bytes());
            put(&mut regs, 0x28, &q.avail.to_le_bytes());
            put(&mut regs, 0x30, &q.used.to_le_bytes());
        }
        let start = offset as usize;
        match regs.get(start..start + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        raw[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(raw);
        // While the device runs, only status (reset) and the selectors may change.
        let running = self.status & STATUS_DRIVER_OK != 0;
        let negotiating = self.status & STATUS_FEATURES_OK == 0;
        let set_half = |reg: &mut u64, high: bool, v: u64| {
            *reg = if high {
                (*reg & 0xffff_ffff) | v << 32
            } else {
                (*reg & !0xffff_ffff) | (v & 0xffff_ffff)
            }
        };
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) if negotiating && !running => match self.driver_feature_select {
                0 => set_half(&mut self.driver_features, false, v),
                1 => set_half(&mut self.driver_features, true, v),
                _ => {}
            },
            (0x10, 2) => self.msix_config = self.valid_vector(v as u16),
            (0x14, 1) => self.set_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x1a, 2) => {
                let vector = self.valid_vector(v as u16);
                if let Some(q) = self.selected() {
                    q.vector = vector;
                }
                self.update_irqfds();
            }
            _ if running => log::debug!("{}: common write {offset:#x} while running", self.name),
            (0x18, 2) => {
                if let Some(q) = self.selected() {
                    // A power of two no larger than the maximum (split rings).
                    let size = v as u16;
                    if size.is_power_of_two() && size <= q.max {
                        q.size = size;
                    }
                }
            }
            (0x1c, 2) => {
                if let Some(q) = self.selected() {
                    q.enabled = v & 1 == 1;
                }
            }
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) | (0x20 | 0x28 | 0x30, 8) => {
                let wide = data.len() == 8;
                if let Some(q) = self.selected() {
                    let reg = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if wide {
                        *reg = v;
                    } else {
                        set_half(reg, offset & 4 != 0, v);
                    }
                }
            }
            _ => log::debug!(
                "{}: ignored common write {offset:#x}/{}",
                self.name,
                data.len()
            ),
        }
    }

    /// A vector number the driver may use, or NO_VECTOR (what the driver reads back to
    /// learn that its choice was refused).
    fn valid_vector(&self, v: u16) -> u16 {
        if (v as usize) < self.msix_table.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn read_msix(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MSIX_PBA {
            let mut pending = 0u64;
            for q in &self.queues {
                if q.bound.is_none() && q.vector != NO_VECTOR && readable(&q.call) {
                    pending |= 1 << q.vector;
                }
            }
            let bytes = pending.to_le_bytes();
            let at = (offset - MSIX_PBA) as usize;
            for (i, d) in data.iter_mut().enumerate() {
                *d = bytes.get(at + i).copied().unwrap_or(0);
            }
            return;
        }
        let at = (offset - MSIX_TABLE) as usize;
        let (entry, word) = (at / 16, at % 16 / 4);
        let value = match self.msix_table.get(entry) {
            Some(e) if data.len() == 4 && at % 4 == 0 => e[word],
            Some(e) if data.len() == 8 && at % 8 == 0 => {
                let v = e[word] as u64 | (e[word + 1] as u64) << 32;
                data.copy_from_slice(&v.to_le_bytes());
                return;
            }
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write_msix(&mut self, offset: u64, data: &[u8]) {
        if offset >= MSIX_PBA {
            return; // read-only
        }
        let at = (offset - MSIX_TABLE) as usize;
        let entry = at / 16;
        if entry >= self.msix_table.len() || at % 4 != 0 || !(data.len() == 4 || data.len() == 8) {
            return;
        }
        for (k, chunk) in data.chunks(4).enumerate() {
            let word = at % 16 / 4 + k;
            if word < 4 {
                self.msix_table[entry][word] =
                    u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        self.update_route(entry);
        self.update_irqfds();
    }
}

/// Whether an eventfd has a count waiting, without consuming it.
fn readable(fd: &EventFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
}

impl PciFunction for VirtioPci {
    fn read_config(&self, offset: u16) -> u32 {
        let at = offset as usize & !3;
        if at == 0x10 {
            return if self.bar_sizing {
                !(BAR_SIZE as u32 - 1)
            } else {
                self.bar
            };
        }
        match self.config.get(at..at + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    fn write_config(&mut self, offset: u16, value: u32, mask: u32) {
        let at = offset as usize & !3;
        let merge = |old: u32| (old & !mask) | (value & mask);
        match at {
            0x04 => {
                // Memory space and bus master enable, INTx disable.
                let old = self.read_config(0x04);
                let new = merge(old) & 0x0000_0406 | old & 0xffff_0000;
                put(&mut self.config, 0x04, &new.to_le_bytes());
                self.update_irqfds();
            }
            0x10 if mask == 0xffff_ffff => self.bar_sizing = value == 0xffff_ffff,
            // Interrupt line: the VMM wires the pin; the register is informational.
            0x3c if self.intx.is_none() => self.config[0x3c] = merge(self.read_config(0x3c)) as u8,
            x if x == CAP_MSIX => {
                let old = self.read_config(x as u16);
                let ctl = (merge(old) >> 16) as u16 & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
                let ctl = ctl | (self.msix_table.len() as u16 - 1);
                put(&mut self.config, CAP_MSIX + 2, &ctl.to_le_bytes());
                self.update_irqfds();
            }
            _ => {}
        }
    }
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.read_common(o - COMMON, data),
            ISR => {
                // Reading returns and clears the pending bits and lowers the line.
                data.fill(0);
                data[0] = std::mem::take(&mut self.isr);
                if let Some(i) = &self.intx {
                    (i.set_level)(false);
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..BAR_SIZE).contains(&o) => self.read_msix(o, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.write_common(o - COMMON, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG, data)
            }
            o if (NOTIFY..NOTIFY + NOTIFY_LEN).contains(&o) => {
                let index = ((o - NOTIFY) / NOTIFY_MULTIPLIER as u64) as usize;
                if let Some(q) = self.queues.get(index) {
                    let _ = q.kick.write(1);
                }
            }
            o if (MSIX_TABLE..BAR_SIZE).contains(&o) => self.write_msix(o, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::irq::{Error as IrqError, IrqChip};
    use std::sync::Mutex;

    /// Records what the transport asks of KVM.
    #[derive(Default)]
    struct Chip {
        routes: Mutex<Vec<(u32, u64, u32)>>,
        bound: Mutex<Vec<u32>>,
    }
    impl IrqChip for Chip {
        fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> Result<(), IrqError> {
            *self.routes.lock().unwrap() = routes.to_vec();
            Ok(())
        }
        fn bind(&self, _: &EventFd, gsi: u32) -> Result<(), IrqError> {
            self.bound.lock().unwrap().push(gsi);
            Ok(())
        }
        fn unbind(&self, _: &EventFd, gsi: u32) -> Result<(), IrqError> {
            self.bound.lock().unwrap().retain(|g| *g != gsi);
            Ok(())
        }
    }

    struct Model(Arc<Mutex<Option<(u64, usize)>>>);
    impl VirtioDevice for Model {
        fn device_type(&self) -> u32 {
            TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256]
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | 1 << 9
        }
        fn read_config(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0x5a)
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, acked: u64, queues: &[QueueSetup]) -> Result<(), String> {
            *self.0.lock().unwrap() = Some((acked, queues.len()));
            Ok(())
        }
        fn reset(&mut self) {
            *self.0.lock().unwrap() = None;
        }
    }

    /// What the test device saw at its last activation (config address, queue count).
    type Started = Arc<Mutex<Option<(u64, usize)>>>;

    fn device() -> (VirtioPci, Arc<Chip>, Started) {
        let chip = Arc::new(Chip::default());
        let started = Arc::new(Mutex::new(None));
        let router = Arc::new(MsiRouter::new(chip.clone()));
        let d = VirtioPci::new(
            "t".into(),
            Box::new(Model(started.clone())),
            0xc001_0000,
            router,
        )
        .unwrap();
        (d, chip, started)
    }

    fn w(d: &mut VirtioPci, off: u64, v: u64, len: usize) {
        d.write(off, &v.to_le_bytes()[..len]);
    }

    fn r(d: &mut VirtioPci, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn negotiate(d: &mut VirtioPci, features: u64) -> u8 {
        w(d, 0x14, 0, 1);
        w(d, 0x14, 3, 1);
        w(d, 0x08, 0, 4);
        w(d, 0x0c, features & 0xffff_ffff, 4);
        w(d, 0x08, 1, 4);
        w(d, 0x0c, features >> 32, 4);
        w(d, 0x14, 11, 1);
        r(d, 0x14, 1) as u8
    }

    #[test]
    fn features_beyond_the_offer_or_without_version_1_are_refused() {
        let (mut d, _, _) = device();
        assert_eq!(negotiate(&mut d, F_VERSION_1 | 1 << 9), 11);
        assert_eq!(
            negotiate(&mut d, F_VERSION_1 | F_RING_PACKED),
            3,
            "packed rings are never offered"
        );
        assert_eq!(negotiate(&mut d, 1 << 9), 3, "no VERSION_1");
    }

    #[test]
    fn driver_ok_activates_the_enabled_queues_and_reset_stops_them() {
        let (mut d, _, started) = device();
        negotiate(&mut d, F_VERSION_1);
        w(&mut d, 0x18, 100, 2); // not a power of two: ignored
        assert_eq!(r(&mut d, 0x18, 2), 256);
        w(&mut d, 0x18, 64, 2);
        w(&mut d, 0x20, 0x1000, 8);
        w(&mut d, 0x28, 0x2000, 4);
        w(&mut d, 0x30, 0x3000, 4);
        w(&mut d, 0x1c, 1, 2);
        w(&mut d, 0x14, 15, 1);
        assert_eq!(*started.lock().unwrap(), Some((F_VERSION_1, 1)));
        assert_eq!(r(&mut d, 0x14, 1), 15);
        // While running, queue registers are read-only.
        w(&mut d, 0x18, 32, 2);
        assert_eq!(r(&mut d, 0x18, 2), 64);
        w(&mut d, 0x14, 0, 1);
        assert_eq!(*started.lock().unwrap(), None);
        assert_eq!(r(&mut d, 0x14, 1), 0);
        assert_eq!(r(&mut d, 0x1c, 2), 0);
    }

    #[test]
    fn a_queue_irqfd_is_bound_exactly_while_its_vector_can_fire() {
        let (mut d, chip, _) = device();
        let gsi = d.gsi_base;
        w(&mut d, 0x16, 0, 2);
        w(&mut d, 0x1a, 0, 2); // queue 0 -> vector 0
        assert_eq!(r(&mut d, 0x1a, 2), 0);
        w(&mut d, 0x1a, 9, 2); // no such vector: refused
        assert_eq!(r(&mut d, 0x1a, 2), NO_VECTOR as u64);
        w(&mut d, 0x1a, 0, 2);
        // Entry 0: address, data, unmasked; MSI-X still off.
        w(&mut d, MSIX_TABLE, 0xfee0_0000, 4);
        w(&mut d, MSIX_TABLE + 8, 0x41, 4);
        w(&mut d, MSIX_TABLE + 12, 0, 4);
        assert!(chip
            .routes
            .lock()
            .unwrap()
            .contains(&(gsi, 0xfee0_0000, 0x41)));
        assert!(chip.bound.lock().unwrap().is_empty(), "MSI-X is off");
        d.write_config(CAP_MSIX as u16, (MSIX_ENABLE as u32) << 16, 0xffff_0000);
        assert_eq!(*chip.bound.lock().unwrap(), vec![gsi]);
        w(&mut d, MSIX_TABLE + 12, 1, 4); // mask the entry
        assert!(chip.bound.lock().unwrap().is_empty());
        w(&mut d, MSIX_TABLE + 12, 0, 4);
        d.write_config(
            CAP_MSIX as u16,
            ((MSIX_ENABLE | MSIX_FUNCTION_MASK) as u32) << 16,
            0xffff_0000,
        );
        assert!(chip.bound.lock().unwrap().is_empty(), "function mask");
        d.write_config(CAP_MSIX as u16, (MSIX_ENABLE as u32) << 16, 0xffff_0000);
        assert_eq!(*chip.bound.lock().unwrap(), vec![gsi]);
        // The table size in message control is read-only.
        assert_eq!(d.read_config(CAP_MSIX as u16) >> 16 & 0x7ff, 1);
    }

    #[test]
    fn bar0_answers_the_sizing_probe_and_cannot_be_moved() {
        let (mut d, _, _) = device();
        assert_eq!(d.read_config(0x10), 0xc001_0000);
        d.write_config(0x10, 0xffff_ffff, 0xffff_ffff);
        assert_eq!(d.read_config(0x10), !(BAR_SIZE as u32 - 1));
        d.write_config(0x10, 0xd000_0000, 0xffff_ffff);
        assert_eq!(d.read_config(0x10), 0xc001_0000);
        assert_eq!(d.read_config(0) & 0xffff, 0x1af4);
        assert_eq!(d.read_config(0) >> 16, 0x1042);
        // A kick that reaches the VMM goes to the queue's eventfd.
        w(&mut d, NOTIFY, 0, 2);
        assert_eq!(d.queues[0].kick.read().unwrap(), 1);
    }
}
