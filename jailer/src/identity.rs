//! Who the cell runs as: the VM's own uid/gid, no supplementary groups, no capability
//! in any set (bounding and ambient included), no_new_privs, tight rlimits, no
//! inherited descriptors, a session of its own without a terminal, and an empty
//! environment (applied at exec).

use std::os::fd::RawFd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("the supervisor is gone")]
    SupervisorGone,
}

fn check(rc: libc::c_int, what: &str) -> Result<(), Error> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Sys {
            what: what.to_string(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Puts `stdio` on descriptors 0, 1 and 2 (open across exec): /dev/null or the
/// supervisor's pipes, never what the jailer itself inherited (the operator's terminal).
pub fn set_stdio(stdio: [RawFd; 3]) -> Result<(), Error> {
    for (target, fd) in stdio.into_iter().enumerate() {
        let target = target as RawFd;
        if fd == target {
            check(
                // SAFETY: fcntl on a descriptor this process holds.
                unsafe { libc::fcntl(fd, libc::F_SETFD, 0) },
                "fcntl on stdio",
            )?;
        } else {
            // SAFETY: dup2 between descriptors this process holds; the copy is not
            // close-on-exec.
            if unsafe { libc::dup2(fd, target) } != target {
                return Err(Error::Sys {
                    what: format!("dup2 onto {target}"),
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

/// In the jailer itself, first: descriptors 0, 1 and 2 open (/dev/null where they were
/// closed), so that no descriptor it opens later gets one of those numbers and is then
/// replaced by a cell's stdio.
pub fn ensure_stdio_open() -> Result<(), Error> {
    for fd in 0..3 {
        // SAFETY: F_GETFD on any number only reports whether it is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: open of a constant path; the lowest free number is `fd`, which
            // stays open for the jailer's lifetime.
            if unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) } < 0 {
                return Err(Error::Sys {
                    what: "/dev/null".into(),
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

/// Closes every descriptor above stderr except those in `keep`.
pub fn close_inherited_fds(keep: &[RawFd]) -> Result<(), Error> {
    let mut start = 3u32;
    let mut keep: Vec<u32> = keep.iter().map(|&f| f as u32).filter(|&f| f >= 3).collect();
    keep.sort_unstable();
    keep.dedup();
    for k in keep {
        if k > start {
            check(
                // SAFETY: close_range on a range of our own descriptors.
                unsafe { libc::syscall(libc::SYS_close_range, start, k - 1, 0) } as i32,
                "close_range",
            )?;
        }
        start = k + 1;
    }
    check(
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_close_range, start, u32::MAX, 0) } as i32,
        "close_range",
    )
}

/// A session of its own: no controlling terminal, and nothing of the operator's
/// session (no TIOCSTI into its terminal, no signals from its job control).
pub fn new_session() -> Result<(), Error> {
    // SAFETY: setsid has no arguments; it fails only for a process group leader.
    if unsafe { libc::setsid() } < 0 {
        return Err(Error::Sys {
            what: "setsid".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Writing past RLIMIT_FSIZE fails with EFBIG instead of killing the process
/// (SIG_IGN survives exec).
pub fn ignore_sigxfsz() -> Result<(), Error> {
    // SAFETY: installs SIG_IGN, no handler code.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(Error::Sys {
            what: "ignore SIGXFSZ".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub struct Limits {
    pub nofile: u64,
    pub nproc: u64,
    /// The largest regular file the cell may write: its disk image (a blk backend) or
    /// its guest RAM memfd (the VMM: ftruncate is bounded by RLIMIT_FSIZE).
    pub fsize: u64,
    /// Bytes the cell may mlock: 0, or its guest RAM where the policy allows locking.
    pub memlock: u64,
}

pub fn set_rlimits(l: &Limits) -> Result<(), Error> {
    for (res, v, name) in [
        (libc::RLIMIT_NOFILE, l.nofile, "RLIMIT_NOFILE"),
        (libc::RLIMIT_NPROC, l.nproc, "RLIMIT_NPROC"),
        (libc::RLIMIT_CORE, 0, "RLIMIT_CORE"),
        (libc::RLIMIT_FSIZE, l.fsize, "RLIMIT_FSIZE"),
        (libc::RLIMIT_MEMLOCK, l.memlock, "RLIMIT_MEMLOCK"),
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
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), Error> {
    // The bounding set can only be emptied while we still hold CAP_SETPCAP.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments; EINVAL past the last capability.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(Error::Sys {
                what: format!("PR_CAPBSET_DROP {cap}"),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    check(
        // SAFETY: prctl with integer arguments.
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
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) },
        "PR_SET_KEEPCAPS 0",
    )?;
    // SAFETY: setgroups with an empty list.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, "setgroups")?;
    // SAFETY: setresgid with integers.
    check(unsafe { libc::setresgid(gid, gid, gid) }, "setresgid")?;
    // SAFETY: setresuid with integers.
    check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid")?;
    // Leaving uid 0 cleared permitted and effective; empty the inheritable set too.
    let header = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    check(
        // SAFETY: capset with a v3 header and two data words, as the kernel expects.
        unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } as i32,
        "capset",
    )?;
    check(
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "PR_SET_NO_NEW_PRIVS",
    )
}

/// SIGKILL when the supervisor dies. Set after the uid change (changing credentials
/// clears it), then checked against the supervisor having died already: `to_supervisor`
/// is the write end of a pipe only the supervisor reads, so POLLERR means it is gone.
pub fn die_with_supervisor(to_supervisor: RawFd) -> Result<(), Error> {
    check(
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
        "PR_SET_PDEATHSIG",
    )?;
    let mut p = libc::pollfd {
        fd: to_supervisor,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, without waiting.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    if rc < 0 {
        return Err(Error::Sys {
            what: "poll the supervisor's pipe".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        return Err(Error::SupervisorGone);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors, owned from here on.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// In a forked child (PR_SET_PDEATHSIG must not touch the test runner): Ok while
    /// the supervisor's end of the pipe is open, SupervisorGone once it is closed.
    #[test]
    fn a_cell_whose_supervisor_already_died_notices_it() {
        // SAFETY: fork in a test; the child only makes syscalls and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let (r, w) = pipe();
            let alive = die_with_supervisor(w.as_raw_fd()).is_ok();
            drop(r);
            let gone = matches!(
                die_with_supervisor(w.as_raw_fd()),
                Err(Error::SupervisorGone)
            );
            // SAFETY: leaving the forked child without running the harness's code.
            unsafe { libc::_exit(if alive && gone { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}
