//! SELinux, labelled the way sVirt does it. Each VM has one MCS pair `s0:cA,cB`: its VMM
//! runs as `cellvm_t:s0:cA,cB`, its device backends as `cellvm_device_t:s0:cA,cB`, and
//! every writable disk it is given is labelled `cellvm_image_t:s0:cA,cB` before any cell
//! starts. Files several VMs may share get labels without categories: read-only disks
//! `cellvm_image_t:s0`, kernels and initrds `cellvm_content_t:s0` (policy/selinux says
//! who may use which).
//!
//! Every label given is undone, however the VM ends. As libvirt does (its
//! `trusted.libvirt.security.selinux` and `trusted.libvirt.security.ref_selinux`
//! attributes), the file itself remembers its original label in `trusted.cellvm.selinux`
//! and how many running VMs use it in `trusted.cellvm.ref`: the first user saves the
//! original, later users of a shared file only count themselves, and the last one
//! restores the original and removes both attributes, so no VM restores a file under
//! another. Each VM also records what it labelled (dev, inode and path of each file) in
//! `/run/cellvm/labels/<id>`, root-only: `gc::remove_cell` replays that record, so the
//! labels of a VM whose supervisor was killed are dropped by `cellvm-jailer gc`.
//! Reference counts only change under one host-wide lock (`/run/cellvm/labels/.lock`).
//!
//! File labels are set whenever a tenant's `selinux` is "required" or "if-available",
//! also on a host where SELinux is not enabled (ours): ext4 keeps `security.selinux` for
//! root all the same, so the labels are there the day the policy is loaded, and they can
//! be tested. The process exec label needs SELinux enabled; without it `"required"`
//! refuses with a clear error and `"if-available"` logs the downgrade and goes on.
//!
//! Why not the `selinux` crate: its libselinux, linked into this static-pie binary,
//! crashes in a start-up constructor (an init_array entry left unrelocated), before
//! main runs. The operations needed here are plain kernel interfaces that libselinux
//! itself wraps: extended attributes (a file's label) and /proc/thread-self/attr/exec
//! (the next exec's context), both in raw (untranslated) form.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::mcs::McsPair;
use crate::policy::Requirement;

/// Where each VM records the files it labelled (one file per VM id, mode 0600).
pub const LABELS_DIR: &str = "/run/cellvm/labels";

/// The file label SELinux reads.
const LABEL: &CStr = c"security.selinux";
/// The label a file had before the first VM that uses it (empty: it had none).
pub const ORIGINAL_XATTR: &CStr = c"trusted.cellvm.selinux";
/// How many running VMs use the file with the label cellvm gave it (decimal).
pub const REFS_XATTR: &CStr = c"trusted.cellvm.ref";

/// Longest attribute value read back: contexts are far shorter; anything longer is not
/// one cellvm wrote and is refused, not truncated.
const MAX_XATTR: usize = 2048;
/// Largest label record read back (a VM labels a handful of files).
const MAX_RECORD: u64 = 64 * 1024;

/// Read-only (and shared) disk images: the image type, no categories.
pub const SHARED_IMAGE_LABEL: &str = "system_u:object_r:cellvm_image_t:s0";
/// Kernels and initrds: read by the VMM, shared by every VM that boots them.
pub const CONTENT_LABEL: &str = "system_u:object_r:cellvm_content_t:s0";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tenant {0}: selinux = \"required\" but SELinux is not enabled on this host (no /sys/fs/selinux)")]
    Required(String),
    #[error("SELinux: {0}")]
    Call(String),
    #[error("{path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: in use by another VM as {current:?}; only a read-only image is shared")]
    InUse { path: String, current: String },
    #[error("{path}: trusted.cellvm.ref holds {found:?}, not a reference count; left alone")]
    BadRefs { path: String, found: String },
}

impl Error {
    /// Whether the launch is refused for what it asked (exit 2), not failed to build.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Required(_) | Error::InUse { .. })
    }
}

/// SELinux is enabled when selinuxfs is mounted, as libselinux's is_selinux_enabled()
/// decides it.
pub fn enabled() -> bool {
    std::path::Path::new("/sys/fs/selinux/enforce").exists()
}

/// What the cell gets for SELinux: its process label, or None (a logged downgrade).
pub fn plan(
    tenant: &str,
    requirement: Requirement,
    pair: McsPair,
) -> Result<Option<String>, Error> {
    match (enabled(), requirement) {
        (true, _) => Ok(Some(pair.process_label())),
        (false, Requirement::Required) => Err(Error::Required(tenant.into())),
        (false, Requirement::IfAvailable) => {
            eprintln!(
                "cellvm-jailer: warning: tenant {tenant}: SELinux is not enabled on this host; the cell runs without its label {} (policy: selinux = \"if-available\")",
                pair.process_label()
            );
            Ok(None)
        }
    }
}

fn context(label: &str) -> Result<CString, Error> {
    CString::new(label).map_err(|_| Error::Call(format!("label {label:?} contains NUL")))
}

/// Sets the context the next execve() runs in. Call before pivot_root: it is written
/// through /proc/thread-self/attr/exec.
pub fn set_exec_label(label: &str) -> Result<(), Error> {
    context(label)?;
    std::fs::write("/proc/thread-self/attr/exec", label.as_bytes())
        .map_err(|e| Error::Call(format!("setting exec context {label}: {e}")))
}

/// One extended attribute of `file`: None when it has none; longer than MAX_XATTR is an
/// error (E2BIG), never a truncated value.
fn get_xattr(file: &File, name: &CStr) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_XATTR];
    // SAFETY: fgetxattr writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            Some(libc::ERANGE) => Err(std::io::Error::from_raw_os_error(libc::E2BIG)),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

fn set_xattr(file: &File, name: &CStr, value: &[u8]) -> std::io::Result<()> {
    // SAFETY: fsetxattr reads value.len() bytes from value.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes an attribute; one that is not there is fine.
fn remove_xattr(file: &File, name: &CStr) -> std::io::Result<()> {
    // SAFETY: fremovexattr with a NUL-terminated name.
    if unsafe { libc::fremovexattr(file.as_raw_fd(), name.as_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENODATA) {
            return Err(e);
        }
    }
    Ok(())
}

/// A label as stored: the context and its terminating NUL, as libselinux writes it.
fn stored(label: &str) -> Vec<u8> {
    let mut v = label.as_bytes().to_vec();
    v.push(0);
    v
}

/// A stored label without its NUL, for comparison and messages.
fn trimmed(v: &[u8]) -> &[u8] {
    let end = v.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    &v[..end]
}

/// One file a VM labelled: found again by path, trusted only if dev and inode match.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Recorded {
    dev: u64,
    ino: u64,
    path: PathBuf,
}

impl Recorded {
    /// `dev ino path-in-hex`: a path may hold any byte but NUL.
    fn line(&self) -> String {
        let hex: String = self
            .path
            .as_os_str()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{} {} {hex}\n", self.dev, self.ino)
    }

    fn parse(line: &str) -> Option<Recorded> {
        let mut f = line.split(' ');
        let dev = f.next()?.parse().ok()?;
        let ino = f.next()?.parse().ok()?;
        let hex = f.next()?.as_bytes();
        if f.next().is_some() || hex.is_empty() || hex.len() % 2 != 0 {
            return None;
        }
        let bytes = hex
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        if bytes.contains(&0) || bytes.first() != Some(&b'/') {
            return None;
        }
        Some(Recorded {
            dev,
            ino,
            path: PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)),
        })
    }
}

/// The host-wide lock under which reference counts change (flock, released on drop).
struct RefLock(#[allow(dead_code)] File);

fn make_dir(dir: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Io {
            path: dir.display().to_string(),
            what: "creating the label records' directory",
            source,
        })
}

fn lock(dir: &Path) -> Result<RefLock, Error> {
    make_dir(dir)?;
    let path = dir.join(".lock");
    let io = |source| Error::Io {
        path: path.display().to_string(),
        what: "the label lock",
        source,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(RefLock(f))
}

fn read_refs(file: &File, path: &str) -> Result<u32, Error> {
    let v = get_xattr(file, REFS_XATTR).map_err(|source| Error::Io {
        path: path.into(),
        what: "reading trusted.cellvm.ref",
        source,
    })?;
    let Some(v) = v else { return Ok(0) };
    let text = std::str::from_utf8(&v).ok();
    text.filter(|t| (1..=10).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| Error::BadRefs {
            path: path.into(),
            found: String::from_utf8_lossy(&v[..v.len().min(32)]).into_owned(),
        })
}

/// The files one VM labelled, recorded as they are labelled.
pub struct Labels {
    dir: PathBuf,
    id: String,
    requirement: Requirement,
    files: Vec<Recorded>,
}

impl Labels {
    /// The labels of VM `id`, recorded under LABELS_DIR.
    pub fn new(id: &str, requirement: Requirement) -> Labels {
        Labels::in_dir(Path::new(LABELS_DIR), id, requirement)
    }

    fn in_dir(dir: &Path, id: &str, requirement: Requirement) -> Labels {
        Labels {
            dir: dir.into(),
            id: id.into(),
            requirement,
            files: Vec::new(),
        }
    }

    /// Labels `file` with `label` for this VM. `shared`: other VMs may use it with the
    /// same label at the same time (read-only content); otherwise it must be unused.
    pub fn label(&mut self, file: &File, label: &str, shared: bool) -> Result<(), Error> {
        let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let path = std::fs::read_link(&fd_path).map_err(|source| Error::Io {
            path: fd_path,
            what: "finding the file's path",
            source,
        })?;
        let name = path.display().to_string();
        let io = |what: &'static str| {
            let name = name.clone();
            move |source| Error::Io {
                path: name,
                what,
                source,
            }
        };
        let meta = file.metadata().map_err(io("fstat"))?;
        let _lock = lock(&self.dir)?;
        let refs = read_refs(file, &name)?;
        if refs == 0 {
            // First user: remember the original label (unless a run that died between
            // this step and the next already did: that one is still the original).
            let original = match get_xattr(file, LABEL) {
                Ok(o) => o.unwrap_or_default(),
                Err(e)
                    if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                        && self.requirement == Requirement::IfAvailable =>
                {
                    eprintln!(
                        "cellvm-jailer: warning: {name}: its file system keeps no SELinux labels; left unlabelled (policy: selinux = \"if-available\")"
                    );
                    return Ok(());
                }
                Err(e) => return Err(io("reading its label")(e)),
            };
            if get_xattr(file, ORIGINAL_XATTR)
                .map_err(io("reading trusted.cellvm.selinux"))?
                .is_none()
            {
                set_xattr(file, ORIGINAL_XATTR, &original)
                    .map_err(io("saving its label in trusted.cellvm.selinux"))?;
            }
            set_xattr(file, REFS_XATTR, b"1").map_err(io("setting trusted.cellvm.ref"))?;
            set_xattr(file, LABEL, &stored(label)).map_err(io("labelling it"))?;
        } else {
            let current = get_xattr(file, LABEL)
                .map_err(io("reading its label"))?
                .unwrap_or_default();
            if !shared || trimmed(&current) != label.as_bytes() {
                return Err(Error::InUse {
                    path: name,
                    current: String::from_utf8_lossy(trimmed(&current)).into_owned(),
                });
            }
            let more = refs.checked_add(1).ok_or_else(|| Error::BadRefs {
                path: name.clone(),
                found: refs.to_string(),
            })?;
            set_xattr(file, REFS_XATTR, more.to_string().as_bytes())
                .map_err(io("setting trusted.cellvm.ref"))?;
        }
        // Recorded once the reference is taken: a run killed in between leaves one
        // reference too many (the label stays), never one too few (restored under
        // another VM).
        self.files.push(Recorded {
            dev: meta.dev(),
            ino: meta.ino(),
            path,
        });
        if let Err(e) = write_record(&self.dir, &self.id, &self.files) {
            // Unrecorded, nothing would give the reference back: give it back now.
            self.files.pop();
            release(file, &name)?;
            return Err(e);
        }
        Ok(())
    }
}

fn record_path(dir: &Path, id: &str) -> Result<PathBuf, Error> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::Call(format!("vm id {id:?}: not a registry id")));
    }
    Ok(dir.join(id))
}

/// Replaces VM `id`'s record with `files` (written whole, then renamed into place).
fn write_record(dir: &Path, id: &str, files: &[Recorded]) -> Result<(), Error> {
    let path = record_path(dir, id)?;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        what: "writing the label record",
        source,
    };
    if files.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        };
    }
    let tmp = dir.join(format!(".{id}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io)?;
    let text: String = files.iter().map(Recorded::line).collect();
    f.write_all(text.as_bytes()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

fn read_record(path: &Path) -> std::io::Result<Option<String>> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    f.take(MAX_RECORD).read_to_string(&mut text)?;
    Ok(Some(text))
}

/// Opens a recorded file again for its attributes: without following any symlink, and
/// only if it is still the same regular file (dev and inode) that was labelled.
fn reopen(r: &Recorded) -> Result<File, String> {
    let c = CString::new(r.path.as_os_str().as_bytes()).map_err(|_| "path holds NUL")?;
    // SAFETY: open_how is plain data; all-zero is its "no flags" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a NUL-terminated path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: a fresh descriptor, owned from here on.
    let handle = unsafe { File::from_raw_fd(fd as i32) };
    let same = |f: &File| {
        f.metadata()
            .map(|m| m.file_type().is_file() && m.dev() == r.dev && m.ino() == r.ino)
            .unwrap_or(false)
    };
    if !same(&handle) {
        return Err("no longer the file that was labelled (dev/inode differ)".into());
    }
    // An O_PATH descriptor carries no attributes; reopen that very inode through it.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(|e| e.to_string())?;
    if !same(&f) {
        return Err("changed while it was reopened".into());
    }
    Ok(f)
}

/// Drops one VM's reference on `file`; the last one restores the original label.
fn release(file: &File, name: &str) -> Result<(), Error> {
    let io = |what: &'static str| {
        move |source| Error::Io {
            path: name.into(),
            what,
            source,
        }
    };
    match read_refs(file, name)? {
        0 => {
            eprintln!("cellvm-jailer: {name}: holds no cellvm label reference; left alone");
            Ok(())
        }
        1 => {
            match get_xattr(file, ORIGINAL_XATTR).map_err(io("reading trusted.cellvm.selinux"))? {
                Some(o) if o.is_empty() => {
                    remove_xattr(file, LABEL).map_err(io("removing its label"))?
                }
                Some(o) => set_xattr(file, LABEL, &o).map_err(io("restoring its label"))?,
                None => eprintln!(
                    "cellvm-jailer: {name}: its original label was not saved; label left as it is"
                ),
            }
            remove_xattr(file, ORIGINAL_XATTR).map_err(io("removing trusted.cellvm.selinux"))?;
            remove_xattr(file, REFS_XATTR).map_err(io("removing trusted.cellvm.ref"))
        }
        n => set_xattr(file, REFS_XATTR, (n - 1).to_string().as_bytes())
            .map_err(io("setting trusted.cellvm.ref")),
    }
}

/// Drops every label reference VM `id` recorded (the last user of a file restores its
/// original label) and removes the record. Called by `gc::remove_cell` after every
/// ending, also for a cell whose supervisor was killed. Logs and goes on past a file it
/// cannot restore; never panics on what it finds on disk.
pub fn restore_recorded(id: &str) {
    if let Err(e) = restore_in(Path::new(LABELS_DIR), id) {
        eprintln!("cellvm-jailer: vm {id}: restoring labels: {e}");
    }
}

fn restore_in(dir: &Path, id: &str) -> Result<(), Error> {
    let path = record_path(dir, id)?;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        what: "reading the label record",
        source,
    };
    if !path.exists() {
        return Ok(());
    }
    let _lock = lock(dir)?;
    let Some(text) = read_record(&path).map_err(io)? else {
        return Ok(());
    };
    let mut left: Vec<Recorded> = Vec::new();
    for line in text.lines() {
        match Recorded::parse(line) {
            Some(r) => left.push(r),
            None => eprintln!(
                "cellvm-jailer: {}: unreadable line {:?} skipped",
                path.display(),
                line.chars().take(80).collect::<String>()
            ),
        }
    }
    // One file at a time, the record rewritten after each: a restore that is itself
    // killed never drops a reference twice.
    while let Some(r) = left.pop() {
        let name = r.path.display().to_string();
        match reopen(&r) {
            Ok(f) => {
                if let Err(e) = release(&f, &name) {
                    eprintln!("cellvm-jailer: {e}");
                }
            }
            Err(e) => eprintln!("cellvm-jailer: {name}: label not restored: {e}"),
        }
        write_record(dir, id, &left)?;
    }
    write_record(dir, id, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("cellvm-label-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn label_of(path: &Path, name: &CStr) -> Option<String> {
        let f = File::open(path).unwrap();
        get_xattr(&f, name)
            .unwrap()
            .map(|v| String::from_utf8_lossy(trimmed(&v)).into_owned())
    }

    const ORIG: &str = "system_u:object_r:etc_t:s0";

    fn image(dir: &Path, name: &str, original: Option<&str>) -> (PathBuf, File) {
        let p = dir.join(name);
        std::fs::write(&p, b"x").unwrap();
        let f = File::open(&p).unwrap();
        // Without SELinux enabled the kernel still stores security.* xattrs for root
        // (ext4 here), so the labelling and restoring path runs for real.
        if let Some(o) = original {
            set_xattr(&f, LABEL, &stored(o)).expect("root can set security.selinux here");
        }
        (p, f)
    }

    #[test]
    fn a_writable_image_gets_the_pair_and_its_original_back_from_the_record() {
        let s = scratch("rw");
        let (p, f) = image(&s.0, "disk.img", Some(ORIG));
        let pair = McsPair::new(7, 9).unwrap();
        let mut l = Labels::in_dir(&s.0, "vm-a", Requirement::IfAvailable);
        l.label(&f, &pair.image_label(), false).unwrap();
        assert_eq!(
            label_of(&p, LABEL).as_deref(),
            Some("system_u:object_r:cellvm_image_t:s0:c7,c9")
        );
        assert_eq!(label_of(&p, ORIGINAL_XATTR).as_deref(), Some(ORIG));
        assert_eq!(label_of(&p, REFS_XATTR).as_deref(), Some("1"));
        // A second VM may not take a writable image, shared or not.
        let mut other = Labels::in_dir(&s.0, "vm-b", Requirement::IfAvailable);
        let e = other.label(&f, SHARED_IMAGE_LABEL, true).unwrap_err();
        assert!(matches!(e, Error::InUse { .. }) && e.is_refusal(), "{e}");
        drop(l); // the record, not this value, is what restores
        restore_in(&s.0, "vm-a").unwrap();
        assert_eq!(label_of(&p, LABEL).as_deref(), Some(ORIG));
        assert_eq!(label_of(&p, ORIGINAL_XATTR), None);
        assert_eq!(label_of(&p, REFS_XATTR), None);
        assert!(!s.0.join("vm-a").exists());
        // Restoring twice changes nothing.
        restore_in(&s.0, "vm-a").unwrap();
        assert_eq!(label_of(&p, LABEL).as_deref(), Some(ORIG));
    }

    #[test]
    fn a_shared_image_is_restored_by_its_last_user_only() {
        let s = scratch("shared");
        let (p, f) = image(&s.0, "base.img", None);
        let mut a = Labels::in_dir(&s.0, "vm-a", Requirement::IfAvailable);
        let mut b = Labels::in_dir(&s.0, "vm-b", Requirement::IfAvailable);
        a.label(&f, SHARED_IMAGE_LABEL, true).unwrap();
        b.label(&f, SHARED_IMAGE_LABEL, true).unwrap();
        assert_eq!(label_of(&p, REFS_XATTR).as_deref(), Some("2"));
        restore_in(&s.0, "vm-a").unwrap();
        assert_eq!(label_of(&p, LABEL).as_deref(), Some(SHARED_IMAGE_LABEL));
        assert_eq!(label_of(&p, REFS_XATTR).as_deref(), Some("1"));
        restore_in(&s.0, "vm-b").unwrap();
        // It had no label: it has none again.
        assert_eq!(label_of(&p, LABEL), None);
        assert_eq!(label_of(&p, REFS_XATTR), None);
    }

    #[test]
    fn concurrent_labellers_count_every_reference() {
        let s = scratch("race");
        let (p, _) = image(&s.0, "base.img", Some(ORIG));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (dir, p) = (s.0.clone(), p.clone());
                std::thread::spawn(move || {
                    let f = File::open(&p).unwrap();
                    let mut l = Labels::in_dir(&dir, &format!("vm-{i}"), Requirement::IfAvailable);
                    l.label(&f, CONTENT_LABEL, true).unwrap();
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(label_of(&p, REFS_XATTR).as_deref(), Some("8"));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let dir = s.0.clone();
                std::thread::spawn(move || restore_in(&dir, &format!("vm-{i}")).unwrap())
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(label_of(&p, LABEL).as_deref(), Some(ORIG));
        assert_eq!(label_of(&p, REFS_XATTR), None);
    }

    #[test]
    fn a_replaced_or_symlinked_file_is_not_touched_on_restore() {
        let s = scratch("swap");
        let (p, f) = image(&s.0, "disk.img", Some(ORIG));
        let mut l = Labels::in_dir(&s.0, "vm-a", Requirement::IfAvailable);
        l.label(&f, SHARED_IMAGE_LABEL, true).unwrap();
        drop(f);
        // The path now names another file (a symlink to a fresh one): left alone.
        let (other, _) = image(&s.0, "other.img", Some(ORIG));
        std::fs::rename(&p, s.0.join("moved.img")).unwrap();
        std::os::unix::fs::symlink(&other, &p).unwrap();
        restore_in(&s.0, "vm-a").unwrap();
        assert_eq!(label_of(&other, LABEL).as_deref(), Some(ORIG));
        assert_eq!(label_of(&other, REFS_XATTR), None);
        assert_eq!(
            label_of(&s.0.join("moved.img"), LABEL).as_deref(),
            Some(SHARED_IMAGE_LABEL),
            "the moved file is not found again by its old path"
        );
    }

    #[test]
    fn odd_attributes_and_records_are_refused_without_panicking() {
        let s = scratch("odd");
        let (p, f) = image(&s.0, "disk.img", Some(ORIG));
        let mut l = Labels::in_dir(&s.0, "vm-a", Requirement::IfAvailable);
        for bad in [&b"x1"[..], b"", b"99999999999", b"-1", &[0xff; 300]] {
            set_xattr(&f, REFS_XATTR, bad).unwrap();
            let e = l.label(&f, SHARED_IMAGE_LABEL, true).unwrap_err();
            assert!(matches!(e, Error::BadRefs { .. }), "{bad:?}: {e}");
        }
        remove_xattr(&f, REFS_XATTR).unwrap();
        // A label longer than any context is refused, not truncated.
        set_xattr(&f, LABEL, &vec![b'a'; MAX_XATTR + 1]).unwrap();
        assert!(l.label(&f, SHARED_IMAGE_LABEL, true).is_err());
        assert_eq!(label_of(&p, REFS_XATTR), None);
        // A record with garbage lines: skipped, the file is gone afterwards.
        std::fs::write(s.0.join("vm-z"), "1 2\nzz\n1 2 3\n\u{0}\n1 2 2f00\n").unwrap();
        restore_in(&s.0, "vm-z").unwrap();
        assert!(!s.0.join("vm-z").exists());
        assert!(restore_in(&s.0, "../etc").is_err());
    }

    #[test]
    fn record_lines_round_trip_any_path() {
        let r = Recorded {
            dev: 2049,
            ino: 77,
            path: PathBuf::from(std::ffi::OsStr::from_bytes(b"/a b\n\xffc")),
        };
        assert_eq!(Recorded::parse(r.line().trim_end()), Some(r));
    }
}
