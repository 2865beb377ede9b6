//! The ACPI Generic Event Device (GED, `ACPI0013`): how a hardware-reduced ACPI platform
//! signals platform events, here the power button.
//!
//! The DSDT (src/arch/x86_64/acpi.rs) describes it as `\_SB.GED_`: its `_CRS` is one
//! edge-triggered, active-high interrupt on IOAPIC pin `layout::GED_IRQ`, an
//! OperationRegion `GDST` covers this device's one-byte status register at
//! `layout::GED_PORT`, and its `_EVT` method reads the register and, for the power-button
//! bit, does `Notify(\_SB.PWRB, 0x80)` (the `PNP0C0C` power button device), which an OS
//! turns into "power off" (Linux: its button driver, then the init system).
//!
//! Register semantics (offset 0, byte access):
//! - `power_button()` sets [`POWER_BUTTON`] in the latched status and raises one edge on
//!   the interrupt line, each time it is called (a second press before the guest reads
//!   the status raises another edge; the bit is simply already set).
//! - A one-byte read at offset 0 returns the latched status and clears it (read-to-clear,
//!   so `_EVT` sees each press once). Any other read (another offset or width) returns
//!   zeros and clears nothing.
//! - Writes are ignored.

use vm_superio::Trigger;

use super::bus::BusDevice;
use super::serial::IrqLine;

/// Status bit: the power button was pressed.
pub const POWER_BUTTON: u8 = 1 << 0;

pub struct Ged {
    irq: IrqLine,
    status: u8,
}

impl Ged {
    pub fn new(irq: IrqLine) -> Self {
        Ged { irq, status: 0 }
    }

    /// One press of the ACPI power button: latch the event and interrupt the guest.
    pub fn power_button(&mut self) {
        self.status |= POWER_BUTTON;
        let _ = self.irq.trigger();
    }

    /// A restored VM's latched events (its interrupt, if any was pending, is in the
    /// LAPIC's saved state).
    pub fn restore(&mut self, status: u8) {
        self.status = status;
    }

    /// Events latched and not yet read by the guest (does not clear them).
    pub fn pending(&self) -> u8 {
        self.status
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && data.len() == 1 {
            data[0] = std::mem::take(&mut self.status);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn ged() -> (Ged, Arc<AtomicU32>) {
        let edges = Arc::new(AtomicU32::new(0));
        let e = edges.clone();
        let ged = Ged::new(IrqLine::new(move || {
            e.fetch_add(1, Ordering::SeqCst);
        }));
        (ged, edges)
    }

    #[test]
    fn a_press_latches_the_bit_and_raises_the_interrupt_once() {
        let (mut ged, edges) = ged();
        let mut d = [0xaau8];
        ged.read(0, &mut d);
        assert_eq!(d, [0], "nothing latched before a press");
        assert_eq!(edges.load(Ordering::SeqCst), 0);
        ged.power_button();
        assert_eq!(edges.load(Ordering::SeqCst), 1);
        assert_eq!(ged.pending(), POWER_BUTTON);
        ged.read(0, &mut d);
        assert_eq!(d, [POWER_BUTTON]);
    }

    #[test]
    fn reading_the_status_clears_it_and_other_accesses_do_not() {
        let (mut ged, edges) = ged();
        ged.power_button();
        ged.power_button();
        assert_eq!(edges.load(Ordering::SeqCst), 2, "one edge per press");
        let mut wide = [0xffu8; 4];
        ged.read(0, &mut wide);
        assert_eq!(wide, [0; 4], "a 4-byte read is not decoded");
        let mut d = [0xffu8];
        ged.read(1, &mut d);
        assert_eq!(d, [0], "offset 1 is not the register");
        ged.write(0, &[0]);
        assert_eq!(ged.pending(), POWER_BUTTON, "writes do not clear it");
        ged.read(0, &mut d);
        assert_eq!(d, [POWER_BUTTON]);
        ged.read(0, &mut d);
        assert_eq!(d, [0], "read-to-clear: the second read sees nothing");
        assert_eq!(ged.pending(), 0);
    }
}
