//! Opening the tenant's files: only beneath the directories its policy allows, never
//! through a symlink or `..` that leads out, and as file descriptors, so that what was
//! checked is what the cell gets (the jail bind-mounts the fd, not the path).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::policy::{shown, shown_path, TenantPolicy};

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
    #[error("{path}: {kind}, not a regular file; refused")]
    NotAFile { path: String, kind: &'static str },
    #[error("{path}: {kind}, not a directory; a share is a directory")]
    NotADirectory { path: String, kind: &'static str },
    #[error("{path}: a block device is served only where the tenant policy's block_devices grant its path, never from an image directory")]
    BlockInImageDir { path: String },
    #[error("{path}: not a block device (block_devices grants only those)")]
    NotABlockDevice { path: String },
    #[error("{path}: a granted block device is opened by its own path, never through a symlink")]
    BlockThroughSymlink { path: String },
    #[error("{path}: {links} hard links; a writable image must have exactly one")]
    Links { path: String, links: u64 },
    #[error("{path}: the file does not allow writing (owner uid {uid}, mode {mode:04o}); a writable image must be root's and writable by its owner, or set image_owner in the tenant policy")]
    NotWritable { path: String, uid: u32, mode: u32 },
    #[error("{path}: in use: {holder} holds a lock on it (a writable image has one user; read-only users share)")]
    Locked { path: String, holder: &'static str },
    #[error("{path}: a disk key must be root's and readable by root alone (owner uid {uid}, mode {mode:04o}; chmod 0400 or 0600)")]
    SecretExposed { path: String, uid: u32, mode: u32 },
    #[error("{path}: a disk key is 1 to {max} bytes, this one {len}")]
    SecretSize { path: String, len: u64, max: u64 },
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

/// What a file of this mode is, for a refusal.
fn kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symlink",
        _ => "of an unknown type",
    }
}

/// openat2 of `rel` from `dir_fd` with `resolve`: O_NONBLOCK (a FIFO or a device
/// cannot block the jailer) and O_NOCTTY (a terminal cannot become its controlling
/// one); the caller checks what was opened with fstat.
fn openat2(dir_fd: i32, rel: &Path, writable: bool, resolve: u64) -> std::io::Result<File> {
    let rel = CString::new(rel.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain data; all-zero is its "no flags" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    let access = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    how.flags = (access | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
    how.resolve = resolve;
    // SAFETY: openat2 with a valid directory fd, a NUL-terminated path and an open_how
    // of the size passed; the returned fd is checked and then owned.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir_fd,
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from openat2, owned from here on.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// As `open_beneath`, read-write when `writable` (a disk the guest may write). Only a
/// regular file is accepted; FIFOs, sockets, devices and directories are refused by
/// name, without blocking.
pub fn open_beneath_mode(dirs: &[PathBuf], path: &Path, writable: bool) -> Result<File, Error> {
    let file = open_any_beneath(dirs, path, writable)?;
    let mode = mode_of(&file, path)?;
    match mode & libc::S_IFMT {
        libc::S_IFREG => Ok(file),
        libc::S_IFBLK => Err(Error::BlockInImageDir {
            path: shown_path(path),
        }),
        _ => Err(Error::NotAFile {
            path: shown_path(path),
            kind: kind(mode),
        }),
    }
}

/// The file type and mode of what `file`, opened as `path`, is.
fn mode_of(file: &File, path: &Path) -> Result<u32, Error> {
    file.metadata().map(|m| m.mode()).map_err(|e| Error::Io {
        path: shown_path(path),
        source: e,
    })
}

/// Opens a virtio-fs share: a directory beneath one of `dirs`, resolved with openat2
/// (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) from its allowed directory, as images are.
pub fn open_share(dirs: &[PathBuf], path: &Path) -> Result<File, Error> {
    let dir = open_any_beneath(dirs, path, false)?;
    let mode = mode_of(&dir, path)?;
    if mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(Error::NotADirectory {
            path: shown_path(path),
            kind: kind(mode),
        });
    }
    Ok(dir)
}

fn open_any_beneath(dirs: &[PathBuf], path: &Path, writable: bool) -> Result<File, Error> {
    let dir = allowed_dir(dirs, path).ok_or_else(|| Error::NotAllowed {
        path: shown_path(path),
        dirs: dirs.to_vec(),
    })?;
    let dir_fd = File::open(dir).map_err(|e| Error::Io {
        path: shown_path(dir),
        source: e,
    })?;
    let rel = path
        .strip_prefix(dir)
        .expect("allowed_dir checked the prefix");
    openat2(
        dir_fd.as_raw_fd(),
        rel,
        writable,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(|err| {
        if matches!(err.raw_os_error(), Some(libc::EXDEV) | Some(libc::ELOOP)) {
            Error::Escapes {
                path: shown_path(path),
                dir: shown_path(dir),
            }
        } else if err.raw_os_error() == Some(libc::ENXIO) {
            // What open(2) says of a socket (and of a device node with no driver).
            Error::NotAFile {
                path: shown_path(path),
                kind: "a socket (or a device without a driver)",
            }
        } else {
            Error::Io {
                path: shown_path(path),
                source: err,
            }
        }
    })
}

/// The longest disk key file (the blk backend reads at most this many bytes).
pub const MAX_SECRET_BYTES: u64 = 4096;

/// Opens the disk key `name` (a bare file name the spec checked) in the tenant's
/// `secrets_dir`: no symlink on the way (RESOLVE_NO_SYMLINKS), a regular file, root's,
/// with no permission for group or others, 1 to 4096 bytes. The jailer never reads it:
/// the descriptor goes to the disk's backend, which alone unlocks the image.
pub fn open_secret(dir: &Path, name: &str) -> Result<File, Error> {
    let path = dir.join(name);
    let dir_fd = File::open(dir).map_err(|e| Error::Io {
        path: shown_path(dir),
        source: e,
    })?;
    let file = openat2(
        dir_fd.as_raw_fd(),
        Path::new(name),
        false,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(|err| {
        if matches!(err.raw_os_error(), Some(libc::EXDEV) | Some(libc::ELOOP)) {
            Error::Escapes {
                path: shown_path(&path),
                dir: shown_path(dir),
            }
        } else {
            Error::Io {
                path: shown_path(&path),
                source: err,
            }
        }
    })?;
    let m = file.metadata().map_err(|e| Error::Io {
        path: shown_path(&path),
        source: e,
    })?;
    if m.mode() & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::NotAFile {
            path: shown_path(&path),
            kind: kind(m.mode()),
        });
    }
    if m.uid() != 0 || m.mode() & 0o077 != 0 {
        return Err(Error::SecretExposed {
            path: shown_path(&path),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    if m.len() == 0 || m.len() > MAX_SECRET_BYTES {
        return Err(Error::SecretSize {
            path: shown_path(&path),
            len: m.len(),
            max: MAX_SECRET_BYTES,
        });
    }
    Ok(file)
}

/// Where an image lies: an allowed image directory and the path beneath it, kept as it
/// was resolved (not normalised), so a relative backing name is resolved by the kernel
/// from the same place QEMU would resolve it.
#[derive(Clone, Debug)]
pub struct Beneath {
    pub dir: PathBuf,
    pub rel: PathBuf,
}

impl Beneath {
    /// Where a path the spec names lies, if inside an image directory.
    pub fn of(policy: &TenantPolicy, path: &Path) -> Option<Beneath> {
        let dir = allowed_dir(&policy.image_dirs, path)?;
        let rel = path.strip_prefix(dir).ok()?.to_path_buf();
        Some(Beneath {
            dir: dir.clone(),
            rel,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.rel)
    }
}

/// Opens the backing file `name` that the image at `referrer` names: read-only, never
/// blocking, a regular file only, with the image owner's credentials if the policy names
/// one, and not yet locked (`lock_reader`, once the caller knows it is no loop). A relative name is relative to the referrer's directory,
/// as QEMU resolves it; an absolute one must lie lexically inside an image directory.
/// Either way openat2 resolves it with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS from that
/// image directory, so neither `..` nor a symlink can lead out. `referrer` None: the
/// referring image is a block device, which has no directory to be relative to.
pub fn open_backing(
    policy: &TenantPolicy,
    referrer: Option<&Beneath>,
    name: &str,
) -> Result<(Beneath, Image), Error> {
    let name_path = Path::new(name);
    let at = if name_path.is_absolute() {
        Beneath::of(policy, name_path)
    } else {
        referrer.map(|r| Beneath {
            dir: r.dir.clone(),
            rel: r.rel.parent().unwrap_or(Path::new("")).join(name_path),
        })
    };
    let Some(at) = at else {
        return Err(Error::NotAllowed {
            path: shown(name),
            dirs: policy.image_dirs.clone(),
        });
    };
    let (dir, rel, path) = (&at.dir, &at.rel, at.path());
    let shown = || shown_path(&path);
    let io = |source| Error::Io {
        path: shown_path(&path),
        source,
    };
    let file = as_owner(policy.image_owner, || {
        let dir_fd = File::open(dir).map_err(|e| Error::Io {
            path: shown_path(dir),
            source: e,
        })?;
        openat2(
            dir_fd.as_raw_fd(),
            rel,
            false,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
        )
        .map_err(|err| {
            if matches!(err.raw_os_error(), Some(libc::EXDEV) | Some(libc::ELOOP)) {
                Error::Escapes {
                    path: shown(),
                    dir: shown_path(dir),
                }
            } else if err.raw_os_error() == Some(libc::ENXIO) {
                Error::NotAFile {
                    path: shown(),
                    kind: "a socket (or a device without a driver)",
                }
            } else {
                io(err)
            }
        })
    })?;
    let meta = file.metadata().map_err(io)?;
    if meta.mode() & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::NotAFile {
            path: shown(),
            kind: kind(meta.mode()),
        });
    }
    Ok((
        at,
        Image {
            size: meta.len(),
            id: (meta.dev(), meta.ino()),
            file,
            block_device: false,
        },
    ))
}

/// Locks an opened backing layer as a reader (shared with other readers, refused while
/// any writer holds it), as `open_disk` locks a read-only disk.
pub fn lock_reader(image: &Image, path: &Path) -> Result<(), Error> {
    lock(&image.file, false).map_err(|e| match e {
        LockError::Held(holder) => Error::Locked {
            path: shown_path(path),
            holder,
        },
        LockError::Io(source) => Error::Io {
            path: shown_path(path),
            source,
        },
    })
}

/// A disk image opened for a backend, with what was learnt of it.
pub struct Image {
    pub file: File,
    /// The apparent (virtual) size in bytes.
    pub size: u64,
    /// Device and inode: the same file under two names is one image.
    pub id: (u64, u64),
    pub block_device: bool,
}

/// Runs `f` with the file system credentials of `owner` (uid, gid, no supplementary
/// groups) on this thread, so the kernel's permission checks are the owner's, not
/// root's: setfsuid to a non-zero uid also drops the file capabilities (DAC override)
/// from the effective set; they return with fsuid 0.
fn as_owner<R>(owner: Option<[u32; 2]>, f: impl FnOnce() -> R) -> R {
    let Some([uid, gid]) = owner else {
        return f();
    };
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: getgroups into a buffer of the size passed.
    let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
    groups.truncate(n.max(0) as usize);
    // SAFETY: per-thread credential changes (the raw setgroups syscall, not libc's
    // process-wide one); restored below before anything else runs on this thread.
    unsafe {
        libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>());
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
    let r = f();
    // SAFETY: restoring this thread's credentials as they were.
    unsafe {
        libc::setfsuid(0);
        libc::setfsgid(0);
        libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr());
    }
    r
}

/// BLKGETSIZE64: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Opens a disk the spec names: a regular file beneath the tenant's image directories
/// (with the image owner's credentials if the policy names one), or a block device
/// whose path the policy grants (never through a symlink). A writable image must
/// have one link and, without image_owner, be root's and writable by its owner.
/// Then the image is locked as QEMU locks its images (see `lock`).
pub fn open_disk(policy: &TenantPolicy, path: &Path, writable: bool) -> Result<Image, Error> {
    let shown = || shown_path(path);
    let io = |source| Error::Io {
        path: shown_path(path),
        source,
    };
    let file = if crate::policy::block_device_granted(&policy.block_devices, path) {
        // From / with no symlink at all, magic or not: the path is the grant.
        let root = File::open("/").map_err(io)?;
        let rel = path.strip_prefix("/").unwrap_or(path);
        let file = openat2(
            root.as_raw_fd(),
            rel,
            writable,
            libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
        )
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Error::BlockThroughSymlink { path: shown() }
            } else {
                io(e)
            }
        })?;
        if file.metadata().map_err(io)?.mode() & libc::S_IFMT != libc::S_IFBLK {
            return Err(Error::NotABlockDevice { path: shown() });
        }
        file
    } else {
        as_owner(policy.image_owner, || {
            open_beneath_mode(&policy.image_dirs, path, writable)
        })?
    };
    let meta = file.metadata().map_err(io)?;
    let block_device = meta.mode() & libc::S_IFMT == libc::S_IFBLK;
    if writable && !block_device {
        if meta.nlink() != 1 {
            return Err(Error::Links {
                path: shown(),
                links: meta.nlink(),
            });
        }
        if policy.image_owner.is_none() && (meta.uid() != 0 || meta.mode() & 0o200 == 0) {
            return Err(Error::NotWritable {
                path: shown(),
                uid: meta.uid(),
                mode: meta.mode() & 0o7777,
            });
        }
    }
    let size = if block_device {
        let mut bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 into `bytes`.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        bytes
    } else {
        meta.len()
    };
    lock(&file, writable).map_err(|e| match e {
        LockError::Held(holder) => Error::Locked {
            path: shown(),
            holder,
        },
        LockError::Io(e) => io(e),
    })?;
    Ok(Image {
        file,
        size,
        id: (meta.dev(), meta.ino()),
        block_device,
    })
}

/// QEMU's image locking, which cellvm takes part in: open file description (OFD)
/// locks on single bytes, 100 + n for "holds permission n", 200 + n for "does not let
/// others have permission n" (n: 0 consistent read, 1 write, 2 write-unchanged,
/// 3 resize). Byte 100 + n is tested for a write lock before a permission is taken.
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;

enum LockError {
    Held(&'static str),
    Io(std::io::Error),
}

fn ofd(file: &File, cmd: i32, kind: i32, start: i64, len: i64) -> std::io::Result<libc::flock> {
    // SAFETY: flock is plain data; all-zero is a valid value (l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fcntl with an OFD lock command and a flock of the right type.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl)
}

/// Locks an image on its descriptor (the lock lives as long as the open file
/// description: the jailer's descriptor and the backend's copy of it).
/// Writable: an exclusive lock over every permission byte, so any other user, cellvm
/// or QEMU, reader or writer, is refused, and we are refused while any holds one.
/// Read-only: shared locks on "read" and "no one else writes or resizes", after a
/// test that no one holds "write"; other readers share.
fn lock(file: &File, writable: bool) -> Result<(), LockError> {
    let busy = |e: std::io::Error, holder| {
        if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
            LockError::Held(holder)
        } else {
            LockError::Io(e)
        }
    };
    if writable {
        return ofd(file, libc::F_OFD_SETLK, libc::F_WRLCK, PERM_BASE, 200)
            .map(|_| ())
            .map_err(|e| busy(e, "another VM or program (cellvm, qemu)"));
    }
    let test = ofd(
        file,
        libc::F_OFD_GETLK,
        libc::F_WRLCK,
        PERM_BASE + PERM_WRITE,
        1,
    )
    .map_err(LockError::Io)?;
    if test.l_type != libc::F_UNLCK as i16 {
        return Err(LockError::Held("a writer (another VM or program)"));
    }
    for byte in [
        PERM_BASE + PERM_READ,
        SHARED_BASE + PERM_WRITE,
        SHARED_BASE + PERM_RESIZE,
    ] {
        ofd(file, libc::F_OFD_SETLK, libc::F_RDLCK, byte, 1)
            .map_err(|e| busy(e, "a writer (another VM or program)"))?;
    }
    Ok(())
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

    fn policy_for(images: &Path) -> TenantPolicy {
        TenantPolicy::parse(&format!(
            "name = \"acme\"\nmax_vcpus = 1\nmax_memory_mib = 64\nimage_dirs = [\"{}\"]\n\
             uid_range = [300000, 300009]\nmcs_categories = [10, 20]\n\
             [cgroup]\ncpu_percent = 100\nmemory_overhead_mib = 64\npids_max = 32\n",
            images.display()
        ))
        .unwrap()
    }

    #[test]
    fn backing_names_resolve_from_the_referrer_and_never_leave_the_image_dir() {
        let d = std::env::temp_dir().join(format!("cellvm-paths-backing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("images/vm1")).unwrap();
        std::fs::write(d.join("images/base.img"), b"b").unwrap();
        std::fs::write(d.join("images/vm1/near.img"), b"n").unwrap();
        std::fs::write(d.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink("../../secret", d.join("images/vm1/out")).unwrap();
        let policy = policy_for(&d.join("images"));
        let top = Beneath::of(&policy, &d.join("images/vm1/top.qcow2")).unwrap();
        let open = |name: &str| open_backing(&policy, Some(&top), name).map(|(at, _)| at.path());
        assert_eq!(open("near.img").unwrap(), d.join("images/vm1/near.img"));
        assert_eq!(
            open("../base.img").unwrap(),
            d.join("images/vm1/../base.img")
        );
        let abs = d.join("images/base.img");
        assert_eq!(open(abs.to_str().unwrap()).unwrap(), abs);
        assert!(matches!(open("../../secret"), Err(Error::Escapes { .. })));
        assert!(matches!(open("out"), Err(Error::Escapes { .. })));
        assert!(matches!(
            open(d.join("secret").to_str().unwrap()),
            Err(Error::NotAllowed { .. })
        ));
        assert!(matches!(
            open(d.join("images/../secret").to_str().unwrap()),
            Err(Error::NotAllowed { .. })
        ));
        assert!(matches!(open("."), Err(Error::NotAFile { .. })));
        assert!(matches!(
            open_backing(&policy, None, "near.img"),
            Err(Error::NotAllowed { .. })
        ));
        let _ = std::fs::remove_dir_all(&d);
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
