//! Virtio devices as the guest sees them: the virtio-pci transport (in the VMM) in front
//! of a device model that lives in another process and is reached over vhost-user.
//!
//! The VMM owns only the control plane: PCI config space, the virtio registers, MSI-X,
//! and the feature and queue negotiation. The data path is a kick eventfd (a KVM
//! ioeventfd on the queue's notify address) into the backend and a call eventfd (a KVM
//! irqfd on the queue's MSI-X vector) back to the guest: no VMM thread touches a request.

pub mod irq;
pub mod pci;
pub mod vhost_user;

use vmm_sys_util::eventfd::EventFd;

/// Virtio device ids (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Feature bits the transport itself cares about.
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const F_RING_PACKED: u64 = 1 << 34;
pub const F_NOTIFICATION_DATA: u64 = 1 << 38;
pub const F_RING_RESET: u64 = 1 << 40;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;

/// One queue as the driver set it up, ready to be handed to the device model.
pub struct QueueSetup {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The guest's kicks arrive here (a KVM ioeventfd).
    pub kick: EventFd,
    /// The device signals used buffers here (a KVM irqfd, or the INTx relay).
    pub call: EventFd,
}

impl QueueSetup {
    pub fn try_clone(&self) -> std::io::Result<QueueSetup> {
        Ok(QueueSetup {
            index: self.index,
            size: self.size,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
            kick: self.kick.try_clone()?,
            call: self.call.try_clone()?,
        })
    }
}

/// The device model behind a virtio-pci function.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// The device-specific configuration space.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start the queues it enabled with the features it
    /// accepted. An error makes the transport report NEEDS_RESET.
    fn activate(&mut self, acked_features: u64, queues: &[QueueSetup]) -> Result<(), String>;
    /// The driver reset the device: stop every queue.
    fn reset(&mut self);
    /// The device model's process died and a new one is at the other end of `stream`:
    /// carry on where the old one stopped. A model without a process has nothing to
    /// reconnect.
    fn reconnect(&mut self, _stream: std::os::unix::net::UnixStream) -> Result<(), String> {
        Err("this device has no backend to reconnect".into())
    }
}
