//! The counters a backend keeps for its VMM to read: one page of a sealed memfd that
//! whoever starts the backend (the jailer, or `cellvm run`) makes and hands to both. The
//! data path never passes through the VMM (vhost-user), so this is how `vm.counters`,
//! `/metrics` and `cellvmctl stats` learn of requests, bytes and errors: the backend
//! adds to a slot with one atomic instruction, the VMM loads it, and neither makes a
//! system call or waits on the other.
//!
//! The page is the backend's word, as untrusted as anything a cell says: the VMM only
//! ever loads whole aligned u64s from it and reports them as the backend's. The memfd is
//! sealed against shrinking before either maps it, so a compromised backend cannot
//! truncate it under the VMM (which would turn the VMM's next load into a SIGBUS).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The page's size: the memfd's whole length.
pub const PAGE: usize = 4096;
const SLOTS: usize = PAGE / 8;

/// One counter of the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Requests served: a blk request, a frame sent or received, an rng fill.
    Requests = 0,
    /// Requests that failed (an I/O error status, a frame dropped).
    Errors = 1,
    /// Data bytes moved into guest buffers (blk reads, received frames, random bytes).
    BytesToGuest = 2,
    /// Data bytes taken from guest buffers (blk writes, sent frames).
    BytesFromGuest = 3,
}

/// Every slot with the name it is reported under, in page order.
pub const SLOTS_REPORTED: [(Slot, &str); 4] = [
    (Slot::Requests, "requests"),
    (Slot::Errors, "errors"),
    (Slot::BytesToGuest, "bytes_to_guest"),
    (Slot::BytesFromGuest, "bytes_from_guest"),
];

type Page = [AtomicU64; SLOTS];

/// Makes the page: a memfd of PAGE bytes, not executable, sealed against shrinking,
/// growing and further seals. The descriptor is close-on-exec; the caller passes it on.
pub fn create() -> std::io::Result<OwnedFd> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_NOEXEC_SEAL;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"cellvm-counters".as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate and fcntl on a descriptor we own, no pointers.
    let ok = unsafe {
        libc::ftruncate(fd.as_raw_fd(), PAGE as libc::off_t) == 0
            && libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            ) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Maps `fd` after checking it is a page that cannot shrink; the mapping lasts as long
/// as the process (each process maps a handful of these, once).
fn map(fd: RawFd, writable: bool) -> std::io::Result<&'static Page> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
    // SAFETY: fcntl(F_GET_SEALS) takes no pointer; an fd that is not a memfd fails.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(invalid(format!(
            "counters fd {fd}: not a sealed memfd ({})",
            std::io::Error::last_os_error()
        )));
    }
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(invalid(format!(
            "counters fd {fd}: not sealed against shrinking"
        )));
    }
    // SAFETY: fstat writes into the zeroed struct it is given.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; st is a valid, writable libc::stat.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_size < PAGE as libc::off_t {
        return Err(invalid(format!(
            "counters fd {fd}: {} bytes, not a page",
            st.st_size
        )));
    }
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh shared mapping of PAGE bytes of a file at least that long that
    // cannot shrink (checked above), at an address the kernel chooses.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, prot, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the mapping is PAGE bytes, page-aligned (so u64-aligned), never unmapped,
    // and only ever accessed through atomics; AtomicU64 has the layout of u64.
    Ok(unsafe { &*(p as *const Page) })
}

/// This backend's page, once `attach` has mapped it.
static OWN: OnceLock<&'static Page> = OnceLock::new();

/// Backend side: maps the page handed over as `fd` for the counting below. Called once,
/// before the first request.
pub fn attach(fd: RawFd) -> std::io::Result<()> {
    let page = map(fd, true)?;
    let _ = OWN.set(page);
    // The mapping stays; the descriptor is not needed for it.
    // SAFETY: the descriptor was handed to this process to own (--counters-fd).
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Adds `n` to `slot` of this backend's page (nothing when none was attached).
pub fn add(slot: Slot, n: u64) {
    if let Some(page) = OWN.get() {
        page[slot as usize].fetch_add(n, Ordering::Relaxed);
    }
}

/// One request that failed: counted as a request and as an error.
pub fn failed() {
    add(Slot::Requests, 1);
    add(Slot::Errors, 1);
}

/// VMM side: a backend's page, read-only.
pub struct Reader(&'static Page);

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Reader").field(&self.read()).finish()
    }
}

impl Reader {
    /// Maps the page `fd` holds, read-only. The descriptor stays the caller's.
    pub fn new(fd: RawFd) -> std::io::Result<Reader> {
        map(fd, false).map(Reader)
    }

    /// Every slot's value now, with its name.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        SLOTS_REPORTED
            .iter()
            .map(|&(slot, name)| (name, self.0[slot as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_cannot_shrink_or_grow_and_a_reader_sees_the_writers_counts() {
        let fd = create().unwrap();
        for size in [0, PAGE as libc::off_t / 2, 2 * PAGE as libc::off_t] {
            // SAFETY: ftruncate on our own descriptor, no pointers.
            let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
            assert_eq!(r, -1, "ftruncate to {size} succeeded");
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
        }
        let writer = map(fd.as_raw_fd(), true).unwrap();
        let reader = Reader::new(fd.as_raw_fd()).unwrap();
        writer[Slot::Requests as usize].fetch_add(3, Ordering::Relaxed);
        writer[Slot::BytesToGuest as usize].fetch_add(4096, Ordering::Relaxed);
        let got = reader.read();
        assert_eq!(
            got,
            vec![
                ("requests", 3),
                ("errors", 0),
                ("bytes_to_guest", 4096),
                ("bytes_from_guest", 0)
            ]
        );
    }

    #[test]
    fn a_descriptor_that_is_not_a_sealed_page_is_refused() {
        // A regular file: no seals at all.
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(Reader::new(f.as_raw_fd()).is_err());
        // A memfd that may still shrink.
        // SAFETY: memfd_create with a NUL-terminated name; checked below.
        let raw = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor we own.
        let m = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own descriptor.
        let r = unsafe { libc::ftruncate(m.as_raw_fd(), PAGE as libc::off_t) };
        assert_eq!(r, 0);
        let err = Reader::new(m.as_raw_fd()).unwrap_err().to_string();
        assert!(err.contains("not sealed against shrinking"), "{err}");
    }
}
