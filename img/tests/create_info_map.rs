//! `create`, `info`, `map` and `resize` against qemu-img, both ways.

mod common;
use common::*;

/// Images cellvm-img creates pass `qemu-img check`, and `qemu-img info` reads back what
/// was asked: qcow2 v3, the cluster size, the size, the backing file and its format.
#[test]
fn created_images_are_what_qemu_img_sees() {
    let s = Scratch::new("create");
    let (base, top, small, raw) = (
        s.p("base.qcow2"),
        s.p("top.qcow2"),
        s.p("small.qcow2"),
        s.p("r.raw"),
    );
    ok(img(&["create", "-f", "qcow2", &base, "64M"]), "create");
    qemu_clean(&base);
    let q = json(&ok(qemu_img(&["info", "--output", "json", &base]), "info"));
    assert_eq!(q["virtual-size"], 64 << 20);
    assert_eq!(q["cluster-size"], 65536);
    assert_eq!(q["format"], "qcow2");
    assert_eq!(q["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(q["format-specific"]["data"]["refcount-bits"], 16);

    ok(
        img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &small,
            "3G",
        ]),
        "create 4k",
    );
    qemu_clean(&small);
    let q = json(&ok(qemu_img(&["info", "--output", "json", &small]), "info"));
    assert_eq!(q["virtual-size"], 3u64 << 30);
    assert_eq!(q["cluster-size"], 4096);

    // A backing file, no size: the backing file's size.
    ok(
        img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &top,
        ]),
        "create -b",
    );
    qemu_clean(&top);
    let q = json(&ok(qemu_img(&["info", "--output", "json", &top]), "info"));
    assert_eq!(q["backing-filename"], "base.qcow2");
    assert_eq!(q["backing-filename-format"], "qcow2");
    assert_eq!(q["virtual-size"], 64 << 20);

    // Writes by QEMU into cellvm-img's images read back through the chain.
    ok(
        qemu_io(&base, &["write -P 0x61 0 192k", "write -P 0x62 1M 64k"]),
        "qemu-io base",
    );
    ok(qemu_io(&top, &["write -P 0x63 64k 64k"]), "qemu-io top");
    qemu_clean(&base);
    qemu_clean(&top);
    ok(
        qemu_io(
            &top,
            &[
                "read -P 0x61 0 64k",
                "read -P 0x63 64k 64k",
                "read -P 0x61 128k 64k",
                "read -P 0x62 1M 64k",
            ],
        ),
        "qemu-io read",
    );

    // Without -F, a backing file is refused, as qemu-img 7.2 does.
    let r = img(&["create", "-f", "qcow2", "-b", "base.qcow2", &s.p("x.qcow2")]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("backing format"), "{}", r.stderr);

    ok(img(&["create", "-f", "raw", &raw, "5M"]), "create raw");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 5 << 20);
    let q = json(&ok(
        qemu_img(&["info", "--output", "json", &raw]),
        "info raw",
    ));
    assert_eq!(q["format"], "raw");
}

/// `info --output json` agrees with qemu-img on images qemu-img made: sizes, backing
/// file and format, snapshots, compat, dirty flag, encryption.
#[test]
fn info_agrees_with_qemu_img() {
    let s = Scratch::new("info");
    let (a, b, enc) = (s.p("a.qcow2"), s.p("b.qcow2"), s.p("enc.qcow2"));
    ok(
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16k",
            &a,
            "100M",
        ]),
        "qemu create",
    );
    ok(qemu_io(&a, &["write -P 0x11 0 300k"]), "qemu-io");
    ok(qemu_img(&["snapshot", "-c", "first", &a]), "snapshot");
    ok(qemu_img(&["snapshot", "-c", "second", &a]), "snapshot");
    ok(
        qemu_img(&["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", &b]),
        "qemu create -b",
    );
    for f in [&a, &b] {
        let q = json(&ok(qemu_img(&["info", "--output", "json", f]), "qemu info"));
        let m = json(&ok(img(&["info", "--output", "json", f]), "info"));
        for k in [
            "virtual-size",
            "cluster-size",
            "format",
            "actual-size",
            "dirty-flag",
            "backing-filename",
            "backing-filename-format",
        ] {
            assert_eq!(m[k], q[k], "{f}: {k}");
        }
        for k in [
            "compat",
            "compression-type",
            "refcount-bits",
            "corrupt",
            "lazy-refcounts",
            "extended-l2",
        ] {
            assert_eq!(
                m["format-specific"]["data"][k], q["format-specific"]["data"][k],
                "{f}: {k}"
            );
        }
        let names = |v: &serde_json::Value| -> Vec<(String, String, u64)> {
            v["snapshots"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| {
                            (
                                s["id"].as_str().unwrap().to_string(),
                                s["name"].as_str().unwrap().to_string(),
                                s["date-sec"].as_u64().unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(names(&m), names(&q), "{f}: snapshots");
    }
    // Encrypted (LUKS): reported, and its data is never read as plaintext.
    ok(
        qemu_img(&[
            "create",
            "--object",
            "secret,id=sec0,data=pass",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            &enc,
            "8M",
        ]),
        "qemu create luks",
    );
    let m = json(&ok(img(&["info", "--output", "json", &enc]), "info luks"));
    assert_eq!(m["encrypted"], true);
    // And what cellvm's blk backend (block::header) says: refused, by name; a plain
    // image is served.
    let why = m["cellvm-refuses-read-only"].as_str().unwrap_or_default();
    assert!(why.contains("LUKS"), "{m}");
    let plain = json(&ok(img(&["info", "--output", "json", &a]), "info"));
    assert!(plain["cellvm-refuses-read-write"].is_null(), "{plain}");
    assert!(ok(img(&["info", &a]), "info").contains("cellvm serves it: read-write"));
    let r = img(&["convert", "-O", "raw", &enc, &s.p("enc.raw")]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("encrypted"), "{}", r.stderr);
    let r = img(&["snapshot", "-c", "x", &enc]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("encrypted"), "{}", r.stderr);
    // Human output names the same facts.
    let h = ok(img(&["info", &b]), "info");
    assert!(h.contains("virtual size: 100 MiB (104857600 bytes)"), "{h}");
    assert!(h.contains("backing file: a.qcow2"), "{h}");
    let h = ok(img(&["info", &a]), "info");
    assert!(h.contains("first") && h.contains("second"), "{h}");
}

fn map_json(out: &str) -> serde_json::Value {
    json(out)
}

/// `map --output json` is qemu-img's map: data, zero and unallocated ranges, depth in
/// the chain, host offsets.
#[test]
fn map_agrees_with_qemu_img() {
    let s = Scratch::new("map");
    let (a, b, raw) = (s.p("a.qcow2"), s.p("b.qcow2"), s.p("r.raw"));
    ok(qemu_img(&["create", "-f", "raw", &raw, "16M"]), "raw");
    ok(qemu_io(&raw, &["write -P 0x41 0 1M"]), "raw data");
    ok(
        qemu_img(&["create", "-f", "qcow2", "-b", "r.raw", "-F", "raw", &a]),
        "a",
    );
    ok(
        qemu_io(
            &a,
            &[
                "write -P 0x1 64k 128k",
                "write -z 2M 64k",
                "write -P 0x3 5M 100k",
                "discard 5M 64k",
            ],
        ),
        "a writes",
    );
    ok(
        qemu_img(&["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", &b]),
        "b",
    );
    ok(
        qemu_io(
            &b,
            &[
                "write -P 0x2 0 64k",
                "write -P 0x4 8M 64k",
                "write -z 5M 64k",
            ],
        ),
        "b writes",
    );
    for f in [&a, &b] {
        let q = map_json(&ok(qemu_img(&["map", "--output", "json", f]), "qemu map"));
        let m = map_json(&ok(img(&["map", "--output", "json", f]), "map"));
        // qemu-img's raw layer reports its first 4 KiB block apart from the rest of the
        // data; compare the qcow2 layers exactly and the raw layer's ranges merged.
        let strip = |v: &serde_json::Value| -> Vec<serde_json::Value> {
            let mut out: Vec<serde_json::Value> = Vec::new();
            for e in v.as_array().unwrap() {
                if let Some(last) = out.last_mut() {
                    let same = ["depth", "present", "zero", "data"]
                        .iter()
                        .all(|k| last[*k] == e[*k]);
                    let contiguous = match (last.get("offset"), e.get("offset")) {
                        (Some(a), Some(b)) => {
                            a.as_u64().unwrap() + last["length"].as_u64().unwrap()
                                == b.as_u64().unwrap()
                        }
                        (None, None) => true,
                        _ => false,
                    };
                    if same && contiguous {
                        let l = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                        last["length"] = l.into();
                        continue;
                    }
                }
                out.push(e.clone());
            }
            out
        };
        assert_eq!(strip(&m), strip(&q), "{f}\nours: {m}\nqemu: {q}");
    }
    let h = ok(img(&["map", &b]), "map human");
    assert!(
        h.starts_with("Offset          Length          Mapped to       File"),
        "{h}"
    );
}

/// `resize`: growing keeps the data and qemu-img check clean (also when the L1 table has
/// to move); shrinking is refused without --shrink and drops the tail with it.
#[test]
fn resize_grows_and_shrinks_like_qemu_img() {
    let s = Scratch::new("resize");
    let (a, raw) = (s.p("a.qcow2"), s.p("a.raw"));
    ok(
        img(&["create", "-f", "qcow2", "-o", "cluster_size=512", &a, "1M"]),
        "create",
    );
    ok(qemu_io(&a, &["write -P 0x5 0 1M"]), "fill");
    // 512-byte clusters: one L1 cluster maps 2 MiB; 64 MiB needs the L1 table to move.
    ok(img(&["resize", &a, "64M"]), "grow");
    qemu_clean(&a);
    let q = json(&ok(qemu_img(&["info", "--output", "json", &a]), "info"));
    assert_eq!(q["virtual-size"], 64 << 20);
    ok(
        qemu_io(
            &a,
            &[
                "read -P 0x5 0 1M",
                "read -P 0 1M 63M",
                "write -P 0x6 60M 64k",
            ],
        ),
        "read after grow",
    );
    qemu_clean(&a);
    ok(img(&["resize", &a, "+1M"]), "grow relative");
    let q = json(&ok(qemu_img(&["info", "--output", "json", &a]), "info"));
    assert_eq!(q["virtual-size"], 65 << 20);

    let r = img(&["resize", &a, "512k"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("--shrink"), "{}", r.stderr);
    ok(img(&["resize", "--shrink", &a, "512k"]), "shrink");
    qemu_clean(&a);
    let q = json(&ok(qemu_img(&["info", "--output", "json", &a]), "info"));
    assert_eq!(q["virtual-size"], 512 << 10);
    ok(qemu_io(&a, &["read -P 0x5 0 512k"]), "read after shrink");
    let c = json(&ok(qemu_img(&["check", "--output", "json", &a]), "check"));
    assert_eq!(
        c["allocated-clusters"], 1024,
        "only the kept clusters stay allocated"
    );

    ok(img(&["create", "-f", "raw", &raw, "1M"]), "raw");
    ok(img(&["resize", &raw, "3M"]), "raw grow");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 3 << 20);
    assert_eq!(img(&["resize", &raw, "1M"]).code, Some(1));
}
