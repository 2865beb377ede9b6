//! cellvmctl against a registry written by the jailer's own code and API sockets served
//! by a stand-in VMM (a thread speaking the contract's HTTP), in a run directory of the
//! test's own: every verb's output, exit status and error words, without KVM. The
//! end-to-end run through the real jailer and VMM is tests/control_plane.rs.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellvm_jailer::policy::TenantPolicy;
use cellvm_jailer::registry::Registry;

fn run_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cellvmctl-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tenant(name: &str) -> TenantPolicy {
    TenantPolicy::parse(&format!(
        "name = \"{name}\"\nmax_vcpus = 4\nmax_memory_mib = 1024\nuid_range = [500000, 500099]\nmcs_categories = [10, 20]\n[cgroup]\ncpu_percent = 100\nmemory_overhead_mib = 8\npids_max = 8\n"
    ))
    .unwrap()
}

fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellvmctl"))
        .arg("--run-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// What the stand-in VMM saw and is.
#[derive(Default)]
struct Fake {
    state: String,
    requests: Vec<String>,
    /// Answer nothing at all (a hung VMM).
    silent: bool,
}

/// Serves `RUN_DIR/vm/<id>/api.sock` the way the contract says the VMM does.
fn serve(dir: &Path, id: &str) -> Arc<Mutex<Fake>> {
    let vm = dir.join("vm").join(id);
    std::fs::create_dir_all(&vm).unwrap();
    let l = UnixListener::bind(vm.join("api.sock")).unwrap();
    std::fs::set_permissions(vm.join("api.sock"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let fake = Arc::new(Mutex::new(Fake {
        state: "running".into(),
        ..Fake::default()
    }));
    let f = fake.clone();
    let id = id.to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let f = f.clone();
            let id = id.clone();
            std::thread::spawn(move || connection(s, &f, &id));
        }
    });
    fake
}

fn connection(mut s: UnixStream, f: &Mutex<Fake>, id: &str) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < end + 4 + len {
            let n = s.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
        buf.drain(..end + 4 + len);
        let line = head.lines().next().unwrap_or_default().to_string();
        let mut fake = f.lock().unwrap();
        fake.requests
            .push(format!("{line} {body}").trim().to_string());
        if fake.silent {
            drop(fake);
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        let (status, reply) = match line.split(' ').take(2).collect::<Vec<_>>()[..] {
            ["GET", "/api/v1/vm.info"] => (
                "200 OK",
                format!(
                    r#"{{"id":"{id}","tenant":"acme","state":"{}","reason":"booted","vcpus":2,"memory_mib":64,"uptime_ms":65000,"label":"system_u:system_r:cellvm_t:s0:c1,c2","cgroup":"/sys/fs/cgroup/cpu/cellvm/{id}","devices":[{{"id":"dev0","kind":"blk","pid":4321,"state":"connected"}}]}}"#,
                    fake.state
                ),
            ),
            ["GET", "/api/v1/vm.counters"] => (
                "200 OK",
                r#"{"vcpus":[{"id":0,"exits":{"io":12,"hlt":3}}],"devices":[{"id":"dev0","kind":"blk","requests":7,"bytes":3584,"errors":0}]}"#.into(),
            ),
            ["PUT", "/api/v1/vm.pause"] => {
                fake.state = "paused".into();
                ("204 No Content", String::new())
            }
            ["PUT", "/api/v1/vm.resume"] => {
                fake.state = "running".into();
                ("204 No Content", String::new())
            }
            ["PUT", "/api/v1/vm.reboot"] => ("409 Conflict", r#"{"error":"a job runs: snapshot-1"}"#.into()),
            ["PUT", "/api/v1/vm.shutdown"] => (
                "200 OK",
                r#"{"result":"timed-out"}"#.into(),
            ),
            _ => ("404 Not Found", r#"{"error":"no such endpoint"}"#.into()),
        };
        drop(fake);
        let msg = if status.starts_with("204") {
            format!("HTTP/1.1 {status}\r\n\r\n")
        } else {
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                reply.len()
            )
        };
        if s.write_all(msg.as_bytes()).is_err() {
            return;
        }
    }
}

/// A registry entry for `id` whose supervisor is `pid` (this test process by default).
fn register(dir: &Path, id: &str, tenant_name: &str, pid: u32) {
    let reg = Registry::lock(dir).unwrap();
    reg.allocate(id, &tenant(tenant_name), pid, 0).unwrap();
}

#[test]
fn list_shows_each_vm_with_its_state_and_a_hung_one_as_unknown_within_a_second() {
    let dir = run_dir("list");
    let me = std::process::id();
    register(&dir, "a1", "acme", me);
    register(&dir, "b1", "bravo", me);
    register(&dir, "hung", "bravo", me);
    serve(&dir, "a1");
    serve(&dir, "b1").lock().unwrap().state = "paused".into();
    serve(&dir, "hung").lock().unwrap().silent = true;
    let start = Instant::now();
    let o = ctl(&dir, &["list"]);
    let took = start.elapsed();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(took < Duration::from_secs(3), "list took {took:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "Id",
            "Tenant",
            "State",
            "vCPUs",
            "Memory",
            "Uptime",
            "Supervisor"
        ]
    );
    let row = |id: &str| -> Vec<String> {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row {id}:\n{out}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    // The tenant column is the registry's (the jailer's word), not the VMM's.
    assert_eq!(
        row("a1"),
        [
            "a1",
            "acme",
            "running",
            "2",
            "64",
            "MiB",
            "1m05s",
            &me.to_string()
        ]
    );
    assert_eq!(row("b1")[1..3], ["bravo".to_string(), "paused".into()]);
    assert_eq!(row("hung")[2..4], ["unknown".to_string(), "-".into()]);

    let o = ctl(&dir, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0]["api_socket"],
        dir.join("vm/a1/api.sock").display().to_string()
    );
    assert_eq!(rows[2]["state"], "unknown");
    assert!(
        rows[2]["reason"]
            .as_str()
            .unwrap()
            .contains("no answer within 1000 ms"),
        "{v}"
    );
}

#[test]
fn an_entry_whose_supervisor_is_gone_is_listed_only_with_all_as_ended() {
    let dir = run_dir("ended");
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    register(&dir, "gone", "acme", pid);
    child.wait().unwrap();
    let (out, _) = text(&ctl(&dir, &["list"]));
    assert!(!out.contains("gone"), "{out}");
    let (out, _) = text(&ctl(&dir, &["list", "--all"]));
    let row = out
        .lines()
        .find(|l| l.starts_with(" gone"))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(row.split_whitespace().nth(2), Some("ended"), "{out}");
    let o = ctl(&dir, &["pause", "gone"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("vm gone: not running (its supervisor"),
        "{err}"
    );
}

#[test]
fn info_json_has_the_vmms_fields_and_the_api_socket_path() {
    let dir = run_dir("info");
    register(&dir, "i1", "acme", std::process::id());
    serve(&dir, "i1");
    let o = ctl(&dir, &["info", "i1", "--json"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["api_socket"],
        dir.join("vm/i1/api.sock").display().to_string()
    );
    assert_eq!(v["state"], "running");
    assert_eq!(v["devices"][0]["pid"], 4321);
    assert_eq!(v["supervisor"], std::process::id());
    let (out, _) = text(&ctl(&dir, &["info", "i1"]));
    assert!(out.contains("State:          running (booted)\n"), "{out}");
    assert!(
        out.contains("Device:         dev0 blk pid 4321 connected\n"),
        "{out}"
    );
}

#[test]
fn pause_and_resume_reach_the_api_and_their_state_shows() {
    let dir = run_dir("pause");
    register(&dir, "p1", "acme", std::process::id());
    let fake = serve(&dir, "p1");
    let o = ctl(&dir, &["pause", "p1"]);
    assert_eq!(text(&o).0, "VM p1 paused\n");
    assert!(text(&ctl(&dir, &["info", "p1"]))
        .0
        .contains("State:          paused"));
    let o = ctl(&dir, &["resume", "p1"]);
    assert_eq!(text(&o).0, "VM p1 resumed\n");
    let reqs = fake.lock().unwrap().requests.clone();
    assert!(
        reqs.contains(&"PUT /api/v1/vm.pause HTTP/1.1".to_string()),
        "{reqs:?}"
    );
    assert!(
        reqs.contains(&"PUT /api/v1/vm.resume HTTP/1.1".to_string()),
        "{reqs:?}"
    );
}

#[test]
fn shutdown_that_times_out_says_so_with_its_own_exit_status() {
    let dir = run_dir("shutdown");
    register(&dir, "s1", "acme", std::process::id());
    let fake = serve(&dir, "s1");
    let o = ctl(&dir, &["shutdown", "s1", "--timeout", "3"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(124), "{out}{err}");
    assert!(
        err.contains("vm s1: timed out: the guest did not power off within 3 s"),
        "{err}"
    );
    let reqs = fake.lock().unwrap().requests.clone();
    assert!(
        reqs.contains(&r#"PUT /api/v1/vm.shutdown HTTP/1.1 {"timeout_ms":3000}"#.to_string()),
        "{reqs:?}"
    );
}

#[test]
fn an_api_refusal_shows_its_status_and_message() {
    let dir = run_dir("refusal");
    register(&dir, "r1", "acme", std::process::id());
    serve(&dir, "r1");
    let o = ctl(&dir, &["reboot", "r1"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o).1,
        "cellvmctl: vm r1: PUT /api/v1/vm.reboot: HTTP 409: a job runs: snapshot-1\n"
    );
}

#[test]
fn stats_reads_the_counters() {
    let dir = run_dir("stats");
    register(&dir, "st1", "acme", std::process::id());
    serve(&dir, "st1");
    let o = ctl(&dir, &["stats", "st1", "--json"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["counters"]["devices"][0]["bytes"], 3584);
    assert_eq!(v["cgroup"], "cellvm/st1");
    let (out, _) = text(&ctl(&dir, &["stats", "st1"]));
    assert!(
        out.contains("vCPU 0:         exits.hlt=3 exits.io=12\n"),
        "{out}"
    );
    assert!(
        out.contains("Device dev0 (blk): bytes=3584 errors=0 requests=7\n"),
        "{out}"
    );
}

#[test]
fn an_unknown_id_is_exit_2_and_says_so() {
    let dir = run_dir("unknown");
    for verb in [
        "info",
        "pause",
        "resume",
        "shutdown",
        "destroy",
        "stats",
        "console",
        "reboot",
        "power-button",
    ] {
        let o = ctl(&dir, &[verb, "nosuchvm"]);
        assert_eq!(o.status.code(), Some(2), "{verb}");
        assert_eq!(
            text(&o).1,
            "cellvmctl: no VM with id \"nosuchvm\" on this host (`cellvmctl list` shows them)\n",
            "{verb}"
        );
    }
    let o = ctl(&dir, &["info", "../../etc"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("is not a VM id"));
}

#[test]
fn every_verb_has_help() {
    for verb in [
        "list",
        "info",
        "console",
        "pause",
        "resume",
        "shutdown",
        "power-button",
        "reboot",
        "destroy",
        "stats",
        "jobs",
        "cancel",
        "launch",
    ] {
        let o = ctl(Path::new("/nonexistent"), &[verb, "--help"]);
        let (out, _) = text(&o);
        assert!(
            o.status.success() && out.contains("Usage: cellvmctl"),
            "{verb}: {out}"
        );
    }
}

fn as_user(dir: &Path, groups: &[u32], args: &[&str]) -> Output {
    let groups = groups.to_vec();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellvmctl"));
    cmd.arg("--run-dir").arg(dir).args(args);
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

fn chown(p: &Path, gid: u32, mode: u32) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: chown of a path this test made.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 0, gid) }, 0);
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn another_user_is_refused_and_the_tenants_group_is_let_in() {
    let dir = run_dir("perm");
    register(&dir, "g1", "acme", std::process::id());
    let fake = serve(&dir, "g1");
    // The jailer's layout for a VM with api_group: run dir and vm/ traversable only,
    // the VM's directory and socket root's and the group's.
    const GROUP: u32 = 47_001;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(dir.join("vm"), std::fs::Permissions::from_mode(0o711)).unwrap();
    chown(&dir.join("vm/g1"), GROUP, 0o750);
    chown(&dir.join("vm/g1/api.sock"), GROUP, 0o660);

    let o = as_user(&dir, &[], &["pause", "g1"]);
    assert_eq!(o.status.code(), Some(1));
    let (_, err) = text(&o);
    assert!(
        err.starts_with("cellvmctl: permission denied: root or the tenant's api_group"),
        "{err}"
    );
    assert!(
        fake.lock().unwrap().requests.is_empty(),
        "nothing reached the API"
    );
    // Positive control: the same user in the tenant's group gets through.
    let o = as_user(&dir, &[GROUP], &["pause", "g1"]);
    assert_eq!(text(&o).0, "VM g1 paused\n", "{:?}", text(&o));
    // A socket of mode 0600 refuses even the group.
    chown(&dir.join("vm/g1/api.sock"), GROUP, 0o600);
    let (_, err) = text(&as_user(&dir, &[GROUP], &["resume", "g1"]));
    assert!(
        err.contains("permission denied: root or the tenant's api_group"),
        "{err}"
    );
    // list and destroy need the registry and the supervisor: root's.
    let (_, err) = text(&as_user(&dir, &[GROUP], &["list"]));
    assert!(err.contains("permission denied"), "{err}");
    let (_, err) = text(&as_user(&dir, &[GROUP], &["destroy", "g1"]));
    assert!(
        err.contains("destroy signals the VM's supervisor: root only"),
        "{err}"
    );
}

/// A stand-in supervisor: a child process whose death (by the signal destroy sends)
/// a watcher answers by removing the registry entry, as the real one does after
/// killing its cells.
#[test]
fn destroy_signals_the_supervisor_and_waits_until_its_entry_is_gone() {
    let dir = run_dir("destroy");
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    register(&dir, "d1", "acme", child.id());
    let d = dir.clone();
    let watcher = std::thread::spawn(move || {
        let status = child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        Registry::lock(&d).unwrap().remove("d1").unwrap();
        status
    });
    let o = ctl(&dir, &["destroy", "d1"]);
    assert_eq!(text(&o).0, "VM d1 destroyed\n", "{:?}", text(&o));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(watcher.join().unwrap().signal(), Some(libc::SIGUSR1));
    assert!(!dir.join("vms/d1").exists());
}

#[test]
fn destroy_never_signals_a_process_that_reused_the_supervisors_pid() {
    let dir = run_dir("reuse");
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    register(&dir, "r1", "acme", child.id());
    // Rewrite the entry's start time: as if the supervisor died and its pid was reused.
    let path = dir.join("vms/r1");
    let text_now = std::fs::read_to_string(&path).unwrap();
    let changed: String = text_now
        .lines()
        .map(|l| {
            if l.starts_with("supervisor_start=") {
                "supervisor_start=1".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    std::fs::write(&path, changed).unwrap();
    let o = ctl(&dir, &["destroy", "r1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("not running"), "{:?}", text(&o));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the process was not signalled"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
