//! imago's file storage with bounds of cellvm's: what an image's metadata says is never
//! trusted to stay inside the file.
//!
//! A read that ends past the file's end fails (imago's own file driver would fill the
//! rest with zeroes, so an L2 table pointing past the end would read as "unallocated"
//! and a write through it would put the new table at that offset). A write, zeroing or
//! resize that would take the file past `max_len` (what the image may grow to when its
//! whole virtual disk is written, the same bound the jailer sets as RLIMIT_FSIZE) fails
//! with EFBIG. Either way, only that request fails.

use std::fmt;
use std::io;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::Storage;

pub struct Bounded {
    inner: imago::file::File,
    /// The file never grows past this many bytes (a read-only layer: its size).
    max_len: u64,
}

impl Bounded {
    pub fn new(inner: imago::file::File, max_len: u64) -> Bounded {
        Bounded { inner, max_len }
    }

    fn check_read(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.inner.size()?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "image metadata points past the end of the file ({len} bytes at {offset}, the file has {size})"
                ),
            )),
        }
    }

    fn check_growth(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.max_len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "{len} bytes at {offset} would take the image past its bound of {} bytes",
                    self.max_len
                ),
            )),
        }
    }
}

impl fmt::Debug for Bounded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bounded")
            .field("inner", &self.inner)
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl fmt::Display for Bounded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

// imago's `Storage` in its sync build: every method a plain fn. Each delegates to the
// file driver after the bounds check.
impl Storage for Bounded {
    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }

    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        self.check_read(offset, bufv.len())?;
        // SAFETY: the caller's guarantees (imago's request serialisation) pass through.
        unsafe { self.inner.pure_readv(bufv, offset) }
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        self.check_growth(offset, bufv.len())?;
        // SAFETY: as above.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check_growth(offset, length)?;
        // SAFETY: as above.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check_growth(offset, length)?;
        // SAFETY: as above.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: as above; a discard never grows the file.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn settle_writes(&self) -> io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: the caller's guarantees pass through.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        self.check_growth(new_size, 0)?;
        self.inner.resize(new_size, prealloc_mode)
    }
}
