//! Reclaiming cells: what a finished launch removes, and what `cellvm-jailer gc` (and
//! every launch) removes for supervisors that died without cleaning up.

use crate::cgroup::Cgroup;
use crate::registry::Registry;

/// Kills the cell's processes, removes its cgroup and its jail directory, and drops the
/// file labels it held.
pub fn remove_cell(id: &str) {
    let cg = Cgroup::open(id);
    if cg.exists() {
        if let Err(e) = cg.destroy() {
            eprintln!("cellvm-jailer: {e}");
        }
    }
    // Once nothing of the cell runs: the last user of each file restores its label.
    crate::selinux::restore_recorded(id);
    let dir = crate::launch::jail_dir(id);
    // The jail's mounts lived in the cell's mount namespace and died with it; only the
    // empty directories are left on the host: the VMM's root and one per backend.
    let mut dirs: Vec<_> = std::fs::read_dir(&dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.push(dir.clone());
    for d in dirs {
        if let Err(e) = std::fs::remove_dir(&d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cellvm-jailer: {}: {e}", d.display());
            }
        }
    }
}

/// Removes every cell whose supervisor is gone; returns their ids.
pub fn collect(reg: &Registry) -> Vec<String> {
    let mut reclaimed = Vec::new();
    for entry in reg.entries().unwrap_or_default() {
        if !entry.is_live() {
            remove_cell(&entry.id);
            if reg.remove(&entry.id).is_ok() {
                reclaimed.push(entry.id);
            }
        }
    }
    reclaimed
}
