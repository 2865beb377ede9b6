//! Opening the tenant's files: only beneath the directories its policy allows, never
//! through a symlink or `..` that leads out, and as file descriptors, so that what was
//! checked is what the cell gets (the jail bind-mounts the fd, not the path).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: not inside any of the allowed directories {dirs:?}")]
    NotAllowed { path: String, dirs: Vec<PathBuf> },
    #[error("{path}: escapes {dir} (through a symlink or `..`)")]
    Escapes { path: String, dir: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a regular file")]
    NotAFile { path: String },
}

/// The allowed directory `path` lies in, lexically: absolute, no `..`, under `dir`.
pub fn allowed_dir<'a>(dirs: &'a [PathBuf], path: &Path) -> Option<&'a PathBuf> {
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return None;
    }
    dirs.iter()
        .find(|d| path.starts_with(d) && path != d.as_path())
}

/// Opens `path` read-only, resolving it with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
/// from its allowed directory: a symlink may point elsewhere inside the directory, never
/// out of it.
pub fn open_beneath(dirs: &[PathBuf], path: &Path) -> Result<File, Error> {
    open_beneath_mode(dirs, path, false)
}

/// As `open_beneath`, read-write when `writable` (a disk the guest may write).
pub fn open_beneath_mode(dirs: &[PathBuf], path: &Path, writable: bool) -> Result<File, Error> {
    let dir = allowed_dir(dirs, path).ok_or_else(|| Error::NotAllowed {
        path: path.display().to_string(),
        dirs: dirs.to_vec(),
    })?;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let dir_fd = File::open(dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let rel = path
        .strip_prefix(dir)
        .expect("allowed_dir checked the prefix");
    let rel = CString::new(rel.as_os_str().as_encoded_bytes())
        .map_err(|_| io(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: open_how is plain data; all-zero is its "no flags" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    let access = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    how.flags = (access | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid directory fd, a NUL-terminated path and an open_how
    // of the size passed; the returned fd is checked and then owned.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir_fd.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EXDEV) || err.raw_os_error() == Some(libc::ELOOP) {
            return Err(Error::Escapes {
                path: path.display().to_string(),
                dir: dir.display().to_string(),
            });
        }
        return Err(io(err));
    }
    // SAFETY: a fresh descriptor from openat2, owned from here on.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    if !file.metadata().map_err(io)?.is_file() {
        return Err(Error::NotAFile {
            path: path.display().to_string(),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("cellvm-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("images/sub")).unwrap();
        std::fs::write(d.join("images/vmlinux"), b"k").unwrap();
        std::fs::write(d.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink("../secret", d.join("images/out")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("images/abs")).unwrap();
        std::os::unix::fs::symlink("../vmlinux", d.join("images/sub/in")).unwrap();
        d
    }

    #[test]
    fn files_open_beneath_their_directory_and_symlinks_cannot_leave_it() {
        let d = dir();
        let dirs = vec![d.join("images")];
        assert!(open_beneath(&dirs, &d.join("images/vmlinux")).is_ok());
        assert!(
            open_beneath(&dirs, &d.join("images/sub/in")).is_ok(),
            "a symlink staying inside is fine"
        );
        for bad in ["images/out", "images/abs"] {
            assert!(
                matches!(
                    open_beneath(&dirs, &d.join(bad)),
                    Err(Error::Escapes { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            open_beneath(&dirs, &d.join("secret")),
            Err(Error::NotAllowed { .. })
        ));
        assert!(matches!(
            open_beneath(&dirs, &d.join("images/../secret")),
            Err(Error::NotAllowed { .. })
        ));
        assert!(matches!(
            open_beneath(&dirs, &d.join("images/sub")),
            Err(Error::NotAFile { .. })
        ));
    }
}
