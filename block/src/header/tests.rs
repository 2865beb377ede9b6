//! Headers of images qemu-img makes, and hand-made hostile headers.

use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory of this test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("cellvm-block-header-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn qemu_img(args: &[&str]) {
    // A LUKS image's creation measures PBKDF2 speed from the thread's CPU time and fails
    // ("Unable to get accurate CPU usage") when a loaded host charges its first round no
    // tick: that one failure is tried again.
    let mut out = None;
    for _ in 0..10 {
        let o = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img must be installed (tests/setup.sh)");
        let retry = String::from_utf8_lossy(&o.stderr).contains("Unable to get accurate CPU usage");
        out = Some(o);
        if !retry {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = out.expect("ran");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bytes a caller reads: min(file size, HEADER_READ_MAX) from offset 0.
fn head(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).expect("read image");
    bytes.truncate(HEADER_READ_MAX);
    bytes
}

fn create(dir: &Scratch, file: &str, opts: &[&str], size: &str) -> Vec<u8> {
    let p = dir.path(file);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    let ps = p.to_str().unwrap().to_owned();
    args.push(&ps);
    args.push(size);
    qemu_img(&args);
    head(&p)
}

#[test]
fn detect_tells_qcow2_from_raw_by_the_magic_only() {
    assert_eq!(detect(b"QFI\xfb\0\0\0\x03"), Format::Qcow2);
    assert_eq!(detect(b"QFI\xfb"), Format::Qcow2);
    assert_eq!(detect(b"QFI"), Format::Raw);
    assert_eq!(detect(b""), Format::Raw);
    assert_eq!(detect(&[0u8; 512]), Format::Raw);
    assert_eq!("qcow2".parse::<Format>().unwrap(), Format::Qcow2);
    assert_eq!("raw".parse::<Format>().unwrap(), Format::Raw);
    assert!("vmdk".parse::<Format>().is_err());
    assert_eq!(Format::Qcow2.to_string(), "qcow2");
    assert_eq!(Format::Raw.to_string(), "raw");
}

#[test]
fn a_v3_image_from_qemu_img_parses_with_its_fields() {
    let d = Scratch::new("v3");
    let h = parse(&create(&d, "v3.qcow2", &[], "64M")).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_bits, 16);
    assert_eq!(h.size, 64 << 20);
    assert_eq!(h.crypt_method, 0);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.header_length, 112);
    assert_eq!(h.compression_type, 0);
    assert_eq!(h.l1_size, 1);
    assert_eq!(h.backing, None);
    assert!(!h.has_bitmaps_extension);
    assert_eq!(h.refusal(true), None);
    assert_eq!(h.refusal(false), None);
    // The most the file may grow to covers the whole disk and its metadata, and not much more.
    let max = h.max_file_bytes();
    assert!(max >= (64 << 20) + 3 * 65536, "{max}");
    assert!(max < (64 << 20) * 11 / 10, "{max}");
}

#[test]
fn a_v2_image_parses_with_the_implied_v3_fields() {
    let d = Scratch::new("v2");
    let h = parse(&create(&d, "v2.qcow2", &["-o", "compat=0.10"], "16M")).unwrap();
    assert_eq!(h.version, 2);
    assert_eq!(h.header_length, 72);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.incompatible_features, 0);
    assert_eq!(h.refusal(true), None);
}

#[test]
fn backing_name_and_format_come_from_the_header() {
    let d = Scratch::new("backing");
    create(&d, "base.qcow2", &[], "32M");
    let h = parse(&create(
        &d,
        "top.qcow2",
        &["-b", "base.qcow2", "-F", "qcow2"],
        "32M",
    ))
    .unwrap();
    assert_eq!(
        h.backing,
        Some(Backing {
            name: "base.qcow2".into(),
            format: Some(Format::Qcow2)
        })
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        d.path("base.raw").to_str().unwrap(),
        "8M",
    ]);
    let h = parse(&create(
        &d,
        "over-raw.qcow2",
        &["-b", "base.raw", "-F", "raw"],
        "8M",
    ))
    .unwrap();
    assert_eq!(h.backing.unwrap().format, Some(Format::Raw));
    // v2 images carry the same extension.
    let h = parse(&create(
        &d,
        "v2top.qcow2",
        &["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"],
        "32M",
    ))
    .unwrap();
    assert_eq!(h.backing.unwrap().name, "base.qcow2");
}

#[test]
fn a_backing_name_without_a_format_parses_with_none() {
    // qemu-img 7.2 refuses -b without -F, so remove the extension by hand: it is the first
    // one after the header in a qemu-img overlay.
    let d = Scratch::new("nofmt");
    create(&d, "base.qcow2", &[], "8M");
    let mut b = create(&d, "top.qcow2", &["-b", "base.qcow2", "-F", "qcow2"], "8M");
    let at = 112;
    assert_eq!(be32(&b, at).unwrap(), EXT_BACKING_FORMAT);
    // Turn it into an unknown extension of the same length: ignored by parsers.
    b[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    let h = parse(&b).unwrap();
    assert_eq!(h.backing.unwrap().format, None);
}

#[test]
fn luks_and_aes_images_are_refused_by_crypt_method() {
    let d = Scratch::new("luks");
    let h = parse(&create(
        &d,
        "luks.qcow2",
        &[
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ],
        "16M",
    ))
    .unwrap();
    assert_eq!(h.crypt_method, 2);
    assert!(h
        .encryption_header
        .is_some_and(|(at, len)| at > 0 && len > 0));
    let why = h.refusal(false).unwrap();
    assert!(
        why.contains("crypt_method = 2 (LUKS)") && why.contains("no key"),
        "{why}"
    );
    // With a key, LUKS is served; a key for a plain image is a mistake.
    assert_eq!(h.refusal_keyed(true, true), None);
    let plain = create(&d, "plain.qcow2", &[], "16M");
    let why = parse(&plain).unwrap().refusal_keyed(true, true).unwrap();
    assert!(why.contains("not encrypted"), "{why}");
    // AES is refused with or without a key (made by hand: qemu-img 7.2 no longer creates it).
    let mut b = plain;
    b[32..36].copy_from_slice(&1u32.to_be_bytes());
    let h = parse(&b).unwrap();
    for keyed in [false, true] {
        let why = h.refusal_keyed(false, keyed).unwrap();
        assert!(why.contains("crypt_method = 1 (legacy AES)"), "{why}");
    }
}

#[test]
fn persistent_bitmaps_refuse_writable_but_not_read_only() {
    let d = Scratch::new("bitmaps");
    create(&d, "bm.qcow2", &[], "16M");
    qemu_img(&[
        "bitmap",
        "--add",
        d.path("bm.qcow2").to_str().unwrap(),
        "b0",
    ]);
    let h = parse(&head(&d.path("bm.qcow2"))).unwrap();
    assert!(h.has_bitmaps_extension);
    assert_ne!(h.autoclear_features & AUTOCLEAR_BITMAPS, 0);
    let why = h.refusal(true).unwrap();
    assert!(
        why.contains("autoclear bit 0 (persistent bitmaps)"),
        "{why}"
    );
    assert_eq!(h.refusal(false), None);
}

#[test]
fn compressed_zlib_is_served_and_zstd_refused() {
    let d = Scratch::new("compressed");
    let raw = d.path("ref.raw");
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "4M"]);
    let zlib = d.path("zlib.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        zlib.to_str().unwrap(),
    ]);
    let h = parse(&head(&zlib)).unwrap();
    assert_eq!(h.compression_type, 0);
    assert_eq!(h.refusal(true), None);
    let zstd = d.path("zstd.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        raw.to_str().unwrap(),
        zstd.to_str().unwrap(),
    ]);
    let h = parse(&head(&zstd)).unwrap();
    assert_eq!(h.compression_type, 1);
    assert!(h
        .refusal(false)
        .unwrap()
        .contains("compression_type = 1 (zstd)"));
}

#[test]
fn external_data_file_and_extended_l2_are_refused_by_bit() {
    let d = Scratch::new("edf");
    let data = d.path("data.raw");
    let h = parse(&create(
        &d,
        "edf.qcow2",
        &["-o", &format!("data_file={}", data.display())],
        "16M",
    ))
    .unwrap();
    assert_eq!(h.external_data_file.as_deref(), data.to_str());
    assert!(h
        .refusal(false)
        .unwrap()
        .contains("incompatible bit 2 (external data file)"));
    let h = parse(&create(
        &d,
        "el2.qcow2",
        &["-o", "extended_l2=on,cluster_size=128k"],
        "16M",
    ))
    .unwrap();
    assert!(h
        .refusal(false)
        .unwrap()
        .contains("incompatible bit 4 (extended L2)"));
}

#[test]
fn dirty_corrupt_and_unknown_bits_are_refused_by_name() {
    let d = Scratch::new("bits");
    let b = create(&d, "img.qcow2", &[], "16M");
    for (bit, words) in [
        (0, "incompatible bit 0 (dirty)"),
        (1, "incompatible bit 1 (corrupt)"),
        (9, "incompatible bit 9 is unknown"),
    ] {
        let mut b = b.clone();
        b[72..80].copy_from_slice(&(1u64 << bit).to_be_bytes());
        let why = parse(&b).unwrap().refusal(false).unwrap();
        assert!(why.contains(words), "{why}");
    }
}

#[test]
fn cluster_sizes_from_512_to_2m_parse_and_bound_the_growth() {
    let d = Scratch::new("cs");
    for (cs, bits) in [("512", 9), ("2M", 21)] {
        let h = parse(&create(
            &d,
            &format!("cs{bits}.qcow2"),
            &["-o", &format!("cluster_size={cs},refcount_bits=64")],
            "100M",
        ))
        .unwrap();
        assert_eq!(h.cluster_bits, bits);
        assert_eq!(h.refcount_order, 6);
        assert!(h.max_file_bytes() > 100 << 20);
        assert!(h.max_growth_bytes() > 100 << 20);
    }
}

/// A minimal well-formed v3 header in one 64 KiB cluster, for the hostile cases.
fn minimal() -> Vec<u8> {
    let mut b = vec![0u8; 65536];
    b[..4].copy_from_slice(&QCOW2_MAGIC);
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&16u32.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    b[36..40].copy_from_slice(&2u32.to_be_bytes());
    b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
    b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
    b[56..60].copy_from_slice(&1u32.to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&112u32.to_be_bytes());
    b
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn field_of(r: Result<Qcow2Header, HeaderError>) -> &'static str {
    match r {
        Err(HeaderError::Invalid { field, .. }) => field,
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn the_minimal_header_parses() {
    assert_eq!(parse(&minimal()).unwrap().refusal(true), None);
}

#[test]
fn a_2_pow_63_virtual_size_is_refused() {
    let mut b = minimal();
    put64(&mut b, 24, 1 << 63);
    assert_eq!(field_of(parse(&b)), "size");
    put64(&mut b, 24, i64::MAX as u64);
    put32(&mut b, 36, u32::MAX);
    let e = parse(&b).unwrap_err().to_string();
    assert!(e.contains("l1_size"), "{e}");
    // A large L1 that still cannot cover the size is refused by size.
    put32(&mut b, 36, 4 << 20);
    assert_eq!(field_of(parse(&b)), "size");
}

#[test]
fn an_l1_table_too_small_for_the_size_is_refused() {
    let mut b = minimal();
    put32(&mut b, 36, 1); // 1 GiB needs 2 entries at 64 KiB clusters
    assert_eq!(field_of(parse(&b)), "l1_size");
}

#[test]
fn cluster_bits_and_refcount_order_outside_their_ranges_are_refused() {
    for bits in [0, 8, 22, 63, 64, u32::MAX] {
        let mut b = minimal();
        put32(&mut b, 20, bits);
        assert_eq!(field_of(parse(&b)), "cluster_bits", "{bits}");
    }
    let mut b = minimal();
    put32(&mut b, 96, 7);
    assert_eq!(field_of(parse(&b)), "refcount_order");
}

#[test]
fn header_length_is_bounded_by_the_cluster_and_the_bytes() {
    for len in [0, 72, 103, 105, 65544, u32::MAX] {
        let mut b = minimal();
        put32(&mut b, 100, len);
        assert_eq!(field_of(parse(&b)), "header_length", "{len}");
    }
    let mut b = minimal();
    b.truncate(108);
    assert!(matches!(parse(&b), Err(HeaderError::Truncated { .. })));
}

#[test]
fn backing_names_outside_the_cluster_or_the_bytes_are_refused() {
    let mut b = minimal();
    b[120..125].copy_from_slice(b"a.img");
    put64(&mut b, 8, 120);
    put32(&mut b, 16, 5);
    assert_eq!(parse(&b).unwrap().backing.unwrap().name, "a.img");
    for (off, len) in [
        (120u64, 0u32),
        (120, 1024),
        (u64::MAX - 2, 5),
        (65534, 5),
        (8, 5),
    ] {
        let mut c = b.clone();
        put64(&mut c, 8, off);
        put32(&mut c, 16, len);
        assert!(parse(&c).is_err(), "{off} {len}");
    }
    let mut c = b.clone();
    c.truncate(122);
    assert!(matches!(parse(&c), Err(HeaderError::Truncated { .. })));
    let mut c = b.clone();
    c[121] = 0;
    assert_eq!(field_of(parse(&c)), "backing file name");
    let mut c = b.clone();
    c[121] = 0xff;
    assert_eq!(field_of(parse(&c)), "backing file name");
}

#[test]
fn header_extensions_are_walked_within_their_bounds() {
    // An extension claiming more bytes than the first cluster.
    let mut b = minimal();
    put32(&mut b, 112, EXT_BACKING_FORMAT);
    put32(&mut b, 116, u32::MAX);
    assert_eq!(field_of(parse(&b)), "header extensions");
    // One running into the backing name.
    let mut b = minimal();
    put32(&mut b, 112, 0x1111_1111);
    put32(&mut b, 116, 16);
    b[136..141].copy_from_slice(b"a.img");
    put64(&mut b, 8, 136);
    put32(&mut b, 16, 5);
    put32(&mut b, 116, 24);
    assert_eq!(field_of(parse(&b)), "header extensions");
    // No end marker before the bytes run out.
    let mut b = minimal();
    for at in (112..4096).step_by(8) {
        put32(&mut b, at, 0x2222_2222);
    }
    b.truncate(4096);
    assert!(parse(&b).is_err());
    // An unknown backing format.
    let mut b = minimal();
    put32(&mut b, 112, EXT_BACKING_FORMAT);
    put32(&mut b, 116, 4);
    b[120..124].copy_from_slice(b"vmdk");
    assert_eq!(field_of(parse(&b)), "backing format");
    // Two backing format extensions.
    let mut b = minimal();
    for at in [112, 128] {
        put32(&mut b, at, EXT_BACKING_FORMAT);
        put32(&mut b, at + 4, 3);
        b[at + 8..at + 11].copy_from_slice(b"raw");
    }
    assert_eq!(field_of(parse(&b)), "header extensions");
    // A short bitmaps extension, a bad encryption pointer.
    let mut b = minimal();
    put32(&mut b, 112, EXT_BITMAPS);
    put32(&mut b, 116, 8);
    assert_eq!(field_of(parse(&b)), "bitmaps extension");
    let mut b = minimal();
    put32(&mut b, 32, 2);
    put32(&mut b, 112, EXT_FULL_DISK_ENCRYPTION);
    put32(&mut b, 116, 16);
    put64(&mut b, 120, !0xffff_u64);
    put64(&mut b, 128, 1 << 20);
    assert_eq!(field_of(parse(&b)), "full disk encryption header offset");
    // LUKS without its header pointer.
    let mut b = minimal();
    put32(&mut b, 32, 2);
    assert_eq!(field_of(parse(&b)), "crypt_method");
}

#[test]
fn misaligned_or_overflowing_tables_are_refused() {
    let mut b = minimal();
    put64(&mut b, 40, 0x1234);
    assert_eq!(field_of(parse(&b)), "l1_table_offset");
    let mut b = minimal();
    put64(&mut b, 40, !0xffff_u64);
    assert_eq!(field_of(parse(&b)), "l1_table_offset");
    let mut b = minimal();
    put64(&mut b, 48, 0);
    assert_eq!(field_of(parse(&b)), "refcount_table_offset");
    let mut b = minimal();
    put32(&mut b, 56, u32::MAX);
    assert_eq!(field_of(parse(&b)), "refcount_table_clusters");
    let mut b = minimal();
    put32(&mut b, 60, 70000);
    assert_eq!(field_of(parse(&b)), "nb_snapshots");
    let mut b = minimal();
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 7);
    assert_eq!(field_of(parse(&b)), "snapshots_offset");
}

#[test]
fn short_inputs_and_wrong_versions_are_errors_not_panics() {
    let full = minimal();
    for n in 0..200 {
        let _ = parse(&full[..n]);
    }
    assert_eq!(parse(b"RAW!"), Err(HeaderError::NotQcow2));
    let mut b = minimal();
    put32(&mut b, 4, 1);
    assert_eq!(field_of(parse(&b)), "version");
}

#[test]
fn max_file_bytes_saturates_instead_of_overflowing() {
    let mut b = minimal();
    put32(&mut b, 20, 21);
    put64(&mut b, 24, 1 << 60);
    put32(&mut b, 36, 4 << 20);
    put64(&mut b, 40, 1 << 21);
    put64(&mut b, 48, 1 << 22);
    put32(&mut b, 60, 65536);
    put64(&mut b, 64, 1 << 23);
    let h = parse(&b).unwrap();
    assert_eq!(h.max_file_bytes(), u64::MAX);
    assert!(h.max_growth_bytes() > 1 << 60);
}
