//! The qcow2 header: format detection and the checks the jailer, the blk backend and
//! `cellvm-img` share.
//!
//! The layout follows QEMU's `docs/interop/qcow2.txt`: a big-endian header in the first
//! cluster, header extensions directly after it (up to the backing file name or the end of
//! the first cluster), and the backing file name inside the first cluster. Everything here
//! is image input, so every field is checked against the bytes actually given and against
//! the limits QEMU itself applies; nothing indexes without a bound, nothing allocates more
//! than the bytes given, and no input makes it panic.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

/// The four bytes every qcow2 image starts with.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The bytes callers read before parsing: the header and what it points to in cluster 0.
/// Callers pass `min(file size, HEADER_READ_MAX)` bytes from offset 0.
pub const HEADER_READ_MAX: usize = 2 << 20;

/// Header extension types (qcow2.txt, "Header extensions").
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
pub const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_EXTERNAL_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Autoclear feature bits.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// The longest backing file name the format allows.
pub const BACKING_NAME_MAX: u32 = 1023;
/// QEMU's limits on the tables the header points to.
const L1_MAX_BYTES: u64 = 32 << 20;
const REFTABLE_MAX_BYTES: u64 = 8 << 20;
const SNAPSHOTS_MAX: u32 = 65536;
/// The fixed part of a version 2 header and of a version 3 header.
const V2_HEADER_LEN: u32 = 72;
const V3_HEADER_LEN: u32 = 104;
/// The largest file offset or size the format can address (QEMU uses signed 64-bit offsets).
const OFFSET_MAX: u64 = i64::MAX as u64;

/// An image format cellvm serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

impl FromStr for Format {
    type Err = HeaderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(HeaderError::UnknownFormat(printable(other.as_bytes()))),
        }
    }
}

/// What the first bytes of an image say it is: the qcow2 magic means qcow2, anything else
/// (including fewer than four bytes) raw. This never decides what to serve on its own; the
/// jailer compares it with the format the VM spec claims.
pub fn detect(first_bytes: &[u8]) -> Format {
    if first_bytes.get(..4) == Some(&QCOW2_MAGIC[..]) {
        Format::Qcow2
    } else {
        Format::Raw
    }
}

/// Why a header is not a well-formed qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("qcow2 header: {need} bytes needed, only {have} given")]
    Truncated { need: u64, have: usize },
    #[error("qcow2 header: no qcow2 magic")]
    NotQcow2,
    #[error("qcow2 header: {field} {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("unknown image format \"{0}\" (raw or qcow2)")]
    UnknownFormat(String),
}

fn invalid(field: &'static str, detail: impl Into<String>) -> HeaderError {
    HeaderError::Invalid {
        field,
        detail: detail.into(),
    }
}

/// A backing file as the header names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    /// The name exactly as stored: UTF-8, 1..=1023 bytes, no NUL. Not yet resolved or trusted.
    pub name: String,
    /// The backing format extension, if the image has one.
    pub format: Option<Format>,
}

/// A parsed, bounds-checked qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// The virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing: Option<Backing>,
    pub external_data_file: Option<String>,
    pub has_bitmaps_extension: bool,
    /// LUKS (crypt_method 2): where the encryption header lies in the file, and its
    /// length (the full disk encryption extension; cluster-aligned, checked).
    pub encryption_header: Option<(u64, u64)>,
}

/// Big-endian reads that cannot go out of bounds: the caller checked the length first, and
/// a short slice reads as an error rather than a panic all the same.
fn be32(bytes: &[u8], at: usize) -> Result<u32, HeaderError> {
    let end = at.checked_add(4).ok_or(HeaderError::Truncated {
        need: u64::MAX,
        have: bytes.len(),
    })?;
    let b = bytes.get(at..end).ok_or(HeaderError::Truncated {
        need: end as u64,
        have: bytes.len(),
    })?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(bytes: &[u8], at: usize) -> Result<u64, HeaderError> {
    let hi = be32(bytes, at)?;
    let lo = be32(bytes, at.saturating_add(4))?;
    Ok((u64::from(hi) << 32) | u64::from(lo))
}

/// A name or byte string for an error message: printable ASCII kept, the rest as `\xNN`,
/// at most 64 bytes shown.
fn printable(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes.iter().take(64) {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    if bytes.len() > 64 {
        out.push_str("...");
    }
    out
}

fn aligned(offset: u64, cluster_size: u64) -> bool {
    offset & (cluster_size - 1) == 0
}

/// Checks that a table of `len` bytes at `offset` is cluster-aligned and ends within the
/// addressable range.
fn check_table(
    field: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
) -> Result<(), HeaderError> {
    if !aligned(offset, cluster_size) {
        return Err(invalid(
            field,
            format!("= {offset:#x} is not aligned to the cluster size {cluster_size}"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= OFFSET_MAX => Ok(()),
        _ => Err(invalid(
            field,
            format!("= {offset:#x} with {len} bytes ends past the largest file offset"),
        )),
    }
}

/// Parses and checks a qcow2 header from the first bytes of an image (`min(file size,
/// HEADER_READ_MAX)` of them).
pub fn parse(bytes: &[u8]) -> Result<Qcow2Header, HeaderError> {
    if bytes.len() < 4 {
        return Err(HeaderError::Truncated {
            need: 4,
            have: bytes.len(),
        });
    }
    if detect(bytes) != Format::Qcow2 {
        return Err(HeaderError::NotQcow2);
    }
    if bytes.len() < V2_HEADER_LEN as usize {
        return Err(HeaderError::Truncated {
            need: u64::from(V2_HEADER_LEN),
            have: bytes.len(),
        });
    }
    let version = be32(bytes, 4)?;
    if version != 2 && version != 3 {
        return Err(invalid("version", format!("= {version} (2 or 3)")));
    }
    let backing_file_offset = be64(bytes, 8)?;
    let backing_file_size = be32(bytes, 16)?;
    let cluster_bits = be32(bytes, 20)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(
            "cluster_bits",
            format!("= {cluster_bits} is outside 9..=21"),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = be64(bytes, 24)?;
    let crypt_method = be32(bytes, 32)?;
    if crypt_method > 2 {
        return Err(invalid(
            "crypt_method",
            format!("= {crypt_method} (0 none, 1 AES, 2 LUKS)"),
        ));
    }
    let l1_size = be32(bytes, 36)?;
    let l1_table_offset = be64(bytes, 40)?;
    let refcount_table_offset = be64(bytes, 48)?;
    let refcount_table_clusters = be32(bytes, 56)?;
    let nb_snapshots = be32(bytes, 60)?;
    let snapshots_offset = be64(bytes, 64)?;

    let (incompatible_features, compatible_features, autoclear_features);
    let (refcount_order, header_length, mut compression_type);
    if version == 2 {
        incompatible_features = 0;
        compatible_features = 0;
        autoclear_features = 0;
        refcount_order = 4;
        header_length = V2_HEADER_LEN;
        compression_type = 0;
    } else {
        if bytes.len() < V3_HEADER_LEN as usize {
            return Err(HeaderError::Truncated {
                need: u64::from(V3_HEADER_LEN),
                have: bytes.len(),
            });
        }
        incompatible_features = be64(bytes, 72)?;
        compatible_features = be64(bytes, 80)?;
        autoclear_features = be64(bytes, 88)?;
        refcount_order = be32(bytes, 96)?;
        header_length = be32(bytes, 100)?;
        compression_type = 0;
        if header_length < V3_HEADER_LEN || header_length % 8 != 0 {
            return Err(invalid(
                "header_length",
                format!("= {header_length} (at least {V3_HEADER_LEN}, a multiple of 8)"),
            ));
        }
        if u64::from(header_length) > cluster_size {
            return Err(invalid(
                "header_length",
                format!("= {header_length} exceeds the cluster size {cluster_size}"),
            ));
        }
        if header_length as usize > bytes.len() {
            return Err(HeaderError::Truncated {
                need: u64::from(header_length),
                have: bytes.len(),
            });
        }
        if header_length > V3_HEADER_LEN {
            compression_type = bytes[V3_HEADER_LEN as usize];
        }
    }
    if refcount_order > 6 {
        return Err(invalid(
            "refcount_order",
            format!("= {refcount_order} exceeds 6 (64-bit refcounts)"),
        ));
    }
    if compression_type > 1 {
        return Err(invalid(
            "compression_type",
            format!("= {compression_type} (0 zlib, 1 zstd)"),
        ));
    }
    let compression_bit = incompatible_features & INCOMPAT_COMPRESSION_TYPE != 0;
    if compression_bit != (compression_type != 0) {
        return Err(invalid(
            "compression_type",
            format!(
                "= {compression_type} disagrees with incompatible bit 3 ({})",
                if compression_bit { "set" } else { "clear" }
            ),
        ));
    }
    let extended_l2 = incompatible_features & INCOMPAT_EXTENDED_L2 != 0;
    if extended_l2 && cluster_bits < 14 {
        return Err(invalid(
            "incompatible_features",
            "bit 4 (extended L2) needs clusters of at least 16 KiB",
        ));
    }

    // The virtual size, and the L1 table it needs.
    if size > OFFSET_MAX {
        return Err(invalid(
            "size",
            format!("= {size} exceeds the largest disk size {OFFSET_MAX}"),
        ));
    }
    let l2_entries = cluster_size / if extended_l2 { 16 } else { 8 };
    let bytes_per_l1 = cluster_size * l2_entries; // at most 2^21 * 2^18: no overflow
    let l1_needed = size.div_ceil(bytes_per_l1);
    if u64::from(l1_size) * 8 > L1_MAX_BYTES {
        return Err(invalid(
            "l1_size",
            format!(
                "= {l1_size} entries exceeds the largest L1 table ({} entries)",
                L1_MAX_BYTES / 8
            ),
        ));
    }
    if u64::from(l1_size) < l1_needed {
        if l1_needed * 8 > L1_MAX_BYTES {
            return Err(invalid(
                "size",
                format!(
                    "= {size} needs {l1_needed} L1 entries at {cluster_size}-byte clusters, \
                     more than the largest L1 table holds ({})",
                    L1_MAX_BYTES / 8
                ),
            ));
        }
        return Err(invalid(
            "l1_size",
            format!("= {l1_size} is too small for a virtual size of {size} ({l1_needed} needed)"),
        ));
    }
    if l1_size > 0 || l1_table_offset != 0 {
        check_table(
            "l1_table_offset",
            l1_table_offset,
            u64::from(l1_size) * 8,
            cluster_size,
        )?;
    }
    if refcount_table_clusters == 0 {
        return Err(invalid("refcount_table_clusters", "= 0: no refcount table"));
    }
    let reftable_bytes = u64::from(refcount_table_clusters) * cluster_size;
    if reftable_bytes > REFTABLE_MAX_BYTES.max(cluster_size) {
        return Err(invalid(
            "refcount_table_clusters",
            format!(
                "= {refcount_table_clusters} exceeds the largest refcount table \
                 ({REFTABLE_MAX_BYTES} bytes)"
            ),
        ));
    }
    if refcount_table_offset == 0 {
        return Err(invalid("refcount_table_offset", "= 0: no refcount table"));
    }
    check_table(
        "refcount_table_offset",
        refcount_table_offset,
        reftable_bytes,
        cluster_size,
    )?;
    if nb_snapshots > SNAPSHOTS_MAX {
        return Err(invalid(
            "nb_snapshots",
            format!("= {nb_snapshots} exceeds {SNAPSHOTS_MAX}"),
        ));
    }
    if nb_snapshots > 0 {
        // Each table entry is at least 40 bytes; the table's full length is only known
        // from its entries, which live outside the header.
        check_table(
            "snapshots_offset",
            snapshots_offset,
            u64::from(nb_snapshots) * 40,
            cluster_size,
        )?;
    }

    // The backing file name: inside the first cluster and inside the bytes given.
    let mut backing_name = None;
    let ext_end_claimed = if backing_file_offset != 0 {
        if backing_file_size == 0 || backing_file_size > BACKING_NAME_MAX {
            return Err(invalid(
                "backing_file_size",
                format!("= {backing_file_size} (1..={BACKING_NAME_MAX})"),
            ));
        }
        let end = backing_file_offset.saturating_add(u64::from(backing_file_size));
        if backing_file_offset < u64::from(header_length) || end > cluster_size {
            return Err(invalid(
                "backing_file_offset",
                format!(
                    "= {backing_file_offset} with {backing_file_size} bytes lies outside the \
                     first cluster after the header ({header_length}..{cluster_size})"
                ),
            ));
        }
        if end > bytes.len() as u64 {
            return Err(HeaderError::Truncated {
                need: end,
                have: bytes.len(),
            });
        }
        let raw = &bytes[backing_file_offset as usize..end as usize];
        if raw.contains(&0) {
            return Err(invalid(
                "backing file name",
                format!("\"{}\" contains a NUL byte", printable(raw)),
            ));
        }
        let name = std::str::from_utf8(raw).map_err(|_| {
            invalid(
                "backing file name",
                format!("\"{}\" is not UTF-8", printable(raw)),
            )
        })?;
        backing_name = Some(name.to_owned());
        backing_file_offset
    } else {
        cluster_size
    };

    // Header extensions, from the end of the header to the backing name (or the end of the
    // first cluster), each bounded by that end and by the bytes given.
    let ext_end = ext_end_claimed.min(cluster_size);
    let mut offset = u64::from(header_length);
    let mut backing_format: Option<Format> = None;
    let mut external_data_file = None;
    let mut has_bitmaps_extension = false;
    let mut seen_fde = false;
    let mut encryption_header = None;
    let mut seen_feature_table = false;
    loop {
        if offset.saturating_add(8) > ext_end {
            return Err(invalid(
                "header extensions",
                format!("reach offset {offset} without an end marker (limit {ext_end})"),
            ));
        }
        if offset.saturating_add(8) > bytes.len() as u64 {
            return Err(HeaderError::Truncated {
                need: offset.saturating_add(8),
                have: bytes.len(),
            });
        }
        let at = offset as usize;
        let kind = be32(bytes, at)?;
        let len = be32(bytes, at + 4)?;
        let data_start = offset + 8;
        if kind == EXT_END {
            break;
        }
        let data_end = data_start + u64::from(len);
        if data_end > ext_end {
            return Err(invalid(
                "header extensions",
                format!(
                    "extension {kind:#010x} of {len} bytes at offset {offset} runs past {ext_end}"
                ),
            ));
        }
        if data_end > bytes.len() as u64 {
            return Err(HeaderError::Truncated {
                need: data_end,
                have: bytes.len(),
            });
        }
        let data = &bytes[data_start as usize..data_end as usize];
        match kind {
            EXT_BACKING_FORMAT => {
                if backing_format.is_some() {
                    return Err(invalid(
                        "header extensions",
                        "two backing format extensions",
                    ));
                }
                let name = std::str::from_utf8(data)
                    .ok()
                    .and_then(|s| s.parse::<Format>().ok())
                    .ok_or_else(|| {
                        invalid(
                            "backing format",
                            format!("\"{}\" is not raw or qcow2", printable(data)),
                        )
                    })?;
                backing_format = Some(name);
            }
            EXT_FEATURE_TABLE => {
                if seen_feature_table {
                    return Err(invalid("header extensions", "two feature name tables"));
                }
                seen_feature_table = true;
                if len % 48 != 0 {
                    return Err(invalid(
                        "feature name table",
                        format!("length {len} is not a multiple of 48"),
                    ));
                }
            }
            EXT_BITMAPS => {
                if has_bitmaps_extension {
                    return Err(invalid("header extensions", "two bitmaps extensions"));
                }
                has_bitmaps_extension = true;
                if len < 24 {
                    return Err(invalid(
                        "bitmaps extension",
                        format!("length {len} is shorter than 24"),
                    ));
                }
            }
            EXT_FULL_DISK_ENCRYPTION => {
                if seen_fde {
                    return Err(invalid(
                        "header extensions",
                        "two encryption header pointers",
                    ));
                }
                seen_fde = true;
                if len != 16 {
                    return Err(invalid(
                        "full disk encryption extension",
                        format!("length {len} (16)"),
                    ));
                }
                let fde_offset = be64(data, 0)?;
                let fde_len = be64(data, 8)?;
                check_table(
                    "full disk encryption header offset",
                    fde_offset,
                    fde_len,
                    cluster_size,
                )?;
                encryption_header = Some((fde_offset, fde_len));
            }
            EXT_EXTERNAL_DATA_FILE => {
                if external_data_file.is_some() {
                    return Err(invalid("header extensions", "two external data file names"));
                }
                let name = std::str::from_utf8(data)
                    .ok()
                    .filter(|s| !s.contains('\0'))
                    .ok_or_else(|| {
                        invalid(
                            "external data file name",
                            format!("\"{}\" is not a UTF-8 name", printable(data)),
                        )
                    })?;
                external_data_file = Some(name.to_owned());
            }
            _ => {} // unknown extensions may be ignored (the spec says so)
        }
        // Each extension's data is padded to a multiple of 8 bytes.
        offset = data_start + u64::from(len).div_ceil(8) * 8;
    }

    if crypt_method == 2 && !seen_fde {
        return Err(invalid(
            "crypt_method",
            "= 2 (LUKS) without a full disk encryption header pointer",
        ));
    }
    if crypt_method != 2 && seen_fde {
        return Err(invalid(
            "full disk encryption extension",
            format!("present but crypt_method = {crypt_method}"),
        ));
    }
    let data_file_bit = incompatible_features & INCOMPAT_EXTERNAL_DATA_FILE != 0;
    if external_data_file.is_some() && !data_file_bit {
        return Err(invalid(
            "external data file name",
            "present but incompatible bit 2 (external data file) is clear",
        ));
    }

    Ok(Qcow2Header {
        version,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible_features,
        compatible_features,
        autoclear_features,
        refcount_order,
        header_length,
        compression_type,
        backing: backing_name.map(|name| Backing {
            name,
            format: backing_format,
        }),
        external_data_file,
        has_bitmaps_extension,
        encryption_header,
    })
}

impl Qcow2Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(21)
    }

    /// Why cellvm refuses to serve this image without a key (None: it may), naming the
    /// field or bit. An encrypted image is always refused here: served without its key
    /// it would hand the guest ciphertext.
    pub fn refusal(&self, writable: bool) -> Option<String> {
        self.refusal_keyed(writable, false)
    }

    /// As [`Qcow2Header::refusal`], for an image served with a key (`keyed`): a LUKS
    /// image is served then, and an image that is not encrypted is refused (a key given
    /// for it is a mistake in the spec).
    pub fn refusal_keyed(&self, writable: bool, keyed: bool) -> Option<String> {
        match (self.crypt_method, keyed) {
            (0, false) | (2, true) => {}
            (0, true) => {
                return Some(
                    "a key was given, but the image is not encrypted (crypt_method = 0)".into(),
                )
            }
            (1, _) => {
                return Some(
                    "crypt_method = 1 (legacy AES): not served; re-encrypt it as LUKS \
                     (qemu-img convert -O qcow2 -o encrypt.format=luks)"
                        .into(),
                )
            }
            (2, false) => {
                return Some(
                    "crypt_method = 2 (LUKS): the image is encrypted and no key was given \
                     (key_secret in the VM spec)"
                        .into(),
                )
            }
            (m, _) => return Some(format!("crypt_method = {m} is unknown")),
        }
        let incompat = self.incompatible_features;
        if incompat & INCOMPAT_DIRTY != 0 {
            return Some(
                "incompatible bit 0 (dirty): refcounts need repair (qemu-img check -r all)".into(),
            );
        }
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Some("incompatible bit 1 (corrupt): the image is marked corrupt".into());
        }
        if incompat & INCOMPAT_EXTERNAL_DATA_FILE != 0 || self.external_data_file.is_some() {
            return Some("incompatible bit 2 (external data file) is not supported".into());
        }
        if incompat & INCOMPAT_EXTENDED_L2 != 0 {
            return Some("incompatible bit 4 (extended L2) is not supported".into());
        }
        if self.compression_type != 0 {
            return Some(format!(
                "compression_type = {} (zstd) is not supported; only zlib",
                self.compression_type
            ));
        }
        let unknown = incompat
            & !(INCOMPAT_DIRTY
                | INCOMPAT_CORRUPT
                | INCOMPAT_EXTERNAL_DATA_FILE
                | INCOMPAT_COMPRESSION_TYPE
                | INCOMPAT_EXTENDED_L2);
        if unknown != 0 {
            return Some(format!(
                "incompatible bit {} is unknown",
                unknown.trailing_zeros()
            ));
        }
        if writable
            && (self.autoclear_features & AUTOCLEAR_BITMAPS != 0 || self.has_bitmaps_extension)
        {
            return Some(
                "autoclear bit 0 (persistent bitmaps): a writable disk would invalidate them; \
                 serve it read-only or remove them (qemu-img bitmap --remove)"
                    .into(),
            );
        }
        None
    }

    /// The bytes one fully allocated copy of the virtual disk takes at this cluster size:
    /// every data cluster, every L2 table, the L1 table.
    fn full_allocation(&self) -> u128 {
        let cs = u128::from(self.cluster_size());
        let size = u128::from(self.size);
        let l2_entry = if self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            16
        } else {
            8
        };
        let data = size.div_ceil(cs) * cs;
        let l2_tables = size.div_ceil(cs * (cs / l2_entry));
        let l1 = (u128::from(self.l1_size) * 8).div_ceil(cs) * cs;
        data + l2_tables * cs + l1
    }

    /// Refcount blocks and table for `bytes` of clusters, counted generously (the table may
    /// be reallocated once while it grows, so it is counted twice).
    fn refcount_overhead(&self, bytes: u128) -> u128 {
        let cs = u128::from(self.cluster_size());
        let clusters = bytes.div_ceil(cs);
        let per_block = cs * 8 / (1u128 << self.refcount_order.min(6));
        let blocks = clusters.div_ceil(per_block) + 1;
        let table = (blocks * 8).div_ceil(cs) + 1;
        (blocks + 2 * table) * cs
    }

    /// How much an image with this header may grow when the whole virtual disk is written:
    /// a new data cluster for every guest cluster (copy-on-write from snapshots or backing
    /// files allocates each at most once), every L2 table, the refcount structures for them,
    /// with slack. The jailer adds this to the file's current length for RLIMIT_FSIZE.
    pub fn max_growth_bytes(&self) -> u64 {
        let cs = u128::from(self.cluster_size());
        let alloc = self.full_allocation();
        let total = alloc + self.refcount_overhead(alloc);
        let slack = total / 256 + 16 * cs;
        u64::try_from(total + slack).unwrap_or(u64::MAX)
    }

    /// The most bytes the image file may grow to when written (for RLIMIT_FSIZE): virtual
    /// size + all metadata at this cluster size + snapshots' share, with slack. Each internal
    /// snapshot is counted as a full copy of the disk and its L1 table; vmstate saved with a
    /// snapshot is not known from the header alone, so callers that know the file's length
    /// use `max(max_file_bytes(), len + max_growth_bytes())`.
    pub fn max_file_bytes(&self) -> u64 {
        let cs = u128::from(self.cluster_size());
        let alloc = self.full_allocation();
        let copies = 1 + u128::from(self.nb_snapshots);
        let tables = u128::from(self.refcount_table_clusters) * cs;
        // The header cluster, the snapshot table (at most 64 KiB of fixed fields plus names
        // per snapshot is far above what QEMU writes; 1 KiB each is generous).
        let snapshot_table = (u128::from(self.nb_snapshots) * 1024).div_ceil(cs) * cs;
        let body = alloc * copies + tables + snapshot_table + cs;
        let total = body + self.refcount_overhead(body);
        let slack = total / 256 + 16 * cs;
        u64::try_from(total + slack).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests;
