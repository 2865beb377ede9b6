//! cellvm-jailer: launches each VM in its own cell and leaves nothing behind.
//!
//! Runs as root, so it is small: validate the tenant's VM spec against the
//! administrator's policy, build the cell (launch.rs, in order), exec the VMM,
//! supervise it, clean up.

use cellvm_jailer::{cgroup, gc, landlock, launch, mcs, registry, selinux, tap};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cellvm-jailer",
    version,
    about = "Launch cellvm VMs, each in its own locked cell"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// The administrator's tenant policy.
    #[arg(long)]
    policy: PathBuf,
    /// The tenant's VM spec.
    #[arg(long)]
    vm: PathBuf,
    /// The VM's id (default: tenant-vm-pid).
    #[arg(long)]
    id: Option<String>,
    /// The VMM binary (statically linked); default: `cellvm` next to this program.
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// The device backends' binary (statically linked); default: `cellvm-device` next
    /// to the VMM.
    #[arg(long)]
    device_binary: Option<PathBuf>,
    /// virtiofsd (statically linked: tests/setup.sh builds one), exec'd in the cell of
    /// each virtio-fs share.
    #[arg(long, default_value = launch::DEFAULT_VIRTIOFSD)]
    virtiofsd: PathBuf,
    #[arg(long, default_value = registry::RUN_DIR, hide = true)]
    run_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Launch the VM in its cell, stream its console, exit with its status.
    Launch {
        #[command(flatten)]
        common: Common,
        /// What a seccomp violation does: kill, or (if the tenant policy allows) log or off.
        #[arg(long, default_value = "kill")]
        seccomp: String,
        /// Test only: run probe NAME (`--probe-binary`) in the VMM's exact cell.
        #[arg(long, hide = true, requires = "probe_binary")]
        probe: Option<String>,
        /// Test only: the probe program (cellvm-probe, static like the others), exec'd in
        /// the probe's cell instead of that cell's own program.
        #[arg(long, hide = true, requires = "probe")]
        probe_binary: Option<PathBuf>,
        /// Test only: a path the probe works on (`--path P`), e.g. another VM's socket.
        #[arg(long, hide = true, requires = "probe")]
        probe_path: Option<PathBuf>,
        /// Test only: run the probe in the cell of the VM's first `blk`, `net` or `rng` backend
        /// instead (no VMM is started); default `vmm`.
        #[arg(long, hide = true, default_value = "vmm")]
        probe_in: String,
        /// Test only: leave a layer out (seccomp, landlock) to show the others hold.
        #[arg(long, hide = true)]
        without: Vec<String>,
        /// Return once the guest runs, printing the VM's id; the supervisor goes on in
        /// the background (a session of its own, its log in /run/cellvm/vm/ID/).
        #[arg(long)]
        detach: bool,
        /// Restore the snapshot in DIR (`state`, `memory`; `cellvmctl snapshot` writes
        /// them) instead of booting: the spec is checked against the policy as for any
        /// launch, and the VMM checks the snapshot against the spec.
        #[arg(long, value_name = "DIR")]
        restore: Option<PathBuf>,
        /// Start the VM paused (`cellvmctl resume` runs it).
        #[arg(long)]
        paused: bool,
    },
    /// Validate and print the cell plan; launch nothing.
    Check {
        #[command(flatten)]
        common: Common,
    },
    /// Reclaim cells whose supervisor died.
    Gc {
        #[arg(long, default_value = registry::RUN_DIR, hide = true)]
        run_dir: PathBuf,
    },
}

#[allow(clippy::too_many_arguments)]
fn options(
    c: Common,
    probe: Option<String>,
    probe_binary: Option<PathBuf>,
    probe_in: String,
    probe_path: Option<PathBuf>,
    seccomp: String,
    without: Vec<String>,
    detach: bool,
    restore: Option<PathBuf>,
    paused: bool,
) -> launch::Options {
    let vmm = c.vmm.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("cellvm")))
            .unwrap_or_else(|| PathBuf::from("cellvm"))
    });
    let mut device = c
        .device_binary
        .unwrap_or_else(|| vmm.with_file_name("cellvm-device"));
    // Test only: the probe's cell execs the probe program, checked as its own would be.
    let mut vmm = vmm;
    if let Some(p) = &probe_binary {
        if probe_in == "vmm" {
            vmm = p.clone();
        } else {
            device = p.clone();
        }
    }
    launch::Options {
        policy: c.policy,
        vm: c.vm,
        id: c.id,
        vmm,
        device,
        virtiofsd: c.virtiofsd,
        run_dir: c.run_dir,
        probe,
        probe_binary,
        probe_in,
        probe_path,
        seccomp,
        without,
        detach,
        restore,
        paused,
    }
}

fn main() -> ExitCode {
    let code = match Cli::parse().command {
        Command::Launch {
            common,
            seccomp,
            probe,
            probe_binary,
            probe_in,
            probe_path,
            without,
            detach,
            restore,
            paused,
        } => {
            let opts = options(
                common,
                probe,
                probe_binary,
                probe_in,
                probe_path,
                seccomp,
                without,
                detach,
                restore,
                paused,
            );
            if detach {
                detached(&opts)
            } else {
                match launch::launch(&opts, &mut None) {
                    Ok(code) => code,
                    Err(f) => {
                        eprintln!("cellvm-jailer: {}", f.message);
                        f.code
                    }
                }
            }
        }
        Command::Check { common } => check(&options(
            common,
            None,
            None,
            "vmm".into(),
            None,
            "kill".into(),
            Vec::new(),
            false,
            None,
            false,
        )),
        Command::Gc { run_dir } => match registry::Registry::lock(&run_dir) {
            Ok(reg) => {
                let (reclaimed, errors) = gc::collect_reporting(&reg);
                for id in reclaimed {
                    println!("reclaimed {id}");
                }
                for e in &errors {
                    eprintln!("cellvm-jailer: {e}");
                }
                i32::from(!errors.is_empty())
            }
            Err(e) => {
                eprintln!("cellvm-jailer: {e}");
                1
            }
        },
    };
    ExitCode::from(code as u8)
}

/// `launch --detach`: the supervisor is a child in a session of its own, stdio on
/// /dev/null (stderr on its supervisor.log once the run directory exists); this process
/// waits on a pipe until the child says the guest runs (`R` and the id: printed, exit
/// 0) or why it could not (`E`, the status, a line, the message: printed, that status).
fn detached(opts: &launch::Options) -> i32 {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("cellvm-jailer: pipe2: {}", std::io::Error::last_os_error());
        return launch::EXIT_SETUP;
    }
    // SAFETY: fresh descriptors, owned from here on.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the jailer is single-threaded here; the child goes on as the supervisor.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("cellvm-jailer: fork: {}", std::io::Error::last_os_error());
        return launch::EXIT_SETUP;
    }
    if pid == 0 {
        drop(r);
        // SAFETY: setsid and dup2 with plain arguments; /dev/null is opened and checked.
        unsafe {
            libc::setsid();
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if null >= 0 {
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::close(null);
            }
        }
        // Nothing of the caller's but stdio (a pipe it reads to its end, say): the
        // supervisor outlives it.
        {
            use std::os::fd::AsRawFd;
            if let Err(e) = cellvm_jailer::identity::close_inherited_fds(&[w.as_raw_fd()]) {
                let _ = write!(std::fs::File::from(w), "E{}\n{e}", launch::EXIT_SETUP);
                std::process::exit(launch::EXIT_SETUP);
            }
        }
        let mut notify = Some(std::fs::File::from(w));
        let (code, failure) = match launch::launch(opts, &mut notify) {
            Ok(code) => (
                code,
                format!("the VM ended before it was running (status {code})"),
            ),
            Err(f) => (f.code, f.message),
        };
        match notify {
            Some(mut n) => {
                let code = if code == 0 { launch::EXIT_SETUP } else { code };
                let _ = write!(n, "E{code}\n{failure}");
            }
            None if failure.starts_with("the VM ended") => {}
            None => eprintln!("cellvm-jailer: {failure}"),
        }
        std::process::exit(code);
    }
    drop(w);
    let mut answer = Vec::new();
    let _ = std::fs::File::from(r)
        .take(64 << 10)
        .read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    if let Some(id) = text.strip_prefix('R') {
        println!("{id}");
        return 0;
    }
    if let Some((code, message)) = text.strip_prefix('E').and_then(|t| t.split_once('\n')) {
        eprintln!("cellvm-jailer: {message}");
        return code.parse().unwrap_or(launch::EXIT_SETUP);
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    eprintln!("cellvm-jailer: the supervisor ended before the VM ran (wait status {status})");
    launch::EXIT_SETUP
}

fn check(opts: &launch::Options) -> i32 {
    let plan = match launch::plan(opts) {
        Ok(p) => p,
        Err(f) => {
            eprintln!("cellvm-jailer: {}", f.message);
            return f.code;
        }
    };
    let (p, s) = (&plan.policy, &plan.spec);
    let (dirs, v2) = cgroup::dirs_for(&plan.id);
    println!("tenant {} vm {}: allowed", p.name, s.name);
    println!("  id          {}", plan.id);
    println!(
        "  vm          {} vCPUs, {} MiB, kernel {}",
        s.vcpus,
        s.memory_mib,
        s.kernel
            .as_ref()
            .map_or("(built-in test guest)".into(), |k| k.display().to_string())
    );
    println!(
        "  identity    one uid/gid from [{}, {}], no groups, no capabilities, no_new_privs",
        p.uid_range[0], p.uid_range[1]
    );
    let first = mcs::McsPair::new(p.mcs_categories[0], p.mcs_categories[0] + 1);
    println!(
        "  mcs         one pair from c{}..c{}; labels like {} / {}",
        p.mcs_categories[0],
        p.mcs_categories[1],
        first.map(|m| m.process_label()).unwrap_or_default(),
        first.map(|m| m.image_label()).unwrap_or_default()
    );
    let netns = p.tap_netns.as_deref();
    let where_ = netns.map_or("the jailer's network namespace".to_string(), |n| {
        format!("network namespace {n}")
    });
    if s.nets.is_empty() {
        println!(
            "  network     taps allowed {:?}; this VM: none (empty net namespace)",
            p.taps
        );
    }
    for n in &s.nets {
        let state = match tap::exists(&n.tap, netns) {
            Ok(()) => "present".to_string(),
            Err(e) => format!("NOT USABLE: {e}"),
        };
        println!(
            "  network     tap {} in {where_} ({state}); the net backend gets only its descriptor",
            n.tap
        );
    }
    for (i, d) in s.disks.iter().enumerate() {
        println!(
            "  disk        disks[{i}] {} ({}; {}), its own backend cell",
            cellvm_jailer::policy::shown_path(&d.path),
            if d.readonly { "read-only" } else { "writable" },
            if d.readonly {
                "shared lock"
            } else {
                "exclusive lock, no other writer or reader"
            }
        );
    }
    println!(
        "  seccomp     kill on violation{}",
        if p.seccomp_off_allowed {
            " (off allowed for diagnosis)"
        } else {
            ""
        }
    );
    println!(
        "  selinux     {:?} (host: {})",
        p.selinux,
        if selinux::enabled() {
            "enabled"
        } else {
            "not enabled"
        }
    );
    println!(
        "  cgroup      {} {:?}: cpu {}%, memory {} MiB + {} MiB, pids {}",
        if v2 { "v2" } else { "v1" },
        dirs,
        p.cgroup.cpu_percent,
        s.memory_mib,
        p.cgroup.memory_overhead_mib,
        p.cgroup.pids_max
    );
    println!("  namespaces  mount, pid, net (empty), ipc, uts");
    println!(
        "  jail        {}/root: /cellvm{}{} /dev/kvm",
        launch::jail_dir(&plan.id).display(),
        if plan.kernel.is_some() {
            " /kernel"
        } else {
            ""
        },
        if plan.initrd.is_some() {
            " /initrd"
        } else {
            ""
        }
    );
    println!(
        "  landlock    {:?}: {:?}",
        p.landlock,
        landlock::vmm_rules(plan.kernel.is_some(), plan.initrd.is_some())
            .iter()
            .map(|r| r.0)
            .collect::<Vec<_>>()
    );
    0
}
