//! The two policy files and the check of one against the other. The tenant policy is
//! the administrator's; the VM spec is the tenant's and untrusted: anything it asks for
//! outside the policy is refused with `tenant T: vm V: FIELD = ASKED exceeds|violates
//! ALLOWED`.

use std::path::{Path, PathBuf};

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
    #[serde(default)]
    pub ksm: bool,
    /// How many virtio-blk disks one VM may have (each is a backend process).
    #[serde(default)]
    pub max_disks: u32,
    /// Whether the tenant's VMs may have a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    pub cgroup: CgroupLimits,
}

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
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub ksm: bool,
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
    /// A raw image beneath one of the tenant's image directories.
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// O_DIRECT: the backend bypasses the host page cache.
    #[serde(default)]
    pub direct: bool,
    #[serde(default = "one_queue")]
    pub queues: u16,
}

/// A virtio-net device of a VM spec: a tap the tenant policy grants; its backend runs in
/// a cell of its own and holds only the tap's descriptor.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    pub tap: String,
    /// The guest's MAC address; none: a random locally administered one.
    pub mac: Option<String>,
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

/// The most queues a disk may have (as `cellvm run` accepts).
pub const MAX_DISK_QUEUES: u16 = 16;

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
    #[error("tenant {tenant}: vm {vm}: {field} = {asked} {verb} {allowed}")]
    Violation {
        tenant: String,
        vm: String,
        field: String,
        asked: String,
        verb: &'static str,
        allowed: String,
    },
}

fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| Error::Parse {
        path: path.display().to_string(),
        message: e.message().to_string(),
    })
}

impl TenantPolicy {
    pub fn load(path: &Path) -> Result<TenantPolicy, Error> {
        let p: TenantPolicy = read(path)?;
        p.check()?;
        Ok(p)
    }

    pub fn parse(text: &str) -> Result<TenantPolicy, Error> {
        let p: TenantPolicy = toml::from_str(text).map_err(|e| Error::Parse {
            path: "<policy>".into(),
            message: e.message().to_string(),
        })?;
        p.check()?;
        Ok(p)
    }

    /// The policy's own consistency: ranges ordered, uids unprivileged, dirs absolute.
    fn check(&self) -> Result<(), Error> {
        let bad = |message: String| {
            Err(Error::BadPolicy {
                tenant: self.name.clone(),
                message,
            })
        };
        if !valid_name(&self.name) {
            return bad(format!(
                "name {:?} must be 1-32 characters of [a-z0-9_-]",
                self.name
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
        if let Some(d) = self.image_dirs.iter().find(|d| !d.is_absolute()) {
            return bad(format!("image_dirs entry {} is not absolute", d.display()));
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
                "taps entry {t:?} must be an interface name (or a prefix ending in *)"
            ));
        }
        if let Some(ns) = self.tap_netns.as_deref().filter(|n| !valid_netns(n)) {
            return bad(format!(
                "tap_netns {ns:?} must be a name under /run/netns (1-64 of [A-Za-z0-9_.-])"
            ));
        }
        if let Some(w) = self.cgroup.io_weight.filter(|w| !(10..=1000).contains(w)) {
            return bad(format!("cgroup io_weight {w} must be within 10..=1000"));
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl VmSpec {
    pub fn load(path: &Path) -> Result<VmSpec, Error> {
        read(path)
    }

    pub fn parse(text: &str) -> Result<VmSpec, Error> {
        toml::from_str(text).map_err(|e| Error::Parse {
            path: "<vm spec>".into(),
            message: e.message().to_string(),
        })
    }
}

/// Checks the spec against the policy. Paths are only checked lexically here (absolute,
/// inside an allowed directory); `paths::open_beneath` is what actually opens them.
pub fn check(policy: &TenantPolicy, spec: &VmSpec) -> Result<(), Error> {
    let violation = |field: &str, asked: String, verb: &'static str, allowed: String| {
        Err(Error::Violation {
            tenant: policy.name.clone(),
            vm: spec.name.clone(),
            field: field.to_string(),
            asked,
            verb,
            allowed,
        })
    };
    if !valid_name(&spec.name) {
        return violation(
            "name",
            format!("{:?}", spec.name),
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
    for (field, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if let Some(p) = path {
            if crate::paths::allowed_dir(&policy.image_dirs, p).is_none() {
                return violation(
                    field,
                    p.display().to_string(),
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
    // Hugepage-backed RAM is not part of this cellvm yet: refused rather than ignored.
    if spec.hugepages {
        return violation(
            "hugepages",
            "true".into(),
            "violates",
            "what this cellvm supports (no hugepage-backed guest RAM yet)".into(),
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
    if spec.disks.len() as u64 > policy.max_disks as u64 {
        return violation(
            "disks",
            format!("{} entries", spec.disks.len()),
            "exceeds",
            format!("the tenant limit max_disks = {}", policy.max_disks),
        );
    }
    for (i, d) in spec.disks.iter().enumerate() {
        if crate::paths::allowed_dir(&policy.image_dirs, &d.path).is_none() {
            return violation(
                &format!("disks[{i}].path"),
                d.path.display().to_string(),
                "violates",
                format!("image_dirs {:?}", policy.image_dirs),
            );
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
    for (i, n) in spec.nets.iter().enumerate() {
        if !valid_ifname(&n.tap) || !tap_granted(&policy.taps, &n.tap) {
            return violation(
                &format!("nets[{i}].tap"),
                format!("{:?}", n.tap),
                "violates",
                format!("the tenant's taps {:?}", policy.taps),
            );
        }
        if spec.nets[..i].iter().any(|o| o.tap == n.tap) {
            return violation(
                &format!("nets[{i}].tap"),
                format!("{:?}", n.tap),
                "violates",
                "one device per tap".into(),
            );
        }
        if let Some(mac) = n.mac.as_deref().filter(|m| !valid_mac(m)) {
            return violation(
                &format!("nets[{i}].mac"),
                format!("{mac:?}"),
                "violates",
                "a unicast address like 02:00:00:00:00:01".into(),
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
    Ok(())
}

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
}
