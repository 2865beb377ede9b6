//! `check` against `qemu-img check`: the same exit code and the same counts of leaks
//! and corruptions on clean images, on images qemu damaged and on images damaged by hand.

mod common;
use common::*;

fn counts(v: &serde_json::Value) -> (u64, u64, u64) {
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (n("check-errors"), n("leaks"), n("corruptions"))
}

/// One tool's verdict: exit code and (check-errors, leaks, corruptions).
type Verdict = (Option<i32>, (u64, u64, u64));

/// Both tools' verdicts on `f`: (ours, qemu-img's).
fn both(f: &str) -> (Verdict, Verdict) {
    let q = qemu_img(&["check", "--output", "json", f]);
    let m = img(&["check", "--output", "json", f]);
    let qv = json(&q.stdout);
    let mv = json(&m.stdout);
    if q.code == Some(0) {
        for k in [
            "image-end-offset",
            "total-clusters",
            "allocated-clusters",
            "fragmented-clusters",
            "compressed-clusters",
        ] {
            assert_eq!(mv.get(k), qv.get(k), "{f}: {k}\nours: {mv}\nqemu: {qv}");
        }
    }
    ((m.code, counts(&mv)), (q.code, counts(&qv)))
}

fn agree(f: &str, expect_code: i32) -> (u64, u64) {
    let (m, q) = both(f);
    assert_eq!(m, q, "{f}: ours {m:?}, qemu-img {q:?}");
    assert_eq!(m.0, Some(expect_code), "{f}: {m:?}");
    (m.1 .1, m.1 .2)
}

fn be16_put(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_be_bytes());
}

/// A qemu-made image with data in its first clusters: (bytes, L2 offset, first data offset).
fn base_image(s: &Scratch, name: &str) -> (String, Vec<u8>, usize, usize) {
    let f = s.p(name);
    ok(qemu_img(&["create", "-f", "qcow2", &f, "16M"]), "create");
    ok(
        qemu_io(&f, &["write -P 0x7 0 256k", "write -P 0x8 4M 64k"]),
        "write",
    );
    let b = bytes(&f);
    let l1 = be64_at(&b, 40) as usize;
    let l2 = (be64_at(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let d0 = (be64_at(&b, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    (f, b, l2, d0)
}

fn refblock0(b: &[u8]) -> usize {
    let rt = be64_at(b, 48) as usize;
    be64_at(b, rt) as usize
}

#[test]
fn clean_images_agree() {
    let s = Scratch::new("check-clean");
    let (f, ..) = base_image(&s, "a.qcow2");
    agree(&f, 0);
    // Snapshots, compressed clusters, small clusters, refcount widths.
    ok(qemu_img(&["snapshot", "-c", "s1", &f]), "snapshot");
    ok(qemu_io(&f, &["write -P 0x9 64k 64k"]), "cow");
    agree(&f, 0);
    let raw = s.p("p.raw");
    pattern_raw(&raw, 4);
    let c = s.p("c.qcow2");
    ok(
        qemu_img(&["convert", "-c", "-O", "qcow2", &raw, &c]),
        "convert -c",
    );
    agree(&c, 0);
    for (opts, name) in [
        ("cluster_size=512,refcount_bits=1", "r1.qcow2"),
        ("cluster_size=4096,refcount_bits=64", "r64.qcow2"),
        ("refcount_bits=8,compat=0.10", "v2.qcow2"),
    ] {
        let o = if opts.contains("0.10") {
            "refcount_bits=16,compat=0.10"
        } else {
            opts
        };
        let g = s.p(name);
        ok(
            qemu_img(&["convert", "-O", "qcow2", "-o", o, &raw, &g]),
            "convert",
        );
        agree(&g, 0);
    }
}

#[test]
fn leaks_agree() {
    let s = Scratch::new("check-leak");
    let (f, mut b, ..) = base_image(&s, "a.qcow2");
    // A cluster past everything in use, with refcount 1: a leak.
    let cs = 65536usize;
    let end = b.len();
    let leaked = end / cs + 2;
    b.resize((leaked + 1) * cs, 0);
    let rb = refblock0(&b);
    be16_put(&mut b, rb + leaked * 2, 1);
    std::fs::write(&f, &b).unwrap();
    let (leaks, corruptions) = agree(&f, 3);
    assert_eq!((leaks, corruptions), (1, 0));
    let h = img(&["check", &f]);
    assert!(
        h.stdout
            .contains("1 leaked clusters were found on the image."),
        "{}",
        h.stdout
    );
    assert!(
        h.stderr
            .contains(&format!("Leaked cluster {leaked} refcount=1 reference=0")),
        "{}",
        h.stderr
    );
}

#[test]
fn corruptions_agree() {
    let s = Scratch::new("check-corrupt");
    // Refcount 0 on a used data cluster.
    let (f, mut b, _, d0) = base_image(&s, "zero.qcow2");
    let rb = refblock0(&b);
    be16_put(&mut b, rb + (d0 / 65536) * 2, 0);
    std::fs::write(&f, &b).unwrap();
    let (_, c) = agree(&f, 2);
    assert!(c >= 1);
    let h = img(&["check", &f]);
    assert!(
        h.stderr.contains(&format!(
            "ERROR cluster {} refcount=0 reference=1",
            d0 / 65536
        )),
        "{}",
        h.stderr
    );

    // Two L2 entries naming the same data cluster (overlapping data).
    let (f, mut b, l2, _) = base_image(&s, "dup.qcow2");
    let e0 = be64_at(&b, l2);
    put_be64(&mut b, l2 + 8, e0);
    std::fs::write(&f, &b).unwrap();
    agree(&f, 2);

    // A data cluster placed on the refcount table (overlapping metadata).
    let (f, mut b, l2, _) = base_image(&s, "meta.qcow2");
    let rt = be64_at(&b, 48);
    put_be64(&mut b, l2 + 5 * 8, rt | (1 << 63));
    std::fs::write(&f, &b).unwrap();
    let (m, q) = both(&f);
    assert_eq!(m.0, Some(2));
    assert_eq!(m, q, "ours {m:?}, qemu-img {q:?}");

    // COPIED cleared on an L2 entry whose cluster has refcount 1.
    let (f, mut b, l2, _) = base_image(&s, "copied.qcow2");
    let e0 = be64_at(&b, l2);
    put_be64(&mut b, l2, e0 & !(1 << 63));
    std::fs::write(&f, &b).unwrap();
    let (_, c) = agree(&f, 2);
    assert_eq!(c, 1);
}

/// qemu-io killed in the middle of allocating writes (its `abort` command) leaves
/// whatever it leaves: with lazy refcounts, clusters in use whose refcounts were never
/// written (corruption until repaired); without, a clean image. Both tools count the same.
#[test]
fn images_qemu_left_behind_agree() {
    let s = Scratch::new("check-abort");
    for (i, opts, cmds) in [
        (0, "cluster_size=4k", vec!["write -P 0x1 0 2M", "abort"]),
        (
            1,
            "cluster_size=4k,lazy_refcounts=on",
            vec!["write -P 0x1 0 1M", "write -P 0x2 4M 64k", "abort"],
        ),
        (
            2,
            "lazy_refcounts=on",
            vec![
                "write -P 0x1 0 1M",
                "write -P 0x2 8M 1M",
                "discard 0 512k",
                "abort",
            ],
        ),
    ] {
        let f = s.p(&format!("a{i}.qcow2"));
        ok(
            qemu_img(&["create", "-f", "qcow2", "-o", opts, &f, "16M"]),
            "create",
        );
        let _ = qemu_io(&f, &cmds);
        let (m, q) = both(&f);
        assert_eq!(m, q, "{f}: ours {m:?}, qemu-img {q:?}");
        if opts.contains("lazy") {
            assert_eq!(m.0, Some(2), "{f}: lazy refcounts left unwritten: {m:?}");
            assert!(m.1 .2 > 0);
        }
    }
}
