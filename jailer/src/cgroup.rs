//! One cgroup per VM holding the VMM and its device backends, with the tenant's cpu,
//! memory, pids and io limits. cgroup v2 where its unified hierarchy has the
//! controllers; v1 otherwise (hybrid hosts, like ours, keep them on v1). Removed on exit
//! after everything in it is killed.
//!
//! Hugetlb pages are bounded too: every VM's cgroup gets a hugetlb limit for every page
//! size the host has, the VM's own guest RAM for the size it uses and 0 for the rest (a
//! VM without hugepages can take none). On a hybrid host the hugetlb controller may be
//! on no v1 hierarchy but on the unified one (/sys/fs/cgroup/unified lists it, as here);
//! the VM then also gets a directory there, the same `cellvm/<id>`, holding the same
//! processes.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::policy::CgroupLimits;

const ROOT: &str = "/sys/fs/cgroup";
/// The unified (v2) hierarchy of a hybrid host.
const UNIFIED: &str = "/sys/fs/cgroup/unified";
/// The page sizes of hugetlb, as sysfs and the cgroup files name them.
const HUGE_SIZES: [(u64, &str); 2] = [(2048, "2MB"), (1_048_576, "1GB")];
const V1_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "blkio"];
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cgroup {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cgroup: no usable hierarchy (neither v2 with cpu, memory, pids nor v1 with {0:?})")]
    NoHierarchy(&'static [&'static str]),
    #[error("cgroup {0}: processes still inside after SIGKILL")]
    Busy(String),
    #[error(
        "cgroup: hugepages asked for, but no hierarchy has the hugetlb controller to bound them"
    )]
    NoHugetlb,
}

/// A VM's hugetlb pages: the page size in KiB and the bytes of them it may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugeLimit {
    pub page_kib: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Cgroup {
    /// One directory (v2) or one per v1 controller.
    dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    fs::write(path, value).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

fn v2_usable() -> bool {
    fs::read_to_string(Path::new(ROOT).join("cgroup.controllers"))
        .map(|c| {
            ["cpu", "memory", "pids"]
                .iter()
                .all(|k| c.split_whitespace().any(|w| w == *k))
        })
        .unwrap_or(false)
}

fn lists_controller(root: &Path, name: &str) -> bool {
    fs::read_to_string(root.join("cgroup.controllers"))
        .map(|c| c.split_whitespace().any(|w| w == name))
        .unwrap_or(false)
}

/// Where a v1 host keeps hugetlb: its own v1 hierarchy, else the unified one.
fn v1_hugetlb_root() -> Option<PathBuf> {
    let v1 = Path::new(ROOT).join("hugetlb");
    if v1.join("cgroup.procs").exists() {
        Some(v1)
    } else if lists_controller(Path::new(UNIFIED), "hugetlb") {
        Some(PathBuf::from(UNIFIED))
    } else {
        None
    }
}

/// The cgroup directories a VM id has (or would have).
pub fn dirs_for(id: &str) -> (Vec<PathBuf>, bool) {
    if v2_usable() {
        (vec![Path::new(ROOT).join("cellvm").join(id)], true)
    } else {
        (
            V1_CONTROLLERS
                .iter()
                .map(|c| Path::new(ROOT).join(c))
                .chain(v1_hugetlb_root())
                .map(|root| root.join("cellvm").join(id))
                .collect(),
            false,
        )
    }
}

/// Writes the hugetlb limits into `dir`, a cgroup of the hugetlb controller (v2 names
/// when `v2`): `huge`'s bytes for its page size, 0 for every other size the host has.
fn hugetlb_limits(dir: &Path, v2: bool, huge: Option<HugeLimit>) -> Result<(), Error> {
    for (kib, name) in HUGE_SIZES {
        if !Path::new(&format!("/sys/kernel/mm/hugepages/hugepages-{kib}kB")).exists() {
            continue;
        }
        let bytes = huge.filter(|h| h.page_kib == kib).map_or(0, |h| h.bytes);
        let files: [String; 2] = if v2 {
            [
                format!("hugetlb.{name}.max"),
                format!("hugetlb.{name}.rsvd.max"),
            ]
        } else {
            [
                format!("hugetlb.{name}.limit_in_bytes"),
                format!("hugetlb.{name}.rsvd.limit_in_bytes"),
            ]
        };
        for (i, f) in files.iter().enumerate() {
            let r = write(&dir.join(f), &bytes.to_string());
            // Kernels before 5.7 have no reservation limits; the usage limit stands.
            if i == 0 {
                r?;
            }
        }
    }
    Ok(())
}

impl Cgroup {
    pub fn create(
        id: &str,
        limits: &CgroupLimits,
        memory_bytes: u64,
        huge: Option<HugeLimit>,
    ) -> Result<Cgroup, Error> {
        let (dirs, v2) = dirs_for(id);
        if !v2
            && !V1_CONTROLLERS
                .iter()
                .all(|c| Path::new(ROOT).join(c).join("cgroup.procs").exists())
        {
            return Err(Error::NoHierarchy(&V1_CONTROLLERS));
        }
        if v2 {
            let parent = dirs[0].parent().expect("cellvm/<id>");
            fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.display().to_string(),
                source,
            })?;
            write(
                &parent.join("cgroup.subtree_control"),
                "+cpu +memory +pids +io",
            )
            .or_else(|_| write(&parent.join("cgroup.subtree_control"), "+cpu +memory +pids"))?;
        }
        let hugetlb_dir = if v2 {
            Some(dirs[0].clone()).filter(|_| lists_controller(Path::new(ROOT), "hugetlb"))
        } else {
            dirs.get(V1_CONTROLLERS.len()).cloned()
        };
        if huge.is_some() && hugetlb_dir.is_none() {
            return Err(Error::NoHugetlb);
        }
        let unified = hugetlb_dir
            .as_ref()
            .is_some_and(|d| v2 || d.starts_with(UNIFIED));
        if let (true, Some(d)) = (unified, &hugetlb_dir) {
            // The controller enabled down to cellvm/<id> on the unified hierarchy.
            let parent = d.parent().expect("cellvm/<id>");
            fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.display().to_string(),
                source,
            })?;
            let top = parent.parent().expect("the hierarchy's root");
            for p in [top, parent] {
                write(&p.join("cgroup.subtree_control"), "+hugetlb")?;
            }
        }
        for d in &dirs {
            fs::create_dir_all(d).map_err(|source| Error::Io {
                path: d.display().to_string(),
                source,
            })?;
        }
        let cg = Cgroup { dirs };
        if let Some(d) = &hugetlb_dir {
            hugetlb_limits(d, unified, huge)?;
        }
        let quota = limits.cpu_percent as u64 * CPU_PERIOD_US / 100;
        let memory = memory_bytes + (limits.memory_overhead_mib << 20);
        if v2 {
            let d = &cg.dirs[0];
            write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            write(&d.join("memory.max"), &memory.to_string())?;
            write(&d.join("memory.swap.max"), "0").ok();
            write(&d.join("pids.max"), &limits.pids_max.to_string())?;
            if let Some(w) = limits.io_weight {
                if write(&d.join("io.weight"), &w.to_string()).is_err() {
                    eprintln!("cellvm-jailer: warning: io.weight not supported here; no io weight applied");
                }
            }
        } else {
            let ctl = |c: &str| {
                cg.dirs[V1_CONTROLLERS
                    .iter()
                    .position(|x| *x == c)
                    .expect("known controller")]
                .clone()
            };
            write(
                &ctl("cpu").join("cpu.cfs_period_us"),
                &CPU_PERIOD_US.to_string(),
            )?;
            write(&ctl("cpu").join("cpu.cfs_quota_us"), &quota.to_string())?;
            write(
                &ctl("memory").join("memory.limit_in_bytes"),
                &memory.to_string(),
            )?;
            write(&ctl("pids").join("pids.max"), &limits.pids_max.to_string())?;
            if let Some(w) = limits.io_weight {
                let blk = ctl("blkio");
                if write(&blk.join("blkio.bfq.weight"), &w.to_string())
                    .or_else(|_| write(&blk.join("blkio.weight"), &w.to_string()))
                    .is_err()
                {
                    eprintln!("cellvm-jailer: warning: the I/O scheduler has no blkio weight here; no io weight applied");
                }
            }
        }
        Ok(cg)
    }

    pub fn open(id: &str) -> Cgroup {
        Cgroup {
            dirs: dirs_for(id).0,
        }
    }

    pub fn add(&self, pid: u32) -> Result<(), Error> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    pub fn procs(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .dirs
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills whatever is left inside, waits for it to go, removes the directories.
    pub fn destroy(&self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.procs();
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Busy(self.dirs[0].display().to_string()));
            }
            for pid in pids {
                // SAFETY: kill(2) has no memory effects; the pids are this cell's.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for d in &self.dirs {
            match fs::remove_dir(d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::Io {
                        path: d.display().to_string(),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Its directories: the one (v2), or one per v1 controller, the same relative path
    /// `cellvm/<id>` under each.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.exists())
    }
}
