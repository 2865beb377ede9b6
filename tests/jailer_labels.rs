//! sVirt file labels as the jailer gives them, observed on disk: SELinux is not enabled
//! on our hosts, but ext4 keeps `security.selinux` for root all the same, so the labels
//! a launch sets (and restores) can be read with getfattr. While a VM runs its writable
//! disk carries the VM's own MCS pair and a read-only disk a label without categories;
//! afterwards every file has its original label back and cellvm's `trusted.` attributes
//! are gone: after the VM ends, after SIGKILL of its supervisor and `cellvm-jailer gc`,
//! and, for a read-only image two VMs share, only once the second one ends.

mod common;
use common::{bin, repo, HeldVm};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// The example tenant's image directory (tests/setup.sh makes it).
const IMAGES: &str = "/var/lib/cellvm/images/example";
const ORIGINAL: &str = "system_u:object_r:var_lib_t:s0";
const SHARED: &str = "system_u:object_r:cellvm_image_t:s0";

fn unique(name: &str) -> String {
    format!("t-lbl-{name}-{}", std::process::id())
}

/// One extended attribute through getfattr (None: the file has none), without the
/// NUL a stored SELinux context ends with.
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
    let v = String::from_utf8_lossy(&out.stdout);
    Some(v.trim_end_matches('\0').to_string())
}

fn set_label(path: &Path, label: &str) {
    let st = Command::new("setfattr")
        .args(["-n", "security.selinux", "-v", label])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(xattr(path, "security.selinux").as_deref(), Some(label));
}

/// A sparse image in the example tenant's directory, removed when dropped.
struct Image(PathBuf);

impl Image {
    fn new(name: &str, original: Option<&str>) -> Image {
        Image::with(name, original, &[])
    }

    /// An image holding `bytes` (a kernel, an initrd) rather than a sparse 1 MiB.
    fn with(name: &str, original: Option<&str>, bytes: &[u8]) -> Image {
        let p = Path::new(IMAGES).join(format!("{}.img", unique(name)));
        let mut f = std::fs::File::create(&p)
            .unwrap_or_else(|e| panic!("{}: {e} (tests/setup.sh makes {IMAGES})", p.display()));
        if bytes.is_empty() {
            f.set_len(1 << 20).unwrap();
        } else {
            std::io::Write::write_all(&mut f, bytes).unwrap();
        }
        if let Some(o) = original {
            set_label(&p, o);
        }
        Image(p)
    }

    fn label(&self) -> Option<String> {
        xattr(&self.0, "security.selinux")
    }

    fn refs(&self) -> Option<String> {
        xattr(&self.0, "trusted.cellvm.ref")
    }

    /// Its original label is back and cellvm left nothing on it.
    fn assert_restored(&self, original: Option<&str>) {
        assert_eq!(self.label().as_deref(), original, "{}", self.0.display());
        assert_eq!(self.refs(), None, "{}", self.0.display());
        assert_eq!(xattr(&self.0, "trusted.cellvm.selinux"), None);
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A held VM (the built-in guest, `hold=60`) with these disks: (image, readonly).
fn start(id: &str, disks: &[(&Image, bool)]) -> HeldVm {
    start_with(id, disks, "")
}

/// As `start`, with more lines of VM spec (`extra`).
fn start_with(id: &str, disks: &[(&Image, bool)], extra: &str) -> HeldVm {
    let dir = std::env::temp_dir().join(format!("cellvm-labels-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let disks: Vec<String> = disks
        .iter()
        .map(|(img, ro)| format!("{{ path = \"{}\", readonly = {ro} }}", img.0.display()))
        .collect();
    let vm = dir.join("vm.toml");
    std::fs::write(
        &vm,
        format!(
            "name = \"hold\"\nvcpus = 1\nmemory_mib = 64\ncmdline = \"tests=serial hold=60\"\ndisks = [{}]\n{extra}",
            disks.join(", ")
        ),
    )
    .unwrap();
    HeldVm::launch(id, &repo("policy/tenants/example.toml"), &vm)
}

fn gc() {
    let mut c = Command::new(bin("cellvm-jailer"));
    c.arg("gc");
    let out = common::run(c, LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

fn record(id: &str) -> PathBuf {
    PathBuf::from(format!("/run/cellvm/labels/{id}"))
}

#[test]
fn a_running_vms_writable_disk_has_its_pair_and_a_read_only_one_none_until_it_ends() {
    let _turn = common::launch_turn();
    let rw = Image::new("rw", Some(ORIGINAL));
    let ro = Image::new("ro", None);
    let id = unique("run");
    let mut vm = start(&id, &[(&rw, false), (&ro, true)]);
    let pair = vm.pair();
    assert_eq!(
        rw.label(),
        Some(format!("system_u:object_r:cellvm_image_t:s0:{pair}"))
    );
    assert_eq!(ro.label().as_deref(), Some(SHARED));
    for img in [&rw, &ro] {
        assert_eq!(img.refs().as_deref(), Some("1"));
    }
    // The original is remembered on the file itself (empty: it had no label).
    assert_eq!(
        xattr(&rw.0, "trusted.cellvm.selinux").as_deref(),
        Some(ORIGINAL)
    );
    assert_eq!(xattr(&ro.0, "trusted.cellvm.selinux").as_deref(), Some(""));
    // What the VM labelled is recorded, root-only.
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(record(&id)).expect("the VM's label record");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(record(&id))
            .unwrap()
            .lines()
            .count(),
        2
    );

    vm.end();
    rw.assert_restored(Some(ORIGINAL));
    ro.assert_restored(None);
    assert!(!record(&id).exists(), "the record outlived the VM");
}

#[test]
fn gc_restores_the_labels_of_a_vm_whose_supervisor_was_killed() {
    let _turn = common::launch_turn();
    let rw = Image::new("orphan", Some(ORIGINAL));
    let id = unique("orphan");
    let mut vm = start(&id, &[(&rw, false)]);
    let pair = vm.pair();
    vm.kill_supervisor();
    // Nothing restored them: the labels are still the VM's ...
    assert_eq!(
        rw.label(),
        Some(format!("system_u:object_r:cellvm_image_t:s0:{pair}"))
    );
    assert!(record(&id).exists());
    // ... until gc reclaims the cell.
    gc();
    rw.assert_restored(Some(ORIGINAL));
    assert!(!record(&id).exists());
}

#[test]
fn a_read_only_image_two_vms_share_is_restored_only_when_the_second_ends() {
    let _turn = common::launch_turn();
    let shared = Image::new("shared", Some(ORIGINAL));
    let mut a = start(&unique("share-a"), &[(&shared, true)]);
    let mut b = start(&unique("share-b"), &[(&shared, true)]);
    assert_eq!(shared.label().as_deref(), Some(SHARED));
    assert_eq!(shared.refs().as_deref(), Some("2"));
    a.end();
    assert_eq!(
        shared.label().as_deref(),
        Some(SHARED),
        "the first VM to end restored the image under the second"
    );
    assert_eq!(shared.refs().as_deref(), Some("1"));
    b.end();
    shared.assert_restored(Some(ORIGINAL));
}

#[test]
fn a_kernel_and_initrd_are_shared_content_while_the_vm_runs_and_restored_after() {
    let _turn = common::launch_turn();
    // A PVH kernel that spins (`jmp $`): the VM runs until it is ended.
    let kernel = Image::with("kernel", Some(ORIGINAL), &common::pvh_elf(&[0xeb, 0xfe]));
    let initrd = Image::with("initrd", None, b"initrd");
    let id = unique("kernel");
    let extra = format!(
        "kernel = \"{}\"\ninitrd = \"{}\"\n",
        kernel.0.display(),
        initrd.0.display()
    );
    let mut vm = start_with(&id, &[], &extra);
    for f in [&kernel, &initrd] {
        assert_eq!(
            f.label().as_deref(),
            Some("system_u:object_r:cellvm_content_t:s0"),
            "{}",
            f.0.display()
        );
        assert_eq!(f.refs().as_deref(), Some("1"));
    }
    vm.end();
    kernel.assert_restored(Some(ORIGINAL));
    initrd.assert_restored(None);
}
