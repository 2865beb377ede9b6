//! cellvmctl: list, inspect, pause, shut down, destroy and attach to the cellvm VMs of
//! this host. Exit status: 0 success, 1 failure, 2 usage error or unknown id, 124 a
//! shutdown whose guest did not power off in time.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use cellvmctl::commands;
use cellvmctl::host::Host;

#[derive(Parser)]
#[command(
    name = "cellvmctl",
    about = "Manage the cellvm VMs of this host (root, or the tenant's api_group for its VMs)",
    after_help = "Exit status: 0 success, 1 failure, 2 usage error or unknown VM id, 124 shutdown timed out."
)]
struct Cli {
    /// The jailer's run directory (registry and per-VM directories).
    #[arg(long, global = true, default_value = cellvm_jailer::registry::RUN_DIR, hide = true)]
    run_dir: PathBuf,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Every running VM: id, tenant, state, vCPUs, memory, uptime, supervisor pid.
    List {
        /// Also VMs that ended but are still in the registry.
        #[arg(long)]
        all: bool,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One VM's state, resources, label, cgroup, devices and sockets.
    Info {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Attach to the VM's serial console (Ctrl-] detaches).
    Console { id: String },
    /// Stop every vCPU of the VM (idempotent).
    Pause { id: String },
    /// Run the paused vCPUs again (idempotent).
    Resume { id: String },
    /// Press the power button and wait until the guest powers off (exit 0) or the
    /// timeout passes (exit 124; the VM still runs: `destroy` ends it).
    Shutdown {
        id: String,
        /// Seconds to wait for the guest (1 to 3600, the API's bound).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
    },
    /// The VM's long operations (a shutdown waiting for its guest): running ones, then
    /// the last finished.
    Jobs {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// End a running job early (a shutdown stops waiting; the VM keeps running).
    Cancel {
        id: String,
        /// The job's id, from `cellvmctl jobs`.
        job: u64,
    },
    /// Press the VM's ACPI power button once and return.
    PowerButton { id: String },
    /// Reset the VM: the supervisor rebuilds it with fresh cells.
    Reboot { id: String },
    /// End the VM now (SIGUSR1 to its supervisor) and wait until nothing of it is left.
    Destroy { id: String },
    /// CPU time and memory of the VM's cgroup, and the VMM's exit and I/O counters.
    Stats {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Save the VM into DIR (state, memory, vm.toml): it is paused first and stays
    /// paused unless --resume.
    Snapshot {
        id: String,
        dir: PathBuf,
        /// Run the VM again once it is saved.
        #[arg(long)]
        resume: bool,
        /// DIR holds this VM's last snapshot: write only what the guest wrote since
        /// into its memory file, and replace its state file.
        #[arg(long)]
        incremental: bool,
    },
    /// Start a VM from a snapshot directory in the background, through the jailer
    /// (fresh cells; the snapshot's spec checked against the policy); prints its id.
    Restore {
        dir: PathBuf,
        /// The tenant policy.
        #[arg(long)]
        policy: PathBuf,
        /// The new VM's id (default: the jailer's).
        #[arg(long)]
        id: Option<String>,
        /// Leave it paused (`cellvmctl resume` runs it).
        #[arg(long)]
        paused: bool,
    },
    /// Start a VM in the background (`cellvm-jailer launch --detach`); prints its id.
    Launch {
        /// The tenant policy.
        #[arg(long)]
        policy: PathBuf,
        /// The VM spec.
        #[arg(long)]
        vm: PathBuf,
        /// The VM id (default: the jailer's, tenant-vm-pid).
        #[arg(long)]
        id: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let host = Host::new(&cli.run_dir);
    let result = match &cli.verb {
        Verb::List { all, json } => commands::list(&host, *all, *json),
        Verb::Info { id, json } => commands::info(&host, id, *json),
        Verb::Console { id } => commands::console(&host, id),
        Verb::Pause { id } => commands::simple(&host, id, "vm.pause", "paused"),
        Verb::Resume { id } => commands::simple(&host, id, "vm.resume", "resumed"),
        Verb::Shutdown { id, timeout } => commands::shutdown(&host, id, *timeout),
        Verb::Jobs { id, json } => commands::jobs(&host, id, *json),
        Verb::Cancel { id, job } => commands::cancel(&host, id, *job),
        Verb::PowerButton { id } => {
            commands::simple(&host, id, "vm.power-button", "power button pressed")
        }
        Verb::Reboot { id } => commands::simple(&host, id, "vm.reboot", "is being rebooted"),
        Verb::Destroy { id } => commands::destroy(&host, id),
        Verb::Stats { id, json } => commands::stats(&host, id, *json),
        Verb::Snapshot {
            id,
            dir,
            resume,
            incremental,
        } => commands::snapshot(&host, id, dir, *resume, *incremental),
        Verb::Restore {
            dir,
            policy,
            id,
            paused,
        } => Err(commands::restore(
            &host,
            dir,
            policy,
            id.as_deref(),
            *paused,
            cli.run_dir.as_os_str() == cellvm_jailer::registry::RUN_DIR,
        )),
        Verb::Launch { policy, vm, id } => Err(commands::launch(
            &host,
            policy,
            vm,
            id.as_deref(),
            cli.run_dir.as_os_str() == cellvm_jailer::registry::RUN_DIR,
        )),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("cellvmctl: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
