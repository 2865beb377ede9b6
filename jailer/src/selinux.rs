//! SELinux (sVirt's scheme). On a host where SELinux is enabled, the cell's process gets `system_u:system_r:cellvm_t:s0:cA,cB` as its exec
//! context, read-only images get `cellvm_image_t:s0` (no categories: shareable), and the
//! original labels are restored when the cell ends. On a host without SELinux (ours):
//! `selinux = "required"` refuses with a clear error and `"if-available"` logs the
//! downgrade and goes on.
//!
//! Why not the `selinux` crate: its libselinux, linked into this static-pie binary,
//! crashes in a start-up constructor (an init_array entry left unrelocated), before
//! main runs. The three operations needed here are plain kernel interfaces that
//! libselinux itself wraps: the `security.selinux` extended attribute (get/set a file's
//! label) and /proc/thread-self/attr/exec (the next exec's context), both in raw
//! (untranslated) form.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;

const XATTR: &std::ffi::CStr = c"security.selinux";

use crate::mcs::McsPair;
use crate::policy::Requirement;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tenant {0}: selinux = \"required\" but SELinux is not enabled on this host (no /sys/fs/selinux)")]
    Required(String),
    #[error("SELinux: {0}")]
    Call(String),
}

/// SELinux is enabled when selinuxfs is mounted, as libselinux's is_selinux_enabled()
/// decides it.
pub fn enabled() -> bool {
    std::path::Path::new("/sys/fs/selinux/enforce").exists()
}

/// Label for read-only (and shared) images: the image type, no categories.
pub const SHARED_IMAGE_LABEL: &str = "system_u:object_r:cellvm_image_t:s0";

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

fn get_label(file: &File) -> Result<CString, Error> {
    let mut buf = vec![0u8; 256];
    // SAFETY: fgetxattr into a buffer of the given length.
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            XATTR.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(Error::Call(format!(
            "reading a file's label: {}",
            std::io::Error::last_os_error()
        )));
    }
    buf.truncate(n as usize);
    while buf.last() == Some(&0) {
        buf.pop();
    }
    CString::new(buf).map_err(|_| Error::Call("a file's label contains NUL".into()))
}

fn set_label(file: &File, label: &std::ffi::CStr) -> Result<(), Error> {
    let bytes = label.to_bytes_with_nul();
    // SAFETY: fsetxattr with a valid name and a buffer of the given length.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            XATTR.as_ptr(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(Error::Call(format!(
            "labelling a file {label:?}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Files relabelled for a cell, with their original labels, restored on drop.
#[derive(Default)]
pub struct Relabelled {
    files: Vec<(File, CString)>,
}

impl Relabelled {
    /// Labels `file` with `label`, remembering what it had.
    pub fn relabel(&mut self, file: &File, label: &str) -> Result<(), Error> {
        let original = get_label(file)?;
        set_label(file, &context(label)?)?;
        let dup = file
            .try_clone()
            .map_err(|e| Error::Call(format!("dup: {e}")))?;
        self.files.push((dup, original));
        Ok(())
    }
}

impl Drop for Relabelled {
    fn drop(&mut self) {
        for (file, original) in self.files.drain(..) {
            if let Err(e) = set_label(&file, &original) {
                eprintln!("cellvm-jailer: restoring label {original:?}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_through_the_xattr_and_are_restored_on_drop() {
        // Without SELinux enabled the kernel still stores security.* xattrs for root
        // (ext4 here), so the labelling and restoring path runs for real.
        let path = std::env::temp_dir().join(format!("cellvm-label-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let f = File::open(&path).unwrap();
        set_label(&f, c"system_u:object_r:etc_t:s0").expect("root can set security.selinux here");
        {
            let mut r = Relabelled::default();
            r.relabel(&f, SHARED_IMAGE_LABEL).unwrap();
            assert_eq!(get_label(&f).unwrap().to_str().unwrap(), SHARED_IMAGE_LABEL);
        }
        assert_eq!(
            get_label(&f).unwrap().to_str().unwrap(),
            "system_u:object_r:etc_t:s0"
        );
    }
}
