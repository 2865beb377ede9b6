//! One cell builder for every process of a VM (the VMM and each device backend): a
//! `CellSpec` says what the cell is, `start` clones its first process, and that process
//! runs `enter_cell`, whose body is DESIGN.md's ordered list, one call per step, then
//! execs the checked binary. Nothing of a cell is built anywhere else.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use landlock::{AccessFs, BitFlags};

use crate::cgroup::Cgroup;
use crate::policy::Requirement;
use crate::supervise::Signals;
use crate::{identity, landlock as ll, namespaces, selinux};

#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error(transparent)]
    Namespaces(#[from] namespaces::Error),
    #[error(transparent)]
    Landlock(#[from] ll::Error),
    #[error("{0}")]
    Selinux(String),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("waiting for the supervisor: {0}")]
    NoGo(std::io::Error),
    #[error("{path}: the file mounted in the jail is not the binary that was checked")]
    NotTheCheckedBinary { path: String },
    #[error("argument {0:?} holds a NUL byte")]
    Argument(String),
    #[error("exec {argv:?}: {source}")]
    Exec {
        argv: Vec<String>,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::Error),
    #[error("building the cell of {cell}: {message}")]
    Build { cell: String, message: String },
}

fn sys(what: &str) -> CellError {
    CellError::Sys {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// What the cell's root holds.
pub enum Root<'a> {
    /// The VMM's: the checked files (attached from detached mounts) and /dev/kvm; the
    /// binary is exec'd from its mount at /cellvm, proven to be the checked file.
    Vmm {
        dir: PathBuf,
        files: namespaces::JailFiles<'a>,
    },
    /// A backend's: nothing; the binary is exec'd from the checked descriptor.
    Empty { dir: PathBuf },
    /// A virtio-fs backend's: the shared directory at /share (a detached mount of the
    /// descriptor the jailer opened) and the cell's own /proc; the binary is exec'd from
    /// the checked descriptor.
    Share {
        dir: PathBuf,
        share: OwnedFd,
        writable: bool,
    },
}

/// The cell's Landlock domain.
pub enum Rules {
    /// Exactly these paths (inside the jail), every other right denied.
    Paths(Vec<(&'static str, BitFlags<AccessFs>)>),
    /// Every right denied but executing and reading (which the exec by descriptor
    /// needs; the backend denies itself those too once running).
    DenyAllButExec,
    /// A virtio-fs backend's: as `DenyAllButExec`, and beneath /share listing
    /// directories and, if `writable`, writing, making and removing files, directories,
    /// symlinks, FIFOs and sockets (never device nodes).
    Share { writable: bool },
}

/// Everything that makes a cell, described once.
pub struct CellSpec<'a> {
    /// Where messages come from: `vmm`, `dev0 blk`.
    pub name: String,
    /// For warnings: the tenant whose cell this is.
    pub tenant: String,
    pub uid: u32,
    pub gid: u32,
    /// The SELinux context the exec enters (none where SELinux is not enabled).
    pub exec_label: Option<String>,
    pub hostname: String,
    pub root: Root<'a>,
    pub limits: identity::Limits,
    /// None: left out (test only, `--without landlock`).
    pub landlock: Option<(Rules, Requirement)>,
    /// The checked binary.
    pub exec: &'a File,
    pub argv: Vec<String>,
    /// Descriptors the program works with, open across exec.
    pub keep: Vec<RawFd>,
    /// What becomes its fds 0, 1, 2: /dev/null or the supervisor's pipes.
    pub stdio: [RawFd; 3],
    pub signals: &'a Signals,
}

/// In the cell's first process (PID 1 of its own pid namespace, already in the VM's
/// cgroup): every layer in DESIGN.md's order, then exec. `to_supervisor` is the error
/// pipe (close-on-exec: the supervisor reads its end to see the exec happen). A spare
/// (`hold`) stops just before the exec until the supervisor lets it go.
fn enter_cell(
    spec: &CellSpec,
    to_supervisor: RawFd,
    hold: Option<RawFd>,
) -> Result<Infallible, CellError> {
    let argv = c_strings(&spec.argv)?;
    // Stdio first: from here on nothing of the cell can reach the operator's terminal.
    identity::set_stdio(spec.stdio)?;
    // Nothing else inherited: only the binary, the error pipe and the cell's own fds.
    let mut keep = vec![to_supervisor, spec.exec.as_raw_fd()];
    keep.extend(hold);
    keep.extend(&spec.keep);
    match &spec.root {
        Root::Vmm { files, .. } => keep.extend(files.descriptors()),
        Root::Share { share, .. } => keep.push(share.as_raw_fd()),
        Root::Empty { .. } => {}
    }
    identity::close_inherited_fds(&keep)?;
    // A session of its own: no controlling terminal, none of the operator's.
    identity::new_session()?;
    // The signal mask the supervisor blocked, back to normal; SIGXFSZ ignored so a
    // write past RLIMIT_FSIZE fails (EFBIG) rather than kills.
    spec.signals.restore_in_child();
    identity::ignore_sigxfsz()?;
    // Mount, net, ipc and uts namespaces, made here, inside the cgroup.
    namespaces::unshare_namespaces()?;
    namespaces::set_hostname(&spec.hostname)?;
    // No executable memfd in this pid namespace (the setting is the namespace's own).
    namespaces::deny_executable_memfds()?;
    // The exec context goes on while /proc is still there (libselinux writes it through
    // /proc/thread-self/attr/exec); it takes effect at the exec below.
    if let Some(l) = &spec.exec_label {
        selinux::set_exec_label(l).map_err(|e| CellError::Selinux(e.to_string()))?;
    }
    // The root: pivot_root into the jail, then chroot into its one subdirectory.
    match &spec.root {
        Root::Vmm { dir, files } => namespaces::enter_jail(dir, files)?,
        Root::Empty { dir } => namespaces::enter_empty_jail(dir)?,
        Root::Share {
            dir,
            share,
            writable,
        } => namespaces::enter_share_jail(dir, share, *writable)?,
    }
    // Limits before the uid change: afterwards they could not be set this tight.
    identity::set_rlimits(&spec.limits)?;
    // No uid 0, no capabilities, no_new_privs: no way back.
    identity::drop_privileges(spec.uid, spec.gid)?;
    // After the uid change, which clears it: die with the supervisor.
    identity::die_with_supervisor(to_supervisor)?;
    // Landlock last before exec: it needs the jail's paths, and nothing after it opens.
    if let Some((rules, requirement)) = &spec.landlock {
        let how = match rules {
            Rules::Paths(r) => ll::restrict(r, *requirement)?,
            Rules::DenyAllButExec => ll::deny_all_but_exec(*requirement)?,
            Rules::Share { writable } => ll::share(*writable, *requirement)?,
        };
        // No layer is skipped silently: a partial or absent Landlock is logged.
        if how != "fully enforced" {
            eprintln!("warning: tenant {}: Landlock {how}", spec.tenant);
        }
    }
    // The descriptors the program works with stay open across exec.
    keep_across_exec(&spec.keep)?;
    // A spare waits here, every layer but the program's own seccomp on, until its
    // device's backend dies (or, on EOF, is dismissed).
    if let Some(fd) = hold {
        wait_to_be_let_go(fd)?;
    }
    // Exec what was checked, with an empty environment.
    let exe = match &spec.root {
        Root::Vmm { .. } => checked_mount("/cellvm", spec.exec)?,
        Root::Empty { .. } | Root::Share { .. } => spec.exec.as_raw_fd(),
    };
    exec_fd(exe, &argv, &spec.argv)
}

impl namespaces::JailFiles<'_> {
    fn descriptors(&self) -> Vec<RawFd> {
        let mut v = vec![self.vmm.as_raw_fd()];
        v.extend(
            self.kernel
                .iter()
                .chain(self.initrd.iter())
                .map(|f| f.as_raw_fd()),
        );
        v
    }
}

fn c_strings(argv: &[String]) -> Result<Vec<CString>, CellError> {
    argv.iter()
        .map(|a| CString::new(a.as_str()).map_err(|_| CellError::Argument(a.clone())))
        .collect()
}

/// Opens `path` (O_PATH) and proves it is the very file `checked` refers to (same
/// device and inode): what the jail mounted is what was checked.
fn checked_mount(path: &str, checked: &File) -> Result<RawFd, CellError> {
    let p = CString::new(path).map_err(|_| CellError::Argument(path.into()))?;
    // SAFETY: open with a valid NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(sys(path));
    }
    // SAFETY: a fresh descriptor, owned from here on.
    let opened = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let (a, b) = (
        opened.metadata().map_err(|source| CellError::Sys {
            what: path.into(),
            source,
        })?,
        checked.metadata().map_err(|source| CellError::Sys {
            what: "the checked binary".into(),
            source,
        })?,
    );
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(CellError::NotTheCheckedBinary { path: path.into() });
    }
    // Kept open (close-on-exec) for the exec.
    Ok(std::os::fd::IntoRawFd::into_raw_fd(opened))
}

/// A spare's wait: named `cellvm-spare` meanwhile (its argv is still the
/// supervisor's), one byte on `fd` lets it go on to the exec.
fn wait_to_be_let_go(fd: RawFd) -> Result<(), CellError> {
    // SAFETY: PR_SET_NAME with a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"cellvm-spare".as_ptr()) };
    // SAFETY: `fd` is the hold pipe's read end, which this process owns; the
    // ManuallyDrop leaves it to the exec (close-on-exec) rather than closing it here.
    let mut f = std::mem::ManuallyDrop::new(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
    let mut b = [0u8; 1];
    f.read_exact(&mut b).map_err(CellError::NoGo)
}

/// execveat(fd, "", AT_EMPTY_PATH) with an empty environment.
fn exec_fd(fd: RawFd, argv: &[CString], shown: &[String]) -> Result<Infallible, CellError> {
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: a descriptor we hold, an empty path with AT_EMPTY_PATH, and
    // NULL-terminated argv and envp arrays of valid C strings.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            ptrs.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    Err(CellError::Exec {
        argv: shown.to_vec(),
        source: std::io::Error::last_os_error(),
    })
}

/// Clears close-on-exec on the descriptors a cell's program works with.
fn keep_across_exec(fds: &[RawFd]) -> Result<(), CellError> {
    for &fd in fds {
        // SAFETY: fcntl on a descriptor this process holds.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(sys("fcntl"));
        }
    }
    Ok(())
}

/// A cell whose first process runs: its pid and the pipe that reads empty once it
/// exec'd (or carries why it could not).
pub struct Started {
    pub name: String,
    pub pid: u32,
    errors: File,
}

/// Clones the cell's first process into a new pid namespace, puts it in `cgroup`
/// before it runs anything of its own, then lets it build the cell. Does not wait for
/// the exec (`Started::exec`): the cells of a VM are built at the same time.
pub fn start(cgroup: &Cgroup, spec: &CellSpec) -> Result<Started, CellError> {
    clone_cell(cgroup, spec, None)
}

/// A cell built whole ahead of need (a backend's spare) and held just before its exec:
/// `go` execs it. What a restart then waits for is the exec alone, not the cgroup
/// migration (a synchronize_rcu on cgroup v1: 8–15 ms measured here), the namespaces
/// or the jail.
/// Dropped unused, it is killed and reaped.
pub struct Spare {
    started: Option<Started>,
    hold: File,
}

/// Builds `spec`'s cell as `start` does, holding it before the exec.
pub fn spare(cgroup: &Cgroup, spec: &CellSpec) -> Result<Spare, CellError> {
    let (hold_r, hold_w) = pipe()?;
    let started = clone_cell(cgroup, spec, Some(hold_r))?;
    Ok(Spare {
        started: Some(started),
        hold: File::from(hold_w),
    })
}

impl Spare {
    pub fn pid(&self) -> u32 {
        self.started.as_ref().map_or(0, |s| s.pid)
    }

    /// Whether the spare ended while it waited (reaped here, so never killed later).
    pub fn ended(&mut self) -> bool {
        let Some(s) = &self.started else {
            return true;
        };
        let mut status = 0;
        // SAFETY: waitpid on our own child, without blocking.
        if unsafe { libc::waitpid(s.pid as i32, &mut status, libc::WNOHANG) } == s.pid as i32 {
            self.started = None;
            return true;
        }
        false
    }

    /// Lets the cell go on to its exec (`Started::exec` waits for it).
    pub fn go(mut self) -> Started {
        // A spare that already failed has its reason on the error pipe; exec says it.
        let _ = self.hold.write_all(b"g");
        self.started.take().expect("a spare not yet let go")
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        if let Some(s) = self.started.take() {
            // SAFETY: kill and reap our own child.
            unsafe { libc::kill(s.pid as i32, libc::SIGKILL) };
            crate::supervise::reap(s.pid);
        }
    }
}

fn clone_cell(
    cgroup: &Cgroup,
    spec: &CellSpec,
    hold: Option<OwnedFd>,
) -> Result<Started, CellError> {
    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let child = namespaces::clone_into_pid_namespace()?;
    if child == 0 {
        drop(go_w);
        drop(err_r);
        // Wait until the supervisor has put us in the cgroup.
        let mut b = [0u8; 1];
        let hold = hold.as_ref().map(|h| h.as_raw_fd());
        let message = match File::from(go_r)
            .read_exact(&mut b)
            .map_err(CellError::NoGo)
            .and_then(|_| enter_cell(spec, err_w.as_raw_fd(), hold))
        {
            Err(e) => e.to_string(),
            Ok(never) => match never {},
        };
        let _ = File::from(err_w).write_all(message.as_bytes());
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(127) };
    }
    drop(go_r);
    drop(err_w);
    drop(hold);
    // Into its cgroup before it runs anything of its own.
    if let Err(e) = cgroup.add(child) {
        // SAFETY: kill our own child.
        unsafe { libc::kill(child as i32, libc::SIGKILL) };
        crate::supervise::reap(child);
        return Err(e.into());
    }
    let _ = File::from(go_w).write_all(b"g");
    Ok(Started {
        name: spec.name.clone(),
        pid: child,
        errors: File::from(err_r),
    })
}

impl Started {
    /// Waits until the cell's program runs (its error pipe closed at exec); else the
    /// reason it could not be built. The process is the caller's to reap either way.
    pub fn exec(&mut self) -> Result<(), CellError> {
        let mut message = String::new();
        let _ = self.errors.read_to_string(&mut message);
        if message.is_empty() {
            Ok(())
        } else {
            Err(CellError::Build {
                cell: self.name.clone(),
                message,
            })
        }
    }
}

pub fn pipe() -> Result<(OwnedFd, OwnedFd), CellError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(sys("pipe2"));
    }
    // SAFETY: fresh descriptors, owned from here on.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a 64-bit little-endian ELF executable")]
    NotElf(PathBuf),
    #[error("{path}: program headers ({what}) lie outside the file")]
    Headers { path: PathBuf, what: String },
    #[error("{0} is dynamically linked; a cell holds no shared libraries (build it static, see .cargo/config.toml)")]
    Dynamic(PathBuf),
}

/// The most program headers a binary may have (the ELF limit short of PN_XNUM).
const MAX_PHNUM: u64 = 0xfffe;
const PHENT: u64 = 56;
const PT_INTERP: u32 = 3;

/// Opens `path` and checks that it is a static ELF executable: the header and the
/// whole program-header table, wherever it lies, read with pread from the descriptor
/// that is returned, which is what the cell execs (a cell holds no loader and no
/// libraries).
pub fn open_static_binary(path: &Path) -> Result<File, BinaryError> {
    let io = |source| BinaryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut ehdr = [0u8; 64];
    if size < 64 {
        return Err(BinaryError::NotElf(path.into()));
    }
    f.read_exact_at(&mut ehdr, 0).map_err(io)?;
    // ELFMAGIC, ELFCLASS64, ELFDATA2LSB.
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(BinaryError::NotElf(path.into()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([ehdr[o], ehdr[o + 1]]) as u64;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().expect("8 bytes"));
    let phentsize = u16_at(54);
    let phnum = u16_at(56);
    let bad = |what: String| BinaryError::Headers {
        path: path.to_path_buf(),
        what,
    };
    if phnum > MAX_PHNUM || (phnum > 0 && phentsize != PHENT) {
        return Err(bad(format!("phnum {phnum}, phentsize {phentsize}")));
    }
    let end = phnum
        .checked_mul(PHENT)
        .and_then(|len| phoff.checked_add(len))
        .filter(|&end| end <= size)
        .ok_or_else(|| bad(format!("phoff {phoff}, phnum {phnum}, file size {size}")))?;
    let mut table = vec![0u8; (end - phoff) as usize];
    f.read_exact_at(&mut table, phoff).map_err(io)?;
    if table
        .chunks_exact(PHENT as usize)
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP)
    {
        return Err(BinaryError::Dynamic(path.into()));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 header with `phnum` program headers at `phoff`, each of type `kinds[i]`,
    /// in a file of at least `len` bytes.
    fn elf(phoff: u64, kinds: &[u32], len: usize) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        f[32..40].copy_from_slice(&phoff.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(kinds.len() as u16).to_le_bytes());
        let need = (phoff as usize + kinds.len() * 56).max(len);
        f.resize(need, 0);
        for (i, k) in kinds.iter().enumerate() {
            let at = phoff as usize + i * 56;
            f[at..at + 4].copy_from_slice(&k.to_le_bytes());
        }
        f
    }

    fn file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cellvm-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn a_static_binary_is_accepted_and_its_checked_descriptor_returned() {
        let p = file("static", &elf(64, &[1, 1, 4], 0));
        let f = open_static_binary(&p).unwrap();
        let ino = f.metadata().unwrap().ino();
        // Whatever the path names afterwards, the descriptor is the file checked.
        std::fs::write(p.with_extension("other"), elf(64, &[3], 0)).unwrap();
        std::fs::rename(p.with_extension("other"), &p).unwrap();
        assert_eq!(f.metadata().unwrap().ino(), ino);
        assert_ne!(std::fs::metadata(&p).unwrap().ino(), ino);
    }

    #[test]
    fn an_interpreter_in_the_first_page_is_refused() {
        let p = file("dynamic", &elf(64, &[1, 3], 0));
        assert!(matches!(
            open_static_binary(&p),
            Err(BinaryError::Dynamic(_))
        ));
    }

    #[test]
    fn an_interpreter_past_the_first_4_kib_is_refused() {
        // Program headers at 8 KiB: a reader of only the first page sees none.
        let p = file("far-interp", &elf(8192, &[1, 3], 0));
        assert!(matches!(
            open_static_binary(&p),
            Err(BinaryError::Dynamic(_))
        ));
        // 80 headers from offset 64: the 73rd, PT_INTERP, starts past 4 KiB.
        let mut kinds = vec![1u32; 80];
        kinds[73] = 3;
        // Its entry starts at 64 + 73 * 56 = 4152, past the first 4 KiB.
        let p = file("late-interp", &elf(64, &kinds, 0));
        assert!(matches!(
            open_static_binary(&p),
            Err(BinaryError::Dynamic(_))
        ));
    }

    #[test]
    fn program_headers_outside_the_file_are_refused() {
        let mut bytes = elf(64, &[1], 0);
        bytes[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        let p = file("phoff-huge", &bytes);
        assert!(matches!(
            open_static_binary(&p),
            Err(BinaryError::Headers { .. })
        ));
        let mut bytes = elf(64, &[1], 0);
        bytes[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        let p = file("phnum-xnum", &bytes);
        assert!(matches!(
            open_static_binary(&p),
            Err(BinaryError::Headers { .. })
        ));
        let mut bytes = elf(64, &[1], 0);
        bytes[56..58].copy_from_slice(&100u16.to_le_bytes());
        let p = file("phnum-past-end", &bytes);
        assert!(matches!(
            open_static_binary(&p),
            Err(BinaryError::Headers { .. })
        ));
        let p = file("short", b"\x7fELF");
        assert!(matches!(
            open_static_binary(&p),
            Err(BinaryError::NotElf(_))
        ));
    }
}
