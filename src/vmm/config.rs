//! What a VM is made of: the `cellvm run` flags, or the same fields from a TOML file.

use std::path::PathBuf;

use serde::Deserialize;

use crate::arch::x86_64::boot::BootProtocol;

pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 128;

/// Where the guest's COM1 output goes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum SerialOut {
    #[default]
    Stdio,
    File(PathBuf),
    Off,
}

impl std::str::FromStr for SerialOut {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialOut::Stdio),
            "off" => Ok(SerialOut::Off),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(SerialOut::File(p.into())),
                _ => Err(format!("serial = {s:?}: expected stdio, off or file=PATH")),
            },
        }
    }
}

impl<'de> Deserialize<'de> for SerialOut {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where a device's vhost-user backend comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// cellvm starts its own backend process (developer mode, unjailed).
    Spawn,
    /// Connect to a backend someone else started, listening at this path.
    Socket(PathBuf),
    /// An inherited descriptor already connected to a backend (how the jailer passes
    /// the backends it started in their own cells).
    Fd(i32),
}

/// A virtio-blk disk: `path=IMG[,format=raw|qcow2][,key=SECRET][,readonly=on][,direct=on][,queues=N]`,
/// `socket=PATH[,queues=N]` or `fd=N[,queues=N]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub image: Option<PathBuf>,
    /// What `path=` holds (default raw); a qcow2 image's backing chain comes from its
    /// headers.
    pub format: block::header::Format,
    pub readonly: bool,
    /// O_DIRECT in the backend (no host page cache).
    pub direct: bool,
    pub queues: u16,
    pub backend: Backend,
    /// The backend's host pid (`pid=`), only reported by `vm.info`.
    pub pid: Option<u32>,
    /// The backend's page of counters (`counters=FD`, backend::counters).
    pub counters: Option<i32>,
    /// A LUKS-encrypted qcow2 image's key: a file whose bytes are the passphrase.
    pub key: Option<PathBuf>,
}

/// The largest number of queues a disk may have.
pub const MAX_DISK_QUEUES: u16 = 16;

/// Walks the `KEY=VALUE,...` of a device spec: backend keys (`socket=`, `fd=`), the
/// backend's `pid=` and `counters=` here, the rest through `field`, which says whether its key named the
/// device's source. Exactly one source is allowed (`sources` names them for the error).
fn device_fields(
    s: &str,
    what: &str,
    sources: &str,
    mut field: impl FnMut(&str, &str) -> Result<bool, String>,
) -> Result<(Backend, Option<u32>, Option<i32>), String> {
    let (mut backend, mut count, mut pid, mut counters) = (Backend::Spawn, 0, None, None);
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{what}: {part:?} is not KEY=VALUE"))?;
        if key == "pid" {
            pid = Some(parse_pid(value, what)?);
        } else if key == "counters" {
            counters = Some(
                value
                    .parse()
                    .ok()
                    .filter(|fd: &i32| *fd >= 3)
                    .ok_or_else(|| {
                        format!("{what}: counters={value}: expected a descriptor number >= 3")
                    })?,
            );
        } else if let Some(b) = parse_backend(key, value, what)? {
            backend = b;
            count += 1;
        } else if field(key, value)? {
            count += 1;
        }
    }
    if count != 1 {
        return Err(format!("{what}: give exactly one of {sources}"));
    }
    if (pid.is_some() || counters.is_some()) && backend == Backend::Spawn {
        return Err(format!(
            "{what}: pid= and counters= describe a backend started elsewhere (fd= or socket=)"
        ));
    }
    Ok((backend, pid, counters))
}

fn parse_pid(value: &str, what: &str) -> Result<u32, String> {
    value
        .parse()
        .ok()
        .filter(|p: &u32| *p >= 1 && *p <= 1 << 22)
        .ok_or_else(|| format!("{what}: pid={value}: expected a process id (1 to 4194304)"))
}

fn parse_backend(key: &str, value: &str, what: &str) -> Result<Option<Backend>, String> {
    Ok(match key {
        "socket" if !value.is_empty() => Some(Backend::Socket(value.into())),
        "fd" => Some(Backend::Fd(
            value
                .parse()
                .ok()
                .filter(|fd: &i32| *fd >= 3)
                .ok_or_else(|| format!("{what}: fd={value}: expected a descriptor number >= 3"))?,
        )),
        _ => None,
    })
}

impl std::str::FromStr for DiskSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let what = format!("disk {s:?}");
        let (mut image, mut readonly, mut direct, mut queues) = (None, false, false, 1);
        let (mut format, mut key_file) = (None, None);
        let on_off = |key: &str, value: &str| match value {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(format!("{what}: {key}={value}: expected on or off")),
        };
        let (backend, pid, counters) =
            device_fields(s, &what, "path=, socket= or fd=", |key, value| {
                match key {
                    "path" if !value.is_empty() => {
                        image = Some(PathBuf::from(value));
                        return Ok(true);
                    }
                    "readonly" => readonly = on_off(key, value)?,
                    "format" => {
                        format = Some(value.parse().map_err(|_| {
                            format!("{what}: format={value}: expected raw or qcow2")
                        })?)
                    }
                    "direct" => direct = on_off(key, value)?,
                    "key" if !value.is_empty() => key_file = Some(PathBuf::from(value)),
                    "queues" => {
                        queues = value
                            .parse()
                            .ok()
                            .filter(|q| (1..=MAX_DISK_QUEUES).contains(q))
                            .ok_or_else(|| {
                                format!("{what}: queues={value}: expected 1 to {MAX_DISK_QUEUES}")
                            })?
                    }
                    _ => return Err(format!("{what}: unknown or empty key {key:?}")),
                }
                Ok(false)
            })?;
        if (readonly || direct || format.is_some() || key_file.is_some())
            && backend != Backend::Spawn
        {
            return Err(format!(
                "{what}: readonly=, direct=, format= and key= belong to the backend that owns the image"
            ));
        }
        if key_file.is_some() && format != Some(block::header::Format::Qcow2) {
            return Err(format!(
                "{what}: key= opens a LUKS-encrypted qcow2 image (say format=qcow2)"
            ));
        }
        Ok(DiskSpec {
            image,
            format: format.unwrap_or(block::header::Format::Raw),
            readonly,
            direct,
            queues,
            backend,
            pid,
            counters,
            key: key_file,
        })
    }
}

/// The entropy device: `on`, `socket=PATH` or `fd=N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngSpec {
    pub backend: Backend,
    pub pid: Option<u32>,
    pub counters: Option<i32>,
}

impl std::str::FromStr for RngSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "on" {
            return Ok(RngSpec {
                backend: Backend::Spawn,
                pid: None,
                counters: None,
            });
        }
        let what = format!("rng {s:?}");
        if s.split(',').any(|p| !p.contains('=')) {
            return Err(format!("{what}: expected on, socket=PATH or fd=N[,pid=P]"));
        }
        let (backend, pid, counters) =
            device_fields(s, &what, "on, socket=PATH or fd=N", |_, _| {
                Err(format!("{what}: expected on, socket=PATH or fd=N[,pid=P]"))
            })?;
        Ok(RngSpec {
            backend,
            pid,
            counters,
        })
    }
}

/// A virtio-net device: `tap=NAME[,mac=MAC][,queues=N]`, `socket=PATH` or `fd=N`
/// (`queues=N` too: the backend started elsewhere has N queue pairs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: Option<String>,
    pub mac: Option<String>,
    /// Queue pairs (VIRTIO_NET_F_MQ with more than one): the tap's queues, one per pair.
    pub queues: usize,
    pub backend: Backend,
    pub pid: Option<u32>,
    pub counters: Option<i32>,
}

impl std::str::FromStr for NetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let what = format!("net {s:?}");
        let (mut tap, mut mac, mut queues) = (None, None, 1);
        let (backend, pid, counters) =
            device_fields(s, &what, "tap=, socket= or fd=", |key, value| {
                match key {
                    "queues" => {
                        use crate::backend::net::MAX_QUEUE_PAIRS;
                        queues = value
                            .parse()
                            .ok()
                            .filter(|q| (1..=MAX_QUEUE_PAIRS).contains(q))
                            .ok_or_else(|| {
                                format!("{what}: queues={value}: expected 1 to {MAX_QUEUE_PAIRS}")
                            })?;
                    }
                    "tap" if !value.is_empty() && value.len() <= 15 && !value.contains('/') => {
                        tap = Some(value.to_string());
                        return Ok(true);
                    }
                    "tap" => return Err(format!("{what}: tap={value:?}: 1 to 15 bytes, no '/'")),
                    "mac" => {
                        crate::backend::net::parse_mac(value)
                            .map_err(|e| format!("{what}: {e}"))?;
                        mac = Some(value.to_string());
                    }
                    _ => return Err(format!("{what}: unknown or empty key {key:?}")),
                }
                Ok(false)
            })?;
        if mac.is_some() && backend != Backend::Spawn {
            return Err(format!(
                "{what}: mac= belongs to the backend that owns the tap"
            ));
        }
        Ok(NetSpec {
            tap,
            mac,
            queues,
            backend,
            pid,
            counters,
        })
    }
}

/// A virtio-vsock device: `cid=N,uds=PATH` (cellvm starts the backend; host programs
/// reach the guest through the Unix socket PATH, the guest reaches host port P at
/// `PATH_P`), `socket=PATH` or `fd=N` (the backend, started elsewhere, has both).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockSpec {
    pub cid: Option<u64>,
    pub uds: Option<PathBuf>,
    pub backend: Backend,
    pub pid: Option<u32>,
    pub counters: Option<i32>,
}

impl std::str::FromStr for VsockSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use crate::backend::vsock::{MAX_GUEST_CID, MIN_GUEST_CID};
        let what = format!("vsock {s:?}");
        let (mut cid, mut uds) = (None, None);
        let (backend, pid, counters) = device_fields(
            s,
            &what,
            "uds=, socket= or fd=",
            |key, value| {
                match key {
                    "uds" if !value.is_empty() => {
                        uds = Some(PathBuf::from(value));
                        return Ok(true);
                    }
                    "cid" => {
                        cid = Some(
                            value
                                .parse()
                                .ok()
                                .filter(|c| (MIN_GUEST_CID..=MAX_GUEST_CID).contains(c))
                                .ok_or_else(|| {
                                    format!(
                                        "{what}: cid={value}: expected {MIN_GUEST_CID} to {MAX_GUEST_CID}"
                                    )
                                })?,
                        )
                    }
                    _ => return Err(format!("{what}: unknown or empty key {key:?}")),
                }
                Ok(false)
            },
        )?;
        match (&backend, cid) {
            (Backend::Spawn, None) => Err(format!("{what}: uds= needs cid=N, the guest's address")),
            (Backend::Spawn, Some(_)) => Ok(VsockSpec {
                cid,
                uds,
                backend,
                pid,
                counters,
            }),
            (_, Some(_)) => Err(format!(
                "{what}: cid= belongs to the backend that owns the socket"
            )),
            (_, None) => Ok(VsockSpec {
                cid,
                uds,
                backend,
                pid,
                counters,
            }),
        }
    }
}

/// A virtio-console device: `hvc=PATH[,port=NAME:PATH...]` (cellvm starts the
/// backend: port 0, the guest's hvc0, takes one host program at a time on the Unix
/// socket PATH; each `port=` is a named port for a guest agent, its host end the
/// socket after the colon), `socket=PATH` or `fd=N` (the backend, started elsewhere,
/// has its ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSpec {
    pub hvc: Option<PathBuf>,
    /// Named ports: (name, host socket).
    pub ports: Vec<(String, PathBuf)>,
    pub backend: Backend,
    pub pid: Option<u32>,
    pub counters: Option<i32>,
}

impl std::str::FromStr for ConsoleSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use crate::backend::console::{valid_name, MAX_PORTS};
        let what = format!("virtio-console {s:?}");
        let (mut hvc, mut ports) = (None, Vec::<(String, PathBuf)>::new());
        let (backend, pid, counters) = device_fields(
            s,
            &what,
            "hvc=, socket= or fd=",
            |key, value| {
                match key {
                    "hvc" if !value.is_empty() => {
                        hvc = Some(PathBuf::from(value));
                        return Ok(true);
                    }
                    "port" => {
                        let (name, path) = value
                            .split_once(':')
                            .filter(|(n, p)| valid_name(n) && !p.is_empty())
                            .ok_or_else(|| {
                                format!(
                                    "{what}: port={value:?}: expected NAME:PATH, NAME 1 to 64 letters, digits, '.', '_' or '-'"
                                )
                            })?;
                        if ports.iter().any(|(n, _)| n == name) {
                            return Err(format!("{what}: port {name:?} named twice"));
                        }
                        if ports.len() + 1 >= MAX_PORTS {
                            return Err(format!("{what}: at most {} named ports", MAX_PORTS - 1));
                        }
                        ports.push((name.to_string(), PathBuf::from(path)));
                    }
                    _ => return Err(format!("{what}: unknown or empty key {key:?}")),
                }
                Ok(false)
            },
        )?;
        if !ports.is_empty() && backend != Backend::Spawn {
            return Err(format!(
                "{what}: port= belongs to the backend that owns the sockets"
            ));
        }
        Ok(ConsoleSpec {
            hvc,
            ports,
            backend,
            pid,
            counters,
        })
    }
}

/// The longest tag a virtio-fs device may have (virtio 1.2, 5.11.4: 36 bytes).
pub const MAX_FS_TAG: usize = 36;

/// A virtio-fs share: `tag=TAG,socket=PATH` or `tag=TAG,fd=N`. Its backend is a
/// virtiofsd someone else started (the jailer, in a cell of its own); the VMM never
/// starts one. The guest mounts the share by its tag, which the VMM serves as the
/// device's configuration (as QEMU's vhost-user-fs frontend does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsSpec {
    pub tag: String,
    pub backend: Backend,
    pub pid: Option<u32>,
    pub counters: Option<i32>,
}

impl std::str::FromStr for FsSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let what = format!("fs {s:?}");
        let mut tag = None;
        let (backend, pid, counters) =
            device_fields(s, &what, "socket=PATH or fd=N", |key, value| {
                if key != "tag" {
                    return Err(format!("{what}: unknown or empty key {key:?}"));
                }
                if !valid_fs_tag(value) {
                    return Err(format!(
                        "{what}: tag={value:?}: 1 to {MAX_FS_TAG} letters, digits, '.', '_' or '-'"
                    ));
                }
                tag = Some(value.to_string());
                Ok(false)
            })?;
        if backend == Backend::Spawn {
            return Err(format!(
                "{what}: give socket=PATH or fd=N: cellvm does not start virtiofsd"
            ));
        }
        let tag =
            tag.ok_or_else(|| format!("{what}: tag=TAG is needed (the guest mounts by it)"))?;
        Ok(FsSpec {
            tag,
            backend,
            pid,
            counters,
        })
    }
}

/// Whether `tag` may name a virtio-fs share: 1 to 36 bytes of `[A-Za-z0-9._-]`.
pub fn valid_fs_tag(tag: &str) -> bool {
    (1..=MAX_FS_TAG).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

macro_rules! deserialize_from_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
/// A hugetlb page size for guest RAM: `2M` or `1G`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    Size2M,
    Size1G,
}

impl HugePages {
    /// The page size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            HugePages::Size2M => 2 << 20,
            HugePages::Size1G => 1 << 30,
        }
    }

    /// The directory name sysfs and the hugetlb cgroup files use for this size.
    pub fn sysfs_kib(self) -> u64 {
        self.bytes() >> 10
    }
}

impl std::fmt::Display for HugePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HugePages::Size2M => "2M",
            HugePages::Size1G => "1G",
        })
    }
}

impl std::str::FromStr for HugePages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "2M" | "2m" | "2MiB" => Ok(HugePages::Size2M),
            "1G" | "1g" | "1GiB" => Ok(HugePages::Size1G),
            _ => Err(format!("hugepages {s:?}: expected 2M or 1G")),
        }
    }
}

deserialize_from_str!(HugePages);
deserialize_from_str!(DiskSpec);
deserialize_from_str!(RngSpec);
deserialize_from_str!(NetSpec);
deserialize_from_str!(VsockSpec);
deserialize_from_str!(ConsoleSpec);
deserialize_from_str!(FsSpec);

/// A VM's configuration. Every field is optional in the file; flags override the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF (PVH or 64-bit Linux) or bzImage; none: the built-in test guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub serial: Option<SerialOut>,
    pub boot_protocol: Option<BootProtocol>,
    /// What a seccomp violation does (default: kill).
    pub seccomp: Option<crate::seccomp::Mode>,
    /// virtio-blk disks, in PCI slot order.
    pub disks: Option<Vec<DiskSpec>>,
    /// A virtio-rng device.
    pub rng: Option<RngSpec>,
    /// virtio-net devices, after the disks and the rng in PCI slot order.
    pub nets: Option<Vec<NetSpec>>,
    /// A virtio-vsock device, after the nets.
    pub vsock: Option<VsockSpec>,
    /// A virtio-console device (hvc0 and named ports), after the vsock.
    pub virtio_console: Option<ConsoleSpec>,
    /// virtio-fs shares, after the console.
    pub fs: Option<Vec<FsSpec>>,
    /// Guest RAM as private memory the kernel may merge with identical pages of other
    /// VMs (KSM). Device backends cannot share such RAM: no devices with it.
    pub ksm: Option<bool>,
    /// Where the kernel cannot seal guest RAM against execution (MFD_NOEXEC_SEAL, Linux
    /// 6.3 and later), run anyway with a logged warning instead of refusing. The jailer
    /// passes it only when the tenant policy approves the downgrade.
    pub allow_executable_ram: Option<bool>,
    /// Guest RAM from hugetlb pages of this size (a memfd with MFD_HUGETLB, shared with
    /// the device backends like ordinary RAM), reserved in full at start.
    pub hugepages: Option<HugePages>,
    /// Every page of guest RAM allocated at start (a slower start, no page faults
    /// later); hugepage RAM always is.
    pub prefault: Option<bool>,
    /// Guest RAM locked in host memory (mlock; implies prefault): never swapped. Needs
    /// RLIMIT_MEMLOCK of at least the RAM's size (the jailer sets it where the tenant
    /// policy allows `mlock`).
    pub mlock: Option<bool>,
    /// Guest RAM in this file (tmpfs, a DAX or persistent-memory file system, ...)
    /// instead of a memfd: empty (it is sized to the RAM) or exactly the RAM's size.
    pub memory_file: Option<PathBuf>,
    /// The same, as an inherited descriptor (the jailer opens the file).
    pub memory_file_fd: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
}

impl VmConfig {
    pub fn from_toml(path: &std::path::Path) -> Result<VmConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_toml(&text).map_err(|message| Error::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse_toml(text: &str) -> Result<VmConfig, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }

    /// Fields set in `over` replace those in `self`.
    pub fn merge(self, over: VmConfig) -> VmConfig {
        VmConfig {
            kernel: over.kernel.or(self.kernel),
            initrd: over.initrd.or(self.initrd),
            cmdline: over.cmdline.or(self.cmdline),
            cpus: over.cpus.or(self.cpus),
            memory_mib: over.memory_mib.or(self.memory_mib),
            serial: over.serial.or(self.serial),
            boot_protocol: over.boot_protocol.or(self.boot_protocol),
            seccomp: over.seccomp.or(self.seccomp),
            disks: over.disks.or(self.disks),
            rng: over.rng.or(self.rng),
            nets: over.nets.or(self.nets),
            vsock: over.vsock.or(self.vsock),
            virtio_console: over.virtio_console.or(self.virtio_console),
            fs: over.fs.or(self.fs),
            ksm: over.ksm.or(self.ksm),
            allow_executable_ram: over.allow_executable_ram.or(self.allow_executable_ram),
            hugepages: over.hugepages.or(self.hugepages),
            prefault: over.prefault.or(self.prefault),
            mlock: over.mlock.or(self.mlock),
            memory_file: over.memory_file.or(self.memory_file),
            memory_file_fd: over.memory_file_fd.or(self.memory_file_fd),
        }
    }

    pub fn cpus(&self) -> u32 {
        self.cpus.unwrap_or(DEFAULT_CPUS)
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB)
    }

    /// The command line the guest gets. The built-in test guest learns what to expect
    /// (memory, vCPUs) from its command line; cellvm adds those words unless given.
    pub fn effective_cmdline(&self) -> String {
        let mut cmdline = self.cmdline.clone().unwrap_or_default();
        if self.kernel.is_none() {
            for (key, value) in [
                ("expect_mem", self.memory_mib().to_string()),
                ("expect_cpus", self.cpus().to_string()),
            ] {
                if !cmdline
                    .split_whitespace()
                    .any(|w| w.starts_with(&format!("{key}=")))
                {
                    if !cmdline.is_empty() {
                        cmdline.push(' ');
                    }
                    cmdline.push_str(&format!("{key}={value}"));
                }
            }
        }
        cmdline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_specs_name_a_tag_and_a_backend_started_elsewhere() {
        let f: FsSpec = "tag=share,socket=/run/fs.sock".parse().unwrap();
        assert_eq!(f.tag, "share");
        assert_eq!(f.backend, Backend::Socket("/run/fs.sock".into()));
        let f: FsSpec = "fd=7,tag=a.b-c_d,pid=42".parse().unwrap();
        assert_eq!((f.backend, f.pid), (Backend::Fd(7), Some(42)));
        for bad in [
            "tag=share",
            "socket=/x",
            "tag=,socket=/x",
            "tag=a b,socket=/x",
            "tag=../x,socket=/x",
            "tag=share,socket=/x,fd=4",
            "tag=share,path=/x",
        ] {
            assert!(bad.parse::<FsSpec>().is_err(), "{bad:?} accepted");
        }
        let long = format!("tag={},socket=/x", "t".repeat(37));
        assert!(long.parse::<FsSpec>().is_err());
    }

    #[test]
    fn file_fields_parse_and_flags_override_them() {
        let file = VmConfig::parse_toml(
            "cpus = 2\nmemory_mib = 256\nserial = \"file=/tmp/x\"\ncmdline = \"a\"",
        )
        .unwrap();
        assert_eq!(file.serial, Some(SerialOut::File("/tmp/x".into())));
        let merged = file.merge(VmConfig {
            cpus: Some(4),
            ..Default::default()
        });
        assert_eq!((merged.cpus(), merged.memory_mib()), (4, 256));
        assert_eq!(merged.cmdline.as_deref(), Some("a"));
    }

    #[test]
    fn device_specs_parse_and_refuse_what_they_cannot_mean() {
        let d: DiskSpec = "path=/img,readonly=on,direct=on,queues=4".parse().unwrap();
        assert_eq!(
            d,
            DiskSpec {
                image: Some("/img".into()),
                format: block::header::Format::Raw,
                readonly: true,
                direct: true,
                queues: 4,
                backend: Backend::Spawn,
                pid: None,
                counters: None,
                key: None,
            }
        );
        let q: DiskSpec = "path=/i.qcow2,format=qcow2".parse().unwrap();
        assert_eq!(q.format, block::header::Format::Qcow2);
        let k: DiskSpec = "path=/i.qcow2,format=qcow2,key=/etc/k".parse().unwrap();
        assert_eq!(k.key.as_deref(), Some(std::path::Path::new("/etc/k")));
        assert!("path=/i.img,key=/etc/k".parse::<DiskSpec>().is_err());
        assert!("fd=5,key=/etc/k".parse::<DiskSpec>().is_err());
        assert!("path=/i,format=vmdk".parse::<DiskSpec>().is_err());
        assert!("socket=/s,format=qcow2".parse::<DiskSpec>().is_err());
        let d: DiskSpec = "socket=/run/x.sock".parse().unwrap();
        assert_eq!(d.backend, Backend::Socket("/run/x.sock".into()));
        assert_eq!("fd=5".parse::<DiskSpec>().unwrap().backend, Backend::Fd(5));
        assert!("fd=5,direct=on".parse::<DiskSpec>().is_err());
        assert_eq!(
            "fd=5,counters=6".parse::<DiskSpec>().unwrap().counters,
            Some(6)
        );
        assert!("path=/i,counters=6".parse::<DiskSpec>().is_err());
        assert!("fd=5,counters=1".parse::<DiskSpec>().is_err());
        assert!("fd=5,counters=x".parse::<NetSpec>().is_err());
        assert!("path=/i,direct=maybe".parse::<DiskSpec>().is_err());
        for bad in [
            "",
            "path=",
            "path=/a,socket=/b",
            "fd=1",
            "fd=x",
            "path=/a,queues=0",
            "path=/a,queues=17",
            "socket=/s,readonly=on",
            "path=/a,size=3",
            "readonly=on",
        ] {
            assert!(bad.parse::<DiskSpec>().is_err(), "{bad:?} accepted");
        }
        let c: ConsoleSpec = "hvc=/run/h.sock,port=org.test.0:/run/p.sock"
            .parse()
            .unwrap();
        assert_eq!(c.hvc.as_deref(), Some(std::path::Path::new("/run/h.sock")));
        assert_eq!(
            c.ports,
            [("org.test.0".to_string(), PathBuf::from("/run/p.sock"))]
        );
        assert_eq!(
            "fd=6".parse::<ConsoleSpec>().unwrap().backend,
            Backend::Fd(6)
        );
        for bad in [
            "port=a:/p",
            "hvc=/h,port=a/b:/p",
            "hvc=/h,port=a:",
            "hvc=/h,port=a:/p,port=a:/q",
            "hvc=/h,port=a:/1,port=b:/2,port=c:/3,port=d:/4",
            "fd=6,port=a:/p",
            "hvc=/h,fd=6",
        ] {
            assert!(bad.parse::<ConsoleSpec>().is_err(), "{bad:?} accepted");
        }
        assert_eq!("on".parse::<RngSpec>().unwrap().backend, Backend::Spawn);
        assert_eq!("fd=7".parse::<RngSpec>().unwrap().backend, Backend::Fd(7));
        assert!("off".parse::<RngSpec>().is_err());
        let r: RngSpec = "fd=7,pid=1234".parse().unwrap();
        assert_eq!((r.backend, r.pid), (Backend::Fd(7), Some(1234)));
        let d: DiskSpec = "fd=5,queues=2,pid=99".parse().unwrap();
        assert_eq!((d.queues, d.pid), (2, Some(99)));
        assert_eq!("fd=9,pid=3".parse::<NetSpec>().unwrap().pid, Some(3));
        for bad in [
            "fd=7,pid=0",
            "fd=7,pid=x",
            "pid=5",
            "fd=7,pid=99999999",
            "on,pid=3",
        ] {
            assert!(bad.parse::<RngSpec>().is_err(), "{bad:?} accepted");
        }
        assert!("path=/i,pid=4".parse::<DiskSpec>().is_err());
        let n: NetSpec = "tap=cv0,mac=02:00:00:00:00:07".parse().unwrap();
        assert_eq!(
            (n.tap.as_deref(), n.mac.as_deref(), n.backend),
            (Some("cv0"), Some("02:00:00:00:00:07"), Backend::Spawn)
        );
        assert_eq!("fd=9".parse::<NetSpec>().unwrap().backend, Backend::Fd(9));
        assert_eq!("tap=a,queues=2".parse::<NetSpec>().unwrap().queues, 2);
        assert_eq!("fd=9,queues=4".parse::<NetSpec>().unwrap().queues, 4);
        for bad in [
            "",
            "tap=",
            "tap=0123456789abcdef",
            "tap=a/b",
            "tap=a,socket=/s",
            "socket=/s,mac=02:00:00:00:00:01",
            "tap=a,mac=01:00:00:00:00:01",
            "tap=a,queues=0",
            "tap=a,queues=9",
        ] {
            assert!(bad.parse::<NetSpec>().is_err(), "{bad:?} accepted");
        }
        let v: VsockSpec = "cid=3,uds=/run/v.sock".parse().unwrap();
        assert_eq!(
            (v.cid, v.uds.as_deref(), v.backend),
            (
                Some(3),
                Some(std::path::Path::new("/run/v.sock")),
                Backend::Spawn
            )
        );
        assert_eq!("fd=8".parse::<VsockSpec>().unwrap().backend, Backend::Fd(8));
        for bad in [
            "",
            "cid=3",
            "uds=/v",
            "cid=2,uds=/v",
            "cid=4294967295,uds=/v",
            "cid=x,uds=/v",
            "cid=3,uds=",
            "cid=3,uds=/v,socket=/s",
            "fd=8,cid=3",
            "cid=3,uds=/v,port=1",
        ] {
            assert!(bad.parse::<VsockSpec>().is_err(), "{bad:?} accepted");
        }
        let c = VmConfig::parse_toml("disks = [\"path=/i\"]\nrng = \"on\"").unwrap();
        assert_eq!(c.disks.unwrap().len(), 1);
        assert!(VmConfig::parse_toml("disks = [\"path=/i,bogus=1\"]")
            .unwrap_err()
            .contains("bogus"));
    }

    #[test]
    fn unknown_fields_and_bad_serial_are_errors() {
        assert!(VmConfig::parse_toml("cpu = 2")
            .unwrap_err()
            .contains("unknown field"));
        assert!(VmConfig::parse_toml("serial = \"tcp\"")
            .unwrap_err()
            .contains("expected stdio"));
    }

    #[test]
    fn test_guest_gets_its_expectations_unless_given() {
        let c = VmConfig {
            cpus: Some(3),
            memory_mib: Some(64),
            cmdline: Some("tests=e820".into()),
            ..Default::default()
        };
        assert_eq!(
            c.effective_cmdline(),
            "tests=e820 expect_mem=64 expect_cpus=3"
        );
        let c = VmConfig {
            cmdline: Some("expect_mem=1".into()),
            ..Default::default()
        };
        assert_eq!(c.effective_cmdline(), "expect_mem=1 expect_cpus=1");
        let c = VmConfig {
            kernel: Some("k".into()),
            cmdline: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(c.effective_cmdline(), "x");
    }
}
