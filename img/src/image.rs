//! Images as layers: a raw file or a qcow2 image over its backing chain, and the
//! operations on whole images (create, read, block status, convert, resize).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::qcow2::{self, Error, Mapping, Qcow2, Result, COMPRESSED, COPIED, MAX_REFTABLE_BYTES};

/// The deepest backing chain cellvm-img follows.
pub const MAX_CHAIN: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::Unsupported(format!(
                "Unknown file format '{s}' (cellvm-img knows raw and qcow2)"
            ))),
        }
    }
}

/// The format the first bytes show: qcow2 magic or raw.
pub fn detect(file: &File) -> Result<Format> {
    let mut m = [0u8; 4];
    let n = file.read_at(&mut m, 0).unwrap_or(0);
    Ok(if n == 4 && m == qcow2::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

pub fn open_file(path: &Path, writable: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| Error::Io(format!("Could not open '{}'", path.display()), e))
}

/// One layer of a chain.
pub enum Layer {
    Raw {
        file: File,
        size: u64,
    },
    Qcow2 {
        img: Box<Qcow2>,
        backing: Option<Box<Layer>>,
    },
}

/// Where a backing file name leads: relative names are relative to the referring
/// image's directory, as QEMU resolves them.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// Opens `path` (format given or detected) and, for qcow2, its backing chain; every path
/// opened is pushed to `opened`.
pub fn open_chain(
    path: &Path,
    format: Option<Format>,
    writable: bool,
    opened: &mut Vec<PathBuf>,
) -> Result<Layer> {
    let file = open_file(path, writable)?;
    opened.push(path.to_path_buf());
    let detected = detect(&file)?;
    let format = format.unwrap_or(detected);
    if format == Format::Qcow2 && detected != Format::Qcow2 {
        return Err(Error::Invalid(format!(
            "'{}' is not a qcow2 image (no magic)",
            path.display()
        )));
    }
    match format {
        Format::Raw => {
            let size = file
                .metadata()
                .map_err(|e| Error::Io(format!("'{}'", path.display()), e))?
                .len();
            Ok(Layer::Raw { file, size })
        }
        Format::Qcow2 => {
            let img = Qcow2::open(file, writable)
                .map_err(|e| prefix(e, &format!("'{}'", path.display())))?;
            let backing = match img.h.backing.clone() {
                None => None,
                Some(name) => {
                    if opened.len() >= MAX_CHAIN {
                        return Err(Error::Invalid(format!(
                            "the backing chain is deeper than {MAX_CHAIN} layers (or loops)"
                        )));
                    }
                    let fmt = match img.h.backing_format.as_deref() {
                        Some(f) => Some(f.parse::<Format>()?),
                        None => None,
                    };
                    let bpath = resolve_backing(path, &name);
                    Some(Box::new(open_chain(&bpath, fmt, false, opened)?))
                }
            };
            Ok(Layer::Qcow2 {
                img: Box::new(img),
                backing,
            })
        }
    }
}

fn prefix(e: Error, p: &str) -> Error {
    match e {
        Error::Invalid(m) => Error::Invalid(format!("{p}: {m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("{p}: {m}")),
        Error::Io(m, e) => Error::Io(format!("{p}: {m}"), e),
    }
}

/// One range's allocation status, as `qemu-img map` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub offset: Option<u64>,
}

impl Layer {
    pub fn size(&self) -> u64 {
        match self {
            Layer::Raw { size, .. } => *size,
            Layer::Qcow2 { img, .. } => img.h.size,
        }
    }

    pub fn format(&self) -> Format {
        match self {
            Layer::Raw { .. } => Format::Raw,
            Layer::Qcow2 { .. } => Format::Qcow2,
        }
    }

    /// Refuses to read data this tool cannot decode (encryption, zstd, ...), anywhere in the chain.
    pub fn check_readable(&self) -> Result<()> {
        if let Layer::Qcow2 { img, backing } = self {
            if let Some(why) = img.h.read_refusal() {
                return Err(Error::Unsupported(why));
            }
            if let Some(b) = backing {
                b.check_readable()?;
            }
        }
        Ok(())
    }

    /// Reads guest bytes at `off`; past the end reads zero.
    pub fn read_at(&mut self, mut off: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size();
        match self {
            Layer::Raw { file, .. } => {
                let n = (size.saturating_sub(off)).min(buf.len() as u64) as usize;
                qcow2::read_zero_padded(file, &mut buf[..n], off)?;
                buf[n..].fill(0);
                Ok(())
            }
            Layer::Qcow2 { img, backing } => {
                let cs = img.cs();
                let mut tmp = vec![0u8; cs as usize];
                let mut done = 0usize;
                while done < buf.len() {
                    let within = off % cs;
                    let n = ((cs - within) as usize).min(buf.len() - done);
                    let piece = &mut buf[done..done + n];
                    if off >= size {
                        piece.fill(0);
                    } else if img.read_cluster(off / cs, &mut tmp)? {
                        piece.copy_from_slice(&tmp[within as usize..within as usize + n]);
                    } else if let Some(b) = backing {
                        b.read_at(off, piece)?;
                    } else {
                        piece.fill(0);
                    }
                    done += n;
                    off += n as u64;
                }
                Ok(())
            }
        }
    }

    /// The status of the range at `off`, at most `max` bytes long: (status, length).
    pub fn status(&mut self, off: u64, max: u64, depth: u32) -> Result<(Status, u64)> {
        let size = self.size();
        let unalloc = Status {
            depth,
            present: false,
            zero: true,
            data: false,
            offset: None,
        };
        if off >= size {
            return Ok((unalloc, max));
        }
        let max = max.min(size - off);
        match self {
            Layer::Raw { file, .. } => {
                use std::os::fd::AsRawFd;
                let fd = file.as_raw_fd();
                // SAFETY: lseek on a descriptor this layer owns; no memory is involved.
                let data = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
                let (is_data, end) = if data < 0 || data as u64 > off {
                    // A hole up to the next data (or the end).
                    let end = if data < 0 { size } else { data as u64 };
                    (false, end)
                } else {
                    // SAFETY: as above.
                    let hole = unsafe { libc::lseek(fd, off as i64, libc::SEEK_HOLE) };
                    (true, if hole < 0 { size } else { hole as u64 })
                };
                let len = (end - off).min(max).max(1);
                Ok((
                    Status {
                        depth,
                        present: true,
                        zero: !is_data,
                        data: is_data,
                        offset: Some(off),
                    },
                    len,
                ))
            }
            Layer::Qcow2 { img, backing } => {
                let cs = img.cs();
                if let Some(span) = img.unmapped_span(off) {
                    // No L2 table: the whole span is the backing file's (or nothing).
                    let len = span.min(max);
                    return match backing {
                        Some(b) => b.status(off, len, depth + 1),
                        None => Ok((unalloc, len)),
                    };
                }
                let len = (cs - off % cs).min(max);
                let st = |zero, data, offset| Status {
                    depth,
                    present: true,
                    zero,
                    data,
                    offset,
                };
                Ok(match img.lookup(off / cs)? {
                    Mapping::Data(h) => (st(false, true, Some(h + off % cs)), len),
                    Mapping::Zero(_) => (st(true, false, None), len),
                    Mapping::Compressed(..) => (st(false, true, None), len),
                    Mapping::Unallocated => match backing {
                        Some(b) => b.status(off, len, depth + 1)?,
                        None => (unalloc, len),
                    },
                })
            }
        }
    }

    /// Writes guest bytes at `off` (inside the image). A raw layer is written in place;
    /// a qcow2 layer writes clusters it owns in place, and allocates any other cluster
    /// whole: its current contents (from its backing chain, a zero cluster or a
    /// compressed one) merged with the new bytes, the old compressed or preallocated
    /// space released. An image with internal snapshots is not written (its clusters
    /// may be shared).
    pub fn write_at(&mut self, off: u64, data: &[u8]) -> Result<()> {
        if off
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size())
        {
            return Err(Error::Invalid(format!(
                "a write of {} bytes at {off} ends past the image",
                data.len()
            )));
        }
        match self {
            Layer::Raw { file, .. } => qcow2::write_all_at(file, data, off, "data"),
            Layer::Qcow2 { img, backing } => write_qcow2(img, backing.as_deref_mut(), off, data),
        }
    }

    /// The top qcow2 image, if the top is qcow2.
    pub fn qcow2(&mut self) -> Option<&mut Qcow2> {
        match self {
            Layer::Qcow2 { img, .. } => Some(img),
            Layer::Raw { .. } => None,
        }
    }
}

/// What `create` builds.
#[derive(Clone, Debug)]
pub struct CreateOpts {
    pub size: u64,
    pub cluster_bits: u32,
    pub refcount_order: u32,
    pub backing: Option<(String, Format)>,
}

/// Writes a new, empty qcow2 v3 image to `file` (which it truncates): the header, a
/// refcount table sized for the whole image and its snapshots, the refcount blocks for
/// the metadata, and a zeroed L1 table.
pub fn create_qcow2(file: &File, o: &CreateOpts) -> Result<()> {
    let cs = 1u64 << o.cluster_bits;
    let l1_entries = qcow2::l1_entries_for(o.size, o.cluster_bits).unwrap_or(u64::MAX);
    if o.size > i64::MAX as u64 || l1_entries.saturating_mul(8) > qcow2::MAX_L1_BYTES {
        return Err(Error::Invalid(format!(
            "size {} is too large for {}-byte clusters",
            o.size, cs
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let rbe = (cs * 8) >> o.refcount_order;
    // Room for every data cluster and table twice over (snapshots), plus slack.
    let total = (o.size.div_ceil(cs) + l1_entries + l1_clusters + 64) * 2;
    let rt_bytes = (total.div_ceil(rbe) * 8).min(MAX_REFTABLE_BYTES);
    let rt = rt_bytes.div_ceil(cs).max(1);
    let mut rb = 1;
    while (1 + rt + rb + l1_clusters).div_ceil(rbe) > rb {
        rb += 1;
    }
    let meta = 1 + rt + rb + l1_clusters;
    if meta.div_ceil(rbe) > rt * cs / 8 {
        return Err(Error::Invalid(
            "image too large for its refcount table".into(),
        ));
    }
    let rt_off = cs;
    let rb_off = (1 + rt) * cs;
    let l1_off = (1 + rt + rb) * cs;

    let mut header = vec![0u8; cs as usize];
    header[0..4].copy_from_slice(&qcow2::MAGIC);
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    header[20..24].copy_from_slice(&o.cluster_bits.to_be_bytes());
    header[24..32].copy_from_slice(&o.size.to_be_bytes());
    header[36..40].copy_from_slice(&(l1_entries as u32).to_be_bytes());
    header[40..48].copy_from_slice(&l1_off.to_be_bytes());
    header[48..56].copy_from_slice(&rt_off.to_be_bytes());
    header[56..60].copy_from_slice(&(rt as u32).to_be_bytes());
    header[96..100].copy_from_slice(&o.refcount_order.to_be_bytes());
    header[100..104].copy_from_slice(&112u32.to_be_bytes());
    let mut pos = 112usize;
    let ext = |ty: u32, data: &[u8], h: &mut Vec<u8>, pos: &mut usize| -> Result<()> {
        let padded = data.len().div_ceil(8) * 8;
        if *pos + 8 + padded + 8 > h.len() {
            return Err(Error::Invalid(
                "the header extensions do not fit the first cluster".into(),
            ));
        }
        h[*pos..*pos + 4].copy_from_slice(&ty.to_be_bytes());
        h[*pos + 4..*pos + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        h[*pos + 8..*pos + 8 + data.len()].copy_from_slice(data);
        *pos += 8 + padded;
        Ok(())
    };
    if let Some((name, fmt)) = &o.backing {
        ext(
            qcow2::EXT_BACKING_FORMAT,
            fmt.to_string().as_bytes(),
            &mut header,
            &mut pos,
        )?;
        pos += 8; // the end-of-extensions marker (zeros)
        if name.is_empty() || name.len() > 1023 || pos + name.len() > header.len() {
            return Err(Error::Invalid(format!(
                "backing file name of {} bytes does not fit the header (1 to 1023 bytes, within the first cluster)",
                name.len()
            )));
        }
        header[pos..pos + name.len()].copy_from_slice(name.as_bytes());
        header[8..16].copy_from_slice(&(pos as u64).to_be_bytes());
        header[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    }
    file.set_len(0)
        .and_then(|_| file.set_len(meta * cs))
        .map_err(|e| Error::Io("sizing the new image".into(), e))?;
    qcow2::write_all_at(file, &header, 0, "the header")?;
    let mut reftable = vec![0u64; (rt * cs / 8) as usize];
    for (i, e) in reftable.iter_mut().take(rb as usize).enumerate() {
        *e = rb_off + i as u64 * cs;
    }
    qcow2::write_u64_table(file, rt_off, &reftable, "the refcount table")?;
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for c in 0..meta {
        qcow2::rc_set(&mut blocks, c, o.refcount_order, 1);
    }
    qcow2::write_all_at(file, &blocks, rb_off, "the refcount blocks")?;
    Ok(())
}

/// Creates a raw image of `size` bytes (sparse).
pub fn create_raw(file: &File, size: u64) -> Result<()> {
    file.set_len(0)
        .and_then(|_| file.set_len(size))
        .map_err(|e| Error::Io("sizing the new image".into(), e))
}

/// Packs compressed clusters into host clusters, several per cluster.
struct Packer {
    pos: u64,
}

impl Packer {
    fn write(&mut self, img: &mut Qcow2, vc: u64, data: &[u8]) -> Result<()> {
        let cs = img.cs();
        let len = data.len() as u64;
        let off = if !self.pos.is_multiple_of(cs) && self.pos % cs + len <= cs {
            img.adjust(self.pos / cs, 1)?;
            self.pos
        } else {
            img.alloc(1)?
        };
        qcow2::write_all_at(&img.file, data, off, "a compressed cluster")?;
        self.pos = off + len;
        let shift = 62 - (img.h.cluster_bits - 8);
        let nb = (off + len - 1) / 512 - off / 512;
        img.set_l2_entry(vc, COMPRESSED | (nb << shift) | off)
    }
}

/// How many bytes from `off` (at most `max`) read as zero by `src`'s metadata alone
/// (unallocated everywhere in the chain, or zero clusters), without reading data.
fn zero_run(src: &mut Layer, off: u64, max: u64) -> Result<u64> {
    let mut o = off;
    while o < off + max {
        let (st, n) = src.status(o, off + max - o, 0)?;
        if st.data || !st.zero {
            break;
        }
        o += n.max(1);
    }
    Ok((o - off).min(max))
}

/// Copies every guest byte of `src` into `dst` (a new, empty image of the same size):
/// clusters that read as zero stay unallocated; with `compress`, a cluster whose
/// deflated form is smaller than the cluster is stored compressed.
pub fn copy_into(src: &mut Layer, dst: &mut Layer, compress: bool) -> Result<()> {
    let size = src.size();
    match dst {
        Layer::Raw { file, .. } => {
            let chunk = 1u64 << 16;
            let mut buf = vec![0u8; chunk as usize];
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off) as usize;
                let zero = zero_run(src, off, size - off)?;
                if zero >= n as u64 {
                    off += (zero / chunk * chunk).max(n as u64);
                    continue;
                }
                src.read_at(off, &mut buf[..n])?;
                if buf[..n].iter().any(|&b| b != 0) {
                    qcow2::write_all_at(file, &buf[..n], off, "data")?;
                }
                off += n as u64;
            }
            Ok(())
        }
        Layer::Qcow2 { img, .. } => {
            let cs = img.cs();
            let mut buf = vec![0u8; cs as usize];
            let mut packer = Packer { pos: 0 };
            let mut vc = 0;
            while vc * cs < size {
                let n = cs.min(size - vc * cs) as usize;
                let zero = zero_run(src, vc * cs, size - vc * cs)?;
                if zero >= n as u64 {
                    vc += (zero / cs).max(1);
                    continue;
                }
                src.read_at(vc * cs, &mut buf[..n])?;
                buf[n..].fill(0);
                if buf.iter().any(|&b| b != 0) {
                    let packed = compress.then(|| qcow2::deflate_cluster(&buf));
                    match packed {
                        Some(p) if (p.len() as u64) < cs => packer.write(img, vc, &p)?,
                        _ => {
                            let off = img.alloc(1)?;
                            qcow2::write_all_at(&img.file, &buf, off, "a data cluster")?;
                            img.set_l2_entry(vc, off | COPIED)?;
                        }
                    }
                }
                vc += 1;
            }
            img.flush()?;
            img.sync()
        }
    }
}

/// `Layer::write_at` for a qcow2 layer over `backing`.
fn write_qcow2(
    img: &mut Qcow2,
    mut backing: Option<&mut Layer>,
    mut off: u64,
    data: &[u8],
) -> Result<()> {
    if img.h.nb_snapshots > 0 {
        return Err(Error::Unsupported(
            "writing into an image with internal snapshots (delete them first)".into(),
        ));
    }
    let (cs, size) = (img.cs(), img.h.size);
    let mut cluster = vec![0u8; cs as usize];
    let mut done = 0usize;
    while done < data.len() {
        let vc = off / cs;
        let within = (off % cs) as usize;
        let n = (cs as usize - within).min(data.len() - done);
        let piece = &data[done..done + n];
        let mapping = img.lookup(vc)?;
        if let Mapping::Data(host) = mapping {
            qcow2::write_all_at(&img.file, piece, host + within as u64, "data")?;
        } else {
            // The cluster as it reads now, from this layer or below it.
            let len = cs.min(size - vc * cs) as usize;
            if !img.read_cluster(vc, &mut cluster)? {
                match backing.as_deref_mut() {
                    Some(b) => b.read_at(vc * cs, &mut cluster[..len])?,
                    None => cluster.fill(0),
                }
                cluster[len..].fill(0);
            }
            cluster[within..within + n].copy_from_slice(piece);
            let host = img.alloc(1)?;
            qcow2::write_all_at(&img.file, &cluster, host, "a data cluster")?;
            img.set_l2_entry(vc, host | COPIED)?;
            if let Some((first, count)) = qcow2::host_clusters(mapping, cs) {
                for c in first..first + count {
                    img.adjust(c, -1)?;
                }
            }
        }
        done += n;
        off += n as u64;
    }
    Ok(())
}

/// What `commit` did: the bytes copied down.
pub struct Committed {
    pub bytes: u64,
}

/// Commits a qcow2 overlay into its backing layer (qemu-img commit): every cluster the
/// overlay holds (data, zeroes, compressed data) is written to `backing` at the same
/// guest offset, then `backing` is flushed and synced. The overlay itself is not
/// changed here (emptying it is the caller's choice).
pub fn commit(top: &mut Qcow2, backing: &mut Layer) -> Result<Committed> {
    let size = top.h.size;
    if backing.size() < size {
        return Err(Error::Invalid(format!(
            "the backing file ({} bytes) is smaller than the overlay ({size} bytes); resize it first",
            backing.size()
        )));
    }
    if let Layer::Qcow2 { img, .. } = backing {
        if img.h.nb_snapshots > 0 {
            return Err(Error::Unsupported(
                "committing into an image with internal snapshots (their clusters may be shared)"
                    .into(),
            ));
        }
    }
    let cs = top.cs();
    let mut buf = vec![0u8; cs as usize];
    let mut bytes = 0;
    let mut vc = 0;
    while vc * cs < size {
        if let Some(span) = top.unmapped_span(vc * cs) {
            vc += (span / cs).max(1);
            continue;
        }
        let n = cs.min(size - vc * cs) as usize;
        let held = match top.lookup(vc)? {
            Mapping::Unallocated => false,
            Mapping::Zero(_) => {
                buf.fill(0);
                true
            }
            Mapping::Data(_) | Mapping::Compressed(..) => top.read_cluster(vc, &mut buf)?,
        };
        if held {
            backing.write_at(vc * cs, &buf[..n])?;
            bytes += n as u64;
        }
        vc += 1;
    }
    if let Layer::Qcow2 { img, .. } = backing {
        img.flush()?;
        img.sync()?;
    } else if let Layer::Raw { file, .. } = backing {
        file.sync_all()
            .map_err(|e| Error::Io("syncing the backing file".into(), e))?;
    }
    Ok(Committed { bytes })
}

/// Resizes a qcow2 image: grows (the L1 table moves if it must) or, with `shrink`,
/// drops every cluster past the new end.
pub fn resize_qcow2(img: &mut Qcow2, new_size: u64, shrink: bool) -> Result<()> {
    let old = img.h.size;
    let cs = img.cs();
    let needed = qcow2::l1_entries_for(new_size, img.h.cluster_bits).unwrap_or(u64::MAX);
    if new_size > i64::MAX as u64 || needed.saturating_mul(8) > qcow2::MAX_L1_BYTES {
        return Err(Error::Invalid(format!(
            "size {new_size} is too large for {cs}-byte clusters"
        )));
    }
    if new_size < old {
        if !shrink {
            return Err(Error::Invalid(
                "Use the --shrink option to perform a shrink operation.".into(),
            ));
        }
        if !img.snapshots.is_empty() {
            return Err(Error::Unsupported(
                "Can't shrink an image with internal snapshots".into(),
            ));
        }
        let l2e = img.l2_entries();
        let first = new_size.div_ceil(cs);
        let (bits, ver) = (img.h.cluster_bits, img.h.version);
        for i in 0..img.l1.len() {
            let l2off = img.l1[i] & qcow2::L1E_OFFSET_MASK;
            if l2off == 0 || (i as u64 + 1) * l2e <= first {
                continue;
            }
            let table = img.l2(l2off)?.clone();
            let mut kept = false;
            for (j, &e) in table.iter().enumerate() {
                let vc = i as u64 * l2e + j as u64;
                if vc < first {
                    kept |= e != 0;
                    continue;
                }
                if e == 0 {
                    continue;
                }
                if let Some((c0, n)) = qcow2::host_clusters(qcow2::decode_l2(e, bits, ver), cs) {
                    for c in c0..c0 + n {
                        img.adjust(c, -1)?;
                    }
                }
                img.set_l2_entry(vc, 0)?;
            }
            if !kept {
                img.l1[i] = 0;
                img.set_l1_dirty();
                img.adjust(l2off / cs, -1)?;
            }
        }
        img.flush()?;
    } else if needed > img.h.l1_size as u64 {
        img.relocate_l1(needed)?;
    }
    img.h.size = new_size;
    img.write_header_fields()?;
    img.flush()?;
    img.sync()
}

/// Parses a size as qemu-img does: bytes, or a number with a k/K, M, G, T, P or E suffix
/// (powers of 1024); fractions such as 1.5G are allowed.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'b' | 'B' => (&s[..s.len() - 1], 1u64),
        'k' | 'K' => (&s[..s.len() - 1], 1 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        't' | 'T' => (&s[..s.len() - 1], 1 << 40),
        'p' | 'P' => (&s[..s.len() - 1], 1 << 50),
        'e' | 'E' => (&s[..s.len() - 1], 1 << 60),
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    let f: f64 = num.parse().ok()?;
    let v = f * mult as f64;
    (f >= 0.0 && v < 9.2e18).then_some(v as u64)
}

/// Reads a whole small file (for tests and tools).
pub fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}
