//! Attaching virtio devices: reach each device's vhost-user backend (start one, connect
//! to a socket, or take an inherited descriptor), negotiate with it, and put its
//! virtio-pci function on the PCI bus with its BAR on the MMIO bus and its notify
//! registers as KVM ioeventfds.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestMemoryMmap;

use super::config::{Backend, VmConfig};
use super::state::DeviceCounters;
use super::Error;
use crate::arch::x86_64::layout;
use crate::backend::counters;
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::ioapic::IoApic;
use crate::devices::pci::{PciFunction, PciRoot};
use crate::virtio::irq::MsiRouter;
use crate::virtio::pci::{Intx, IntxRelay, VirtioPci, BAR_SIZE};
use crate::virtio::vhost_user::VhostUserDevice;
use crate::virtio::{TYPE_BLOCK, TYPE_CONSOLE, TYPE_FS, TYPE_NET, TYPE_RNG, TYPE_VSOCK};

/// Queue size offered for every queue.
const QUEUE_SIZE: u16 = 256;

/// One function shared by the PCI config path and its BAR on the MMIO bus, counting
/// what the guest asks of it.
struct Shared(Arc<Mutex<VirtioPci>>, Arc<DeviceCounters>);

impl PciFunction for Shared {
    fn read_config(&self, offset: u16) -> u32 {
        self.1.config_reads.fetch_add(1, Ordering::Relaxed);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read_config(offset)
    }
    fn write_config(&mut self, offset: u16, value: u32, mask: u32) {
        self.1.config_writes.fetch_add(1, Ordering::Relaxed);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_config(offset, value, mask)
    }
}

/// The function's BAR on the MMIO bus, counted.
struct CountedBar(Arc<Mutex<VirtioPci>>, Arc<DeviceCounters>);

impl BusDevice for CountedBar {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.1.bar_reads.fetch_add(1, Ordering::Relaxed);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.1.bar_writes.fetch_add(1, Ordering::Relaxed);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(offset, data)
    }
}

/// Starts `cellvm-device ARGS` on a fresh listening socket whose only connection is
/// already queued: the returned stream. The socket's path exists for an instant in a
/// private directory and is gone before the backend runs.
/// `pass` become the backend's descriptors 4, 5, ... in order (a tap, an image and its
/// backing layers the VMM opened).
fn spawn_backend(args: &[String], pass: &[RawFd]) -> Result<(UnixStream, Child), Error> {
    let fail =
        |what: &str, e: std::io::Error| Error::Device(format!("starting backend ({what}): {e}"));
    let base = std::env::temp_dir().join(format!("cellvm-{}-", std::process::id()));
    let mut template = base.into_os_string().into_encoded_bytes();
    template.extend_from_slice(b"XXXXXX\0");
    // SAFETY: mkdtemp fills in the NUL-terminated template in place.
    let dir = unsafe { libc::mkdtemp(template.as_mut_ptr() as *mut libc::c_char) };
    if dir.is_null() {
        return Err(fail("mkdtemp", std::io::Error::last_os_error()));
    }
    template.pop();
    // SAFETY: mkdtemp returned our template back, still valid UTF-8-agnostic bytes.
    let dir = std::path::PathBuf::from(unsafe {
        std::ffi::OsString::from_encoded_bytes_unchecked(template)
    });
    let sock = dir.join("s");
    let listener = UnixListener::bind(&sock);
    let stream = listener.as_ref().ok().map(|_| UnixStream::connect(&sock));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir(&dir);
    let listener = listener.map_err(|e| fail("bind", e))?;
    let stream = stream.expect("bound").map_err(|e| fail("connect", e))?;
    // The backends are a program of their own, installed next to the VMM.
    let exe = std::env::current_exe()
        .map_err(|e| fail("current_exe", e))?
        .with_file_name("cellvm-device");
    // Every source above the targets (3 and 4..), so no dup2 below overwrites a source
    // it has yet to copy.
    let high = |fd: RawFd| -> Result<OwnedFd, Error> {
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we hold; the result is ours.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64) };
        if new < 0 {
            return Err(fail("dup", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(new) })
    };
    let sources: Vec<OwnedFd> = std::iter::once(listener.as_raw_fd())
        .chain(pass.iter().copied())
        .map(high)
        .collect::<Result<_, _>>()?;
    let raw: Vec<RawFd> = sources.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new(&exe);
    cmd.args(args).args(["--listen-fd", "3"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, &fd) in raw.iter().enumerate() {
                if libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| fail(&exe.display().to_string(), e))?;
    Ok((stream, child))
}

/// Connects to a device's backend, starting it first where the VMM does; with it, the
/// backend's page of counters: one the VMM makes for a backend it starts, the one
/// `counters=FD` names for a backend started elsewhere, none for a bare socket.
fn connect(
    backend: &Backend,
    counters_fd: Option<RawFd>,
    spawn: impl FnOnce() -> Vec<String>,
    pass: &[OwnedFd],
    children: &mut Vec<Child>,
) -> Result<(UnixStream, Option<counters::Reader>), Error> {
    let page_error = |e: std::io::Error| Error::Device(format!("backend counters: {e}"));
    match backend {
        Backend::Spawn => {
            let page = counters::create().map_err(page_error)?;
            let reader = counters::Reader::new(page.as_raw_fd()).map_err(page_error)?;
            // The page goes after the listener (3) and the passed descriptors (4..).
            let mut args = spawn();
            args.extend(["--counters-fd".into(), (4 + pass.len()).to_string()]);
            let mut all: Vec<RawFd> = pass.iter().map(|p| p.as_raw_fd()).collect();
            all.push(page.as_raw_fd());
            let (stream, child) = spawn_backend(&args, &all)?;
            children.push(child);
            Ok((stream, Some(reader)))
        }
        Backend::Socket(p) => UnixStream::connect(p)
            .map(|s| (s, None))
            .map_err(|e| Error::Invalid(format!("backend socket {}: {e}", p.display()))),
        Backend::Fd(fd) => {
            // SAFETY: fcntl(F_GETFD) only checks the descriptor exists.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(Error::Invalid(format!(
                    "backend fd={fd}: not an open descriptor"
                )));
            }
            let reader = match counters_fd {
                Some(c) => {
                    let r = counters::Reader::new(c)
                        .map_err(|e| Error::Invalid(format!("backend counters={c}: {e}")))?;
                    // The mapping stays; the descriptor is not needed for it.
                    // SAFETY: the descriptor was handed to this process to own.
                    drop(unsafe { OwnedFd::from_raw_fd(c) });
                    Some(r)
                }
                None => None,
            };
            // SAFETY: the descriptor was handed to this process to own (fd=N).
            Ok((unsafe { UnixStream::from_raw_fd(*fd) }, reader))
        }
    }
}

/// The deepest backing chain `cellvm run` follows.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Opens a disk image and, for qcow2, its backing chain as its headers name it: each
/// name relative to the directory of the image naming it (as qemu resolves them), every
/// layer with an explicit format (never probed), at most [`MAX_CHAIN_DEPTH`] below the
/// top, no file twice. The top is opened writable unless `readonly`, every other layer
/// read-only. A layer said to be raw must not carry the qcow2 magic and one said to be
/// qcow2 must; each qcow2 header must pass `refusal` (the top `refusal_keyed` when a
/// key is given for it: an encrypted top, or none).
pub fn open_chain(
    top: &Path,
    format: block::header::Format,
    readonly: bool,
    keyed: bool,
) -> Result<Vec<(OwnedFd, block::header::Format)>, String> {
    use block::header::{self, Format};
    use std::os::unix::fs::{FileExt, MetadataExt};
    let mut out: Vec<(OwnedFd, Format)> = Vec::new();
    let mut seen = Vec::new();
    let (mut path, mut fmt, mut writable) = (top.to_path_buf(), format, !readonly);
    loop {
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| {
                if out.is_empty() {
                    e.to_string()
                } else {
                    format!("backing file {name}: {e}")
                }
            })?;
        let meta = file.metadata().map_err(|e| format!("{name}: {e}"))?;
        if seen.contains(&(meta.dev(), meta.ino())) {
            return Err(format!("backing chain loops back to {name}"));
        }
        seen.push((meta.dev(), meta.ino()));
        let n = meta.len().min(header::HEADER_READ_MAX as u64) as usize;
        let mut bytes = vec![0u8; n];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|e| format!("{name}: reading the header: {e}"))?;
        let found = header::detect(&bytes);
        if found != fmt {
            return Err(format!(
                "{name}: format = {fmt} but the image is {found}{}",
                if found == Format::Qcow2 {
                    " (say format=qcow2)"
                } else {
                    ""
                }
            ));
        }
        out.push((file.into(), fmt));
        if fmt == Format::Raw {
            return Ok(out);
        }
        let h = header::parse(&bytes).map_err(|e| format!("{name}: {e}"))?;
        if let Some(why) = h.refusal_keyed(writable, keyed && out.len() == 1) {
            return Err(format!("{name}: {why}"));
        }
        let Some(b) = h.backing else {
            return Ok(out);
        };
        let Some(next) = b.format else {
            return Err(format!(
                "{name}: names the backing file {:?} without its format (qemu-img rebase -u -F FMT)",
                b.name
            ));
        };
        if out.len() > MAX_CHAIN_DEPTH {
            return Err(format!(
                "backing chain deeper than {MAX_CHAIN_DEPTH} layers below the top"
            ));
        }
        let named = Path::new(&b.name);
        path = if named.is_absolute() {
            named.to_path_buf()
        } else {
            path.parent().unwrap_or(Path::new(".")).join(named)
        };
        fmt = next;
        writable = false;
    }
}

/// What `attach` leaves running.
pub struct Attached {
    pub backends: Vec<Child>,
    pub functions: Vec<Arc<Mutex<VirtioPci>>>,
    pub relay: Arc<IntxRelay>,
    /// What the VMM sees of each device, in PCI slot order.
    pub counters: Vec<Arc<DeviceCounters>>,
    /// A second descriptor of each backend connection, for the main loop to notice a
    /// hang-up (same order as `counters`).
    pub connections: Vec<UnixStream>,
}

/// A virtio-fs device's queues: the high-priority queue and one request queue.
const FS_QUEUES: usize = 2;

/// A virtio-fs device's configuration (virtio 1.2, 5.11.4): the tag, NUL-padded to 36
/// bytes, then the number of request queues.
fn fs_config(tag: &str) -> Vec<u8> {
    let mut config = vec![0u8; 40];
    let n = tag.len().min(crate::vmm::config::MAX_FS_TAG);
    config[..n].copy_from_slice(&tag.as_bytes()[..n]);
    config[36..].copy_from_slice(&(FS_QUEUES as u32 - 1).to_le_bytes());
    config
}

/// IOAPIC pins for INTx: slot N drives pin 16 + (N - 1) % 8, level-triggered.
fn intx_pin(slot: u8) -> u8 {
    16 + (slot - 1) % 8
}

/// How many virtio functions `cfg` asks for.
pub fn device_count(cfg: &VmConfig) -> usize {
    cfg.disks.iter().flatten().count()
        + cfg.nets.iter().flatten().count()
        + cfg.fs.iter().flatten().count()
        + cfg.rng.is_some() as usize
        + cfg.vsock.is_some() as usize
        + cfg.virtio_console.is_some() as usize
}

/// Attaches every configured device; returns the backend processes it started and the
/// functions, for the INTx relay thread.
pub fn attach(
    cfg: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    router: &Arc<MsiRouter>,
    ioapic: &Arc<Mutex<IoApic<Arc<VmFd>>>>,
    pci: &mut PciRoot,
    mmio: &mut Bus,
) -> Result<Attached, Error> {
    let relay = Arc::new(IntxRelay::new().map_err(|e| Error::Device(format!("epoll: {e}")))?);
    let mut functions = Vec::new();
    let mut children = Vec::new();
    let mut wanted = Vec::new();
    for (i, disk) in cfg.disks.iter().flatten().enumerate() {
        // The VMM opens the image and every layer of its chain (a bad path fails here,
        // with exit status 2, not in the backend) and hands the backend descriptors.
        let layers = match (&disk.backend, &disk.image) {
            (Backend::Spawn, Some(image)) => {
                open_chain(image, disk.format, disk.readonly, disk.key.is_some())
                    .map_err(|e| Error::Invalid(format!("disk {}: {e}", image.display())))?
            }
            _ => Vec::new(),
        };
        // A LUKS image's key goes to the backend as one more descriptor, after the layers.
        let key = match (&disk.backend, &disk.key) {
            (Backend::Spawn, Some(path)) => {
                Some(OwnedFd::from(File::open(path).map_err(|e| {
                    Error::Invalid(format!("disk key {}: {e}", path.display()))
                })?))
            }
            _ => None,
        };
        if let (true, Some((top, _))) = (disk.direct, layers.first()) {
            // The descriptor the backend inherits is O_DIRECT from its first moment (the
            // backend checks the file system's alignments and sets it again).
            // SAFETY: fcntl on a descriptor we own, no pointers.
            let ok = unsafe {
                let fl = libc::fcntl(top.as_raw_fd(), libc::F_GETFL);
                fl >= 0 && libc::fcntl(top.as_raw_fd(), libc::F_SETFL, fl | libc::O_DIRECT) == 0
            };
            if !ok {
                return Err(Error::Invalid(format!(
                    "disk {}: O_DIRECT: {}",
                    disk.image.as_deref().unwrap_or(Path::new("")).display(),
                    std::io::Error::last_os_error()
                )));
            }
        }
        let (stream, page) = connect(
            &disk.backend,
            disk.counters,
            || {
                let mut a = vec![
                    "blk".to_string(),
                    "--image-fd".into(),
                    "4".into(),
                    "--format".into(),
                    disk.format.to_string(),
                ];
                if layers.len() > 1 {
                    let list: Vec<String> = layers[1..]
                        .iter()
                        .enumerate()
                        .map(|(k, (_, f))| format!("{}:{f}", 5 + k))
                        .collect();
                    a.extend(["--backing".into(), list.join(",")]);
                }
                a.extend([
                    "--queues".into(),
                    disk.queues.to_string(),
                    "--id".into(),
                    format!("cellvm-disk{i}"),
                ]);
                if disk.readonly {
                    a.push("--readonly".into());
                }
                if disk.direct {
                    a.push("--direct".into());
                }
                if key.is_some() {
                    a.extend(["--key-fd".into(), (4 + layers.len()).to_string()]);
                }
                a
            },
            &layers
                .iter()
                .map(|(f, _)| f.try_clone())
                .chain(key.iter().map(OwnedFd::try_clone))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Device(format!("disk{i}: dup: {e}")))?,
            &mut children,
        )?;
        let pid = disk.pid.or(children
            .last()
            .filter(|_| disk.backend == Backend::Spawn)
            .map(Child::id));
        wanted.push((
            format!("disk{i}"),
            stream,
            TYPE_BLOCK,
            disk.queues as usize,
            pid,
            page,
        ));
    }
    if let Some(rng) = &cfg.rng {
        let (stream, page) = connect(
            &rng.backend,
            rng.counters,
            || vec!["rng".to_string()],
            &[],
            &mut children,
        )?;
        let pid = rng.pid.or(children
            .last()
            .filter(|_| rng.backend == Backend::Spawn)
            .map(Child::id));
        wanted.push(("rng".to_string(), stream, TYPE_RNG, 1, pid, page));
    }
    for (i, net) in cfg.nets.iter().flatten().enumerate() {
        // The VMM opens the tap (in its own network namespace) and hands the backend
        // the descriptor, as the jailer does: a bad name fails here, with status 2.
        // With several queue pairs, one descriptor per queue of a multi-queue tap.
        let taps: Vec<OwnedFd> = match (&net.backend, &net.tap) {
            (Backend::Spawn, Some(name)) => crate::backend::net::Tap::open_queues(name, net.queues)
                .map_err(|e| Error::Invalid(format!("net {name}: {e}")))?
                .into_iter()
                .map(crate::backend::net::Tap::into_fd)
                .collect(),
            _ => Vec::new(),
        };
        let (stream, page) = connect(
            &net.backend,
            net.counters,
            || {
                let fds: Vec<String> = (0..taps.len()).map(|k| (4 + k).to_string()).collect();
                let mut a = vec!["net".to_string(), "--tap-fd".into(), fds.join(",")];
                if let Some(mac) = &net.mac {
                    a.extend(["--mac".into(), mac.clone()]);
                }
                a
            },
            &taps,
            &mut children,
        )?;
        let pid = net.pid.or(children
            .last()
            .filter(|_| net.backend == Backend::Spawn)
            .map(Child::id));
        // Several pairs come with a control queue after them.
        let queues = if net.queues > 1 {
            2 * net.queues + 1
        } else {
            2
        };
        wanted.push((format!("net{i}"), stream, TYPE_NET, queues, pid, page));
    }
    if let Some(vsock) = &cfg.vsock {
        // The VMM binds the host socket (a bad path fails here, with status 2) and hands
        // the backend it and its directory, where the guest's host ports resolve.
        let pass = match (&vsock.backend, &vsock.uds) {
            (Backend::Spawn, Some(path)) => bind_vsock_socket(path)?,
            _ => Vec::new(),
        };
        let name = vsock
            .uds
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned());
        let (stream, page) = connect(
            &vsock.backend,
            vsock.counters,
            || {
                vec![
                    "vsock".to_string(),
                    "--cid".into(),
                    vsock.cid.unwrap_or_default().to_string(),
                    "--uds-fd".into(),
                    "4".into(),
                    "--uds-dir-fd".into(),
                    "5".into(),
                    "--uds-name".into(),
                    name.clone().unwrap_or_default(),
                ]
            },
            &pass,
            &mut children,
        )?;
        let pid = vsock.pid.or(children
            .last()
            .filter(|_| vsock.backend == Backend::Spawn)
            .map(Child::id));
        wanted.push(("vsock".to_string(), stream, TYPE_VSOCK, 3, pid, page));
    }
    if let Some(console) = &cfg.virtio_console {
        // The VMM binds every port's host socket (a bad path fails here, with status 2)
        // and hands the backend the listening descriptors: hvc0's first, then the
        // named ports' in order.
        let mut pass = Vec::new();
        if let (Backend::Spawn, Some(hvc)) = (&console.backend, &console.hvc) {
            pass.push(OwnedFd::from(bind_socket(hvc, "virtio-console hvc")?));
            for (name, path) in &console.ports {
                pass.push(OwnedFd::from(bind_socket(
                    path,
                    &format!("virtio-console port {name}"),
                )?));
            }
        }
        let (stream, page) = connect(
            &console.backend,
            console.counters,
            || {
                let mut a = vec!["console".to_string(), "--hvc-listen-fd".into(), "4".into()];
                if !console.ports.is_empty() {
                    let list: Vec<String> = console
                        .ports
                        .iter()
                        .enumerate()
                        .map(|(k, (name, _))| format!("{name}:{}", 5 + k))
                        .collect();
                    a.extend(["--ports".into(), list.join(",")]);
                }
                a
            },
            &pass,
            &mut children,
        )?;
        let pid = console.pid.or(children
            .last()
            .filter(|_| console.backend == Backend::Spawn)
            .map(Child::id));
        // The most queues a console may have; its backend's max_nr_ports says how many.
        let queues = crate::backend::console::queue_count(
            crate::virtio::vhost_user::MAX_CONSOLE_PORTS as usize,
        );
        wanted.push((
            "console".to_string(),
            stream,
            TYPE_CONSOLE,
            queues,
            pid,
            page,
        ));
    }
    // virtio-fs shares: a virtiofsd someone else started (never the VMM), one
    // high-priority queue and one request queue each.
    let mut tags = Vec::new();
    for (i, fs) in cfg.fs.iter().flatten().enumerate() {
        let (stream, page) = connect(&fs.backend, fs.counters, Vec::new, &[], &mut children)?;
        wanted.push((format!("fs{i}"), stream, TYPE_FS, FS_QUEUES, fs.pid, page));
        tags.push(fs.tag.clone());
    }
    let mut tags = tags.into_iter();
    let (mut counters, mut connections) = (Vec::new(), Vec::new());
    for (n, (name, stream, ty, queues, pid, page)) in wanted.into_iter().enumerate() {
        let slot = n as u8 + 1;
        let kind = match ty {
            TYPE_BLOCK => "blk",
            TYPE_NET => "net",
            TYPE_VSOCK => "vsock",
            TYPE_CONSOLE => "console",
            TYPE_FS => "fs",
            _ => "rng",
        };
        let count = Arc::new(DeviceCounters::new(name.clone(), kind, pid, page));
        connections.push(
            stream
                .try_clone()
                .map_err(|e| Error::Device(format!("{name}: dup: {e}")))?,
        );
        let mut device = VhostUserDevice::connect(stream, ty, queues, QUEUE_SIZE, mem.clone())
            .map_err(|e| Error::Device(format!("{name}: {e}")))?;
        if ty == TYPE_FS {
            device = device.with_config(fs_config(&tags.next().unwrap_or_default()));
        }
        let bar = layout::PCI_BAR_BASE + slot as u64 * layout::PCI_BAR_STRIDE;
        let mut function =
            VirtioPci::new(name.clone(), Box::new(device), bar as u32, router.clone())
                .map_err(Error::Device)?;
        let pin = intx_pin(slot);
        let line = ioapic.clone();
        let raised = count.clone();
        function.set_intx(Intx {
            pin,
            set_level: Box::new(move |high| {
                let mut a = line.lock().unwrap_or_else(|p| p.into_inner());
                if high {
                    raised.intx_raised.fetch_add(1, Ordering::Relaxed);
                    a.assert_irq(pin as usize)
                } else {
                    a.deassert_irq(pin as usize)
                }
            }),
            relay: relay.clone(),
            index: functions.len() as u16,
        });
        for (addr, fd) in function.notifiers() {
            vm.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
        }
        let function = Arc::new(Mutex::new(function));
        pci.add(slot, Box::new(Shared(function.clone(), count.clone())))
            .map_err(|e| Error::Device(format!("{name}: {e}")))?;
        mmio.insert(
            bar,
            BAR_SIZE,
            Arc::new(Mutex::new(CountedBar(function.clone(), count.clone()))),
        )
        .map_err(|e| Error::Device(format!("{name}: BAR: {e}")))?;
        functions.push(function);
        counters.push(count);
        log::info!("{name}: PCI 00:{slot:02x}.0, BAR0 {bar:#x}, INTx pin {pin}");
    }
    Ok(Attached {
        backends: children,
        functions,
        relay,
        counters,
        connections,
    })
}

/// Binds a host socket at `path`. A socket file nothing listens on any more (left by
/// a VM that ended) is replaced; one that is in use, or any other file, is an error.
fn bind_socket(path: &Path, what: &str) -> Result<UnixListener, Error> {
    let invalid = |e: std::io::Error| Error::Invalid(format!("{what} {}: {e}", path.display()));
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            let stale = is_socket
                && UnixStream::connect(path)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            if !stale {
                return Err(Error::Invalid(format!(
                    "{what} {}: in use (another VM's socket, or not a socket)",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(invalid)?;
            UnixListener::bind(path).map_err(invalid)
        }
        Err(e) => Err(invalid(e)),
    }
}

/// Binds a vsock device's host socket at `path` and opens its directory: the two
/// descriptors its backend gets.
fn bind_vsock_socket(path: &Path) -> Result<Vec<OwnedFd>, Error> {
    let listener = bind_socket(path, "vsock")?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| Error::Invalid(format!("vsock {}: {e}", path.display())))?;
    Ok(vec![OwnedFd::from(listener), OwnedFd::from(dir)])
}

/// Starts the INTx relay thread (only when there are devices).
pub fn spawn_intx_relay(a: &Attached, seccomp: crate::seccomp::Mode) -> Result<(), Error> {
    if a.functions.is_empty() {
        return Ok(());
    }
    let (relay, functions) = (a.relay.clone(), a.functions.clone());
    std::thread::Builder::new()
        .name("intx".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::install("vmm", "intx", seccomp) {
                log::error!("intx relay: {e}");
                return;
            }
            relay.run(&functions)
        })
        .map(|_| ())
        .map_err(Error::Thread)
}
