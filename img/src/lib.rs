//! cellvm-img: the offline image tool. Creates, inspects, checks, maps, resizes and
//! converts raw and qcow2 images and manages qcow2 internal snapshots, with output and
//! exit codes modelled on qemu-img. Every image is untrusted input: each table offset and
//! size is checked against the file before use.
//!
//! Not implemented (refused with a message): encryption (AES, LUKS), zstd compression,
//! extended L2 entries, external data files, persistent bitmaps (read-only info only),
//! repair (`check -r`), growing the refcount table, snapshots with VM state.

pub mod check;
pub mod fuzzing;
pub mod image;
pub mod qcow2;
pub mod sandbox;
pub mod snapshot;

/// A byte count as qemu-img prints it: three significant digits and a binary unit.
pub fn size_to_str(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut f = v as f64;
    while f >= 1000.0 && i < UNITS.len() - 1 {
        f /= 1024.0;
        i += 1;
    }
    let digits = if f < 10.0 {
        2
    } else if f < 100.0 {
        1
    } else {
        0
    };
    let mut s = format!("{f:.digits$}");
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    format!("{s} {}", UNITS[i])
}
