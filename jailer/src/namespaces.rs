//! New namespaces for the cell (mount, pid, net, ipc, uts) and its filesystem: a
//! private tmpfs root under /srv/cellvm/<id>/root holding exactly the files the VMM
//! needs, bind-mounted from descriptors the jailer checked, then pivot_root into it and
//! chroot into its one subdirectory, so the kernel counts the cell as chrooted (and
//! refuses it new user namespaces: `current_chrooted()` in kernel/user_namespace.c).

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Root's alone (0700): the jail directories and the backends' sockets live here.
pub const JAIL_BASE: &str = "/srv/cellvm";

/// The namespaces a cell's first process makes for itself (after it joined the VM's
/// cgroup, so their cost is the cell's and several cells make them at once). The net
/// namespace is empty (loopback down): a net backend holds only its tap's descriptor.
pub const UNSHARE_FLAGS: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;

/// The directory inside a jail's root that the cell is chrooted into.
const CELL_DIR: &str = "cell";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("jail path {0} is not UTF-8 or holds a NUL")]
    BadPath(PathBuf),
}

fn cstr(s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::BadPath(s.into()))
}

fn utf8(p: &Path) -> Result<&str, Error> {
    p.to_str().ok_or_else(|| Error::BadPath(p.to_path_buf()))
}

fn check(rc: libc::c_int, what: &str) -> Result<(), Error> {
    if rc == 0 {
        Ok(())
    } else {
        Err(sys(what))
    }
}

fn sys(what: &str) -> Error {
    Error::Sys {
        what: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Sys {
        what: path.display().to_string(),
        source,
    }
}

/// /srv/cellvm and /srv/cellvm/<id>, both root's and 0700 (also when they existed with
/// a wider mode): no other uid can list them or reach a backend's socket in them.
pub fn make_jail_dir(dir: &Path) -> Result<(), Error> {
    for d in [Path::new(JAIL_BASE), dir] {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(d)(e)),
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).map_err(io(d))?;
    }
    Ok(())
}

/// fork() into a new pid namespace: the child is PID 1 of its own pid namespace; it
/// makes its other namespaces itself (`unshare_namespaces`).
/// Returns the child's pid (in the parent) or 0 (in the child).
pub fn clone_into_pid_namespace() -> Result<u32, Error> {
    // SAFETY: clone_args is plain old data; all zeroes is a valid value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = libc::CLONE_NEWPID as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    // SAFETY: clone3 without a stack behaves like fork; the jailer is single-threaded,
    // so the child may allocate and run arbitrary code before it execs.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if rc < 0 {
        return Err(sys("clone3 into a new pid namespace"));
    }
    Ok(rc as u32)
}

/// In the cell's first process: new mount, net, ipc and uts namespaces.
pub fn unshare_namespaces() -> Result<(), Error> {
    check(
        // SAFETY: unshare with constant flags.
        unsafe { libc::unshare(UNSHARE_FLAGS) },
        "unshare mount, net, ipc, uts namespaces",
    )
}

fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Error> {
    let (s, t, f, d) = (
        src.map(cstr).transpose()?,
        cstr(target)?,
        fstype.map(cstr).transpose()?,
        data.map(cstr).transpose()?,
    );
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a valid NUL-terminated string or null, as mount(2) allows.
    let rc = unsafe {
        libc::mount(
            p(&s),
            t.as_ptr(),
            p(&f),
            flags,
            p(&d) as *const libc::c_void,
        )
    };
    check(rc, &format!("mount {target}"))
}

/// A detached mount of exactly the file behind `file` (open_tree(OPEN_TREE_CLONE)),
/// made in the jailer's mount namespace, to be attached inside the cell's. A plain bind
/// of /proc/self/fd/N cannot cross into the new namespace; this keeps the descriptor
/// that was checked as the thing that is mounted.
pub fn detached_mount(file: &std::fs::File) -> Result<std::os::fd::OwnedFd, Error> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    // SAFETY: open_tree on a descriptor we own with an empty path (AT_EMPTY_PATH);
    // the result is checked and owned.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            file.as_raw_fd(),
            c"".as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(sys("open_tree"));
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Attaches a detached mount at `target` (created as an empty file), read-only.
fn attach(tree: &impl AsRawFd, target: &Path, exec: bool) -> Result<(), Error> {
    std::fs::write(target, b"").map_err(io(target))?;
    let t = utf8(target)?;
    move_tree(tree, target)?;
    let mut flags =
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    if !exec {
        flags |= libc::MS_NOEXEC;
    }
    mount(None, t, None, flags, None)
}

/// What goes into the jail.
pub struct JailFiles<'a> {
    /// Detached mounts (see `detached_mount`) of the checked files.
    pub vmm: &'a std::os::fd::OwnedFd,
    pub kernel: Option<&'a std::os::fd::OwnedFd>,
    pub initrd: Option<&'a std::os::fd::OwnedFd>,
    pub uid: u32,
    pub gid: u32,
}

/// In the child: builds the jail's root and pivots into it. Afterwards `/` holds only
/// `/cellvm` (the VMM, read-only), `/kernel` and `/initrd` (read-only, if given) and
/// `/dev/kvm` (the cell's uid only), and the root itself is read-only.
pub fn enter_jail(root: &Path, files: &JailFiles) -> Result<(), Error> {
    let r = utf8(root)?;
    // Nothing mounted from here on propagates back to the host.
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(
        Some("cellvm-jail"),
        r,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("size=64k,nr_inodes=64,mode=0755"),
    )?;
    let cell = root.join(CELL_DIR);
    make_dir(&cell, 0o755)?;
    make_dir(&cell.join("dev"), 0o755)?;
    // The VMM binary must be executable inside: its own mount point is not noexec.
    attach(files.vmm, &cell.join("cellvm"), true)?;
    if let Some(k) = files.kernel {
        attach(k, &cell.join("kernel"), false)?;
    }
    if let Some(i) = files.initrd {
        attach(i, &cell.join("initrd"), false)?;
    }
    make_kvm_node(&cell.join("dev/kvm"), files.uid, files.gid)?;
    pivot_into(r)?;
    chroot_into_cell()
}

/// In a device backend's cell: an empty, read-only root and nothing else. The backend
/// is exec'd from a descriptor and opens no path.
pub fn enter_empty_jail(root: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let r = utf8(root)?;
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(
        Some("cellvm-empty"),
        r,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV,
        Some("size=4k,nr_inodes=2,mode=0555"),
    )?;
    make_dir(&root.join(CELL_DIR), 0o555)?;
    pivot_into(r)?;
    chroot_into_cell()
}

/// In a virtio-fs backend's cell: a read-only root holding `/share`, the shared
/// directory (the detached mount `share` of the descriptor the jailer opened beneath
/// the tenant's share directories; never a submount of it), read-only unless
/// `writable`, and always nosuid, nodev and noexec; and `/proc`, holding only what
/// virtiofsd reads there: `self`, the cell's own process directory (virtiofsd reopens
/// its files through /proc/self/fd), and `sys/fs/nr_open`, a copy of the host's. No
/// other process, no other kernel file.
pub fn enter_share_jail(root: &Path, share: &impl AsRawFd, writable: bool) -> Result<(), Error> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let nr_open =
        std::fs::read("/proc/sys/fs/nr_open").map_err(io(Path::new("/proc/sys/fs/nr_open")))?;
    let r = utf8(root)?;
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    let hidden = libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV;
    mount(
        Some("cellvm-share"),
        r,
        Some("tmpfs"),
        hidden,
        Some("size=4k,nr_inodes=8,mode=0755"),
    )?;
    let cell = root.join(CELL_DIR);
    make_dir(&cell, 0o755)?;
    let target = cell.join("share");
    make_dir(&target, 0o755)?;
    move_tree(share, &target)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | hidden;
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    mount(None, utf8(&target)?, None, flags, None)?;
    // /proc: a tmpfs of two entries. This process is PID 1 of the cell's pid namespace
    // and the one that execs virtiofsd: a procfs of that namespace, mounted outside the
    // cell for a moment, lends its directory `1` as /proc/self and is detached again.
    let procfs = root.join("procfs");
    make_dir(&procfs, 0o555)?;
    mount(
        Some("proc"),
        utf8(&procfs)?,
        Some("proc"),
        hidden,
        Some("subset=pid,hidepid=invisible"),
    )?;
    let proc = cell.join("proc");
    make_dir(&proc, 0o555)?;
    mount(
        Some("cellvm-proc"),
        utf8(&proc)?,
        Some("tmpfs"),
        hidden,
        Some("size=4k,nr_inodes=8,mode=0555"),
    )?;
    let own = proc.join("self");
    make_dir(&own, 0o555)?;
    mount(
        Some(utf8(&procfs.join("1"))?),
        utf8(&own)?,
        None,
        libc::MS_BIND,
        None,
    )?;
    mount(
        None,
        utf8(&own)?,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | hidden,
        None,
    )?;
    check(
        // SAFETY: umount2 with a valid NUL-terminated path.
        unsafe { libc::umount2(cstr(utf8(&procfs)?)?.as_ptr(), libc::MNT_DETACH) },
        "detach the cell's procfs",
    )?;
    let fs = proc.join("sys/fs");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o555)
        .create(&fs)
        .map_err(io(&fs))?;
    std::fs::write(fs.join("nr_open"), nr_open).map_err(io(&fs))?;
    mount(
        None,
        utf8(&proc)?,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | hidden,
        Some("size=4k,nr_inodes=8,mode=0555"),
    )?;
    pivot_into(r)?;
    chroot_into_cell()
}

/// Moves a detached mount onto `target`.
fn move_tree(tree: &impl AsRawFd, target: &Path) -> Result<(), Error> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let t = utf8(target)?;
    let ct = cstr(t)?;
    // SAFETY: move_mount from a detached tree fd (empty path) to a valid target path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    } as libc::c_int;
    check(rc, &format!("move_mount {t}"))
}

fn make_dir(p: &Path, mode: u32) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(p)
        .map_err(io(p))
}

/// pivot_root into `r`, detach the old root, and make the new one read-only.
fn pivot_into(r: &str) -> Result<(), Error> {
    // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
    // only the jail.
    let cr = cstr(r)?;
    // SAFETY: chdir with a valid NUL-terminated path.
    check(unsafe { libc::chdir(cr.as_ptr()) }, "chdir into the jail")?;
    // SAFETY: syscall with two valid NUL-terminated paths.
    let rc =
        unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } as libc::c_int;
    check(rc, "pivot_root")?;
    check(
        // SAFETY: umount2 with a valid path.
        unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) },
        "detach the old root",
    )?;
    // SAFETY: chdir with a valid path.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, "chdir /")?;
    mount(
        None,
        "/",
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )
}

/// chroot into the root's one subdirectory: the cell's root is then no longer its
/// mount namespace's root, which is what the kernel calls chrooted; a chrooted process
/// may not create a user namespace (EPERM), a layer independent of seccomp.
fn chroot_into_cell() -> Result<(), Error> {
    // SAFETY: chroot and chdir with constant, NUL-terminated paths.
    check(unsafe { libc::chroot(c"/cell".as_ptr()) }, "chroot /cell")?;
    // SAFETY: as above.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, "chdir / in the cell")
}

fn make_kvm_node(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    let p = cstr(utf8(path)?)?;
    check(
        // SAFETY: mknod with a valid path; KVM is char device 10:232.
        unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 232)) },
        "mknod /dev/kvm",
    )?;
    check(
        // SAFETY: chown with a valid path.
        unsafe { libc::chown(p.as_ptr(), uid, gid) },
        "chown /dev/kvm",
    )
}

/// No executable memfd in the cell's pid namespace: `vm.memfd_noexec = 2` refuses
/// MFD_EXEC and makes every other memfd non-executable and sealed (kernel 6.3 and
/// later; the setting belongs to the pid namespace, so the host keeps its own). With the
/// seccomp profiles' lack of execve, a second layer against exec'ing bytes the cell
/// wrote (guest RAM is sealed so by the VMM itself). Called as PID 1 of the new pid
/// namespace, while /proc is still the host's mount.
pub fn deny_executable_memfds() -> Result<(), Error> {
    std::fs::write("/proc/sys/vm/memfd_noexec", b"2").map_err(|source| Error::Sys {
        what: "vm.memfd_noexec = 2 in the cell's pid namespace".into(),
        source,
    })
}

pub fn set_hostname(name: &str) -> Result<(), Error> {
    check(
        // SAFETY: a valid buffer and its length.
        unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) },
        "sethostname",
    )
}
