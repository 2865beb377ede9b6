//! `cellvm-img commit`: an overlay's clusters written down into its backing file, offline,
//! checked with qemu-img: the backing file then holds exactly what the overlay read as
//! (`qemu-img compare`), `qemu-img check` finds both clean, and the emptied overlay
//! holds no data of its own (`qemu-img map`) yet reads the same.

mod common;
use common::{img, qemu_img, qemu_io, Scratch};

/// A 4 MiB pattern: every 512-byte sector its own bytes.
fn pattern() -> Vec<u8> {
    (0..4usize << 20)
        .map(|o| ((o / 512) as u8).wrapping_mul(31) ^ (o as u8))
        .collect()
}

fn ok(r: common::Run, what: &str) -> String {
    assert_eq!(r.code, Some(0), "{what}: {}{}", r.stdout, r.stderr);
    r.stdout
}

/// Writes to the overlay through QEMU's own driver and to `expected` alike: a whole
/// cluster, part of one, a run over a cluster boundary, and zeroes.
fn write_both(overlay: &str, expected: &mut [u8]) {
    ok(
        qemu_io(
            overlay,
            &[
                "write -P 0x11 0 64k",
                "write -P 0x22 200k 4k",
                "write -P 0x33 1020k 8k",
                "write -z 2M 64k",
            ],
        ),
        "qemu-io",
    );
    expected[..65536].fill(0x11);
    expected[200 << 10..204 << 10].fill(0x22);
    expected[1020 << 10..1028 << 10].fill(0x33);
    expected[2 << 20..(2 << 20) + 65536].fill(0);
}

/// `qemu-img create` of a qcow2 overlay at `top` over `backing` (named as written,
/// relative to the overlay) of format `fmt`.
fn overlay(top: &str, backing: &str, fmt: &str) {
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, top]),
        "create",
    );
}

/// True when `qemu-img map` finds no range the overlay itself holds (depth 0).
fn holds_nothing(overlay: &str) -> bool {
    let out = ok(qemu_img(&["map", "--output=json", overlay]), "qemu-img map");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    !v.as_array()
        .unwrap()
        .iter()
        .any(|e| e["depth"].as_u64() == Some(0) && e["present"] == true)
}

#[test]
fn commit_into_a_raw_backing_file_then_empty_the_overlay() {
    let d = Scratch::new("commit-raw");
    let (base, top, exp) = (d.p("base.raw"), d.p("top.qcow2"), d.p("expected.raw"));
    std::fs::write(&base, pattern()).unwrap();
    overlay(&top, "base.raw", "raw");
    let mut expected = pattern();
    write_both(&top, &mut expected);
    std::fs::write(&exp, &expected).unwrap();
    assert!(
        !holds_nothing(&top),
        "the overlay holds the writes before the commit"
    );

    let out = ok(img(&["commit", &top]), "cellvm-img commit");
    assert!(out.contains("Image committed."), "{out}");
    // The backing file is exactly what the overlay read as; the overlay is empty, clean,
    // and still reads the same (through the backing file).
    assert_eq!(std::fs::read(&base).unwrap(), expected);
    assert!(holds_nothing(&top), "the overlay was emptied");
    ok(qemu_img(&["check", &top]), "qemu-img check");
    let out = ok(qemu_img(&["compare", &top, &exp]), "qemu-img compare");
    assert!(out.contains("Images are identical"), "{out}");
    let info = ok(qemu_img(&["info", &top]), "qemu-img info");
    assert!(info.contains("backing file: base.raw"), "{info}");
}

#[test]
fn commit_into_a_compressed_qcow2_backing_file_keeps_it_consistent() {
    let d = Scratch::new("commit-qcow2");
    let (src, base, top, exp) = (
        d.p("src.raw"),
        d.p("base.qcow2"),
        d.p("top.qcow2"),
        d.p("expected.raw"),
    );
    std::fs::write(&src, pattern()).unwrap();
    // Compressed clusters below, and the overlay's writes land on some of them (a
    // whole one, part of one) and on clusters the base does not hold.
    ok(
        qemu_img(&["convert", "-q", "-c", "-O", "qcow2", &src, &base]),
        "convert -c",
    );
    ok(qemu_io(&base, &["discard 3M 64k"]), "qemu-io discard");
    overlay(&top, "base.qcow2", "qcow2");
    let mut expected = pattern();
    expected[3 << 20..(3 << 20) + 65536].fill(0);
    write_both(&top, &mut expected);
    ok(qemu_io(&top, &["write -P 0x44 3M 4k"]), "qemu-io");
    expected[3 << 20..(3 << 20) + 4096].fill(0x44);
    std::fs::write(&exp, &expected).unwrap();

    // -d: the overlay keeps its clusters.
    ok(img(&["commit", "-d", &top]), "cellvm-img commit -d");
    assert!(!holds_nothing(&top), "-d keeps the overlay as it was");
    // Clean: no leaked compressed clusters, no corruption.
    let check = qemu_img(&["check", &base]);
    assert_eq!(check.code, Some(0), "{}{}", check.stdout, check.stderr);
    let out = ok(
        qemu_img(&["compare", "-f", "qcow2", &base, &exp]),
        "compare",
    );
    assert!(out.contains("Images are identical"), "{out}");
    let out = ok(qemu_img(&["compare", &top, &exp]), "compare");
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn commit_refuses_what_it_cannot_do_and_changes_nothing() {
    let d = Scratch::new("commit-refused");
    let (lone, base, top) = (d.p("lone.qcow2"), d.p("base.qcow2"), d.p("top.qcow2"));
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", &lone, "1M"]),
        "create",
    );
    let r = img(&["commit", &lone]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("has no backing file"), "{}", r.stderr);
    // A backing file with internal snapshots: its clusters may be shared.
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", &base, "1M"]),
        "create",
    );
    ok(qemu_img(&["snapshot", "-c", "s1", &base]), "snapshot");
    overlay(&top, "base.qcow2", "qcow2");
    ok(qemu_io(&top, &["write -P 0x55 0 4k"]), "qemu-io");
    let (b0, t0) = (std::fs::read(&base).unwrap(), std::fs::read(&top).unwrap());
    let r = img(&["commit", &top]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("internal snapshots"), "{}", r.stderr);
    assert_eq!(std::fs::read(&top).unwrap(), t0, "the overlay is untouched");
    ok(qemu_img(&["check", &base]), "qemu-img check");
    assert_eq!(std::fs::read(&base).unwrap().len(), b0.len());
}
