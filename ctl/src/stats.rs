//! `cellvmctl stats ID`: CPU time and memory of the VM's cgroup (the VMM and its
//! backends together), read from the host's cgroup files; I/O from the VMM's counters.
//! The cgroup is the one the jailer made for the id (`cellvm/<id>` in each hierarchy);
//! `vm.info`'s `cgroup` comes from the VMM, which is untrusted, so it is only checked
//! against that and never followed.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CgroupStats {
    /// The cgroup, relative to each hierarchy's root.
    pub cgroup: String,
    pub cpu_ns: Option<u64>,
    /// Where the CPU time came from: `cpuacct.usage`, `cpu.stat` (v2) or `procs` (the
    /// user and system time of the processes in the cgroup, when no cpuacct hierarchy
    /// holds it).
    pub cpu_source: String,
    pub memory_bytes: Option<u64>,
    pub memory_max_bytes: Option<u64>,
    pub processes: usize,
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn v2(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

/// The cgroup the jailer made for `id`, relative to a hierarchy root.
pub fn relative(id: &str) -> PathBuf {
    Path::new("cellvm").join(id)
}

/// Whether what the VMM reports as its cgroup is the jailer's for `id`: the relative
/// path itself, or it under the cgroup root (v2) or one controller's root (v1).
pub fn claims_own_cgroup(reported: &str, id: &str) -> bool {
    let rel = relative(id);
    let p = Path::new(reported.trim_end_matches('/'));
    let Ok(under_root) = p.strip_prefix(ROOT) else {
        return p == rel || p == Path::new("/").join(&rel);
    };
    if under_root == rel {
        return true;
    }
    let mut parts = under_root.components();
    parts.next();
    parts.as_path() == rel
}

/// Reads the cgroup of `id` under `root` (normally /sys/fs/cgroup).
pub fn read(root: &Path, id: &str) -> CgroupStats {
    let rel = relative(id);
    let mut s = CgroupStats {
        cgroup: rel.display().to_string(),
        ..CgroupStats::default()
    };
    let procs_dir;
    if v2(root) {
        let dir = root.join(&rel);
        s.cpu_ns = fs::read_to_string(dir.join("cpu.stat")).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|us| us * 1000)
        });
        s.cpu_source = "cpu.stat".into();
        s.memory_bytes = read_u64(&dir.join("memory.current"));
        s.memory_max_bytes = read_u64(&dir.join("memory.peak"));
        procs_dir = dir;
    } else {
        let mem = root.join("memory").join(&rel);
        s.memory_bytes = read_u64(&mem.join("memory.usage_in_bytes"));
        s.memory_max_bytes = read_u64(&mem.join("memory.max_usage_in_bytes"));
        s.cpu_ns = read_u64(&root.join("cpuacct").join(&rel).join("cpuacct.usage"));
        s.cpu_source = "cpuacct.usage".into();
        procs_dir = ["cpu", "pids", "memory"]
            .iter()
            .map(|c| root.join(c).join(&rel))
            .find(|d| d.join("cgroup.procs").exists())
            .unwrap_or_else(|| mem.clone());
    }
    let pids = procs(&procs_dir);
    s.processes = pids.len();
    if s.cpu_ns.is_none() && !pids.is_empty() {
        s.cpu_ns = Some(pids.iter().filter_map(|p| process_cpu_ns(*p)).sum());
        s.cpu_source = "procs".into();
    }
    s
}

fn procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// User plus system time of one process (all its threads), in nanoseconds.
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let mut f = after.split_whitespace();
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000_000 / hz)
}

/// The counters' numbers as `name=value` pairs, sorted, for the table (objects inside
/// are flattened with dots).
pub fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::Number(n) => out.push((prefix.into(), n.to_string())),
        serde_json::Value::Bool(b) => out.push((prefix.into(), b.to_string())),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(name: &str, v2_layout: bool) -> PathBuf {
        let root = std::env::temp_dir().join(format!("cellvmctl-cg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        if v2_layout {
            let d = root.join("cellvm/vm1");
            fs::create_dir_all(&d).unwrap();
            fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
            fs::write(d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
            fs::write(d.join("memory.current"), "4096\n").unwrap();
            fs::write(d.join("memory.peak"), "8192\n").unwrap();
            fs::write(d.join("cgroup.procs"), "").unwrap();
        } else {
            for c in ["cpu", "cpuacct", "memory", "pids"] {
                fs::create_dir_all(root.join(c).join("cellvm/vm1")).unwrap();
            }
            let mem = root.join("memory/cellvm/vm1");
            fs::write(mem.join("memory.usage_in_bytes"), "1048576\n").unwrap();
            fs::write(mem.join("memory.max_usage_in_bytes"), "2097152\n").unwrap();
            fs::write(
                root.join("cpu/cellvm/vm1/cgroup.procs"),
                format!("{}\n", std::process::id()),
            )
            .unwrap();
        }
        root
    }

    #[test]
    fn v1_memory_comes_from_the_memory_hierarchy_and_cpu_from_cpuacct_or_the_processes() {
        let root = fake_root("v1", false);
        let s = read(&root, "vm1");
        assert_eq!(
            (s.memory_bytes, s.memory_max_bytes),
            (Some(1 << 20), Some(2 << 20))
        );
        assert_eq!((s.cpu_source.as_str(), s.processes), ("procs", 1));
        assert!(s.cpu_ns.is_some());
        fs::write(root.join("cpuacct/cellvm/vm1/cpuacct.usage"), "123456789\n").unwrap();
        let s = read(&root, "vm1");
        assert_eq!(
            (s.cpu_ns, s.cpu_source.as_str()),
            (Some(123456789), "cpuacct.usage")
        );
    }

    #[test]
    fn v2_reads_cpu_stat_and_memory_current() {
        let s = read(&fake_root("v2", true), "vm1");
        assert_eq!(s.cpu_ns, Some(1_500_000));
        assert_eq!(
            (s.memory_bytes, s.memory_max_bytes),
            (Some(4096), Some(8192))
        );
    }

    #[test]
    fn a_cgroup_claimed_by_the_vmm_is_believed_only_if_it_is_the_jailers() {
        for ok in [
            "/sys/fs/cgroup/cpu/cellvm/vm1",
            "/sys/fs/cgroup/memory/cellvm/vm1/",
            "/sys/fs/cgroup/cellvm/vm1",
            "cellvm/vm1",
            "/cellvm/vm1",
        ] {
            assert!(claims_own_cgroup(ok, "vm1"), "{ok}");
        }
        for bad in [
            "/sys/fs/cgroup/cpu/cellvm/vm2",
            "/sys/fs/cgroup/memory",
            "/etc",
            "cellvm/vm1/../vm2",
        ] {
            assert!(!claims_own_cgroup(bad, "vm1"), "{bad}");
        }
    }

    #[test]
    fn counters_flatten_to_sorted_pairs() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"exits":{"io":3,"hlt":1},"id":0,"kind":"blk"}"#).unwrap();
        let mut out = Vec::new();
        flatten("", &v, &mut out);
        out.sort();
        assert_eq!(
            out,
            [
                ("exits.hlt".into(), "1".into()),
                ("exits.io".into(), "3".into()),
                ("id".into(), "0".into())
            ]
        );
    }
}
