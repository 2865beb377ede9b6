//! Each VM's run directory, `/run/cellvm/vm/<id>/`: where its API socket, console
//! socket, console log and (detached) supervisor log live. Root's alone (0700), or
//! 0750 root:G when the tenant policy names an `api_group` (then `/run/cellvm` and
//! `/run/cellvm/vm` are 0711, so the group can reach a directory whose name it knows
//! but list none). The registry (`vms/`) stays 0700 either way. The sockets are bound
//! while the directory is still 0700, then given their modes, and only then is the
//! directory opened to the group: no one else can ever connect to a socket whose mode
//! is not yet final.

use std::fs::{self, File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

pub const API_SOCKET: &str = "api.sock";
pub const CONSOLE_SOCKET: &str = "console.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const SUPERVISOR_LOG: &str = "supervisor.log";
/// A copy of the VM's spec as the jailer was given it (root's, 0600).
pub const SPEC_COPY: &str = "vm.toml";
/// The most of a spec that is copied (a spec is at most this long anyway).
const MAX_SPEC: u64 = 1 << 20;
/// A vsock device's host side: host programs connect to `vsock.sock` and write
/// `CONNECT PORT`; the guest's connections to host port P go to `vsock/port_P`.
pub const VSOCK_SOCKET: &str = "vsock.sock";
pub const VSOCK_DIR: &str = "vsock";
pub const VSOCK_PORT_PREFIX: &str = "port";

/// A virtio-console named port's host socket in the run directory.
pub fn console_port_socket(name: &str) -> String {
    format!("port-{name}.sock")
}

/// What a vsock backend is handed: the listening `vsock.sock` and a descriptor of
/// `vsock/` (its working directory).
pub struct VsockHost {
    pub listener: OwnedFd,
    pub dir: OwnedFd,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not a directory of root's (a symlink or another owner's); not used")]
    NotOurs(String),
    #[error("tenant {tenant}: api_group = \"{group}\": no such group in /etc/group")]
    NoGroup { tenant: String, group: String },
    #[error(transparent)]
    Remove(#[from] crate::gc::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `RUN_DIR/vm/<id>`.
pub fn path(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join("vm").join(id)
}

/// The gid of `group` (a name in /etc/group, or a number).
pub fn resolve_group(tenant: &str, group: &str) -> Result<u32, Error> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = fs::read_to_string("/etc/group").unwrap_or_default();
    gid_in(&text, group).ok_or_else(|| Error::NoGroup {
        tenant: tenant.into(),
        group: group.into(),
    })
}

/// The gid of `group` in the text of an /etc/group.
fn gid_in(text: &str, group: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(group))
            .then(|| f.nth(1).and_then(|g| g.parse().ok()))
            .flatten()
    })
}

/// Makes `dir` a directory of root's with `mode`, creating it if missing; a symlink or
/// a directory of another owner is refused.
fn root_dir(dir: &Path, mode: u32) -> Result<(), Error> {
    root_dir_keeping(dir, mode, &[])
}

/// As `root_dir`, but an existing directory whose mode is one of `keep` is left as
/// it is: no chmod, so nothing another launch set concurrently is undone.
fn root_dir_keeping(dir: &Path, mode: u32, keep: &[u32]) -> Result<(), Error> {
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(dir)(e)),
    }
    let m = fs::symlink_metadata(dir).map_err(io(dir))?;
    if !m.is_dir() || m.uid() != 0 {
        return Err(Error::NotOurs(dir.display().to_string()));
    }
    if keep.contains(&(m.mode() & 0o7777)) {
        return Ok(());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io(dir))
}

/// A VM's run directory, made by `create` (still root's alone) and opened to the
/// tenant's group by `publish`.
pub struct RunDir {
    pub path: PathBuf,
    pub gid: Option<u32>,
}

impl RunDir {
    /// Makes `RUN_DIR/vm/<id>/`, empty and root's alone (whatever an earlier VM of the
    /// same id left there is removed first). `run_dir` exists already (the registry).
    pub fn create(run_dir: &Path, id: &str, gid: Option<u32>) -> Result<RunDir, Error> {
        let base = run_dir.join("vm");
        if gid.is_some() {
            // Traversable, not listable: a group member reaches only the VM it names.
            root_dir(run_dir, 0o711)?;
            root_dir(&base, 0o711)?;
        } else {
            // Made 0700 if new; left 0711 if another VM's group needs it (a chmod
            // here could race a grouped launch opening it and shut its group out);
            // anything wider is narrowed.
            root_dir_keeping(&base, 0o700, &[0o700, 0o711])?;
        }
        let path = path(run_dir, id);
        crate::gc::remove_tree(&path)?;
        root_dir(&path, 0o700)?;
        Ok(RunDir { path, gid })
    }

    /// The mode of the sockets and logs the group may use.
    fn shared_mode(&self) -> u32 {
        if self.gid.is_some() {
            0o660
        } else {
            0o600
        }
    }

    fn give_group(&self, p: &Path) -> Result<(), Error> {
        if let Some(g) = self.gid {
            std::os::unix::fs::chown(p, Some(0), Some(g)).map_err(io(p))?;
        }
        Ok(())
    }

    /// Binds and listens on `name` (0600, or 0660 root:G); the listening descriptor.
    pub fn listen(&self, name: &str) -> Result<OwnedFd, Error> {
        let p = self.path.join(name);
        let l = UnixListener::bind(&p).map_err(io(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(self.shared_mode())).map_err(io(&p))?;
        self.give_group(&p)?;
        Ok(OwnedFd::from(l))
    }

    /// Copies the VM's spec into the directory (0600, root's), for `cellvmctl snapshot`.
    pub fn keep_spec(&self, spec: &Path) -> Result<(), Error> {
        use std::io::Read;
        let mut text = Vec::new();
        File::open(spec)
            .and_then(|f| f.take(MAX_SPEC).read_to_end(&mut text))
            .map_err(io(spec))?;
        let p = self.path.join(SPEC_COPY);
        let _ = fs::remove_file(&p);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &text))
            .map_err(io(&p))
    }

    /// Opens (appending, creating) log `name`: the console log is the group's to read
    /// (0640 root:G), the supervisor's own log root's (0600).
    pub fn open_log(&self, name: &str) -> Result<File, Error> {
        let gid = self.gid.filter(|_| name.starts_with(CONSOLE_LOG));
        open_log(&self.path.join(name), self.log_mode(name), gid)
    }

    pub fn log_mode(&self, name: &str) -> u32 {
        if self.gid.is_some() && name.starts_with(CONSOLE_LOG) {
            0o640
        } else {
            0o600
        }
    }

    /// Opens the directory to the group (0750 root:G); nothing to do without one.
    pub fn publish(&self) -> Result<(), Error> {
        if self.gid.is_some() {
            self.give_group(&self.path)?;
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o750))
                .map_err(io(&self.path))?;
        }
        Ok(())
    }

    /// Binds `vsock.sock` (as the API socket) and makes `vsock/`, root's, mode 0710
    /// with the backend's group `backend_gid`: the backend, which resolves `port_P`
    /// there, may search it and nothing more (no listing; and Landlock leaves it no
    /// right to create or remove anything); root puts the host's listeners in it.
    pub fn vsock_host(&self, backend_gid: u32) -> Result<VsockHost, Error> {
        let listener = self.listen(VSOCK_SOCKET)?;
        let p = self.path.join(VSOCK_DIR);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(io(&p))?;
        std::os::unix::fs::chown(&p, Some(0), Some(backend_gid)).map_err(io(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o710)).map_err(io(&p))?;
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .map_err(io(&p))?;
        Ok(VsockHost {
            listener,
            dir: OwnedFd::from(dir),
        })
    }

    pub fn api_socket(&self) -> PathBuf {
        self.path.join(API_SOCKET)
    }
}

/// Opens log `p` for appending, never through a symlink, with `mode` (root:G with a
/// group).
pub fn open_log(p: &Path, mode: u32, gid: Option<u32>) -> Result<File, Error> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
        .map_err(io(p))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(p))?;
    if let Some(g) = gid {
        std::os::unix::fs::fchown(&f, Some(0), Some(g)).map_err(io(p))?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_resolve_from_etc_group_text() {
        let text = "root:x:0:\ncellvm-ops:x:4242:alice,bob\nbroken\nops:x:notanumber:\n";
        assert_eq!(gid_in(text, "cellvm-ops"), Some(4242));
        assert_eq!(gid_in(text, "root"), Some(0));
        assert_eq!(gid_in(text, "ops"), None);
        assert_eq!(gid_in(text, "cellvm"), None, "no prefix match");
        assert_eq!(resolve_group("t", "777").unwrap(), 777);
        let e = resolve_group("t", "no-such-group-cellvm").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant t: api_group = \"no-such-group-cellvm\": no such group in /etc/group"
        );
    }

    fn mode(p: &Path) -> (u32, u32, u32) {
        let m = fs::symlink_metadata(p).unwrap();
        (m.mode() & 0o7777, m.uid(), m.gid())
    }

    #[test]
    fn a_run_directory_is_root_only_without_a_group_and_0750_with_one() {
        let base = std::env::temp_dir().join(format!("cellvm-rundir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700)).unwrap();
        let d = RunDir::create(&base, "a", None).unwrap();
        let api = d.listen(API_SOCKET).unwrap();
        d.open_log(CONSOLE_LOG).unwrap();
        d.publish().unwrap();
        assert_eq!(mode(&base.join("vm")).0, 0o700);
        assert_eq!(mode(&d.path), (0o700, 0, 0));
        assert_eq!(mode(&d.api_socket()), (0o600, 0, 0));
        assert_eq!(mode(&d.path.join(CONSOLE_LOG)), (0o600, 0, 0));
        drop(api);
        let g = RunDir::create(&base, "b", Some(4242)).unwrap();
        let _api = g.listen(API_SOCKET).unwrap();
        assert_eq!(mode(&g.path).0, 0o700, "closed until published");
        g.open_log(CONSOLE_LOG).unwrap();
        g.open_log(SUPERVISOR_LOG).unwrap();
        g.publish().unwrap();
        assert_eq!(mode(&base).0, 0o711);
        assert_eq!(mode(&base.join("vm")).0, 0o711);
        assert_eq!(mode(&g.path), (0o750, 0, 4242));
        assert_eq!(mode(&g.api_socket()), (0o660, 0, 4242));
        assert_eq!(mode(&g.path.join(CONSOLE_LOG)), (0o640, 0, 4242));
        assert_eq!(mode(&g.path.join(SUPERVISOR_LOG)), (0o600, 0, 0));
        // A VM without a group leaves the traversable base as it is.
        RunDir::create(&base, "c", None).unwrap();
        assert_eq!(mode(&base.join("vm")).0, 0o711);
        // Leftovers of an earlier VM of the same id are removed; a symlink is not followed.
        let outside = base.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("keep"), b"k").unwrap();
        std::os::unix::fs::symlink(&outside, base.join("vm/a/link")).unwrap();
        RunDir::create(&base, "a", None).unwrap();
        assert!(fs::read_dir(base.join("vm/a")).unwrap().next().is_none());
        assert!(outside.join("keep").exists());
        fs::remove_dir_all(base.join("vm/a")).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("vm/a")).unwrap();
        assert!(RunDir::create(&base, "a", None).is_err() || !base.join("vm/a").is_symlink());
        assert!(outside.join("keep").exists());
        let _ = fs::remove_dir_all(&base);
    }
}
