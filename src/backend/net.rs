//! `cellvm-device net`: virtio-net on a tap device.
//!
//! Frames move straight between the tap and guest buffers with readv/writev on the
//! descriptors' own memory (no copies). The tap carries the 12-byte virtio-net header
//! (IFF_VNET_HDR), so checksum and segmentation offloads pass through untouched: what
//! the guest asks the host to finish (HOST_TSO, CSUM), the kernel finishes; what the
//! guest accepts unfinished (GUEST_CSUM, GUEST_TSO), the tap is told it may deliver.
//! With mergeable receive buffers (MRG_RXBUF) one frame, up to a whole 64 KiB GSO
//! segment, is read into as many of the guest's receive chains as it needs.
//!
//! The backend holds only the tap's descriptor: it opens no device, has no network of
//! its own, and cannot reconfigure the interface beyond its offload flags.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::counters::{self, Slot};
use super::{io_vectors, segments, Memory, QueueState, MAX_QUEUE_SIZE};

/// virtio-net feature bits (virtio 1.2, 5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_MQ: u64 = 1 << 22;

/// The virtio 1.x header (with num_buffers) in front of every frame.
pub const HDR_LEN: usize = 12;
/// The largest frame a guest may send: a 64 KiB GSO packet with its Ethernet header.
pub const MAX_FRAME: usize = 65536 + 14;
/// Room a mergeable receive gathers beyond MAX_FRAME: an 802.1Q tag.
const VLAN_TAG: usize = 4;
const LINK_UP: u16 = 1;

/// Queue indices and the epoll token of the tap (0..=2 are the queues and the exit
/// event of vhost-user-backend's loop).
pub const RX: u16 = 0;
pub const TX: u16 = 1;
/// The control queue, as the first pair's thread sees it (after its two queues).
const CTRL: u16 = 2;

// <linux/if_tun.h>
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// A tap opened with the virtio-net header, non-blocking.
pub struct Tap {
    fd: OwnedFd,
}

impl Tap {
    /// Opens (or creates) tap `name` in this process's network namespace. Needs
    /// CAP_NET_ADMIN unless the tap belongs to the caller.
    pub fn open(name: &str) -> std::io::Result<Tap> {
        Tap::open_flags(name, 0)
    }

    fn open_flags(name: &str, extra: i16) -> std::io::Result<Tap> {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("tap name {name:?}: 1 to 15 bytes, no '/' or space"),
            ));
        }
        // SAFETY: open of a constant, NUL-terminated path.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_iff(fd.as_raw_fd(), name, extra)?;
        Tap::from_fd(fd)
    }

    /// Opens `queues` queues of multi-queue tap `name` (IFF_MULTI_QUEUE; one queue: a
    /// plain tap, as `open`).
    pub fn open_queues(name: &str, queues: usize) -> std::io::Result<Vec<Tap>> {
        if queues <= 1 {
            return Ok(vec![Tap::open(name)?]);
        }
        (0..queues)
            .map(|_| Tap::open_flags(name, IFF_MULTI_QUEUE))
            .collect()
    }

    /// Enables or disables this queue of a multi-queue tap (TUNSETQUEUE): a disabled
    /// queue is steered no frames.
    pub fn set_queue_enabled(&self, enabled: bool) -> std::io::Result<()> {
        let req = IfReq {
            name: [0; 16],
            flags: if enabled {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads the ifreq we own.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETQUEUE, &req) } < 0 {
            let e = std::io::Error::last_os_error();
            // Attaching an attached queue, or detaching a detached one, is no change.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Takes a tap descriptor someone else opened and attached (the jailer): checks it
    /// is a tap with the virtio-net header, makes it non-blocking and sets the header
    /// size.
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Tap> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF fills an ifreq we own.
        if unsafe { libc::ioctl(raw, TUNGETIFF, &mut req) } < 0 {
            return Err(std::io::Error::other(format!(
                "not an attached tap ({})",
                std::io::Error::last_os_error()
            )));
        }
        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & want != want {
            return Err(std::io::Error::other(format!(
                "tap flags {:#x}: need IFF_TAP, IFF_NO_PI and IFF_VNET_HDR",
                req.flags
            )));
        }
        let hdr = HDR_LEN as libc::c_int;
        // SAFETY: fcntl and ioctls on a descriptor we own, with in-memory arguments.
        unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            if fl < 0 || libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(raw, TUNSETVNETHDRSZ, &hdr) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let tap = Tap { fd };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The descriptor, to hand to another process.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Tells the tap which unfinished packets the guest accepts (from its acked
    /// GUEST_* features).
    pub fn set_offload(&self, guest_features: u64) -> std::io::Result<()> {
        let flags = offload_flags(guest_features);
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The tap's TUN_F_* offloads for the GUEST_* features a driver acked: the unfinished
/// packets the tap may hand it.
fn offload_flags(guest_features: u64) -> u32 {
    let mut flags = 0;
    if guest_features & F_GUEST_CSUM != 0 {
        flags |= TUN_F_CSUM;
        if guest_features & F_GUEST_TSO4 != 0 {
            flags |= TUN_F_TSO4;
        }
        if guest_features & F_GUEST_TSO6 != 0 {
            flags |= TUN_F_TSO6;
        }
    }
    flags
}

fn set_iff(fd: RawFd, name: &str, extra: i16) -> std::io::Result<()> {
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads the ifreq we own.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &req) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("tap {name}: {e}")));
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`: a unicast address.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "MAC {s:?}: expected six hex bytes like 02:00:00:00:00:01"
        ));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| format!("MAC {s:?}: {p:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(format!("MAC {s:?}: not a unicast address"));
    }
    Ok(mac)
}

/// A random, locally administered unicast address (02:xx:xx:xx:xx:xx).
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most 6 bytes into mac.
    unsafe { libc::getrandom(mac.as_mut_ptr().cast(), 6, 0) };
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// What filling one receive chain came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Rx {
    /// A frame (with its header) of this many bytes went into the chain.
    Filled(u32),
    /// The chain was unusable (a frame may have been dropped); return it empty.
    Bad,
    /// Nothing to read: put the chain back.
    Empty,
}

/// Reads one frame from `fd` into a receive chain. The chain must be all writable and
/// hold at least the header; a frame larger than the chain is dropped by the tap.
pub fn rx_chain<M: GuestMemoryBackend>(mem: &M, chain: DescriptorChain<&M>, fd: RawFd) -> Rx {
    let segs = match segments(mem, chain, MAX_QUEUE_SIZE) {
        Ok(s) => s,
        Err(e) => {
            crate::warn_limited(format_args!("net: receive buffer dropped: {e:?}"));
            return Rx::Bad;
        }
    };
    let room: u64 = segs.iter().map(|s| s.len as u64).sum();
    if segs.iter().any(|s| !s.writable) || room < HDR_LEN as u64 {
        crate::warn_limited(format_args!(
            "net: receive buffer dropped: read-only part or shorter than the header"
        ));
        return Rx::Bad;
    }
    let Ok((iov, guards)) = io_vectors(mem, &segs) else {
        return Rx::Bad;
    };
    let iovcnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    // SAFETY: every iovec points into guest RAM checked by io_vectors and kept mapped by
    // `guards`; the kernel writes at most their lengths.
    let n = unsafe { libc::readv(fd, iov.as_ptr(), iovcnt) };
    drop(guards);
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Rx::Empty,
            // A frame too big for the chain: the tap dropped it.
            Some(libc::EFAULT) | Some(libc::EINVAL) => {
                crate::warn_limited(format_args!(
                    "net: frame larger than the receive buffer dropped"
                ));
                Rx::Bad
            }
            _ => {
                crate::warn_limited(format_args!("net: tap read: {e}"));
                Rx::Empty
            }
        };
    }
    if (n as usize) < HDR_LEN {
        return Rx::Bad;
    }
    // num_buffers (header bytes 10..12) is 1: no merged buffers.
    let _ = super::write_at(mem, &segs, 10, &1u16.to_le_bytes());
    Rx::Filled(n as u32)
}

/// Writes one transmit chain (header and frame, all readable) to `fd`. A chain that is
/// malformed, too short or too long is dropped; so is a frame the tap refuses.
pub fn tx_chain<M: GuestMemoryBackend>(mem: &M, chain: DescriptorChain<&M>, fd: RawFd) -> u32 {
    let segs = match segments(mem, chain, MAX_QUEUE_SIZE) {
        Ok(s) => s,
        Err(e) => {
            crate::warn_limited(format_args!("net: frame dropped: {e:?}"));
            counters::failed();
            return 0;
        }
    };
    let len: u64 = segs.iter().map(|s| s.len as u64).sum();
    if segs.iter().any(|s| s.writable) {
        crate::warn_limited(format_args!("net: frame dropped: a device-writable buffer"));
        counters::failed();
        return 0;
    }
    if len < (HDR_LEN + 14) as u64 || len > (HDR_LEN + MAX_FRAME) as u64 {
        crate::warn_limited(format_args!("net: frame of {len} bytes dropped"));
        counters::failed();
        return 0;
    }
    let Ok((iov, guards)) = io_vectors(mem, &segs) else {
        counters::failed();
        return 0;
    };
    if iov.len() > libc::UIO_MAXIOV as usize {
        counters::failed();
        return 0;
    }
    // SAFETY: as in rx_chain; the kernel only reads these bytes.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
    drop(guards);
    if n < 0 {
        crate::warn_limited(format_args!(
            "net: frame dropped: {}",
            std::io::Error::last_os_error()
        ));
        counters::failed();
    } else {
        counters::add(Slot::Requests, 1);
        counters::add(
            Slot::BytesFromGuest,
            (n as u64).saturating_sub(HDR_LEN as u64),
        );
    }
    0
}

/// How a device's receive queues take frames, from the features the driver acked.
pub struct RxMode {
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may fill several chains.
    mergeable: AtomicBool,
    /// The tap may hand over 64 KiB segments (TSO offloads on, from GUEST_TSO4/6).
    segments: AtomicBool,
    /// Without segments, the largest frame to expect (Ethernet header and an 802.1Q
    /// tag included): a 1,500-byte MTU's worth, raised when a larger frame arrives
    /// (the tap's MTU may be larger, or change while the VM runs).
    frame: AtomicUsize,
}

/// A frame on a 1,500-byte MTU with an 802.1Q tag.
const MTU_FRAME: usize = 1500 + 14 + VLAN_TAG;

impl RxMode {
    /// The mode for `features` the driver acked.
    pub fn new(features: u64) -> RxMode {
        let m = RxMode {
            mergeable: AtomicBool::new(false),
            segments: AtomicBool::new(false),
            frame: AtomicUsize::new(MTU_FRAME),
        };
        m.set_features(features);
        m
    }

    /// Takes the features the driver acked (again, after a reset).
    pub fn set_features(&self, features: u64) {
        let tso = offload_flags(features) & (TUN_F_TSO4 | TUN_F_TSO6) != 0;
        self.mergeable
            .store(features & F_MRG_RXBUF != 0, Ordering::Relaxed);
        self.segments.store(tso, Ordering::Relaxed);
    }

    fn mergeable(&self) -> bool {
        self.mergeable.load(Ordering::Relaxed)
    }

    /// The room (header included) a mergeable receive gathers before it reads a frame.
    fn room(&self) -> u64 {
        let frame = if self.segments.load(Ordering::Relaxed) {
            MAX_FRAME + VLAN_TAG
        } else {
            self.frame.load(Ordering::Relaxed)
        };
        (HDR_LEN + frame) as u64
    }

    /// A frame of `total` bytes (header included) did not fit the room gathered.
    fn outgrown(&self, total: u64) {
        let frame = (total as usize)
            .saturating_sub(HDR_LEN)
            .min(MAX_FRAME + VLAN_TAG);
        if !self.segments.load(Ordering::Relaxed) {
            self.frame.fetch_max(frame, Ordering::Relaxed);
        }
    }
}

thread_local! {
    /// Where a frame's bytes beyond the guest's receive buffers go, to be measured.
    static SPILL: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; HDR_LEN + MAX_FRAME + VLAN_TAG].into_boxed_slice());
}

/// A receive chain popped for mergeable frames: its head, checked segments, and their
/// host iovecs (valid while the pass holds the memory).
struct RxChain {
    head: u16,
    segs: Vec<super::Segment>,
    iov: Vec<libc::iovec>,
    _guards: Vec<vm_memory::volatile_memory::PtrGuardMut>,
    room: u64,
}

/// Chains a receive pass has popped and not filled yet, in ring order and just before
/// the ring's next available entry: what one frame leaves over the next one uses, so a
/// chain is popped and checked once however many frames it waits through. The pass puts
/// what is left back on the ring when it ends.
#[derive(Default)]
struct RxPool {
    chains: std::collections::VecDeque<RxChain>,
    room: u64,
    nsegs: usize,
    /// The iovecs of all of them, for one readv (kept to reuse its allocation).
    iov: Vec<libc::iovec>,
}

impl RxPool {
    fn put_back(&mut self, vring: &VringRwLock) {
        for _ in 0..self.chains.len() {
            vring.get_mut().get_queue_mut().go_to_previous_position();
        }
        self.chains.clear();
        self.room = 0;
        self.nsegs = 0;
    }
}

/// What one mergeable receive came to.
enum Merged {
    /// A frame went into the pool's first chains: (head, bytes) for each.
    Filled(Vec<(u16, u32)>),
    /// The tap is drained.
    Drained,
    /// A frame was dropped (too big for the chains there were).
    Dropped,
    /// No usable chain was available.
    NoBuffers,
}

/// Receives one frame with VIRTIO_NET_F_MRG_RXBUF: tops the pool up with chains until it
/// holds the largest frame `mode` expects (or the ring runs out), reads the frame
/// straight into all of them with one readv, sets num_buffers in the first one's header
/// to the number of chains the frame filled, and keeps the chains it did not need for the
/// next frame. A chain that is malformed, read-only or shorter than the header is used
/// empty (only when the pool is empty, so that the chains a frame fills stay adjacent in
/// the used ring and the pool stays just before the ring's next entry).
fn rx_mergeable(
    vring: &VringRwLock,
    m: &GuestMemoryMmap,
    fd: RawFd,
    mode: &RxMode,
    pool: &mut RxPool,
    used: &mut bool,
) -> std::io::Result<Merged> {
    let want = mode.room();
    // Gather more than the largest frame expected: a frame that fills the chains to the
    // last byte is then one larger than expected, and the spill (below) says how large.
    while pool.room <= want {
        let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(m);
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let segs = segments(m, chain, MAX_QUEUE_SIZE).ok().filter(|segs| {
            segs.iter().all(|s| s.writable)
                && segs.iter().map(|s| s.len as u64).sum::<u64>() >= HDR_LEN as u64
        });
        let nsegs = segs
            .as_ref()
            .map_or(0, |s| s.iter().filter(|s| s.len > 0).count());
        // One iovec is the spill's.
        let fits = pool.nsegs + nsegs < libc::UIO_MAXIOV as usize;
        let vectors = segs
            .filter(|_| fits)
            .and_then(|segs| io_vectors(m, &segs).ok().map(|v| (segs, v)));
        match vectors {
            Some((segs, (iov, guards))) => {
                let room: u64 = segs.iter().map(|s| s.len as u64).sum();
                pool.nsegs += nsegs;
                pool.room += room;
                pool.chains.push_back(RxChain {
                    head,
                    segs,
                    iov,
                    _guards: guards,
                    room,
                });
            }
            // Full of segments already, or a bad chain after good ones: it waits until
            // the pool is empty, and comes first then.
            _ if !pool.chains.is_empty() => {
                vring.get_mut().get_queue_mut().go_to_previous_position();
                break;
            }
            _ => {
                crate::warn_limited(format_args!(
                    "net: receive buffer dropped: malformed, read-only part or shorter than the header"
                ));
                vring
                    .add_used(head, 0)
                    .map_err(|e| std::io::Error::other(format!("add_used: {e}")))?;
                *used = true;
            }
        }
    }
    if pool.chains.is_empty() {
        return Ok(Merged::NoBuffers);
    }
    pool.iov.clear();
    let RxPool { chains, iov, .. } = &mut *pool;
    iov.extend(chains.iter().flat_map(|c| c.iov.iter().copied()));
    // What does not fit the chains lands in the spill, a host buffer as large as any
    // frame: a frame larger than expected is then seen whole (a tap cuts a frame to
    // the room it is given and says nothing), and dropped.
    let n = SPILL.with_borrow_mut(|spill| {
        pool.iov.push(libc::iovec {
            iov_base: spill.as_mut_ptr().cast(),
            iov_len: spill.len(),
        });
        // SAFETY: every iovec but the last points into guest RAM checked by io_vectors
        // and kept mapped by the chains' guards and the pass's hold on the memory; the
        // last is this thread's spill, borrowed for the call; the kernel writes at most
        // their lengths (no more than UIO_MAXIOV of them).
        unsafe { libc::readv(fd, pool.iov.as_ptr(), pool.iov.len() as libc::c_int) }
    });
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return Ok(match e.raw_os_error() {
            Some(libc::EAGAIN) => Merged::Drained,
            Some(libc::EFAULT) | Some(libc::EINVAL) => {
                crate::warn_limited(format_args!(
                    "net: frame larger than the receive buffers available dropped"
                ));
                Merged::Dropped
            }
            _ => {
                crate::warn_limited(format_args!("net: tap read: {e}"));
                Merged::Drained
            }
        });
    }
    if n as u64 > pool.room {
        // Larger than the guest's buffers: with all the room expected gathered, the
        // frames are larger than expected (a larger MTU): expect this one from now on.
        crate::warn_limited(format_args!(
            "net: a frame of {} bytes did not fit the {} bytes of receive buffers gathered: dropped",
            (n as u64).saturating_sub(HDR_LEN as u64),
            pool.room
        ));
        if pool.room > want {
            mode.outgrown(n as u64);
        }
        return Ok(Merged::Dropped);
    }
    let mut left = n as u64;
    let mut filled = Vec::new();
    let mut first = None;
    while left > 0 || filled.is_empty() {
        let Some(c) = pool.chains.pop_front() else {
            break;
        };
        let take = left.min(c.room);
        filled.push((c.head, take as u32));
        left -= take;
        pool.room -= c.room;
        pool.nsegs -= c.iov.len();
        first.get_or_insert(c);
    }
    if let Some(c) = first {
        let count = filled.len() as u16;
        let _ = super::write_at(m, &c.segs, 10, &count.to_le_bytes());
    }
    Ok(Merged::Filled(filled))
}

/// Serves the receive queue until the tap is drained or the guest's buffers run out,
/// each frame in one chain (no mergeable receive buffers). Chains that could not be
/// filled for lack of frames go back to the ring.
pub fn process_rx(
    vring: &VringRwLock,
    mem: &Memory,
    event_idx: bool,
    fd: RawFd,
) -> std::io::Result<()> {
    process_rx_with(vring, mem, event_idx, fd, &RxMode::new(0))
}

/// process_rx, taking frames as `mode` says (with VIRTIO_NET_F_MRG_RXBUF, one frame may
/// fill several chains).
pub fn process_rx_with(
    vring: &VringRwLock,
    mem: &Memory,
    event_idx: bool,
    fd: RawFd,
    mode: &RxMode,
) -> std::io::Result<()> {
    let guard = mem.memory();
    let m: &GuestMemoryMmap = &guard;
    let mut pool = RxPool::default();
    let served = rx_passes(vring, m, event_idx, fd, mode, &mut pool);
    pool.put_back(vring);
    served
}

fn rx_passes(
    vring: &VringRwLock,
    m: &GuestMemoryMmap,
    event_idx: bool,
    fd: RawFd,
    mode: &RxMode,
    pool: &mut RxPool,
) -> std::io::Result<()> {
    loop {
        if event_idx {
            let _ = vring.disable_notification();
        }
        let (mut used_any, mut drained) = (false, false);
        if mode.mergeable() {
            loop {
                match rx_mergeable(vring, m, fd, mode, pool, &mut used_any) {
                    Ok(Merged::Filled(chains)) => {
                        let bytes: u64 = chains.iter().map(|&(_, len)| len as u64).sum();
                        counters::add(Slot::Requests, 1);
                        counters::add(Slot::BytesToGuest, bytes.saturating_sub(HDR_LEN as u64));
                        for (head, len) in chains {
                            if let Err(e) = vring.add_used(head, len) {
                                log::warn!("net: add_used: {e}");
                                drained = true;
                                break;
                            }
                        }
                        used_any = true;
                        if drained {
                            break;
                        }
                    }
                    Ok(Merged::Dropped) => counters::failed(),
                    Ok(Merged::NoBuffers) => break,
                    Ok(Merged::Drained) => {
                        drained = true;
                        break;
                    }
                    Err(e) => {
                        log::warn!("net: {e}");
                        drained = true;
                        break;
                    }
                }
            }
        } else {
            loop {
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(m);
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let len = match rx_chain(m, chain, fd) {
                    Rx::Filled(n) => {
                        counters::add(Slot::Requests, 1);
                        counters::add(
                            Slot::BytesToGuest,
                            (n as usize).saturating_sub(HDR_LEN) as u64,
                        );
                        n
                    }
                    Rx::Bad => {
                        counters::failed();
                        0
                    }
                    Rx::Empty => {
                        vring.get_mut().get_queue_mut().go_to_previous_position();
                        drained = true;
                        break;
                    }
                };
                if let Err(e) = vring.add_used(head, len) {
                    log::warn!("net: add_used: {e}");
                    drained = true;
                    break;
                }
                used_any = true;
            }
        }
        if used_any {
            super::notify_used(vring, m)?;
        }
        // Out of buffers with frames waiting: ask for a kick when the guest adds more
        // (and look again, in case it already has). A pass that took no chain although
        // the ring says there are some means a broken available index: stop, or a
        // guest could keep this thread spinning.
        let more = event_idx && vring.enable_notification().unwrap_or(false);
        if drained || !more || !used_any {
            return Ok(());
        }
    }
}

/// The most queue pairs a device has (VIRTIO_NET_F_MQ): one per vCPU, up to this.
pub const MAX_QUEUE_PAIRS: usize = 8;

/// The control queue's classes and commands the device answers (virtio 1.2, 5.1.6.5).
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;

pub struct NetBackend {
    /// One tap queue per queue pair (IFF_MULTI_QUEUE where there are several).
    taps: Vec<Tap>,
    mac: [u8; 6],
    state: QueueState,
    /// How the receive queues take frames (from the acked features).
    rx: RxMode,
    /// Queue pairs the driver uses now (1 until it says more on the control queue).
    active: std::sync::atomic::AtomicUsize,
}

impl NetBackend {
    /// A device on `taps`, one per queue pair; with more than one, the device offers
    /// VIRTIO_NET_F_MQ and a control queue, and serves each pair on its own thread.
    pub fn new(taps: Vec<Tap>, mac: [u8; 6]) -> Arc<Self> {
        assert!((1..=MAX_QUEUE_PAIRS).contains(&taps.len()));
        Arc::new(NetBackend {
            taps,
            mac,
            state: QueueState::default(),
            rx: RxMode::new(0),
            active: std::sync::atomic::AtomicUsize::new(1),
        })
    }

    fn pairs(&self) -> usize {
        self.taps.len()
    }

    /// The control queue's index among all queues (with several pairs).
    fn ctrl_queue(&self) -> usize {
        2 * self.pairs()
    }

    /// Pair `k`'s tap token: past every queue and the daemon's exit event.
    fn tap_token(&self, k: usize) -> u64 {
        self.num_queues() as u64 + 1 + k as u64
    }

    /// Every tap's descriptor with the token and worker thread under which `serve`
    /// must watch it (edge-triggered: the receive path always reads until EAGAIN).
    pub fn tap_listeners(&self) -> Vec<(RawFd, EventSet, u64, usize)> {
        self.taps
            .iter()
            .enumerate()
            .map(|(k, t)| {
                (
                    t.fd.as_raw_fd(),
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    self.tap_token(k),
                    k,
                )
            })
            .collect()
    }

    /// virtio_net_config: mac, status, max_virtqueue_pairs.
    pub fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
        c
    }

    /// Uses `n` queue pairs: the taps' queues past them are detached (TUNSETQUEUE), so
    /// the kernel steers no frame to a pair the guest does not read.
    fn set_active(&self, n: usize) -> std::io::Result<()> {
        for (k, t) in self.taps.iter().enumerate().skip(1) {
            t.set_queue_enabled(k < n)?;
        }
        self.active.store(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// One control-queue command: its header (class, command), its data, and the ack
    /// byte the device writes.
    fn control<M: GuestMemoryBackend>(&self, mem: &M, chain: DescriptorChain<&M>) -> u32 {
        let Ok(segs) = segments(mem, chain, MAX_QUEUE_SIZE) else {
            counters::failed();
            return 0;
        };
        let readable: Vec<_> = segs.iter().copied().filter(|s| !s.writable).collect();
        let writable: Vec<_> = segs.iter().copied().filter(|s| s.writable).collect();
        let mut cmd = [0u8; 4];
        let total: u64 = readable.iter().map(|s| s.len as u64).sum();
        let n = (total as usize).min(cmd.len());
        let ack = if super::read_at(mem, &readable, 0, &mut cmd[..n]).is_err() || n < 4 {
            CTRL_ERR
        } else if cmd[0] == CTRL_MQ && cmd[1] == CTRL_MQ_VQ_PAIRS_SET {
            let pairs = u16::from_le_bytes([cmd[2], cmd[3]]) as usize;
            if (1..=self.pairs()).contains(&pairs) && self.set_active(pairs).is_ok() {
                CTRL_OK
            } else {
                crate::warn_limited(format_args!(
                    "net: VQ_PAIRS_SET {pairs} refused (1 to {})",
                    self.pairs()
                ));
                CTRL_ERR
            }
        } else {
            crate::warn_limited(format_args!(
                "net: control command {}/{} not supported",
                cmd[0], cmd[1]
            ));
            CTRL_ERR
        };
        match super::write_at(mem, &writable, 0, &[ack]) {
            Ok(()) => 1,
            Err(_) => 0,
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        if self.pairs() > 1 {
            2 * self.pairs() + 1
        } else {
            2
        }
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        let mq = if self.pairs() > 1 {
            F_CTRL_VQ | F_MQ
        } else {
            0
        };
        super::COMMON_FEATURES
            | F_MRG_RXBUF
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_MAC
            | F_STATUS
            | mq
    }

    fn acked_features(&self, features: u64) {
        self.rx.set_features(features);
        for t in &self.taps {
            if let Err(e) = t.set_offload(features) {
                log::warn!("net: TUNSETOFFLOAD: {e}");
            }
        }
        // The first pair only, until the driver asks for more (virtio 1.2, 5.1.6.5.5).
        if let Err(e) = self.set_active(1) {
            log::warn!("net: TUNSETQUEUE: {e}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        super::protocol_features_with_config()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state.set_event_idx(enabled)
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        super::config_bytes(&self.config(), offset, size)
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        self.state.update_memory(mem)
    }

    /// A thread per queue pair; the control queue with the first.
    fn queues_per_thread(&self) -> Vec<u64> {
        let mut masks: Vec<u64> = (0..self.pairs()).map(|k| 0b11 << (2 * k)).collect();
        if self.pairs() > 1 {
            masks[0] |= 1 << self.ctrl_queue();
        }
        masks
    }

    /// On pair k's thread `vrings` are that pair's receive and transmit queues (and,
    /// on the first, the control queue), and `device_event` indexes them.
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> std::io::Result<()> {
        let k = thread;
        if k >= self.pairs() {
            return Err(std::io::Error::other(format!("no queue pair {k}")));
        }
        match device_event {
            // A kick on the receive queue: new buffers.
            RX => self.receive(k, vrings),
            TX => {
                let fd = self.taps[k].fd.as_raw_fd();
                self.state
                    .handle_kick(TX, evset, vrings, |m: &GuestMemoryMmap, chain| {
                        tx_chain(m, chain, fd)
                    })
            }
            CTRL if k == 0 && self.pairs() > 1 => {
                self.state
                    .handle_kick(CTRL, evset, vrings, |m: &GuestMemoryMmap, chain| {
                        self.control(m, chain)
                    })
            }
            // Frames on the pair's tap.
            e if e as u64 == self.tap_token(k) => self.receive(k, vrings),
            other => Err(std::io::Error::other(format!("unknown event {other}"))),
        }
    }
}

impl NetBackend {
    /// Fills pair `k`'s receive queue (the first of its thread's `vrings`) from its tap.
    fn receive(&self, k: usize, vrings: &[VringRwLock]) -> std::io::Result<()> {
        let (Some(vring), Some(mem)) = (vrings.get(RX as usize), self.state.memory()) else {
            return Ok(());
        };
        if !vring.get_ref().is_enabled() {
            return Ok(());
        }
        process_rx_with(
            vring,
            &mem,
            self.state.event_idx(),
            self.taps[k].fd.as_raw_fd(),
            &self.rx,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_are_checked() {
        assert_eq!(
            parse_mac("02:aa:bb:cc:dd:0f").unwrap(),
            [2, 0xaa, 0xbb, 0xcc, 0xdd, 0x0f]
        );
        for bad in [
            "",
            "02:aa:bb:cc:dd",
            "02:aa:bb:cc:dd:ee:ff",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "02:aa:bb:cc:dd:g0",
            "02:aa:bb:cc:dd:1",
            "02:aa:bb:cc:dd:+1",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
        let r = random_mac();
        assert_eq!(r[0] & 3, 2, "locally administered unicast");
    }

    #[test]
    fn tap_names_are_checked_before_any_syscall() {
        for bad in ["", "0123456789abcdef", "a/b", "a b"] {
            let e = Tap::open(bad).err().expect("refused");
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    /// A receive queue of `n` one-descriptor chains of `buf` bytes each (chain i at
    /// 0x10000 + i * buf), all available; the datagram socket stands in for the tap.
    fn rx_queue(n: u16, buf: u32) -> (Memory, VringRwLock) {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        for i in 0..n as u64 {
            // Descriptor: addr, len, flags WRITE (2), next.
            let d = 0x1000 + i * 16;
            ram.write_obj(0x1_0000 + i * buf as u64, GuestAddress(d))
                .unwrap();
            ram.write_obj(buf, GuestAddress(d + 8)).unwrap();
            ram.write_obj(2u16, GuestAddress(d + 12)).unwrap();
            ram.write_obj(i as u16, GuestAddress(0x3000 + 4 + i * 2))
                .unwrap();
        }
        ram.write_obj(0u16, GuestAddress(0x3000)).unwrap();
        ram.write_obj(n, GuestAddress(0x3002)).unwrap();
        let mem = GuestMemoryAtomic::new(ram);
        let vring = VringRwLock::new(mem.clone(), 256).unwrap();
        vring.set_queue_size(256);
        vring.set_queue_info(0x1000, 0x3000, 0x4000).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        (mem, vring)
    }

    fn frame_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two descriptors we then own.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors nobody else owns.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// The used ring: (head, length) of each entry, and the frames' bytes by chain.
    fn used(mem: &Memory) -> Vec<(u32, u32)> {
        use vm_memory::{Bytes, GuestAddress};
        let m = mem.memory();
        let idx: u16 = m.read_obj(GuestAddress(0x4002)).unwrap();
        (0..idx as u64)
            .map(|i| {
                let at = 0x4004 + i * 8;
                (
                    m.read_obj(GuestAddress(at)).unwrap(),
                    m.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_mergeable_receive_spreads_a_large_frame_over_chains_and_counts_them() {
        use vm_memory::{Bytes, GuestAddress};
        let (ours, theirs) = frame_pair();
        let (mem, vring) = rx_queue(40, 4096);
        let mode = RxMode::new(F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO4);
        // A 64 KiB segment (header included) and then a small frame.
        let big: Vec<u8> = (0..HDR_LEN + 65_000).map(|i| (i % 251) as u8).collect();
        let small = vec![0x5au8; HDR_LEN + 60];
        for f in [&big, &small] {
            // SAFETY: send from a buffer we own, of its length.
            let n = unsafe { libc::send(theirs.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(n as usize, f.len());
        }
        process_rx_with(&vring, &mem, false, ours.as_raw_fd(), &mode).unwrap();
        let entries = used(&mem);
        let chains = big.len().div_ceil(4096);
        assert_eq!(chains, 16);
        let mut want: Vec<(u32, u32)> = (0..chains as u32)
            .map(|i| (i, (big.len() as u32 - i * 4096).min(4096)))
            .collect();
        want.push((chains as u32, small.len() as u32));
        assert_eq!(entries, want);
        // The bytes landed in order across the chains; num_buffers counts them.
        let m = mem.memory();
        let mut got = vec![0u8; big.len()];
        m.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
        let num_buffers = u16::from_le_bytes([got[10], got[11]]);
        assert_eq!(num_buffers as usize, chains);
        assert_eq!(&got[12..], &big[12..]);
        let second: u16 = m
            .read_obj(GuestAddress(0x1_0000 + chains as u64 * 4096 + 10))
            .unwrap();
        assert_eq!(second, 1);
        // The chains it did not need are still available: the next frame takes them.
        let f = [1u8; 100];
        // SAFETY: as above.
        unsafe { libc::send(theirs.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        process_rx_with(&vring, &mem, false, ours.as_raw_fd(), &mode).unwrap();
        assert_eq!(used(&mem).last(), Some(&(chains as u32 + 1, 100)));
    }

    /// Without segmentation offload a mergeable receive gathers one standard frame's
    /// worth of chains, not 64 KiB; a larger frame (a larger MTU) is seen whole in the
    /// spill, dropped, and expected from then on: the next one is received.
    #[test]
    fn a_frame_larger_than_expected_is_dropped_once_and_then_received() {
        use vm_memory::{Bytes, GuestAddress};
        let (ours, theirs) = frame_pair();
        let (mem, vring) = rx_queue(40, 1024);
        let mode = RxMode::new(F_MRG_RXBUF);
        let small = vec![1u8; HDR_LEN + 1000];
        let jumbo: Vec<u8> = (0..HDR_LEN + 3000).map(|i| (i % 241) as u8).collect();
        for f in [&small, &jumbo, &jumbo] {
            // SAFETY: send from a buffer we own, of its length.
            let n = unsafe { libc::send(theirs.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(n as usize, f.len());
        }
        process_rx_with(&vring, &mem, false, ours.as_raw_fd(), &mode).unwrap();
        // The small frame in chain 0; the first jumbo frame dropped (it found chains 1
        // and 2, 2,048 bytes); the second in chains 1..=3, num_buffers 3.
        let entries = used(&mem);
        assert_eq!(
            entries,
            [
                (0, small.len() as u32),
                (1, 1024),
                (2, 1024),
                (3, jumbo.len() as u32 - 2048)
            ]
        );
        let m = mem.memory();
        let mut got = vec![0u8; jumbo.len()];
        m.read_slice(&mut got, GuestAddress(0x1_0000 + 1024))
            .unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
        assert_eq!(&got[12..], &jumbo[12..]);
        // Nothing else was taken from the ring: chain 4 is next.
        let f = [9u8; 100];
        // SAFETY: as above.
        unsafe { libc::send(theirs.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        process_rx_with(&vring, &mem, false, ours.as_raw_fd(), &mode).unwrap();
        assert_eq!(used(&mem).last(), Some(&(4, 100)));
    }

    #[test]
    fn without_mergeable_buffers_a_frame_never_spans_chains() {
        let (ours, theirs) = frame_pair();
        let (mem, vring) = rx_queue(8, 4096);
        let f = vec![7u8; 3000];
        // SAFETY: send from a buffer we own, of its length.
        unsafe { libc::send(theirs.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        process_rx(&vring, &mem, false, ours.as_raw_fd()).unwrap();
        assert_eq!(used(&mem), [(0, 3000)]);
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = Tap::from_fd(f.into()).err().expect("refused");
        assert!(e.to_string().contains("not an attached tap"), "{e}");
    }
}
