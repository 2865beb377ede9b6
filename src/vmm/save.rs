//! Snapshot and restore, the VMM's side. A snapshot is taken of a paused VM: each vCPU's
//! state is read on its own (parked) thread, the platform devices' and kvmclock here,
//! then guest RAM goes to the memory file and the state to the state file, both
//! descriptors handed over with the request: the VMM opens no path. A restore is a new
//! VM built from a spec as usual, whose RAM, devices and vCPUs take the snapshot's state
//! in place of a boot, every part checked before any vCPU runs.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use crate::snapshot::{self, memory, vcpu::VcpuState, Snapshot, VmInfo};

/// Where a restored VM's snapshot comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreFrom {
    /// `DIR/state` and `DIR/memory` (unjailed use).
    Dir(PathBuf),
    /// The state and memory files open on these inherited descriptors (the jailer's way).
    Fds(RawFd, RawFd),
}

/// The names of a snapshot's two files in its directory.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// The last snapshot a VM took: its memory file (device and inode) and index, which an
/// incremental snapshot into the same file starts from.
pub struct LastSnapshot {
    pub dev: u64,
    pub ino: u64,
    pub index: memory::RamIndex,
}

/// What `vm.snapshot` answers.
#[derive(Debug)]
pub struct Saved {
    pub incremental: bool,
    /// Chunks the guest wrote since the last snapshot (incremental only).
    pub dirty_chunks: usize,
    pub ram_bytes_written: u64,
    pub chunks: usize,
    pub state_bytes: usize,
    pub pause_to_saved_ms: f64,
}

/// A descriptor handed over for writing: a regular file open for writing; with its
/// device and inode.
fn writable_file(fd: OwnedFd, what: &str) -> Result<(File, u64, u64), String> {
    // SAFETY: a zeroed stat is a valid value of the plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat fills `st` for a descriptor we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(format!(
            "{what}: fstat: {}",
            std::io::Error::last_os_error()
        ));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!("{what}: not a regular file"));
    }
    // SAFETY: F_GETFL reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_ACCMODE == libc::O_RDONLY {
        return Err(format!("{what}: not open for writing"));
    }
    Ok((File::from(fd), st.st_dev, st.st_ino))
}

/// Reads the whole state file (bounded) and decodes it.
fn read_state(mut f: File) -> Result<Snapshot, String> {
    let mut data = Vec::new();
    (&mut f)
        .take(snapshot::format::MAX_FILE as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("state file: {e}"))?;
    Snapshot::decode(&data).map_err(|e| e.to_string())
}

/// Opens (unjailed) or takes (jailed) a snapshot's files and decodes the state.
pub fn open(from: &RestoreFrom) -> Result<(Snapshot, File), String> {
    let (state, mem) = match from {
        RestoreFrom::Dir(dir) => {
            let open = |name: &str| {
                let p = dir.join(name);
                File::open(&p).map_err(|e| format!("{}: {e}", p.display()))
            };
            (open(STATE_FILE)?, open(MEMORY_FILE)?)
        }
        RestoreFrom::Fds(s, m) => {
            let take = |fd: RawFd, what: &str| -> Result<File, String> {
                // SAFETY: fcntl(F_GETFD) only checks the descriptor exists.
                if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(format!("--restore-fds: {what} descriptor {fd} is not open"));
                }
                // SAFETY: the launcher handed this descriptor over to be owned here, once.
                Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
            };
            (take(*s, "state")?, take(*m, "memory")?)
        }
    };
    Ok((read_state(state)?, mem))
}

/// The facts a snapshot is checked against.
pub fn info(cpus: u32, memory_bytes: u64, virtio_devices: usize, tsc_khz: u32) -> VmInfo {
    VmInfo {
        cpus,
        memory_bytes,
        virtio_devices: virtio_devices as u32,
        tsc_khz,
    }
}

impl super::Vm {
    /// Saves the paused VM into `fds` (the state file, then the memory file); with
    /// `incremental`, into the memory file of its last snapshot, writing only the chunks
    /// the guest wrote since.
    pub(super) fn snapshot(&self, fds: Vec<OwnedFd>, incremental: bool) -> Result<Saved, String> {
        let t0 = Instant::now();
        if !self.functions.is_empty() {
            return Err(format!(
                "this VM has {} virtio devices, whose vhost-user state a snapshot does not hold yet; only VMs without devices are saved",
                self.functions.len()
            ));
        }
        let mut fds = fds.into_iter();
        let (Some(state_fd), Some(mem_fd), None) = (fds.next(), fds.next(), fds.next()) else {
            return Err("descriptors: send two with the request (SCM_RIGHTS): the state file, then the memory file".into());
        };
        let (state_file, ..) = writable_file(state_fd, "state file")?;
        let (mem_file, dev, ino) = writable_file(mem_fd, "memory file")?;
        let mut last = self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner());
        if incremental {
            match last.as_ref() {
                None => {
                    return Err(
                        "incremental: this VM has taken no snapshot yet; take a full one first"
                            .into(),
                    )
                }
                Some(l) if (l.dev, l.ino) != (dev, ino) => {
                    return Err(
                        "incremental: the memory file is not the one of this VM's last snapshot"
                            .into(),
                    )
                }
                Some(_) => {}
            }
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let id = v.shared.id;
            let msrs = self.msr_list.clone();
            let state = v
                .shared
                .with_vcpu(move |fd| {
                    let readable = crate::snapshot::vcpu::readable_msrs(fd, &msrs);
                    VcpuState::save(id, fd, &readable)
                })
                .ok_or_else(|| format!("vcpu {id}: not parked"))?
                .map_err(|e| e.to_string())?;
            vcpus.push(state);
        }
        let clock = self
            .vm_fd
            .get_clock()
            .map_err(|e| format!("KVM_GET_CLOCK: {e}"))?;
        let ioapic = self
            .ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state();
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state();
        let ged = self.ged.lock().unwrap_or_else(|p| p.into_inner()).pending();
        let (ram, dirty_chunks) = match last.as_ref().filter(|_| incremental) {
            Some(l) => {
                let dirty = super::memory::dirty_pages(&self.vm_fd, &self.ram.mem)
                    .map_err(|e| format!("dirty log: {e}"))?;
                memory::save_dirty(&self.ram.mem, &dirty, &l.index, &mem_file)
                    .map_err(|e| e.to_string())?
            }
            None => {
                // From the first snapshot on, KVM logs the pages the guest writes; the
                // log starts clean here (the guest is paused), and each snapshot's read
                // of it clears it for the next.
                if last.is_none() {
                    super::memory::log_dirty_pages(&self.vm_fd, &self.ram.mem)
                        .map_err(|e| format!("dirty log: {e}"))?;
                } else {
                    super::memory::dirty_pages(&self.vm_fd, &self.ram.mem)
                        .map_err(|e| format!("dirty log: {e}"))?;
                }
                let r = memory::save(&self.ram.mem, self.ram.file.as_ref(), &mem_file)
                    .map_err(|e| e.to_string())?;
                (r, 0)
            }
        };
        let snap = Snapshot {
            producer: snapshot::producer(),
            vm: info(
                self.status.vcpus,
                ram.size,
                self.functions.len(),
                self.tsc_khz,
            ),
            clock,
            vcpus,
            ioapic,
            serial,
            ged,
            ram,
        };
        let bytes = snap.encode();
        state_file
            .write_all_at(&bytes, 0)
            .and_then(|_| state_file.set_len(bytes.len() as u64))
            .map_err(|e| format!("state file: {e}"))?;
        let written_at = t0.elapsed();
        mem_file
            .sync_data()
            .and_then(|_| state_file.sync_data())
            .map_err(|e| format!("sync: {e}"))?;
        log::info!(
            "snapshot: written in {} us, synced in {} us more",
            written_at.as_micros(),
            (t0.elapsed() - written_at).as_micros()
        );
        let written = if incremental {
            dirty_chunks as u64 * memory::CHUNK
        } else {
            snap.ram.chunks.iter().map(|c| c.1 as u64).sum()
        };
        *last = Some(LastSnapshot {
            dev,
            ino,
            index: snap.ram.clone(),
        });
        Ok(Saved {
            incremental,
            dirty_chunks,
            ram_bytes_written: written,
            chunks: snap.ram.chunks.len(),
            state_bytes: bytes.len(),
            pause_to_saved_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }
}
