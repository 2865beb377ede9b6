//! The seam between the virtio-blk request code and the image formats.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// A guest buffer, as the request code hands it over (cellvm tracks no dirty pages).
pub type Slice<'a> = vm_memory::VolatileSlice<'a, ()>;

/// The unit of the virtio-blk protocol.
pub const SECTOR: u64 = 512;

/// A disk as the guest sees it, whatever the file format under it. Shared by every
/// queue's thread: all methods take `&self`; implementations do their own locking.
///
/// Offsets and lengths are bytes of the virtual disk; the request code has checked them
/// against [`DiskImage::size`] and the block size before calling. A method that fails
/// fails that one request (the guest sees an I/O error); none panics on what an image
/// holds.
pub trait DiskImage: Send + Sync {
    /// The format's name, for messages ("raw", "qcow2").
    fn format(&self) -> &'static str;

    /// The virtual size in bytes.
    fn size(&self) -> u64;

    /// The block size the device advertises: requests keep to it (O_DIRECT alignment for
    /// a raw image opened that way, else 512).
    fn block_size(&self) -> u64 {
        SECTOR
    }

    /// Fills `bufs`, in order, from `offset`.
    fn read(&self, offset: u64, bufs: &[Slice<'_>]) -> io::Result<()>;

    /// Writes `bufs`, in order, at `offset`.
    fn write(&self, offset: u64, bufs: &[Slice<'_>]) -> io::Result<()>;

    /// Makes every completed write durable (virtio FLUSH).
    fn flush(&self) -> io::Result<()>;

    /// DISCARD: the range may give its space back; it reads as zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// WRITE_ZEROES: the range reads as zeroes; with `unmap` its space may be given back.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// Why an image cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The image is one cellvm refuses to serve (encrypted, a feature bit it does not
    /// implement, metadata outside the file, a chain that does not match its headers).
    #[error("{0}")]
    Refused(String),
    /// Reading or opening failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl OpenError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> OpenError {
        let what = what.into();
        move |source| OpenError::Io { what, source }
    }
}

/// statx's STATX_DIOALIGN (Linux 6.1): the O_DIRECT alignments of a file.
const STATX_DIOALIGN: u32 = 0x2000;

/// Switches `file` to O_DIRECT; returns the alignments (memory, file offset) its file
/// system reports.
pub(crate) fn set_direct(file: &File) -> io::Result<(usize, u64)> {
    let fd = file.as_raw_fd();
    // SAFETY: an all-zero statx is a valid buffer for the kernel to fill.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx of our descriptor (empty path, AT_EMPTY_PATH) into `st`.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut st,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if st.stx_mask & STATX_DIOALIGN == 0 || st.stx_dio_mem_align == 0 {
        return Err(io::Error::other(
            "the image's file system does not support O_DIRECT",
        ));
    }
    let offset_align = (st.stx_dio_offset_align as u64).max(SECTOR);
    if !offset_align.is_power_of_two() || offset_align > 4096 {
        return Err(io::Error::other(format!(
            "O_DIRECT offset alignment {offset_align} is not a block size the device can advertise"
        )));
    }
    // SAFETY: fcntl on our descriptor, no pointers.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_DIRECT) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((st.stx_dio_mem_align as usize, offset_align))
}
