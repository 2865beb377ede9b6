//! `cellvm-jailer`: launches through every layer, refusals, what a running cell looks
//! like from outside, and cleanup after every kind of ending. (The escape probes from
//! inside each cell are in cell_probes.rs.)

mod common;
use common::{bin, is_spare, repo, test_policy};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::run;

const LIMIT: Duration = Duration::from_secs(60);

fn jailer(args: &[&str]) -> Command {
    let mut c = Command::new(bin("cellvm-jailer"));
    c.args(args).arg("--vmm").arg(bin("cellvm"));
    c
}

/// A VM spec in a scratch directory.
fn spec(dir: &Path, body: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("vm.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn launch(id: &str, vm: &Path, extra: &[&str]) -> common::Outcome {
    launch_with(&repo("policy/tenants/example.toml"), id, vm, extra)
}

/// `cellvm-jailer launch --id ID --policy P --vm V`.
fn launch_command(policy: &Path, id: &str, vm: &Path) -> Command {
    jailer(&[
        "launch",
        "--id",
        id,
        "--policy",
        policy.to_str().unwrap(),
        "--vm",
        vm.to_str().unwrap(),
    ])
}

fn launch_with(policy: &Path, id: &str, vm: &Path, extra: &[&str]) -> common::Outcome {
    let mut c = launch_command(policy, id, vm);
    c.args(extra);
    run(c, LIMIT)
}

fn assert_nothing_left(id: &str) {
    common::assert_cell_gone(id);
}

/// The example VM spec with a writable disk of its own, removed when dropped: a
/// writable image is never shared, so tests running at once each need one.
struct OwnDisk(PathBuf, PathBuf);

impl OwnDisk {
    fn new(id: &str) -> OwnDisk {
        let disk = PathBuf::from(format!("/var/lib/cellvm/images/example/{id}.img"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let text = std::fs::read_to_string(repo("policy/vms/example.toml")).unwrap();
        let example = "/var/lib/cellvm/images/example/disk.img";
        assert!(text.contains(example));
        let dir = std::env::temp_dir().join(format!("cellvm-jailer-{id}"));
        let vm = spec(&dir, &text.replace(example, disk.to_str().unwrap()));
        OwnDisk(vm, disk)
    }
}

impl Drop for OwnDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.1);
    }
}

fn unique(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

#[test]
fn jailed_test_guest_passes_every_check_and_leaves_nothing_behind() {
    let id = unique("full");
    let vm = OwnDisk::new(&id);
    let out = launch(&id, &vm.0, &[]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    for check in [
        "serial", "bootinfo", "cmdline", "e820", "acpi", "madt", "smp", "pci", "irq", "virtio",
        "msix", "intx", "rng", "net",
    ] {
        out.passed(check);
    }
    assert!(out.passed("madt").contains("cpus=2"));
    assert!(out.passed("virtio").contains("functions=3"));
    assert!(out.passed("net").contains("mac=02:00:0a:4d:00:02 link=1"));
    assert!(out.passed("net").contains("ping=echoed"));
    assert!(out.stdout.contains("14 passed, 0 failed"), "{}", out.stdout);
    assert!(
        out.stderr.contains("SELinux is not enabled on this host"),
        "the downgrade is logged: {}",
        out.stderr
    );
    assert_nothing_left(&id);
}

#[test]
fn check_prints_the_plan_and_launches_nothing() {
    let policy = repo("policy/tenants/example.toml");
    let vm = OwnDisk::new(&unique("plan"));
    let out = run(
        jailer(&[
            "check",
            "--id",
            "t-plan",
            "--policy",
            policy.to_str().unwrap(),
            "--vm",
            vm.0.to_str().unwrap(),
        ]),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for line in [
        "tenant example vm demo: allowed",
        "namespaces  mount, pid, net (empty), ipc, uts",
        "jail        /srv/cellvm/t-plan/root: /cellvm /dev/kvm",
    ] {
        assert!(
            out.stdout.contains(line),
            "{line:?} missing from:\n{}",
            out.stdout
        );
    }
    assert_nothing_left("t-plan");
}

#[test]
fn a_spec_outside_the_policy_is_refused_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("cellvm-jailer-refuse-{}", std::process::id()));
    let images = Path::new("/var/lib/cellvm/images/example");
    std::fs::create_dir_all(images).unwrap();
    std::fs::write(dir.join("secret").with_file_name("x"), b"").ok();
    let link = images.join(format!("escape-{}", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/shadow", &link).unwrap();
    for (body, expect) in [
        ("name = \"big\"\nvcpus = 16\nmemory_mib = 128\n", "tenant example: vm big: vcpus = 16 exceeds the tenant limit 4"),
        ("name = \"fat\"\nmemory_mib = 4096\n", "tenant example: vm fat: memory_mib = 4096 exceeds the tenant limit 1024"),
        ("name = \"k\"\nmemory_mib = 64\nkernel = \"/etc/shadow\"\n", "tenant example: vm k: kernel = /etc/shadow violates image_dirs"),
        ("name = \"dots\"\nmemory_mib = 64\nkernel = \"/var/lib/cellvm/images/example/../../../../etc/shadow\"\n", "kernel = /var/lib/cellvm/images/example/../../../../etc/shadow violates"),
        (&format!("name = \"link\"\nmemory_mib = 64\nkernel = \"{}\"\n", link.display()), "escapes /var/lib/cellvm/images/example (through a symlink or `..`)"),
        ("name = \"d\"\nmemory_mib = 64\ndisks = [{ path = \"x\" }]\n", "tenant example: vm d: disks[0].path = x violates image_dirs"),
        ("name = \"d3\"\nmemory_mib = 64\ndisks = [{ path = \"/var/lib/cellvm/images/example/disk.img\" }, { path = \"/var/lib/cellvm/images/example/disk.img\" }, { path = \"/var/lib/cellvm/images/example/disk.img\" }]\n", "tenant example: vm d3: disks = 3 entries exceeds the tenant limit max_disks = 2"),
        ("name = \"dq\"\nmemory_mib = 64\ndisks = [{ path = \"/var/lib/cellvm/images/example/disk.img\", queues = 0 }]\n", "disks[0].queues = 0 violates the range 1 to 16"),
        (&format!("name = \"dl\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\" }}]\n", link.display()), "disks[0]: /var/lib/cellvm/images/example/escape"),
        ("name = \"n\"\nmemory_mib = 64\nnets = [{ tap = \"t0\" }]\n", "tenant example: vm n: nets[0].tap = \"t0\" violates the tenant's taps [\"cvex*\"]"),
        ("name = \"n\"\nmemory_mib = 64\nnets = [{ tap = \"cvex9\" }]\n", "tenant example: vm n: nets[0]: tap cvex9: no such interface (the administrator creates taps; the jailer only attaches) (network namespace cellvm-example)"),
        ("name = \"n\"\nmemory_mib = 64\nnets = [{ tap = \"cvex0\", mac = \"ff:ff:ff:ff:ff:ff\" }]\n", "nets[0].mac = \"ff:ff:ff:ff:ff:ff\" violates"),
        ("name = \"typo\"\nmemory = 64\n", "unknown field `memory`"),
    ] {
        let id = unique("refused");
        let out = launch(&id, &spec(&dir, body), &[]);
        assert_eq!(out.code, Some(2), "{body}: {}", out.stderr);
        assert!(out.stderr.contains(expect), "{body}: {:?} lacks {expect:?}", out.stderr);
        assert!(out.stdout.is_empty());
        assert_nothing_left(&id);
    }
    let _ = std::fs::remove_file(&link);
}

#[test]
fn a_tenant_that_requires_selinux_is_refused_on_a_host_without_it() {
    let dir = std::env::temp_dir().join(format!("cellvm-jailer-strict-{}", std::process::id()));
    let vm = spec(&dir, "name = \"s\"\nmemory_mib = 64\n");
    let policy = repo("policy/tenants/strict.toml");
    let id = unique("strict");
    let out = run(
        jailer(&[
            "launch",
            "--id",
            &id,
            "--policy",
            policy.to_str().unwrap(),
            "--vm",
            vm.to_str().unwrap(),
        ]),
        LIMIT,
    );
    assert!(
        !Path::new("/sys/fs/selinux/enforce").exists(),
        "this test expects a host without SELinux"
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "tenant strict: selinux = \"required\" but SELinux is not enabled on this host"
        ),
        "{}",
        out.stderr
    );
    assert_nothing_left(&id);
}

#[test]
fn seccomp_off_needs_the_tenant_policy_to_allow_it() {
    let id = unique("secoff");
    let out = launch(&id, &repo("policy/vms/example.toml"), &["--seccomp", "off"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr
            .contains("seccomp = off violates the tenant policy (seccomp_off_allowed = false)"),
        "{}",
        out.stderr
    );
}

/// Starts a jailed VM that holds for `secs`, returns the jailer and the VMM's host pid.
// The jailer is returned to the caller, who waits for it.
#[allow(clippy::zombie_processes)]
fn start_holding(id: &str, secs: u32) -> (std::process::Child, u32) {
    let dir = std::env::temp_dir().join(format!("cellvm-jailer-{id}"));
    let vm = spec(
        &dir,
        &format!(
            "name = \"hold\"\nvcpus = 2\nmemory_mib = 64\ncmdline = \"tests=serial hold={secs}\"\n"
        ),
    );
    let mut child = launch_command(&repo("policy/tenants/example.toml"), id, &vm)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let procs = format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs");
    let start = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(&procs)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
        {
            // Wait until it is the VMM (exec'd), not the jailer's child still building.
            if std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|e| e.ends_with("cellvm"))
                .unwrap_or(false)
            {
                return (child, pid);
            }
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the VMM never appeared in its cgroup");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_code(mut child: std::process::Child) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(start.elapsed() < LIMIT, "jailer did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The threads of `pid` once there are at least `min` and every one has its seccomp
/// filter (each installs its own before it touches guest input).
fn filtered_threads(pid: &str, min: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        if tasks.len() >= min && tasks.iter().all(|t| status_field(pid, t, "Seccomp") == "2") {
            return tasks;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{pid}: wanted {min}+ threads, all filtered; got {tasks:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: &str, task: &str, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field}"))
        .trim()
        .to_string()
}

#[test]
fn every_thread_of_a_running_jailed_vmm_is_locked_down() {
    let id = unique("inspect");
    let (jailer_proc, pid) = start_holding(&id, 3);
    // Wait until the VMM has its vCPU threads (each installs its filter before running).
    let pid = pid.to_string();
    let tasks = filtered_threads(&pid, 3);
    for t in &tasks {
        assert_eq!(status_field(&pid, t, "Seccomp"), "2", "thread {t}");
        assert_eq!(status_field(&pid, t, "NoNewPrivs"), "1", "thread {t}");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(&pid, t, cap),
                "0000000000000000",
                "thread {t} {cap}"
            );
        }
        let uid: Vec<u32> = status_field(&pid, t, "Uid")
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect();
        assert!(
            uid.iter().all(|u| (200000..=200999).contains(u)),
            "thread {t} uids {uid:?}"
        );
        assert_eq!(
            status_field(&pid, t, "Groups"),
            "",
            "no supplementary groups"
        );
    }
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace is shared with the host");
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for ctl in ["memory", "pids", "cpu"] {
        assert!(
            cgroups
                .lines()
                .any(|l| l.contains(ctl) && l.ends_with(&format!("/cellvm/{id}"))),
            "{ctl}: {cgroups}"
        );
    }
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/cellvm/{id}/memory.limit_in_bytes"
    ))
    .unwrap();
    assert_eq!(limit.trim(), ((64u64 + 64) << 20).to_string());
    assert_eq!(
        std::fs::read_to_string(format!("/sys/fs/cgroup/pids/cellvm/{id}/pids.max"))
            .unwrap()
            .trim(),
        "64"
    );
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(env.is_empty(), "environment not cleared");
    // Only what the VMM made itself (KVM, guest RAM, its eventfds, epolls and signalfd)
    // and what it was handed: its stdio pipes and two sockets, the API's listener (the
    // run directory's api.sock) and its end of the supervisor channel, at the number its
    // command line names. Nothing else of the jailer's: not the console socket, not a
    // log, not the registry lock.
    let fd_table: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let target = std::fs::read_link(e.path()).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                target.display().to_string(),
            ))
        })
        .collect();
    let fds: Vec<String> = fd_table.iter().map(|(_, t)| t.clone()).collect();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let supervisor_fd = argv
        .iter()
        .position(|a| a == "--supervisor-fd")
        .and_then(|i| argv.get(i + 1))
        .unwrap_or_else(|| panic!("no --supervisor-fd in {argv:?}"));
    let channel = fd_table
        .iter()
        .find(|(n, _)| n == supervisor_fd)
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| panic!("fd {supervisor_fd} is not open: {fd_table:?}"));
    assert!(
        channel.starts_with("socket:["),
        "supervisor channel is {channel}"
    );
    assert!(
        fds.len() < 24,
        "{} fds open: inherited descriptors were not closed: {fds:?}",
        fds.len()
    );
    // The API socket's inode, from the host's list of bound sockets.
    let api_path = format!("/run/cellvm/vm/{id}/api.sock");
    let api = std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .find(|l| l.ends_with(&format!(" {api_path}")))
        .and_then(|l| l.split_whitespace().nth(6))
        .map(|ino| format!("socket:[{ino}]"))
        .unwrap_or_else(|| panic!("{api_path} is not a bound socket"));
    for f in &fds {
        assert!(
            f.starts_with("pipe:[")
                || f.starts_with("anon_inode:")
                || f.starts_with("/memfd:cellvm-guest-ram")
                || f == "/cell/dev/kvm"
                || *f == api
                || *f == channel,
            "the VMM holds {f}: {fds:?}"
        );
    }
    assert_ne!(api, channel);
    assert_eq!(
        fds.iter().filter(|f| f.starts_with("socket:")).count(),
        2,
        "{fds:?}"
    );
    assert_eq!(wait_code(jailer_proc), Some(0));
    assert_nothing_left(&id);
}

/// Each device backend runs in a cell of its own, seen from outside while the VM runs:
/// its own uid (not the VMM's), no capabilities, no_new_privs, seccomp on every thread,
/// new namespaces (its network and mount namespaces are not the VMM's either), an
/// empty root, the VM's cgroup, a clean environment and only the descriptors it needs.
#[test]
fn every_device_backend_runs_in_a_cell_of_its_own() {
    let id = unique("backends");
    let dir = std::env::temp_dir().join(format!("cellvm-jailer-{id}"));
    let vm = spec(
        &dir,
        "name = \"devs\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=serial hold=3\"\nrng = true\ndisks = [{ path = \"/var/lib/cellvm/images/example/disk.img\", readonly = true }]\nnets = [{ tap = \"cvex0\" }]\n",
    );
    let netns = common::NetNs::new("backends");
    let child = launch_command(&test_policy(&netns.name), &id, &vm)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let procs = format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs");
    let start = Instant::now();
    // Four processes, all exec'd: the VMM and three backends (their spares: below).
    let pids: Vec<String> = loop {
        let pids: Vec<String> = std::fs::read_to_string(&procs)
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|p| !is_spare(p))
            .collect();
        let cmdlines: Vec<String> = pids
            .iter()
            .map(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default()
            })
            .collect();
        if pids.len() == 4
            && cmdlines
                .iter()
                .filter(|c| c.starts_with("cellvm-device "))
                .count()
                == 3
            && cmdlines.iter().any(|c| c.starts_with("cellvm run "))
        {
            break pids;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "VMM and 3 backends never appeared: {pids:?} {cmdlines:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let cmdline = |p: &str| {
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/cmdline")).unwrap())
            .replace('\0', " ")
    };
    let vmm = pids
        .iter()
        .find(|p| cmdline(p).starts_with("cellvm run "))
        .unwrap()
        .clone();
    let ns = |p: &str, n: &str| std::fs::read_link(format!("/proc/{p}/ns/{n}")).unwrap();
    let uid = |p: &str| {
        status_field(p, p, "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let mut uids = vec![uid(&vmm)];
    for p in pids.iter().filter(|p| **p != vmm) {
        let line = cmdline(p);
        // Wait until the daemon's threads are up and filtered.
        let tasks = filtered_threads(p, 2);
        for t in &tasks {
            assert_eq!(status_field(p, t, "NoNewPrivs"), "1", "{line}");
            for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                assert_eq!(status_field(p, t, cap), "0000000000000000", "{line} {cap}");
            }
        }
        let u = uid(p);
        assert!(
            (200000..=200999).contains(&u.parse::<u32>().unwrap()),
            "{line}: uid {u}"
        );
        assert!(
            !uids.contains(&u),
            "{line}: uid {u} shared with another process of the VM"
        );
        uids.push(u);
        for n in ["mnt", "pid", "net", "ipc", "uts"] {
            assert_ne!(
                ns(p, n),
                ns("self", n),
                "{line}: {n} namespace is the host's"
            );
            assert_ne!(ns(p, n), ns(&vmm, n), "{line}: {n} namespace is the VMM's");
        }
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{p}/root"))
            .unwrap()
            .collect();
        assert!(root.is_empty(), "{line}: its root is not empty: {root:?}");
        assert!(
            std::fs::read(format!("/proc/{p}/environ"))
                .unwrap()
                .is_empty(),
            "{line}: environment"
        );
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{p}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .map(|t| t.display().to_string())
            .collect();
        assert!(fds.len() < 24, "{line}: {} descriptors open", fds.len());
        // The tap is the net backend's alone; the image the blk backend's alone.
        let has = |what: &str| fds.iter().any(|f| f.contains(what));
        assert_eq!(
            has("/dev/net/tun"),
            line.starts_with("cellvm-device net "),
            "{line}: {fds:?}"
        );
        assert_eq!(
            has("disk.img"),
            line.starts_with("cellvm-device blk "),
            "{line}: {fds:?}"
        );
        assert!(
            std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                .unwrap()
                .lines()
                .any(|l| l.contains("pids") && l.ends_with(&format!("/cellvm/{id}"))),
            "{line}: not in the VM's cgroup"
        );
    }
    // Each backend has a spare: its next cell, built whole and held just before the
    // exec. It is a cell like the backend's: the backend's uid (one per device, not
    // the VMM's), no capabilities, no_new_privs, namespaces of its own (neither the
    // host's, the VMM's nor any backend's), an empty root, the VM's cgroup, and the
    // device's descriptors only. Not yet seccomp: the backend installs its own filter
    // as it starts, and a spare runs nothing of the backend before it is let go.
    let spares = common::wait_spares(&id, 3);
    let backend_pids: Vec<&String> = pids.iter().filter(|p| **p != vmm).collect();
    let mut spare_uids = Vec::new();
    for s in &spares {
        assert_eq!(status_field(s, s, "NoNewPrivs"), "1", "spare {s}");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(s, s, cap),
                "0000000000000000",
                "spare {s} {cap}"
            );
        }
        assert_eq!(status_field(s, s, "Seccomp"), "0", "spare {s}");
        let u = uid(s);
        assert_ne!(u, uids[0], "spare {s} has the VMM's uid");
        let backend = backend_pids
            .iter()
            .find(|b| uid(b) == u)
            .unwrap_or_else(|| panic!("spare {s}: uid {u} is no backend's"));
        spare_uids.push(u);
        for n in ["mnt", "pid", "net", "ipc", "uts"] {
            assert_ne!(ns(s, n), ns("self", n), "spare {s}: {n} is the host's");
            assert_ne!(ns(s, n), ns(&vmm, n), "spare {s}: {n} is the VMM's");
            for b in &backend_pids {
                assert_ne!(ns(s, n), ns(b, n), "spare {s}: {n} is a backend's");
            }
        }
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{s}/root"))
            .unwrap()
            .collect();
        assert!(
            root.is_empty(),
            "spare {s}: its root is not empty: {root:?}"
        );
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{s}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .map(|t| t.display().to_string())
            .collect();
        assert!(fds.len() < 16, "spare {s}: {} descriptors open", fds.len());
        // The tap and the image: the spare's exactly when its backend's.
        let line = cmdline(backend);
        let has = |what: &str| fds.iter().any(|f| f.contains(what));
        assert_eq!(
            has("/dev/net/tun"),
            line.starts_with("cellvm-device net "),
            "spare of {line}: {fds:?}"
        );
        assert_eq!(
            has("disk.img"),
            line.starts_with("cellvm-device blk "),
            "spare of {line}: {fds:?}"
        );
        assert!(
            std::fs::read_to_string(format!("/proc/{s}/cgroup"))
                .unwrap()
                .lines()
                .any(|l| l.contains("pids") && l.ends_with(&format!("/cellvm/{id}"))),
            "spare {s}: not in the VM's cgroup"
        );
    }
    spare_uids.sort();
    spare_uids.dedup();
    assert_eq!(spare_uids.len(), 3, "one spare per backend");
    assert_eq!(wait_code(child), Some(0));
    assert_nothing_left(&id);
}

#[test]
fn sigkill_of_the_vmm_ends_the_launch_and_leaves_nothing_behind() {
    let id = unique("sigkill");
    let (jailer_proc, pid) = start_holding(&id, 30);
    // SAFETY: kill with integer arguments; pid is the VMM this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(wait_code(jailer_proc), Some(128 + libc::SIGKILL));
    assert_nothing_left(&id);
}

/// SIGTERM to the jailer is passed to the VMM, which presses the guest's power button:
/// a guest that handles it (tests=ticks) powers off, the launch ends with 0, and
/// everything is cleaned up. (A guest that ignores it: jailer_detach.rs, stop_timeout_s.)
#[test]
fn sigterm_to_the_jailer_is_passed_to_the_vm_and_everything_is_cleaned_up() {
    use std::io::BufRead;
    let id = unique("sigterm");
    let dir = std::env::temp_dir().join(format!("cellvm-jailer-{id}"));
    let vm = spec(
        &dir,
        "name = \"ticks\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=ticks\"\n",
    );
    let mut child = launch_command(&repo("policy/tenants/example.toml"), &id, &vm)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once the guest ticks, the VMM runs it (a SIGTERM before that ends the VMM as it
    // is being built, with 143).
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut console = String::new();
    while !console.contains("tick 1") {
        assert!(out.read_line(&mut console).unwrap() > 0, "{console}");
    }
    // SAFETY: kill with integer arguments; the pid is the jailer this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    std::io::Read::read_to_string(&mut out, &mut console).unwrap();
    assert_eq!(
        wait_code(child),
        Some(0),
        "the guest powered off: {console}"
    );
    assert!(console.contains("TEST power-button PASS"), "{console}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "it did not need the stop timeout"
    );
    assert_nothing_left(&id);
}

/// A supervisor killed with SIGKILL runs no cleanup: its VMM dies with it
/// (PR_SET_PDEATHSIG), and `gc` reclaims the rest (registry entry, cgroup, jail).
#[test]
fn gc_reclaims_the_cell_of_a_supervisor_that_died() {
    let id = unique("orphan");
    let (mut jailer_proc, vmm) = start_holding(&id, 60);
    // Checked while the cell runs: once its supervisor is dead, a sibling test's launch
    // may reclaim the entry at any moment.
    assert!(
        Path::new(&format!("/run/cellvm/vms/{id}")).exists(),
        "the running cell has its registry entry"
    );
    jailer_proc.kill().unwrap(); // SIGKILL: no cleanup runs
    jailer_proc.wait().unwrap();
    let start = Instant::now();
    while Path::new(&format!("/proc/{vmm}/status")).exists()
        && !std::fs::read_to_string(format!("/proc/{vmm}/status"))
            .unwrap_or_default()
            .contains("State:\tZ")
    {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the VMM outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut gc = Command::new(bin("cellvm-jailer"));
    gc.arg("gc");
    let out = run(gc, LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // Every launch reclaims first: a launch of a test running alongside may have been
    // the one that reclaimed it.
    assert!(
        out.stdout.lines().any(|l| l == format!("reclaimed {id}"))
            || !Path::new(&format!("/run/cellvm/vms/{id}")).exists(),
        "{}",
        out.stdout
    );
    assert_nothing_left(&id);
}

/// A tap already attached (here by an unjailed VM) cannot be taken by a second VM: the
/// launch is refused naming the tap, and nothing is left behind.
#[test]
fn a_tap_in_use_by_another_vm_is_refused() {
    let netns = common::NetNs::new("busy");
    let mut holder = common::cellvm();
    holder
        .args([
            "run",
            "--net",
            "tap=cvex0",
            "--cmdline",
            "tests=serial hold=20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    netns.wrap(&mut holder);
    let mut holder = holder.spawn().unwrap();
    // The guest says it is up once the VMM (which attached the tap first) runs it.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("cellvm-testguest: running checks"), "{line}");
    let id = unique("tapbusy");
    let dir = std::env::temp_dir().join(format!("cellvm-jailer-{id}"));
    let vm = spec(
        &dir,
        "name = \"busy\"\nmemory_mib = 64\ncmdline = \"tests=serial\"\nnets = [{ tap = \"cvex0\" }]\n",
    );
    let out = launch_with(&test_policy(&netns.name), &id, &vm, &[]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("vm busy: nets[0]: tap cvex0: already attached to another VM"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
    assert_nothing_left(&id);
}

/// `ksm = true` reaches the VMM: a VM with it runs (its RAM private and mergeable), and
/// one that also asks for a device is refused by the VMM, which names the conflict.
#[test]
fn ksm_in_the_spec_reaches_the_vmm() {
    let netns = common::NetNs::new("ksm");
    let policy = test_policy(&netns.name);
    let text = std::fs::read_to_string(&policy)
        .unwrap()
        .replace("ksm = false", "ksm = true");
    let policy = policy.with_file_name(format!("ksm-{}.toml", netns.name));
    std::fs::write(&policy, text).unwrap();
    let dir = std::env::temp_dir().join(format!("cellvm-jailer-ksm-{}", std::process::id()));
    let id = unique("ksm");
    let ok = spec(
        &dir,
        "name = \"merge\"\nmemory_mib = 64\ncmdline = \"tests=e820\"\nksm = true\n",
    );
    let out = launch_with(&policy, &id, &ok, &[]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    out.passed("e820");
    assert_nothing_left(&id);
    let bad = spec(
        &dir.join("bad"),
        "name = \"merge\"\nmemory_mib = 64\ncmdline = \"tests=serial\"\nksm = true\nrng = true\n",
    );
    let out = launch_with(&policy, &id, &bad, &[]);
    assert_eq!(out.code, Some(2), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("ksm: mergeable guest RAM is private to the VMM"),
        "{}",
        out.stderr
    );
    assert_nothing_left(&id);
}
