//! What the VMM and every device backend do to themselves first, before any input:
//! layers that do not depend on the jailer.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("prctl(PR_SET_DUMPABLE, 0): {0}")]
    Dumpable(std::io::Error),
    #[error("prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): {0}")]
    Mdwe(std::io::Error),
}

/// Whether memory-deny-write-execute is on for this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mdwe {
    /// PR_MDWE_REFUSE_EXEC_GAIN: no mapping may become executable (mprotect adding
    /// PROT_EXEC) and none may be writable and executable at once.
    On,
    /// The kernel predates it (Linux 6.3); seccomp's PROT_EXEC rules remain.
    Unsupported,
}

/// Makes the calling process
/// - non-dumpable (PR_SET_DUMPABLE 0): no core dumps of guest memory, and neither
///   ptrace nor /proc/PID/{mem,environ,fd} for other processes of its own uid;
/// - memory-deny-write-execute (PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), a second layer
///   beside the seccomp profiles against turning written bytes into code. It does not
///   stop a fresh read+execute mapping of a file (only seccomp does); it stops
///   mprotect adding PROT_EXEC, and write+execute mappings. It cannot be undone.
///
/// Both are inherited by threads; MDWE also by children.
///
/// It also gives glibc's allocator a single arena. A thread that finds the arena busy
/// would otherwise create another, and the first such one reads
/// /sys/devices/system/cpu/online to size their number (and shrinking a non-main
/// arena's heap reads /proc/sys/vm/overcommit_memory): an open(2) long after every
/// seccomp profile forbade one, which killed a busy vsock backend now and then.
pub fn lock_process() -> Result<Mdwe, Error> {
    // SAFETY: mallopt with integer arguments, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(Error::Dumpable(std::io::Error::last_os_error()));
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_MDWE,
            libc::PR_MDWE_REFUSE_EXEC_GAIN as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            log::warn!("PR_SET_MDWE is not supported by this kernel (Linux 6.3+): seccomp alone forbids PROT_EXEC");
            return Ok(Mdwe::Unsupported);
        }
        return Err(Error::Mdwe(e));
    }
    Ok(Mdwe::On)
}

/// Whether MDWE is on for the calling process (PR_GET_MDWE).
pub fn mdwe_on() -> bool {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_GET_MDWE, 0, 0, 0, 0) };
    rc > 0 && rc as libc::c_uint & libc::PR_MDWE_REFUSE_EXEC_GAIN != 0
}
