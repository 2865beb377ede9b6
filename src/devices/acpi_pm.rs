//! The hardware-reduced ACPI sleep registers the FADT names: writing SLP_EN with the
//! \_S5 sleep type powers the VM off. The status register reads as zero.

use super::bus::BusDevice;
use super::{EventSender, VmEvent};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_S5: u8 = 5;

pub struct AcpiSleep {
    events: EventSender,
}

impl AcpiSleep {
    pub fn new(events: EventSender) -> Self {
        AcpiSleep { events }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0
            && data.len() == 1
            && data[0] & SLP_EN != 0
            && (data[0] >> 2) & 7 == SLP_TYP_S5
        {
            let _ = self.events.send(VmEvent::Poweroff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut dev = AcpiSleep::new(tx);
        dev.write(0, &[5 << 2]); // no SLP_EN
        dev.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported, ignored
        assert!(rx.try_recv().is_err());
        dev.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(rx.try_recv(), Ok(VmEvent::Poweroff));
    }
}
