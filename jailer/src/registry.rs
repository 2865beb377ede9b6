//! The host-wide registry of running cells under /run/cellvm: each VM's id, its
//! supervisor, its uid and its MCS pair. Allocation happens under an exclusive flock,
//! so concurrent jailers never hand out the same uid or category pair; entries whose
//! supervisor is gone are stale and reclaimed (`cellvm-jailer gc`, and every launch).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
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
    #[error("tenant {tenant}: every MCS pair in c{lo}..c{hi} is in use")]
    NoMcs { tenant: String, lo: u16, hi: u16 },
    #[error("vm id {0:?} is already running")]
    IdInUse(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub tenant: String,
    pub supervisor: u32,
    pub supervisor_start: u64,
    pub uid: u32,
    pub mcs: McsPair,
}

impl Entry {
    fn serialize(&self) -> String {
        format!(
            "id={}\ntenant={}\nsupervisor={}\nsupervisor_start={}\nuid={}\nmcs={}\n",
            self.id, self.tenant, self.supervisor, self.supervisor_start, self.uid, self.mcs
        )
    }

    fn parse(text: &str) -> Option<Entry> {
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
        };
        Some(Entry {
            id: field("id")?,
            tenant: field("tenant")?,
            supervisor: field("supervisor")?.parse().ok()?,
            supervisor_start: field("supervisor_start")?.parse().ok()?,
            uid: field("uid")?.parse().ok()?,
            mcs: field("mcs")?.parse().ok()?,
        })
    }

    /// Whether the supervisor that wrote this entry is still the process with its pid.
    pub fn is_live(&self) -> bool {
        process_start_time(self.supervisor) == Some(self.supervisor_start)
    }
}

/// Field 22 of /proc/PID/stat: start time in clock ticks, to tell a reused pid apart.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

pub struct Registry {
    dir: PathBuf,
    _lock: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Registry {
    /// Opens the registry and takes its lock until the value is dropped.
    pub fn lock(run_dir: &Path) -> Result<Registry, Error> {
        let dir = run_dir.join("vms");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock_path = run_dir.join("registry.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&lock_path)(std::io::Error::last_os_error()));
        }
        Ok(Registry { dir, _lock: lock })
    }

    pub fn entries(&self) -> Result<Vec<Entry>, Error> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = e.map_err(io(&self.dir))?.path();
            if let Some(entry) = fs::read_to_string(&path)
                .ok()
                .and_then(|t| Entry::parse(&t))
            {
                v.push(entry);
            }
        }
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// Records a new cell with the lowest free uid and MCS pair of the tenant's ranges.
    /// Entries of dead supervisors count as free only once `remove`d (gc does that).
    pub fn allocate(
        &self,
        id: &str,
        tenant: &crate::policy::TenantPolicy,
        supervisor: u32,
    ) -> Result<Entry, Error> {
        let entries = self.entries()?;
        if entries.iter().any(|e| e.id == id) {
            return Err(Error::IdInUse(id.into()));
        }
        let [lo, hi] = tenant.uid_range;
        let uid = (lo..=hi)
            .find(|u| !entries.iter().any(|e| e.uid == *u))
            .ok_or(Error::NoUid {
                tenant: tenant.name.clone(),
                lo,
                hi,
            })?;
        let [clo, chi] = tenant.mcs_categories;
        let mcs = McsPair::all_in(clo, chi)
            .find(|p| !entries.iter().any(|e| e.mcs == *p))
            .ok_or(Error::NoMcs {
                tenant: tenant.name.clone(),
                lo: clo,
                hi: chi,
            })?;
        let entry = Entry {
            id: id.into(),
            tenant: tenant.name.clone(),
            supervisor,
            supervisor_start: process_start_time(supervisor).unwrap_or(0),
            uid,
            mcs,
        };
        let path = self.dir.join(id);
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(entry.serialize().as_bytes())
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
        let a = reg.allocate("a", &t, me).unwrap();
        let b = reg.allocate("b", &t, me).unwrap();
        let c = reg.allocate("c", &t, me).unwrap();
        assert_eq!((a.uid, b.uid, c.uid), (1000, 1001, 1002));
        assert_eq!(
            [a.mcs.to_string(), b.mcs.to_string(), c.mcs.to_string()],
            ["c5,c6", "c5,c7", "c6,c7"]
        );
        assert!(matches!(
            reg.allocate("d", &t, me),
            Err(Error::NoMcs { .. })
        ));
        assert!(matches!(reg.allocate("a", &t, me), Err(Error::IdInUse(_))));
        assert!(a.is_live(), "our own process is live");
        reg.remove("b").unwrap();
        let d = reg.allocate("d", &t, me).unwrap();
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
            mcs: "c1,c2".parse().unwrap(),
        };
        assert!(!e.is_live(), "same pid, different start time: a reused pid");
        assert_eq!(Entry::parse(&e.serialize()), Some(e));
    }
}
