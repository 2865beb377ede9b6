//! Reclaiming cells: what a finished launch removes, and what `cellvm-jailer gc` (and
//! every launch) removes for supervisors that died without cleaning up. A kill can land
//! anywhere, so every step here copes with whatever the previous run left half done,
//! and the registry entry goes last: while anything of the cell is left, the entry is
//! there for the next gc to retry.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::cgroup::Cgroup;
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cell {id}: {message}")]
    Cgroup { id: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: another file system is mounted there; not removed")]
    Mount { path: String },
    #[error("{path}: nested deeper than {MAX_DEPTH} directories; not removed")]
    TooDeep { path: String },
}

/// The jail trees cellvm makes are three levels deep; anything deeper was not ours.
const MAX_DEPTH: usize = 8;

/// Kills the cell's processes, removes its cgroup, its whole jail directory and its run
/// directory (`RUN_DIR/vm/<id>`: sockets and logs too, no symlink followed), and drops
/// the file labels it held. Nothing is left when it returns Ok.
pub fn remove_cell(run_dir: &Path, id: &str) -> Result<(), Error> {
    let cg = Cgroup::open(id);
    if cg.exists() {
        cg.destroy().map_err(|e| Error::Cgroup {
            id: id.into(),
            message: e.to_string(),
        })?;
    }
    // Once nothing of the cell runs: the last user of each file restores its label.
    crate::selinux::restore_recorded(id);
    remove_tree(&crate::launch::jail_dir(id))?;
    remove_tree(&crate::rundir::path(run_dir, id))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Opens `name` in `dir` as a directory, never through a symlink.
fn open_dir(dir: i32, name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    // SAFETY: openat with a valid directory fd (or AT_FDCWD) and a NUL-terminated
    // name; the returned descriptor is checked and then owned.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The id of the mount `fd` lies on.
fn mount_id(fd: &OwnedFd) -> std::io::Result<u64> {
    // SAFETY: statx is plain data; all-zero is a valid value to be overwritten.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx of the descriptor itself (empty path, AT_EMPTY_PATH) into a
    // buffer of the right type.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stx.stx_mnt_id)
}

/// Removes `path` and everything beneath it, without following a symlink or
/// descending into another mount (which would delete files that are not the jail's).
/// A missing `path` is fine: a previous run got that far.
pub fn remove_tree(path: &Path) -> Result<(), Error> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io(path)(std::io::ErrorKind::InvalidInput.into()))?;
    let top = match open_dir(libc::AT_FDCWD, &c) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r.map_err(io(path))?,
    };
    let mnt = mount_id(&top).map_err(io(path))?;
    clear(&top, path, mnt, 0)?;
    drop(top);
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// Empties directory `dir` (shown as `path`), which lies on mount `mnt`.
fn clear(dir: &OwnedFd, path: &Path, mnt: u64, depth: usize) -> Result<(), Error> {
    if depth >= MAX_DEPTH {
        return Err(Error::TooDeep {
            path: path.display().to_string(),
        });
    }
    // The names, read through the descriptor (not the path, which could be swapped).
    let names: Vec<CString> = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(io(path))?
        .filter_map(|e| e.ok())
        .filter_map(|e| CString::new(e.file_name().as_encoded_bytes()).ok())
        .collect();
    for name in names {
        let child = path
            .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name.as_bytes()));
        match open_dir(dir.as_raw_fd(), &name) {
            Ok(sub) => {
                if mount_id(&sub).map_err(io(&child))? != mnt {
                    return Err(Error::Mount {
                        path: child.display().to_string(),
                    });
                }
                clear(&sub, &child, mnt, depth + 1)?;
                drop(sub);
                unlink(dir, &name, libc::AT_REMOVEDIR).map_err(io(&child))?;
            }
            // Not a directory (a file, a socket, a symlink: removed, never followed).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
                unlink(dir, &name, 0).map_err(io(&child))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&child)(e)),
        }
    }
    Ok(())
}

fn unlink(dir: &OwnedFd, name: &std::ffi::CStr, flags: i32) -> std::io::Result<()> {
    // SAFETY: unlinkat with a valid directory fd and a NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e);
        }
    }
    Ok(())
}

/// Removes every cell whose supervisor is gone, each registry entry only once its cell
/// is fully removed (else the next gc retries); returns the ids reclaimed and the
/// errors met.
pub fn collect_reporting(reg: &Registry) -> (Vec<String>, Vec<String>) {
    let mut reclaimed = Vec::new();
    let mut errors = Vec::new();
    let scan = match reg.scan() {
        Ok(s) => s,
        Err(e) => return (reclaimed, vec![e.to_string()]),
    };
    let dead = scan
        .entries
        .iter()
        .filter(|e| !e.is_live())
        .map(|e| e.id.clone())
        .chain(
            scan.broken
                .iter()
                .filter(|b| b.is_dead())
                .map(|b| b.id.clone()),
        );
    for id in dead {
        match remove_cell(reg.run_dir(), &id)
            .map_err(|e| e.to_string())
            .and_then(|_| reg.remove(&id).map_err(|e| e.to_string()))
        {
            Ok(()) => reclaimed.push(id),
            Err(e) => errors.push(format!(
                "vm {id}: {e} (its registry entry is kept; gc retries)"
            )),
        }
    }
    for b in scan.broken.iter().filter(|b| !b.is_dead()) {
        errors.push(format!(
            "{}: registry entry cannot be parsed ({}) and its supervisor is not proven dead; its uids and MCS pair stay taken",
            b.path.display(),
            b.why
        ));
    }
    (reclaimed, errors)
}

/// As `collect_reporting`, the errors printed on stderr.
pub fn collect(reg: &Registry) -> Vec<String> {
    let (reclaimed, errors) = collect_reporting(reg);
    for e in errors {
        eprintln!("cellvm-jailer: {e}");
    }
    reclaimed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jail_tree_is_removed_whole_without_following_symlinks() {
        let base = std::env::temp_dir().join(format!("cellvm-gc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        let jail = base.join("jail");
        std::fs::create_dir_all(jail.join("root/dev")).unwrap();
        std::fs::create_dir_all(jail.join("dev0")).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(jail.join("dev0.sock")).unwrap();
        std::os::unix::fs::symlink(&outside, jail.join("root/link")).unwrap();
        std::fs::write(jail.join("root/dev/file"), b"x").unwrap();
        remove_tree(&jail).unwrap();
        assert!(!jail.exists());
        assert!(
            outside.join("keep").exists(),
            "the symlink's target is untouched"
        );
        remove_tree(&jail).unwrap(); // gone already: fine
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_mount_inside_a_jail_tree_is_never_descended_into() {
        let base = std::env::temp_dir().join(format!("cellvm-gc-mnt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let m = base.join("jail/root");
        std::fs::create_dir_all(&m).unwrap();
        let src = CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mounting a fresh tmpfs on a directory of our own.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                src.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mount: {}", std::io::Error::last_os_error());
        std::fs::write(m.join("precious"), b"p").unwrap();
        let r = remove_tree(&base.join("jail"));
        let still = m.join("precious").exists();
        // SAFETY: unmounting what this test mounted.
        unsafe { libc::umount2(src.as_ptr(), libc::MNT_DETACH) };
        assert!(matches!(r, Err(Error::Mount { .. })), "{r:?}");
        assert!(still, "nothing under the mount was removed");
        let _ = std::fs::remove_dir_all(&base);
    }
}
