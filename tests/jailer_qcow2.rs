//! qcow2 disks through `cellvm-jailer`: the header is read from the opened image and
//! checked against the format the spec claims, the backing chain is resolved beneath the
//! tenant's image directories and every layer opened read-only; a hostile image or chain
//! is refused at launch (exit 2) with a message naming the file and the reason, and
//! nothing is left behind. Images are made by qemu-img; hostile ones by editing a
//! qemu-img header in place.

mod common;
use common::{bin, repo, HeldVm};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
/// The example tenant's image directory (tests/setup.sh makes it).
const IMAGES: &str = "/var/lib/cellvm/images/example";

fn unique(name: &str) -> String {
    format!("t-q2-{name}-{}", std::process::id())
}

/// A directory of this test's own beneath the example tenant's image directory, with a
/// sibling outside every image directory; both removed when dropped.
struct Dir {
    path: PathBuf,
    outside: PathBuf,
}

impl Dir {
    fn new(name: &str) -> Dir {
        let path = Path::new(IMAGES).join(unique(name));
        let outside = std::env::temp_dir().join(format!("cellvm-q2-out-{}", unique(name)));
        for d in [&path, &outside] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d)
                .unwrap_or_else(|e| panic!("{}: {e} (tests/setup.sh makes {IMAGES})", d.display()));
        }
        Dir { path, outside }
    }

    fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `qemu-img create -f FMT [opts] NAME SIZE` in this directory.
    fn create(&self, fmt: &str, name: &str, opts: &[&str], size: &str) -> PathBuf {
        let p = self.join(name);
        qemu_img(
            &[
                &["create", "-q", "-f", fmt][..],
                opts,
                &[p.to_str().unwrap(), size],
            ]
            .concat(),
            &self.path,
        );
        p
    }

    /// A qcow2 overlay naming `backing` (as written) of format `fmt`, not opened by
    /// qemu-img (`-u`): hostile names need not exist.
    fn overlay(&self, name: &str, backing: &str, fmt: &str) -> PathBuf {
        self.create("qcow2", name, &["-u", "-b", backing, "-F", fmt], "16M")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        let _ = std::fs::remove_dir_all(&self.outside);
    }
}

fn qemu_img(args: &[&str], cwd: &Path) {
    let out = common::qemu_tool("qemu-img", args, cwd);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Overwrites bytes of a file at `at`.
fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// One extended attribute through getfattr (None: the file has none).
fn xattr(path: &Path, name: &str) -> Option<String> {
    let out = Command::new("getfattr")
        .args(["--absolute-names", "--only-values", "-n", name])
        .arg(path)
        .output()
        .expect("getfattr (package attr; tests/setup.sh installs it)");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No such attribute"), "getfattr: {err}");
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\0')
            .to_string(),
    )
}

/// The example tenant policy with `from` replaced by `to` (a scratch copy).
fn policy_with(dir: &Dir, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo("policy/tenants/example.toml")).unwrap();
    assert!(text.contains(from), "the example policy has no {from:?}");
    let p = dir.outside.join("tenant.toml");
    std::fs::write(&p, text.replace(from, to)).unwrap();
    p
}

/// A VM spec of one disk, the built-in guest holding.
fn spec(dir: &Dir, disk: &Path, format: &str, readonly: bool) -> PathBuf {
    let p = dir.outside.join("vm.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"q2\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=serial\"\n\
             disks = [{{ path = \"{}\", format = \"{format}\", readonly = {readonly} }}]\n",
            disk.display()
        ),
    )
    .unwrap();
    p
}

fn launch(policy: &Path, id: &str, vm: &Path) -> common::Outcome {
    common::run(common::jailer_command(id, policy, vm), LIMIT)
}

/// Launches a spec that must be refused: exit 2, `expect` in the one-line message, the
/// cell never built, and no file of `files` labelled or counted.
fn assert_refused(policy: &Path, vm: &Path, expect: &str, files: &[&Path]) {
    let id = unique("refused");
    let out = launch(policy, &id, vm);
    assert_eq!(out.code, Some(2), "{expect}: {}", out.stderr);
    assert!(
        out.stderr.contains(expect),
        "expected {expect:?} in:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("tenant example: vm q2: disks["),
        "{}",
        out.stderr
    );
    common::assert_cell_gone(&id);
    for f in files {
        assert_eq!(xattr(f, "trusted.cellvm.ref"), None, "{}", f.display());
        assert_eq!(xattr(f, "trusted.cellvm.selinux"), None, "{}", f.display());
    }
}

fn example() -> PathBuf {
    repo("policy/tenants/example.toml")
}

#[test]
fn a_format_that_disagrees_with_the_header_is_refused_both_ways() {
    let _turn = common::launch_turn();
    let d = Dir::new("mismatch");
    let q = d.create("qcow2", "disk.qcow2", &[], "16M");
    let r = d.create("raw", "disk.img", &[], "16M");
    assert_refused(
        &example(),
        &spec(&d, &q, "raw", false),
        "format = raw but the image is qcow2 (it starts with the qcow2 magic)",
        &[&q],
    );
    assert_refused(
        &example(),
        &spec(&d, &r, "qcow2", false),
        "format = qcow2 but the image is raw (no qcow2 magic)",
        &[&r],
    );
    // A raw image whose bytes begin with the magic (a guest can write them) is qcow2 to
    // the header check: never served as raw, so never probed either way.
    let fake = d.create("raw", "fake.img", &[], "1M");
    patch(&fake, 0, b"QFI\xfb");
    assert_refused(
        &example(),
        &spec(&d, &fake, "raw", false),
        "format = raw but the image is qcow2",
        &[&fake],
    );
}

#[test]
fn backing_names_that_leave_the_image_directories_are_refused() {
    let _turn = common::launch_turn();
    let d = Dir::new("escape");
    std::fs::write(d.outside.join("secret.img"), vec![0u8; 4096]).unwrap();
    let outside = d.outside.join("secret.img");
    // `..` out of the image directory, relative to the overlay's directory.
    let rel = format!("../../../../..{}", outside.display());
    let dots = d.overlay("dots.qcow2", &rel, "raw");
    assert_refused(
        &example(),
        &spec(&d, &dots, "qcow2", false),
        "escapes /var/lib/cellvm/images/example (through a symlink or `..`)",
        &[&dots, &outside],
    );
    // An absolute name outside.
    let abs = d.overlay("abs.qcow2", outside.to_str().unwrap(), "raw");
    assert_refused(
        &example(),
        &spec(&d, &abs, "qcow2", false),
        "not inside any of the allowed directories",
        &[&abs, &outside],
    );
    // An absolute name that is inside lexically only through `..`.
    let absdots = d.overlay(
        "absdots.qcow2",
        &format!("{IMAGES}/../../../..{}", outside.display()),
        "raw",
    );
    assert_refused(
        &example(),
        &spec(&d, &absdots, "qcow2", false),
        "not inside any of the allowed directories",
        &[&absdots, &outside],
    );
    // A symlink inside that points out.
    std::os::unix::fs::symlink(&outside, d.join("link.img")).unwrap();
    let link = d.overlay("link.qcow2", "link.img", "raw");
    assert_refused(
        &example(),
        &spec(&d, &link, "qcow2", false),
        "escapes /var/lib/cellvm/images/example",
        &[&link, &outside],
    );
}

#[test]
fn a_chain_that_loops_is_refused_naming_the_layer_seen_twice() {
    let _turn = common::launch_turn();
    let d = Dir::new("loop");
    let a = d.overlay("a.qcow2", "b.qcow2", "qcow2");
    let b = d.overlay("b.qcow2", "a.qcow2", "qcow2");
    assert_refused(
        &example(),
        &spec(&d, &a, "qcow2", false),
        &format!(
            "{}: backing file \"a.qcow2\" is {}, already in the chain: the chain loops",
            b.display(),
            a.display()
        ),
        &[&a, &b],
    );
    // A layer naming itself.
    let s = d.overlay("self.qcow2", "self.qcow2", "qcow2");
    assert_refused(
        &example(),
        &spec(&d, &s, "qcow2", true),
        "the chain loops",
        &[&s],
    );
}

#[test]
fn a_chain_deeper_than_the_policy_allows_is_refused() {
    let _turn = common::launch_turn();
    let d = Dir::new("depth");
    d.create("raw", "base.img", &[], "16M");
    d.overlay("l1.qcow2", "base.img", "raw");
    d.overlay("l2.qcow2", "l1.qcow2", "qcow2");
    let top = d.overlay("top.qcow2", "l2.qcow2", "qcow2");
    let policy = policy_with(&d, "max_chain_depth = 8", "max_chain_depth = 2");
    assert_refused(
        &policy,
        &spec(&d, &top, "qcow2", false),
        "backing file \"base.img\" would be layer 3, deeper than the tenant limit max_chain_depth = 2",
        &[&top, &d.join("l2.qcow2"), &d.join("l1.qcow2"), &d.join("base.img")],
    );
}

#[test]
fn a_backing_file_without_a_recorded_format_is_refused_never_probed() {
    let _turn = common::launch_turn();
    let d = Dir::new("nofmt");
    d.create("raw", "base.img", &[], "16M");
    let top = d.overlay("top.qcow2", "base.img", "raw");
    // The backing format extension follows the 112-byte header of a qemu-img v3 image:
    // make it an unknown one, as an image made with an old qemu-img has none.
    let head = std::fs::read(&top).unwrap();
    assert_eq!(&head[112..116], &0xe279_2acau32.to_be_bytes());
    patch(&top, 112, &0x1234_5678u32.to_be_bytes());
    assert_refused(
        &example(),
        &spec(&d, &top, "qcow2", false),
        "names its backing file \"base.img\" without a backing format; cellvm never probes a format",
        &[&top],
    );
}

#[test]
fn a_backing_layer_whose_magic_disagrees_with_its_recorded_format_is_refused() {
    let _turn = common::launch_turn();
    let d = Dir::new("layerfmt");
    d.create("qcow2", "base.qcow2", &[], "16M");
    d.create("raw", "base.img", &[], "16M");
    let as_raw = d.overlay("as-raw.qcow2", "base.qcow2", "raw");
    assert_refused(
        &example(),
        &spec(&d, &as_raw, "qcow2", false),
        "backing file \"base.qcow2\" is named as raw but is qcow2",
        &[&as_raw, &d.join("base.qcow2")],
    );
    let as_qcow2 = d.overlay("as-qcow2.qcow2", "base.img", "qcow2");
    assert_refused(
        &example(),
        &spec(&d, &as_qcow2, "qcow2", false),
        "backing file \"base.img\" is named as qcow2 but is raw",
        &[&as_qcow2, &d.join("base.img")],
    );
}

#[test]
fn an_encrypted_image_is_refused_never_served_as_ciphertext() {
    let _turn = common::launch_turn();
    let d = Dir::new("luks");
    let luks = d.create(
        "qcow2",
        "luks.qcow2",
        &[
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ],
        "16M",
    );
    for readonly in [false, true] {
        assert_refused(
            &example(),
            &spec(&d, &luks, "qcow2", readonly),
            "crypt_method = 2 (LUKS): the image is encrypted and no key was given (key_secret in the VM spec); refused",
            &[&luks],
        );
    }
    // An encrypted backing layer under a plain top, too.
    let top = d.overlay("top.qcow2", "luks.qcow2", "qcow2");
    assert_refused(
        &example(),
        &spec(&d, &top, "qcow2", false),
        &format!("{}: crypt_method = 2 (LUKS)", luks.display()),
        &[&top, &luks],
    );
}

#[test]
fn a_writable_image_with_persistent_bitmaps_is_refused() {
    let _turn = common::launch_turn();
    let d = Dir::new("bitmaps");
    let bm = d.create("qcow2", "bm.qcow2", &[], "16M");
    qemu_img(&["bitmap", "--add", bm.to_str().unwrap(), "b0"], &d.path);
    assert_refused(
        &example(),
        &spec(&d, &bm, "qcow2", false),
        "autoclear bit 0 (persistent bitmaps)",
        &[&bm],
    );
}

#[test]
fn qcow2_disks_are_refused_where_the_policy_grants_only_raw() {
    let _turn = common::launch_turn();
    let d = Dir::new("formats");
    let q = d.create("qcow2", "disk.qcow2", &[], "16M");
    let policy = policy_with(
        &d,
        "disk_formats = [\"raw\", \"qcow2\"]",
        "disk_formats = [\"raw\"]",
    );
    assert_refused(
        &policy,
        &spec(&d, &q, "qcow2", false),
        "tenant example: vm q2: disks[0].format = \"qcow2\" violates the tenant's disk_formats [\"raw\"]",
        &[&q],
    );
}

#[test]
fn the_virtual_size_is_what_the_disk_limits_bound() {
    let _turn = common::launch_turn();
    let d = Dir::new("size");
    // A few hundred KiB of file, 2 GiB of disk: the limit is on what the guest can fill.
    let big = d.create("qcow2", "big.qcow2", &[], "2G");
    assert!(std::fs::metadata(&big).unwrap().len() < 1 << 20);
    assert_refused(
        &example(),
        &spec(&d, &big, "qcow2", false),
        "size = 2147483648 bytes exceeds the tenant limit max_disk_bytes = 1073741824",
        &[&big],
    );
    // 2^63 bytes: refused by the header check before any limit.
    let huge = d.create("qcow2", "huge.qcow2", &[], "16M");
    patch(&huge, 24, &(1u64 << 63).to_be_bytes());
    assert_refused(
        &example(),
        &spec(&d, &huge, "qcow2", false),
        "qcow2 header: size = 9223372036854775808 exceeds the largest disk size",
        &[&huge],
    );
    // A backing layer larger than one disk may be.
    let base = d.join("base.img");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let top = d.overlay("top.qcow2", "base.img", "raw");
    assert_refused(
        &example(),
        &spec(&d, &top, "qcow2", false),
        "base.img: a raw backing file of 2147483648 bytes exceeds the tenant limit max_disk_bytes = 1073741824",
        &[&top, &base],
    );
}

/// Byte `o` of the first 64 sectors the guest's `blk` check expects.
/// A VM spec of one qcow2 disk with `key_secret` (written as given), the guest's blk
/// checks running.
fn keyed_spec(dir: &Dir, disk: &Path, key: &str) -> PathBuf {
    let p = dir.outside.join("vm-keyed.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"q2\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=serial,pci,virtio,blk\"\n\
             disks = [{{ path = \"{}\", format = \"qcow2\", key_secret = {key} }}]\n",
            disk.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn an_encrypted_disk_is_served_with_the_key_its_policy_names_and_refused_otherwise() {
    use std::os::unix::fs::PermissionsExt;
    let _turn = common::launch_turn();
    let d = Dir::new("luks-key");
    let mut b = vec![0u8; 1 << 20];
    for (o, x) in b.iter_mut().enumerate().take(64 * 512) {
        *x = pattern(o);
    }
    let base = d.join("base.img");
    std::fs::write(&base, &b).unwrap();
    let secret = "secret,id=s0,data=open sesame";
    let luks = d.create(
        "qcow2",
        "luks.qcow2",
        &[
            "--object",
            secret,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "-b",
            "base.img",
            "-F",
            "raw",
        ],
        "1M",
    );
    let plain = d.create("qcow2", "plain.qcow2", &[], "1M");
    let secrets = d.outside.join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let key = secrets.join("disk.key");
    std::fs::write(&key, "open sesame").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let keyed = policy_with(
        &d,
        "max_chain_depth = 8",
        &format!(
            "max_chain_depth = 8\nsecrets_dir = \"{}\"",
            secrets.display()
        ),
    );
    let before = sha(&luks);

    // Refused: a policy with no secrets_dir; a name that is a path; a key the world can
    // read; a symlink; a key for an image that is not encrypted; a wrong key.
    let example_policy = example();
    assert_refused(
        &example_policy,
        &keyed_spec(&d, &luks, "\"disk.key\""),
        "disks[0].key_secret = \"disk.key\" violates the tenant policy, which names no secrets_dir",
        &[&luks],
    );
    assert_refused(
        &keyed,
        &keyed_spec(&d, &luks, "\"../secrets/disk.key\""),
        "violates a file name",
        &[&luks],
    );
    let loose = secrets.join("loose.key");
    std::fs::write(&loose, "open sesame").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_refused(
        &keyed,
        &keyed_spec(&d, &luks, "\"loose.key\""),
        "a disk key must be root's and readable by root alone",
        &[&luks],
    );
    std::os::unix::fs::symlink(&key, secrets.join("link.key")).unwrap();
    assert_refused(
        &keyed,
        &keyed_spec(&d, &luks, "\"link.key\""),
        "escapes",
        &[&luks],
    );
    assert_refused(
        &keyed,
        &keyed_spec(&d, &plain, "\"disk.key\""),
        "a key was given, but the image is not encrypted",
        &[&plain],
    );
    let wrong = secrets.join("wrong.key");
    std::fs::write(&wrong, "open sesame\n").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o400)).unwrap();
    let id = unique("luks-wrong");
    let out = launch(&keyed, &id, &keyed_spec(&d, &luks, "\"wrong.key\""));
    assert_ne!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("does not open any active LUKS key slot"),
        "{}",
        out.stderr
    );
    assert!(out.test_lines().is_empty(), "the guest never ran");
    common::assert_cell_gone(&id);
    assert_eq!(sha(&luks), before, "the image is untouched");

    // Served: the guest's blk checks pass on the encrypted overlay of the pattern.
    let id = unique("luks");
    let out = launch(&keyed, &id, &keyed_spec(&d, &luks, "\"disk.key\""));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    out.passed("blk");
    common::assert_cell_gone(&id);
    // QEMU, with the same key, finds a clean image holding what the check leaves.
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        luks.display()
    );
    qemu_img(
        &["check", "-q", "--object", secret, "--image-opts", &opts],
        &d.path,
    );
    let flat = d.outside.join("flat.raw");
    qemu_img(
        &[
            "convert",
            "-q",
            "--object",
            secret,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            flat.to_str().unwrap(),
        ],
        &d.path,
    );
    let got = std::fs::read(&flat).unwrap();
    for (o, g) in got.iter().enumerate().take(64 * 512) {
        let want = match o / 512 {
            16..=23 => 0xa5 ^ (o - 16 * 512) as u8,
            32..=47 => 0,
            _ => pattern(o),
        };
        assert_eq!(*g, want, "byte {o} (sector {})", o / 512);
    }
    assert_eq!(sha(&base), b, "the backing file is read-only");
}

fn pattern(o: usize) -> u8 {
    ((o / 512) as u8).wrapping_mul(31) ^ (o as u8)
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A three-layer chain in `d`: `base.img` (raw, 1 MiB) holds the pattern except in
/// sectors 8..16, which hold 0xee; `mid.qcow2` (512-byte clusters) over it holds the
/// pattern in exactly those sectors; `top.qcow2` over that is empty. The guest sees the
/// whole pattern only if both backing layers are served, each where it is allocated.
fn chain(d: &Dir) -> [PathBuf; 3] {
    let mut b = vec![0u8; 1 << 20];
    for (o, x) in b.iter_mut().enumerate().take(64 * 512) {
        *x = if (8..16).contains(&(o / 512)) {
            0xee
        } else {
            pattern(o)
        };
    }
    let base = d.join("base.img");
    std::fs::write(&base, &b).unwrap();
    let mut m = vec![0u8; 1 << 20];
    for (o, x) in m.iter_mut().enumerate().take(16 * 512).skip(8 * 512) {
        *x = pattern(o);
    }
    let half = d.outside.join("half.raw");
    std::fs::write(&half, &m).unwrap();
    let mid = d.join("mid.qcow2");
    qemu_img(
        &[
            "convert",
            "-q",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            half.to_str().unwrap(),
            mid.to_str().unwrap(),
        ],
        &d.path,
    );
    qemu_img(
        &[
            "rebase",
            "-q",
            "-u",
            "-b",
            "base.img",
            "-F",
            "raw",
            mid.to_str().unwrap(),
        ],
        &d.path,
    );
    let top = d.create(
        "qcow2",
        "top.qcow2",
        &["-b", "mid.qcow2", "-F", "qcow2"],
        "1M",
    );
    [top, mid, base]
}

#[test]
fn a_jailed_guest_passes_its_blk_checks_on_a_qcow2_top_over_qcow2_and_raw_layers() {
    let _turn = common::launch_turn();
    let d = Dir::new("serve");
    let [top, mid, base] = chain(&d);
    let (mid0, base0) = (sha(&mid), sha(&base));
    let vm = d.outside.join("vm.toml");
    std::fs::write(
        &vm,
        format!(
            "name = \"q2\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=serial,pci,virtio,blk\"\n\
             disks = [{{ path = \"{}\", format = \"qcow2\" }}]\n",
            top.display()
        ),
    )
    .unwrap();
    let id = unique("serve");
    let out = launch(&example(), &id, &vm);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    out.passed("blk");
    common::assert_cell_gone(&id);
    // The guest's writes went to the top only, which qemu-img finds clean ...
    assert_eq!(sha(&mid), mid0, "the qcow2 backing layer was written");
    assert_eq!(sha(&base), base0, "the raw backing layer was written");
    let check = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&top)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    // ... and holds what the check leaves: sectors 16..24 written, 32..48 zeroed, the
    // rest the pattern read through the chain.
    let flat = d.outside.join("flat.raw");
    qemu_img(
        &[
            "convert",
            "-q",
            "-O",
            "raw",
            top.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
        &d.path,
    );
    let b = std::fs::read(&flat).unwrap();
    for (o, got) in b.iter().enumerate().take(64 * 512) {
        let want = match o / 512 {
            16..=23 => 0xa5 ^ (o - 16 * 512) as u8,
            32..=47 => 0,
            _ => pattern(o),
        };
        assert_eq!(*got, want, "byte {o} (sector {})", o / 512);
    }
}

const ORIGINAL: &str = "system_u:object_r:var_lib_t:s0";
const SHARED: &str = "system_u:object_r:cellvm_image_t:s0";

fn set_label(path: &Path, label: &str) {
    let st = Command::new("setfattr")
        .args(["-n", "security.selinux", "-v", label])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A VM holding (`hold=60`) on a qcow2 top, launched in the background; killed and
/// collected when dropped.
/// The VM of the label tests: a qcow2 `top` held running.
fn hold(d: &Dir, id: &str, top: &Path) -> HeldVm {
    let vm = d.outside.join(format!("{id}.toml"));
    std::fs::write(
        &vm,
        format!(
            "name = \"q2\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=serial hold=60\"\n\
             disks = [{{ path = \"{}\", format = \"qcow2\" }}]\n",
            top.display()
        ),
    )
    .unwrap();
    HeldVm::launch(id, &example(), &vm)
}

fn assert_restored(path: &Path, original: Option<&str>) {
    assert_eq!(
        xattr(path, "security.selinux").as_deref(),
        original,
        "{}",
        path.display()
    );
    assert_eq!(
        xattr(path, "trusted.cellvm.ref"),
        None,
        "{}",
        path.display()
    );
    assert_eq!(
        xattr(path, "trusted.cellvm.selinux"),
        None,
        "{}",
        path.display()
    );
}

#[test]
fn every_layer_is_labelled_while_the_vm_runs_and_restored_after_every_ending() {
    let _turn = common::launch_turn();
    let d = Dir::new("labels");
    let [top, mid, base] = chain(&d);
    for f in [&top, &mid, &base] {
        set_label(f, ORIGINAL);
    }
    let check_running = |vm: &HeldVm| {
        let pair = vm.pair();
        assert_eq!(
            xattr(&top, "security.selinux"),
            Some(format!("{SHARED}:{pair}")),
            "the writable top has the VM's pair"
        );
        for lower in [&mid, &base] {
            assert_eq!(
                xattr(lower, "security.selinux").as_deref(),
                Some(SHARED),
                "{}: a backing layer has the shared label, no categories",
                lower.display()
            );
            assert_eq!(xattr(lower, "trusted.cellvm.ref").as_deref(), Some("1"));
        }
    };
    // Ended by its VMM's death: the supervisor restores every layer.
    let id = unique("labels");
    let mut vm = hold(&d, &id, &top);
    check_running(&vm);
    // The backend may grow the writable top as far as writing the whole 1 MiB disk
    // needs (data, L2 and refcount clusters, slack), and no further.
    let limit = fsize_limit_of_backend(&id);
    assert!(
        (1 << 20) < limit && limit < 4 << 20,
        "RLIMIT_FSIZE of the blk cell: {limit}"
    );
    vm.end();
    for f in [&top, &mid, &base] {
        assert_restored(f, Some(ORIGINAL));
    }
    common::assert_cell_gone(&id);
    // Its supervisor killed: the labels stay until gc reclaims the cell.
    let id = unique("labels-gc");
    let mut vm = hold(&d, &id, &top);
    check_running(&vm);
    vm.kill_supervisor();
    assert_eq!(xattr(&mid, "security.selinux").as_deref(), Some(SHARED));
    let gc = common::run(
        {
            let mut c = Command::new(bin("cellvm-jailer"));
            c.arg("gc");
            c
        },
        LIMIT,
    );
    assert_eq!(gc.code, Some(0), "{}", gc.stderr);
    for f in [&top, &mid, &base] {
        assert_restored(f, Some(ORIGINAL));
    }
    common::assert_cell_gone(&id);
}

#[test]
fn a_backing_layer_two_vms_share_is_restored_only_when_the_second_ends() {
    let _turn = common::launch_turn();
    let d = Dir::new("sharedbase");
    let [top, mid, base] = chain(&d);
    set_label(&base, ORIGINAL);
    let top2 = d.create(
        "qcow2",
        "top2.qcow2",
        &["-b", "mid.qcow2", "-F", "qcow2"],
        "1M",
    );
    let mut a = hold(&d, &unique("share-a"), &top);
    let mut b = hold(&d, &unique("share-b"), &top2);
    for lower in [&mid, &base] {
        assert_eq!(xattr(lower, "trusted.cellvm.ref").as_deref(), Some("2"));
    }
    a.end();
    assert_eq!(xattr(&base, "security.selinux").as_deref(), Some(SHARED));
    assert_eq!(xattr(&base, "trusted.cellvm.ref").as_deref(), Some("1"));
    b.end();
    assert_restored(&base, Some(ORIGINAL));
    assert_restored(&mid, None);
}

#[test]
fn a_writable_disk_that_is_another_disks_backing_layer_is_refused() {
    let _turn = common::launch_turn();
    let d = Dir::new("rwlower");
    let [top, mid, _base] = chain(&d);
    let vm = d.outside.join("vm2.toml");
    std::fs::write(
        &vm,
        format!(
            "name = \"q2\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=serial\"\n\
             disks = [{{ path = \"{}\", format = \"qcow2\" }}, {{ path = \"{}\", format = \"qcow2\" }}]\n",
            top.display(),
            mid.display()
        ),
    )
    .unwrap();
    assert_refused(
        &example(),
        &vm,
        "the same image as a backing file of disks[0]; a writable image has one user",
        &[&top, &mid],
    );
}

/// RLIMIT_FSIZE (soft) of VM `id`'s blk backend, from /proc/PID/limits.
fn fsize_limit_of_backend(id: &str) -> u64 {
    let procs =
        std::fs::read_to_string(format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs")).unwrap();
    let pid = procs
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .find(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .map(|e| e.file_name() == Some("cellvm-device".as_ref()))
                .unwrap_or(false)
        })
        .expect("the blk backend in the VM's cgroup");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max file size"))
        .unwrap();
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}
