//! qcow2 on imago, from descriptors only.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, ShallowMapping};

use crate::header::{self, Format, Qcow2Header};
use crate::image::{DiskImage, OpenError, Slice, SECTOR};
use crate::luks;

type Storage = crate::bounded::Bounded;
type Access = FormatAccess<Storage>;
type Qcow2Driver = imago::qcow2::Qcow2<Storage, Box<Access>>;

/// The most virtual bytes a qcow2 image may have here: what imago can address (2^56).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

/// A layer below the top: an open, read-only descriptor and the format the launcher found.
pub struct Layer {
    pub file: File,
    pub format: Format,
}

/// A qcow2 image and its backing chain.
pub struct Qcow2 {
    /// Reads and writes share it; a discard holds it alone, so no request keeps a
    /// mapping a discard frees.
    access: RwLock<Access>,
    size: u64,
    /// The top file, for giving freed clusters' space back (imago frees them in the
    /// refcounts only).
    top: File,
    cluster_size: u64,
    /// qcow2 v2 has no zero clusters, and imago no discard for it: zeroes are written as
    /// data.
    v2: bool,
    /// LUKS: the unlocked data cipher. imago knows nothing of encryption, so an encrypted
    /// image's data goes through `crypt` (see "Encryption" below).
    crypt: Option<luks::Cipher>,
}

/// How messages name layer `i` of a chain (0: the top).
fn layer_name(i: usize) -> String {
    if i == 0 {
        "image".into()
    } else {
        format!("backing layer {i}")
    }
}

/// Reads and checks a qcow2 layer's header before imago sees the file.
fn checked_header(
    file: &File,
    i: usize,
    writable: bool,
    keyed: bool,
) -> Result<Qcow2Header, OpenError> {
    let name = layer_name(i);
    let len = file
        .metadata()
        .map_err(OpenError::io(format!("{name}: size")))?
        .len();
    let n = len.min(header::HEADER_READ_MAX as u64) as usize;
    let mut bytes = vec![0u8; n];
    file.read_exact_at(&mut bytes, 0)
        .map_err(OpenError::io(format!("{name}: reading the header")))?;
    let h = header::parse(&bytes).map_err(|e| OpenError::Refused(format!("{name}: {e}")))?;
    if let Some(why) = h.refusal_keyed(writable, keyed) {
        return Err(OpenError::Refused(format!("{name}: {why}")));
    }
    check_bounds(&h, len).map_err(|why| OpenError::Refused(format!("{name}: {why}")))?;
    if writable {
        check_refcount_cover(&h, len)
            .and_then(|()| check_refcount_blocks(file, &h, len))
            .map_err(|why| OpenError::Refused(format!("{name}: {why}")))?;
    }
    Ok(h)
}

/// Every cluster the file already holds must have its refcount block: a table entry
/// that is empty, misaligned or outside the file for bytes the file has means its
/// refcounts are missing, and imago 0.2.6, asked to allocate on such an image, recurses
/// without end (the `qcow2_image` fuzz target found it with a table of zeros).
fn check_refcount_blocks(file: &File, h: &Qcow2Header, file_len: u64) -> Result<(), String> {
    let cluster = 1u64 << h.cluster_bits;
    let per_block = cluster.saturating_mul(8) >> h.refcount_order;
    let block_cover = per_block.saturating_mul(cluster).max(1);
    let needed = file_len.div_ceil(block_cover);
    // check_refcount_cover has bounded this by the table's own size (at most 8 MiB).
    let mut table = vec![0u8; (needed as usize).saturating_mul(8)];
    file.read_exact_at(&mut table, h.refcount_table_offset)
        .map_err(|e| format!("reading the refcount table: {e}"))?;
    for (i, entry) in table.chunks_exact(8).enumerate() {
        let offset = u64::from_be_bytes(entry.try_into().unwrap_or_default()) & !0x1ff;
        let ok = offset != 0
            && offset % cluster == 0
            && offset
                .checked_add(cluster)
                .is_some_and(|end| end <= file_len);
        if !ok {
            let from = i as u64 * block_cover;
            return Err(format!(
                "refcount table entry {i} (the refcounts of bytes {from} to {}) is {}, yet the file holds those bytes: its refcounts are missing (`qemu-img check -r all` repairs that)",
                (from + block_cover).min(file_len),
                if offset == 0 { "empty".to_string() } else { format!("offset {offset}, not a cluster inside the file") }
            ));
        }
    }
    Ok(())
}

/// A writable image's refcount table must already cover every byte the file may grow
/// to. imago grows a table that is too small by allocating refcount blocks recursively,
/// and on a hostile image that recursion never ends (found by the `qcow2_image` fuzz
/// target: a stack overflow in imago 0.2.6's `ensure_rb` / `allocate_clusters`), so
/// cellvm never lets it start. Images qemu-img makes are covered many times over (one
/// table cluster of a 64 KiB-cluster image covers 16 TiB).
fn check_refcount_cover(h: &Qcow2Header, file_len: u64) -> Result<(), String> {
    let cluster = 1u64 << h.cluster_bits;
    let refcount_bits = 1u64 << h.refcount_order;
    let entries = (h.refcount_table_clusters as u64).saturating_mul(cluster / 8);
    let per_block = cluster.saturating_mul(8) / refcount_bits;
    let cover = entries.saturating_mul(per_block).saturating_mul(cluster);
    let grows_to = h
        .max_file_bytes()
        .max(file_len.saturating_add(h.max_growth_bytes()));
    if cover < grows_to {
        return Err(format!(
            "its refcount table ({} clusters) covers {cover} bytes, less than the {grows_to} bytes the file may grow to; cellvm does not grow refcount tables (`qemu-img convert` writes a table that covers the image)",
            h.refcount_table_clusters
        ));
    }
    Ok(())
}

/// The tables the header points to must lie inside the file, and the virtual size must
/// be one a qcow2 layout can map, before imago reads anything from where they point.
fn check_bounds(h: &Qcow2Header, file_len: u64) -> Result<(), String> {
    if h.size > MAX_VIRTUAL_SIZE {
        return Err(format!(
            "virtual size {} is larger than {MAX_VIRTUAL_SIZE} bytes",
            h.size
        ));
    }
    if h.cluster_bits >= 32 {
        return Err(format!("cluster_bits {} is out of range", h.cluster_bits));
    }
    let cluster = 1u64 << h.cluster_bits;
    let inside = |what: &str, offset: u64, len: Option<u64>| -> Result<(), String> {
        match len.and_then(|l| offset.checked_add(l)) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(format!(
                "the {what} at offset {offset} does not lie inside the file ({file_len} bytes)"
            )),
        }
    };
    if h.l1_size > 0 {
        inside(
            "L1 table",
            h.l1_table_offset,
            (h.l1_size as u64).checked_mul(8),
        )?;
    }
    inside(
        "refcount table",
        h.refcount_table_offset,
        (h.refcount_table_clusters as u64).checked_mul(cluster),
    )?;
    if h.nb_snapshots > 0 {
        // Each entry is at least 40 bytes.
        inside(
            "snapshot table",
            h.snapshots_offset,
            (h.nb_snapshots as u64).checked_mul(40),
        )?;
    }
    Ok(())
}

/// Unlocks the LUKS header at `area` (offset, length in the file) with `key`.
fn unlock(file: &File, (at, len): (u64, u64), key: &[u8]) -> Result<luks::Cipher, OpenError> {
    let refused = |e: luks::LuksError| OpenError::Refused(format!("image: {e}"));
    let mut bytes = vec![0u8; luks::HEADER_LEN];
    file.read_exact_at(&mut bytes, at)
        .map_err(OpenError::io("image: reading the LUKS header"))?;
    let h = luks::Header::parse(&bytes, len).map_err(refused)?;
    let mut material = vec![0u8; h.material_len()];
    for slot in &h.slots {
        file.read_exact_at(&mut material, at + slot.material_offset)
            .map_err(OpenError::io("image: reading LUKS key material"))?;
        if let Some(cipher) = h.unlock_slot(slot, &material, key) {
            return Ok(cipher);
        }
    }
    Err(refused(luks::LuksError::WrongKey))
}

/// The layer as imago storage, bounded: reads end inside the file, writes below
/// `max_len`.
fn imago_file(file: File, name: &str, max_len: u64) -> Result<Storage, OpenError> {
    let inner = imago::file::File::try_from(file).map_err(OpenError::io(name.to_string()))?;
    Ok(Storage::new(inner, max_len))
}

fn file_len(file: &File, name: &str) -> Result<u64, OpenError> {
    Ok(file
        .metadata()
        .map_err(OpenError::io(format!("{name}: size")))?
        .len())
}

impl Qcow2 {
    /// Opens `top` (writable unless `readonly`) over the chain `backing`, nearest layer
    /// first. Every qcow2 layer's header is checked first (see the crate docs), and the
    /// chain must be exactly what the headers name: a layer naming a backing file needs
    /// the next descriptor, of the format its header names if it names one; a layer
    /// naming none must be the last. Nothing is opened by name.
    ///
    /// `key` is the passphrase of a LUKS-encrypted top (the bytes of the secret file the
    /// administrator wrote): given for an image that is not encrypted, or not given for
    /// one that is, the open is refused. Only the top may be encrypted.
    pub fn open(
        top: File,
        readonly: bool,
        direct: bool,
        backing: Vec<Layer>,
        key: Option<&[u8]>,
    ) -> Result<Qcow2, OpenError> {
        let formats: Vec<Format> = std::iter::once(Format::Qcow2)
            .chain(backing.iter().map(|l| l.format))
            .collect();
        let files: Vec<&File> = std::iter::once(&top)
            .chain(backing.iter().map(|l| &l.file))
            .collect();
        let mut top_max = (0, 0);
        let mut v2 = false;
        let mut cluster_size = 0;
        let mut crypt = None;
        for (i, file) in files.iter().enumerate() {
            let next = formats.get(i + 1).copied();
            if formats[i] == Format::Raw {
                if next.is_some() {
                    return Err(OpenError::Refused(format!(
                        "{}: a raw layer has no backing file, but further layers were given",
                        layer_name(i)
                    )));
                }
                continue;
            }
            let h = checked_header(file, i, i == 0 && !readonly, i == 0 && key.is_some())?;
            if i == 0 {
                top_max = (h.max_file_bytes(), h.max_growth_bytes());
                v2 = h.version == 2;
                cluster_size = 1u64 << h.cluster_bits;
                if let (Some(key), Some(area)) = (key, h.encryption_header) {
                    if direct {
                        return Err(OpenError::Refused(
                            "image: direct=on is not supported for an encrypted image".into(),
                        ));
                    }
                    crypt = Some(unlock(file, area, key)?);
                }
            }
            match (&h.backing, next) {
                (None, None) => {}
                (Some(b), None) => {
                    return Err(OpenError::Refused(format!(
                        "{}: names the backing file {:?}, but no descriptor was given for it",
                        layer_name(i),
                        b.name
                    )))
                }
                (None, Some(_)) => {
                    return Err(OpenError::Refused(format!(
                        "{}: names no backing file, but a backing layer was given",
                        layer_name(i)
                    )))
                }
                (Some(b), Some(f)) => {
                    if let Some(named) = b.format {
                        if named != f {
                            return Err(OpenError::Refused(format!(
                                "{}: names the backing file {:?} as {named}, but it was given as {f}",
                                layer_name(i),
                                b.name
                            )));
                        }
                    }
                }
            }
        }
        if direct {
            crate::image::set_direct(&top).map_err(OpenError::io("image: O_DIRECT"))?;
        }
        // Bottom up: each layer becomes the backing of the one above.
        let depth = backing.len();
        let mut lower: Option<Box<Access>> = None;
        for (k, layer) in backing.into_iter().rev().enumerate() {
            let name = layer_name(depth - k);
            let len = file_len(&layer.file, &name)?;
            let storage = imago_file(layer.file, &name, len)?;
            let access = match layer.format {
                Format::Raw => imago::raw::Raw::builder(storage)
                    .write(false)
                    .open(DenyImplicitOpenGate::default())
                    .map(FormatAccess::new),
                Format::Qcow2 => Qcow2Driver::builder(storage)
                    .backing(lower.take())
                    .data_file(None)
                    .write(false)
                    .open(DenyImplicitOpenGate::default())
                    .map(FormatAccess::new),
            }
            .map_err(OpenError::io(name))?;
            lower = Some(Box::new(access));
        }
        // Read-only, the top stays the size it is; writable, it may grow as far as its
        // header allows (the bound RLIMIT_FSIZE also sets in a jailed backend).
        let len = file_len(&top, "image")?;
        let punch = top.try_clone().map_err(OpenError::io("image: dup"))?;
        let max_len = if readonly {
            len
        } else {
            top_max.0.max(len.saturating_add(top_max.1))
        };
        let storage = imago_file(top, "image", max_len)?;
        let driver = Qcow2Driver::builder(storage)
            .backing(lower)
            .data_file(None)
            .write(!readonly)
            .open(DenyImplicitOpenGate::default())
            .map_err(OpenError::io("image"))?;
        let access = FormatAccess::new(driver);
        let size = access.size();
        Ok(Qcow2 {
            access: RwLock::new(access),
            size,
            top: punch,
            cluster_size,
            v2,
            crypt,
        })
    }

    // A panicking holder aborts the process (panic = "abort"), so a poisoned lock is
    // never seen; taking it anyway keeps this code free of panics.
    fn shared(&self) -> RwLockReadGuard<'_, Access> {
        self.access.read().unwrap_or_else(|e| e.into_inner())
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, Access> {
        self.access.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Qcow2 {
    /// The host ranges of the whole clusters in `offset..offset + len` that this image
    /// alone references (COPIED: refcount 1, so no internal snapshot shares them), which
    /// a discard frees.
    fn sole_clusters(&self, a: &Access, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let cs = self.cluster_size.max(1);
        let start = offset.div_ceil(cs) * cs;
        let end = (offset + len) / cs * cs;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = start;
        while at < end {
            let (m, l) = a.get_shallow_mapping(at, end - at)?;
            if l == 0 {
                break;
            }
            if let ShallowMapping::Raw {
                offset: host,
                writable: true,
                ..
            } = m
            {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == host => last.1 += l,
                    _ => out.push((host, l)),
                }
            }
            at += l;
        }
        Ok(out)
    }

    /// Zeroes written as data, a chunk at a time.
    fn zero_data(&self, offset: u64, len: u64) -> io::Result<()> {
        static ZEROES: [u8; 1 << 16] = [0; 1 << 16];
        let a = self.shared();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64) as usize;
            a.write(&ZEROES[..n], offset + done)?;
            done += n as u64;
        }
        a.flush()
    }
}

/// # Encryption
///
/// imago maps guest offsets to clusters and knows nothing of ciphers, so for a LUKS image
/// cellvm moves the data itself: a read resolves each cluster's shallow mapping and
/// decrypts what lies in the top file (lower layers are plaintext); a write to a cluster
/// the top already owns (COPIED) is encrypted and written in place; a write anywhere
/// else allocates the whole cluster under the exclusive lock (read the old plaintext,
/// merge, encrypt for the new host offset, write, then make the mapping visible), so
/// imago never copies plaintext or unencrypted zeroes into the image. Zeroes are
/// written as encrypted data except for whole clusters, which become zero clusters.
impl Qcow2 {
    fn cipher(&self) -> Option<&luks::Cipher> {
        self.crypt.as_ref()
    }

    /// Plaintext of `out.len()` bytes at the sector-aligned `offset`.
    fn read_plain(
        &self,
        a: &Access,
        c: &luks::Cipher,
        offset: u64,
        out: &mut [u8],
    ) -> io::Result<()> {
        let mut done = 0usize;
        while done < out.len() {
            let at = offset + done as u64;
            let (m, l) = a.get_shallow_mapping(at, (out.len() - done) as u64)?;
            let n = (l as usize).min(out.len() - done);
            if n == 0 {
                out[done..].fill(0);
                break;
            }
            let dst = &mut out[done..done + n];
            match m {
                ShallowMapping::Raw { offset: host, .. } => {
                    self.top.read_exact_at(dst, host)?;
                    c.decrypt(dst, host / SECTOR);
                }
                ShallowMapping::Indirect {
                    layer, offset: o, ..
                } => layer.read(&mut *dst, o)?,
                ShallowMapping::Zero { .. } | ShallowMapping::Eof { .. } => dst.fill(0),
                ShallowMapping::Special { .. } => {
                    return Err(io::Error::other(
                        "a compressed cluster in an encrypted image",
                    ))
                }
                _ => return Err(io::Error::other("a cluster mapping cellvm does not know")),
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` (within one cluster, at `at`) in place if the top owns the cluster;
    /// false if the cluster must be allocated first.
    fn write_in_place(
        &self,
        a: &Access,
        c: &luks::Cipher,
        at: u64,
        data: &[u8],
    ) -> io::Result<bool> {
        let (m, l) = a.get_shallow_mapping(at, data.len() as u64)?;
        match m {
            ShallowMapping::Raw {
                offset: host,
                writable: true,
                ..
            } if l >= data.len() as u64 => {
                let mut buf = data.to_vec();
                c.encrypt(&mut buf, host / SECTOR);
                self.top.write_all_at(&buf, host)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Encrypted writes, cluster by cluster.
    fn write_encrypted(&self, c: &luks::Cipher, offset: u64, data: &[u8]) -> io::Result<()> {
        aligned(offset, data.len() as u64)?;
        let cs = self.cluster_size.max(SECTOR);
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let within = at % cs;
            let n = ((cs - within) as usize).min(data.len() - done);
            let chunk = &data[done..done + n];
            if !self.write_in_place(&self.shared(), c, at, chunk)? {
                let a = self.exclusive();
                // Another writer may have allocated it while this one waited.
                if !self.write_in_place(&a, c, at, chunk)? {
                    let start = at - within;
                    let len = cs.min(self.size - start) as usize;
                    let mut plain = vec![0u8; len];
                    self.read_plain(&a, c, start, &mut plain)?;
                    plain[within as usize..within as usize + n].copy_from_slice(chunk);
                    let mapping = a.prepare_data_mapping(start, len as u64, true)?;
                    if mapping.length() < len as u64 {
                        return Err(io::Error::other("a cluster mapped in pieces"));
                    }
                    let host = mapping.offset();
                    c.encrypt(&mut plain, host / SECTOR);
                    self.top.write_all_at(&plain, host)?;
                    a.commit_data_mapping(mapping)?;
                }
            }
            done += n;
        }
        self.shared().flush()
    }

    /// Zeroes as encrypted data.
    fn zero_encrypted(&self, c: &luks::Cipher, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; self.cluster_size.clamp(SECTOR, 1 << 21) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64);
            self.write_encrypted(c, offset + done, &chunk[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Zeroes on an encrypted image: whole clusters through `whole` (a discard or zero
    /// clusters, which read as zeroes without decryption), the rest as encrypted data.
    fn zero_range_encrypted(
        &self,
        c: &luks::Cipher,
        offset: u64,
        len: u64,
        whole: impl FnOnce(u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        aligned(offset, len)?;
        let cs = self.cluster_size.max(SECTOR);
        let end = offset + len;
        let (first, last) = (offset.div_ceil(cs) * cs, end / cs * cs);
        if self.v2 || first >= last {
            return self.zero_encrypted(c, offset, len);
        }
        self.zero_encrypted(c, offset, first - offset)?;
        whole(first, last - first)?;
        self.zero_encrypted(c, last, end - last)
    }
}

/// The cipher works on whole sectors; virtio-blk requests are whole sectors.
fn aligned(offset: u64, len: u64) -> io::Result<()> {
    if offset % SECTOR != 0 || len % SECTOR != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an encrypted image takes whole 512-byte sectors",
        ));
    }
    Ok(())
}

/// Copies guest buffers into one plaintext buffer.
fn gather(bufs: &[Slice<'_>]) -> Vec<u8> {
    let mut out = vec![0u8; bufs.iter().map(|b| b.len()).sum()];
    let mut at = 0;
    for b in bufs {
        b.copy_to(&mut out[at..at + b.len()]);
        at += b.len();
    }
    out
}

/// Copies one plaintext buffer out to guest buffers.
fn scatter(data: &[u8], bufs: &[Slice<'_>]) {
    let mut at = 0;
    for b in bufs {
        b.copy_from(&data[at..at + b.len()]);
        at += b.len();
    }
}

/// The same buffers, borrowed no longer than the slice of them (imago's conversion wants
/// one lifetime for both).
fn shorten<'a>(bufs: &'a [Slice<'_>]) -> &'a [Slice<'a>] {
    bufs
}

impl DiskImage for Qcow2 {
    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, bufs: &[Slice<'_>]) -> io::Result<()> {
        if let Some(c) = self.cipher() {
            let mut plain = vec![0u8; bufs.iter().map(|b| b.len()).sum()];
            aligned(offset, plain.len() as u64)?;
            self.read_plain(&self.shared(), c, offset, &mut plain)?;
            scatter(&plain, bufs);
            return Ok(());
        }
        let bufs = shorten(bufs);
        let (vector, _mapped) = IoVectorMut::from_volatile_slice(bufs.iter());
        self.shared().readv(vector, offset)
    }

    fn write(&self, offset: u64, bufs: &[Slice<'_>]) -> io::Result<()> {
        if let Some(c) = self.cipher() {
            return self.write_encrypted(c, offset, &gather(bufs));
        }
        let bufs = shorten(bufs);
        let (vector, _mapped) = IoVector::from_volatile_slice(bufs.iter());
        let a = self.shared();
        a.writev(vector, offset)?;
        // Metadata written through to the file (not synced): a completed write survives
        // the process ending, as it does on a raw image.
        a.flush()
    }

    fn flush(&self) -> io::Result<()> {
        let a = self.shared();
        a.flush()?;
        a.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(c) = self.cipher() {
            return self.zero_range_encrypted(c, offset, len, |at, n| self.discard_clusters(at, n));
        }
        if self.v2 {
            return self.zero_data(offset, len);
        }
        self.discard_clusters(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if let Some(c) = self.cipher() {
            return self.zero_range_encrypted(c, offset, len, |at, n| {
                if unmap {
                    self.discard_clusters(at, n)
                } else {
                    let a = self.shared();
                    a.write_zeroes(at, n)?;
                    a.flush()
                }
            });
        }
        if self.v2 {
            self.zero_data(offset, len)
        } else if unmap {
            self.discard(offset, len)
        } else {
            let a = self.shared();
            a.write_zeroes(offset, len)?;
            a.flush()
        }
    }
}

impl Qcow2 {
    /// Discards `offset..offset + len` (qcow2 v3), giving sole clusters' space back.
    fn discard_clusters(&self, offset: u64, len: u64) -> io::Result<()> {
        // In chunks, so the list of clusters to give back stays small.
        const CHUNK: u64 = 64 << 20;
        let mut a = self.exclusive();
        let mut done = 0;
        while done < len {
            let (at, n) = (offset + done, (len - done).min(CHUNK));
            let holes = self.sole_clusters(&a, at, n)?;
            a.discard_to_zero(at, n)?;
            a.flush()?;
            // The clusters are free now and nothing can allocate them while the lock is
            // held: their space goes back to the file system (best effort).
            for (host, l) in holes {
                // SAFETY: fallocate on a descriptor we own; keeps the file's size.
                unsafe {
                    libc::fallocate(
                        self.top.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        host as i64,
                        l as i64,
                    )
                };
            }
            done += n;
        }
        Ok(())
    }
}
