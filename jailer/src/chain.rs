//! A disk's format and backing chain, checked before any cell exists. The header is
//! tenant input: it is read from the descriptor the jailer opened (pread, at most
//! `HEADER_READ_MAX` bytes), parsed by `block::header`, and compared with the format
//! the spec claims, so a raw image is never read as qcow2 nor the reverse. Each backing
//! name is opened beneath the tenant's image directories (`paths::open_backing`), read
//! only, and must carry its format: cellvm never probes one.

use std::fs::File;
use std::os::unix::fs::FileExt;

use block::header::{self, Format, Qcow2Header};

use crate::paths::{self, Beneath, Image};
use crate::policy::{shown, shown_path, TenantPolicy};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("format = {claimed} but the image is {found}{hint}")]
    Mismatch {
        claimed: Format,
        found: Format,
        hint: &'static str,
    },
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Header {
        path: String,
        source: header::HeaderError,
    },
    #[error("{path}: {reason}; refused")]
    Refused { path: String, reason: String },
    #[error("{path}: names its backing file \"{name}\" without a backing format; cellvm never probes a format (record it: qemu-img rebase -u -b NAME -F FMT)")]
    NoFormat { path: String, name: String },
    #[error("{path}: backing file \"{name}\" would be layer {depth}, deeper than the tenant limit max_chain_depth = {max}")]
    Depth {
        path: String,
        name: String,
        depth: usize,
        max: u32,
    },
    #[error("{path}: backing file \"{name}\" is {again}, already in the chain: the chain loops")]
    Loop {
        path: String,
        name: String,
        again: String,
    },
    #[error("{path}: backing file \"{name}\": {source}")]
    Open {
        path: String,
        name: String,
        source: paths::Error,
    },
    #[error("{path}: backing file \"{name}\" is named as {claimed} but is {found}")]
    LayerMismatch {
        path: String,
        name: String,
        claimed: Format,
        found: Format,
    },
    #[error("{path}: {what} of {size} bytes exceeds the tenant limit max_disk_bytes = {max}")]
    TooLarge {
        path: String,
        what: &'static str,
        size: u64,
        max: u64,
    },
}

/// One layer below a disk's top, opened read-only and locked as a reader.
pub struct Layer {
    pub file: File,
    pub format: Format,
    /// Device and inode, for the plan's one-writer check.
    pub id: (u64, u64),
}

/// What the jailer learnt of a disk: its format, its virtual size, its chain.
pub struct Disk {
    pub format: Format,
    /// The size the guest sees: a raw image's length, a qcow2 header's virtual size.
    pub virtual_size: u64,
    /// The layers below the top, nearest first (as `--backing` lists them).
    pub backing: Vec<Layer>,
    /// RLIMIT_FSIZE for a writable qcow2 top: as far as writing the whole disk may grow
    /// the file. None: the file may not grow (raw, or read-only).
    pub fsize: Option<u64>,
}

/// The first `min(len, HEADER_READ_MAX)` bytes of an opened image, by pread: the file
/// offset is untouched and nothing beyond the bound is read.
pub fn read_head(file: &File, len: u64) -> std::io::Result<Vec<u8>> {
    let want = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(header::HEADER_READ_MAX);
    let mut buf = vec![0u8; want];
    let mut got = 0;
    while got < want {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Reads and checks the header of a qcow2 layer.
fn qcow2_header(file: &File, len: u64, path: &str) -> Result<Qcow2Header, Error> {
    let head = read_head(file, len).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    header::parse(&head).map_err(|source| Error::Header {
        path: path.into(),
        source,
    })
}

/// Checks the disk the spec names against its header and resolves its backing chain.
/// `at`: where the top lies beneath an image directory (None for a block device).
pub fn resolve(
    policy: &TenantPolicy,
    claimed: Format,
    top: &Image,
    at: Option<&Beneath>,
    writable: bool,
    keyed: bool,
    top_path: &std::path::Path,
) -> Result<Disk, Error> {
    let path = shown_path(top_path);
    let first = read_head(&top.file, top.size.min(4)).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let found = header::detect(&first);
    if found != claimed {
        return Err(Error::Mismatch {
            claimed,
            found,
            hint: match found {
                Format::Qcow2 => {
                    " (it starts with the qcow2 magic); a qcow2 image is never served as raw"
                }
                Format::Raw => " (no qcow2 magic); a raw image is never read as qcow2",
            },
        });
    }
    if claimed == Format::Raw {
        return Ok(Disk {
            format: Format::Raw,
            virtual_size: top.size,
            backing: Vec::new(),
            fsize: None,
        });
    }
    let h = qcow2_header(&top.file, top.size, &path)?;
    if let Some(reason) = h.refusal_keyed(writable, keyed) {
        return Err(Error::Refused { path, reason });
    }
    let fsize = writable.then(|| {
        h.max_file_bytes()
            .max(top.size.saturating_add(h.max_growth_bytes()))
    });
    let mut disk = Disk {
        format: Format::Qcow2,
        virtual_size: h.size,
        backing: Vec::new(),
        fsize,
    };
    // Walk the chain: the referring layer's header names the next one.
    let mut ids = vec![top.id];
    let mut names = vec![path];
    let mut referrer = at.cloned();
    let mut next = h.backing;
    while let Some(backing) = next.take() {
        let here = names.last().cloned().unwrap_or_default();
        let name = shown(&backing.name);
        let Some(format) = backing.format else {
            return Err(Error::NoFormat { path: here, name });
        };
        let depth = disk.backing.len() + 1;
        if depth > policy.max_chain_depth as usize {
            return Err(Error::Depth {
                path: here,
                name,
                depth,
                max: policy.max_chain_depth,
            });
        }
        let (place, image) = paths::open_backing(policy, referrer.as_ref(), &backing.name)
            .map_err(|source| Error::Open {
                path: here.clone(),
                name: name.clone(),
                source,
            })?;
        let layer_path = place.path();
        let shown_layer = shown_path(&layer_path);
        if let Some(j) = ids.iter().position(|id| *id == image.id) {
            return Err(Error::Loop {
                path: here,
                name,
                again: names.get(j).cloned().unwrap_or_default(),
            });
        }
        paths::lock_reader(&image, &layer_path).map_err(|source| Error::Open {
            path: here.clone(),
            name: name.clone(),
            source,
        })?;
        let first = read_head(&image.file, image.size.min(4)).map_err(|source| Error::Read {
            path: shown_layer.clone(),
            source,
        })?;
        let found = header::detect(&first);
        if found != format {
            return Err(Error::LayerMismatch {
                path: here,
                name,
                claimed: format,
                found,
            });
        }
        let (size, what) = match format {
            Format::Raw => (image.size, "a raw backing file"),
            Format::Qcow2 => {
                let lh = qcow2_header(&image.file, image.size, &shown_layer)?;
                if let Some(reason) = lh.refusal(false) {
                    return Err(Error::Refused {
                        path: shown_layer,
                        reason,
                    });
                }
                let size = lh.size;
                next = lh.backing;
                (size, "a backing file's virtual size")
            }
        };
        if let Some(max) = policy.max_disk_bytes.filter(|m| size > *m) {
            return Err(Error::TooLarge {
                path: shown_layer,
                what,
                size,
                max,
            });
        }
        ids.push(image.id);
        names.push(shown_layer);
        disk.backing.push(Layer {
            id: image.id,
            file: image.file,
            format,
        });
        referrer = Some(place);
    }
    Ok(disk)
}
