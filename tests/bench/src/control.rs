//! Scenario 7 (control plane), cellvm against libvirt driving QEMU, in one run:
//! - the `vm.info` round trip on the API socket (a kept-alive connection, as a script
//!   or an orchestrator holds one) against `dominfo` in one virsh session (one client
//!   connection to libvirtd, which asks QEMU over QMP); median and p99;
//! - pause -> paused and resume -> running, each a request plus the state query that
//!   confirms it (`vm.pause` + `vm.info` against `suspend` + `domstate`);
//! - the same from the shell: one `cellvmctl` process against one `virsh` process;
//! - `cellvmctl launch` (= `cellvm-jailer launch --detach`, back once the guest runs)
//!   when it makes the 1st, 10th and 100th VM on the host;
//! - `cellvmctl list` with as many VMs as the host holds (up to 1,000), against `virsh
//!   list` with its one domain.
//!
//! The peer's domain boots the same test guest (`cellvm testguest --output`) with
//! `<kernel>` on QEMU's `pc` machine, cmdline `idle` as ours; libvirtd is started by
//! hand when it does not answer (no systemd on these hosts).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use cellvmctl::http::Client;

const URI: &str = "qemu:///system";
const MARK: &str = "CELLVM_BENCH_MARK";

/// One comparison row: (scenario, metric, cellvm samples, peer name, peer samples).
pub type Compared = (String, String, Vec<f64>, String, Vec<f64>);

pub struct Report {
    pub rows: Vec<Compared>,
    /// The goal lines (one per goal: measured, goal, met or not).
    pub goals: Vec<String>,
    /// Other facts of the run (counts, what could not be measured).
    pub notes: Vec<String>,
}

pub struct Setup<'a> {
    pub ctl: &'a Path,
    pub policy: &'a Path,
    pub guest_elf: &'a Path,
    pub work: &'a Path,
    pub quick: bool,
}

/// An interactive virsh: one connection to libvirtd for many commands, each timed from
/// its write to the end of its output.
struct Virsh {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    buf: Vec<u8>,
}

impl Virsh {
    fn start() -> Virsh {
        let mut child = Command::new("virsh")
            .args(["-c", URI])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("virsh (libvirt-clients; tests/setup.sh installs it)");
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut v = Virsh {
            child,
            stdin,
            stdout,
            buf: Vec::new(),
        };
        v.cmd("version");
        v
    }

    /// Runs one command and returns its output (virsh's prompt and echo included).
    fn cmd(&mut self, c: &str) -> String {
        write!(self.stdin, "{c}\necho {MARK}\n").expect("virsh stdin");
        self.stdin.flush().expect("virsh stdin");
        // The echoed command line holds " MARK"; its output is the mark on a line of
        // its own.
        let end = format!("\n{MARK}\n");
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(at) = find(&self.buf, end.as_bytes()) {
                let out = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                self.buf.drain(..at + end.len());
                return out;
            }
            let n = self.stdout.read(&mut chunk).expect("virsh stdout");
            assert!(n > 0, "virsh ended: {}", String::from_utf8_lossy(&self.buf));
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn timed(&mut self, c: &str, want: &str) -> f64 {
        let t = Instant::now();
        let out = self.cmd(c);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(out.contains(want), "virsh {c}: {out}");
        ms
    }
}

impl Drop for Virsh {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("virsh (libvirt-clients; tests/setup.sh installs it)")
}

/// libvirtd answering, started by hand if it does not (with virtlogd, which it uses for
/// QEMU's output).
fn ensure_libvirtd() {
    if virsh(&["version"]).status.success() {
        return;
    }
    for d in ["virtlogd", "libvirtd"] {
        let st = Command::new(d).arg("-d").status().unwrap_or_else(|e| {
            panic!("{d} (libvirt-daemon-system; tests/setup.sh installs it): {e}")
        });
        assert!(st.success(), "{d} -d failed");
    }
    let start = Instant::now();
    while !virsh(&["version"]).status.success() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "libvirtd does not answer on {URI}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The peer's transient domain: the test guest, `idle`, 64 MiB, 1 vCPU, on `pc`.
struct Domain {
    name: String,
}

impl Domain {
    fn create(s: &Setup) -> Domain {
        let name = format!("cellvm-bench-{}", std::process::id());
        let console = s.work.join("virsh-console.log");
        let xml = s.work.join("domain.xml");
        // QEMU runs as libvirt-qemu: the guest and the log's directory must be reachable.
        let elf = s.work.join("peer-guest.elf");
        std::fs::copy(s.guest_elf, &elf).unwrap();
        std::fs::write(
            &xml,
            format!(
                "<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{}</kernel>
    <cmdline>idle</cmdline>
  </os>
  <cpu mode='host-passthrough'><feature policy='disable' name='arch-capabilities'/></cpu>
  <on_poweroff>destroy</on_poweroff>
  <devices><serial type='file'><source path='{}'/></serial></devices>
</domain>
",
                elf.display(),
                console.display()
            ),
        )
        .unwrap();
        let out = virsh(&["create", xml.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "virsh create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let d = Domain { name };
        // The guest runs the same code as ours once it says so (firmware first: on
        // `pc` SeaBIOS runs in emulated real mode here, seconds).
        let start = Instant::now();
        while !std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("idle")
        {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the peer's guest never printed idle"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}

fn wall_ms(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ms
}

pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i.min(s.len() - 1)]
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

fn state(c: &mut Client) -> String {
    let r = c
        .request("GET", "/api/v1/vm.info", None, Duration::from_secs(2))
        .expect("vm.info");
    assert_eq!(r.status, 200, "vm.info: {}", r.message());
    r.json()
        .and_then(|v| v.get("state")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A request and then `vm.info` until the state is `want`: milliseconds.
fn transition(c: &mut Client, endpoint: &str, want: &str) -> f64 {
    let t = Instant::now();
    let r = c
        .request("PUT", endpoint, None, Duration::from_secs(2))
        .expect(endpoint);
    assert_eq!(r.status, 204, "{endpoint}: {}", r.message());
    while state(c) != want {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{endpoint}: never {want}"
        );
    }
    t.elapsed().as_secs_f64() * 1e3
}

fn mem_available_mib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn mem_total_mib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// The VMs this scenario launched, destroyed (in parallel batches) when dropped.
struct Fleet<'a> {
    ctl: &'a Path,
    ids: Vec<String>,
}

impl Drop for Fleet<'_> {
    fn drop(&mut self) {
        for batch in self.ids.chunks(32) {
            let children: Vec<Child> = batch
                .iter()
                .filter_map(|id| {
                    Command::new(self.ctl)
                        .args(["destroy", id])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .ok()
                })
                .collect();
            for mut c in children {
                let _ = c.wait();
            }
        }
    }
}

fn goal(what: &str, value: f64, unit: &str, limit: f64, peer: Option<f64>) -> String {
    let met = value <= limit;
    let peer_text = match peer {
        Some(p) if value > 0.0 => {
            let r = p / value;
            format!(
                "; virsh {p:.3} {unit}, cellvm {r:.2}x as fast ({})",
                if r >= 10.0 {
                    "meets >= 10x"
                } else {
                    "MISSES >= 10x"
                }
            )
        }
        _ => String::new(),
    };
    format!(
        "goal {what}: {value:.3} {unit} <= {limit} {unit}: {}{peer_text}",
        if met { "met" } else { "MISSED" }
    )
}

pub fn run(s: &Setup) -> Report {
    let mut rows: Vec<Compared> = Vec::new();
    let mut goals = Vec::new();
    let mut notes = Vec::new();
    ensure_libvirtd();
    let domain = Domain::create(s);
    let mut vs = Virsh::start();

    let spec = s.work.join("vm-control.toml");
    std::fs::write(
        &spec,
        "name = \"ctl\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"idle\"\n",
    )
    .unwrap();
    let mut fleet = Fleet {
        ctl: s.ctl,
        ids: Vec::new(),
    };
    let launch = |fleet: &mut Fleet| -> Option<f64> {
        let id = format!("cp{}-{}", std::process::id(), fleet.ids.len());
        let t = Instant::now();
        let out = Command::new(s.ctl)
            .args(["launch", "--policy"])
            .arg(s.policy)
            .arg("--vm")
            .arg(&spec)
            .args(["--id", &id])
            .stdin(Stdio::null())
            .output()
            .expect("cellvmctl launch");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            eprintln!(
                "scenario 7: launch {} failed: {}",
                fleet.ids.len() + 1,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
        fleet.ids.push(id);
        Some(ms)
    };
    let first = launch(&mut fleet).expect("the first control-plane VM launches");
    let id = fleet.ids[0].clone();
    let sock = PathBuf::from(format!("/run/cellvm/vm/{id}/api.sock"));

    // vm.info round trip.
    let n_info = if s.quick { 50 } else { 2000 };
    let n_peer = if s.quick { 3 } else { 30 };
    let mut c = Client::connect(&sock, Duration::from_secs(2)).expect("connect to the API");
    for _ in 0..20 {
        state(&mut c);
    }
    let info_us: Vec<f64> = (0..n_info)
        .map(|_| {
            let t = Instant::now();
            let st = state(&mut c);
            let us = t.elapsed().as_secs_f64() * 1e6;
            assert_eq!(st, "running");
            us
        })
        .collect();
    let peer_info_us: Vec<f64> = (0..n_peer)
        .map(|_| vs.timed(&format!("dominfo {}", domain.name), "State:") * 1e3)
        .collect();
    rows.push((
        "7. vm.info round trip (API session)".into(),
        "us".into(),
        info_us.clone(),
        "virsh dominfo (one session)".into(),
        peer_info_us.clone(),
    ));
    rows.push((
        "7. vm.info round trip (API session)".into(),
        "us p99".into(),
        vec![percentile(&info_us, 0.99)],
        "virsh dominfo (one session)".into(),
        vec![percentile(&peer_info_us, 0.99)],
    ));
    goals.push(goal(
        "vm.info median",
        median(&info_us),
        "us",
        100.0,
        Some(median(&peer_info_us)),
    ));

    // pause -> paused, resume -> running.
    let n_pause = if s.quick { 3 } else { 50 };
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..n_pause {
        pause.push(transition(&mut c, "/api/v1/vm.pause", "paused"));
        resume.push(transition(&mut c, "/api/v1/vm.resume", "running"));
    }
    let (mut ppause, mut presume) = (Vec::new(), Vec::new());
    for _ in 0..n_peer {
        ppause.push(
            vs.timed(&format!("suspend {}", domain.name), "suspended")
                + vs.timed(&format!("domstate {}", domain.name), "paused"),
        );
        presume.push(
            vs.timed(&format!("resume {}", domain.name), "resumed")
                + vs.timed(&format!("domstate {}", domain.name), "running"),
        );
    }
    for (label, a, b, limit) in [
        ("pause -> paused", &pause, &ppause, 1.0),
        ("resume -> running", &resume, &presume, 1.0),
    ] {
        rows.push((
            format!("7. {label} (request + state)"),
            "ms".into(),
            a.clone(),
            "virsh suspend/resume + domstate".into(),
            b.clone(),
        ));
        goals.push(goal(label, median(a), "ms", limit, Some(median(b))));
    }
    drop(c);

    // From the shell: one process each.
    let runs = if s.quick { 2 } else { 20 };
    let (mut ci, mut vi, mut cp, mut vp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        ci.push(wall_ms(Command::new(s.ctl).args(["info", &id])));
        vi.push(wall_ms(Command::new("virsh").args([
            "-c",
            URI,
            "dominfo",
            &domain.name,
        ])));
        cp.push(
            wall_ms(Command::new(s.ctl).args(["pause", &id]))
                + wall_ms(Command::new(s.ctl).args(["resume", &id])),
        );
        vp.push(
            wall_ms(Command::new("virsh").args(["-c", URI, "suspend", &domain.name]))
                + wall_ms(Command::new("virsh").args(["-c", URI, "resume", &domain.name])),
        );
    }
    rows.push((
        "7. shell: cellvmctl info".into(),
        "wall ms".into(),
        ci,
        "virsh dominfo".into(),
        vi,
    ));
    rows.push((
        "7. shell: pause + resume".into(),
        "wall ms".into(),
        cp,
        "virsh suspend + resume".into(),
        vp,
    ));
    drop(vs);

    // launch --detach with 1, 10, 100 on the host, then as many as fit for list.
    let marks: &[usize] = if s.quick { &[1, 2] } else { &[1, 10, 100] };
    let most = if s.quick { 3 } else { 1000 };
    let mut at_mark = vec![(1usize, first)];
    let total = mem_total_mib();
    while fleet.ids.len() < most {
        if mem_available_mib() < total * 0.15 {
            notes.push(format!(
                "scenario 7: stopped at {} VMs: host memory available under 15%",
                fleet.ids.len()
            ));
            break;
        }
        let Some(ms) = launch(&mut fleet) else { break };
        if marks.contains(&fleet.ids.len()) {
            at_mark.push((fleet.ids.len(), ms));
        }
    }
    let held = fleet.ids.len();
    // A peer launch: `virsh create` of the same guest returns once QEMU runs, before
    // its firmware has booted the guest: not the same milestone, so only noted.
    for (n, ms) in &at_mark {
        notes.push(format!(
            "scenario 7: cellvmctl launch (--detach, back once the guest runs) of VM {n} on the host: {ms:.1} ms"
        ));
    }
    let list_runs = if s.quick { 2 } else { 10 };
    let mut list_ms = Vec::new();
    let mut peer_list = Vec::new();
    for _ in 0..list_runs {
        let t = Instant::now();
        let out = Command::new(s.ctl)
            .arg("list")
            .stdin(Stdio::null())
            .output()
            .expect("cellvmctl list");
        list_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let text = String::from_utf8_lossy(&out.stdout);
        let ours = text
            .lines()
            .filter(|l| l.contains(&format!("cp{}-", std::process::id())))
            .count();
        let running = text
            .lines()
            .filter(|l| {
                l.contains(&format!("cp{}-", std::process::id())) && l.contains(" running ")
            })
            .count();
        assert!(
            out.status.success() && ours == held,
            "list shows {ours} of {held}: {text}"
        );
        assert_eq!(running, held, "every VM listed running");
        peer_list.push(wall_ms(Command::new("virsh").args(["-c", URI, "list"])));
    }
    rows.push((
        format!("7. list: cellvmctl, {held} VMs"),
        "wall ms".into(),
        list_ms.clone(),
        "virsh list (1 domain)".into(),
        peer_list.clone(),
    ));
    goals.push(goal(
        &format!("list of {held} VMs (the goal is for 1,000)"),
        median(&list_ms),
        "ms",
        100.0,
        Some(median(&peer_list)),
    ));
    notes.push(format!(
        "scenario 7: {held} VMs held at once for list (asked {most}); vm.info samples {n_info}, peer samples {n_peer}"
    ));
    drop(fleet);
    drop(domain);
    Report { rows, goals, notes }
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_pick_from_the_sorted_samples() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(super::percentile(&v, 0.5), 51.0);
        assert_eq!(super::percentile(&v, 0.99), 99.0);
        assert_eq!(super::percentile(&[3.0], 0.99), 3.0);
    }
}
