//! Snapshot and restore through the jailer, as an operator does it: `cellvmctl snapshot
//! ID DIR` (the files opened outside the cell and handed to the VMM as descriptors) and
//! `cellvmctl restore DIR --policy P` (a new detached launch: the spec checked against the
//! tenant policy, fresh cells, the VMM checking the snapshot against the spec). The guest
//! runs the test guest's `memload` workload, which checks all of its RAM above 16 MiB on
//! every pass.

mod common;
use common::{bin, repo};

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ctl(args: &[&str]) -> Output {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm; it is missing on this machine"
    );
    Command::new(bin("cellvmctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{out}\n{err}");
    out
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn console(id: &str) -> String {
    std::fs::read_to_string(Path::new("/run/cellvm/vm").join(id).join("console.log"))
        .unwrap_or_default()
}

fn wait_passes(id: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::memload_passes(&console(id)).len() < n {
        assert!(
            Instant::now() < deadline,
            "{id}: memload stalled:\n{}",
            console(id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn info(id: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&ctl(&["info", id, "--json"]))).unwrap()
}

fn uid_of(pid: u64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

struct Destroy(Vec<String>);
impl Drop for Destroy {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = ctl(&["destroy", id]);
        }
    }
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("cellvm-jsnap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_jailed_vm_is_saved_and_restored_into_fresh_cells_and_goes_on() {
    let _turn = common::launch_turn();
    let dir = scratch();
    let policy = repo("policy/tenants/example.toml");
    let spec = common::guest_spec(&dir, "snapjail", "tests=memload");
    let (a, b) = (
        format!("snapa-{}", std::process::id()),
        format!("snapb-{}", std::process::id()),
    );
    let _cleanup = Destroy(vec![a.clone(), b.clone()]);
    let pol = policy.to_str().unwrap();
    ok(&ctl(&[
        "launch",
        "--policy",
        pol,
        "--vm",
        spec.to_str().unwrap(),
        "--id",
        &a,
    ]));
    wait_passes(&a, 2);

    let snap = dir.join("snap");
    let out = ok(&ctl(&["snapshot", &a, snap.to_str().unwrap()]));
    assert!(out.contains("paused"), "{out}");
    assert_eq!(info(&a)["state"], "paused");
    for (name, mode) in [("state", 0o600), ("memory", 0o600), ("vm.toml", 0o600)] {
        let m = std::fs::metadata(snap.join(name)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, mode, "{name}");
    }
    assert_eq!(
        std::fs::read(snap.join("vm.toml")).unwrap(),
        std::fs::read(&spec).unwrap(),
        "the spec beside the snapshot is the one the VM was launched with"
    );
    // A second snapshot never overwrites the first.
    let again = ctl(&["snapshot", &a, snap.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(err(&again).contains("already there"), "{}", err(&again));
    let at_pause = console(&a);

    // Restored while the original still exists (paused): a VM of its own.
    let out = ok(&ctl(&[
        "restore",
        snap.to_str().unwrap(),
        "--policy",
        pol,
        "--id",
        &b,
    ]));
    assert_eq!(out.trim(), b);
    let (ia, ib) = (info(&a), info(&b));
    assert_eq!(ib["state"], "running", "{ib}");
    assert_eq!(ib["reason"], "restored", "{ib}");
    assert_ne!(
        ia["label"], ib["label"],
        "the restored VM has an MCS pair of its own"
    );
    let uids = |id: &str| -> Vec<String> {
        common::cgroup_pids(id)
            .iter()
            .filter_map(|p| p.parse().ok())
            .map(uid_of)
            .collect()
    };
    let (ua, ub) = (uids(&a), uids(&b));
    assert!(!ua.is_empty() && !ub.is_empty(), "{ua:?} {ub:?}");
    assert!(
        ub.iter().all(|u| !ua.contains(u) && u != "0"),
        "the restored VM's cells run as uids of their own: {ua:?} {ub:?}"
    );
    let before = common::memload_passes(&console(&b)).len();
    wait_passes(&b, before + 3);
    // The original never ran on: its console is what it was at the pause.
    assert_eq!(console(&a), at_pause);
    let both = format!("{at_pause}{}", console(&b));
    common::assert_memload_continuous(&both);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restore_is_bounded_by_the_tenant_policy_and_checked_against_its_spec() {
    let _turn = common::launch_turn();
    let dir = scratch().join("bounded");
    std::fs::create_dir_all(&dir).unwrap();
    let policy = repo("policy/tenants/example.toml");
    let pol = policy.to_str().unwrap();
    let spec = common::guest_spec(&dir, "snapbound", "tests=memload");
    let a = format!("snapc-{}", std::process::id());
    let _cleanup = Destroy(vec![a.clone()]);
    ok(&ctl(&[
        "launch",
        "--policy",
        pol,
        "--vm",
        spec.to_str().unwrap(),
        "--id",
        &a,
    ]));
    wait_passes(&a, 1);
    let snap = dir.join("snap");
    ok(&ctl(&["snapshot", &a, snap.to_str().unwrap(), "--resume"]));
    assert_eq!(info(&a)["state"], "running");
    // An incremental snapshot into the same directory, through the jailed VMM.
    let n = common::memload_passes(&console(&a)).len();
    wait_passes(&a, n + 2);
    let out = ok(&ctl(&[
        "snapshot",
        &a,
        snap.to_str().unwrap(),
        "--incremental",
    ]));
    assert!(out.contains("(incremental)"), "{out}");
    assert!(!snap.join("state.new").exists());
    let at_pause = console(&a);
    ok(&ctl(&["destroy", &a]));
    // It restores, and the guest goes on from the second pause with all its RAM.
    let b = format!("snapd-{}", std::process::id());
    let _cleanup_b = Destroy(vec![b.clone()]);
    ok(&ctl(&[
        "restore",
        snap.to_str().unwrap(),
        "--policy",
        pol,
        "--id",
        &b,
    ]));
    let m = common::memload_passes(&console(&b)).len();
    wait_passes(&b, m + 2);
    let both = format!("{at_pause}{}", console(&b));
    common::assert_memload_continuous(&both);
    ok(&ctl(&["destroy", &b]));

    // A tenant allowed less memory than the snapshot's VM: the jailer refuses.
    let small = dir.join("small.toml");
    std::fs::write(
        &small,
        std::fs::read_to_string(&policy)
            .unwrap()
            .replace("max_memory_mib = 1024", "max_memory_mib = 32"),
    )
    .unwrap();
    let o = ctl(&[
        "restore",
        snap.to_str().unwrap(),
        "--policy",
        small.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("exceeds the tenant limit 32"),
        "{}",
        err(&o)
    );

    // A spec edited to claim more RAM than the snapshot holds: the VMM refuses, and the
    // operator hears why.
    let spec_path = snap.join("vm.toml");
    let text = std::fs::read_to_string(&spec_path).unwrap();
    std::fs::write(
        &spec_path,
        text.replace("memory_mib = 64", "memory_mib = 128"),
    )
    .unwrap();
    let o = ctl(&["restore", snap.to_str().unwrap(), "--policy", pol]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("the snapshot holds 64 MiB of RAM; the VM spec says 128 MiB"),
        "{}",
        err(&o)
    );
    // A state file that is not one.
    std::fs::write(&spec_path, text).unwrap();
    std::fs::write(snap.join("state"), b"not a snapshot").unwrap();
    let o = ctl(&["restore", snap.to_str().unwrap(), "--policy", pol]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("not a cellvm state file"), "{}", err(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
