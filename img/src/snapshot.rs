//! Internal snapshots of a stopped image: the snapshot table, the L1 copies, the
//! refcount increments and decrements, and the COPIED flags they change.

use crate::qcow2::{self, read_u64_table, Error, Qcow2, Result, Snapshot, COPIED};

/// The snapshot named `key` by id or name.
pub fn find(img: &Qcow2, key: &str) -> Option<usize> {
    img.snapshots
        .iter()
        .position(|s| s.id == key)
        .or_else(|| img.snapshots.iter().position(|s| s.name == key))
}

/// Writes `snapshots` as the new snapshot table (or none), points the header at it and
/// frees the old table.
fn write_table(img: &mut Qcow2, snapshots: Vec<Snapshot>) -> Result<()> {
    let cs = img.cs();
    let mut bytes = Vec::new();
    for s in &snapshots {
        s.encode(&mut bytes);
    }
    let new_off = if snapshots.is_empty() {
        0
    } else {
        let n = (bytes.len() as u64).div_ceil(cs);
        let off = img.alloc(n)?;
        bytes.resize((n * cs) as usize, 0);
        qcow2::write_all_at(&img.file, &bytes, off, "the snapshot table")?;
        off
    };
    let (old_off, old_bytes) = (img.h.snapshots_offset, img.snapshots_bytes);
    img.flush()?;
    img.sync()?;
    img.h.snapshots_offset = new_off;
    img.h.nb_snapshots = snapshots.len() as u32;
    img.write_header_fields()?;
    img.sync()?;
    img.snapshots_bytes = snapshots
        .iter()
        .map(|s| {
            let mut v = Vec::new();
            s.encode(&mut v);
            v.len() as u64
        })
        .sum();
    img.snapshots = snapshots;
    if old_bytes > 0 {
        for c in old_off / cs..=(old_off + old_bytes - 1) / cs {
            img.adjust(c, -1)?;
        }
    }
    Ok(())
}

fn check_writable(img: &Qcow2) -> Result<()> {
    if img.h.version < 3 {
        // v2 tables have no extra data; creating is fine, but keep to what is tested.
        return Err(Error::Unsupported(
            "internal snapshots on version 2 images (compat=0.10) are not implemented".into(),
        ));
    }
    if img.h.refcount_order == 0 {
        // A refcount of at most 1 cannot count a cluster shared with a snapshot.
        return Err(Error::Unsupported(
            "internal snapshots need refcounts of 2 bits or more (refcount_bits=1)".into(),
        ));
    }
    Ok(())
}

/// `snapshot -c NAME`.
pub fn create(img: &mut Qcow2, name: &str, date: (u32, u32)) -> Result<()> {
    check_writable(img)?;
    if name.is_empty() || name.len() > 1024 {
        return Err(Error::Invalid("a snapshot name is 1 to 1024 bytes".into()));
    }
    if img.snapshots.iter().any(|s| s.name == name) {
        return Err(Error::Invalid(format!("a snapshot named '{name}' exists")));
    }
    if img.snapshots.len() as u32 >= qcow2::MAX_SNAPSHOTS {
        return Err(Error::Invalid("too many snapshots".into()));
    }
    let id = img
        .snapshots
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let cs = img.cs();
    img.flush()?;
    let l1: Vec<u64> = img.l1.iter().map(|e| e & !COPIED).collect();
    let l1_off = if l1.is_empty() {
        0
    } else {
        let n = (l1.len() as u64 * 8).div_ceil(cs);
        let off = img.alloc_zeroed(n)?;
        qcow2::write_u64_table(&img.file, off, &l1, "the snapshot's L1 table")?;
        off
    };
    let active = img.l1.clone();
    img.update_refs(&active, 1)?;
    img.fix_copied()?;
    let mut extra = Vec::with_capacity(24);
    extra.extend_from_slice(&0u64.to_be_bytes()); // vm_state_size_large
    extra.extend_from_slice(&img.h.size.to_be_bytes()); // disk_size
    extra.extend_from_slice(&0u64.to_be_bytes()); // icount
    let sn = Snapshot {
        l1_table_offset: l1_off,
        l1_size: l1.len() as u32,
        id: id.to_string(),
        name: name.to_string(),
        date_sec: date.0,
        date_nsec: date.1,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: Some(img.h.size),
        icount: Some(0),
        extra,
    };
    let mut all = img.snapshots.clone();
    all.push(sn);
    write_table(img, all)?;
    img.flush()?;
    img.sync()
}

/// `snapshot -a NAME`: the active L1 table becomes a copy of the snapshot's.
pub fn apply(img: &mut Qcow2, key: &str) -> Result<()> {
    check_writable(img)?;
    let i = find(img, key)
        .ok_or_else(|| Error::Invalid(format!("Could not apply snapshot '{key}': not found")))?;
    let sn = img.snapshots[i].clone();
    let sn_l1 = read_u64_table(
        &img.file,
        sn.l1_table_offset,
        sn.l1_size as u64,
        "the snapshot's L1 table",
    )?;
    let disk_size = sn.disk_size.unwrap_or(img.h.size);
    let needed = qcow2::l1_entries_for(disk_size, img.h.cluster_bits).unwrap_or(u64::MAX);
    if needed.saturating_mul(8) > qcow2::MAX_L1_BYTES {
        return Err(Error::Invalid(format!(
            "snapshot '{key}': disk size {disk_size} is too large"
        )));
    }
    let want = needed.max(sn.l1_size as u64);
    img.flush()?;
    if want > img.l1.len() as u64 {
        img.relocate_l1(want)?;
    }
    let mut new_l1 = sn_l1;
    new_l1.resize(img.l1.len(), 0);
    img.update_refs(&new_l1, 1)?;
    let old = std::mem::replace(&mut img.l1, new_l1);
    img.update_refs(&old, -1)?;
    img.set_l1_dirty();
    img.fix_copied()?;
    img.flush()?;
    if disk_size != img.h.size {
        img.h.size = disk_size;
        img.write_header_fields()?;
    }
    img.sync()
}

/// `snapshot -d NAME`.
pub fn delete(img: &mut Qcow2, key: &str) -> Result<()> {
    check_writable(img)?;
    let i = find(img, key)
        .ok_or_else(|| Error::Invalid(format!("Could not delete snapshot '{key}': not found")))?;
    let cs = img.cs();
    let mut all = img.snapshots.clone();
    let sn = all.remove(i);
    let sn_l1 = read_u64_table(
        &img.file,
        sn.l1_table_offset,
        sn.l1_size as u64,
        "the snapshot's L1 table",
    )?;
    img.flush()?;
    write_table(img, all)?;
    img.update_refs(&sn_l1, -1)?;
    let n = (sn.l1_size as u64 * 8).div_ceil(cs);
    for c in 0..n {
        img.adjust(sn.l1_table_offset / cs + c, -1)?;
    }
    img.fix_copied()?;
    img.flush()?;
    img.sync()
}

/// Days since 1970-01-01 to a civil date (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// `snapshot -l` / info's list, in qemu-img's columns (dates in UTC).
pub fn list_text(snapshots: &[Snapshot]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    ));
    for sn in snapshots {
        let secs = sn.date_sec as i64;
        let (y, mo, d) = civil(secs.div_euclid(86_400));
        let t = secs.rem_euclid(86_400);
        let date = format!(
            "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
            t / 3600,
            t / 60 % 60,
            t % 60
        );
        let ms = sn.vm_clock_nsec / 1_000_000;
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        );
        let icount = match sn.icount {
            Some(i) if i != -1 => i.to_string(),
            _ => String::new(),
        };
        s.push_str(&format!(
            "{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}\n",
            sn.id,
            sn.name,
            crate::size_to_str(sn.vm_state_size),
            date,
            clock,
            icount
        ));
    }
    s
}
