//! Device backends that come back: a jailed VM's blk, net and rng backends are killed
//! with SIGKILL while the test guest's `restartloop` keeps writing the disk, asking
//! the rng and ARPing over the net; the supervisor starts each again — in the spare
//! cell it built for it ahead of time, or in a fresh cell when it dies again before
//! that spare is ready — the VMM hands it the rings where the dead one left them, and
//! the guest sees a delay and no error. A backend that keeps dying is given up: its
//! device needs a reset.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// The restarts the supervisor allows one backend within a minute
/// (cellvm_jailer::restart::MAX_RESTARTS).
const MAX_RESTARTS: usize = 5;
/// What the guest's restartloop writes (tests/guest/restart.rs).
const SLOTS: u64 = 64;
const FIRST_SECTOR: u64 = 1024;

fn slot_byte(k: u64, i: usize) -> u8 {
    if i < 8 {
        (k >> (8 * i)) as u8
    } else {
        (k as u8).wrapping_mul(29) ^ (i as u8) ^ ((i >> 8) as u8)
    }
}

/// The host pids of VM `id`'s backends of `kind` (`cellvm-device KIND ...`).
fn backends(id: &str, kind: &str) -> Vec<u32> {
    let procs = format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs");
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|p: &u32| {
            let argv = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let mut words = argv.split(|b| *b == 0);
            words.next() == Some(b"cellvm-device".as_slice())
                && words.next() == Some(kind.as_bytes())
        })
        .collect()
}

/// Waits until the VM's console log says `text`.
fn wait_console(id: &str, text: &str, limit: Duration) {
    let log = Path::new("/run/cellvm/vm").join(id).join("console.log");
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            start.elapsed() < limit,
            "vm {id}: {text:?} never appeared in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn uid_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The spare of the backend that runs as `uid`, if it is built.
fn spare_of(id: &str, uid: u32) -> Option<u32> {
    cgroup_pids(id)
        .iter()
        .filter(|p| is_spare(p))
        .filter_map(|p| p.parse().ok())
        .find(|&p| uid_of(p) == Some(uid))
}

/// How a killed backend came back.
#[derive(Debug, PartialEq)]
enum Back {
    /// In the spare that was waiting when it was killed.
    InItsSpare,
    /// In a fresh cell: it had no spare yet.
    Fresh,
}

/// Kills VM `id`'s one backend of `kind` and waits for the supervisor's new one: its
/// pid, how long it took to exec, and whether it was the spare. With `spare`, first
/// waits until the backend's spare is built.
fn kill_and_wait(id: &str, kind: &str, spare: bool) -> (u32, Duration, Back) {
    let old = backends(id, kind);
    assert_eq!(old.len(), 1, "vm {id}: one {kind} backend, found {old:?}");
    let uid = uid_of(old[0]).expect("the backend's uid");
    let start = Instant::now();
    let mut waiting = spare_of(id, uid);
    while spare && waiting.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "vm {id}: the {kind} backend's spare was never built"
        );
        std::thread::sleep(Duration::from_millis(2));
        waiting = spare_of(id, uid);
    }
    let t0 = Instant::now();
    // SAFETY: kill a process of the test's own VM.
    assert_eq!(unsafe { libc::kill(old[0] as i32, libc::SIGKILL) }, 0);
    loop {
        let now = backends(id, kind);
        if let Some(p) = now.iter().find(|p| !old.contains(p)) {
            let back = if Some(*p) == waiting {
                Back::InItsSpare
            } else {
                Back::Fresh
            };
            assert_eq!(
                uid_of(*p),
                Some(uid),
                "vm {id}: the new {kind} backend's uid"
            );
            return (*p, t0.elapsed(), back);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "vm {id}: no new {kind} backend 5 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct Vm {
    id: String,
    disk: PathBuf,
    spec: PathBuf,
    policy: PathBuf,
    _ns: NetNs,
}

fn vm(tag: &str, cmdline: &str, net: bool) -> Vm {
    let id = format!("rst-{tag}-{}", std::process::id());
    let ns = NetNs::new(tag);
    let policy = test_policy(&ns.name);
    let disk = PathBuf::from(format!("/var/lib/cellvm/images/example/{id}.img"));
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let dir = scratch_dir(&format!("restart-{tag}"));
    let spec = dir.join("vm.toml");
    let nets = if net {
        "nets = [{ tap = \"cvex0\" }]\n"
    } else {
        ""
    };
    std::fs::write(
        &spec,
        format!(
            "name = \"{tag}\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"{cmdline}\"\nrng = true\ndisks = [{{ path = \"{}\" }}]\n{nets}",
            disk.display()
        ),
    )
    .unwrap();
    Vm {
        id,
        disk,
        spec,
        policy,
        _ns: ns,
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.disk);
    }
}

/// Launches `vm` under the jailer on a thread; returns its outcome's handle.
fn launch(vm: &Vm) -> std::thread::JoinHandle<Outcome> {
    let cmd = jailer_command(&vm.id, &vm.policy, &vm.spec);
    std::thread::spawn(move || run(cmd, Duration::from_secs(90)))
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[test]
fn blk_net_and_rng_backends_killed_mid_loop_come_back_and_the_guest_sees_no_error() {
    let _turn = launch_turn();
    let vm = vm("loop", "tests=restartloop bench_ms=5000", true);
    let jailer = launch(&vm);
    wait_console(
        &vm.id,
        "restartloop: running blk=true rng=true net=true",
        Duration::from_secs(30),
    );
    // Kill each kind, and the disk's several times, while the loop runs: each time
    // its spare is ready, but once (the third blk kill) at once after the last restart,
    // before the next spare is due, so that backend comes back in a fresh cell.
    let mut kills = Vec::new();
    for (kind, spare) in [
        ("blk", true),
        ("rng", true),
        ("net", true),
        ("blk", true),
        ("blk", false),
        ("rng", true),
        ("blk", true),
    ] {
        if spare {
            std::thread::sleep(Duration::from_millis(200));
        }
        let (pid, took, back) = kill_and_wait(&vm.id, kind, spare);
        kills.push((kind, pid, took, back));
    }
    let out = jailer.join().unwrap();
    eprintln!("kills (kind, new pid, new cell seen after): {kills:?}");
    eprintln!("the supervisor's log:\n{}", out.stderr);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let line = out.passed("restartloop");
    eprintln!("restartloop {line}");
    // Every backend death was seen and answered with a new cell, none given up: in
    // its spare whenever one waited, else in a fresh cell.
    let spared = kills.iter().filter(|k| k.3 == Back::InItsSpare).count();
    assert!(spared >= 6, "{kills:?}");
    assert_eq!(
        out.stderr
            .matches("started again in its spare cell")
            .count(),
        spared,
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("started again in a fresh cell").count(),
        kills.len() - spared,
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("needs a reset"), "{}", out.stderr);
    // The writes outlived the kills: the loop kept going for its whole time, and the
    // device status never said NEEDS_RESET.
    let writes: u64 = field(line, "writes").parse().unwrap();
    assert!(writes > 2 * SLOTS, "only {writes} writes in 5 s: {line}");
    assert_eq!(field(line, "slots_bad"), "0");
    assert_eq!(field(line, "arp_after"), "true", "{line}");
    // The file holds exactly what the guest wrote last to each slot.
    let bytes = std::fs::read(&vm.disk).unwrap();
    for slot in 0..SLOTS {
        let last = slot + (writes - 1 - slot) / SLOTS * SLOTS;
        let at = ((FIRST_SECTOR + slot * 8) * 512) as usize;
        let want: Vec<u8> = (0..4096).map(|i| slot_byte(last, i)).collect();
        assert!(
            bytes[at..at + 4096] == want[..],
            "slot {slot} does not hold write {last}"
        );
    }
    // Nothing else on the disk was touched.
    let end = ((FIRST_SECTOR + SLOTS * 8) * 512) as usize;
    assert!(bytes[..(FIRST_SECTOR * 512) as usize]
        .iter()
        .all(|b| *b == 0));
    assert!(bytes[end..].iter().all(|b| *b == 0));
    assert_cell_gone(&vm.id);
}

#[test]
fn a_backend_that_keeps_dying_is_given_up_and_its_device_needs_a_reset() {
    let _turn = launch_turn();
    let vm = vm("dying", "tests=restartloop bench_ms=4000", false);
    let jailer = launch(&vm);
    wait_console(
        &vm.id,
        "restartloop: running blk=true rng=true net=false",
        Duration::from_secs(30),
    );
    // Up to the bound, each death is answered with a new backend: the first in its
    // spare, the next ones (killed at once, before a new spare is due) in fresh cells.
    let mut backs = Vec::new();
    for k in 0..MAX_RESTARTS {
        backs.push(kill_and_wait(&vm.id, "rng", k == 0).2);
    }
    assert_eq!(backs[0], Back::InItsSpare);
    assert!(backs[1..].contains(&Back::Fresh), "{backs:?}");
    // ... one more, and none comes: the positive control for the first test (the
    // guest's requests complete only because a backend came back). Its spare is
    // ready when it dies, and goes with it.
    let last = backends(&vm.id, "rng");
    assert_eq!(last.len(), 1);
    let uid = uid_of(last[0]).unwrap();
    let start = Instant::now();
    while spare_of(&vm.id, uid).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no spare before the last kill"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill a process of the test's own VM.
    assert_eq!(unsafe { libc::kill(last[0] as i32, libc::SIGKILL) }, 0);
    // Well before the loop's end (and the VM's, which takes every spare with it).
    let killed = Instant::now();
    while spare_of(&vm.id, uid).is_some() {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "the given-up backend's spare is still there"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = jailer.join().unwrap();
    assert!(
        out.stderr.contains(&format!(
            "rng was killed by signal 9; it died more than {MAX_RESTARTS} times within 60 s: the device needs a reset"
        )),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("; started again in ").count(),
        MAX_RESTARTS,
        "{}",
        out.stderr
    );

    assert!(backends(&vm.id, "rng").is_empty());
    let line = out
        .test_lines()
        .into_iter()
        .find(|l| l.starts_with("TEST restartloop "))
        .unwrap_or_else(|| panic!("no restartloop line:\n{}", out.stdout))
        .to_string();
    // The guest's next rng request never completed, and the device says NEEDS_RESET
    // (0x40 over ACKNOWLEDGE, DRIVER, FEATURES_OK and DRIVER_OK); the disk went on.
    assert!(line.starts_with("TEST restartloop FAIL"), "{line}");
    assert!(line.contains("rng: used=None"), "{line}");
    assert_eq!(field(&line, "rng_status"), "0x4f", "{line}");
    assert_eq!(field(&line, "blk_status"), "0xf", "{line}");
    assert_eq!(field(&line, "slots_bad"), "0", "{line}");
    assert_cell_gone(&vm.id);
}
