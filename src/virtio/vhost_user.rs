//! The vhost-user frontend: the VMM's side of a device whose model runs in a backend
//! process. At connection it learns the backend's features, protocol features, queue
//! count and configuration space; when the driver sets DRIVER_OK it hands the backend
//! the guest RAM (the memfd, by descriptor) and each queue's rings, kick and call
//! eventfds, and steps aside.
//!
//! Everything the backend says is checked: a backend that lacks VERSION_1, offers
//! fewer queues than asked, replies out of turn or hangs (replies time out) makes the
//! device fail with a logged reason; the VM goes on.
//!
//! A backend that dies can be replaced: the new one is negotiated with as the first
//! was, must offer what the driver already uses, and gets the same memory table, rings
//! and eventfds, each queue resuming at the used index the old one left in guest RAM.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::*;

/// How long the frontend waits for any one reply before giving up on the backend.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of the configuration space the VMM fetches for each device type (the virtio
/// 1.2 structures up to the fields cellvm uses).
fn config_size(device_type: u32) -> u32 {
    match device_type {
        TYPE_BLOCK => 60,
        TYPE_NET => 12,
        // guest_cid.
        TYPE_VSOCK => 8,
        // cols, rows, max_nr_ports, emerg_wr.
        TYPE_CONSOLE => 12,
        _ => 0,
    }
}

/// Features the VMM passes through to the driver, per device type. Anything else the
/// backend offers stays hidden: the VMM must understand what it lets a guest enable.
fn passthrough(device_type: u32) -> u64 {
    let common = F_VERSION_1 | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC;
    let device = match device_type {
        // SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE, MQ, DISCARD,
        // WRITE_ZEROES, RO.
        TYPE_BLOCK => {
            (1 << 1)
                | (1 << 2)
                | (1 << 6)
                | (1 << 9)
                | (1 << 10)
                | (1 << 11)
                | (1 << 12)
                | (1 << 13)
                | (1 << 14)
                | (1 << 5)
        }
        // CSUM, GUEST_CSUM, MAC, GUEST_TSO4/6, GUEST_UFO, HOST_TSO4/6, HOST_UFO,
        // MRG_RXBUF, STATUS, CTRL_VQ, MQ.
        TYPE_NET => {
            (1 << 17)
                | (1 << 22)
                | (1 << 0)
                | (1 << 1)
                | (1 << 5)
                | (1 << 7)
                | (1 << 8)
                | (1 << 10)
                | (1 << 11)
                | (1 << 12)
                | (1 << 14)
                | (1 << 15)
                | (1 << 16)
        }
        // MULTIPORT.
        TYPE_CONSOLE => 1 << 1,
        _ => 0,
    };
    common | device
}

/// The most ports the VMM takes from a console backend's configuration.
pub const MAX_CONSOLE_PORTS: u32 = 4;

/// A console's queue count from its configuration's max_nr_ports (with the multiport
/// feature, a receive and a transmit queue per port and two control queues).
fn console_queues(config: &[u8]) -> Result<usize, Error> {
    let ports = config
        .get(4..8)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    if !(1..=MAX_CONSOLE_PORTS).contains(&ports) {
        return Err(Error::ConsolePorts(ports));
    }
    Ok(2 * (ports as usize + 1))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("console backend claims {0} ports (1 to 4)")]
    ConsolePorts(u32),
    #[error("{0}: {1}")]
    Vhost(&'static str, vhost::Error),
    #[error("backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("backend offers {0} queues, {1} needed")]
    TooFewQueues(u64, usize),
    #[error("queue {0}: {1} not inside guest RAM")]
    RingOutsideRam(usize, &'static str),
    #[error("socket: {0}")]
    Socket(std::io::Error),
    #[error("the new backend differs: {0}")]
    Changed(String),
}

pub struct VhostUserDevice {
    link: Link,
    device_type: u32,
    queue_sizes: Vec<u16>,
    mem: GuestMemoryMmap,
    started: Vec<usize>,
    /// A configuration space the VMM serves itself instead of the backend's (a
    /// virtio-fs tag: virtiofsd is told nothing of it).
    own_config: Option<Vec<u8>>,
    /// What the driver started the device with (features and queues), kept to start a
    /// backend that replaces a dead one in the same place.
    activation: Option<(u64, Vec<QueueSetup>)>,
}

/// One connection to a backend, negotiated: what the backend offered and the queue
/// count that follows from it.
struct Link {
    frontend: Frontend,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    queues: usize,
}

/// Where each queue's backend starts reading the available ring.
#[derive(Clone, Copy, PartialEq)]
enum Base {
    /// A ring the driver just set up: from the start.
    Fresh,
    /// A ring a dead backend served: from the used index in guest RAM. Every backend
    /// completes each chain before it takes the next, so the used index counts
    /// exactly the chains finished; those taken but unfinished are served again.
    Resume,
}

/// Negotiates with the backend at the other end of `stream`: features, protocol
/// features, queue count and configuration space, each checked.
fn handshake(stream: UnixStream, device_type: u32, queues: usize) -> Result<Link, Error> {
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
        .map_err(Error::Socket)?;
    let mut frontend = Frontend::from_stream(stream, queues as u64);
    frontend
        .set_owner()
        .map_err(|e| Error::Vhost("SET_OWNER", e))?;
    let backend_features = frontend
        .get_features()
        .map_err(|e| Error::Vhost("GET_FEATURES", e))?;
    if backend_features & F_VERSION_1 == 0 {
        return Err(Error::NoVersion1(backend_features));
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(|e| Error::Vhost("GET_PROTOCOL_FEATURES", e))?;
        protocol = offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK);
        frontend
            .set_protocol_features(protocol)
            .map_err(|e| Error::Vhost("SET_PROTOCOL_FEATURES", e))?;
    }
    let offered_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
        frontend
            .get_queue_num()
            .map_err(|e| Error::Vhost("GET_QUEUE_NUM", e))?
    } else {
        1
    };
    let size = config_size(device_type);
    let mut config = vec![0u8; size as usize];
    if size > 0 && protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        let (_, payload) = frontend
            .get_config(0, size, VhostUserConfigFlags::WRITABLE, &config)
            .map_err(|e| Error::Vhost("GET_CONFIG", e))?;
        config.copy_from_slice(&payload);
    }
    // A console's queues follow from its ports, which only its backend knows.
    let queues = if device_type == TYPE_CONSOLE {
        console_queues(&config)?
    } else {
        queues
    };
    if offered_queues < queues as u64 {
        return Err(Error::TooFewQueues(offered_queues, queues));
    }
    Ok(Link {
        frontend,
        backend_features,
        protocol,
        config,
        queues,
    })
}

impl VhostUserDevice {
    /// Negotiates with the backend at the other end of `stream`.
    pub fn connect(
        stream: UnixStream,
        device_type: u32,
        queues: usize,
        queue_size: u16,
        mem: GuestMemoryMmap,
    ) -> Result<Self, Error> {
        let link = handshake(stream, device_type, queues)?;
        Ok(VhostUserDevice {
            queue_sizes: vec![queue_size; link.queues],
            link,
            device_type,
            mem,
            started: Vec::new(),
            own_config: None,
            activation: None,
        })
    }

    /// The device's configuration space is `config`, read-only, whatever the backend
    /// has: a virtio-fs share's tag and request queue count.
    pub fn with_config(mut self, config: Vec<u8>) -> Self {
        self.own_config = Some(config);
        self
    }

    /// Takes over from a backend that died: negotiates with the new one at the other
    /// end of `stream` and, if the driver had started the device, starts every queue
    /// where the old backend left it. Then kicks every queue (a kick that reached the
    /// dead backend is not lost) and signals every one (nor a completion it made
    /// without signalling).
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<(), Error> {
        let link = handshake(stream, self.device_type, self.queue_sizes.len())?;
        if link.queues != self.queue_sizes.len() {
            return Err(Error::Changed(format!(
                "{} queues, the device has {}",
                link.queues,
                self.queue_sizes.len()
            )));
        }
        if let Some((acked, _)) = &self.activation {
            let missing = acked & !link.backend_features;
            if missing != 0 {
                return Err(Error::Changed(format!(
                    "features {missing:#x} the driver uses are no longer offered"
                )));
            }
        }
        self.link = link;
        self.started.clear();
        let Some((acked, queues)) = self.activation.take() else {
            return Ok(());
        };
        let started = self.start(acked, &queues, Base::Resume);
        if started.is_ok() {
            for q in &queues {
                let _ = q.kick.write(1);
                let _ = q.call.write(1);
            }
        }
        self.activation = Some((acked, queues));
        started
    }

    fn host_address(
        &self,
        q: usize,
        what: &'static str,
        gpa: u64,
        len: usize,
    ) -> Result<u64, Error> {
        let addr = GuestAddress(gpa);
        if !GuestMemoryBackend::check_range(&self.mem, addr, len) {
            return Err(Error::RingOutsideRam(q, what));
        }
        self.mem
            .get_host_address(addr)
            .map(|p| p as u64)
            .map_err(|_| Error::RingOutsideRam(q, what))
    }

    fn start(&mut self, acked: u64, queues: &[QueueSetup], base: Base) -> Result<(), Error> {
        let protocol_bit =
            self.link.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.link
            .frontend
            .set_features(acked | protocol_bit)
            .map_err(|e| Error::Vhost("SET_FEATURES", e))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Vhost("guest RAM", e))?;
        self.link
            .frontend
            .set_mem_table(&regions)
            .map_err(|e| Error::Vhost("SET_MEM_TABLE", e))?;
        for q in queues {
            let n = q.size as usize;
            let config = VringConfigData {
                queue_max_size: self.queue_sizes[q.index],
                queue_size: q.size,
                flags: 0,
                desc_table_addr: self.host_address(q.index, "descriptor table", q.desc, 16 * n)?,
                used_ring_addr: self.host_address(q.index, "used ring", q.used, 6 + 8 * n)?,
                avail_ring_addr: self.host_address(
                    q.index,
                    "available ring",
                    q.avail,
                    6 + 2 * n,
                )?,
                log_addr: None,
            };
            let i = q.index;
            let next = match base {
                Base::Fresh => 0,
                // The used index is the ring's third and fourth bytes, inside RAM (checked
                // above); a driver that scribbled on it only misleads its own queue.
                Base::Resume => self
                    .mem
                    .read_obj::<u16>(GuestAddress(q.used + 2))
                    .map_err(|_| Error::RingOutsideRam(i, "used ring"))?,
            };
            let f = &mut self.link.frontend;
            f.set_vring_num(i, q.size)
                .map_err(|e| Error::Vhost("SET_VRING_NUM", e))?;
            f.set_vring_addr(i, &config)
                .map_err(|e| Error::Vhost("SET_VRING_ADDR", e))?;
            f.set_vring_base(i, next)
                .map_err(|e| Error::Vhost("SET_VRING_BASE", e))?;
            f.set_vring_call(i, &q.call)
                .map_err(|e| Error::Vhost("SET_VRING_CALL", e))?;
            f.set_vring_kick(i, &q.kick)
                .map_err(|e| Error::Vhost("SET_VRING_KICK", e))?;
            if protocol_bit != 0 {
                f.set_vring_enable(i, true)
                    .map_err(|e| Error::Vhost("SET_VRING_ENABLE", e))?;
            }
            self.started.push(i);
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.link.backend_features & passthrough(self.device_type)
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let at = offset as usize;
        let config = self.own_config.as_ref().unwrap_or(&self.link.config);
        match config.get(at..at.saturating_add(data.len())) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.own_config.is_some() {
            return;
        }
        let at = offset as usize;
        let Some(dst) = self.link.config.get_mut(at..at + data.len()) else {
            return;
        };
        dst.copy_from_slice(data);
        if self
            .link
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            if let Err(e) =
                self.link
                    .frontend
                    .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
            {
                log::warn!("vhost-user: SET_CONFIG: {e}");
            }
        }
    }

    fn activate(&mut self, acked: u64, queues: &[QueueSetup]) -> Result<(), String> {
        let clones = queues
            .iter()
            .map(QueueSetup::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("eventfd: {e}"))?;
        self.activation = Some((acked, clones));
        self.start(acked, queues, Base::Fresh)
            .map_err(|e| format!("vhost-user backend: {e}"))
    }

    fn reconnect(&mut self, stream: UnixStream) -> Result<(), String> {
        VhostUserDevice::reconnect(self, stream).map_err(|e| e.to_string())
    }

    fn reset(&mut self) {
        self.activation = None;
        let protocol_bit =
            self.link.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        for i in std::mem::take(&mut self.started) {
            if protocol_bit != 0 {
                let _ = self.link.frontend.set_vring_enable(i, false);
            }
            // GET_VRING_BASE stops the ring in the backend.
            if let Err(e) = self.link.frontend.get_vring_base(i) {
                log::warn!("vhost-user: queue {i}: GET_VRING_BASE: {e}");
            }
        }
    }
}
