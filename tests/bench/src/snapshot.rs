//! Scenario 11 (`--snapshot-only`): saving a paused VM to files and bringing it back,
//! against QEMU's own way of doing the same (a migration to a file, `migrate
//! exec:cat>FILE`, and `-incoming exec:cat FILE` then `cont`), for the built-in test
//! guest running its `memload` workload (every page above 16 MiB written on every pass:
//! RAM as full as it gets) at 128 MiB and, unless quick, 2 GiB, and idle at 128 MiB
//! (`tests=none hold=...`: a few MiB touched). 1 vCPU, microvm for QEMU (its bandwidth
//! limit lifted), no devices.
//!
//! Rows: snapshot (the request on a paused VM until both files are written and, for
//! cellvm, synced; QEMU's migration does not sync), restore (exec until the API says the
//! guest runs; QEMU: exec until `query-status` says running after `cont`), and the
//! memory file's size on disk.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellvmctl::http;

use super::{row, Row};

const LIMIT: Duration = Duration::from_secs(120);

/// What the guest runs: memload (every page above 16 MiB written on every pass, a
/// line per pass) or idle (up, then spinning on the TSC: a few MiB of RAM touched).
#[derive(Clone, Copy)]
enum Workload {
    Memload,
    Idle,
}

impl Workload {
    fn cmdline(self) -> &'static str {
        match self {
            Workload::Memload => "tests=memload",
            Workload::Idle => "tests=none hold=3600",
        }
    }

    fn marker(self) -> &'static str {
        match self {
            Workload::Memload => "memload pass ",
            Workload::Idle => "cellvm-testguest: up",
        }
    }

    /// Marks to wait for before the snapshot, and after the restore.
    fn marks(self) -> (usize, usize) {
        match self {
            Workload::Memload => (2, 1),
            Workload::Idle => (1, 0),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Memload => "memload",
            Workload::Idle => "idle",
        }
    }
}

fn log_marks(log: &Path, w: Workload) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(w.marker())
        .count()
}

fn wait_marks(log: &Path, w: Workload, n: usize, what: &str) {
    let start = Instant::now();
    while log_marks(log, w) < n {
        assert!(start.elapsed() < LIMIT, "{what}: memload stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn api(sock: &Path, method: &str, op: &str) -> http::Response {
    http::request(sock, method, &format!("/api/v1/{op}"), None, LIMIT)
        .unwrap_or_else(|e| panic!("{op}: {e}"))
}

fn cellvm_vm(
    bin: &Path,
    w: Workload,
    mib: u64,
    dir: &Path,
    name: &str,
    restore: Option<&Path>,
) -> Child {
    let mut c = Command::new(bin);
    c.args([
        "run",
        "--memory",
        &mib.to_string(),
        "--cmdline",
        w.cmdline(),
    ])
    .arg(format!(
        "--serial=file={}",
        dir.join(format!("{name}.log")).display()
    ))
    .arg("--api-socket")
    .arg(dir.join(format!("{name}.sock")));
    if let Some(r) = restore {
        c.arg("--restore").arg(r);
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Polls `done` every 100 µs; the time from `start` until it holds.
fn until(start: Instant, what: &str, mut done: impl FnMut() -> bool) -> f64 {
    loop {
        if done() {
            return start.elapsed().as_secs_f64() * 1e3;
        }
        assert!(start.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn running(sock: &Path) -> bool {
    http::request(sock, "GET", "/api/v1/vm.info", None, Duration::from_secs(1))
        .ok()
        .and_then(|r| r.json())
        .is_some_and(|v| v["state"] == "running")
}

/// One cellvm round: (snapshot ms, restore ms, memory file MiB on disk).
fn cellvm_round(bin: &Path, w: Workload, mib: u64, dir: &Path) -> (f64, f64, f64) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let src = Kill(cellvm_vm(bin, w, mib, dir, "src", None));
    wait_marks(&dir.join("src.log"), w, w.marks().0, "cellvm");
    let sock = dir.join("src.sock");
    assert_eq!(api(&sock, "PUT", "vm.pause").status, 204);
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let create = |n: &str| std::fs::File::create_new(snap.join(n)).unwrap();
    let (state, memory) = (create("state"), create("memory"));
    let t = Instant::now();
    let r = http::Client::connect(&sock, LIMIT)
        .and_then(|mut c| {
            c.request_with_fds(
                "PUT",
                "/api/v1/vm.snapshot",
                None,
                &[state.as_raw_fd(), memory.as_raw_fd()],
                LIMIT,
            )
        })
        .unwrap();
    let save_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(r.status, 200, "{}", r.message());
    drop(src);
    let disk = std::fs::metadata(snap.join("memory")).unwrap().blocks() as f64 * 512.0 / 1048576.0;
    let t = Instant::now();
    let dst = Kill(cellvm_vm(bin, w, mib, dir, "dst", Some(&snap)));
    let restore_ms = until(t, "cellvm restore", || running(&dir.join("dst.sock")));
    wait_marks(&dir.join("dst.log"), w, w.marks().1, "restored cellvm");
    drop(dst);
    let _ = std::fs::remove_dir_all(dir);
    (save_ms, restore_ms, disk)
}

/// A QMP connection: the greeting read and capabilities negotiated.
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let start = Instant::now();
        let s = loop {
            if let Ok(s) = UnixStream::connect(path) {
                break s;
            }
            assert!(start.elapsed() < LIMIT, "no QMP socket");
            std::thread::sleep(Duration::from_micros(100));
        };
        let mut q = Qmp(BufReader::new(s));
        q.line();
        q.call(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> serde_json::Value {
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP {l:?}: {e}"))
    }

    /// Sends a command; its `return` (events skipped), or a panic on `error`.
    fn call(&mut self, cmd: &str) -> serde_json::Value {
        self.0.get_mut().write_all(cmd.as_bytes()).unwrap();
        self.0.get_mut().write_all(b"\n").unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "QMP {cmd}: {v}");
        }
    }
}

fn qemu_vm(
    guest: &Path,
    w: Workload,
    mib: u64,
    dir: &Path,
    name: &str,
    incoming: Option<&Path>,
) -> Child {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-enable-kvm",
        "-M",
        "microvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
    ])
    .args([
        "-m",
        &mib.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .arg("-serial")
    .arg(format!(
        "file:{}",
        dir.join(format!("{name}.log")).display()
    ))
    .arg("-qmp")
    .arg(format!(
        "unix:{},server=on,wait=off",
        dir.join(format!("{name}.qmp")).display()
    ))
    .args(["-device", "isa-debug-exit,iobase=0xf4", "-kernel"])
    .arg(guest)
    .args(["-append", w.cmdline()]);
    if let Some(f) = incoming {
        c.arg("-incoming").arg(format!("exec:cat {}", f.display()));
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64")
}

fn qemu_round(guest: &Path, w: Workload, mib: u64, dir: &Path) -> (f64, f64, f64) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let src = Kill(qemu_vm(guest, w, mib, dir, "src", None));
    let mut q = Qmp::connect(&dir.join("src.qmp"));
    wait_marks(&dir.join("src.log"), w, w.marks().0, "qemu");
    q.call(r#"{"execute":"stop"}"#);
    q.call(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400}}"#);
    let file = dir.join("qemu.mig");
    let t = Instant::now();
    q.call(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#,
        file.display()
    ));
    let save_ms = until(t, "qemu migrate", || {
        let s = q.call(r#"{"execute":"query-migrate"}"#);
        assert_ne!(s["status"], "failed", "{s}");
        s["status"] == "completed"
    });
    drop(src);
    let disk = std::fs::metadata(&file).unwrap().blocks() as f64 * 512.0 / 1048576.0;
    let t = Instant::now();
    let dst = Kill(qemu_vm(guest, w, mib, dir, "dst", Some(&file)));
    let mut q = Qmp::connect(&dir.join("dst.qmp"));
    until(t, "qemu incoming", || {
        let s = q.call(r#"{"execute":"query-status"}"#);
        s["status"] != "inmigrate"
    });
    q.call(r#"{"execute":"cont"}"#);
    let restore_ms = until(t, "qemu cont", || {
        q.call(r#"{"execute":"query-status"}"#)["status"] == "running"
    });
    wait_marks(&dir.join("dst.log"), w, w.marks().1, "restored qemu");
    drop(dst);
    let _ = std::fs::remove_dir_all(dir);
    (save_ms, restore_ms, disk)
}

pub fn rows(bin: &Path, guest: &Path, work: &Path, quick: bool, runs: usize, rows: &mut Vec<Row>) {
    let cases: &[(Workload, u64)] = if quick {
        &[(Workload::Memload, 128)]
    } else {
        &[
            (Workload::Idle, 128),
            (Workload::Memload, 128),
            (Workload::Memload, 2048),
        ]
    };
    let runs = if quick { 1 } else { runs.min(5) };
    let dir: PathBuf = work.join("snapshot");
    for &(w, mib) in cases {
        let (mut c, mut q) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            c.push(cellvm_round(bin, w, mib, &dir));
            q.push(qemu_round(guest, w, mib, &dir));
        }
        let scenario = format!("11. snapshot, {mib} MiB {}", w.name());
        let peer = "qemu migrate to file / -incoming";
        let pick = |v: &[(f64, f64, f64)], i: usize| -> Vec<f64> {
            v.iter().map(|t| [t.0, t.1, t.2][i]).collect()
        };
        rows.push(row(&scenario, "save ms", pick(&c, 0), peer, pick(&q, 0)));
        rows.push(row(&scenario, "restore ms", pick(&c, 1), peer, pick(&q, 1)));
        rows.push(row(&scenario, "file MiB", pick(&c, 2), peer, pick(&q, 2)));
    }
}
