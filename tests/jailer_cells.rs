//! The cells `cellvm-jailer` builds, seen from outside while a VM runs: none holds the
//! operator's terminal or shares its session, a killed supervisor takes its cell with
//! it, the jail directory is root's alone, every cell's file-size limit, and the second
//! layer (a chroot) that refuses new user namespaces without seccomp.

mod common;
use common::{bin, cgroup_pids, is_spare, test_policy};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

fn unique(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

/// A disk image of `size` bytes of this test process's own, in the example tenant's
/// image directory.
fn image(name: &str, size: u64) -> PathBuf {
    let dir = Path::new("/var/lib/cellvm/images/example");
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(format!("cells-{name}-{}.img", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

/// A VM spec with a disk, an rng and a net device, whose guest holds for `secs`.
fn spec_with_devices(id: &str, disk: &Path, secs: u32) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellvm-cells-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("vm.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"cells\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=serial hold={secs}\"\nrng = true\ndisks = [{{ path = \"{}\" }}]\nnets = [{{ tap = \"cvex0\" }}]\n",
            disk.display()
        ),
    )
    .unwrap();
    p
}

fn launch_args(policy: &Path, id: &str, vm: &Path) -> Vec<String> {
    [
        bin("cellvm-jailer").display().to_string(),
        "launch".into(),
        "--id".into(),
        id.into(),
        "--policy".into(),
        policy.display().to_string(),
        "--vm".into(),
        vm.display().to_string(),
        "--vmm".into(),
        bin("cellvm").display().to_string(),
    ]
    .to_vec()
}

fn cmdline(pid: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

/// The pids of the VM's cell once the VMM and its `backends` backends all exec'd (the
/// backends' spares, held before their exec, left out; tests/jailer.rs checks them).
fn cell_pids(id: &str, backends: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let pids: Vec<String> = cgroup_pids(id)
            .into_iter()
            .filter(|p| !is_spare(p))
            .collect();
        let lines: Vec<String> = pids.iter().map(|p| cmdline(p)).collect();
        if pids.len() == backends + 1
            && lines
                .iter()
                .filter(|c| c.starts_with("cellvm-device "))
                .count()
                == backends
            && lines.iter().any(|c| c.starts_with("cellvm run "))
        {
            return pids;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the VMM and {backends} backends never appeared: {pids:?} {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, tty_nr].
fn stat(pid: &str) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    rest.split_whitespace()
        .take(5)
        .map(|f| f.to_string())
        .collect()
}

fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
        .unwrap_or(true)
}

fn wait_code(child: &mut std::process::Child) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(start.elapsed() < LIMIT, "the launch did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_nothing_left(id: &str) {
    for p in [
        format!("/srv/cellvm/{id}"),
        format!("/run/cellvm/vms/{id}"),
        format!("/run/cellvm/vms/{id}-dev0"),
        format!("/sys/fs/cgroup/pids/cellvm/{id}"),
        format!("/sys/fs/cgroup/memory/cellvm/{id}"),
    ] {
        assert!(!Path::new(&p).exists(), "{p} was left behind");
    }
}

/// Started on a terminal (`script` gives the jailer a pty as its controlling tty and
/// stdio), no process of the cell holds it: fds 0-2 are pipes or /dev/null, each runs
/// in a session of its own with no controlling terminal, and the guest's console still
/// reaches the operator through the supervisor.
#[test]
fn no_cell_holds_the_operators_terminal_or_shares_its_session() {
    let id = unique("tty");
    let netns = common::NetNs::new("tty");
    let disk = image("tty", 1 << 20);
    let vm = spec_with_devices(&id, &disk, 3);
    let args = launch_args(&test_policy(&netns.name), &id, &vm);
    let mut child = Command::new("script")
        .args(["-qec", &args.join(" "), "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pids = cell_pids(&id, 3);
    let jailer = stat(&pids[0])[1].clone();
    assert!(
        cmdline(&jailer).contains("cellvm-jailer launch"),
        "{jailer}"
    );
    let jailer_stat = stat(&jailer);
    // Positive control: the jailer itself is on the terminal, in the terminal's session.
    assert_ne!(jailer_stat[4], "0", "the jailer has a controlling tty");
    let jailer_fd0 = std::fs::read_link(format!("/proc/{jailer}/fd/0")).unwrap();
    assert!(
        jailer_fd0.starts_with("/dev/pts/"),
        "the jailer's stdin is the terminal: {jailer_fd0:?}"
    );
    for p in &pids {
        let line = cmdline(p);
        for fd in 0..3 {
            let target = std::fs::read_link(format!("/proc/{p}/fd/{fd}"))
                .unwrap()
                .display()
                .to_string();
            assert!(
                target.starts_with("pipe:[") || target == "/dev/null",
                "{line}: fd {fd} is {target}"
            );
        }
        let s = stat(p);
        assert_ne!(s[3], jailer_stat[3], "{line}: shares the jailer's session");
        assert_eq!(s[4], "0", "{line}: has a controlling tty");
    }
    let code = wait_code(&mut child);
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("cellvm-testguest: running checks"), "{out}");
    assert_nothing_left(&id);
    let _ = std::fs::remove_file(&disk);
}

/// SIGKILL of the supervisor (no cleanup runs): every process of its cell dies with it
/// (PR_SET_PDEATHSIG), and the next launch on the same tap works: it reclaims the dead
/// cell before it attaches the tap.
#[test]
fn a_killed_supervisor_takes_its_cell_with_it_and_the_tap_is_free_again() {
    let id = unique("orphan-tap");
    let netns = common::NetNs::new("orphan");
    let policy = test_policy(&netns.name);
    let disk = image("orphan", 1 << 20);
    let vm = spec_with_devices(&id, &disk, 60);
    let args = launch_args(&policy, &id, &vm);
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pids = cell_pids(&id, 3);
    // The spares hold the tap and the image too: they die with the supervisor as well.
    pids.extend(common::wait_spares(&id, 3));
    // The entry is checked while the cell runs: once the supervisor is dead, any launch
    // reclaims it, a sibling test's included, so its presence after the kill is a race.
    assert!(
        Path::new(&format!("/run/cellvm/vms/{id}")).exists(),
        "the running cell has its registry entry"
    );
    child.kill().unwrap(); // SIGKILL: no cleanup runs
    child.wait().unwrap();
    let start = Instant::now();
    while !pids.iter().all(|p| gone(p)) {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "still running a second after the supervisor died: {:?}",
            pids.iter()
                .filter(|p| !gone(p))
                .map(|p| cmdline(p))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let again = unique("orphan-tap2");
    let vm2 = spec_with_devices(&again, &disk, 0);
    let args = launch_args(&policy, &again, &vm2);
    let mut c = Command::new(&args[0]);
    c.args(&args[1..]);
    let out = common::run(c, LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // Only launches ran since the kill (no gc): one of them, this one or a sibling's,
    // reclaimed the dead cell, and its tap was free for this one.
    assert_nothing_left(&id);
    assert_nothing_left(&again);
    let _ = std::fs::remove_file(&disk);
}

/// /srv/cellvm and the VM's directory in it are root's, 0700: another uid can neither
/// list the VM's directory nor reach anything in it while the VM runs (root can: the
/// positive control).
#[test]
fn the_jail_directory_is_roots_alone() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let id = unique("jaildir");
    let netns = common::NetNs::new("jaildir");
    let disk = image("jaildir", 1 << 20);
    let vm = spec_with_devices(&id, &disk, 3);
    let args = launch_args(&test_policy(&netns.name), &id, &vm);
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    cell_pids(&id, 3);
    let dir = format!("/srv/cellvm/{id}");
    for d in ["/srv/cellvm", dir.as_str()] {
        let m = std::fs::metadata(d).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o700, "{d}");
        assert_eq!((m.uid(), m.gid()), (0, 0), "{d}");
    }
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .output()
            .unwrap()
    };
    for target in [dir.clone(), format!("{dir}/root"), format!("{dir}/dev0")] {
        let root = Command::new("ls").arg(&target).output().unwrap();
        assert!(root.status.success(), "root lists {target}");
        let out = as_nobody(&["ls", &target]);
        assert!(!out.status.success(), "uid 65534 listed {target}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = as_nobody(&["stat", &format!("{dir}/dev0.sock")]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "a socket path in the jail directory is out of reach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_code(&mut child), Some(0));
    assert_nothing_left(&id);
    let _ = std::fs::remove_file(&disk);
}

fn limits_field(pid: &str, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in {text}"));
    line[name.len()..]
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// RLIMIT_FSIZE: the blk backend's at its image's size (SIGXFSZ ignored, so a write past
/// it fails with EFBIG), the VMM's at its guest RAM's size, the others' at 0.
#[test]
fn every_cell_has_a_file_size_limit_at_what_it_needs() {
    let id = unique("fsize");
    let netns = common::NetNs::new("fsize");
    let size = 3 << 20;
    let disk = image("fsize", size);
    let vm = spec_with_devices(&id, &disk, 3);
    let args = launch_args(&test_policy(&netns.name), &id, &vm);
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for p in cell_pids(&id, 3) {
        let line = cmdline(&p);
        let want = if line.starts_with("cellvm run ") {
            64 << 20
        } else if line.starts_with("cellvm-device blk ") {
            size
        } else {
            0
        };
        assert_eq!(
            limits_field(&p, "Max file size"),
            format!("{want} {want}"),
            "{line}"
        );
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
            .unwrap();
        assert_ne!(
            ignored & (1 << (libc::SIGXFSZ - 1)),
            0,
            "{line}: SIGXFSZ is not ignored"
        );
    }
    assert_eq!(wait_code(&mut child), Some(0));
    assert_nothing_left(&id);
    let _ = std::fs::remove_file(&disk);
}

/// What a cell writes on stderr reaches the operator through the supervisor, one line
/// at a time, prefixed with the VM and the cell it came from.
#[test]
fn a_cells_stderr_reaches_the_operator_prefixed_with_its_origin() {
    let netns = common::NetNs::new("stderr");
    let policy = test_policy(&netns.name);
    let text = std::fs::read_to_string(&policy)
        .unwrap()
        .replace("ksm = false", "ksm = true");
    let policy = policy.with_file_name(format!("ksm-{}.toml", netns.name));
    std::fs::write(&policy, text).unwrap();
    let id = unique("stderr");
    let dir = std::env::temp_dir().join(format!("cellvm-cells-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let vm = dir.join("vm.toml");
    // The VMM refuses mergeable RAM with a device, on its stderr.
    std::fs::write(
        &vm,
        "name = \"merge\"\nmemory_mib = 64\ncmdline = \"tests=serial\"\nksm = true\nrng = true\n",
    )
    .unwrap();
    let args = launch_args(&policy, &id, &vm);
    let mut c = Command::new(&args[0]);
    c.args(&args[1..]);
    let out = common::run(c, LIMIT);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("ksm: mergeable guest RAM is private to the VMM"))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert!(line.starts_with("cellvm-jailer: vm merge: vmm: "), "{line}");
    assert_nothing_left(&id);
}
