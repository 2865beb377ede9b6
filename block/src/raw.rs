//! A raw image: the file is the disk.
//!
//! Requests go straight between the image and guest RAM with preadv/pwritev on the
//! guest's own buffers (no copies). FLUSH is fdatasync. DISCARD punches holes,
//! WRITE_ZEROES zeroes ranges (unmapping them when asked); both fall back to writing
//! zeroes where the file system cannot. With O_DIRECT, guest buffers that are not
//! aligned in memory go through an aligned bounce buffer.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::image::{DiskImage, Slice, SECTOR};

pub struct Raw {
    file: File,
    size: u64,
    /// O_DIRECT alignment (memory, file offset), when the image is opened that way.
    direct: Option<(usize, u64)>,
}

impl Raw {
    /// The image as it is: its size is the file's, rounded down to whole sectors.
    pub fn new(file: File) -> io::Result<Raw> {
        let size = file.metadata()?.len() / SECTOR * SECTOR;
        Ok(Raw {
            file,
            size,
            direct: None,
        })
    }

    /// Switches the image to O_DIRECT, with the alignments its file system reports.
    pub fn set_direct(&mut self) -> io::Result<()> {
        self.direct = Some(crate::image::set_direct(&self.file)?);
        Ok(())
    }

    /// One preadv/pwritev over the guest's buffers, repeated until done.
    fn transfer(&self, mut offset: u64, bufs: &[Slice<'_>], write: bool) -> io::Result<()> {
        let mut iov = Vec::with_capacity(bufs.len());
        let mut guards = Vec::with_capacity(bufs.len());
        for b in bufs.iter().filter(|b| !b.is_empty()) {
            let guard = b.ptr_guard_mut();
            iov.push(libc::iovec {
                iov_base: guard.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
            guards.push(guard);
        }
        if let Some((mem_align, _)) = self.direct {
            let aligned = iov
                .iter()
                .all(|v| v.iov_base as usize % mem_align == 0 && v.iov_len % mem_align == 0);
            if !aligned {
                drop(guards);
                return self.bounce(offset, bufs, write, mem_align);
            }
        }
        let mut first = 0;
        while first < iov.len() {
            let n = iov.len() - first;
            let iovcnt = n.min(libc::UIO_MAXIOV as usize) as libc::c_int;
            // SAFETY: every iovec points into a guest buffer the caller's VolatileSlice
            // covers, kept mapped by `guards`; the kernel reads or writes only those bytes.
            let done = unsafe {
                if write {
                    libc::pwritev(
                        self.file.as_raw_fd(),
                        iov[first..].as_ptr(),
                        iovcnt,
                        offset as i64,
                    )
                } else {
                    libc::preadv(
                        self.file.as_raw_fd(),
                        iov[first..].as_ptr(),
                        iovcnt,
                        offset as i64,
                    )
                }
            };
            if done < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if done == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            offset += done as u64;
            let mut left = done as usize;
            while left > 0 && first < iov.len() {
                let v = &mut iov[first];
                if left >= v.iov_len {
                    left -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same buffer by fewer than its length.
                    v.iov_base = unsafe { (v.iov_base as *mut u8).add(left) } as *mut libc::c_void;
                    v.iov_len -= left;
                    left = 0;
                }
            }
        }
        drop(guards);
        Ok(())
    }

    /// O_DIRECT with guest buffers that are not aligned in memory: through an aligned
    /// host buffer, one chunk at a time.
    fn bounce(&self, offset: u64, bufs: &[Slice<'_>], write: bool, align: usize) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let layout = std::alloc::Layout::from_size_align(CHUNK, align.max(4096))
            .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: a non-zero-sized layout; freed below on every path.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        // SAFETY: `ptr` holds CHUNK bytes we own until the dealloc below.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, CHUNK) };
        let result = (|| {
            let mut done = 0usize;
            let (mut seg, mut seg_off) = (0usize, 0usize);
            while done < total {
                let n = (total - done).min(CHUNK);
                if !write {
                    self.file
                        .read_exact_at(&mut buf[..n], offset + done as u64)?;
                }
                // Copy between the chunk and the guest's buffers.
                let mut at = 0;
                while at < n {
                    let s = &bufs[seg];
                    let k = (s.len() - seg_off).min(n - at);
                    let part = s
                        .subslice(seg_off, k)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    if write {
                        part.copy_to(&mut buf[at..at + k]);
                    } else {
                        part.copy_from(&buf[at..at + k]);
                    }
                    at += k;
                    seg_off += k;
                    if seg_off == s.len() {
                        seg += 1;
                        seg_off = 0;
                    }
                }
                if write {
                    self.file.write_all_at(&buf[..n], offset + done as u64)?;
                }
                done += n;
            }
            Ok(())
        })();
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) };
        result
    }

    fn fallocate_or_zero(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a descriptor we own; the caller checked the range.
        let ok =
            unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) } == 0;
        if ok {
            Ok(())
        } else {
            self.zero_fill(offset, len)
        }
    }

    fn zero_fill(&self, offset: u64, len: u64) -> io::Result<()> {
        // Page-aligned, so the same buffer serves O_DIRECT.
        #[repr(C, align(4096))]
        struct Zeroes([u8; 1 << 16]);
        static ZEROES: Zeroes = Zeroes([0; 1 << 16]);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.0.len() as u64) as usize;
            self.file.write_all_at(&ZEROES.0[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl DiskImage for Raw {
    fn format(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u64 {
        self.direct.map_or(SECTOR, |d| d.1)
    }

    fn read(&self, offset: u64, bufs: &[Slice<'_>]) -> io::Result<()> {
        self.transfer(offset, bufs, false)
    }

    fn write(&self, offset: u64, bufs: &[Slice<'_>]) -> io::Result<()> {
        self.transfer(offset, bufs, true)
    }

    fn flush(&self) -> io::Result<()> {
        // SAFETY: fdatasync on a descriptor we own.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate_or_zero(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        self.fallocate_or_zero(mode | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }
}
