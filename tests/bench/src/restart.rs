//! Scenario 9 (`--restart-only`): what a backend restart costs the guest. A jailed VM
//! (blk, net on a tap, rng) runs the test guest's `restartloop` (one blk write, one rng
//! request and every eighth round an ARP, back to back); half a second in, the bench
//! SIGKILLs one backend and the supervisor starts it again. The guest's longest wait
//! for one request of that kind (for the net, one answered ARP) is the time from the
//! kill to the first request the new backend completed. Alongside: the same loop with
//! no kill, the longest wait the loop sees anyway.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{row, BenchNet, Row};

/// The guest's figure for a kind of backend in the restartloop line.
fn field(kind: &str) -> &'static str {
    match kind {
        "blk" => "max_blk_us",
        "rng" => "max_rng_us",
        _ => "max_arp_us",
    }
}

/// The pid of VM `id`'s backend of `kind`, once it runs.
fn backend(id: &str, kind: &str) -> Option<u32> {
    let procs = format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs");
    std::fs::read_to_string(procs)
        .ok()?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .find(|p: &u32| {
            let argv = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let mut words = argv.split(|b| *b == 0);
            words.next() == Some(b"cellvm-device".as_slice())
                && words.next() == Some(kind.as_bytes())
        })
}

/// One VM: its restartloop line's figures (µs), killing `kill`'s backend once.
fn one_run(jailer: &Path, policy: &Path, spec: &Path, id: &str, kill: Option<&str>) -> String {
    let child = Command::new(jailer)
        .args(["launch", "--id", id, "--policy"])
        .arg(policy)
        .arg("--vm")
        .arg(spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cellvm-jailer");
    let log = Path::new("/run/cellvm/vm").join(id).join("console.log");
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("restartloop: running")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "vm {id}: the guest's loop never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(kind) = kill {
        std::thread::sleep(Duration::from_millis(500));
        let pid = backend(id, kind).unwrap_or_else(|| panic!("vm {id}: no {kind} backend"));
        // SAFETY: kill a process of the benchmark's own VM.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("TEST restartloop PASS"))
        .unwrap_or_else(|| panic!("vm {id}: restartloop did not pass:\n{text}"))
        .to_string()
}

fn micros(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

pub fn rows(jailer: &Path, example: &str, work: &Path, runs: usize, rows: &mut Vec<Row>) {
    let net = BenchNet::new();
    let images = work.join("restart-images");
    std::fs::create_dir_all(&images).unwrap();
    let disk = images.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let policy = work.join("tenant-restart.toml");
    std::fs::write(
        &policy,
        example
            .replace("/var/lib/cellvm/images/example", images.to_str().unwrap())
            .replace("taps = [\"cvex*\"]", "taps = [\"cvb*\"]")
            .replace(
                "tap_netns = \"cellvm-example\"",
                &format!("tap_netns = \"{}\"", net.0),
            ),
    )
    .unwrap();
    let spec = work.join("vm-restart.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"restart\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=restartloop bench_ms=1500\"\nrng = true\ndisks = [{{ path = \"{}\" }}]\nnets = [{{ tap = \"cvb0\" }}]\n",
            disk.display()
        ),
    )
    .unwrap();
    let jailer = jailer.to_path_buf();
    let launch = |n: usize, kill: Option<&str>| {
        let id = format!("bench-restart-{}-{n}", std::process::id());
        one_run(&jailer, &policy, &spec, &id, kill)
    };
    let mut n = 0;
    for kind in ["blk", "net", "rng"] {
        let (mut killed, mut calm) = (Vec::new(), Vec::new());
        for _ in 0..runs.min(5) {
            n += 2;
            let with = launch(n, Some(kind));
            let without = launch(n + 1, None);
            killed.push(micros(&with, field(kind)) / 1000.0);
            calm.push(micros(&without, field(kind)) / 1000.0);
        }
        rows.push(row(
            "9. backend restart, jailed",
            &format!("{kind}: SIGKILL -> next request done, ms"),
            killed,
            "same loop, no kill",
            calm,
        ));
    }
}
