//! A bus is a sorted set of non-overlapping address ranges, each owned by one device.

use std::sync::{Arc, Mutex};

pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("range {0:#x}+{1:#x} overlaps a device already on the bus")]
    Overlap(u64, u64),
    #[error("range {0:#x}+{1:#x} is empty or wraps")]
    BadRange(u64, u64),
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::BadRange(base, len))?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(Error::Overlap(base, len));
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let i = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let e = &self.entries[i];
        let offset = addr - e.base;
        (offset + size as u64 <= e.len).then_some((e, offset))
    }

    /// Returns false when no device claims the access (the data is then all-ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device mutex is only poisoned if a device panicked, which aborts the VMM (panic =
/// "abort"); recovering the guard keeps tests that unwind from cascading.
fn lock(m: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_claimed_ones_reach_the_device() {
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(0x10))))
            .unwrap();
        let mut d = [0u8; 1];
        assert!(!bus.read(0x3f0, &mut d));
        assert_eq!(d, [0xff]);
        assert!(bus.read(0x3f9, &mut d));
        assert_eq!(d, [0x11]);
        assert!(bus.write(0x3f8, &[0x20]));
        bus.read(0x3f8, &mut d);
        assert_eq!(d, [0x20]);
        // An access straddling the end of the range is not the device's.
        let mut d2 = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut d2));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        assert_eq!(
            bus.insert(0x10f, 1, Arc::new(Mutex::new(Echo(0)))).err(),
            Some(Error::Overlap(0x10f, 1))
        );
        assert_eq!(
            bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Echo(0)))).err(),
            Some(Error::BadRange(u64::MAX, 2))
        );
        bus.insert(0x110, 1, Arc::new(Mutex::new(Echo(0)))).unwrap();
    }
}
