//! qcow2 disks end to end, with QEMU's tools as the peer on both sides: qemu-img makes
//! every kind of image (v3 and v2 on a raw backing file holding the pattern the test
//! guest checks, on a qcow2 backing file, compressed, with internal snapshots,
//! encrypted), `cellvm run` serves it, the guest's CPL 3 blk checks run against it, and
//! afterwards `qemu-img check` must pass and `qemu-img compare` must find exactly what the
//! guest wrote. A SIGKILL of the blk backend while the guest writes leaves an image
//! `qemu-img check` accepts. The reverse too: an image cellvm wrote, served by qemu-storage-daemon
//! (QEMU's own qcow2 driver) behind cellvm, passes the same checks.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{cellvm, run, scratch_dir, wait_for, Daemon};

/// Byte `o` of the first 64 sectors of the disk the guest's `blk` check expects (the
/// same function as tests/guest/devices.rs).
fn pattern(o: usize) -> u8 {
    ((o / 512) as u8).wrapping_mul(31) ^ (o as u8)
}

const DISK: usize = 1 << 20;

fn base_bytes() -> Vec<u8> {
    let mut b = vec![0u8; DISK];
    for (o, x) in b.iter_mut().enumerate().take(64 * 512) {
        *x = pattern(o);
    }
    b
}

/// What the guest's `blk` check leaves on the disk: sectors 16..24 written with
/// 0xa5 ^ i, 32..48 discarded or zeroed, everything else as it was.
fn after_blk(mut b: Vec<u8>) -> Vec<u8> {
    for (o, x) in b.iter_mut().enumerate().take(64 * 512) {
        match o / 512 {
            16..=23 => *x = 0xa5 ^ (o - 16 * 512) as u8,
            32..=47 => *x = 0,
            _ => {}
        }
    }
    b
}

fn write_raw(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs a qemu tool, failing the test unless it exits with one of `ok`.
fn tool(name: &str, args: &[&str], ok: &[i32]) -> String {
    let out = common::qemu_tool(name, args, Path::new("."));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.code().is_some_and(|c| ok.contains(&c)),
        "{name} {args:?}: {:?}\n{text}",
        out.status
    );
    text
}

fn qemu_img(args: &[&str]) -> String {
    tool("qemu-img", args, &[0])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` finds nothing wrong (exit 0: no errors, no leaks).
fn assert_clean(img: &Path) {
    let out = qemu_img(&["check", s(img)]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// `qemu-img compare` finds the image identical to the expected raw contents.
fn assert_holds(img: &Path, fmt: &str, expected: &Path) {
    let out = qemu_img(&["compare", "-f", fmt, "-F", "raw", s(img), s(expected)]);
    assert!(out.contains("Images are identical"), "{out}");
}

fn vm(disk: &str, tests: &str) -> common::Outcome {
    let mut cmd = cellvm();
    cmd.args(["run", "--cpus", "2", "--disk", disk, "--cmdline", tests]);
    run(cmd, Duration::from_secs(60))
}

/// Serves `img` as qcow2 through `cellvm run` and checks what the guest saw.
fn serve(img: &Path, extra: &str) -> common::Outcome {
    let out = vm(
        &format!("path={},format=qcow2{extra}", img.display()),
        "tests=blk,blkbad",
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let blk = out.passed("blk");
    assert!(blk.contains("capacity=2048"), "{blk}");
    out.passed("blkbad");
    out
}

#[test]
fn qcow2_v3_and_v2_on_a_raw_backing_file_pass_the_blk_checks_and_qemu_img_agrees() {
    for compat in ["1.1", "0.10"] {
        let dir = scratch_dir(&format!("qcow2-backing-{compat}"));
        let base = write_raw(&dir, "base.raw", &base_bytes());
        let expected = write_raw(&dir, "expected.raw", &after_blk(base_bytes()));
        let top = dir.join("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&top),
        ]);
        serve(&top, ",queues=2");
        assert_clean(&top);
        assert_holds(&top, "qcow2", &expected);
        // The backing file is read-only to the disk: it still holds only the pattern.
        assert_eq!(
            std::fs::read(&base).unwrap(),
            base_bytes(),
            "compat={compat}"
        );
        let info = qemu_img(&["info", s(&top)]);
        assert!(info.contains(&format!("compat: {compat}")), "{info}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_qcow2_chain_three_deep_is_served_from_its_headers_and_stays_consistent() {
    let dir = scratch_dir("qcow2-chain");
    write_raw(&dir, "base.raw", &base_bytes());
    let expected = write_raw(&dir, "expected.raw", &after_blk(base_bytes()));
    // raw <- qcow2 (empty overlay) <- qcow2, and qcow2 holding the data <- qcow2.
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    serve(&top, "");
    assert_clean(&top);
    assert_clean(&mid);
    assert_holds(&top, "qcow2", &expected);
    // The middle layer was not written.
    assert_holds(&mid, "qcow2", &dir.join("base.raw"));

    let data = dir.join("data.qcow2");
    let over = dir.join("over.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&dir.join("base.raw")), s(&data)]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "data.qcow2",
        "-F",
        "qcow2",
        s(&over),
    ]);
    serve(&over, "");
    assert_clean(&over);
    assert_holds(&over, "qcow2", &expected);
    assert_holds(&data, "qcow2", &dir.join("base.raw"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_compressed_image_is_read_and_a_guest_write_reallocates_its_cluster() {
    let dir = scratch_dir("qcow2-compressed");
    let base = write_raw(&dir, "base.raw", &base_bytes());
    let expected = write_raw(&dir, "expected.raw", &after_blk(base_bytes()));
    let img = dir.join("c.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&base), s(&img)]);
    // qemu-img map gives a compressed cluster no host offset.
    let first = |img: &Path| {
        let out = qemu_img(&["map", "--output=json", s(img)]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("map JSON");
        v[0].clone()
    };
    let before = first(&img);
    assert!(
        before["data"] == true && before.get("offset").is_none(),
        "{before}"
    );
    serve(&img, "");
    assert_clean(&img);
    assert_holds(&img, "qcow2", &expected);
    // The cluster the guest wrote is an ordinary one now.
    let after = first(&img);
    assert!(after["data"] == true && after["offset"].is_u64(), "{after}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writes_to_an_image_with_internal_snapshots_leave_the_snapshots_intact() {
    let dir = scratch_dir("qcow2-snapshots");
    let base = write_raw(&dir, "base.raw", &base_bytes());
    let expected = write_raw(&dir, "expected.raw", &after_blk(base_bytes()));
    let img = dir.join("snap.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&base), s(&img)]);
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    serve(&img, "");
    assert_clean(&img);
    assert_holds(&img, "qcow2", &expected);
    let list = qemu_img(&["snapshot", "-l", s(&img)]);
    assert!(list.contains("s1"), "{list}");
    // Back to the snapshot: the disk as it was before the guest ran.
    let copy = dir.join("applied.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", "s1", s(&copy)]);
    assert_clean(&copy);
    assert_holds(&copy, "qcow2", &base);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--object` and `--image-opts` for QEMU's tools on the LUKS image `img` (key "hunter2").
const SECRET: &str = "secret,id=s0,data=hunter2";

fn luks_opts(img: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        img.display()
    )
}

#[test]
fn an_encrypted_image_is_served_with_its_key_and_refused_without_it() {
    let dir = scratch_dir("qcow2-luks");
    let base = write_raw(&dir, "base.raw", &base_bytes());
    let expected = write_raw(&dir, "expected.raw", &after_blk(base_bytes()));
    let img = dir.join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&img),
    ]);
    let before = std::fs::read(&img).unwrap();
    // Without its key the image is refused, by the VMM and by the backend's own guard
    // (for a launcher that passed the image regardless): never served as ciphertext.
    let out = vm(&format!("path={},format=qcow2", img.display()), "tests=blk");
    assert_eq!(out.code, Some(2), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("crypt_method = 2 (LUKS)") && out.stderr.contains("no key was given"),
        "{}",
        out.stderr
    );
    assert!(out.test_lines().is_empty(), "the guest never ran");
    let mut cmd = common::cellvm_device();
    cmd.args(["blk", "--socket"])
        .arg(dir.join("never.sock"))
        .arg("--image")
        .arg(&img)
        .args(["--format", "qcow2", "--readonly"]);
    let out = run(cmd, Duration::from_secs(10));
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "qcow2 image: crypt_method = 2 (LUKS): the image is encrypted and no key was given"
        ),
        "{}",
        out.stderr
    );
    assert!(!dir.join("never.sock").exists(), "refused before listening");
    // A wrong key (the right one with a newline, as `echo` writes it) opens nothing.
    let wrong = write_raw(&dir, "wrong.key", b"hunter2\n");
    let out = vm(
        &format!(
            "path={},format=qcow2,key={}",
            img.display(),
            wrong.display()
        ),
        "tests=blk",
    );
    assert_ne!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("does not open any active LUKS key slot"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "the image is untouched"
    );
    // With its key: the guest's blk checks pass on the encrypted overlay of the pattern.
    let key = write_raw(&dir, "luks.key", b"hunter2");
    serve(&img, &format!(",key={},queues=2", key.display()));
    // QEMU, decrypting with the same key, finds exactly what the guest wrote, and a
    // consistent image; the file itself holds no plaintext of the guest's writes.
    let opts = luks_opts(&img);
    let raw = format!("driver=raw,file.filename={}", expected.display());
    let out = qemu_img(&["compare", "--object", SECRET, "--image-opts", &opts, &raw]);
    assert!(out.contains("Images are identical"), "{out}");
    let out = qemu_img(&["check", "--object", SECRET, "--image-opts", &opts]);
    assert!(out.contains("No errors were found"), "{out}");
    let written: Vec<u8> = (0..512).map(|o| 0xa5 ^ o as u8).collect();
    let file = std::fs::read(&img).unwrap();
    assert!(!file.windows(512).any(|w| w == written.as_slice()));
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_bytes(),
        "the backing file is read-only"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_raw_image_is_never_read_as_qcow2_nor_a_qcow2_image_as_raw_unless_said() {
    let dir = scratch_dir("qcow2-formats");
    let raw = write_raw(&dir, "disk.raw", &base_bytes());
    let q = dir.join("disk.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&q)]);
    for (disk, expect) in [
        (
            format!("path={},format=qcow2", raw.display()),
            "format = qcow2 but the image is raw",
        ),
        (
            format!("path={}", q.display()),
            "format = raw but the image is qcow2 (say format=qcow2)",
        ),
    ] {
        let out = vm(&disk, "tests=blk");
        assert_eq!(out.code, Some(2), "{disk}: {}", out.stderr);
        assert!(out.stderr.contains(expect), "{disk}: {}", out.stderr);
    }
    // The backend told raw serves a file's bytes as they are, whatever they look like:
    // the guest sees the qcow2 file itself (its length, not the virtual size).
    let sock = dir.join("raw.sock");
    let backend = common::cellvm_device()
        .args(["blk", "--format", "raw", "--readonly", "--socket"])
        .arg(&sock)
        .arg("--image")
        .arg(&q)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _backend = Daemon(backend);
    wait_for(&sock);
    let out = vm(&format!("socket={}", sock.display()), "tests=blk");
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let line = out
        .test_lines()
        .into_iter()
        .find(|l| l.starts_with("TEST blk "))
        .expect("a blk line")
        .to_string();
    let sectors = std::fs::metadata(&q).unwrap().len() / 512;
    assert!(
        line.contains(&format!("capacity={sectors} ")) && line.contains("read=false"),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `qemu-img map --output=json`: (start, length, data, zero) of each entry.
fn map_entries(img: &Path) -> Vec<(u64, u64, bool, bool)> {
    let out = qemu_img(&["map", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("map JSON");
    v.as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn discard_gives_the_space_back_and_qemu_img_map_shows_it() {
    let dir = scratch_dir("qcow2-discard");
    // 4 KiB clusters, so the guest's discard of sectors 32..40 and its write-zeroes of
    // 40..48 (with UNMAP allowed) are whole clusters; all of the pattern allocated.
    let base = write_raw(&dir, "base.raw", &base_bytes());
    let expected = write_raw(&dir, "expected.raw", &after_blk(base_bytes()));
    let img = dir.join("thin.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&base),
        s(&img),
    ]);
    let data_at = |entries: &[(u64, u64, bool, bool)], at: u64| {
        entries
            .iter()
            .find(|e| e.0 <= at && at < e.0 + e.1)
            .map(|e| (e.2, e.3))
    };
    let before = map_entries(&img);
    assert_eq!(
        data_at(&before, 16 << 10),
        Some((true, false)),
        "{before:?}"
    );
    let blocks_before = std::fs::metadata(&img).unwrap().blocks();
    serve(&img, "");
    assert_clean(&img);
    assert_holds(&img, "qcow2", &expected);
    let after = map_entries(&img);
    // The discarded cluster holds no data any more and reads as zeroes.
    assert_eq!(data_at(&after, 16 << 10), Some((false, true)), "{after:?}");
    // The rest of the pattern is still allocated.
    assert_eq!(data_at(&after, 0), Some((true, false)), "{after:?}");
    let blocks_after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        blocks_after < blocks_before,
        "allocated 512-byte blocks: {blocks_before} before, {blocks_after} after"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_image_cellvm_wrote_passes_the_checks_behind_qemu_storage_daemon() {
    let dir = scratch_dir("qcow2-qsd");
    write_raw(&dir, "base.raw", &base_bytes());
    let expected = write_raw(&dir, "expected.raw", &after_blk(base_bytes()));
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    serve(&top, "");
    // Now QEMU's own qcow2 driver serves what cellvm wrote, behind cellvm.
    let sock = dir.join("qsd.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},discard=unmap",
            top.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q0,file=f0,discard=unmap")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-storage-daemon (tests/setup.sh installs it)");
    let qsd = Daemon(child);
    wait_for(&sock);
    let out = vm(&format!("socket={}", sock.display()), "tests=blk,blkbad");
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let blk = out.passed("blk");
    assert!(
        blk.contains("id=\"vhost_user_blk\""),
        "the peer's own id: {blk}"
    );
    drop(qsd);
    assert_clean(&top);
    assert_holds(&top, "qcow2", &expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pids of `parent`'s children named `comm`.
fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 2..].split_whitespace().nth(1);
        if &stat[open + 1..close] == comm && ppid == Some(&parent.to_string()) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_sigkill_of_the_blk_backend_under_the_guests_writes_leaves_an_image_qemu_img_check_accepts() {
    let dir = scratch_dir("qcow2-kill");
    for (round, after_ms) in [0u64, 150, 400].into_iter().enumerate() {
        let img = dir.join(format!("kill{round}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "256M"]);
        let empty = std::fs::metadata(&img).unwrap().len();
        // The guest's blkbench: random 4 KiB reads, then random 4 KiB writes with 32 in
        // flight, each allocating a cluster of the empty image (L2 and refcount updates).
        let mut vm = cellvm()
            .args(["run", "--memory", "128", "--disk"])
            .arg(format!("path={},format=qcow2", img.display()))
            .args(["--cmdline", "tests=blkbench bench_ms=2000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let vm_pid = vm.id();
        let _leftovers = KillBackends(vm_pid);
        let start = std::time::Instant::now();
        while std::fs::metadata(&img).unwrap().len() < empty + (1 << 20) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "round {round}: the guest never wrote"
            );
            assert!(
                vm.try_wait().unwrap().is_none(),
                "round {round}: the VM ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(after_ms));
        let backends = children_named(vm_pid, "cellvm-device");
        assert_eq!(backends.len(), 1, "round {round}: {backends:?}");
        // SAFETY: kill(2) of the backend this test's VM started.
        assert_eq!(unsafe { libc::kill(backends[0] as i32, libc::SIGKILL) }, 0);
        let _ = vm.kill();
        let _ = vm.wait();
        // Leaked clusters are allowed (exit 3), corruption never (exit 2).
        let out = tool("qemu-img", &["check", s(&img)], &[0, 3]);
        assert!(!out.contains("ERROR"), "round {round}:\n{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills the backends the VM of this pid left, if an assertion fails midway.
struct KillBackends(u32);

impl Drop for KillBackends {
    fn drop(&mut self) {
        for c in children_named(self.0, "cellvm-device") {
            // SAFETY: kill(2) of a leftover backend of this test's VM.
            unsafe { libc::kill(c as i32, libc::SIGKILL) };
        }
    }
}
