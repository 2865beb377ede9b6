//! The i8042 controller, for its reset line (command 0xfe on port 0x64). vm-superio's
//! device does the register work; a reset becomes a VmEvent.

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use super::{EventSender, VmEvent};

pub struct ResetLine(EventSender);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        let _ = self.0.send(VmEvent::Reset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    pub fn new(events: EventSender) -> Self {
        I8042(I8042Device::new(ResetLine(events)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset <= 4 {
            data[0] = self.0.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset <= 4 {
            let _ = self.0.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets_the_vm() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut dev = I8042::new(tx);
        dev.write(4, &[0x20]); // read command byte: no reset
        assert!(rx.try_recv().is_err());
        dev.write(4, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(VmEvent::Reset));
    }
}
