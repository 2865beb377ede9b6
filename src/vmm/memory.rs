//! Guest RAM: one sealed memfd (no grow, no shrink), mapped around the 32-bit PCI hole
//! and registered with KVM. Device backends later map the same fd.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout;
use crate::vmm::config::HugePages;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("memfd_create: {0}")]
    Memfd(std::io::Error),
    #[error(
        "guest RAM: this kernel cannot seal a memfd against execution (MFD_NOEXEC_SEAL, Linux 6.3+); \
         a tenant policy may allow the downgrade (--allow-executable-ram)"
    )]
    NoExecSeal,
    #[error("sizing guest RAM to {0} bytes: {1}")]
    Size(u64, std::io::Error),
    #[error(
        "hugepages: guest RAM needs {need} pages of {size}, and the host's pool (or the cgroup's \
         hugetlb limit) cannot give them ({free} free; sysctl vm.nr_hugepages, or \
         /sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages): {source}"
    )]
    HugePool {
        need: u64,
        size: crate::vmm::config::HugePages,
        free: String,
        kib: u64,
        source: std::io::Error,
    },
    #[error("sealing guest RAM: {0}")]
    Seal(std::io::Error),
    #[error("mapping guest RAM: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    #[error("madvise(MADV_MERGEABLE) on guest RAM: {0}")]
    Mergeable(std::io::Error),
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    Slot(kvm_ioctls::Error),
    #[error("memory file: {0}")]
    File(String),
    #[error("prefaulting guest RAM: {0}")]
    Prefault(std::io::Error),
    #[error(
        "mlock of guest RAM ({bytes} bytes): {source} (RLIMIT_MEMLOCK is {limit}; the tenant \
         policy's mlock lets the jailer raise it)"
    )]
    Lock {
        bytes: u64,
        limit: String,
        source: std::io::Error,
    },
}

pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    /// The memfd (none for mergeable RAM).
    pub file: Option<File>,
}

/// The flags guest RAM's memfd is made with: sealed against execution
/// (`MFD_NOEXEC_SEAL`: mode 0666, and `F_SEAL_EXEC` so it can never be made executable),
/// so guest-written bytes can never be exec'd (execveat) from this descriptor.
pub const RAM_MEMFD_FLAGS: libc::c_uint =
    libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_NOEXEC_SEAL;

/// The memfd flags that select hugetlb pages of `h`.
fn huge_flags(h: Option<HugePages>) -> libc::c_uint {
    match h {
        None => 0,
        Some(HugePages::Size2M) => libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        Some(HugePages::Size1G) => libc::MFD_HUGETLB | libc::MFD_HUGE_1GB,
    }
}

/// Creates guest RAM. Where the kernel predates `MFD_NOEXEC_SEAL` (EINVAL), refuses
/// unless `allow_executable` (the tenant policy's approved downgrade), and then says so.
/// With `huge`, the memfd is hugetlb-backed and every page is allocated here
/// (fallocate): a pool too small for the VM is an error now, never a SIGBUS when the
/// guest first touches a page.
pub fn create(
    size: u64,
    allow_executable: bool,
    huge: Option<HugePages>,
) -> Result<GuestRam, Error> {
    let name = CString::new("cellvm-guest-ram").expect("static name");
    let flags = RAM_MEMFD_FLAGS | huge_flags(huge);
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked below and
    // owned by the File from then on.
    let mut fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        if !allow_executable {
            return Err(Error::NoExecSeal);
        }
        log::warn!(
            "guest RAM: this kernel cannot seal a memfd against execution (MFD_NOEXEC_SEAL, \
             Linux 6.3+); running without it, as the tenant policy allows"
        );
        // SAFETY: as above, without the flag this kernel does not know.
        fd = unsafe {
            libc::memfd_create(
                name.as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | huge_flags(huge),
            )
        };
    }
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| Error::Size(size, e))?;
    if let Some(h) = huge {
        let kib = h.sysfs_kib();
        // Read before the allocation takes what there is.
        let free = std::fs::read_to_string(format!(
            "/sys/kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages"
        ))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "none".into());
        // SAFETY: fallocate on a descriptor we own, within the size just set.
        if unsafe { libc::fallocate(fd, 0, 0, size as libc::off_t) } < 0 {
            return Err(Error::HugePool {
                need: size / h.bytes(),
                size: h,
                free,
                kib,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::Seal(std::io::Error::last_os_error()));
    }
    let mem = map_file(&file, size)?;
    if huge.is_none() {
        advise_transparent_huge_pages(&mem);
    }
    Ok(GuestRam {
        mem,
        file: Some(file),
    })
}

/// Maps `file` as guest RAM around the PCI hole: its bytes in order, region by region.
fn map_file(file: &File, size: u64) -> Result<GuestMemoryMmap, Error> {
    let mut ranges = Vec::new();
    let mut offset = 0;
    for (start, len) in layout::ram_regions(size) {
        let fo = FileOffset::new(file.try_clone().map_err(Error::Memfd)?, offset);
        ranges.push((GuestAddress(start), len as usize, Some(fo)));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(Error::Map)
}

/// Guest RAM in `file` (a regular file the launcher opened read-write): sized to `size`
/// if empty, else it must be exactly `size` (what an earlier run of the same VM left).
/// Unlike a memfd it cannot be sealed: whoever else may write the file could resize it
/// under the VM, so the launcher keeps it in a directory of root's and locks it. It must
/// carry no execute permission. Shared with the device backends like memfd RAM.
pub fn create_in_file(file: File, size: u64) -> Result<GuestRam, Error> {
    use std::os::unix::fs::PermissionsExt;
    let meta = file.metadata().map_err(|e| Error::File(e.to_string()))?;
    if !meta.is_file() {
        return Err(Error::File("not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 != 0 {
        return Err(Error::File(format!(
            "mode {:04o} carries an execute bit; guest RAM must never be executable",
            meta.permissions().mode() & 0o7777
        )));
    }
    match meta.len() {
        0 => file.set_len(size).map_err(|e| Error::Size(size, e))?,
        n if n == size => {}
        n => {
            return Err(Error::File(format!(
                "{n} bytes, neither empty nor the VM's {size} bytes of RAM"
            )))
        }
    }
    let mem = map_file(&file, size)?;
    Ok(GuestRam {
        mem,
        file: Some(file),
    })
}

/// Asks for transparent huge pages on memfd RAM (MADV_HUGEPAGE). It takes effect where
/// the host enables shmem THP for such requests
/// (/sys/kernel/mm/transparent_hugepage/shmem_enabled `advise`, `within_size` or
/// `always`); with `never` (this project's development hosts' default) RAM stays in
/// 4 KiB pages. Best effort: a kernel without THP refuses the advice, and nothing else
/// changes.
fn advise_transparent_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        // SAFETY: madvise on a mapping `mem` owns, over exactly its length; the advice
        // changes only how the kernel backs it.
        unsafe {
            libc::madvise(
                region.as_ptr() as *mut libc::c_void,
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
    }
}

/// Guest RAM as private anonymous memory marked MADV_MERGEABLE, so KSM may share its
/// pages with identical ones of other VMs (copy-on-write). KSM does not scan shared
/// memory, so this RAM has no memfd and cannot be handed to device backends.
pub fn create_mergeable(size: u64) -> Result<GuestRam, Error> {
    let ranges: Vec<_> = layout::ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(Error::Map)?;
    for region in mem.iter() {
        // SAFETY: madvise on a mapping `mem` owns, over exactly its length.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr() as *mut libc::c_void,
                region.len() as usize,
                libc::MADV_MERGEABLE,
            )
        };
        if rc < 0 {
            return Err(Error::Mergeable(std::io::Error::last_os_error()));
        }
    }
    Ok(GuestRam { mem, file: None })
}

/// Allocates and maps every page of guest RAM now (MADV_POPULATE_WRITE on each
/// mapping): the memfd's pages are resident and charged to the cgroup, and the guest
/// takes no page fault on them later.
pub fn prefault(ram: &GuestRam) -> Result<(), Error> {
    for region in ram.mem.iter() {
        // SAFETY: madvise on a mapping `mem` owns, over exactly its length.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr() as *mut libc::c_void,
                region.len() as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc < 0 {
            return Err(Error::Prefault(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Locks every RAM mapping in host memory (mlock faults every page in first).
pub fn lock(ram: &GuestRam) -> Result<(), Error> {
    for region in ram.mem.iter() {
        // SAFETY: mlock of a mapping `mem` owns, over exactly its length; it stays
        // mapped for the VM's life.
        if unsafe {
            libc::mlock(
                region.as_ptr() as *const libc::c_void,
                region.len() as usize,
            )
        } < 0
        {
            let source = std::io::Error::last_os_error();
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit into a valid struct.
            let limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } == 0 {
                if r.rlim_cur == libc::RLIM_INFINITY {
                    "unlimited".to_string()
                } else {
                    format!("{} bytes", r.rlim_cur)
                }
            } else {
                "unknown".to_string()
            };
            return Err(Error::Lock {
                bytes: ram.mem.iter().map(|r| r.len()).sum(),
                limit,
                source,
            });
        }
    }
    Ok(())
}

/// Registers every RAM region as a KVM memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    register_with(vm, mem, 0)
}

/// Registers the slots again with KVM_MEM_LOG_DIRTY_PAGES: from now on KVM records
/// every page the guest writes (read back and cleared by `dirty_pages`).
pub fn log_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    register_with(vm, mem, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)
}

/// The offsets in the RAM file of the pages written since the last call (or since
/// logging began), ascending; the log is cleared.
pub fn dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<u64>, Error> {
    let mut out = Vec::new();
    let mut file_offset = 0;
    for (slot, region) in mem.iter().enumerate() {
        let bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(Error::Slot)?;
        for (word, bits) in bitmap.iter().enumerate() {
            let mut b = *bits;
            while b != 0 {
                let bit = b.trailing_zeros() as u64;
                out.push(file_offset + (word as u64 * 64 + bit) * 4096);
                b &= b - 1;
            }
        }
        file_offset += region.len();
    }
    Ok(out)
}

fn register_with(vm: &VmFd, mem: &GuestMemoryMmap, flags: u32) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping stays alive as long as `mem`, which the VM owns for its
        // whole life; the region does not overlap another slot (ram_regions is disjoint).
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(Error::Slot)?;
    }
    Ok(())
}

/// The host's total RAM, the ceiling for `--memory`.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;

    /// Guest RAM's memfd carries no execute bit and the exec seal, so it can never be
    /// exec'd nor made executable (chmod +x fails).
    #[test]
    fn guest_ram_is_sealed_against_execution() {
        let ram = create(16 << 20, false, None).expect("guest RAM");
        let file = ram.file.expect("a memfd");
        let mode = file.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0, "mode {mode:o}");
        // SAFETY: fcntl(F_GET_SEALS) on a descriptor we own; no pointers.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert!(
            seals >= 0 && seals & libc::F_SEAL_EXEC != 0,
            "seals {seals:#x}"
        );
        let err = file
            .set_permissions(std::fs::Permissions::from_mode(0o755))
            .expect_err("chmod +x of sealed guest RAM");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
}
