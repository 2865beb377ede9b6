//! `cellvm-jailer launch`: one function that reads top to bottom in the order the cell
//! is built (DESIGN.md), then supervises the VMM and removes every trace of the cell.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cell::{self, CellSpec, Root, Rules};
use crate::cgroup::Cgroup;
use crate::console::{Console, ConsoleLog};
use crate::policy::{TenantPolicy, VmSpec};
use crate::registry::{Entry, Registry};
use crate::rundir::RunDir;
use crate::supervise::{Control, Ending, Log, ReadyCheck, Relay, Signals};
use crate::{identity, landlock, namespaces, paths, policy, selinux};

/// Exit status for a refused launch (policy, spec, files): the caller's input.
pub const EXIT_REFUSED: i32 = 2;
/// Where tests/setup.sh installs virtiofsd (built statically from the crates.io
/// release it pins).
pub const DEFAULT_VIRTIOFSD: &str = "/usr/local/libexec/cellvm/virtiofsd";

/// Exit status when the cell could not be built.
pub const EXIT_SETUP: i32 = 1;

pub struct Options {
    pub policy: PathBuf,
    pub vm: PathBuf,
    pub id: Option<String>,
    pub vmm: PathBuf,
    /// The device backends' binary, exec'd in each backend cell.
    pub device: PathBuf,
    /// virtiofsd (statically linked), exec'd in each virtio-fs share's cell.
    pub virtiofsd: PathBuf,
    pub run_dir: PathBuf,
    /// Test-only: run probe NAME (`cellvm-probe NAME --role ROLE --seccomp MODE`) in the
    /// VMM's exact cell instead of the VMM.
    pub probe: Option<String>,
    /// Test-only: the probe program; main.rs puts it in place of `vmm` or `device` for
    /// the probe's cell.
    pub probe_binary: Option<PathBuf>,
    /// Test-only: where the probe runs: `vmm`, or the cell of the first `blk`, `net` or
    /// `rng` backend (then no VMM is started and the launch ends with the probe's
    /// status).
    pub probe_in: String,
    /// Test-only: `--path P` for the probe (e.g. another VM's socket to try).
    pub probe_path: Option<PathBuf>,
    /// What a seccomp violation does in the cell: "kill" (default), "log" or "off";
    /// anything but kill needs `seccomp_off_allowed` in the tenant policy.
    pub seccomp: String,
    /// Test-only: layers to leave out, to show the others still hold (defence in depth).
    pub without: Vec<String>,
    /// Detached (`launch --detach`): no terminal; the supervisor's lines go to the run
    /// directory's supervisor.log, and the waiting parent is told once the guest runs.
    pub detach: bool,
    /// Restore the snapshot in this directory (its `state` and `memory` files, opened
    /// here and handed to the VMM, which checks them against the spec) instead of
    /// booting; a guest reset afterwards boots afresh.
    pub restore: Option<PathBuf>,
    /// Start the VM paused (`vm.resume` runs it).
    pub paused: bool,
}

pub struct Failure {
    pub code: i32,
    pub message: String,
}

/// Why a launch could not build or run the VM's cells (after its input was accepted).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cell(#[from] cell::CellError),
    #[error(transparent)]
    Namespaces(#[from] namespaces::Error),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::Error),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("--probe-in {0}: the VM spec has no such device")]
    NoProbeTarget(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = match e {
            Error::NoProbeTarget(_) => EXIT_REFUSED,
            _ => EXIT_SETUP,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl From<cell::CellError> for Failure {
    fn from(e: cell::CellError) -> Failure {
        Error::from(e).into()
    }
}

impl From<namespaces::Error> for Failure {
    fn from(e: namespaces::Error) -> Failure {
        Error::from(e).into()
    }
}

impl From<crate::cgroup::Error> for Failure {
    fn from(e: crate::cgroup::Error) -> Failure {
        Error::from(e).into()
    }
}

/// Whether the VMM's cell can be given RLIMIT_MEMLOCK of `bytes`: the jailer's own hard
/// limit allows it, or the jailer may raise it (CAP_SYS_RESOURCE, which some container
/// hosts withhold from root).
fn memlock_possible(bytes: u64) -> Result<(), String> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 || r.rlim_max >= bytes {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    // CAP_SYS_RESOURCE is capability 24.
    if eff & (1 << 24) != 0 {
        return Ok(());
    }
    Err(format!(
        "locking {bytes} bytes of guest RAM needs RLIMIT_MEMLOCK of that much; this host's hard limit is {} bytes and the jailer has no CAP_SYS_RESOURCE to raise it",
        r.rlim_max
    ))
}

fn refused(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: EXIT_REFUSED,
        message: e.to_string(),
    }
}

fn setup(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: EXIT_SETUP,
        message: e.to_string(),
    }
}

/// Everything validated and opened before any host state changes.
pub struct Plan {
    pub policy: TenantPolicy,
    pub spec: VmSpec,
    pub id: String,
    pub kernel: Option<File>,
    pub initrd: Option<File>,
    pub vmm: File,
    /// `cellvm-device`, checked and opened when the VM has devices.
    pub device_bin: Option<File>,
    /// virtiofsd, checked and opened when the VM has shares.
    pub virtiofsd_bin: Option<File>,
    pub devices: Vec<Device>,
    /// The tenant's api_group, resolved.
    pub api_gid: Option<u32>,
    /// Guest RAM's file (`memory_file`), opened read-write and locked.
    pub memory_file: Option<File>,
    /// A snapshot's state and memory files (`--restore`), opened read-only.
    pub restore: Option<(File, File)>,
}

/// A device backend to start in its own cell.
pub enum Device {
    Blk {
        image: File,
        readonly: bool,
        direct: bool,
        queues: u16,
        /// The image's format, checked against its header.
        format: block::header::Format,
        /// The layers below a qcow2 top, nearest first, each opened read-only.
        backing: Vec<crate::chain::Layer>,
        /// RLIMIT_FSIZE of the backend's cell for a writable qcow2 top; None: the file's
        /// length (it cannot grow).
        fsize: Option<u64>,
        /// A LUKS top's key file (`key_secret`), for the backend to read.
        key: Option<File>,
    },
    Net {
        tap: String,
        mac: Option<String>,
        /// Queue pairs: the descriptors `attach_taps` opens, one per queue.
        queues: u16,
        /// Attached by `attach_taps` when the VM is launched (never by `check`): the
        /// first queue's, then the others'.
        fd: Option<OwnedFd>,
        more: Vec<OwnedFd>,
    },
    Rng,
    /// virtio-vsock: its host side (`vsock.sock` and `vsock/`) is made in the run
    /// directory when the VM is built.
    Vsock {
        cid: u64,
    },
    /// virtio-console: hvc0's host end is the supervisor's (a socket pair made for each
    /// life of the VM); each named port's is `port-NAME.sock` in the run directory.
    Console {
        ports: Vec<String>,
    },
    /// A virtio-fs share: virtiofsd in a cell whose only content is the directory.
    Fs {
        /// The shared directory, opened beneath the tenant's share_dirs.
        dir: File,
        tag: String,
        readonly: bool,
    },
}

/// A virtio-fs share's command line: cellvm-device installs cellvm's seccomp profile
/// and execs virtiofsd (open on `exec_fd`), whose own sandbox and seccomp are off: the
/// cell is the sandbox. It takes the VMM's connection on `listen_fd`, serves it, and
/// exits when the VMM hangs up.
fn fs_argv(device: &Device, exec_fd: RawFd, listen_fd: RawFd, seccomp: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "cellvm-device",
        "virtiofsd",
        "--exec-fd",
        &exec_fd.to_string(),
        "--seccomp",
        seccomp,
        "--",
        &format!("--fd={listen_fd}"),
        "--shared-dir=/share",
        "--sandbox=none",
        "--seccomp=none",
        "--inode-file-handles=never",
        "--cache=auto",
        "--rlimit-nofile=0",
        "--log-level=warn",
    ]
    .map(String::from)
    .to_vec();
    if let Device::Fs { readonly: true, .. } = device {
        a.push("--readonly".into());
    }
    a
}

impl Device {
    /// `cellvm-device ...` arguments before the listening socket's.
    fn argv(&self, n: usize, seccomp: &str) -> Vec<String> {
        let mut a: Vec<String> = vec!["cellvm-device".into()];
        let fd = self.passed_fd().unwrap_or(-1).to_string();
        match self {
            Device::Blk {
                readonly,
                direct,
                queues,
                format,
                backing,
                key,
                ..
            } => {
                a.extend(["blk".into(), "--image-fd".into(), fd]);
                // Raw is the backend's default: its command line stays as it was.
                if *format != block::header::Format::Raw {
                    a.extend(["--format".into(), format.to_string()]);
                }
                if !backing.is_empty() {
                    let list: Vec<String> = backing
                        .iter()
                        .map(|l| format!("{}:{}", l.file.as_raw_fd(), l.format))
                        .collect();
                    a.extend(["--backing".into(), list.join(",")]);
                }
                if let Some(k) = key {
                    a.extend(["--key-fd".into(), k.as_raw_fd().to_string()]);
                }
                a.extend([
                    "--queues".into(),
                    queues.to_string(),
                    "--id".into(),
                    format!("cellvm-disk{n}"),
                ]);
                if *readonly {
                    a.push("--readonly".into());
                }
                if *direct {
                    a.push("--direct".into());
                }
            }
            Device::Net { mac, more, .. } => {
                let mut list = vec![fd];
                list.extend(more.iter().map(|f| f.as_raw_fd().to_string()));
                a.extend(["net".into(), "--tap-fd".into(), list.join(",")]);
                if let Some(mac) = mac {
                    a.extend(["--mac".into(), mac.clone()]);
                }
            }
            Device::Rng => a.push("rng".into()),
            Device::Vsock { cid } => a.extend(["vsock".into(), "--cid".into(), cid.to_string()]),
            Device::Console { .. } => a.push("console".into()),
            // Its command line is virtiofsd's own (`fs_argv`).
            Device::Fs { .. } => return fs_argv(self, -1, -1, seccomp),
        }
        a.extend(["--seccomp".into(), seccomp.into()]);
        a
    }

    fn kind(&self) -> &'static str {
        match self {
            Device::Blk { .. } => "blk",
            Device::Net { .. } => "net",
            Device::Rng => "rng",
            Device::Vsock { .. } => "vsock",
            Device::Console { .. } => "console",
            Device::Fs { .. } => "fs",
        }
    }

    /// The descriptors of a disk's backing layers and key, kept across the backend's exec.
    fn backing_fds(&self) -> Vec<i32> {
        match self {
            Device::Blk { backing, key, .. } => backing
                .iter()
                .map(|l| l.file.as_raw_fd())
                .chain(key.as_ref().map(File::as_raw_fd))
                .collect(),
            Device::Net { more, .. } => more.iter().map(|f| f.as_raw_fd()).collect(),
            _ => Vec::new(),
        }
    }

    /// The one descriptor the backend works on: its image or its tap.
    fn passed_fd(&self) -> Option<i32> {
        match self {
            Device::Blk { image, .. } => Some(image.as_raw_fd()),
            Device::Net { fd, .. } => fd.as_ref().map(|f| f.as_raw_fd()),
            Device::Rng | Device::Vsock { .. } | Device::Console { .. } | Device::Fs { .. } => None,
        }
    }
}

pub fn plan(opts: &Options) -> Result<Plan, Failure> {
    let policy = TenantPolicy::load(&opts.policy).map_err(refused)?;
    let spec = VmSpec::load(&opts.vm).map_err(refused)?;
    plan_for(policy, spec, opts)
}

/// Everything `plan` does once the policy and spec are parsed: the check, then every
/// file the spec names opened and bounded. Root code on tenant input, so the fuzz
/// target `tenant_policy` drives it too.
pub fn plan_for(policy: TenantPolicy, spec: VmSpec, opts: &Options) -> Result<Plan, Failure> {
    policy::check(&policy, &spec).map_err(refused)?;
    if spec.mlock {
        memlock_possible(spec.memory_mib << 20).map_err(|e| {
            refused(format!(
                "tenant {}: vm {}: mlock: {e}",
                policy.name, spec.name
            ))
        })?;
    }
    if !matches!(opts.seccomp.as_str(), "kill" | "log" | "off") {
        return Err(refused(format!(
            "--seccomp {}: expected kill, log or off",
            opts.seccomp
        )));
    }
    if opts.seccomp != "kill" && !policy.seccomp_off_allowed {
        return Err(refused(format!(
            "tenant {}: vm {}: seccomp = {} violates the tenant policy (seccomp_off_allowed = false)",
            policy.name, spec.name, opts.seccomp
        )));
    }
    if let Some(w) = opts
        .without
        .iter()
        .find(|w| !["seccomp", "landlock"].contains(&w.as_str()))
    {
        return Err(refused(format!(
            "--without {w}: only seccomp and landlock can be left out (test only)"
        )));
    }
    if !matches!(opts.probe_in.as_str(), "vmm" | "blk" | "net" | "rng") {
        return Err(refused(format!(
            "--probe-in {}: expected vmm, blk, net or rng",
            opts.probe_in
        )));
    }
    if (opts.probe.is_some() || !opts.without.is_empty()) && !policy.allow_test_switches {
        return Err(refused(format!(
            "tenant {}: --probe and --without are test switches; the tenant policy does not allow them (allow_test_switches = false)",
            policy.name
        )));
    }
    let id = opts
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{}-{}", policy.name, spec.name, std::process::id()));
    if !(1..=64).contains(&id.len())
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(refused(format!(
            "vm id {id:?}: 1-64 characters of [A-Za-z0-9_-]"
        )));
    }
    let open = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| paths::open_beneath(&policy.image_dirs, p))
            .transpose()
    };
    let kernel = open(&spec.kernel).map_err(|e| {
        refused(format!(
            "tenant {}: vm {}: kernel: {e}",
            policy.name, spec.name
        ))
    })?;
    let initrd = open(&spec.initrd).map_err(|e| {
        refused(format!(
            "tenant {}: vm {}: initrd: {e}",
            policy.name, spec.name
        ))
    })?;
    let vmm = open_static_binary(&opts.vmm).map_err(setup)?;
    // Each disk opened (never blocking, only what the file and the policy allow),
    // locked against other writers, and bounded in size.
    let mut devices = Vec::new();
    let mut seen: Vec<((u64, u64), bool)> = Vec::new();
    for f in kernel.iter().chain(initrd.iter()) {
        let m = f.metadata().map_err(setup)?;
        seen.push(((m.dev(), m.ino()), false));
    }
    let mut writable_bytes: u64 = 0;
    // Every disk's backing layers, with the field that named them: read-only users.
    let mut lower: Vec<((u64, u64), String)> = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let refuse = |message: String| {
            refused(format!(
                "tenant {}: vm {}: disks[{i}]: {message}",
                policy.name, spec.name
            ))
        };
        // Two names of one file are one image: only read-only users may share it.
        let id = std::fs::metadata(&d.path).ok().map(|m| (m.dev(), m.ino()));
        let image = match paths::open_disk(&policy, &d.path, !d.readonly) {
            Ok(image) => image,
            Err(e) => {
                if let Some((_, by)) = lower.iter().find(|(s, _)| Some(*s) == id && !d.readonly) {
                    return Err(refuse(format!(
                        "the same image as a backing file of {by}; a writable image has one user"
                    )));
                }
                if let Some(j) = seen.iter().position(|(s, _)| Some(*s) == id) {
                    return Err(refuse(format!(
                        "the same image as {}; a writable image has one user",
                        image_name(j, kernel.is_some(), initrd.is_some())
                    )));
                }
                return Err(refuse(e.to_string()));
            }
        };
        if let Some(j) = seen
            .iter()
            .position(|(s, w)| *s == image.id && (*w || !d.readonly))
        {
            return Err(refuse(format!(
                "the same image as {}; a writable image has one user",
                image_name(j, kernel.is_some(), initrd.is_some())
            )));
        }
        if let Some((_, by)) = lower.iter().find(|(s, _)| *s == image.id && !d.readonly) {
            return Err(refuse(format!(
                "the same image as a backing file of {by}; a writable image has one user"
            )));
        }
        seen.push((image.id, !d.readonly));
        // The header checked against the claimed format, the backing chain resolved
        // beneath the image directories, every layer opened read-only.
        let at = paths::Beneath::of(&policy, &d.path);
        let disk = crate::chain::resolve(
            &policy,
            d.format.block(),
            &image,
            at.as_ref(),
            !d.readonly,
            d.key_secret.is_some(),
            &d.path,
        )
        .map_err(|e| refuse(e.to_string()))?;
        // The spec check made sure a key names a file and the policy a directory.
        let key = match (&d.key_secret, &policy.secrets_dir) {
            (Some(name), Some(dir)) => Some(
                paths::open_secret(dir, name).map_err(|e| refuse(format!("key_secret: {e}")))?,
            ),
            _ => None,
        };
        for l in &disk.backing {
            if let Some(j) = seen.iter().position(|(s, w)| *s == l.id && *w) {
                return Err(refuse(format!(
                    "a backing file is the same image as {}, which is writable; a writable image has one user",
                    image_name(j, kernel.is_some(), initrd.is_some())
                )));
            }
            lower.push((l.id, format!("disks[{i}]")));
        }
        // A qcow2 disk's size is its virtual size, whatever its file's length.
        let size = disk.virtual_size;
        if let Some(max) = policy.max_disk_bytes.filter(|m| size > *m) {
            return Err(refuse(format!(
                "size = {size} bytes exceeds the tenant limit max_disk_bytes = {max}"
            )));
        }
        if !d.readonly {
            writable_bytes = writable_bytes.saturating_add(size);
            if let Some(max) = policy.max_total_disk_bytes.filter(|m| writable_bytes > *m) {
                return Err(refuse(format!(
                    "writable disks of {writable_bytes} bytes in all exceed the tenant limit max_total_disk_bytes = {max}"
                )));
            }
        }
        devices.push(Device::Blk {
            image: image.file,
            readonly: d.readonly,
            direct: d.direct,
            queues: d.queues,
            format: disk.format,
            backing: disk.backing,
            fsize: disk.fsize,
            key,
        });
    }
    if spec.rng {
        devices.push(Device::Rng);
    }
    for n in &spec.nets {
        devices.push(Device::Net {
            tap: n.tap.clone(),
            mac: n.mac.clone(),
            queues: n.queues,
            fd: None,
            more: Vec::new(),
        });
    }
    if let Some(cid) = spec.vsock_cid {
        devices.push(Device::Vsock { cid });
    }
    if spec.has_virtio_console() {
        devices.push(Device::Console {
            ports: spec.console_ports.clone(),
        });
    }
    for (i, share) in spec.shares.iter().enumerate() {
        let dir =
            paths::open_share(&policy.share_dirs(!share.readonly), &share.path).map_err(|e| {
                refused(format!(
                    "tenant {}: vm {}: shares[{i}]: {e}",
                    policy.name, spec.name
                ))
            })?;
        devices.push(Device::Fs {
            dir,
            tag: share.tag.clone(),
            readonly: share.readonly,
        });
    }
    let virtiofsd_bin = if spec.shares.is_empty() {
        None
    } else {
        Some(open_static_binary(&opts.virtiofsd).map_err(setup)?)
    };
    let api_gid = policy
        .api_group
        .as_deref()
        .map(|g| crate::rundir::resolve_group(&policy.name, g))
        .transpose()
        .map_err(refused)?;
    let device_bin = if devices.is_empty() {
        None
    } else {
        Some(open_static_binary(&opts.device).map_err(setup)?)
    };
    // Guest RAM's file: the checks of a writable image (regular, root's, one link,
    // openat2 beneath memory_dirs, locked), against the memory directories.
    let memory_file = match &spec.memory_file {
        None => None,
        Some(path) => {
            let beneath = TenantPolicy {
                image_dirs: policy.memory_dirs.clone(),
                block_devices: Vec::new(),
                ..policy.clone()
            };
            let image = paths::open_disk(&beneath, path, true).map_err(|e| {
                refused(format!(
                    "tenant {}: vm {}: memory_file: {e}",
                    policy.name, spec.name
                ))
            })?;
            let ram = spec.memory_mib << 20;
            if image.size != 0 && image.size != ram {
                return Err(refused(format!(
                    "tenant {}: vm {}: memory_file: {} bytes, neither empty nor the VM's {ram} bytes of RAM",
                    policy.name, spec.name, image.size
                )));
            }
            Some(image.file)
        }
    };
    let restore = match &opts.restore {
        Some(dir) => Some((
            snapshot_file(dir, "state").map_err(refused)?,
            snapshot_file(dir, "memory").map_err(refused)?,
        )),
        None => None,
    };
    Ok(Plan {
        policy,
        spec,
        id,
        kernel,
        initrd,
        vmm,
        device_bin,
        virtiofsd_bin,
        devices,
        api_gid,
        memory_file,
        restore,
    })
}

/// One of a snapshot's files, for reading: a regular file (no symlink followed at the
/// last step). Its content is the VMM's to check, in its cell; nothing is parsed here.
fn snapshot_file(dir: &Path, name: &str) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
        .map_err(|e| format!("snapshot {}: {e}", p.display()))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("snapshot {}: {e}", p.display()))?;
    if !meta.is_file() {
        return Err(format!("snapshot {}: not a regular file", p.display()));
    }
    Ok(f)
}

/// The field the `n`-th image of `plan()` (kernel, initrd, then the disks) came from.
fn image_name(n: usize, kernel: bool, initrd: bool) -> String {
    let files: Vec<&str> = [("kernel", kernel), ("initrd", initrd)]
        .iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| *name)
        .collect();
    match files.get(n) {
        Some(name) => name.to_string(),
        None => format!("disks[{}]", n - files.len()),
    }
}

/// Attaches every tap of the plan (in the tenant's network namespace): a tap that is
/// missing, not a tap, or in use by another VM refuses the launch.
pub fn attach_taps(plan: &mut Plan) -> Result<(), Failure> {
    let netns = plan.policy.tap_netns.clone();
    for (i, d) in plan
        .devices
        .iter_mut()
        .filter(|d| matches!(d, Device::Net { .. }))
        .enumerate()
    {
        if let Device::Net {
            tap,
            queues,
            fd,
            more,
            ..
        } = d
        {
            let mut fds = crate::tap::open_queues(tap, *queues, netns.as_deref())
                .map_err(|e| {
                    refused(format!(
                        "tenant {}: vm {}: nets[{i}]: {e}",
                        plan.policy.name, plan.spec.name
                    ))
                })?
                .into_iter();
            *fd = fds.next();
            *more = fds.collect();
        }
    }
    Ok(())
}

/// The VMM must be statically linked: the cell holds no loader and no libraries. The
/// descriptor returned is the one checked, and the one the cell execs.
fn open_static_binary(path: &Path) -> Result<File, cell::BinaryError> {
    cell::open_static_binary(path)
}

/// What the VMM is told about its VM besides the guest: the API socket it serves, who
/// it is (shown by `vm.info`), and its backends' host pids.
struct VmmContext<'a> {
    api_fd: RawFd,
    identity: String,
    device_fds: &'a [RawFd],
    device_pids: &'a [u32],
    /// Each backend's page of counters, which the VMM maps read-only.
    counter_fds: &'a [RawFd],
    /// The VMM's end of the supervisor channel (new backends for dead ones).
    supervisor_fd: RawFd,
    /// The snapshot to restore (its state and memory files): the first VMM's only.
    restore: Option<(RawFd, RawFd)>,
    paused: bool,
}

/// `--identity id=..,tenant=..,label=..,cgroup=..`: every value is the jailer's own (an
/// id of [A-Za-z0-9_-], a tenant name of [a-z0-9_-], an MCS label, a cgroup path under
/// /sys/fs/cgroup), none holds `=`; the label's categories hold a comma, so it comes
/// last but one and the VMM splits at `,KEY=` boundaries only.
fn identity(plan: &Plan, entry: &Entry, cgroup: &Cgroup) -> String {
    format!(
        "id={},tenant={},label={},cgroup={}",
        plan.id,
        plan.policy.name,
        entry.mcs.process_label(),
        cgroup
            .dirs()
            .first()
            .map_or(String::new(), |d| d.display().to_string())
    )
}

fn vmm_argv(plan: &Plan, opts: &Options, ctx: &VmmContext) -> Vec<String> {
    let seccomp = if opts.without.iter().any(|w| w == "seccomp") {
        "off".to_string()
    } else {
        opts.seccomp.clone()
    };
    if let Some(name) = &opts.probe {
        let mut a: Vec<String> = vec![
            "cellvm-probe".into(),
            name.clone(),
            "--role".into(),
            "vmm".into(),
            "--seccomp".into(),
            seccomp,
        ];
        if let Some(p) = &opts.probe_path {
            a.extend(["--path".into(), p.display().to_string()]);
        }
        return a;
    }
    let mut argv: Vec<String> = ["cellvm", "run", "--seccomp", &seccomp, "--cpus"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.push(plan.spec.vcpus.to_string());
    argv.push("--memory".into());
    argv.push(plan.spec.memory_mib.to_string());
    if !plan.spec.cmdline.is_empty() {
        argv.push("--cmdline".into());
        argv.push(plan.spec.cmdline.clone());
    }
    if plan.kernel.is_some() {
        argv.extend(["--kernel".into(), "/kernel".into()]);
    }
    if plan.initrd.is_some() {
        argv.extend(["--initrd".into(), "/initrd".into()]);
    }
    if plan.spec.hugepages {
        argv.extend(["--hugepages".into(), "2M".into()]);
    }
    if let Some(f) = &plan.memory_file {
        argv.extend(["--memory-file-fd".into(), f.as_raw_fd().to_string()]);
    }
    if plan.spec.mlock {
        argv.push("--mlock".into());
    } else if plan.spec.prefault {
        argv.push("--prefault".into());
    }
    if plan.spec.ksm {
        argv.push("--ksm".into());
    }
    // A kernel without MFD_NOEXEC_SEAL: a logged downgrade only where the policy says so.
    if plan.policy.executable_ram_allowed {
        argv.push("--allow-executable-ram".into());
    }
    // The API on the socket the jailer made; a reset ends the VMM with status 3, and
    // the supervisor rebuilds the VM.
    argv.extend([
        "--api-fd".into(),
        ctx.api_fd.to_string(),
        "--identity".into(),
        ctx.identity.clone(),
        "--reset-exit-code".into(),
        EXIT_RESET.to_string(),
        "--supervisor-fd".into(),
        ctx.supervisor_fd.to_string(),
    ]);
    if let Some((state, memory)) = ctx.restore {
        argv.push(format!("--restore-fds={state},{memory}"));
    }
    if ctx.paused {
        argv.push("--paused".into());
    }
    // Each device: the VMM's end of a connection its backend cell already holds.
    let devices = plan.devices.iter().zip(ctx.device_fds);
    for ((d, fd), (pid, page)) in devices.zip(ctx.device_pids.iter().zip(ctx.counter_fds)) {
        // The backend's host pid, shown by vm.info, and the page of its counters.
        let started = format!(",pid={pid},counters={page}");
        match d {
            Device::Blk { queues, .. } => {
                argv.extend(["--disk".into(), format!("fd={fd},queues={queues}{started}")])
            }
            Device::Rng => argv.push(format!("--rng=fd={fd}{started}")),
            Device::Net { queues, .. } => {
                argv.extend(["--net".into(), format!("fd={fd},queues={queues}{started}")])
            }
            Device::Vsock { .. } => argv.extend(["--vsock".into(), format!("fd={fd}{started}")]),
            Device::Console { .. } => {
                argv.extend(["--virtio-console".into(), format!("fd={fd}{started}")])
            }
            // virtiofsd keeps no page of cellvm's counters.
            Device::Fs { tag, .. } => {
                argv.extend(["--fs".into(), format!("fd={fd},tag={tag},pid={pid}")])
            }
        }
    }
    argv
}

/// More guest resets than this within RESET_WINDOW end the VM (a boot loop).
const MAX_RESETS: usize = 20;
const RESET_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// The VMM's status for a guest reset (`--reset-exit-code`): the VM is rebuilt.
pub const EXIT_RESET: i32 = 3;

pub fn jail_dir(id: &str) -> PathBuf {
    Path::new(namespaces::JAIL_BASE).join(id)
}

/// Launches the VM and supervises it; returns the supervisor's exit status (the VMM's,
/// or EXIT_TIMED_OUT / EXIT_DESTROYED). Detached, `notify` (the waiting parent's pipe)
/// is written `R` and closed once the guest runs, and is left for the caller to report
/// a failure on otherwise.
pub fn launch(opts: &Options, notify: &mut Option<File>) -> Result<i32, Failure> {
    // Stdio open before anything is opened: a cell's stdio goes onto 0, 1 and 2.
    identity::ensure_stdio_open().map_err(setup)?;
    // Reclaim what dead supervisors left before anything could trip on it: a tap their
    // backend still held, an image still locked, a uid still taken.
    crate::gc::collect(&Registry::lock(&opts.run_dir).map_err(setup)?);
    let mut plan = plan(opts)?;

    // Take this VM's one entry: the VMM's uid, a uid for each device backend, and the
    // VM's one MCS pair.
    let entry = {
        let reg = Registry::lock(&opts.run_dir).map_err(setup)?;
        reg.allocate(
            &plan.id,
            &plan.policy,
            std::process::id(),
            plan.devices.len(),
        )
        .map_err(refused)?
    };
    if let Err(f) = attach_taps(&mut plan) {
        cleanup(opts, &entry);
        return Err(f);
    }
    // The VM's run directory: its API and console sockets, its logs.
    let result = RunDir::create(&opts.run_dir, &plan.id, plan.api_gid)
        .map_err(setup)
        .and_then(|run| build_and_supervise(&plan, &entry, opts, &run, notify));
    cleanup(opts, &entry);
    result
}

/// Test-only: the device whose cell runs the probe instead of its backend, if any.
fn probe_target<'a>(plan: &Plan, opts: &'a Options) -> Option<(usize, &'a str)> {
    let name = opts.probe.as_deref()?;
    let n = plan
        .devices
        .iter()
        .position(|d| d.kind() == opts.probe_in)?;
    Some((n, name))
}

/// A listening socket whose one connection is already made: (listener, VMM's end).
/// Its path lives for an instant in the jail directory (root's, mode 0700).
fn connected_listener(dir: &Path, n: usize) -> Result<(OwnedFd, OwnedFd), String> {
    use std::os::unix::net::{UnixListener, UnixStream};
    let path = dir.join(format!("dev{n}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let stream = UnixStream::connect(&path);
    let _ = std::fs::remove_file(&path);
    let stream = stream.map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((OwnedFd::from(listener), OwnedFd::from(stream)))
}

/// The size of a backend's page of counters (`cellvm::backend::counters::PAGE`; the VMM
/// refuses a smaller one). The jailer does not link the VMM's crate, so it makes the page
/// itself: seven lines of memfd and seals, no knowledge of what the page holds.
const COUNTERS_PAGE: libc::off_t = 4096;

/// The page of counters backend `n` keeps and its VMM reads: a memfd of one page,
/// sealed against shrinking and growing before either cell holds it, so neither can
/// make the other's next access fault. Its layout is the VMM's business
/// (`cellvm::backend::counters`); the jailer only makes it and hands it to both.
fn counters_page() -> Result<OwnedFd, String> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_NOEXEC_SEAL;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"cellvm-counters".as_ptr(), flags) };
    if fd < 0 {
        return Err(format!(
            "counters memfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh descriptor that this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate and fcntl on our own descriptor, no pointers.
    let ok = unsafe {
        libc::ftruncate(fd.as_raw_fd(), COUNTERS_PAGE) == 0
            && libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            ) == 0
    };
    if !ok {
        return Err(format!(
            "counters memfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// `cellvm-device ...` for backend `n` (or, test-only, the probe that takes its place).
fn backend_argv(
    plan: &Plan,
    n: usize,
    listener: &OwnedFd,
    page: &OwnedFd,
    opts: &Options,
) -> Vec<String> {
    let device = &plan.devices[n];
    let seccomp = if opts.without.iter().any(|w| w == "seccomp") {
        "off"
    } else {
        opts.seccomp.as_str()
    };
    match probe_target(plan, opts) {
        Some((target, name)) if target == n => {
            let mut a: Vec<String> = ["cellvm-probe", name, "--role", device.kind()]
                .iter()
                .map(|s| s.to_string())
                .collect();
            a.extend(["--seccomp".into(), seccomp.into()]);
            // The backend's own Landlock follows --without landlock too.
            if opts.without.iter().any(|w| w == "landlock") {
                a.extend(["--landlock".into(), "off".into()]);
            }
            if let Some(fd) = device.passed_fd() {
                a.extend(["--fd".into(), fd.to_string()]);
            }
            a
        }
        _ if matches!(device, Device::Fs { .. }) => fs_argv(
            device,
            plan.virtiofsd_bin.as_ref().map_or(-1, File::as_raw_fd),
            listener.as_raw_fd(),
            seccomp,
        ),
        _ => {
            let mut a = device.argv(n, seccomp);
            a.extend([
                "--listen-fd".into(),
                listener.as_raw_fd().to_string(),
                "--counters-fd".into(),
                page.as_raw_fd().to_string(),
            ]);
            a
        }
    }
}

/// Descriptors a virtio-fs backend may hold: one per file or directory the guest has
/// open or looked up, and virtiofsd's own.
const FS_NOFILE: u64 = 4096;

/// The cgroup, the jail directory and the signals: what every cell of the VM shares.
struct Shared<'a> {
    plan: &'a Plan,
    opts: &'a Options,
    cgroup: Cgroup,
    jail: PathBuf,
    signals: Signals,
    /// The VMM's exec context (its MCS pair); None where SELinux is not enabled.
    label: Option<String>,
    /// The VM's MCS pair, which its backends share.
    mcs: crate::mcs::McsPair,
    /// The listening API socket (api.sock), handed to every VMM of this VM.
    api: OwnedFd,
    /// A vsock device's host side, handed to every vsock backend of this VM.
    vsock: Option<crate::rundir::VsockHost>,
    /// A virtio-console's named ports' listening sockets (`port-NAME.sock`), in order.
    console_ports: Vec<(String, OwnedFd)>,
    /// No VMM has run yet.
    first_run: std::cell::Cell<bool>,
}

impl Shared<'_> {
    fn landlock(&self, rules: Rules) -> Option<(Rules, policy::Requirement)> {
        let on = !self.opts.without.iter().any(|w| w == "landlock");
        on.then_some((rules, self.plan.policy.landlock))
    }
}

/// Device backend `n`'s cell: an empty root, no network, the VM's cgroup, its own uid,
/// no capabilities, Landlock denying every filesystem access, the backend's own
/// seccomp profile once it runs, and a file-size limit at its image's size.
fn backend_cell<'a>(
    s: &'a Shared,
    n: usize,
    uid: u32,
    listener: &OwnedFd,
    page: &OwnedFd,
    hvc: Option<&OwnedFd>,
    stdio: [RawFd; 3],
) -> Result<CellSpec<'a>, Failure> {
    let plan = s.plan;
    let device = &plan.devices[n];
    let exec = plan
        .device_bin
        .as_ref()
        .ok_or_else(|| setup("no device binary was opened"))?;
    let fsize = match device {
        // A writable qcow2 image grows as the guest writes, up to its header's bound.
        Device::Blk {
            fsize: Some(limit), ..
        } => *limit,
        Device::Blk { image, .. } => image
            .metadata()
            .map_err(|e| setup(format!("disks: {e}")))?
            .len(),
        // A guest writes no larger file into a share than a disk of its may be.
        Device::Fs {
            readonly: false, ..
        } => plan.policy.max_disk_bytes.unwrap_or(libc::RLIM_INFINITY),
        _ => 0,
    };
    let mut keep = vec![listener.as_raw_fd(), page.as_raw_fd()];
    keep.extend(device.passed_fd());
    keep.extend(device.backing_fds());
    let mut root = Root::Empty {
        dir: s.jail.join(format!("dev{n}")),
    };
    let mut rules = Rules::DenyAllButExec;
    let mut nofile = if matches!(device, Device::Vsock { .. }) {
        // A vsock backend holds a socket per connection (at most 512, and 64 host
        // streams still sending their CONNECT line); every other backend a few.
        640
    } else {
        64
    };
    let (mut uid, mut gid) = (uid, uid);
    if let Device::Fs { dir, readonly, .. } = device {
        // virtiofsd: the share as the cell's only content, its binary by descriptor, a
        // descriptor for each file the guest holds open, the tenant's share owner.
        let binary = plan
            .virtiofsd_bin
            .as_ref()
            .ok_or_else(|| setup("no virtiofsd binary was opened"))?;
        keep = vec![listener.as_raw_fd(), binary.as_raw_fd()];
        root = Root::Share {
            dir: s.jail.join(format!("dev{n}")),
            share: namespaces::detached_mount(dir)?,
            writable: !readonly,
        };
        rules = Rules::Share {
            writable: !readonly,
        };
        nofile = FS_NOFILE;
        if let Some([u, g]) = plan.policy.share_owner {
            (uid, gid) = (u, g);
        }
    }
    let mut argv = backend_argv(plan, n, listener, page, s.opts);
    if let (Device::Vsock { .. }, Some(host)) = (device, &s.vsock) {
        // The host's side: vsock.sock to accept on, vsock/ to reach host ports in.
        keep.extend([host.listener.as_raw_fd(), host.dir.as_raw_fd()]);
        if argv[0] == "cellvm-device" {
            argv.extend([
                "--uds-fd".into(),
                host.listener.as_raw_fd().to_string(),
                "--uds-dir-fd".into(),
                host.dir.as_raw_fd().to_string(),
                "--uds-name".into(),
                crate::rundir::VSOCK_PORT_PREFIX.into(),
            ]);
        }
    }
    if let (Device::Console { .. }, Some(hvc)) = (device, hvc) {
        // hvc0's end of the supervisor's socket pair, and the named ports' listeners.
        keep.push(hvc.as_raw_fd());
        keep.extend(s.console_ports.iter().map(|(_, l)| l.as_raw_fd()));
        if argv[0] == "cellvm-device" {
            argv.extend(["--hvc-fd".into(), hvc.as_raw_fd().to_string()]);
            if !s.console_ports.is_empty() {
                let list: Vec<String> = s
                    .console_ports
                    .iter()
                    .map(|(name, l)| format!("{name}:{}", l.as_raw_fd()))
                    .collect();
                argv.extend(["--ports".into(), list.join(",")]);
            }
        }
    }
    Ok(CellSpec {
        name: format!("dev{n} {}", device.kind()),
        tenant: plan.policy.name.clone(),
        uid,
        gid,
        // One MCS pair per VM: the backends run as cellvm_device_t with the VMM's pair.
        exec_label: s.label.as_ref().map(|_| s.mcs.device_label()),
        hostname: format!("cellvm-{}-dev{n}", plan.spec.name),
        root,
        limits: identity::Limits {
            nofile,
            nproc: plan.policy.cgroup.pids_max as u64,
            // A raw image cannot grow: a write past its end fails with EFBIG; a qcow2
            // image grows no further than writing its whole virtual disk needs.
            fsize,
            memlock: 0,
        },
        landlock: s.landlock(rules),
        exec,
        argv,
        keep,
        stdio,
        signals: &s.signals,
    })
}

/// The VMM's cell: a root holding exactly the checked files and /dev/kvm, its own uid,
/// Landlock to those paths, and a file-size limit at its guest RAM's size.
fn vmm_cell<'a>(
    s: &'a Shared,
    trees: &'a Trees,
    entry: &Entry,
    ctx: &VmmContext,
    stdio: [RawFd; 3],
) -> CellSpec<'a> {
    let plan = s.plan;
    let mut keep = ctx.device_fds.to_vec();
    keep.extend(ctx.counter_fds);
    keep.extend(plan.memory_file.as_ref().map(File::as_raw_fd));
    if let Some((state, memory)) = ctx.restore {
        keep.extend([state, memory]);
    }
    if s.opts.probe.is_none() {
        keep.extend([ctx.api_fd, ctx.supervisor_fd]);
    }
    CellSpec {
        name: "vmm".into(),
        tenant: plan.policy.name.clone(),
        uid: entry.uid,
        gid: entry.uid,
        exec_label: s.label.clone(),
        hostname: format!("cellvm-{}", plan.spec.name),
        root: Root::Vmm {
            dir: s.jail.join("root"),
            files: namespaces::JailFiles {
                vmm: &trees.vmm,
                kernel: trees.kernel.as_ref(),
                initrd: trees.initrd.as_ref(),
                uid: entry.uid,
                gid: entry.uid,
            },
        },
        limits: identity::Limits {
            nofile: 256,
            nproc: plan.policy.cgroup.pids_max as u64,
            // Guest RAM is a memfd sized with ftruncate, which RLIMIT_FSIZE bounds; the
            // console and the log are pipes, which it does not.
            fsize: plan.spec.memory_mib << 20,
            // Locking guest RAM needs exactly its size (the policy checked mlock).
            memlock: if plan.spec.mlock {
                plan.spec.memory_mib << 20
            } else {
                0
            },
        },
        landlock: s.landlock(Rules::Paths(landlock::vmm_rules(
            plan.kernel.is_some(),
            plan.initrd.is_some(),
        ))),
        exec: &plan.vmm,
        argv: vmm_argv(plan, s.opts, ctx),
        keep,
        stdio,
        signals: &s.signals,
    }
}

/// Detached mounts of the checked files, attached in the VMM's cell.
struct Trees {
    vmm: OwnedFd,
    kernel: Option<OwnedFd>,
    initrd: Option<OwnedFd>,
}

/// A pipe for a cell's stderr: (the cell's end, the relay reading ours).
fn log_pipe(vm: &str, origin: &str) -> Result<(OwnedFd, Log), Failure> {
    let (r, w) = cell::pipe()?;
    Ok((w, Log::new(format!("cellvm-jailer: vm {vm}: {origin}"), r)))
}

fn build_and_supervise(
    plan: &Plan,
    entry: &Entry,
    opts: &Options,
    run: &RunDir,
    notify: &mut Option<File>,
) -> Result<i32, Failure> {
    // The sockets bound and the logs open while the directory is still root's alone.
    let api = run.listen(crate::rundir::API_SOCKET).map_err(setup)?;
    // The spec as given, root's alone: what `cellvmctl snapshot` puts beside a snapshot
    // (a restore checks it against the tenant policy again).
    run.keep_spec(&opts.vm).map_err(setup)?;
    let console_listener = run.listen(crate::rundir::CONSOLE_SOCKET).map_err(setup)?;
    // A vsock device's host side, made while the directory is still root's alone.
    let vsock = match plan
        .devices
        .iter()
        .position(|d| matches!(d, Device::Vsock { .. }))
    {
        Some(n) => Some(run.vsock_host(entry.device_uids[n]).map_err(setup)?),
        None => None,
    };
    // A virtio-console's named ports, bound as the API socket is.
    let mut console_ports = Vec::new();
    for d in &plan.devices {
        if let Device::Console { ports } = d {
            for name in ports {
                let l = run
                    .listen(&crate::rundir::console_port_socket(name))
                    .map_err(setup)?;
                console_ports.push((name.clone(), l));
            }
        }
    }
    let log_path = run.path.join(crate::rundir::CONSOLE_LOG);
    let log = ConsoleLog::open(
        log_path,
        crate::console::LOG_CAP,
        run.log_mode(crate::rundir::CONSOLE_LOG),
        run.gid,
    )
    .map_err(|e| setup(format!("{}: {e}", run.path.display())))?;
    if opts.detach {
        // From here the supervisor's own lines (and every cell's stderr) go to its log.
        let f = run.open_log(crate::rundir::SUPERVISOR_LOG).map_err(setup)?;
        // SAFETY: dup2 of a descriptor we own onto stderr.
        if unsafe { libc::dup2(f.as_raw_fd(), 2) } < 0 {
            return Err(setup(format!(
                "{}: {}",
                crate::rundir::SUPERVISOR_LOG,
                std::io::Error::last_os_error()
            )));
        }
    }
    run.publish().map_err(setup)?;
    // SELinux first: a policy that requires it must refuse before anything is built.
    let label =
        selinux::plan(&plan.policy.name, plan.policy.selinux, entry.mcs).map_err(refused)?;
    // sVirt labels before any cell starts: writable disks get the VM's pair, read-only
    // disks, kernel and initrd shared labels; recorded, so `gc::remove_cell` restores
    // them however the VM ends.
    let mut labels = selinux::Labels::new(&plan.id, plan.policy.selinux);
    let content = plan.kernel.iter().chain(&plan.initrd);
    let mut files: Vec<(&File, String, bool)> = content
        .map(|f| (f, selinux::CONTENT_LABEL.into(), true))
        .collect();
    // A RAM file is the VM's alone, like its memfd: cellvm_tmpfs_t with its pair.
    if let Some(f) = &plan.memory_file {
        files.push((f, entry.mcs.ram_label(), false));
    }
    for d in &plan.devices {
        match d {
            Device::Blk {
                image,
                readonly: true,
                ..
            } => files.push((image, selinux::SHARED_IMAGE_LABEL.into(), true)),
            Device::Blk { image, .. } => files.push((image, entry.mcs.image_label(), false)),
            _ => {}
        }
        // Backing layers are read by the backend only: the shared read-only label, no
        // categories, refcounted with every other VM that reads them.
        if let Device::Blk { backing, .. } = d {
            for l in backing {
                files.push((&l.file, selinux::SHARED_IMAGE_LABEL.into(), true));
            }
        }
    }
    for (f, l, shared) in files {
        let fail = |e: selinux::Error| if e.is_refusal() { refused(e) } else { setup(e) };
        labels.label(f, &l, shared).map_err(fail)?;
    }
    // The cgroup exists before the cell's first process, which joins it before it runs.
    // Hugepage-backed RAM is 2 MiB pages; the cgroup bounds them at the VM's RAM.
    let huge = plan.spec.hugepages.then_some(crate::cgroup::HugeLimit {
        page_kib: 2048,
        bytes: plan.spec.memory_mib << 20,
    });
    let cgroup = Cgroup::create(
        &plan.id,
        &plan.policy.cgroup,
        plan.spec.memory_mib << 20,
        huge,
    )?;
    // The jail directory, root's alone: the backends' sockets pass through it.
    let jail = jail_dir(&plan.id);
    namespaces::make_jail_dir(&jail)?;
    let root = jail.join("root");
    std::fs::create_dir_all(&root).map_err(|e| setup(format!("{}: {e}", root.display())))?;
    let shared = Shared {
        plan,
        opts,
        cgroup,
        jail,
        signals: crate::supervise::block_signals(),
        label,
        mcs: entry.mcs,
        api,
        vsock,
        console_ports,
        first_run: std::cell::Cell::new(true),
    };
    let mut relay = Relay::new(
        None,
        None,
        Vec::new(),
        Console::new(Some(console_listener), Some(log)),
        !opts.detach,
    );
    let mut ctl = Control::new(std::time::Duration::from_secs(plan.policy.stop_timeout_s));
    if opts.detach {
        ctl.ready = Some(ReadyCheck::new(
            run.api_socket(),
            crate::supervise::READY_TIMEOUT,
        ));
        ctl.notify = notify.take();
        ctl.notify_text = format!("R{}", plan.id);
    }
    // A guest reset ends the VMM with EXIT_RESET: the whole VM is built again, fresh
    // cells under the same entry (uids, MCS pair), cgroup, run directory and sockets.
    // A guest that resets over and over (a boot loop) ends the VM instead.
    let mut resets: std::collections::VecDeque<std::time::Instant> = Default::default();
    let ending = loop {
        let ending = run_once(&shared, entry, &mut relay, &mut ctl);
        match ending {
            Ok(Ending::Exited(EXIT_RESET)) if !ctl.stopping() && opts.probe.is_none() => {
                let now = std::time::Instant::now();
                resets.push_back(now);
                while resets
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > RESET_WINDOW)
                {
                    resets.pop_front();
                }
                if resets.len() > MAX_RESETS {
                    break Err(setup(format!(
                        "vm {}: the guest reset {} times within {} s; the VM is ended, not built again",
                        plan.id,
                        resets.len(),
                        RESET_WINDOW.as_secs()
                    )));
                }
                eprintln!(
                    "cellvm-jailer: vm {}: the guest reset; the VM is built again in fresh cells",
                    plan.id
                );
            }
            other => break other,
        }
    };
    *notify = ctl.notify.take();
    match ending? {
        // A detached launch whose VMM ended before it ran: its last line says why
        // (a restore refused, say), and the caller waiting to hear is told it.
        Ending::Exited(code) if code != 0 && notify.is_some() => {
            let last = relay
                .logs
                .iter()
                .find(|l| l.prefix.ends_with(": vmm"))
                .map(|l| l.last_line().to_string())
                .filter(|l| !l.is_empty());
            Err(Failure {
                code,
                message: match last {
                    Some(line) => {
                        format!("the VM ended before it was running (status {code}): {line}")
                    }
                    None => format!("the VM ended before it was running (status {code})"),
                },
            })
        }
        Ending::Exited(code) => Ok(code),
        Ending::TimedOut => {
            eprintln!(
                "cellvm-jailer: vm {}: the guest did not power off within stop_timeout_s = {}; killed",
                plan.id, plan.policy.stop_timeout_s
            );
            Ok(crate::supervise::EXIT_TIMED_OUT)
        }
        Ending::Destroyed => Ok(crate::supervise::EXIT_DESTROYED),
        Ending::NotReady(why) => Err(setup(format!("vm {}: {why}; killed", plan.id))),
    }
}

/// One life of the VM: every backend cell and the VMM's started, supervised until the
/// VMM ends, every cell gone when it returns.
fn run_once(
    shared: &Shared,
    entry: &Entry,
    relay: &mut Relay,
    ctl: &mut Control,
) -> Result<Ending, Failure> {
    let (plan, opts) = (shared.plan, shared.opts);
    // Detached mounts of the checked files, made here: the cell's namespace attaches them
    // (each life of the VM has its own).
    let trees = Trees {
        vmm: namespaces::detached_mount(&plan.vmm)?,
        kernel: plan
            .kernel
            .as_ref()
            .map(namespaces::detached_mount)
            .transpose()?,
        initrd: plan
            .initrd
            .as_ref()
            .map(namespaces::detached_mount)
            .transpose()?,
    };
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| setup(format!("/dev/null: {e}")))?;
    let name = &plan.spec.name;
    let probe_in_backend = opts.probe.is_some() && opts.probe_in != "vmm";
    let probe_dev = probe_target(plan, opts).map(|(n, _)| n);
    // Each backend in a cell of its own, all started before any is waited for; the
    // VMM gets the other end of each one's connection.
    let mut cells = Cells(Vec::new());
    let mut logs = Vec::new();
    let mut vmm_ends = Vec::new();
    let mut pages = Vec::new();
    let mut console_out = None;
    // hvc0's host end for this life of the VM: the supervisor keeps one end of a
    // socket pair (relayed like the serial console), the console backend gets the other.
    let (hvc_backend, hvc_ours) = match plan
        .devices
        .iter()
        .any(|d| matches!(d, Device::Console { .. }))
    {
        true => {
            let (a, b) = hvc_pair()?;
            (Some(a), Some(b))
        }
        false => (None, None),
    };
    for (n, &uid) in entry.device_uids.iter().enumerate() {
        let (listener, vmm_end) = connected_listener(&shared.jail, n).map_err(setup)?;
        let page = counters_page().map_err(setup)?;
        let (err_w, log) = log_pipe(name, &format!("dev{n} {}", plan.devices[n].kind()))?;
        // Test-only: a probe in a backend's cell reports on its stdout.
        let out = if probe_in_backend && probe_dev == Some(n) {
            let (r, w) = cell::pipe()?;
            console_out = Some(r);
            Some(w)
        } else {
            None
        };
        let stdio = [
            null.as_raw_fd(),
            out.as_ref().map_or(null.as_raw_fd(), |w| w.as_raw_fd()),
            err_w.as_raw_fd(),
        ];
        let spec = backend_cell(
            shared,
            n,
            uid,
            &listener,
            &page,
            hvc_backend.as_ref(),
            stdio,
        )?;
        cells.0.push(cell::start(&shared.cgroup, &spec)?);
        logs.push(log);
        vmm_ends.push(vmm_end);
        pages.push(page);
    }
    if probe_in_backend {
        // Test-only: the probe runs in a backend's cell; no VMM.
        let Some(target) = probe_dev else {
            return Err(Error::NoProbeTarget(opts.probe_in.clone()).into());
        };
        drop((vmm_ends, pages));
        cells.exec()?;
        let pid = cells.0.remove(target).pid;
        relay.attach(None, console_out, logs);
        let ending = crate::supervise::wait(pid, &shared.signals, relay, ctl, &mut |_, _| None);
        drop(cells);
        relay.drain();
        return Ok(ending);
    }
    // The VMM's console and log go through the supervisor, never the operator's tty.
    let (in_r, in_w) = cell::pipe()?;
    let (out_r, out_w) = cell::pipe()?;
    let (err_w, log) = log_pipe(name, "vmm")?;
    logs.push(log);
    let device_fds: Vec<RawFd> = vmm_ends.iter().map(|f| f.as_raw_fd()).collect();
    let device_pids: Vec<u32> = cells.0.iter().map(|c| c.pid).collect();
    let counter_fds: Vec<RawFd> = pages.iter().map(|f| f.as_raw_fd()).collect();
    let (channel, vmm_channel) =
        crate::restart::Channel::pair().map_err(|e| setup(format!("supervisor channel: {e}")))?;
    // Restoring and starting paused are the first VMM's; one rebuilt after a guest
    // reset boots afresh and runs.
    let first = shared.first_run.replace(false);
    let ctx = VmmContext {
        api_fd: shared.api.as_raw_fd(),
        identity: identity(plan, entry, &shared.cgroup),
        device_fds: &device_fds,
        device_pids: &device_pids,
        counter_fds: &counter_fds,
        supervisor_fd: vmm_channel.as_raw_fd(),
        restore: plan
            .restore
            .as_ref()
            .filter(|_| first)
            .map(|(s, m)| (s.as_raw_fd(), m.as_raw_fd())),
        paused: shared.opts.paused && first,
    };
    let stdio = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let spec = vmm_cell(shared, &trees, entry, &ctx, stdio);
    let mut vmm = cell::start(&shared.cgroup, &spec)?;
    // The pages stay: a backend started again gets its device's.
    drop((in_r, out_w, err_w, vmm_ends, vmm_channel, hvc_backend));
    relay.attach(Some(in_w), Some(out_r), logs);
    relay.attach_hvc(hvc_ours);
    // Every cell exec'd, or the launch ends here (the backends are killed with it).
    let built = cells.exec().and_then(|_| vmm.exec());
    if let Err(e) = built {
        // SAFETY: kill our own child.
        unsafe { libc::kill(vmm.pid as i32, libc::SIGKILL) };
        crate::supervise::reap(vmm.pid);
        cells.kill();
        relay.drain();
        return Err(e.into());
    }
    let mut restarts = Restarts {
        history: crate::restart::History::new(cells.0.len()),
        spares: crate::restart::Spares::new(
            plan.devices
                .iter()
                .map(|d| crate::restart::restartable(d.kind()))
                .collect(),
            std::time::Instant::now(),
        ),
    };
    let ending = crate::supervise::wait(vmm.pid, &shared.signals, relay, ctl, &mut |relay, ctl| {
        if ctl.stopping() {
            return None;
        }
        tend_backends(
            shared,
            entry,
            &mut cells,
            &pages,
            &channel,
            &mut restarts,
            relay,
        )
    });
    // Unused spares are killed with it.
    drop(restarts);
    if ending != Ending::Exited(0) && !matches!(ending, Ending::Exited(EXIT_RESET)) {
        // Killed, timed out or failed: the backends go at once.
        cells.kill();
    }
    drop(cells);
    relay.drain();
    Ok(ending)
}

/// What restarting a VM's backends keeps: their recent deaths and their spares.
struct Restarts {
    history: crate::restart::History,
    spares: crate::restart::Spares<NextCell<cell::Spare>>,
}

/// A backend's next life: its cell (a spare, or started), the VMM's end of the new
/// connection and the cell's log.
struct NextCell<C> {
    cell: C,
    vmm_end: OwnedFd,
    log: Log,
}

/// Reaps the backends that ended; each one that died is started again (in its spare,
/// else in a fresh cell; see restart.rs) and its VMM told, or given up. Then builds the
/// spares that are due; returns when to be called again for the next ones.
fn tend_backends(
    shared: &Shared,
    entry: &Entry,
    cells: &mut Cells,
    pages: &[OwnedFd],
    channel: &crate::restart::Channel,
    restarts: &mut Restarts,
    relay: &mut Relay,
) -> Option<std::time::Instant> {
    let plan = shared.plan;
    let vm = &plan.id;
    for (n, page) in pages.iter().enumerate().take(cells.0.len()) {
        let pid = cells.0[n].pid;
        let mut status = 0;
        // SAFETY: waitpid on our own child, without blocking.
        if unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) } != pid as i32 {
            continue;
        }
        if !crate::restart::died(status) {
            continue;
        }
        let kind = plan.devices[n].kind();
        let how = if libc::WIFSIGNALED(status) {
            format!("was killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exited with status {}", libc::WEXITSTATUS(status))
        };
        let now = std::time::Instant::now();
        let outcome = if !crate::restart::restartable(kind) {
            Err("a backend of its kind is not started again".to_string())
        } else if !restarts.history.allow(n, now) {
            Err(format!(
                "it died more than {} times within {} s",
                crate::restart::MAX_RESTARTS,
                crate::restart::WINDOW.as_secs()
            ))
        } else {
            let spare = restarts.spares.take(n, now);
            let from = if spare.is_some() {
                "its spare cell"
            } else {
                "a fresh cell"
            };
            start_backend_again(shared, entry, n, page, spare, relay, channel)
                .map(|started| (started, from))
                .map_err(|e| format!("starting it again failed: {e}"))
        };
        match outcome {
            Ok((started, from)) => {
                eprintln!(
                    "cellvm-jailer: vm {vm}: dev{n} {kind} {how}; started again in {from} (pid {})",
                    started.pid
                );
                cells.0[n] = started;
            }
            Err(why) => {
                eprintln!(
                    "cellvm-jailer: vm {vm}: dev{n} {kind} {how}; {why}: the device needs a reset"
                );
                restarts.spares.stop(n);
                if let Err(e) = channel.given_up(n) {
                    eprintln!("cellvm-jailer: vm {vm}: supervisor channel: {e}");
                }
            }
        }
    }
    // A spare that ended while it waited (it could not be built, or was killed) is
    // not replaced: its backend's next restart is cold.
    let ended: Vec<usize> = restarts
        .spares
        .ready()
        .filter_map(|(n, slot)| slot.as_mut().is_some_and(|s| s.cell.ended()).then_some(n))
        .collect();
    for n in ended {
        eprintln!(
            "cellvm-jailer: vm {vm}: dev{n}: its spare cell ended; its restarts build fresh cells"
        );
        restarts.spares.stop(n);
    }
    let due = match restarts.spares.due(std::time::Instant::now()) {
        Ok(due) => due,
        Err(later) => return later,
    };
    for n in due {
        match next_backend(shared, entry, n, &pages[n], cell::spare) {
            Ok(spare) => restarts.spares.put(n, spare),
            Err(e) => {
                eprintln!(
                    "cellvm-jailer: vm {vm}: dev{n}: no spare cell ({e}); its restarts build fresh cells"
                );
                restarts.spares.stop(n);
            }
        }
    }
    None
}

/// Backend `n`'s next cell, with a fresh connection (the VMM's end kept for it) and
/// log, made by `build`: `cell::start` or `cell::spare`.
fn next_backend<C>(
    shared: &Shared,
    entry: &Entry,
    n: usize,
    page: &OwnedFd,
    build: fn(&Cgroup, &CellSpec) -> Result<C, cell::CellError>,
) -> Result<NextCell<C>, String> {
    let plan = shared.plan;
    let (listener, vmm_end) = connected_listener(&shared.jail, n)?;
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("/dev/null: {e}"))?;
    let (err_w, log) = log_pipe(
        &plan.spec.name,
        &format!("dev{n} {}", plan.devices[n].kind()),
    )
    .map_err(|f| f.message)?;
    let stdio = [null.as_raw_fd(), null.as_raw_fd(), err_w.as_raw_fd()];
    let spec = backend_cell(
        shared,
        n,
        entry.device_uids[n],
        &listener,
        page,
        None,
        stdio,
    )
    .map_err(|f| f.message)?;
    let cell = build(&shared.cgroup, &spec).map_err(|e| e.to_string())?;
    Ok(NextCell { cell, vmm_end, log })
}

/// Backend `n` in its spare, let go, or else in a fresh cell, with its device's
/// descriptors and page; its VMM is sent the new connection as soon as the cell exists
/// (the backend answers once it runs).
fn start_backend_again(
    shared: &Shared,
    entry: &Entry,
    n: usize,
    page: &OwnedFd,
    spare: Option<NextCell<cell::Spare>>,
    relay: &mut Relay,
    channel: &crate::restart::Channel,
) -> Result<cell::Started, String> {
    let next = match spare {
        Some(s) => NextCell {
            cell: s.cell.go(),
            vmm_end: s.vmm_end,
            log: s.log,
        },
        None => next_backend(shared, entry, n, page, cell::start)?,
    };
    let NextCell {
        cell: mut started,
        vmm_end,
        log,
    } = next;
    relay.logs.retain(Log::is_open);
    relay.logs.push(log);
    let sent = channel.replaced(n, started.pid, &vmm_end);
    let exec = started.exec();
    if let Err(e) = sent
        .map_err(|e| format!("supervisor channel: {e}"))
        .and(exec.map_err(|e| e.to_string()))
    {
        // SAFETY: kill and reap our own child.
        unsafe { libc::kill(started.pid as i32, libc::SIGKILL) };
        crate::supervise::reap(started.pid);
        return Err(e);
    }
    Ok(started)
}

/// A connected pair of stream sockets, close-on-exec (the cell keeps its end by number).
fn hvc_pair() -> Result<(OwnedFd, OwnedFd), Failure> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(setup(format!(
            "virtio-console: socketpair: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: two fresh descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Backend cells of a VM: once the VMM is gone they see the connection close and
/// exit; whatever is still running a moment later is killed. Always reaped.
struct Cells(Vec<cell::Started>);

impl Cells {
    /// Waits until every cell exec'd; the first that could not says why.
    fn exec(&mut self) -> Result<(), cell::CellError> {
        let mut first = Ok(());
        for c in &mut self.0 {
            if let Err(e) = c.exec() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        if first.is_err() {
            self.kill();
        }
        first
    }

    fn kill(&mut self) {
        for c in self.0.drain(..) {
            // SAFETY: kill and reap our own child.
            unsafe { libc::kill(c.pid as i32, libc::SIGKILL) };
            crate::supervise::reap(c.pid);
        }
    }
}

impl Drop for Cells {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        for c in &self.0 {
            loop {
                let mut status = 0;
                // SAFETY: waitpid on our own child, without blocking.
                let rc = unsafe { libc::waitpid(c.pid as i32, &mut status, libc::WNOHANG) };
                if rc != 0 {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    // SAFETY: kill and reap our own child.
                    unsafe { libc::kill(c.pid as i32, libc::SIGKILL) };
                    crate::supervise::reap(c.pid);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

/// Removes everything the cell had on the host: processes, cgroup, jail directory,
/// registry entry (and with it the uid and MCS pair).
pub fn cleanup(opts: &Options, entry: &Entry) {
    // An entry whose cell could not be fully removed stays, so that gc retries.
    if let Err(e) = crate::gc::remove_cell(&opts.run_dir, &entry.id) {
        eprintln!("cellvm-jailer: {e} (the registry entry is kept; `cellvm-jailer gc` retries)");
        return;
    }
    if let Ok(reg) = Registry::lock(&opts.run_dir) {
        if let Err(e) = reg.remove(&entry.id) {
            eprintln!("cellvm-jailer: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neither cell can resize the page it shares with the other (a shrink would turn
    /// the other's next access into a SIGBUS), nor lift the seals.
    #[test]
    fn the_counters_page_is_one_page_sealed_against_resizing() {
        let page = counters_page().unwrap();
        let fd = page.as_raw_fd();
        // SAFETY: fcntl(F_GET_SEALS) on our own descriptor, no pointers.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want, "seals {seals:#x}");
        assert_eq!(
            std::fs::File::from(page.try_clone().unwrap())
                .metadata()
                .unwrap()
                .len(),
            COUNTERS_PAGE as u64
        );
        for size in [0, 2048, 8192] {
            // SAFETY: ftruncate on our own descriptor, no pointers.
            let r = unsafe { libc::ftruncate(fd, size) };
            assert_eq!(r, -1, "resized to {size}");
        }
        // SAFETY: as above.
        let r = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(r, -1, "a seal was added after F_SEAL_SEAL");
    }
}
