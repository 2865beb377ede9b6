//! `convert` (raw <-> qcow2, -c compressed) and internal snapshots, against qemu-img
//! both ways.

mod common;
use common::*;

/// raw -> qcow2 with and without -c: qemu-img check clean, compare identical, qemu-img
/// convert back gives the same bytes, zero clusters stay unallocated, and -c really
/// stores compressed clusters (qemu-img counts them) and a smaller file.
#[test]
fn convert_raw_to_qcow2_and_back() {
    let s = Scratch::new("convert");
    let raw = s.p("p.raw");
    pattern_raw(&raw, 8);
    let nonzero = bytes(&raw)
        .chunks(65536)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;
    for (flag, name) in [(None, "plain.qcow2"), (Some("-c"), "comp.qcow2")] {
        let q = s.p(name);
        let mut args = vec!["convert"];
        args.extend(flag);
        args.extend(["-f", "raw", "-O", "qcow2", &raw, &q]);
        ok(img(&args), "convert");
        qemu_clean(&q);
        qemu_same(&raw, &q);
        let back = s.p(&format!("{name}.raw"));
        ok(
            qemu_img(&["convert", "-O", "raw", &q, &back]),
            "qemu-img convert back",
        );
        assert!(
            bytes(&back) == bytes(&raw),
            "{name}: bytes differ after qemu-img convert back"
        );
        let c = json(&ok(qemu_img(&["check", "--output", "json", &q]), "check"));
        assert_eq!(
            c["allocated-clusters"], nonzero,
            "{name}: zero clusters stay unallocated"
        );
        let compressed = c
            .get("compressed-clusters")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if flag.is_some() {
            // The text and mostly-zero clusters compress; the random ones do not.
            assert!(compressed >= nonzero / 2, "{name}: {c}");
        } else {
            assert_eq!(compressed, 0);
        }
    }
    let plain = std::fs::metadata(s.p("plain.qcow2")).unwrap().len();
    let comp = std::fs::metadata(s.p("comp.qcow2")).unwrap().len();
    assert!(comp < plain * 2 / 3, "compressed {comp} vs {plain}");
    // Other cluster sizes.
    let q = s.p("small.qcow2");
    ok(
        img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &raw,
            &q,
        ]),
        "convert 4k",
    );
    qemu_clean(&q);
    qemu_same(&raw, &q);
}

/// qcow2 -> raw with cellvm-img reads what qemu-img wrote: compressed clusters, zero
/// clusters, a backing chain (flattened), other cluster sizes.
#[test]
fn convert_qemu_images_to_raw() {
    let s = Scratch::new("convert-back");
    let raw = s.p("p.raw");
    pattern_raw(&raw, 4);
    for (opts, name) in [
        ("cluster_size=65536", "c64.qcow2"),
        ("cluster_size=2048", "c2k.qcow2"),
        ("cluster_size=2M", "c2m.qcow2"),
    ] {
        let q = s.p(name);
        ok(
            qemu_img(&["convert", "-c", "-O", "qcow2", "-o", opts, &raw, &q]),
            "qemu-img convert -c",
        );
        let out = s.p(&format!("{name}.raw"));
        ok(img(&["convert", "-O", "raw", &q, &out]), "convert to raw");
        assert!(bytes(&out) == bytes(&raw), "{name}: differs");
        // And qcow2 -> qcow2 (recompressed).
        let q2 = s.p(&format!("{name}.2.qcow2"));
        ok(
            img(&["convert", "-c", "-O", "qcow2", &q, &q2]),
            "qcow2 -> qcow2",
        );
        qemu_clean(&q2);
        qemu_same(&raw, &q2);
    }
    // A chain: raw base, qcow2 overlay with writes and zeroes.
    let top = s.p("top.qcow2");
    ok(
        qemu_img(&["create", "-f", "qcow2", "-b", "p.raw", "-F", "raw", &top]),
        "overlay",
    );
    ok(
        qemu_io(&top, &["write -P 0x42 100k 200k", "write -z 1M 128k"]),
        "writes",
    );
    let flat = s.p("flat.raw");
    ok(img(&["convert", "-O", "raw", &top, &flat]), "flatten");
    qemu_same(&top, &flat);
    let flatq = s.p("flat.qcow2");
    ok(
        img(&["convert", "-O", "qcow2", &top, &flatq]),
        "flatten to qcow2",
    );
    qemu_clean(&flatq);
    qemu_same(&top, &flatq);
    let info = json(&ok(qemu_img(&["info", "--output", "json", &flatq]), "info"));
    assert!(info.get("backing-filename").is_none());
}

fn snapshot_names(f: &str) -> Vec<String> {
    let q = json(&ok(qemu_img(&["info", "--output", "json", f]), "info"));
    q["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Snapshots cellvm-img makes are listed and applied by qemu-img; snapshots qemu-img
/// makes are listed, applied and deleted by cellvm-img; `qemu-img check` is clean after
/// every operation and the data after an apply is the snapshot's.
#[test]
fn snapshots_interchange_with_qemu_img() {
    let s = Scratch::new("snap");
    let f = s.p("a.qcow2");
    let (v1, v2, v3) = (s.p("v1.raw"), s.p("v2.raw"), s.p("v3.raw"));
    ok(img(&["create", "-f", "qcow2", &f, "32M"]), "create");
    ok(
        qemu_io(&f, &["write -P 0x1 0 1M", "write -P 0x2 20M 64k"]),
        "v1",
    );
    ok(qemu_img(&["convert", "-O", "raw", &f, &v1]), "v1 copy");

    // cellvm-img -c, then qemu writes, qemu-img sees and applies it.
    ok(img(&["snapshot", "-c", "one", &f]), "cellvm -c one");
    qemu_clean(&f);
    assert_eq!(snapshot_names(&f), ["one"]);
    let l = ok(qemu_img(&["snapshot", "-l", &f]), "qemu -l");
    assert!(l.contains("one"), "{l}");
    ok(
        qemu_io(
            &f,
            &[
                "write -P 0x3 512k 1M",
                "write -z 20M 64k",
                "write -P 0x4 30M 64k",
            ],
        ),
        "v2",
    );
    qemu_clean(&f);
    ok(qemu_img(&["convert", "-O", "raw", &f, &v2]), "v2 copy");
    ok(qemu_img(&["snapshot", "-a", "one", &f]), "qemu -a one");
    qemu_clean(&f);
    qemu_same(&f, &v1);

    // qemu-img -c, cellvm-img lists and applies it.
    ok(qemu_io(&f, &["write -P 0x5 2M 3M"]), "v3");
    ok(qemu_img(&["convert", "-O", "raw", &f, &v3]), "v3 copy");
    ok(qemu_img(&["snapshot", "-c", "two", &f]), "qemu -c two");
    let l = ok(img(&["snapshot", "-l", &f]), "cellvm -l");
    assert!(l.contains("one") && l.contains("two"), "{l}");
    assert_eq!(
        l,
        ok(qemu_img(&["snapshot", "-l", &f]), "qemu -l"),
        "the same listing"
    );
    ok(img(&["snapshot", "-a", "one", &f]), "cellvm -a one");
    qemu_clean(&f);
    qemu_same(&f, &v1);
    ok(img(&["snapshot", "-a", "two", &f]), "cellvm -a two");
    qemu_clean(&f);
    qemu_same(&f, &v3);

    // Writes after a cellvm-img apply leave the snapshots intact.
    ok(qemu_io(&f, &["write -P 0x6 0 4M"]), "overwrite");
    qemu_clean(&f);
    ok(img(&["snapshot", "-a", "one", &f]), "cellvm -a one again");
    qemu_same(&f, &v1);

    // Deletes, both ways; the other snapshot stays usable.
    ok(img(&["snapshot", "-d", "one", &f]), "cellvm -d one");
    qemu_clean(&f);
    assert_eq!(snapshot_names(&f), ["two"]);
    ok(qemu_img(&["snapshot", "-a", "two", &f]), "qemu -a two");
    qemu_same(&f, &v3);
    ok(img(&["snapshot", "-c", "three", &f]), "cellvm -c three");
    ok(qemu_img(&["snapshot", "-d", "two", &f]), "qemu -d two");
    qemu_clean(&f);
    ok(img(&["snapshot", "-d", "three", &f]), "cellvm -d three");
    qemu_clean(&f);
    assert!(snapshot_names(&f).is_empty());
    qemu_same(&f, &v3);
    // With every snapshot gone, no cluster stays shared or leaked: the allocated count
    // is what the data needs.
    let c = json(&ok(img(&["check", "--output", "json", &f]), "check"));
    let q = json(&ok(
        qemu_img(&["check", "--output", "json", &f]),
        "qemu check",
    ));
    assert_eq!(c["image-end-offset"], q["image-end-offset"]);
    let _ = v2;

    // Not found, duplicate name.
    let r = img(&["snapshot", "-a", "nope", &f]);
    assert_eq!(r.code, Some(1));
    ok(img(&["snapshot", "-c", "x", &f]), "x");
    assert_eq!(img(&["snapshot", "-c", "x", &f]).code, Some(1));
}

/// Snapshots of images with compressed clusters and 512-byte clusters.
#[test]
fn snapshots_of_compressed_and_small_cluster_images() {
    let s = Scratch::new("snap-c");
    let raw = s.p("p.raw");
    pattern_raw(&raw, 2);
    for (opts, name) in [
        ("cluster_size=65536", "c.qcow2"),
        ("cluster_size=512", "s.qcow2"),
    ] {
        let f = s.p(name);
        ok(
            img(&["convert", "-c", "-O", "qcow2", "-o", opts, &raw, &f]),
            "convert -c",
        );
        ok(img(&["snapshot", "-c", "base", &f]), "-c");
        qemu_clean(&f);
        ok(qemu_io(&f, &["write -P 0x9 0 1M"]), "overwrite compressed");
        qemu_clean(&f);
        ok(img(&["snapshot", "-a", "base", &f]), "-a");
        qemu_clean(&f);
        qemu_same(&f, &raw);
        ok(img(&["snapshot", "-d", "base", &f]), "-d");
        qemu_clean(&f);
        qemu_same(&f, &raw);
    }
    // 1-bit refcounts cannot count a shared cluster: refused, the image untouched.
    let one = s.p("one.qcow2");
    ok(
        qemu_img(&["create", "-f", "qcow2", "-o", "refcount_bits=1", &one, "1M"]),
        "create",
    );
    ok(qemu_io(&one, &["write -P 0x1 0 64k"]), "write");
    let before = bytes(&one);
    let r = img(&["snapshot", "-c", "x", &one]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("refcount"), "{}", r.stderr);
    assert!(bytes(&one) == before, "the refused image is unchanged");
}
