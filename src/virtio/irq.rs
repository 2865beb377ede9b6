//! MSI routes and irqfds. Each MSI-X vector of each device owns one KVM GSI whose route
//! is the vector's (address, data); a queue's call eventfd is bound to that GSI as an
//! irqfd while the vector can fire (MSI-X on, function and vector unmasked). Unbound, the
//! eventfd keeps counting, and KVM injects at once when it is bound again: that is the
//! pending bit of a masked vector, kept by the kernel.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQ_ROUTING_MSI};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// GSIs 0-23 stay with the IOAPIC pins (KVM reserves them under the split irqchip).
const FIRST_MSI_GSI: u32 = crate::devices::ioapic::NUM_PINS as u32;
/// KVM_MAX_IRQ_ROUTES.
const MAX_GSI: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("out of MSI routes ({0} in use)")]
    Exhausted(u32),
    #[error("KVM_SET_GSI_ROUTING: {0}")]
    Routing(kvm_ioctls::Error),
    #[error("KVM_IRQFD: {0}")]
    Irqfd(kvm_ioctls::Error),
}

/// What routes and irqfds go through, so the transport can be tested without KVM.
pub trait IrqChip: Send + Sync {
    fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> Result<(), Error>;
    fn bind(&self, fd: &EventFd, gsi: u32) -> Result<(), Error>;
    fn unbind(&self, fd: &EventFd, gsi: u32) -> Result<(), Error>;
}

impl IrqChip for VmFd {
    fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> Result<(), Error> {
        let entries: Vec<kvm_irq_routing_entry> = routes
            .iter()
            .map(|&(gsi, address, data)| {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = address as u32;
                e.u.msi.address_hi = (address >> 32) as u32;
                e.u.msi.data = data;
                e
            })
            .collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| Error::Exhausted(routes.len() as u32))?;
        self.set_gsi_routing(&table).map_err(Error::Routing)
    }

    fn bind(&self, fd: &EventFd, gsi: u32) -> Result<(), Error> {
        self.register_irqfd(fd, gsi).map_err(Error::Irqfd)
    }

    fn unbind(&self, fd: &EventFd, gsi: u32) -> Result<(), Error> {
        self.unregister_irqfd(fd, gsi).map_err(Error::Irqfd)
    }
}

/// The VM's table of MSI routes, shared by every device.
pub struct MsiRouter {
    chip: Arc<dyn IrqChip>,
    state: Mutex<State>,
}

struct State {
    next: u32,
    routes: BTreeMap<u32, (u64, u32)>,
}

impl MsiRouter {
    pub fn new(chip: Arc<dyn IrqChip>) -> Self {
        MsiRouter {
            chip,
            state: Mutex::new(State {
                next: FIRST_MSI_GSI,
                routes: BTreeMap::new(),
            }),
        }
    }

    pub fn chip(&self) -> &Arc<dyn IrqChip> {
        &self.chip
    }

    /// `count` consecutive GSIs for one device's vectors.
    pub fn allocate(&self, count: u32) -> Result<u32, Error> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let base = s.next;
        if base + count > MAX_GSI {
            return Err(Error::Exhausted(base - FIRST_MSI_GSI));
        }
        s.next += count;
        Ok(base)
    }

    /// Points `gsi` at an MSI (address, data); None removes the route.
    pub fn set_route(&self, gsi: u32, msg: Option<(u64, u32)>) -> Result<(), Error> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match msg {
            Some(m) => s.routes.insert(gsi, m) != Some(m),
            None => s.routes.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let table: Vec<(u32, u64, u32)> = s.routes.iter().map(|(g, (a, d))| (*g, *a, *d)).collect();
        self.chip.set_msi_routes(&table)
    }
}
