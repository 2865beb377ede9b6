//! Test-only escape probes. `cellvm-jailer launch --probe NAME` runs `cellvm probe NAME`
//! in exactly the VMM's cell (with `--probe-in blk|rng`: a device backend's cell); the
//! probe installs that role's seccomp profile (the VMM's main thread, or the backend's)
//! (unless told `--seccomp off`, for the layer-by-layer tests), tries one thing the cell
//! must forbid, and prints `PROBE <name> allowed` or `PROBE <name> denied <ERRNO>`. A
//! seccomp kill shows as the process dying of SIGSYS instead.

use std::ffi::CString;

use crate::seccomp::Mode;

/// Every probe, for the tests and the matrix in the docs.
pub const PROBES: &[&str] = &[
    "open-host-file",
    "open-via-proc-root",
    "open-dev-mem",
    "write-other-vm-image",
    "open-other-vm-memfd",
    "write-jail-file",
    "mount",
    "unshare-user-ns",
    "setuid-root",
    "raise-rlimit",
    "exec-kernel-image",
    "connect-inet",
    "mknod",
    "load-module",
    "bpf",
    "perf-event-open",
    "keyctl",
    "ptrace-init",
    "signal-other-processes",
    "read-other-process-memory",
    "fork-past-pids-max",
    "allocate-past-memory-max",
];

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EACCES => "EACCES",
        libc::EROFS => "EROFS",
        libc::EAGAIN => "EAGAIN",
        libc::EINVAL => "EINVAL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENOSYS => "ENOSYS",
        libc::EEXIST => "EEXIST",
        libc::ENOMEM => "ENOMEM",
        libc::EBADF => "EBADF",
        libc::EFAULT => "EFAULT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => return format!("errno {e}"),
    };
    name.into()
}

fn outcome(rc: i64) -> String {
    if rc >= 0 {
        "allowed".into()
    } else {
        format!(
            "denied {}",
            errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        )
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn open(path: &str, flags: i32) -> i64 {
    // SAFETY: open with a valid path; the descriptor (if any) is leaked on purpose.
    unsafe { libc::open(c(path).as_ptr(), flags, 0o600) as i64 }
}

/// Runs probe `name`; returns the process exit status (0: the probe ran and reported).
pub fn run(name: &str, seccomp: Mode, role: &str) -> i32 {
    let confined = match role {
        "vmm" => crate::seccomp::install("vmm", "main", seccomp),
        "blk" | "net" | "rng" => {
            crate::backend::deny_filesystem();
            crate::seccomp::install_process(role, seccomp)
        }
        _ => {
            println!("PROBE {name} error unknown role {role}");
            return 1;
        }
    };
    if let Err(e) = confined {
        println!("PROBE {name} error {e}");
        return 1;
    }
    // SAFETY (for the block): each arm is one raw syscall with valid arguments; the probe
    // exists to see which of them the cell refuses.
    let result = unsafe {
        match name {
            "open-host-file" => outcome(open("/etc/shadow", libc::O_RDONLY)),
            "open-via-proc-root" => outcome(open("/proc/1/root/etc/shadow", libc::O_RDONLY)),
            "open-dev-mem" => outcome(open("/dev/mem", libc::O_RDONLY)),
            // The example tenant's disk, which another VM's backend may be serving.
            "write-other-vm-image" => outcome(open(
                "/var/lib/cellvm/images/example/disk.img",
                libc::O_RDWR,
            )),
            // Another VM's guest RAM is a memfd its VMM holds: reachable from outside
            // only as /proc/PID/fd/N. Every small pid and descriptor is tried.
            "open-other-vm-memfd" => {
                let mut rc = -1;
                'all: for pid in 1..=64 {
                    for fd in 3..=12 {
                        rc = open(&format!("/proc/{pid}/fd/{fd}"), libc::O_RDWR);
                        if rc >= 0 {
                            break 'all;
                        }
                    }
                }
                outcome(rc)
            }
            "write-jail-file" => outcome(open("/dropped", libc::O_WRONLY | libc::O_CREAT)),
            "mount" => outcome(libc::mount(
                c("none").as_ptr(),
                c("/dev").as_ptr(),
                c("tmpfs").as_ptr(),
                0,
                std::ptr::null(),
            ) as i64),
            "unshare-user-ns" => outcome(libc::unshare(libc::CLONE_NEWUSER) as i64),
            "setuid-root" => outcome(libc::setuid(0) as i64),
            "raise-rlimit" => {
                let mut r = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
                r.rlim_max += 1;
                r.rlim_cur = r.rlim_max;
                outcome(libc::setrlimit(libc::RLIMIT_NOFILE, &r) as i64)
            }
            "exec-kernel-image" => {
                let argv = [c("/dev/kvm"), c("x")];
                let ptrs = [argv[0].as_ptr(), argv[1].as_ptr(), std::ptr::null()];
                let env: [*const libc::c_char; 1] = [std::ptr::null()];
                outcome(libc::execve(argv[0].as_ptr(), ptrs.as_ptr(), env.as_ptr()) as i64)
            }
            "connect-inet" => {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    outcome(-1)
                } else {
                    let addr = libc::sockaddr_in {
                        sin_family: libc::AF_INET as u16,
                        sin_port: 80u16.to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_be_bytes([10, 0, 0, 1]).to_be(),
                        },
                        sin_zero: [0; 8],
                    };
                    let rc = libc::connect(
                        fd,
                        &addr as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    );
                    outcome(rc as i64)
                }
            }
            "mknod" => outcome(libc::mknod(
                c("/dev/mem").as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(1, 1),
            ) as i64),
            "load-module" => outcome(libc::syscall(
                libc::SYS_init_module,
                std::ptr::null::<u8>(),
                0usize,
                c("").as_ptr(),
            )),
            "bpf" => {
                // BPF_MAP_CREATE of a one-entry array map.
                let attr: [u32; 5] = [2, 4, 4, 1, 0];
                outcome(libc::syscall(
                    libc::SYS_bpf,
                    0,
                    attr.as_ptr(),
                    std::mem::size_of_val(&attr),
                ))
            }
            "perf-event-open" => {
                let mut attr = [0u8; 128];
                attr[4..8].copy_from_slice(&128u32.to_le_bytes()); // size; type 0 = HARDWARE, config 0 = cycles
                outcome(libc::syscall(
                    libc::SYS_perf_event_open,
                    attr.as_ptr(),
                    0,
                    -1,
                    -1,
                    0,
                ))
            }
            "keyctl" => outcome(libc::syscall(
                libc::SYS_add_key,
                c("user").as_ptr(),
                c("cellvm-probe").as_ptr(),
                c("x").as_ptr(),
                1usize,
                -2i32, /* KEY_SPEC_PROCESS_KEYRING */
            )),
            "ptrace-init" => outcome(libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) as i64),
            // kill(-1): every process this one may signal. Alone in its pid namespace
            // (and Landlock-scoped), there is none.
            "signal-other-processes" => outcome(libc::kill(-1, libc::SIGTERM) as i64),
            // The host's init as seen from outside would be some pid > 1; inside, pid 2
            // does not exist.
            "read-other-process-memory" => {
                let mut buf = [0u8; 8];
                let local = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 8,
                };
                let remote = libc::iovec {
                    iov_base: 0x40_0000 as *mut libc::c_void,
                    iov_len: 8,
                };
                outcome(libc::process_vm_readv(2, &local, 1, &remote, 1, 0) as i64)
            }
            "fork-past-pids-max" => {
                let mut n = 0;
                let rc = loop {
                    let pid = libc::fork();
                    if pid == 0 {
                        libc::pause();
                        libc::_exit(0);
                    }
                    if pid < 0 || n >= 100_000 {
                        break pid as i64;
                    }
                    n += 1;
                };
                format!("{} after {n} forks", outcome(rc))
            }
            "allocate-past-memory-max" => {
                // Touch 4 GiB, a page at a time: the cgroup's memory.max ends this first.
                let size = 4usize << 30;
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    outcome(-1)
                } else {
                    for off in (0..size).step_by(4096) {
                        *(p as *mut u8).add(off) = 1;
                    }
                    "allowed".into()
                }
            }
            _ => format!("unknown probe (known: {})", PROBES.join(", ")),
        }
    };
    println!("PROBE {name} {result}");
    0
}
