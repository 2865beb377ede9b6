//! cellvm-bench: every scenario runs cellvm and its peer alternately (A B A B ...) in
//! one process, then prints median, min, max and the ratio; `--json PATH` writes the
//! same numbers. Machines here are noisy, so only medians and ratios mean anything.
//!
//! Scenario 1 (start-up): exec -> guest exit, 1 vCPU, 64 MiB, for the shared tiny-pvh
//! yardstick and for the built-in test guest with `tests=none`: `cellvm run` against
//! QEMU's microvm booting the same ELF. Wall time, CPU time (user + system of the
//! child, from wait4) and peak RSS.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;
use serde::Serialize;

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
    let metrics: [(&str, fn(&Sample) -> f64); 3] = [
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

/// Starts `r`, samples its RSS and PSS (MiB, /proc/PID/smaps_rollup) after a second.
fn resident(r: &Runner) -> (f64, f64) {
    let mut child = Command::new(&r.cmd[0])
        .args(&r.cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", r.cmd[0]));
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let rollup =
        std::fs::read_to_string(format!("/proc/{}/smaps_rollup", child.id())).unwrap_or_default();
    let field = |name: &str| -> f64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    let sample = (field("Rss:"), field("Pss:"));
    let _ = child.wait();
    sample
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

fn main() {
    let args = Args::parse();
    let runs = if args.quick { 1 } else { args.runs.max(1) };
    let root = repo_root();
    let bin = cellvm_binary(&root);
    let work = std::env::temp_dir().join(format!("cellvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    let build = root.join("../shared/guests/build.sh");
    let out = Command::new("sh")
        .arg(&build)
        .arg(&work)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", build.display()));
    assert!(
        out.status.success(),
        "{}: {}",
        build.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let tiny = work.join("tiny-pvh.elf");
    let guest = work.join("cellvm-testguest.elf");
    let st = Command::new(&bin)
        .args(["testguest", "--output"])
        .arg(&guest)
        .status()
        .unwrap();
    assert!(st.success());

    let mut rows = Vec::new();
    compare(
        "1. start-up, tiny-pvh",
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
    let jailed = |spec: &Path| Runner {
        name: "cellvm-jailer launch",
        cmd: vec![
            jailer.display().to_string(),
            "launch".into(),
            "--policy".into(),
            policy.display().to_string(),
            "--vm".into(),
            spec.display().to_string(),
        ],
        ok_status: &[0],
    };
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
    let supervisor_rss = supervisor_rss_kib(&jailer, &policy, &work);

    // Scenario 3 (so far without devices: virtio disk, net and rng come with their
    // issue): RSS and PSS of a running 128 MiB VM, sampled while the guest holds.
    let (mut vr, mut vp, mut qr, mut qp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.min(5) {
        let c = resident(&Runner {
            cmd: cellvm(&bin, None, Some("tests=none hold=2"))
                .cmd
                .iter()
                .map(|a| if a == "64" { "128".into() } else { a.clone() })
                .collect(),
            ..cellvm(&bin, None, None)
        });
        let q = resident(&Runner {
            cmd: qemu(&guest, Some("tests=none hold=2"))
                .cmd
                .iter()
                .map(|a| if a == "64" { "128".into() } else { a.clone() })
                .collect(),
            ..qemu(&guest, None)
        });
        vr.push(c.0);
        vp.push(c.1);
        qr.push(q.0);
        qp.push(q.1);
    }
    for (metric, a, b) in [("RSS MiB", vr, qr), ("PSS MiB", vp, qp)] {
        let (a, b) = (stats(a), stats(b));
        rows.push(Row {
            scenario: "3. memory, 128 MiB VM, no devices".into(),
            metric: metric.into(),
            ratio: a.median / b.median,
            cellvm: a,
            peer_name: "qemu microvm".into(),
            peer: b,
        });
    }

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
    let (ja, qa) = (stats(ja), stats(qa));
    rows.push(Row {
        scenario: format!("5. launch rate, {n} at once (jailed)"),
        metric: "VMs/s/core".into(),
        ratio: ja.median / qa.median,
        cellvm: ja,
        peer_name: "qemu microvm".into(),
        peer: qa,
    });

    println!(
        "cellvm-bench: {} run(s) per side, alternating; medians, min-max",
        runs
    );
    println!(
        "{:<36} {:<12} {:>22} {:>22} {:>8}",
        "scenario", "metric", "cellvm", "peer", "ratio"
    );
    for r in &rows {
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
    println!("peers: scenarios 1 and 5: qemu microvm; scenario 2: the same cellvm run without the jailer");
    println!("jailer supervisor RSS while a VM runs: {supervisor_rss} KiB");
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let _ = std::fs::remove_dir_all(&work);
}
