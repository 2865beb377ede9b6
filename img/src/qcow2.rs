//! The qcow2 format as cellvm-img reads and edits it: the header, the L1/L2 tables, the
//! refcount structures and the snapshot table, every offset and size checked against the
//! file before it is used. Data clusters are read and written with positioned I/O; the
//! tables touched are cached and written back by `flush` (refcounts first, then L2 tables,
//! then the L1 table and the header), so a crash in between leaves leaks, not corruption.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;
/// The largest L1 table accepted (QEMU's limit too): 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table accepted (QEMU's limit too): 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

pub const INCOMPAT_DIRTY: u64 = 1;
pub const INCOMPAT_CORRUPT: u64 = 2;
pub const INCOMPAT_DATA_FILE: u64 = 4;
pub const INCOMPAT_COMPRESSION: u64 = 8;
pub const INCOMPAT_EXTL2: u64 = 16;
pub const INCOMPAT_KNOWN: u64 = 31;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The image's structure is invalid or hostile.
    #[error("{0}")]
    Invalid(String),
    /// A valid image using something cellvm-img does not implement.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn inval<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}

pub fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
pub fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}
pub fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// Reads exactly `buf.len()` bytes at `off`, or fails naming `what`.
pub fn read_exact_at(f: &File, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
    f.read_exact_at(buf, off)
        .map_err(|e| Error::Io(format!("reading {what} at offset {off:#x}"), e))
}

/// Reads up to `buf.len()` bytes at `off`; what lies past the end of the file reads as zero.
pub fn read_zero_padded(f: &File, buf: &mut [u8], off: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(format!("reading offset {off:#x}"), e)),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

pub fn write_all_at(f: &File, buf: &[u8], off: u64, what: &str) -> Result<()> {
    f.write_all_at(buf, off)
        .map_err(|e| Error::Io(format!("writing {what} at offset {off:#x}"), e))
}

/// The fixed header fields and the extensions cellvm-img understands.
#[derive(Clone, Debug, Default)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    pub has_bitmaps: bool,
    pub has_crypto_header: bool,
    pub data_file: Option<String>,
}

/// L1 entries needed to map `size` bytes with `cluster_bits`; None if it overflows.
pub fn l1_entries_for(size: u64, cluster_bits: u32) -> Option<u64> {
    let per_l2 = 1u64 << (cluster_bits - 3);
    let span = per_l2.checked_mul(1u64 << cluster_bits)?;
    Some(size.div_ceil(span))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Parses the header from the first bytes of the file (at most one cluster is
    /// needed); `file_len` bounds every table it names.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header> {
        if b.len() < 72 {
            return inval(format!(
                "file too small for a qcow2 header ({} bytes)",
                b.len()
            ));
        }
        if b[0..4] != MAGIC {
            return inval("not a qcow2 image (no QFI\\xfb magic)");
        }
        let mut h = Header {
            version: be32(b, 4),
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            refcount_order: 4,
            header_length: 72,
            ..Default::default()
        };
        if h.version != 2 && h.version != 3 {
            return Err(Error::Unsupported(format!(
                "qcow2 version {} (only 2 and 3 exist)",
                h.version
            )));
        }
        if !(9..=21).contains(&h.cluster_bits) {
            return inval(format!(
                "cluster_bits {} outside 9..=21 (512 B to 2 MiB clusters)",
                h.cluster_bits
            ));
        }
        let cs = h.cluster_size();
        if h.version == 3 {
            if b.len() < 104 {
                return inval("file too small for a version 3 header (104 bytes)");
            }
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104
                || h.header_length as u64 > cs
                || !h.header_length.is_multiple_of(8)
            {
                return inval(format!(
                    "header_length {} (must be a multiple of 8 from 104 to the cluster size)",
                    h.header_length
                ));
            }
            if h.header_length >= 105 {
                if b.len() < 105 {
                    return inval("header_length past the end of the file");
                }
                h.compression_type = b[104];
            }
        }
        if h.refcount_order > 6 {
            return inval(format!("refcount_order {} above 6", h.refcount_order));
        }
        if h.crypt_method > 2 {
            return inval(format!(
                "crypt_method {} (0 none, 1 AES, 2 LUKS)",
                h.crypt_method
            ));
        }
        if (h.incompatible & INCOMPAT_COMPRESSION != 0) != (h.compression_type != 0) {
            return inval(format!(
                "compression_type {} disagrees with incompatible bit 3",
                h.compression_type
            ));
        }
        if h.compression_type > 1 {
            return inval(format!(
                "compression_type {} (0 zlib, 1 zstd)",
                h.compression_type
            ));
        }
        // Virtual size: the L1 table needed to map it must fit the L1 limit.
        let needed = l1_entries_for(h.size, h.cluster_bits).unwrap_or(u64::MAX);
        if h.size > i64::MAX as u64 || needed.saturating_mul(8) > MAX_L1_BYTES {
            return inval(format!(
                "virtual size {} is too large for {}-byte clusters (its L1 table would exceed {} bytes)",
                h.size, cs, MAX_L1_BYTES
            ));
        }
        if (h.l1_size as u64) < needed {
            return inval(format!(
                "L1 table too small: l1_size {} for a virtual size of {} needs {}",
                h.l1_size, h.size, needed
            ));
        }
        check_table(
            "L1 table",
            h.l1_table_offset,
            h.l1_size as u64 * 8,
            MAX_L1_BYTES,
            cs,
            file_len,
        )?;
        if h.refcount_table_clusters == 0 {
            return inval("refcount_table_clusters is 0");
        }
        check_table(
            "refcount table",
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
            MAX_REFTABLE_BYTES,
            cs,
            file_len,
        )?;
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return inval(format!(
                "nb_snapshots {} above {}",
                h.nb_snapshots, MAX_SNAPSHOTS
            ));
        }
        if h.nb_snapshots > 0 {
            if !h.snapshots_offset.is_multiple_of(cs) {
                return inval(format!(
                    "snapshot table offset {:#x} is not cluster aligned",
                    h.snapshots_offset
                ));
            }
            // Each entry is at least 40 bytes.
            if h.snapshots_offset
                .checked_add(h.nb_snapshots as u64 * 40)
                .is_none_or(|e| e > file_len)
            {
                return inval(format!(
                    "snapshot table at {:#x} ({} entries) lies past the end of the file ({} bytes)",
                    h.snapshots_offset, h.nb_snapshots, file_len
                ));
            }
        }
        // Header extensions, between the header and the end of cluster 0.
        let limit = (b.len() as u64).min(cs) as usize;
        let mut off = h.header_length as usize;
        loop {
            if off + 8 > limit {
                return inval("header extensions run past the end of the first cluster");
            }
            let ty = be32(b, off);
            let len = be32(b, off + 4) as usize;
            off += 8;
            if ty == 0 {
                break;
            }
            let padded = len.div_ceil(8) * 8;
            if off + padded > limit {
                return inval(format!(
                    "header extension {ty:#x} ({len} bytes) runs past the end of the first cluster"
                ));
            }
            let data = &b[off..off + len];
            match ty {
                EXT_BACKING_FORMAT => {
                    h.backing_format = Some(
                        String::from_utf8(data.to_vec())
                            .map_err(|_| Error::Invalid("backing format is not UTF-8".into()))?,
                    )
                }
                EXT_BITMAPS => h.has_bitmaps = true,
                EXT_CRYPTO => h.has_crypto_header = true,
                EXT_DATA_FILE => {
                    h.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                _ => {}
            }
            off += padded;
        }
        if h.backing_file_offset != 0 {
            let (o, n) = (h.backing_file_offset, h.backing_file_size as u64);
            if n == 0 || n > 1023 || o.checked_add(n).is_none_or(|e| e > limit as u64) {
                return inval(format!(
                    "backing file name at {o:#x} ({n} bytes) is empty, longer than 1023 bytes or outside the first cluster"
                ));
            }
            let name = &b[o as usize..(o + n) as usize];
            h.backing = Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| Error::Invalid("backing file name is not UTF-8".into()))?,
            );
        }
        Ok(h)
    }

    /// Why cellvm-img will not change this image (None: it may).
    pub fn write_refusal(&self) -> Option<String> {
        if self.crypt_method != 0 {
            return Some(format!(
                "the image is encrypted (crypt_method {}); cellvm-img does not implement encryption",
                self.crypt_method
            ));
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return Some("incompatible bit 0 (dirty: lazy refcounts need a repair) is set; run `qemu-img check -r all` first".into());
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Some("incompatible bit 1 (corrupt) is set".into());
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 || self.data_file.is_some() {
            return Some(
                "incompatible bit 2 (external data file) is set; cellvm-img does not implement it"
                    .into(),
            );
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Some(
                "incompatible bit 4 (extended L2 entries) is set; cellvm-img does not implement it"
                    .into(),
            );
        }
        if self.incompatible & !INCOMPAT_KNOWN != 0 {
            return Some(format!(
                "unknown incompatible feature bits {:#x}",
                self.incompatible & !INCOMPAT_KNOWN
            ));
        }
        if self.has_bitmaps || self.autoclear & 1 != 0 {
            return Some("the image has persistent bitmaps (autoclear bit 0 / bitmaps extension); cellvm-img does not keep them consistent".into());
        }
        None
    }

    /// Why cellvm-img cannot read this image's data (None: it can).
    pub fn read_refusal(&self) -> Option<String> {
        if self.crypt_method != 0 {
            return Some(format!(
                "the image is encrypted (crypt_method {}); cellvm-img does not implement encryption",
                self.crypt_method
            ));
        }
        if self.incompatible & (INCOMPAT_DATA_FILE | INCOMPAT_EXTL2) != 0
            || self.data_file.is_some()
        {
            return Some("the image uses an external data file or extended L2 entries, which cellvm-img does not implement".into());
        }
        if self.compression_type != 0 {
            return Some(
                "the image uses zstd compression, which cellvm-img does not implement".into(),
            );
        }
        if self.incompatible & !INCOMPAT_KNOWN != 0 {
            return Some(format!(
                "unknown incompatible feature bits {:#x}",
                self.incompatible & !INCOMPAT_KNOWN
            ));
        }
        None
    }
}

/// A table at `off` of `bytes` bytes: cluster aligned, at most `max` bytes, inside the file.
pub fn check_table(
    what: &str,
    off: u64,
    bytes: u64,
    max: u64,
    cs: u64,
    file_len: u64,
) -> Result<()> {
    if bytes > max {
        return inval(format!(
            "{what} of {bytes} bytes exceeds the limit of {max}"
        ));
    }
    if !off.is_multiple_of(cs) {
        return inval(format!("{what} offset {off:#x} is not cluster aligned"));
    }
    if bytes > 0 && (off == 0 || off.checked_add(bytes).is_none_or(|e| e > file_len)) {
        return inval(format!(
            "{what} at {off:#x} ({bytes} bytes) lies outside the file ({file_len} bytes)"
        ));
    }
    Ok(())
}

/// One snapshot table entry.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    pub icount: Option<i64>,
    pub extra: Vec<u8>,
}

impl Snapshot {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(self.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        while !(out.len() - start).is_multiple_of(8) {
            out.push(0);
        }
    }
}

/// Parses the snapshot table (`n` entries at `off`), bounded by the file.
pub fn read_snapshots(
    f: &File,
    off: u64,
    n: u32,
    cs: u64,
    file_len: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::new();
    let mut pos = off;
    for i in 0..n {
        let mut fixed = [0u8; 40];
        if pos.checked_add(40).is_none_or(|e| e > file_len) {
            return inval(format!(
                "snapshot table entry {i} at {pos:#x} lies past the end of the file ({file_len} bytes)"
            ));
        }
        read_exact_at(f, &mut fixed, pos, "snapshot table")?;
        let extra_len = be32(&fixed, 36);
        let id_len = be16(&fixed, 12) as u64;
        let name_len = be16(&fixed, 14) as u64;
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return inval(format!(
                "snapshot {i}: extra data of {extra_len} bytes exceeds {MAX_SNAPSHOT_EXTRA}"
            ));
        }
        let var = extra_len as u64 + id_len + name_len;
        let end = pos + 40 + var;
        if end > file_len {
            return inval(format!(
                "snapshot table entry {i} runs past the end of the file ({file_len} bytes)"
            ));
        }
        let mut rest = vec![0u8; var as usize];
        read_exact_at(f, &mut rest, pos + 40, "snapshot table")?;
        let extra = rest[..extra_len as usize].to_vec();
        let id = String::from_utf8_lossy(
            &rest[extra_len as usize..(extra_len as u64 + id_len) as usize],
        )
        .into_owned();
        let name =
            String::from_utf8_lossy(&rest[(extra_len as u64 + id_len) as usize..]).into_owned();
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        check_table(
            &format!("snapshot {id} L1 table"),
            l1_table_offset,
            l1_size as u64 * 8,
            MAX_L1_BYTES,
            cs,
            file_len,
        )?;
        let vm_state_size = if extra.len() >= 8 {
            be64(&extra, 0)
        } else {
            be32(&fixed, 32) as u64
        };
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            disk_size: (extra.len() >= 16).then(|| be64(&extra, 8)),
            icount: (extra.len() >= 24).then(|| be64(&extra, 16) as i64),
            extra,
        });
        pos = end.div_ceil(8) * 8;
    }
    Ok((out, pos - off))
}

/// Where one guest cluster's data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    Unallocated,
    /// Reads as zero; `Some` when a host cluster is still allocated for it.
    Zero(Option<u64>),
    Data(u64),
    /// Compressed bytes at the host offset, of at most this length.
    Compressed(u64, u64),
}

/// Decodes an L2 entry.
pub fn decode_l2(e: u64, cluster_bits: u32, version: u32) -> Mapping {
    if e & COMPRESSED != 0 {
        let shift = 62 - (cluster_bits - 8);
        let off = e & ((1u64 << shift) - 1);
        let nsec = ((e >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        return Mapping::Compressed(off, nsec * 512 - (off & 511));
    }
    let off = e & L2E_OFFSET_MASK;
    if version >= 3 && e & ZERO != 0 {
        return Mapping::Zero((off != 0).then_some(off));
    }
    if off == 0 {
        Mapping::Unallocated
    } else {
        Mapping::Data(off)
    }
}

/// The host clusters a mapping occupies (first, count).
pub fn host_clusters(m: Mapping, cs: u64) -> Option<(u64, u64)> {
    match m {
        Mapping::Data(o) | Mapping::Zero(Some(o)) => Some((o / cs, 1)),
        Mapping::Compressed(o, len) => {
            let first = o / cs;
            let last = (o + len - 1) / cs;
            Some((first, last - first + 1))
        }
        _ => None,
    }
}

/// Inflates one compressed cluster (raw deflate) into `out`, which it must fill exactly.
pub fn inflate_cluster(input: &[u8], out: &mut [u8]) -> Result<()> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut d = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut d, input, out, 0, flags);
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
        _ => inval(format!(
            "compressed cluster does not inflate to a whole cluster ({status:?}, {written} of {} bytes)",
            out.len()
        )),
    }
}

/// Deflates one cluster (raw deflate, as the qcow2 spec's zlib type).
pub fn deflate_cluster(data: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec(data, 6)
}

/// A reference counts structure reading helper: refcount `i` of a refcount block.
pub fn rc_get(block: &[u8], i: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let o = i as usize * n;
        block[o..o + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64)
    } else {
        let bit = i * bits;
        let byte = block[(bit / 8) as usize];
        ((byte >> (bit % 8)) as u64) & ((1u64 << bits) - 1)
    }
}

pub fn rc_set(block: &mut [u8], i: u64, order: u32, v: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let o = i as usize * n;
        let bytes = v.to_be_bytes();
        block[o..o + n].copy_from_slice(&bytes[8 - n..]);
    } else {
        let bit = i * bits;
        let mask = ((1u64 << bits) - 1) as u8;
        let shift = (bit % 8) as u8;
        let b = &mut block[(bit / 8) as usize];
        *b = (*b & !(mask << shift)) | (((v as u8) & mask) << shift);
    }
}

/// An open qcow2 image.
pub struct Qcow2 {
    pub file: File,
    pub h: Header,
    pub file_len: u64,
    pub l1: Vec<u64>,
    pub reftable: Vec<u64>,
    pub snapshots: Vec<Snapshot>,
    pub snapshots_bytes: u64,
    l2_cache: HashMap<u64, (Vec<u64>, bool)>,
    rb_cache: HashMap<u64, (Vec<u8>, bool)>,
    l1_dirty: bool,
    reftable_dirty: bool,
    next_free: u64,
    pub writable: bool,
}

/// How many L2 tables the cache keeps before writing back and dropping them.
const L2_CACHE_MAX: usize = 512;

impl Qcow2 {
    /// Opens the image on `file`: the header, the L1 and refcount tables and the
    /// snapshot table, each bounded by the file.
    pub fn open(file: File, writable: bool) -> Result<Qcow2> {
        let file_len = file
            .metadata()
            .map_err(|e| Error::Io("reading the image's size".into(), e))?
            .len();
        let mut first = vec![0u8; file_len.min(2 << 20) as usize];
        read_exact_at(&file, &mut first, 0, "the header")?;
        let h = Header::parse(&first, file_len)?;
        if writable {
            if let Some(why) = h.write_refusal() {
                return Err(Error::Unsupported(why));
            }
        }
        let cs = h.cluster_size();
        let l1 = read_u64_table(&file, h.l1_table_offset, h.l1_size as u64, "the L1 table")?;
        let rt_entries = h.refcount_table_clusters as u64 * cs / 8;
        let reftable = read_u64_table(
            &file,
            h.refcount_table_offset,
            rt_entries,
            "the refcount table",
        )?;
        let (snapshots, snapshots_bytes) =
            read_snapshots(&file, h.snapshots_offset, h.nb_snapshots, cs, file_len)?;
        Ok(Qcow2 {
            file,
            h,
            file_len,
            l1,
            reftable,
            snapshots,
            snapshots_bytes,
            l2_cache: HashMap::new(),
            rb_cache: HashMap::new(),
            l1_dirty: false,
            reftable_dirty: false,
            next_free: 0,
            writable,
        })
    }

    pub fn cs(&self) -> u64 {
        self.h.cluster_size()
    }
    pub fn l2_entries(&self) -> u64 {
        self.cs() / 8
    }
    fn rb_entries(&self) -> u64 {
        (self.cs() * 8) >> self.h.refcount_order
    }
    pub fn refcount_max(&self) -> u64 {
        let bits = 1u64 << self.h.refcount_order;
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    /// A cluster-aligned offset of a whole cluster inside the file, or an error naming `what`.
    pub fn check_cluster(&self, off: u64, what: &str) -> Result<()> {
        let cs = self.cs();
        if !off.is_multiple_of(cs) {
            return inval(format!("{what} offset {off:#x} is not cluster aligned"));
        }
        if off.checked_add(cs).is_none_or(|e| e > self.file_len) {
            return inval(format!(
                "{what} at {off:#x} lies past the end of the file ({} bytes)",
                self.file_len
            ));
        }
        Ok(())
    }

    /// The L2 table at `off` (cached).
    pub fn l2(&mut self, off: u64) -> Result<&mut Vec<u64>> {
        if !self.l2_cache.contains_key(&off) {
            self.check_cluster(off, "L2 table")?;
            if self.l2_cache.len() >= L2_CACHE_MAX {
                self.flush_l2()?;
            }
            let t = read_u64_table(&self.file, off, self.l2_entries(), "an L2 table")?;
            self.l2_cache.insert(off, (t, false));
        }
        Ok(&mut self.l2_cache.get_mut(&off).expect("inserted above").0)
    }

    fn mark_l2_dirty(&mut self, off: u64) {
        if let Some(e) = self.l2_cache.get_mut(&off) {
            e.1 = true;
        }
    }

    /// Where guest cluster `vc` of the active L1 table lives.
    pub fn lookup(&mut self, vc: u64) -> Result<Mapping> {
        let l2e = self.l2_entries();
        let i = (vc / l2e) as usize;
        let Some(&l1e) = self.l1.get(i) else {
            return Ok(Mapping::Unallocated);
        };
        let l2off = l1e & L1E_OFFSET_MASK;
        if l2off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let (bits, ver) = (self.h.cluster_bits, self.h.version);
        let e = self.l2(l2off)?[(vc % l2e) as usize];
        Ok(decode_l2(e, bits, ver))
    }

    /// Bytes from guest offset `off` to the end of its L1 entry's span when that entry
    /// maps nothing (no L2 table), else None.
    pub fn unmapped_span(&self, off: u64) -> Option<u64> {
        let span = self.l2_entries() * self.cs();
        let i = (off / span) as usize;
        let empty = self.l1.get(i).is_none_or(|e| e & L1E_OFFSET_MASK == 0);
        empty.then(|| span - off % span)
    }

    /// Reads one guest cluster that this layer maps; `None` when it is unallocated here.
    pub fn read_cluster(&mut self, vc: u64, buf: &mut [u8]) -> Result<bool> {
        match self.lookup(vc)? {
            Mapping::Unallocated => Ok(false),
            Mapping::Zero(_) => {
                buf.fill(0);
                Ok(true)
            }
            Mapping::Data(off) => {
                if off % self.cs() != 0 {
                    return inval(format!(
                        "data cluster offset {off:#x} is not cluster aligned"
                    ));
                }
                if off >= self.file_len {
                    return inval(format!(
                        "data cluster at {off:#x} lies past the end of the file ({} bytes)",
                        self.file_len
                    ));
                }
                read_zero_padded(&self.file, buf, off)?;
                Ok(true)
            }
            Mapping::Compressed(off, len) => {
                if off >= self.file_len {
                    return inval(format!(
                        "compressed cluster at {off:#x} lies past the end of the file ({} bytes)",
                        self.file_len
                    ));
                }
                let len = len.min(self.file_len - off).min(2 * self.cs());
                let mut input = vec![0u8; len as usize];
                read_exact_at(&self.file, &mut input, off, "a compressed cluster")?;
                inflate_cluster(&input, buf)?;
                Ok(true)
            }
        }
    }

    // ----- refcounts -----

    fn refblock(&mut self, off: u64) -> Result<&mut (Vec<u8>, bool)> {
        if !self.rb_cache.contains_key(&off) {
            self.check_cluster(off, "refcount block")?;
            let mut b = vec![0u8; self.cs() as usize];
            read_exact_at(&self.file, &mut b, off, "a refcount block")?;
            self.rb_cache.insert(off, (b, false));
        }
        Ok(self.rb_cache.get_mut(&off).expect("inserted above"))
    }

    /// The stored refcount of host cluster `c`.
    pub fn refcount(&mut self, c: u64) -> Result<u64> {
        let per = self.rb_entries();
        let Some(&rt) = self.reftable.get((c / per) as usize) else {
            return Ok(0);
        };
        let off = rt & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let order = self.h.refcount_order;
        let b = self.refblock(off)?;
        Ok(rc_get(&b.0, c % per, order))
    }

    fn set_refcount(&mut self, c: u64, v: u64) -> Result<()> {
        let per = self.rb_entries();
        let ti = (c / per) as usize;
        let off = self.reftable.get(ti).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        if off == 0 {
            return inval(format!("cluster {c} has no refcount block"));
        }
        if v > self.refcount_max() {
            return Err(Error::Unsupported(format!(
                "refcount of cluster {c} would exceed {}",
                self.refcount_max()
            )));
        }
        let order = self.h.refcount_order;
        let b = self.refblock(off)?;
        rc_set(&mut b.0, c % per, order, v);
        b.1 = true;
        Ok(())
    }

    /// Adds `delta` (+1/-1) to cluster `c`'s refcount; a cluster that reaches 0 is free.
    pub fn adjust(&mut self, c: u64, delta: i64) -> Result<()> {
        let rc = self.refcount(c)?;
        let v = if delta < 0 {
            rc.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::Invalid(format!(
                    "refcount of cluster {c} would drop below 0 (it is {rc}); the image is corrupt"
                ))
            })?
        } else {
            rc + delta as u64
        };
        if v == 0 && delta < 0 {
            let cs = self.cs();
            self.l2_cache.remove(&(c * cs));
            self.next_free = self.next_free.min(c);
        }
        self.set_refcount(c, v)
    }

    /// Makes sure cluster `c` has a refcount block; if one has to be made, it takes
    /// cluster `c` itself (free, since its refcount block did not exist) and true comes back.
    fn ensure_refblock(&mut self, c: u64) -> Result<bool> {
        let per = self.rb_entries();
        let ti = (c / per) as usize;
        if ti >= self.reftable.len() {
            return Err(Error::Unsupported(
                "the refcount table is full; cellvm-img does not grow it (qemu-img can)".into(),
            ));
        }
        if self.reftable[ti] & REFT_OFFSET_MASK != 0 {
            return Ok(false);
        }
        let cs = self.cs();
        let off = c * cs;
        self.rb_cache.insert(off, (vec![0u8; cs as usize], true));
        self.reftable[ti] = off;
        self.reftable_dirty = true;
        self.set_refcount(c, 1)?;
        self.grow_file((c + 1) * cs)?;
        Ok(true)
    }

    fn grow_file(&mut self, end: u64) -> Result<()> {
        if end > self.file_len {
            self.file
                .set_len(end)
                .map_err(|e| Error::Io("growing the image".into(), e))?;
            self.file_len = end;
        }
        Ok(())
    }

    /// Allocates `n` contiguous free clusters (refcount 1) and returns the first one's offset.
    pub fn alloc(&mut self, n: u64) -> Result<u64> {
        let cs = self.cs();
        let mut start = self.next_free;
        let mut c = start;
        while c - start < n {
            if self.ensure_refblock(c)? {
                c += 1;
                start = c;
                continue;
            }
            c += 1;
            if self.refcount(c - 1)? != 0 {
                start = c;
            }
        }
        for i in start..start + n {
            self.set_refcount(i, 1)?;
        }
        self.next_free = start + n;
        self.grow_file((start + n) * cs)?;
        Ok(start * cs)
    }

    /// Allocates and zeroes `n` clusters.
    pub fn alloc_zeroed(&mut self, n: u64) -> Result<u64> {
        let off = self.alloc(n)?;
        let zero = vec![0u8; (n * self.cs()) as usize];
        write_all_at(&self.file, &zero, off, "new clusters")?;
        Ok(off)
    }

    /// Stores the L2 entry for guest cluster `vc` in the active table, allocating the L2
    /// table if needed. Only for L2 tables the active layer owns alone (COPIED).
    pub fn set_l2_entry(&mut self, vc: u64, entry: u64) -> Result<()> {
        let l2e = self.l2_entries();
        let i = (vc / l2e) as usize;
        if i >= self.l1.len() {
            return inval(format!("guest cluster {vc} lies past the L1 table"));
        }
        let mut l2off = self.l1[i] & L1E_OFFSET_MASK;
        if l2off == 0 {
            l2off = self.alloc(1)?;
            self.l2_cache
                .insert(l2off, (vec![0u64; l2e as usize], true));
            self.l1[i] = l2off | COPIED;
            self.l1_dirty = true;
        } else if self.l1[i] & COPIED == 0 {
            return Err(Error::Unsupported(
                "writing through an L2 table shared with a snapshot".into(),
            ));
        }
        self.l2(l2off)?[(vc % l2e) as usize] = entry;
        self.mark_l2_dirty(l2off);
        Ok(())
    }

    /// Adds `delta` to the refcount of every L2 table and data cluster `l1` reaches.
    pub fn update_refs(&mut self, l1: &[u64], delta: i64) -> Result<()> {
        let (cs, bits, ver) = (self.cs(), self.h.cluster_bits, self.h.version);
        for &l1e in l1 {
            let l2off = l1e & L1E_OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            let table = self.l2(l2off)?.clone();
            for e in table {
                if let Some((first, n)) = host_clusters(decode_l2(e, bits, ver), cs) {
                    for c in first..first + n {
                        self.adjust(c, delta)?;
                    }
                }
            }
            self.adjust(l2off / cs, delta)?;
        }
        Ok(())
    }

    /// Sets the COPIED flags of the active L1 table and the L2 tables it reaches from the
    /// stored refcounts (refcount 1: COPIED).
    pub fn fix_copied(&mut self) -> Result<()> {
        let (cs, bits, ver) = (self.cs(), self.h.cluster_bits, self.h.version);
        for i in 0..self.l1.len() {
            let l2off = self.l1[i] & L1E_OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            let want = if self.refcount(l2off / cs)? == 1 {
                COPIED
            } else {
                0
            };
            if self.l1[i] & COPIED != want {
                self.l1[i] = (self.l1[i] & !COPIED) | want;
                self.l1_dirty = true;
            }
            let mut table = self.l2(l2off)?.clone();
            let mut changed = false;
            for e in table.iter_mut() {
                match decode_l2(*e, bits, ver) {
                    Mapping::Data(o) | Mapping::Zero(Some(o)) => {
                        let want = if self.refcount(o / cs)? == 1 {
                            COPIED
                        } else {
                            0
                        };
                        if *e & COPIED != want {
                            *e = (*e & !COPIED) | want;
                            changed = true;
                        }
                    }
                    _ => {}
                }
            }
            if changed {
                *self.l2(l2off)? = table;
                self.mark_l2_dirty(l2off);
            }
        }
        Ok(())
    }

    pub fn set_l1_dirty(&mut self) {
        self.l1_dirty = true;
    }

    fn flush_l2(&mut self) -> Result<()> {
        self.flush_refblocks()?;
        for (off, (t, dirty)) in self.l2_cache.iter_mut() {
            if *dirty {
                write_u64_table(&self.file, *off, t, "an L2 table")?;
                *dirty = false;
            }
        }
        self.l2_cache.clear();
        Ok(())
    }

    fn flush_refblocks(&mut self) -> Result<()> {
        for (off, (b, dirty)) in self.rb_cache.iter_mut() {
            if *dirty {
                write_all_at(&self.file, b, *off, "a refcount block")?;
                *dirty = false;
            }
        }
        if self.reftable_dirty {
            write_u64_table(
                &self.file,
                self.h.refcount_table_offset,
                &self.reftable,
                "the refcount table",
            )?;
            self.reftable_dirty = false;
        }
        Ok(())
    }

    /// Writes back every cached table: refcounts, then L2 tables, then the L1 table.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_refblocks()?;
        self.flush_l2()?;
        if self.l1_dirty {
            write_u64_table(&self.file, self.h.l1_table_offset, &self.l1, "the L1 table")?;
            self.l1_dirty = false;
        }
        Ok(())
    }

    /// Rewrites the header fields cellvm-img changes (size, L1, snapshot table).
    pub fn write_header_fields(&mut self) -> Result<()> {
        let mut b = [0u8; 48];
        b[0..8].copy_from_slice(&self.h.size.to_be_bytes());
        b[8..12].copy_from_slice(&self.h.crypt_method.to_be_bytes());
        b[12..16].copy_from_slice(&self.h.l1_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.h.l1_table_offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.h.refcount_table_offset.to_be_bytes());
        b[32..36].copy_from_slice(&self.h.refcount_table_clusters.to_be_bytes());
        b[36..40].copy_from_slice(&self.h.nb_snapshots.to_be_bytes());
        b[40..48].copy_from_slice(&self.h.snapshots_offset.to_be_bytes());
        write_all_at(&self.file, &b, 24, "the header")
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::Io("syncing the image".into(), e))
    }

    /// Replaces the active L1 table by a copy `entries` long in newly allocated clusters,
    /// freeing the old one.
    pub fn relocate_l1(&mut self, entries: u64) -> Result<()> {
        let cs = self.cs();
        if entries * 8 > MAX_L1_BYTES {
            return inval(format!(
                "an L1 table of {entries} entries exceeds the limit"
            ));
        }
        let old_off = self.h.l1_table_offset;
        let old_clusters = (self.h.l1_size as u64 * 8).div_ceil(cs);
        let new_clusters = (entries * 8).div_ceil(cs).max(1);
        self.l1.resize(entries as usize, 0);
        let new_off = self.alloc_zeroed(new_clusters)?;
        self.flush()?;
        write_u64_table(&self.file, new_off, &self.l1, "the L1 table")?;
        self.h.l1_table_offset = new_off;
        self.h.l1_size = entries as u32;
        self.write_header_fields()?;
        if old_off != 0 {
            for c in 0..old_clusters {
                self.adjust(old_off / cs + c, -1)?;
            }
        }
        self.flush()
    }
}

pub fn read_u64_table(f: &File, off: u64, n: u64, what: &str) -> Result<Vec<u64>> {
    let mut b = vec![0u8; (n * 8) as usize];
    read_exact_at(f, &mut b, off, what)?;
    Ok(b.chunks_exact(8).map(|c| be64(c, 0)).collect())
}

pub fn write_u64_table(f: &File, off: u64, t: &[u64], what: &str) -> Result<()> {
    let mut b = Vec::with_capacity(t.len() * 8);
    for v in t {
        b.extend_from_slice(&v.to_be_bytes());
    }
    write_all_at(f, &b, off, what)
}
