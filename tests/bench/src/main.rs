//! cellvm-bench: every scenario runs cellvm and its peer alternately (A B A B ...) in
//! one process, then prints median, min, max and the ratio; `--json PATH` writes the
//! same numbers. Machines here are noisy, so only medians and ratios mean anything.
//!
//! Scenario 1 (start-up): exec -> guest exit, 1 vCPU, 64 MiB, for the yardstick guest
//! (tests/yardstick/yardstick.S) and for the built-in test guest with `tests=none`: `cellvm run` against
//! QEMU's microvm booting the same ELF. Wall time, CPU time (user + system of the
//! child, from wait4) and peak RSS.
//!
//! Scenario 9 (backend restart, `restart.rs`): a backend's SIGKILL to the guest's next
//! completed request; `--restart-only` runs it alone.
//! Scenario 10 (virtio-fs, `fs.rs`): the guest's FUSE client through our frontend and
//! QEMU's, the same virtiofsd; `--fs-only` runs it alone.
//!
//! Scenario 11 (snapshot and restore, `snapshot.rs`): a paused memload guest saved to
//! files and brought back, against QEMU's migration to a file and `-incoming`;
//! `--snapshot-only` runs it alone.
//!
//! Scenario 7 (control plane, `control.rs`): the API, pause/resume, launch --detach and
//! `cellvmctl list` against libvirt driving QEMU; `--control-plane-only` runs it alone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;

mod control;
mod fs;
mod restart;
mod snapshot;

#[derive(Parser)]
#[command(about = "cellvm benchmarks side by side with real peers")]
struct Args {
    /// One run per scenario (the test suite's check that the benchmark still works).
    #[arg(long)]
    quick: bool,
    /// Runs per side per scenario.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only scenarios 1 and 2 (start-up and jailed launch), then the table.
    #[arg(long)]
    launch_only: bool,
    /// Only scenario 7 (control plane against libvirt), then the table.
    #[arg(long)]
    control_plane_only: bool,
    /// Only scenario 4's block rows (raw and qcow2 against qemu-storage-daemon), then
    /// the table.
    #[arg(long)]
    block_only: bool,
    /// Only scenario 8 (vsock stream and round trips against a host Unix socket), then
    /// the table.
    #[arg(long)]
    vsock_only: bool,
    /// Only scenario 4's net rows (transmit and receive against QEMU), then the table.
    #[arg(long)]
    net_only: bool,
    /// Only scenario 9 (a backend's SIGKILL to the guest's next completed request),
    /// then the table.
    #[arg(long)]
    restart_only: bool,
    /// Only scenario 10 (virtio-fs against QEMU's vhost-user-fs-pci), then the table.
    #[arg(long)]
    fs_only: bool,
    /// Only scenario 11 (snapshot and restore against QEMU's migration to a file).
    #[arg(long)]
    snapshot_only: bool,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Sample {
    wall_ms: f64,
    cpu_ms: f64,
    max_rss_kib: u64,
}

#[derive(Debug, Serialize)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    scenario: String,
    metric: String,
    cellvm: Stats,
    peer_name: String,
    peer: Stats,
    /// cellvm median / peer median.
    ratio: f64,
}

struct Runner {
    name: &'static str,
    cmd: Vec<String>,
    /// Exit statuses that mean the guest ended the way it should.
    ok_status: &'static [i32],
}

impl Runner {
    /// The same VM with 128 MiB instead of the 64 MiB `cellvm` and `qemu` give it.
    fn with_128_mib(mut self) -> Runner {
        for a in self.cmd.iter_mut().filter(|a| *a == "64") {
            *a = "128".into();
        }
        self
    }

    /// QEMU's microvm with its PCIe root, for virtio-pci devices.
    fn with_pcie(mut self) -> Runner {
        for a in self.cmd.iter_mut().filter(|a| *a == "microvm") {
            *a = "microvm,pcie=on".into();
        }
        self
    }

    /// Guest RAM a shared memfd, which a vhost-user backend can map.
    fn with_shared_memory(mut self) -> Runner {
        for a in self.cmd.iter_mut().filter(|a| a.starts_with("microvm")) {
            a.push_str(",memory-backend=mem");
        }
        self.with_args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on"])
    }

    fn with_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Runner {
        self.cmd.extend(args.into_iter().map(Into::into));
        self
    }
}

/// `cellvm-jailer launch` of `spec` under `policy`; with `id`, the `{id}` placeholder
/// that `density` fills in for each VM.
fn jailer_launch(jailer: &Path, policy: &Path, spec: &Path, id: bool) -> Runner {
    let mut cmd = vec![jailer.display().to_string(), "launch".into()];
    if id {
        cmd.extend(["--id".into(), "{id}".into()]);
    }
    cmd.extend([
        "--policy".into(),
        policy.display().to_string(),
        "--vm".into(),
        spec.display().to_string(),
    ]);
    Runner {
        name: "cellvm-jailer launch",
        cmd,
        ok_status: &[0],
    }
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stats {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// Runs one command to completion and measures it with wait4's rusage.
// The child is reaped by wait4, which clippy does not see (std's wait would lose the rusage).
#[allow(clippy::zombie_processes)]
fn measure(r: &Runner) -> Sample {
    let start = Instant::now();
    let child = Command::new(&r.cmd[0])
        .args(&r.cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", r.cmd[0]));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child; status and usage are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    assert_eq!(rc, pid, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    if !r.ok_status.contains(&code) {
        let mut err = String::new();
        if let Some(mut e) = child.stderr {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        panic!("{} exited with {code}: {err}", r.cmd.join(" "));
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    Sample {
        wall_ms: wall.as_secs_f64() * 1e3,
        cpu_ms: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
    }
}

fn compare(scenario: &str, a: &Runner, b: &Runner, runs: usize, rows: &mut Vec<Row>) {
    // One unmeasured run each: page cache, lazy binding.
    measure(a);
    measure(b);
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        sa.push(measure(a));
        sb.push(measure(b));
    }
    type Metric = (&'static str, fn(&Sample) -> f64);
    let metrics: [Metric; 3] = [
        ("wall ms", |s| s.wall_ms),
        ("cpu ms", |s| s.cpu_ms),
        ("max RSS MiB", |s| s.max_rss_kib as f64 / 1024.0),
    ];
    for (metric, f) in metrics {
        let ca = stats(sa.iter().map(f).collect());
        let cb = stats(sb.iter().map(f).collect());
        let ratio = if cb.median > 0.0 {
            ca.median / cb.median
        } else {
            f64::NAN
        };
        rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            cellvm: ca,
            peer_name: b.name.into(),
            peer: cb,
            ratio,
        });
    }
    let _ = a.name;
}

/// RSS and PSS (MiB) of `pid` and every process below it.
/// (pid, RSS MiB, PSS MiB, role) of every process in `pid`'s tree; the role is the
/// backend kind for `cellvm-device KIND` processes, else the program's name.
fn tree_memory(pid: u32) -> Vec<(u32, f64, f64, String)> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let rollup = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
        let field = |name: &str| -> f64 {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        let argv: Vec<String> = std::fs::read(format!("/proc/{p}/cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let program = argv.first().cloned().unwrap_or_default();
        let role = if program.ends_with("cellvm-device") {
            argv.get(1).cloned().unwrap_or_default()
        } else {
            program
        };
        out.push((p, field("Rss:"), field("Pss:"), role));
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// Starts `r`, and after a second samples (total RSS, total PSS, RSS of the first
/// process, (role, RSS) of each of the others) over its process tree.
fn resident_tree(r: &Runner) -> (f64, f64, f64, Vec<(String, f64)>) {
    let mut child = Command::new(&r.cmd[0])
        .args(&r.cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", r.cmd[0]));
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let tree = tree_memory(child.id());
    let _ = child.wait();
    let rss: f64 = tree.iter().map(|t| t.1).sum();
    let pss: f64 = tree.iter().map(|t| t.2).sum();
    let rest = tree[1..].iter().map(|t| (t.3.clone(), t.1)).collect();
    (rss, pss, tree[0].1, rest)
}

/// A network namespace holding tap `cvb0` (10.77.0.1/24), for the VMs' net devices;
/// removed when dropped. Runners enter it through `ip netns exec`, which execs in place
/// (the measured pid is still the VMM's).
struct BenchNet(String);

impl BenchNet {
    fn new() -> BenchNet {
        let name = format!("cellvm-bench-{}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = Command::new("ip")
                .args(args)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "ip {args:?} failed (the benchmark needs root and iproute2)"
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let net = BenchNet(name);
        let n = net.0.as_str();
        ip(&["-n", n, "tuntap", "add", "dev", "cvb0", "mode", "tap"]);
        ip(&["-n", n, "addr", "add", "10.77.0.1/24", "dev", "cvb0"]);
        ip(&["-n", n, "link", "set", "cvb0", "up"]);
        net
    }

    /// Floods 10.77.0.2:9 (the guest, its MAC 02:00:0a:4d:00:02 made a permanent
    /// neighbour) with 1,400-byte UDP datagrams from inside the namespace until `stop`.
    fn flood(
        &self,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let ok = Command::new("ip")
            .args([
                "-n",
                &self.0,
                "neigh",
                "replace",
                "10.77.0.2",
                "lladdr",
                "02:00:0a:4d:00:02",
                "dev",
                "cvb0",
                "nud",
                "permanent",
            ])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip neigh replace");
        let name = self.0.clone();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(format!("/run/netns/{name}")).expect("netns file");
            // SAFETY: setns of this thread only, on a namespace descriptor we opened.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let s = std::net::UdpSocket::bind("10.77.0.1:0").expect("bind the flood");
            let payload = [0xa5u8; 1400];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A full tap queue drops datagrams; the guest counts what it gets.
                if s.send_to(&payload, "10.77.0.2:9").is_err() {
                    std::thread::yield_now();
                }
            }
        })
    }

    fn wrap(&self, r: &mut Runner) {
        let mut cmd = vec!["ip".into(), "netns".into(), "exec".into(), self.0.clone()];
        cmd.append(&mut r.cmd);
        r.cmd = cmd;
    }
}

impl Drop for BenchNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs the guest's `blkbench` check; returns (read IOPS, write IOPS, MB/s).
fn guest_blkbench(bin: &Path, disk: &str, ms: u64) -> (f64, f64, f64) {
    let mut cmd = Command::new(bin);
    cmd.args([
        "run",
        "--memory",
        "128",
        "--disk",
        disk,
        "--serial",
        "stdio",
        "--cmdline",
    ])
    .arg(format!("tests=blkbench bench_ms={ms}"));
    let line = guest_check(cmd, "blkbench");
    (
        number(&line, "iops="),
        number(&line, "wiops="),
        number(&line, "mbps="),
    )
}

/// The guest's blkbench, `runs` times each, on cellvm's blk backend (`ours`, a `--disk`
/// spec) and on qemu-storage-daemon exporting the node `top` its `blockdevs` define:
/// [read IOPS, write IOPS, MB/s] samples of each.
fn blk_pair(
    bin: &Path,
    work: &Path,
    ours: &str,
    blockdevs: &[String],
    ms: u64,
    runs: usize,
) -> ([Vec<f64>; 3], [Vec<f64>; 3]) {
    let sock = work.join("qsd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut qsd = Command::new("qemu-storage-daemon");
    for b in blockdevs {
        qsd.arg("--blockdev").arg(b);
    }
    let mut qsd = qsd
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=top,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon");
    let (mut o, mut q): ([Vec<f64>; 3], [Vec<f64>; 3]) = Default::default();
    for _ in 0..runs {
        let (r, w, m) = guest_blkbench(bin, ours, ms);
        o[0].push(r);
        o[1].push(w);
        o[2].push(m);
        // qemu-storage-daemon serves one connection at a time: wait for its socket.
        for _ in 0..500 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (r, w, m) = guest_blkbench(bin, &format!("socket={}", sock.display()), ms);
        q[0].push(r);
        q[1].push(w);
        q[2].push(m);
    }
    let _ = qsd.kill();
    let _ = qsd.wait();
    (o, q)
}

/// Runs `cmd` (a VM whose guest runs one bench check) and returns the check's PASS line.
fn guest_check(mut cmd: Command, check: &str) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("run the VM");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with(&format!("TEST {check} PASS")))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "{check} failed:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// The number after `key` in a check's line.
fn number(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The host reading the same file directly for `ms` each: 4 KiB preads at random
/// offsets, then 1 MiB sequential preads. Returns (IOPS, MB/s).
fn host_reads(path: &Path, ms: u64) -> (f64, f64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / 4096;
    let mut buf = vec![0u8; 1 << 20];
    let limit = std::time::Duration::from_millis(ms);
    let (start, mut n, mut seed) = (Instant::now(), 0u64, 0x2545_f491_4f6c_dd1du64);
    while start.elapsed() < limit {
        for _ in 0..64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            f.read_exact_at(&mut buf[..4096], (seed % blocks) * 4096)
                .unwrap();
            n += 1;
        }
    }
    let iops = n as f64 / start.elapsed().as_secs_f64();
    let (start, mut mib, mut off) = (Instant::now(), 0u64, 0u64);
    let size = blocks * 4096;
    while start.elapsed() < limit {
        f.read_exact_at(&mut buf, off).unwrap();
        off = (off + (1 << 20)) % (size - (1 << 20) + 1);
        mib += 1;
    }
    (iops, mib as f64 / start.elapsed().as_secs_f64())
}

/// One row: the medians of `a` (cellvm) and `b` (the peer) and their ratio.
fn row(scenario: &str, metric: &str, a: Vec<f64>, peer: &str, b: Vec<f64>) -> Row {
    let (a, b) = (stats(a), stats(b));
    Row {
        scenario: scenario.into(),
        metric: metric.into(),
        ratio: a.median / b.median,
        cellvm: a,
        peer_name: peer.into(),
        peer: b,
    }
}

/// The RSS and PSS rows of a memory scenario from [cellvm RSS, cellvm PSS, peer RSS,
/// peer PSS] samples.
fn memory_rows(scenario: &str, peer: &str, [vr, vp, qr, qp]: [Vec<f64>; 4], rows: &mut Vec<Row>) {
    for (metric, a, b) in [("RSS MiB", vr, qr), ("PSS MiB", vp, qp)] {
        rows.push(row(scenario, metric, a, peer, b));
    }
}

fn mem_available_mib() -> f64 {
    meminfo_kib("MemAvailable:") / 1024.0
}

fn meminfo_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn ksm_knob(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{name}"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn set_ksm_knob(name: &str, value: &str) {
    std::fs::write(format!("/sys/kernel/mm/ksm/{name}"), value)
        .unwrap_or_else(|e| panic!("/sys/kernel/mm/ksm/{name}: {e}"));
}

/// KSM switched on with a fast scan for as long as this lives; the host's settings are
/// put back (and merged pages unmerged) when it drops.
struct KsmOn(Vec<(&'static str, String)>);

impl KsmOn {
    fn new() -> KsmOn {
        let saved = ["run", "pages_to_scan", "sleep_millisecs"]
            .into_iter()
            .map(|k| (k, ksm_knob(k)))
            .collect();
        set_ksm_knob("pages_to_scan", "20000");
        set_ksm_knob("sleep_millisecs", "10");
        set_ksm_knob("run", "1");
        KsmOn(saved)
    }

    /// Waits (up to `limit`) until ksmd has finished two more full scans.
    fn settle(&self, limit: std::time::Duration) {
        let start = Instant::now();
        let first: u64 = ksm_knob("full_scans").parse().unwrap_or(0);
        while ksm_knob("full_scans").parse::<u64>().unwrap_or(0) < first + 2
            && start.elapsed() < limit
        {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for KsmOn {
    fn drop(&mut self) {
        // run=2 unmerges every page, then the saved state (normally 0) applies.
        let _ = std::fs::write("/sys/kernel/mm/ksm/run", "2");
        for (k, v) in &self.0 {
            let _ = std::fs::write(format!("/sys/kernel/mm/ksm/{k}"), v);
        }
    }
}

/// Scenario 6: starts idle VMs (their guests halted, using no CPU) one after another,
/// each printing `idle` once it runs, until `max` run, one fails to start, or the host's
/// available memory falls under 10% of its total. Returns how many ran and the host
/// memory each cost (the fall in MemAvailable over the count, after KSM settled when
/// `ksm` is given). Every VM is stopped (SIGTERM) before it returns.
fn density(r: &Runner, max: usize, ksm: Option<&KsmOn>) -> (usize, f64) {
    use std::io::BufRead;
    // One pipe per running VM stays open here: room for them.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(1 << 16);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let total = meminfo_kib("MemTotal:") / 1024.0;
    let before = mem_available_mib();
    let mut vms = Vec::new();
    for i in 0..max {
        if mem_available_mib() < total * 0.1 {
            break;
        }
        let mut cmd = r.cmd.clone();
        if let Some(at) = cmd.iter().position(|a| a == "{id}") {
            cmd[at] = format!("dens-{}-{i}", std::process::id());
        }
        let mut child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", cmd[0]));
        let mut line = String::new();
        let up = std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .is_ok()
            && line.trim() == "idle";
        if !up {
            eprintln!("density: {} VM {i} did not come up: {line:?}", r.name);
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        vms.push(child);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    if let Some(k) = ksm {
        k.settle(std::time::Duration::from_secs(120));
    }
    let after = mem_available_mib();
    let n = vms.len();
    for vm in &vms {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(vm.id() as i32, libc::SIGTERM) };
    }
    for mut vm in vms {
        let _ = vm.wait();
    }
    (n, (before - after) / n.max(1) as f64)
}

/// Starts `n` copies of `r` at once and returns VMs per second (first start to last exit).
fn launch_rate(r: &Runner, n: usize) -> f64 {
    let start = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(&r.cmd[0])
                .args(&r.cmd[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", r.cmd[0]))
        })
        .collect();
    for mut c in children {
        let status = c.wait().unwrap();
        assert!(
            r.ok_status.contains(&status.code().unwrap_or(-1)),
            "{} ended with {status}",
            r.cmd.join(" ")
        );
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The supervisor's resident memory while its VM runs (the VMM's is its own).
fn supervisor_rss_kib(jailer: &Path, policy: &Path, work: &Path) -> u64 {
    let spec = work.join("vm-hold.toml");
    std::fs::write(
        &spec,
        "name = \"hold\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=none hold=1\"\n",
    )
    .unwrap();
    let mut child = Command::new(jailer)
        .args(["launch", "--policy"])
        .arg(policy)
        .arg("--vm")
        .arg(&spec)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the jailer");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let _ = child.wait();
    rss
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn cellvm_binary(root: &Path) -> PathBuf {
    let bin = root.join("target/x86_64-unknown-linux-gnu/release/cellvm");
    let status = Command::new("cargo")
        .args(["build", "--release", "--quiet", "--bin", "cellvm"])
        .current_dir(root)
        .status()
        .expect("cargo build");
    assert!(
        status.success() && bin.exists(),
        "cannot build {}",
        bin.display()
    );
    bin
}

fn qemu(kernel: &Path, append: Option<&str>) -> Runner {
    let mut cmd: Vec<String> = [
        "qemu-system-x86_64",
        "-enable-kvm",
        "-M",
        "microvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        "64",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cmd.push(kernel.display().to_string());
    if let Some(a) = append {
        cmd.push("-append".into());
        cmd.push(a.into());
    }
    // isa-debug-exit with 0 exits with status 1.
    Runner {
        name: "qemu microvm",
        cmd,
        ok_status: &[1],
    }
}

fn runner_command(r: &Runner) -> Command {
    let mut c = Command::new(&r.cmd[0]);
    c.args(&r.cmd[1..]);
    c
}

fn cellvm(bin: &Path, kernel: Option<&Path>, cmdline: Option<&str>) -> Runner {
    let mut cmd = vec![
        bin.display().to_string(),
        "run".into(),
        "--cpus".into(),
        "1".into(),
        "--memory".into(),
        "64".into(),
    ];
    if let Some(k) = kernel {
        cmd.push("--kernel".into());
        cmd.push(k.display().to_string());
    }
    if let Some(c) = cmdline {
        cmd.push("--cmdline".into());
        cmd.push(c.into());
    }
    Runner {
        name: "cellvm",
        cmd,
        ok_status: &[0],
    }
}

/// The benchmark's scratch disk: 64 MiB (quick) or 256 MiB of pseudo-random bytes.
fn bench_disk(work: &Path, quick: bool) -> PathBuf {
    let disk_img = work.join("disk.img");
    let size_mib = if quick { 64 } else { 256 };
    let mut data = vec![0u8; size_mib << 20];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_exact_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    std::fs::write(&disk_img, &data).unwrap();
    disk_img
}

/// Scenario 4's block rows.
fn block_rows(
    bin: &Path,
    work: &Path,
    disk_img: &Path,
    quick: bool,
    runs: usize,
    rows: &mut Vec<Row>,
) {
    let bin = bin.to_path_buf();
    let work = work.to_path_buf();
    // Scenario 4: block I/O from the guest's CPL 3 driver: our backend against
    // qemu-storage-daemon behind the same VMM and guest, and against the host itself;
    // then the same disk as a fully allocated qcow2, our backend against
    // qemu-storage-daemon's qcow2 driver on the same file, and against our raw.
    let bench_ms = if quick { 300 } else { 2000 };
    let n = runs.min(5);
    let (ours, qsd) = blk_pair(
        &bin,
        &work,
        &format!("path={}", disk_img.display()),
        &[format!(
            "driver=file,node-name=top,filename={}",
            disk_img.display()
        )],
        bench_ms,
        n,
    );
    let (mut hi, mut hm) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (i, m) = host_reads(disk_img, bench_ms);
        hi.push(i);
        hm.push(m);
    }
    let qcow2_img = work.join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(disk_img)
        .arg(&qcow2_img)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img convert");
    let (ours_q, qsd_q) = blk_pair(
        &bin,
        &work,
        &format!("path={},format=qcow2", qcow2_img.display()),
        &[
            format!("driver=file,node-name=f0,filename={}", qcow2_img.display()),
            "driver=qcow2,node-name=top,file=f0".into(),
        ],
        bench_ms,
        n,
    );
    let metrics = [
        ("4 KiB random read", "IOPS"),
        ("4 KiB random write", "IOPS"),
        ("1 MiB sequential read", "MB/s"),
    ];
    for (k, (what, metric)) in metrics.iter().enumerate() {
        rows.push(row(
            &format!("4. block, {what}"),
            metric,
            ours[k].clone(),
            "qemu-storage-daemon",
            qsd[k].clone(),
        ));
    }
    rows.push(row(
        "4. block, 4 KiB random read",
        "IOPS",
        ours[0].clone(),
        "host pread (QD1)",
        hi,
    ));
    rows.push(row(
        "4. block, 1 MiB sequential read",
        "MB/s",
        ours[2].clone(),
        "host pread",
        hm,
    ));
    for (k, (what, metric)) in metrics.iter().enumerate() {
        rows.push(row(
            &format!("4q. qcow2 (allocated), {what}"),
            metric,
            ours_q[k].clone(),
            "qemu-storage-daemon qcow2",
            qsd_q[k].clone(),
        ));
    }
    for (k, (what, metric)) in metrics.iter().enumerate() {
        rows.push(row(
            &format!("4q. qcow2 (allocated), {what}"),
            metric,
            ours_q[k].clone(),
            "cellvm on raw",
            ours[k].clone(),
        ));
    }
}

fn main() {
    let args = Args::parse();
    let runs = if args.quick { 1 } else { args.runs.max(1) };
    let root = repo_root();
    let bin = cellvm_binary(&root);
    let work = std::env::temp_dir().join(format!("cellvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    // The yardstick guest of tests/yardstick: a whole ELF file in one assembly source.
    let src = root.join("tests/yardstick/yardstick.S");
    let (obj, tiny) = (work.join("yardstick.o"), work.join("yardstick.elf"));
    for (tool, args) in [
        (
            "as",
            vec![
                "--64".as_ref(),
                "-o".as_ref(),
                obj.as_os_str(),
                src.as_os_str(),
            ],
        ),
        (
            "objcopy",
            vec![
                "-O".as_ref(),
                "binary".as_ref(),
                obj.as_os_str(),
                tiny.as_os_str(),
            ],
        ),
    ] {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} (binutils): {e}"));
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let guest = work.join("cellvm-testguest.elf");
    let st = Command::new(&bin)
        .args(["testguest", "--output"])
        .arg(&guest)
        .status()
        .unwrap();
    assert!(st.success());

    let mut rows = Vec::new();
    if args.block_only {
        let disk_img = bench_disk(&work, args.quick);
        block_rows(&bin, &work, &disk_img, args.quick, runs, &mut rows);
        print_table(runs, &rows);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    if args.net_only {
        net_rows(&bin, &guest, args.quick, runs, &mut rows);
        print_table(runs, &rows);
        write_json(args.json.as_deref(), &rows);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    if args.snapshot_only {
        snapshot::rows(&bin, &guest, &work, args.quick, runs, &mut rows);
        print_table(runs, &rows);
        write_json(args.json.as_deref(), &rows);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    if args.fs_only {
        fs::rows(&bin, &guest, &work, args.quick, runs, &mut rows);
        print_table(runs, &rows);
        write_json(args.json.as_deref(), &rows);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    if args.vsock_only {
        vsock_rows(&bin, &work, args.quick, runs, &mut rows);
        print_table(runs, &rows);
        write_json(args.json.as_deref(), &rows);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    if args.control_plane_only {
        let report = control_plane(&root, &bin, &guest, &work, args.quick, &mut rows);
        print_table(runs, &rows);
        print_lines(&report);
        write_json(args.json.as_deref(), &rows);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    compare(
        "1. start-up, yardstick",
        &cellvm(&bin, Some(&tiny), None),
        &qemu(&tiny, None),
        runs,
        &mut rows,
    );
    compare(
        "1. start-up, test guest tests=none",
        &cellvm(&bin, None, Some("tests=none")),
        &qemu(&guest, Some("tests=none")),
        runs,
        &mut rows,
    );

    // Scenario 2: the same guests launched through cellvm-jailer with every layer on.
    let jailer = bin.with_file_name("cellvm-jailer");
    let images = work.join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(&tiny, images.join("tiny-pvh.elf")).unwrap();
    let policy = work.join("tenant.toml");
    let example = std::fs::read_to_string(root.join("policy/tenants/example.toml")).unwrap();
    std::fs::write(
        &policy,
        example.replace("/var/lib/cellvm/images/example", images.to_str().unwrap()),
    )
    .unwrap();
    let spec_none = work.join("vm-none.toml");
    std::fs::write(
        &spec_none,
        "name = \"bench\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=none\"\n",
    )
    .unwrap();
    let spec_tiny = work.join("vm-tiny.toml");
    let tiny_in_dir = images.join("tiny-pvh.elf");
    std::fs::write(
        &spec_tiny,
        format!(
            "name = \"tiny\"\nvcpus = 1\nmemory_mib = 64\nkernel = \"{}\"\n",
            tiny_in_dir.display()
        ),
    )
    .unwrap();
    let jailed = |spec: &Path| jailer_launch(&jailer, &policy, spec, false);
    let mut direct_none = cellvm(&bin, None, Some("tests=none"));
    direct_none.name = "cellvm run (unjailed)";
    let mut direct_tiny = cellvm(&bin, Some(&tiny_in_dir), None);
    direct_tiny.name = "cellvm run (unjailed)";
    compare(
        "2. jailed launch, tiny-pvh",
        &jailed(&spec_tiny),
        &direct_tiny,
        runs,
        &mut rows,
    );
    compare(
        "2. jailed launch, tests=none",
        &jailed(&spec_none),
        &direct_none,
        runs,
        &mut rows,
    );
    // The same with virtio-blk, virtio-net (a tap) and virtio-rng: three backend cells
    // besides the VMM's (unjailed, the VMM starts the same three backends itself).
    let devs_net = BenchNet::new();
    let devs_disk = images.join("devs-disk.img");
    std::fs::write(&devs_disk, vec![0u8; 1 << 20]).unwrap();
    let policy_devs = work.join("tenant-devs.toml");
    std::fs::write(
        &policy_devs,
        example
            .replace("/var/lib/cellvm/images/example", images.to_str().unwrap())
            .replace("taps = [\"cvex*\"]", "taps = [\"cvb*\"]")
            .replace(
                "tap_netns = \"cellvm-example\"",
                &format!("tap_netns = \"{}\"", devs_net.0),
            ),
    )
    .unwrap();
    let spec_devs = work.join("vm-devs.toml");
    std::fs::write(
        &spec_devs,
        format!(
            "name = \"devs\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=none\"\nrng = true\ndisks = [{{ path = \"{}\" }}]\nnets = [{{ tap = \"cvb0\" }}]\n",
            devs_disk.display()
        ),
    )
    .unwrap();
    let devs_disk_arg = format!("path={}", devs_disk.display());
    let mut direct_devs = cellvm(&bin, None, Some("tests=none")).with_args([
        "--disk",
        &devs_disk_arg,
        "--rng",
        "--net",
        "tap=cvb0",
    ]);
    devs_net.wrap(&mut direct_devs);
    direct_devs.name = "cellvm run (unjailed)";
    compare(
        "2. jailed launch, tests=none, blk + net + rng",
        &jailer_launch(&jailer, &policy_devs, &spec_devs, false),
        &direct_devs,
        runs,
        &mut rows,
    );
    drop(devs_net);
    if args.restart_only {
        restart::rows(&jailer, &example, &work, runs, &mut rows);
        print_table(runs, &rows);
        write_json(args.json.as_deref(), &rows);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    let supervisor_rss = supervisor_rss_kib(&jailer, &policy, &work);
    if args.launch_only {
        print_table(runs, &rows);
        println!("jailer supervisor RSS while a VM runs: {supervisor_rss} KiB");
        let _ = std::fs::remove_dir_all(&work);
        return;
    }

    // Scenario 3 without devices: RSS and PSS of a running 128 MiB VM, sampled while
    // the guest holds.
    let (mut vr, mut vp, mut qr, mut qp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.min(5) {
        let c = resident_tree(&cellvm(&bin, None, Some("tests=none hold=2")).with_128_mib());
        let q = resident_tree(&qemu(&guest, Some("tests=none hold=2")).with_128_mib());
        vr.push(c.0);
        vp.push(c.1);
        qr.push(q.0);
        qp.push(q.1);
    }
    memory_rows(
        "3. memory, 128 MiB VM, no devices",
        "qemu microvm",
        [vr, vp, qr, qp],
        &mut rows,
    );

    // Scenario 3 with devices: the VMM and its backends (virtio-blk, virtio-net on a
    // tap, virtio-rng), each a process of its own, against QEMU with the same devices.
    let disk_img = bench_disk(&work, args.quick);
    let disk_arg = format!("path={}", disk_img.display());
    let mut cellvm_dev = cellvm(&bin, None, Some("tests=none hold=2"))
        .with_128_mib()
        .with_args(["--disk", &disk_arg, "--rng", "--net", "tap=cvb0"]);
    let net = BenchNet::new();
    net.wrap(&mut cellvm_dev);
    let mut qemu_dev = qemu(&guest, Some("tests=none hold=2"))
        .with_128_mib()
        .with_pcie();
    qemu_dev.cmd.extend([
        "-drive".into(),
        format!("file={},if=none,id=d0,format=raw", disk_img.display()),
        "-device".into(),
        "virtio-blk-pci,drive=d0,disable-legacy=on".into(),
        "-device".into(),
        "virtio-rng-pci,disable-legacy=on".into(),
        "-netdev".into(),
        "tap,id=n0,ifname=cvb0,script=no,downscript=no".into(),
        "-device".into(),
        "virtio-net-pci,netdev=n0,disable-legacy=on".into(),
    ]);
    net.wrap(&mut qemu_dev);
    let (mut vr, mut vp, mut qr, mut qp, mut vmm_rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut be_rss: Vec<(String, Vec<f64>)> = Vec::new();
    for _ in 0..runs.min(5) {
        let c = resident_tree(&cellvm_dev);
        let q = resident_tree(&qemu_dev);
        vr.push(c.0);
        vp.push(c.1);
        vmm_rss.push(c.2);
        assert_eq!(c.3.len(), 3, "three backends: {:?}", c.3);
        for (role, rss) in c.3 {
            match be_rss.iter_mut().find(|b| b.0 == role) {
                Some(b) => b.1.push(rss),
                None => be_rss.push((role, vec![rss])),
            }
        }
        qr.push(q.0);
        qp.push(q.1);
    }
    drop(net);
    memory_rows(
        "3. memory, 128 MiB VM, disk+net+rng",
        "qemu microvm (same devices)",
        [vr, vp, qr, qp],
        &mut rows,
    );
    let vmm_rss = stats(vmm_rss);
    let be_rss: Vec<String> = be_rss
        .into_iter()
        .map(|(role, v)| format!("{role} {:.2}", stats(v).median))
        .collect();

    block_rows(&bin, &work, &disk_img, args.quick, runs, &mut rows);

    net_rows(&bin, &guest, args.quick, runs, &mut rows);

    // Scenario 5: launch rate: N VMs started at once, VMs per second per core.
    let n = if args.quick { 4 } else { 32 };
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1) as f64;
    let (mut ja, mut qa) = (Vec::new(), Vec::new());
    for _ in 0..runs.min(10) {
        ja.push(launch_rate(&jailed(&spec_none), n) / cores);
        qa.push(launch_rate(&qemu(&guest, Some("tests=none")), n) / cores);
    }
    rows.push(row(
        &format!("5. launch rate, {n} at once (jailed)"),
        "VMs/s/core",
        ja,
        "qemu microvm",
        qa,
    ));

    // Scenario 6: density. Idle jailed test-guest VMs of 128 MiB each (their guests
    // halted at CPL 0) against idle QEMU microvms booting the same guest, with KSM off
    // and on. QEMU's count is smaller (it would not fit a thousand times); what compares
    // is the host memory each VM costs, and from it how many fit.
    let (n_cellvm, n_qemu) = if args.quick { (4, 2) } else { (1000, 50) };
    let spec_idle = work.join("vm-idle.toml");
    let spec_idle_ksm = work.join("vm-idle-ksm.toml");
    let idle = "vcpus = 1\nmemory_mib = 128\ncmdline = \"idle\"\n";
    std::fs::write(&spec_idle, format!("name = \"idle\"\n{idle}")).unwrap();
    std::fs::write(
        &spec_idle_ksm,
        format!("name = \"idle\"\n{idle}ksm = true\n"),
    )
    .unwrap();
    // A tenant with room for a thousand VMs: uids, and KSM allowed.
    let dense_policy = work.join("tenant-dense.toml");
    std::fs::write(
        &dense_policy,
        std::fs::read_to_string(&policy)
            .unwrap()
            .replace(
                "uid_range = [200000, 200999]",
                "uid_range = [300000, 309999]",
            )
            .replace("ksm = false", "ksm = true"),
    )
    .unwrap();
    let dense = |spec: &Path| jailer_launch(&jailer, &dense_policy, spec, true);
    let qemu_idle = qemu(&guest, Some("idle")).with_128_mib();
    let total_mib = meminfo_kib("MemTotal:") / 1024.0;
    let mut density_lines = Vec::new();
    for ksm_on in [false, true] {
        let ksm = ksm_on.then(KsmOn::new);
        let spec = if ksm_on { &spec_idle_ksm } else { &spec_idle };
        let (cn, cmib) = density(&dense(spec), n_cellvm, ksm.as_ref());
        let (qn, qmib) = density(&qemu_idle, n_qemu, ksm.as_ref());
        let label = if ksm_on { "KSM on" } else { "KSM off" };
        density_lines.push(format!(
            "scenario 6, {label}: cellvm ran {cn} (of {n_cellvm} asked), {cmib:.2} MiB each; qemu ran {qn} (of {n_qemu}), {qmib:.2} MiB each; host {total_mib:.0} MiB"
        ));
        // How many would fit in 90% of the host's memory at that cost.
        let fit = |mib: f64| (total_mib * 0.9 / mib.max(0.01)).floor();
        for (metric, a, b) in [
            ("host MiB/VM", cmib, qmib),
            ("VMs that fit", fit(cmib), fit(qmib)),
        ] {
            rows.push(row(
                &format!("6. density, idle 128 MiB, {label}"),
                metric,
                vec![a],
                "qemu microvm",
                vec![b],
            ));
        }
        if args.quick {
            assert_eq!(
                cn, n_cellvm,
                "every cellvm VM of the quick density run came up"
            );
        }
    }

    vsock_rows(&bin, &work, args.quick, runs, &mut rows);
    restart::rows(&jailer, &example, &work, runs, &mut rows);
    fs::rows(&bin, &guest, &work, args.quick, runs, &mut rows);
    snapshot::rows(&bin, &guest, &work, args.quick, runs, &mut rows);
    let control = control_plane(&root, &bin, &guest, &work, args.quick, &mut rows);

    print_table(runs, &rows);
    print_lines(&control);
    println!("peers: scenarios 1 and 5: qemu microvm; scenario 2: the same cellvm run without the jailer");
    println!("jailer supervisor RSS while a VM runs: {supervisor_rss} KiB");
    println!(
        "scenario 3 with devices: VMM RSS {:.2} MiB; backend RSS (MiB, medians): {}",
        vmm_rss.median,
        be_rss.join(", ")
    );
    println!("scenario 8: the test guest's CPL 3 vsock driver through cellvm's vsock backend to host Unix sockets (32 KiB packets within the device's credit; one-byte round trips), vs two host threads on a Unix socket pair doing the same (the ceiling: no VM, no device); goal >= 1,000 MB/s guest -> host");
    println!("scenario 4: cellvm with its blk backend vs the same VMM and guest with qemu-storage-daemon, and vs the host reading the file; 4q: the same disk as a fully allocated qcow2 (64 KiB clusters), vs qemu-storage-daemon's qcow2 driver on the same file and vs cellvm on the raw file");
    for l in &density_lines {
        println!("{l}");
    }
    write_json(args.json.as_deref(), &rows);
    let _ = std::fs::remove_dir_all(&work);
}

/// Scenario 4, net: transmit and receive against QEMU's virtio-net on the same tap.
fn net_rows(bin: &Path, guest: &Path, quick: bool, runs: usize, rows: &mut Vec<Row>) {
    // Scenario 4, net: transmit rate from the guest's CPL 3 driver through a tap, our
    // net backend against QEMU's own virtio-net on the same tap (no vhost-net here),
    // the same guest in both.
    let net = BenchNet::new();
    let (mut of, mut om, mut qf, mut qm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let net_ms = if quick { 300 } else { 2000 };
    for _ in 0..runs.min(5) {
        let mut ours = cellvm(
            bin,
            None,
            Some(&format!("tests=netbench bench_ms={net_ms}")),
        )
        .with_args(["--net", "tap=cvb0"]);
        net.wrap(&mut ours);
        let line = guest_check(runner_command(&ours), "netbench");
        of.push(number(&line, "fps="));
        om.push(number(&line, "mbps="));
        let mut peer = qemu(
            guest,
            Some(&format!("tests=netbench bench_ms={net_ms} ecam=0xe0000000")),
        )
        .with_pcie()
        .with_args([
            "-netdev",
            "tap,id=n0,ifname=cvb0,script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=n0,disable-legacy=on",
        ]);
        net.wrap(&mut peer);
        let line = guest_check(runner_command(&peer), "netbench");
        qf.push(number(&line, "fps="));
        qm.push(number(&line, "mbps="));
    }
    // Receive: the host floods the guest through the same tap; mergeable receive
    // buffers negotiated on both sides.
    let (mut orf, mut qrf) = (Vec::new(), Vec::new());
    for _ in 0..runs.min(5) {
        let cmdline = format!("tests=netrxbench bench_ms={net_ms}");
        let mut ours = cellvm(bin, None, Some(&cmdline))
            .with_args(["--net", "tap=cvb0,mac=02:00:0a:4d:00:02"]);
        net.wrap(&mut ours);
        let mut peer = qemu(guest, Some(&format!("{cmdline} ecam=0xe0000000")))
            .with_pcie()
            .with_args([
                "-netdev",
                "tap,id=n0,ifname=cvb0,script=no,downscript=no",
                "-device",
                "virtio-net-pci,netdev=n0,disable-legacy=on,mac=02:00:0a:4d:00:02,mrg_rxbuf=on",
            ]);
        net.wrap(&mut peer);
        for (runner, out) in [(&ours, &mut orf), (&peer, &mut qrf)] {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flood = net.flood(stop.clone());
            let line = guest_check(runner_command(runner), "netrxbench");
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            flood.join().unwrap();
            assert!(line.contains("mrg_rxbuf=true"), "{line}");
            out.push(number(&line, "fps="));
        }
    }
    drop(net);
    for (metric, a, b) in [("frames/s", of, qf), ("MB/s", om, qm)] {
        rows.push(row(
            "4. net, 1,454-byte frames out",
            metric,
            a,
            "qemu virtio-net (tap)",
            b,
        ));
    }
    rows.push(row(
        "4. net, 1,442-byte frames in (MRG_RXBUF)",
        "frames/s",
        orf,
        "qemu virtio-net (tap)",
        qrf,
    ));
}

/// A host service for scenario 8 at `path`: `pong` echoes every byte, else every byte
/// is read and counted. Serves one connection; returns the bytes it read.
fn vsock_service(path: PathBuf, pong: bool) -> std::thread::JoinHandle<u64> {
    use std::io::{Read, Write};
    let l = std::os::unix::net::UnixListener::bind(&path).expect("bind a vsock host port");
    std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return 0 };
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += k as u64;
                    if pong && c.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            }
        }
        n
    })
}

/// The same two things between two host threads on a Unix socket pair: (MB/s writing
/// 32 KiB at a time for `ms`, microseconds per one-byte round trip).
fn host_unix_socket(ms: u64) -> (f64, f64) {
    use std::io::{Read, Write};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while let Ok(k) = b.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    let chunk = vec![0x5au8; 32 << 10];
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(ms) {
        a.write_all(&chunk).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    drop(a);
    let mbps = reader.join().unwrap() as f64 / secs / 1e6;
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut x = [0u8; 1];
        while b.read_exact(&mut x).is_ok() {
            if b.write_all(&x).is_err() {
                break;
            }
        }
    });
    let (start, mut rounds) = (Instant::now(), 0u64);
    let mut x = [b'x'];
    while start.elapsed() < Duration::from_millis(ms) {
        a.write_all(&x).unwrap();
        a.read_exact(&mut x).unwrap();
        rounds += 1;
    }
    let rtt_us = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    drop(a);
    echo.join().unwrap();
    (mbps, rtt_us)
}

/// Scenario 8: vsock guest -> host stream throughput and round-trip latency.
fn vsock_rows(bin: &Path, work: &Path, quick: bool, runs: usize, rows: &mut Vec<Row>) {
    let ms = if quick { 300 } else { 2000 };
    let (mut om, mut ol, mut hm, mut hl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs.min(5) {
        let dir = work.join(format!("vsock{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let sink = vsock_service(dir.join("v.sock_5002"), false);
        let pong = vsock_service(dir.join("v.sock_5003"), true);
        let ours = cellvm(bin, None, Some(&format!("tests=vsockbench bench_ms={ms}")))
            .with_args(["--vsock", &format!("cid=3,uds={}", sock.display())]);
        let line = guest_check(runner_command(&ours), "vsockbench");
        let sent = number(&line, "bytes=");
        let got = sink.join().unwrap() as f64;
        assert_eq!(got, sent, "the host sink read what the guest sent: {line}");
        pong.join().unwrap();
        om.push(number(&line, "mbps="));
        ol.push(number(&line, "rtt_us="));
        let (m, l) = host_unix_socket(ms);
        hm.push(m);
        hl.push(l);
    }
    let peer = "host Unix socket pair (ceiling)";
    rows.push(row("8. vsock, guest -> host stream", "MB/s", om, peer, hm));
    rows.push(row("8. vsock, 1-byte round trip", "us", ol, peer, hl));
}

fn write_json(path: Option<&Path>, rows: &[Row]) {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(rows).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// Scenario 7: its rows into `rows`; its goal and note lines returned for printing.
fn control_plane(
    root: &Path,
    bin: &Path,
    guest: &Path,
    work: &Path,
    quick: bool,
    rows: &mut Vec<Row>,
) -> control::Report {
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "cellvmctl",
            "-p",
            "cellvm-jailer",
        ])
        .current_dir(root)
        .status()
        .expect("cargo build");
    let ctl = bin.with_file_name("cellvmctl");
    assert!(
        status.success() && ctl.exists(),
        "cannot build {}",
        ctl.display()
    );
    // The example tenant with room for a thousand VMs (uids of their own).
    let policy = work.join("tenant-control.toml");
    let example = std::fs::read_to_string(root.join("policy/tenants/example.toml")).unwrap();
    std::fs::write(
        &policy,
        example.replace(
            "uid_range = [200000, 200999]",
            "uid_range = [400000, 409999]",
        ),
    )
    .unwrap();
    let report = control::run(&control::Setup {
        ctl: &ctl,
        policy: &policy,
        guest_elf: guest,
        work,
        quick,
    });
    for (scenario, metric, a, peer, b) in &report.rows {
        rows.push(row(scenario, metric, a.clone(), peer, b.clone()));
    }
    report
}

fn print_lines(report: &control::Report) {
    for l in report.goals.iter().chain(&report.notes) {
        println!("{l}");
    }
}

/// The side-by-side table of every row measured.
fn print_table(runs: usize, rows: &[Row]) {
    println!(
        "cellvm-bench: {} run(s) per side, alternating; medians, min-max",
        runs
    );
    println!(
        "{:<36} {:<12} {:>22} {:>22} {:>8}",
        "scenario", "metric", "cellvm", "peer", "ratio"
    );
    for r in rows {
        let cell = |s: &Stats| format!("{:.2} ({:.2}-{:.2})", s.median, s.min, s.max);
        println!(
            "{:<36} {:<12} {:>22} {:>22} {:>8.3}",
            r.scenario,
            r.metric,
            cell(&r.cellvm),
            cell(&r.peer),
            r.ratio
        );
    }
}
