//! COM1: a 16550A UART (vm-superio) whose output goes to stdout or a file and whose
//! interrupt is an IOAPIC pin.

use std::io::Write;

use vm_superio::{Serial as Uart, Trigger};

use super::bus::BusDevice;

/// Raises the UART's interrupt line.
pub struct IrqLine(Box<dyn Fn() + Send>);

impl IrqLine {
    pub fn new(raise: impl Fn() + Send + 'static) -> Self {
        IrqLine(Box::new(raise))
    }
}

impl Trigger for IrqLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

pub struct Serial(Uart<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>);

impl Serial {
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        Serial(Uart::new(irq, out))
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.0.state()
    }

    /// The UART of a restored VM: its saved registers, this VM's interrupt and output.
    pub fn from_state(
        state: &vm_superio::serial::SerialState,
        irq: IrqLine,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        Uart::from_state(state, irq, vm_superio::serial::NoEvents, out)
            .map(Serial)
            .map_err(|e| format!("serial: {e:?}"))
    }

    pub fn flush(&mut self) {
        let _ = self.0.writer_mut().flush();
    }

    /// Queues guest input as much as the receive FIFO takes; returns how much it took.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.0.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.0.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }
}

/// Feeds the VMM's standard input to the guest's COM1 from its own thread, which
/// installs the `vmm/stdin` seccomp profile first. Ends at end of input.
pub fn spawn_stdin_feeder(
    serial: std::sync::Arc<std::sync::Mutex<Serial>>,
    seccomp: crate::seccomp::Mode,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::install("vmm", "stdin", seccomp) {
                log::warn!("serial input disabled: {e}");
                return;
            }
            let mut buf = [0u8; 64];
            loop {
                let n = match std::io::Read::read(&mut std::io::stdin(), &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue_input(rest);
                    rest = &rest[taken..];
                    if taken == 0 {
                        // The guest has not drained the FIFO yet.
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        })?;
    Ok(())
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.0.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.0.write(offset as u8, data[0]) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_reach_the_writer_and_thre_interrupt_fires_when_enabled() {
        let sink = Sink::default();
        let raised = Arc::new(AtomicU32::new(0));
        let r = raised.clone();
        let mut s = Serial::new(
            IrqLine::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
            Box::new(sink.clone()),
        );
        s.write(1, &[0x02]); // IER: transmitter-holding-register-empty interrupt
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi");
        assert!(raised.load(Ordering::SeqCst) >= 1);
        let mut d = [0u8; 2];
        s.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff], "16-bit accesses are not decoded");
    }
}
