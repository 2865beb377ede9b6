//! Who the cell runs as: the VM's own uid/gid, no supplementary groups, no capability
//! in any set (bounding and ambient included), no_new_privs, tight rlimits, no
//! inherited descriptors, and an empty environment (applied at exec).

fn check(rc: libc::c_int, what: &str) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

/// Closes every descriptor above stderr except those in `keep`.
pub fn close_inherited_fds(keep: &[i32]) -> Result<(), String> {
    let mut start = 3u32;
    let mut keep: Vec<u32> = keep.iter().map(|&f| f as u32).filter(|&f| f >= 3).collect();
    keep.sort_unstable();
    for k in keep {
        if k > start {
            // SAFETY: close_range on a range of our own descriptors.
            check(
                unsafe { libc::syscall(libc::SYS_close_range, start, k - 1, 0) } as i32,
                "close_range",
            )?;
        }
        start = k + 1;
    }
    // SAFETY: as above.
    check(
        unsafe { libc::syscall(libc::SYS_close_range, start, u32::MAX, 0) } as i32,
        "close_range",
    )
}

pub struct Limits {
    pub nofile: u64,
    pub nproc: u64,
    /// Must cover the memfd that holds guest RAM (ftruncate is bounded by RLIMIT_FSIZE).
    pub fsize: u64,
}

pub fn set_rlimits(l: &Limits) -> Result<(), String> {
    for (res, v, name) in [
        (libc::RLIMIT_NOFILE, l.nofile, "RLIMIT_NOFILE"),
        (libc::RLIMIT_NPROC, l.nproc, "RLIMIT_NPROC"),
        (libc::RLIMIT_CORE, 0, "RLIMIT_CORE"),
        (libc::RLIMIT_FSIZE, l.fsize, "RLIMIT_FSIZE"),
        (libc::RLIMIT_MEMLOCK, 0, "RLIMIT_MEMLOCK"),
    ] {
        let r = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: a valid rlimit struct.
        check(unsafe { libc::setrlimit(res, &r) }, name)?;
    }
    Ok(())
}

/// Drops to `uid`/`gid` with no capabilities left anywhere, then sets no_new_privs.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    // The bounding set can only be emptied while we still hold CAP_SETPCAP.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments; EINVAL past the last capability.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(format!(
                "PR_CAPBSET_DROP {cap}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: prctl with integer arguments.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        },
        "clear ambient capabilities",
    )?;
    check(
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) },
        "PR_SET_KEEPCAPS 0",
    )?;
    // SAFETY: setgroups with an empty list; setres[ug]id with integers.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, "setgroups")?;
    check(unsafe { libc::setresgid(gid, gid, gid) }, "setresgid")?;
    check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid")?;
    // Leaving uid 0 cleared permitted and effective; empty the inheritable set too.
    let header = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a v3 header and two data words, as the kernel expects.
    check(
        unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } as i32,
        "capset",
    )?;
    // SAFETY: prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "PR_SET_NO_NEW_PRIVS",
    )
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
