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
    /// Run a device backend (vhost-user) for one VM.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Test only: try one thing a cell must forbid, after installing the VMM's
    /// main-thread seccomp profile, and report how it was stopped.
    #[command(hide = true)]
    Probe {
        name: String,
        #[arg(long, value_enum, default_value = "kill")]
        seccomp: cellvm::seccomp::Mode,
        /// Whose confinement to take on: the VMM's main thread (vmm) or a backend's
        /// (blk, net, rng: its process-wide seccomp profile and Landlock, as it installs
        /// them).
        #[arg(long, default_value = "vmm")]
        role: String,
    },
}

#[derive(Args)]
struct BackendArgs {
    /// Listen at this path for the VMM's connection.
    #[arg(
        long,
        conflicts_with = "listen_fd",
        required_unless_present = "listen_fd"
    )]
    socket: Option<PathBuf>,
    /// An inherited listening socket (as the jailer and `cellvm run` pass it).
    #[arg(long)]
    listen_fd: Option<i32>,
    /// What a seccomp violation does.
    #[arg(long, value_enum, default_value = "kill")]
    seccomp: cellvm::seccomp::Mode,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// virtio-blk on a raw image.
    Blk {
        #[command(flatten)]
        common: BackendArgs,
        /// The image file.
        #[arg(
            long,
            conflicts_with = "image_fd",
            required_unless_present = "image_fd"
        )]
        image: Option<PathBuf>,
        /// An inherited descriptor of the image, opened by the jailer.
        #[arg(long)]
        image_fd: Option<i32>,
        #[arg(long)]
        readonly: bool,
        /// Read and write the image with O_DIRECT (no host page cache).
        #[arg(long)]
        direct: bool,
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// The serial the guest reads with GET_ID (up to 20 bytes).
        #[arg(long, default_value = "cellvm")]
        id: String,
    },
    /// virtio-net on a tap, with the virtio-net header and offloads.
    Net {
        #[command(flatten)]
        common: BackendArgs,
        /// Open (or create) this tap in the current network namespace.
        #[arg(long, conflicts_with = "tap_fd", required_unless_present = "tap_fd")]
        tap: Option<String>,
        /// An inherited tap descriptor, attached by the jailer with IFF_VNET_HDR.
        #[arg(long)]
        tap_fd: Option<i32>,
        /// The guest's MAC address (default: a random locally administered one).
        #[arg(long)]
        mac: Option<String>,
    },
    /// virtio-rng from getrandom(2).
    Rng {
        #[command(flatten)]
        common: BackendArgs,
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
    /// Guest RAM the kernel may merge with identical pages of other VMs (KSM); private
    /// memory, so no device backends can share it.
    #[arg(long)]
    ksm: bool,
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
        Command::Probe {
            name,
            seccomp,
            role,
        } => Ok(cellvm::probe::run(&name, seccomp, &role)),
        Command::Run(args) => run(args),
        Command::Device(cmd) => device(cmd),
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
        disks: (!args.disks.is_empty()).then_some(args.disks),
        rng: args.rng,
        nets: (!args.nets.is_empty()).then_some(args.nets),
        ksm: args.ksm.then_some(true),
    };
    let code =
        cellvm::vmm::run(from_file.merge(flags)).map_err(|e| (e.to_string(), e.exit_code()))?;
    // Exit at once: vCPU threads still inside KVM_RUN are not joined.
    std::process::exit(code);
}

fn device(cmd: DeviceCommand) -> Result<i32, (String, i32)> {
    use cellvm::backend::{self, Socket};
    use std::os::fd::FromRawFd;
    let socket = |c: &BackendArgs| match (&c.socket, c.listen_fd) {
        (Some(p), _) => Socket::Path(p.clone()),
        (None, Some(fd)) => Socket::ListenFd(fd),
        (None, None) => unreachable!("clap requires one"),
    };
    let result = match cmd {
        DeviceCommand::Blk {
            common,
            image,
            image_fd,
            readonly,
            direct,
            queues,
            id,
        } => {
            if !(1..=cellvm::vmm::config::MAX_DISK_QUEUES).contains(&queues) {
                return Err((
                    format!(
                        "--queues {queues}: expected 1 to {}",
                        cellvm::vmm::config::MAX_DISK_QUEUES
                    ),
                    2,
                ));
            }
            let file = match (image, image_fd) {
                (Some(p), _) => std::fs::OpenOptions::new()
                    .read(true)
                    .write(!readonly)
                    .open(&p)
                    .map_err(|e| (format!("{}: {e}", p.display()), 2))?,
                // SAFETY: the descriptor was handed to this process to own.
                (None, Some(fd)) => unsafe { std::fs::File::from_raw_fd(fd) },
                (None, None) => unreachable!("clap requires one"),
            };
            let mut disk = backend::blk::Disk::new(file, readonly, &id)
                .map_err(|e| (format!("image: {e}"), 2))?;
            if direct {
                disk.set_direct()
                    .map_err(|e| (format!("image: O_DIRECT: {e}"), 2))?;
            }
            let b = backend::blk::BlkBackend::new(disk, queues as usize, 256);
            backend::serve("cellvm-blk", b, socket(&common), "blk", common.seccomp, &[])
        }
        DeviceCommand::Net {
            common,
            tap,
            tap_fd,
            mac,
        } => {
            let mac = match mac {
                Some(m) => backend::net::parse_mac(&m).map_err(|e| (e, 2))?,
                None => backend::net::random_mac(),
            };
            let tap = match (tap, tap_fd) {
                (Some(name), _) => backend::net::Tap::open(&name),
                // SAFETY: the descriptor was handed to this process to own.
                (None, Some(fd)) => backend::net::Tap::from_fd(unsafe {
                    std::os::fd::OwnedFd::from_raw_fd(fd)
                }),
                (None, None) => unreachable!("clap requires one"),
            }
            .map_err(|e| (format!("tap: {e}"), 2))?;
            let b = backend::net::NetBackend::new(tap, mac);
            let tap_listener = b.tap_listener();
            backend::serve(
                "cellvm-net",
                b,
                socket(&common),
                "net",
                common.seccomp,
                &[tap_listener],
            )
        }
        DeviceCommand::Rng { common } => backend::serve(
            "cellvm-rng",
            backend::rng::RngBackend::new(),
            socket(&common),
            "rng",
            common.seccomp,
            &[],
        ),
    };
    result.map(|_| 0).map_err(|e| (e.to_string(), 1))
}
