//! The PCI root complex: a host bridge at 00:00.0 and configuration space through both
//! mechanism #1 (ports 0xCF8/0xCFC) and ECAM (memory-mapped, described by the MCFG
//! table). Slots with no device read as all-ones, as on real hardware. Devices (the
//! virtio-pci transport) attach here.

use super::bus::BusDevice;

/// Red Hat's generic PCIe host bridge id (as used by other VMMs' generic hosts).
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const CLASS_BRIDGE_HOST: u32 = 0x06_00_00;
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// ECAM covers bus 0 only: 32 devices x 8 functions x 4 KiB.
pub const ECAM_SIZE: u64 = crate::arch::x86_64::layout::PCI_ECAM_SIZE;

/// One function's configuration space.
pub trait PciFunction: Send {
    fn read_config(&self, offset: u16) -> u32;
    fn write_config(&mut self, offset: u16, value: u32, mask: u32);
}

struct HostBridge {
    command: u16,
}

impl PciFunction for HostBridge {
    fn read_config(&self, offset: u16) -> u32 {
        match offset & !3 {
            0x00 => (HOST_BRIDGE_DEVICE as u32) << 16 | HOST_BRIDGE_VENDOR as u32,
            0x04 => self.command as u32,    // status 0
            0x08 => CLASS_BRIDGE_HOST << 8, // revision 0
            0x0c => 0,                      // header type 0, single function
            _ => 0,
        }
    }

    fn write_config(&mut self, offset: u16, value: u32, mask: u32) {
        if offset & !3 == 0x04 {
            // Memory and I/O space enable are the only writable command bits here.
            self.command = ((self.command as u32 & !mask) | (value & mask)) as u16 & 0x0003;
        }
    }
}

pub struct PciRoot {
    /// Functions on bus 0, by device number (function 0 only for now).
    devices: Vec<Option<Box<dyn PciFunction>>>,
    config_address: u32,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    pub fn new() -> Self {
        let mut devices: Vec<Option<Box<dyn PciFunction>>> = (0..32).map(|_| None).collect();
        devices[0] = Some(Box::new(HostBridge { command: 0 }));
        PciRoot {
            devices,
            config_address: 0,
        }
    }

    /// Puts a function at device number `slot` of bus 0.
    pub fn add(&mut self, slot: u8, function: Box<dyn PciFunction>) -> Result<(), String> {
        match self.devices.get_mut(slot as usize) {
            Some(s @ None) => {
                *s = Some(function);
                Ok(())
            }
            Some(Some(_)) => Err(format!("PCI slot {slot} is taken")),
            None => Err(format!("PCI slot {slot} does not exist (0-31)")),
        }
    }

    fn function(&mut self, bus: u8, device: u8, function: u8) -> Option<&mut Box<dyn PciFunction>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices.get_mut(device as usize)?.as_mut()
    }

    /// Reads `data.len()` (1, 2 or 4) bytes at `offset` of a function's space.
    fn config_read(&mut self, bus: u8, device: u8, function: u8, offset: u16, data: &mut [u8]) {
        let value = match self.function(bus, device, function) {
            Some(f) if offset < 0x1000 => f.read_config(offset & !3) >> ((offset & 3) * 8),
            _ => 0xffff_ffff,
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = (value >> (i * 8)) as u8;
        }
    }

    fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: u16, data: &[u8]) {
        let shift = (offset & 3) * 8;
        let (mut value, mut mask) = (0u32, 0u32);
        for (i, d) in data.iter().enumerate() {
            value |= (*d as u32) << (i * 8);
            mask |= 0xff << (i * 8);
        }
        if let Some(f) = self.function(bus, device, function) {
            if offset < 0x1000 && (offset & 3) as usize + data.len() <= 4 {
                f.write_config(offset & !3, value << shift, mask << shift);
            }
        }
    }
}

/// Mechanism #1: 0xCF8 holds the address (enable bit, bus, device, function, register),
/// 0xCFC-0xCFF the data. Registered on the port bus at 0xCF8 with length 8.
pub struct PciConfigIo(pub std::sync::Arc<std::sync::Mutex<PciRoot>>);

impl PciRoot {
    /// The (bus, device, function, register) a data-port access at `offset` (4..=7)
    /// of `len` bytes addresses, if the address register enables one.
    fn cf8_target(&self, offset: u64, len: usize) -> Option<(u8, u8, u8, u16)> {
        let a = self.config_address;
        if !(4..=7).contains(&offset) || (offset - 4) as usize + len > 4 || a & 0x8000_0000 == 0 {
            return None;
        }
        let reg = (a & 0xfc) as u16 + (offset - 4) as u16;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
            reg,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut root = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&root.config_address.to_le_bytes());
        } else if let Some((b, d, f, reg)) = root.cf8_target(offset, data.len()) {
            root.config_read(b, d, f, reg, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut root = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if offset == 0 && data.len() == 4 {
            root.config_address =
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80ff_fffc;
        } else if let Some((b, d, f, reg)) = root.cf8_target(offset, data.len()) {
            root.config_write(b, d, f, reg, data);
        }
    }
}

/// ECAM: offset = bus << 20 | device << 15 | function << 12 | register.
pub struct PciEcam(pub std::sync::Arc<std::sync::Mutex<PciRoot>>);

fn ecam_decode(offset: u64) -> (u8, u8, u8, u16) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 7) as u8,
        (offset & 0xfff) as u16,
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg) = ecam_decode(offset);
        if (reg & 3) as usize + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config_read(b, d, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = ecam_decode(offset);
        if (reg & 3) as usize + data.len() <= 4 {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .config_write(b, d, f, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn cf8(dev: u8, reg: u8) -> [u8; 4] {
        (0x8000_0000u32 | (dev as u32) << 11 | reg as u32).to_le_bytes()
    }

    #[test]
    fn both_mechanisms_see_the_host_bridge_and_empty_slots_read_all_ones() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let (mut io, mut ecam) = (PciConfigIo(root.clone()), PciEcam(root));
        let mut d = [0u8; 4];
        io.write(0, &cf8(0, 0));
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        ecam.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        ecam.read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_00_00);
        io.write(0, &cf8(3, 0));
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.read(3 << 15, &mut d);
        assert_eq!(d, [0xff; 4]);
        // 16-bit reads of the device id half.
        let mut w = [0u8; 2];
        ecam.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008);
    }

    #[test]
    fn only_the_command_registers_decode_bits_are_writable() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let mut ecam = PciEcam(root);
        ecam.write(4, &0xffffu16.to_le_bytes());
        ecam.write(0, &0u32.to_le_bytes());
        let mut d = [0u8; 4];
        ecam.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x3);
        ecam.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36, "ids are read-only");
        // Without the enable bit, 0xCFC reads all-ones.
        let mut io = PciConfigIo(Arc::new(Mutex::new(PciRoot::new())));
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
