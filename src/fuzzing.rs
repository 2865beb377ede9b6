//! Entry points for the fuzz targets in `fuzz/`: each takes arbitrary bytes and drives
//! one parser or device model with them. They live in the library so that `cargo test`
//! replays every committed corpus file and past crash on stable Rust
//! (tests/fuzz_replay.rs). None of them may panic, whatever the input.

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{acpi, boot, layout};
use crate::devices::acpi_pm::AcpiSleep;
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::ioapic::{IoApic, MsiSink};
use crate::devices::pci::{self, PciConfigIo, PciEcam, PciRoot};
use crate::devices::serial::{IrqLine, Serial};
use crate::vmm::config::VmConfig;

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every fuzz target, by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[
    ("kernel_loader", kernel_loader),
    ("cmdline", cmdline),
    ("acpi_tables", acpi_tables),
    ("vm_config", vm_config),
    ("platform_io", platform_io),
    ("ioapic", ioapic),
    ("blk_chains", blk_chains),
    ("rng_chains", rng_chains),
    ("net_tx_chains", net_tx_chains),
    ("net_rx_chains", net_rx_chains),
    ("vsock_chains", vsock_chains),
    ("console_chains", console_chains),
    ("virtio_pci", virtio_pci),
    ("vhost_user_frontend", vhost_user_frontend),
    ("vhost_user_backend", vhost_user_backend),
    ("api_http", api_http),
    ("qcow2_image", qcow2_image),
    ("luks_header", luks_header),
    ("snapshot_state", snapshot_state),
];

const FUZZ_MEM: u64 = 16 << 20;

fn guest_memory(size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("anonymous guest memory")
}

/// A kernel image from an untrusted file: ELF (PVH or not) or bzImage, then the boot
/// information for it. Every error must be an `Err`, never a panic or a write outside
/// guest memory.
pub fn kernel_loader(data: &[u8]) {
    let mem = guest_memory(FUZZ_MEM);
    for protocol in [boot::BootProtocol::Auto, boot::BootProtocol::Linux] {
        let mut image = Cursor::new(data);
        if let Ok(kernel) = boot::load_kernel(&mem, "fuzz", &mut image, FUZZ_MEM, protocol) {
            assert!(
                kernel.end <= layout::low_ram_end(FUZZ_MEM),
                "kernel end {:#x} beyond RAM",
                kernel.end
            );
            // A bzImage may declare a tiny cmdline_size; refusing then is correct.
            let len = match boot::load_cmdline(&mem, &kernel, "console=ttyS0") {
                Ok(len) => len,
                Err(boot::Error::CmdlineTooLong { len, max }) => {
                    assert!(len > max && boot::cmdline_limit(&kernel) == max + 1);
                    continue;
                }
                Err(e) => panic!("short command line refused: {e}"),
            };
            let rsdp = acpi::create_tables(&mem, 1).expect("tables for one vCPU");
            let _ = boot::write_boot_info(&mem, &kernel, len, None, rsdp, FUZZ_MEM);
        }
    }
}

/// A command line of arbitrary bytes: the limit check, and the test guest's additions.
pub fn cmdline(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mem = guest_memory(FUZZ_MEM);
    let mut image = Cursor::new(crate::testguest::IMAGE);
    let kernel = boot::load_kernel(
        &mem,
        "testguest",
        &mut image,
        FUZZ_MEM,
        boot::BootProtocol::Pvh,
    )
    .expect("test guest loads");
    match boot::load_cmdline(&mem, &kernel, &text) {
        Ok(len) => {
            // The reported length is exactly what is in guest memory, NUL after it.
            let mut back = vec![0u8; len as usize + 1];
            mem.read_slice(&mut back, GuestAddress(layout::CMDLINE))
                .expect("read back");
            assert_eq!(back[len as usize], 0);
            assert!(!back[..len as usize].contains(&0));
            // linux-loader trims blanks and re-joins boot and init arguments around
            // " -- ": only whitespace may differ from what was asked for.
            let written = String::from_utf8_lossy(&back[..len as usize]).into_owned();
            // A " -- " separator with no init arguments after it may be dropped.
            let asked: Vec<&str> = text.split_ascii_whitespace().collect();
            let got: Vec<&str> = written.split_ascii_whitespace().collect();
            let without_dashes = asked.last() == Some(&"--") && got[..] == asked[..asked.len() - 1];
            assert!(
                got == asked || without_dashes,
                "{written:?} is not {text:?} up to whitespace"
            );
        }
        Err(boot::Error::CmdlineTooLong { len, max }) => assert!(len > max),
        Err(boot::Error::CmdlineNotAscii { byte, offset }) => {
            assert_eq!(text.as_bytes()[offset], byte);
            assert!(!(b' '..=b'~').contains(&byte));
        }
        Err(_) => {}
    }
    let cfg = VmConfig {
        cmdline: Some(text.into_owned()),
        cpus: Some(2),
        memory_mib: Some(64),
        ..Default::default()
    };
    let full = cfg.effective_cmdline();
    assert!(full.contains("expect_mem=") && full.contains("expect_cpus="));
}

/// Builds the ACPI tables for a vCPU count taken from the input, then parses them back
/// as a guest would and compares: checksums, lengths, the MADT's processors.
pub fn acpi_tables(data: &[u8]) {
    let cpus = u16::from_le_bytes([
        data.first().copied().unwrap_or(1),
        data.get(1).copied().unwrap_or(0),
    ]) as u32;
    let mem = guest_memory(FUZZ_MEM);
    let rsdp = match acpi::create_tables(&mem, cpus) {
        Ok(addr) => addr,
        Err(acpi::Error::TooManyCpus(n)) => {
            assert!(n > acpi::MAX_MADT_CPUS);
            return;
        }
        Err(e) => panic!("building tables for {cpus} vCPUs: {e}"),
    };
    let parsed = acpi::parse_tables(&mem, rsdp).expect("the tables we built parse");
    assert_eq!(parsed.madt_cpus, cpus);
    assert_eq!(parsed.madt_ioapics, 1);
    assert!(parsed.signatures.iter().any(|s| s == b"FACP") && parsed.dsdt_ok);
}

/// Arbitrary TOML as a VM configuration.
pub fn vm_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = VmConfig::parse_toml(text) {
            let _ = cfg.effective_cmdline();
            let _ = cfg.clone().merge(cfg);
        }
    }
}

struct NoMsi;
impl MsiSink for NoMsi {
    fn send_msi(&self, _address: u64, _data: u32) {}
}

/// Reads and writes of every size to every platform port (serial, i8042, ACPI sleep,
/// PCI config mechanism #1) and to the IOAPIC's and the PCI ECAM's MMIO, as a guest
/// issues them. Input: 6-byte operations [kind, size, addr lo, addr hi, value lo, value hi].
pub fn platform_io(data: &[u8]) {
    let (events, _ended) = std::sync::mpsc::channel();
    let ioapic = Arc::new(Mutex::new(IoApic::new(1, NoMsi)));
    let irq = ioapic.clone();
    let serial = Serial::new(
        IrqLine::new(move || irq.lock().unwrap().assert_irq(4)),
        Box::new(std::io::sink()),
    );
    let pci = Arc::new(Mutex::new(PciRoot::new()));
    let mut pio = Bus::default();
    pio.insert(layout::COM1_PORT as u64, 8, Arc::new(Mutex::new(serial)))
        .unwrap();
    pio.insert(
        layout::I8042_PORT as u64,
        5,
        Arc::new(Mutex::new(I8042::new(events.clone()))),
    )
    .unwrap();
    pio.insert(
        layout::ACPI_SLEEP_PORT as u64,
        2,
        Arc::new(Mutex::new(AcpiSleep::new(events))),
    )
    .unwrap();
    pio.insert(
        pci::CONFIG_ADDRESS_PORT as u64,
        8,
        Arc::new(Mutex::new(PciConfigIo(pci.clone()))),
    )
    .unwrap();
    let mut mmio = Bus::default();
    mmio.insert(layout::IOAPIC_BASE, layout::IOAPIC_SIZE, ioapic)
        .unwrap();
    mmio.insert(
        layout::PCI_ECAM_BASE,
        pci::ECAM_SIZE,
        Arc::new(Mutex::new(PciEcam(pci))),
    )
    .unwrap();
    for op in data.chunks_exact(6) {
        let size = [1usize, 2, 4, 8][(op[1] & 3) as usize];
        let low = u16::from_le_bytes([op[2], op[3]]) as u64;
        let value = (u16::from_le_bytes([op[4], op[5]]) as u64).to_le_bytes();
        let ioapic_addr = layout::IOAPIC_BASE - 0x100 + (low & 0x1fff);
        // ECAM: the address bits pick the device (15..19) and register (0..11).
        let ecam_addr =
            layout::PCI_ECAM_BASE + ((low << 4 | (op[1] as u64 >> 2) & 0xf) & 0x10_ffff);
        match op[0] % 6 {
            0 => drop(pio.read(low, &mut [0u8; 8][..size])),
            1 => drop(pio.write(low, &value[..size])),
            2 => drop(mmio.read(ioapic_addr, &mut [0u8; 8][..size])),
            3 => drop(mmio.write(ioapic_addr, &value[..size])),
            4 => drop(mmio.read(ecam_addr, &mut [0u8; 8][..size])),
            _ => drop(mmio.write(ecam_addr, &value[..size])),
        }
    }
}

/// The IOAPIC's registers and pins: select/window accesses, pin assertions and EOIs in
/// any order. Input: 6-byte operations [kind, arg, value (4 bytes)].
pub fn ioapic(data: &[u8]) {
    use crate::devices::bus::BusDevice;
    let mut io = IoApic::new(0, NoMsi);
    for op in data.chunks_exact(6) {
        let value = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        match op[0] % 6 {
            0 => io.write(0x00, &value.to_le_bytes()),
            1 => io.write(0x10, &value.to_le_bytes()),
            2 => io.read((op[1] as u64) & 0x7f, &mut [0u8; 4]),
            3 => io.assert_irq(op[1] as usize),
            4 => io.deassert_irq(op[1] as usize),
            _ => io.end_of_interrupt(op[1]),
        }
    }
}

/// Guest RAM for the device fuzzers: two 64 KiB regions with a hole between them, so
/// buffers that straddle the hole or run off the end are exercised.
fn device_memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x2_0000), 0x1_0000),
    ])
    .expect("anonymous guest memory");
    let (a, b) = data.split_at(data.len().min(0x1_0000));
    let _ = mem.write_slice(a, GuestAddress(0));
    let _ = mem.write_slice(&b[..b.len().min(0x1_0000)], GuestAddress(0x2_0000));
    mem
}

/// A split queue of 16 at fixed places in the first region, its rings as the input
/// wrote them; serves every chain `serve` will take and checks each used length.
fn serve_queue(
    data: &[u8],
    serve: &mut dyn FnMut(&GuestMemoryMmap, virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
) {
    use virtio_queue::{Queue, QueueT};
    let mem = device_memory(data);
    let mut q = Queue::new(16).expect("queue of 16");
    q.set_size(16);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    for _ in 0..64 {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        // The most a device may report: every writable byte of the chain.
        let writable: u64 = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| d.len() as u64)
            .sum();
        let len = serve(&mem, chain);
        assert!(
            len as u64 <= writable,
            "used length {len} > writable bytes {writable}"
        );
        if q.add_used(&mem, head, len).is_err() {
            break;
        }
    }
}

fn scratch_file(len: u64) -> std::fs::File {
    let name = std::ffi::CString::new("cellvm-fuzz-disk").expect("static name");
    // SAFETY: memfd_create with a valid name; the result is checked and owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len).expect("size the scratch disk");
    file
}

/// virtio-blk requests: descriptor chains and headers from arbitrary guest memory,
/// served against a 64 KiB scratch disk (read-only when the first byte is odd).
pub fn blk_chains(data: &[u8]) {
    let readonly = data.first().is_some_and(|b| b & 1 == 1);
    let disk =
        crate::backend::blk::Disk::new(scratch_file(0x1_0000), readonly, "fuzz").expect("disk");
    serve_queue(data, &mut |m, chain| disk.serve_chain(m, chain));
}

/// A qcow2 image from arbitrary bytes through the real engine (`block::Qcow2`, the one
/// the blk backend serves): the first 64 bytes are eight requests of 8 bytes each (kind,
/// sector, length in sectors, flags), the rest is the image file, in a memfd, opened
/// writable with no backing file. Opening may fail; a request may fail; nothing may
/// panic, and a read after a write that succeeded sees what was written.
pub fn qcow2_image(data: &[u8]) {
    use block::{DiskImage, Slice};
    use std::os::unix::fs::FileExt;
    if data.len() < 64 {
        return;
    }
    let (ops, image) = data.split_at(64);
    let file = scratch_file(0);
    file.write_all_at(image, 0).expect("fill the memfd");
    let Ok(img) = block::Qcow2::open(file, false, false, Vec::new(), None) else {
        return;
    };
    let sectors = img.size() / 512;
    if sectors == 0 {
        return;
    }
    let mut buf = vec![0u8; 16 * 512];
    for op in ops.chunks_exact(8) {
        let sector = u32::from_le_bytes([op[1], op[2], op[3], op[4]]) as u64 % sectors;
        let count = ((op[5] as u64 % 16) + 1).min(sectors - sector);
        let (offset, len) = (sector * 512, count * 512);
        let n = len as usize;
        match op[0] % 5 {
            0 => {
                let _ = img.read(offset, &[Slice::from(&mut buf[..n])]);
            }
            1 => {
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = op[6] ^ i as u8;
                }
                // Whether the bytes read back are those written is not asserted: a
                // hostile image's refcounts may hand out a cluster its own metadata
                // uses, and the guest then reads its image's corruption back. What
                // must hold for the host is that neither call panics, hangs, or
                // grows the file past its bound (the storage layer refuses that).
                if img.write(offset, &[Slice::from(&mut buf[..n])]).is_ok() {
                    let _ = img.read(offset, &[Slice::from(&mut buf[..n])]);
                }
            }
            2 => {
                let _ = img.discard(offset, len);
            }
            3 => {
                let _ = img.write_zeroes(offset, len, op[7] & 1 == 1);
            }
            _ => {
                let _ = img.flush();
            }
        }
    }
}

/// virtio-rng requests from arbitrary guest memory.
pub fn rng_chains(data: &[u8]) {
    serve_queue(data, &mut |m, chain| {
        crate::backend::rng::serve_chain(m, chain)
    });
}

/// A non-blocking datagram socket pair standing in for the tap: like a tap, it keeps
/// frame boundaries, and reads and writes through it are the same readv/writev.
fn frame_pair() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: fresh descriptors nobody else owns.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// virtio-net transmit chains from arbitrary guest memory: whatever reaches the "tap"
/// is exactly one chain's readable bytes, header included, within the frame limits.
pub fn net_tx_chains(data: &[u8]) {
    use crate::backend::net::{tx_chain, HDR_LEN, MAX_FRAME};
    use std::os::fd::AsRawFd;
    let (tap, peer) = frame_pair();
    let mut sent = Vec::new();
    serve_queue(data, &mut |m, chain| {
        let readable: Vec<(u64, u32)> = chain
            .clone()
            .filter(|d| !d.is_write_only())
            .map(|d| (d.addr().0, d.len()))
            .collect();
        let len = tx_chain(m, chain, tap.as_raw_fd());
        sent.push(readable);
        len
    });
    let mut buf = vec![0u8; HDR_LEN + MAX_FRAME + 1];
    loop {
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            break;
        }
        let n = n as usize;
        assert!(
            (HDR_LEN + 14..=HDR_LEN + MAX_FRAME).contains(&n),
            "a frame of {n} bytes reached the tap"
        );
        assert!(
            sent.iter()
                .any(|segs| segs.iter().map(|s| s.1 as usize).sum::<usize>() == n),
            "a frame of {n} bytes matches no chain"
        );
    }
}

/// virtio-net receive: frames (lengths from the input) waiting on the "tap", receive
/// chains from arbitrary guest memory, served by the backend's real receive loop
/// (buffers put back when the tap runs dry, notifications with or without EVENT_IDX,
/// with or without mergeable receive buffers).
pub fn net_rx_chains(data: &[u8]) {
    use crate::backend::net::{process_rx_with, RxMode, HDR_LEN};
    use std::os::fd::AsRawFd;
    use vhost_user_backend::{VringRwLock, VringT};
    use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
    let (Some(&frames), Some(&flags)) = (data.first(), data.get(1)) else {
        return;
    };
    let (tap, peer) = frame_pair();
    let mut longest = 0;
    for i in 0..(frames % 8) as usize {
        let len = data
            .get(2 + i * 2..4 + i * 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize % 4096)
            .unwrap_or(64);
        longest = longest.max(len);
        let frame = vec![i as u8; len];
        // SAFETY: send from a buffer we own, of its length.
        unsafe { libc::send(peer.as_raw_fd(), frame.as_ptr().cast(), len, 0) };
    }
    let body = data.get(18..).unwrap_or(&[]);
    let ram = device_memory(body);
    // The used ring starts empty: only what the backend writes is checked below.
    let _ = ram.write_slice(&[0u8; 4 + 8 * 16 + 2], GuestAddress(0x2000));
    let mem = GuestMemoryAtomic::new(ram);
    let vring = VringRwLock::new(mem.clone(), 16).expect("vring");
    vring.set_queue_size(16);
    if vring.set_queue_info(0, 0x1000, 0x2000).is_err() {
        return;
    }
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let event_idx = flags & 1 == 1;
    vring.set_queue_event_idx(event_idx);
    // Flag bit 1: VIRTIO_NET_F_MRG_RXBUF negotiated (frames spread over chains).
    // Flag bit 2: GUEST_TSO4 too (64 KiB segments expected).
    let mut features = 0;
    if flags & 2 == 2 {
        features |= crate::backend::net::F_MRG_RXBUF;
    }
    if flags & 4 == 4 {
        features |= crate::backend::net::F_GUEST_CSUM | crate::backend::net::F_GUEST_TSO4;
    }
    let _ = process_rx_with(
        &vring,
        &mem,
        event_idx,
        tap.as_raw_fd(),
        &RxMode::new(features),
    );
    // Whatever the chains were, no used length exceeds the longest frame. (Unless the
    // guest pointed a receive buffer at its own used ring, or used indirect tables that
    // might: then the ring holds frame bytes, which is the guest's own business.)
    let m = mem.memory();
    let used_ring = 0x2000u64..0x2000 + 4 + 8 * 16 + 2;
    let overwritten = (0..16u64).any(|i| {
        let addr: u64 = m.read_obj(GuestAddress(i * 16)).unwrap_or(0);
        let len: u32 = m.read_obj(GuestAddress(i * 16 + 8)).unwrap_or(0);
        let flags: u16 = m.read_obj(GuestAddress(i * 16 + 12)).unwrap_or(0);
        flags & 4 != 0
            || (flags & 2 != 0
                && addr < used_ring.end
                && addr.saturating_add(len as u64) > used_ring.start)
    });
    if overwritten {
        return;
    }
    let used_idx: u16 = m.read_obj(GuestAddress(0x2002)).unwrap_or(0);
    for i in 0..used_idx.min(16) {
        let len: u32 = m
            .read_obj(GuestAddress(0x2004 + 8 * i as u64 + 4))
            .unwrap_or(0);
        assert!(
            len as usize <= longest.max(HDR_LEN),
            "used length {len} > longest frame {longest}"
        );
    }
}

/// A receive queue of 16 from the input's memory (rings at 0x3000.., its used ring at
/// 0x5000 cleared), for the stream devices' targets.
fn receive_ring(
    body: &[u8],
    event_idx: bool,
) -> Option<(
    vm_memory::GuestMemoryAtomic<GuestMemoryMmap>,
    vhost_user_backend::VringRwLock,
)> {
    use vhost_user_backend::{VringRwLock, VringT};
    let ram = device_memory(body);
    let _ = ram.write_slice(&[0u8; 4 + 8 * 16 + 2], GuestAddress(0x5000));
    let mem = vm_memory::GuestMemoryAtomic::new(ram);
    let rx = VringRwLock::new(mem.clone(), 16).expect("vring");
    rx.set_queue_size(16);
    rx.set_queue_info(0x3000, 0x4000, 0x5000).ok()?;
    rx.set_queue_ready(true);
    rx.set_enabled(true);
    rx.set_queue_event_idx(event_idx);
    Some((mem, rx))
}

/// virtio-vsock as a hostile guest drives it: a host stream to a guest port (its bytes
/// from the input) opens a connection, then the device fills receive chains, takes
/// transmit chains (headers, credit, operations all from the input), sees the host
/// side's events and fills receive chains again. Both queues' rings come from the
/// input (receive at 0x3000.., transmit at 0x0..). Nothing may panic; no used length
/// exceeds a header plus the most payload a packet carries; the device never holds
/// more connections than its bound.
pub fn vsock_chains(data: &[u8]) {
    use crate::backend::vsock::{Vsock, HDR_LEN, MAX_CONNS, MAX_PKT};
    use std::io::Write;
    use vm_memory::GuestAddressSpace;
    if data.len() < 5 {
        return;
    }
    let (head, body) = data.split_at(5);
    let event_idx = head[0] & 1 == 1;
    let port = u16::from_le_bytes([head[1], head[2]]) as u32;
    let host_bytes = u16::from_le_bytes([head[3], head[4]]) as usize % 8192;
    let Ok(mut vsock) = Vsock::new(3, None, None) else {
        return;
    };
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let bytes: Vec<u8> = body.iter().cycle().take(host_bytes).copied().collect();
    let _ = peer.write_all(&bytes);
    if vsock.adopt_host_stream(ours, port).is_err() {
        return;
    }
    let Some((mem, rx)) = receive_ring(body, event_idx) else {
        return;
    };
    let _ = vsock.fill_rx(&rx, &mem, event_idx);
    serve_queue(body, &mut |m, chain| vsock.tx_chain(m, chain));
    vsock.host_events();
    let _ = vsock.fill_rx(&rx, &mem, event_idx);
    assert!(vsock.connections() <= MAX_CONNS);
    let m = mem.memory();
    let used_idx: u16 = m.read_obj(GuestAddress(0x5002)).unwrap_or(0);
    for i in 0..used_idx.min(16) {
        let len: u32 = m
            .read_obj(GuestAddress(0x5004 + 8 * i as u64 + 4))
            .unwrap_or(0);
        assert!(
            len as usize <= HDR_LEN + MAX_PKT,
            "used length {len} > one packet"
        );
    }
}

/// virtio-console as a hostile guest drives it: the console and one named port, each
/// with a connected host stream (its bytes from the input); control messages and both
/// ports' transmit chains from the input's transmit ring (at 0x0..), then the host
/// side's events, then both ports' and the control queue's receive chains from the
/// receive ring (at 0x3000..). With or without the multiport feature. Nothing may
/// panic; no used length exceeds the chain's writable bytes on either side (a
/// receive chain through an indirect table is not checked); what the device owes the
/// guest stays within its bound.
pub fn console_chains(data: &[u8]) {
    use crate::backend::console::{Console, HostEnd, PortSpec, F_MULTIPORT, MAX_CONTROL};
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use vm_memory::GuestAddressSpace;
    if data.len() < 3 {
        return;
    }
    let (head, body) = data.split_at(3);
    let (event_idx, multiport) = (head[0] & 1 == 1, head[0] & 2 == 2);
    let host_bytes = u16::from_le_bytes([head[1], head[2]]) as usize % 8192;
    let (hvc, mut hvc_peer) = UnixStream::pair().expect("socketpair");
    let (agent, mut agent_peer) = UnixStream::pair().expect("socketpair");
    let bytes: Vec<u8> = body.iter().cycle().take(host_bytes).copied().collect();
    let _ = hvc_peer.write_all(&bytes[..bytes.len() / 2]);
    let _ = agent_peer.write_all(&bytes[bytes.len() / 2..]);
    let Ok(mut console) = Console::new(vec![
        PortSpec {
            name: None,
            host: HostEnd::Connected(hvc),
        },
        PortSpec {
            name: Some("fuzz.0".into()),
            host: HostEnd::Connected(agent),
        },
    ]) else {
        return;
    };
    console.set_features(if multiport { F_MULTIPORT } else { 0 });
    if multiport {
        serve_queue(body, &mut |m, chain| console.control_chain(m, chain));
    }
    for id in 0..2 {
        serve_queue(body, &mut |m, chain| {
            if console.can_transmit(id) {
                console.tx_chain(m, id, chain)
            } else {
                0
            }
        });
    }
    console.host_events();
    let Some((mem, rx)) = receive_ring(body, event_idx) else {
        return;
    };
    let m = mem.memory();
    console.fill_port(0, &rx, &m);
    console.fill_port(1, &rx, &m);
    console.fill_control(&rx, &m);
    assert!(console.control_owed() <= MAX_CONTROL);
    let used_idx: u16 = m.read_obj(GuestAddress(0x5002)).unwrap_or(0);
    for i in 0..used_idx.min(16) {
        let at = 0x5004 + 8 * i as u64;
        let head: u32 = m.read_obj(GuestAddress(at)).unwrap_or(0);
        let len: u32 = m.read_obj(GuestAddress(at + 4)).unwrap_or(0);
        if let Some(writable) = direct_writable_bytes(&m, 0x3000, head as u16) {
            assert!(
                len as u64 <= writable,
                "used length {len} > the chain's {writable} writable bytes"
            );
        }
    }
}

/// The writable bytes of the chain at `head` of a 16-entry descriptor table at
/// `table`, following NEXT (as the device saw it: the table does not change); None
/// for a chain with an indirect table, which this does not follow.
fn direct_writable_bytes(m: &GuestMemoryMmap, table: u64, head: u16) -> Option<u64> {
    let (mut at, mut total) = (head % 16, 0u64);
    for _ in 0..16 {
        let d = GuestAddress(table + 16 * at as u64);
        let len: u32 = m.read_obj(GuestAddress(d.0 + 8)).ok()?;
        let flags: u16 = m.read_obj(GuestAddress(d.0 + 12)).ok()?;
        let next: u16 = m.read_obj(GuestAddress(d.0 + 14)).ok()?;
        if flags & 4 != 0 {
            return None;
        }
        if flags & 2 != 0 {
            total += len as u64;
        }
        if flags & 1 == 0 {
            break;
        }
        at = next % 16;
    }
    Some(total)
}

/// The virtio-pci transport: config space and BAR accesses (common configuration,
/// ISR, device configuration, notify, MSI-X table and PBA) in any order, sizes and
/// values, against a device model that accepts every activation.
pub fn virtio_pci(data: &[u8]) {
    use crate::devices::pci::PciFunction;
    use crate::virtio::irq::{Error as IrqError, IrqChip, MsiRouter};
    use crate::virtio::pci::{VirtioPci, BAR_SIZE};
    use crate::virtio::{QueueSetup, VirtioDevice};
    use vmm_sys_util::eventfd::EventFd;

    struct Chip;
    impl IrqChip for Chip {
        fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> Result<(), IrqError> {
            assert!(
                routes.windows(2).all(|w| w[0].0 < w[1].0),
                "routes sorted and unique"
            );
            Ok(())
        }
        fn bind(&self, _: &EventFd, gsi: u32) -> Result<(), IrqError> {
            assert!(gsi >= 24);
            Ok(())
        }
        fn unbind(&self, _: &EventFd, _: u32) -> Result<(), IrqError> {
            Ok(())
        }
    }
    struct Model {
        config: [u8; 16],
    }
    impl VirtioDevice for Model {
        fn device_type(&self) -> u32 {
            crate::virtio::TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 64]
        }
        fn features(&self) -> u64 {
            crate::virtio::F_VERSION_1 | crate::virtio::F_RING_EVENT_IDX | 1 << 9
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            for (i, d) in data.iter_mut().enumerate() {
                *d = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, d) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *d;
                }
            }
        }
        fn activate(&mut self, acked: u64, queues: &[QueueSetup]) -> Result<(), String> {
            assert!(
                acked & !self.features() == 0,
                "acked features beyond the offer"
            );
            for q in queues {
                assert!(
                    q.size.is_power_of_two() && q.size <= 256,
                    "queue size {}",
                    q.size
                );
            }
            Ok(())
        }
        fn reset(&mut self) {}
    }
    let router = Arc::new(MsiRouter::new(Arc::new(Chip)));
    let mut dev = VirtioPci::new(
        "fuzz".into(),
        Box::new(Model { config: [0; 16] }),
        0xc001_0000,
        router,
    )
    .expect("transport");
    // Each operation: kind, size, offset (u16), value (u32).
    for op in data.chunks_exact(8) {
        let size = [1usize, 2, 4, 8][(op[1] & 3) as usize];
        let offset = u16::from_le_bytes([op[2], op[3]]) as u64;
        let value = u64::from_le_bytes([op[4], op[5], op[6], op[7], op[4], op[5], op[6], op[7]]);
        let mut buf = [0u8; 8];
        match op[0] % 4 {
            0 => {
                let _ = dev.read_config(offset as u16 & 0xfff);
            }
            1 => {
                let shift = (offset & 3) * 8;
                let mask = (((1u64 << (size.min(4) * 8)) - 1) as u32).wrapping_shl(shift as u32);
                dev.write_config(
                    offset as u16 & 0xffc,
                    (value as u32).wrapping_shl(shift as u32),
                    mask,
                );
            }
            2 => {
                let off = offset % BAR_SIZE;
                if off + size as u64 <= BAR_SIZE {
                    crate::devices::bus::BusDevice::read(&mut dev, off, &mut buf[..size]);
                }
            }
            _ => {
                let off = offset % BAR_SIZE;
                if off + size as u64 <= BAR_SIZE {
                    buf.copy_from_slice(&value.to_le_bytes());
                    crate::devices::bus::BusDevice::write(&mut dev, off, &buf[..size]);
                }
            }
        }
    }
}

/// Replies into the vhost-user frontend, as from a compromised backend: the frontend's
/// whole negotiation and a device start read their answers from the input.
pub fn vhost_user_frontend(data: &[u8]) {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    // The input is the backend's side of the conversation; then it hangs up.
    let _ = theirs.set_nonblocking(true);
    let _ = theirs.write_all(&data[..data.len().min(64 * 1024)]);
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let mem = device_memory(&[]);
    let kind = data
        .first()
        .map(|b| [crate::virtio::TYPE_BLOCK, crate::virtio::TYPE_RNG][(b & 1) as usize])
        .unwrap_or(2);
    if let Ok(mut dev) =
        crate::virtio::vhost_user::VhostUserDevice::connect(ours, kind, 1, 256, mem)
    {
        use crate::virtio::VirtioDevice;
        let eventfd = || vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
        let q = crate::virtio::QueueSetup {
            index: 0,
            size: 16,
            desc: 0,
            avail: 0x1000,
            used: 0x2000,
            kick: eventfd(),
            call: eventfd(),
        };
        let _ = dev.activate(crate::virtio::F_VERSION_1, &[q]);
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        dev.reset();
    }
    drop(theirs);
}

/// Messages into a backend, as from a compromised VMM: the input is everything the
/// VMM's side of the connection sends (no descriptors travel, so RAM and eventfds sent
/// by a message are missing, as a malformed one would have them), served by the real
/// blk backend on a scratch disk. The backend must answer or hang up, never panic.
pub fn vhost_user_backend(data: &[u8]) {
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};
    use vhost_user_backend::VhostUserDaemon;
    use vm_memory::GuestMemoryAtomic;

    let dir = std::env::temp_dir().join(format!("cellvm-fuzz-vu-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("s");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind a scratch socket");
    let mut vmm = UnixStream::connect(&path).expect("connect");
    let _ = std::fs::remove_file(&path);
    let _ = vmm.write_all(&data[..data.len().min(64 * 1024)]);
    let _ = vmm.shutdown(std::net::Shutdown::Write);
    // The VMM side reads every reply, or the backend would block once the socket's
    // buffer is full of them (it serves one VMM: a VMM that stops reading stalls only
    // its own device).
    let mut replies = vmm.try_clone().expect("clone the VMM's end");
    let drain = std::thread::spawn(move || {
        let _ = std::io::copy(&mut replies, &mut std::io::sink());
    });
    // One daemon for the whole run, reconnected for each input (as a backend serving a
    // VMM that reconnects): its worker threads live as long as the process.
    type Daemon = VhostUserDaemon<std::sync::Arc<crate::backend::blk::BlkBackend>>;
    static DAEMON: std::sync::OnceLock<Mutex<Daemon>> = std::sync::OnceLock::new();
    let daemon = DAEMON.get_or_init(|| {
        let disk =
            crate::backend::blk::Disk::new(scratch_file(0x1_0000), false, "fuzz").expect("disk");
        let backend = crate::backend::blk::BlkBackend::new(disk, 2, 64);
        Mutex::new(
            VhostUserDaemon::new(
                "fuzz".into(),
                backend,
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .expect("daemon"),
        )
    });
    let mut daemon = daemon.lock().unwrap_or_else(|p| p.into_inner());
    let mut listener = vhost::vhost_user::Listener::from(listener);
    if daemon.start(&mut listener).is_ok() {
        let _ = daemon.wait();
    }
    drop(daemon);
    let _ = vmm.shutdown(std::net::Shutdown::Both);
    let _ = drain.join();
    drop(vmm);
}

/// The API's HTTP parser and router on arbitrary bytes, as one connection's stream:
/// requests are taken off the front until it needs more or refuses. Every answer must be
/// a well-formed response (its head parses back, its length matches, an error body is
/// `{"error": ...}`), a request must use some of the input and no more, and any prefix of
/// a complete request must be incomplete, not something else.
pub fn api_http(data: &[u8]) {
    use crate::api::http::{parse, Action, Parsed};
    use crate::api::{Op, Response};
    fn check(r: &Response) {
        let bytes = r.to_bytes(false);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(&bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("response head does not parse: {other:?}"),
        };
        assert_eq!(resp.code, Some(r.status));
        assert_eq!(&bytes[head..], &r.body[..]);
        if r.status >= 400 {
            let v: serde_json::Value = serde_json::from_slice(&r.body).expect("error body JSON");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
    let mut rest = data;
    for _ in 0..64 {
        match parse(rest) {
            Parsed::Partial => {
                assert!(rest.len() <= crate::api::http::MAX_HEAD + crate::api::http::MAX_BODY);
                return;
            }
            Parsed::Reject(r) => {
                assert!([400, 413, 431, 501].contains(&r.status), "{r:?}");
                check(&r);
                return;
            }
            Parsed::Request {
                action, consumed, ..
            } => {
                assert!(consumed > 0 && consumed <= rest.len());
                for cut in [consumed / 2, consumed - 1] {
                    assert_eq!(
                        parse(&rest[..cut]),
                        Parsed::Partial,
                        "prefix {cut} of {consumed}"
                    );
                }
                match action {
                    Action::Respond(r) => {
                        assert!([400, 404, 405].contains(&r.status), "{r:?}");
                        check(&r);
                    }
                    Action::Op(Op::Shutdown { timeout_ms }) => {
                        assert!(
                            (1..=crate::api::http::MAX_SHUTDOWN_TIMEOUT_MS).contains(&timeout_ms)
                        )
                    }
                    _ => {}
                }
                rest = &rest[consumed..];
            }
        }
    }
}

/// A LUKS1 header from arbitrary bytes, as the blk backend parses an encrypted qcow2
/// image's before it derives any key (`block::luks::Header::parse`): the first 8 bytes
/// are the encryption header area's length (little-endian), the rest the header. It may
/// be refused; one that parses has bounded iteration counts and every active slot's key
/// material inside the area, which is what the backend then reads.
pub fn luks_header(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let (len, header) = data.split_at(8);
    let area = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    if let Ok(h) = block::luks::Header::parse(header, area) {
        let material = h.material_len() as u64;
        for slot in &h.slots {
            assert!(slot.iterations >= 1 && slot.iterations <= block::luks::MAX_ITERATIONS);
            assert!(slot.material_offset + material <= area);
        }
    }
}

/// A snapshot's state file from arbitrary bytes. The first byte picks the form: even,
/// the rest is the file as is (the framing: magic, header checksum, section headers);
/// odd, the rest is cut at 0xff bytes into sections whose first byte picks a known tag
/// and next two the version, framed here with correct checksums, so that the fuzzer
/// reaches each section's own decoder. Whatever decodes must be consistent: it passes
/// the check against its own VM facts and encodes back into a file that decodes to the
/// same bytes again.
pub fn snapshot_state(data: &[u8]) {
    use crate::snapshot::format::FileWriter;
    use crate::snapshot::Snapshot;
    const TAGS: [[u8; 4]; 8] = [
        *b"VM\0\0", *b"CLK\0", *b"CPU\0", *b"IOAP", *b"UART", *b"GED\0", *b"RAM\0", *b"ZZZZ",
    ];
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let file = if form % 2 == 0 {
        rest.to_vec()
    } else {
        let mut f = FileWriter::new("fuzz");
        for piece in rest.split(|b| *b == 0xff).take(64) {
            if piece.len() < 3 {
                continue;
            }
            let tag = TAGS[piece[0] as usize % TAGS.len()];
            f.section(
                tag,
                u16::from_le_bytes([piece[1], piece[2]]) % 3,
                &piece[3..],
            );
        }
        f.finish()
    };
    if let Ok(s) = Snapshot::decode(&file) {
        assert!(s.check(&s.vm).is_ok());
        let again = s.encode();
        let back = Snapshot::decode(&again).expect("an encoded snapshot decodes");
        assert_eq!(back.encode(), again);
    }
}
