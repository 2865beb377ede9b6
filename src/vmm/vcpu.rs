//! A vCPU thread: KVM_RUN, route port and MMIO exits to the buses, count exits by reason,
//! park when the main loop asks (the kick: immediate_exit plus a signal), and turn every
//! way a vCPU can stop into a VmEvent with one clear line.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use super::mailbox::Mailbox;
use super::MainMsg;
use crate::devices::bus::Bus;
use crate::devices::ioapic::IoApic;
use crate::devices::VmEvent;

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
    /// Where the platform devices (i8042, ACPI sleep) put their events: drained into
    /// the main loop's mailbox after every write exit, the only exits that raise them.
    pub device_events: Arc<Mutex<Receiver<VmEvent>>>,
    pub main: Arc<Mailbox<MainMsg>>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN. Its handler does nothing and is
/// installed without SA_RESTART, so KVM_RUN returns EINTR; `immediate_exit`, set
/// before the signal is sent, covers a kick that lands just before KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the kick signal's handler (process-wide; once, before any vCPU runs).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler does nothing, so it is
    // async-signal-safe; sa_flags 0: no SA_RESTART, the point of the kick.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Exits by reason, counted in the vCPU loop (relaxed atomics: each a plain add).
#[derive(Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub ioapic_eoi: AtomicU64,
    pub hlt: AtomicU64,
    /// KVM_RUN returned EINTR: a kick (pause) or another signal.
    pub interrupted: AtomicU64,
    pub system_event: AtomicU64,
    pub other: AtomicU64,
}

impl ExitCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("io_in", r(&self.io_in)),
            ("io_out", r(&self.io_out)),
            ("mmio_read", r(&self.mmio_read)),
            ("mmio_write", r(&self.mmio_write)),
            ("ioapic_eoi", r(&self.ioapic_eoi)),
            ("hlt", r(&self.hlt)),
            ("interrupted", r(&self.interrupted)),
            ("system_event", r(&self.system_event)),
            ("other", r(&self.other)),
        ]
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Work for a parked vCPU thread, which owns the vCPU's descriptor: reading its
/// registers at the paused point (a snapshot), or anything else only that thread may do.
pub type Task = Box<dyn FnOnce(&mut VcpuFd) + Send>;

#[derive(Default)]
struct Control {
    /// The thread is out of KVM_RUN and waits on the condvar.
    parked: bool,
    /// The run loop ended; the thread only serves tasks.
    stopped: bool,
    task: Option<Task>,
}

/// What the main loop hears from a vCPU thread.
#[derive(Debug)]
pub enum Note {
    /// Out of KVM_RUN, waiting (a pause acknowledged, or a stopped vCPU).
    Parked(u32),
    /// Back on its way into KVM_RUN.
    Running(u32),
    /// The run loop ended: why.
    Stopped(u32, VmEvent),
}

/// The part of a vCPU that other threads see: its counters and the pause handshake.
pub struct Shared {
    pub id: u32,
    pub exits: ExitCounters,
    pause: AtomicBool,
    /// kvm_run.immediate_exit of this vCPU (its mmap lives as long as the process: the
    /// thread never drops its VcpuFd).
    immediate_exit: AtomicPtr<u8>,
    /// The thread's pthread, for the kick (0 until it runs).
    thread: AtomicU64,
    control: Mutex<Control>,
    cv: Condvar,
    main: Arc<Mailbox<MainMsg>>,
}

impl Shared {
    pub fn new(id: u32, main: Arc<Mailbox<MainMsg>>) -> Self {
        Shared {
            id,
            exits: ExitCounters::default(),
            pause: AtomicBool::new(false),
            immediate_exit: AtomicPtr::new(std::ptr::null_mut()),
            thread: AtomicU64::new(0),
            control: Mutex::new(Control::default()),
            cv: Condvar::new(),
            main,
        }
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the vCPU to leave KVM_RUN and park; it answers with `Note::Parked`.
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        let flag = self.immediate_exit.load(Ordering::SeqCst);
        if !flag.is_null() {
            // SAFETY: the pointer is this vCPU's kvm_run.immediate_exit, mapped for the
            // life of the process; a byte store, which KVM reads at its next entry.
            unsafe { (*(flag as *const AtomicU8)).store(1, Ordering::SeqCst) };
        }
        let thread = self.thread.load(Ordering::SeqCst);
        if thread != 0 {
            // SAFETY: the id of a thread that never exits before the process does
            // (stopped vCPU threads park for good); the signal's handler is a no-op.
            unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) };
        }
    }

    /// Lets a parked vCPU go back into KVM_RUN; it answers with `Note::Running`.
    pub fn request_resume(&self) {
        let _c = self.control();
        self.pause.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Runs `f` on the vCPU's own thread while it is parked (paused or stopped) and
    /// returns its result; None if the vCPU is not parked.
    pub fn with_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let mut c = self.control();
            if !c.parked || c.task.is_some() {
                return None;
            }
            c.task = Some(Box::new(move |fd: &mut VcpuFd| {
                let _ = tx.send(f(fd));
            }));
            self.cv.notify_all();
        }
        rx.recv().ok()
    }

    /// Parks the calling vCPU thread: until resumed, or for good once `stopped`.
    fn park(&self, vcpu: &mut VcpuFd, stopped: bool) {
        let mut c = self.control();
        c.parked = true;
        c.stopped |= stopped;
        self.main.post(MainMsg::Vcpu(Note::Parked(self.id)));
        loop {
            if let Some(task) = c.task.take() {
                task(vcpu);
                continue;
            }
            if !c.stopped && !self.pause.load(Ordering::SeqCst) {
                break;
            }
            c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.parked = false;
        drop(c);
        self.main.post(MainMsg::Vcpu(Note::Running(self.id)));
    }
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

fn drain_device_events(ctx: &Context) {
    let rx = ctx.device_events.lock().unwrap_or_else(|p| p.into_inner());
    while let Ok(event) = rx.try_recv() {
        ctx.main.post(MainMsg::Device(event));
    }
}

pub fn run(shared: Arc<Shared>, mut vcpu: VcpuFd, ctx: Context, seccomp: crate::seccomp::Mode) {
    let id = shared.id;
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    shared
        .immediate_exit
        .store(&mut vcpu.get_kvm_run().immediate_exit, Ordering::SeqCst);
    shared.thread.store(me as u64, Ordering::SeqCst);
    // The filter goes on before the first KVM_RUN: nothing the guest does reaches this
    // thread unfiltered.
    if let Err(e) = crate::seccomp::install("vmm", "vcpu", seccomp) {
        let event = VmEvent::Error(format!("vcpu {id}: {e}"));
        ctx.main.post(MainMsg::Vcpu(Note::Stopped(id, event)));
        shared.park(&mut vcpu, true);
        return;
    }
    let exits = &shared.exits;
    let stop = loop {
        if shared.pause.load(Ordering::SeqCst) {
            shared.park(&mut vcpu, false);
            continue;
        }
        match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    bump(&exits.io_in);
                    ctx.pio.read(port as u64, data);
                }
                VcpuExit::IoOut(port, data) => {
                    bump(&exits.io_out);
                    ctx.pio.write(port as u64, data);
                    drain_device_events(&ctx);
                }
                VcpuExit::MmioRead(addr, data) => {
                    bump(&exits.mmio_read);
                    ctx.mmio.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    bump(&exits.mmio_write);
                    ctx.mmio.write(addr, data);
                    drain_device_events(&ctx);
                }
                VcpuExit::IoapicEoi(vector) => {
                    bump(&exits.ioapic_eoi);
                    ctx.ioapic
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .end_of_interrupt(vector)
                }
                // With the LAPIC in the kernel a halted vCPU waits there; an exit only
                // means a signal arrived.
                VcpuExit::Hlt => bump(&exits.hlt),
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => bump(&exits.interrupted),
                VcpuExit::Shutdown => break Stop::TripleFault,
                VcpuExit::SystemEvent(kind, _) => {
                    bump(&exits.system_event);
                    match kind {
                        SYSTEM_EVENT_SHUTDOWN => break Stop::Event(VmEvent::Poweroff),
                        SYSTEM_EVENT_RESET => break Stop::Event(VmEvent::Reset),
                        other => {
                            break Stop::Unhandled(format!("KVM_EXIT_SYSTEM_EVENT type {other}"))
                        }
                    }
                }
                VcpuExit::InternalError => break Stop::InternalError,
                VcpuExit::FailEntry(reason, _) => break Stop::FailEntry(reason),
                other => {
                    bump(&exits.other);
                    break Stop::Unhandled(format!("{other:?}"));
                }
            },
            // EINTR: a kick or another signal (immediate_exit is cleared here, before
            // the pause flag is looked at, so that a kick is never lost); EAGAIN: an
            // AP's first run before INIT/SIPI (seen on nested KVM). Both mean "run again".
            Err(e) if e.errno() == libc::EINTR => {
                bump(&exits.interrupted);
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => break Stop::RunFailed(e),
        }
    };
    let event = match stop {
        Stop::Event(e) => e,
        other => VmEvent::Error(describe(id, &mut vcpu, other)),
    };
    ctx.main.post(MainMsg::Vcpu(Note::Stopped(id, event)));
    // The thread stays, parked, with its descriptor: a stopped vCPU can still be read.
    shared.park(&mut vcpu, true);
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
