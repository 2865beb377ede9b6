//! `cellvm-jailer` against a hostile tenant: spec strings that would crash or forge
//! output, specs that would cost root CPU and memory, files that would block the
//! jailer or widen what a cell gets, images another writer holds, an unprivileged
//! user on the registry lock, and a kill of the jailer at each step, then `gc`.

mod common;
use common::{bin, repo};

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::run;

const LIMIT: Duration = Duration::from_secs(60);
const IMAGES: &str = "/var/lib/cellvm/images/example";

fn unique(name: &str) -> String {
    format!("h1-{name}-{}", std::process::id())
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(unique(name));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A sparse image of `bytes` in the example tenant's image directory, this test's own.
fn image(name: &str, bytes: u64) -> PathBuf {
    std::fs::create_dir_all(IMAGES).unwrap();
    let p = Path::new(IMAGES).join(format!("{}.img", unique(name)));
    let _ = std::fs::remove_file(&p);
    std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
    p
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// The example tenant policy with `extra` lines added (before its [cgroup] table).
fn policy(dir: &Path, extra: &str) -> PathBuf {
    let example = std::fs::read_to_string(repo("policy/tenants/example.toml")).unwrap();
    let text = example.replace("[cgroup]", &format!("{extra}\n[cgroup]"));
    write(dir, "tenant.toml", &text)
}

fn jailer(cmd: &str, policy: &Path, id: &str, vm: &Path) -> Command {
    let mut c = Command::new(bin("cellvm-jailer"));
    c.args([cmd, "--id", id, "--policy"])
        .arg(policy)
        .arg("--vm")
        .arg(vm)
        .arg("--vmm")
        .arg(bin("cellvm"));
    c
}

fn example_policy() -> PathBuf {
    repo("policy/tenants/example.toml")
}

/// `cellvm-jailer check` of `body` under `policy`.
fn check(policy: &Path, name: &str, body: &str) -> common::Outcome {
    let dir = scratch(name);
    let vm = write(&dir, "vm.toml", body);
    run(jailer("check", policy, &unique(name), &vm), LIMIT)
}

fn assert_refused(out: &common::Outcome, expect: &str) {
    assert_eq!(out.code, Some(2), "{expect}: {}", out.stderr);
    assert!(
        out.stderr.contains(expect),
        "{:?} lacks {expect:?}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// Nothing of cell `id` is left: registry entry (and a temporary one), jail tree,
/// cgroups in every hierarchy.
fn assert_nothing_left(id: &str) {
    common::assert_cell_gone(id);
}

#[test]
fn a_nul_or_an_escape_in_the_cmdline_is_refused_before_the_jailer_forks() {
    for (cmdline, shown) in [
        (
            "a\\u0000b",
            "cmdline = \"a\\u{0}b\" violates printable ASCII of at most 2047 bytes",
        ),
        (
            "x\\u001b]0;owned\\u0007",
            "cmdline = \"x\\u{1b}]0;owned\\u{7}\" violates",
        ),
    ] {
        let id = unique("nul");
        let dir = scratch("nul");
        let vm = write(
            &dir,
            "vm.toml",
            &format!("name = \"n\"\nmemory_mib = 64\ncmdline = \"{cmdline}\"\n"),
        );
        let out = run(jailer("launch", &example_policy(), &id, &vm), LIMIT);
        assert_refused(&out, shown);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert_nothing_left(&id);
    }
    let long = "a".repeat(2048);
    let out = check(
        &example_policy(),
        "long",
        &format!("name = \"n\"\nmemory_mib = 64\ncmdline = \"{long}\"\n"),
    );
    assert_refused(&out, "cmdline = 2048 bytes violates");
}

#[test]
fn a_newline_in_a_vm_name_cannot_forge_a_log_line() {
    let out = check(
        &example_policy(),
        "nl",
        "name = \"demo\\nuid=0 \\u001b[2K\"\nmemory_mib = 64\n",
    );
    assert_refused(
        &out,
        "tenant example: vm demo\\nuid=0 \\u{1b}[2K: name = \"demo\\nuid=0 \\u{1b}[2K\" violates",
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(!out.stderr.contains('\x1b'));
}

#[test]
fn oversized_specs_are_refused_before_work_grows_with_them() {
    let start = Instant::now();
    let big = format!(
        "name = \"n\"\nmemory_mib = 64\ncmdline = \"{}\"\n",
        "a".repeat(300_000)
    );
    let out = check(&example_policy(), "big", &big);
    assert_refused(&out, "larger than 65536 bytes");
    // As many nets as fit in 64 KiB: refused on the count, before any per-net work.
    let nets: Vec<String> = (0..3000).map(|i| format!("{{tap=\"cvex{i}\"}}")).collect();
    let out = check(
        &example_policy(),
        "nets",
        &format!(
            "name = \"n\"\nmemory_mib = 64\nnets = [{}]\n",
            nets.join(",")
        ),
    );
    assert_refused(
        &out,
        "nets = 3000 entries (3000 devices in all) exceeds the 31 PCI slots",
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn fifos_sockets_devices_and_directories_are_refused_by_name_without_blocking() {
    let tag = unique("kinds");
    let dir = Path::new(IMAGES);
    let fifo = dir.join(format!("{tag}.fifo"));
    let sock = dir.join(format!("{tag}.sock"));
    let chr = dir.join(format!("{tag}.chr"));
    let sub = dir.join(format!("{tag}.dir"));
    for p in [&fifo, &sock, &chr] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir(&sub);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert!(Command::new("mknod")
        .arg(&chr)
        .args(["c", "1", "3"])
        .status()
        .unwrap()
        .success());
    std::fs::create_dir(&sub).unwrap();
    for (field, path, kind) in [
        ("kernel", &fifo, "a FIFO"),
        ("initrd", &fifo, "a FIFO"),
        ("kernel", &sock, "a socket (or a device without a driver)"),
        ("kernel", &chr, "a character device"),
        ("kernel", &sub, "a directory"),
    ] {
        let id = unique("kind");
        let d = scratch("kind");
        let vm = write(
            &d,
            "vm.toml",
            &format!(
                "name = \"k\"\nmemory_mib = 64\n{field} = \"{}\"\n",
                path.display()
            ),
        );
        // A FIFO opened without O_NONBLOCK would hang here until the limit.
        let out = run(
            jailer("launch", &example_policy(), &id, &vm),
            Duration::from_secs(20),
        );
        assert_refused(
            &out,
            &format!(
                "{field}: {}: {kind}, not a regular file; refused",
                path.display()
            ),
        );
        assert_nothing_left(&id);
    }
    for (path, kind) in [(&fifo, "a FIFO"), (&chr, "a character device")] {
        for ro in [true, false] {
            let out = check(
                &example_policy(),
                "kinddisk",
                &format!(
                    "name = \"k\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\", readonly = {ro} }}]\n",
                    path.display()
                ),
            );
            assert_refused(&out, &format!("disks[0]: {}: {kind}", path.display()));
        }
    }
    for p in [&fifo, &sock, &chr] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir(&sub);
}

/// A loop device on a small file; detached on drop.
struct Loop(String);

impl Loop {
    fn new(backing: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn mknod_like(node: &Path, dev: &str) {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev).unwrap().rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let _ = std::fs::remove_file(node);
    assert!(Command::new("mknod")
        .arg(node)
        .args(["b", &major.to_string(), &minor.to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn block_devices_are_served_only_where_the_policy_grants_their_path() {
    let dir = scratch("blk");
    let backing = dir.join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let lo = Loop::new(&backing);
    let nodes = dir.join("nodes");
    std::fs::create_dir(&nodes).unwrap();
    let node = nodes.join("vol-a");
    mknod_like(&node, &lo.0);
    std::os::unix::fs::symlink(&node, nodes.join("vol-link")).unwrap();
    let in_images = Path::new(IMAGES).join(format!("{}.blk", unique("blk")));
    mknod_like(&in_images, &lo.0);
    let granted = policy(
        &dir,
        &format!("block_devices = [\"{}/vol-*\"]", nodes.display()),
    );
    let disk = |p: &Path| {
        format!(
            "name = \"b\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\" }}]\n",
            p.display()
        )
    };
    // Granted by path: served, writable, its size read from the device.
    let out = check(&granted, "blkok", &disk(&node));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // Positive control for the two refusals below: the same device, granted.
    let out = check(&granted, "blklink", &disk(&nodes.join("vol-link")));
    assert_refused(
        &out,
        "a granted block device is opened by its own path, never through a symlink",
    );
    let out = check(&granted, "blkimg", &disk(&in_images));
    assert_refused(
        &out,
        "a block device is served only where the tenant policy's block_devices grant its path",
    );
    let out = check(&example_policy(), "blkno", &disk(&node));
    assert_refused(&out, "disks[0].path = ");
    let _ = std::fs::remove_file(&in_images);
}

#[test]
fn a_golden_image_is_never_opened_writable() {
    let golden = image("golden", 1 << 20);
    std::fs::set_permissions(&golden, std::fs::Permissions::from_mode(0o444)).unwrap();
    let disk = |p: &Path, ro: bool| {
        format!(
            "name = \"g\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\", readonly = {ro} }}]\n",
            p.display()
        )
    };
    let out = check(&example_policy(), "golden", &disk(&golden, false));
    assert_refused(
        &out,
        "the file does not allow writing (owner uid 0, mode 0444)",
    );
    let out = check(&example_policy(), "goldenro", &disk(&golden, true));
    assert_eq!(
        out.code,
        Some(0),
        "read-only is what the file grants: {}",
        out.stderr
    );
    // A second link: the writer could be reaching a file known by another name.
    let plain = image("linked", 1 << 20);
    let link = plain.with_extension("link");
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(&plain, &link).unwrap();
    let out = check(&example_policy(), "linked", &disk(&plain, false));
    assert_refused(&out, "2 hard links; a writable image must have exactly one");
    std::fs::remove_file(&link).unwrap();
    let out = check(&example_policy(), "unlinked", &disk(&plain, false));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // With image_owner the kernel decides, with that owner's permissions, not root's.
    let dir = scratch("ownerpolicy");
    let owned = policy(&dir, "image_owner = [65534, 65534]");
    let out = check(&owned, "notowner", &disk(&plain, false));
    assert_refused(&out, "Permission denied");
    std::os::unix::fs::chown(&plain, Some(65534), Some(65534)).unwrap();
    let out = check(&owned, "owner", &disk(&plain, false));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for p in [golden, plain] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn disks_are_bounded_by_the_tenant_policy() {
    let sparse = image("sparse8t", 8 << 40);
    let a = image("half-a", 1 << 30);
    let b = image("half-b", 1 << 30);
    let out = check(
        &example_policy(),
        "sparse",
        &format!(
            "name = \"s\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\" }}]\n",
            sparse.display()
        ),
    );
    assert_refused(
        &out,
        "disks[0]: size = 8796093022208 bytes exceeds the tenant limit max_disk_bytes = 1073741824",
    );
    let two = |ro: bool| {
        format!(
            "name = \"s\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\" }}, {{ path = \"{}\", readonly = {ro} }}]\n",
            a.display(),
            b.display()
        )
    };
    let out = check(&example_policy(), "total", &two(false));
    assert_refused(
        &out,
        "disks[1]: writable disks of 2147483648 bytes in all exceed the tenant limit max_total_disk_bytes = 1610612736",
    );
    let out = check(&example_policy(), "totalro", &two(true));
    assert_eq!(
        out.code,
        Some(0),
        "a read-only disk does not count: {}",
        out.stderr
    );
    for p in [sparse, a, b] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn the_same_image_twice_in_one_spec_is_refused() {
    let img = image("twice", 1 << 20);
    let alias = Path::new(IMAGES).join(format!("{}.alias", unique("twice")));
    let _ = std::fs::remove_file(&alias);
    std::os::unix::fs::symlink(img.file_name().unwrap(), &alias).unwrap();
    for (second, ro0, ro1) in [
        (&img, false, false),
        (&alias, true, false),
        (&alias, false, true),
    ] {
        let out = check(
            &example_policy(),
            "twice",
            &format!(
                "name = \"t\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\", readonly = {ro0} }}, {{ path = \"{}\", readonly = {ro1} }}]\n",
                img.display(),
                second.display()
            ),
        );
        assert_refused(
            &out,
            "disks[1]: the same image as disks[0]; a writable image has one user",
        );
    }
    let out = check(
        &example_policy(),
        "twicero",
        &format!(
            "name = \"t\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\", readonly = true }}, {{ path = \"{}\", readonly = true }}]\n",
            img.display(),
            alias.display()
        ),
    );
    assert_eq!(out.code, Some(0), "read-only users share: {}", out.stderr);
    let _ = std::fs::remove_file(alias);
    let _ = std::fs::remove_file(img);
}

/// Starts a jailed VM with `disk` that holds for `secs`; returns once its VMM runs.
/// (If it never does, the test fails and the VM's own hold ends the jailer.)
#[allow(clippy::zombie_processes)]
fn start_holding(id: &str, disk: &Path, readonly: bool, secs: u32) -> std::process::Child {
    let dir = scratch(id);
    let vm = write(
        &dir,
        "vm.toml",
        &format!(
            "name = \"hold\"\nmemory_mib = 64\ncmdline = \"tests=serial hold={secs}\"\ndisks = [{{ path = \"{}\", readonly = {readonly} }}]\n",
            disk.display()
        ),
    );
    let child = jailer("launch", &example_policy(), id, &vm)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let procs = format!("/sys/fs/cgroup/pids/cellvm/{id}/cgroup.procs");
    let start = Instant::now();
    loop {
        let pids = std::fs::read_to_string(&procs).unwrap_or_default();
        if pids.lines().any(|pid| {
            std::fs::read_link(format!("/proc/{}/exe", pid.trim()))
                .map(|e| e.ends_with("cellvm"))
                .unwrap_or(false)
        }) {
            return child;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the VMM never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn finish(mut child: std::process::Child, id: &str) {
    // SAFETY: SIGUSR1 to our own child, the jailer, which destroys the VM and cleans up
    // (SIGTERM would wait for a guest that does not answer the power button).
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < LIMIT, "the jailer did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_nothing_left(id);
}

/// QEMU with `disk` attached to a paused microvm (it holds the image as a running VM
/// would, with QEMU's image locks).
fn qemu_with(disk: &Path, readonly: bool) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-drive",
    ])
    .arg(format!(
        "file={},format=raw,if=none,id=d0,readonly={}",
        disk.display(),
        if readonly { "on" } else { "off" }
    ))
    .args(["-device", "virtio-blk-device,drive=d0"]);
    c
}

fn qemu_fails(mut c: Command) -> String {
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    let out = run(c, Duration::from_secs(20));
    assert_ne!(out.code, Some(0), "QEMU opened the image: {}", out.stderr);
    out.stderr
}

#[test]
fn a_running_vms_writable_image_has_no_second_writer() {
    let img = image("locked", 1 << 20);
    let id = unique("locked");
    let vm = start_holding(&id, &img, false, 30);
    let disk = |ro: bool| {
        format!(
            "name = \"l\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\", readonly = {ro} }}]\n",
            img.display()
        )
    };
    for ro in [false, true] {
        let second = unique("second");
        let d = scratch("second");
        let spec = write(&d, "vm.toml", &disk(ro));
        let out = run(jailer("launch", &example_policy(), &second, &spec), LIMIT);
        assert_refused(&out, &format!("disks[0]: {}: in use", img.display()));
        assert_nothing_left(&second);
    }
    let e = qemu_fails(qemu_with(&img, false));
    assert!(e.contains("lock"), "{e}");
    let e = qemu_fails(qemu_with(&img, true));
    assert!(e.contains("lock"), "{e}");
    // qemu-io as a writer and as a reader (qemu-img info takes no lock at all).
    for args in [
        &["-f", "raw", "-c", "write 0 512"][..],
        &["-r", "-f", "raw", "-c", "read 0 512"],
    ] {
        let mut io = Command::new("qemu-io");
        io.args(args).arg(&img);
        let e = qemu_fails(io);
        assert!(e.contains("Failed to lock byte 100"), "{e}");
    }
    finish(vm, &id);
    // Positive control: with the VM gone, the same QEMU and launch get the image.
    let out = check(&example_policy(), "after", &disk(false));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let io = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(&img)
        .output()
        .expect("qemu-io (tests/setup.sh installs qemu-utils)");
    assert!(
        io.status.success(),
        "{}",
        String::from_utf8_lossy(&io.stderr)
    );
    let _ = std::fs::remove_file(img);
}

/// Waits until QEMU holds its final locks on `img` (in /proc/locks by inode): it takes
/// "read" first and the rest when the device attaches; both a reader and a writer end
/// with byte 201 ("no one else writes").
fn wait_for_qemu_lock(img: &Path, qemu: &mut std::process::Child) {
    use std::os::unix::fs::MetadataExt;
    let ino = format!(":{} 201 201", std::fs::metadata(img).unwrap().ino());
    let start = Instant::now();
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .contains(&ino)
    {
        assert!(qemu.try_wait().unwrap().is_none(), "QEMU ended");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "QEMU took no lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_image_qemu_holds_read_write_is_refused_and_read_only_users_share() {
    let img = image("qemu", 1 << 20);
    let disk = |ro: bool| {
        format!(
            "name = \"q\"\nmemory_mib = 64\ndisks = [{{ path = \"{}\", readonly = {ro} }}]\n",
            img.display()
        )
    };
    let mut qemu = qemu_with(&img, false)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_qemu_lock(&img, &mut qemu);
    let writer = check(&example_policy(), "qrw", &disk(false));
    let reader = check(&example_policy(), "qro", &disk(true));
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    assert_refused(&writer, "in use");
    assert_refused(&reader, "in use: a writer");
    // QEMU as a reader: our readers share, our writer is refused.
    let mut qemu = qemu_with(&img, true)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_qemu_lock(&img, &mut qemu);
    let writer = check(&example_policy(), "qrw2", &disk(false));
    let reader = check(&example_policy(), "qro2", &disk(true));
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    assert_refused(&writer, "in use");
    assert_eq!(
        reader.code,
        Some(0),
        "read-only users share: {}",
        reader.stderr
    );
    let _ = std::fs::remove_file(img);
}

#[test]
fn the_registry_lock_cannot_be_opened_by_another_user() {
    // The modes an older jailer left (0755 and 0644): the next jailer run tightens them.
    if Path::new("/run/cellvm/registry.lock").exists() {
        std::fs::set_permissions("/run/cellvm", std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            "/run/cellvm/registry.lock",
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    let out = run(
        {
            let mut c = Command::new(bin("cellvm-jailer"));
            c.arg("gc");
            c
        },
        LIMIT,
    );
    assert!(out.code.is_some(), "{}", out.stderr);
    let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("/run/cellvm"), 0o700);
    assert_eq!(mode("/run/cellvm/vms"), 0o700);
    assert_eq!(mode("/run/cellvm/registry.lock"), 0o600);
    let flock_as_nobody = |path: &Path| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "flock",
                "-n",
                "-s",
            ])
            .arg(path)
            .arg("true")
            .output()
            .unwrap()
    };
    let denied = flock_as_nobody(Path::new("/run/cellvm/registry.lock"));
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    // Positive control: the same user locks a 0644 file of a directory it can reach.
    let dir = scratch("lockctl");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = write(&dir, "l", "");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ok = flock_as_nobody(&f);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn a_kill_of_the_jailer_at_any_step_is_completed_by_gc() {
    assert!(
        Command::new("strace")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success()),
        "strace is needed (tests/setup.sh installs it)"
    );
    let img = image("kill", 1 << 20);
    let dir = scratch("kill");
    let vm = write(
        &dir,
        "vm.toml",
        &format!(
            "name = \"kill\"\nmemory_mib = 64\ncmdline = \"tests=serial hold=1\"\nrng = true\ndisks = [{{ path = \"{}\", readonly = true }}]\n",
            img.display()
        ),
    );
    for (call, when) in [
        ("rename", 1),
        ("mkdir", 1),
        ("mkdir", 3),
        ("write", 1),
        ("write", 6),
        ("bind", 1),
        ("connect", 1),
        ("bind", 2),
        ("clone3", 1),
        ("clone3", 2),
        ("clone3", 3),
        ("openat2", 1),
        ("fsync", 1),
    ] {
        let id = unique(&format!("kill-{call}-{when}"));
        let mut c = Command::new("strace");
        c.args(["-f", "-qq", "-o", "/dev/null", "-e"])
            .arg(format!("inject={call}:signal=SIGKILL:when={when}"))
            .arg(bin("cellvm-jailer"))
            .args(["launch", "--id", &id, "--policy"])
            .arg(example_policy())
            .arg("--vm")
            .arg(&vm)
            .arg("--vmm")
            .arg(bin("cellvm"));
        let out = run(c, LIMIT);
        assert!(!out.stderr.contains("strace:"), "{}", out.stderr);
        let mut gc = Command::new(bin("cellvm-jailer"));
        gc.arg("gc");
        let g = run(gc, LIMIT);
        assert!(
            !g.stderr.contains(&id),
            "{call}@{when}: gc: {}\nlaunch: {}",
            g.stderr,
            out.stderr
        );
        assert_nothing_left(&id);
    }
    let _ = std::fs::remove_file(img);
}
