//! New namespaces for the cell (mount, pid, net, ipc, uts) and its filesystem: a
//! private tmpfs root under /srv/cellvm/<id>/root holding exactly the files the VMM
//! needs, bind-mounted from descriptors the jailer checked, then pivot_root into it.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::Path;

pub const JAIL_BASE: &str = "/srv/cellvm";

/// Namespaces every cell gets. The net namespace is empty (loopback down): no tap is
/// granted until the device issue adds them.
pub const CLONE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS) as u64;

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in jail paths")
}

fn check(rc: libc::c_int, what: &str) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

/// fork() into new namespaces: the child is PID 1 of its own pid namespace.
/// Returns the child's pid (in the parent) or 0 (in the child).
pub fn clone_into_namespaces() -> Result<u32, String> {
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = CLONE_FLAGS;
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
        return Err(format!(
            "clone3 into new namespaces: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(rc as u32)
}

fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let (s, t, f, d) = (
        src.map(cstr),
        cstr(target),
        fstype.map(cstr),
        data.map(cstr),
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
pub fn detached_mount(file: &std::fs::File) -> Result<std::os::fd::OwnedFd, String> {
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
        return Err(format!("open_tree: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Attaches a detached mount at `target` (created as an empty file), read-only.
fn attach(tree: &impl AsRawFd, target: &Path, exec: bool) -> Result<(), String> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    std::fs::write(target, b"").map_err(|e| format!("{}: {e}", target.display()))?;
    let t = target.to_str().expect("jail paths are UTF-8");
    let ct = cstr(t);
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
    check(rc, &format!("move_mount {t}"))?;
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
pub fn enter_jail(root: &Path, files: &JailFiles) -> Result<(), String> {
    let r = root.to_str().ok_or("jail root is not UTF-8")?;
    // Nothing mounted from here on propagates back to the host.
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(
        Some("cellvm-jail"),
        r,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("size=64k,nr_inodes=64,mode=0755"),
    )?;
    std::fs::create_dir(root.join("dev")).map_err(|e| format!("jail /dev: {e}"))?;
    // The VMM binary must be executable inside: its own mount point is not noexec.
    attach(files.vmm, &root.join("cellvm"), true)?;
    if let Some(k) = files.kernel {
        attach(k, &root.join("kernel"), false)?;
    }
    if let Some(i) = files.initrd {
        attach(i, &root.join("initrd"), false)?;
    }
    make_kvm_node(&root.join("dev/kvm"), files.uid, files.gid)?;
    pivot_into(r)
}

/// In a device backend's cell: an empty, read-only root and nothing else. The backend
/// is exec'd from a descriptor and opens no path.
pub fn enter_empty_jail(root: &Path) -> Result<(), String> {
    std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let r = root.to_str().ok_or("jail root is not UTF-8")?;
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(
        Some("cellvm-empty"),
        r,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV,
        Some("size=4k,nr_inodes=1,mode=0555"),
    )?;
    pivot_into(r)
}

/// pivot_root into `r`, detach the old root, and make the new one read-only.
fn pivot_into(r: &str) -> Result<(), String> {
    // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
    // only the jail.
    let rc = unsafe { libc::chdir(cstr(r).as_ptr()) };
    check(rc, "chdir into the jail")?;
    // SAFETY: syscall with two valid NUL-terminated paths.
    let rc =
        unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } as libc::c_int;
    check(rc, "pivot_root")?;
    // SAFETY: umount2 with a valid path.
    check(
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

fn make_kvm_node(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let p = cstr(path.to_str().expect("UTF-8"));
    // SAFETY: mknod/chown with a valid path; KVM is char device 10:232.
    check(
        unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 232)) },
        "mknod /dev/kvm",
    )?;
    check(
        unsafe { libc::chown(p.as_ptr(), uid, gid) },
        "chown /dev/kvm",
    )
}

pub fn set_hostname(name: &str) -> Result<(), String> {
    // SAFETY: a valid buffer and its length.
    check(
        unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) },
        "sethostname",
    )
}
