//! Guest RAM in a snapshot: a file the size of RAM with each byte at its offset in the
//! RAM file (region by region, as guest RAM is mapped), written sparsely — pages the
//! guest never touched and chunks that are all zeros stay holes — with a CRC-32 per
//! chunk in the state file. Restore copies every listed chunk into the new VM's RAM,
//! checking it first: the device backends map that RAM, so nothing is ever loaded
//! behind their back, and a chunk that does not match is refused before any vCPU runs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::format::{Error as FormatError, Reader, Writer};

pub const VERSION: u16 = 1;
/// The unit of sparseness and of checksums.
pub const CHUNK: u64 = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("memory file: {0}")]
    Io(std::io::Error),
    #[error("memory file: chunk at offset {0:#x}: checksum mismatch (the file is damaged or not this snapshot's)")]
    Checksum(u64),
    #[error("memory file: truncated: the chunk at offset {0:#x} is not there")]
    Truncated(u64),
    #[error("snapshot: guest RAM is {snapshot} bytes, this VM has {vm}")]
    Size { snapshot: u64, vm: u64 },
    #[error("guest memory: {0}")]
    Guest(String),
}

/// Where each populated chunk is, and its checksum.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamIndex {
    pub size: u64,
    /// (offset in the RAM file, length, CRC-32), ascending and disjoint.
    pub chunks: Vec<(u64, u32, u32)>,
}

impl RamIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.size).u64(CHUNK).u32(self.chunks.len() as u32);
        for (offset, len, crc) in &self.chunks {
            w.u64(*offset).u32(*len).u32(*crc);
        }
        w.0
    }

    pub fn decode(mut r: Reader) -> Result<RamIndex, FormatError> {
        let size = r.u64("ram size")?;
        let chunk = r.u64("chunk size")?;
        if chunk != CHUNK {
            return Err(r.bad(format!("chunk size {chunk}: this cellvm writes {CHUNK}")));
        }
        if size == 0 || size % (1 << 20) != 0 {
            return Err(r.bad(format!("ram size {size}: not a whole number of MiB")));
        }
        let most = size.div_ceil(CHUNK).min(u32::MAX as u64) as usize;
        let n = r.count("chunk count", 16, most)?;
        let mut chunks = Vec::with_capacity(n);
        let mut next = 0u64;
        for _ in 0..n {
            let (offset, len, crc) = (
                r.u64("chunk offset")?,
                r.u32("chunk length")?,
                r.u32("chunk crc")?,
            );
            let end = offset.checked_add(len as u64);
            if offset < next
                || offset % CHUNK != 0
                || len == 0
                || len as u64 > CHUNK
                || end.is_none_or(|e| e > size)
            {
                return Err(r.bad(format!(
                    "chunk at {offset:#x} ({len} bytes): not an aligned chunk after {next:#x} within {size:#x}"
                )));
            }
            next = offset + len as u64;
            chunks.push((offset, len, crc));
        }
        r.end()?;
        Ok(RamIndex { size, chunks })
    }
}

/// (offset in the RAM file, guest address, length) of each region.
fn regions(mem: &GuestMemoryMmap) -> Vec<(u64, GuestAddress, u64)> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let e = (offset, r.start_addr(), r.len());
            offset += r.len();
            e
        })
        .collect()
}

/// The data ranges of `fd` within [0, size) (SEEK_DATA/SEEK_HOLE), or all of it where
/// the file cannot say.
fn data_ranges(fd: Option<&File>, size: u64) -> Vec<(u64, u64)> {
    let Some(f) = fd else {
        return vec![(0, size)];
    };
    let mut out = Vec::new();
    let mut at = 0i64;
    while (at as u64) < size {
        // SAFETY: lseek on a descriptor we hold; no memory is involved.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `at`
            }
            return vec![(0, size)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return vec![(0, size)];
        }
        out.push((data as u64, (hole as u64).min(size)));
        at = hole;
    }
    out
}

/// Writes guest RAM into `out` (an empty file, sized here) and returns its index.
/// `ram_file` is the RAM's own file (the memfd), whose holes are skipped unread.
pub fn save(mem: &GuestMemoryMmap, ram_file: Option<&File>, out: &File) -> Result<RamIndex, Error> {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    out.set_len(size).map_err(Error::Io)?;
    let data = data_ranges(ram_file, size);
    // Every chunk with data in it: (offset in the RAM file, length, guest address).
    let mut candidates = Vec::new();
    let mut d = data.iter().peekable();
    for (file_start, guest, len) in regions(mem) {
        let mut off = 0;
        while off < len {
            let n = CHUNK.min(len - off);
            let at = file_start + off;
            while d.peek().is_some_and(|(_, e)| *e <= at) {
                d.next();
            }
            if d.peek().is_some_and(|(s, _)| *s < at + n) {
                candidates.push((at, n as u32, guest.unchecked_add(off)));
            }
            off += n;
        }
    }
    // One thread: the main loop's, whose seccomp profile creates none (two writers
    // measured no faster here: the page cache's allocation is the bound).
    let chunks = save_chunks(mem, &candidates, out)?;
    Ok(RamIndex { size, chunks })
}

/// An incremental save into `out`, the memory file of the snapshot `last` indexes:
/// only the chunks holding a page of `dirty` (offsets in the RAM file, ascending) are
/// read and written again (a chunk now all zeros becomes a hole); every other chunk
/// keeps its bytes and its checksum. Returns the new index and how many chunks were
/// dirty.
pub fn save_dirty(
    mem: &GuestMemoryMmap,
    dirty: &[u64],
    last: &RamIndex,
    out: &File,
) -> Result<(RamIndex, usize), Error> {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    if last.size != size {
        return Err(Error::Size {
            snapshot: last.size,
            vm: size,
        });
    }
    let mut chunks_dirty: Vec<u64> = dirty.iter().map(|p| p - p % CHUNK).collect();
    chunks_dirty.dedup();
    let regions = regions(mem);
    let mut candidates = Vec::with_capacity(chunks_dirty.len());
    for &at in &chunks_dirty {
        let Some((start, guest, len)) = regions.iter().find(|(s, _, l)| at >= *s && at < s + l)
        else {
            return Err(Error::Guest(format!("dirty page at {at:#x} outside RAM")));
        };
        let n = CHUNK.min(start + len - at);
        candidates.push((at, n as u32, guest.unchecked_add(at - start)));
    }
    let rewritten = save_chunks(mem, &candidates, out)?;
    // Dirty chunks that are all zeros now: holes, as in a full snapshot.
    let mut kept = rewritten.iter().map(|c| c.0).peekable();
    for &(at, n, _) in &candidates {
        if kept.peek() == Some(&at) {
            kept.next();
            continue;
        }
        punch_hole(out, at, n as u64)?;
    }
    // The new index: the old entries of clean chunks, and the rewritten ones.
    let mut chunks: Vec<(u64, u32, u32)> = last
        .chunks
        .iter()
        .filter(|c| chunks_dirty.binary_search(&c.0).is_err())
        .copied()
        .chain(rewritten)
        .collect();
    chunks.sort_unstable_by_key(|c| c.0);
    Ok((RamIndex { size, chunks }, chunks_dirty.len()))
}

fn punch_hole(f: &File, at: u64, len: u64) -> Result<(), Error> {
    // SAFETY: fallocate on a descriptor we hold; no memory is involved.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Reads each chunk of `part`, and writes the ones that are not all zeros.
fn save_chunks(
    mem: &GuestMemoryMmap,
    part: &[(u64, u32, GuestAddress)],
    out: &File,
) -> Result<Vec<(u64, u32, u32)>, Error> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut chunks = Vec::with_capacity(part.len());
    for &(at, n, guest) in part {
        let b = &mut buf[..n as usize];
        mem.read_slice(b, guest)
            .map_err(|e| Error::Guest(e.to_string()))?;
        if b.iter().any(|x| *x != 0) {
            out.write_all_at(b, at).map_err(Error::Io)?;
            chunks.push((at, n, crc32fast::hash(b)));
        }
    }
    Ok(chunks)
}

/// Copies every chunk of `index` from `file` into guest RAM, each checked against its
/// checksum first. The pages the chunks land in are populated first, a run of
/// adjacent chunks at a time (one madvise instead of a fault per page), and the copy is
/// shared between up to four threads.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_file: Option<&File>,
    index: &RamIndex,
    file: &File,
) -> Result<(), Error> {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    if index.size != size {
        return Err(Error::Size {
            snapshot: index.size,
            vm: size,
        });
    }
    let regions = regions(mem);
    // Where each chunk goes: its guest address (a chunk never spans two regions).
    let mut placed = Vec::with_capacity(index.chunks.len());
    for &(offset, len, crc) in &index.chunks {
        let Some((start, guest, _)) = regions
            .iter()
            .find(|(s, _, l)| offset >= *s && offset + len as u64 <= s + l)
        else {
            return Err(Error::Guest(format!(
                "chunk at {offset:#x} spans two regions"
            )));
        };
        placed.push((offset, len, crc, guest.unchecked_add(offset - start)));
    }
    if ram_file.is_none() {
        populate(mem, &placed);
    }
    log::debug!("restore: {} chunks on up to 4 threads", placed.len());
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(placed.len().max(1));
    let per = placed.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let workers: Vec<_> = placed
            .chunks(per)
            .map(|part| s.spawn(move || copy_chunks(mem, ram_file, part, file)))
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(Error::Guest("a copy thread panicked".into())))
        })
    })
}

fn copy_chunks(
    mem: &GuestMemoryMmap,
    ram_file: Option<&File>,
    part: &[(u64, u32, u32, GuestAddress)],
    file: &File,
) -> Result<(), Error> {
    let mut buf = vec![0u8; CHUNK as usize];
    for &(offset, len, crc, guest) in part {
        let b = &mut buf[..len as usize];
        file.read_exact_at(b, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Truncated(offset)
            } else {
                Error::Io(e)
            }
        })?;
        if crc32fast::hash(b) != crc {
            return Err(Error::Checksum(offset));
        }
        // Into the RAM file at the chunk's own offset: the page cache takes it, and no
        // page of the mapping is faulted in until the guest touches it. hugetlbfs has
        // no write(2) (EINVAL): through the mapping instead.
        let written = match ram_file {
            Some(f) => match f.write_all_at(b, offset) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
                Err(e) => return Err(Error::Io(e)),
            },
            None => false,
        };
        if !written {
            mem.write_slice(b, guest)
                .map_err(|e| Error::Guest(e.to_string()))?;
        }
    }
    Ok(())
}

/// MADV_POPULATE_WRITE over each run of adjacent chunks: the pages are there before
/// the copy touches them. Best effort: a kernel without it faults them in as before.
fn populate(mem: &GuestMemoryMmap, placed: &[(u64, u32, u32, GuestAddress)]) {
    let mut runs: Vec<(GuestAddress, u64)> = Vec::new();
    for &(_, len, _, guest) in placed {
        match runs.last_mut() {
            Some((start, l)) if start.0 + *l == guest.0 => *l += len as u64,
            _ => runs.push((guest, len as u64)),
        }
    }
    for (start, len) in runs {
        let Ok(slice) = mem.get_slice(start, len as usize) else {
            continue;
        };
        let ptr = slice.ptr_guard_mut().as_ptr();
        // SAFETY: madvise over a range of guest RAM's own mapping (get_slice checked it
        // lies within one region); it only populates pages, nothing is read or moved.
        unsafe {
            libc::madvise(
                ptr as *mut libc::c_void,
                len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }
}
