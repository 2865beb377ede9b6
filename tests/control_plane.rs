//! The control plane end to end: `cellvmctl` driving VMs that the real jailer launched
//! in the background (`cellvmctl launch` = `cellvm-jailer launch --detach`), each VMM
//! serving its API on the socket the jailer handed it, the built-in test guest in its
//! `ticks` mode (`tick N` on the console every 50 ms, a power-button press answered by
//! powering off). What an operator sees: list, pause and resume (the ticks stop and go
//! on), shutdown (powered off, or timed out), destroy (nothing left), an unknown id, and
//! who may reach a VM's API.

mod common;
use common::{bin, repo};

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellvm-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ctl() -> Command {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm; it is missing on this machine"
    );
    Command::new(bin("cellvmctl"))
}

fn run(args: &[&str]) -> Output {
    ctl().args(args).stdin(Stdio::null()).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A tenant policy: the example's, renamed, with its own uid and MCS ranges and `extra`
/// lines before its [cgroup] table.
fn tenant(name: &str, uids: [u32; 2], cats: [u16; 2], extra: &str) -> PathBuf {
    let example = std::fs::read_to_string(repo("policy/tenants/example.toml")).unwrap();
    let text = example
        .replace("name = \"example\"", &format!("name = \"{name}\""))
        .replace(
            "uid_range = [200000, 200999]",
            &format!("uid_range = [{}, {}]", uids[0], uids[1]),
        )
        .replace(
            "mcs_categories = [0, 1023]",
            &format!("mcs_categories = [{}, {}]", cats[0], cats[1]),
        )
        .replace("[cgroup]", &format!("{extra}\n[cgroup]"));
    assert!(text.contains(&format!("name = \"{name}\"")) && text.contains(extra));
    let p = scratch().join(format!("tenant-{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn spec(name: &str, cmdline: &str) -> PathBuf {
    common::guest_spec(&scratch(), name, cmdline)
}

fn launch(policy: &Path, vm: &Path, id: &str) -> Child {
    ctl()
        .args(["launch", "--policy"])
        .arg(policy)
        .arg("--vm")
        .arg(vm)
        .args(["--id", id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn console_log(id: &str) -> PathBuf {
    Path::new("/run/cellvm/vm").join(id).join("console.log")
}

/// The highest `tick N` the guest has written to its console log.
fn last_tick(id: &str) -> u64 {
    std::fs::read_to_string(console_log(id))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `list`: (id, tenant, state) of every row.
fn listed() -> Vec<(String, String, String)> {
    let o = run(&["list"]);
    assert!(o.status.success(), "{:?}", text(&o));
    text(&o)
        .0
        .lines()
        .skip(2)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.into(), f.next()?.into(), f.next()?.into()))
        })
        .collect()
}

fn state_of(id: &str) -> Option<(String, String)> {
    listed()
        .into_iter()
        .find(|(i, _, _)| i == id)
        .map(|(_, t, s)| (t, s))
}

/// The VMM's uid, from the registry entry (read while the VM runs).
fn vm_uid(id: &str) -> u32 {
    std::fs::read_to_string(format!("/run/cellvm/vms/{id}"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("uid="))
        .unwrap()
        .parse()
        .unwrap()
}

/// Pids of every process running as `uid`.
fn processes_of(uid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next()?.parse::<u32>().ok())
                == Some(uid)
        })
        .collect()
}

fn assert_nothing_left(id: &str, uid: u32) {
    common::assert_cell_gone(id);
    assert_eq!(
        processes_of(uid),
        Vec::<u32>::new(),
        "processes of uid {uid} left"
    );
    assert!(state_of(id).is_none(), "{id} still listed");
}

/// Runs cellvmctl as uid/gid 65534 with `groups` as its supplementary groups.
fn as_user(groups: &[u32], args: &[&str]) -> Output {
    let groups = groups.to_vec();
    // A copy any user may run (the build tree need not be readable by them).
    let copy = scratch().join("cellvmctl");
    common::executable_copy("cellvmctl", &copy);
    let mut cmd = Command::new(&copy);
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// Destroys the VMs left by a failing test (best effort).
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = run(&["destroy", id]);
        }
    }
}

const API_GID: u32 = 47_012;

#[test]
fn two_tenants_three_background_vms_listed_paused_resumed_shut_down_and_destroyed() {
    let pid = std::process::id();
    let ta = tenant(&format!("cpa{pid}"), [410000, 410099], [600, 620], "");
    let tb = tenant(
        &format!("cpb{pid}"),
        [411000, 411099],
        [621, 640],
        &format!("api_group = \"{API_GID}\""),
    );
    let (a1, a2, b1) = (
        format!("cp-{pid}-a1"),
        format!("cp-{pid}-a2"),
        format!("cp-{pid}-b1"),
    );
    let _cleanup = Cleanup(vec![a1.clone(), a2.clone(), b1.clone()]);
    let ticks = spec("ticks", "tests=ticks");
    let stubborn = spec("stubborn", "tests=ticks ignore-power-button");
    // Tenant a's two launches at once, then tenant b's, each back once its guest runs.
    // (b's comes second: a launch without api_group racing one with it can leave
    // /run/cellvm/vm at 0700, closing the group out; see the jailer's RunDir::create.)
    let first = [
        (a1.clone(), launch(&ta, &ticks, &a1)),
        (a2.clone(), launch(&ta, &stubborn, &a2)),
    ];
    let mut launches: Vec<(String, Child)> = first.into_iter().collect();
    let mut done = Vec::new();
    for (id, child) in launches.drain(..) {
        done.push((id, child.wait_with_output().unwrap()));
    }
    done.push((
        b1.clone(),
        launch(&tb, &ticks, &b1).wait_with_output().unwrap(),
    ));
    for (id, o) in done {
        let (out, err) = text(&o);
        assert!(o.status.success(), "launch {id}: {out}{err}");
        assert_eq!(out.trim(), id, "launch prints the VM id");
    }
    for id in [&a1, &a2, &b1] {
        wait_for(&format!("{id} ticking"), Duration::from_secs(20), || {
            last_tick(id) >= 2
        });
    }
    let want_a = format!("cpa{pid}");
    let want_b = format!("cpb{pid}");
    assert_eq!(state_of(&a1), Some((want_a.clone(), "running".into())));
    assert_eq!(state_of(&a2), Some((want_a.clone(), "running".into())));
    assert_eq!(state_of(&b1), Some((want_b.clone(), "running".into())));
    let (table, _) = text(&run(&["list"]));
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(a1.as_str()))
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(
        row.split_whitespace().take(5).collect::<Vec<_>>(),
        [a1.as_str(), want_a.as_str(), "running", "1", "64"],
        "{table}"
    );
    let (info, _) = text(&run(&["info", &a1, "--json"]));
    assert!(
        info.contains(&format!("\"api_socket\": \"/run/cellvm/vm/{a1}/api.sock\"")),
        "{info}"
    );
    assert!(
        info.contains(&format!("\"tenant\": \"{want_a}\"")),
        "{info}"
    );

    // Pause stops the guest; the others tick on; resume continues it.
    assert_eq!(text(&run(&["pause", &a1])).0, format!("VM {a1} paused\n"));
    assert_eq!(state_of(&a1).unwrap().1, "paused");
    std::thread::sleep(Duration::from_millis(200));
    let (held, other) = (last_tick(&a1), last_tick(&b1));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(last_tick(&a1), held, "ticks went on while paused");
    assert!(last_tick(&b1) > other + 5, "the other VM kept ticking");
    assert_eq!(text(&run(&["resume", &a1])).0, format!("VM {a1} resumed\n"));
    wait_for("ticks after resume", Duration::from_secs(5), || {
        last_tick(&a1) > held + 5
    });
    assert_eq!(state_of(&a1).unwrap().1, "running");

    // Another user: refused by the run directory; in tenant b's api_group it reaches
    // b's VM (positive control), never a's.
    let (_, err) = text(&as_user(&[], &["info", &b1]));
    assert!(
        err.contains("permission denied: root or the tenant's api_group"),
        "{err}"
    );
    let (_, err) = text(&as_user(&[API_GID], &["pause", &a1]));
    assert!(
        err.contains("permission denied: root or the tenant's api_group"),
        "{err}"
    );
    assert_eq!(state_of(&a1).unwrap().1, "running", "a1 was not paused");
    let o = as_user(&[API_GID], &["info", &b1]);
    assert!(
        text(&o).0.contains("State:          running"),
        "{:?}",
        text(&o)
    );

    // Shutdown: the guest sees the power button and powers off; the VM is gone.
    let uid_b1 = vm_uid(&b1);
    let watcher = ctl()
        .args(["console", &b1])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let o = run(&["shutdown", &b1, "--timeout", "20"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    assert_eq!(text(&o).0, format!("VM {b1} powered off\n"));
    let seen = watcher.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&seen.stdout);
    assert!(seen.contains("TEST power-button PASS"), "{seen}");
    assert_nothing_left(&b1, uid_b1);

    // A guest that ignores the button: its shutdown is a job `jobs` shows, and `cancel`
    // ends it early (the shutdown says so, exit 1; the VM runs on).
    let waiting = ctl()
        .args(["shutdown", &a2, "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut job = None;
    wait_for("a running shutdown job", Duration::from_secs(10), || {
        let o = run(&["jobs", &a2, "--json"]);
        let jobs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        job = jobs.as_array().and_then(|a| {
            a.iter()
                .find(|j| j["kind"] == "shutdown" && j["state"] == "running")
                .and_then(|j| j["id"].as_u64())
        });
        job.is_some()
    });
    let job = job.unwrap().to_string();
    let o = run(&["jobs", &a2]);
    assert!(text(&o).0.contains("shutdown"), "{:?}", text(&o));
    let o = run(&["cancel", &a2, &job]);
    assert_eq!(text(&o).0, format!("VM {a2}: job {job} cancelled\n"));
    let o = waiting.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(
        text(&o).1.contains("the shutdown was cancelled"),
        "{:?}",
        text(&o)
    );
    let o = run(&["jobs", &a2, "--json"]);
    assert!(text(&o).0.contains("\"cancelled\""), "{:?}", text(&o));
    assert_eq!(state_of(&a2).unwrap().1, "running");
    // Cancelling it again: no running job of that id (the API's 404, exit 1).
    let o = run(&["cancel", &a2, &job]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(text(&o).1.contains("404"), "{:?}", text(&o));

    // Then timed out (exit 124, still running), and destroy leaves nothing.
    let uid_a2 = vm_uid(&a2);
    let o = run(&["shutdown", &a2, "--timeout", "2"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(124), "{err}");
    assert!(err.contains(&format!("vm {a2}: timed out")), "{err}");
    assert!(std::fs::read_to_string(console_log(&a2))
        .unwrap()
        .contains("power-button ignored"));
    assert_eq!(state_of(&a2).unwrap().1, "running");
    assert_eq!(
        text(&run(&["destroy", &a2])).0,
        format!("VM {a2} destroyed\n")
    );
    assert_nothing_left(&a2, uid_a2);

    let uid_a1 = vm_uid(&a1);
    assert_eq!(
        text(&run(&["destroy", &a1])).0,
        format!("VM {a1} destroyed\n")
    );
    assert_nothing_left(&a1, uid_a1);
}

#[test]
fn an_unknown_vm_id_is_exit_2_with_a_clear_message() {
    let id = format!("cp-{}-nosuch", std::process::id());
    for verb in ["info", "pause", "shutdown", "destroy", "stats", "console"] {
        let o = run(&[verb, &id]);
        assert_eq!(o.status.code(), Some(2), "{verb}: {:?}", text(&o));
        assert_eq!(
            text(&o).1,
            format!(
                "cellvmctl: no VM with id \"{id}\" on this host (`cellvmctl list` shows them)\n"
            )
        );
    }
}
