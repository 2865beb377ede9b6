//! `cellvm-device console`: virtio-console (virtio 1.2, 5.3) with the multiport
//! feature. Port 0 is the guest's console (Linux's hvc0); ports 1.. are named ports
//! (`/dev/virtio-ports/NAME` in a Linux guest), the way guest agents talk to the host.
//!
//! Each port's host end is a Unix stream socket: either one already connected (the
//! jailer's supervisor holds the other end of port 0 and relays it into the VM's
//! console log and `console.sock`), or a listening one that takes one host program at
//! a time (a second is accepted and closed at once). Bytes move by readv/writev
//! between the host socket and the guest's buffers, never copied through the backend
//! unless the host socket is full; then the rest of that one transmit buffer waits in
//! the backend and the port's transmit queue is not read until the host takes it:
//! backpressure reaches the guest, memory stays bounded. A port's host bytes are read
//! only into receive buffers the guest posted, and only while the guest has the port
//! open (Linux throws away what arrives on a port nobody opened).
//!
//! Control messages (`struct virtio_console_control`: le32 id, le16 event, le16
//! value) come from a guest and are untrusted: an unknown port, event or length is
//! dropped with a warning, and what the device owes the guest is bounded.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::{counters, guest_io, read_at, segments, write_at, Memory, QueueState, Segment};
use super::{ShortBuffer, MAX_QUEUE_SIZE};

/// VIRTIO_CONSOLE_F_MULTIPORT: the control queues and ports beyond port 0.
pub const F_MULTIPORT: u64 = 1 << 1;
/// Ports a device may have: the console and three named ports.
pub const MAX_PORTS: usize = 4;
/// A port name's longest form, in bytes.
pub const MAX_NAME: usize = 64;
/// The most a guest's transmit buffer may hold: a larger one is dropped. (Linux sends
/// at most 32 KiB per buffer.)
pub const MAX_TX_CHAIN: usize = 256 << 10;
/// Control messages owed the guest at most; a guest that asks for more (by repeating
/// itself) loses the surplus, with a warning.
pub const MAX_CONTROL: usize = 64;

/// The control queues (with the multiport feature).
pub const CONTROL_RX: u16 = 2;
pub const CONTROL_TX: u16 = 3;

/// Control events (virtio 1.2, 5.3.6.2).
pub const DEVICE_READY: u16 = 0;
pub const DEVICE_ADD: u16 = 1;
pub const DEVICE_REMOVE: u16 = 2;
pub const PORT_READY: u16 = 3;
pub const CONSOLE_PORT: u16 = 4;
pub const RESIZE: u16 = 5;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;

/// Size of a control message before any name.
pub const CONTROL_LEN: usize = 8;

/// The receive and transmit queues of port `id`.
pub fn port_queues(id: usize) -> (u16, u16) {
    if id == 0 {
        (0, 1)
    } else {
        (2 + 2 * id as u16, 3 + 2 * id as u16)
    }
}

/// How many queues a device of `ports` ports has with the multiport feature.
pub fn queue_count(ports: usize) -> usize {
    2 * (ports + 1)
}

/// Whether `name` may name a port: 1 to 64 bytes of letters, digits, `.`, `_`, `-`
/// (what guest tools expect, and what may become a file name on either side).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// One control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    pub id: u32,
    pub event: u16,
    pub value: u16,
}

impl Control {
    pub fn parse(b: &[u8; CONTROL_LEN]) -> Control {
        Control {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    pub fn bytes(&self) -> [u8; CONTROL_LEN] {
        let mut b = [0u8; CONTROL_LEN];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.event.to_le_bytes());
        b[6..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }
}

/// A port's host end, as the backend is given it.
pub enum HostEnd {
    /// Already connected, for the device's life (the supervisor's end of port 0).
    Connected(UnixStream),
    /// Takes one host connection at a time.
    Listening(UnixListener),
}

/// One port.
pub struct PortSpec {
    /// None for port 0, the console.
    pub name: Option<String>,
    pub host: HostEnd,
}

struct Port {
    name: Option<String>,
    listener: Option<UnixListener>,
    stream: Option<UnixStream>,
    /// The host stream has bytes (or a hang-up) not yet taken: edge-triggered.
    readable: bool,
    /// The guest sent PORT_READY (or, without multiport, port 0 from the start).
    ready: bool,
    /// The guest has the port open: its bytes from the host are delivered.
    guest_open: bool,
    /// What the host socket could not take yet of the last transmit buffer.
    pending: Vec<u8>,
}

/// Watch tokens in the inner epoll: port index * 2 (+1 for its listener).
fn token(port: usize, listener: bool) -> u64 {
    (port as u64) << 1 | listener as u64
}

const STREAM_EVENTS: u32 =
    (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const LISTENER_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLET) as u32;

fn epoll_add(epoll: RawFd, fd: RawFd, events: u32, data: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: epoll_ctl reads the event we own; both descriptors are ours.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The device: its ports, the control messages owed the guest, the host sockets'
/// epoll (which the backend's worker thread watches).
pub struct Console {
    epoll: OwnedFd,
    ports: Vec<Port>,
    multiport: bool,
    device_ready: bool,
    control_out: VecDeque<Vec<u8>>,
}

impl Console {
    /// A device with these ports (the first is the console); at most [`MAX_PORTS`].
    pub fn new(specs: Vec<PortSpec>) -> std::io::Result<Console> {
        if specs.is_empty() || specs.len() > MAX_PORTS {
            return Err(std::io::Error::other(format!(
                "1 to {MAX_PORTS} ports, not {}",
                specs.len()
            )));
        }
        // SAFETY: epoll_create1 makes a descriptor we own from here.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let mut ports = Vec::new();
        for (i, s) in specs.into_iter().enumerate() {
            if let Some(n) = &s.name {
                if i == 0 || !valid_name(n) {
                    return Err(std::io::Error::other(format!("port {i}: name {n:?}")));
                }
            } else if i != 0 {
                return Err(std::io::Error::other(format!("port {i} has no name")));
            }
            let (listener, stream) = match s.host {
                HostEnd::Connected(c) => {
                    c.set_nonblocking(true)?;
                    epoll_add(
                        epoll.as_raw_fd(),
                        c.as_raw_fd(),
                        STREAM_EVENTS,
                        token(i, false),
                    )?;
                    (None, Some(c))
                }
                HostEnd::Listening(l) => {
                    l.set_nonblocking(true)?;
                    epoll_add(
                        epoll.as_raw_fd(),
                        l.as_raw_fd(),
                        LISTENER_EVENTS,
                        token(i, true),
                    )?;
                    (Some(l), None)
                }
            };
            ports.push(Port {
                name: s.name,
                listener,
                stream,
                readable: false,
                ready: false,
                guest_open: false,
                pending: Vec::new(),
            });
        }
        Ok(Console {
            epoll,
            ports,
            multiport: false,
            device_ready: false,
            control_out: VecDeque::new(),
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn ports(&self) -> usize {
        self.ports.len()
    }

    /// The driver's features: with multiport the ports wait for the control
    /// handshake; without it port 0 is the only one, open from the start.
    pub fn set_features(&mut self, acked: u64) {
        self.multiport = acked & F_MULTIPORT != 0;
        self.device_ready = false;
        self.control_out.clear();
        for (i, p) in self.ports.iter_mut().enumerate() {
            p.ready = !self.multiport && i == 0;
            p.guest_open = p.ready;
        }
    }

    /// Whether the host program of port `id` is connected.
    pub fn host_connected(&self, id: usize) -> bool {
        self.ports.get(id).is_some_and(|p| p.stream.is_some())
    }

    /// Whether the guest has port `id` open.
    pub fn guest_open(&self, id: usize) -> bool {
        self.ports.get(id).is_some_and(|p| p.guest_open)
    }

    /// Control messages owed the guest now.
    pub fn control_owed(&self) -> usize {
        self.control_out.len()
    }

    fn owe(&mut self, c: Control, name: Option<&str>) {
        if self.control_out.len() >= MAX_CONTROL {
            crate::warn_limited(format_args!(
                "console: control message dropped: {MAX_CONTROL} already owed the guest"
            ));
            return;
        }
        let mut m = c.bytes().to_vec();
        if let Some(n) = name {
            m.extend_from_slice(n.as_bytes());
        }
        self.control_out.push_back(m);
    }

    /// Tells a guest that knows the port whether its host program is there.
    fn tell_host_open(&mut self, id: usize) {
        if self.multiport && self.ports[id].ready {
            let value = self.ports[id].stream.is_some() as u16;
            self.owe(
                Control {
                    id: id as u32,
                    event: PORT_OPEN,
                    value,
                },
                None,
            );
        }
    }

    /// Events on the host sockets: new connections, bytes, room, hang-ups.
    pub fn host_events(&mut self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        loop {
            // SAFETY: epoll_wait writes at most 16 events into the array we own.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 16, 0) };
            if n <= 0 {
                break;
            }
            for ev in &events[..n as usize] {
                let (data, bits) = (ev.u64, ev.events);
                let id = (data >> 1) as usize;
                if id >= self.ports.len() {
                    continue;
                }
                if data & 1 == 1 {
                    self.accept(id);
                } else if self.ports[id].stream.is_some() {
                    if bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
                        self.ports[id].readable = true;
                    }
                    if bits & libc::EPOLLOUT as u32 != 0 {
                        self.flush(id);
                    }
                    // Gone with nothing to read, or gone while the guest has the port
                    // closed (what it sent would be thrown away): the port is free.
                    let gone =
                        bits & (libc::EPOLLHUP | libc::EPOLLRDHUP | libc::EPOLLERR) as u32 != 0;
                    if gone && (bits & libc::EPOLLIN as u32 == 0 || !self.ports[id].guest_open) {
                        self.hang_up(id);
                    }
                }
            }
            if (n as usize) < events.len() {
                break;
            }
        }
    }

    /// Takes the host connections waiting on port `id`'s socket: the first while none
    /// is connected, every other closed at once.
    fn accept(&mut self, id: usize) {
        loop {
            let Some(l) = self.ports[id].listener.as_ref() else {
                return;
            };
            // accept4 with SOCK_NONBLOCK: set_nonblocking would be an ioctl, which the
            // profile does not allow.
            // SAFETY: accept4 on our listening socket; no address is asked for.
            let fd = unsafe {
                libc::accept4(
                    l.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    crate::warn_limited(format_args!("console: port {id}: accept: {e}"));
                }
                return;
            }
            // SAFETY: a fresh descriptor nobody else owns.
            let s = unsafe { UnixStream::from_raw_fd(fd) };
            if self.ports[id].stream.is_some() {
                // One host program per port; this one is turned away.
                continue;
            }
            let added = epoll_add(
                self.epoll.as_raw_fd(),
                s.as_raw_fd(),
                STREAM_EVENTS,
                token(id, false),
            );
            if let Err(e) = added {
                crate::warn_limited(format_args!("console: port {id}: {e}"));
                continue;
            }
            let p = &mut self.ports[id];
            p.stream = Some(s);
            p.readable = true;
            p.pending.clear();
            self.tell_host_open(id);
        }
    }

    /// Port `id`'s host program is gone: the guest is told; a listening port waits for
    /// the next.
    fn hang_up(&mut self, id: usize) {
        let p = &mut self.ports[id];
        if p.stream.take().is_none() {
            return;
        }
        p.readable = false;
        p.pending.clear();
        self.tell_host_open(id);
    }

    /// Sends what port `id` holds back for its host; true once nothing is held.
    fn flush(&mut self, id: usize) -> bool {
        let p = &mut self.ports[id];
        if p.pending.is_empty() {
            return true;
        }
        let Some(s) = p.stream.as_ref() else {
            p.pending.clear();
            return true;
        };
        // SAFETY: write reads `pending.len()` bytes of a buffer we own.
        let n = unsafe { libc::write(s.as_raw_fd(), p.pending.as_ptr().cast(), p.pending.len()) };
        if n >= 0 {
            p.pending.drain(..n as usize);
            return p.pending.is_empty();
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return false;
        }
        self.hang_up(id);
        true
    }

    /// One control message from the guest.
    fn guest_control(&mut self, c: Control) {
        let id = c.id as usize;
        match c.event {
            DEVICE_READY if c.value == 1 && !self.device_ready => {
                self.device_ready = true;
                for i in 0..self.ports.len() {
                    self.owe(
                        Control {
                            id: i as u32,
                            event: DEVICE_ADD,
                            value: 0,
                        },
                        None,
                    );
                }
            }
            // A driver that could not set itself up, or says so twice: nothing to do.
            DEVICE_READY => {}
            PORT_READY if id < self.ports.len() && self.device_ready => {
                if c.value != 1 || self.ports[id].ready {
                    return;
                }
                self.ports[id].ready = true;
                match self.ports[id].name.clone() {
                    None => {
                        self.owe(
                            Control {
                                id: 0,
                                event: CONSOLE_PORT,
                                value: 1,
                            },
                            None,
                        );
                        // The console's host end is the VM's console: connected (or
                        // about to be) for as long as the VM runs.
                        self.owe(
                            Control {
                                id: 0,
                                event: PORT_OPEN,
                                value: 1,
                            },
                            None,
                        );
                    }
                    Some(name) => {
                        self.owe(
                            Control {
                                id: c.id,
                                event: PORT_NAME,
                                value: 1,
                            },
                            Some(&name),
                        );
                        if self.ports[id].stream.is_some() {
                            self.tell_host_open(id);
                        }
                    }
                }
            }
            PORT_OPEN if id < self.ports.len() && self.ports[id].ready => {
                let open = c.value != 0;
                self.ports[id].guest_open = open;
                if open {
                    self.ports[id].readable = self.ports[id].stream.is_some();
                }
            }
            _ => {
                crate::warn_limited(format_args!(
                    "console: control message dropped: event {} for port {} (value {})",
                    c.event, c.id, c.value
                ));
                counters::failed();
            }
        }
    }

    /// A chain of the control transmit queue.
    pub fn control_chain<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> u32 {
        let segs = match segments(mem, chain, MAX_QUEUE_SIZE) {
            Ok(s) => s,
            Err(e) => return dropped(format_args!("control: {e:?}")),
        };
        let mut b = [0u8; CONTROL_LEN];
        let readable: Vec<Segment> = segs.iter().copied().filter(|s| !s.writable).collect();
        if read_at(mem, &readable, 0, &mut b).is_err() {
            return dropped(format_args!(
                "a control message shorter than {CONTROL_LEN} bytes"
            ));
        }
        counters::add(counters::Slot::Requests, 1);
        self.guest_control(Control::parse(&b));
        0
    }

    /// A chain of port `id`'s transmit queue: its bytes go to the host program, or
    /// nowhere when none is connected. None: the host socket is full, and the chain
    /// must wait (it was not taken).
    pub fn tx_chain<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        id: usize,
        chain: DescriptorChain<&M>,
    ) -> u32 {
        let segs = match segments(mem, chain, MAX_QUEUE_SIZE) {
            Ok(s) => s,
            Err(e) => return dropped(format_args!("port {id}: {e:?}")),
        };
        let readable: Vec<Segment> = segs.iter().copied().filter(|s| !s.writable).collect();
        let total: u64 = readable.iter().map(|s| s.len as u64).sum();
        if total > MAX_TX_CHAIN as u64 {
            return dropped(format_args!(
                "port {id}: a transmit buffer of {total} bytes (at most {MAX_TX_CHAIN})"
            ));
        }
        counters::add(counters::Slot::Requests, 1);
        counters::add(counters::Slot::BytesFromGuest, total);
        let Some(fd) = self.ports[id].stream.as_ref().map(AsRawFd::as_raw_fd) else {
            // No host program: the bytes go nowhere (as a serial line nobody listens to).
            return 0;
        };
        let sent = match guest_io(mem, &readable, fd, false) {
            Ok(n) => n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                self.hang_up(id);
                return 0;
            }
        };
        if sent < total {
            let mut rest = vec![0u8; (total - sent) as usize];
            if read_at(mem, &readable, sent, &mut rest).is_ok() {
                self.ports[id].pending = rest;
            }
        }
        0
    }

    /// Whether port `id`'s transmit queue may be read now (nothing held back).
    pub fn can_transmit(&self, id: usize) -> bool {
        self.ports.get(id).is_some_and(|p| p.pending.is_empty())
    }

    /// Fills port `id`'s receive buffers from its host program while both last.
    pub fn fill_port(&mut self, id: usize, vring: &VringRwLock, m: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        loop {
            let p = &self.ports[id];
            let Some(fd) = p.stream.as_ref().map(AsRawFd::as_raw_fd) else {
                break;
            };
            if !p.readable || !p.guest_open {
                break;
            }
            let Some(chain) = vring.get_mut().get_queue_mut().pop_descriptor_chain(m) else {
                break;
            };
            let head = chain.head_index();
            let segs = segments(m, chain, MAX_QUEUE_SIZE)
                .ok()
                .filter(|s| s.iter().all(|s| s.writable));
            let len = match segs {
                None => dropped(format_args!(
                    "port {id}: a receive buffer malformed or read-only"
                )),
                Some(segs) => match guest_io(m, &segs, fd, true) {
                    Ok(0) if segs.iter().any(|s| s.len > 0) => {
                        vring.get_mut().get_queue_mut().go_to_previous_position();
                        self.hang_up(id);
                        break;
                    }
                    Ok(n) => {
                        counters::add(counters::Slot::BytesToGuest, n as u64);
                        n as u32
                    }
                    Err(e) => {
                        vring.get_mut().get_queue_mut().go_to_previous_position();
                        if e.kind() == std::io::ErrorKind::WouldBlock {
                            self.ports[id].readable = false;
                        } else {
                            self.hang_up(id);
                        }
                        break;
                    }
                },
            };
            if let Err(e) = vring.add_used(head, len) {
                log::warn!("console: add_used: {e}");
                break;
            }
            used_any = true;
        }
        used_any
    }

    /// Fills the control receive queue with what is owed the guest.
    pub fn fill_control(&mut self, vring: &VringRwLock, m: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        while let Some(msg) = self.control_out.front() {
            let Some(chain) = vring.get_mut().get_queue_mut().pop_descriptor_chain(m) else {
                break;
            };
            let head = chain.head_index();
            let len = match segments(m, chain, MAX_QUEUE_SIZE) {
                Ok(segs) if segs.iter().all(|s| s.writable) => match write_at(m, &segs, 0, msg) {
                    Ok(()) => msg.len() as u32,
                    Err(ShortBuffer) => dropped(format_args!(
                        "a control receive buffer shorter than {} bytes",
                        msg.len()
                    )),
                },
                _ => dropped(format_args!(
                    "a control receive buffer malformed or read-only"
                )),
            };
            if len > 0 {
                self.control_out.pop_front();
            }
            if let Err(e) = vring.add_used(head, len) {
                log::warn!("console: add_used: {e}");
                break;
            }
            used_any = true;
        }
        used_any
    }
}

fn dropped(why: std::fmt::Arguments) -> u32 {
    crate::warn_limited(format_args!("console: buffer dropped: {why}"));
    counters::failed();
    0
}

/// Serves `vring` like [`super::process_vring`] with `serve`, but stops (leaving the
/// next chain in the ring) once `more` says the console cannot take another.
fn drain_queue(
    vring: &VringRwLock,
    m: &GuestMemoryMmap,
    event_idx: bool,
    console: &mut Console,
    more: impl Fn(&Console) -> bool,
    mut serve: impl FnMut(&mut Console, &GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> std::io::Result<()> {
    loop {
        if event_idx {
            let _ = vring.disable_notification();
        }
        let mut used_any = false;
        while more(console) {
            let Some(chain) = vring.get_mut().get_queue_mut().pop_descriptor_chain(m) else {
                break;
            };
            let head = chain.head_index();
            let len = serve(console, m, chain);
            if let Err(e) = vring.add_used(head, len) {
                log::warn!("console: add_used: {e}");
                break;
            }
            used_any = true;
        }
        if used_any {
            super::notify_used(vring, m)?;
        }
        let again = event_idx && vring.enable_notification().unwrap_or(false);
        if !again || !used_any || !more(console) {
            return Ok(());
        }
    }
}

pub struct ConsoleBackend {
    state: QueueState,
    inner: Mutex<Console>,
    /// The config space: cols, rows, max_nr_ports, emerg_wr.
    config: [u8; 12],
    queues: usize,
    host_token: u64,
}

impl ConsoleBackend {
    pub fn new(console: Console) -> Arc<Self> {
        let ports = console.ports();
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&(ports as u32).to_le_bytes());
        let queues = queue_count(ports);
        Arc::new(ConsoleBackend {
            state: QueueState::default(),
            inner: Mutex::new(console),
            config,
            queues,
            // Past the queues and the daemon's exit event.
            host_token: queues as u64 + 1,
        })
    }

    /// The descriptor `serve` must watch for host-socket events, with its token.
    pub fn host_listener(&self) -> (RawFd, EventSet, u64) {
        (self.lock().epoll_fd(), EventSet::IN, self.host_token)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Console> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything the device can do now: guest bytes to the host, host bytes and
    /// control messages to the guest.
    fn run(&self, console: &mut Console, vrings: &[VringRwLock]) -> std::io::Result<()> {
        let Some(mem) = self.state.memory() else {
            return Ok(());
        };
        let guard = mem.memory();
        let m: &GuestMemoryMmap = &guard;
        let event_idx = self.state.event_idx();
        let ready = |q: u16| vrings.get(q as usize).filter(|v| v.get_ref().is_enabled());
        let multiport = console.multiport;
        // The guest's control messages first: one may open a port with host bytes
        // waiting.
        if let Some(v) = ready(CONTROL_TX).filter(|_| multiport) {
            drain_queue(
                v,
                m,
                event_idx,
                console,
                |_| true,
                |c, m, chain| c.control_chain(m, chain),
            )?;
        }
        let ports = if multiport { console.ports() } else { 1 };
        for id in 0..ports {
            let (rx, tx) = port_queues(id);
            if let Some(v) = ready(tx) {
                if console.flush(id) {
                    drain_queue(
                        v,
                        m,
                        event_idx,
                        console,
                        |c| c.can_transmit(id),
                        |c, m, chain| c.tx_chain(m, id, chain),
                    )?;
                }
            }
            if let Some(v) = ready(rx) {
                self.signal(v, event_idx, |v| console.fill_port(id, v, m))?;
            }
        }
        // Last, what the device owes the guest, including what the ports above caused
        // (a host program gone).
        if let Some(v) = ready(CONTROL_RX).filter(|_| multiport) {
            self.signal(v, event_idx, |v| console.fill_control(v, m))?;
        }
        Ok(())
    }

    /// Runs `fill` on a receive queue and signals the guest when the ring says to,
    /// re-arming notifications (EVENT_IDX) so a buffer added meanwhile is not missed.
    fn signal(
        &self,
        vring: &VringRwLock,
        event_idx: bool,
        mut fill: impl FnMut(&VringRwLock) -> bool,
    ) -> std::io::Result<()> {
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let used_any = fill(vring);
            if used_any && vring.needs_notification().unwrap_or(true) {
                vring.signal_used_queue()?;
            }
            let again = event_idx && vring.enable_notification().unwrap_or(false);
            if !again || !used_any {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        super::COMMON_FEATURES | F_MULTIPORT
    }

    fn acked_features(&self, features: u64) {
        self.lock().set_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        super::protocol_features_with_config()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state.set_event_idx(enabled)
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        super::config_bytes(&self.config, offset, size)
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        self.state.update_memory(mem)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> std::io::Result<()> {
        let mut console = self.lock();
        if device_event as u64 == self.host_token {
            console.host_events();
        } else if (device_event as usize) < self.queues {
            if evset != EventSet::IN {
                return Err(std::io::Error::other(format!(
                    "unexpected events {evset:?}"
                )));
            }
        } else {
            return Err(std::io::Error::other(format!(
                "unknown event {device_event}"
            )));
        }
        self.run(&mut console, vrings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_little_endian() {
        let c = Control {
            id: 0x0102_0304,
            event: PORT_NAME,
            value: 0xa0b,
        };
        let b = c.bytes();
        assert_eq!(b, [4, 3, 2, 1, 7, 0, 0xb, 0xa]);
        assert_eq!(Control::parse(&b), c);
    }

    #[test]
    fn port_queues_follow_the_spec() {
        assert_eq!(port_queues(0), (0, 1));
        assert_eq!(port_queues(1), (4, 5));
        assert_eq!(port_queues(3), (8, 9));
        assert_eq!(queue_count(2), 6);
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("org.qemu.guest_agent.0"));
        for bad in ["", ".hidden", "a/b", "a b", "x\n", &"n".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?} accepted");
        }
    }

    fn device(named: usize) -> Console {
        let mut specs = vec![PortSpec {
            name: None,
            host: HostEnd::Connected(UnixStream::pair().unwrap().0),
        }];
        for i in 0..named {
            let dir =
                std::env::temp_dir().join(format!("cellvm-console-{}-{i}", std::process::id()));
            let _ = std::fs::remove_file(&dir);
            let l = UnixListener::bind(&dir).unwrap();
            let _ = std::fs::remove_file(&dir);
            specs.push(PortSpec {
                name: Some(format!("port{i}")),
                host: HostEnd::Listening(l),
            });
        }
        Console::new(specs).unwrap()
    }

    /// The handshake a Linux guest makes, and a hostile guest's repetitions: what the
    /// device owes stays bounded and unknown ports change nothing.
    #[test]
    fn the_control_handshake_is_bounded() {
        let mut c = device(1);
        c.set_features(F_MULTIPORT);
        c.guest_control(Control {
            id: 0,
            event: DEVICE_READY,
            value: 1,
        });
        assert_eq!(c.control_owed(), 2, "DEVICE_ADD for both ports");
        c.guest_control(Control {
            id: 0,
            event: PORT_READY,
            value: 1,
        });
        c.guest_control(Control {
            id: 1,
            event: PORT_READY,
            value: 1,
        });
        // CONSOLE_PORT + PORT_OPEN for the console, PORT_NAME for port 1 (no host yet).
        assert_eq!(c.control_owed(), 5);
        let names: Vec<u16> = c
            .control_out
            .iter()
            .map(|m| u16::from_le_bytes([m[4], m[5]]))
            .collect();
        assert_eq!(
            names,
            [DEVICE_ADD, DEVICE_ADD, CONSOLE_PORT, PORT_OPEN, PORT_NAME]
        );
        assert_eq!(&c.control_out[4][8..], b"port0");
        for _ in 0..10_000 {
            c.guest_control(Control {
                id: 0,
                event: DEVICE_READY,
                value: 1,
            });
            c.guest_control(Control {
                id: 1,
                event: PORT_READY,
                value: 1,
            });
            c.guest_control(Control {
                id: 77,
                event: PORT_OPEN,
                value: 1,
            });
            c.guest_control(Control {
                id: 1,
                event: 999,
                value: 1,
            });
        }
        assert_eq!(c.control_owed(), 5, "repetitions owe nothing more");
        assert!(!c.guest_open(1));
        c.guest_control(Control {
            id: 1,
            event: PORT_OPEN,
            value: 1,
        });
        assert!(c.guest_open(1));
        assert!(!c.host_connected(1));
    }

    #[test]
    fn without_multiport_the_console_is_open_at_once() {
        let mut c = device(0);
        c.set_features(0);
        assert!(c.guest_open(0));
        assert!(c.host_connected(0));
    }

    /// A host program that never reads holds the guest back: once its socket is full
    /// the rest of one transmit buffer waits in the device, the transmit queue is not
    /// read, and nothing more is taken; once it reads, the rest goes through in order.
    #[test]
    fn a_host_that_never_reads_gets_backpressure_and_memory_stays_bounded() {
        use std::io::Read;
        use virtio_queue::{Queue, QueueT};
        use vm_memory::{Bytes, GuestAddress};
        const CHUNK: u32 = 32 << 10;
        const CHAINS: u16 = 128;
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut c = Console::new(vec![
            PortSpec {
                name: None,
                host: HostEnd::Connected(UnixStream::pair().unwrap().0),
            },
            PortSpec {
                name: Some("agent".into()),
                host: HostEnd::Connected(ours),
            },
        ])
        .unwrap();
        c.set_features(F_MULTIPORT);
        let data_at = 0x10_0000u64;
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(
            GuestAddress(0),
            0x10_0000 + CHAINS as usize * CHUNK as usize,
        )])
        .unwrap();
        let mut q = Queue::new(256).unwrap();
        q.set_size(256);
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x4000), Some(0));
        q.set_used_ring_address(Some(0x8000), Some(0));
        q.set_ready(true);
        let mut expect = Vec::new();
        for i in 0..CHAINS {
            let addr = data_at + i as u64 * CHUNK as u64;
            let bytes: Vec<u8> = (0..CHUNK).map(|k| (k as u8) ^ (i as u8)).collect();
            mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            expect.extend_from_slice(&bytes);
            let at = GuestAddress(i as u64 * 16);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(CHUNK, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(0u32, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(i, GuestAddress(0x4004 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(CHAINS, GuestAddress(0x4002)).unwrap();
        let mut taken = 0u32;
        let pump = |c: &mut Console, q: &mut Queue, taken: &mut u32| {
            while c.can_transmit(1) {
                let Some(chain) = q.pop_descriptor_chain(&mem) else {
                    break;
                };
                let head = chain.head_index();
                c.tx_chain(&mem, 1, chain);
                q.add_used(&mem, head, 0).unwrap();
                *taken += 1;
            }
        };
        pump(&mut c, &mut q, &mut taken);
        let held_back = taken;
        assert!(
            held_back < CHAINS as u32,
            "every buffer was taken by a host that never reads"
        );
        assert!(!c.can_transmit(1));
        assert!(c.ports[1].pending.len() <= CHUNK as usize);
        // Nothing more moves until the host reads.
        c.host_events();
        pump(&mut c, &mut q, &mut taken);
        assert_eq!(taken, held_back);
        // The host reads everything; the rest follows in order.
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; CHAINS as usize * CHUNK as usize];
            peer.read_exact(&mut got).unwrap();
            got
        });
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while taken < CHAINS as u32 || !c.can_transmit(1) {
            assert!(
                std::time::Instant::now() < end,
                "stuck after {taken} buffers"
            );
            c.host_events();
            c.flush(1);
            pump(&mut c, &mut q, &mut taken);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            reader.join().unwrap() == expect,
            "the bytes arrived out of order or changed"
        );
        eprintln!("held back after {held_back} of {CHAINS} buffers of {CHUNK} bytes");
    }
}
