//! Hostile images: every table offset and size is checked against the file, and each
//! command gives a clear error (or, for check, a verdict), never a panic or a hang.
//! Also replays the fuzz corpus and a deterministic mutation run through the
//! `img_check` fuzz entry point.

mod common;
use common::*;

use std::time::{Duration, Instant};

/// A qemu-made image with data and a snapshot (64 KiB clusters, 16 MiB).
fn base(s: &Scratch) -> Vec<u8> {
    let f = s.p("base.qcow2");
    ok(qemu_img(&["create", "-f", "qcow2", &f, "16M"]), "create");
    ok(qemu_io(&f, &["write -P 0x7 0 256k"]), "write");
    ok(qemu_img(&["snapshot", "-c", "s1", &f]), "snapshot");
    bytes(&f)
}

/// Runs every read-only command on `b`; each must end (within seconds) with an exit
/// code, never a signal. Returns (info's exit code, info's stderr, check's exit code).
fn every_command(s: &Scratch, name: &str, b: &[u8]) -> (Option<i32>, String, Option<i32>) {
    let f = s.p(name);
    std::fs::write(&f, b).unwrap();
    let out = s.p(&format!("{name}.raw"));
    let mut first = None;
    let mut check_code = None;
    for args in [
        vec!["info", "--output", "json", &f],
        vec!["check", &f],
        vec!["snapshot", "-l", &f],
        vec!["map", "--output", "json", &f],
        vec!["convert", "-O", "raw", &f, &out],
    ] {
        let t = Instant::now();
        let r = img(&args);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{name}: {args:?} took {:?}",
            t.elapsed()
        );
        assert!(
            r.signal.is_none(),
            "{name}: {args:?} died by signal {:?}: {}",
            r.signal,
            r.stderr
        );
        assert!(
            matches!(r.code, Some(0..=3)),
            "{name}: {args:?}: {:?}",
            r.code
        );
        if r.code != Some(0) && r.code != Some(3) {
            assert!(
                r.stderr.starts_with("cellvm-img: ") || args[0] == "check",
                "{name}: {args:?}: unclear error: {}",
                r.stderr
            );
        }
        if args[0] == "check" {
            check_code = r.code;
        }
        if first.is_none() {
            first = Some((r.code, r.stderr));
        }
    }
    let (c, e) = first.unwrap();
    (c, e, check_code)
}

fn refused(s: &Scratch, name: &str, b: &[u8], words: &str) {
    let (code, err, _) = every_command(s, name, b);
    assert_eq!(code, Some(1), "{name}: info must refuse: {err}");
    assert!(err.contains(words), "{name}: '{words}' not in: {err}");
}

#[test]
fn hostile_headers_are_refused_by_name() {
    let s = Scratch::new("hostile-hdr");
    let b = base(&s);
    let file_len = b.len() as u64;

    // An L1 table larger than the file.
    let mut h = b.clone();
    put_be32(&mut h, 36, 1 << 20);
    refused(&s, "l1big", &h, "L1 table");
    // An L1 table larger than any image may have.
    let mut h = b.clone();
    put_be32(&mut h, 36, u32::MAX);
    refused(&s, "l1huge", &h, "exceeds the limit");
    // L1 table offset past the end, and unaligned.
    let mut h = b.clone();
    put_be64(&mut h, 40, file_len.next_multiple_of(65536) + 65536);
    refused(&s, "l1past", &h, "outside the file");
    let mut h = b.clone();
    put_be64(&mut h, 40, 0x30008);
    refused(&s, "l1unaligned", &h, "not cluster aligned");
    // Refcount table past the end.
    let mut h = b.clone();
    put_be64(&mut h, 48, 1 << 40);
    refused(&s, "rtpast", &h, "refcount table");
    let mut h = b.clone();
    put_be32(&mut h, 56, 1 << 30);
    refused(&s, "rthuge", &h, "refcount table");
    // Snapshot table past the end, too many snapshots.
    let mut h = b.clone();
    put_be64(&mut h, 64, file_len.next_multiple_of(65536) + 65536);
    refused(&s, "snappast", &h, "snapshot table");
    let mut h = b.clone();
    put_be32(&mut h, 60, 1000);
    refused(&s, "snapmany", &h, "snapshot table");
    let mut h = b.clone();
    put_be32(&mut h, 60, u32::MAX);
    refused(&s, "snapmax", &h, "nb_snapshots");
    // A 2^63-byte virtual size, and 2^64 - 1.
    let mut h = b.clone();
    put_be64(&mut h, 24, 1 << 63);
    refused(&s, "size63", &h, "virtual size");
    let mut h = b.clone();
    put_be64(&mut h, 24, u64::MAX);
    refused(&s, "sizemax", &h, "virtual size");
    // Cluster bits out of range, refcount order out of range, unknown version.
    let mut h = b.clone();
    put_be32(&mut h, 20, 40);
    refused(&s, "cbits", &h, "cluster_bits");
    let mut h = b.clone();
    put_be32(&mut h, 96, 9);
    refused(&s, "rcorder", &h, "refcount_order");
    let mut h = b.clone();
    put_be32(&mut h, 4, 7);
    refused(&s, "version", &h, "version");
    // A backing name outside the first cluster, longer than 1023 bytes.
    let mut h = b.clone();
    put_be64(&mut h, 8, 65530);
    put_be32(&mut h, 16, 100);
    refused(&s, "backingpast", &h, "backing file name");
    // Header extensions that run past the first cluster.
    let mut h = b.clone();
    put_be32(&mut h, 112, 0x1234_5678);
    put_be32(&mut h, 116, 0xffff_fff0);
    refused(&s, "extpast", &h, "header extension");
    // A truncated header.
    refused(&s, "short", &b[..60], "too small");
}

#[test]
fn hostile_tables_give_errors_or_corruption_verdicts() {
    let s = Scratch::new("hostile-tbl");
    let b = base(&s);
    let l1 = be64_at(&b, 40) as usize;
    let l2 = (be64_at(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;

    // An L2 table past the end of the file.
    let mut h = b.clone();
    put_be64(&mut h, l1, (1u64 << 40) | (1 << 63));
    let (_, _, check) = every_command(&s, "l2past", &h);
    assert_eq!(check, Some(2), "check must call it corruption");
    let r = img(&["convert", "-O", "raw", &s.p("l2past"), &s.p("x.raw")]);
    assert!(
        r.stderr.contains("past the end of the file"),
        "{}",
        r.stderr
    );

    // A data cluster past the end of the file.
    let mut h = b.clone();
    put_be64(&mut h, l2, (1u64 << 45) | (1 << 63));
    let (_, _, check) = every_command(&s, "datapast", &h);
    assert_eq!(check, Some(2));
    let r = img(&["check", &s.p("datapast")]);
    assert!(
        r.stderr.contains("exceeding the end of the file"),
        "{}",
        r.stderr
    );

    // Unaligned L2 and data offsets.
    let mut h = b.clone();
    put_be64(&mut h, l1, (l2 as u64 + 512) | (1 << 63));
    let (_, _, check) = every_command(&s, "l2unaligned", &h);
    assert_eq!(check, Some(2));
    let mut h = b.clone();
    let e = be64_at(&h, l2);
    put_be64(&mut h, l2, e + 512);
    let (_, _, check) = every_command(&s, "dataunaligned", &h);
    assert_eq!(check, Some(2));

    // Every L1 entry pointing at the same L2 table, on a large virtual disk: check
    // reads each distinct table once, so it stays fast.
    let mut h = b.clone();
    let l1e = be64_at(&h, l1);
    let entries = 2048usize;
    let new_l1 = h.len().next_multiple_of(65536);
    h.resize(new_l1 + entries * 8, 0);
    for i in 0..entries {
        put_be64(&mut h, new_l1 + i * 8, l1e);
    }
    put_be64(&mut h, 40, new_l1 as u64);
    put_be32(&mut h, 36, entries as u32);
    put_be64(&mut h, 24, entries as u64 * (512 << 20));
    let (_, _, check) = every_command(&s, "sharedl2", &h);
    assert_eq!(check, Some(2));

    // A compressed cluster that does not inflate.
    let mut h = b.clone();
    let data = (be64_at(&h, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    let shift = 62 - (16 - 8);
    put_be64(&mut h, l2, (1 << 62) | (3u64 << shift) | data as u64);
    h[data..data + 2048].fill(0xff);
    let (_, _, check) = every_command(&s, "badzlib", &h);
    // The references still match (the table is shared with the snapshot): a verdict,
    // clean or not, but the data is refused when read.
    assert!(matches!(check, Some(0) | Some(2)), "{check:?}");
    let r = img(&["convert", "-O", "raw", &s.p("badzlib"), &s.p("y.raw")]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("does not inflate"), "{}", r.stderr);

    // Refcount 0 on a used cluster: check says corruption; deleting the snapshot would
    // take a refcount below zero and is refused, not wrapped.
    let mut h = b.clone();
    let rt = be64_at(&h, 48) as usize;
    let rb = be64_at(&h, rt) as usize;
    h[rb + (l2 / 65536) * 2..rb + (l2 / 65536) * 2 + 2].fill(0);
    let f = s.p("rc0");
    std::fs::write(&f, &h).unwrap();
    assert_eq!(img(&["check", &f]).code, Some(2));
    let r = img(&["snapshot", "-d", "s1", &f]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("below 0"), "{}", r.stderr);
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The committed corpus and past crashes replay without a panic, and so do 3,000
/// deterministic mutations of them (byte flips, 64-bit field overwrites, truncations).
#[test]
fn the_img_check_fuzz_target_survives_its_corpus_and_mutations() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let seeds = files(&fuzz.join("corpus/img_check"));
    assert!(!seeds.is_empty(), "fuzz/corpus/img_check has no seeds");
    let mut inputs: Vec<Vec<u8>> = seeds.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for p in files(&fuzz.join("regressions/img_check")) {
        inputs.push(std::fs::read(p).unwrap());
    }
    let start = Instant::now();
    for d in &inputs {
        cellvm_img::fuzzing::img_check(d);
    }
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let interesting = [
        0u64,
        1,
        0x200,
        0x10000,
        u64::MAX,
        1 << 63,
        0x7fff_ffff_ffff_ffff,
        0x8000_0000_0000_0200,
    ];
    for i in 0..3000 {
        let mut d = inputs[i % inputs.len()].clone();
        match next() % 4 {
            0 => {
                for _ in 0..1 + next() % 8 {
                    let o = (next() % d.len() as u64) as usize;
                    d[o] ^= 1 << (next() % 8);
                }
            }
            1 => {
                // A header or table field.
                let o = if next() % 2 == 0 {
                    (next() % 112) as usize & !7
                } else {
                    (next() % d.len() as u64) as usize & !7
                };
                if o + 8 <= d.len() {
                    put_be64(
                        &mut d,
                        o,
                        interesting[(next() % interesting.len() as u64) as usize],
                    );
                }
            }
            2 => {
                let o = (next() % 104) as usize & !3;
                put_be32(&mut d, o, next() as u32);
            }
            _ => {
                let n = (next() % d.len() as u64) as usize;
                d.truncate(n.max(1));
            }
        }
        cellvm_img::fuzzing::img_check(&d);
    }
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "took {:?}",
        start.elapsed()
    );
}

/// A 256 TiB image with a few clusters written: map, convert and check walk the
/// metadata, not every guest cluster, so they finish in seconds.
#[test]
fn huge_sparse_images_map_and_convert_quickly() {
    let s = Scratch::new("huge");
    let (f, out) = (s.p("huge.qcow2"), s.p("out.qcow2"));
    ok(qemu_img(&["create", "-f", "qcow2", &f, "256T"]), "create");
    ok(
        qemu_io(&f, &["write -P 0x1 0 64k", "write -P 0x2 100T 64k"]),
        "write",
    );
    let t = Instant::now();
    let m = json(&ok(img(&["map", "--output", "json", &f]), "map"));
    // (qemu-img map takes over half a minute on this image; the ranges are known.)
    let data: Vec<(u64, u64)> = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, [(0, 65536), (100 << 40, 65536)], "{m}");
    assert_eq!(m.as_array().unwrap().len(), 4, "{m}");
    ok(img(&["convert", "-O", "qcow2", &f, &out]), "convert");
    ok(img(&["check", &out]), "check");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    qemu_clean(&out);
    ok(
        qemu_io(
            &out,
            &[
                "read -P 0x1 0 64k",
                "read -P 0x2 100T 64k",
                "read -P 0 1T 64k",
            ],
        ),
        "read back",
    );
}
