//! `cellvm-device blk`: a virtio-blk device model over one [`block::DiskImage`].
//!
//! The request code here knows no file format: it checks each request against the disk's
//! size and block size and moves data only through the seam, handing it the guest's own
//! buffers (vm-memory slices). A raw image reads and writes them straight with
//! preadv/pwritev (no copies); a qcow2 image goes through its mapping first. FLUSH makes
//! every completed write durable, so a write the guest saw flushed survives the backend
//! being killed. DISCARD and WRITE_ZEROES leave their ranges reading as zeroes (giving
//! the space back where the format can).
//!
//! With `--direct` a raw image is read and written with O_DIRECT (no host page cache):
//! the device then advertises the file system's O_DIRECT offset alignment as its block
//! size.

use std::fs::File;
use std::sync::Arc;

use block::DiskImage;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::counters::{self, Slot};
use super::{segments, Memory, QueueState, Segment, MAX_QUEUE_SIZE};

pub const SECTOR: u64 = 512;

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types and status values.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;
const WRITE_ZEROES_UNMAP: u32 = 1;
/// Largest single discard / write-zeroes range the device advertises (sectors).
const MAX_RANGE_SECTORS: u32 = 1 << 22;

/// The disk and what the device knows about it. Shared by every queue's thread; the
/// image does its own locking.
pub struct Disk {
    pub image: Box<dyn DiskImage>,
    pub sectors: u64,
    pub readonly: bool,
    pub id: [u8; ID_BYTES],
}

impl Disk {
    /// A raw image file as the disk.
    pub fn new(file: File, readonly: bool, id: &str) -> std::io::Result<Disk> {
        Ok(Disk::with_image(
            Box::new(block::Raw::new(file)?),
            readonly,
            id,
        ))
    }

    /// Any image behind the seam as the disk.
    pub fn with_image(image: Box<dyn DiskImage>, readonly: bool, id: &str) -> Disk {
        let mut raw = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        raw[..n].copy_from_slice(&id.as_bytes()[..n]);
        Disk {
            sectors: image.size() / SECTOR,
            image,
            readonly,
            id: raw,
        }
    }

    /// The block size the device advertises.
    pub fn block_size(&self) -> u64 {
        self.image.block_size()
    }

    /// Serves one request chain; returns the bytes written into guest buffers
    /// (data and status) for the used ring.
    pub fn serve_chain(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let segs = match segments(mem, chain, MAX_QUEUE_SIZE) {
            Ok(s) => s,
            Err(e) => {
                crate::warn_limited(format_args!("blk: request dropped: {e:?}"));
                counters::failed();
                return 0;
            }
        };
        // Header (readable, 16 bytes) first, status (writable, >= 1 byte) last.
        let (Some(head), Some(last)) = (segs.first(), segs.last()) else {
            return 0;
        };
        if segs.len() < 2 || !last.writable || last.len == 0 {
            crate::warn_limited(format_args!("blk: request without a status byte dropped"));
            counters::failed();
            return 0;
        }
        let status_at = GuestAddress(last.addr.0 + last.len as u64 - 1);
        let data = &segs[1..segs.len() - 1];
        // A status segment longer than one byte may carry data (some drivers merge).
        let mut data = data.to_vec();
        if last.len > 1 {
            data.push(Segment {
                len: last.len - 1,
                ..*last
            });
        }
        let (status, written) = if head.writable || head.len < 16 {
            (S_IOERR, 0)
        } else {
            let mut hdr = [0u8; 16];
            match mem.read_slice(&mut hdr, head.addr) {
                Ok(()) => {
                    let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
                    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
                    self.request(mem, kind, sector, &data)
                }
                Err(_) => (S_IOERR, 0),
            }
        };
        counters::add(Slot::Requests, 1);
        if status != S_OK {
            counters::add(Slot::Errors, 1);
        }
        match mem.write_obj(status, status_at) {
            Ok(()) => written + 1,
            Err(_) => 0,
        }
    }

    fn request(
        &self,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        data: &[Segment],
    ) -> (u8, u32) {
        match kind {
            T_IN | T_OUT => {
                let write = kind == T_OUT;
                if write && self.readonly {
                    return (S_IOERR, 0);
                }
                // Every data buffer must point the way the request moves data.
                if data.iter().any(|s| s.writable == write) {
                    return (S_IOERR, 0);
                }
                let len: u64 = data.iter().map(|s| s.len as u64).sum();
                if len % SECTOR != 0 || !self.in_range(sector, len / SECTOR) {
                    return (S_IOERR, 0);
                }
                // With O_DIRECT, requests must keep to the advertised block size.
                let bs = self.block_size();
                if (sector * SECTOR) % bs != 0 || len % bs != 0 {
                    crate::warn_limited(format_args!(
                        "blk: request at sector {sector} of {len} bytes is not aligned to the block size {bs}"
                    ));
                    return (S_IOERR, 0);
                }
                match self.transfer(mem, sector * SECTOR, data, write) {
                    Ok(()) => {
                        let moved = if write {
                            Slot::BytesFromGuest
                        } else {
                            Slot::BytesToGuest
                        };
                        counters::add(moved, len);
                        (S_OK, if write { 0 } else { len as u32 })
                    }
                    Err(e) => {
                        crate::warn_limited(format_args!(
                            "blk: {} at sector {sector}: {e}",
                            if write { "write" } else { "read" }
                        ));
                        (S_IOERR, 0)
                    }
                }
            }
            T_FLUSH => {
                if self.readonly {
                    return (S_OK, 0);
                }
                match self.image.flush() {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        crate::warn_limited(format_args!("blk: flush: {e}"));
                        (S_IOERR, 0)
                    }
                }
            }
            T_GET_ID => {
                let Some(buf) = data.first().filter(|s| s.writable) else {
                    return (S_IOERR, 0);
                };
                let n = (buf.len as usize).min(ID_BYTES);
                match mem.write_slice(&self.id[..n], buf.addr) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.readonly {
                    return (S_IOERR, 0);
                }
                (self.ranges(mem, kind, data), 0)
            }
            _ => (S_UNSUPP, 0),
        }
    }

    fn in_range(&self, sector: u64, count: u64) -> bool {
        sector
            .checked_add(count)
            .is_some_and(|end| end <= self.sectors)
    }

    /// The guest's buffers, as slices of guest RAM, through the seam.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[Segment],
        write: bool,
    ) -> std::io::Result<()> {
        let mut bufs = Vec::with_capacity(data.len());
        for s in data.iter().filter(|s| s.len > 0) {
            bufs.push(
                mem.get_slice(s.addr, s.len as usize)
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            );
        }
        if write {
            self.image.write(offset, &bufs)
        } else {
            self.image.read(offset, &bufs)
        }
    }

    /// DISCARD and WRITE_ZEROES: a list of 16-byte {sector, num_sectors, flags}.
    fn ranges(&self, mem: &GuestMemoryMmap, kind: u32, data: &[Segment]) -> u8 {
        if data.iter().any(|s| s.writable) {
            return S_IOERR;
        }
        let mut raw = Vec::new();
        for s in data {
            // Bounded before anything is allocated: the length is the guest's.
            if s.len as usize > 16 * 256 || raw.len() + s.len as usize > 16 * 256 {
                return S_IOERR;
            }
            let mut buf = vec![0u8; s.len as usize];
            if mem.read_slice(&mut buf, s.addr).is_err() {
                return S_IOERR;
            }
            raw.extend_from_slice(&buf);
        }
        if raw.is_empty() || raw.len() % 16 != 0 {
            return S_IOERR;
        }
        for r in raw.chunks_exact(16) {
            let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
            let count = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
            let known = if kind == T_WRITE_ZEROES {
                WRITE_ZEROES_UNMAP
            } else {
                0
            };
            if flags & !known != 0 {
                return S_UNSUPP;
            }
            if count > MAX_RANGE_SECTORS || !self.in_range(sector, count as u64) {
                return S_IOERR;
            }
            let (offset, len) = (sector * SECTOR, count as u64 * SECTOR);
            let r = if kind == T_DISCARD {
                self.image.discard(offset, len)
            } else {
                self.image
                    .write_zeroes(offset, len, flags & WRITE_ZEROES_UNMAP != 0)
            };
            if let Err(e) = r {
                crate::warn_limited(format_args!(
                    "blk: {} at sector {sector}: {e}",
                    if kind == T_DISCARD {
                        "discard"
                    } else {
                        "write zeroes"
                    }
                ));
                return S_IOERR;
            }
        }
        S_OK
    }

    /// virtio_blk_config, as far as `num_queues`.. the write-zeroes fields.
    pub fn config(&self, queues: u16, queue_size: u16) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&(queue_size as u32 - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(self.block_size() as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&queues.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

pub struct BlkBackend {
    disk: Disk,
    queues: usize,
    queue_size: usize,
    state: QueueState,
}

impl BlkBackend {
    pub fn new(disk: Disk, queues: usize, queue_size: usize) -> Arc<Self> {
        Arc::new(BlkBackend {
            disk,
            queues,
            queue_size,
            state: QueueState::default(),
        })
    }
}

impl BlkBackend {
    /// Makes what the disk holds durable: when the VMM hangs up, before the process ends
    /// (a qcow2 image's metadata caches may hold what the guest wrote since its last
    /// FLUSH).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.disk.readonly {
            return Ok(());
        }
        self.disk.image.flush()
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut f =
            super::COMMON_FEATURES | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES;
        if self.queues > 1 {
            f |= F_MQ;
        }
        if self.disk.readonly {
            f |= F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        super::protocol_features_with_config()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state.set_event_idx(enabled)
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        super::config_bytes(
            &self.disk.config(self.queues as u16, self.queue_size as u16),
            offset,
            size,
        )
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        self.state.update_memory(mem)
    }

    /// One worker thread per queue, so queues are served in parallel.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> std::io::Result<()> {
        self.state
            .handle_kick(device_event, evset, vrings, |m: &GuestMemoryMmap, chain| {
                self.disk.serve_chain(m, chain)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// O_DIRECT with guest buffers at odd addresses: the bounce path moves exactly the
    /// requested bytes both ways.
    #[test]
    fn direct_io_with_unaligned_guest_buffers_goes_through_the_bounce_buffer() {
        let path = std::env::temp_dir().join(format!("cellvm-direct-{}", std::process::id()));
        let mut content = vec![0u8; 64 * 1024];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        std::fs::write(&path, &content).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut raw = block::Raw::new(file).unwrap();
        raw.set_direct()
            .expect("O_DIRECT on the temp directory's file system");
        let disk = Disk::with_image(Box::new(raw), false, "t");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        // A read of sectors 8..16 into two buffers at odd addresses.
        let bs = disk.block_size() as u32;
        let segs = [
            Segment {
                addr: GuestAddress(0x1001),
                len: bs,
                writable: true,
            },
            Segment {
                addr: GuestAddress(0x3003),
                len: bs,
                writable: true,
            },
        ];
        let sector = bs as u64 / SECTOR * 2;
        assert_eq!(disk.request(&mem, T_IN, sector, &segs), (S_OK, 2 * bs));
        let mut got = vec![0u8; 2 * bs as usize];
        mem.read_slice(&mut got[..bs as usize], GuestAddress(0x1001))
            .unwrap();
        mem.read_slice(&mut got[bs as usize..], GuestAddress(0x3003))
            .unwrap();
        let at = (sector * SECTOR) as usize;
        assert_eq!(got, content[at..at + 2 * bs as usize]);
        // And back: write them one block further on.
        let segs = [
            Segment {
                writable: false,
                ..segs[0]
            },
            Segment {
                writable: false,
                ..segs[1]
            },
        ];
        let to = sector + 2 * bs as u64 / SECTOR;
        assert_eq!(disk.request(&mem, T_OUT, to, &segs), (S_OK, 0));
        let after = std::fs::read(&path).unwrap();
        let at2 = (to * SECTOR) as usize;
        assert_eq!(
            after[at2..at2 + 2 * bs as usize],
            content[at..at + 2 * bs as usize]
        );
        // A request that is not a whole block is refused, not half done.
        if bs > 512 {
            assert_eq!(disk.request(&mem, T_IN, 1, &segs[..1]).0, S_IOERR);
        }
        let _ = std::fs::remove_file(&path);
    }
}
