//! Guest RAM from hugetlb pages (`--hugepages 2M|1G`): the memfd the VMM maps and its
//! device backends share is hugetlb-backed, every page is taken at start (a pool too
//! small is an error at launch, naming what is missing), and the pages go back when the
//! VM ends. The tests size the host's 2 MiB pool themselves (vm.nr_hugepages), one at a
//! time, and put it back.

mod common;

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{cellvm, run, scratch_dir};

const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read_num(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The host's 2 MiB pool set to `pages` for as long as it lives, then put back.
struct Pool {
    before: u64,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Pool {
    fn set(pages: u64) -> Pool {
        static TURN: Mutex<()> = Mutex::new(());
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let before = read_num(POOL);
        std::fs::write(POOL, pages.to_string()).unwrap();
        assert_eq!(
            read_num(POOL),
            pages,
            "the host could not make {pages} hugepages"
        );
        Pool {
            before,
            _turn: turn,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = std::fs::write(POOL, self.before.to_string());
    }
}

/// The page size, in KiB, of `pid`'s mappings of guest RAM (from smaps).
fn guest_ram_page_kib(pid: u32) -> Vec<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out = Vec::new();
    let mut in_ram = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let is_header = first.split_once('-').is_some_and(|(a, b)| {
            u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok()
        });
        if is_header {
            in_ram = line.contains("/memfd:cellvm-guest-ram");
        } else if let Some(v) = line.strip_prefix("KernelPageSize:") {
            if in_ram {
                out.push(v.trim().trim_end_matches(" kB").trim().parse().unwrap());
            }
        }
    }
    out
}

fn children(parent: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn guest_ram_from_hugepages_is_shared_with_the_blk_backend_and_given_back_at_the_end() {
    let _pool = Pool::set(32 + 8);
    let dir = scratch_dir("hugepages");
    let disk = dir.join("disk.raw");
    common::pattern_disk(&disk, 1 << 20);
    let free0 = read_num(FREE);
    let vm = cellvm()
        .args(["run", "--memory", "64", "--hugepages", "2M", "--disk"])
        .arg(format!("path={}", disk.display()))
        .args(["--cmdline", "tests=pci,virtio,blk hold=2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = vm.id();
    // While it runs: all 32 pages taken from the pool, and the VMM and its backend both
    // map guest RAM in 2 MiB pages.
    let start = Instant::now();
    let (mut vmm_pages, mut backend_pages) = (Vec::new(), Vec::new());
    while start.elapsed() < Duration::from_secs(10) {
        vmm_pages = guest_ram_page_kib(pid);
        backend_pages = children(pid)
            .into_iter()
            .flat_map(guest_ram_page_kib)
            .collect();
        if !vmm_pages.is_empty() && !backend_pages.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let free_running = read_num(FREE);
    let out = vm.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("TEST blk PASS"), "{stdout}");
    assert!(
        !vmm_pages.is_empty() && vmm_pages.iter().all(|&k| k == 2048),
        "VMM: {vmm_pages:?}"
    );
    assert!(
        !backend_pages.is_empty() && backend_pages.iter().all(|&k| k == 2048),
        "backend: {backend_pages:?}"
    );
    assert_eq!(
        free0 - free_running,
        32,
        "64 MiB of guest RAM is 32 pages, taken at start"
    );
    assert_eq!(read_num(FREE), free0, "the pages went back to the pool");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pool_too_small_is_an_error_at_launch_naming_what_is_missing() {
    let _pool = Pool::set(8);
    let mut cmd = cellvm();
    cmd.args([
        "run",
        "--memory",
        "64",
        "--hugepages",
        "2M",
        "--cmdline",
        "tests=serial",
    ]);
    let out = run(cmd, Duration::from_secs(20));
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    assert!(
        out.stderr.contains("guest RAM needs 32 pages of 2M") && out.stderr.contains("(8 free;"),
        "{}",
        out.stderr
    );
    assert!(out.test_lines().is_empty(), "the guest never ran");
    assert_eq!(read_num(FREE), 8, "nothing is held after the refusal");
}

#[test]
fn guest_memory_must_be_whole_hugepages_and_not_mergeable() {
    for (args, expect) in [
        (
            &["--memory", "100", "--hugepages", "1G"][..],
            "not a whole number of 1G hugepages",
        ),
        (
            &["--memory", "64", "--hugepages", "2M", "--ksm"][..],
            "ksm and hugepages",
        ),
        (
            &["--memory", "64", "--hugepages", "4M"][..],
            "expected 2M or 1G",
        ),
    ] {
        let mut cmd = cellvm();
        cmd.arg("run")
            .args(args)
            .args(["--cmdline", "tests=serial"]);
        let out = run(cmd, Duration::from_secs(20));
        assert_ne!(out.code, Some(0), "{args:?}");
        assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
    }
}
