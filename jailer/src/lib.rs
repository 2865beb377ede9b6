//! cellvm-jailer's parts, one module per layer (the binary in main.rs drives them).
//! A library so that fuzz targets and tests reach the parsers directly.

pub mod cell;
pub mod cgroup;
pub mod console;
pub mod gc;
pub mod identity;
pub mod landlock;
pub mod launch;
pub mod mcs;
pub mod namespaces;
pub mod paths;
pub mod policy;
pub mod registry;
pub mod rundir;
pub mod selinux;
pub mod supervise;
pub mod tap;

/// Entry points for the fuzz targets (fuzz/fuzz_targets/tenant_policy.rs, mcs_label.rs),
/// replayed by `cargo test` like the VMM's. Behind the `fuzzing` feature: never in the
/// shipped jailer.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use crate::mcs::McsPair;
    use crate::policy::{check, TenantPolicy, VmSpec};

    /// Arbitrary text as a tenant policy and as a VM spec (the input split at the first
    /// NUL byte), then everything the root jailer does with them before it opens a
    /// file: the policy's own check, the spec's check against it. Refusals are fine if
    /// they are one clean line; a panic, a refusal carrying control bytes, or a spec
    /// that passes while asking for more than the policy allows, is a bug.
    pub fn tenant_policy(data: &[u8]) {
        let mut parts = data.splitn(2, |b| *b == 0);
        let (Ok(p), Ok(v)) = (
            std::str::from_utf8(parts.next().unwrap_or(&[])),
            std::str::from_utf8(parts.next().unwrap_or(&[])),
        ) else {
            return;
        };
        let policy = match TenantPolicy::parse(p) {
            Ok(policy) => policy,
            Err(e) => return assert_clean(&e.to_string()),
        };
        let spec = match VmSpec::parse(v) {
            Ok(spec) => spec,
            Err(e) => return assert_clean(&e.to_string()),
        };
        match check(&policy, &spec) {
            Err(e) => assert_clean(&e.to_string()),
            Ok(()) => assert_within(&policy, &spec),
        }
    }

    /// A refusal is printed to the operator: one line, no control bytes.
    fn assert_clean(message: &str) {
        assert!(
            !message.chars().any(char::is_control),
            "control bytes in {message:?}"
        );
    }

    /// What an accepted spec may have: nothing outside the policy.
    fn assert_within(policy: &TenantPolicy, spec: &VmSpec) {
        use crate::paths::allowed_dir;
        use crate::policy::{block_device_granted, valid_ifname, valid_mac};
        assert!(spec.vcpus >= 1 && spec.vcpus <= policy.max_vcpus);
        assert!(spec.memory_mib <= policy.max_memory_mib);
        assert!(spec.cmdline.len() <= crate::policy::CMDLINE_MAX);
        assert!(spec.cmdline.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        assert!(!spec.hugepages, "hugepage-backed RAM is not supported");
        assert!(!spec.ksm || policy.ksm);
        assert!(!spec.rng || policy.rng);
        for path in spec.kernel.iter().chain(spec.initrd.iter()) {
            assert!(allowed_dir(&policy.image_dirs, path).is_some());
        }
        assert!(spec.disks.len() <= policy.max_disks as usize);
        let devices = spec.disks.len() + spec.nets.len() + usize::from(spec.rng);
        assert!(devices <= crate::policy::MAX_PCI_DEVICES);
        for d in &spec.disks {
            assert!(
                allowed_dir(&policy.image_dirs, &d.path).is_some()
                    || block_device_granted(&policy.block_devices, &d.path)
            );
            assert!((1..=crate::policy::MAX_DISK_QUEUES).contains(&d.queues));
        }
        for (i, n) in spec.nets.iter().enumerate() {
            assert!(valid_ifname(&n.tap));
            assert!(policy.taps.iter().any(|t| match t.strip_suffix('*') {
                Some(prefix) => n.tap.starts_with(prefix),
                None => *t == n.tap,
            }));
            assert!(
                spec.nets[..i].iter().all(|o| o.tap != n.tap),
                "duplicate tap"
            );
            assert!(n.mac.as_deref().is_none_or(valid_mac));
        }
    }

    /// MCS pair parsing: whatever parses prints back to the same text and labels.
    pub fn mcs_label(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(pair) = text.parse::<McsPair>() {
            assert_eq!(pair.to_string().parse::<McsPair>(), Ok(pair));
            assert!(pair.process_label().ends_with(&pair.to_string()));
        }
        if let [a, b] = data {
            let n = McsPair::all_in(*a as u16, *b as u16).take(300).count();
            assert!(n <= 300);
        }
    }
}
