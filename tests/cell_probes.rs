//! Escape probes (`cellvm-probe`, a test-only program) run in the exact cell of each
//! role (the VMM, and the blk, net and rng backends) through `cellvm-jailer launch
//! --probe NAME --probe-in ROLE --probe-binary cellvm-probe`: with every layer, without
//! seccomp, without seccomp and Landlock; and each one outside any cell as its positive
//! control, which must succeed (or fail for a different, stated reason).

mod common;
use common::{bin, repo, test_policy};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const ROLES: [&str; 4] = ["vmm", "blk", "net", "rng"];

#[path = "probe/src/probes.rs"]
mod probes;
use probes::PROBES;

fn unique(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellvm-cell-probes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The example's image directory (tests/setup.sh makes it and its disk).
const IMAGES: &str = "/var/lib/cellvm/images/example";

/// A regular, executable file (a copy of cellvm-probe, mode 0755) in the tenant's image
/// directory: the "kernel" of the probe spec, so `/kernel` in the VMM's jail is a file
/// that execve would run if nothing stopped it.
fn executable_kernel() -> PathBuf {
    let p = Path::new(IMAGES).join(format!("probe-kernel-{}", std::process::id()));
    // Copies left by earlier runs of this test binary (whose pid is gone) go.
    for e in std::fs::read_dir(IMAGES).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("probe-kernel-") {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    common::executable_copy("cellvm-probe", &p);
    p
}

/// The example VM (blk, rng, net) with the executable kernel and a writable disk of its
/// own (a writable image is locked: probes running at once cannot share the example's),
/// removed when dropped.
struct ProbeSpec {
    spec: PathBuf,
    disk: PathBuf,
}

impl ProbeSpec {
    fn new() -> ProbeSpec {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let spec = scratch().join(format!("vm-{n}.toml"));
        let disk = Path::new(IMAGES).join(format!("probe-disk-{}-{n}.img", std::process::id()));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let example = std::fs::read_to_string(repo("policy/vms/example.toml")).unwrap();
        let shared = "/var/lib/cellvm/images/example/disk.img";
        assert!(example.contains(shared));
        let text = format!(
            "{}\nkernel = \"{}\"\n",
            example.replace(shared, disk.to_str().unwrap()),
            executable_kernel().display()
        );
        std::fs::write(&spec, text).unwrap();
        ProbeSpec { spec, disk }
    }
}

impl Drop for ProbeSpec {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.disk);
    }
}

fn assert_nothing_left(id: &str) {
    common::assert_cell_gone(id);
}

fn launch(policy: &Path, id: &str, extra: &[&str]) -> common::Outcome {
    let spec = ProbeSpec::new();
    let mut c = Command::new(bin("cellvm-jailer"));
    c.args(["launch", "--id", id, "--policy"])
        .arg(policy)
        .arg("--vm")
        .arg(&spec.spec)
        .arg("--vmm")
        .arg(bin("cellvm"))
        .args(extra);
    common::run(c, LIMIT)
}

/// Runs probe `name` in the cell of `role`, with the layers `without` left out.
fn in_cell(role: &str, name: &str, without: &[&str]) -> common::Outcome {
    let id = unique(&format!("pr-{role}-{name}-{}", without.join("-")));
    let probe = bin("cellvm-probe");
    let mut extra = vec![
        "--probe",
        name,
        "--probe-in",
        role,
        "--probe-binary",
        probe.to_str().unwrap(),
    ];
    for w in without {
        extra.extend(["--without", w]);
    }
    // The example VM has a tap: each launch gets a namespace and tap of its own.
    let ns = common::NetNs::new("probe");
    let out = launch(&test_policy(&ns.name), &id, &extra);
    assert_nothing_left(&id);
    out
}

/// The probe's report (`PROBE NAME ...` without the prefix).
fn report<'a>(name: &str, out: &'a common::Outcome) -> &'a str {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("PROBE {name} ")))
        .unwrap_or_else(|| panic!("{name}: no report: {}{}", out.stdout, out.stderr))
}

#[test]
fn test_switches_are_refused_unless_the_tenant_policy_allows_them() {
    let probe = bin("cellvm-probe");
    let p = probe.to_str().unwrap();
    for extra in [
        &["--probe", "mount", "--probe-binary", p][..],
        &["--without", "seccomp"][..],
    ] {
        let id = unique("switch");
        let out = launch(&repo("policy/tenants/example.toml"), &id, extra);
        assert_eq!(out.code, Some(2), "{extra:?}: {}", out.stderr);
        assert!(
            out.stderr
                .contains("test switches; the tenant policy does not allow them"),
            "{}",
            out.stderr
        );
        assert!(out.stdout.is_empty());
        assert_nothing_left(&id);
    }
}

/// A compromised blk backend cannot grow its image: pwrite is what it serves the guest
/// with, so seccomp lets it through, and RLIMIT_FSIZE at the image's size stops a write
/// past the end (SIGXFSZ is ignored in the cell: the write fails); fallocate's growing
/// mode, which seccomp kills, meets the same limit without seccomp. Outside a cell both
/// succeed (the probe shrinks the image back).
#[test]
fn a_blk_backend_cannot_grow_its_image() {
    assert_eq!(
        report("pwrite-past-end", &in_cell("blk", "pwrite-past-end", &[])),
        "denied EFBIG"
    );
    for without in [&["seccomp"][..], &["seccomp", "landlock"][..]] {
        let out = in_cell("blk", "fallocate-grow", without);
        assert_eq!(
            report("fallocate-grow", &out),
            "denied EFBIG",
            "{without:?}"
        );
    }
    let img = std::env::temp_dir().join(format!("cellvm-grow-{}", std::process::id()));
    for name in ["pwrite-past-end", "fallocate-grow"] {
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(1 << 20).unwrap();
        let mut c = Command::new(bin("cellvm-probe"));
        c.args([
            name,
            "--role",
            "blk",
            "--seccomp",
            "off",
            "--landlock",
            "off",
            "--fd",
            "3",
        ]);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        // SAFETY: dup2 and fcntl in the child before exec, onto descriptor 3, which it
        // then owns.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
                // dup2 onto itself keeps close-on-exec: clear it for that case too.
                if libc::dup2(fd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        assert_eq!(report(name, &common::run(c, LIMIT)), "allowed", "{name}");
    }
    let _ = std::fs::remove_file(&img);
}

/// With every layer on, seccomp kills each probe (SIGSYS) before its call runs, in
/// every role (the VMM's probe under a vCPU thread's profile), except the memory hog,
/// which the cgroup's memory.max kills.
#[test]
fn every_probe_is_stopped_in_the_full_cell_of_every_role() {
    for role in ROLES {
        for name in PROBES.iter().chain(if role == "blk" {
            &["fallocate-grow"][..]
        } else {
            &[][..]
        }) {
            let out = in_cell(role, name, &[]);
            let expect = if *name == "allocate-past-memory-max" {
                128 + libc::SIGKILL
            } else {
                128 + libc::SIGSYS
            };
            assert_eq!(
                out.code,
                Some(expect),
                "{role} {name}: {}{}",
                out.stdout,
                out.stderr
            );
            assert!(
                !out.stdout.contains("allowed"),
                "{role} {name}: {}",
                out.stdout
            );
        }
    }
}

/// What stops each probe once seccomp is left out, in every role: the second layer.
/// (Probes with no second layer here are listed in `single_layer`, with why.)
fn second_layer(role: &str, name: &str) -> Option<&'static str> {
    let backend = role != "vmm";
    Some(match name {
        "open-host-file" => "denied ENOENT",       // the jail: no /etc
        "open-via-proc-root" => "denied ENOENT",   // the jail: no /proc
        "open-dev-mem" => "denied ENOENT",         // the jail: no host device nodes
        "write-other-vm-image" => "denied ENOENT", // the jail: no image directories
        "open-other-vm-memfd" => "denied ENOENT",  // the jail: no /proc
        "write-jail-file" => "denied EROFS",       // the jail's root is read-only
        "mount" => "denied EPERM",                 // no capabilities
        "setuid-root" => "denied EPERM",           // no capabilities
        "raise-rlimit" => "denied EPERM",          // no CAP_SYS_RESOURCE
        // VMM: /kernel is a regular executable file on a noexec mount, under
        // Landlock without the execute right; a backend's jail has no file at all.
        "exec-kernel-image" if backend => "denied ENOENT",
        "exec-kernel-image" => "denied EACCES",
        "connect-inet" => "denied ENETUNREACH", // an empty network namespace
        "mknod" => "denied EROFS",              // read-only root (and no CAP_MKNOD)
        "bpf" => "denied EPERM",                // no CAP_BPF
        "perf-event-open" => "denied EACCES",   // no CAP_PERFMON, perf_event_paranoid
        "ptrace-other-process" => "denied EPERM", // non-dumpable target, no CAP_SYS_PTRACE
        "signal-other-processes" => "denied ESRCH", // alone in its pid namespace
        "read-other-process-memory" => "denied ESRCH (no parent in this pid namespace)",
        "mprotect-guest-ram-exec" => "denied EACCES", // PR_SET_MDWE
        "connect-other-vm-socket" => "denied ENOENT", // the jail: no run directories
        "kvm-ioctl" if backend => "denied ENOENT",    // a backend's jail has no /dev/kvm
        "io-uring-setup" => "denied ENOMEM",          // RLIMIT_MEMLOCK = 0 for the rings
        "userfaultfd" => "denied EPERM", // vm.unprivileged_userfaultfd = 0, no CAP_SYS_PTRACE
        "write-proc-attr" => "denied ENOENT", // the jail: no /proc
        // The kernel refuses a new user namespace to a chrooted caller, and every cell
        // is chrooted into its jail's subdirectory.
        "unshare-user-ns" => "denied EPERM",
        // vm.memfd_noexec = 2 in the cell's pid namespace: no memfd is executable.
        "memfd-execveat" => "denied EACCES",
        // A session of its own and no terminal on fds 0-2: nothing to push input into.
        "tiocsti" => "denied ENOTTY",
        _ => return None,
    })
}

/// Probes that only seccomp stops on this host, and why there is no second layer.
/// Asserted: each of these needs seccomp, so `second_layer` must not claim one.
const SINGLE_LAYER: &[(&str, &str)] = &[
    ("keyctl", "keyrings have no per-process switch but seccomp and the SELinux key class (SELinux is off here)"),
    ("map-guest-ram-exec", "MDWE allows a fresh read+execute mapping of a file; SELinux's execute permission on the memfd's type would be the second layer (SELinux is off here)"),
    ("load-module", "this kernel has no module support (ENOSYS before any permission check)"),
    ("kvm-ioctl", "the VMM's cell holds /dev/kvm by design"),
];

/// Defence in depth: with seccomp left out, another layer stops each probe, in every
/// role; the same with Landlock left out too (the VMM's exec then stops at noexec).
#[test]
fn without_seccomp_a_second_layer_stops_each_probe_in_every_role() {
    for role in ROLES {
        for name in PROBES {
            if SINGLE_LAYER
                .iter()
                .any(|(n, _)| n == name && (*n != "kvm-ioctl" || role == "vmm"))
            {
                assert!(second_layer(role, name).is_none(), "{role} {name}");
                continue;
            }
            let expect = match *name {
                "fork-past-pids-max" | "allocate-past-memory-max" => continue,
                _ => second_layer(role, name).unwrap_or_else(|| panic!("{role} {name}")),
            };
            for without in [&["seccomp"][..], &["seccomp", "landlock"][..]] {
                let out = in_cell(role, name, without);
                assert_eq!(
                    out.code,
                    Some(0),
                    "{role} {name} {without:?}: {}",
                    out.stderr
                );
                assert_eq!(report(name, &out), expect, "{role} {name} {without:?}");
            }
        }
    }
}

/// Without seccomp, pids.max = 64 (and RLIMIT_NPROC) ends a fork bomb and memory.max a
/// memory hog, in the VMM's cell.
#[test]
fn without_seccomp_the_cgroup_stops_fork_and_memory_hogs() {
    let out = in_cell("vmm", "fork-past-pids-max", &["seccomp"]);
    let line = report("fork-past-pids-max", &out);
    let forks: u32 = line
        .strip_prefix("denied EAGAIN after ")
        .and_then(|n| n.strip_suffix(" forks"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!((32..64).contains(&forks), "{line}");
    let out = in_cell("vmm", "allocate-past-memory-max", &["seccomp"]);
    assert_eq!(
        out.code,
        Some(128 + libc::SIGKILL),
        "memory.max kills the hog"
    );
}

/// Runs `cellvm-probe NAME --role ROLE` outside any cell, with no seccomp and no
/// Landlock, and `hardening` (non-dumpable, MDWE) as asked; `uid`: as that user.
fn outside(name: &str, role: &str, uid: Option<u32>, hardening: bool, extra: &[&str]) -> String {
    use std::os::unix::process::CommandExt;
    // A copy any user may run (the build tree need not be readable by them).
    let probe = scratch().join("cellvm-probe");
    common::executable_copy("cellvm-probe", &probe);
    let mut c = Command::new(&probe);
    c.args([
        name,
        "--role",
        role,
        "--seccomp",
        "off",
        "--landlock",
        "off",
    ])
    .args(["--hardening", if hardening { "on" } else { "off" }])
    .args(extra);
    if let Some(u) = uid {
        // std drops root's supplementary groups (setgroups(0)) when it sets the uid.
        c.uid(u).gid(u);
    }
    let out = common::run(c, LIMIT);
    assert_eq!(out.code, Some(0), "{name} outside: {}", out.stderr);
    report(name, &out).to_string()
}

/// The positive controls: each probe, run as root outside any cell, gets through (or
/// fails for the reason stated, which is not the cell's).
#[test]
fn every_probe_succeeds_outside_a_cell() {
    let dir = scratch();
    let image = dir.join("other-vm.img");
    std::fs::write(&image, [0u8; 512]).unwrap();
    let kernel = executable_kernel();
    let sock_path = dir.join("other-vm.sock");
    let _ = std::fs::remove_file(&sock_path);
    let _listener = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    let path = |p: &Path| vec!["--path".to_string(), p.to_str().unwrap().to_string()];
    let cap_sys_resource = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0 /* CAP_SYS_RESOURCE */);
    for name in PROBES {
        let extra: Vec<String> = match *name {
            "write-other-vm-image" => path(&image),
            "exec-kernel-image" => path(&kernel),
            "connect-other-vm-socket" => path(&sock_path),
            // Neither harmless outside a cell nor needed: the cgroup tests show them.
            "fork-past-pids-max" | "allocate-past-memory-max" => continue,
            // Needs a namespace or a terminal: below.
            "mount" | "connect-inet" | "tiocsti" => continue,
            _ => Vec::new(),
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let got = outside(name, "vmm", None, false, &extra);
        let expect = match *name {
            // This host's root has no CAP_SYS_RESOURCE (a container); where it has,
            // the raise goes through.
            "raise-rlimit" if !cap_sys_resource => "denied EPERM",
            // This host's device policy refuses the raw disk even to root: EPERM, not
            // the cell's ENOENT (the node exists here).
            "open-dev-mem" => "denied EPERM",
            // The kernel has no module support: ENOSYS for everyone.
            "load-module" => "denied ENOSYS",
            // Access granted; the address read is not mapped in the other process.
            "read-other-process-memory" => "denied EFAULT",
            // The exec was permitted; only the script's interpreter is missing.
            "memfd-execveat" => "denied ENOENT",
            // Opened; with SELinux off no LSM takes the write.
            "write-proc-attr" => "opened, write denied EINVAL",
            _ => "allowed",
        };
        assert_eq!(got, expect, "{name} outside a cell");
    }
    let _ = std::fs::remove_file(&sock_path);
}

/// mount over / in a private mount namespace of its own: root may.
#[test]
fn mount_succeeds_outside_a_cell() {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private"])
        .arg(bin("cellvm-probe"))
        .args([
            "mount",
            "--role",
            "vmm",
            "--seccomp",
            "off",
            "--hardening",
            "off",
        ]);
    let out = common::run(c, LIMIT);
    assert_eq!(report("mount", &out), "allowed");
}

/// connect to the tenant network's host end from its namespace: the connection is
/// permitted and refused by the peer (nothing listens), where the cell has no route.
#[test]
fn connect_inet_reaches_the_network_outside_a_cell() {
    let ns = common::NetNs::new("probe-ctl");
    let mut c = Command::new(bin("cellvm-probe"));
    c.args([
        "connect-inet",
        "--role",
        "vmm",
        "--seccomp",
        "off",
        "--hardening",
        "off",
    ]);
    ns.wrap(&mut c);
    let out = common::run(c, LIMIT);
    assert_eq!(report("connect-inet", &out), "denied ECONNREFUSED");
}

/// Landlock alone (a backend's own ruleset, no seccomp, no jail) stops the exec of a
/// regular executable file that runs without it.
#[test]
fn a_backend_landlock_alone_stops_exec() {
    let kernel = executable_kernel();
    let k = kernel.to_str().unwrap();
    let run = |landlock: &str| {
        let mut c = Command::new(bin("cellvm-probe"));
        c.args(["exec-kernel-image", "--role", "rng", "--seccomp", "off"])
            .args(["--hardening", "off", "--landlock", landlock, "--path", k]);
        let out = common::run(c, LIMIT);
        report("exec-kernel-image", &out).to_string()
    };
    assert_eq!(run("off"), "allowed");
    assert_eq!(run("on"), "denied EACCES");
}

/// The hardening every program does first: PR_SET_MDWE stops mprotect adding PROT_EXEC
/// to guest RAM, but not a fresh read+execute mapping of it (which only seccomp
/// stops); without it both go through.
#[test]
fn mdwe_stops_making_guest_ram_executable_but_not_a_fresh_exec_mapping() {
    assert_eq!(
        outside("mprotect-guest-ram-exec", "vmm", None, false, &[]),
        "allowed"
    );
    assert_eq!(
        outside("mprotect-guest-ram-exec", "vmm", None, true, &[]),
        "denied EACCES"
    );
    assert_eq!(
        outside("map-guest-ram-exec", "vmm", None, false, &[]),
        "allowed"
    );
    assert_eq!(
        outside("map-guest-ram-exec", "vmm", None, true, &[]),
        "allowed"
    );
}

/// The non-dumpable target is what stops a same-uid ptrace: root (CAP_SYS_PTRACE)
/// attaches, an ordinary user does not. The user's own failures elsewhere stated.
#[test]
fn ptrace_of_a_non_dumpable_process_needs_cap_sys_ptrace() {
    assert_eq!(
        outside("ptrace-other-process", "vmm", None, false, &[]),
        "allowed"
    );
    assert_eq!(
        outside("ptrace-other-process", "vmm", Some(65534), false, &[]),
        "denied EPERM"
    );
}

/// userfaultfd (kernel-fault mode) and perf's CPU-wide events need a capability an
/// ordinary user lacks, as a cell's uid does; io_uring needs locked memory, which the
/// cell's RLIMIT_MEMLOCK = 0 withholds (an ordinary user outside has some).
#[test]
fn capability_and_rlimit_layers_hold_for_an_ordinary_user() {
    assert_eq!(
        outside("userfaultfd", "vmm", Some(65534), false, &[]),
        "denied EPERM"
    );
    assert_eq!(
        outside("perf-event-open", "vmm", Some(65534), false, &[]),
        "denied EACCES"
    );
    assert_eq!(
        outside("io-uring-setup", "vmm", Some(65534), false, &[]),
        "allowed"
    );
}

/// The shipped programs carry no probe: `cellvm-device probe` and `cellvm probe` are
/// unknown commands (exit 2), and no probe's name is in either binary.
#[test]
fn the_shipped_binaries_contain_no_probes() {
    for (program, args) in [
        ("cellvm-device", &["probe", "mount", "--role", "blk"][..]),
        ("cellvm", &["probe", "mount"][..]),
    ] {
        let out = Command::new(bin(program)).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{program} {args:?}");
        let bytes = std::fs::read(bin(program)).unwrap();
        for name in [
            "open-via-proc-root",
            "read-other-process-memory",
            "ptrace-other-process",
        ] {
            assert!(
                !bytes.windows(name.len()).any(|w| w == name.as_bytes()),
                "{program} contains {name:?}"
            );
        }
    }
}

/// A running jailed VMM and its rng backend make themselves non-dumpable at start
/// (PR_SET_DUMPABLE 0): a process of the same uid cannot read their /proc/PID/environ
/// (ptrace access), while it can read that of a dumpable process of that uid (the
/// positive control).
#[test]
fn the_vmm_and_its_backends_are_not_dumpable() {
    use std::os::unix::process::CommandExt;
    let vm = scratch().join("hold.toml");
    std::fs::write(
        &vm,
        "name = \"hold\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=serial hold=5\"\nrng = true\n",
    )
    .unwrap();
    let id = unique("dumpable");
    let mut jailer = Command::new(bin("cellvm-jailer"))
        .args(["launch", "--id", &id, "--policy"])
        .arg(repo("policy/tenants/example.toml"))
        .arg("--vm")
        .arg(&vm)
        .arg("--vmm")
        .arg(bin("cellvm"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let parent = jailer.id().to_string();
    let field = |pid: &str, key: &str| -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next().map(String::from))
    };
    let mut cells = Vec::new();
    for _ in 0..200 {
        cells = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|pid| field(pid, "PPid:").as_deref() == Some(parent.as_str()))
            .filter(|pid| field(pid, "Uid:").is_some_and(|u| u != "0"))
            .collect();
        if cells.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(cells.len() >= 2, "the VMM and the rng backend: {cells:?}");
    let read_as = |uid: u32, pid: &str| {
        Command::new("cat")
            .arg(format!("/proc/{pid}/environ"))
            .uid(uid)
            .gid(uid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    for pid in &cells {
        let uid: u32 = field(pid, "Uid:").unwrap().parse().unwrap();
        let mut dumpable = Command::new("sleep")
            .arg("5")
            .uid(uid)
            .gid(uid)
            .spawn()
            .unwrap();
        assert!(
            read_as(uid, &dumpable.id().to_string()),
            "control: uid {uid} reads its own dumpable process"
        );
        let _ = dumpable.kill();
        let _ = dumpable.wait();
        assert!(!read_as(uid, pid), "pid {pid} (uid {uid}) is dumpable");
    }
    let _ = jailer.kill();
    let _ = jailer.wait();
}

/// TIOCSTI's positive control: with a terminal on fd 0 (a fresh pty), root outside a
/// cell can push a byte into its input (legacy_tiocsti = 1 here); with the test's
/// stdio (no terminal) the answer is ENOTTY, the reason every cell run here sees.
#[test]
fn tiocsti_types_into_a_terminal_outside_a_cell() {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the locals; no name, termios or size.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned from here on.
    let (_master, slave) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let legacy = std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti")
        .map(|s| s.trim() == "1")
        .unwrap_or(true);
    let mut c = Command::new(bin("cellvm-probe"));
    c.args([
        "tiocsti",
        "--role",
        "vmm",
        "--seccomp",
        "off",
        "--hardening",
        "off",
    ])
    .stdin(slave);
    let out = common::run(c, LIMIT);
    let expect = if legacy {
        "allowed on fd 0"
    } else {
        "denied EIO"
    };
    assert_eq!(report("tiocsti", &out), expect);
    let mut c = Command::new(bin("cellvm-probe"));
    c.args([
        "tiocsti",
        "--role",
        "vmm",
        "--seccomp",
        "off",
        "--hardening",
        "off",
    ])
    .stdin(std::process::Stdio::null());
    assert_eq!(report("tiocsti", &common::run(c, LIMIT)), "denied ENOTTY");
}
