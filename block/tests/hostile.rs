//! Hostile qcow2 images: qemu-img makes a good one, the test breaks one field, and the
//! engine must answer with a clear error at open or an I/O error for the one request,
//! never a panic, a hang or unbounded memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use block::{DiskImage, OpenError, Qcow2, Slice};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellvm-block-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img (tests/setup.sh installs it)");
    assert!(st.success(), "qemu-img {args:?}: {st}");
}

/// A 4 MiB qcow2 image (64 KiB clusters) whose first 256 KiB hold data.
fn good_image(dir: &Path) -> PathBuf {
    let raw = dir.join("data.raw");
    let mut bytes = vec![0u8; 4 << 20];
    for (i, b) in bytes.iter_mut().enumerate().take(256 << 10) {
        *b = (i % 251) as u8 + 1;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let img = dir.join("img.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    img
}

fn be32(f: &File, at: u64) -> u32 {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, at).unwrap();
    u32::from_be_bytes(b)
}

fn be64(f: &File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn rw(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

fn open(path: &Path) -> Result<Qcow2, OpenError> {
    Qcow2::open(rw(path), false, false, Vec::new(), None)
}

fn refused(path: &Path) -> String {
    match open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

fn read(img: &Qcow2, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    img.read(offset, &[Slice::from(buf.as_mut_slice())])?;
    Ok(buf)
}

fn write(img: &Qcow2, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    let mut buf = bytes.to_vec();
    img.write(offset, &[Slice::from(buf.as_mut_slice())])
}

#[test]
fn an_l1_table_larger_than_the_file_is_refused_at_open() {
    let dir = scratch("l1-large");
    let img = good_image(&dir);
    // l1_size (header offset 36): 1 Mi entries, 8 MiB, far past the file's end.
    rw(&img)
        .write_all_at(&(1u32 << 20).to_be_bytes(), 36)
        .unwrap();
    let e = refused(&img);
    assert!(
        e.contains("L1 table") && e.contains("does not lie inside the file"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tables_past_the_end_of_the_file_are_refused_at_open() {
    let dir = scratch("offsets");
    for (field, at) in [("L1 table", 40u64), ("refcount table", 48)] {
        let img = good_image(&dir);
        rw(&img)
            .write_all_at(&(1u64 << 40).to_be_bytes(), at)
            .unwrap();
        let e = refused(&img);
        assert!(
            e.contains(field) && e.contains("does not lie inside"),
            "{field}: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_virtual_size_of_2_to_the_63_is_refused_at_open() {
    let dir = scratch("size");
    let img = good_image(&dir);
    rw(&img)
        .write_all_at(&(1u64 << 63).to_be_bytes(), 24)
        .unwrap();
    let e = refused(&img);
    assert!(e.contains("size"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_l2_table_past_the_end_fails_only_the_requests_that_need_it() {
    let dir = scratch("l2-past-end");
    let img = good_image(&dir);
    let f = rw(&img);
    let l1 = be64(&f, 40);
    // L1 entry 0 (guest bytes 0..512 MiB): its L2 table far past the end, COPIED set.
    f.write_all_at(&((1u64 << 63) | (1 << 40)).to_be_bytes(), l1)
        .unwrap();
    drop(f);
    let len = std::fs::metadata(&img).unwrap().len();
    let q = open(&img).expect("the header itself is fine");
    let r = read(&q, 0, 4096);
    assert!(
        r.as_ref()
            .is_err_and(|e| e.to_string().contains("past the end of the file")),
        "a read through the bad L2 table: {r:?}"
    );
    let w = write(&q, 4096, &[7u8; 4096]);
    assert!(w.is_err(), "a write through it: {w:?}");
    drop(q);
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        len,
        "nothing written past the end"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refcounts_of_zero_on_used_clusters_do_not_crash_the_engine() {
    let dir = scratch("refcount-zero");
    let img = good_image(&dir);
    let f = rw(&img);
    let reftable = be64(&f, 48);
    let block0 = be64(&f, reftable);
    assert!(block0 != 0 && be32(&f, 20) == 16, "a 16-bit refcount block");
    // Every refcount of the first refcount block to 0: header, tables and data included.
    f.write_all_at(&vec![0u8; 64 << 10], block0).unwrap();
    drop(f);
    match open(&img) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(q) => {
            // Reads still see the data; writes that allocate may fail or succeed, but
            // the engine keeps answering.
            assert!(
                read(&q, 0, 4).is_ok_and(|b| b == [1, 2, 3, 4]),
                "reads need no refcounts"
            );
            let _ = write(&q, 1 << 20, &[9u8; 65536]);
            let _ = write(&q, 0, &[9u8; 4096]);
            let _ = q.flush();
            let _ = read(&q, 1 << 20, 65536);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
