//! What a VM is and what it is doing: its lifecycle state with the reason for it, the
//! jobs running on it, and the facts `vm.info` reports. Shared by the main loop (the only
//! writer of the state) and the API thread (which reads it to answer without a round
//! trip through the main loop).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A VM's lifecycle state.
///
/// | state \ operation | pause                | resume               | power-button         | shutdown                            | reboot               | guest powers off | guest resets / vCPU error |
/// |-------------------|----------------------|----------------------|----------------------|-------------------------------------|----------------------|------------------|---------------------------|
/// | created           | 409                  | 409                  | 409                  | 409                                 | 409                  | ended            | ended                     |
/// | running           | → paused, 204        | 204 (no change)      | press, 204           | press, → shutting-down, waits       | → ended (reset), 204 | ended            | ended                     |
/// | paused            | 204 (no change)      | → running, 204       | 409 (guest stopped)  | 409 (guest stopped)                 | → ended (reset), 204 | —                | —                         |
/// | shutting-down     | 409 (job)            | 409 (job)            | press, 204           | waits with the first                | 409 (job)            | ended, 200 powered-off to every waiter | ended     |
/// | ended             | 409                  | 409                  | 409                  | 200 powered-off if it powered off, else 409 | 409          | —                | —                         |
///
/// A shutdown whose timeout passes answers `200 {"result":"timed-out"}` to every waiter
/// and goes back to running (reason `power-button`). `created` lasts only while the VM
/// is built (the API is served from `running` on). Pause completes when every vCPU is out
/// of KVM_RUN and parked (a stopped vCPU counts as parked); resume when every vCPU that
/// can run is on its way back in. A parked vCPU thread keeps its descriptor and runs
/// closures on request (`vcpu::Shared::with_vcpu`): what a snapshot reads at the paused
/// point. Exit statuses: powered off 0, reset or reboot the reset exit code, error 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    ShuttingDown,
    Ended,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Paused => "paused",
            State::ShuttingDown => "shutting-down",
            State::Ended => "ended",
        }
    }
}

/// Why the VM is in its state, as `virsh domstate --reason` words it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Being built.
    Creating,
    Booted,
    /// Running from a snapshot.
    Restored,
    /// Paused or resumed through the API.
    User,
    PowerButton,
    Poweroff,
    Reset,
    Error,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Creating => "creating",
            Reason::Booted => "booted",
            Reason::Restored => "restored",
            Reason::User => "user",
            Reason::PowerButton => "power-button",
            Reason::Poweroff => "poweroff",
            Reason::Reset => "reset",
            Reason::Error => "error",
        }
    }
}

/// A long operation on the VM. Today the only kind is `shutdown`; snapshot and
/// migration will be the next.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: u64,
    pub kind: &'static str,
    /// running, powered-off, timed-out, ended, cancelled.
    pub state: &'static str,
    pub started: Instant,
    /// When it finished (None while it runs).
    pub finished: Option<Instant>,
    pub timeout_ms: u64,
}

/// Who the VM is, from `--identity`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub id: Option<String>,
    pub tenant: Option<String>,
    pub label: Option<String>,
    pub cgroup: Option<String>,
}

impl std::str::FromStr for Identity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Identity::default();
        // An MCS label has commas of its own (s0:c1,c2): a part without '=' right
        // after label= continues the label.
        let mut parts: Vec<String> = Vec::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            match parts.last_mut() {
                Some(last) if !part.contains('=') && last.starts_with("label=") => {
                    last.push(',');
                    last.push_str(part);
                }
                _ => parts.push(part.to_string()),
            }
        }
        for part in &parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("identity: {part:?} is not KEY=VALUE"))?;
            if value.is_empty() || value.len() > 4096 || value.chars().any(|c| c.is_control()) {
                return Err(format!(
                    "identity: {key}: 1 to 4096 bytes, no control characters"
                ));
            }
            let slot = match key {
                "id" => &mut out.id,
                "tenant" => &mut out.tenant,
                "label" => &mut out.label,
                "cgroup" => &mut out.cgroup,
                _ => {
                    return Err(format!(
                        "identity: unknown key {key:?} (expected id, tenant, label, cgroup)"
                    ))
                }
            };
            if slot.replace(value.to_string()).is_some() {
                return Err(format!("identity: {key} given twice"));
            }
        }
        Ok(out)
    }
}

/// What the VMM sees of one virtio device. With vhost-user the data path (queue kicks
/// through ioeventfds, completions through irqfds, the buffers themselves) never passes
/// through the VMM: these are the accesses it does see.
const CONNECTED: u8 = 0;
const RESTARTING: u8 = 1;
const FAILED: u8 = 2;

#[derive(Debug)]
pub struct DeviceCounters {
    pub id: String,
    pub kind: &'static str,
    /// The backend's process id (0: not known); a restarted backend's replaces it.
    pid: AtomicU32,
    /// Guest accesses to the function's BAR (common, ISR, device config, MSI-X table):
    /// each one a vCPU exit the VMM served.
    pub bar_reads: AtomicU64,
    pub bar_writes: AtomicU64,
    /// PCI configuration space accesses (CF8/CFC or ECAM).
    pub config_reads: AtomicU64,
    pub config_writes: AtomicU64,
    /// INTx level raises the VMM relayed to the IOAPIC (MSI-X interrupts go from the
    /// backend's call eventfd straight to KVM and are not seen).
    pub intx_raised: AtomicU64,
    /// CONNECTED, RESTARTING (the connection hung up; a supervisor is starting a new
    /// backend) or FAILED (none will come: the device needs a reset).
    state: AtomicU8,
    /// Backends that replaced a dead one.
    pub restarts: AtomicU64,
    /// What the backend counts of the data path itself (requests, errors, bytes), read
    /// from the page it shares with the VMM; None for a backend reached by a bare socket.
    pub backend: Option<crate::backend::counters::Reader>,
}

impl DeviceCounters {
    pub fn new(
        id: String,
        kind: &'static str,
        pid: Option<u32>,
        backend: Option<crate::backend::counters::Reader>,
    ) -> Self {
        DeviceCounters {
            id,
            kind,
            pid: AtomicU32::new(pid.unwrap_or(0)),
            bar_reads: AtomicU64::new(0),
            bar_writes: AtomicU64::new(0),
            config_reads: AtomicU64::new(0),
            config_writes: AtomicU64::new(0),
            intx_raised: AtomicU64::new(0),
            state: AtomicU8::new(CONNECTED),
            restarts: AtomicU64::new(0),
            backend,
        }
    }

    pub fn state(&self) -> &'static str {
        match self.state.load(Ordering::Relaxed) {
            CONNECTED => "connected",
            RESTARTING => "restarting",
            _ => "failed",
        }
    }

    pub fn connected(&self) -> bool {
        self.state.load(Ordering::Relaxed) == CONNECTED
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// The connection hung up: a new backend is coming (`restarting`) or none is.
    pub fn hung_up(&self, restarting: bool) {
        let to = if restarting { RESTARTING } else { FAILED };
        self.state.store(to, Ordering::Relaxed);
    }

    /// A new backend (process `pid`) took over.
    pub fn replaced(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.state.store(CONNECTED, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.state.store(FAILED, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("bar_reads", r(&self.bar_reads)),
            ("bar_writes", r(&self.bar_writes)),
            ("config_reads", r(&self.config_reads)),
            ("config_writes", r(&self.config_writes)),
            ("intx_raised", r(&self.intx_raised)),
            ("restarts", r(&self.restarts)),
        ]
    }
}

/// The mutable part, under one lock.
#[derive(Debug)]
pub struct Lifecycle {
    pub state: State,
    pub reason: Reason,
    /// Running jobs first, then the last few finished ones.
    pub jobs: Vec<Job>,
}

/// Everything `vm.info`, `vm.counters` and `/metrics` report.
pub struct Status {
    pub identity: Identity,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub started: Instant,
    pub lifecycle: Mutex<Lifecycle>,
    pub vcpu: Vec<Arc<super::vcpu::Shared>>,
    pub devices: Vec<Arc<DeviceCounters>>,
}

impl Status {
    pub fn lifecycle(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, state: State, reason: Reason) {
        let mut l = self.lifecycle();
        l.state = state;
        l.reason = reason;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_parses_every_key_and_refuses_the_rest() {
        let i: Identity = "id=vm1,tenant=t,label=system_u:system_r:cellvm_t:s0:c1,c2,cgroup=/a/b"
            .parse()
            .unwrap();
        assert_eq!(i.id.as_deref(), Some("vm1"));
        assert_eq!(
            i.label.as_deref(),
            Some("system_u:system_r:cellvm_t:s0:c1,c2")
        );
        assert_eq!(i.cgroup.as_deref(), Some("/a/b"));
        for bad in ["id", "id=", "colour=red", "id=a,id=b", "id=a\nb"] {
            assert!(bad.parse::<Identity>().is_err(), "{bad:?} accepted");
        }
    }
}
