//! The two policy files and the check of one against the other. The tenant policy is
//! the administrator's; the VM spec is the tenant's and untrusted: anything it asks for
//! outside the policy is refused with `tenant T: vm V: FIELD = ASKED exceeds|violates
//! ALLOWED`.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Requirement {
    #[default]
    Required,
    IfAvailable,
}

/// The administrator's policy for one tenant.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicy {
    pub name: String,
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    /// Directories the tenant's kernels, initrds and images may come from.
    #[serde(default)]
    pub image_dirs: Vec<PathBuf>,
    /// Tap devices the tenant's VMs may use: exact names, or a prefix ending in `*`.
    /// The administrator creates them; the jailer only attaches.
    #[serde(default)]
    pub taps: Vec<String>,
    /// The network namespace (a name under /run/netns) the taps live in; none: the
    /// jailer's own.
    #[serde(default)]
    pub tap_netns: Option<String>,
    /// Inclusive range of uids (and gids) the tenant's cells run as.
    pub uid_range: [u32; 2],
    /// Inclusive range of MCS categories the tenant's VMs draw their pair from.
    pub mcs_categories: [u16; 2],
    #[serde(default = "if_available")]
    pub selinux: Requirement,
    #[serde(default)]
    pub landlock: Requirement,
    /// Whether `--seccomp off` may be used for this tenant's VMs (diagnosis only).
    #[serde(default)]
    pub seccomp_off_allowed: bool,
    /// Whether the test-only launch switches (`--probe`, `--without`) may be used for
    /// this tenant: never on a production host.
    #[serde(default)]
    pub allow_test_switches: bool,
    #[serde(default)]
    pub hugepages: bool,
    /// Whether a VM may lock its guest RAM in host memory (mlock: never swapped). Its
    /// pages stay charged to the VM's memory cgroup.
    #[serde(default)]
    pub mlock: bool,
    /// Directories a VM's guest RAM may be a file in (`memory_file` in the VM spec):
    /// tmpfs, hugetlbfs with prefault, a DAX or persistent-memory file system. None:
    /// guest RAM is always a sealed memfd.
    #[serde(default)]
    pub memory_dirs: Vec<PathBuf>,
    #[serde(default)]
    pub ksm: bool,
    /// Whether this tenant's VMs may run where the kernel cannot seal guest RAM against
    /// execution (MFD_NOEXEC_SEAL, Linux 6.3 and later): the VMM then logs the downgrade
    /// instead of refusing to start.
    #[serde(default)]
    pub executable_ram_allowed: bool,
    /// How many virtio-blk disks one VM may have (each is a backend process).
    #[serde(default)]
    pub max_disks: u32,
    /// Whether the tenant's VMs may have a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Whether the tenant's VMs may have a virtio-vsock device (`vsock_cid`): its host
    /// side is `vsock.sock` in the VM's run directory, and guest connections to host
    /// port P go to `vsock/port_P` there.
    #[serde(default)]
    pub vsock: bool,
    /// Whether the tenant's VMs may have a virtio-console (`virtio_console`,
    /// `console_ports`): the guest's hvc0 is the VM's console (console.log and
    /// console.sock take it, and what readers type goes to it), each named port a
    /// socket `port-NAME.sock` in the VM's run directory.
    #[serde(default)]
    pub virtio_console: bool,
    /// Block devices (LVM volumes, SAN LUNs) the tenant's disks may be: absolute paths,
    /// or prefixes ending in `*`. Opened without following any symlink, and only these:
    /// a block device in an image directory is refused.
    #[serde(default)]
    pub block_devices: Vec<String>,
    /// The uid and gid whose file permissions the jailer opens the tenant's images
    /// with (setfsuid/setfsgid): a writable disk the file does not let them write is
    /// refused. None: images must be owned by root and writable by their owner.
    #[serde(default)]
    pub image_owner: Option<[u32; 2]>,
    /// The largest apparent (virtual) size one disk may have, in bytes. None: no limit.
    #[serde(default)]
    pub max_disk_bytes: Option<u64>,
    /// The largest total apparent size of one VM's writable disks, in bytes.
    #[serde(default)]
    pub max_total_disk_bytes: Option<u64>,
    /// The image formats the tenant's disks may have. For qcow2 the virtual size (from
    /// the header) is what max_disk_bytes and max_total_disk_bytes bound.
    #[serde(default = "raw_only")]
    pub disk_formats: Vec<DiskFormat>,
    /// How many backing layers a qcow2 disk may have below its top (0: none).
    #[serde(default = "eight")]
    pub max_chain_depth: u32,
    /// Where the administrator keeps this tenant's disk keys: a LUKS-encrypted qcow2
    /// disk names one by `key_secret` (a file name in this directory). None: the
    /// tenant's disks may not be encrypted.
    #[serde(default)]
    pub secrets_dir: Option<PathBuf>,
    /// A host group whose members may use the VMs' API and console sockets (the run
    /// directory becomes 0750 root:G, the sockets 0660 root:G). None: root alone.
    #[serde(default)]
    pub api_group: Option<String>,
    /// How long a graceful stop (SIGTERM to the supervisor) waits for the guest to power
    /// off before every cell is killed, in seconds.
    #[serde(default = "thirty")]
    pub stop_timeout_s: u64,
    /// Directories a VM may share with its guest through virtio-fs (a VM spec's
    /// `shares`): each share is a directory beneath one of these, served by virtiofsd in
    /// a cell whose only content it is; writable only beneath an entry with
    /// `writable = true`. None: no shares.
    #[serde(default)]
    pub share_dirs: Vec<ShareDir>,
    /// The uid and gid a VM's virtiofsd runs as, so that what guests write stays the
    /// tenant's across VMs (not in uid_range, not root). None: each virtiofsd runs as
    /// its cell's own uid from uid_range, and only files that uid may touch are shared.
    #[serde(default)]
    pub share_owner: Option<[u32; 2]>,
    pub cgroup: CgroupLimits,
}

/// A directory of the tenant's shares.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareDir {
    pub path: PathBuf,
    /// Whether shares beneath it may be writable (default: read-only only).
    #[serde(default)]
    pub writable: bool,
}

impl TenantPolicy {
    /// The share directories a share may lie beneath: every one, or (for a writable
    /// share) the writable ones.
    pub fn share_dirs(&self, writable: bool) -> Vec<PathBuf> {
        self.share_dirs
            .iter()
            .filter(|d| d.writable || !writable)
            .map(|d| d.path.clone())
            .collect()
    }
}

fn thirty() -> u64 {
    30
}

fn raw_only() -> Vec<DiskFormat> {
    vec![DiskFormat::Raw]
}

fn eight() -> u32 {
    8
}

/// The most backing layers a policy may allow below a disk's top: each is a descriptor
/// the disk's backend holds (its cell's nofile limit is 64).
pub const MAX_CHAIN_DEPTH: u32 = 32;

/// A disk image format, as the VM spec and the tenant policy name it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The same format as the block crate names it.
    pub fn block(self) -> block::header::Format {
        match self {
            DiskFormat::Raw => block::header::Format::Raw,
            DiskFormat::Qcow2 => block::header::Format::Qcow2,
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.block().fmt(f)
    }
}

/// The longest graceful stop a policy may ask for.
pub const MAX_STOP_TIMEOUT_S: u64 = 3600;

fn if_available() -> Requirement {
    Requirement::IfAvailable
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupLimits {
    /// CPU time as a percentage of one CPU (200 = two CPUs' worth).
    pub cpu_percent: u32,
    /// memory limit = the VM's memory + this much for the VMM itself.
    pub memory_overhead_mib: u64,
    pub pids_max: u32,
    /// Relative I/O weight (10..=1000) where the kernel's I/O scheduler supports it.
    #[serde(default)]
    pub io_weight: Option<u32>,
}

/// The tenant's request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    #[serde(default = "one")]
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Absolute path inside one of the tenant's image directories; none: the built-in
    /// test guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nets: Vec<NetSpec>,
    #[serde(default)]
    pub rng: bool,
    /// A virtio-vsock device with this guest CID (3 to 4294967294); the tenant
    /// policy's `vsock`.
    #[serde(default)]
    pub vsock_cid: Option<u64>,
    /// A virtio-console device: hvc0 as the VM's console; the tenant policy's
    /// `virtio_console`.
    #[serde(default)]
    pub virtio_console: bool,
    /// Named ports of the virtio-console (at most 3; implies `virtio_console`): 1 to 64
    /// letters, digits, '.', '_' or '-', not starting with '.'.
    #[serde(default)]
    pub console_ports: Vec<String>,
    #[serde(default)]
    pub hugepages: bool,
    /// Allocate every page of guest RAM at launch (no page faults later).
    #[serde(default)]
    pub prefault: bool,
    /// Lock guest RAM in host memory (implies prefault); the tenant policy's `mlock`.
    #[serde(default)]
    pub mlock: bool,
    /// Guest RAM in this file, beneath the tenant's `memory_dirs`: empty (sized at
    /// launch) or exactly the VM's RAM, a regular file of root's with one link and no
    /// execute bit, locked for the VM's life and labelled with its categories.
    #[serde(default)]
    pub memory_file: Option<PathBuf>,
    #[serde(default)]
    pub ksm: bool,
    /// Directories shared with the guest through virtio-fs, each beneath the tenant's
    /// `share_dirs`, at most MAX_SHARES.
    #[serde(default)]
    pub shares: Vec<ShareSpec>,
}

/// A virtio-fs share of a VM spec: the guest mounts `path` by `tag`; its virtiofsd runs
/// in a cell of its own whose only content is the directory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareSpec {
    pub path: PathBuf,
    /// 1 to 36 letters, digits, '.', '_' or '-', each share's own.
    pub tag: String,
    #[serde(default)]
    pub readonly: bool,
}

/// The most virtio-fs shares one VM may have.
pub const MAX_SHARES: usize = 4;

/// A virtio-fs tag: 1 to 36 bytes (the device's tag field) of [A-Za-z0-9._-].
pub fn valid_share_tag(tag: &str) -> bool {
    (1..=36).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn one() -> u32 {
    1
}

fn one_queue() -> u16 {
    1
}

/// A virtio-blk disk of a VM spec; its backend runs in a cell of its own.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// An image beneath one of the tenant's image directories (or a granted block device).
    pub path: PathBuf,
    /// The image's format: the jailer checks it against the image's header, and a qcow2
    /// disk's backing chain is resolved beneath the tenant's image directories.
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub readonly: bool,
    /// O_DIRECT: the backend bypasses the host page cache.
    #[serde(default)]
    pub direct: bool,
    #[serde(default = "one_queue")]
    pub queues: u16,
    /// A LUKS-encrypted qcow2 image's key: the name of a file in the tenant's
    /// `secrets_dir`, whose bytes are the passphrase. The jailer passes it to the
    /// disk's backend by descriptor and never reads it.
    #[serde(default)]
    pub key_secret: Option<String>,
}

/// A virtio-net device of a VM spec: a tap the tenant policy grants; its backend runs in
/// a cell of its own and holds only the tap's descriptor.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    pub tap: String,
    /// The guest's MAC address; none: a random locally administered one.
    pub mac: Option<String>,
    /// Queue pairs (VIRTIO_NET_F_MQ), one per queue of a multi-queue tap: 1 (the
    /// default) to the VM's vCPUs, at most 8.
    #[serde(default = "one_queue")]
    pub queues: u16,
}

/// The most queue pairs a net device may have.
pub const MAX_NET_QUEUES: u16 = 8;

/// A disk key's name: one path component, no NUL.
fn valid_secret_name(name: &str) -> bool {
    (1..=255).contains(&name.len()) && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// A tap name the kernel accepts: 1-15 bytes of [A-Za-z0-9_.-].
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A name under /run/netns: 1-64 bytes of [A-Za-z0-9_.-], not `.` or `..`.
fn valid_netns(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Whether `mac` is six colon-separated hex bytes of a unicast address.
pub fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
        && parts.iter().any(|p| *p != "00")
}

/// Whether the policy's `taps` grant `tap`.
fn tap_granted(taps: &[String], tap: &str) -> bool {
    taps.iter().any(|t| match t.strip_suffix('*') {
        Some(prefix) => tap.starts_with(prefix),
        None => t == tap,
    })
}

/// Whether the policy's `block_devices` grant `path` (lexically: absolute, no `..`).
pub fn block_device_granted(patterns: &[String], path: &Path) -> bool {
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return false;
    }
    let Some(p) = path.to_str() else {
        return false;
    };
    patterns.iter().any(|t| match t.strip_suffix('*') {
        Some(prefix) => p.starts_with(prefix) && p.len() > prefix.len(),
        None => t == p,
    })
}

/// Tenant text made safe to print: printable ASCII stays, everything else (newlines,
/// escape sequences, non-ASCII) is written as a Rust escape, so a refusal is one line
/// and cannot move the operator's cursor or forge a log line.
pub fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_SHOWN));
    for c in text.chars() {
        if out.len() >= MAX_SHOWN {
            out.push_str("...");
            break;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            _ => out.extend(c.escape_default()),
        }
    }
    out
}

/// A path as `shown` prints tenant text.
pub fn shown_path(path: &Path) -> String {
    shown(&path.to_string_lossy())
}

/// At most this much of one tenant string is echoed in an error.
const MAX_SHOWN: usize = 256;

/// The most queues a disk may have (as `cellvm run` accepts).
pub const MAX_DISK_QUEUES: u16 = 16;

/// Policy and spec files are read only up to this size: a spec is a few hundred bytes.
pub const MAX_FILE_BYTES: u64 = 64 << 10;

/// The longest command line the VMM takes: `arch::x86_64::layout::CMDLINE_MAX` (2048)
/// with its NUL terminator.
pub const CMDLINE_MAX: usize = 2047;

/// Devices one VM can have: the PCI bus's 32 slots less the host bridge's.
pub const MAX_PCI_DEVICES: usize = 31;

/// The longest path the kernel resolves.
const PATH_MAX: usize = 4095;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("tenant {tenant}: {message}")]
    BadPolicy { tenant: String, message: String },
    #[error("tenant {}: vm {}: {} = {} {} {}", .0.tenant, .0.vm, .0.field, .0.asked, .0.verb, .0.allowed)]
    Violation(Box<Violation>),
}

/// What a refused spec asked for, and what the policy allows.
#[derive(Debug)]
pub struct Violation {
    pub tenant: String,
    pub vm: String,
    pub field: String,
    pub asked: String,
    pub verb: &'static str,
    pub allowed: String,
}

/// Reads a policy or spec file of at most `MAX_FILE_BYTES` (checked before anything
/// is parsed or grown with it), then parses it.
fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, Error> {
    use std::io::Read;
    let err = |source| Error::Read {
        path: shown_path(path),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::Parse {
            path: shown_path(path),
            message: format!("larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| Error::Parse {
        path: shown_path(path),
        message: "not UTF-8".into(),
    })?;
    parse(&text, &shown_path(path))
}

fn parse<T: for<'de> Deserialize<'de>>(text: &str, path: &str) -> Result<T, Error> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::Parse {
            path: path.into(),
            message: format!("larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    toml::from_str(text).map_err(|e| Error::Parse {
        path: path.into(),
        message: shown(e.message()),
    })
}

impl TenantPolicy {
    pub fn load(path: &Path) -> Result<TenantPolicy, Error> {
        let p: TenantPolicy = read(path)?;
        p.check()?;
        Ok(p)
    }

    pub fn parse(text: &str) -> Result<TenantPolicy, Error> {
        let p: TenantPolicy = parse(text, "<policy>")?;
        p.check()?;
        Ok(p)
    }

    /// The policy's own consistency: ranges ordered, uids unprivileged, dirs absolute.
    fn check(&self) -> Result<(), Error> {
        let bad = |message: String| {
            Err(Error::BadPolicy {
                tenant: shown(&self.name),
                message,
            })
        };
        if !valid_name(&self.name) {
            return bad(format!(
                "name \"{}\" must be 1-32 characters of [a-z0-9_-]",
                shown(&self.name)
            ));
        }
        let [lo, hi] = self.uid_range;
        if lo == 0 || lo > hi {
            return bad(format!(
                "uid_range [{lo}, {hi}] must be ordered and exclude root"
            ));
        }
        let [a, b] = self.mcs_categories;
        if a >= b || b > 1023 {
            return bad(format!(
                "mcs_categories [{a}, {b}] must hold at least two categories within c0..c1023"
            ));
        }
        if let Some(d) = self.memory_dirs.iter().find(|d| !d.is_absolute()) {
            return bad(format!(
                "memory_dirs entry {} is not absolute",
                shown_path(d)
            ));
        }
        if let Some(d) = self.secrets_dir.as_ref().filter(|d| !d.is_absolute()) {
            return bad(format!("secrets_dir {} is not absolute", shown_path(d)));
        }
        if let Some(d) = self.share_dirs.iter().find(|d| !d.path.is_absolute()) {
            return bad(format!(
                "share_dirs entry {} is not absolute",
                shown_path(&d.path)
            ));
        }
        if let Some([u, g]) = self.share_owner {
            let [lo, hi] = self.uid_range;
            if u == 0 || g == 0 || (lo..=hi).contains(&u) || (lo..=hi).contains(&g) {
                return bad(format!(
                    "share_owner [{u}, {g}] must be neither root nor in uid_range"
                ));
            }
        }
        if let Some(d) = self.image_dirs.iter().find(|d| !d.is_absolute()) {
            return bad(format!(
                "image_dirs entry {} is not absolute",
                shown_path(d)
            ));
        }
        if self.cgroup.pids_max == 0 || self.cgroup.cpu_percent == 0 {
            return bad("cgroup pids_max and cpu_percent must be positive".into());
        }
        if let Some(t) = self
            .taps
            .iter()
            .find(|t| !valid_ifname(t.strip_suffix('*').unwrap_or(t)))
        {
            return bad(format!(
                "taps entry \"{}\" must be an interface name (or a prefix ending in *)",
                shown(t)
            ));
        }
        if let Some(ns) = self.tap_netns.as_deref().filter(|n| !valid_netns(n)) {
            return bad(format!(
                "tap_netns \"{}\" must be a name under /run/netns (1-64 of [A-Za-z0-9_.-])",
                shown(ns)
            ));
        }
        if let Some(w) = self.cgroup.io_weight.filter(|w| !(10..=1000).contains(w)) {
            return bad(format!("cgroup io_weight {w} must be within 10..=1000"));
        }
        if let Some(b) = self.block_devices.iter().find(|b| {
            let p = b.strip_suffix('*').unwrap_or(b);
            !p.starts_with('/')
                || p.contains('*')
                || Path::new(p)
                    .components()
                    .any(|c| matches!(c, Component::ParentDir))
        }) {
            return bad(format!(
                "block_devices entry {:?} must be an absolute path (or a prefix ending in *)",
                shown(b)
            ));
        }
        if let Some(g) = self.api_group.as_deref().filter(|g| !valid_group(g)) {
            return bad(format!(
                "api_group \"{}\" must be a group name (1-32 of [a-z0-9_-], not starting with -) or a numeric gid",
                shown(g)
            ));
        }
        if !(1..=MAX_STOP_TIMEOUT_S).contains(&self.stop_timeout_s) {
            return bad(format!(
                "stop_timeout_s {} must be within 1..={MAX_STOP_TIMEOUT_S}",
                self.stop_timeout_s
            ));
        }
        if self.disk_formats.is_empty() {
            return bad("disk_formats must name at least one format (raw, qcow2)".into());
        }
        if self.max_chain_depth > MAX_CHAIN_DEPTH {
            return bad(format!(
                "max_chain_depth {} must be at most {MAX_CHAIN_DEPTH}",
                self.max_chain_depth
            ));
        }
        if let Some([uid, gid]) = self.image_owner {
            if uid == 0 || gid == 0 {
                return bad(
                    "image_owner must not be root (root's permissions are what it replaces)".into(),
                );
            }
        }
        Ok(())
    }
}

/// A group name as /etc/group holds them, or a numeric gid.
pub fn valid_group(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl VmSpec {
    /// The PCI functions the VM's devices take.
    pub fn device_count(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.vsock_cid.is_some())
            + usize::from(self.has_virtio_console())
            + self.shares.len()
    }

    /// Whether the VM has a virtio-console (asked for, or implied by named ports).
    pub fn has_virtio_console(&self) -> bool {
        self.virtio_console || !self.console_ports.is_empty()
    }

    pub fn load(path: &Path) -> Result<VmSpec, Error> {
        read(path)
    }

    pub fn parse(text: &str) -> Result<VmSpec, Error> {
        parse(text, "<vm spec>")
    }
}

/// Whether `cmdline` is what the VMM accepts: printable ASCII, at most `CMDLINE_MAX`.
fn valid_cmdline(cmdline: &str) -> bool {
    cmdline.len() <= CMDLINE_MAX && cmdline.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// A path the kernel can take: no NUL or control bytes, at most PATH_MAX.
fn valid_path(path: &Path) -> bool {
    let b = path.as_os_str().as_encoded_bytes();
    b.len() <= PATH_MAX && b.iter().all(|c| *c >= 0x20 && *c != 0x7f)
}

/// Checks the spec against the policy. Paths are only checked lexically here (absolute,
/// inside an allowed directory or a granted block device); `paths::open_beneath` is
/// what actually opens them. Every list is bounded before any work that grows with it,
/// and every tenant string echoed in a refusal is escaped (`shown`).
pub fn check(policy: &TenantPolicy, spec: &VmSpec) -> Result<(), Error> {
    let violation = |field: &str, asked: String, verb: &'static str, allowed: String| {
        Err(Error::Violation(Box::new(Violation {
            tenant: policy.name.clone(),
            vm: shown(&spec.name),
            field: field.to_string(),
            asked,
            verb,
            allowed,
        })))
    };
    let quoted = |s: &str| format!("\"{}\"", shown(s));
    if !valid_name(&spec.name) {
        return violation(
            "name",
            quoted(&spec.name),
            "violates",
            "1-32 characters of [a-z0-9_-]".into(),
        );
    }
    if spec.vcpus == 0 || spec.vcpus > policy.max_vcpus {
        return violation(
            "vcpus",
            spec.vcpus.to_string(),
            "exceeds",
            format!(
                "the tenant limit {} (and must be at least 1)",
                policy.max_vcpus
            ),
        );
    }
    if spec.memory_mib > policy.max_memory_mib {
        return violation(
            "memory_mib",
            spec.memory_mib.to_string(),
            "exceeds",
            format!("the tenant limit {}", policy.max_memory_mib),
        );
    }
    if !valid_cmdline(&spec.cmdline) {
        let asked = if spec.cmdline.len() > CMDLINE_MAX {
            format!("{} bytes", spec.cmdline.len())
        } else {
            quoted(&spec.cmdline)
        };
        return violation(
            "cmdline",
            asked,
            "violates",
            format!("printable ASCII of at most {CMDLINE_MAX} bytes"),
        );
    }
    for (field, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if let Some(p) = path {
            if !valid_path(p) || crate::paths::allowed_dir(&policy.image_dirs, p).is_none() {
                return violation(
                    field,
                    shown_path(p),
                    "violates",
                    format!("image_dirs {:?}", policy.image_dirs),
                );
            }
        }
    }
    if spec.hugepages && !policy.hugepages {
        return violation(
            "hugepages",
            "true".into(),
            "violates",
            "the tenant policy (hugepages = false)".into(),
        );
    }
    // Hugepage-backed RAM is 2 MiB pages: the VM's memory must be whole pages of them.
    if spec.hugepages && !spec.memory_mib.is_multiple_of(2) {
        return violation(
            "memory_mib",
            spec.memory_mib.to_string(),
            "violates",
            "hugepages = true, which needs a whole number of 2 MiB pages".into(),
        );
    }
    if let Some(p) = &spec.memory_file {
        if !valid_path(p) || crate::paths::allowed_dir(&policy.memory_dirs, p).is_none() {
            return violation(
                "memory_file",
                shown_path(p),
                "violates",
                format!("memory_dirs {:?}", policy.memory_dirs),
            );
        }
        if spec.hugepages || spec.ksm {
            return violation(
                "memory_file",
                shown_path(p),
                "violates",
                "hugepages and ksm, which it excludes".into(),
            );
        }
    }
    if spec.mlock && !policy.mlock {
        return violation(
            "mlock",
            "true".into(),
            "violates",
            "the tenant policy (mlock = false)".into(),
        );
    }
    if spec.ksm && !policy.ksm {
        return violation(
            "ksm",
            "true".into(),
            "violates",
            "the tenant policy (ksm = false)".into(),
        );
    }
    // The counts first: nothing below grows with a list longer than these.
    if spec.disks.len() as u64 > policy.max_disks as u64 {
        return violation(
            "disks",
            format!("{} entries", spec.disks.len()),
            "exceeds",
            format!("the tenant limit max_disks = {}", policy.max_disks),
        );
    }
    let devices = spec.device_count();
    if spec.nets.len() > MAX_PCI_DEVICES || devices > MAX_PCI_DEVICES {
        return violation(
            "nets",
            format!("{} entries ({} devices in all)", spec.nets.len(), devices),
            "exceeds",
            format!("the {MAX_PCI_DEVICES} PCI slots a VM has for devices"),
        );
    }
    for (i, d) in spec.disks.iter().enumerate() {
        let granted = valid_path(&d.path)
            && (crate::paths::allowed_dir(&policy.image_dirs, &d.path).is_some()
                || block_device_granted(&policy.block_devices, &d.path));
        if !granted {
            let allowed = if policy.block_devices.is_empty() {
                format!("image_dirs {:?}", policy.image_dirs)
            } else {
                format!(
                    "image_dirs {:?} and block_devices {:?}",
                    policy.image_dirs, policy.block_devices
                )
            };
            return violation(
                &format!("disks[{i}].path"),
                shown_path(&d.path),
                "violates",
                allowed,
            );
        }
        if !policy.disk_formats.contains(&d.format) {
            let allowed: Vec<String> = policy
                .disk_formats
                .iter()
                .map(|f| format!("\"{f}\""))
                .collect();
            return violation(
                &format!("disks[{i}].format"),
                format!("\"{}\"", d.format),
                "violates",
                format!("the tenant's disk_formats [{}]", allowed.join(", ")),
            );
        }
        if let Some(name) = &d.key_secret {
            let field = format!("disks[{i}].key_secret");
            if !valid_secret_name(name) {
                return violation(
                    &field,
                    quoted(name),
                    "violates",
                    "a file name (1 to 255 bytes, no '/', not '.' or '..')".into(),
                );
            }
            if policy.secrets_dir.is_none() {
                return violation(
                    &field,
                    quoted(name),
                    "violates",
                    "the tenant policy, which names no secrets_dir".into(),
                );
            }
            if d.format != DiskFormat::Qcow2 {
                return violation(
                    &field,
                    quoted(name),
                    "violates",
                    format!(
                        "format \"{}\": only an encrypted qcow2 disk takes a key",
                        d.format
                    ),
                );
            }
        }
        if !(1..=MAX_DISK_QUEUES).contains(&d.queues) {
            return violation(
                &format!("disks[{i}].queues"),
                d.queues.to_string(),
                "violates",
                format!("the range 1 to {MAX_DISK_QUEUES}"),
            );
        }
    }
    let mut taps = std::collections::HashSet::with_capacity(spec.nets.len());
    for (i, n) in spec.nets.iter().enumerate() {
        if !valid_ifname(&n.tap) || !tap_granted(&policy.taps, &n.tap) {
            return violation(
                &format!("nets[{i}].tap"),
                quoted(&n.tap),
                "violates",
                format!("the tenant's taps {:?}", policy.taps),
            );
        }
        if !taps.insert(n.tap.as_str()) {
            return violation(
                &format!("nets[{i}].tap"),
                quoted(&n.tap),
                "violates",
                "one device per tap".into(),
            );
        }
        if let Some(mac) = n.mac.as_deref().filter(|m| !valid_mac(m)) {
            return violation(
                &format!("nets[{i}].mac"),
                quoted(mac),
                "violates",
                "a unicast address like 02:00:00:00:00:01".into(),
            );
        }
        let most = MAX_NET_QUEUES.min(spec.vcpus.min(u16::MAX as u32) as u16);
        if !(1..=most).contains(&n.queues) {
            return violation(
                &format!("nets[{i}].queues"),
                n.queues.to_string(),
                "violates",
                format!("1 to {most} (one queue pair per vCPU, at most {MAX_NET_QUEUES})"),
            );
        }
    }
    if spec.rng && !policy.rng {
        return violation(
            "rng",
            "true".into(),
            "violates",
            "the tenant policy (rng = false)".into(),
        );
    }
    if let Some(cid) = spec.vsock_cid {
        if !policy.vsock {
            return violation(
                "vsock_cid",
                cid.to_string(),
                "violates",
                "the tenant policy (vsock = false)".into(),
            );
        }
        if !(MIN_VSOCK_CID..=MAX_VSOCK_CID).contains(&cid) {
            return violation(
                "vsock_cid",
                cid.to_string(),
                "violates",
                format!("a guest CID from {MIN_VSOCK_CID} to {MAX_VSOCK_CID}"),
            );
        }
    }
    if spec.has_virtio_console() && !policy.virtio_console {
        return violation(
            "virtio_console",
            "true".into(),
            "violates",
            "the tenant policy (virtio_console = false)".into(),
        );
    }
    if spec.shares.len() > MAX_SHARES {
        return violation(
            "shares",
            format!("{} entries", spec.shares.len()),
            "exceeds",
            format!("{MAX_SHARES} shares"),
        );
    }
    for (i, share) in spec.shares.iter().enumerate() {
        let field = format!("shares[{i}]");
        let dirs = policy.share_dirs(!share.readonly);
        if !valid_path(&share.path) || crate::paths::allowed_dir(&dirs, &share.path).is_none() {
            let allowed = if share.readonly || policy.share_dirs.is_empty() {
                format!("share_dirs {:?}", policy.share_dirs(false))
            } else {
                format!("the writable share_dirs {dirs:?} (readonly = true for the others)")
            };
            return violation(&field, shown_path(&share.path), "violates", allowed);
        }
        if !valid_share_tag(&share.tag) || spec.shares[..i].iter().any(|s| s.tag == share.tag) {
            return violation(
                &format!("{field}.tag"),
                quoted(&share.tag),
                "violates",
                "1 to 36 letters, digits, '.', '_' or '-', each share's own".into(),
            );
        }
    }
    if spec.console_ports.len() > MAX_CONSOLE_PORTS {
        return violation(
            "console_ports",
            spec.console_ports.len().to_string(),
            "exceeds",
            format!("{MAX_CONSOLE_PORTS} named ports"),
        );
    }
    for (i, name) in spec.console_ports.iter().enumerate() {
        if !console_port_name(name) || spec.console_ports[..i].contains(name) {
            return violation(
                "console_ports",
                format!("{name:?}"),
                "violates",
                "1 to 64 letters, digits, '.', '_' or '-', not starting with '.', each once".into(),
            );
        }
    }
    Ok(())
}

/// Named ports a virtio-console may have besides hvc0.
pub const MAX_CONSOLE_PORTS: usize = 3;

/// A named port's name: it becomes a file name in the run directory
/// (`port-NAME.sock`) and the guest's `/dev/virtio-ports/NAME`.
pub fn console_port_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A guest's vsock CIDs: 0 to 2 are reserved, u32::MAX is VMADDR_CID_ANY.
pub const MIN_VSOCK_CID: u64 = 3;
pub const MAX_VSOCK_CID: u64 = u32::MAX as u64 - 1;

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        name = "acme"
        max_vcpus = 4
        max_memory_mib = 1024
        image_dirs = ["/srv/images/acme"]
        uid_range = [300000, 300099]
        mcs_categories = [10, 20]
        [cgroup]
        cpu_percent = 100
        memory_overhead_mib = 64
        pids_max = 32
    "#;

    fn spec(extra: &str) -> VmSpec {
        VmSpec::parse(&format!("name = \"web1\"\nmemory_mib = 128\n{extra}")).unwrap()
    }

    fn refusal(extra: &str) -> String {
        check(&TenantPolicy::parse(POLICY).unwrap(), &spec(extra))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shares_are_bounded_by_the_share_dirs_and_their_writability() {
        let p = TenantPolicy::parse(&POLICY.replace(
            "[cgroup]",
            "share_dirs = [{ path = \"/srv/shares/acme\", writable = true }, { path = \"/srv/ro/acme\" }]\n[cgroup]",
        ))
        .unwrap();
        let shares = |s: &str| spec(&format!("shares = [{s}]"));
        let ok = |s: &str| check(&p, &shares(s)).is_ok();
        let why = |s: &str| check(&p, &shares(s)).unwrap_err().to_string();
        assert!(ok("{ path = \"/srv/shares/acme/a\", tag = \"a\" }"));
        assert!(ok(
            "{ path = \"/srv/ro/acme/a\", tag = \"a\", readonly = true }"
        ));
        assert!(why("{ path = \"/srv/ro/acme/a\", tag = \"a\" }").contains("writable share_dirs"));
        assert!(why("{ path = \"/etc\", tag = \"a\" }").contains("share_dirs"));
        assert!(why("{ path = \"/srv/shares/acme/../x\", tag = \"a\" }").contains("violates"));
        assert!(why("{ path = \"/srv/shares/acme\", tag = \"a\" }").contains("violates"));
        for tag in ["", "a b", "../x", &"t".repeat(37)] {
            let s = format!("{{ path = \"/srv/shares/acme/a\", tag = \"{tag}\" }}");
            assert!(why(&s).contains("tag"), "{tag:?}");
        }
        let twice = "{ path = \"/srv/shares/acme/a\", tag = \"t\" }, { path = \"/srv/shares/acme/b\", tag = \"t\" }";
        assert!(why(twice).contains("each share's own"));
        let five: Vec<String> = (0..5)
            .map(|i| format!("{{ path = \"/srv/shares/acme/{i}\", tag = \"t{i}\" }}"))
            .collect();
        assert!(why(&five.join(", ")).contains("exceeds"));
        assert_eq!(
            shares("{ path = \"/srv/shares/acme/a\", tag = \"a\" }").device_count(),
            1
        );
        // No share_dirs: no shares.
        let none = TenantPolicy::parse(POLICY).unwrap();
        assert!(check(
            &none,
            &shares("{ path = \"/srv/shares/acme/a\", tag = \"a\" }")
        )
        .is_err());
        // A share owner is neither root nor one of the cells' uids.
        for owner in ["[0, 5]", "[300050, 400000]", "[400000, 300000]"] {
            let text = POLICY.replace("[cgroup]", &format!("share_owner = {owner}\n[cgroup]"));
            assert!(TenantPolicy::parse(&text).is_err(), "{owner}");
        }
    }

    #[test]
    fn a_spec_inside_the_policy_passes() {
        let p = TenantPolicy::parse(POLICY).unwrap();
        assert_eq!(p.selinux, Requirement::IfAvailable);
        assert_eq!(p.landlock, Requirement::Required);
        check(
            &p,
            &spec("vcpus = 4\nkernel = \"/srv/images/acme/vmlinux\""),
        )
        .unwrap();
    }

    #[test]
    fn limits_are_named_with_what_was_asked_and_allowed() {
        assert_eq!(
            refusal("vcpus = 8"),
            "tenant acme: vm web1: vcpus = 8 exceeds the tenant limit 4 (and must be at least 1)"
        );
        assert_eq!(
            VmSpec::parse("name = \"web1\"\nmemory_mib = 65536")
                .map(|s| check(&TenantPolicy::parse(POLICY).unwrap(), &s)
                    .unwrap_err()
                    .to_string())
                .unwrap(),
            "tenant acme: vm web1: memory_mib = 65536 exceeds the tenant limit 1024"
        );
        assert!(refusal("kernel = \"/etc/shadow\"")
            .starts_with("tenant acme: vm web1: kernel = /etc/shadow violates image_dirs"));
        assert!(refusal("initrd = \"/srv/images/acme/../../etc/shadow\"")
            .contains("initrd = /srv/images/acme/../../etc/shadow violates"));
        assert!(refusal("hugepages = true").contains("hugepages = true violates"));
        assert!(refusal("disks = [{ path = \"/srv/images/acme/d.img\" }]")
            .contains("disks = 1 entries exceeds the tenant limit max_disks = 0"));
        assert!(
            refusal("rng = true").contains("rng = true violates the tenant policy (rng = false)")
        );
        assert!(refusal("nets = [{ tap = \"t0\" }]")
            .contains("nets[0].tap = \"t0\" violates the tenant's taps []"));
        let with_taps = TenantPolicy::parse(
            &POLICY.replace("uid_range", "taps = [\"acme0\", \"ac-*\"]\nuid_range"),
        )
        .unwrap();
        let net_refusal =
            |extra: &str| check(&with_taps, &spec(extra)).err().map(|e| e.to_string());
        assert_eq!(
            net_refusal(
                "nets = [{ tap = \"acme0\" }, { tap = \"ac-7\", mac = \"02:00:00:00:00:01\" }]"
            ),
            None
        );
        for (bad, why) in [
            (
                "nets = [{ tap = \"acme1\" }]",
                "nets[0].tap = \"acme1\" violates",
            ),
            ("nets = [{ tap = \"ac-/x\" }]", "nets[0].tap"),
            (
                "nets = [{ tap = \"ac-1\" }, { tap = \"ac-1\" }]",
                "one device per tap",
            ),
            (
                "nets = [{ tap = \"acme0\", mac = \"01:00:00:00:00:01\" }]",
                "nets[0].mac",
            ),
            (
                "nets = [{ tap = \"acme0\", mac = \"02:00:00:00:00\" }]",
                "nets[0].mac",
            ),
        ] {
            let r = net_refusal(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(r.contains(why), "{bad}: {r}");
        }
    }

    #[test]
    fn a_virtio_console_needs_the_policy_and_names_that_can_be_file_names() {
        assert!(refusal("virtio_console = true")
            .contains("virtio_console = true violates the tenant policy (virtio_console = false)"));
        assert!(refusal("console_ports = [\"agent.0\"]").contains("virtio_console = false"));
        let allowed =
            TenantPolicy::parse(&POLICY.replace("uid_range", "virtio_console = true\nuid_range"))
                .unwrap();
        let refused = |extra: &str| check(&allowed, &spec(extra)).err().map(|e| e.to_string());
        assert_eq!(
            refused("console_ports = [\"org.qemu.guest_agent.0\", \"b\"]"),
            None
        );
        assert_eq!(spec("console_ports = [\"a\"]").device_count(), 1);
        for (bad, why) in [
            (
                "console_ports = [\"../x\"]",
                "console_ports = \"../x\" violates",
            ),
            ("console_ports = [\".x\"]", "violates"),
            ("console_ports = [\"a\", \"a\"]", "each once"),
            ("console_ports = [\"\"]", "violates"),
            (
                "console_ports = [\"a\", \"b\", \"c\", \"d\"]",
                "exceeds 3 named ports",
            ),
        ] {
            let e = refused(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn inconsistent_policies_and_unknown_fields_are_refused() {
        assert!(
            TenantPolicy::parse(&POLICY.replace("[300000, 300099]", "[0, 10]"))
                .unwrap_err()
                .to_string()
                .contains("exclude root")
        );
        assert!(TenantPolicy::parse(&POLICY.replace("[10, 20]", "[20, 20]"))
            .unwrap_err()
            .to_string()
            .contains("mcs_categories"));
        assert!(TenantPolicy::parse(&format!("{POLICY}\nmax_disks = 3")).is_err());
        for bad in ["taps = [\"a/b\"]", "taps = [\"\"]", "tap_netns = \"../x\""] {
            assert!(
                TenantPolicy::parse(&POLICY.replace("uid_range", &format!("{bad}\nuid_range")))
                    .is_err(),
                "{bad} accepted"
            );
        }
        assert!(VmSpec::parse("name = \"a\"\nmemory_mib = 1\ncpus = 2")
            .unwrap_err()
            .to_string()
            .contains("unknown field"));
    }

    #[test]
    fn every_string_of_the_spec_is_checked_and_echoed_escaped() {
        for (extra, why) in [
            (
                "cmdline = \"console=ttyS0\\u0000x\"",
                "cmdline = \"console=ttyS0\\u{0}x\" violates printable ASCII of at most 2047 bytes",
            ),
            ("cmdline = \"a\\nb\"", "cmdline = \"a\\nb\" violates"),
            (
                "cmdline = \"\\u001b[2J\"",
                "cmdline = \"\\u{1b}[2J\" violates",
            ),
            (
                "kernel = \"/srv/images/acme/k\\u0000\"",
                "kernel = /srv/images/acme/k\\u{0} violates",
            ),
            ("disks = [{ path = \"/srv/images/acme/d\\n\" }]", "disks"),
        ] {
            let r = refusal(extra);
            assert!(r.contains(why), "{extra}: {r}");
            assert!(
                !r.contains('\n') && !r.contains('\0') && !r.contains('\x1b'),
                "{r:?}"
            );
        }
        assert!(refusal(&format!("cmdline = \"{}\"", "a".repeat(2048)))
            .contains("cmdline = 2048 bytes violates"));
        let p = TenantPolicy::parse(POLICY).unwrap();
        check(&p, &spec(&format!("cmdline = \"{}\"", "a".repeat(2047)))).unwrap();
        let bad_name = VmSpec::parse("name = \"demo\\nuid=0\\u001b]0;x\"\nmemory_mib = 1").unwrap();
        let r = check(&p, &bad_name).unwrap_err().to_string();
        assert_eq!(
            r,
            "tenant acme: vm demo\\nuid=0\\u{1b}]0;x: name = \"demo\\nuid=0\\u{1b}]0;x\" violates 1-32 characters of [a-z0-9_-]"
        );
        let with_taps =
            TenantPolicy::parse(&POLICY.replace("uid_range", "taps = [\"t*\"]\nuid_range"))
                .unwrap();
        let r = check(
            &with_taps,
            &spec("nets = [{ tap = \"t0\", mac = \"02:00:00:00:00:01\\n\" }]"),
        )
        .unwrap_err()
        .to_string();
        assert!(r.ends_with("nets[0].mac = \"02:00:00:00:00:01\\n\" violates a unicast address like 02:00:00:00:00:01"), "{r}");
    }

    #[test]
    fn files_and_lists_are_bounded_before_any_work_grows_with_them() {
        let dir = std::env::temp_dir().join(format!("cellvm-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.toml");
        std::fs::write(
            &big,
            format!(
                "name = \"a\"\nmemory_mib = 1\ncmdline = \"{}\"\n",
                "a".repeat(70_000)
            ),
        )
        .unwrap();
        let e = VmSpec::load(&big).unwrap_err().to_string();
        assert!(e.ends_with("larger than 65536 bytes"), "{e}");
        assert!(VmSpec::parse(&" ".repeat(65537)).is_err());
        let with_taps =
            TenantPolicy::parse(&POLICY.replace("uid_range", "taps = [\"t*\"]\nuid_range"))
                .unwrap();
        let nets: Vec<String> = (0..2000).map(|i| format!("{{ tap = \"t{i}\" }}")).collect();
        let start = std::time::Instant::now();
        let r = check(&with_taps, &spec(&format!("nets = [{}]", nets.join(","))))
            .unwrap_err()
            .to_string();
        assert!(
            r.contains("nets = 2000 entries (2000 devices in all) exceeds the 31 PCI slots"),
            "{r}"
        );
        let nets: Vec<String> = (0..31).map(|i| format!("{{ tap = \"t{i}\" }}")).collect();
        check(&with_taps, &spec(&format!("nets = [{}]", nets.join(",")))).unwrap();
        let r = check(
            &with_taps,
            &spec(&format!("rng = true\nnets = [{}]", nets.join(","))),
        )
        .unwrap_err()
        .to_string();
        assert!(r.contains("32 devices in all"), "{r}");
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn block_devices_are_granted_by_path_only() {
        let p = TenantPolicy::parse(&POLICY.replace(
            "uid_range",
            "block_devices = [\"/dev/vg0/acme-*\", \"/dev/sdz\"]\nmax_disks = 2\nuid_range",
        ))
        .unwrap();
        check(
            &p,
            &spec("disks = [{ path = \"/dev/vg0/acme-1\" }, { path = \"/dev/sdz\" }]"),
        )
        .unwrap();
        for bad in [
            "/dev/vg0/acme-",
            "/dev/vg0/acme-1/../../sda",
            "/dev/sdz1",
            "/dev/vg0/other",
        ] {
            let r = check(&p, &spec(&format!("disks = [{{ path = \"{bad}\" }}]")))
                .unwrap_err()
                .to_string();
            assert!(
                r.contains("disks[0].path") && r.contains("block_devices"),
                "{bad}: {r}"
            );
        }
        for bad in ["\"dev/x*\"", "\"/dev/*x*\"", "\"/dev/../etc*\""] {
            assert!(
                TenantPolicy::parse(
                    &POLICY.replace("uid_range", &format!("block_devices = [{bad}]\nuid_range"))
                )
                .is_err(),
                "{bad}"
            );
        }
        assert!(TenantPolicy::parse(
            &POLICY.replace("uid_range", "image_owner = [0, 0]\nuid_range")
        )
        .is_err());
    }

    #[test]
    fn disk_formats_default_to_raw_and_bound_the_spec() {
        let p =
            TenantPolicy::parse(&POLICY.replace("uid_range", "max_disks = 1\nuid_range")).unwrap();
        assert_eq!(p.disk_formats, vec![DiskFormat::Raw]);
        assert_eq!(p.max_chain_depth, 8);
        check(&p, &spec("disks = [{ path = \"/srv/images/acme/d.img\" }]")).unwrap();
        let r = check(
            &p,
            &spec("disks = [{ path = \"/srv/images/acme/d.qcow2\", format = \"qcow2\" }]"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            r,
            "tenant acme: vm web1: disks[0].format = \"qcow2\" violates the tenant's disk_formats [\"raw\"]"
        );
        let q = TenantPolicy::parse(&POLICY.replace(
            "uid_range",
            "max_disks = 1\ndisk_formats = [\"raw\", \"qcow2\"]\nuid_range",
        ))
        .unwrap();
        check(
            &q,
            &spec("disks = [{ path = \"/srv/images/acme/d.qcow2\", format = \"qcow2\" }]"),
        )
        .unwrap();
        assert!(VmSpec::parse(
            "name = \"a\"\nmemory_mib = 1\ndisks = [{ path = \"/x\", format = \"vmdk\" }]"
        )
        .is_err());
        for bad in [
            "disk_formats = []",
            "max_chain_depth = 33",
            "disk_formats = [\"vmdk\"]",
        ] {
            assert!(
                TenantPolicy::parse(&POLICY.replace("uid_range", &format!("{bad}\nuid_range")))
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_example_policy_grants_the_qcow2_example_spec() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let p = TenantPolicy::load(&root.join("policy/tenants/example.toml")).unwrap();
        assert!(p.disk_formats.contains(&DiskFormat::Qcow2));
        let s = VmSpec::load(&root.join("policy/vms/example-qcow2.toml")).unwrap();
        assert_eq!(s.disks[0].format, DiskFormat::Qcow2);
        check(&p, &s).unwrap();
    }

    #[test]
    fn api_group_and_stop_timeout_are_bounded() {
        let p = TenantPolicy::parse(POLICY).unwrap();
        assert_eq!(p.api_group, None);
        assert_eq!(p.stop_timeout_s, 30, "the default");
        let with = |line: &str| {
            TenantPolicy::parse(&POLICY.replace("uid_range", &format!("{line}\nuid_range")))
        };
        let p = with("api_group = \"cellvm-ops\"\nstop_timeout_s = 5").unwrap();
        assert_eq!(p.api_group.as_deref(), Some("cellvm-ops"));
        assert_eq!(p.stop_timeout_s, 5);
        assert!(with("api_group = \"1234\"").is_ok(), "a numeric gid");
        for bad in [
            "api_group = \"\"",
            "api_group = \"-x\"",
            "api_group = \"a b\"",
            "api_group = \"../x\"",
            "stop_timeout_s = 0",
            "stop_timeout_s = 3601",
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.contains("tenant acme")
                    && (e.contains("api_group") || e.contains("stop_timeout_s")),
                "{bad}: {e}"
            );
        }
    }
}
