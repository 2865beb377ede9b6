use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use cellvm::arch::x86_64::boot::BootProtocol;
use cellvm::vmm::config::{SerialOut, VmConfig};

#[derive(Parser)]
#[command(
    name = "cellvm",
    version,
    about = "A security-hardened KVM virtual machine monitor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM (with no --kernel: the built-in test guest).
    Run(RunArgs),
    /// Write the built-in test guest (a PVH ELF) to a file, for other VMMs to boot.
    Testguest {
        #[arg(long)]
        output: PathBuf,
    },
    /// Test only: try one thing a cell must forbid, after installing the VMM's
    /// main-thread seccomp profile, and report how it was stopped.
    #[command(hide = true)]
    Probe {
        name: String,
        #[arg(long, value_enum, default_value = "kill")]
        seccomp: cellvm::seccomp::Mode,
    },
}

#[derive(Args)]
struct RunArgs {
    /// ELF vmlinux (PVH note or 64-bit boot protocol) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    cpus: Option<u32>,
    /// Guest RAM in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// stdio, off, or file=PATH.
    #[arg(long)]
    serial: Option<SerialOut>,
    /// For ELF kernels with a PVH note: which entry to use.
    #[arg(long, value_enum)]
    boot_protocol: Option<BootProtocol>,
    /// What a seccomp violation does: kill (default), log, or off (diagnosis only).
    #[arg(long, value_enum)]
    seccomp: Option<cellvm::seccomp::Mode>,
    /// The same fields from a TOML file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

extern "C" fn on_sigterm(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe. A VMM that is PID 1 of its pid namespace
    // ignores SIGTERM without a handler; with this one the supervisor's SIGTERM ends it.
    unsafe { libc::_exit(128 + libc::SIGTERM) };
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // SAFETY: installing a handler that only calls _exit.
    unsafe { libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe { name, seccomp } => Ok(cellvm::probe::run(&name, seccomp)),
        Command::Run(args) => run(args),
        Command::Testguest { output } => std::fs::write(&output, cellvm::testguest::IMAGE)
            .map(|_| 0)
            .map_err(|e| (format!("{}: {e}", output.display()), 2)),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err((message, code)) => {
            eprintln!("cellvm: error: {message}");
            ExitCode::from(code as u8)
        }
    }
}

fn run(args: RunArgs) -> Result<i32, (String, i32)> {
    let from_file = match &args.config {
        Some(path) => VmConfig::from_toml(path).map_err(|e| (e.to_string(), 2))?,
        None => VmConfig::default(),
    };
    let flags = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory_mib: args.memory,
        serial: args.serial,
        boot_protocol: args.boot_protocol,
        seccomp: args.seccomp,
    };
    let code =
        cellvm::vmm::run(from_file.merge(flags)).map_err(|e| (e.to_string(), e.exit_code()))?;
    // Exit at once: vCPU threads still inside KVM_RUN are not joined.
    std::process::exit(code);
}
