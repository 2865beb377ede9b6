//! The VM's API against an unjailed `cellvm run --api-socket`: lifecycle operations on
//! tiny hand-built guests that tick on COM1 (one byte per tick, the serial output a
//! file the test reads), counters and metrics, and hostile clients that must never stop
//! the VM or the API.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{cellvm, pvh_elf, scratch_dir};

/// How long a tick spins. Ring-0 guest code is slow on the nested hosts we run on
/// (about 300k loop iterations a second): this is some 150 ticks a second there.
const SPIN: u32 = 0x0800;

/// 32-bit guest code: forever { COM1 <- 'T'; spin }; with `honour_button`, after each
/// tick it reads the GED status (port 0x610, read-to-clear) and on the power-button bit
/// writes SLP_EN | SLP_TYP(S5) to the ACPI sleep control port (0x600): powered off.
fn ticker(honour_button: bool) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // 0: mov dx, 0x3f8
    c.extend_from_slice(&[0xb0, b'T', 0xee]); // 4: mov al, 'T'; out dx, al
    c.push(0xb9); // 7: mov ecx, SPIN
    c.extend_from_slice(&SPIN.to_le_bytes());
    // (dec ecx as FF C9: the same in 32- and 64-bit mode, whichever entry is taken)
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]); // 12: dec ecx; jnz 12
    if honour_button {
        c.extend_from_slice(&[0x66, 0xba, 0x10, 0x06]); // 16: mov dx, 0x610
        c.extend_from_slice(&[0xec, 0xa8, 0x01]); // 20: in al, dx; test al, 1
        c.extend_from_slice(&[0x74, 0xe7]); // 23: jz 0
        c.extend_from_slice(&[0x66, 0xba, 0x00, 0x06]); // 25: mov dx, 0x600
        c.extend_from_slice(&[0xb0, 0x34, 0xee]); // 29: mov al, 0x34; out dx, al
        c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // 32: hlt; jmp 32
    } else {
        c.extend_from_slice(&[0xeb, 0xee]); // 16: jmp 0
    }
    c
}

struct Vm {
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
    serial: PathBuf,
}

impl Vm {
    fn start(tag: &str, code: &[u8], extra: &[&str]) -> Vm {
        Vm::start_with(tag, Some(code), extra)
    }

    /// `code`: a hand-built guest; None: the built-in test guest.
    fn start_with(tag: &str, code: Option<&[u8]>, extra: &[&str]) -> Vm {
        let dir = scratch_dir(&format!("api-{tag}"));
        let (sock, serial) = (dir.join("api.sock"), dir.join("serial.out"));
        let mut cmd = cellvm();
        cmd.args(["run", "--memory", "64"]);
        if let Some(code) = code {
            let elf = dir.join("guest.elf");
            std::fs::write(&elf, pvh_elf(code)).unwrap();
            cmd.arg("--kernel").arg(&elf);
        }
        cmd.arg("--serial")
            .arg(format!("file={}", serial.display()))
            .arg("--api-socket")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        let vm = Vm {
            child: Some(child),
            dir,
            sock,
            serial,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = vm.try_request("GET", "/api/v1/vm.info", "") {
                if r.status == 200 && r.json()["state"] == "running" {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the VM's API never came up");
            std::thread::sleep(Duration::from_millis(10));
        }
        vm
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    fn try_request(&self, method: &str, path: &str, body: &str) -> std::io::Result<Reply> {
        let mut s = UnixStream::connect(&self.sock)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        send(&mut s, method, path, body);
        Ok(read_reply(&mut s))
    }

    fn request(&self, method: &str, path: &str, body: &str) -> Reply {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn info(&self) -> serde_json::Value {
        let r = self.request("GET", "/api/v1/vm.info", "");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// The built-in test guest's `tick N` lines so far.
    fn guest_ticks(&self) -> usize {
        self.console()
            .lines()
            .filter(|l| l.starts_with("tick "))
            .count()
    }

    fn ticks(&self) -> u64 {
        std::fs::metadata(&self.serial)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Ticks advance (the guest runs).
    fn assert_ticking(&self) {
        let t0 = self.ticks();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ticks() <= t0 + 2 {
            assert!(
                Instant::now() < deadline,
                "the guest stopped ticking at {t0}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the VMM to exit; its status and stderr.
    fn wait(&mut self, limit: Duration) -> (Option<i32>, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (st.code(), err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the VMM did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or("").to_string()
    }
}

fn send(s: &mut UnixStream, method: &str, path: &str, body: &str) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: vm\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
}

/// Reads one response (Content-Length framed, or none for 204).
fn read_reply(s: &mut UnixStream) -> Reply {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("reading a response head");
        assert!(
            n == 1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    Reply {
        status,
        head,
        body: String::from_utf8(body).unwrap(),
    }
}

/// Every vCPU thread of `pid`: (state letter, wchan).
fn vcpu_threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
        // The state follows the ")" that ends the command name.
        let state = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().chars().next().unwrap_or('?'))
            .unwrap_or('?');
        let wchan = std::fs::read_to_string(t.join("wchan")).unwrap_or_default();
        out.push((state.to_string(), wchan));
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The built-in test guest's `ticks` mode (a tick line every 50 ms, the GED power button
/// handled through its interrupt): pause stops the ticks, resume goes on, shutdown is
/// seen by the guest, which powers off; with `ignore-power-button` the shutdown times out.
#[test]
fn the_built_in_test_guest_pauses_resumes_and_powers_off_on_the_button() {
    let mut vm = Vm::start_with("builtin", None, &["--cmdline", "tests=ticks"]);
    let wait_ticks = |vm: &Vm, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while vm.guest_ticks() < n {
            assert!(Instant::now() < deadline, "{}", vm.console());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_ticks(&vm, 2);
    assert_eq!(vm.request("PUT", "/api/v1/vm.pause", "").status, 204);
    let paused_at = vm.guest_ticks();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        vm.guest_ticks(),
        paused_at,
        "ticks while paused: {}",
        vm.console()
    );
    assert_eq!(vm.request("PUT", "/api/v1/vm.resume", "").status, 204);
    wait_ticks(&vm, paused_at + 3);
    let r = vm.request("PUT", "/api/v1/vm.shutdown", "{\"timeout_ms\":10000}");
    assert_eq!(
        (r.status, r.json()["result"].as_str()),
        (200, Some("powered-off")),
        "{}",
        r.body
    );
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        vm.console().contains("TEST power-button PASS"),
        "{}",
        vm.console()
    );

    let vm = Vm::start_with(
        "builtin-ignore",
        None,
        &["--cmdline", "tests=ticks ignore-power-button"],
    );
    wait_ticks(&vm, 2);
    let r = vm.request("PUT", "/api/v1/vm.shutdown", "{\"timeout_ms\":1000}");
    assert_eq!(
        (r.status, r.json()["result"].as_str()),
        (200, Some("timed-out")),
        "{}",
        r.body
    );
    assert!(
        vm.console().contains("power-button ignored"),
        "{}",
        vm.console()
    );
    let n = vm.guest_ticks();
    wait_ticks(&vm, n + 2);
}

#[test]
fn info_reports_identity_resources_state_and_device_backends() {
    let vm = Vm::start(
        "info",
        &ticker(false),
        &[
            "--cpus",
            "2",
            "--identity",
            "id=vm-info-1,tenant=acme,label=system_u:system_r:cellvm_t:s0:c1,c2,cgroup=/sys/fs/cgroup/x",
            "--rng=on",
        ],
    );
    let i = vm.info();
    assert_eq!(i["id"], "vm-info-1");
    assert_eq!(i["tenant"], "acme");
    assert_eq!(i["label"], "system_u:system_r:cellvm_t:s0:c1,c2");
    assert_eq!(i["cgroup"], "/sys/fs/cgroup/x");
    assert_eq!(
        (i["state"].as_str(), i["reason"].as_str()),
        (Some("running"), Some("booted"))
    );
    assert_eq!(
        (i["vcpus"].as_u64(), i["memory_mib"].as_u64()),
        (Some(2), Some(64))
    );
    let up = i["uptime_ms"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(vm.info()["uptime_ms"].as_u64().unwrap() >= up + 50);
    let devices = i["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(
        (devices[0]["id"].as_str(), devices[0]["kind"].as_str()),
        (Some("rng"), Some("rng"))
    );
    assert_eq!(devices[0]["state"], "connected");
    // The backend cellvm started: a live cellvm-device whose parent is the VMM.
    let pid = devices[0]["pid"].as_u64().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(stat.contains("(cellvm-device)"), "{stat}");
    let ppid: u32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ppid, vm.pid());
}

#[test]
fn pause_parks_every_vcpu_out_of_kvm_run_and_resume_goes_on_both_idempotent() {
    let vm = Vm::start("pause", &ticker(false), &["--cpus", "2"]);
    vm.assert_ticking();
    let t = Instant::now();
    let r = vm.request("PUT", "/api/v1/vm.pause", "");
    let pause = t.elapsed();
    assert_eq!(r.status, 204, "{}", r.body);
    let i = vm.info();
    assert_eq!(
        (i["state"].as_str(), i["reason"].as_str()),
        (Some("paused"), Some("user"))
    );
    let t0 = vm.ticks();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(vm.ticks(), t0, "the guest ticked while paused");
    // Out of KVM_RUN: sleeping in the pause handshake (a futex), not running guest code
    // (the ticker never halts, so in KVM_RUN its thread would be R).
    let threads = vcpu_threads(vm.pid());
    assert_eq!(threads.len(), 2, "{threads:?}");
    for (state, wchan) in &threads {
        assert_eq!(state, "S", "{threads:?}");
        assert!(!wchan.contains("kvm"), "{threads:?}");
    }
    // The parked threads still own their vCPUs: they read their registers on request.
    let c = vm.request("GET", "/api/v1/vm.counters", "").json();
    for v in c["vcpus"].as_array().unwrap() {
        assert!(
            v["rip"].as_str().is_some_and(|r| r.starts_with("0x")),
            "{c}"
        );
        assert!(v["exits"]["interrupted"].as_u64().unwrap() >= 1, "{c}");
    }
    // Idempotent: a second pause changes nothing.
    assert_eq!(vm.request("PUT", "/api/v1/vm.pause", "").status, 204);
    assert_eq!(vm.info()["state"], "paused");
    let t = Instant::now();
    let r = vm.request("PUT", "/api/v1/vm.resume", "");
    let resume = t.elapsed();
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(vm.info()["state"], "running");
    vm.assert_ticking();
    assert_eq!(vm.request("PUT", "/api/v1/vm.resume", "").status, 204);
    vm.assert_ticking();
    // Paused, the guest cannot see the power button: refused, saying why.
    assert_eq!(vm.request("PUT", "/api/v1/vm.pause", "").status, 204);
    let r = vm.request("PUT", "/api/v1/vm.power-button", "");
    assert_eq!(r.status, 409);
    assert!(r.error().contains("paused"), "{}", r.body);
    assert_eq!(vm.request("PUT", "/api/v1/vm.resume", "").status, 204);
    println!("pause round trip {pause:?}, resume round trip {resume:?}");
}

#[test]
fn pause_and_resume_latency_and_info_round_trip() {
    let vm = Vm::start("latency", &ticker(false), &[]);
    let mut s = vm.connect();
    let mut rtt = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        send(&mut s, "GET", "/api/v1/vm.info", "");
        let r = read_reply(&mut s);
        rtt.push(t.elapsed());
        assert_eq!(r.status, 200);
    }
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let t = Instant::now();
        send(&mut s, "PUT", "/api/v1/vm.pause", "");
        assert_eq!(read_reply(&mut s).status, 204);
        pause.push(t.elapsed());
        let t = Instant::now();
        send(&mut s, "PUT", "/api/v1/vm.resume", "");
        assert_eq!(read_reply(&mut s).status, 204);
        resume.push(t.elapsed());
    }
    for v in [&mut rtt, &mut pause, &mut resume] {
        v.sort();
    }
    println!(
        "vm.info round trip: median {:?} p99 {:?}; pause: median {:?} p99 {:?}; resume: median {:?} p99 {:?}",
        percentile(&rtt, 0.5),
        percentile(&rtt, 0.99),
        percentile(&pause, 0.5),
        percentile(&pause, 0.99),
        percentile(&resume, 0.5),
        percentile(&resume, 0.99)
    );
    // Loose bounds (a shared, noisy host): an order of magnitude above the goals.
    assert!(percentile(&rtt, 0.5) < Duration::from_millis(1));
    assert!(percentile(&pause, 0.5) < Duration::from_millis(10));
    assert!(percentile(&resume, 0.5) < Duration::from_millis(10));
    vm.assert_ticking();
}

#[test]
fn shutdown_presses_the_power_button_and_a_guest_that_honours_it_powers_off() {
    let mut vm = Vm::start("shutdown", &ticker(true), &[]);
    vm.assert_ticking();
    let r = vm.request("PUT", "/api/v1/vm.shutdown", "{\"timeout_ms\": 10000}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["result"], "powered-off");
    assert!(r.head.contains("Connection: close"), "{}", r.head);
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn shutdown_of_a_guest_that_ignores_the_button_times_out_and_conflicts_meanwhile() {
    let mut vm = Vm::start("ignore", &ticker(false), &["--reset-exit-code", "3"]);
    let sock = vm.sock.clone();
    let waiter = |timeout: u64| {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let t = Instant::now();
            send(
                &mut s,
                "PUT",
                "/api/v1/vm.shutdown",
                &format!("{{\"timeout_ms\":{timeout}}}"),
            );
            (read_reply(&mut s), t.elapsed())
        })
    };
    let first = waiter(1500);
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.info()["state"] != "shutting-down" {
        assert!(Instant::now() < deadline, "no shutdown job");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A second shutdown waits with the first.
    let second = waiter(60_000);
    let jobs = vm.request("GET", "/api/v1/vm.jobs", "").json();
    assert_eq!(jobs["jobs"][0]["kind"], "shutdown", "{jobs}");
    assert_eq!(jobs["jobs"][0]["state"], "running", "{jobs}");
    for op in ["vm.pause", "vm.resume", "vm.reboot"] {
        let r = vm.request("PUT", &format!("/api/v1/{op}"), "");
        assert_eq!(r.status, 409, "{op}: {}", r.body);
        assert!(r.error().contains("shutdown"), "{op}: {}", r.body);
    }
    // Another press is allowed, and the guest still runs (it ignores the button).
    assert_eq!(vm.request("PUT", "/api/v1/vm.power-button", "").status, 204);
    vm.assert_ticking();
    for (w, least) in [(first, 1400), (second, 0)] {
        let (r, took) = w.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["result"], "timed-out");
        assert!(took >= Duration::from_millis(least), "{took:?}");
    }
    let i = vm.info();
    assert_eq!(
        (i["state"].as_str(), i["reason"].as_str()),
        (Some("running"), Some("power-button"))
    );
    let jobs = vm.request("GET", "/api/v1/vm.jobs", "").json();
    assert_eq!(jobs["jobs"][0]["state"], "timed-out", "{jobs}");
    // A finished job's duration stays what it was.
    let took = jobs["jobs"][0]["elapsed_ms"].as_u64().unwrap();
    assert!((1500..5000).contains(&took), "{jobs}");
    std::thread::sleep(Duration::from_millis(100));
    let again = vm.request("GET", "/api/v1/vm.jobs", "").json();
    assert_eq!(
        again["jobs"][0]["elapsed_ms"].as_u64(),
        Some(took),
        "{again}"
    );
    // The caller may then destroy; here a reboot: 204, then the reset exit code.
    let r = vm.request("PUT", "/api/v1/vm.reboot", "");
    assert_eq!(r.status, 204, "{}", r.body);
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(3), "{err}");
}

/// A running job can be cancelled by its id: the shutdown stops waiting, its waiter is
/// told, the VM runs again and may be shut down anew; a job that is not running is 404.
#[test]
fn a_shutdown_job_is_cancelled_by_its_id_and_the_vm_runs_on() {
    let vm = Vm::start("cancel", &ticker(false), &[]);
    let sock = vm.sock.clone();
    let waiter = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let t = Instant::now();
        send(
            &mut s,
            "PUT",
            "/api/v1/vm.shutdown",
            "{\"timeout_ms\":60000}",
        );
        (read_reply(&mut s), t.elapsed())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.info()["state"] != "shutting-down" {
        assert!(Instant::now() < deadline, "no shutdown job");
        std::thread::sleep(Duration::from_millis(5));
    }
    let jobs = vm.request("GET", "/api/v1/vm.jobs", "").json();
    let id = jobs["jobs"][0]["id"].as_u64().expect("a job id");
    assert_eq!(jobs["jobs"][0]["state"], "running", "{jobs}");
    let r = vm.request("PUT", "/api/v1/vm.jobs.cancel", "");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().starts_with("id:"), "{}", r.body);
    let r = vm.request(
        "PUT",
        "/api/v1/vm.jobs.cancel",
        &format!("{{\"id\":{}}}", id + 1),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let r = vm.request("PUT", "/api/v1/vm.jobs.cancel", &format!("{{\"id\":{id}}}"));
    assert_eq!(r.status, 204, "{}", r.body);
    let (reply, took) = waiter.join().unwrap();
    assert_eq!(reply.json()["result"], "cancelled", "{}", reply.body);
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(vm.info()["state"], "running");
    let jobs = vm.request("GET", "/api/v1/vm.jobs", "").json();
    assert_eq!(jobs["jobs"][0]["state"], "cancelled", "{jobs}");
    let r = vm.request("PUT", "/api/v1/vm.jobs.cancel", &format!("{{\"id\":{id}}}"));
    assert_eq!(r.status, 404, "a finished job: {}", r.body);
    // Not blocked any more: pause is served again.
    assert_eq!(vm.request("PUT", "/api/v1/vm.pause", "").status, 204);
    assert_eq!(vm.request("PUT", "/api/v1/vm.resume", "").status, 204);
    vm.assert_ticking();
}

#[test]
fn sigterm_is_one_press_of_the_power_button() {
    let mut vm = Vm::start("sigterm", &ticker(true), &[]);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    // A guest that ignores the button keeps running after SIGTERM.
    let vm = Vm::start("sigterm-ignored", &ticker(false), &[]);
    // SAFETY: as above.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    vm.assert_ticking();
    let i = vm.info();
    assert_eq!(
        (i["state"].as_str(), i["reason"].as_str()),
        (Some("running"), Some("power-button"))
    );
}

#[test]
fn a_guest_reset_ends_with_the_reset_exit_code() {
    // mov al, 0xfe; out 0x64, al (i8042 reset); hlt
    let code = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
    let dir = scratch_dir("api-reset");
    let elf = dir.join("reset.elf");
    std::fs::write(&elf, pvh_elf(&code)).unwrap();
    for (extra, want) in [(vec![], 0), (vec!["--reset-exit-code", "3"], 3)] {
        let out = common::run(
            {
                let mut c = cellvm();
                c.args(["run", "--memory", "64", "--kernel"])
                    .arg(&elf)
                    .args(&extra);
                c
            },
            Duration::from_secs(20),
        );
        assert_eq!(out.code, Some(want), "{}", out.stderr);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn counters_move_and_metrics_are_prometheus_text() {
    let vm = Vm::start("counters", &ticker(false), &["--rng=on"]);
    let io = |c: &serde_json::Value| c["vcpus"][0]["exits"]["io_out"].as_u64().unwrap();
    let a = vm.request("GET", "/api/v1/vm.counters", "").json();
    vm.assert_ticking();
    let b = vm.request("GET", "/api/v1/vm.counters", "").json();
    assert!(io(&b) > io(&a), "{a}\n{b}");
    assert_eq!(b["devices"][0]["id"], "rng");
    assert_eq!(b["devices"][0]["state"], "connected");
    assert!(b["devices"][0]["config_reads"].as_u64().is_some(), "{b}");
    // A backend the VMM started shares a page of counters with it; this guest never
    // asks the rng for a byte.
    assert_eq!(
        b["devices"][0]["backend"],
        serde_json::json!({"requests": 0, "errors": 0, "bytes_to_guest": 0, "bytes_from_guest": 0}),
        "{b}"
    );
    let r = vm.request("GET", "/metrics", "");
    assert_eq!(r.status, 200);
    assert!(
        r.head.contains("Content-Type: text/plain; version=0.0.4"),
        "{}",
        r.head
    );
    let mut samples = 0;
    for line in r.body.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        // name{label="value",...} number
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && name.starts_with("cellvm_"),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
        }
        samples += 1;
    }
    assert!(samples > 10, "{}", r.body);
    assert!(r
        .body
        .contains("cellvm_vm_state{state=\"running\",reason=\"booted\"} 1"));
    assert!(r
        .body
        .contains("cellvm_vcpu_exits_total{vcpu=\"0\",reason=\"io_out\"}"));
    assert!(r
        .body
        .contains("cellvm_device_connected{device=\"rng\",kind=\"rng\"} 1"));
}

#[test]
fn bad_requests_get_clear_errors_and_the_vm_and_api_go_on() {
    let vm = Vm::start("bad", &ticker(false), &[]);
    for (method, path, body, status, names) in [
        (
            "PUT",
            "/api/v1/vm.shutdown",
            "{\"timeout_ms\":",
            400,
            "body:",
        ),
        (
            "PUT",
            "/api/v1/vm.shutdown",
            "[1]",
            400,
            "body: expected a JSON object",
        ),
        (
            "PUT",
            "/api/v1/vm.shutdown",
            "{\"timeout\":5}",
            400,
            "unknown field `timeout`",
        ),
        (
            "PUT",
            "/api/v1/vm.shutdown",
            "{\"timeout_ms\":\"5\"}",
            400,
            "timeout_ms:",
        ),
        (
            "PUT",
            "/api/v1/vm.shutdown",
            "{\"timeout_ms\":0}",
            400,
            "timeout_ms: 0",
        ),
        (
            "PUT",
            "/api/v1/vm.pause",
            "{\"now\":true}",
            400,
            "unknown field `now`",
        ),
        ("GET", "/api/v1/vm.nothing", "", 404, "path:"),
        ("DELETE", "/api/v1/vm.info", "", 405, "method: DELETE"),
        ("GET", "/api/v1/vm.pause", "", 405, "allowed: PUT"),
    ] {
        let r = vm.request(method, path, body);
        assert_eq!(r.status, status, "{method} {path} {body}: {}", r.body);
        assert!(
            r.error().contains(names),
            "{method} {path} {body}: {}",
            r.body
        );
    }
    assert_eq!(
        vm.info()["state"],
        "running",
        "a bad body changed the state"
    );
    // Garbage that is not HTTP: 400 and close.
    let mut s = vm.connect();
    s.write_all(b"\x00\x01\x02 nonsense\r\n\r\n").unwrap();
    let r = read_reply(&mut s);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().contains("request head"), "{}", r.body);
    // A head past 8 KiB: 431.
    let mut s = vm.connect();
    let big = format!(
        "GET /api/v1/vm.info HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    s.write_all(big.as_bytes()).unwrap();
    assert_eq!(read_reply(&mut s).status, 431);
    // A 100 MiB body: 413 at once, without the server reading it (the client's writes
    // stop long before 100 MiB: the server closed).
    let mut s = vm.connect();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let total = 100usize << 20;
    write!(
        s,
        "PUT /api/v1/vm.shutdown HTTP/1.1\r\nContent-Length: {total}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'x'; 1 << 16];
    let mut sent = 0;
    while sent < total {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(
        sent < total / 10,
        "the server read {sent} bytes of a refused body"
    );
    let r = read_reply(&mut s);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.error().contains("body: 104857600 bytes"), "{}", r.body);
    // Chunked bodies are refused (Content-Length only).
    let mut s = vm.connect();
    s.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut s).status, 501);
    assert_eq!(vm.info()["state"], "running");
    vm.assert_ticking();
}

#[test]
fn keep_alive_and_pipelined_requests_on_one_connection() {
    let vm = Vm::start("keepalive", &ticker(false), &[]);
    let mut s = vm.connect();
    for _ in 0..3 {
        send(&mut s, "GET", "/api/v1/vm.info", "");
        assert_eq!(read_reply(&mut s).status, 200);
    }
    // Two requests in one write, an operation between them: three answers in order.
    s.write_all(
        b"GET /api/v1/vm.jobs HTTP/1.1\r\n\r\nPUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /api/v1/vm.info HTTP/1.1\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_reply(&mut s).status, 200);
    assert_eq!(read_reply(&mut s).status, 204);
    let r = read_reply(&mut s);
    assert_eq!(r.json()["state"], "paused");
    send(&mut s, "PUT", "/api/v1/vm.resume", "");
    assert_eq!(read_reply(&mut s).status, 204);
    // Connection: close is honoured.
    s.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_reply(&mut s);
    assert!(r.head.contains("Connection: close"));
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    // An operation the main loop runs is answered first, then the connection closes.
    let mut s = vm.connect();
    s.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_reply(&mut s);
    assert_eq!(r.status, 204);
    assert!(r.head.contains("Connection: close"));
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(vm.info()["state"], "paused");
}

#[test]
fn a_thousand_idle_connections_get_503_beyond_64_and_expire_the_api_goes_on() {
    let vm = Vm::start("idle", &ticker(false), &[]);
    let mut conns = Vec::new();
    for _ in 0..1000 {
        let s = UnixStream::connect(&vm.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        conns.push(s);
    }
    // Beyond 64: an immediate 503; the first 64 stay silent (no request yet).
    std::thread::sleep(Duration::from_millis(500));
    let (mut refused, mut held) = (0, Vec::new());
    for mut s in conns {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 12];
        match s.read(&mut b) {
            Ok(n) if n >= 12 && &b[9..12] == b"503" => refused += 1,
            Ok(n) => panic!("unexpected {:?}", String::from_utf8_lossy(&b[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                s.set_nonblocking(false).unwrap();
                held.push(s)
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, 936, "held {}", held.len());
    assert_eq!(held.len(), 64);
    vm.assert_ticking();
    // The held ones expire (408, then close) within the 5 s request timeout...
    let t = Instant::now();
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = read_reply(&mut s);
        assert_eq!(r.status, 408, "{}", r.body);
        assert!(r.error().contains("not complete within 5 s"), "{}", r.body);
    }
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
    // ... and the API serves again.
    assert_eq!(vm.info()["state"], "running");
    vm.assert_ticking();
}

#[test]
fn a_client_sending_one_byte_a_second_gets_408_and_never_holds_up_others() {
    let vm = Vm::start("slow", &ticker(false), &[]);
    let sock = vm.sock.clone();
    let slow = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let t = Instant::now();
        let mut reply = Vec::new();
        for b in b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\n" {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            let mut buf = [0u8; 512];
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                match s.read(&mut buf) {
                    Ok(0) => return (reply, t.elapsed()),
                    Ok(n) => reply.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
            }
        }
        (reply, t.elapsed())
    });
    // Meanwhile everyone else is served at once.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(vm.info()["state"], "running");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (reply, took) = slow.join().unwrap();
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(8),
        "{took:?}"
    );
    vm.assert_ticking();
}

/// api/openapi.yaml (JSON after its comment lines, so any JSON parser reads it) and the server
/// agree: every path and method in the file answers, every other method on those paths
/// is 405, and a path outside the file is 404.
#[test]
fn the_server_matches_api_openapi_yaml() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("api/openapi.yaml"))
            .unwrap();
    // Its leading comment lines are YAML's; the rest is JSON.
    let json: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let doc: serde_json::Value =
        serde_json::from_str(&json).expect("openapi.yaml is JSON-compatible");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let description = doc["info"]["description"].as_str().unwrap();
    assert!(
        description.contains("| running "),
        "the state table is in the description"
    );
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 11);
    let vm = Vm::start("openapi", &ticker(false), &[]);
    let methods = ["GET", "PUT", "POST", "DELETE", "PATCH"];
    for (path, ops) in paths {
        let ops = ops.as_object().unwrap();
        for m in methods {
            let listed = ops.contains_key(&m.to_ascii_lowercase());
            // Operations that change the VM are left out here (answered in the other
            // tests); GET ones are asked.
            if listed && m == "PUT" {
                let r = vm.request("PUT", path, "{\"bogus\":1}");
                assert_eq!(r.status, 400, "{path}: {}", r.body);
                continue;
            }
            let r = vm.request(m, path, "");
            if listed {
                assert_eq!(r.status, 200, "{m} {path}: {}", r.body);
            } else {
                assert_eq!(r.status, 405, "{m} {path}: {}", r.body);
            }
        }
    }
    for path in ["/api/v1/vm.migrate", "/api/v1/", "/", "/api/v2/vm.info"] {
        assert_eq!(vm.request("GET", path, "").status, 404, "{path}");
    }
}
