//! The VM's run directory (`/run/cellvm/vm/<id>/`), its API and console sockets, the
//! console log and readers, the supervisor's signals, `launch --detach`, and the
//! systemd unit's stop: who can reach what, and that nothing is left behind.

mod common;
use common::{bin, repo};

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

fn unique(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellvm-detach-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_dir(id: &str) -> PathBuf {
    Path::new("/run/cellvm/vm").join(id)
}

/// The example tenant policy with `extra` lines (before its [cgroup] table) and the test
/// switches allowed.
fn policy(name: &str, extra: &str) -> PathBuf {
    let example = std::fs::read_to_string(repo("policy/tenants/example.toml")).unwrap();
    let text = example
        .replace(
            "seccomp_off_allowed = false",
            "seccomp_off_allowed = true\nallow_test_switches = true",
        )
        .replace("[cgroup]", &format!("{extra}\n[cgroup]"));
    assert!(text.contains("allow_test_switches") && text.contains(extra));
    let p = scratch().join(format!("tenant-{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn example_policy() -> PathBuf {
    policy("plain", "")
}

/// A VM spec of the test guest with `cmdline` (no devices).
fn guest(name: &str, cmdline: &str) -> PathBuf {
    let p = scratch().join(format!("vm-{name}.toml"));
    std::fs::write(
        &p,
        format!("name = \"guest\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"{cmdline}\"\n"),
    )
    .unwrap();
    p
}

fn launch_cmd(policy: &Path, id: &str, vm: &Path) -> Command {
    let mut c = Command::new(bin("cellvm-jailer"));
    c.args(["launch", "--id", id, "--policy"])
        .arg(policy)
        .arg("--vm")
        .arg(vm)
        .arg("--vmm")
        .arg(bin("cellvm"));
    c
}

/// A foreground launch, its console (stdout) kept in `out` if wanted.
fn start(policy: &Path, id: &str, vm: &Path) -> Child {
    launch_cmd(policy, id, vm)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `p` exists.
fn appears(p: &Path) {
    let start = Instant::now();
    while !p.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `p` holds `text`.
fn holds(p: &Path, text: &str) -> String {
    let start = Instant::now();
    loop {
        let got = std::fs::read_to_string(p).unwrap_or_default();
        if got.contains(text) {
            return got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never held {text:?}: {got:?}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_code(child: &mut Child) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(start.elapsed() < LIMIT, "the supervisor did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill with integer arguments; the pid is a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

fn mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

fn assert_nothing_left(id: &str) {
    for p in [
        format!("/run/cellvm/vm/{id}"),
        format!("/run/cellvm/vms/{id}"),
        format!("/srv/cellvm/{id}"),
        format!("/sys/fs/cgroup/memory/cellvm/{id}"),
        format!("/sys/fs/cgroup/pids/cellvm/{id}"),
        format!("/sys/fs/cgroup/cpu/cellvm/{id}"),
        format!("/sys/fs/cgroup/blkio/cellvm/{id}"),
        format!("/sys/fs/cgroup/cellvm/{id}"),
    ] {
        assert!(!Path::new(&p).exists(), "{p} was left behind");
    }
}

/// `cellvm-probe connect-other-vm-socket --path P` outside any cell, as `uid`:`gid`
/// (root when None): "allowed" or "denied ERRNO".
fn connect_as(path: &Path, ids: Option<(u32, u32)>) -> String {
    use std::os::unix::process::CommandExt;
    // A copy any user may run (the build tree need not be readable by them).
    let probe = scratch().join("cellvm-probe");
    if !probe.exists() {
        let tmp = scratch().join("cellvm-probe.tmp");
        std::fs::copy(bin("cellvm-probe"), &tmp).unwrap();
        std::fs::rename(&tmp, &probe).unwrap();
    }
    let mut c = Command::new(&probe);
    c.args([
        "connect-other-vm-socket",
        "--role",
        "vmm",
        "--seccomp",
        "off",
        "--landlock",
        "off",
        "--hardening",
        "off",
        "--path",
    ])
    .arg(path);
    if let Some((u, g)) = ids {
        // std drops root's supplementary groups (setgroups(0)) when it sets the uid.
        c.uid(u).gid(g);
    }
    report(&common::run(c, LIMIT))
}

fn report(out: &common::Outcome) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("PROBE connect-other-vm-socket "))
        .unwrap_or_else(|| panic!("no report: {}{}", out.stdout, out.stderr))
        .to_string()
}

/// The run directory and its sockets are root's alone: root connects (the positive
/// control), another uid is refused by the directory's mode, and a socket's own mode
/// would refuse it too.
#[test]
fn the_run_directory_and_its_sockets_are_root_only() {
    let id = unique("perm");
    let mut vm = start(&example_policy(), &id, &guest("perm", "tests=none hold=30"));
    let dir = run_dir(&id);
    appears(&dir.join("console.sock"));
    assert_eq!(mode(&dir), (0o700, 0, 0));
    assert_eq!(mode(&dir.join("api.sock")), (0o600, 0, 0));
    assert_eq!(mode(&dir.join("console.sock")), (0o600, 0, 0));
    assert_eq!(mode(&dir.join("console.log")).1, 0);
    assert_eq!(mode(Path::new("/run/cellvm/vms")).0, 0o700, "the registry");
    for sock in ["api.sock", "console.sock"] {
        assert_eq!(connect_as(&dir.join(sock), None), "allowed", "root, {sock}");
        assert_eq!(
            connect_as(&dir.join(sock), Some((200998, 200998))),
            "denied EACCES",
            "another uid, {sock}"
        );
    }
    signal(vm.id(), libc::SIGUSR1);
    assert_eq!(wait_code(&mut vm), Some(137));
    assert_nothing_left(&id);
}

/// With `api_group`, the group's members connect and others still cannot; the run
/// directory is 0750 root:G and the directories above it only traversable.
#[test]
fn the_api_group_can_connect_and_no_one_else() {
    let id = unique("group");
    let gid = 4242;
    let p = policy("group", &format!("api_group = \"{gid}\""));
    let mut vm = start(&p, &id, &guest("group", "tests=none hold=30"));
    let dir = run_dir(&id);
    appears(&dir.join("console.sock"));
    // The directory opens to the group last: wait for that.
    let start = Instant::now();
    while mode(&dir).0 != 0o750 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:o}",
            mode(&dir).0
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(mode(&dir), (0o750, 0, gid));
    assert_eq!(mode(&dir.join("api.sock")), (0o660, 0, gid));
    assert_eq!(mode(&dir.join("console.sock")), (0o660, 0, gid));
    assert_eq!(mode(&dir.join("console.log")), (0o640, 0, gid));
    assert_eq!(mode(Path::new("/run/cellvm")).0, 0o711);
    assert_eq!(mode(Path::new("/run/cellvm/vm")).0, 0o711);
    assert_eq!(mode(Path::new("/run/cellvm/vms")).0, 0o700, "the registry");
    for sock in ["api.sock", "console.sock"] {
        assert_eq!(
            connect_as(&dir.join(sock), Some((200997, gid))),
            "allowed",
            "a member of the group, {sock}"
        );
        assert_eq!(
            connect_as(&dir.join(sock), Some((200997, 200997))),
            "denied EACCES",
            "not a member, {sock}"
        );
    }
    signal(vm.id(), libc::SIGUSR1);
    assert_eq!(wait_code(&mut vm), Some(137));
    assert_nothing_left(&id);
}

/// A probe in another VM's cell cannot reach this VM's API socket: with every layer,
/// seccomp kills it at socket(); without seccomp the cell's mount namespace has no
/// /run to find it in. The same probe outside any cell connects (positive control).
#[test]
fn a_probe_in_another_vms_cell_cannot_reach_this_vms_api_socket() {
    let id = unique("target");
    let p = example_policy();
    let mut vm = start(&p, &id, &guest("target", "tests=none hold=30"));
    let api = run_dir(&id).join("api.sock");
    appears(&api);
    assert_eq!(connect_as(&api, None), "allowed", "outside any cell");
    let probe = bin("cellvm-probe");
    for (without, expect) in [(None, None), (Some("seccomp"), Some("denied ENOENT"))] {
        let other = unique(&format!("prober{}", without.is_some() as u8));
        let mut c = launch_cmd(&p, &other, &guest("prober", "tests=none"));
        c.args(["--probe", "connect-other-vm-socket", "--probe-binary"])
            .arg(&probe)
            .arg("--probe-path")
            .arg(&api);
        if let Some(w) = without {
            c.args(["--without", w]);
        }
        let out = common::run(c, LIMIT);
        match expect {
            None => {
                assert_eq!(
                    out.code,
                    Some(128 + libc::SIGSYS),
                    "{}{}",
                    out.stdout,
                    out.stderr
                );
                assert!(!out.stdout.contains("allowed"), "{}", out.stdout);
            }
            Some(e) => assert_eq!(report(&out), e, "{}", out.stderr),
        }
        assert_nothing_left(&other);
    }
    signal(vm.id(), libc::SIGUSR1);
    assert_eq!(wait_code(&mut vm), Some(137));
    assert_nothing_left(&id);
}

/// Console readers that never read (and one that typed and left) stop neither the
/// guest nor the supervisor: the guest ends on its own time; in the foreground the
/// console still reaches the terminal.
#[test]
fn stuck_console_readers_stop_neither_the_guest_nor_the_supervisor() {
    let id = unique("console");
    let vm = guest("console", "hold=3");
    let mut child = launch_cmd(&example_policy(), &id, &vm)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let dir = run_dir(&id);
    appears(&dir.join("console.sock"));
    let stuck: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(dir.join("console.sock")).unwrap())
        .collect();
    {
        let mut typist = UnixStream::connect(dir.join("console.sock")).unwrap();
        typist.write_all(&[b'x'; 100_000]).unwrap_or(());
    }
    let mut terminal = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut terminal)
        .unwrap();
    assert_eq!(wait_code(&mut child), Some(0), "{terminal}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(terminal.contains("passed, 0 failed"), "{terminal}");
    drop(stuck);
    assert_nothing_left(&id);
}

/// console.log holds what the guest wrote, while it runs.
#[test]
fn console_log_receives_the_guest_output_while_it_runs() {
    let id = unique("log");
    let mut vm = start(
        &example_policy(),
        &id,
        &guest("log", "tests=serial hold=30"),
    );
    let log = run_dir(&id).join("console.log");
    let text = holds(&log, "1 passed, 0 failed");
    assert!(text.contains("TEST serial PASS"), "{text}");
    signal(vm.id(), libc::SIGUSR1);
    assert_eq!(wait_code(&mut vm), Some(137));
    assert_nothing_left(&id);
}

/// SIGUSR1 destroys at once: the supervisor ends with 137 and nothing of the VM is left
/// (registry entry, run directory, cgroup, jail).
#[test]
fn sigusr1_destroys_the_vm_at_once() {
    let id = unique("destroy");
    let mut vm = start(
        &example_policy(),
        &id,
        &guest("destroy", "tests=none hold=60"),
    );
    appears(&run_dir(&id).join("console.sock"));
    holds(&run_dir(&id).join("console.log"), "up");
    let t = Instant::now();
    signal(vm.id(), libc::SIGUSR1);
    assert_eq!(wait_code(&mut vm), Some(137));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_nothing_left(&id);
}

/// A launch --detach that is refused says why on stderr and exits 2, as a foreground
/// one does, printing no id and leaving nothing.
#[test]
fn a_refused_detached_launch_exits_2_with_the_reason() {
    let id = unique("refused");
    let vm = scratch().join("vm-huge.toml");
    std::fs::write(&vm, "name = \"huge\"\nvcpus = 64\nmemory_mib = 64\n").unwrap();
    let mut c = launch_cmd(&example_policy(), &id, &vm);
    c.arg("--detach");
    let out = common::run(c, LIMIT);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr.contains("vcpus = 64 exceeds the tenant limit 4"),
        "{}",
        out.stderr
    );
    assert_nothing_left(&id);
}
