//! Device backends: `cellvm-device blk|net|rng|vsock|console`, each a vhost-user backend process
//! serving one device of one VM. A backend opens no path once it runs: its socket
//! (a listening descriptor), its image or tap arrive as inherited descriptors when the
//! jailer starts it; its only view of the guest is the RAM the VMM shares with it.
//!
//! Every request is checked against guest RAM before a byte moves: a descriptor chain
//! that loops, leaves RAM, points the wrong way or is too short fails that request with
//! an I/O error (or, when not even a status byte can be written, is returned unused);
//! the backend never crashes on what a guest writes into its rings.

pub mod blk;
pub mod console;
pub mod counters;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};

pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Features every backend offers: virtio 1.x, event index, indirect descriptors, and
/// vhost-user protocol features.
pub const COMMON_FEATURES: u64 = crate::virtio::F_VERSION_1
    | crate::virtio::F_RING_EVENT_IDX
    | crate::virtio::F_RING_INDIRECT_DESC
    | (1 << 30);

/// The vhost-user protocol features of the backends with a configuration space.
pub fn protocol_features_with_config() -> vhost::vhost_user::message::VhostUserProtocolFeatures {
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    P::CONFIG | P::MQ | P::REPLY_ACK
}

/// Bytes `offset..offset + size` of a configuration space; what lies past its end reads
/// as zero.
pub fn config_bytes(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(config.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(config.len());
    out[..end - start].copy_from_slice(&config[start..end]);
    out
}

/// Largest queue a backend accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("vhost-user: {0}")]
    Daemon(String),
    #[error("seccomp: {0}")]
    Seccomp(crate::seccomp::Error),
}

/// Where the backend's vhost-user connection comes from.
pub enum Socket {
    /// Bind and listen at this path (developer use).
    Path(std::path::PathBuf),
    /// An inherited, already listening socket (how the jailer and `cellvm run` start
    /// backends: the VMM's connection is already queued on it).
    ListenFd(RawFd),
}

/// One descriptor of a chain, checked: `addr..addr+len` lies inside one RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// Why a chain cannot be served at all.
#[derive(Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor outside guest RAM (or across a hole).
    OutsideRam(u64, u32),
    /// More descriptors than the queue holds, or a loop.
    TooLong,
}

/// Collects and checks a chain's descriptors. virtio-queue already refuses loops (its
/// chain iterator stops after `queue size` descriptors) and bad indirect tables.
pub fn segments<M: GuestMemoryBackend>(
    mem: &M,
    chain: impl Iterator<Item = Descriptor>,
    max: usize,
) -> Result<Vec<Segment>, ChainError> {
    let mut out = Vec::new();
    for d in chain {
        if out.len() >= max {
            return Err(ChainError::TooLong);
        }
        let addr = GuestAddress(d.addr().0);
        if d.len() > 0 && mem.get_slice(addr, d.len() as usize).is_err() {
            return Err(ChainError::OutsideRam(addr.0, d.len()));
        }
        out.push(Segment {
            addr,
            len: d.len(),
            writable: d.is_write_only(),
        });
    }
    Ok(out)
}

/// The host iovecs of checked segments, with the guards that keep them mapped.
pub fn io_vectors<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Segment],
) -> std::io::Result<(
    Vec<libc::iovec>,
    Vec<vm_memory::volatile_memory::PtrGuardMut>,
)> {
    let mut iov = Vec::with_capacity(segs.len());
    let mut guards = Vec::with_capacity(segs.len());
    for s in segs.iter().filter(|s| s.len > 0) {
        let slice = mem
            .get_slice(s.addr, s.len as usize)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let guard = slice.ptr_guard_mut();
        iov.push(libc::iovec {
            iov_base: guard.as_ptr() as *mut libc::c_void,
            iov_len: s.len as usize,
        });
        guards.push(guard);
    }
    Ok((iov, guards))
}

/// readv from `fd` straight into guest segments (`into_guest`), or writev from them:
/// the bytes the kernel moved (0 for segments of no length).
pub fn guest_io<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Segment],
    fd: RawFd,
    into_guest: bool,
) -> std::io::Result<usize> {
    let (iov, guards) = io_vectors(mem, segs)?;
    if iov.is_empty() {
        return Ok(0);
    }
    let count = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    // SAFETY: every iovec points into guest RAM checked by io_vectors and kept mapped by
    // `guards`; the kernel writes (readv) or reads (writev) at most their lengths.
    let n = unsafe {
        if into_guest {
            libc::readv(fd, iov.as_ptr(), count)
        } else {
            libc::writev(fd, iov.as_ptr(), count)
        }
    };
    drop(guards);
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `write_at` could not write every byte: the segments end first, or one is not guest RAM.
#[derive(Debug, thiserror::Error)]
#[error("the guest buffer cannot take the write")]
pub struct ShortBuffer;

/// Writes `bytes` at byte `offset` of the buffer the segments make up together.
pub fn write_at<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Segment],
    mut offset: u64,
    mut bytes: &[u8],
) -> Result<(), ShortBuffer> {
    for s in segs {
        if bytes.is_empty() {
            break;
        }
        if offset >= s.len as u64 {
            offset -= s.len as u64;
            continue;
        }
        let n = bytes.len().min((s.len as u64 - offset) as usize);
        mem.write_slice(&bytes[..n], GuestAddress(s.addr.0 + offset))
            .map_err(|_| ShortBuffer)?;
        bytes = &bytes[n..];
        offset = 0;
    }
    if bytes.is_empty() {
        Ok(())
    } else {
        Err(ShortBuffer)
    }
}

/// Reads `out.len()` bytes at byte `offset` of the buffer the segments make up together.
pub fn read_at<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Segment],
    offset: u64,
    out: &mut [u8],
) -> Result<(), ShortBuffer> {
    let mut filled = 0;
    for s in sub_segments(segs, offset, out.len() as u64) {
        let n = s.len as usize;
        mem.read_slice(&mut out[filled..filled + n], s.addr)
            .map_err(|_| ShortBuffer)?;
        filled += n;
    }
    if filled == out.len() {
        Ok(())
    } else {
        Err(ShortBuffer)
    }
}

impl From<ShortBuffer> for std::io::Error {
    fn from(e: ShortBuffer) -> Self {
        std::io::Error::other(e)
    }
}

/// The segments covering bytes `offset..offset + len` of the buffer `segs` make up
/// together (fewer bytes where the buffer ends first).
pub fn sub_segments(segs: &[Segment], mut offset: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        if offset >= s.len as u64 {
            offset -= s.len as u64;
            continue;
        }
        let n = len.min(s.len as u64 - offset);
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + offset),
            len: n as u32,
            writable: s.writable,
        });
        len -= n;
        offset = 0;
    }
    out
}

/// Interrupts the driver for the used entries just added, unless it asked not to be:
/// with EVENT_IDX as virtio-queue computes from used_event; without it, unless the driver
/// set VIRTQ_AVAIL_F_NO_INTERRUPT (virtio 1.2, 2.7.7), a flag virtio-queue 0.18's
/// needs_notification does not read. A polling driver sets it and spares every pass an
/// interrupt (for INTx, a relay through the VMM).
pub fn notify_used<M: GuestMemoryBackend>(vring: &VringRwLock, mem: &M) -> std::io::Result<()> {
    const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
    let (event_idx, avail) = {
        let state = vring.get_ref();
        let q = state.get_queue();
        (q.event_idx_enabled(), q.avail_ring())
    };
    if !event_idx {
        let flags: u16 = mem
            .read_obj::<u16>(GuestAddress(avail))
            .map(u16::from_le)
            .unwrap_or(0);
        if flags & VIRTQ_AVAIL_F_NO_INTERRUPT != 0 {
            return Ok(());
        }
    }
    if vring.needs_notification().unwrap_or(true) {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// Serves every available chain of `vring` with `serve`, which returns the number of
/// bytes it wrote into the chain; signals the guest when the ring says to. With
/// EVENT_IDX, re-checks after re-enabling notifications so no kick is lost.
pub fn process_vring<F>(
    vring: &VringRwLock,
    mem: &Memory,
    event_idx: bool,
    mut serve: F,
) -> std::io::Result<()>
where
    F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let guard = mem.memory();
    let m: &GuestMemoryMmap = &guard;
    loop {
        if event_idx {
            let _ = vring.disable_notification();
        }
        let mut used_any = false;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(m);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = serve(m, chain);
            if let Err(e) = vring.add_used(head, len) {
                log::warn!("queue: add_used: {e}");
                break;
            }
            used_any = true;
        }
        if used_any {
            notify_used(vring, m)?;
        }
        // Look again only after a pass that made progress: with a broken available
        // index (more than a queue ahead) the ring claims chains that pop refuses, and
        // looping on that claim would spin this thread for as long as the guest likes.
        // (With EVENT_IDX the notification must be re-armed either way.)
        let more = event_idx && vring.enable_notification().unwrap_or(false);
        if !more || !used_any {
            return Ok(());
        }
    }
}

/// What every backend keeps between vhost-user messages: whether EVENT_IDX was
/// negotiated and the guest RAM last sent. Shared by all of a backend's threads.
#[derive(Default)]
pub struct QueueState {
    event_idx: std::sync::atomic::AtomicBool,
    mem: std::sync::RwLock<Option<Memory>>,
}

impl QueueState {
    pub fn set_event_idx(&self, enabled: bool) {
        self.event_idx
            .store(enabled, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The guest RAM last sent, if any.
    pub fn memory(&self) -> Option<Memory> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    /// A kick on queue `device_event`: serves its chains with `serve`.
    pub fn handle_kick<F>(
        &self,
        device_event: u16,
        evset: vmm_sys_util::epoll::EventSet,
        vrings: &[VringRwLock],
        serve: F,
    ) -> std::io::Result<()>
    where
        F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
    {
        if evset != vmm_sys_util::epoll::EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected events {evset:?}"
            )));
        }
        let (Some(vring), Some(mem)) = (vrings.get(device_event as usize), self.memory()) else {
            return Ok(());
        };
        process_vring(vring, &mem, self.event_idx(), serve)
    }
}

/// Serves one vhost-user connection with `backend` until the VMM hangs up. `listeners`
/// are further descriptors a worker thread watches (the first, unless
/// [`serve_on_threads`] names another), with the events and token its `handle_event`
/// expects.
pub fn serve<T>(
    name: &str,
    backend: T,
    socket: Socket,
    role: &str,
    seccomp: crate::seccomp::Mode,
    listeners: &[(RawFd, vmm_sys_util::epoll::EventSet, u64)],
) -> Result<(), Error>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    let on_first: Vec<_> = listeners.iter().map(|&(f, e, t)| (f, e, t, 0)).collect();
    serve_on_threads(name, backend, socket, role, seccomp, &on_first)
}

/// [`serve`], each listener on the worker thread its fourth field names (a backend
/// with a thread per queue pair watches each pair's descriptor on that pair's thread).
pub fn serve_on_threads<T>(
    name: &str,
    backend: T,
    socket: Socket,
    role: &str,
    seccomp: crate::seccomp::Mode,
    listeners: &[(RawFd, vmm_sys_util::epoll::EventSet, u64, usize)],
) -> Result<(), Error>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    let mut listener = match socket {
        Socket::Path(p) => {
            Listener::new(&p, true).map_err(|e| Error::Daemon(format!("{}: {e}", p.display())))?
        }
        // SAFETY: the fd was handed to this process to own (--listen-fd); it is a
        // listening UNIX socket or accept() fails with a clear error.
        Socket::ListenFd(fd) => Listener::from(unsafe { UnixListener::from_raw_fd(fd) }),
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(name.to_string(), backend, mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    for &(fd, events, token, thread) in listeners {
        let handler = handlers
            .get(thread)
            .ok_or_else(|| Error::Daemon(format!("watching fd {fd}: no worker thread {thread}")))?;
        handler
            .register_listener(fd, events, token)
            .map_err(|e| Error::Daemon(format!("watching fd {fd}: {e}")))?;
    }
    // No filesystem access at all from here on (a jailed backend got its files as
    // descriptors); where the kernel has no Landlock, say so.
    deny_filesystem();
    // The filter covers every thread of the process (TSYNC), including the daemon's
    // worker threads started below, before the first message is read.
    crate::seccomp::install_process(role, seccomp).map_err(Error::Seccomp)?;
    daemon
        .start(&mut listener)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    let result = daemon.wait();
    // The listener would unlink its path when dropped, which neither seccomp nor
    // Landlock allows any more: a socket file given with --socket stays until the next
    // backend listening there replaces it.
    std::mem::forget(listener);
    // One connection per backend: once the VMM hangs up the process ends. Dropping the
    // daemon would join its vring threads, which wait for an exit event; the exit that
    // follows ends them instead.
    std::mem::forget(daemon);
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected))
        | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::PartialMessage)) => {
            Ok(())
        }
        Err(e) => Err(Error::Daemon(e.to_string())),
    }
}

/// A Landlock ruleset that handles every filesystem right and grants none.
pub fn deny_filesystem() {
    use landlock::{
        Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetStatus, ABI,
    };
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI::V6))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self());
    match status {
        Ok(s) if s.ruleset == RulesetStatus::FullyEnforced => {}
        Ok(s) => log::warn!("backend: Landlock {:?} on this kernel", s.ruleset),
        Err(e) => log::warn!("backend: Landlock: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let c = [1u8, 2, 3, 4];
        assert_eq!(config_bytes(&c, 1, 2), vec![2, 3]);
        assert_eq!(config_bytes(&c, 2, 4), vec![3, 4, 0, 0]);
        assert_eq!(config_bytes(&c, 9, 3), vec![0, 0, 0]);
        assert_eq!(config_bytes(&c, u32::MAX, 2), vec![0, 0]);
    }

    /// A ready queue of 16 in `ram`: descriptors at 0, available ring at 0x1000, used
    /// ring at 0x2000.
    fn queue_of_16(ram: GuestMemoryMmap) -> (Memory, VringRwLock) {
        let mem = GuestMemoryAtomic::new(ram);
        let vring = VringRwLock::new(mem.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(0, 0x1000, 0x2000).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        (mem, vring)
    }

    /// A guest that sets the available index more than a queue ahead of the device must
    /// not keep a backend thread spinning: the pass ends, with or without EVENT_IDX.
    #[test]
    fn a_broken_available_index_ends_the_pass() {
        for event_idx in [false, true] {
            let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
            ram.write_obj(100u16, GuestAddress(0x1002)).unwrap();
            let (mem, vring) = queue_of_16(ram);
            vring.set_queue_event_idx(event_idx);
            let (tx, rx) = std::sync::mpsc::channel();
            let worker = std::thread::spawn(move || {
                let mut served = 0;
                let r = process_vring(&vring, &mem, event_idx, |_, _| {
                    served += 1;
                    0
                });
                tx.send((r.is_ok(), served)).unwrap();
            });
            let (ok, served) = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("event_idx={event_idx}: the pass never ended"));
            worker.join().unwrap();
            assert!(ok);
            assert_eq!(served, 0, "no chain of a broken ring is served");
        }
    }

    /// A driver that sets VIRTQ_AVAIL_F_NO_INTERRUPT gets no interrupt for a pass; the
    /// same pass with the flag clear signals the call eventfd.
    #[test]
    fn a_driver_that_polls_is_not_interrupted() {
        use std::os::fd::{AsRawFd, FromRawFd};
        for no_interrupt in [false, true] {
            let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
            // One chain (descriptor 0, 64 device-writable bytes at 0x8000) available.
            ram.write_obj(0x8000u64, GuestAddress(0)).unwrap();
            ram.write_obj(64u32, GuestAddress(8)).unwrap();
            ram.write_obj(2u16, GuestAddress(12)).unwrap();
            ram.write_obj(no_interrupt as u16, GuestAddress(0x1000))
                .unwrap();
            ram.write_obj(1u16, GuestAddress(0x1002)).unwrap();
            let (mem, vring) = queue_of_16(ram);
            // SAFETY: a fresh eventfd this test owns.
            let call = unsafe {
                std::fs::File::from_raw_fd(libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            };
            vring.set_call(Some(call.try_clone().unwrap()));
            let mut served = 0;
            process_vring(&vring, &mem, false, |_, _| {
                served += 1;
                0
            })
            .unwrap();
            assert_eq!(served, 1);
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into a u64 we own.
            let n = unsafe { libc::read(call.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
            let signalled = n == 8 && count > 0;
            assert_eq!(signalled, !no_interrupt, "no_interrupt={no_interrupt}");
        }
    }
}
