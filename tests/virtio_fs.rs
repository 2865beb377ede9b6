//! virtio-fs: the test guest's FUSE client (tests/guest/fs.rs) on a share served by
//! virtiofsd (the crates.io release tests/setup.sh builds) through cellvm's vhost-user-fs
//! frontend. Jailed, virtiofsd runs in a cell whose only content is the share; the same
//! guest against a virtiofsd outside any cell is the control that shows which of the
//! guest's ways out the cell is what stops.

mod common;
use common::{bin, jailer_command, run};

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// Where tests/setup.sh installs virtiofsd.
const VIRTIOFSD: &str = "/usr/local/libexec/cellvm/virtiofsd";
/// The tests' share directories live beneath this (a tenant's `share_dirs` entry).
const SHARES: &str = "/var/lib/cellvm/shares";
/// What the guest's `fs` check expects in hello.txt and writes to guest.txt
/// (tests/guest/fs.rs).
const HELLO: &str = "hello from the host through virtiofsd\n";
const GUEST: &str = "written by the guest over virtio-fs\n";
/// The uid and gid the tenant's virtiofsd cells run as (`share_owner`).
const OWNER: u32 = 201_999;

/// A share laid out as the guest's `fs` check expects, and a file next to it (outside
/// it): `<SHARES>/t-<name>-<pid>/{share/, outside.txt}`. Removed when dropped.
struct Share {
    top: PathBuf,
}

impl Share {
    fn new(name: &str) -> Share {
        let top = Path::new(SHARES).join(format!("t-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let share = top.join("share");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("hello.txt"), HELLO).unwrap();
        std::fs::write(top.join("outside.txt"), "outside the share\n").unwrap();
        std::os::unix::fs::symlink("/etc", share.join("out-abs")).unwrap();
        std::os::unix::fs::symlink("../outside.txt", share.join("out-rel")).unwrap();
        let status = Command::new("mknod")
            .args(["-m", "0666"])
            .arg(share.join("devnull"))
            .args(["c", "1", "3"])
            .status()
            .unwrap();
        assert!(status.success(), "mknod");
        // The share is the share owner's, as a tenant's would be.
        let status = Command::new("chown")
            .args(["-R", &format!("{OWNER}:{OWNER}")])
            .arg(&share)
            .status()
            .unwrap();
        assert!(status.success(), "chown");
        Share { top }
    }

    fn path(&self) -> PathBuf {
        self.top.join("share")
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.top);
    }
}

/// The test tenant (test switches allowed) with `SHARES` as a writable share directory
/// and `OWNER` as its share owner.
fn share_policy(name: &str) -> PathBuf {
    let base = std::fs::read_to_string(common::repo("policy/tenants/example.toml"))
        .unwrap()
        .replace(
            "seccomp_off_allowed = false",
            "seccomp_off_allowed = false\nallow_test_switches = true",
        );
    let example = "share_dirs = [{ path = \"/var/lib/cellvm/shares/example\", writable = true }]\nshare_owner = [201000, 201000]";
    assert!(base.contains(example));
    let text = base.replace(
        example,
        &format!("share_dirs = [{{ path = \"{SHARES}\", writable = true }}]\nshare_owner = [{OWNER}, {OWNER}]"),
    );
    let p = common::scratch_dir(&format!("fs-policy-{name}")).join("tenant.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A VM spec of the test guest running `tests=fs` with `share` as tag "share".
fn share_spec(name: &str, share: &Path, readonly: bool) -> PathBuf {
    let p = common::scratch_dir(&format!("fs-spec-{name}")).join("vm.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=fs\"\nshares = [{{ path = \"{}\", tag = \"share\", readonly = {readonly} }}]\n",
            share.display()
        ),
    )
    .unwrap();
    p
}

/// The value of `key=` in a check's detail.
fn field<'a>(detail: &'a str, key: &str) -> &'a str {
    detail
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {detail}"))
}

fn jailed(name: &str, readonly: bool, extra: &[&str]) -> (common::Outcome, Share) {
    let share = Share::new(name);
    let id = format!("t-fs-{name}-{}", std::process::id());
    let mut c = jailer_command(
        &id,
        &share_policy(name),
        &share_spec(name, &share.path(), readonly),
    );
    c.arg("--virtiofsd").arg(VIRTIOFSD).args(extra);
    let out = run(c, LIMIT);
    common::assert_cell_gone(&id);
    (out, share)
}

/// virtiofsd outside any cell (as root, its own sandbox off, as one might run it by
/// hand) serving the same layout to an unjailed VMM: the control.
fn unconfined(name: &str) -> (common::Outcome, Share) {
    let share = Share::new(name);
    let sock = share.top.join("fs.sock");
    let daemon = common::Daemon(
        Command::new(VIRTIOFSD)
            .arg(format!("--socket-path={}", sock.display()))
            .arg(format!("--shared-dir={}", share.path().display()))
            .args([
                "--sandbox=none",
                "--seccomp=none",
                "--inode-file-handles=never",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{VIRTIOFSD} (tests/setup.sh builds it): {e}")),
    );
    common::wait_for(&sock);
    let mut c = Command::new(bin("cellvm"));
    c.args([
        "run",
        "--memory",
        "64",
        "--serial",
        "stdio",
        "--cmdline",
        "tests=fs",
        "--fs",
    ])
    .arg(format!("tag=share,socket={}", sock.display()));
    let out = run(c, LIMIT);
    drop(daemon);
    (out, share)
}

/// The guest reads what the host wrote and the host sees what the guest wrote, through
/// virtiofsd in its cell (running as the tenant's share owner); and of the guest's ways
/// out — `..` of the root, a symlink to /etc, a symlink to ../outside.txt, a hard link
/// to a forged node id, a device node it makes, a device node left in the share —
/// none reaches anything outside the share.
#[test]
fn a_jailed_guest_reads_and_writes_a_share_and_finds_nothing_outside_it() {
    let (out, share) = jailed("rw", false, &[]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let d = out.passed("fs");
    assert_eq!(field(d, "tag"), "share");
    assert_eq!(field(d, "read"), "true");
    assert_eq!(
        field(d, "hello_size"),
        HELLO.len().to_string(),
        "GETATTR's size"
    );
    let written = share.path().join("guest.txt");
    assert_eq!(std::fs::read_to_string(&written).unwrap(), GUEST);
    let meta = std::fs::metadata(&written).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (OWNER, OWNER),
        "written as the share owner"
    );
    // `..` of the root, and beneath symlinks: nothing (ENOENT, ENOTDIR).
    assert_eq!(field(d, "dotdot"), "e2", "{d}");
    assert_eq!(field(d, "symlink_abs"), "e20", "{d}");
    assert!(field(d, "symlink_rel").starts_with('e'), "{d}");
    assert!(field(d, "forged_link").starts_with('e'), "{d}");
    // A device node: refused by Landlock (no MAKE_CHAR) in the cell, EACCES.
    assert_eq!(field(d, "mknod"), "e13", "{d}");
    assert!(!share.path().join("made-null").exists());
    assert!(field(d, "devnode").starts_with('e'), "{d}");
    assert_eq!(
        std::fs::read_to_string(share.top.join("outside.txt")).unwrap(),
        "outside the share\n"
    );
}

/// The control: the same guest against a virtiofsd outside any cell. It too refuses
/// `..`, lookups beneath symlinks, forged node ids and opening device nodes (its own
/// checks); but the device node the guest asks for is made — in the cell, Landlock
/// refuses it (EACCES) and, without Landlock, the cell's unprivileged uid (EPERM).
#[test]
fn outside_a_cell_the_guest_makes_a_device_node_that_the_cell_refuses() {
    let (out, share) = unconfined("control");
    let d = out.passed("fs");
    assert_eq!(field(d, "read"), "true");
    assert_eq!(field(d, "dotdot"), "e2", "virtiofsd's own check: {d}");
    assert_eq!(field(d, "mknod"), "made", "{d}");
    let made = std::fs::metadata(share.path().join("made-null")).unwrap();
    assert_eq!(made.rdev(), libc::makedev(1, 3));

    let (out, share) = jailed("nolandlock", false, &["--without", "landlock"]);
    let d = out.passed("fs");
    assert_eq!(field(d, "mknod"), "e1", "the unprivileged uid: {d}");
    assert!(!share.path().join("made-null").exists());
}

/// A read-only share: the guest reads it, and its write fails (EROFS: virtiofsd's
/// --readonly, over a read-only mount); nothing is written on the host.
#[test]
fn a_read_only_share_is_read_and_never_written() {
    let (out, share) = jailed("ro", true, &[]);
    let line = out
        .test_lines()
        .into_iter()
        .find(|l| l.starts_with("TEST fs "))
        .unwrap_or_else(|| panic!("{}\n{}", out.stdout, out.stderr))
        .to_string();
    assert!(line.contains("read=true"), "{line}");
    assert!(line.contains("wrote=Err(30)"), "{line}");
    assert!(!share.path().join("guest.txt").exists());
}

/// What the tenant policy does not grant, and what is not a directory, is refused
/// before any cell starts, naming the field.
#[test]
fn shares_outside_the_policy_are_refused() {
    let share = Share::new("refuse");
    let policy = share_policy("refuse");
    let ro_policy = {
        let text = std::fs::read_to_string(&policy)
            .unwrap()
            .replace("writable = true", "writable = false");
        let p = policy.with_file_name("tenant-ro.toml");
        std::fs::write(&p, text).unwrap();
        p
    };
    let file = share.path().join("hello.txt");
    let escape = share.top.join("escape");
    std::os::unix::fs::symlink("/etc", &escape).unwrap();
    let cases: &[(&Path, &Path, bool, &str)] = &[
        (
            &policy,
            Path::new("/etc"),
            true,
            "shares[0] = /etc violates share_dirs",
        ),
        (
            &ro_policy,
            &share.path(),
            false,
            "violates the writable share_dirs",
        ),
        (&policy, &file, true, "not a directory"),
        (&policy, &escape, true, "escapes"),
    ];
    for (policy, path, readonly, expected) in cases {
        let spec = share_spec("refused", path, *readonly);
        let mut c = Command::new(bin("cellvm-jailer"));
        c.args(["check", "--policy"])
            .arg(policy)
            .arg("--vm")
            .arg(&spec)
            .arg("--virtiofsd")
            .arg(VIRTIOFSD);
        let out = run(c, LIMIT);
        assert_eq!(out.code, Some(2), "{path:?}: {}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains(expected), "{path:?}: {}", out.stderr);
    }
}
