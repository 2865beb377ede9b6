//! One cgroup per VM holding the VMM and its device backends, with the tenant's cpu,
//! memory, pids and io limits. cgroup v2 where its unified hierarchy has the
//! controllers; v1 otherwise (hybrid hosts, like ours, keep them on v1). Removed on exit
//! after everything in it is killed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::policy::CgroupLimits;

const ROOT: &str = "/sys/fs/cgroup";
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

/// The cgroup directories a VM id has (or would have).
pub fn dirs_for(id: &str) -> (Vec<PathBuf>, bool) {
    if v2_usable() {
        (vec![Path::new(ROOT).join("cellvm").join(id)], true)
    } else {
        (
            V1_CONTROLLERS
                .iter()
                .map(|c| Path::new(ROOT).join(c).join("cellvm").join(id))
                .collect(),
            false,
        )
    }
}

impl Cgroup {
    pub fn create(id: &str, limits: &CgroupLimits, memory_bytes: u64) -> Result<Cgroup, Error> {
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
        for d in &dirs {
            fs::create_dir_all(d).map_err(|source| Error::Io {
                path: d.display().to_string(),
                source,
            })?;
        }
        let cg = Cgroup { dirs };
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
