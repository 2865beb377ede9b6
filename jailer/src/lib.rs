//! cellvm-jailer's parts, one module per layer (the binary in main.rs drives them).
//! A library so that fuzz targets and tests reach the parsers directly.

pub mod cell;
pub mod cgroup;
pub mod gc;
pub mod identity;
pub mod landlock;
pub mod launch;
pub mod mcs;
pub mod namespaces;
pub mod paths;
pub mod policy;
pub mod registry;
pub mod selinux;
pub mod supervise;
pub mod tap;

/// Entry points for the fuzz targets (fuzz/fuzz_targets/tenant_policy.rs, mcs_label.rs),
/// replayed by `cargo test` like the VMM's.
pub mod fuzzing {
    use crate::mcs::McsPair;
    use crate::policy::{check, TenantPolicy, VmSpec};

    /// Arbitrary text as a tenant policy and as a VM spec (the input split at the first
    /// NUL byte), then the check of one against the other. Refusals are fine; a panic,
    /// or a spec that passes while asking for more than the policy allows, is a bug.
    pub fn tenant_policy(data: &[u8]) {
        let mut parts = data.splitn(2, |b| *b == 0);
        let (Ok(p), Ok(v)) = (
            std::str::from_utf8(parts.next().unwrap_or(&[])),
            std::str::from_utf8(parts.next().unwrap_or(&[])),
        ) else {
            return;
        };
        let (Ok(policy), Ok(spec)) = (TenantPolicy::parse(p), VmSpec::parse(v)) else {
            return;
        };
        if check(&policy, &spec).is_ok() {
            assert!(spec.vcpus >= 1 && spec.vcpus <= policy.max_vcpus);
            assert!(spec.memory_mib <= policy.max_memory_mib);
            for path in spec.kernel.iter().chain(spec.initrd.iter()) {
                assert!(crate::paths::allowed_dir(&policy.image_dirs, path).is_some());
            }
            assert!(spec.disks.is_empty() && spec.nets.is_empty() && !spec.rng);
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
