//! `check`: walks every L1/L2 table (the active one and each snapshot's), the snapshot
//! table and the refcount structures, recomputes every cluster's refcount and compares
//! it with the stored one, as `qemu-img check` does: a stored refcount below the
//! references is corruption, above them a leak; COPIED flags must say refcount == 1.

use std::collections::HashMap;

use crate::qcow2::{
    decode_l2, read_u64_table, Mapping, Qcow2, COPIED, L1E_OFFSET_MASK, REFT_OFFSET_MASK,
};

#[derive(Debug, Default, Clone)]
pub struct CheckResult {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub allocated: u64,
    pub fragmented: u64,
    pub compressed: u64,
    pub total_clusters: u64,
    pub image_end_offset: u64,
    /// One line per finding, in qemu-img's words.
    pub messages: Vec<String>,
}

impl CheckResult {
    /// qemu-img's exit code: 0 clean, 2 corruption, 3 leaks only, 1 not completed.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

struct Walk<'a> {
    img: &'a mut Qcow2,
    counts: Vec<u32>,
    r: CheckResult,
}

impl Walk<'_> {
    /// Counts one reference to every cluster of [off, off+size).
    fn inc(&mut self, off: u64, size: u64) {
        if size == 0 {
            return;
        }
        let cs = self.img.cs();
        let len = self.img.file_len;
        if off.saturating_add(size).saturating_sub(len) >= cs {
            self.r.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {size:#x}"
            ));
            self.r.corruptions += 1;
            return;
        }
        for c in off / cs..=(off + size - 1) / cs {
            if let Some(v) = self.counts.get_mut(c as usize) {
                *v = v.saturating_add(1);
            }
        }
    }

    /// Counts the L1 table at `l1_off` and collects the L2 tables it references
    /// (how often, and how often from the active table).
    fn l1(&mut self, l1_off: u64, l1_size: u32, active: bool, l2s: &mut HashMap<u64, (u32, u32)>) {
        let cs = self.img.cs();
        self.inc(l1_off, l1_size as u64 * 8);
        let table = if active {
            self.img.l1.clone()
        } else {
            match read_u64_table(
                &self.img.file,
                l1_off,
                l1_size as u64,
                "a snapshot L1 table",
            ) {
                Ok(t) => t,
                Err(e) => {
                    self.r.messages.push(format!("ERROR: {e}"));
                    self.r.check_errors += 1;
                    return;
                }
            }
        };
        for e in table {
            let l2off = e & L1E_OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            if !l2off.is_multiple_of(cs) {
                self.r.messages.push(format!(
                    "ERROR l2_offset={l2off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                self.r.corruptions += 1;
                continue;
            }
            self.inc(l2off, cs);
            let refs = l2s.entry(l2off).or_insert((0, 0));
            refs.0 += 1;
            refs.1 += active as u32;
        }
    }

    /// Counts what one L2 table references, `refs` times (`active` of them from the
    /// active L1 table). Each distinct table is read once, so the walk is bounded by the
    /// file's size however many L1 entries share a table.
    fn l2(&mut self, l2off: u64, refs: u32, active: u32) {
        let cs = self.img.cs();
        if l2off + cs > self.img.file_len {
            return;
        }
        let (bits, ver) = (self.img.h.cluster_bits, self.img.h.version);
        let l2 = match self.img.l2(l2off) {
            Ok(t) => t.clone(),
            Err(e) => {
                self.r.messages.push(format!("ERROR: {e}"));
                self.r.check_errors += 1;
                return;
            }
        };
        let (refs, active) = (refs as u64, active as u64);
        let mut next_contiguous = 0u64;
        for entry in l2 {
            match decode_l2(entry, bits, ver) {
                Mapping::Compressed(off, len) => {
                    if entry & COPIED != 0 {
                        self.r.messages.push(format!(
                            "ERROR: coffset={off:#x}: copied flag must never be set for compressed clusters"
                        ));
                        self.r.corruptions += refs;
                    }
                    self.r.allocated += active;
                    self.r.compressed += active;
                    self.r.fragmented += active;
                    self.inc_n(off, len, refs);
                }
                Mapping::Data(off) | Mapping::Zero(Some(off)) => {
                    self.r.allocated += active;
                    if next_contiguous != 0 && off != next_contiguous {
                        self.r.fragmented += active;
                    }
                    next_contiguous = off + cs;
                    if off % cs != 0 {
                        self.r.messages.push(format!(
                            "ERROR offset={off:x}: Cluster is not properly aligned; L2 entry corrupted."
                        ));
                        self.r.corruptions += refs;
                    } else {
                        self.inc_n(off, cs, refs);
                    }
                }
                Mapping::Zero(None) | Mapping::Unallocated => {}
            }
        }
    }

    /// `inc` `n` times (the error, if any, reported once but counted `n` times).
    fn inc_n(&mut self, off: u64, size: u64, n: u64) {
        if n == 0 {
            return;
        }
        let before = self.r.corruptions;
        self.inc(off, size);
        if n == 1 || size == 0 {
            return;
        }
        if self.r.corruptions > before {
            self.r.corruptions += n - 1;
            return;
        }
        let cs = self.img.cs();
        for c in off / cs..=(off + size - 1) / cs {
            if let Some(v) = self.counts.get_mut(c as usize) {
                *v = v.saturating_add((n - 1).min(u32::MAX as u64) as u32);
            }
        }
    }
}

/// Checks the image's metadata; the image is only read.
pub fn check(img: &mut Qcow2) -> CheckResult {
    let cs = img.cs();
    let nb = img.file_len.div_ceil(cs);
    let mut w = Walk {
        counts: vec![0; nb as usize + 1],
        r: CheckResult {
            total_clusters: img.h.size.div_ceil(cs),
            ..Default::default()
        },
        img,
    };
    w.inc(0, cs);
    let (l1_off, l1_size) = (w.img.h.l1_table_offset, w.img.h.l1_size);
    let mut l2s = HashMap::new();
    w.l1(l1_off, l1_size, true, &mut l2s);
    for sn in w.img.snapshots.clone() {
        w.l1(sn.l1_table_offset, sn.l1_size, false, &mut l2s);
    }
    let mut tables: Vec<_> = l2s.into_iter().collect();
    tables.sort_unstable();
    for (off, (refs, active)) in tables {
        w.l2(off, refs, active);
    }
    let (so, sb) = (w.img.h.snapshots_offset, w.img.snapshots_bytes);
    w.inc(so, sb);
    let (ro, rc) = (
        w.img.h.refcount_table_offset,
        w.img.h.refcount_table_clusters as u64,
    );
    w.inc(ro, rc * cs);
    for (i, e) in w.img.reftable.clone().into_iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            w.r.messages.push(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            w.r.corruptions += 1;
            continue;
        }
        if off / cs >= nb {
            w.r.messages
                .push(format!("ERROR refcount block {i} is outside image"));
            w.r.corruptions += 1;
            continue;
        }
        w.inc(off, cs);
        let got = w.counts[(off / cs) as usize];
        if got != 1 {
            w.r.messages
                .push(format!("ERROR refcount block {i} refcount={got}"));
            w.r.corruptions += 1;
        }
    }
    // Compare with the stored refcounts.
    let mut highest = None;
    for c in 0..nb {
        let stored = match w.img.refcount(c) {
            Ok(v) => v,
            Err(e) => {
                w.r.messages
                    .push(format!("Can't get refcount for cluster {c}: {e}"));
                w.r.check_errors += 1;
                continue;
            }
        };
        let counted = w.counts[c as usize] as u64;
        if stored > 0 || counted > 0 {
            highest = Some(c);
        }
        if stored != counted {
            if stored < counted {
                w.r.messages.push(format!(
                    "ERROR cluster {c} refcount={stored} reference={counted}"
                ));
                w.r.corruptions += 1;
            } else {
                w.r.messages.push(format!(
                    "Leaked cluster {c} refcount={stored} reference={counted}"
                ));
                w.r.leaks += 1;
            }
        }
    }
    // COPIED flags of the active tables (each distinct L2 table read once).
    let (bits, ver) = (w.img.h.cluster_bits, w.img.h.version);
    let mut active: HashMap<u64, u64> = HashMap::new();
    for (i, e) in w.img.l1.clone().into_iter().enumerate() {
        let l2off = e & L1E_OFFSET_MASK;
        if l2off == 0 || !l2off.is_multiple_of(cs) || l2off + cs > w.img.file_len {
            continue;
        }
        let rc = w.img.refcount(l2off / cs).unwrap_or(0);
        if (rc == 1) != (e & COPIED != 0) {
            w.r.messages.push(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
            ));
            w.r.corruptions += 1;
        }
        *active.entry(l2off).or_insert(0) += 1;
    }
    let mut active: Vec<_> = active.into_iter().collect();
    active.sort_unstable();
    for (l2off, refs) in active {
        let Ok(l2) = w.img.l2(l2off).map(|t| t.clone()) else {
            continue;
        };
        for entry in l2 {
            if let Mapping::Data(off) | Mapping::Zero(Some(off)) = decode_l2(entry, bits, ver) {
                if off % cs != 0 {
                    continue;
                }
                let rc = w.img.refcount(off / cs).unwrap_or(0);
                if (rc == 1) != (entry & COPIED != 0) {
                    w.r.messages.push(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                    ));
                    w.r.corruptions += refs;
                }
            }
        }
    }
    w.r.image_end_offset = highest.map_or(0, |h| (h + 1) * cs);
    w.r
}
