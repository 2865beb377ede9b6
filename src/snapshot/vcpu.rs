//! One vCPU's state: what KVM keeps of it, read on the vCPU's own thread at the paused
//! point and written into a fresh vCPU before it first runs. Kernel structures travel as
//! their exact bytes (zerocopy; a size that differs is refused), MSRs as index/value
//! pairs.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use zerocopy::{FromBytes, IntoBytes};

use super::format::{Error as FormatError, Reader, Writer};

/// The section's version.
pub const VERSION: u16 = 1;
/// The most MSRs one vCPU may bring.
pub const MAX_MSRS: usize = 1024;

/// IA32_TSC and IA32_TSC_DEADLINE: the deadline is relative to the TSC, so it is
/// written after it.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

pub struct VcpuState {
    pub id: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    pub msrs: Vec<(u32, u64)>,
}

/// What KVM said no to, named.
#[derive(Debug, thiserror::Error)]
#[error("vcpu {id}: {what}: {source}")]
pub struct KvmError {
    pub id: u32,
    pub what: &'static str,
    pub source: kvm_ioctls::Error,
}

fn kvm(id: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError { id, what, source }
}

/// The MSRs of KVM's index list that this vCPU can read back, in the order they are
/// restored (the TSC deadline after the TSC). Probed once, before any filter is on.
pub fn readable_msrs(fd: &VcpuFd, list: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(list.len());
    for chunk in list.chunks(KVM_MAX_MSR_ENTRIES) {
        let mut left: Vec<u32> = chunk.to_vec();
        while !left.is_empty() {
            let n = read_msrs(fd, &left).map(|v| v.len()).unwrap_or(0);
            out.extend_from_slice(&left[..n]);
            // Entry n is one KVM cannot read: skipped.
            left.drain(..(n + 1).min(left.len()));
        }
    }
    if let Some(at) = out.iter().position(|m| *m == MSR_IA32_TSC_DEADLINE) {
        let m = out.remove(at);
        out.push(m);
    }
    out
}

/// Reads `indices`; stops at the first one KVM refuses (fewer pairs than indices).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|i| kvm_msr_entry {
            index: *i,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    let n = fd.get_msrs(&mut msrs)?;
    Ok(msrs.as_slice()[..n.min(indices.len())]
        .iter()
        .map(|e| (e.index, e.data))
        .collect())
}

impl VcpuState {
    /// Reads the vCPU's state. Call on the vCPU's thread while it is parked: a first
    /// KVM_RUN with immediate_exit set completes the I/O or MMIO exit it may have
    /// stopped in, so no half-done instruction is saved.
    pub fn save(id: u32, fd: &mut VcpuFd, msr_list: &[u32]) -> Result<VcpuState, KvmError> {
        fd.set_kvm_immediate_exit(1);
        let r = fd.run().map(|_| ());
        fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(kvm(id, "completing the last exit (KVM_RUN)")(e)),
            // An exit instead of EINTR: nothing was pending.
            Ok(()) => {}
        }
        let mut msrs = Vec::with_capacity(msr_list.len());
        for chunk in msr_list.chunks(KVM_MAX_MSR_ENTRIES) {
            let got = read_msrs(fd, chunk).map_err(kvm(id, "KVM_GET_MSRS"))?;
            if got.len() != chunk.len() {
                return Err(kvm(id, "KVM_GET_MSRS")(kvm_ioctls::Error::new(libc::EIO)));
            }
            msrs.extend(got);
        }
        Ok(VcpuState {
            id,
            mp_state: fd.get_mp_state().map_err(kvm(id, "KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm(id, "KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm(id, "KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm(id, "KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm(id, "KVM_GET_XCRS"))?,
            lapic: fd.get_lapic().map_err(kvm(id, "KVM_GET_LAPIC"))?,
            events: fd
                .get_vcpu_events()
                .map_err(kvm(id, "KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm(id, "KVM_GET_DEBUGREGS"))?,
            msrs,
        })
    }

    /// Writes the state into a vCPU whose CPUID is already set, before it first runs.
    /// `xsave_size` is what KVM_CAP_XSAVE2 reports (0: not supported): KVM_SET_XSAVE
    /// reads that many bytes, and a `kvm_xsave` holds 4096.
    pub fn restore(&self, fd: &VcpuFd, xsave_size: usize) -> Result<(), KvmError> {
        let id = self.id;
        fd.set_sregs(&self.sregs)
            .map_err(kvm(id, "KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm(id, "KVM_SET_REGS"))?;
        if xsave_size > std::mem::size_of::<kvm_xsave>() {
            return Err(kvm(
                id,
                "KVM_SET_XSAVE (this host's XSAVE area is larger than 4 KiB)",
            )(kvm_ioctls::Error::new(libc::EOPNOTSUPP)));
        }
        // SAFETY: KVM reads at most its XSAVE area's size, checked above to fit the
        // 4096 bytes of `kvm_xsave`.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm(id, "KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm(id, "KVM_SET_XCRS"))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|(index, data)| kvm_msr_entry {
                    index: *index,
                    data: *data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries)
                .map_err(|_| kvm(id, "KVM_SET_MSRS")(kvm_ioctls::Error::new(libc::E2BIG)))?;
            let n = fd.set_msrs(&msrs).map_err(kvm(id, "KVM_SET_MSRS"))?;
            if n != chunk.len() {
                let (index, _) = chunk[n];
                return Err(KvmError {
                    id,
                    what: if index == MSR_IA32_TSC {
                        "KVM_SET_MSRS (IA32_TSC)"
                    } else {
                        "KVM_SET_MSRS (an MSR this host does not take)"
                    },
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
        }
        fd.set_lapic(&self.lapic)
            .map_err(kvm(id, "KVM_SET_LAPIC"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm(id, "KVM_SET_VCPU_EVENTS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm(id, "KVM_SET_DEBUGREGS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm(id, "KVM_SET_MP_STATE"))?;
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.id)
            .blob(self.regs.as_bytes())
            .blob(self.sregs.as_bytes())
            .blob(self.xsave.as_bytes())
            .blob(self.xcrs.as_bytes())
            .blob(self.lapic.as_bytes())
            .blob(self.events.as_bytes())
            .blob(self.mp_state.as_bytes())
            .blob(self.debugregs.as_bytes())
            .u32(self.msrs.len() as u32);
        for (index, data) in &self.msrs {
            w.u32(*index).u64(*data);
        }
        w.0
    }

    pub fn decode(mut r: Reader) -> Result<VcpuState, FormatError> {
        fn kernel<T: FromBytes>(r: &mut Reader, what: &str) -> Result<T, FormatError> {
            let b = r.blob_exact(what, std::mem::size_of::<T>())?;
            T::read_from_bytes(b).map_err(|_| r.bad(format!("{what}: not a {what}")))
        }
        let id = r.u32("vcpu id")?;
        let state = VcpuState {
            id,
            regs: kernel(&mut r, "regs")?,
            sregs: kernel(&mut r, "sregs")?,
            xsave: kernel(&mut r, "xsave")?,
            xcrs: kernel(&mut r, "xcrs")?,
            lapic: kernel(&mut r, "lapic")?,
            events: kernel(&mut r, "vcpu events")?,
            mp_state: kernel(&mut r, "mp state")?,
            debugregs: kernel(&mut r, "debug registers")?,
            msrs: {
                let n = r.count("msr count", 12, MAX_MSRS)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push((r.u32("msr index")?, r.u64("msr value")?));
                }
                v
            },
        };
        r.end()?;
        if state.xcrs.nr_xcrs as usize > state.xcrs.xcrs.len() {
            return Err(r.bad(format!(
                "xcrs: {} entries, at most {}",
                state.xcrs.nr_xcrs,
                state.xcrs.xcrs.len()
            )));
        }
        // KVM_MP_STATE_RUNNABLE .. KVM_MP_STATE_AP_RESET_HOLD on x86.
        if state.mp_state.mp_state > 9 {
            return Err(r.bad(format!(
                "mp state {}: not an x86 state",
                state.mp_state.mp_state
            )));
        }
        Ok(state)
    }
}

#[cfg(test)]
impl VcpuState {
    /// A copy through the encoding (kvm_xsave is not Clone).
    pub fn decode_for_test(v: &VcpuState) -> VcpuState {
        let bytes = v.encode();
        let mut f = super::format::FileWriter::new("t");
        f.section(*b"CPU\0", VERSION, &bytes);
        let file = f.finish();
        let (_, s) = super::format::read_file(&file).unwrap();
        VcpuState::decode(s[0].reader()).unwrap()
    }
}
