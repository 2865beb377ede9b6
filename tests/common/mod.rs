//! Helpers shared by the integration tests: running `cellvm` with a deadline, and
//! building tiny PVH ELF guests from raw machine code.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn cellvm() -> Command {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm; it is missing on this machine"
    );
    Command::new(env!("CARGO_BIN_EXE_cellvm"))
}

/// QEMU with no default devices or config, the guest's COM1 on stdio, and the exit
/// port the test guest powers off through (status 1 for a clean exit).
pub const QEMU_HEADLESS: [&str; 7] = [
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-device",
    "isa-debug-exit,iobase=0xf4",
];

/// `cellvm-device`, the backends' program.
pub fn cellvm_device() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellvm-device"))
}

pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn test_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("TEST "))
            .collect()
    }

    /// The detail of `TEST <name> PASS ...`, failing the test if it is missing or failed.
    pub fn passed(&self, name: &str) -> &str {
        let prefix = format!("TEST {name} ");
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no line for check {name}:\n{}\n{}",
                    self.stdout, self.stderr
                )
            });
        let rest = &line[prefix.len()..];
        assert!(rest.starts_with("PASS"), "check {name} failed: {line}");
        rest
    }
}

/// Runs `cmd`, killing it after `limit`; panics if it had to be killed.
pub fn run(mut cmd: Command, limit: Duration) -> Outcome {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cellvm");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {limit:?}; output so far:\n{}",
                t_out.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        code: status.code(),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellvm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A minimal ELF64 whose PVH note points at `code`, loaded at 1 MiB and entered in
/// 32-bit protected mode.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let ehdr_size = 64u64;
    let phdr_size = 56u64;
    let note_off = ehdr_size + 2 * phdr_size;
    let note: Vec<u8> = [
        &4u32.to_le_bytes()[..],
        &4u32.to_le_bytes(),
        &18u32.to_le_bytes(), // XEN_ELFNOTE_PHYS32_ENTRY
        b"Xen\0",
        &0u32.to_le_bytes(), // patched below
    ]
    .concat();
    let code_off = note_off + note.len() as u64;
    let entry = LOAD + code_off;
    let mut note = note;
    let n = note.len();
    note[n - 4..].copy_from_slice(&(entry as u32).to_le_bytes());
    let file_size = code_off + code.len() as u64;

    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&ehdr_size.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&(ehdr_size as u16).to_le_bytes());
    f.extend_from_slice(&(phdr_size as u16).to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    // PT_LOAD covering the whole file at 1 MiB.
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&7u32.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes());
    f.extend_from_slice(&file_size.to_le_bytes());
    f.extend_from_slice(&file_size.to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    // PT_NOTE.
    f.extend_from_slice(&4u32.to_le_bytes());
    f.extend_from_slice(&4u32.to_le_bytes());
    f.extend_from_slice(&note_off.to_le_bytes());
    f.extend_from_slice(&(LOAD + note_off).to_le_bytes());
    f.extend_from_slice(&(LOAD + note_off).to_le_bytes());
    f.extend_from_slice(&(note.len() as u64).to_le_bytes());
    f.extend_from_slice(&(note.len() as u64).to_le_bytes());
    f.extend_from_slice(&4u64.to_le_bytes());
    assert_eq!(f.len() as u64, note_off);
    f.extend_from_slice(&note);
    f.extend_from_slice(code);
    f
}

/// 32-bit code: `out dx, al` of each byte of `text` to COM1.
pub fn print_code(text: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in text {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    c
}

/// A network namespace the test creates, holding one persistent tap `cvex0` (the name
/// the example VM spec uses) whose host end is 10.77.0.1/24 (the address the guest's `net` check talks to). Deleted, tap
/// and all, when dropped.
pub struct NetNs {
    pub name: String,
}

/// The tap every NetNs holds.
pub const TAP: &str = "cvex0";

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        NetNs::with_tap(tag, false)
    }

    /// The same with a multi-queue tap (`ip tuntap ... multi_queue`), for queue pairs.
    pub fn new_multiqueue(tag: &str) -> NetNs {
        NetNs::with_tap(tag, true)
    }

    fn with_tap(tag: &str, multi_queue: bool) -> NetNs {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("cv-{tag}-{}-{n}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("run ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]);
        let mut tuntap = vec!["-n", n, "tuntap", "add", "dev", TAP, "mode", "tap"];
        if multi_queue {
            tuntap.push("multi_queue");
        }
        ip(&tuntap);
        ip(&["-n", n, "addr", "add", "10.77.0.1/24", "dev", TAP]);
        ip(&["-n", n, "link", "set", TAP, "up"]);
        ns
    }

    /// Makes `cmd` start inside the namespace.
    pub fn wrap(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let path = std::ffi::CString::new(format!("/run/netns/{}", self.name)).unwrap();
        // SAFETY: open, setns and close are async-signal-safe; `path` moves into the
        // closure and lives until exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }

    /// Runs `body` on a thread inside the namespace; returns once `body` has waited on
    /// the barrier it is given (after binding its socket), so the caller may go on.
    fn spawn_inside<T: Send + 'static>(
        &self,
        body: impl FnOnce(&std::sync::Barrier) -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
        let r = ready.clone();
        let name = self.name.clone();
        let h = std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/run/netns/{name}")).expect("netns file");
            // SAFETY: setns of this thread only, on a namespace descriptor we opened.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            body(&r)
        });
        ready.wait();
        h
    }

    /// A UDP echo responder on 10.77.0.1:7777 inside the namespace, answering up to
    /// `count` datagrams; returns what it received.
    pub fn udp_echo(&self, count: usize) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
        self.spawn_inside(move |ready| {
            let s = std::net::UdpSocket::bind("10.77.0.1:7777").expect("bind the responder");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            ready.wait();
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while got.len() < count {
                let Ok((n, from)) = s.recv_from(&mut buf) else {
                    break;
                };
                let _ = s.send_to(&buf[..n], from);
                got.push(buf[..n].to_vec());
            }
            got
        })
    }

    /// A TCP sink on 10.77.0.1:`port` inside the namespace: accepts one connection and
    /// returns everything read from it until EOF (empty if none came in 30 s).
    pub fn tcp_sink(&self, port: u16) -> std::thread::JoinHandle<Vec<u8>> {
        self.spawn_inside(move |ready| {
            use std::io::Read;
            let l = std::net::TcpListener::bind(("10.77.0.1", port)).expect("bind the sink");
            l.set_nonblocking(true).unwrap();
            ready.wait();
            let start = Instant::now();
            let mut conn = loop {
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(_) if start.elapsed() < Duration::from_secs(30) => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return Vec::new(),
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut got = Vec::new();
            let _ = conn.read_to_end(&mut got);
            got
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A binary of the workspace (built by `cargo build --release --workspace`): test
/// binaries live in target/<triple>/release/deps, the workspace's binaries one up.
pub fn bin(name: &str) -> PathBuf {
    let p = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace)",
        p.display()
    );
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    p
}

/// A path in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The example tenant policy plus `allow_test_switches`, with its taps in the network
/// namespace `netns` (one the test made) instead of the example's.
pub fn test_policy(netns: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellvm-test-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("tenant-{netns}.toml"));
    let text = std::fs::read_to_string(repo("policy/tenants/example.toml"))
        .unwrap()
        .replace(
            "seccomp_off_allowed = false",
            "seccomp_off_allowed = false\nallow_test_switches = true",
        )
        .replace(
            "tap_netns = \"cellvm-example\"",
            &format!("tap_netns = \"{netns}\""),
        );
    assert!(text.contains("allow_test_switches") && text.contains(netns));
    std::fs::write(&p, text).unwrap();
    p
}

/// A VM spec in `dir` of the built-in test guest with `cmdline`: 1 vCPU, 64 MiB, no
/// devices.
pub fn guest_spec(dir: &Path, name: &str, cmdline: &str) -> PathBuf {
    let p = dir.join(format!("vm-{name}.toml"));
    std::fs::write(
        &p,
        format!("name = \"{name}\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"{cmdline}\"\n"),
    )
    .unwrap();
    p
}

/// Whether `pid` is a backend's spare: its next cell, built and held before the exec
/// (named `cellvm-spare` meanwhile; its argv is still the supervisor's).
pub fn is_spare(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "cellvm-spare")
}

/// The pids in VM `id`'s pids cgroup.
pub fn cgroup_pids(id: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

/// Waits up to 20 s until VM `id` has `n` spares; their pids.
pub fn wait_spares(id: &str, n: usize) -> Vec<String> {
    let start = std::time::Instant::now();
    loop {
        let spares: Vec<String> = cgroup_pids(id)
            .into_iter()
            .filter(|p| is_spare(p))
            .collect();
        if spares.len() == n {
            return spares;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "vm {id}: {n} spares never appeared: {spares:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that nothing of VM `id`'s cell is left on the host: its registry entry (and
/// any temporary one), run directory, jail, and its cgroup in every hierarchy.
pub fn assert_cell_gone(id: &str) {
    let mut paths = vec![
        format!("/run/cellvm/vms/{id}"),
        format!("/run/cellvm/vms/.{id}.tmp"),
        format!("/run/cellvm/vm/{id}"),
        format!("/srv/cellvm/{id}"),
        format!("/sys/fs/cgroup/cellvm/{id}"),
    ];
    // Entries of a layout where each backend had one of its own.
    paths.extend((0..3).map(|n| format!("/run/cellvm/vms/{id}-dev{n}")));
    for ctrl in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        paths.push(format!("{}/cellvm/{id}", ctrl.path().display()));
    }
    for p in paths {
        assert!(!Path::new(&p).exists(), "{p} was left behind");
    }
}

/// A child process killed and reaped when the test lets go of it (a peer such as
/// qemu-storage-daemon).
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 5 s for `path` to exist (a socket a peer binds).
pub fn wait_for(path: &Path) {
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} never appeared", path.display());
}

/// A VM held running under the real jailer (its guest waiting in `hold=`) for tests
/// that look at it from outside, with its VMM's pid.
pub struct HeldVm {
    pub id: String,
    jailer: Option<std::process::Child>,
    pub vmm: u32,
}

impl HeldVm {
    /// Launches `vm` under `policy` as `id` and returns once the VMM runs: it is the
    /// cell's last process, so by then every label has been set.
    pub fn launch(id: &str, policy: &Path, vm: &Path) -> HeldVm {
        let jailer = jailer_command(id, policy, vm)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let procs = format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs");
        let started = Instant::now();
        let vmm = loop {
            let text = std::fs::read_to_string(&procs).unwrap_or_default();
            let found = text
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .find(|p: &u32| {
                    std::fs::read_link(format!("/proc/{p}/exe"))
                        .map(|e| e.file_name() == Some("cellvm".as_ref()))
                        .unwrap_or(false)
                });
            if let Some(p) = found {
                break p;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "vm {id}: the VMM never appeared in its cgroup"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        HeldVm {
            id: id.into(),
            jailer: Some(jailer),
            vmm,
        }
    }

    /// The MCS pair the registry gave this VM.
    pub fn pair(&self) -> String {
        let entry = std::fs::read_to_string(format!("/run/cellvm/vms/{}", self.id)).unwrap();
        entry
            .lines()
            .find_map(|l| l.strip_prefix("mcs="))
            .unwrap()
            .to_string()
    }

    /// Ends the VM by SIGKILL of its VMM and waits (60 s at most) for the supervisor's
    /// cleanup.
    pub fn end(&mut self) {
        // SAFETY: kill(2) on a pid read from this VM's cgroup.
        unsafe { libc::kill(self.vmm as i32, libc::SIGKILL) };
        let mut jailer = self.jailer.take().unwrap();
        let started = Instant::now();
        while jailer.try_wait().unwrap().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the jailer did not end"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL of the supervisor: nothing of its own cleanup runs.
    pub fn kill_supervisor(&mut self) {
        let mut jailer = self.jailer.take().unwrap();
        jailer.kill().unwrap();
        jailer.wait().unwrap();
    }
}

impl Drop for HeldVm {
    fn drop(&mut self) {
        if let Some(mut j) = self.jailer.take() {
            let _ = j.kill();
            let _ = j.wait();
        }
        let _ = Command::new(bin("cellvm-jailer")).arg("gc").output();
    }
}

/// A copy of the workspace binary `name` at `dest`, mode 0755, for tests that run it as
/// another user or from a tenant's directory. The bytes are written by a child `install`
/// process, never by this one: a write descriptor held here would be inherited by any
/// child another test thread forks at that moment, and exec of the copy would then fail
/// with ETXTBSY until that child execs.
pub fn executable_copy(name: &str, dest: &Path) {
    if dest.exists() {
        return;
    }
    static COPIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = dest.file_name().unwrap().to_string_lossy();
    let tmp = dest.with_file_name(format!(".{file}.{}.{n}", std::process::id()));
    let status = Command::new("install")
        .arg("-m")
        .arg("0755")
        .arg(bin(name))
        .arg(&tmp)
        .status()
        .expect("run install");
    assert!(status.success(), "install {name} to {}", tmp.display());
    std::fs::rename(&tmp, dest).unwrap();
}

/// Every launch reclaims dead cells first (entries, labels, jails): a test that looks at
/// what a killed supervisor left takes a turn that its file's other launching tests take
/// too, so no sibling's launch reclaims it under the test.
pub fn launch_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURNS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURNS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a QEMU tool (`qemu-img`, `qemu-io`) in `cwd`. A LUKS image's creation measures
/// PBKDF2 speed from the thread's CPU time and fails ("Unable to get accurate CPU usage")
/// when a loaded host charges its first round no tick; that one failure is tried again.
pub fn qemu_tool(name: &str, args: &[&str], cwd: &Path) -> std::process::Output {
    for _ in 0..10 {
        let out = Command::new(name)
            .args(args)
            .current_dir(cwd)
            .output()
            .unwrap_or_else(|e| panic!("{name} (tests/setup.sh installs it): {e}"));
        if !String::from_utf8_lossy(&out.stderr).contains("Unable to get accurate CPU usage") {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name} {args:?}: PBKDF2 could not be timed in 10 tries");
}

/// Writes the disk the test guest's `blk` check expects: `len` bytes, the first 64
/// sectors holding its pattern (tests/guest/devices.rs), the rest zero.
pub fn pattern_disk(path: &Path, len: usize) {
    let mut b = vec![0u8; len];
    for (o, x) in b.iter_mut().enumerate().take(64 * 512) {
        *x = ((o / 512) as u8).wrapping_mul(31) ^ (o as u8);
    }
    std::fs::write(path, b).unwrap();
}

/// `cellvm-jailer launch` of `vm` under `policy` as `id`, with this build's VMM and
/// device binary.
pub fn jailer_command(id: &str, policy: &Path, vm: &Path) -> Command {
    let mut c = Command::new(bin("cellvm-jailer"));
    c.args(["launch", "--id", id, "--policy"])
        .arg(policy)
        .arg("--vm")
        .arg(vm)
        .arg("--vmm")
        .arg(bin("cellvm"))
        .arg("--device-binary")
        .arg(bin("cellvm-device"));
    c
}

/// [`jailer_command`] run to its end (a launch that must be refused, or a VM that ends
/// by itself).
pub fn jailer_launch(id: &str, policy: &Path, vm: &Path) -> Outcome {
    run(jailer_command(id, policy, vm), Duration::from_secs(60))
}

/// One mapping of guest RAM (the `cellvm-guest-ram` memfd) in a process's smaps.
#[derive(Debug, Default, Clone, Copy)]
pub struct RamMapping {
    pub page_kib: u64,
    pub rss_kib: u64,
    pub locked_kib: u64,
    /// Transparent huge pages of it, mapped by PMD.
    pub shmem_pmd_kib: u64,
}

/// `pid`'s mappings of guest RAM, from /proc/PID/smaps (empty until it has mapped it).
pub fn guest_ram_mappings(pid: u32) -> Vec<RamMapping> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out: Vec<RamMapping> = Vec::new();
    let mut in_ram = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.split_once('-').is_some_and(|(a, b)| {
            u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok()
        }) {
            in_ram = line.contains("/memfd:cellvm-guest-ram");
            if in_ram {
                out.push(RamMapping::default());
            }
            continue;
        }
        let (Some(m), true) = (out.last_mut(), in_ram) else {
            continue;
        };
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = value
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or(0);
        match key {
            "KernelPageSize" => m.page_kib = kib,
            "Rss" => m.rss_kib = kib,
            "Locked" => m.locked_kib = kib,
            "ShmemPmdMapped" => m.shmem_pmd_kib = kib,
            _ => {}
        }
    }
    out
}

/// Bytes no two streams share: an xorshift sequence from `seed`.
pub fn stream_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `cellvm-device ARGS` refuses each of `cases` with status 2 and a message containing
/// its text, before serving anything.
pub fn device_refuses(cases: &[(&[&str], &str)]) {
    for (args, expect) in cases {
        let mut c = cellvm_device();
        c.args(*args).stdin(Stdio::null());
        let out = run(c, Duration::from_secs(10));
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
    }
}

/// The pass numbers of the complete `memload pass N ok` lines of the test guest's
/// memload workload.
pub fn memload_passes(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("memload pass "))
        .filter(|l| l.contains(" ok pages="))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

/// A memload console stream (one VM's, or several VMs' joined in order): no FAIL, and
/// its passes follow each other without a gap or a repeat. Returns how many there are.
pub fn assert_memload_continuous(log: &str) -> usize {
    assert!(!log.contains("FAIL"), "{log}");
    let p = memload_passes(log);
    for w in p.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the passes do not follow each other:\n{log}"
        );
    }
    p.len()
}
