//! `cellvm-device vsock`: virtio-vsock (stream sockets between the guest and the host)
//! on host Unix sockets, the scheme Firecracker and Cloud Hypervisor operators know:
//!
//! - The host reaches guest port P by connecting to the VM's socket (`uds=PATH`) and
//!   writing `CONNECT P\n`; once the guest accepts, the backend answers `OK L\n` (L the
//!   host-side port the guest sees) and the stream carries the connection's bytes.
//! - The guest reaches host port P by connecting to CID 2 (the host): the backend
//!   connects to the Unix socket `PATH_P` next to the VM's, and refuses the guest with
//!   a reset when nothing listens there.
//!
//! The backend holds a listening socket and a descriptor of that socket's directory
//! (its working directory, so a guest port only ever names `NAME_P` there); it opens
//! nothing else. Bytes move straight between host sockets and guest buffers with
//! readv/writev. Every header the guest writes is checked: a packet from the wrong CID
//! or of the wrong type is dropped, one for a connection that does not exist is
//! answered with a reset, and a guest that sends past the credit it was given loses
//! the connection. What the backend buffers is bounded: at most [`BUF_ALLOC`] bytes
//! per connection waiting for a slow host peer, [`MAX_CONNS`] connections, and
//! [`MAX_RESETS`] resets owed to the guest.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::counters::{self, Slot};
use super::MAX_QUEUE_SIZE;
use super::{guest_io, read_at, segments, sub_segments, write_at, Memory, QueueState, Segment};

/// The host's context id; the guest's is the device's configuration.
pub const HOST_CID: u64 = 2;
/// The lowest context id a guest may have (0 to 2 are reserved) and the highest
/// (u32::MAX is VMADDR_CID_ANY).
pub const MIN_GUEST_CID: u64 = 3;
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// struct virtio_vsock_hdr (virtio 1.2, 5.10.6), little endian.
pub const HDR_LEN: usize = 44;
/// The most payload one packet carries, either way.
pub const MAX_PKT: usize = 64 * 1024;
/// The receive buffer the backend announces per connection: what it holds for a host
/// peer that reads slower than the guest writes.
pub const BUF_ALLOC: u32 = 128 * 1024;
/// Connections (and host streams still sending their CONNECT line) at once.
pub const MAX_CONNS: usize = 512;
/// Host streams accepted but not yet past their CONNECT line.
const MAX_ACCEPTING: usize = 64;
/// Resets owed to the guest for packets that named no connection.
pub const MAX_RESETS: usize = 256;
/// The longest `CONNECT P\n` line.
const MAX_LINE: usize = 32;
/// Host-side ports for connections the host opens count up from here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will receive no more, will send no more.
pub const SHUTDOWN_RECV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Queue indices and the epoll token of the host sockets (0..=3 are the queues and the
/// exit event of vhost-user-backend's loop).
pub const RX: u16 = 0;
pub const TX: u16 = 1;
pub const EVENT: u16 = 2;
const HOST_TOKEN: u64 = 4;

/// One packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub ty: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            ty: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.ty.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A connection: (guest port, host port).
type Key = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The host asked; the guest has not answered the REQUEST yet.
    Connecting,
    Connected,
}

/// Packets a connection owes the guest, besides data.
const OWE_REQUEST: u8 = 1;
const OWE_RESPONSE: u8 = 2;
const OWE_SHUTDOWN: u8 = 4;
const OWE_CREDIT: u8 = 8;

struct Conn {
    stream: UnixStream,
    state: State,
    owed: u8,
    /// In the ready queue already.
    queued: bool,
    /// The host stream may have bytes (an edge seen, no EAGAIN since).
    readable: bool,
    /// The host peer hung up entirely (no more reads or writes).
    hup: bool,
    /// The host stream said end-of-file: a SHUTDOWN went or goes to the guest.
    host_eof: bool,
    /// The guest will send no more / receive no more (its SHUTDOWN flags).
    guest_done_sending: bool,
    guest_done_receiving: bool,
    /// The host side was shut for writing (after the guest's last byte went out).
    write_shut: bool,
    /// The guest's receive buffer and what it has consumed, from its last header.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest / received from it (wrapping, as the spec's).
    to_guest_cnt: u32,
    from_guest_cnt: u32,
    /// Payload bytes delivered to the host peer, and the count last told the guest.
    fwd_cnt: u32,
    reported_fwd_cnt: u32,
    /// Guest bytes the host peer has not taken yet (at most BUF_ALLOC).
    to_host: VecDeque<u8>,
}

impl Conn {
    fn new(stream: UnixStream, state: State, owed: u8) -> Conn {
        Conn {
            stream,
            state,
            owed,
            queued: false,
            readable: false,
            hup: false,
            host_eof: false,
            guest_done_sending: false,
            guest_done_receiving: false,
            write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            to_guest_cnt: 0,
            from_guest_cnt: 0,
            fwd_cnt: 0,
            reported_fwd_cnt: 0,
            to_host: VecDeque::new(),
        }
    }

    /// Bytes the guest still has room for.
    fn credit(&self) -> u32 {
        let in_flight = self.to_guest_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether data may move to the guest now.
    fn can_send_data(&self) -> bool {
        self.state == State::Connected
            && self.readable
            && !self.host_eof
            && !self.guest_done_receiving
            && self.credit() > 0
    }

    fn has_work(&self) -> bool {
        self.owed != 0 || self.can_send_data()
    }

    /// After bytes went to the host: owes the guest a credit update once the room it
    /// believes it has falls below one packet.
    fn note_forwarded(&mut self) {
        let believed_used = self.from_guest_cnt.wrapping_sub(self.reported_fwd_cnt);
        if self.fwd_cnt != self.reported_fwd_cnt
            && BUF_ALLOC.saturating_sub(believed_used) < MAX_PKT as u32
        {
            self.owed |= OWE_CREDIT;
        }
    }
}

/// What an epoll registration stands for.
enum Watch {
    Listener,
    /// A host stream that has not finished its CONNECT line.
    Accepting(UnixStream),
    Conn(Key),
}

/// Where a guest's connections to the host go: `NAME_PORT` in the backend's working
/// directory.
pub struct HostPorts {
    pub name: String,
}

/// The device's connections and what they owe the guest; driven by the vhost-user
/// backend below and by the fuzz target.
pub struct Vsock {
    guest_cid: u64,
    epoll: OwnedFd,
    listener: Option<UnixListener>,
    listener_ready: bool,
    host_ports: Option<HostPorts>,
    watches: HashMap<RawFd, Watch>,
    accepting: usize,
    conns: HashMap<Key, Conn>,
    ready: VecDeque<Key>,
    resets: VecDeque<Key>,
    next_local_port: u32,
}

fn epoll_add(epoll: RawFd, fd: RawFd, events: u32) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl reads the event we own; both descriptors are ours.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn epoll_mod(epoll: RawFd, fd: RawFd, events: u32) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: as in epoll_add.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const STREAM_EVENTS: u32 =
    (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const ACCEPTING_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}

impl Vsock {
    /// A device for guest `guest_cid`, taking host connections on `listener` (already
    /// non-blocking) and reaching host ports as `host_ports` says (none: the guest's
    /// connection requests are all refused).
    pub fn new(
        guest_cid: u64,
        listener: Option<UnixListener>,
        host_ports: Option<HostPorts>,
    ) -> std::io::Result<Vsock> {
        // SAFETY: epoll_create1 returns a fresh descriptor or -1.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut watches = HashMap::new();
        if let Some(l) = &listener {
            epoll_add(
                epoll.as_raw_fd(),
                l.as_raw_fd(),
                (libc::EPOLLIN | libc::EPOLLET) as u32,
            )?;
            watches.insert(l.as_raw_fd(), Watch::Listener);
        }
        Ok(Vsock {
            guest_cid,
            epoll,
            listener,
            listener_ready: true,
            host_ports,
            watches,
            accepting: 0,
            conns: HashMap::new(),
            ready: VecDeque::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// The descriptor that is readable while host sockets have events.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn schedule(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_work() {
                c.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Ends a connection; with `tell_guest`, owes the guest a reset for it.
    fn reset(&mut self, key: Key, tell_guest: bool) {
        if let Some(c) = self.conns.remove(&key) {
            self.watches.remove(&c.stream.as_raw_fd());
            // Closing the stream takes it out of the epoll set.
        }
        if tell_guest {
            self.owe_reset(key);
        }
    }

    fn owe_reset(&mut self, key: Key) {
        if self.resets.len() < MAX_RESETS {
            self.resets.push_back(key);
        } else {
            crate::warn_limited(format_args!("vsock: too many resets owed; one dropped"));
            counters::failed();
        }
    }

    fn header(&self, key: Key, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.1,
            dst_port: key.0,
            ty: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            ..Header::default()
        }
    }

    // ---- Host side ----

    /// Takes every event on the host sockets: new connections, CONNECT lines, bytes to
    /// read, room to write, hang-ups.
    pub fn host_events(&mut self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: epoll_wait writes at most 64 events into the array we own.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 64, 0) };
            if n <= 0 {
                break;
            }
            for ev in &events[..n as usize] {
                let (fd, bits) = (ev.u64 as RawFd, ev.events);
                match self.watches.get(&fd) {
                    Some(Watch::Listener) => self.listener_ready = true,
                    Some(Watch::Accepting(_)) => self.read_connect_line(fd),
                    Some(Watch::Conn(key)) => {
                        let key = *key;
                        self.stream_event(key, bits);
                    }
                    None => {}
                }
            }
            if (n as usize) < events.len() {
                break;
            }
        }
        self.accept_all();
    }

    fn accept_all(&mut self) {
        while self.listener_ready
            && self.accepting < MAX_ACCEPTING
            && self.conns.len() + self.accepting < MAX_CONNS
        {
            let Some(l) = &self.listener else { return };
            // SAFETY: accept4 on our listening socket; no address is asked for.
            let raw = unsafe {
                libc::accept4(
                    l.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if raw < 0 {
                let e = std::io::Error::last_os_error();
                if !would_block(&e) && e.raw_os_error() != Some(libc::ECONNABORTED) {
                    crate::warn_limited(format_args!("vsock: accept: {e}"));
                }
                if would_block(&e) {
                    self.listener_ready = false;
                }
                return;
            }
            // SAFETY: a fresh descriptor nobody else owns.
            let stream = unsafe { UnixStream::from_raw_fd(raw) };
            if epoll_add(self.epoll.as_raw_fd(), raw, ACCEPTING_EVENTS).is_err() {
                continue;
            }
            self.watches.insert(raw, Watch::Accepting(stream));
            self.accepting += 1;
        }
    }

    /// Reads `CONNECT P\n` from a newly accepted host stream (never past the newline:
    /// what follows is the connection's first bytes).
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(Watch::Accepting(stream)) = self.watches.get(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_LINE];
        // SAFETY: recv with MSG_PEEK writes at most MAX_LINE bytes into buf.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                MAX_LINE,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 && would_block(&std::io::Error::last_os_error()) {
            return;
        }
        let n = n.max(0) as usize;
        let line_end = buf[..n].iter().position(|&b| b == b'\n');
        if line_end.is_none() && n > 0 && n < MAX_LINE {
            return; // the rest of the line is still on its way
        }
        let Some(Watch::Accepting(mut stream)) = self.watches.remove(&fd) else {
            return;
        };
        self.accepting -= 1;
        let port = line_end.and_then(|end| {
            let mut line = vec![0u8; end + 1];
            stream.read_exact(&mut line).ok()?;
            std::str::from_utf8(&line[..end])
                .ok()?
                .trim_end_matches('\r')
                .strip_prefix("CONNECT ")?
                .parse::<u32>()
                .ok()
        });
        let Some(port) = port else {
            if n > 0 {
                send_line(&stream, b"ERR expected CONNECT <port>\n");
            }
            return;
        };
        if self.conns.len() >= MAX_CONNS {
            send_line(&stream, b"ERR too many connections\n");
            return;
        }
        let Some(local) = self.free_local_port(port) else {
            send_line(&stream, b"ERR no free port\n");
            return;
        };
        if epoll_mod(self.epoll.as_raw_fd(), fd, STREAM_EVENTS).is_err() {
            return;
        }
        let key = (port, local);
        self.watches.insert(fd, Watch::Conn(key));
        self.conns
            .insert(key, Conn::new(stream, State::Connecting, OWE_REQUEST));
        self.schedule(key);
    }

    fn free_local_port(&mut self, guest_port: u32) -> Option<u32> {
        for _ in 0..MAX_CONNS + 1 {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(guest_port, p)) {
                return Some(p);
            }
        }
        None
    }

    fn stream_event(&mut self, key: Key, bits: u32) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let hangup = bits & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
        if c.state == State::Connecting && (hangup || bits & libc::EPOLLRDHUP as u32 != 0) {
            // The host gave up before the guest answered.
            return self.reset(key, true);
        }
        if hangup && (!c.to_host.is_empty() || c.credit() == 0) {
            // The host peer is gone with guest bytes it will never read, or with bytes
            // of its own the guest has no room for: nothing more can be delivered.
            return self.reset(key, true);
        }
        if bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
            c.readable = true;
        }
        if hangup {
            c.hup = true;
        }
        if bits & libc::EPOLLOUT as u32 != 0 && !c.to_host.is_empty() {
            self.flush(key);
        }
        self.schedule(key);
    }

    /// Writes what waits for the host peer; ends the connection if the peer is gone.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (a, b) = c.to_host.as_slices();
            let iov = [
                libc::iovec {
                    iov_base: a.as_ptr() as *mut libc::c_void,
                    iov_len: a.len(),
                },
                libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                },
            ];
            // SAFETY: the iovecs point into the deque we hold; the kernel only reads them.
            let n = unsafe { libc::writev(c.stream.as_raw_fd(), iov.as_ptr(), 2) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if would_block(&e) {
                    break;
                }
                return self.reset(key, true);
            }
            c.to_host.drain(..n as usize);
            c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
            counters::add(Slot::BytesFromGuest, n as u64);
        }
        c.note_forwarded();
        self.after_guest_bytes(key);
    }

    /// Once the guest's last byte is with the host peer: shuts the host side for
    /// writing (the guest said it sends no more) or ends the connection (it said it is
    /// done both ways).
    fn after_guest_bytes(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if !c.to_host.is_empty() {
            return self.schedule(key);
        }
        if c.guest_done_sending && c.guest_done_receiving {
            return self.reset(key, true);
        }
        if c.guest_done_sending && !c.write_shut {
            c.write_shut = true;
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        self.schedule(key);
    }

    /// The guest asks for host port `port`: a connection to `NAME_port`.
    fn connect_host(&self, port: u32) -> std::io::Result<UnixStream> {
        let ports = self
            .host_ports
            .as_ref()
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ECONNREFUSED))?;
        let path = format!("{}_{port}", ports.name);
        // SAFETY: socket() returns a fresh descriptor or -1.
        let raw = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let stream = unsafe { UnixStream::from_raw_fd(raw) };
        // SAFETY: sockaddr_un is plain old data; zero is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        if path.len() >= addr.sun_path.len() {
            return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        for (d, s) in addr.sun_path.iter_mut().zip(path.bytes()) {
            *d = s as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + path.len() + 1) as libc::socklen_t;
        // SAFETY: connect reads `len` bytes of the address we own.
        let rc = unsafe {
            libc::connect(
                raw,
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }

    // ---- Guest side: transmit ----

    /// One packet the guest sent; returns the used length (always 0: the device writes
    /// nothing into a transmit chain).
    pub fn tx_chain<M: GuestMemoryBackend>(&mut self, mem: &M, chain: DescriptorChain<&M>) -> u32 {
        let segs = match segments(mem, chain, MAX_QUEUE_SIZE) {
            Ok(s) => s,
            Err(e) => return dropped(format_args!("a malformed chain: {e:?}")),
        };
        if segs.iter().any(|s| s.writable) {
            return dropped(format_args!("a device-writable buffer in a transmit chain"));
        }
        let total: u64 = segs.iter().map(|s| s.len as u64).sum();
        let mut raw = [0u8; HDR_LEN];
        if read_at(mem, &segs, 0, &mut raw).is_err() {
            return dropped(format_args!("a packet shorter than its header"));
        }
        let h = Header::parse(&raw);
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            return dropped(format_args!(
                "a packet from CID {} to CID {} (the guest is {}, the host {HOST_CID})",
                h.src_cid, h.dst_cid, self.guest_cid
            ));
        }
        let key = (h.src_port, h.dst_port);
        if h.len as usize > MAX_PKT || h.len as u64 > total - HDR_LEN as u64 {
            dropped(format_args!(
                "a packet claiming {} bytes in a {total}-byte chain",
                h.len
            ));
            if h.op != OP_RST {
                self.reset(key, true);
            }
            return 0;
        }
        counters::add(Slot::Requests, 1);
        if h.ty != TYPE_STREAM {
            if h.op != OP_RST {
                self.reset(key, true);
            }
            return 0;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => self.guest_request(key, &h),
            OP_RESPONSE => self.guest_response(key),
            OP_RST => self.reset(key, false),
            OP_SHUTDOWN => self.guest_shutdown(key, h.flags),
            OP_RW => self.guest_data(mem, &segs, key, h.len),
            OP_CREDIT_UPDATE => {
                if !self.conns.contains_key(&key) {
                    self.owe_reset(key);
                }
            }
            OP_CREDIT_REQUEST => match self.conns.get_mut(&key) {
                Some(c) => c.owed |= OWE_CREDIT,
                None => self.owe_reset(key),
            },
            _ => self.reset(key, true),
        }
        self.schedule(key);
        0
    }

    fn guest_request(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() + self.accepting >= MAX_CONNS {
            // A second request for a live connection, or no room: refused.
            return self.owe_reset(key);
        }
        match self.connect_host(key.1) {
            Ok(stream) => {
                let fd = stream.as_raw_fd();
                if epoll_add(self.epoll.as_raw_fd(), fd, STREAM_EVENTS).is_err() {
                    return self.owe_reset(key);
                }
                let mut c = Conn::new(stream, State::Connected, OWE_RESPONSE);
                // The request's header says what the guest can take.
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                self.watches.insert(fd, Watch::Conn(key));
                self.conns.insert(key, c);
            }
            Err(e) => {
                log::debug!("vsock: guest connection to host port {}: {e}", key.1);
                self.owe_reset(key);
            }
        }
    }

    fn guest_response(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return self.owe_reset(key);
        };
        if c.state != State::Connecting {
            return self.reset(key, true);
        }
        c.state = State::Connected;
        let line = format!("OK {}\n", key.1);
        // A fresh stream's buffer takes a dozen bytes; anything else is a peer gone.
        if !send_line(&c.stream, line.as_bytes()) {
            self.reset(key, true);
        }
    }

    fn guest_shutdown(&mut self, key: Key, flags: u32) {
        let Some(c) = self.conns.get_mut(&key) else {
            return self.owe_reset(key);
        };
        c.guest_done_receiving |= flags & SHUTDOWN_RECV != 0;
        c.guest_done_sending |= flags & SHUTDOWN_SEND != 0;
        self.after_guest_bytes(key);
    }

    fn guest_data<M: GuestMemoryBackend>(&mut self, mem: &M, segs: &[Segment], key: Key, len: u32) {
        let Some(c) = self.conns.get_mut(&key) else {
            return self.owe_reset(key);
        };
        if c.state != State::Connected || c.guest_done_sending {
            return self.reset(key, true);
        }
        if len == 0 {
            return;
        }
        let payload = sub_segments(segs, HDR_LEN as u64, len as u64);
        // Straight from guest memory when nothing waits before these bytes.
        let mut sent = 0usize;
        if c.to_host.is_empty() {
            match guest_io(mem, &payload, c.stream.as_raw_fd(), false) {
                Ok(n) => sent = n,
                Err(e) if would_block(&e) => {}
                Err(_) => return self.reset(key, true),
            }
        }
        let rest = len as usize - sent;
        c.from_guest_cnt = c.from_guest_cnt.wrapping_add(len);
        if rest > 0 {
            if c.to_host.len() + rest > BUF_ALLOC as usize {
                // More than the credit the guest was given.
                dropped(format_args!("a guest writing past its credit"));
                return self.reset(key, true);
            }
            let mut bytes = vec![0u8; rest];
            if read_at(mem, &payload, sent as u64, &mut bytes).is_err() {
                return self.reset(key, true);
            }
            c.to_host.extend(bytes);
        }
        c.fwd_cnt = c.fwd_cnt.wrapping_add(sent as u32);
        counters::add(Slot::BytesFromGuest, sent as u64);
        c.note_forwarded();
        self.after_guest_bytes(key);
    }

    // ---- Guest side: receive ----

    /// Whether a packet waits for a receive buffer.
    pub fn has_work(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// Writes the next packet owed to the guest into a receive chain's (checked,
    /// writable) segments; returns its length, or None when nothing was owed after all.
    fn next_packet<M: GuestMemoryBackend>(&mut self, mem: &M, segs: &[Segment]) -> Option<u32> {
        if let Some(key) = self.resets.pop_front() {
            let h = self.header(key, OP_RST);
            return write_at(mem, segs, 0, &h.bytes())
                .ok()
                .map(|_| HDR_LEN as u32);
        }
        let room = segs.iter().map(|s| s.len as u64).sum::<u64>() - HDR_LEN as u64;
        while let Some(key) = self.ready.pop_front() {
            let mut h = self.header(key, 0);
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            h.fwd_cnt = c.fwd_cnt;
            if c.owed & OWE_REQUEST != 0 {
                c.owed &= !OWE_REQUEST;
                h.op = OP_REQUEST;
            } else if c.owed & OWE_RESPONSE != 0 {
                c.owed &= !OWE_RESPONSE;
                h.op = OP_RESPONSE;
            } else if c.can_send_data() && room > 0 {
                let want = room.min(c.credit() as u64).min(MAX_PKT as u64);
                let window = sub_segments(segs, HDR_LEN as u64, want);
                match guest_io(mem, &window, c.stream.as_raw_fd(), true) {
                    Ok(0) => {
                        c.readable = false;
                        c.host_eof = true;
                        c.owed |= OWE_SHUTDOWN;
                    }
                    Ok(n) => {
                        h.op = OP_RW;
                        h.len = n as u32;
                        c.to_guest_cnt = c.to_guest_cnt.wrapping_add(n as u32);
                        counters::add(Slot::BytesToGuest, n as u64);
                    }
                    Err(e) if would_block(&e) => c.readable = false,
                    Err(_) => {
                        self.reset(key, true);
                        continue;
                    }
                }
            }
            if h.op == 0 && c.owed & OWE_SHUTDOWN != 0 {
                c.owed &= !OWE_SHUTDOWN;
                h.op = OP_SHUTDOWN;
                h.flags = SHUTDOWN_SEND | if c.hup { SHUTDOWN_RECV } else { 0 };
            }
            if h.op == 0 && c.owed & OWE_CREDIT != 0 {
                h.op = OP_CREDIT_UPDATE;
            }
            if h.op == 0 {
                continue;
            }
            // Every header carries the credit: nothing more is owed for it.
            c.owed &= !OWE_CREDIT;
            c.reported_fwd_cnt = c.fwd_cnt;
            self.schedule(key);
            if write_at(mem, segs, 0, &h.bytes()).is_err() {
                return Some(0);
            }
            return Some(HDR_LEN as u32 + h.len);
        }
        None
    }

    /// Fills the guest's receive buffers with what is owed it, until either runs out;
    /// signals the guest when the ring says to.
    pub fn fill_rx(
        &mut self,
        vring: &VringRwLock,
        mem: &Memory,
        event_idx: bool,
    ) -> std::io::Result<()> {
        let guard = mem.memory();
        let m: &GuestMemoryMmap = &guard;
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let (mut used_any, mut starved) = (false, false);
            while self.has_work() {
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(m);
                let Some(chain) = chain else {
                    starved = true;
                    break;
                };
                let head = chain.head_index();
                let segs = segments(m, chain, MAX_QUEUE_SIZE).ok().filter(|segs| {
                    segs.iter().all(|s| s.writable)
                        && segs.iter().map(|s| s.len as u64).sum::<u64>() >= HDR_LEN as u64
                });
                let len = match segs {
                    Some(segs) => match self.next_packet(m, &segs) {
                        Some(len) => len,
                        None => {
                            vring.get_mut().get_queue_mut().go_to_previous_position();
                            break;
                        }
                    },
                    None => {
                        dropped(format_args!(
                            "a receive buffer malformed, read-only or shorter than the header"
                        ));
                        0
                    }
                };
                if let Err(e) = vring.add_used(head, len) {
                    log::warn!("vsock: add_used: {e}");
                    break;
                }
                used_any = true;
            }
            if used_any {
                super::notify_used(vring, m)?;
            }
            // Out of buffers with packets waiting: ask for a kick when the guest adds
            // more (and look again, in case it already has). A pass that took no chain
            // although the ring says there are some means a broken available index.
            let more = event_idx && vring.enable_notification().unwrap_or(false);
            if !starved || !more || !used_any {
                return Ok(());
            }
        }
    }

    /// For the fuzz target: a host connection to guest port `port` as if its CONNECT
    /// line had just been read.
    pub fn adopt_host_stream(&mut self, stream: UnixStream, port: u32) -> std::io::Result<()> {
        stream.set_nonblocking(true)?;
        let fd = stream.as_raw_fd();
        epoll_add(self.epoll.as_raw_fd(), fd, STREAM_EVENTS)?;
        let local = self.free_local_port(port).unwrap_or(FIRST_LOCAL_PORT);
        self.watches.insert(fd, Watch::Conn((port, local)));
        self.conns.insert(
            (port, local),
            Conn::new(stream, State::Connecting, OWE_REQUEST),
        );
        self.schedule((port, local));
        Ok(())
    }
}

/// Writes a short reply line to a fresh host stream (whose buffer always has room for
/// it); false if the peer is gone. write(2), as every other byte to a host socket.
fn send_line(stream: &UnixStream, line: &[u8]) -> bool {
    // SAFETY: write reads `line.len()` bytes of a slice we hold.
    let n = unsafe { libc::write(stream.as_raw_fd(), line.as_ptr().cast(), line.len()) };
    n == line.len() as isize
}

fn dropped(why: std::fmt::Arguments) -> u32 {
    crate::warn_limited(format_args!("vsock: packet dropped: {why}"));
    counters::failed();
    0
}

pub struct VsockBackend {
    cid: u64,
    state: QueueState,
    inner: Mutex<Vsock>,
}

impl VsockBackend {
    pub fn new(vsock: Vsock, cid: u64) -> Arc<Self> {
        Arc::new(VsockBackend {
            cid,
            state: QueueState::default(),
            inner: Mutex::new(vsock),
        })
    }

    /// The descriptor `serve` must watch for host-socket events, with its token.
    pub fn host_listener(&self) -> (RawFd, EventSet, u64) {
        let fd = self.lock().epoll_fd();
        (fd, EventSet::IN, HOST_TOKEN)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vsock> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn receive(&self, vsock: &mut Vsock, vrings: &[VringRwLock]) -> std::io::Result<()> {
        let (Some(vring), Some(mem)) = (vrings.get(RX as usize), self.state.memory()) else {
            return Ok(());
        };
        if !vring.get_ref().is_enabled() {
            return Ok(());
        }
        vsock.fill_rx(vring, &mem, self.state.event_idx())
    }
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        3
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        super::COMMON_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        super::protocol_features_with_config()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state.set_event_idx(enabled)
    }

    /// virtio_vsock_config: the guest's CID.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        super::config_bytes(&self.cid.to_le_bytes(), offset, size)
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
        let mut vsock = self.lock();
        match device_event {
            TX => {
                self.state
                    .handle_kick(TX, evset, vrings, |m: &GuestMemoryMmap, chain| {
                        vsock.tx_chain(m, chain)
                    })?;
            }
            // New receive buffers: fill them below.
            RX => {}
            // The event queue carries only transport resets, which this device never
            // sends; its buffers stay with the device.
            EVENT => return Ok(()),
            t if t as u64 == HOST_TOKEN => vsock.host_events(),
            other => return Err(std::io::Error::other(format!("unknown event {other}"))),
        }
        self.receive(&mut vsock, vrings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 80,
            len: 5,
            ty: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        };
        let b = h.bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1234u32.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::parse(&b), h);
    }

    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

    const RAM: usize = 2 << 20;

    /// A guest's side of the device: RAM with a transmit and a receive queue of 256 at
    /// fixed places, packets laid out one per 4 KiB.
    struct Guest {
        mem: Memory,
    }

    impl Guest {
        fn new() -> Guest {
            let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
            Guest {
                mem: GuestMemoryAtomic::new(ram),
            }
        }

        fn packet(src_port: u32, dst_port: u32, op: u16, payload: &[u8]) -> Vec<u8> {
            let h = Header {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: payload.len() as u32,
                ty: TYPE_STREAM,
                op,
                buf_alloc: 64 << 10,
                ..Header::default()
            };
            let mut p = h.bytes().to_vec();
            p.extend_from_slice(payload);
            p
        }

        /// Hands each packet to the device as the transmit worker does.
        fn send(&self, v: &mut Vsock, packets: &[Vec<u8>]) {
            let m = self.mem.memory();
            for batch in packets.chunks(256) {
                let mut q = virtio_queue::Queue::new(256).unwrap();
                q.set_desc_table_address(Some(0), Some(0));
                q.set_avail_ring_address(Some(0x1000), Some(0));
                q.set_used_ring_address(Some(0x2000), Some(0));
                q.set_ready(true);
                for (i, p) in batch.iter().enumerate() {
                    let at = 0x10_0000 + 0x1000 * i as u64;
                    m.write_slice(p, GuestAddress(at)).unwrap();
                    let desc = [
                        at.to_le_bytes().as_slice(),
                        &(p.len() as u32).to_le_bytes(),
                        &[0; 4],
                    ]
                    .concat();
                    m.write_slice(&desc, GuestAddress(16 * i as u64)).unwrap();
                    m.write_obj(i as u16, GuestAddress(0x1004 + 2 * i as u64))
                        .unwrap();
                }
                m.write_obj(batch.len() as u16, GuestAddress(0x1002))
                    .unwrap();
                while let Some(chain) = q.pop_descriptor_chain(&*m) {
                    v.tx_chain(&*m, chain);
                }
            }
        }

        /// Offers 16 receive buffers of 4 KiB; the packets the device put in them.
        fn receive(&self, v: &mut Vsock) -> Vec<(Header, Vec<u8>)> {
            let m = self.mem.memory();
            let rx = VringRwLock::new(self.mem.clone(), 256).unwrap();
            rx.set_queue_size(256);
            rx.set_queue_info(0x4000, 0x6000, 0x8000).unwrap();
            rx.set_queue_ready(true);
            rx.set_enabled(true);
            for i in 0..16u64 {
                let at = 0x2_0000 + 0x1000 * i;
                let desc = [
                    at.to_le_bytes().as_slice(),
                    &4096u32.to_le_bytes(),
                    &2u16.to_le_bytes(),
                    &[0; 2],
                ]
                .concat();
                m.write_slice(&desc, GuestAddress(0x4000 + 16 * i)).unwrap();
                m.write_obj(i as u16, GuestAddress(0x6004 + 2 * i)).unwrap();
            }
            m.write_obj(16u16, GuestAddress(0x6002)).unwrap();
            m.write_obj(0u16, GuestAddress(0x8002)).unwrap();
            v.fill_rx(&rx, &self.mem, false).unwrap();
            let used: u16 = m.read_obj(GuestAddress(0x8002)).unwrap();
            (0..used as u64)
                .map(|i| {
                    let id: u32 = m.read_obj(GuestAddress(0x8004 + 8 * i)).unwrap();
                    let len: u32 = m.read_obj(GuestAddress(0x8008 + 8 * i)).unwrap();
                    let mut b = vec![0u8; len as usize];
                    m.read_slice(&mut b, GuestAddress(0x2_0000 + 0x1000 * id as u64))
                        .unwrap();
                    let h = Header::parse(b[..HDR_LEN].try_into().unwrap());
                    (h, b[HDR_LEN..].to_vec())
                })
                .collect()
        }
    }

    /// A guest that opens thousands of connections and never uses them holds at most
    /// MAX_CONNS of them and MAX_RESETS owed resets; a connection made before the flood
    /// still carries bytes.
    #[test]
    fn thousands_of_half_open_streams_cost_bounded_state_and_stop_no_other_stream() {
        let dir = std::env::temp_dir().join(format!("cellvm-vsock-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("v_5000")).unwrap();
        let accepted = std::thread::spawn(move || {
            let mut held = Vec::new();
            listener.set_nonblocking(true).unwrap();
            let mut idle = 0;
            while idle < 200 {
                match listener.accept() {
                    Ok((s, _)) => {
                        held.push(s);
                        idle = 0;
                    }
                    Err(_) => {
                        idle += 1;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
            held
        });
        let name = dir.join("v").to_string_lossy().into_owned();
        let mut v = Vsock::new(3, None, Some(HostPorts { name })).unwrap();
        let guest = Guest::new();
        // The first connection, answered before the flood.
        guest.send(&mut v, &[Guest::packet(1, 5000, OP_REQUEST, &[])]);
        let first = guest.receive(&mut v);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].0.op, first[0].0.dst_port), (OP_RESPONSE, 1));
        let flood: Vec<Vec<u8>> = (2..3000)
            .map(|p| Guest::packet(p, 5000, OP_REQUEST, &[]))
            .collect();
        guest.send(&mut v, &flood);
        assert_eq!(
            v.connections(),
            MAX_CONNS,
            "connections past the bound were refused"
        );
        assert!(
            v.resets.len() <= MAX_RESETS,
            "{} resets owed",
            v.resets.len()
        );
        let mut streams = accepted.join().unwrap();
        assert_eq!(streams.len(), MAX_CONNS);
        // The host end of the first connection writes; the guest gets its bytes even
        // though thousands of packets are owed before them.
        streams[0].write_all(b"still here").unwrap();
        v.host_events();
        let mut got = None;
        for _ in 0..200 {
            let packets = guest.receive(&mut v);
            if let Some((_, data)) = packets
                .iter()
                .find(|(h, _)| h.op == OP_RW && h.dst_port == 1)
            {
                got = Some(data.clone());
                break;
            }
            if packets.is_empty() {
                break;
            }
        }
        assert_eq!(got.as_deref(), Some(&b"still here"[..]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A guest that never returns credit gets no more bytes than its buffer; one that
    /// sends past the credit it was given loses the connection.
    #[test]
    fn credit_is_enforced_both_ways() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        let mut v = Vsock::new(3, None, None).unwrap();
        v.adopt_host_stream(ours, 80).unwrap();
        let guest = Guest::new();
        let request = guest.receive(&mut v);
        assert_eq!(request[0].0.op, OP_REQUEST);
        let local = request[0].0.src_port;
        // The guest accepts with an 8 KiB buffer and never consumes anything.
        let mut response = Guest::packet(80, local, OP_RESPONSE, &[]);
        response[36..40].copy_from_slice(&8192u32.to_le_bytes());
        guest.send(&mut v, &[response]);
        host.write_all(&[7u8; 64 << 10]).unwrap();
        v.host_events();
        let mut delivered = 0;
        for _ in 0..20 {
            let packets = guest.receive(&mut v);
            delivered += packets
                .iter()
                .filter(|(h, _)| h.op == OP_RW)
                .map(|(_, d)| d.len())
                .sum::<usize>();
        }
        assert_eq!(delivered, 8192, "exactly the guest's buffer, no more");
        // Past the device's own credit (BUF_ALLOC, the host end not reading): reset.
        host.set_nonblocking(true).unwrap();
        let big = vec![1u8; 4000];
        let writes: Vec<Vec<u8>> = (0..600)
            .map(|_| Guest::packet(80, local, OP_RW, &big))
            .collect();
        guest.send(&mut v, &writes);
        assert_eq!(
            v.connections(),
            0,
            "a guest writing past its credit loses the connection"
        );
        let packets = guest.receive(&mut v);
        assert!(
            packets
                .iter()
                .any(|(h, _)| h.op == OP_RST && h.dst_port == 80),
            "and is told"
        );
    }

    #[test]
    fn credit_is_never_more_than_the_guest_has_room_for() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, State::Connected, 0);
        c.peer_buf_alloc = 1000;
        c.to_guest_cnt = 600;
        c.peer_fwd_cnt = 100;
        assert_eq!(c.credit(), 500);
        // A guest claiming to have consumed more than it was sent gets no extra room
        // beyond its own buffer; one with less room than in flight gets none.
        c.peer_fwd_cnt = 700;
        assert!(c.credit() <= 1000);
        c.peer_fwd_cnt = 0;
        c.to_guest_cnt = 5000;
        assert_eq!(c.credit(), 0);
        // Wrapping counters.
        c.to_guest_cnt = 10;
        c.peer_fwd_cnt = u32::MAX - 9;
        assert_eq!(c.credit(), 980);
    }
}
