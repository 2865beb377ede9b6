//! The host-wide registry of running cells under /run/cellvm: each VM's id, its
//! supervisor, its uid and its MCS pair. Allocation happens under an exclusive flock,
//! so concurrent jailers never hand out the same uid or category pair; entries whose
//! supervisor is gone are stale and reclaimed (`cellvm-jailer gc`, and every launch).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::mcs::McsPair;

pub const RUN_DIR: &str = "/run/cellvm";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("tenant {tenant}: every uid in [{lo}, {hi}] is in use")]
    NoUid { tenant: String, lo: u32, hi: u32 },
    #[error("tenant {tenant}: a VM with {needed} processes needs {needed} uids; uid_range [{lo}, {hi}] holds {held}")]
    RangeTooSmall {
        tenant: String,
        needed: u64,
        lo: u32,
        hi: u32,
        held: u64,
    },
    #[error("tenant {tenant}: every MCS pair in c{lo}..c{hi} is in use")]
    NoMcs { tenant: String, lo: u16, hi: u16 },
    #[error("vm id {0:?} is already running")]
    IdInUse(String),
    #[error("{path}: a registry entry that cannot be parsed ({why}); its uids and MCS pair count as taken, so no VM is started until `cellvm-jailer gc` proves its supervisor dead or an administrator removes it")]
    Unparsable { path: String, why: String },
    #[error("supervisor {0}: its start time cannot be read from /proc; without it the entry could be taken for a dead VM's")]
    NoStartTime(u32),
}

/// One running VM: its supervisor, the VMM's uid, one uid per device backend, and the
/// one MCS pair the VMM, its backends and its writable images share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub tenant: String,
    pub supervisor: u32,
    pub supervisor_start: u64,
    pub uid: u32,
    pub device_uids: Vec<u32>,
    pub mcs: McsPair,
}

/// What a registry file that does not parse still tells: the uids and pair it may
/// hold (taken) and, if readable, its supervisor (so gc can prove it dead).
#[derive(Clone, Debug, Default)]
pub struct Broken {
    pub id: String,
    pub path: PathBuf,
    pub why: String,
    pub uids: Vec<u32>,
    pub mcs: Option<McsPair>,
    pub supervisor: Option<(u32, u64)>,
}

impl Broken {
    /// Whether its supervisor is proven gone (readable pid and start time, and that
    /// process is not running).
    pub fn is_dead(&self) -> bool {
        self.supervisor
            .is_some_and(|(pid, start)| !live(pid, start))
    }
}

/// The registry's contents: the entries, and those that do not parse.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub entries: Vec<Entry>,
    pub broken: Vec<Broken>,
}

fn field<'a>(text: &'a str, k: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
}

fn uid_list(text: &str) -> Option<Vec<u32>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',').map(|u| u.parse().ok()).collect()
}

impl Entry {
    fn serialize(&self) -> String {
        let devs: Vec<String> = self.device_uids.iter().map(u32::to_string).collect();
        format!(
            "id={}\ntenant={}\nsupervisor={}\nsupervisor_start={}\nuid={}\ndevice_uids={}\nmcs={}\n",
            self.id,
            self.tenant,
            self.supervisor,
            self.supervisor_start,
            self.uid,
            devs.join(","),
            self.mcs
        )
    }

    fn parse(text: &str) -> Option<Entry> {
        Some(Entry {
            id: field(text, "id")?.to_string(),
            tenant: field(text, "tenant")?.to_string(),
            supervisor: field(text, "supervisor")?.parse().ok()?,
            supervisor_start: field(text, "supervisor_start")?.parse().ok()?,
            uid: field(text, "uid")?.parse().ok()?,
            // Absent in entries of older jailers, whose backends had entries of their own.
            device_uids: match field(text, "device_uids") {
                Some(list) => uid_list(list)?,
                None => Vec::new(),
            },
            mcs: field(text, "mcs")?.parse().ok()?,
        })
    }

    /// Whether the supervisor that wrote this entry is still the process with its pid.
    pub fn is_live(&self) -> bool {
        live(self.supervisor, self.supervisor_start)
    }

    /// The VMM's uid and the backends'.
    pub fn uids(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.uid).chain(self.device_uids.iter().copied())
    }
}

/// A supervisor is live while a process with its pid has its start time; a start time
/// of 0 (never written by this registry, but possible in an old or damaged entry)
/// cannot tell a reused pid apart, so it counts as live while the pid exists.
fn live(pid: u32, start: u64) -> bool {
    match process_start_time(pid) {
        Some(now) => start == 0 || now == start,
        None => start == 0 && Path::new(&format!("/proc/{pid}")).exists(),
    }
}

/// Field 22 of /proc/PID/stat: start time in clock ticks, to tell a reused pid apart.
pub fn process_start_time(pid: u32) -> Option<u64> {
    use std::io::Read;
    // One read: procfs hands the whole line (a few hundred bytes) to a buffer this size.
    let mut buf = [0u8; 4096];
    let n = fs::File::open(format!("/proc/{pid}/stat"))
        .ok()?
        .read(&mut buf)
        .ok()?;
    let stat = std::str::from_utf8(buf.get(..n)?).ok()?;
    let after_comm = stat.get(stat.rfind(')')? + 2..)?;
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

pub struct Registry {
    dir: PathBuf,
    run_dir: PathBuf,
    _lock: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Creates `dir` mode 0700 (root's alone), or makes an existing one so.
fn private_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// A temporary file of an allocation in progress: `.<id>.tmp`.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
}

impl Registry {
    /// Opens the registry and takes its lock until the value is dropped. The run
    /// directory, its vms/ and the lock file are root's alone (0700, 0700, 0600): a
    /// lock any user could open would let any user freeze every launch.
    pub fn lock(run_dir: &Path) -> Result<Registry, Error> {
        // The run directory may have been made traversable (0711) for a tenant's
        // api_group (rundir.rs); never listable or writable by anyone but root.
        let traversable = fs::symlink_metadata(run_dir)
            .map(|m| m.is_dir() && m.permissions().mode() & 0o7777 == 0o711)
            .unwrap_or(false);
        if !traversable {
            private_dir(run_dir)?;
        }
        let dir = run_dir.join("vms");
        private_dir(&dir)?;
        let lock_path = run_dir.join("registry.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        lock.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io(&lock_path))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&lock_path)(std::io::Error::last_os_error()));
        }
        Ok(Registry {
            dir,
            run_dir: run_dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// The run directory this registry lives in (`/run/cellvm`).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Every entry, and every file that does not parse as one. Temporary files are
    /// not entries: under the lock, one can only be left by an allocation that was
    /// killed before its rename, so it is removed.
    pub fn scan(&self) -> Result<Scan, Error> {
        let mut scan = Scan::default();
        for e in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let e = e.map_err(io(&self.dir))?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if is_temporary(&name) {
                fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            let text = match read_small(&path) {
                Ok(t) => t,
                Err(why) => {
                    scan.broken.push(Broken {
                        id: name,
                        path,
                        why,
                        ..Broken::default()
                    });
                    continue;
                }
            };
            match Entry::parse(&text) {
                Some(entry) if entry.id == name => scan.entries.push(entry),
                parsed => {
                    let why = if parsed.is_some() {
                        "its id is not its file name".to_string()
                    } else {
                        "a field is missing or malformed".to_string()
                    };
                    // Its uids are known only if the VMM's and the backends' all read.
                    let uid: Option<u32> = field(&text, "uid").and_then(|u| u.parse().ok());
                    let devs = match field(&text, "device_uids") {
                        Some(list) => uid_list(list),
                        None => Some(Vec::new()),
                    };
                    let uids = match (uid, devs) {
                        (Some(u), Some(d)) => std::iter::once(u).chain(d).collect(),
                        _ => Vec::new(),
                    };
                    let supervisor = field(&text, "supervisor")
                        .and_then(|p| p.parse().ok())
                        .zip(field(&text, "supervisor_start").and_then(|s| s.parse().ok()));
                    scan.broken.push(Broken {
                        id: name,
                        path,
                        why,
                        uids,
                        mcs: field(&text, "mcs").and_then(|m| m.parse().ok()),
                        supervisor,
                    });
                }
            }
        }
        scan.entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(scan)
    }

    /// The entries that parse (see `scan` for the rest).
    pub fn entries(&self) -> Result<Vec<Entry>, Error> {
        Ok(self.scan()?.entries)
    }

    /// Records a new VM: the lowest free uid of the tenant's range for the VMM and
    /// one more for each of its `backends`, and the lowest free MCS pair. An entry
    /// that cannot be parsed keeps what it may hold: if its uid or pair cannot be
    /// read, nothing is allocated until gc or an administrator deals with it.
    /// Entries of dead supervisors count as free only once `remove`d (gc does that).
    pub fn allocate(
        &self,
        id: &str,
        tenant: &crate::policy::TenantPolicy,
        supervisor: u32,
        backends: usize,
    ) -> Result<Entry, Error> {
        let [lo, hi] = tenant.uid_range;
        let needed = backends as u64 + 1;
        let held = u64::from(hi - lo) + 1;
        if needed > held {
            return Err(Error::RangeTooSmall {
                tenant: tenant.name.clone(),
                needed,
                lo,
                hi,
                held,
            });
        }
        let supervisor_start =
            process_start_time(supervisor).ok_or(Error::NoStartTime(supervisor))?;
        let scan = self.scan()?;
        if let Some(b) = scan
            .broken
            .iter()
            .find(|b| b.uids.is_empty() || b.mcs.is_none())
        {
            return Err(Error::Unparsable {
                path: b.path.display().to_string(),
                why: b.why.clone(),
            });
        }
        if scan.entries.iter().any(|e| e.id == id) || scan.broken.iter().any(|b| b.id == id) {
            return Err(Error::IdInUse(id.into()));
        }
        let taken_uids: HashSet<u32> = scan
            .entries
            .iter()
            .flat_map(Entry::uids)
            .chain(scan.broken.iter().flat_map(|b| b.uids.iter().copied()))
            .collect();
        let taken_pairs: HashSet<String> = scan
            .entries
            .iter()
            .map(|e| e.mcs)
            .chain(scan.broken.iter().filter_map(|b| b.mcs))
            .map(|m| m.to_string())
            .collect();
        let uids: Vec<u32> = (lo..=hi)
            .filter(|u| !taken_uids.contains(u))
            .take(backends + 1)
            .collect();
        if uids.len() < backends + 1 {
            return Err(Error::NoUid {
                tenant: tenant.name.clone(),
                lo,
                hi,
            });
        }
        let [clo, chi] = tenant.mcs_categories;
        let mcs = McsPair::all_in(clo, chi)
            .find(|p| !taken_pairs.contains(&p.to_string()))
            .ok_or(Error::NoMcs {
                tenant: tenant.name.clone(),
                lo: clo,
                hi: chi,
            })?;
        let entry = Entry {
            id: id.into(),
            tenant: tenant.name.clone(),
            supervisor,
            supervisor_start,
            uid: uids[0],
            device_uids: uids[1..].to_vec(),
            mcs,
        };
        // Written whole under a temporary name, then renamed: an entry is either
        // complete or absent (a killed write leaves a temporary file the next scan
        // removes).
        let path = self.dir.join(id);
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(entry.serialize().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(entry)
    }

    pub fn remove(&self, id: &str) -> Result<(), Error> {
        let path = self.dir.join(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }
}

/// A registry file's text, if it is a regular file of at most 4 KiB of UTF-8.
fn read_small(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    if !f.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err("not a regular file".into());
    }
    // Room for the whole entry up front: one read and the one that sees its end.
    let mut bytes = Vec::with_capacity(4097);
    f.take(4097)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() > 4096 {
        return Err("larger than 4 KiB".into());
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::TenantPolicy;

    fn tenant(cats: [u16; 2], uids: [u32; 2]) -> TenantPolicy {
        TenantPolicy::parse(&format!(
            "name = \"t\"\nmax_vcpus = 1\nmax_memory_mib = 64\nuid_range = [{}, {}]\nmcs_categories = [{}, {}]\n[cgroup]\ncpu_percent = 100\nmemory_overhead_mib = 8\npids_max = 8\n",
            uids[0], uids[1], cats[0], cats[1]
        ))
        .unwrap()
    }

    #[test]
    fn concurrent_cells_get_distinct_uids_and_pairs_until_the_range_runs_out() {
        let dir = std::env::temp_dir().join(format!("cellvm-registry-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let t = tenant([5, 7], [1000, 1010]); // pairs: c5,c6 c5,c7 c6,c7
        let me = std::process::id();
        let reg = Registry::lock(&dir).unwrap();
        let a = reg.allocate("a", &t, me, 0).unwrap();
        let b = reg.allocate("b", &t, me, 0).unwrap();
        let c = reg.allocate("c", &t, me, 0).unwrap();
        assert_eq!((a.uid, b.uid, c.uid), (1000, 1001, 1002));
        assert_eq!(
            [a.mcs.to_string(), b.mcs.to_string(), c.mcs.to_string()],
            ["c5,c6", "c5,c7", "c6,c7"]
        );
        assert!(matches!(
            reg.allocate("d", &t, me, 0),
            Err(Error::NoMcs { .. })
        ));
        assert!(matches!(
            reg.allocate("a", &t, me, 0),
            Err(Error::IdInUse(_))
        ));
        assert!(a.is_live(), "our own process is live");
        reg.remove("b").unwrap();
        let d = reg.allocate("d", &t, me, 0).unwrap();
        assert_eq!((d.uid, d.mcs.to_string().as_str()), (1001, "c5,c7"));
        assert_eq!(reg.entries().unwrap().len(), 3);
    }

    #[test]
    fn an_entry_whose_supervisor_is_gone_is_not_live() {
        let e = Entry {
            id: "x".into(),
            tenant: "t".into(),
            supervisor: std::process::id(),
            supervisor_start: 1,
            uid: 1,
            device_uids: vec![2, 3],
            mcs: "c1,c2".parse().unwrap(),
        };
        assert!(!e.is_live(), "same pid, different start time: a reused pid");
        assert_eq!(Entry::parse(&e.serialize()), Some(e));
    }

    fn fresh(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cellvm-registry-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_vm_gets_one_entry_one_pair_and_a_uid_per_backend() {
        let dir = fresh("backends");
        let t = tenant([5, 9], [1000, 1004]);
        let me = std::process::id();
        let reg = Registry::lock(&dir).unwrap();
        let a = reg.allocate("a", &t, me, 3).unwrap();
        assert_eq!(
            (a.uid, a.device_uids.clone()),
            (1000, vec![1001, 1002, 1003])
        );
        let e = reg.allocate("b", &t, me, 1).unwrap_err().to_string();
        assert_eq!(e, "tenant t: every uid in [1000, 1004] is in use");
        let e = reg.allocate("b", &t, me, 5).unwrap_err().to_string();
        assert!(
            e.contains("needs 6 uids; uid_range [1000, 1004] holds 5"),
            "{e}"
        );
        let b = reg.allocate("b", &t, me, 0).unwrap();
        assert_eq!(b.uid, 1004);
        assert_ne!(a.mcs, b.mcs);
        assert_eq!(reg.entries().unwrap(), vec![a, b], "one file per VM");
        assert_eq!(fs::read_dir(dir.join("vms")).unwrap().count(), 2);
    }

    #[test]
    fn the_registry_and_its_lock_are_root_only() {
        let dir = fresh("modes");
        fs::create_dir_all(dir.join("vms")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("registry.lock"), b"").unwrap();
        fs::set_permissions(dir.join("registry.lock"), fs::Permissions::from_mode(0o644)).unwrap();
        drop(Registry::lock(&dir).unwrap());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("vms")), 0o700);
        assert_eq!(mode(&dir.join("registry.lock")), 0o600);
    }

    #[test]
    fn a_temporary_file_left_by_a_killed_allocation_is_no_entry_and_is_removed() {
        let dir = fresh("tmp");
        let t = tenant([5, 9], [1000, 1004]);
        let reg = Registry::lock(&dir).unwrap();
        let a = reg.allocate("x", &t, std::process::id(), 0).unwrap();
        // What a kill between the write and the rename leaves.
        fs::rename(dir.join("vms/x"), dir.join("vms/.x.tmp")).unwrap();
        assert!(reg.entries().unwrap().is_empty());
        assert!(
            !dir.join("vms/.x.tmp").exists(),
            "the stale temporary file is gone"
        );
        let again = reg.allocate("x", &t, std::process::id(), 0).unwrap();
        assert_eq!((again.uid, again.mcs), (a.uid, a.mcs), "nothing leaked");
    }

    #[test]
    fn an_entry_that_cannot_be_parsed_keeps_what_it_holds() {
        let dir = fresh("broken");
        let t = tenant([5, 9], [1000, 1004]);
        let me = std::process::id();
        let reg = Registry::lock(&dir).unwrap();
        let start = process_start_time(me).unwrap();
        // Readable uids and pair, a damaged field: those stay taken.
        fs::write(
            dir.join("vms/old"),
            format!("id=old\nsupervisor={me}\nsupervisor_start={start}\nuid=1000\ndevice_uids=1001\nmcs=c5,c6\n"),
        )
        .unwrap();
        let a = reg.allocate("a", &t, me, 0).unwrap();
        assert_eq!((a.uid, a.mcs.to_string().as_str()), (1002, "c5,c7"));
        assert!(matches!(
            reg.allocate("old", &t, me, 0),
            Err(Error::IdInUse(_))
        ));
        let scan = reg.scan().unwrap();
        assert_eq!(scan.broken.len(), 1);
        assert!(!scan.broken[0].is_dead(), "its supervisor (us) runs");
        // Unreadable uid: nothing is allocated at all.
        fs::write(dir.join("vms/junk"), b"uid=12x\nmcs=c5,c8\n").unwrap();
        let e = reg.allocate("b", &t, me, 0).unwrap_err().to_string();
        assert!(
            e.contains("vms/junk: a registry entry that cannot be parsed"),
            "{e}"
        );
        assert!(
            !reg.scan()
                .unwrap()
                .broken
                .iter()
                .any(|b| b.id == "junk" && b.is_dead()),
            "unknown supervisor: never proven dead"
        );
    }

    #[test]
    fn a_start_time_of_zero_is_live_while_the_pid_exists() {
        let mut e = Entry {
            id: "x".into(),
            tenant: "t".into(),
            supervisor: std::process::id(),
            supervisor_start: 0,
            uid: 1,
            device_uids: vec![],
            mcs: "c1,c2".parse().unwrap(),
        };
        assert!(e.is_live());
        e.supervisor = u32::MAX - 1; // no such pid
        assert!(!e.is_live());
        let dir = fresh("nostart");
        let reg = Registry::lock(&dir).unwrap();
        let t = tenant([5, 9], [1000, 1004]);
        assert!(matches!(
            reg.allocate("a", &t, u32::MAX - 1, 0),
            Err(Error::NoStartTime(_))
        ));
    }
}
