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

/// The page size, in KiB, of `pid`'s mappings of guest RAM.
fn guest_ram_page_kib(pid: u32) -> Vec<u64> {
    common::guest_ram_mappings(pid)
        .iter()
        .map(|m| m.page_kib)
        .collect()
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

/// A hugetlb cgroup file of VM `id` on this host (v1 hugetlb, else the unified
/// hierarchy a hybrid host keeps it on).
fn hugetlb_file(id: &str, v1: &str, v2: &str) -> String {
    let v1_path = format!("/sys/fs/cgroup/hugetlb/cellvm/{id}/{v1}");
    let path = if std::path::Path::new(&v1_path).exists() {
        v1_path
    } else {
        format!("/sys/fs/cgroup/unified/cellvm/{id}/{v2}")
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_string()
}

#[test]
fn a_jailed_vm_gets_hugepages_only_where_its_policy_allows_bounded_by_its_cgroup() {
    let _pool = Pool::set(32 + 8);
    let dir = scratch_dir("hugepages-jailed");
    let text = std::fs::read_to_string(common::repo("policy/tenants/example.toml")).unwrap();
    assert!(text.contains("hugepages = false"));
    let allowed = dir.join("tenant-huge.toml");
    std::fs::write(
        &allowed,
        text.replace("hugepages = false", "hugepages = true"),
    )
    .unwrap();
    let huge = dir.join("vm-huge.toml");
    std::fs::write(
        &huge,
        "name = \"huge\"\nvcpus = 1\nmemory_mib = 64\nhugepages = true\ncmdline = \"tests=serial hold=3\"\n",
    )
    .unwrap();
    let plain = common::guest_spec(&dir, "plain", "tests=serial hold=3");

    // Refused where the policy says no, before any cell is built.
    let id = format!("t-huge-no-{}", std::process::id());
    let out = common::jailer_launch(&id, &common::repo("policy/tenants/example.toml"), &huge);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("hugepages = true violates the tenant policy (hugepages = false)"),
        "{}",
        out.stderr
    );
    common::assert_cell_gone(&id);

    // Allowed: the VM's 32 pages come from the pool, and its cgroup bounds it at exactly
    // its RAM; a VM without hugepages may take none (its limit is 0).
    let free0 = read_num(FREE);
    let id = format!("t-huge-{}", std::process::id());
    let vm = common::HeldVm::launch(&id, &allowed, &huge);
    // The VMM is in its cgroup from its first moment; its RAM comes a little later.
    let start = Instant::now();
    let mut pages = Vec::new();
    while pages.is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
        pages = guest_ram_page_kib(vm.vmm);
    }
    assert!(
        !pages.is_empty() && pages.iter().all(|&k| k == 2048),
        "{pages:?}"
    );
    assert_eq!(
        hugetlb_file(&id, "hugetlb.2MB.limit_in_bytes", "hugetlb.2MB.max"),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        hugetlb_file(&id, "hugetlb.2MB.usage_in_bytes", "hugetlb.2MB.current"),
        (64u64 << 20).to_string()
    );
    assert_eq!(free0 - read_num(FREE), 32);
    let pid = format!("t-huge-plain-{}", std::process::id());
    let other = common::HeldVm::launch(&pid, &allowed, &plain);
    assert_eq!(
        hugetlb_file(&pid, "hugetlb.2MB.limit_in_bytes", "hugetlb.2MB.max"),
        "0"
    );
    assert_eq!(
        hugetlb_file(&pid, "hugetlb.2MB.usage_in_bytes", "hugetlb.2MB.current"),
        "0"
    );
    drop(other);
    drop(vm);
    common::assert_cell_gone(&id);
    common::assert_cell_gone(&pid);
    assert_eq!(read_num(FREE), free0, "the pages went back to the pool");
    let _ = std::fs::remove_dir_all(&dir);
}
