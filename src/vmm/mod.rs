//! The VMM: builds a VM from its configuration, runs its vCPUs, and turns how it ended
//! into an exit status.

pub mod config;
pub mod memory;
pub mod vcpu;
pub mod virtio;

use std::fs::File;
use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};

use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::Kvm;

use crate::arch::x86_64::{acpi, boot, cpu, layout};
use crate::devices::acpi_pm::AcpiSleep;
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::ioapic::{self, IoApic};
use crate::devices::pci::{self, PciConfigIo, PciEcam, PciRoot};
use crate::devices::serial::{IrqLine, Serial};
use crate::devices::VmEvent;
use crate::virtio::irq::MsiRouter;
use config::{SerialOut, VmConfig};

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
}

impl Error {
    /// 2 for anything the user's input caused, 1 for failures of the host or KVM.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid(_) | Error::Config(_) => 2,
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
        || cfg.rng.is_some();
    if cfg.ksm == Some(true) && devices {
        return Err(Error::Invalid(
            "ksm: mergeable guest RAM is private to the VMM, and vhost-user device backends \
             need RAM they can share: use KSM or devices, not both"
                .into(),
        ));
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

/// Builds and runs the VM; returns the exit status once it ends.
pub fn run(cfg: VmConfig) -> Result<i32, Error> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    validate(&cfg, &kvm)?;
    let cpus = cfg.cpus();
    let mem_size = cfg.memory_mib() << 20;

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

    let ram = if cfg.ksm == Some(true) {
        memory::create_mergeable(mem_size)?
    } else {
        memory::create(mem_size, cfg.allow_executable_ram == Some(true))?
    };
    memory::register(&vm, &ram.mem)?;

    let kernel = match kernel_file.as_mut() {
        Some(f) => boot::load_kernel(
            &ram.mem,
            &kernel_path,
            f,
            mem_size,
            cfg.boot_protocol.unwrap_or_default(),
        )?,
        None => {
            let mut image = std::io::Cursor::new(crate::testguest::IMAGE);
            boot::load_kernel(
                &ram.mem,
                &kernel_path,
                &mut image,
                mem_size,
                boot::BootProtocol::Pvh,
            )?
        }
    };
    let cmdline = cfg.effective_cmdline();
    let cmdline_len = boot::load_cmdline(&ram.mem, &kernel, &cmdline)?;
    let initrd = match initrd_file.as_mut() {
        Some((path, f)) => Some(boot::load_initrd(&ram.mem, &kernel, path, f, mem_size)?),
        None => None,
    };
    let rsdp = acpi::create_tables(&ram.mem, cpus)?;
    boot::write_boot_info(&ram.mem, &kernel, cmdline_len, initrd, rsdp, mem_size)?;

    let (events, ended) = mpsc::channel();
    let ioapic = Arc::new(Mutex::new(IoApic::new(cpus, vm.clone())));
    let irq_ioapic = ioapic.clone();
    let serial = Arc::new(Mutex::new(Serial::new(
        IrqLine::new(move || {
            irq_ioapic
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .assert_irq(layout::COM1_IRQ as usize)
        }),
        serial_writer(cfg.serial.as_ref().unwrap_or(&SerialOut::Stdio))?,
    )));
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
    let attached = {
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
    let mut vcpus = Vec::with_capacity(cpus as usize);
    for id in 0..cpus {
        let fd = vm
            .create_vcpu(id as u64)
            .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        log::debug!("vcpu {id}: TSC {tsc_khz:?} kHz");
        cpu::configure_vcpu(&fd, id, &cpu::vcpu_cpuid(&base_cpuid, id, cpus, tsc_khz))?;
        vcpus.push(fd);
    }
    // With APIC ids past 255, every LAPIC starts in x2APIC mode, as firmware leaves it
    // on such machines: guests only accept x2APIC MADT entries in that mode.
    if cpus > 255 {
        for (id, fd) in vcpus.iter().enumerate() {
            cpu::enable_x2apic(fd, id as u32)?;
        }
    }
    // Only the boot vCPU starts at the entry point; the others wait in the kernel's
    // LAPIC for INIT/SIPI, as on real hardware.
    cpu::setup_boot_vcpu(&vcpus[0], &ram.mem, kernel.protocol, kernel.entry)?;
    let seccomp = cfg.seccomp.unwrap_or_default();
    for (id, fd) in vcpus.into_iter().enumerate() {
        let ctx = vcpu::Context {
            pio: pio.clone(),
            mmio: mmio.clone(),
            ioapic: ioapic.clone(),
            events: events.clone(),
        };
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run(id as u32, fd, ctx, seccomp))
            .map_err(Error::Thread)?;
    }
    virtio::spawn_intx_relay(&attached, seccomp)?;
    crate::devices::serial::spawn_stdin_feeder(serial.clone(), seccomp).map_err(Error::Thread)?;
    // The main thread's own, narrower profile: from here it only waits and exits.
    crate::seccomp::install("vmm", "main", seccomp).map_err(Error::Seccomp)?;

    let event = ended.recv().unwrap_or(VmEvent::Error(
        "every vCPU thread ended without a reason".into(),
    ));
    serial.lock().unwrap_or_else(|p| p.into_inner()).flush();
    // Guest RAM and the VM fd go with the process: the caller exits right away, and
    // vCPUs still inside KVM_RUN are not waited for.
    std::mem::forget(ram);
    match event {
        VmEvent::Poweroff | VmEvent::Reset => Ok(0),
        VmEvent::Error(line) => {
            eprintln!("cellvm: {line}");
            Ok(1)
        }
    }
}
