//! `cellvm-jailer launch`: one function that reads top to bottom in the order the cell
//! is built (DESIGN.md), then supervises the VMM and removes every trace of the cell.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::cgroup::Cgroup;
use crate::policy::{TenantPolicy, VmSpec};
use crate::registry::{Entry, Registry};
use crate::{identity, landlock, namespaces, paths, policy, selinux};

/// Exit status for a refused launch (policy, spec, files): the caller's input.
pub const EXIT_REFUSED: i32 = 2;
/// Exit status when the cell could not be built.
pub const EXIT_SETUP: i32 = 1;

pub struct Options {
    pub policy: PathBuf,
    pub vm: PathBuf,
    pub id: Option<String>,
    pub vmm: PathBuf,
    /// The device backends' binary, exec'd in each backend cell.
    pub device: PathBuf,
    pub run_dir: PathBuf,
    /// Test-only: run `cellvm probe NAME` in the VMM's exact cell instead of the VMM.
    pub probe: Option<String>,
    /// Test-only: where the probe runs: `vmm`, or the cell of the first `blk`, `net` or
    /// `rng` backend (then no VMM is started and the launch ends with the probe's
    /// status).
    pub probe_in: String,
    /// What a seccomp violation does in the cell: "kill" (default), "log" or "off";
    /// anything but kill needs `seccomp_off_allowed` in the tenant policy.
    pub seccomp: String,
    /// Test-only: layers to leave out, to show the others still hold (defence in depth).
    pub without: Vec<String>,
}

pub struct Failure {
    pub code: i32,
    pub message: String,
}

fn refused(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: EXIT_REFUSED,
        message: e.to_string(),
    }
}

fn setup(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: EXIT_SETUP,
        message: e.to_string(),
    }
}

/// Everything validated and opened before any host state changes.
pub struct Plan {
    pub policy: TenantPolicy,
    pub spec: VmSpec,
    pub id: String,
    pub kernel: Option<File>,
    pub initrd: Option<File>,
    pub vmm: File,
    /// `cellvm-device`, checked and opened when the VM has devices.
    pub device_bin: Option<File>,
    pub devices: Vec<Device>,
}

/// A device backend to start in its own cell.
pub enum Device {
    Blk {
        image: File,
        readonly: bool,
        direct: bool,
        queues: u16,
    },
    Net {
        tap: String,
        mac: Option<String>,
        /// Attached by `attach_taps` when the VM is launched (never by `check`).
        fd: Option<OwnedFd>,
    },
    Rng,
}

impl Device {
    /// `cellvm-device ...` arguments before the listening socket's.
    fn argv(&self, n: usize, seccomp: &str) -> Vec<String> {
        let mut a: Vec<String> = vec!["cellvm-device".into()];
        let fd = self.passed_fd().unwrap_or(-1).to_string();
        match self {
            Device::Blk {
                readonly,
                direct,
                queues,
                ..
            } => {
                a.extend(["blk".into(), "--image-fd".into(), fd]);
                a.extend([
                    "--queues".into(),
                    queues.to_string(),
                    "--id".into(),
                    format!("cellvm-disk{n}"),
                ]);
                if *readonly {
                    a.push("--readonly".into());
                }
                if *direct {
                    a.push("--direct".into());
                }
            }
            Device::Net { mac, .. } => {
                a.extend(["net".into(), "--tap-fd".into(), fd]);
                if let Some(mac) = mac {
                    a.extend(["--mac".into(), mac.clone()]);
                }
            }
            Device::Rng => a.push("rng".into()),
        }
        a.extend(["--seccomp".into(), seccomp.into()]);
        a
    }

    fn kind(&self) -> &'static str {
        match self {
            Device::Blk { .. } => "blk",
            Device::Net { .. } => "net",
            Device::Rng => "rng",
        }
    }

    /// The one descriptor the backend works on: its image or its tap.
    fn passed_fd(&self) -> Option<i32> {
        match self {
            Device::Blk { image, .. } => Some(image.as_raw_fd()),
            Device::Net { fd, .. } => fd.as_ref().map(|f| f.as_raw_fd()),
            Device::Rng => None,
        }
    }
}

pub fn plan(opts: &Options) -> Result<Plan, Failure> {
    let policy = TenantPolicy::load(&opts.policy).map_err(refused)?;
    let spec = VmSpec::load(&opts.vm).map_err(refused)?;
    policy::check(&policy, &spec).map_err(refused)?;
    if !matches!(opts.seccomp.as_str(), "kill" | "log" | "off") {
        return Err(refused(format!(
            "--seccomp {}: expected kill, log or off",
            opts.seccomp
        )));
    }
    if opts.seccomp != "kill" && !policy.seccomp_off_allowed {
        return Err(refused(format!(
            "tenant {}: vm {}: seccomp = {} violates the tenant policy (seccomp_off_allowed = false)",
            policy.name, spec.name, opts.seccomp
        )));
    }
    if let Some(w) = opts
        .without
        .iter()
        .find(|w| !["seccomp", "landlock"].contains(&w.as_str()))
    {
        return Err(refused(format!(
            "--without {w}: only seccomp and landlock can be left out (test only)"
        )));
    }
    if !matches!(opts.probe_in.as_str(), "vmm" | "blk" | "net" | "rng") {
        return Err(refused(format!(
            "--probe-in {}: expected vmm, blk, net or rng",
            opts.probe_in
        )));
    }
    if (opts.probe.is_some() || !opts.without.is_empty()) && !policy.allow_test_switches {
        return Err(refused(format!(
            "tenant {}: --probe and --without are test switches; the tenant policy does not allow them (allow_test_switches = false)",
            policy.name
        )));
    }
    let id = opts
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{}-{}", policy.name, spec.name, std::process::id()));
    if !(1..=64).contains(&id.len())
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(refused(format!(
            "vm id {id:?}: 1-64 characters of [A-Za-z0-9_-]"
        )));
    }
    let open = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| paths::open_beneath(&policy.image_dirs, p))
            .transpose()
    };
    let kernel = open(&spec.kernel).map_err(|e| {
        refused(format!(
            "tenant {}: vm {}: kernel: {e}",
            policy.name, spec.name
        ))
    })?;
    let initrd = open(&spec.initrd).map_err(|e| {
        refused(format!(
            "tenant {}: vm {}: initrd: {e}",
            policy.name, spec.name
        ))
    })?;
    let vmm = open_static_binary(&opts.vmm).map_err(setup)?;
    let mut devices = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let image =
            paths::open_beneath_mode(&policy.image_dirs, &d.path, !d.readonly).map_err(|e| {
                refused(format!(
                    "tenant {}: vm {}: disks[{i}]: {e}",
                    policy.name, spec.name
                ))
            })?;
        devices.push(Device::Blk {
            image,
            readonly: d.readonly,
            direct: d.direct,
            queues: d.queues,
        });
    }
    if spec.rng {
        devices.push(Device::Rng);
    }
    for n in &spec.nets {
        devices.push(Device::Net {
            tap: n.tap.clone(),
            mac: n.mac.clone(),
            fd: None,
        });
    }
    let device_bin = if devices.is_empty() {
        None
    } else {
        Some(open_static_binary(&opts.device).map_err(setup)?)
    };
    Ok(Plan {
        policy,
        spec,
        id,
        kernel,
        initrd,
        vmm,
        device_bin,
        devices,
    })
}

/// Attaches every tap of the plan (in the tenant's network namespace): a tap that is
/// missing, not a tap, or in use by another VM refuses the launch.
pub fn attach_taps(plan: &mut Plan) -> Result<(), Failure> {
    let netns = plan.policy.tap_netns.clone();
    for (i, d) in plan
        .devices
        .iter_mut()
        .filter(|d| matches!(d, Device::Net { .. }))
        .enumerate()
    {
        if let Device::Net { tap, fd, .. } = d {
            *fd = Some(crate::tap::open(tap, netns.as_deref()).map_err(|e| {
                refused(format!(
                    "tenant {}: vm {}: nets[{i}]: {e}",
                    plan.policy.name, plan.spec.name
                ))
            })?);
        }
    }
    Ok(())
}

/// The VMM must be statically linked: the cell holds no loader and no libraries.
fn open_static_binary(path: &Path) -> Result<File, String> {
    let mut f = File::open(path).map_err(|e| format!("VMM binary {}: {e}", path.display()))?;
    let mut head = vec![0u8; 4096];
    let n = f
        .read(&mut head)
        .map_err(|e| format!("VMM binary {}: {e}", path.display()))?;
    head.truncate(n);
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        return Err(format!(
            "VMM binary {}: not an ELF executable",
            path.display()
        ));
    }
    let phoff = u64::from_le_bytes(head[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(head[56..58].try_into().unwrap()) as usize;
    for i in 0..phnum {
        let at = phoff + i * 56;
        let kind = head
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        if kind == Some(3) {
            return Err(format!(
                "VMM binary {} is dynamically linked; a cell holds no shared libraries (build it static, see .cargo/config.toml)",
                path.display()
            ));
        }
    }
    File::open(path).map_err(|e| format!("VMM binary {}: {e}", path.display()))
}

fn vmm_argv(plan: &Plan, opts: &Options, device_fds: &[i32]) -> Vec<String> {
    let seccomp = if opts.without.iter().any(|w| w == "seccomp") {
        "off".to_string()
    } else {
        opts.seccomp.clone()
    };
    if let Some(name) = &opts.probe {
        return vec![
            "cellvm".into(),
            "probe".into(),
            name.clone(),
            "--seccomp".into(),
            seccomp,
        ];
    }
    let mut argv: Vec<String> = ["cellvm", "run", "--seccomp", &seccomp, "--cpus"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.push(plan.spec.vcpus.to_string());
    argv.push("--memory".into());
    argv.push(plan.spec.memory_mib.to_string());
    if !plan.spec.cmdline.is_empty() {
        argv.push("--cmdline".into());
        argv.push(plan.spec.cmdline.clone());
    }
    if plan.kernel.is_some() {
        argv.extend(["--kernel".into(), "/kernel".into()]);
    }
    if plan.initrd.is_some() {
        argv.extend(["--initrd".into(), "/initrd".into()]);
    }
    if plan.spec.ksm {
        argv.push("--ksm".into());
    }
    // Each device: the VMM's end of a connection its backend cell already holds.
    for (d, fd) in plan.devices.iter().zip(device_fds) {
        match d {
            Device::Blk { queues, .. } => {
                argv.extend(["--disk".into(), format!("fd={fd},queues={queues}")])
            }
            Device::Rng => argv.push(format!("--rng=fd={fd}")),
            Device::Net { .. } => argv.extend(["--net".into(), format!("fd={fd}")]),
        }
    }
    argv
}

pub fn jail_dir(id: &str) -> PathBuf {
    Path::new(namespaces::JAIL_BASE).join(id)
}

/// Launches the VM and supervises it; returns the VMM's exit status.
pub fn launch(opts: &Options) -> Result<i32, Failure> {
    let mut plan = plan(opts)?;
    attach_taps(&mut plan)?;

    // Reclaim what dead supervisors left, then take this VM's uid and MCS pair, and a
    // uid of its own for each device backend.
    let (entry, device_entries) = {
        let reg = Registry::lock(&opts.run_dir).map_err(setup)?;
        crate::gc::collect(&reg);
        let entry = reg
            .allocate(&plan.id, &plan.policy, std::process::id())
            .map_err(refused)?;
        let mut devs = Vec::new();
        for n in 0..plan.devices.len() {
            match reg.allocate(&device_id(&plan.id, n), &plan.policy, std::process::id()) {
                Ok(e) => devs.push(e),
                Err(e) => {
                    for d in devs.iter().chain(std::iter::once(&entry)) {
                        let _ = reg.remove(&d.id);
                    }
                    return Err(refused(e));
                }
            }
        }
        (entry, devs)
    };
    let result = build_and_supervise(&plan, &entry, &device_entries, opts);
    cleanup(opts, &entry);
    if let Ok(reg) = Registry::lock(&opts.run_dir) {
        for d in &device_entries {
            let _ = reg.remove(&d.id);
        }
    }
    result
}

/// The registry id of a VM's n-th device backend (which holds its uid).
fn device_id(vm: &str, n: usize) -> String {
    format!("{vm}-dev{n}")
}

/// Clones a cell's first process into new namespaces, puts it in `cgroup`, then lets it
/// run `build`, which ends in exec or returns why it could not. Returns the pid and the
/// error pipe: it reads empty once the exec happened, else the reason.
fn start_cell(
    cgroup: &Cgroup,
    build: impl FnOnce(&OwnedFd) -> Result<std::convert::Infallible, String>,
) -> Result<(u32, File), Failure> {
    let (go_r, go_w) = pipe().map_err(setup)?;
    let (err_r, err_w) = pipe().map_err(setup)?;
    let child = namespaces::clone_into_namespaces().map_err(setup)?;
    if child == 0 {
        drop(go_w);
        drop(err_r);
        // Wait until the supervisor has put us in the cgroup.
        let mut b = [0u8; 1];
        let message = match File::from(go_r)
            .read_exact(&mut b)
            .map_err(|e| format!("waiting for the supervisor: {e}"))
            .and_then(|_| build(&err_w))
        {
            Err(m) => m,
            Ok(never) => match never {},
        };
        let mut w = File::from(err_w);
        let _ = w.write_all(message.as_bytes());
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(127) };
    }
    drop(go_r);
    drop(err_w);
    // Into its cgroup before it runs anything of its own.
    if let Err(e) = cgroup.add(child) {
        // SAFETY: kill our own child.
        unsafe { libc::kill(child as i32, libc::SIGKILL) };
        crate::supervise::reap(child);
        return Err(setup(e));
    }
    let _ = File::from(go_w).write_all(b"g");
    Ok((child, File::from(err_r)))
}

/// Test-only: the device whose cell runs the probe instead of its backend, if any.
fn probe_target<'a>(plan: &Plan, opts: &'a Options) -> Option<(usize, &'a str)> {
    let name = opts.probe.as_deref()?;
    let n = plan
        .devices
        .iter()
        .position(|d| d.kind() == opts.probe_in)?;
    Some((n, name))
}

/// A listening socket whose one connection is already made: (listener, VMM's end).
/// Its path lives for an instant in the jail directory (root's, mode 0700).
fn connected_listener(dir: &Path, n: usize) -> Result<(OwnedFd, OwnedFd), String> {
    use std::os::unix::net::{UnixListener, UnixStream};
    let path = dir.join(format!("dev{n}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let stream = UnixStream::connect(&path);
    let _ = std::fs::remove_file(&path);
    let stream = stream.map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((OwnedFd::from(listener), OwnedFd::from(stream)))
}

/// Starts device backend `n` in a cell of its own: new namespaces (an empty root, no
/// network), the VM's cgroup, its own uid, no capabilities, Landlock denying every
/// filesystem access, and the backend's own seccomp profile once it runs.
#[allow(clippy::too_many_arguments)]
fn start_backend(
    plan: &Plan,
    n: usize,
    uid: u32,
    listener: &OwnedFd,
    cgroup: &Cgroup,
    signals: &crate::supervise::Signals,
    label: Option<&str>,
    opts: &Options,
) -> Result<u32, Failure> {
    let device = &plan.devices[n];
    let seccomp = if opts.without.iter().any(|w| w == "seccomp") {
        "off"
    } else {
        opts.seccomp.as_str()
    };
    let argv = match probe_target(plan, opts) {
        Some((target, name)) if target == n => vec![
            "cellvm-device".into(),
            "probe".into(),
            name.into(),
            "--role".into(),
            device.kind().into(),
            "--seccomp".into(),
            seccomp.into(),
        ],
        _ => {
            let mut a = device.argv(n, seccomp);
            a.extend(["--listen-fd".into(), listener.as_raw_fd().to_string()]);
            a
        }
    };
    let landlock_on = !opts.without.iter().any(|w| w == "landlock");
    let (child, mut errors) = start_cell(cgroup, |err| {
        build_backend_cell(
            plan,
            n,
            uid,
            listener,
            &argv,
            err,
            signals,
            landlock_on,
            label,
        )
    })?;
    // The error pipe closes at the backend's exec (or carries why it failed).
    let mut message = String::new();
    let _ = errors.read_to_string(&mut message);
    if !message.is_empty() {
        crate::supervise::reap(child);
        return Err(setup(format!("building the cell of device {n}: {message}")));
    }
    Ok(child)
}

#[allow(clippy::too_many_arguments)]
fn build_backend_cell(
    plan: &Plan,
    n: usize,
    uid: u32,
    listener: &OwnedFd,
    argv: &[String],
    err: &OwnedFd,
    signals: &crate::supervise::Signals,
    landlock_on: bool,
    label: Option<&str>,
) -> Result<std::convert::Infallible, String> {
    let device = &plan.devices[n];
    let bin = plan
        .device_bin
        .as_ref()
        .ok_or("no device binary was opened")?
        .as_raw_fd();
    let mut keep = vec![err.as_raw_fd(), bin, listener.as_raw_fd()];
    keep.extend(device.passed_fd());
    identity::close_inherited_fds(&keep)?;
    signals.restore_in_child();
    namespaces::set_hostname(&format!("cellvm-{}-dev{n}", plan.spec.name))?;
    if let Some(l) = label {
        selinux::set_exec_label(l).map_err(|e| e.to_string())?;
    }
    namespaces::enter_empty_jail(&jail_dir(&plan.id).join(format!("dev{n}")))?;
    identity::set_rlimits(&identity::Limits {
        nofile: 64,
        nproc: plan.policy.cgroup.pids_max as u64,
        // No file-size limit: it would also cut the backend's log when stderr is a file.
        // The image cannot grow anyway: every request is bounded by its capacity, and
        // the seccomp profile has no ftruncate.
        fsize: libc::RLIM_INFINITY,
    })?;
    identity::drop_privileges(uid, uid)?;
    if landlock_on {
        let how = landlock::deny_all_but_exec(plan.policy.landlock)?;
        if how != "fully enforced" {
            eprintln!(
                "cellvm-jailer: warning: tenant {}: device {n}: Landlock {how}",
                plan.policy.name
            );
        }
    }
    // The descriptors the backend works with stay open across exec.
    keep_across_exec(std::iter::once(listener.as_raw_fd()).chain(device.passed_fd()))?;
    exec_cell(bin, c"", libc::AT_EMPTY_PATH, argv)
}

/// execveat with an empty environment: `path` relative to `dir` (AT_FDCWD for an
/// absolute path), or the descriptor itself with AT_EMPTY_PATH.
fn exec_cell(
    dir: i32,
    path: &std::ffi::CStr,
    flags: i32,
    argv: &[String],
) -> Result<std::convert::Infallible, String> {
    let c_argv: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_str()).expect("no NUL in argv"))
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = c_argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: a valid directory fd or AT_FDCWD, a NUL-terminated path, and
    // NULL-terminated argv and envp arrays of valid C strings.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            dir,
            path.as_ptr(),
            ptrs.as_ptr(),
            envp.as_ptr(),
            flags,
        )
    };
    Err(format!(
        "exec {argv:?}: {}",
        std::io::Error::last_os_error()
    ))
}

/// Clears close-on-exec on the descriptors a cell's program works with.
fn keep_across_exec(fds: impl IntoIterator<Item = i32>) -> Result<(), String> {
    for fd in fds {
        // SAFETY: fcntl on a descriptor this process holds.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn build_and_supervise(
    plan: &Plan,
    entry: &Entry,
    device_entries: &[Entry],
    opts: &Options,
) -> Result<i32, Failure> {
    // SELinux first: a policy that requires it must refuse before anything is built.
    let label =
        selinux::plan(&plan.policy.name, plan.policy.selinux, entry.mcs).map_err(refused)?;
    // sVirt labels before any cell starts: writable disks get the VM's pair, read-only
    // disks, kernel and initrd shared labels; recorded, so `gc::remove_cell` restores
    // them however the VM ends.
    let mut labels = selinux::Labels::new(&plan.id, plan.policy.selinux);
    let content = plan.kernel.iter().chain(&plan.initrd);
    let mut files: Vec<(&File, String, bool)> = content
        .map(|f| (f, selinux::CONTENT_LABEL.into(), true))
        .collect();
    for d in &plan.devices {
        match d {
            Device::Blk {
                image,
                readonly: true,
                ..
            } => files.push((image, selinux::SHARED_IMAGE_LABEL.into(), true)),
            Device::Blk { image, .. } => files.push((image, entry.mcs.image_label(), false)),
            _ => {}
        }
    }
    for (f, l, shared) in files {
        let fail = |e: selinux::Error| if e.is_refusal() { refused(e) } else { setup(e) };
        labels.label(f, &l, shared).map_err(fail)?;
    }
    // The backends run in a domain of their own, with the VM's pair.
    let device_label = label.as_ref().map(|_| entry.mcs.device_label());
    // The cgroup exists before the cell's first process, which joins it before it runs.
    let cgroup =
        Cgroup::create(&plan.id, &plan.policy.cgroup, plan.spec.memory_mib << 20).map_err(setup)?;
    let root = jail_dir(&plan.id).join("root");
    std::fs::create_dir_all(&root).map_err(|e| setup(format!("{}: {e}", root.display())))?;

    // Detached mounts of the checked files, made here: the cell's namespace attaches them.
    let trees = Trees {
        vmm: namespaces::detached_mount(&plan.vmm).map_err(setup)?,
        kernel: plan
            .kernel
            .as_ref()
            .map(namespaces::detached_mount)
            .transpose()
            .map_err(setup)?,
        initrd: plan
            .initrd
            .as_ref()
            .map(namespaces::detached_mount)
            .transpose()
            .map_err(setup)?,
    };
    let signals = crate::supervise::block_signals();
    // The device backends first, each in its own cell; the VMM gets the other end of
    // each one's connection.
    let jail = jail_dir(&plan.id);
    let mut vmm_ends = Vec::new();
    let mut backends = Backends(Vec::new());
    for (n, dev_entry) in device_entries.iter().enumerate() {
        let (listener, vmm_end) = connected_listener(&jail, n).map_err(setup)?;
        let pid = start_backend(
            plan,
            n,
            dev_entry.uid,
            &listener,
            &cgroup,
            &signals,
            device_label.as_deref(),
            opts,
        )?;
        backends.0.push(pid);
        vmm_ends.push(vmm_end);
    }
    if opts.probe.is_some() && opts.probe_in != "vmm" {
        // Test-only: the probe runs in a backend's cell; no VMM.
        let Some((target, _)) = probe_target(plan, opts) else {
            return Err(refused(format!(
                "--probe-in {}: the VM spec has no such device",
                opts.probe_in
            )));
        };
        let pid = backends.0.remove(target);
        drop(vmm_ends);
        let status = crate::supervise::wait(pid, &signals);
        drop(backends);
        return Ok(status);
    }
    let device_fds: Vec<i32> = vmm_ends.iter().map(|f| f.as_raw_fd()).collect();
    let argv = vmm_argv(plan, opts, &device_fds);
    let landlock_on = !opts.without.iter().any(|w| w == "landlock");
    let (child, mut errors) = start_cell(&cgroup, |err| {
        build_cell(
            plan,
            &trees,
            entry,
            &argv,
            &device_fds,
            err,
            &signals,
            landlock_on,
            label.as_deref(),
        )
    })?;
    drop(vmm_ends);
    let mut message = String::new();
    let _ = errors.read_to_string(&mut message);
    let status = crate::supervise::wait(child, &signals);
    drop(backends);
    if !message.is_empty() {
        return Err(setup(format!("building the cell: {message}")));
    }
    Ok(status)
}

/// Backend processes of a VM: once the VMM is gone they see the connection close and
/// exit; whatever is still running a moment later is killed. Always reaped.
struct Backends(Vec<u32>);

impl Drop for Backends {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        for &pid in &self.0 {
            loop {
                let mut status = 0;
                // SAFETY: waitpid on our own child, without blocking.
                let rc = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
                if rc != 0 {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    // SAFETY: kill and reap our own child.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    crate::supervise::reap(pid);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

/// In the cell's first process (PID 1 of its namespace): every layer in order, then exec.
struct Trees {
    vmm: OwnedFd,
    kernel: Option<OwnedFd>,
    initrd: Option<OwnedFd>,
}

#[allow(clippy::too_many_arguments)]
fn build_cell(
    plan: &Plan,
    trees: &Trees,
    entry: &Entry,
    argv: &[String],
    device_fds: &[i32],
    err: &OwnedFd,
    signals: &crate::supervise::Signals,
    landlock_on: bool,
    label: Option<&str>,
) -> Result<std::convert::Infallible, String> {
    // Nothing inherited: only the files the jail needs and the error pipe stay open.
    let mut keep = vec![err.as_raw_fd(), trees.vmm.as_raw_fd()];
    keep.extend(
        trees
            .kernel
            .iter()
            .chain(trees.initrd.iter())
            .map(|f| f.as_raw_fd()),
    );
    keep.extend_from_slice(device_fds);
    identity::close_inherited_fds(&keep)?;
    // The connections to the device backends stay open across exec.
    keep_across_exec(device_fds.iter().copied())?;
    signals.restore_in_child();
    namespaces::set_hostname(&format!("cellvm-{}", plan.spec.name))?;
    // The exec context goes on while /proc is still there (libselinux writes it through
    // /proc/thread-self/attr/exec); it takes effect at the execve below.
    if let Some(l) = label {
        selinux::set_exec_label(l).map_err(|e| e.to_string())?;
    }
    // Mount namespace: a private root with exactly the cell's files, then pivot_root.
    let root = jail_dir(&plan.id).join("root");
    let files = namespaces::JailFiles {
        vmm: &trees.vmm,
        kernel: trees.kernel.as_ref(),
        initrd: trees.initrd.as_ref(),
        uid: entry.uid,
        gid: entry.uid,
    };
    namespaces::enter_jail(&root, &files)?;
    identity::set_rlimits(&identity::Limits {
        nofile: 256,
        nproc: plan.policy.cgroup.pids_max as u64,
        // Guest RAM is a memfd sized with ftruncate, which RLIMIT_FSIZE bounds; and the
        // console goes to the supervisor's stdout, which may be a log file of any size.
        // The jail has no writable file system, so no limit is lost.
        fsize: libc::RLIM_INFINITY,
    })?;
    // No uid 0, no capabilities, no way back.
    identity::drop_privileges(entry.uid, entry.uid)?;
    if landlock_on {
        let how = landlock::restrict(
            &landlock::vmm_rules(plan.kernel.is_some(), plan.initrd.is_some()),
            plan.policy.landlock,
        )?;
        // No layer is skipped silently: a partial or absent Landlock is logged.
        if how != "fully enforced" {
            eprintln!(
                "cellvm-jailer: warning: tenant {}: Landlock {how}",
                plan.policy.name
            );
        }
    }
    exec_cell(libc::AT_FDCWD, c"/cellvm", 0, argv)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors, owned from here on.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Removes everything the cell had on the host: processes, cgroup, jail directory,
/// registry entry (and with it the uid and MCS pair).
pub fn cleanup(opts: &Options, entry: &Entry) {
    crate::gc::remove_cell(&entry.id);
    if let Ok(reg) = Registry::lock(&opts.run_dir) {
        if let Err(e) = reg.remove(&entry.id) {
            eprintln!("cellvm-jailer: {e}");
        }
    }
}
