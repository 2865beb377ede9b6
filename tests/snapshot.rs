//! Snapshot and restore of unjailed VMs: `vm.snapshot` on the API socket (the state and
//! memory files sent as descriptors, SCM_RIGHTS) and `cellvm run --restore DIR`. The
//! guest runs the test guest's `memload` workload, which checks every word of its RAM
//! above 16 MiB pass after pass: a restore that loses or mixes up a page makes it print
//! a FAIL line, and its console output, concatenated across restores, must count its
//! passes without a gap or a repeat.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cellvm::snapshot::Snapshot;
use cellvmctl::http;
use common::{cellvm, scratch_dir};

const TIMEOUT: Duration = Duration::from_secs(10);

struct Vm {
    child: Option<Child>,
    sock: PathBuf,
    serial: PathBuf,
}

impl Vm {
    /// `cellvm run` of the memload guest (64 MiB, one vCPU) with its API at
    /// DIR/NAME.sock and its console in DIR/NAME.log; `extra` adds flags (--restore).
    fn start(dir: &Path, name: &str, extra: &[&str]) -> Vm {
        let sock = dir.join(format!("{name}.sock"));
        let serial = dir.join(format!("{name}.log"));
        let child = cellvm()
            .args(["run", "--memory", "64", "--cmdline", "tests=memload"])
            .arg(format!("--serial=file={}", serial.display()))
            .arg("--api-socket")
            .arg(&sock)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cellvm");
        let vm = Vm {
            child: Some(child),
            sock,
            serial,
        };
        let deadline = Instant::now() + TIMEOUT;
        while !vm.sock.exists() {
            assert!(
                Instant::now() < deadline,
                "no API socket at {}",
                vm.sock.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // The API answers from the start; the VM is `created` until its main loop runs.
        while vm.info()["state"] == "created" {
            assert!(Instant::now() < deadline, "still created");
            std::thread::sleep(Duration::from_millis(2));
        }
        vm
    }

    fn call(&self, method: &str, op: &str) -> http::Response {
        http::request(&self.sock, method, &format!("/api/v1/{op}"), None, TIMEOUT)
            .unwrap_or_else(|e| panic!("{op}: {e}"))
    }

    fn info(&self) -> serde_json::Value {
        self.call("GET", "vm.info").json().expect("vm.info is JSON")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the console shows `n` more complete pass lines than it does now.
    fn wait_passes(&self, n: usize) {
        let before = common::memload_passes(&self.log()).len();
        let deadline = Instant::now() + TIMEOUT;
        while common::memload_passes(&self.log()).len() < before + n {
            assert!(
                Instant::now() < deadline,
                "memload stalled:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `vm.snapshot` into DIR/state and DIR/memory, created here and sent as descriptors.
fn snapshot(vm: &Vm, dir: &Path) -> http::Response {
    std::fs::create_dir_all(dir).unwrap();
    let open = |name: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(name))
            .unwrap()
    };
    let (state, memory) = (open("state"), open("memory"));
    send_snapshot(vm, &[state.as_raw_fd(), memory.as_raw_fd()])
}

fn send_snapshot(vm: &Vm, fds: &[i32]) -> http::Response {
    let mut c = http::Client::connect(&vm.sock, TIMEOUT).unwrap();
    c.request_with_fds("PUT", "/api/v1/vm.snapshot", None, fds, TIMEOUT)
        .unwrap_or_else(|e| panic!("vm.snapshot: {e}"))
}

/// A VM that has made a couple of passes, paused and saved into DIR/NAME.
fn saved_vm(dir: &Path, name: &str) -> PathBuf {
    let vm = Vm::start(dir, &format!("{name}-vm"), &[]);
    vm.wait_passes(2);
    assert_eq!(vm.call("PUT", "vm.pause").status, 204);
    let snap = dir.join(name);
    let r = snapshot(&vm, &snap);
    assert_eq!(r.status, 200, "{}", r.message());
    snap
}

#[test]
fn ten_restores_in_a_row_go_on_counting_with_every_page_of_ram_intact() {
    let dir = scratch_dir("snapshot-chain");
    let mut vm = Vm::start(&dir, "vm0", &[]);
    let mut logs = vec![vm.serial.clone()];
    for i in 1..=10 {
        vm.wait_passes(2);
        // Only a paused VM is saved.
        let running = snapshot(&vm, &dir.join("refused"));
        assert_eq!(running.status, 409, "{}", running.message());
        assert!(
            running.message().contains("pause it first"),
            "{}",
            running.message()
        );
        assert_eq!(vm.call("PUT", "vm.pause").status, 204);
        let snap = dir.join(format!("snap{i}"));
        let r = snapshot(&vm, &snap);
        assert_eq!(r.status, 200, "{}", r.message());
        let answer = r.json().unwrap();
        // Holes stay holes: the guest touched 48 of its 64 MiB (the workload's pages and
        // its own image), and the memory file holds about that, not all of RAM.
        let written = answer["ram_bytes_written"].as_u64().unwrap();
        assert!((48 << 20..56 << 20).contains(&written), "{answer}");
        let on_disk = std::fs::metadata(snap.join("memory")).unwrap();
        assert_eq!(on_disk.len(), 64 << 20);
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&on_disk) * 512 < 60 << 20,
            "the memory file is not sparse"
        );
        vm.kill();
        vm = Vm::start(
            &dir,
            &format!("vm{i}"),
            &["--restore", snap.to_str().unwrap()],
        );
        let info = vm.info();
        assert_eq!(info["state"], "running", "{info}");
        assert_eq!(info["reason"], "restored", "{info}");
        logs.push(vm.serial.clone());
    }
    vm.wait_passes(3);
    vm.kill();
    let all: String = logs
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let n = common::assert_memload_continuous(&all);
    assert!(n >= 2 * 10 + 3, "{n} passes");
    // Every restored VM made passes of its own.
    for l in &logs[1..] {
        let own = common::memload_passes(&std::fs::read_to_string(l).unwrap());
        assert!(own.len() >= 2, "{}: {own:?}", l.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_workload_sees_a_page_the_snapshot_lost() {
    // The positive control of the check above: the same snapshot with one chunk of
    // the workload's RAM left out of its index restores (the file is consistent) and
    // the guest finds the zeros.
    let dir = scratch_dir("snapshot-lost-page");
    let snap = saved_vm(&dir, "snap");
    let mut s = Snapshot::decode(&std::fs::read(snap.join("state")).unwrap()).unwrap();
    let at = s
        .ram
        .chunks
        .iter()
        .position(|c| c.0 >= 32 << 20)
        .expect("a chunk above 32 MiB");
    s.ram.chunks.remove(at);
    std::fs::write(snap.join("state"), s.encode()).unwrap();
    let vm = Vm::start(&dir, "restored", &["--restore", snap.to_str().unwrap()]);
    let deadline = Instant::now() + TIMEOUT;
    while !vm
        .log()
        .lines()
        .any(|l| l.starts_with("TEST memload FAIL") && l.contains(" got="))
    {
        assert!(Instant::now() < deadline, "no FAIL:\n{}", vm.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(vm.log().contains("got=0x0"), "{}", vm.log());
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restore_can_start_paused_and_run_on_resume() {
    let dir = scratch_dir("snapshot-paused");
    let snap = saved_vm(&dir, "snap");
    let vm = Vm::start(
        &dir,
        "restored",
        &["--restore", snap.to_str().unwrap(), "--paused"],
    );
    assert_eq!(vm.info()["state"], "paused");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        common::memload_passes(&vm.log()).is_empty(),
        "a paused guest ran:\n{}",
        vm.log()
    );
    assert_eq!(vm.call("PUT", "vm.resume").status, 204);
    vm.wait_passes(2);
    assert!(!vm.log().contains("FAIL"), "{}", vm.log());
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_requests_without_two_writable_files_are_refused() {
    let dir = scratch_dir("snapshot-requests");
    let vm = Vm::start(&dir, "vm", &[]);
    vm.wait_passes(1);
    assert_eq!(vm.call("PUT", "vm.pause").status, 204);
    let none = send_snapshot(&vm, &[]);
    assert_eq!(none.status, 400);
    assert!(none.message().contains("send two"), "{}", none.message());
    let ro = File::open(dir.join("vm.log")).unwrap();
    let r = send_snapshot(&vm, &[ro.as_raw_fd(), ro.as_raw_fd()]);
    assert_eq!(r.status, 400);
    assert!(
        r.message().contains("not open for writing"),
        "{}",
        r.message()
    );
    let three = send_snapshot(&vm, &[ro.as_raw_fd(), ro.as_raw_fd(), ro.as_raw_fd()]);
    assert_eq!(three.status, 400);
    assert!(
        three.message().contains("more than 2"),
        "{}",
        three.message()
    );
    let dev = File::open("/dev/null").unwrap();
    let w = OpenOptions::new().write(true).open("/dev/null").unwrap();
    let r = send_snapshot(&vm, &[w.as_raw_fd(), dev.as_raw_fd()]);
    assert!(
        r.message().contains("not a regular file"),
        "{}",
        r.message()
    );
    // The VM is still there, paused, and runs on.
    assert_eq!(vm.info()["state"], "paused");
    assert_eq!(vm.call("PUT", "vm.resume").status, 204);
    vm.wait_passes(1);
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vm_with_virtio_devices_is_not_saved_and_says_why() {
    let dir = scratch_dir("snapshot-devices");
    let sock = dir.join("api.sock");
    let mut child = cellvm()
        .args([
            "run",
            "--memory",
            "64",
            "--rng",
            "--cmdline",
            "tests=memload",
        ])
        .arg("--serial=off")
        .arg("--api-socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let vm = Vm {
        child: None,
        sock,
        serial: dir.join("none"),
    };
    let deadline = Instant::now() + TIMEOUT;
    while !vm.sock.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(vm.call("PUT", "vm.pause").status, 204);
    let r = snapshot(&vm, &dir.join("snap"));
    assert_eq!(r.status, 400);
    assert!(r.message().contains("1 virtio devices"), "{}", r.message());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `cellvm run --restore DIR` with `extra` flags; expects exit 2 before anything
/// runs (no console file) and returns stderr.
fn refused_restore(dir: &Path, snap: &Path, extra: &[&str]) -> String {
    let serial = dir.join("refused.log");
    let _ = std::fs::remove_file(&serial);
    let memory: &[&str] = if extra.contains(&"--memory") {
        &[]
    } else {
        &["--memory", "64"]
    };
    let out = cellvm()
        .args(["run", "--cmdline", "tests=memload"])
        .args(memory)
        .arg(format!("--serial=file={}", serial.display()))
        .arg("--restore")
        .arg(snap)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("cellvm: error: "), "{stderr}");
    assert!(!serial.exists(), "a refused restore ran: {stderr}");
    stderr
}

#[test]
fn damaged_foreign_and_mismatched_snapshots_are_refused_before_anything_runs() {
    let dir = scratch_dir("snapshot-hostile");
    let good = saved_vm(&dir, "good");
    let state = std::fs::read(good.join("state")).unwrap();
    let memory = std::fs::read(good.join("memory")).unwrap();
    let variant = |name: &str, state: &[u8], memory: &[u8]| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state"), state).unwrap();
        std::fs::write(d.join("memory"), memory).unwrap();
        d
    };
    let s = Snapshot::decode(&state).unwrap();

    let cut = variant("truncated", &state[..state.len() / 2], &memory);
    assert!(refused_restore(&dir, &cut, &[]).contains("truncated"));

    let mut flipped = state.clone();
    flipped[state.len() / 3] ^= 0x10;
    let d = variant("flipped", &flipped, &memory);
    assert!(refused_restore(&dir, &d, &[]).contains("checksum mismatch"));

    let mut version = state.clone();
    version[8..12].copy_from_slice(&9u32.to_le_bytes());
    let d = variant("version", &version, &memory);
    let e = refused_restore(&dir, &d, &[]);
    assert!(
        e.contains("format version 9") && e.contains("cellvm 0.1.0"),
        "{e}"
    );

    let d = variant("garbage", &common::stream_bytes(7, 4096), &memory);
    assert!(refused_restore(&dir, &d, &[]).contains("not a cellvm state file"));

    let d = variant("huge", b"", &memory);
    File::options()
        .write(true)
        .open(d.join("state"))
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    assert!(refused_restore(&dir, &d, &[]).contains("limit"));

    let last = s.ram.chunks.last().unwrap();
    let d = variant("short-memory", &state, &memory[..last.0 as usize]);
    assert!(refused_restore(&dir, &d, &[]).contains("memory file: truncated"));

    let mut bad_page = memory.clone();
    bad_page[s.ram.chunks[3].0 as usize + 100] ^= 1;
    let d = variant("bad-page", &state, &bad_page);
    assert!(refused_restore(&dir, &d, &[]).contains("checksum mismatch (the file is damaged"));

    // The snapshot against the VM it goes into.
    let e = refused_restore(&dir, &good, &["--memory", "128"]);
    assert!(e.contains("64 MiB of RAM; the VM spec says 128 MiB"), "{e}");
    let e = refused_restore(&dir, &good, &["--cpus", "2"]);
    assert!(e.contains("holds 1 vCPUs; the VM spec says 2"), "{e}");

    // Missing files are named.
    let e = refused_restore(&dir, &dir.join("nowhere"), &[]);
    assert!(e.contains("nowhere/state"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vm_on_hugepages_is_saved_and_restored_on_hugepages() {
    // hugetlbfs has no write(2): its RAM is loaded through the mapping. The host's 2 MiB
    // pool is sized here (one 64 MiB VM at a time) and put back after.
    const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
    let before = std::fs::read_to_string(POOL).unwrap();
    let pages: u64 = before.trim().parse::<u64>().unwrap() + 40;
    std::fs::write(POOL, pages.to_string()).unwrap();
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(POOL, &self.0);
        }
    }
    let _put_back = Restore(before);
    let dir = scratch_dir("snapshot-hugepages");
    let mut vm = Vm::start(&dir, "src", &["--hugepages", "2M"]);
    vm.wait_passes(2);
    assert_eq!(vm.call("PUT", "vm.pause").status, 204);
    let snap = dir.join("snap");
    let r = snapshot(&vm, &snap);
    assert_eq!(r.status, 200, "{}", r.message());
    let at_pause = vm.log();
    vm.kill();
    let vm = Vm::start(
        &dir,
        "dst",
        &["--hugepages", "2M", "--restore", snap.to_str().unwrap()],
    );
    vm.wait_passes(2);
    let both = format!("{at_pause}{}", vm.log());
    common::assert_memload_continuous(&both);
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vm.snapshot {"incremental": true}` into DIR: its memory file (opened read-write, not
/// truncated) and a new state file that replaces DIR/state once the answer is 200.
fn snapshot_incremental(vm: &Vm, dir: &Path) -> http::Response {
    let memory = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    let new_state = dir.join("state.new");
    let state = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&new_state)
        .unwrap();
    let mut c = http::Client::connect(&vm.sock, TIMEOUT).unwrap();
    let r = c
        .request_with_fds(
            "PUT",
            "/api/v1/vm.snapshot",
            Some(br#"{"incremental":true}"#),
            &[state.as_raw_fd(), memory.as_raw_fd()],
            TIMEOUT,
        )
        .unwrap();
    if r.status == 200 {
        std::fs::rename(&new_state, dir.join("state")).unwrap();
    } else {
        std::fs::remove_file(&new_state).unwrap();
    }
    r
}

#[test]
fn an_incremental_snapshot_rewrites_what_the_guest_wrote_and_restores_whole() {
    let dir = scratch_dir("snapshot-incremental");
    let mut vm = Vm::start(&dir, "src", &[]);
    vm.wait_passes(2);
    assert_eq!(vm.call("PUT", "vm.pause").status, 204);
    let snap = dir.join("snap");
    // Not before a full one.
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("memory"), b"").unwrap();
    let r = snapshot_incremental(&vm, &snap);
    assert_eq!(r.status, 400);
    assert!(r.message().contains("no snapshot yet"), "{}", r.message());
    std::fs::remove_file(snap.join("memory")).unwrap();
    let full = snapshot(&vm, &snap);
    assert_eq!(full.status, 200, "{}", full.message());
    // The guest goes on (every pass rewrites every page above 16 MiB), then the
    // incremental snapshot writes what the dirty log says into the same file.
    assert_eq!(vm.call("PUT", "vm.resume").status, 204);
    vm.wait_passes(3);
    assert_eq!(vm.call("PUT", "vm.pause").status, 204);
    let r = snapshot_incremental(&vm, &snap);
    assert_eq!(r.status, 200, "{}", r.message());
    let v = r.json().unwrap();
    assert_eq!(v["incremental"], true, "{v}");
    assert!(
        v["dirty_chunks"].as_u64().unwrap() >= 190,
        "memload dirties all of it: {v}"
    );
    // Into any other memory file: refused.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("memory"), b"").unwrap();
    let r = snapshot_incremental(&vm, &other);
    assert_eq!(r.status, 400);
    assert!(r.message().contains("not the one"), "{}", r.message());
    let at_pause = vm.log();
    vm.kill();
    // Restored from the updated snapshot: every page is the second pause's (memload
    // would find a page of an older pass), and the passes go on from there.
    let vm = Vm::start(&dir, "dst", &["--restore", snap.to_str().unwrap()]);
    vm.wait_passes(2);
    let both = format!("{at_pause}{}", vm.log());
    common::assert_memload_continuous(&both);
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_idle_guests_incremental_snapshot_writes_next_to_nothing() {
    let dir = scratch_dir("snapshot-incremental-idle");
    let serial = dir.join("idle.log");
    let sock = dir.join("idle.sock");
    let child = cellvm()
        .args(["run", "--memory", "64", "--cmdline", "tests=none hold=600"])
        .arg(format!("--serial=file={}", serial.display()))
        .arg("--api-socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let vm = Vm {
        child: Some(child),
        sock,
        serial,
    };
    let deadline = Instant::now() + TIMEOUT;
    while !vm.log().contains("cellvm-testguest: up") {
        assert!(Instant::now() < deadline, "the guest did not come up");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(vm.call("PUT", "vm.pause").status, 204);
    let snap = dir.join("snap");
    let full = snapshot(&vm, &snap).json().unwrap();
    assert_eq!(vm.call("PUT", "vm.resume").status, 204);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.call("PUT", "vm.pause").status, 204);
    let r = snapshot_incremental(&vm, &snap);
    assert_eq!(r.status, 200, "{}", r.message());
    let inc = r.json().unwrap();
    let dirty = inc["dirty_chunks"].as_u64().unwrap();
    assert!(
        dirty <= 4,
        "an idle guest (its stack, kvmclock) dirtied {dirty} chunks: {inc}"
    );
    assert!(
        inc["ram_bytes_written"].as_u64().unwrap() < full["ram_bytes_written"].as_u64().unwrap(),
        "{full} {inc}"
    );
    drop(vm);
    let restored = Vm::start(&dir, "restored", &["--restore", snap.to_str().unwrap()]);
    assert_eq!(restored.info()["state"], "running");
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}
