//! Installing the seccomp profiles of policy/seccomp/ (compiled to BPF by build.rs).
//! Each thread installs its own before it touches guest input; the default action kills
//! the whole process.

use seccompiler::sock_filter;

/// (role, thread kind, variant, BPF bytes) for every compiled profile.
static PROFILES: &[(&str, &str, &str, &[u8])] =
    include!(concat!(env!("OUT_DIR"), "/seccomp_profiles.rs"));

/// What a violation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Kill the process (the default).
    #[default]
    Kill,
    /// Log the violation and let the call through (diagnosis only).
    Log,
    /// No filter at all (diagnosis only; a tenant policy must allow it).
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no seccomp profile {0}/{1}")]
    Missing(String, String),
    #[error("installing seccomp profile {0}/{1}: {2}")]
    Install(String, String, seccompiler::Error),
}

fn program(role: &str, thread: &str, variant: &str) -> Option<Vec<sock_filter>> {
    let (_, _, _, bytes) = PROFILES
        .iter()
        .find(|(r, t, v, _)| *r == role && *t == thread && *v == variant)?;
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| sock_filter {
                code: u16::from_le_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect(),
    )
}

/// Installs `role`'s profile for `thread` on the calling thread.
pub fn install(role: &str, thread: &str, mode: Mode) -> Result<(), Error> {
    let variant = match mode {
        Mode::Off => return Ok(()),
        Mode::Kill => "kill",
        Mode::Log => "log",
    };
    let prog =
        program(role, thread, variant).ok_or_else(|| Error::Missing(role.into(), thread.into()))?;
    seccompiler::apply_filter(&prog).map_err(|e| Error::Install(role.into(), thread.into(), e))
}

/// Installs `role`'s process-wide profile (thread kind `all`) on every thread of the
/// process, on top of policy/seccomp/clone3.json, which answers clone3 ENOSYS: clone3's
/// flags live in memory where BPF cannot read them, so thread creation is pushed to
/// clone, whose flags the profile checks. (Stacked filters: the strictest answer wins.)
pub fn install_process(role: &str, mode: Mode) -> Result<(), Error> {
    let variant = match mode {
        Mode::Off => return Ok(()),
        Mode::Kill => "kill",
        Mode::Log => "log",
    };
    let prog =
        program(role, "all", variant).ok_or_else(|| Error::Missing(role.into(), "all".into()))?;
    let no_clone3 = program("clone3", "enosys", variant)
        .ok_or_else(|| Error::Missing("clone3".into(), "enosys".into()))?;
    // The clone3 filter first: the profile itself does not allow seccomp().
    seccompiler::apply_filter_all_threads(&no_clone3)
        .map_err(|e| Error::Install("clone3".into(), "enosys".into(), e))?;
    seccompiler::apply_filter_all_threads(&prog)
        .map_err(|e| Error::Install(role.into(), "all".into(), e))
}

/// Every (role, thread kind) with a compiled profile.
pub fn profiles() -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = PROFILES
        .iter()
        .filter(|p| p.2 == "kill")
        .map(|p| (p.0, p.1))
        .collect();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_profiles_compile_in_both_variants() {
        for thread in ["main", "vcpu", "stdin", "api"] {
            for variant in ["kill", "log"] {
                let p = program("vmm", thread, variant)
                    .unwrap_or_else(|| panic!("vmm/{thread}/{variant}"));
                assert!(p.len() > 10);
            }
        }
        assert!(profiles().contains(&("vmm", "vcpu")));
    }

    /// Runs `call` in a forked child under `role`/`thread`'s kill profile; returns
    /// Ok(exit status) or Err(the signal that ended it).
    fn in_child(role: &str, thread: &str, call: impl Fn() -> i64) -> Result<i32, i32> {
        let prog = program(role, thread, "kill").expect("profile");
        // SAFETY: the child only installs a filter (no allocation), makes raw syscalls
        // and _exits; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if seccompiler::apply_filter(&prog).is_err() {
                    libc::_exit(100);
                }
                let rc = call();
                // exit, not exit_group: every thread kind's profile has it.
                libc::syscall(libc::SYS_exit, if rc < 0 { 1 } else { 0 });
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            if libc::WIFSIGNALED(status) {
                Err(libc::WTERMSIG(status))
            } else {
                Ok(libc::WEXITSTATUS(status))
            }
        }
    }

    /// A raw syscall whose arguments are integers, or pointers to locals of the caller
    /// that outlive the call.
    fn sys(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> i64 {
        // SAFETY: by the callers' contract the kernel only reads live memory of theirs;
        // every other argument is a plain integer it checks itself.
        unsafe { libc::syscall(nr, a, b, c, d, usize::MAX, 0usize) }
    }

    fn mmap(prot: i32) -> i64 {
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as usize;
        sys(libc::SYS_mmap, 0, 4096, prot as usize, flags)
    }

    /// No profile of any role lets memory become executable: mmap (every profile) and
    /// mprotect (the backends', the only ones that have it) with PROT_EXEC kill, the
    /// same calls without it pass.
    #[test]
    fn no_profile_allows_executable_memory() {
        for (role, thread) in profiles() {
            if role == "clone3" {
                continue;
            }
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            assert_eq!(
                in_child(role, thread, || mmap(rw)),
                Ok(0),
                "{role}/{thread}: mmap RW"
            );
            assert_eq!(
                in_child(role, thread, || mmap(libc::PROT_READ | libc::PROT_EXEC)),
                Err(libc::SIGSYS),
                "{role}/{thread}: mmap R+X"
            );
            if role != "vmm" {
                let mprotect = |prot: i32| {
                    let page = mmap(libc::PROT_READ);
                    sys(libc::SYS_mprotect, page as usize, 4096, prot as usize, 0)
                };
                assert_eq!(
                    in_child(role, thread, || mprotect(rw)),
                    Ok(0),
                    "{role}: mprotect RW"
                );
                assert_eq!(
                    in_child(role, thread, || mprotect(libc::PROT_READ | libc::PROT_EXEC)),
                    Err(libc::SIGSYS),
                    "{role}: mprotect +X"
                );
            }
        }
    }

    /// The API thread serves sockets it was given: accept4, reads and sends pass; it
    /// cannot open a path, make a socket, connect anywhere, run a vCPU or start a
    /// process. (Positive control: the same open, socket and connect calls succeed or
    /// fail with an errno, never a signal, without the filter.)
    #[test]
    fn the_api_thread_serves_its_sockets_and_nothing_else() {
        let root = c"/".as_ptr() as usize;
        let open = move || sys(libc::SYS_openat, libc::AT_FDCWD as usize, root, 0, 0);
        let socket = || sys(libc::SYS_socket, libc::AF_UNIX as usize, 1, 0, 0);
        let connect = || sys(libc::SYS_connect, 0, 0, 0, 0);
        let accept = || sys(libc::SYS_accept4, usize::MAX >> 33, 0, 0, 0);
        let send = || sys(libc::SYS_sendto, usize::MAX >> 33, 0, 0, 0);
        // The positive control, here without a filter: a descriptor, or an errno.
        for call in [&open as &dyn Fn() -> i64, &socket] {
            let fd = call();
            assert!(fd >= 0);
            sys(libc::SYS_close, fd as usize, 0, 0, 0);
        }
        assert_eq!(connect(), -1);
        for (what, call) in [
            ("openat", &open as &dyn Fn() -> i64),
            ("socket", &socket),
            ("connect", &connect),
        ] {
            assert_eq!(
                in_child("vmm", "api", call),
                Err(libc::SIGSYS),
                "api: {what}"
            );
        }
        for (what, call) in [("accept4", &accept as &dyn Fn() -> i64), ("sendto", &send)] {
            // A bad descriptor: EBADF, the call itself allowed.
            assert_eq!(in_child("vmm", "api", call), Ok(1), "api: {what}");
        }
        let kvm_run = || sys(libc::SYS_ioctl, 0, 0xae80, 0, 0);
        assert_eq!(
            in_child("vmm", "api", kvm_run),
            Err(libc::SIGSYS),
            "api: KVM_RUN"
        );
        // The vCPU profile has it (on fd 0: an errno, not a signal).
        assert_eq!(in_child("vmm", "vcpu", kvm_run), Ok(1), "vcpu: KVM_RUN");
        let fork = || sys(libc::SYS_fork, 0, 0, 0, 0);
        assert_eq!(in_child("vmm", "api", fork), Err(libc::SIGSYS), "api: fork");
    }

    /// prctl only names threads, fcntl only duplicates, madvise only drops pages, futex
    /// has no priority-inheritance operations: in every backend profile.
    #[test]
    fn backend_profiles_allow_only_the_operations_the_code_uses() {
        for role in ["blk", "net", "rng", "vsock", "console"] {
            let word = 0u32;
            let word = &word as *const u32 as usize;
            let allowed: [(&str, &dyn Fn() -> i64); 4] = [
                ("PR_SET_NAME", &|| {
                    let name = c"x".as_ptr() as usize;
                    sys(libc::SYS_prctl, libc::PR_SET_NAME as usize, name, 0, 0)
                }),
                ("F_DUPFD_CLOEXEC", &|| {
                    sys(libc::SYS_fcntl, 2, libc::F_DUPFD_CLOEXEC as usize, 3, 0)
                }),
                ("MADV_DONTNEED", &|| {
                    sys(libc::SYS_madvise, 0, 0, libc::MADV_DONTNEED as usize, 0)
                }),
                ("FUTEX_WAKE_PRIVATE", &|| {
                    let op = (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as usize;
                    sys(libc::SYS_futex, word, op, 1, 0)
                }),
            ];
            for (what, call) in allowed {
                assert!(in_child(role, "all", call).is_ok(), "{role}: {what}");
            }
            let refused: [(&str, &dyn Fn() -> i64); 6] = [
                ("PR_SET_DUMPABLE", &|| {
                    sys(libc::SYS_prctl, libc::PR_SET_DUMPABLE as usize, 1, 0, 0)
                }),
                ("PR_SET_MDWE", &|| {
                    sys(libc::SYS_prctl, libc::PR_SET_MDWE as usize, 0, 0, 0)
                }),
                ("F_SETFL", &|| {
                    sys(libc::SYS_fcntl, 2, libc::F_SETFL as usize, 0, 0)
                }),
                ("F_SETOWN", &|| {
                    sys(libc::SYS_fcntl, 2, libc::F_SETOWN as usize, 1, 0)
                }),
                ("MADV_DONTFORK", &|| {
                    sys(libc::SYS_madvise, 0, 0, libc::MADV_DONTFORK as usize, 0)
                }),
                ("FUTEX_LOCK_PI", &|| {
                    sys(libc::SYS_futex, word, libc::FUTEX_LOCK_PI as usize, 0, 0)
                }),
            ];
            for (what, call) in refused {
                assert_eq!(
                    in_child(role, "all", call),
                    Err(libc::SIGSYS),
                    "{role}: {what}"
                );
            }
        }
    }

    /// blk's fallocate keeps the image's size: discard and write-zeroes modes pass (here
    /// on a bad descriptor, EBADF), growing (mode 0) and COLLAPSE_RANGE kill.
    #[test]
    fn blk_fallocate_takes_only_the_modes_that_keep_the_size() {
        // On descriptor -1: the kernel answers EBADF if the filter lets it through.
        let f = |mode: i32| move || sys(libc::SYS_fallocate, usize::MAX, mode as usize, 0, 4096);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            in_child("blk", "all", f(libc::FALLOC_FL_PUNCH_HOLE | keep)),
            Ok(1)
        );
        assert_eq!(
            in_child("blk", "all", f(libc::FALLOC_FL_ZERO_RANGE | keep)),
            Ok(1)
        );
        for mode in [
            0,
            libc::FALLOC_FL_ZERO_RANGE,
            libc::FALLOC_FL_COLLAPSE_RANGE,
            keep,
        ] {
            assert_eq!(
                in_child("blk", "all", f(mode)),
                Err(libc::SIGSYS),
                "mode {mode:#x}"
            );
        }
    }
}
