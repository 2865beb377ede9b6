//! The IOAPIC, emulated in the VMM (KVM_CAP_SPLIT_IRQCHIP keeps only the LAPIC in the
//! kernel). Each of the 24 pins has a redirection entry; an unmasked pin is delivered as
//! an MSI to the in-kernel LAPICs. Level-triggered pins keep Remote IRR set until the
//! guest's EOI comes back as KVM_EXIT_IOAPIC_EOI.

use super::bus::BusDevice;

pub const NUM_PINS: usize = 24;
const IOAPIC_VERSION: u32 = 0x11;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_TABLE: u32 = 0x10;
const OFF_SELECT: u64 = 0x00;
const OFF_WINDOW: u64 = 0x10;
const OFF_EOI: u64 = 0x40;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const DELIVERY_STATUS: u64 = 1 << 12;
const DEST_LOGICAL: u64 = 1 << 11;
/// Bits the guest may write; Remote IRR and Delivery Status are read-only.
const WRITABLE: u64 = !(REMOTE_IRR | DELIVERY_STATUS);

/// Where IOAPIC interrupts go: the VM's MSI path.
pub trait MsiSink: Send {
    fn send_msi(&self, address: u64, data: u32);
}

impl MsiSink for std::sync::Arc<kvm_ioctls::VmFd> {
    fn send_msi(&self, address: u64, data: u32) {
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.signal_msi(msi) {
            log::warn!("ioapic: KVM_SIGNAL_MSI failed: {e}");
        }
    }
}

/// What a snapshot keeps of the IOAPIC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoApicState {
    pub id: u32,
    pub select: u32,
    pub table: [u64; NUM_PINS],
    /// Bit n: pin n's line is high.
    pub level: u32,
}

pub struct IoApic<S: MsiSink> {
    id: u32,
    select: u32,
    table: [u64; NUM_PINS],
    /// Current line level of each pin (level-triggered pins re-fire after EOI if high).
    level: [bool; NUM_PINS],
    sink: S,
}

impl<S: MsiSink> IoApic<S> {
    pub fn new(id: u32, sink: S) -> Self {
        IoApic {
            id,
            select: 0,
            table: [MASKED; NUM_PINS],
            level: [false; NUM_PINS],
            sink,
        }
    }

    pub fn state(&self) -> IoApicState {
        IoApicState {
            id: self.id,
            select: self.select,
            table: self.table,
            level: self
                .level
                .iter()
                .enumerate()
                .fold(0, |m, (i, l)| m | ((*l as u32) << i)),
        }
    }

    /// Takes a saved state (checked by its decoder: the id fits 4 bits, Delivery Status
    /// is clear). Nothing is delivered: the LAPICs' own state holds what was in flight.
    pub fn restore(&mut self, s: &IoApicState) {
        self.id = s.id & 0xf;
        self.select = s.select;
        self.table = s.table.map(|e| e & !DELIVERY_STATUS);
        for (i, l) in self.level.iter_mut().enumerate() {
            *l = s.level & (1 << i) != 0;
        }
    }

    /// An edge on `pin` (or its level going high).
    pub fn assert_irq(&mut self, pin: usize) {
        if pin >= NUM_PINS {
            return;
        }
        self.level[pin] = true;
        self.deliver(pin);
        if self.table[pin] & LEVEL == 0 {
            self.level[pin] = false;
        }
    }

    pub fn deassert_irq(&mut self, pin: usize) {
        if pin < NUM_PINS {
            self.level[pin] = false;
        }
    }

    fn deliver(&mut self, pin: usize) {
        let entry = self.table[pin];
        if entry & MASKED != 0 || (entry & LEVEL != 0 && entry & REMOTE_IRR != 0) {
            return;
        }
        let vector = (entry & 0xff) as u32;
        let mode = ((entry >> 8) & 0x7) as u32;
        let dest = (entry >> 56) & 0xff;
        let logical = (entry & DEST_LOGICAL != 0) as u64;
        let address = 0xfee0_0000 | (dest << 12) | (logical << 2);
        let data = vector | (mode << 8) | (((entry & LEVEL != 0) as u32) << 15) | (1 << 14);
        if entry & LEVEL != 0 {
            self.table[pin] |= REMOTE_IRR;
        }
        self.sink.send_msi(address, data);
    }

    /// The guest's LAPIC acknowledged `vector`: clear Remote IRR on level pins using it.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..NUM_PINS {
            let e = self.table[pin];
            if e & LEVEL != 0 && e & REMOTE_IRR != 0 && (e & 0xff) as u8 == vector {
                self.table[pin] &= !REMOTE_IRR;
                if self.level[pin] {
                    self.deliver(pin);
                }
            }
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => self.id << 24,
            REG_VERSION => IOAPIC_VERSION | ((NUM_PINS as u32 - 1) << 16),
            REG_ARB => self.id << 24,
            r if (REG_TABLE..REG_TABLE + 2 * NUM_PINS as u32).contains(&r) => {
                let entry = self.table[((r - REG_TABLE) / 2) as usize];
                if r % 2 == 0 {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            _ => 0xffff_ffff,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = (value >> 24) & 0xf,
            r if (REG_TABLE..REG_TABLE + 2 * NUM_PINS as u32).contains(&r) => {
                let pin = ((r - REG_TABLE) / 2) as usize;
                let old = self.table[pin];
                let new = if r % 2 == 0 {
                    (old & !0xffff_ffff) | value as u64
                } else {
                    (old & 0xffff_ffff) | ((value as u64) << 32)
                };
                self.table[pin] = (old & !WRITABLE) | (new & WRITABLE);
                // An unmasked level pin that is still asserted fires now.
                if self.table[pin] & LEVEL != 0 && self.level[pin] {
                    self.deliver(pin);
                }
            }
            _ => {}
        }
    }
}

impl<S: MsiSink> BusDevice for IoApic<S> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFF_SELECT => self.select,
            OFF_WINDOW => self.read_register(),
            _ => 0xffff_ffff,
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 4 {
            return; // the IOAPIC only decodes 32-bit accesses
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            OFF_SELECT => self.select = value & 0xff,
            OFF_WINDOW => self.write_register(value),
            OFF_EOI => self.end_of_interrupt(value as u8),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(u64, u32)>>>);
    impl MsiSink for Recorder {
        fn send_msi(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    fn program(io: &mut IoApic<Recorder>, pin: u32, entry: u64) {
        io.write(OFF_SELECT, &(REG_TABLE + 2 * pin).to_le_bytes());
        io.write(OFF_WINDOW, &(entry as u32).to_le_bytes());
        io.write(OFF_SELECT, &(REG_TABLE + 2 * pin + 1).to_le_bytes());
        io.write(OFF_WINDOW, &((entry >> 32) as u32).to_le_bytes());
    }

    #[test]
    fn pins_start_masked_and_deliver_as_msi_once_programmed() {
        let rec = Recorder::default();
        let mut io = IoApic::new(1, rec.clone());
        io.assert_irq(4);
        assert!(rec.0.lock().unwrap().is_empty());
        program(&mut io, 4, (3u64 << 56) | 0x31);
        io.assert_irq(4);
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            &[(0xfee0_3000, 0x31 | (1 << 14))]
        );
    }

    #[test]
    fn level_pins_wait_for_eoi() {
        let rec = Recorder::default();
        let mut io = IoApic::new(1, rec.clone());
        program(&mut io, 9, LEVEL | 0x41);
        io.assert_irq(9);
        io.assert_irq(9);
        assert_eq!(
            rec.0.lock().unwrap().len(),
            1,
            "Remote IRR holds the second one"
        );
        io.end_of_interrupt(0x41);
        assert_eq!(
            rec.0.lock().unwrap().len(),
            2,
            "still asserted: re-delivered after EOI"
        );
        io.deassert_irq(9);
        io.end_of_interrupt(0x41);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn version_register_reports_24_pins_and_bad_selects_read_ones() {
        let mut io = IoApic::new(0, Recorder::default());
        io.write(OFF_SELECT, &REG_VERSION.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(OFF_WINDOW, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0017_0011);
        io.write(OFF_SELECT, &0x80u32.to_le_bytes());
        io.read(OFF_WINDOW, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
    }
}
