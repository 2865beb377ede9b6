//! Campaign (CI skips it by name, `-- --skip campaign_`; run by hand for the figures in
//! the notes): jailed launches of a VM with a writable disk and an rng device, each
//! ended by a SIGKILL of the supervisor, the VMM or a backend at a random moment, then
//! `cellvm-jailer gc`. After each: no process, cgroup, mount, registry entry, jail
//! directory or label record of that VM is left, the disk's label is its original again
//! and its lock is free (a second writer's OFD lock takes).
//!
//! `CELLVM_KILL_CAMPAIGN_RUNS` sets the number of launches (default 500).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IMAGES: &str = "/var/lib/cellvm/images/example";
const CONTROLLERS: [&str; 8] = [
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
];
const ORIGINAL: &str = "system_u:object_r:var_lib_t:s0";

fn bin(name: &str) -> PathBuf {
    let mut p = PathBuf::from(env!("CARGO_BIN_EXE_cellvm"));
    p.set_file_name(name);
    p
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn label(path: &Path) -> Option<String> {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", "security.selinux"])
        .arg(path)
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\0')
            .to_string()
    })
}

fn set_label(path: &Path, l: &str) {
    let st = Command::new("setfattr")
        .args(["-n", "security.selinux", "-v", l])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// The pids in the VM's pids cgroup.
fn cell_pids(id: &str) -> Vec<u32> {
    std::fs::read_to_string(format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// What is left of VM `id` on the host, one line per leftover.
fn leftovers(id: &str, disk: &Path) -> Vec<String> {
    let mut left = Vec::new();
    for c in CONTROLLERS {
        let p = format!("/sys/fs/cgroup/{c}/cellvm/{id}");
        if Path::new(&p).exists() {
            left.push(p);
        }
    }
    for p in [
        format!("/srv/cellvm/{id}"),
        format!("/run/cellvm/vms/{id}"),
        format!("/run/cellvm/vms/.{id}.tmp"),
        format!("/run/cellvm/labels/{id}"),
    ] {
        if Path::new(&p).exists() {
            left.push(p);
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    if let Some(m) = mounts
        .lines()
        .find(|l| l.contains(&format!("/cellvm/{id}")))
    {
        left.push(format!("mount: {m}"));
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let line = cmdline(pid);
        if line.contains(&format!("--id {id} ")) || line.contains(&format!("cellvm-{id}")) {
            left.push(format!("process {pid}: {line}"));
        }
    }
    match label(disk) {
        Some(l) if l == ORIGINAL => {}
        other => left.push(format!("disk label {other:?}")),
    }
    for x in ["trusted.cellvm.selinux", "trusted.cellvm.ref"] {
        let st = Command::new("getfattr")
            .args(["-n", x])
            .arg(disk)
            .output()
            .unwrap();
        if st.status.success() {
            left.push(format!("disk xattr {x}"));
        }
    }
    // The lock is free: an exclusive OFD lock on QEMU's byte range takes.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    // SAFETY: flock is plain data; zeroed is a valid value before the fields are set.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_WRLCK as i16;
    l.l_whence = libc::SEEK_SET as i16;
    l.l_start = 100;
    l.l_len = 200;
    // SAFETY: fcntl F_OFD_SETLK with a valid flock on a descriptor we own.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &l) } != 0 {
        left.push(format!("disk lock: {}", std::io::Error::last_os_error()));
    }
    left
}

#[test]
fn campaign_random_sigkills_then_gc_leave_nothing_behind() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this campaign needs /dev/kvm"
    );
    let runs: usize = std::env::var("CELLVM_KILL_CAMPAIGN_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let me = std::process::id();
    let disk = Path::new(IMAGES).join(format!("kill-campaign-{me}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    set_label(&disk, ORIGINAL);
    let dir = std::env::temp_dir().join(format!("cellvm-kill-campaign-{me}"));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("vm.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"killc\"\nmemory_mib = 64\ncmdline = \"tests=serial hold=2\"\nrng = true\ndisks = [{{ path = \"{}\" }}]\n",
            disk.display()
        ),
    )
    .unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ me as u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut killed, mut ran_out, mut dirty) = ([0usize; 3], 0usize, Vec::new());
    let start = Instant::now();
    for i in 0..runs {
        let id = format!("kc-{me}-{i}");
        let mut jailer = Command::new(bin("cellvm-jailer"))
            .args(["launch", "--id", &id, "--policy"])
            .arg(repo("policy/tenants/example.toml"))
            .arg("--vm")
            .arg(&spec)
            .arg("--vmm")
            .arg(bin("cellvm"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Anywhere from before the first cell exists to well into the VM's run.
        std::thread::sleep(Duration::from_micros(next() % 60_000));
        let target = (next() % 3) as usize;
        let victim = match target {
            0 => Some(jailer.id()),
            _ => {
                let pids = cell_pids(&id);
                let want = if target == 1 {
                    "cellvm run "
                } else {
                    "cellvm-device "
                };
                pids.into_iter().find(|&p| cmdline(p).starts_with(want))
            }
        };
        match victim {
            Some(pid) => {
                // SAFETY: kill with a pid and a signal number.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                killed[target] += 1;
            }
            None => ran_out += 1,
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while jailer.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{id}: the launch did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        let gc = Command::new(bin("cellvm-jailer"))
            .arg("gc")
            .output()
            .unwrap();
        assert!(
            gc.status.success(),
            "{id}: gc: {}",
            String::from_utf8_lossy(&gc.stderr)
        );
        // A killed supervisor's cell dies by its parent-death signal; give the kernel a
        // moment to reap it before looking.
        let mut left = leftovers(&id, &disk);
        let settle = Instant::now() + Duration::from_secs(2);
        while !left.is_empty() && Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(20));
            let _ = Command::new(bin("cellvm-jailer")).arg("gc").output();
            left = leftovers(&id, &disk);
        }
        if !left.is_empty() {
            dirty.push(format!("{id}: {left:?}"));
        }
    }
    let elapsed = start.elapsed();
    println!(
        "kill campaign: {runs} launches in {:.1} s; SIGKILL of the supervisor {}, the VMM {}, a backend {}; {} not killed (the process had not started or had ended); {} left something behind",
        elapsed.as_secs_f64(),
        killed[0],
        killed[1],
        killed[2],
        ran_out,
        dirty.len()
    );
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(dirty.is_empty(), "{dirty:#?}");
}
