//! Platform devices and the buses that route guest port and MMIO accesses to them.
//! Addresses no device claims read as all-ones and ignore writes, as on a PC.

pub mod acpi_pm;
pub mod bus;
pub mod ged;
pub mod i8042;
pub mod ioapic;
pub mod pci;
pub mod serial;

/// How a device asks the VMM to end the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// ACPI S5 or an equivalent: exit 0.
    Poweroff,
    /// i8042 or ACPI reset: exit 0 (cellvm does not reboot guests).
    Reset,
    /// Something went wrong: one line, exit 1.
    Error(String),
}

pub type EventSender = std::sync::mpsc::Sender<VmEvent>;
