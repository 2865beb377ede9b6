//! The VMM: builds a VM from its configuration (`Vm::create`), runs it (`Vm::run`: the
//! main loop, which serves the API, vCPU and device events and SIGTERM), and turns how it
//! ended into an exit status. The lifecycle and its state × operation table:
//! `state::State`.

pub mod config;
pub mod mailbox;
pub mod memory;
pub mod save;
pub mod state;
pub mod supervisor;
pub mod vcpu;
pub mod virtio;

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::Kvm;

use crate::api::{self, ApiCall, ApiReply, Op, Response};
use crate::arch::x86_64::{acpi, boot, cpu, layout};
use crate::devices::acpi_pm::AcpiSleep;
use crate::devices::bus::Bus;
use crate::devices::ged::Ged;
use crate::devices::i8042::I8042;
use crate::devices::ioapic::{self, IoApic};
use crate::devices::pci::{self, PciConfigIo, PciEcam, PciRoot};
use crate::devices::serial::{IrqLine, Serial};
use crate::devices::VmEvent;
use crate::virtio::irq::MsiRouter;
use config::{SerialOut, VmConfig};
use mailbox::Mailbox;
use state::{Identity, Job, Lifecycle, Reason, State, Status};

/// Where KVM's real-mode TSS pages go (Intel only; harmless elsewhere): just below the
/// IOAPIC, inside the MMIO hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input from the user: exit status 2.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM: {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    #[error("serial output {0}: {1}")]
    SerialOut(String, std::io::Error),
    #[error("cannot start vcpu thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Seccomp(crate::seccomp::Error),
    #[error("device {0}")]
    Device(String),
    #[error("api: {0}")]
    Api(String),
    #[error("main loop: {0}")]
    MainLoop(std::io::Error),
}

impl Error {
    /// 2 for anything the user's input caused, 1 for failures of the host or KVM.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid(_) | Error::Config(_) | Error::Api(_) => 2,
            Error::Boot(boot::Error::BootInfo(_)) => 1,
            Error::Boot(_) => 2,
            Error::SerialOut(..) => 2,
            _ => 1,
        }
    }
}

/// Checks what can be checked before any KVM object exists.
fn validate(cfg: &VmConfig, kvm: &Kvm) -> Result<(), Error> {
    let max_cpus = (kvm.get_max_vcpus() as u32).min(acpi::MAX_MADT_CPUS);
    let cpus = cfg.cpus();
    if cpus == 0 || cpus > max_cpus {
        return Err(Error::Invalid(format!(
            "cpus = {cpus}: must be between 1 and {max_cpus}"
        )));
    }
    let mib = cfg.memory_mib();
    if mib < layout::MIN_MEMORY_MIB {
        return Err(Error::Invalid(format!(
            "memory = {mib} MiB: the minimum is {} MiB",
            layout::MIN_MEMORY_MIB
        )));
    }
    let devices = cfg.disks.as_ref().is_some_and(|d| !d.is_empty())
        || cfg.nets.as_ref().is_some_and(|n| !n.is_empty())
        || cfg.rng.is_some()
        || cfg.vsock.is_some()
        || cfg.virtio_console.is_some()
        || cfg.fs.as_ref().is_some_and(|f| !f.is_empty());
    if cfg.ksm == Some(true) && devices {
        return Err(Error::Invalid(
            "ksm: mergeable guest RAM is private to the VMM, and vhost-user device backends \
             need RAM they can share: use KSM or devices, not both"
                .into(),
        ));
    }
    if (cfg.memory_file.is_some() || cfg.memory_file_fd.is_some())
        && (cfg.hugepages.is_some() || cfg.ksm == Some(true))
    {
        return Err(Error::Invalid(
            "memory_file: guest RAM in a file excludes hugepages and ksm".into(),
        ));
    }
    if let Some(h) = cfg.hugepages {
        if cfg.ksm == Some(true) {
            return Err(Error::Invalid(
                "ksm and hugepages: KSM merges ordinary pages only; use one or the other".into(),
            ));
        }
        if mib.checked_mul(1 << 20).is_none_or(|b| b % h.bytes() != 0) {
            return Err(Error::Invalid(format!(
                "memory = {mib} MiB is not a whole number of {h} hugepages"
            )));
        }
    }
    let host = memory::host_memory_bytes().unwrap_or(u64::MAX);
    if mib.checked_mul(1 << 20).is_none_or(|b| b > host) {
        return Err(Error::Invalid(format!(
            "memory = {mib} MiB: more than the host's {} MiB",
            host >> 20
        )));
    }
    Ok(())
}

fn serial_writer(out: &SerialOut) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match out {
        SerialOut::Stdio => Box::new(std::io::stdout()),
        SerialOut::Off => Box::new(std::io::sink()),
        SerialOut::File(p) => {
            Box::new(File::create(p).map_err(|e| Error::SerialOut(p.display().to_string(), e))?)
        }
    })
}

/// What the main loop hears.
#[derive(Debug)]
pub enum MainMsg {
    Vcpu(vcpu::Note),
    /// A platform device's event (i8042 reset, ACPI sleep), relayed by a vCPU thread.
    Device(VmEvent),
    Api(ApiCall),
    /// The API thread wrote (or gave up on) a reply marked `then_exit`.
    Flushed(u64),
}

/// Where the API is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiListen {
    /// A listening AF_UNIX stream socket handed over (the jailer's way): no path opened.
    Fd(i32),
    /// Bind and listen at this path (unjailed use and tests).
    Path(PathBuf),
}

/// How the VMM runs the VM, beyond what the VM is made of.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub api: Option<ApiListen>,
    pub identity: Identity,
    /// The exit status after a guest reset or `vm.reboot`.
    pub reset_exit_code: u8,
    /// The supervisor's channel (`--supervisor-fd`): new backends for dead ones.
    pub supervisor: Option<RawFd>,
    /// Restore this snapshot instead of booting.
    pub restore: Option<save::RestoreFrom>,
    /// Start with every vCPU parked (state paused): `vm.resume` runs the guest.
    pub start_paused: bool,
}

/// The listening socket, checked: an AF_UNIX stream socket in the listening state.
fn api_listener(listen: &ApiListen) -> Result<OwnedFd, Error> {
    match listen {
        ApiListen::Path(p) => std::os::unix::net::UnixListener::bind(p)
            .map(OwnedFd::from)
            .map_err(|e| Error::Api(format!("--api-socket {}: {e}", p.display()))),
        ApiListen::Fd(fd) => {
            let fd = *fd;
            let opt = |level, name| {
                let mut v: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: getsockopt writes at most `len` bytes into `v`.
                let rc = unsafe {
                    libc::getsockopt(fd, level, name, &mut v as *mut _ as *mut _, &mut len)
                };
                (rc == 0).then_some(v)
            };
            let bad = |why: &str| Error::Api(format!("--api-fd {fd}: {why}"));
            if fd < 3 {
                return Err(bad("expected a descriptor number >= 3"));
            }
            match (
                opt(libc::SOL_SOCKET, libc::SO_DOMAIN),
                opt(libc::SOL_SOCKET, libc::SO_TYPE),
                opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN),
            ) {
                (None, _, _) => Err(bad("not an open socket")),
                (Some(libc::AF_UNIX), Some(libc::SOCK_STREAM), Some(1)) => {
                    // SAFETY: the descriptor was handed to this process to own.
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                }
                _ => Err(bad("not a listening AF_UNIX stream socket")),
            }
        }
    }
}

/// A vCPU: its shared half and its thread.
struct VcpuHandle {
    shared: Arc<vcpu::Shared>,
    _thread: std::thread::JoinHandle<()>,
}

/// A pause or resume under way: who waits for it.
struct Transition {
    to: State,
    waiting: Vec<u64>,
}

/// A built VM: guest memory, devices, vCPU threads (already running the guest), and
/// what the API reads.
pub struct Vm {
    status: Arc<Status>,
    vcpus: Vec<VcpuHandle>,
    main: Arc<Mailbox<MainMsg>>,
    serial: Arc<Mutex<Serial>>,
    ged: Arc<Mutex<Ged>>,
    api: Option<Arc<Mailbox<ApiReply>>>,
    /// Backend connections (second descriptors) watched for a hang-up, by device index.
    connections: Vec<std::os::unix::net::UnixStream>,
    /// The virtio functions, by device index (a new backend is handed to its function).
    functions: Vec<Arc<Mutex<crate::virtio::pci::VirtioPci>>>,
    /// Where a supervisor sends new backends for dead ones; None: a dead backend's
    /// device fails at once.
    supervisor: Option<OwnedFd>,
    reset_exit_code: u8,
    seccomp: crate::seccomp::Mode,
    vm_fd: Arc<kvm_ioctls::VmFd>,
    ram: memory::GuestRam,
    ioapic: Arc<Mutex<IoApic<Arc<kvm_ioctls::VmFd>>>>,
    /// The MSRs a snapshot saves (KVM's list, less those this host cannot read).
    msr_list: Arc<Vec<u32>>,
    tsc_khz: u32,
    start_paused: bool,
    restored: bool,
    /// The last snapshot's memory file and index, once one was taken (from then on
    /// KVM logs the pages the guest writes, for the next, incremental one).
    last_snapshot: Mutex<Option<save::LastSnapshot>>,
    /// Kept for the life of the VM (dropped only with the process).
    _keep: Box<dyn Send>,
}

impl Vm {
    /// Builds the VM and starts its vCPU threads (state created until `run` serves it).
    pub fn create(cfg: VmConfig, opts: RunOptions) -> Result<Vm, Error> {
        let api_fd = opts.api.as_ref().map(api_listener).transpose()?;
        let supervisor = opts
            .supervisor
            .map(supervisor::check)
            .transpose()
            .map_err(Error::Invalid)?;
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        validate(&cfg, &kvm)?;
        let cpus = cfg.cpus();
        let mem_size = cfg.memory_mib() << 20;
        let restore = match &opts.restore {
            Some(from) => {
                let (snap, mem_file) = save::open(from).map_err(Error::Invalid)?;
                snap.check(&save::info(cpus, mem_size, virtio::device_count(&cfg), 0))
                    .map_err(|e| Error::Invalid(format!("restore: {e}")))?;
                Some((snap, mem_file))
            }
            None => None,
        };

        // Open the images before any KVM object exists, so bad paths cost nothing.
        let kernel_path = cfg
            .kernel
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(built-in test guest)".into());
        let mut kernel_file = match &cfg.kernel {
            Some(p) => Some(File::open(p).map_err(|source| boot::Error::Open {
                path: kernel_path.clone(),
                source,
            })?),
            None => None,
        };
        let mut initrd_file = match &cfg.initrd {
            Some(p) => Some((
                p.display().to_string(),
                File::open(p).map_err(|source| boot::Error::Initrd {
                    path: p.display().to_string(),
                    source,
                })?,
            )),
            None => None,
        };

        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?,
        );
        // Split irqchip: the LAPIC in the kernel, the IOAPIC here, no PIC and no PIT. It
        // keeps that emulation out of the kernel the guest can reach, and on nested hosts a
        // full in-kernel irqchip costs 6-7 ms at the first memslot and a PIT 16-24 ms at
        // teardown, against < 0.5 ms for this.
        let cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            args: [ioapic::NUM_PINS as u64, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(|e| Error::Kvm("KVM_ENABLE_CAP(SPLIT_IRQCHIP)", e))?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
        if cpus > 255 {
            // APIC ids past 255 exist only in x2APIC mode; MSIs must then carry 32-bit ids.
            const KVM_X2APIC_API_USE_32BIT_IDS: u64 = 1;
            const KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK: u64 = 2;
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X2APIC_API,
                args: [
                    KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK,
                    0,
                    0,
                    0,
                ],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(|e| Error::Kvm("KVM_ENABLE_CAP(X2APIC_API)", e))?;
        }

        let ram = if let Some(path) = &cfg.memory_file {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::Invalid(format!("memory_file {}: {e}", path.display())))?;
            memory::create_in_file(file, mem_size)?
        } else if let Some(fd) = cfg.memory_file_fd {
            // SAFETY: fcntl(F_GETFD) only checks the descriptor exists.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(Error::Invalid(format!(
                    "--memory-file-fd {fd}: not an open descriptor"
                )));
            }
            // SAFETY: the launcher handed this descriptor to the VMM to own; it is
            // taken once, here.
            let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            memory::create_in_file(file, mem_size)?
        } else if cfg.ksm == Some(true) {
            memory::create_mergeable(mem_size)?
        } else {
            memory::create(
                mem_size,
                cfg.allow_executable_ram == Some(true),
                cfg.hugepages,
            )?
        };
        if cfg.mlock == Some(true) {
            memory::lock(&ram)?;
        } else if cfg.prefault == Some(true) {
            memory::prefault(&ram)?;
        }
        memory::register(&vm, &ram.mem)?;

        // A restored VM's RAM comes from its snapshot; a booted one's from the kernel,
        // the command line, the initrd and the tables.
        let kernel = match &restore {
            Some((snap, mem_file)) => {
                let t = Instant::now();
                crate::snapshot::memory::load(&ram.mem, ram.file.as_ref(), &snap.ram, mem_file)
                    .map_err(|e| Error::Invalid(format!("restore: {e}")))?;
                log::info!(
                    "restore: {} chunks of RAM loaded in {} us",
                    snap.ram.chunks.len(),
                    t.elapsed().as_micros()
                );
                None
            }
            None => Some(load_boot_image(
                &cfg,
                &ram.mem,
                kernel_file.as_mut(),
                &kernel_path,
                initrd_file.as_mut(),
                mem_size,
            )?),
        };

        let main = Arc::new(Mailbox::new().map_err(Error::MainLoop)?);
        let (events, device_events) = mpsc::channel();
        let device_events = Arc::new(Mutex::new(device_events));
        let ioapic = Arc::new(Mutex::new(IoApic::new(cpus, vm.clone())));
        let irq_ioapic = ioapic.clone();
        let com1_irq = IrqLine::new(move || {
            irq_ioapic
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .assert_irq(layout::COM1_IRQ as usize)
        });
        let com1_out = serial_writer(cfg.serial.as_ref().unwrap_or(&SerialOut::Stdio))?;
        // A restored VM's platform devices take their saved state before any vCPU
        // exists: an interrupt the UART raises now reaches no LAPIC, whose own saved
        // state (restored with its vCPU) holds what was pending.
        let serial = Arc::new(Mutex::new(match &restore {
            Some((snap, _)) => {
                ioapic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .restore(&snap.ioapic);
                Serial::from_state(&snap.serial, com1_irq, com1_out)
                    .map_err(|e| Error::Invalid(format!("restore: {e}")))?
            }
            None => Serial::new(com1_irq, com1_out),
        }));
        let ged_ioapic = ioapic.clone();
        let ged = Arc::new(Mutex::new(Ged::new(IrqLine::new(move || {
            // An edge: raise and drop the pin (its redirection entry is edge-triggered).
            let mut a = ged_ioapic.lock().unwrap_or_else(|p| p.into_inner());
            a.assert_irq(layout::GED_IRQ as usize);
            a.deassert_irq(layout::GED_IRQ as usize);
        }))));
        if let Some((snap, _)) = &restore {
            ged.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(snap.ged);
        }
        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        let bus_err = |e| Error::Invalid(format!("device layout: {e}"));
        pio.insert(layout::COM1_PORT as u64, 8, serial.clone())
            .map_err(bus_err)?;
        pio.insert(
            layout::I8042_PORT as u64,
            5,
            Arc::new(Mutex::new(I8042::new(events.clone()))),
        )
        .map_err(bus_err)?;
        pio.insert(
            layout::ACPI_SLEEP_PORT as u64,
            2,
            Arc::new(Mutex::new(AcpiSleep::new(events.clone()))),
        )
        .map_err(bus_err)?;
        pio.insert(layout::GED_PORT as u64, layout::GED_SIZE, ged.clone())
            .map_err(bus_err)?;
        mmio.insert(layout::IOAPIC_BASE, layout::IOAPIC_SIZE, ioapic.clone())
            .map_err(bus_err)?;
        // The PCI root complex: config mechanism #1 and ECAM over the same functions.
        let pci = Arc::new(Mutex::new(PciRoot::new()));
        pio.insert(
            pci::CONFIG_ADDRESS_PORT as u64,
            8,
            Arc::new(Mutex::new(PciConfigIo(pci.clone()))),
        )
        .map_err(bus_err)?;
        // Virtio devices, each backed by a vhost-user backend process.
        let router = Arc::new(MsiRouter::new(vm.clone()));
        let mut attached = {
            let mut root = pci.lock().unwrap_or_else(|p| p.into_inner());
            virtio::attach(&cfg, &vm, &ram.mem, &router, &ioapic, &mut root, &mut mmio)?
        };
        mmio.insert(
            layout::PCI_ECAM_BASE,
            pci::ECAM_SIZE,
            Arc::new(Mutex::new(PciEcam(pci))),
        )
        .map_err(bus_err)?;
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));

        let base_cpuid = cpu::supported_cpuid(&kvm)?;
        // What a snapshot saves of each vCPU's MSRs: KVM's list (those a vCPU cannot
        // read are dropped when a snapshot is taken).
        let msr_list = Arc::new(
            kvm.get_msr_index_list()
                .map(|l| l.as_slice().to_vec())
                .map_err(|e| Error::Kvm("KVM_GET_MSR_INDEX_LIST", e))?,
        );
        let mut first_tsc_khz = 0;
        let mut fds = Vec::with_capacity(cpus as usize);
        for id in 0..cpus {
            let fd = vm
                .create_vcpu(id as u64)
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            let tsc_khz = fd.get_tsc_khz().ok();
            log::debug!("vcpu {id}: TSC {tsc_khz:?} kHz");
            cpu::configure_vcpu(&fd, id, &cpu::vcpu_cpuid(&base_cpuid, id, cpus, tsc_khz))?;
            if id == 0 {
                first_tsc_khz = tsc_khz.unwrap_or(0);
            }
            fds.push(fd);
        }
        // With APIC ids past 255, every LAPIC starts in x2APIC mode, as firmware leaves it
        // on such machines: guests only accept x2APIC MADT entries in that mode.
        match (&kernel, &restore) {
            (Some(kernel), _) => {
                if cpus > 255 {
                    for (id, fd) in fds.iter().enumerate() {
                        cpu::enable_x2apic(fd, id as u32)?;
                    }
                }
                // Only the boot vCPU starts at the entry point; the others wait in the
                // kernel's LAPIC for INIT/SIPI, as on real hardware.
                cpu::setup_boot_vcpu(&fds[0], &ram.mem, kernel.protocol, kernel.entry)?;
            }
            (None, Some((snap, _))) => {
                let xsave_size = kvm.check_extension_int(kvm_ioctls::Cap::Xsave2).max(0) as usize;
                for (fd, state) in fds.iter().zip(&snap.vcpus) {
                    state
                        .restore(fd, xsave_size)
                        .map_err(|e| Error::Invalid(format!("restore: {e}")))?;
                }
                let clock = kvm_bindings::kvm_clock_data {
                    clock: snap.clock.clock,
                    ..Default::default()
                };
                vm.set_clock(&clock)
                    .map_err(|e| Error::Kvm("KVM_SET_CLOCK", e))?;
            }
            (None, None) => unreachable!("a VM either boots or is restored"),
        }

        // SIGTERM is taken by the main loop (signalfd): blocked here, before any thread
        // starts, so every thread inherits the mask and none takes it.
        block_sigterm().map_err(Error::MainLoop)?;
        vcpu::install_kick_handler().map_err(Error::Thread)?;
        let seccomp = cfg.seccomp.unwrap_or_default();
        let mut vcpus = Vec::with_capacity(cpus as usize);
        for (id, fd) in fds.into_iter().enumerate() {
            // Runs at once (no parked start: a handoff less on the way to the guest);
            // what it reports waits in the mailbox until the main loop runs.
            let shared = Arc::new(vcpu::Shared::new(id as u32, main.clone()));
            if opts.start_paused {
                // Parks before its first KVM_RUN.
                shared.request_pause();
            }
            let ctx = vcpu::Context {
                pio: pio.clone(),
                mmio: mmio.clone(),
                ioapic: ioapic.clone(),
                device_events: device_events.clone(),
                main: main.clone(),
            };
            let s = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run(s, fd, ctx, seccomp))
                .map_err(Error::Thread)?;
            vcpus.push(VcpuHandle {
                shared,
                _thread: thread,
            });
        }
        virtio::spawn_intx_relay(&attached, seccomp)?;
        crate::devices::serial::spawn_stdin_feeder(serial.clone(), seccomp)
            .map_err(Error::Thread)?;

        let status = Arc::new(Status {
            identity: opts.identity,
            vcpus: cpus,
            memory_mib: cfg.memory_mib(),
            started: Instant::now(),
            lifecycle: Mutex::new(Lifecycle {
                state: State::Created,
                reason: Reason::Creating,
                jobs: Vec::new(),
            }),
            vcpu: vcpus.iter().map(|v| v.shared.clone()).collect(),
            devices: std::mem::take(&mut attached.counters),
        });
        let api = match api_fd {
            Some(listener) => {
                let replies = Arc::new(Mailbox::new().map_err(Error::MainLoop)?);
                api::spawn(
                    listener,
                    status.clone(),
                    main.clone(),
                    replies.clone(),
                    seccomp,
                )
                .map_err(Error::Thread)?;
                Some(replies)
            }
            None => None,
        };
        let connections = std::mem::take(&mut attached.connections);
        let functions = attached.functions.clone();
        Ok(Vm {
            status,
            vcpus,
            main,
            serial,
            ged,
            api,
            connections,
            functions,
            supervisor,
            reset_exit_code: opts.reset_exit_code,
            seccomp,
            vm_fd: vm,
            ram,
            ioapic,
            msr_list,
            tsc_khz: first_tsc_khz,
            start_paused: opts.start_paused,
            restored: restore.is_some(),
            last_snapshot: Mutex::new(None),
            _keep: Box::new((kvm, attached, router, events)),
        })
    }

    /// Device `i`'s backend connection hung up: a supervisor will send a new backend,
    /// or the device needs a reset.
    fn hung_up(&mut self, epoll: &vmm_sys_util::epoll::Epoll, i: usize, supervised: bool) {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent};
        let Some(c) = self.connections.get(i) else {
            return;
        };
        let _ = epoll.ctl(
            ControlOperation::Delete,
            c.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(d) = self.status.devices.get(i) else {
            return;
        };
        d.hung_up(supervised);
        if supervised {
            log::warn!(
                "device {}: backend connection hung up; waiting for a new backend",
                d.id
            );
        } else {
            log::warn!("device {}: backend connection hung up", d.id);
            if let Some(f) = self.functions.get(i) {
                f.lock().unwrap_or_else(|p| p.into_inner()).needs_reset();
            }
        }
    }

    /// Serves what the supervisor sent; returns whether it is still there.
    fn take_from_supervisor(&mut self, epoll: &vmm_sys_util::epoll::Epoll) -> bool {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let Some(channel) = &self.supervisor else {
            return false;
        };
        loop {
            let msg = match supervisor::receive(channel) {
                Ok(Some(m)) => m,
                Ok(None) => return true,
                Err(e) => {
                    log::warn!("{e}; dead backends are not replaced from here on");
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        channel.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.supervisor = None;
                    // A device already waiting for a new backend gets none.
                    for (d, f) in self.status.devices.iter().zip(&self.functions) {
                        if d.state() == "restarting" {
                            d.failed();
                            f.lock().unwrap_or_else(|p| p.into_inner()).needs_reset();
                        }
                    }
                    return false;
                }
            };
            let (i, replacement) = match msg {
                supervisor::Message::Replaced {
                    device,
                    pid,
                    stream,
                } => (device, Some((pid, stream))),
                supervisor::Message::GivenUp { device } => (device, None),
            };
            let (Some(d), Some(f)) = (self.status.devices.get(i), self.functions.get(i)) else {
                log::warn!("supervisor channel: no device {i}");
                continue;
            };
            let mut function = f.lock().unwrap_or_else(|p| p.into_inner());
            let Some((pid, stream)) = replacement else {
                log::warn!(
                    "device {}: its backend was given up; the device needs a reset",
                    d.id
                );
                d.failed();
                function.needs_reset();
                continue;
            };
            // The old connection goes (if its hang-up is still to come, with it); the new
            // one is watched in its place.
            let watch = match stream.try_clone() {
                Ok(w) => w,
                Err(e) => {
                    log::warn!("device {}: new backend: dup: {e}", d.id);
                    d.failed();
                    function.needs_reset();
                    continue;
                }
            };
            if let Some(old) = self.connections.get(i) {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    old.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            let t0 = Instant::now();
            match function.reconnect(stream) {
                Ok(()) => {
                    d.replaced(pid);
                    log::warn!(
                        "device {}: backend pid {pid} took over in {} us",
                        d.id,
                        t0.elapsed().as_micros()
                    );
                    let _ = epoll.ctl(
                        ControlOperation::Add,
                        watch.as_raw_fd(),
                        EpollEvent::new(EventSet::READ_HANG_UP, i as u64),
                    );
                }
                // A backend that died during the handshake is one more death: the
                // supervisor sends the next backend, or says it gave up.
                Err(e) if hung_up(&watch) => {
                    log::warn!(
                        "device {}: new backend pid {pid} went away during the handshake ({e}); waiting for a new backend",
                        d.id
                    );
                    d.hung_up(true);
                }
                Err(e) => {
                    log::warn!(
                        "device {}: new backend pid {pid}: {e}; the device needs a reset",
                        d.id
                    );
                    d.failed();
                    function.needs_reset();
                }
            }
            if let Some(slot) = self.connections.get_mut(i) {
                *slot = watch;
            }
        }
    }

    /// One press of the ACPI power button (the GED's event and its interrupt).
    pub fn press_power_button(&self) {
        self.ged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .power_button();
    }

    fn reply(&self, conn: u64, response: Response, then_exit: bool) {
        if let Some(replies) = &self.api {
            replies.post(ApiReply {
                conn,
                response,
                then_exit,
            });
        }
    }

    /// Starts the vCPUs and serves events until the VM ends; returns the exit status.
    pub fn run(mut self) -> Result<i32, Error> {
        let signals = sigterm_fd().map_err(Error::MainLoop)?;
        let epoll = vmm_sys_util::epoll::Epoll::new().map_err(Error::MainLoop)?;
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        const MAILBOX: u64 = u64::MAX;
        const SIGNALS: u64 = u64::MAX - 1;
        const SUPERVISOR: u64 = u64::MAX - 2;
        let add = |fd: RawFd, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(Error::MainLoop)
        };
        add(self.main.fd(), EventSet::IN, MAILBOX)?;
        add(signals.as_raw_fd(), EventSet::IN, SIGNALS)?;
        if let Some(s) = &self.supervisor {
            add(s.as_raw_fd(), EventSet::IN, SUPERVISOR)?;
        }
        for (i, c) in self.connections.iter().enumerate() {
            add(c.as_raw_fd(), EventSet::READ_HANG_UP, i as u64)?;
        }
        // The main thread's own, narrower profile: from here it only serves the loop.
        crate::seccomp::install("vmm", "main", self.seccomp).map_err(Error::Seccomp)?;

        let n = self.vcpus.len();
        let mut parked = vec![false; n];
        let mut stopped = vec![false; n];
        match (self.start_paused, self.restored) {
            (true, _) => self.status.set(State::Paused, Reason::User),
            (false, true) => self.status.set(State::Running, Reason::Restored),
            (false, false) => self.status.set(State::Running, Reason::Booted),
        }
        let mut transition: Option<Transition> = None;
        // The shutdown job waiting, its waiters and its deadline.
        let mut shutdown: Option<(u64, Vec<u64>, Instant)> = None;
        let mut next_job = 1u64;
        // Once ended: the exit status, and the replies still to be flushed.
        let mut ending: Option<(i32, Vec<u64>, Instant)> = None;
        let mut events = vec![EpollEvent::default(); 16];
        let mut supervised = self.supervisor.is_some();
        let code = loop {
            if let Some((code, unflushed, deadline)) = &ending {
                if unflushed.is_empty() || Instant::now() >= *deadline {
                    break *code;
                }
            }
            let deadline = ending
                .as_ref()
                .map(|e| e.2)
                .or(shutdown.as_ref().map(|s| s.2));
            let timeout = deadline.map_or(-1, |d| {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(i32::MAX as u128) as i32
                    + 1
            });
            let ready = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => 0,
                Err(e) => return Err(Error::MainLoop(e)),
            };
            let mut msgs = VecDeque::new();
            for ev in &events[..ready] {
                match ev.data() {
                    MAILBOX => msgs.extend(self.main.drain()),
                    SIGNALS => {
                        if read_signal(&signals) == Some(libc::SIGTERM as u32) && ending.is_none() {
                            log::info!("SIGTERM: pressing the power button");
                            self.press_power_button();
                            let mut l = self.status.lifecycle();
                            if l.state == State::Running {
                                l.reason = Reason::PowerButton;
                            }
                        }
                    }
                    SUPERVISOR => {}
                    i => self.hung_up(&epoll, i as usize, supervised),
                }
            }
            // New backends after the hang-ups of the same wait: a replacement is never
            // taken for the hang-up of the connection it replaced.
            if events[..ready].iter().any(|e| e.data() == SUPERVISOR) {
                supervised = self.take_from_supervisor(&epoll);
            }
            while let Some(msg) = msgs.pop_front() {
                let ended = match msg {
                    MainMsg::Vcpu(vcpu::Note::Parked(id)) => {
                        parked[id as usize] = true;
                        None
                    }
                    MainMsg::Vcpu(vcpu::Note::Running(id)) => {
                        parked[id as usize] = false;
                        None
                    }
                    MainMsg::Vcpu(vcpu::Note::Stopped(id, event)) => {
                        stopped[id as usize] = true;
                        Some(event)
                    }
                    MainMsg::Device(event) => Some(event),
                    MainMsg::Flushed(conn) => {
                        if let Some((_, unflushed, _)) = &mut ending {
                            unflushed.retain(|c| *c != conn);
                        }
                        None
                    }
                    MainMsg::Api(call) => {
                        if ending.is_some() {
                            let state = self.status.lifecycle().state;
                            self.reply(call.conn, conflict(state, &call.op), false);
                        } else if let Some(code) =
                            self.serve(call, &mut transition, &mut shutdown, &mut next_job)
                        {
                            // A reboot: ends once its 204 is out.
                            ending = Some((code.0, vec![code.1], flush_deadline()));
                        }
                        None
                    }
                };
                if let (Some(event), None) = (ended, &ending) {
                    let (code, reason) = match &event {
                        VmEvent::Poweroff => (0, Reason::Poweroff),
                        VmEvent::Reset => (self.reset_exit_code as i32, Reason::Reset),
                        VmEvent::Error(line) => {
                            eprintln!("cellvm: {line}");
                            (1, Reason::Error)
                        }
                    };
                    self.status.set(State::Ended, reason);
                    let mut unflushed = Vec::new();
                    if let Some((job, waiters, _)) = shutdown.take() {
                        let result = if event == VmEvent::Poweroff {
                            "powered-off"
                        } else {
                            "ended"
                        };
                        self.finish_job(job, result);
                        for conn in waiters {
                            self.reply(conn, shutdown_result(result), true);
                            unflushed.push(conn);
                        }
                    }
                    if let Some(t) = transition.take() {
                        for conn in t.waiting {
                            self.reply(conn, Response::error(409, "state: the vm ended"), false);
                        }
                    }
                    ending = Some((code, unflushed, flush_deadline()));
                }
            }
            // A pause is done when every vCPU is parked; a resume when every vCPU that
            // can run is running.
            if let Some(t) = &transition {
                let done = match t.to {
                    State::Paused => parked.iter().all(|p| *p),
                    _ => parked.iter().zip(&stopped).all(|(p, s)| !p || *s),
                };
                if done && ending.is_none() {
                    let t = transition.take().expect("checked");
                    self.status.set(t.to, Reason::User);
                    for conn in t.waiting {
                        self.reply(conn, Response::no_content(), false);
                    }
                }
            }
            if let Some((job, _, deadline)) = &shutdown {
                if Instant::now() >= *deadline && ending.is_none() {
                    let job = *job;
                    let (_, waiters, _) = shutdown.take().expect("checked");
                    self.finish_job(job, "timed-out");
                    self.status.set(State::Running, Reason::PowerButton);
                    for conn in waiters {
                        self.reply(conn, shutdown_result("timed-out"), false);
                    }
                }
            }
        };
        self.finish();
        // Guest RAM and the VM fd go with the process: the caller exits right away, and
        // vCPUs still inside KVM_RUN are not waited for (no teardown costs start-up).
        std::mem::forget(self);
        Ok(code)
    }

    /// Serves one API operation; Some((exit status, connection)) when it ends the VM.
    fn serve(
        &self,
        call: ApiCall,
        transition: &mut Option<Transition>,
        shutdown: &mut Option<(u64, Vec<u64>, Instant)>,
        next_job: &mut u64,
    ) -> Option<(i32, u64)> {
        let conn = call.conn;
        let state = self.status.lifecycle().state;
        let pending = transition.as_ref().map(|t| t.to);
        match (&call.op, state) {
            (Op::Pause, State::Paused) | (Op::Resume, State::Running) if pending.is_none() => {
                self.reply(conn, Response::no_content(), false)
            }
            (Op::Pause, State::Running) | (Op::Resume, State::Paused) => {
                let to = if call.op == Op::Pause {
                    State::Paused
                } else {
                    State::Running
                };
                match transition {
                    Some(t) if t.to == to => t.waiting.push(conn),
                    Some(_) => self.reply(
                        conn,
                        Response::error(409, "state: a pause or resume is under way"),
                        false,
                    ),
                    None => {
                        for v in &self.vcpus {
                            if to == State::Paused {
                                v.shared.request_pause();
                            } else {
                                v.shared.request_resume();
                            }
                        }
                        *transition = Some(Transition {
                            to,
                            waiting: vec![conn],
                        });
                    }
                }
            }
            (Op::PowerButton, State::Running | State::ShuttingDown) if pending.is_none() => {
                self.press_power_button();
                if state == State::Running {
                    self.status.lifecycle().reason = Reason::PowerButton;
                }
                self.reply(conn, Response::no_content(), false)
            }
            (Op::Shutdown { timeout_ms }, State::Running) if pending.is_none() => {
                self.press_power_button();
                let id = *next_job;
                *next_job += 1;
                {
                    let mut l = self.status.lifecycle();
                    l.state = State::ShuttingDown;
                    l.reason = Reason::PowerButton;
                    l.jobs.insert(
                        0,
                        Job {
                            id,
                            kind: "shutdown",
                            state: "running",
                            started: Instant::now(),
                            finished: None,
                            timeout_ms: *timeout_ms,
                        },
                    );
                    l.jobs.truncate(MAX_JOBS_KEPT);
                }
                *shutdown = Some((
                    id,
                    vec![conn],
                    Instant::now() + Duration::from_millis(*timeout_ms),
                ));
            }
            (Op::Shutdown { .. }, State::ShuttingDown) => match shutdown {
                Some((_, waiters, _)) => waiters.push(conn),
                None => self.reply(conn, conflict(state, &call.op), false),
            },
            (Op::Cancel { job }, _) => match shutdown {
                Some((id, _, _)) if *id == *job => {
                    // The guest may still power off later; the wait for it ends here.
                    let (id, waiters, _) = shutdown.take().expect("matched");
                    self.finish_job(id, "cancelled");
                    self.status.set(State::Running, Reason::PowerButton);
                    for waiter in waiters {
                        self.reply(waiter, shutdown_result("cancelled"), false);
                    }
                    self.reply(conn, Response::no_content(), false);
                }
                _ => self.reply(
                    conn,
                    Response::error(404, &format!("id: no running job {job}")),
                    false,
                ),
            },
            (Op::Snapshot { incremental }, State::Paused) if pending.is_none() => {
                let response = self.snapshot_job(call.fds, *incremental, next_job);
                self.reply(conn, response, false)
            }
            (Op::Snapshot { .. }, _) => self.reply(
                conn,
                Response::error(
                    409,
                    &format!(
                        "state: vm.snapshot needs a paused VM, and this one is {}{}: pause it first",
                        state.name(),
                        if pending.is_some() { " (a pause or resume is under way)" } else { "" }
                    ),
                ),
                false,
            ),
            (Op::Reboot, State::Running | State::Paused) if pending.is_none() => {
                self.status.set(State::Ended, Reason::Reset);
                self.reply(conn, Response::no_content(), true);
                return Some((self.reset_exit_code as i32, conn));
            }
            _ => self.reply(conn, conflict(state, &call.op), false),
        }
        None
    }

    /// Takes a snapshot of the paused VM as a job of its own, and answers how it went.
    fn snapshot_job(&self, fds: Vec<OwnedFd>, incremental: bool, next_job: &mut u64) -> Response {
        let id = *next_job;
        *next_job += 1;
        {
            let mut l = self.status.lifecycle();
            l.jobs.insert(
                0,
                Job {
                    id,
                    kind: "snapshot",
                    state: "running",
                    started: Instant::now(),
                    finished: None,
                    timeout_ms: 0,
                },
            );
            l.jobs.truncate(MAX_JOBS_KEPT);
        }
        match self.snapshot(fds, incremental) {
            Ok(saved) => {
                self.finish_job(id, "done");
                Response::json(
                    200,
                    serde_json::json!({
                        "job": id,
                        "ram_bytes_written": saved.ram_bytes_written,
                        "chunks": saved.chunks,
                        "state_bytes": saved.state_bytes,
                        "incremental": saved.incremental,
                        "dirty_chunks": saved.dirty_chunks,
                        "ms": (saved.pause_to_saved_ms * 1000.0).round() / 1000.0,
                    })
                    .to_string(),
                )
            }
            Err(e) => {
                self.finish_job(id, "failed");
                log::warn!("snapshot: {e}");
                Response::error(400, &format!("snapshot: {e}"))
            }
        }
    }

    fn finish_job(&self, id: u64, result: &'static str) {
        if let Some(j) = self.status.lifecycle().jobs.iter_mut().find(|j| j.id == id) {
            j.state = result;
            j.finished = Some(Instant::now());
        }
    }

    /// Flushes the console before the process exits.
    fn finish(&self) {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush();
    }
}

/// Finished jobs `vm.jobs` still lists.
const MAX_JOBS_KEPT: usize = 16;

/// How long an ending VMM waits for its last replies to reach their clients.
/// Whether the peer of the failed connection `s` is gone: what it left unread is
/// drained (at most 64 KiB) until end-of-file or a reset says so, or nothing more to
/// read says it still lives (recvmsg, which the main thread's seccomp filter allows).
fn hung_up(s: &std::os::unix::net::UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: a zeroed msghdr with one iovec over a live buffer; no control buffer.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT)
        };
        match n {
            0 => return true,
            n if n < 0 => {
                return std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN)
            }
            _ => continue,
        }
    }
    false
}

fn flush_deadline() -> Instant {
    Instant::now() + Duration::from_secs(1)
}

fn shutdown_result(result: &str) -> Response {
    Response::json(200, format!("{{\"result\":\"{result}\"}}"))
}

/// The 409 for an operation the state does not allow, saying why.
fn conflict(state: State, op: &Op) -> Response {
    let why = match state {
        State::ShuttingDown => "a shutdown job is running",
        State::Paused => "the guest is paused and cannot see the power button: resume it first",
        State::Ended => "the vm has ended",
        State::Created => "the vm is not running yet",
        State::Running => "a pause or resume is under way",
    };
    Response::error(
        409,
        &format!(
            "state: {} is not allowed while {}: {why}",
            op.name(),
            state.name()
        ),
    )
}

fn block_sigterm() -> std::io::Result<()> {
    // SAFETY: a sigset on the stack, filled by sigemptyset/sigaddset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

fn sigterm_fd() -> std::io::Result<OwnedFd> {
    // SAFETY: as in block_sigterm; signalfd returns a new descriptor we own, or -1.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn read_signal(fd: &OwnedFd) -> Option<u32> {
    // SAFETY: a zeroed signalfd_siginfo is valid; read fills at most its size.
    unsafe {
        let mut info: libc::signalfd_siginfo = std::mem::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = libc::read(fd.as_raw_fd(), &mut info as *mut _ as *mut _, size);
        (n as usize == size).then_some(info.ssi_signo)
    }
}

/// Loads what a booting VM starts from into RAM: the kernel (or the built-in test
/// guest), the command line, the initrd, the ACPI tables and the boot information.
fn load_boot_image(
    cfg: &VmConfig,
    mem: &vm_memory::GuestMemoryMmap,
    kernel_file: Option<&mut File>,
    kernel_path: &str,
    initrd_file: Option<&mut (String, File)>,
    mem_size: u64,
) -> Result<boot::LoadedKernel, Error> {
    let kernel = match kernel_file {
        Some(f) => boot::load_kernel(
            mem,
            kernel_path,
            f,
            mem_size,
            cfg.boot_protocol.unwrap_or_default(),
        )?,
        None => {
            let mut image = std::io::Cursor::new(crate::testguest::IMAGE);
            boot::load_kernel(
                mem,
                kernel_path,
                &mut image,
                mem_size,
                boot::BootProtocol::Pvh,
            )?
        }
    };
    let cmdline = cfg.effective_cmdline();
    let cmdline_len = boot::load_cmdline(mem, &kernel, &cmdline)?;
    let initrd = match initrd_file {
        Some((path, f)) => Some(boot::load_initrd(mem, &kernel, path, f, mem_size)?),
        None => None,
    };
    let rsdp = acpi::create_tables(mem, cfg.cpus())?;
    boot::write_boot_info(mem, &kernel, cmdline_len, initrd, rsdp, mem_size)?;
    Ok(kernel)
}

/// Builds and runs the VM; returns the exit status once it ends.
pub fn run(cfg: VmConfig, opts: RunOptions) -> Result<i32, Error> {
    Vm::create(cfg, opts)?.run()
}

#[cfg(test)]
mod tests {
    use super::hung_up;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_connection_is_hung_up_once_its_peer_is_gone_even_with_bytes_left_unread() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        assert!(!hung_up(&ours), "the peer lives and sent nothing");
        theirs.write_all(&[7u8; 10_000]).unwrap();
        assert!(!hung_up(&ours), "the peer lives; what it sent is drained");
        theirs.write_all(&[7u8; 10_000]).unwrap();
        drop(theirs);
        assert!(hung_up(&ours), "the peer died after a partial reply");
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(hung_up(&ours));
    }
}
