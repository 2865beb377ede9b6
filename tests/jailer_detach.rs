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
    // The example's own stop timeout gives way to one in `extra`.
    let text = if extra.contains("stop_timeout_s") {
        text.replacen("stop_timeout_s = 30\n", "", 1)
    } else {
        text
    };
    assert!(text.contains("allow_test_switches") && text.contains(extra));
    let p = scratch().join(format!("tenant-{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn example_policy() -> PathBuf {
    policy("plain", "")
}

fn guest(name: &str, cmdline: &str) -> PathBuf {
    common::guest_spec(&scratch(), name, cmdline)
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
    common::assert_cell_gone(id);
}

/// `cellvm-probe connect-other-vm-socket --path P` outside any cell, as `uid`:`gid`
/// (root when None): "allowed" or "denied ERRNO".
fn connect_as(path: &Path, ids: Option<(u32, u32)>) -> String {
    use std::os::unix::process::CommandExt;
    // A copy any user may run (the build tree need not be readable by them).
    let probe = scratch().join("cellvm-probe");
    common::executable_copy("cellvm-probe", &probe);
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
    let mut vm = start(
        &example_policy(),
        &id,
        &guest("perm", "tests=serial hold=30"),
    );
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
    let mut vm = start(&p, &id, &guest("group", "tests=serial hold=30"));
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
    let mut vm = start(&p, &id, &guest("target", "tests=serial hold=30"));
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

/// The data path goes between the guest and each backend without the VMM; vm.counters
/// and /metrics still say what moved, from the page of counters each backend shares
/// with its VMM. The guest's blk and rng checks make a known set of requests: the
/// counts are exactly theirs (a VMM that only counted its own exits would see none).
#[test]
fn each_backends_counts_of_the_data_path_reach_vm_counters_exactly() {
    let id = unique("backendcounts");
    let dir = scratch();
    // The image the guest's blk check reads: byte o of the first 64 sectors is
    // ((o / 512) * 31) ^ o, as tests/guest/devices.rs expects.
    let disk = Path::new("/var/lib/cellvm/images/example").join(format!("{id}.img"));
    let mut bytes = vec![0u8; 1 << 20];
    for (o, b) in bytes.iter_mut().enumerate().take(64 * 512) {
        *b = ((o / 512) as u8).wrapping_mul(31) ^ (o as u8);
    }
    std::fs::write(&disk, &bytes).unwrap();
    let spec = dir.join("vm-backendcounts.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"counts\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=blk,rng hold=60\"\nrng = true\ndisks = [{{ path = \"{}\" }}]\n",
            disk.display()
        ),
    )
    .unwrap();
    let mut vm = start(&example_policy(), &id, &spec);
    let log = run_dir(&id).join("console.log");
    let text = holds(&log, "2 passed, 0 failed");
    assert!(text.contains("TEST blk PASS"), "{text}");
    assert!(
        text.contains("TEST rng PASS used=Some(64),Some(64)"),
        "{text}"
    );
    let (code, body) = api(&id, "GET", "/api/v1/vm.counters");
    assert_eq!(code, 200, "{body}");
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    let device = |name: &str| {
        c["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == name)
            .unwrap_or_else(|| panic!("no {name}: {c}"))
            .clone()
    };
    // blk: GET_ID, read 4 KiB, write 4 KiB, read it back, flush, discard, write
    // zeroes, read 8 KiB, a read past the end (I/O error), an unknown type (unsupported).
    assert_eq!(
        device("disk0")["backend"],
        serde_json::json!({"requests": 10, "errors": 2, "bytes_to_guest": 16384, "bytes_from_guest": 4096}),
        "{c}"
    );
    // rng: two fills of 64 bytes.
    assert_eq!(
        device("rng")["backend"],
        serde_json::json!({"requests": 2, "errors": 0, "bytes_to_guest": 128, "bytes_from_guest": 0}),
        "{c}"
    );
    let (code, metrics) = api(&id, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains(
            "cellvm_device_backend_total{device=\"disk0\",kind=\"blk\",counter=\"bytes_from_guest\"} 4096"
        ),
        "{metrics}"
    );
    signal(vm.id(), libc::SIGUSR1);
    assert_eq!(wait_code(&mut vm), Some(137));
    assert_nothing_left(&id);
    let _ = std::fs::remove_file(&disk);
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

/// What a console.sock reader types reaches the guest's COM1 through the supervisor
/// and the VMM: the ticks guest echoes each line back, and the echo shows in
/// console.log and on the typist's own stream.
#[test]
fn console_input_from_a_reader_reaches_the_guest() {
    let id = unique("typing");
    let mut vm = start(&example_policy(), &id, &guest("typing", "tests=ticks"));
    let dir = run_dir(&id);
    appears(&dir.join("console.sock"));
    let log = dir.join("console.log");
    holds(&log, "tick 2");
    let mut typist = UnixStream::connect(dir.join("console.sock")).unwrap();
    typist
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    typist.write_all(b"hello cell\r").unwrap();
    let text = holds(&log, "echo: hello cell");
    assert!(!text.contains("FAIL"), "{text}");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("echo: hello cell") {
        let n = typist
            .read(&mut buf)
            .expect("the typist's stream carries the echo");
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
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
        &guest("destroy", "tests=serial hold=60"),
    );
    appears(&run_dir(&id).join("console.sock"));
    holds(&run_dir(&id).join("console.log"), "running checks");
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

/// A supervisor killed with SIGKILL runs no cleanup; `gc` removes its run directory
/// with the rest (registry entry, cgroup, jail).
#[test]
fn gc_removes_the_run_directory_of_a_supervisor_that_died() {
    let id = unique("orphan");
    let mut vm = start(
        &example_policy(),
        &id,
        &guest("orphan", "tests=serial hold=60"),
    );
    let dir = run_dir(&id);
    holds(&dir.join("console.log"), "running checks");
    // Checked while the cell runs: once its supervisor is dead, a sibling test's launch
    // may reclaim the directory at any moment.
    assert!(
        dir.join("api.sock").exists(),
        "the running VM has its run directory"
    );
    vm.kill().unwrap(); // SIGKILL: no cleanup runs
    vm.wait().unwrap();
    gc_until_gone(&id);
}

/// Runs `cellvm-jailer gc` until the VM's entry is gone (its VMM dies of its
/// supervisor's death a moment after it).
fn gc_until_gone(id: &str) {
    let start = Instant::now();
    loop {
        let mut gc = Command::new(bin("cellvm-jailer"));
        gc.arg("gc");
        let out = common::run(gc, LIMIT);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        if !Path::new(&format!("/run/cellvm/vms/{id}")).exists() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "gc never reclaimed {id}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_nothing_left(id);
}

/// One HTTP/1.1 request on a VM's API socket: (status code, body).
fn api(id: &str, method: &str, path: &str) -> (u16, String) {
    try_api(id, method, path).unwrap_or_else(|| panic!("{id}: no answer to {method} {path}"))
}

/// As `api`, None for a connection closed without an answer (one a VMM accepted as it
/// ended, during a reset).
fn try_api(id: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(run_dir(id).join("api.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    // Read the head, then Content-Length bytes of body (the connection stays open).
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |n| n.trim().parse().unwrap());
            if body.len() >= len {
                let code = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())?;
                return Some((code, body.to_string()));
            }
        }
        match s.read(&mut buf) {
            Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// `launch --detach`: (its output, the supervisor's pid from the registry).
fn detach(policy: &Path, id: &str, vm: &Path) -> (common::Outcome, Option<u32>) {
    let mut c = launch_cmd(policy, id, vm);
    c.arg("--detach");
    let out = common::run(c, LIMIT);
    let pid = std::fs::read_to_string(format!("/run/cellvm/vms/{id}"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("supervisor="))
                .and_then(|p| p.parse().ok())
        });
    (out, pid)
}

/// Waits until the VM's registry entry is gone (its supervisor ended and cleaned up).
fn entry_goes(id: &str, within: Duration) -> Duration {
    let start = Instant::now();
    while Path::new(&format!("/run/cellvm/vms/{id}")).exists() {
        assert!(start.elapsed() < within, "{id} still registered");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

fn stat_field(pid: u32, n: usize) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 2..];
    after.split_whitespace().nth(n - 3).unwrap().to_string()
}

/// `launch --detach` prints the id and returns only once the guest runs (vm.info says
/// so at once); the supervisor goes on in a session of its own, stdio on /dev/null,
/// its lines in supervisor.log; SIGUSR1 then removes everything.
#[test]
fn detach_prints_the_id_once_the_guest_runs_and_the_supervisor_goes_on_alone() {
    let id = unique("detach");
    // A descriptor the caller leaves open across exec (not close-on-exec).
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let leaked = std::fs::read_link(format!("/proc/self/fd/{}", fds[1])).unwrap();
    let (out, pid) = detach(
        &example_policy(),
        &id,
        &guest("detach", "tests=serial hold=60"),
    );
    // SAFETY: closing the two descriptors made above.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, format!("{id}\n"));
    let (code, body) = api(&id, "GET", "/api/v1/vm.info");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"state\":\"running\""), "{body}");
    assert!(body.contains(&format!("\"id\":\"{id}\"")), "{body}");
    assert!(body.contains("\"tenant\":\"example\""), "{body}");
    assert!(body.contains("cellvm_t:s0:c"), "the MCS label: {body}");
    assert!(body.contains(&format!("cellvm/{id}")), "the cgroup: {body}");
    let pid = pid.expect("the supervisor's pid in the registry");
    assert_eq!(stat_field(pid, 6), pid.to_string(), "a session of its own");
    let held: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    assert!(
        !held.contains(&leaked),
        "the supervisor holds the caller's {leaked:?}: {held:?}"
    );
    for fd in [0, 1] {
        let t = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(t, Path::new("/dev/null"), "fd {fd}");
    }
    let log = run_dir(&id).join("supervisor.log");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap(),
        log,
        "stderr"
    );
    assert_eq!(mode(&log), (0o600, 0, 0));
    assert!(holds(&log, "SELinux").contains("cellvm-jailer: warning"));
    holds(
        &run_dir(&id).join("console.log"),
        "cellvm-testguest: running checks",
    );
    signal(pid, libc::SIGUSR1);
    entry_goes(&id, Duration::from_secs(10));
    assert_nothing_left(&id);
}

/// A detached supervisor killed with SIGKILL: gc removes its run directory and the rest.
#[test]
fn gc_reclaims_a_detached_vm_whose_supervisor_was_killed() {
    let id = unique("detkill");
    let (out, pid) = detach(
        &example_policy(),
        &id,
        &guest("detkill", "tests=serial hold=60"),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    signal(pid.unwrap(), libc::SIGKILL);
    gc_until_gone(&id);
}

/// A graceful stop that the guest does not answer (this guest has no power-button
/// handler) ends after the tenant's stop_timeout_s: every cell killed, exit 124.
#[test]
fn a_stop_the_guest_ignores_ends_after_stop_timeout_with_124() {
    let id = unique("timeout");
    let p = policy("timeout", "stop_timeout_s = 2");
    let mut vm = start(&p, &id, &guest("timeout", "tests=serial hold=60"));
    holds(&run_dir(&id).join("console.log"), "running checks");
    let (code, body) = api(&id, "GET", "/api/v1/vm.info");
    assert_eq!(code, 200, "{body}");
    let t = Instant::now();
    signal(vm.id(), libc::SIGTERM);
    assert_eq!(wait_code(&mut vm), Some(124));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let mut err = String::new();
    vm.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains("did not power off within stop_timeout_s = 2; killed"),
        "{err}"
    );
    assert_nothing_left(&id);
}

/// vm.reboot ends the VMM with the reset code: the supervisor builds the VM again in
/// fresh cells (a new VMM process) under the same registry entry, run directory and
/// API socket, and the guest runs again.
#[test]
fn a_reboot_rebuilds_the_vm_in_fresh_cells_under_the_same_entry() {
    let id = unique("reboot");
    let (out, pid) = detach(
        &example_policy(),
        &id,
        &guest("reboot", "tests=serial hold=60"),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let entry = std::fs::read_to_string(format!("/run/cellvm/vms/{id}")).unwrap();
    let procs = format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs");
    let before = std::fs::read_to_string(&procs).unwrap();
    let api_ino = std::fs::metadata(run_dir(&id).join("api.sock"))
        .unwrap()
        .ino();
    // The first boot's output whole before the reboot (a reset cuts a line short).
    holds(&run_dir(&id).join("console.log"), "TEST serial PASS");
    let (code, body) = api(&id, "PUT", "/api/v1/vm.reboot");
    assert_eq!(code, 204, "{body}");
    let start = Instant::now();
    loop {
        let now = std::fs::read_to_string(&procs).unwrap_or_default();
        if !now.trim().is_empty() && now != before {
            if let Some((200, body)) = try_api(&id, "GET", "/api/v1/vm.info") {
                if body.contains("\"state\":\"running\"") {
                    break;
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never rebuilt");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read_to_string(format!("/run/cellvm/vms/{id}")).unwrap(),
        entry,
        "the same entry: supervisor, uids, MCS pair"
    );
    assert_eq!(
        std::fs::metadata(run_dir(&id).join("api.sock"))
            .unwrap()
            .ino(),
        api_ino
    );
    let log = holds(&run_dir(&id).join("supervisor.log"), "the guest reset");
    assert!(log.contains("built again in fresh cells"), "{log}");
    let start = Instant::now();
    loop {
        let console = std::fs::read_to_string(run_dir(&id).join("console.log")).unwrap();
        if console.matches("cellvm-testguest: running checks").count() == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{console}");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(pid.unwrap(), libc::SIGUSR1);
    entry_goes(&id, Duration::from_secs(10));
    assert_nothing_left(&id);
}

/// A console reader attached while the guest runs gets its output from then on, and
/// input it sends reaches the guest's serial port; one that never reads stops nothing:
/// the ticks go on, in console.log too.
#[test]
fn a_console_reader_gets_the_output_from_attach_on_and_a_stuck_one_stops_nothing() {
    let id = unique("ticks");
    let (out, pid) = detach(&example_policy(), &id, &guest("ticks", "tests=ticks"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let dir = run_dir(&id);
    holds(&dir.join("console.log"), "tick 2\r\n");
    let _stuck: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(dir.join("console.sock")).unwrap())
        .collect();
    let mut reader = UnixStream::connect(dir.join("console.sock")).unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&got).matches("tick ").count() < 20 {
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "the console closed");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        !text.contains("tick 1\r\n"),
        "only output from attach on: {text}"
    );
    // The stuck readers did not stop the guest: the log has the ticks the reader saw.
    // The last whole line the reader got (the text may end inside one).
    let whole: Vec<&str> = text.split("\r\n").collect();
    let last = whole[..whole.len() - 1]
        .iter()
        .rev()
        .find(|l| l.starts_with("tick "))
        .unwrap();
    holds(&dir.join("console.log"), &format!("\r\n{last}\r\n"));
    signal(pid.unwrap(), libc::SIGUSR1);
    entry_goes(&id, Duration::from_secs(10));
    assert_nothing_left(&id);
}

/// A graceful stop: SIGTERM to the supervisor presses the power button, the guest
/// (tests=ticks) sees it and powers off, and the supervisor ends with 0, everything
/// removed.
#[test]
fn sigterm_is_a_graceful_stop_the_guest_powers_off_and_the_supervisor_exits_0() {
    let id = unique("graceful");
    let (out, pid) = detach(&example_policy(), &id, &guest("graceful", "tests=ticks"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let log = run_dir(&id).join("console.log");
    holds(&log, "tick 2\r\n");
    let pid = pid.unwrap();
    signal(pid, libc::SIGTERM);
    // The console log goes with the run directory: a reader keeps what it says.
    let mut reader = UnixStream::connect(run_dir(&id).join("console.sock")).unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    let _ = reader.read_to_end(&mut got);
    let took = entry_goes(&id, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("TEST power-button PASS"), "{text}");
    assert!(
        took < Duration::from_secs(10),
        "{took:?}: no timeout needed"
    );
    assert_nothing_left(&id);
}

/// systemd/cellvm@.service: its ExecStart (with %i and the tenant filled in) is a
/// foreground launch; what systemd does on `systemctl stop` under KillMode=mixed,
/// SIGTERM to the main process alone, is a graceful stop: exit 0 within
/// TimeoutStopSec, the guest having seen the power button.
#[test]
fn the_systemd_unit_runs_a_vm_that_systemctl_stop_shuts_down_gracefully() {
    let unit = std::fs::read_to_string(repo("systemd/cellvm@.service")).unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_string()
    };
    assert_eq!(value("KillMode"), "mixed");
    assert_eq!(value("KillSignal"), "SIGTERM");
    let tenant = value("Environment")
        .strip_prefix("CELLVM_TENANT=")
        .unwrap()
        .to_string();
    let stop: u64 = value("TimeoutStopSec").parse().unwrap();
    let example = std::fs::read_to_string(repo(&format!("policy/tenants/{tenant}.toml"))).unwrap();
    let stop_timeout: u64 = example
        .lines()
        .find_map(|l| l.strip_prefix("stop_timeout_s = "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        stop > stop_timeout,
        "TimeoutStopSec {stop} <= stop_timeout_s {stop_timeout}"
    );
    // /etc/cellvm of the unit, here a scratch directory.
    let id = unique("unit");
    let etc = scratch().join("etc-cellvm");
    std::fs::create_dir_all(etc.join("tenants")).unwrap();
    std::fs::create_dir_all(etc.join("vms")).unwrap();
    std::fs::write(etc.join(format!("tenants/{tenant}.toml")), &example).unwrap();
    std::fs::write(
        etc.join(format!("vms/{id}.toml")),
        "name = \"unit\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=ticks\"\n",
    )
    .unwrap();
    let exec = value("ExecStart")
        .replace("%i", &id)
        .replace("${CELLVM_TENANT}", &tenant)
        .replace("/etc/cellvm/", &format!("{}/", etc.display()));
    let mut words = exec.split_whitespace();
    let program = words.next().unwrap();
    assert_eq!(program, "/usr/local/bin/cellvm-jailer");
    // Installed, cellvm sits next to the jailer; here the build tree has both.
    let mut main = Command::new(bin("cellvm-jailer"))
        .args(words)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    holds(&run_dir(&id).join("console.log"), "tick 2\r\n");
    signal(main.id(), libc::SIGTERM);
    let t = Instant::now();
    let mut console = String::new();
    main.stdout
        .take()
        .unwrap()
        .read_to_string(&mut console)
        .unwrap();
    assert_eq!(wait_code(&mut main), Some(0), "{console}");
    assert!(t.elapsed() < Duration::from_secs(stop), "{:?}", t.elapsed());
    assert!(console.contains("TEST power-button PASS"), "{console}");
    assert_nothing_left(&id);
}

/// A guest that resets at once, over and over (`tests=none reset` ends with a
/// keyboard-controller reset): the VM is built again each time, then ended after 20
/// resets within a minute, with the reason.
#[test]
fn a_boot_loop_is_rebuilt_then_ended_with_the_reason() {
    let id = unique("bootloop");
    let mut c = launch_cmd(
        &example_policy(),
        &id,
        &guest("bootloop", "tests=none reset"),
    );
    c.stdin(Stdio::null());
    let out = common::run(c, LIMIT);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr
            .matches("the guest reset; the VM is built again")
            .count(),
        20,
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("the guest reset 21 times within 60 s; the VM is ended"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout.matches("cellvm-testguest: up").count(), 21);
    assert_nothing_left(&id);
}
