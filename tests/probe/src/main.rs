//! `cellvm-probe`: test-only escape probes. Never shipped: `cellvm-jailer launch
//! --probe NAME --probe-in ROLE --probe-binary PATH` (a test switch) execs this program
//! in ROLE's exact cell instead of the VMM or backend; the tests also run it outside any
//! cell, as the positive control of each probe.
//!
//! ```text
//! cellvm-probe NAME --role vmm|blk|net|rng [--seccomp kill|log|off] [--landlock on|off]
//!              [--hardening on|off] [--thread vcpu|main|stdin|intx] [--fd N] [--path P]
//! ```
//! The probe first does what the program of ROLE does to itself before it reads input
//! (PR_SET_DUMPABLE 0 and PR_SET_MDWE: `--hardening`; for a backend, Landlock denying
//! every filesystem right: `--landlock`; then ROLE's seccomp profile: for the VMM, the
//! profile of thread kind `--thread`, by default a vCPU's, where a guest exploit lands),
//! tries one thing a cell must forbid, and prints `PROBE NAME allowed ...` or
//! `PROBE NAME denied ERRNO ...`. A seccomp kill shows as the process dying of SIGSYS.

use std::ffi::CString;
use std::process::ExitCode;

use cellvm::seccomp::Mode;

mod probes;
pub use probes::PROBES;

/// Probes that need a descriptor the cell holds (the blk image, `--fd`).
pub const BLK_PROBES: &[&str] = &["pwrite-past-end", "fallocate-grow"];

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
        libc::ENOTTY => "ENOTTY",
        libc::EFBIG => "EFBIG",
        libc::ENOEXEC => "ENOEXEC",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EIO => "EIO",
        _ => return format!("errno {e}"),
    };
    name.into()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn outcome(rc: i64) -> String {
    if rc >= 0 {
        "allowed".into()
    } else {
        format!("denied {}", errno_name(errno()))
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn open(path: &str, flags: i32) -> i64 {
    // SAFETY: open with a valid path; the descriptor (if any) is leaked on purpose.
    unsafe { libc::open(c(path).as_ptr(), flags | libc::O_CLOEXEC, 0o600) as i64 }
}

struct Args {
    name: String,
    role: String,
    seccomp: Mode,
    landlock: bool,
    hardening: bool,
    thread: String,
    fd: Option<i32>,
    path: Option<String>,
}

fn parse(argv: &[String]) -> Result<Args, String> {
    let (name, rest) = argv.split_first().ok_or("which probe?")?;
    let mut a = Args {
        name: name.clone(),
        role: String::new(),
        seccomp: Mode::Kill,
        landlock: true,
        hardening: true,
        thread: "vcpu".into(),
        fd: None,
        path: None,
    };
    let mut it = rest.iter();
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let on_off = |v: &str| match v {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(format!("{k} {v}: expected on or off")),
        };
        match k.as_str() {
            "--role" => a.role = v.clone(),
            "--seccomp" => {
                a.seccomp = match v.as_str() {
                    "kill" => Mode::Kill,
                    "log" => Mode::Log,
                    "off" => Mode::Off,
                    _ => return Err(format!("--seccomp {v}: expected kill, log or off")),
                }
            }
            "--landlock" => a.landlock = on_off(v)?,
            "--hardening" => a.hardening = on_off(v)?,
            "--thread" => a.thread = v.clone(),
            "--fd" => a.fd = Some(v.parse().map_err(|_| format!("--fd {v}: a number"))?),
            "--path" => a.path = Some(v.clone()),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if !matches!(a.role.as_str(), "vmm" | "blk" | "net" | "rng") {
        return Err(format!(
            "--role {:?}: expected vmm, blk, net or rng",
            a.role
        ));
    }
    Ok(a)
}

/// What some probes prepare before the confinement, as the real program does: guest
/// RAM is made (and mapped read-write) before seccomp, and the other process a probe
/// attacks exists before it.
struct Setup {
    /// The size of the `--fd` file, read before the confinement (the blk profile has
    /// no fstat: the backend learns its image's size before it confines itself).
    fd_size: Option<i64>,
    ram: i32,
    ram_map: *mut libc::c_void,
    child: i32,
}

fn setup(name: &str, fd: Option<i32>) -> Setup {
    let mut s = Setup {
        fd_size: fd.and_then(|fd| {
            // SAFETY: fstat into a zeroed stat buffer on a descriptor we were given.
            unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                (libc::fstat(fd, &mut st) == 0).then_some(st.st_size)
            }
        }),
        ram: -1,
        ram_map: std::ptr::null_mut(),
        child: -1,
    };
    if name.ends_with("guest-ram-exec") {
        // SAFETY: memfd_create with a static name; ftruncate and mmap on that fresh
        // descriptor, checked below.
        unsafe {
            s.ram = libc::memfd_create(
                c"cellvm-probe-ram".as_ptr(),
                cellvm::vmm::memory::RAM_MEMFD_FLAGS,
            );
            // In a backend's cell RLIMIT_FSIZE is 0 (backends never size guest RAM: the
            // VMM does), so the size may be refused; a mapping needs no size to exist.
            if s.ram >= 0 {
                libc::ftruncate(s.ram, 1 << 20);
                s.ram_map = libc::mmap(
                    std::ptr::null_mut(),
                    1 << 20,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    s.ram,
                    0,
                );
            }
        }
    }
    if name == "ptrace-other-process" {
        // A process as the VMM and every backend make themselves: non-dumpable.
        // SAFETY: the child only calls async-signal-safe prctl, write and pause, then
        // exits; the parent waits for its byte, so the child is non-dumpable before the
        // probe runs.
        unsafe {
            let mut p = [0i32; 2];
            if libc::pipe(p.as_mut_ptr()) < 0 {
                return s;
            }
            s.child = libc::fork();
            if s.child == 0 {
                libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                libc::write(p[1], b"r".as_ptr().cast(), 1);
                libc::pause();
                libc::_exit(0);
            }
            let mut b = 0u8;
            libc::read(p[0], (&mut b as *mut u8).cast(), 1);
            libc::close(p[0]);
            libc::close(p[1]);
        }
    }
    s
}

fn confine(a: &Args) -> Result<(), String> {
    if a.hardening {
        cellvm::hardening::lock_process().map_err(|e| e.to_string())?;
    }
    match a.role.as_str() {
        "vmm" => cellvm::seccomp::install("vmm", &a.thread, a.seccomp).map_err(|e| e.to_string()),
        role => {
            if a.landlock {
                cellvm::backend::deny_filesystem();
            }
            cellvm::seccomp::install_process(role, a.seccomp).map_err(|e| e.to_string())
        }
    }
}

/// Runs probe `a.name` after `confine`; returns the line after `PROBE NAME `.
///
/// # Safety
/// Each arm makes raw syscalls with valid arguments; it exists to see which of them the
/// cell refuses.
unsafe fn probe(a: &Args, s: &Setup) -> String {
    match a.name.as_str() {
        "open-host-file" => outcome(open("/etc/shadow", libc::O_RDONLY)),
        // Through another process's root: the parent's (outside a cell: the test's),
        // or, with no parent in this pid namespace, PID 1's.
        "open-via-proc-root" => {
            let pid = libc::getppid().max(1);
            outcome(open(
                &format!("/proc/{pid}/root/etc/shadow"),
                libc::O_RDONLY,
            ))
        }
        // The host's disk (or raw memory): the first such device node that exists.
        "open-dev-mem" => {
            let found = ["/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/mem"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .unwrap_or("/dev/mem");
            outcome(open(found, libc::O_RDONLY))
        }
        // The example tenant's disk (or --path), which another VM's backend may serve.
        "write-other-vm-image" => outcome(open(
            a.path
                .as_deref()
                .unwrap_or("/var/lib/cellvm/images/example/disk.img"),
            libc::O_RDWR,
        )),
        // Another VM's guest RAM is a memfd its VMM holds: reachable from outside only
        // as /proc/PID/fd/N. Every small pid and descriptor is tried.
        "open-other-vm-memfd" => {
            let mut rc = -1;
            let mut first = None;
            let parent = libc::getppid();
            let pids = (parent > 0).then_some(parent).into_iter().chain(1..=64);
            'all: for pid in pids {
                for fd in 3..=12 {
                    rc = open(&format!("/proc/{pid}/fd/{fd}"), libc::O_RDWR);
                    if rc >= 0 {
                        break 'all;
                    }
                    first.get_or_insert(errno());
                }
            }
            if rc >= 0 {
                outcome(rc)
            } else {
                format!("denied {}", errno_name(first.unwrap_or(0)))
            }
        }
        "write-jail-file" => {
            let rc = open("/cellvm-probe-dropped", libc::O_WRONLY | libc::O_CREAT);
            if rc >= 0 {
                libc::unlink(c"/cellvm-probe-dropped".as_ptr());
            }
            outcome(rc)
        }
        // Over the cell's root, which exists in every cell: what stops it is the
        // capability check, not a missing path.
        "mount" => outcome(libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            c"tmpfs".as_ptr(),
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
        // A regular, executable file in the jail: the kernel (given a spec that has
        // one; --path outside). If the exec goes through, this program starts again as
        // `cellvm-probe exec-ok` and reports it.
        "exec-kernel-image" => {
            let path = c(a.path.as_deref().unwrap_or("/kernel"));
            let argv = [path.as_ptr(), c"exec-ok".as_ptr(), std::ptr::null()];
            let env: [*const libc::c_char; 1] = [std::ptr::null()];
            outcome(libc::execve(path.as_ptr(), argv.as_ptr(), env.as_ptr()) as i64)
        }
        // The tenant network's host end (10.77.0.1, port 9): in a cell with no network
        // of its own there is no route; outside, in the tenant's namespace, nothing
        // listens (ECONNREFUSED: the connection itself was permitted).
        "connect-inet" => {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return outcome(-1);
            }
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 9u16.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes([10, 77, 0, 1]).to_be(),
                },
                sin_zero: [0; 8],
            };
            outcome(libc::connect(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            ) as i64)
        }
        "mknod" => outcome(libc::mknod(
            c"/cellvm-probe-mem".as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(1, 1),
        ) as i64)
        .replace("allowed", {
            libc::unlink(c"/cellvm-probe-mem".as_ptr());
            "allowed"
        }),
        // init_module of an empty image: past the permission check it fails ENOEXEC.
        "load-module" => outcome(libc::syscall(
            libc::SYS_init_module,
            c"".as_ptr(),
            0usize,
            c"".as_ptr(),
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
            // type 1 = SOFTWARE, size, config 0 = CPU clock; a CPU-wide event (pid -1),
            // which needs CAP_PERFMON (or perf_event_paranoid < 1).
            attr[0..4].copy_from_slice(&1u32.to_le_bytes());
            attr[4..8].copy_from_slice(&128u32.to_le_bytes());
            outcome(libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                -1,
                0,
                -1,
                0,
            ))
        }
        "keyctl" => outcome(libc::syscall(
            libc::SYS_add_key,
            c"user".as_ptr(),
            c"cellvm-probe".as_ptr(),
            c"x".as_ptr(),
            1usize,
            -2i32, /* KEY_SPEC_PROCESS_KEYRING */
        )),
        // A real other process: a child forked before the confinement, non-dumpable
        // as the VMM and the backends are.
        "ptrace-other-process" => {
            if s.child < 0 {
                return format!("error fork {}", errno_name(errno()));
            }
            let rc = libc::ptrace(libc::PTRACE_ATTACH, s.child, 0, 0);
            let r = outcome(rc);
            libc::kill(s.child, libc::SIGKILL);
            r
        }
        // kill(-1): every process this one may signal. Alone in its pid namespace
        // (and Landlock-scoped), there is none.
        "signal-other-processes" => outcome(libc::kill(-1, 0) as i64),
        // The process that started this one (outside a cell: the test itself).
        "read-other-process-memory" => {
            let mut buf = [0u8; 8];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: 8,
            };
            let remote = libc::iovec {
                iov_base: &buf as *const _ as *mut libc::c_void,
                iov_len: 8,
            };
            let pid = libc::getppid();
            if pid == 0 {
                return "denied ESRCH (no parent in this pid namespace)".into();
            }
            outcome(libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) as i64)
        }
        // Guest RAM made as the VMM makes it: a fresh read+execute mapping of it.
        "map-guest-ram-exec" => {
            if s.ram < 0 {
                return format!("error memfd {}", errno_name(errno()));
            }
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_SHARED,
                s.ram,
                0,
            );
            outcome(if p == libc::MAP_FAILED { -1 } else { 0 })
        }
        // Guest RAM mapped read-write (as the VMM and backends hold it), made
        // executable afterwards.
        "mprotect-guest-ram-exec" => {
            if s.ram_map.is_null() || s.ram_map == libc::MAP_FAILED {
                return format!("error mapping {}", errno_name(errno()));
            }
            outcome(libc::mprotect(s.ram_map, 4096, libc::PROT_READ | libc::PROT_EXEC) as i64)
        }
        // A fresh memfd holding a script, exec'd from its descriptor. ENOENT means the
        // exec itself was permitted and only the interpreter (/nonexistent) is missing.
        "memfd-execveat" => {
            let fd = libc::memfd_create(c"cellvm-probe-exec".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return outcome(-1);
            }
            let script = b"#!/nonexistent\n";
            libc::write(fd, script.as_ptr().cast(), script.len());
            let argv = [c"x".as_ptr(), std::ptr::null()];
            let env: [*const libc::c_char; 1] = [std::ptr::null()];
            outcome(libc::syscall(
                libc::SYS_execveat,
                fd,
                c"".as_ptr(),
                argv.as_ptr(),
                env.as_ptr(),
                libc::AT_EMPTY_PATH,
            ))
        }
        // Another VM's backend socket (--path; by default where one would be in the
        // host's run directory).
        "connect-other-vm-socket" => {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return outcome(-1);
            }
            let path = a
                .path
                .as_deref()
                .unwrap_or("/srv/cellvm/other-vm/dev0.sock");
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as u16;
            for (d, b) in addr.sun_path.iter_mut().zip(path.bytes()) {
                *d = b as libc::c_char;
            }
            outcome(libc::connect(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as u32,
            ) as i64)
        }
        // KVM_GET_API_VERSION on /dev/kvm: only the VMM's cell may reach KVM.
        "kvm-ioctl" => {
            let fd = open("/dev/kvm", libc::O_RDWR);
            if fd < 0 {
                return outcome(-1);
            }
            outcome(libc::ioctl(fd as i32, 0xAE00 as _, 0) as i64)
        }
        "io-uring-setup" => {
            let mut params = [0u8; 120];
            outcome(libc::syscall(
                libc::SYS_io_uring_setup,
                1u32,
                params.as_mut_ptr(),
            ))
        }
        // Without UFFD_USER_MODE_ONLY: the kind that can catch kernel faults.
        "userfaultfd" => outcome(libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC)),
        // Changing the process's own LSM context. Outside a cell, with no LSM that
        // takes writes here (SELinux off), the write fails EINVAL after the open.
        "write-proc-attr" => {
            let fd = open("/proc/self/attr/current", libc::O_WRONLY);
            if fd < 0 {
                return outcome(-1);
            }
            let rc = libc::write(fd as i32, b"x".as_ptr().cast(), 1);
            format!("opened, write {}", outcome(rc as i64))
        }
        // Typing into the terminal on fds 0-2 (the operator's, if the cell kept it).
        // A NUL byte, so a successful control types nothing visible.
        "tiocsti" => {
            let byte = 0u8;
            let mut results = Vec::new();
            for fd in 0..3 {
                results.push(outcome(libc::ioctl(fd, libc::TIOCSTI, &byte) as i64));
            }
            if let Some(ok) = results.iter().position(|r| r == "allowed") {
                format!("allowed on fd {ok}")
            } else {
                results[0].clone()
            }
        }
        // The blk image (--fd): a byte 1 TiB past its end.
        "pwrite-past-end" | "fallocate-grow" => {
            let Some(fd) = a.fd else {
                return "error no --fd".into();
            };
            let Some(size) = s.fd_size else {
                return "error fstat before the confinement".into();
            };
            let at = size + (1 << 40);
            let rc = if a.name == "pwrite-past-end" {
                libc::pwrite(fd, b"X".as_ptr().cast(), 1, at) as i64
            } else {
                libc::fallocate(fd, 0, at, 1 << 20) as i64
            };
            let r = outcome(rc);
            if rc >= 0 {
                // Undo: the test image is the test's own.
                libc::ftruncate(fd, size);
            }
            r
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
        _ => format!(
            "unknown probe (known: {}, {})",
            PROBES.join(", "),
            BLK_PROBES.join(", ")
        ),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // The far side of a successful exec-kernel-image.
    if argv.first().map(String::as_str) == Some("exec-ok") {
        println!("PROBE exec-kernel-image allowed");
        return ExitCode::SUCCESS;
    }
    let a = match parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cellvm-probe: error: {e}");
            return ExitCode::from(2);
        }
    };
    let s = setup(&a.name, a.fd);
    if let Err(e) = confine(&a) {
        println!("PROBE {} error {e}", a.name);
        return ExitCode::from(1);
    }
    // SAFETY: see `probe`.
    let result = unsafe { probe(&a, &s) };
    println!("PROBE {} {result}", a.name);
    ExitCode::SUCCESS
}
