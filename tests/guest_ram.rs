//! Guest RAM prefaulted or locked, per VM: `--prefault` maps every page at start (the
//! memfd mapping is resident in full before the guest runs, against a control VM
//! without it), `--mlock` locks it; a jailed VM gets either from its spec, `mlock` only
//! where its tenant policy allows, with RLIMIT_MEMLOCK raised to exactly its RAM.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{cellvm, repo, scratch_dir};

/// (Rss, Locked) in KiB of `pid`'s mappings of guest RAM, summed.
fn ram_kib(pid: u32) -> (u64, u64) {
    common::guest_ram_mappings(pid)
        .iter()
        .fold((0, 0), |(r, l), m| (r + m.rss_kib, l + m.locked_kib))
}

/// `cellvm run` of a 64 MiB VM holding for a second with `flags`; (Rss, Locked) of its
/// guest RAM as soon as it is mapped, after the guest started.
fn run_with(flags: &[&str]) -> (u64, u64) {
    let mut vm = cellvm()
        .args(["run", "--memory", "64", "--cmdline", "tests=serial hold=1"])
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut seen = (0, 0);
    while start.elapsed() < Duration::from_millis(500) {
        seen = ram_kib(vm.id());
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = vm.wait().unwrap();
    assert!(out.success(), "{flags:?}");
    seen
}

#[test]
fn prefault_makes_all_guest_ram_resident_and_mlock_locks_it() {
    let (rss, locked) = run_with(&[]);
    assert!(
        rss < 16 << 10 && locked == 0,
        "control: rss {rss} KiB, locked {locked} KiB"
    );
    let (rss, locked) = run_with(&["--prefault"]);
    assert_eq!((rss, locked), (64 << 10, 0), "--prefault");
    let (rss, locked) = run_with(&["--mlock"]);
    assert_eq!((rss, locked), (64 << 10, 64 << 10), "--mlock");
}

const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The host's shmem THP setting for as long as it lives, then put back.
struct ShmemThp(String);

impl ShmemThp {
    fn set(mode: &str) -> ShmemThp {
        let text = std::fs::read_to_string(SHMEM_THP).unwrap();
        // The selected mode is the one in brackets.
        let before = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
            .unwrap()
            .to_string();
        std::fs::write(SHMEM_THP, mode).unwrap();
        ShmemThp(before)
    }
}

impl Drop for ShmemThp {
    fn drop(&mut self) {
        let _ = std::fs::write(SHMEM_THP, &self.0);
    }
}

#[test]
fn guest_ram_is_in_transparent_huge_pages_where_the_host_allows_shmem_thp() {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    // (Rss, ShmemPmdMapped) of a prefaulted VM's RAM.
    let thp = || {
        let vm = cellvm()
            .args([
                "run",
                "--memory",
                "64",
                "--prefault",
                "--cmdline",
                "tests=serial hold=1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let mut seen = (0, 0);
        while seen.0 < 64 << 10 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
            seen = common::guest_ram_mappings(vm.id())
                .iter()
                .fold((0, 0), |(r, p), m| (r + m.rss_kib, p + m.shmem_pmd_kib));
        }
        let out = vm.wait_with_output().unwrap();
        assert!(out.status.success());
        seen
    };
    let never = {
        let _mode = ShmemThp::set("never");
        thp()
    };
    assert_eq!(never, (64 << 10, 0), "shmem THP off: 4 KiB pages only");
    let advise = {
        let _mode = ShmemThp::set("advise");
        thp()
    };
    assert_eq!(
        advise,
        (64 << 10, 64 << 10),
        "advise: the VMM's MADV_HUGEPAGE takes effect"
    );
}

#[test]
fn a_jailed_vm_locks_its_ram_only_where_the_policy_allows() {
    let dir = scratch_dir("guest-ram-jailed");
    let text = std::fs::read_to_string(repo("policy/tenants/example.toml")).unwrap();
    assert!(text.contains("ksm = false"));
    let allowed = dir.join("tenant-mlock.toml");
    std::fs::write(
        &allowed,
        text.replace("ksm = false", "ksm = false\nmlock = true"),
    )
    .unwrap();
    let spec = |name: &str, extra: &str| {
        let p = dir.join(format!("vm-{name}.toml"));
        std::fs::write(
            &p,
            format!("name = \"{name}\"\nvcpus = 1\nmemory_mib = 64\n{extra}\ncmdline = \"tests=serial hold=3\"\n"),
        )
        .unwrap();
        p
    };
    let locked_spec = spec("locked", "mlock = true");
    let prefault_spec = spec("prefault", "prefault = true");

    let id = format!("t-mlock-no-{}", std::process::id());
    let out = common::jailer_launch(&id, &repo("policy/tenants/example.toml"), &locked_spec);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("mlock = true violates the tenant policy (mlock = false)"),
        "{}",
        out.stderr
    );
    common::assert_cell_gone(&id);

    // The VMM runs without capabilities: it can lock its RAM only because the jailer
    // raised RLIMIT_MEMLOCK to exactly the RAM's size. A host whose root may not raise
    // it (no CAP_SYS_RESOURCE, a hard limit below the RAM: this one) gets a clear
    // refusal at launch instead.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    let can_lock = cap_eff & (1 << 24) != 0 || hard >= 64 << 20;
    let mut cases = vec![("prefault", &prefault_spec, (64u64 << 10, 0u64))];
    if can_lock {
        cases.push(("locked", &locked_spec, (64 << 10, 64 << 10)));
    } else {
        let id = format!("t-mlock-nolimit-{}", std::process::id());
        let out = common::jailer_launch(&id, &allowed, &locked_spec);
        assert_eq!(out.code, Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains("no CAP_SYS_RESOURCE to raise it"),
            "{}",
            out.stderr
        );
        common::assert_cell_gone(&id);
    }
    for (name, path, want) in cases {
        let id = format!("t-mlock-{name}-{}", std::process::id());
        let vm = common::HeldVm::launch(&id, &allowed, path);
        let start = Instant::now();
        let mut seen = (0, 0);
        while seen != want && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
            seen = ram_kib(vm.vmm);
        }
        assert_eq!(seen, want, "{name}");
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", vm.vmm)).unwrap();
        let memlock = limits
            .lines()
            .find(|l| l.starts_with("Max locked memory"))
            .unwrap();
        let expect = if name == "locked" {
            (64u64 << 20).to_string()
        } else {
            "0".into()
        };
        assert!(
            memlock.split_whitespace().any(|w| w == expect),
            "{name}: {memlock}"
        );
        drop(vm);
        common::assert_cell_gone(&id);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_jailed_vms_ram_can_be_a_file_beneath_the_policys_memory_dirs() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("guest-ram-file");
    // tmpfs, root's alone.
    let mem_dir =
        std::path::PathBuf::from(format!("/dev/shm/cellvm-ram-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&mem_dir);
    std::fs::create_dir(&mem_dir).unwrap();
    std::fs::set_permissions(&mem_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let ram = mem_dir.join("vm.ram");
    std::fs::write(&ram, b"").unwrap();
    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(repo("policy/tenants/example.toml")).unwrap();
    let policy = dir.join("tenant-ram.toml");
    std::fs::write(
        &policy,
        text.replace(
            "ksm = false",
            &format!("ksm = false\nmemory_dirs = [\"{}\"]", mem_dir.display()),
        ),
    )
    .unwrap();
    let spec = |name: &str, file: &std::path::Path| {
        let p = dir.join(format!("vm-{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "name = \"{name}\"\nvcpus = 1\nmemory_mib = 64\nmemory_file = \"{}\"\ncmdline = \"tests=serial hold=3\"\n",
                file.display()
            ),
        )
        .unwrap();
        p
    };
    // Refused outside memory_dirs, and by a policy with none.
    let outside = dir.join("elsewhere.ram");
    std::fs::write(&outside, b"").unwrap();
    let id = format!("t-ramfile-out-{}", std::process::id());
    let out = common::jailer_launch(&id, &policy, &spec("out", &outside));
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("memory_file") && out.stderr.contains("violates memory_dirs"),
        "{}",
        out.stderr
    );
    let out = common::jailer_launch(&id, &repo("policy/tenants/example.toml"), &spec("in", &ram));
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("violates memory_dirs []"),
        "{}",
        out.stderr
    );

    // Served: the VMM maps the file (not a memfd), sized to the RAM; a second VM on the
    // same file is refused while the first holds it.
    let id = format!("t-ramfile-{}", std::process::id());
    let vm = common::HeldVm::launch(&id, &policy, &spec("in", &ram));
    let start = Instant::now();
    let maps = || std::fs::read_to_string(format!("/proc/{}/maps", vm.vmm)).unwrap_or_default();
    while !maps().contains(ram.to_str().unwrap()) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(maps().contains(ram.to_str().unwrap()), "{}", maps());
    assert!(!maps().contains("memfd:cellvm-guest-ram"));
    assert_eq!(std::fs::metadata(&ram).unwrap().len(), 64 << 20);
    let id2 = format!("t-ramfile-2-{}", std::process::id());
    let out = common::jailer_launch(&id2, &policy, &spec("second", &ram));
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("in use"), "{}", out.stderr);
    drop(vm);
    common::assert_cell_gone(&id);
    let _ = std::fs::remove_dir_all(&mem_dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cellvm_run_serves_ram_from_a_file_its_blk_backend_shares() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("guest-ram-run-file");
    let disk = dir.join("disk.raw");
    common::pattern_disk(&disk, 1 << 20);
    let ram = std::path::PathBuf::from(format!("/dev/shm/cellvm-ram-run-{}", std::process::id()));
    std::fs::write(&ram, b"").unwrap();
    let run_with_file = |mib: &str| {
        let mut cmd = cellvm();
        cmd.args(["run", "--memory", mib, "--memory-file"])
            .arg(&ram)
            .arg("--disk")
            .arg(format!("path={}", disk.display()))
            .args(["--cmdline", "tests=pci,virtio,blk"]);
        common::run(cmd, Duration::from_secs(30))
    };
    let out = run_with_file("64");
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    out.passed("blk");
    assert_eq!(std::fs::metadata(&ram).unwrap().len(), 64 << 20);
    // A file of another size is some other VM's RAM: refused, left as it is.
    let out = run_with_file("32");
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr
            .contains("neither empty nor the VM's 33554432 bytes"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::metadata(&ram).unwrap().len(), 64 << 20);
    // Guest RAM is never executable.
    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = run_with_file("64");
    assert!(
        out.stderr.contains("carries an execute bit"),
        "{}",
        out.stderr
    );
    let _ = std::fs::remove_file(&ram);
    let _ = std::fs::remove_dir_all(&dir);
}
