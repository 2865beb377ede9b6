//! Each verb of cellvmctl: what it asks the registry, the API or the supervisor, and
//! what it prints. Each returns the process's exit status or an error (whose exit
//! status `Error::exit_code` gives).

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::host::{answered, api_target, escape_line, info_of, is_root, Error, Host, Info};
use crate::{console, fanout, stats, table};

/// How long a single API request may take (shutdown waits longer: its own timeout).
pub const API_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `list` waits for one VM's answer before showing it as `unknown`.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long destroy and shutdown wait for the supervisor to remove the registry entry.
pub const GONE_TIMEOUT: Duration = Duration::from_secs(30);
/// The exit status of a shutdown whose guest did not power off in time (as timeout(1)
/// and the supervisor's own timed-out status).
pub const TIMED_OUT: i32 = 124;

/// One line of `list`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub id: String,
    pub tenant: String,
    pub state: String,
    pub reason: String,
    pub vcpus: Option<u64>,
    pub memory_mib: Option<u64>,
    pub uptime_ms: Option<u64>,
    pub supervisor: Option<u32>,
    pub api_socket: String,
}

/// The largest `vm.info` body `list` reads from one VM.
const LIST_MAX_BODY: usize = 64 * 1024;

/// Every VM of the registry, each asked for its `vm.info` (all at once on one thread,
/// bounded by `timeout` together). A VM whose supervisor runs but whose API does not
/// answer is `unknown`; one whose supervisor is gone is `ended` (shown with `all`), as
/// are VMs the API reports `ended`.
pub fn list_rows(host: &Host, all: bool, timeout: Duration) -> Result<Vec<Row>, Error> {
    let scan = host.scan()?;
    let entries = scan.entries;
    let live: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].is_live())
        .collect();
    let sockets: Vec<PathBuf> = live
        .iter()
        .map(|&i| host.api_socket(&entries[i].id))
        .collect();
    let target = api_target("vm.info");
    let mut answers = fanout::get_all(&sockets, &target, timeout, LIST_MAX_BODY)
        .into_iter()
        .zip(live.iter().zip(&sockets));
    let mut next = answers.next();
    let mut rows = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let mut row = Row {
            id: e.id.clone(),
            tenant: e.tenant.clone(),
            state: "ended".into(),
            reason: "supervisor gone".into(),
            vcpus: None,
            memory_mib: None,
            uptime_ms: None,
            supervisor: Some(e.supervisor),
            api_socket: host.api_socket(&e.id).display().to_string(),
        };
        if let Some((answer, (_, sock))) = next.take_if(|(_, (at, _))| **at == i) {
            next = answers.next();
            match answered(&e.id, sock, "GET", &target, answer).and_then(|r| info_of(&e.id, r)) {
                Ok((_, info)) => {
                    row.state = if info.state.is_empty() {
                        "unknown".into()
                    } else {
                        info.state
                    };
                    row.reason = info.reason;
                    row.vcpus = Some(info.vcpus);
                    row.memory_mib = Some(info.memory_mib);
                    row.uptime_ms = Some(info.uptime_ms);
                }
                Err(err) => {
                    row.state = "unknown".into();
                    row.reason = err.to_string();
                }
            }
        }
        rows.push(row);
    }
    let mut out: Vec<Row> = rows
        .into_iter()
        .filter(|r| all || r.state != "ended")
        .collect();
    if all {
        for b in scan.broken {
            out.push(Row {
                id: b.id.clone(),
                tenant: String::new(),
                state: "unknown".into(),
                reason: format!("registry entry cannot be read: {}", b.why),
                vcpus: None,
                memory_mib: None,
                uptime_ms: None,
                supervisor: b.supervisor.map(|(p, _)| p),
                api_socket: host.api_socket(&b.id).display().to_string(),
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

pub fn list(host: &Host, all: bool, json: bool) -> Result<i32, Error> {
    let rows = list_rows(host, all, LIST_TIMEOUT)?;
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(0);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                escape_line(&r.id),
                escape_line(&r.tenant),
                escape_line(&r.state),
                dash(r.vcpus),
                r.memory_mib.map_or("-".into(), |m| format!("{m} MiB")),
                r.uptime_ms.map_or("-".into(), table::uptime),
                dash(r.supervisor),
            ]
        })
        .collect();
    let _ = out.write_all(
        table::render(
            &[
                "Id",
                "Tenant",
                "State",
                "vCPUs",
                "Memory",
                "Uptime",
                "Supervisor",
            ],
            &cells,
        )
        .as_bytes(),
    );
    Ok(0)
}

pub fn info(host: &Host, id: &str, json: bool) -> Result<i32, Error> {
    let vm = host.find(id)?;
    let (mut value, info) = host.info(id, API_TIMEOUT)?;
    let sock = host.api_socket(id);
    let console = host.vm_dir(id).join(crate::host::CONSOLE_SOCKET);
    let supervisor = vm.entry.as_ref().map(|e| e.supervisor);
    if json {
        if let Some(o) = value.as_object_mut() {
            o.insert("api_socket".into(), sock.display().to_string().into());
            o.insert(
                "console_socket".into(),
                console.display().to_string().into(),
            );
            o.insert(
                "run_dir".into(),
                host.vm_dir(id).display().to_string().into(),
            );
            o.insert(
                "supervisor".into(),
                supervisor.map_or(serde_json::Value::Null, |p| p.into()),
            );
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(0);
    }
    print!("{}", info_text(&info, &sock, &console, supervisor));
    Ok(0)
}

fn info_text(info: &Info, sock: &Path, console: &Path, supervisor: Option<u32>) -> String {
    let state = if info.reason.is_empty() {
        info.state.clone()
    } else {
        format!("{} ({})", info.state, info.reason)
    };
    let mut pairs = vec![
        ("Id", escape_line(&info.id)),
        ("Tenant", escape_line(&info.tenant)),
        ("State", escape_line(&state)),
        ("vCPUs", info.vcpus.to_string()),
        ("Memory", format!("{} MiB", info.memory_mib)),
        ("Uptime", table::uptime(info.uptime_ms)),
        ("Label", escape_line(&info.label)),
        ("Cgroup", escape_line(&info.cgroup)),
        ("API socket", sock.display().to_string()),
        ("Console", console.display().to_string()),
        ("Supervisor", dash(supervisor)),
    ];
    for d in &info.devices {
        pairs.push((
            "Device",
            escape_line(&format!(
                "{} {} pid {} {}",
                d.id,
                d.kind,
                dash(d.pid),
                d.state
            )),
        ));
    }
    table::fields(&pairs)
}

/// A request with no body and no answer to show: pause, resume, power-button, reboot.
pub fn simple(host: &Host, id: &str, endpoint: &str, done: &str) -> Result<i32, Error> {
    host.find(id)?;
    host.call(id, "PUT", endpoint, None, API_TIMEOUT)?;
    println!("VM {id} {done}");
    Ok(0)
}

pub fn shutdown(host: &Host, id: &str, timeout_s: u64) -> Result<i32, Error> {
    host.find(id)?;
    let body = format!("{{\"timeout_ms\":{}}}", timeout_s.saturating_mul(1000));
    let wait = Duration::from_secs(timeout_s) + Duration::from_secs(5);
    let answer = host.call(id, "PUT", "vm.shutdown", Some(body.as_bytes()), wait);
    let result = match answer {
        Ok(r) => r
            .json()
            .and_then(|v| v.get("result")?.as_str().map(str::to_owned))
            .unwrap_or_default(),
        // The VMM exits once the guest powered off; had the answer been lost on the
        // way, the VM is gone all the same.
        Err(Error::Http { .. }) if host.wait_gone(id, Duration::from_secs(5))? => {
            "powered-off".into()
        }
        Err(e) => return Err(e),
    };
    match result.as_str() {
        "powered-off" => {
            if !host.wait_gone(id, GONE_TIMEOUT)? && is_root() {
                return Err(Error::Vm {
                    id: id.into(),
                    what: format!(
                        "the guest powered off, but its registry entry is still there after {} s",
                        GONE_TIMEOUT.as_secs()
                    ),
                });
            }
            println!("VM {id} powered off");
            Ok(0)
        }
        "cancelled" => {
            eprintln!("cellvmctl: vm {id}: the shutdown was cancelled; the VM is still running");
            Ok(1)
        }
        "timed-out" => {
            eprintln!(
                "cellvmctl: vm {id}: timed out: the guest did not power off within {timeout_s} s; it is still running (`cellvmctl destroy {id}` ends it)"
            );
            Ok(TIMED_OUT)
        }
        other => Err(Error::Vm {
            id: id.into(),
            what: format!("vm.shutdown answered {:?}", escape_line(other)),
        }),
    }
}

/// SIGUSR1 to the supervisor (through a pidfd opened before its start time is checked,
/// so a reused pid cannot be hit), then waits until it has removed the registry entry.
/// One job of `vm.jobs`, as the API describes it (fields it adds later are ignored).
#[derive(Debug, Clone, serde::Deserialize, Serialize, PartialEq)]
pub struct Job {
    pub id: u64,
    pub kind: String,
    pub state: String,
    #[serde(default)]
    pub elapsed_ms: u64,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Jobs {
    jobs: Vec<Job>,
}

/// The jobs of `vm.jobs`, bounded: a VMM is untrusted and the API keeps a handful.
pub fn job_list(host: &Host, id: &str) -> Result<Vec<Job>, Error> {
    let r = host.call(id, "GET", "vm.jobs", None, API_TIMEOUT)?;
    let jobs: Jobs = serde_json::from_slice(&r.body).map_err(|e| Error::Vm {
        id: id.into(),
        what: format!("vm.jobs: {e}"),
    })?;
    Ok(jobs.jobs.into_iter().take(1000).collect())
}

pub fn jobs(host: &Host, id: &str, json: bool) -> Result<i32, Error> {
    host.find(id)?;
    let jobs = job_list(host, id)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&jobs).unwrap_or_default()
        );
        return Ok(0);
    }
    let cells: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                escape_line(&j.kind),
                escape_line(&j.state),
                format!("{} ms", j.elapsed_ms),
                j.timeout_ms.map_or("-".into(), |t| format!("{t} ms")),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["Job", "Kind", "State", "Elapsed", "Timeout"], &cells)
    );
    Ok(0)
}

pub fn cancel(host: &Host, id: &str, job: u64) -> Result<i32, Error> {
    host.find(id)?;
    let body = format!("{{\"id\":{job}}}");
    host.call(
        id,
        "PUT",
        "vm.jobs.cancel",
        Some(body.as_bytes()),
        API_TIMEOUT,
    )?;
    println!("VM {id}: job {job} cancelled");
    Ok(0)
}

pub fn destroy(host: &Host, id: &str) -> Result<i32, Error> {
    if !is_root() {
        return Err(Error::Denied(
            "destroy signals the VM's supervisor: root only".into(),
        ));
    }
    let vm = host.find(id)?;
    let entry = vm.entry.expect("root finds VMs through the registry");
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, entry.supervisor as libc::pid_t, 0) };
    if fd < 0 {
        return Err(Error::NotRunning {
            id: id.into(),
            why: format!(
                "supervisor {}: {}",
                entry.supervisor,
                std::io::Error::last_os_error()
            ),
        });
    }
    // SAFETY: fd is the new pidfd, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if cellvm_jailer::registry::process_start_time(entry.supervisor) != Some(entry.supervisor_start)
    {
        return Err(Error::NotRunning {
            id: id.into(),
            why: format!(
                "pid {} is no longer its supervisor (another start time)",
                entry.supervisor
            ),
        });
    }
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal on our pidfd with no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGUSR1,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        return Err(Error::Vm {
            id: id.into(),
            what: format!(
                "SIGUSR1 to supervisor {}: {}",
                entry.supervisor,
                std::io::Error::last_os_error()
            ),
        });
    }
    if !host.wait_gone(id, GONE_TIMEOUT)? {
        return Err(Error::Vm {
            id: id.into(),
            what: format!(
                "SIGUSR1 sent to supervisor {}, but its registry entry is still there after {} s",
                entry.supervisor,
                GONE_TIMEOUT.as_secs()
            ),
        });
    }
    println!("VM {id} destroyed");
    Ok(0)
}

#[derive(Serialize)]
struct StatsJson<'a> {
    id: &'a str,
    #[serde(flatten)]
    cgroup: &'a stats::CgroupStats,
    counters: serde_json::Value,
}

pub fn stats(host: &Host, id: &str, json: bool) -> Result<i32, Error> {
    host.find(id)?;
    let (_, info) = host.info(id, API_TIMEOUT)?;
    if !info.cgroup.is_empty() && !stats::claims_own_cgroup(&info.cgroup, id) {
        eprintln!(
            "cellvmctl: vm {id}: vm.info names cgroup {:?}, not the jailer's {}; the jailer's is read",
            escape_line(&info.cgroup),
            stats::relative(id).display()
        );
    }
    let cg = stats::read(Path::new("/sys/fs/cgroup"), id);
    let counters = host
        .call(id, "GET", "vm.counters", None, API_TIMEOUT)?
        .json()
        .unwrap_or(serde_json::Value::Null);
    if json {
        let j = StatsJson {
            id,
            cgroup: &cg,
            counters,
        };
        println!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
        return Ok(0);
    }
    let mut pairs = vec![
        (
            "CPU time".to_string(),
            cg.cpu_ns.map_or("-".into(), |ns| {
                format!("{:.3} s ({})", ns as f64 / 1e9, cg.cpu_source)
            }),
        ),
        (
            "Memory".to_string(),
            format!(
                "{} (max {})",
                cg.memory_bytes.map_or("-".into(), table::mib),
                cg.memory_max_bytes.map_or("-".into(), table::mib)
            ),
        ),
        ("Processes".to_string(), cg.processes.to_string()),
        ("Cgroup".to_string(), cg.cgroup.clone()),
    ];
    for (group, key) in [("vcpus", "vCPU"), ("devices", "Device")] {
        for item in counters
            .get(group)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let name = match (item.get("id"), item.get("kind")) {
                (Some(i), Some(k)) => format!("{key} {} ({})", plain(i), plain(k)),
                (Some(i), None) => format!("{key} {}", plain(i)),
                _ => key.to_string(),
            };
            let mut nums = Vec::new();
            stats::flatten("", item, &mut nums);
            nums.retain(|(k, _)| k != "id");
            nums.sort();
            let text: Vec<String> = nums.iter().map(|(k, v)| format!("{k}={v}")).collect();
            pairs.push((name, escape_line(&text.join(" "))));
        }
    }
    let refs: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    print!("{}", table::fields(&refs));
    Ok(0)
}

fn plain(v: &serde_json::Value) -> String {
    escape_line(&match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

pub fn console(host: &Host, id: &str) -> Result<i32, Error> {
    host.find(id)?;
    console::attach(host, id)?;
    Ok(0)
}

/// The jailer next to this program, else `cellvm-jailer` on PATH.
pub fn jailer_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name("cellvm-jailer"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("cellvm-jailer"))
}

/// How long a snapshot may take (RAM is written at disk speed).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// `snapshot ID DIR`: pauses the VM, has it write DIR/state and DIR/memory (created
/// here, 0600, sent to the VMM as descriptors: it opens no path), puts the VM's spec
/// beside them as DIR/vm.toml, and resumes the VM with `resume`. DIR is made (0700) if
/// it is not there; files already in it are never overwritten. A failed snapshot
/// leaves no files behind.
pub fn snapshot(
    host: &Host,
    id: &str,
    dir: &Path,
    resume: bool,
    incremental: bool,
) -> Result<i32, Error> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    host.find(id)?;
    let fail = |what: &str, e: std::io::Error| Error::Other(format!("{what}: {e}"));
    if incremental {
        return snapshot_incremental(host, id, dir, resume);
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(fail(&dir.display().to_string(), e)),
    }
    let names = ["state", "memory", "vm.toml"];
    for n in names {
        if dir.join(n).symlink_metadata().is_ok() {
            return Err(Error::Other(format!(
                "{}: already there; a snapshot never overwrites one",
                dir.join(n).display()
            )));
        }
    }
    let spec = std::fs::read(host.vm_dir(id).join(cellvm_jailer::rundir::SPEC_COPY))
        .map_err(|e| fail(&format!("vm {id}: its spec"), e))?;
    let create = |n: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(n))
            .map_err(|e| fail(&dir.join(n).display().to_string(), e))
    };
    host.call(id, "PUT", "vm.pause", None, API_TIMEOUT)?;
    let result = (|| {
        let (state, memory) = (create("state")?, create("memory")?);
        let r = send_snapshot(host, id, None, &state, &memory)?;
        create("vm.toml")?
            .write_all(&spec)
            .map_err(|e| fail("vm.toml", e))?;
        Ok(r)
    })();
    let answer = match result {
        Ok(r) => r,
        Err(e) => {
            for n in names {
                let _ = std::fs::remove_file(dir.join(n));
            }
            if resume {
                let _ = host.call(id, "PUT", "vm.resume", None, API_TIMEOUT);
            }
            return Err(e);
        }
    };
    let v = answer.json().unwrap_or_default();
    if resume {
        host.call(id, "PUT", "vm.resume", None, API_TIMEOUT)?;
    }
    println!(
        "VM {id} saved in {}: {} MiB of RAM in {} chunks, {} ms; {}",
        dir.display(),
        v["ram_bytes_written"].as_u64().unwrap_or(0) >> 20,
        v["chunks"].as_u64().unwrap_or(0),
        v["ms"].as_f64().unwrap_or(0.0),
        after_snapshot(id, resume)
    );
    Ok(0)
}

/// `snapshot ID DIR --incremental`: DIR holds this VM's last snapshot; the VMM writes
/// the chunks its guest wrote since into DIR/memory, and the new state file replaces
/// DIR/state once it is complete. A failure partway leaves DIR/memory ahead of
/// DIR/state, which a restore then refuses by its checksums: take a full snapshot.
fn snapshot_incremental(host: &Host, id: &str, dir: &Path, resume: bool) -> Result<i32, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |what: &Path, e: std::io::Error| Error::Other(format!("{}: {e}", what.display()));
    for n in ["state", "vm.toml"] {
        let p = dir.join(n);
        match p.symlink_metadata() {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(Error::Other(format!("{}: not a regular file", p.display()))),
            Err(e) => return Err(fail(&p, e)),
        }
    }
    let mem_path = dir.join("memory");
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&mem_path)
        .map_err(|e| fail(&mem_path, e))?;
    let new_state = dir.join("state.new");
    let state = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&new_state)
        .map_err(|e| fail(&new_state, e))?;
    host.call(id, "PUT", "vm.pause", None, API_TIMEOUT)?;
    let body = br#"{"incremental":true}"#;
    let answer = send_snapshot(host, id, Some(body), &state, &memory).and_then(|a| {
        std::fs::rename(&new_state, dir.join("state"))
            .map(|_| a)
            .map_err(|e| fail(&new_state, e))
    });
    if answer.is_err() {
        let _ = std::fs::remove_file(&new_state);
    }
    if resume {
        host.call(id, "PUT", "vm.resume", None, API_TIMEOUT)?;
    }
    let v = answer?.json().unwrap_or_default();
    println!(
        "VM {id} saved in {} (incremental): {} of its {} chunks written again, {} ms; {}",
        dir.display(),
        v["dirty_chunks"].as_u64().unwrap_or(0),
        v["chunks"].as_u64().unwrap_or(0),
        v["ms"].as_f64().unwrap_or(0.0),
        after_snapshot(id, resume)
    );
    Ok(0)
}

/// `vm.snapshot` with `body`, the state and memory files sent along as descriptors.
fn send_snapshot(
    host: &Host,
    id: &str,
    body: Option<&[u8]>,
    state: &std::fs::File,
    memory: &std::fs::File,
) -> Result<crate::http::Response, Error> {
    use std::os::fd::AsRawFd;
    let sock = host.api_socket(id);
    let target = api_target("vm.snapshot");
    let r = crate::http::Client::connect(&sock, API_TIMEOUT).and_then(|mut c| {
        c.request_with_fds(
            "PUT",
            &target,
            body,
            &[state.as_raw_fd(), memory.as_raw_fd()],
            SNAPSHOT_TIMEOUT,
        )
    });
    answered(id, &sock, "PUT", &target, r)
}

/// How a snapshot leaves the VM, for its summary line.
fn after_snapshot(id: &str, resume: bool) -> String {
    if resume {
        "running again".to_string()
    } else {
        format!("paused (`cellvmctl resume {id}` runs it)")
    }
}

/// `restore DIR`: `cellvm-jailer launch --detach --restore DIR --vm DIR/vm.toml`, the
/// spec checked against the tenant policy as for any launch.
pub fn restore(
    host: &Host,
    dir: &Path,
    policy: &Path,
    id: Option<&str>,
    paused: bool,
    default_run_dir: bool,
) -> Error {
    let mut extra = vec!["--restore".into(), dir.as_os_str().to_owned()];
    if paused {
        extra.push("--paused".into());
    }
    launch_with(
        host,
        policy,
        &dir.join("vm.toml"),
        id,
        default_run_dir,
        &extra,
    )
}

/// Replaces this process with `cellvm-jailer launch --detach`: it returns once the
/// guest runs, printing the VM id, with the jailer's own exit status.
pub fn launch(
    host: &Host,
    policy: &Path,
    vm: &Path,
    id: Option<&str>,
    default_run_dir: bool,
) -> Error {
    launch_with(host, policy, vm, id, default_run_dir, &[])
}

fn launch_with(
    host: &Host,
    policy: &Path,
    vm: &Path,
    id: Option<&str>,
    default_run_dir: bool,
    extra: &[std::ffi::OsString],
) -> Error {
    use std::os::unix::process::CommandExt;
    if let Some(id) = id {
        if let Err(e) = crate::host::check_id(id) {
            return e;
        }
    }
    let jailer = jailer_binary();
    let mut cmd = std::process::Command::new(&jailer);
    cmd.args(["launch", "--detach", "--policy"])
        .arg(policy)
        .arg("--vm")
        .arg(vm);
    if let Some(id) = id {
        cmd.args(["--id", id]);
    }
    if !default_run_dir {
        cmd.arg("--run-dir").arg(&host.run_dir);
    }
    cmd.args(extra);
    let e = cmd.exec();
    Error::Other(format!("{}: {e}", jailer.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_shows_state_with_reason_and_every_device() {
        let info = Info {
            id: "vm1".into(),
            state: "paused".into(),
            reason: "user".into(),
            vcpus: 2,
            memory_mib: 64,
            devices: vec![crate::host::Device {
                id: "dev0".into(),
                kind: "blk".into(),
                pid: Some(77),
                state: "connected".into(),
            }],
            ..Info::default()
        };
        let t = info_text(
            &info,
            Path::new("/run/cellvm/vm/vm1/api.sock"),
            Path::new("/c"),
            Some(5),
        );
        assert!(t.contains("State:          paused (user)\n"), "{t}");
        assert!(
            t.contains("API socket:     /run/cellvm/vm/vm1/api.sock\n"),
            "{t}"
        );
        assert!(
            t.contains("Device:         dev0 blk pid 77 connected\n"),
            "{t}"
        );
        assert!(t.contains("Supervisor:     5\n"), "{t}");
    }
}
