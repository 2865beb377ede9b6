//! The fuzz entry point `img_check`: image bytes in a memfd, then what cellvm-img does
//! with an untrusted image read-only (open, info's fields, check, the snapshot list, a
//! map and a read of the first clusters). None of it may panic, hang or allocate beyond
//! a bound set by the input's size.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

use crate::image::Layer;
use crate::qcow2::Qcow2;

fn memfd(data: &[u8]) -> Option<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"img_check".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just created and is owned by nothing else.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(data).ok()?;
    Some(f)
}

pub fn img_check(data: &[u8]) {
    let Some(f) = memfd(data) else { return };
    let Ok(mut img) = Qcow2::open(f, false) else {
        return;
    };
    let _ = img.h.read_refusal();
    let _ = img.h.write_refusal();
    let r = crate::check::check(&mut img);
    let _ = r.exit_code();
    let _ = crate::snapshot::list_text(&img.snapshots);
    let size = img.h.size;
    let mut layer = Layer::Qcow2 {
        img: Box::new(img),
        backing: None,
    };
    let mut off = 0;
    for _ in 0..64 {
        if off >= size {
            break;
        }
        match layer.status(off, size - off, 0) {
            Ok((_, len)) => off += len.max(1),
            Err(_) => break,
        }
    }
    if layer.check_readable().is_ok() {
        let mut buf = vec![0u8; 256 << 10];
        let _ = layer.read_at(0, &mut buf);
    }
}
