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
        /// Test only: run `cellvm probe NAME` in the VMM's exact cell.
        #[arg(long, hide = true)]
        probe: Option<String>,
        /// Test only: run the probe in the cell of the VM's first `blk`, `net` or `rng` backend
        /// instead (no VMM is started); default `vmm`.
        #[arg(long, hide = true, default_value = "vmm")]
        probe_in: String,
        /// Test only: leave a layer out (seccomp, landlock) to show the others hold.
        #[arg(long, hide = true)]
        without: Vec<String>,
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

fn options(
    c: Common,
    probe: Option<String>,
    probe_in: String,
    seccomp: String,
    without: Vec<String>,
) -> launch::Options {
    let vmm = c.vmm.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("cellvm")))
            .unwrap_or_else(|| PathBuf::from("cellvm"))
    });
    let device = c
        .device_binary
        .unwrap_or_else(|| vmm.with_file_name("cellvm-device"));
    launch::Options {
        policy: c.policy,
        vm: c.vm,
        id: c.id,
        vmm,
        device,
        run_dir: c.run_dir,
        probe,
        probe_in,
        seccomp,
        without,
    }
}

fn main() -> ExitCode {
    let code = match Cli::parse().command {
        Command::Launch {
            common,
            seccomp,
            probe,
            probe_in,
            without,
        } => match launch::launch(&options(common, probe, probe_in, seccomp, without)) {
            Ok(code) => code,
            Err(f) => {
                eprintln!("cellvm-jailer: {}", f.message);
                f.code
            }
        },
        Command::Check { common } => check(&options(
            common,
            None,
            "vmm".into(),
            "kill".into(),
            Vec::new(),
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
