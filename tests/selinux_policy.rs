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

/// A host agent's domain, using cellvm.if as its policy would.
const AGENT_MODULE: &str = "policy_module(cellvmagent, 1.0)
type cellvm_test_agent_t;
domain_type(cellvm_test_agent_t)
cellvm_vsock_host_service(cellvm_test_agent_t)
cellvm_stream_connect(cellvm_test_agent_t)
";

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
        // A host agent's module, as an administrator would write one with cellvm.if's
        // interfaces: what they grant is checked below.
        std::fs::write(dir.join("cellvmagent.te"), AGENT_MODULE).unwrap();
        sh(Command::new("make")
            .args([
                "-f",
                "/usr/share/selinux/devel/Makefile",
                "cellvm.pp",
                "cellvmagent.pp",
            ])
            .current_dir(&dir));
        let out = Command::new("bzcat")
            .arg("/usr/share/selinux/default/base.pp.bz2")
            .output()
            .unwrap();
        std::fs::write(dir.join("base.pp"), out.stdout).unwrap();
        sh(Command::new("semodule_link")
            .args(["-o", "linked.lnk", "base.pp", "cellvm.pp", "cellvmagent.pp"])
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

/// Rules as (source, target, class, permissions), parsed from sesearch's output.
fn rules(args: &[&str]) -> Vec<(String, String, String, Vec<String>)> {
    sesearch(args)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("allow ")?;
            let (head, perms) = rest.split_once(':')?;
            let (src, tgt) = head.split_once(' ')?;
            let (class, perms) = perms.split_once(' ')?;
            let perms = perms.split(';').next()?;
            let perms = perms
                .trim()
                .trim_start_matches('{')
                .trim_end_matches('}')
                .split_whitespace()
                .map(str::to_string)
                .collect();
            Some((src.into(), tgt.into(), class.into(), perms))
        })
        .collect()
}

fn perms_on(source: &str, target: &str, class: &str) -> Vec<String> {
    rules(&["-A", "-s", source, "-t", target, "-c", class])
        .into_iter()
        .flat_map(|r| r.3)
        .collect()
}

#[test]
fn the_vmm_gets_kvm_and_its_kernel_and_the_jailer_can_exec_into_both_domains() {
    let kvm = perms_on("cellvm_t", "kvm_device_t", "chr_file");
    for p in ["open", "read", "write", "ioctl"] {
        assert!(kvm.iter().any(|k| k == p), "cellvm_t lacks {p} on /dev/kvm");
    }
    let kernel = perms_on("cellvm_t", "cellvm_content_t", "file");
    for p in ["open", "read", "map"] {
        assert!(
            kernel.iter().any(|k| k == p),
            "cellvm_t lacks {p} on kernels"
        );
    }
    assert!(!kernel.iter().any(|k| k == "write"), "{kernel:?}");
    assert!(perms_on("cellvm_t", "cellvm_exec_t", "file").contains(&"entrypoint".into()));
    assert!(
        perms_on("cellvm_device_t", "cellvm_device_exec_t", "file").contains(&"entrypoint".into())
    );
    for cell in ["cellvm_t", "cellvm_device_t"] {
        let p = perms_on("cellvm_jailer_t", cell, "process");
        assert!(p.contains(&"transition".into()), "{cell}: {p:?}");
    }
    let own = perms_on("cellvm_jailer_t", "cellvm_jailer_t", "process");
    assert!(own.contains(&"setexec".into()), "{own:?}");
}

#[test]
fn the_vmm_has_no_rule_on_any_disk_image_and_a_backend_uses_only_its_descriptor() {
    // The VMM never opens an image: not even a shared read-only one (s0, which MCS
    // alone would let every VM read).
    let vmm = rules(&["-A", "-s", "cellvm_t", "-t", "cellvm_image_t"]);
    assert!(vmm.is_empty(), "cellvm_t reaches images: {vmm:?}");
    // Control: the same query finds the blk backend's rule, read and write through the
    // descriptor it is handed, and no open.
    let blk = perms_on("cellvm_device_t", "cellvm_image_t", "file");
    for p in ["read", "write"] {
        assert!(
            blk.iter().any(|k| k == p),
            "cellvm_device_t lacks {p}: {blk:?}"
        );
    }
    assert!(!blk.iter().any(|k| k == "open"), "{blk:?}");
    // Nor may a backend open its tap's device (it gets the descriptor) or a kernel.
    assert!(!perms_on("cellvm_device_t", "tun_tap_device_t", "chr_file").contains(&"open".into()));
    assert!(rules(&["-A", "-s", "cellvm_device_t", "-t", "cellvm_content_t"]).is_empty());
}

#[test]
fn a_disk_key_is_read_by_the_backend_through_its_descriptor_and_by_no_vmm() {
    let vmm = rules(&["-A", "-s", "cellvm_t", "-t", "cellvm_secret_t"]);
    assert!(vmm.is_empty(), "cellvm_t reaches disk keys: {vmm:?}");
    // Control: the backend reads the key it is handed, and may open none.
    let blk = perms_on("cellvm_device_t", "cellvm_secret_t", "file");
    assert!(blk.contains(&"read".into()), "{blk:?}");
    assert!(!blk.contains(&"open".into()), "{blk:?}");
    // The jailer opens it for the backend and never reads it.
    let jailer = perms_on("cellvm_jailer_t", "cellvm_secret_t", "file");
    assert!(
        jailer.contains(&"open".into()) && !jailer.contains(&"read".into()),
        "{jailer:?}"
    );
}

#[test]
fn a_backend_cannot_open_kvm() {
    let dev = rules(&["-A", "-s", "cellvm_device_t", "-t", "kvm_device_t"]);
    assert!(dev.is_empty(), "cellvm_device_t reaches /dev/kvm: {dev:?}");
    // Control: the same query for the VMM finds its rule.
    assert!(perms_on("cellvm_t", "kvm_device_t", "chr_file").contains(&"open".into()));
}

#[test]
fn neither_cell_reaches_shadow_homes_or_var_lib() {
    for target in ["shadow_t", "user_home_t", "user_home_dir_t", "var_lib_t"] {
        for cell in ["cellvm_t", "cellvm_device_t"] {
            let r = rules(&["-A", "-s", cell, "-t", target]);
            assert!(r.is_empty(), "{cell} reaches {target}: {r:?}");
        }
        // Control: the same query form finds a domain that does reach it, through an
        // attribute (file_type) as much as by name.
        let others = rules(&["-A", "-t", target, "-c", "file"]);
        let (src, ..) = others
            .first()
            .unwrap_or_else(|| panic!("no domain at all reaches {target}"));
        assert!(
            !rules(&["-A", "-s", src, "-t", target]).is_empty(),
            "{src} -> {target}"
        );
    }
}

/// Process permissions `domain` has on other domains, beyond the notifications every
/// domain gets from the base policy (a child's exit, a liveness probe).
fn foreign_process_perms(domain: &str) -> Vec<(String, Vec<String>)> {
    rules(&["-A", "-s", domain, "-c", "process"])
        .into_iter()
        .filter(|r| r.1 != domain)
        .map(|r| {
            let perms: Vec<String> =
                r.3.into_iter()
                    .filter(|p| p != "sigchld" && p != "signull")
                    .collect();
            (r.1, perms)
        })
        .filter(|(_, perms)| !perms.is_empty())
        .collect()
}

#[test]
fn neither_cell_can_signal_trace_or_enter_another_domains_processes() {
    for cell in ["cellvm_t", "cellvm_device_t"] {
        let foreign = foreign_process_perms(cell);
        assert!(
            foreign.is_empty(),
            "{cell} acts on other domains: {foreign:?}"
        );
        let trace = rules(&["-A", "-s", cell, "-c", "process", "-p", "ptrace"]);
        assert!(trace.is_empty(), "{cell} may ptrace: {trace:?}");
        // Between the two cell domains: only the backend's use of descriptors the VMM
        // sends it (guest RAM, eventfds); no connectto, no signal, no file.
        let other = if cell == "cellvm_t" {
            "cellvm_device_t"
        } else {
            "cellvm_t"
        };
        for r in rules(&["-A", "-s", cell, "-t", other]) {
            assert!(
                r.0 == "cellvm_device_t" && r.2 == "fd" && r.3 == ["use"],
                "{cell} reaches {other}: {r:?}"
            );
        }
    }
    // Control: the jailer, which does act on the cells, is caught by the same check.
    let jailer = foreign_process_perms("cellvm_jailer_t");
    assert!(
        jailer
            .iter()
            .any(|(t, p)| t == "cellvm_t" && p.contains(&"sigkill".into())),
        "{jailer:?}"
    );
}

#[test]
fn the_vmm_has_no_access_to_other_domains_files() {
    // Rules written for cellvm_t itself (not those every domain gets from the base
    // policy) only name cellvm's own file types.
    let own = [
        "cellvm_exec_t",
        "cellvm_content_t",
        "cellvm_tmpfs_t",
        "cellvm_t",
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
                // /dev (for /dev/kvm) and the kernel's internal tmpfs, where its
                // guest RAM memfd is created as cellvm_tmpfs_t.
                own.contains(&target)
                    || (class == "dir" && ["device_t", "tmpfs_t"].contains(&target)),
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
    // Control: the jailer, which labels every VM's files, is not constrained, so the
    // same membership check can fail.
    assert!(
        !attr.lines().any(|l| l.trim() == "cellvm_jailer_t"),
        "{attr}"
    );
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
    // It covers every way a cell could reach another VM's image or guest RAM.
    for p in [
        "open", "read", "write", "append", "lock", "ioctl", "setattr",
    ] {
        assert!(
            rule.contains(&format!(" {p} ")),
            "{p} not constrained: {rule}"
        );
    }
    // And signals and ptrace between processes of different VMs.
    let constraints = sh(Command::new("seinfo")
        .args(["--constrain", "process", "-x"])
        .arg(policy()));
    let rule = constraints
        .lines()
        .find(|l| l.contains("mlsconstrain process") && l.contains(" ptrace "))
        .unwrap_or_else(|| panic!("no MCS process constraint:\n{constraints}"));
    for p in ["signal", "sigkill", "ptrace", "transition"] {
        assert!(rule.contains(&format!(" {p} ")), "{p}: {rule}");
    }
    assert!(
        rule.contains("h1 dom h2 or ( t1 != mcs_constrained_type )"),
        "{rule}"
    );
}

#[test]
fn the_file_contexts_label_every_binary_and_the_image_directories() {
    let fc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policy/selinux/cellvm.fc"),
    )
    .unwrap();
    for (path, ty) in [
        ("/usr/bin/cellvm-jailer", "cellvm_jailer_exec_t"),
        ("/usr/bin/cellvm", "cellvm_exec_t"),
        ("/usr/bin/cellvm-device", "cellvm_device_exec_t"),
        ("/var/lib/cellvm/images(/.*)?", "cellvm_image_t"),
        ("/etc/cellvm/secrets(/.*)?", "cellvm_secret_t"),
    ] {
        assert!(
            fc.lines()
                .any(|l| l.split_whitespace().next() == Some(path) && l.contains(ty)),
            "{path} is not labelled {ty}:\n{fc}"
        );
    }
}

#[test]
fn a_vsock_backend_reaches_host_services_only_through_its_run_directory_and_the_interface() {
    let own = perms_on("cellvm_device_t", "cellvm_device_t", "unix_stream_socket");
    for p in ["create", "connect", "read", "write"] {
        assert!(
            own.contains(&p.into()),
            "cellvm_device_t lacks {p} on its sockets: {own:?}"
        );
    }
    // The run directory: searched, never listed or written.
    let dir = perms_on("cellvm_device_t", "cellvm_runtime_t", "dir");
    assert_eq!(dir, ["search"], "{dir:?}");
    let sock = perms_on("cellvm_device_t", "cellvm_runtime_t", "sock_file");
    assert_eq!(sock, ["write"], "{sock:?}");
    assert!(perms_on("cellvm_device_t", "cellvm_runtime_t", "file").is_empty());
    // connectto only where an administrator's module says (the test agent's), and not
    // to any domain of the base policy.
    let to_agent = perms_on(
        "cellvm_device_t",
        "cellvm_test_agent_t",
        "unix_stream_socket",
    );
    assert!(to_agent.contains(&"connectto".into()), "{to_agent:?}");
    let targets: Vec<String> = rules(&[
        "-A",
        "-s",
        "cellvm_device_t",
        "-c",
        "unix_stream_socket",
        "-p",
        "connectto",
    ])
    .into_iter()
    .map(|r| r.1)
    .collect();
    for t in &targets {
        assert!(
            ["cellvm_test_agent_t", "cellvm_device_t"].contains(&t.as_str()),
            "cellvm_device_t may connect to {t}: {targets:?}"
        );
    }
    // The VMM has no such rule: its sockets all come from the jailer.
    assert!(!perms_on("cellvm_t", "cellvm_t", "unix_stream_socket").contains(&"connect".into()));
    // The agent's side: it binds vsock/port_P, and reaches the VM's own sockets.
    let agent_dir = perms_on("cellvm_test_agent_t", "cellvm_runtime_t", "dir");
    assert!(agent_dir.contains(&"add_name".into()), "{agent_dir:?}");
    let agent_conn = perms_on(
        "cellvm_test_agent_t",
        "cellvm_jailer_t",
        "unix_stream_socket",
    );
    assert!(agent_conn.contains(&"connectto".into()), "{agent_conn:?}");
}
