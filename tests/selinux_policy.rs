//! The SELinux module in policy/selinux compiles against the reference policy
//! (Debian's selinux-policy-dev, checkmodule), links with Debian's base policy into a
//! full binary policy, and says what it should: checked with setools (sesearch, seinfo).
//! SELinux is not enabled on our hosts, so enforcement itself cannot be observed here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (tests/setup.sh installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds cellvm.pp with the refpolicy devel Makefile, then links it with base.pp and
/// expands the result to a binary policy. Done once per test run.
fn policy() -> &'static PathBuf {
    static POLICY: OnceLock<PathBuf> = OnceLock::new();
    POLICY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cellvm-selinux-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy/selinux");
        for f in ["cellvm.te", "cellvm.if", "cellvm.fc"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        sh(Command::new("make")
            .args(["-f", "/usr/share/selinux/devel/Makefile", "cellvm.pp"])
            .current_dir(&dir));
        let out = Command::new("bzcat")
            .arg("/usr/share/selinux/default/base.pp.bz2")
            .output()
            .unwrap();
        std::fs::write(dir.join("base.pp"), out.stdout).unwrap();
        sh(Command::new("semodule_link")
            .args(["-o", "linked.lnk", "base.pp", "cellvm.pp"])
            .current_dir(&dir));
        sh(Command::new("semodule_expand")
            .args(["linked.lnk", "policy.bin"])
            .current_dir(&dir));
        dir.join("policy.bin")
    })
}

fn sesearch(args: &[&str]) -> String {
    sh(Command::new("sesearch").args(args).arg(policy()))
}

fn rule_has(rules: &str, target: &str, class: &str, perms: &[&str]) {
    let line = rules
        .lines()
        .find(|l| l.contains(&format!(" {target}:{class} ")))
        .unwrap_or_else(|| panic!("no rule to {target}:{class} in:\n{rules}"));
    for p in perms {
        assert!(line.contains(p), "{line} lacks {p}");
    }
}

#[test]
fn the_module_compiles_against_the_reference_policy_and_links_with_base() {
    let info = sh(Command::new("seinfo").arg(policy()));
    assert!(info.contains("MLS enabled"), "{info}");
    for t in [
        "cellvm_jailer_t",
        "cellvm_t",
        "cellvm_device_t",
        "cellvm_image_t",
        "cellvm_exec_t",
        "cellvm_runtime_t",
    ] {
        let found = sh(Command::new("seinfo").args(["-t", t]).arg(policy()));
        assert!(
            found.contains("Types: 1") && found.lines().any(|l| l.trim() == t),
            "type {t} missing: {found}"
        );
    }
}

#[test]
fn the_vmm_gets_kvm_and_its_images_and_the_jailer_can_exec_into_it() {
    let vmm = sesearch(&["-A", "-s", "cellvm_t"]);
    rule_has(
        &vmm,
        "kvm_device_t",
        "chr_file",
        &["open", "read", "write", "ioctl"],
    );
    rule_has(
        &vmm,
        "cellvm_image_t",
        "file",
        &["open", "read", "write", "map"],
    );
    rule_has(&vmm, "cellvm_exec_t", "file", &["entrypoint"]);
    let jailer = sesearch(&[
        "-A",
        "-s",
        "cellvm_jailer_t",
        "-t",
        "cellvm_t",
        "-c",
        "process",
    ]);
    assert!(jailer.contains("transition"), "{jailer}");
    let jailer = sesearch(&[
        "-A",
        "-s",
        "cellvm_jailer_t",
        "-c",
        "process",
        "-t",
        "cellvm_jailer_t",
    ]);
    assert!(jailer.contains("setexec"), "{jailer}");
    // Backends are narrower than the VMM: no /dev/kvm.
    assert!(
        sesearch(&["-A", "-s", "cellvm_device_t", "-t", "kvm_device_t"])
            .trim()
            .is_empty()
    );
}

#[test]
fn the_vmm_has_no_access_to_other_domains_files() {
    // Rules written for cellvm_t itself (not those every domain gets from the base
    // policy) only name cellvm's own file types.
    let own = [
        "cellvm_exec_t",
        "cellvm_image_t",
        "cellvm_t",
        "cellvm_runtime_t",
    ];
    for class in ["file", "dir", "lnk_file", "sock_file"] {
        for line in sesearch(&["-A", "-s", "cellvm_t", "-c", class])
            .lines()
            .filter(|l| l.starts_with("allow cellvm_t "))
        {
            let target = line
                .split_whitespace()
                .nth(2)
                .unwrap()
                .split(':')
                .next()
                .unwrap();
            assert!(
                own.contains(&target) || (class == "dir" && target == "device_t"),
                "cellvm_t reaches {target}: {line}"
            );
        }
    }
    for foreign in [
        "shadow_t",
        "user_home_t",
        "etc_t",
        "var_log_t",
        "sysfs_t",
        "user_home_dir_t",
    ] {
        let rules = sesearch(&[
            "-A", "-s", "cellvm_t", "-t", foreign, "-c", "file", "-p", "write",
        ]);
        assert!(
            rules.trim().is_empty(),
            "cellvm_t may write {foreign}: {rules}"
        );
    }
}

#[test]
fn mcs_constrains_the_vmm_and_backends_to_their_own_categories() {
    let attr = sh(Command::new("seinfo")
        .args(["-a", "mcs_constrained_type", "-x"])
        .arg(policy()));
    for t in ["cellvm_t", "cellvm_device_t"] {
        assert!(
            attr.lines().any(|l| l.trim() == t),
            "{t} is not MCS-constrained:\n{attr}"
        );
    }
    // The reference policy's constraint that makes that matter: reading or writing a
    // file needs the process's categories to dominate the file's.
    let constraints = sh(Command::new("seinfo")
        .args(["--constrain", "file", "-x"])
        .arg(policy()));
    let rule = constraints
        .lines()
        .find(|l| l.contains("mlsconstrain file") && l.contains(" read ") && l.contains(" write "))
        .unwrap_or_else(|| panic!("no MCS read/write constraint:\n{constraints}"));
    assert!(
        rule.contains("h1 dom h2 or ( t1 != mcs_constrained_type )"),
        "{rule}"
    );
}
