//! Campaigns: long runs that CI skips by name (`-- --skip campaign_`), run by hand
//! for the figures in the notes.
//!
//! Registry allocation: 16 processes allocate 10,000 VMs in all (each VM with 3 device
//! backends: 4 uids and a pair) into a private registry directory, each holding a
//! window of live VMs and releasing at random. Every holder marks what it holds with
//! O_EXCL files (one per uid, one per pair) before use and removes the marks before
//! the registry entry: a mark that already exists is a duplicate handed out by the
//! registry while its first holder still held it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cellvm_jailer::policy::TenantPolicy;
use cellvm_jailer::registry::Registry;

const PROCESSES: usize = 16;
const ALLOCATIONS: usize = 10_000;
const WINDOW: usize = 24;
const BACKENDS: usize = 3;
const ENV: &str = "CELLVM_CAMPAIGN_DIR";

fn tenant() -> TenantPolicy {
    TenantPolicy::parse(
        "name = \"campaign\"\nmax_vcpus = 1\nmax_memory_mib = 64\nuid_range = [400000, 409999]\nmcs_categories = [0, 1023]\n[cgroup]\ncpu_percent = 100\nmemory_overhead_mib = 8\npids_max = 8\n",
    )
    .unwrap()
}

/// Marks `name` held; false if it already was (a duplicate).
fn mark(marks: &Path, name: &str) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(marks.join(name))
        .is_ok()
}

/// One worker process: `count` allocations, at most WINDOW held at once. Prints the
/// duplicates it saw.
fn worker(dir: &Path, worker: usize, count: usize) {
    let t = tenant();
    let marks = dir.join("marks");
    let run_dir = dir.join("run");
    let me = std::process::id();
    let mut held: Vec<cellvm_jailer::registry::Entry> = Vec::new();
    let mut duplicates = 0;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (worker as u64) << 32;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let release = |e: cellvm_jailer::registry::Entry| {
        for u in e.uids() {
            std::fs::remove_file(marks.join(format!("uid-{u}"))).unwrap();
        }
        std::fs::remove_file(marks.join(format!("mcs-{}", e.mcs))).unwrap();
        Registry::lock(&run_dir).unwrap().remove(&e.id).unwrap();
    };
    for n in 0..count {
        let id = format!("w{worker}-{n}");
        let e = Registry::lock(&run_dir)
            .unwrap()
            .allocate(&id, &t, me, BACKENDS)
            .unwrap();
        for u in e.uids() {
            if !mark(&marks, &format!("uid-{u}")) {
                duplicates += 1;
            }
        }
        if !mark(&marks, &format!("mcs-{}", e.mcs)) {
            duplicates += 1;
        }
        held.push(e);
        if held.len() >= WINDOW || next() % 3 == 0 {
            let i = (next() % held.len() as u64) as usize;
            release(held.swap_remove(i));
        }
    }
    for e in held {
        release(e);
    }
    println!("duplicates={duplicates}");
}

#[test]
fn campaign_worker_for_the_registry_campaign() {
    // Runs only as a child of the campaign below (a test of its own so the campaign
    // can start it as a separate process).
    let Ok(dir) = std::env::var(ENV) else {
        return;
    };
    let w: usize = std::env::var("CELLVM_CAMPAIGN_WORKER")
        .unwrap()
        .parse()
        .unwrap();
    worker(Path::new(&dir), w, ALLOCATIONS / PROCESSES);
}

#[test]
fn campaign_registry_allocations_from_16_processes_never_collide() {
    let dir: PathBuf = std::env::temp_dir().join(format!("cellvm-campaign-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("marks")).unwrap();
    let start = Instant::now();
    // All 16 started before any is waited for: they run at once.
    let children: Vec<_> = (0..PROCESSES)
        .map(|w| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "campaign_worker_for_the_registry_campaign",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ENV, &dir)
                .env("CELLVM_CAMPAIGN_WORKER", w.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut duplicates = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a worker failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let d: usize = text
            .lines()
            .find_map(|l| l.split_once("duplicates=").map(|(_, d)| d))
            .expect("the worker ran")
            .trim()
            .parse()
            .unwrap();
        duplicates += d;
    }
    let elapsed = start.elapsed();
    let total = (ALLOCATIONS / PROCESSES) * PROCESSES;
    println!(
        "campaign: {total} allocations ({} uids, {total} pairs) from {PROCESSES} processes in {:.2} s ({:.0} per s); duplicates: {duplicates}",
        total * (BACKENDS + 1),
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(duplicates, 0);
    let reg = Registry::lock(&dir.join("run")).unwrap();
    assert!(
        reg.entries().unwrap().is_empty(),
        "every entry was released"
    );
    assert_eq!(std::fs::read_dir(dir.join("marks")).unwrap().count(), 0);
    drop(reg);
    let _ = std::fs::remove_dir_all(&dir);
}
