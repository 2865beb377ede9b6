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

// Parsed once at start-up: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Boot a VM (with no --kernel: the built-in test guest).
    Run(RunArgs),
    /// Write the built-in test guest (a PVH ELF) to a file, for other VMMs to boot.
    Testguest {
        #[arg(long)]
        output: PathBuf,
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
    /// A virtio-blk disk: path=IMG[,readonly=on][,direct=on][,queues=N], socket=PATH or fd=N
    /// (repeat for more disks).
    #[arg(long = "disk")]
    disks: Vec<cellvm::vmm::config::DiskSpec>,
    /// A virtio-rng device: on (cellvm starts its backend), socket=PATH or fd=N.
    #[arg(long, num_args = 0..=1, default_missing_value = "on")]
    rng: Option<cellvm::vmm::config::RngSpec>,
    /// A virtio-net device: tap=NAME[,mac=MAC] (cellvm starts its backend on that tap),
    /// socket=PATH or fd=N (repeat for more).
    #[arg(long = "net")]
    nets: Vec<cellvm::vmm::config::NetSpec>,
    /// A virtio-vsock device: cid=N,uds=PATH (cellvm starts its backend; host programs
    /// connect to PATH and write `CONNECT PORT`, the guest reaches host port P at
    /// PATH_P), socket=PATH or fd=N.
    #[arg(long)]
    vsock: Option<cellvm::vmm::config::VsockSpec>,
    /// A virtio-console device: hvc=PATH[,port=NAME:PATH...] (cellvm starts its
    /// backend; the guest's hvc0 takes one host program at a time on PATH, each named
    /// port on its own socket), socket=PATH or fd=N.
    #[arg(long)]
    virtio_console: Option<cellvm::vmm::config::ConsoleSpec>,
    /// A virtio-fs share: tag=TAG,socket=PATH or tag=TAG,fd=N, its backend a virtiofsd
    /// started elsewhere (the jailer starts one in a cell; repeat for more).
    #[arg(long = "fs")]
    fs: Vec<cellvm::vmm::config::FsSpec>,
    /// Guest RAM the kernel may merge with identical pages of other VMs (KSM); private
    /// memory, so no device backends can share it.
    #[arg(long)]
    ksm: bool,
    /// Where the kernel cannot seal guest RAM against execution (MFD_NOEXEC_SEAL, Linux
    /// 6.3+), run with a logged warning instead of refusing (a tenant policy's choice).
    #[arg(long)]
    allow_executable_ram: bool,
    /// Guest RAM from hugetlb pages: 2M or 1G (the host's pool must hold the whole VM;
    /// it is reserved at start, so a short pool fails the launch, never a page fault).
    #[arg(long)]
    hugepages: Option<cellvm::vmm::config::HugePages>,
    /// Allocate every page of guest RAM at start (no page faults later).
    #[arg(long)]
    prefault: bool,
    /// Lock guest RAM in host memory (mlock; implies --prefault); needs RLIMIT_MEMLOCK.
    #[arg(long)]
    mlock: bool,
    /// Guest RAM in this file instead of a memfd (empty, or exactly the RAM's size).
    #[arg(long, conflicts_with = "memory_file_fd")]
    memory_file: Option<PathBuf>,
    /// Guest RAM in the file open on this inherited descriptor (the jailer's way).
    #[arg(long)]
    memory_file_fd: Option<i32>,
    /// The same fields from a TOML file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve the API on this already-listening AF_UNIX stream socket (the jailer's way:
    /// the VMM opens no path for it).
    #[arg(long, conflicts_with = "api_socket")]
    api_fd: Option<i32>,
    /// Take new backends for dead ones from the supervisor on this inherited
    /// AF_UNIX SOCK_SEQPACKET socket (the jailer's way).
    #[arg(long)]
    supervisor_fd: Option<i32>,
    /// Bind and serve the API at this path (unjailed use).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Who the VM is, for vm.info: id=ID,tenant=T,label=LABEL,cgroup=PATH (all optional).
    #[arg(long)]
    identity: Option<cellvm::vmm::state::Identity>,
    /// The exit status after a guest reset or vm.reboot (default 0).
    #[arg(long, default_value_t = 0)]
    reset_exit_code: u8,
    /// Restore the snapshot in DIR (its `state` and `memory` files) instead of booting;
    /// the configuration must describe the same VM (vCPUs, memory, devices).
    #[arg(long, value_name = "DIR", conflicts_with = "restore_fds")]
    restore: Option<PathBuf>,
    /// Restore the snapshot whose state and memory files are open on these inherited
    /// descriptors (the jailer's way): STATE,MEMORY.
    #[arg(long, value_name = "STATE,MEMORY", value_parser = parse_fd_pair)]
    restore_fds: Option<(i32, i32)>,
    /// Start with every vCPU paused (vm.resume runs the guest).
    #[arg(long)]
    paused: bool,
    /// Write the ACPI tables a VM with this configuration gets into the existing
    /// directory DIR (rsdp.dat, xsdt.dat, facp.dat, dsdt.dat, apic.dat, mcfg.dat) and
    /// exit without running a guest.
    #[arg(long, value_name = "DIR")]
    dump_acpi: Option<PathBuf>,
}

fn parse_fd_pair(s: &str) -> Result<(i32, i32), String> {
    let bad = || format!("{s:?}: expected two descriptor numbers, STATE,MEMORY");
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
}

extern "C" fn on_sigterm(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe. A VMM that is PID 1 of its pid namespace
    // ignores SIGTERM without a handler; with this one a SIGTERM while the VM is still
    // being built ends it. Once built, SIGTERM is blocked and read by the main loop
    // (a press of the power button).
    unsafe { libc::_exit(128 + libc::SIGTERM) };
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // SAFETY: installing a handler that only calls _exit.
    unsafe { libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t) };
    let cli = Cli::parse();
    let result = match cli.command {
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
    // Before any input: non-dumpable, and no memory may become executable.
    cellvm::hardening::lock_process().map_err(|e| (e.to_string(), 1))?;
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
        disks: (!args.disks.is_empty()).then_some(args.disks),
        rng: args.rng,
        nets: (!args.nets.is_empty()).then_some(args.nets),
        vsock: args.vsock,
        virtio_console: args.virtio_console,
        fs: (!args.fs.is_empty()).then_some(args.fs),
        ksm: args.ksm.then_some(true),
        allow_executable_ram: args.allow_executable_ram.then_some(true),
        hugepages: args.hugepages,
        prefault: args.prefault.then_some(true),
        mlock: args.mlock.then_some(true),
        memory_file: args.memory_file,
        memory_file_fd: args.memory_file_fd,
    };
    if let Some(dir) = &args.dump_acpi {
        let cfg = from_file.merge(flags);
        let files = cellvm::arch::x86_64::acpi::dump_tables(dir, cfg.cpus(), cfg.memory_mib())
            .map_err(|e| (e.to_string(), e.exit_code()))?;
        for f in files {
            println!("{}", f.display());
        }
        return Ok(0);
    }
    let opts = cellvm::vmm::RunOptions {
        api: match (args.api_fd, args.api_socket) {
            (Some(fd), _) => Some(cellvm::vmm::ApiListen::Fd(fd)),
            (None, Some(p)) => Some(cellvm::vmm::ApiListen::Path(p)),
            (None, None) => None,
        },
        identity: args.identity.unwrap_or_default(),
        reset_exit_code: args.reset_exit_code,
        supervisor: args.supervisor_fd,
        restore: match (args.restore, args.restore_fds) {
            (Some(dir), _) => Some(cellvm::vmm::save::RestoreFrom::Dir(dir)),
            (None, Some((s, m))) => Some(cellvm::vmm::save::RestoreFrom::Fds(s, m)),
            (None, None) => None,
        },
        start_paused: args.paused,
    };
    let code = cellvm::vmm::run(from_file.merge(flags), opts)
        .map_err(|e| (e.to_string(), e.exit_code()))?;
    // Exit at once: vCPU threads still inside KVM_RUN are not joined.
    std::process::exit(code);
}
