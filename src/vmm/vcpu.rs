//! A vCPU thread: KVM_RUN, route port and MMIO exits to the buses, and turn every way a
//! vCPU can stop into a VmEvent with one clear line.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::devices::bus::Bus;
use crate::devices::ioapic::IoApic;
use crate::devices::{EventSender, VmEvent};

/// KVM_INTERNAL_ERROR_EMULATION and the flag that says instruction bytes follow.
const SUBERROR_EMULATION: u32 = 1;
const EMULATION_FLAG_INSN_BYTES: u64 = 1;
/// KVM_SYSTEM_EVENT_{SHUTDOWN,RESET,CRASH}.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

pub struct Context {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub ioapic: Arc<Mutex<IoApic<Arc<VmFd>>>>,
    pub events: EventSender,
}

/// What ended a vCPU's run loop.
enum Stop {
    Event(VmEvent),
    TripleFault,
    InternalError,
    FailEntry(u64),
    Unhandled(String),
    RunFailed(kvm_ioctls::Error),
}

pub fn run(id: u32, mut vcpu: VcpuFd, ctx: Context, seccomp: crate::seccomp::Mode) {
    // The filter goes on before the first KVM_RUN: nothing the guest does reaches this
    // thread unfiltered.
    if let Err(e) = crate::seccomp::install("vmm", "vcpu", seccomp) {
        let _ = ctx.events.send(VmEvent::Error(format!("vcpu {id}: {e}")));
        return;
    }
    let stop = loop {
        match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    ctx.pio.read(port as u64, data);
                }
                VcpuExit::IoOut(port, data) => {
                    ctx.pio.write(port as u64, data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    ctx.mmio.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ctx.mmio.write(addr, data);
                }
                VcpuExit::IoapicEoi(vector) => ctx
                    .ioapic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .end_of_interrupt(vector),
                // With the LAPIC in the kernel a halted vCPU waits there; an exit only
                // means a signal arrived.
                VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                VcpuExit::Shutdown => break Stop::TripleFault,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    SYSTEM_EVENT_SHUTDOWN => break Stop::Event(VmEvent::Poweroff),
                    SYSTEM_EVENT_RESET => break Stop::Event(VmEvent::Reset),
                    other => break Stop::Unhandled(format!("KVM_EXIT_SYSTEM_EVENT type {other}")),
                },
                VcpuExit::InternalError => break Stop::InternalError,
                VcpuExit::FailEntry(reason, _) => break Stop::FailEntry(reason),
                other => break Stop::Unhandled(format!("{other:?}")),
            },
            // EAGAIN: an AP's first run before INIT/SIPI (seen on nested KVM); EINTR: a
            // signal. Both mean "run again".
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => {}
            Err(e) => break Stop::RunFailed(e),
        }
    };
    let event = match stop {
        Stop::Event(e) => e,
        other => VmEvent::Error(describe(id, &mut vcpu, other)),
    };
    let _ = ctx.events.send(event);
}

fn describe(id: u32, vcpu: &mut VcpuFd, stop: Stop) -> String {
    let rip = vcpu
        .get_regs()
        .map(|r| format!("{:#x}", r.rip))
        .unwrap_or_else(|_| "unknown".into());
    if log::log_enabled!(log::Level::Debug) {
        log::debug!("vcpu {id}: regs {:x?}", vcpu.get_regs());
        log::debug!("vcpu {id}: sregs {:x?}", vcpu.get_sregs());
    }
    let what = match stop {
        Stop::Event(_) => unreachable!("events are not errors"),
        Stop::TripleFault => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
        Stop::FailEntry(reason) => {
            format!("VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x})")
        }
        Stop::Unhandled(exit) => format!("unhandled exit {exit}"),
        Stop::RunFailed(e) => format!("KVM_RUN failed: {e}"),
        Stop::InternalError => internal_error(vcpu),
    };
    format!("vcpu {id}: guest stopped: {what} at RIP {rip}")
}

fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
    // member of the union; ndata is clamped to the array.
    let (suberror, data) = unsafe {
        let internal = &run.__bindgen_anon_1.internal;
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    };
    if suberror != SUBERROR_EMULATION {
        return format!(
            "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}, data {data:x?})"
        );
    }
    // data[0]: flags; then insn_size (u8) and up to 15 instruction bytes.
    let mut text = "KVM emulation failure (KVM_EXIT_INTERNAL_ERROR, suberror 1)".to_string();
    if data.len() >= 3 && data[0] & EMULATION_FLAG_INSN_BYTES != 0 {
        let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
        let size = (raw[0] as usize).min(15);
        let bytes: Vec<String> = raw[1..1 + size]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        text.push_str(&format!(", instruction bytes [{}]", bytes.join(" ")));
    }
    text
}
