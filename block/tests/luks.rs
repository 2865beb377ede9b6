//! LUKS-encrypted qcow2 (`encrypt.format=luks`), checked against QEMU's own driver both
//! ways: what qemu-io wrote, the engine reads with the key; what the engine wrote,
//! `qemu-img compare` (decrypting with the same key) finds identical to the plaintext
//! expected, and `qemu-img check` accepts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use block::{DiskImage, Layer, OpenError, Qcow2, Slice};

const KEY: &str = "correct horse battery staple";

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("cellvm-luks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A QEMU tool; qemu 7.2 times PBKDF2 from thread CPU time and fails a LUKS creation
/// now and then on a loaded host ("Unable to get accurate CPU usage"): that one error
/// is retried.
fn qemu(tool: &str, args: &[&str]) -> Output {
    for _ in 0..10 {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} (tests/setup.sh installs it): {e}"));
        if !String::from_utf8_lossy(&out.stderr).contains("Unable to get accurate CPU usage") {
            return out;
        }
    }
    panic!("{tool} kept failing to time PBKDF2");
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const SECRET: &str = "secret,id=s0,data=correct horse battery staple";

/// An encrypted qcow2 of `size`, optionally over a raw backing file.
fn create_luks(path: &Path, size: &str, backing: Option<&Path>) {
    create_luks_with(path, size, backing, "");
}

/// The same with more `-o` options (",cipher-alg=..." and the like).
fn create_luks_with(path: &Path, size: &str, backing: Option<&Path>, extra: &str) {
    let p = path.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2", "--object", SECRET];
    let opts = format!("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10{extra}");
    args.extend(["-o", &opts]);
    let b;
    if let Some(backing) = backing {
        b = backing.to_str().unwrap().to_owned();
        args.extend(["-b", &b, "-F", "raw"]);
    }
    args.extend([p, size]);
    ok(qemu("qemu-img", &args));
}

fn image_opts(path: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        path.display()
    )
}

/// qemu-io commands on the encrypted image, through QEMU's qcow2 driver.
fn qemu_io(path: &Path, cmds: &[&str]) {
    let opts = image_opts(path);
    let mut args = vec!["--object", SECRET, "--image-opts", &opts];
    for c in cmds {
        args.extend(["-c", c]);
    }
    ok(qemu("qemu-io", &args));
}

fn open(path: &Path, key: Option<&str>, backing: Vec<Layer>) -> Result<Qcow2, OpenError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Qcow2::open(f, false, false, backing, key.map(str::as_bytes))
}

fn read(img: &Qcow2, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read(at, &[Slice::from(b.as_mut_slice())]).unwrap();
    b
}

fn write(img: &Qcow2, at: u64, data: &[u8]) {
    let mut b = data.to_vec();
    img.write(at, &[Slice::from(b.as_mut_slice())]).unwrap();
}

fn compare(img: &Path, expected: &Path) {
    let a = image_opts(img);
    let b = format!("driver=raw,file.filename={}", expected.display());
    let out = qemu(
        "qemu-img",
        &["compare", "--object", SECRET, "--image-opts", &a, &b],
    );
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check(img: &Path) {
    let a = image_opts(img);
    let out = qemu(
        "qemu-img",
        &["check", "--object", SECRET, "--image-opts", &a],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn what_qemu_wrote_reads_back_with_the_key_and_what_cellvm_wrote_qemu_reads() {
    let d = Scratch::new("both-ways");
    let img = d.path("e.qcow2");
    create_luks(&img, "16M", None);
    qemu_io(&img, &["write -P 0xab 0 64k", "write -P 0x5c 1M 4k"]);

    // The key is the secret's bytes exactly; a near miss opens nothing.
    let wrong = open(&img, Some("correct horse battery staple\n"), Vec::new())
        .err()
        .unwrap();
    assert!(
        wrong
            .to_string()
            .contains("does not open any active LUKS key slot"),
        "{wrong}"
    );
    let none = open(&img, None, Vec::new()).err().unwrap();
    assert!(none.to_string().contains("no key was given"), "{none}");

    let e = open(&img, Some(KEY), Vec::new()).unwrap();
    assert!(read(&e, 0, 65536).iter().all(|&b| b == 0xab));
    assert!(read(&e, 1 << 20, 4096).iter().all(|&b| b == 0x5c));
    assert!(read(&e, 2 << 20, 4096).iter().all(|&b| b == 0));
    // The file holds no plaintext: QEMU and cellvm both encrypt.
    let raw = std::fs::read(&img).unwrap();
    assert!(!raw.windows(64).any(|w| w.iter().all(|&b| b == 0xab)));

    // Writes: in place (an allocated cluster), allocating (part of a new cluster), over
    // a cluster boundary, then zeroes (a whole cluster and a part) and a discard.
    let mut expected = vec![0u8; 16 << 20];
    expected[..65536].fill(0xab);
    expected[1 << 20..(1 << 20) + 4096].fill(0x5c);
    let put = |expected: &mut Vec<u8>, img: &Qcow2, at: usize, data: Vec<u8>| {
        write(img, at as u64, &data);
        expected[at..at + data.len()].copy_from_slice(&data);
    };
    put(&mut expected, &e, 512, vec![0x11; 1024]);
    put(
        &mut expected,
        &e,
        (8 << 20) + 4096,
        (0..4096).map(|i| (i * 7) as u8).collect(),
    );
    put(&mut expected, &e, (3 << 20) - 2048, vec![0x22; 8192]);
    e.write_zeroes(1 << 20, 4096, false).unwrap();
    expected[1 << 20..(1 << 20) + 4096].fill(0);
    e.write_zeroes(0, 65536 + 4096, true).unwrap();
    expected[..65536].fill(0);
    e.discard(8 << 20, 65536).unwrap();
    expected[8 << 20..(8 << 20) + 65536].fill(0);
    put(&mut expected, &e, 12 << 20, vec![0x33; 65536]);
    e.flush().unwrap();
    for (at, len) in [
        (0usize, 70_000usize),
        (3 << 20, 4096),
        (8 << 20, 80_000),
        (12 << 20, 65536),
    ] {
        let len = len / 512 * 512;
        assert_eq!(read(&e, at as u64, len), expected[at..at + len], "at {at}");
    }
    drop(e);
    let exp = d.path("expected.raw");
    std::fs::write(&exp, &expected).unwrap();
    compare(&img, &exp);
    check(&img);
    assert!(!std::fs::read(&img)
        .unwrap()
        .windows(64)
        .any(|w| w.iter().all(|&b| b == 0x33)));
}

#[test]
fn an_encrypted_overlay_on_a_plaintext_backing_file_copies_on_write_encrypted() {
    let d = Scratch::new("backing");
    let base = d.path("base.raw");
    let pattern: Vec<u8> = (0..(4usize << 20))
        .map(|i| (i / 512) as u8 ^ 0x5a)
        .collect();
    std::fs::write(&base, &pattern).unwrap();
    let img = d.path("top.qcow2");
    create_luks(&img, "4M", Some(&base));
    let layer = || Layer {
        file: std::fs::File::open(&base).unwrap(),
        format: block::header::Format::Raw,
    };
    let e = open(&img, Some(KEY), vec![layer()]).unwrap();
    assert_eq!(read(&e, 4096, 8192), pattern[4096..12288]);
    // Half a sector's worth of clusters: the rest of the cluster comes from the backing
    // file, encrypted with the new data.
    let mut expected = pattern.clone();
    write(&e, 70_144, &[0xee; 1024]);
    expected[70_144..71_168].fill(0xee);
    assert_eq!(read(&e, 65536, 65536), expected[65536..131_072]);
    drop(e);
    let exp = d.path("expected.raw");
    std::fs::write(&exp, &expected).unwrap();
    compare(&img, &exp);
    check(&img);
    // QEMU reads the same through its driver.
    qemu_io(&img, &["read -P 0xee 70144 1024"]);
    // The backing file is untouched.
    assert_eq!(std::fs::read(&base).unwrap(), pattern);
}

#[test]
fn an_encrypted_layer_below_the_top_is_refused() {
    let d = Scratch::new("lower");
    let lower = d.path("lower.qcow2");
    create_luks(&lower, "4M", None);
    let top = d.path("top.qcow2");
    ok(qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            lower.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
            "4M",
        ],
    ));
    let layer = Layer {
        file: std::fs::File::open(&lower).unwrap(),
        format: block::header::Format::Qcow2,
    };
    let err = open(&top, None, vec![layer]).err().unwrap().to_string();
    assert!(
        err.contains("backing layer 1") && err.contains("LUKS"),
        "{err}"
    );
}

#[test]
fn other_key_sizes_and_hashes_unlock_and_unsupported_ciphers_are_refused_by_name() {
    let d = Scratch::new("variants");
    for (i, extra) in [
        ",encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1",
        ",encrypt.cipher-alg=aes-256,encrypt.hash-alg=sha512",
    ]
    .iter()
    .enumerate()
    {
        let img = d.path(&format!("v{i}.qcow2"));
        create_luks_with(&img, "1M", None, extra);
        qemu_io(&img, &["write -P 0x77 4096 4096"]);
        let e = open(&img, Some(KEY), Vec::new()).unwrap_or_else(|e| panic!("{extra}: {e}"));
        assert!(read(&e, 4096, 4096).iter().all(|&b| b == 0x77), "{extra}");
    }
    let img = d.path("cbc.qcow2");
    create_luks_with(
        &img,
        "1M",
        None,
        ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
    );
    let err = open(&img, Some(KEY), Vec::new()).err().unwrap().to_string();
    assert!(
        err.contains("cipher mode \"cbc-essiv:sha256\" is not supported"),
        "{err}"
    );
}
