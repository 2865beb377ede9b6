//! cellvm-jailer's parts, one module per layer (the binary in main.rs drives them).
//! A library so that fuzz targets and tests reach the parsers directly.

pub mod cell;
pub mod cgroup;
pub mod chain;
pub mod console;
pub mod gc;
pub mod identity;
pub mod landlock;
pub mod launch;
pub mod mcs;
pub mod namespaces;
pub mod paths;
pub mod policy;
pub mod registry;
pub mod restart;
pub mod rundir;
pub mod selinux;
pub mod supervise;
pub mod tap;

/// Entry points for the fuzz targets (fuzz/fuzz_targets/tenant_policy.rs, mcs_label.rs,
/// qcow2_header.rs),
/// replayed by `cargo test` like the VMM's. Behind the `fuzzing` feature: never in the
/// shipped jailer.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use crate::mcs::McsPair;
    use crate::policy::{check, TenantPolicy, VmSpec};

    /// Arbitrary text as a tenant policy and as a VM spec (the input split at the first
    /// NUL byte), then everything the root jailer does with them before it changes any
    /// host state: the policy's own check, the spec's check against it, and the whole
    /// plan (every file opened) for policies whose directories lie in [`SANDBOX`].
    /// Refusals are fine if they are one clean line; a panic, a refusal carrying control
    /// bytes, or a spec or plan that passes while holding more than the policy allows, is
    /// a bug.
    pub fn tenant_policy(data: &[u8]) {
        let mut parts = data.splitn(2, |b| *b == 0);
        let (Ok(p), Ok(v)) = (
            std::str::from_utf8(parts.next().unwrap_or(&[])),
            std::str::from_utf8(parts.next().unwrap_or(&[])),
        ) else {
            return;
        };
        let policy = match TenantPolicy::parse(p) {
            Ok(policy) => policy,
            Err(e) => return assert_clean(&e.to_string()),
        };
        let spec = match VmSpec::parse(v) {
            Ok(spec) => spec,
            Err(e) => return assert_clean(&e.to_string()),
        };
        match check(&policy, &spec) {
            Err(e) => return assert_clean(&e.to_string()),
            Ok(()) => assert_within(&policy, &spec),
        }
        plan_in_sandbox(policy, spec);
    }

    /// Where the files the fuzzer's specs name live: kernels, good and bad disks, a
    /// FIFO, a directory, links out, a block node. Made once, the same every run, so the
    /// corpus can name them.
    pub const SANDBOX: &str = "/tmp/cellvm-fuzz-plan";

    /// One user of the sandbox at a time: a plan locks the disks it opens as a VM
    /// would, and a chain check running beside it in another thread (the tests, the
    /// corpus replay) would find them held by "another VM".
    fn sandbox_turn() -> std::sync::MutexGuard<'static, ()> {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        TURN.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sandbox() -> &'static Path {
        static MADE: OnceLock<PathBuf> = OnceLock::new();
        MADE.get_or_init(|| {
            let root = PathBuf::from(SANDBOX);
            let images = root.join("images");
            let _ = std::fs::create_dir_all(images.join("dir"));
            let _ = std::fs::create_dir_all(root.join("outside"));
            let file = |name: &str, len: u64, mode: u32| {
                let p = root.join(name);
                if !p.exists() {
                    let f = File::create(&p).expect("sandbox file");
                    f.set_len(len).expect("sandbox file size");
                }
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
            };
            file("images/kernel", 4096, 0o644);
            file("images/disk0.img", 1 << 20, 0o600);
            file("images/disk1.img", 2 << 20, 0o600);
            file("images/ro.img", 1 << 20, 0o444);
            file("images/dir/inner.img", 1 << 20, 0o600);
            file("images/linked.img", 1 << 20, 0o600);
            file("outside/secret.img", 1 << 20, 0o600);
            let _ = std::fs::hard_link(images.join("linked.img"), images.join("linked2.img"));
            let _ = std::os::unix::fs::symlink("/etc/passwd", images.join("escape"));
            let _ = std::os::unix::fs::symlink("../outside/secret.img", images.join("up.img"));
            let cstr = |p: PathBuf| std::ffi::CString::new(p.into_os_string().into_vec()).unwrap();
            // SAFETY: mkfifo and mknod on NUL-terminated paths we own; failures (they
            // exist, or no privilege) leave the entry missing, which the planner refuses.
            unsafe {
                libc::mkfifo(cstr(images.join("fifo")).as_ptr(), 0o600);
                libc::mknod(
                    cstr(images.join("blk0")).as_ptr(),
                    libc::S_IFBLK | 0o600,
                    libc::makedev(7, 250),
                );
            }
            // The smallest static ELF the binary check accepts, as the VMM and device.
            let mut elf = vec![0u8; 64 + 56];
            elf[..4].copy_from_slice(b"\x7fELF");
            elf[4] = 2; // 64-bit
            elf[5] = 1; // little-endian
            elf[6] = 1;
            elf[16] = 2; // ET_EXEC
            elf[18] = 62; // x86-64
            elf[20] = 1;
            elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
            elf[52] = 64; // e_ehsize
            elf[54] = 56; // e_phentsize
            elf[56] = 1; // e_phnum
            elf[64] = 1; // PT_LOAD
            let _ = std::fs::write(root.join("vmm"), &elf);
            let _ =
                std::fs::set_permissions(root.join("vmm"), std::fs::Permissions::from_mode(0o755));
            root
        })
    }

    /// Whether every directory and block-device grant of the policy lies in the sandbox
    /// (lexically: no `..`), so that the fuzzer never opens the host's own files.
    fn confined(policy: &TenantPolicy) -> bool {
        let inside = |p: &Path| {
            p.starts_with(SANDBOX)
                && p.components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir))
        };
        policy.image_dirs.iter().all(|d| inside(d))
            && policy.block_devices.iter().all(|b| inside(Path::new(b)))
    }

    /// The rest of the root path on an accepted spec: `launch::plan_for` opens every file
    /// (never blocking, never a non-regular file, never outside the directories, locked,
    /// bounded). A refusal is one clean line; an accepted plan holds nothing the policy
    /// does not grant, checked on the descriptors themselves.
    fn plan_in_sandbox(policy: TenantPolicy, spec: VmSpec) {
        let _turn = sandbox_turn();
        let root = sandbox();
        if !confined(&policy) {
            return;
        }
        let opts = sandbox_options(root);
        let (policy_copy, spec_copy) = (policy.clone(), spec.clone());
        match crate::launch::plan_for(policy, spec, &opts) {
            Err(f) => assert_clean(&f.message),
            Ok(plan) => assert_plan_within(&policy_copy, &spec_copy, &plan),
        }
    }

    fn sandbox_options(root: &Path) -> crate::launch::Options {
        crate::launch::Options {
            policy: PathBuf::new(),
            vm: PathBuf::new(),
            id: Some("fuzz".into()),
            vmm: root.join("vmm"),
            device: root.join("vmm"),
            virtiofsd: root.join("vmm"),
            run_dir: root.join("run"),
            probe: None,
            probe_binary: None,
            probe_in: "vmm".into(),
            probe_path: None,
            detach: false,
            restore: None,
            paused: false,
            seccomp: "kill".into(),
            without: Vec::new(),
        }
    }

    fn assert_plan_within(policy: &TenantPolicy, spec: &VmSpec, plan: &crate::launch::Plan) {
        use crate::launch::Device;
        let dirs: Vec<PathBuf> = policy
            .image_dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect();
        let opened = |f: &File| -> (PathBuf, std::fs::Metadata, i32) {
            let path = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
                .expect("an open descriptor has a path");
            // SAFETY: F_GETFL on a descriptor we hold.
            let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
            (path, f.metadata().expect("fstat"), flags & libc::O_ACCMODE)
        };
        for f in plan.kernel.iter().chain(plan.initrd.iter()) {
            let (path, meta, mode) = opened(f);
            assert!(
                meta.file_type().is_file(),
                "kernel/initrd {path:?} is not a file"
            );
            assert!(
                dirs.iter().any(|d| path.starts_with(d)),
                "{path:?} outside {dirs:?}"
            );
            assert_eq!(mode, libc::O_RDONLY, "{path:?} opened for writing");
        }
        let expected = spec.device_count();
        assert_eq!(plan.devices.len(), expected);
        let mut writable: Vec<(u64, u64)> = Vec::new();
        let mut all: Vec<(u64, u64)> = Vec::new();
        let mut total: u64 = 0;
        let disks = plan.devices.iter().filter_map(|d| match d {
            Device::Blk {
                image,
                readonly,
                format,
                backing,
                ..
            } => Some((image, *readonly, *format, backing)),
            _ => None,
        });
        for ((image, readonly, format, backing), d) in disks.zip(&spec.disks) {
            let (path, meta, mode) = opened(image);
            assert_eq!(format, d.format.block(), "{path:?}: format");
            // The header agrees with the format; a qcow2 disk's size is its virtual size.
            let head = crate::chain::read_head(image, meta.len()).expect("pread");
            assert_eq!(block::header::detect(&head), format, "{path:?}: magic");
            let size = match format {
                block::header::Format::Raw => meta.len(),
                block::header::Format::Qcow2 => {
                    let h = block::header::parse(&head).expect("an accepted header parses");
                    assert_eq!(
                        h.refusal(!readonly),
                        None,
                        "{path:?}: served though refused"
                    );
                    h.size
                }
            };
            assert!(backing.len() <= policy.max_chain_depth as usize);
            for l in backing {
                let (lpath, lmeta, lmode) = opened(&l.file);
                assert!(lmeta.file_type().is_file(), "{lpath:?}: not a file");
                assert_eq!(lmode, libc::O_RDONLY, "{lpath:?}: a backing layer writable");
                assert!(
                    dirs.iter().any(|dir| lpath.starts_with(dir)),
                    "{lpath:?} outside {dirs:?}"
                );
                assert!(!writable.contains(&(lmeta.dev(), lmeta.ino())));
            }
            assert_eq!(readonly, d.readonly);
            assert_eq!(mode == libc::O_RDONLY, readonly, "{path:?}: access mode");
            let block = meta.file_type().is_block_device();
            assert!(
                meta.file_type().is_file() || block,
                "{path:?}: not a file or block device"
            );
            if block {
                let shown = path.to_string_lossy();
                assert!(crate::policy::block_device_granted(
                    &policy.block_devices,
                    Path::new(&*shown)
                ));
            } else {
                assert!(
                    dirs.iter().any(|dir| path.starts_with(dir)),
                    "{path:?} outside {dirs:?}"
                );
            }
            let id = (meta.dev(), meta.ino());
            if !readonly {
                assert!(
                    block || meta.nlink() == 1,
                    "{path:?}: writable with {} links",
                    meta.nlink()
                );
                assert!(!all.contains(&id), "{path:?}: a writable image shared");
                writable.push(id);
                total = total.saturating_add(size);
            } else {
                assert!(!writable.contains(&id), "{path:?}: a writable image shared");
            }
            all.push(id);
            assert!(policy.max_disk_bytes.is_none_or(|m| size <= m));
        }
        assert!(policy.max_total_disk_bytes.is_none_or(|m| total <= m));
    }

    /// A refusal is printed to the operator: one line, no control bytes.
    fn assert_clean(message: &str) {
        assert!(
            !message.chars().any(char::is_control),
            "control bytes in {message:?}"
        );
    }

    /// What an accepted spec may have: nothing outside the policy.
    fn assert_within(policy: &TenantPolicy, spec: &VmSpec) {
        use crate::paths::allowed_dir;
        use crate::policy::{block_device_granted, valid_ifname, valid_mac};
        assert!(spec.vcpus >= 1 && spec.vcpus <= policy.max_vcpus);
        assert!(spec.memory_mib <= policy.max_memory_mib);
        assert!(spec.cmdline.len() <= crate::policy::CMDLINE_MAX);
        assert!(spec.cmdline.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        assert!(!spec.hugepages || policy.hugepages && spec.memory_mib.is_multiple_of(2));
        assert!(!spec.ksm || policy.ksm);
        assert!(!spec.mlock || policy.mlock);
        assert!(spec
            .memory_file
            .iter()
            .all(|p| allowed_dir(&policy.memory_dirs, p).is_some()));
        assert!(!spec.rng || policy.rng);
        assert!(spec.vsock_cid.is_none() || policy.vsock);
        assert!(!spec.has_virtio_console() || policy.virtio_console);
        assert!(spec
            .nets
            .iter()
            .all(|n| n.queues >= 1 && n.queues as u32 <= spec.vcpus.min(8)));
        assert!(spec.console_ports.len() <= crate::policy::MAX_CONSOLE_PORTS);
        assert!(spec
            .console_ports
            .iter()
            .all(|n| crate::policy::console_port_name(n)));
        for path in spec.kernel.iter().chain(spec.initrd.iter()) {
            assert!(allowed_dir(&policy.image_dirs, path).is_some());
        }
        assert!(spec.disks.len() <= policy.max_disks as usize);
        assert!(spec.device_count() <= crate::policy::MAX_PCI_DEVICES);
        for d in &spec.disks {
            assert!(
                allowed_dir(&policy.image_dirs, &d.path).is_some()
                    || block_device_granted(&policy.block_devices, &d.path)
            );
            assert!((1..=crate::policy::MAX_DISK_QUEUES).contains(&d.queues));
        }
        for (i, n) in spec.nets.iter().enumerate() {
            assert!(valid_ifname(&n.tap));
            assert!(policy.taps.iter().any(|t| match t.strip_suffix('*') {
                Some(prefix) => n.tap.starts_with(prefix),
                None => *t == n.tap,
            }));
            assert!(
                spec.nets[..i].iter().all(|o| o.tap != n.tap),
                "duplicate tap"
            );
            assert!(n.mac.as_deref().is_none_or(valid_mac));
        }
    }

    /// What the planner made of a corpus input: None where it never reached the
    /// planner (unparsable, refused by the check, or outside the sandbox).
    pub fn plan_outcome(data: &[u8]) -> Option<Result<(), String>> {
        let mut parts = data.splitn(2, |b| *b == 0);
        let policy = TenantPolicy::parse(std::str::from_utf8(parts.next()?).ok()?).ok()?;
        let spec = VmSpec::parse(std::str::from_utf8(parts.next()?).ok()?).ok()?;
        check(&policy, &spec).ok()?;
        if !confined(&policy) {
            return None;
        }
        let _turn = sandbox_turn();
        let root = sandbox();
        let opts = sandbox_options(root);
        Some(
            crate::launch::plan_for(policy, spec, &opts)
                .map(drop)
                .map_err(|f| f.message),
        )
    }

    /// Arbitrary bytes as the head of a tenant's qcow2 image: the header parse, the
    /// refusal (read-only and writable), the file-size bounds, and the chain check the
    /// jailer runs on it (`chain::resolve`, on a memfd holding the bytes, placed in the
    /// sandbox's image directory so its backing names resolve among the sandbox's files
    /// and never outside it). Nothing may panic; a refusal is one clean line; an accepted
    /// image's chain holds only read-only regular files beneath the directory.
    pub fn qcow2_header(data: &[u8]) {
        use block::header::{self, Format};
        let data = &data[..data.len().min(header::HEADER_READ_MAX)];
        let parsed = header::parse(data);
        match &parsed {
            Err(e) => assert_clean(&e.to_string()),
            Ok(h) => {
                assert_eq!(header::detect(data), Format::Qcow2);
                assert!((9..=21).contains(&h.cluster_bits) && h.refcount_order <= 6);
                assert!(h.size <= i64::MAX as u64);
                if let Some(b) = &h.backing {
                    assert!(!b.name.is_empty() && b.name.len() <= 1023);
                }
                for writable in [false, true] {
                    if let Some(why) = h.refusal(writable) {
                        assert_clean(&why);
                    }
                }
                assert!(h.refusal(false).is_none() || h.refusal(true).is_some());
                let (max, growth) = (h.max_file_bytes(), h.max_growth_bytes());
                assert!(
                    max >= h.size && growth >= h.size,
                    "{max} {growth} {}",
                    h.size
                );
            }
        }
        let _turn = sandbox_turn();
        let Some((policy, top, at)) = qcow2_sandbox(data) else {
            return;
        };
        let images = at.dir.clone();
        let canonical = std::fs::canonicalize(&images).unwrap_or(images);
        for (claimed, writable) in [
            (Format::Qcow2, false),
            (Format::Qcow2, true),
            (Format::Raw, false),
        ] {
            match crate::chain::resolve(
                &policy,
                claimed,
                &top,
                Some(&at),
                writable,
                false,
                Path::new("top"),
            ) {
                Err(e) => assert_clean(&e.to_string()),
                Ok(disk) => {
                    assert_eq!(header::detect(data), claimed);
                    assert!(disk.backing.len() <= 3);
                    assert_eq!(disk.fsize.is_some(), writable && claimed == Format::Qcow2);
                    if claimed == Format::Qcow2 {
                        let Ok(h) = &parsed else {
                            panic!("an unparsable header was accepted");
                        };
                        assert_eq!(h.refusal(writable), None);
                        assert_eq!(disk.virtual_size, h.size);
                    }
                    for l in &disk.backing {
                        let path =
                            std::fs::read_link(format!("/proc/self/fd/{}", l.file.as_raw_fd()))
                                .expect("an open descriptor has a path");
                        assert!(path.starts_with(&canonical), "{path:?} outside the sandbox");
                        assert!(l.file.metadata().is_ok_and(|m| m.file_type().is_file()));
                        // SAFETY: F_GETFL on a descriptor we hold.
                        let mode = unsafe { libc::fcntl(l.file.as_raw_fd(), libc::F_GETFL) };
                        assert_eq!(mode & libc::O_ACCMODE, libc::O_RDONLY);
                    }
                }
            }
        }
    }

    /// The fuzz policy (the sandbox's image directory, qcow2 allowed, depth 3), the bytes
    /// in a memfd as the top, and where the top pretends to lie: `images/dir/top.qcow2`.
    fn qcow2_sandbox(
        data: &[u8],
    ) -> Option<(TenantPolicy, crate::paths::Image, crate::paths::Beneath)> {
        let root = sandbox();
        let images = root.join("images");
        let Ok(policy) = TenantPolicy::parse(&format!(
            "name = \"fuzz\"\nmax_vcpus = 1\nmax_memory_mib = 64\nimage_dirs = [\"{}\"]\n\
             uid_range = [300000, 300009]\nmcs_categories = [10, 20]\n\
             disk_formats = [\"raw\", \"qcow2\"]\nmax_chain_depth = 3\n\
             max_disk_bytes = 1073741824\n\
             [cgroup]\ncpu_percent = 100\nmemory_overhead_mib = 64\npids_max = 32\n",
            images.display()
        )) else {
            panic!("the fuzz policy parses");
        };
        // SAFETY: memfd_create with a NUL-terminated name; the fd is checked and owned.
        let fd = unsafe { libc::memfd_create(c"qcow2-header".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor, owned from here on.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        if std::io::Write::write_all(&mut &file, data).is_err() {
            return None;
        }
        let Ok(meta) = file.metadata() else {
            return None;
        };
        let top = crate::paths::Image {
            file,
            size: meta.len(),
            id: (meta.dev(), meta.ino()),
            block_device: false,
        };
        let at = crate::paths::Beneath {
            dir: images.clone(),
            rel: PathBuf::from("dir/top.qcow2"),
        };
        Some((policy, top, at))
    }

    /// What the jailer's chain check makes of the bytes as a read-only qcow2 disk in the
    /// sandbox: the number of backing layers, or the refusal.
    pub fn qcow2_outcome(data: &[u8]) -> Result<usize, String> {
        let _turn = sandbox_turn();
        let (policy, top, at) = qcow2_sandbox(data).ok_or("no memfd")?;
        crate::chain::resolve(
            &policy,
            block::header::Format::Qcow2,
            &top,
            Some(&at),
            false,
            false,
            Path::new("top"),
        )
        .map(|d| d.backing.len())
        .map_err(|e| e.to_string())
    }

    /// MCS pair parsing: whatever parses prints back to the same text and labels.
    pub fn mcs_label(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(pair) = text.parse::<McsPair>() {
            assert_eq!(pair.to_string().parse::<McsPair>(), Ok(pair));
            assert!(pair.process_label().ends_with(&pair.to_string()));
        }
        if let [a, b] = data {
            let n = McsPair::all_in(*a as u16, *b as u16).take(300).count();
            assert!(n <= 300);
        }
    }

    #[cfg(test)]
    mod tests {
        /// The qcow2_header seeds (heads of images qemu-img made) reach the chain check,
        /// which serves the good ones and refuses each hostile one for its own reason.
        #[test]
        fn the_qcow2_corpus_drives_the_chain_check_to_each_outcome() {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/corpus/qcow2_header");
            let expect: [(&str, Result<usize, &str>); 9] = [
                ("plain", Ok(0)),
                ("v2", Ok(0)),
                ("bm", Ok(0)),
                ("over-inner", Ok(1)),
                ("over-escape", Err("escapes")),
                (
                    "over-absolute",
                    Err("not inside any of the allowed directories"),
                ),
                ("over-mismatch", Err("is named as qcow2 but is raw")),
                ("luks", Err("crypt_method = 2 (LUKS)")),
                ("short", Err("bytes needed")),
            ];
            for (name, want) in expect {
                let data = std::fs::read(dir.join(name)).unwrap();
                let got = super::qcow2_outcome(&data);
                match (want, &got) {
                    (Ok(n), Ok(m)) if n == *m => {}
                    (Err(why), Err(m)) if m.contains(why) => {}
                    _ => panic!("{name}: expected {want:?}, got {got:?}"),
                }
                super::qcow2_header(&data);
            }
        }

        /// The corpus's plan-* inputs reach the planner, which accepts the good one and
        /// refuses each hostile one for its own reason: the target drives the file
        /// opening, not just the check.
        #[test]
        fn the_corpus_drives_the_planner_to_each_outcome() {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/corpus/tenant_policy");
            let expect = [
                ("plan-good", None),
                ("plan-fifo-kernel", Some("fifo")),
                ("plan-symlink-out", Some("escape")),
                ("plan-hard-link", Some("link")),
                ("plan-same-twice", Some("the same image as disks[0]")),
                ("plan-dir-and-block", Some("dir")),
                ("plan-over-size", Some("max_total_disk_bytes")),
            ];
            for (name, refusal) in expect {
                let data = std::fs::read(dir.join(name)).unwrap();
                let outcome = super::plan_outcome(&data)
                    .unwrap_or_else(|| panic!("{name}: never reached the planner"));
                match (refusal, outcome) {
                    (None, Ok(())) => {}
                    (Some(why), Err(m)) => assert!(m.contains(why), "{name}: {m}"),
                    (r, o) => panic!("{name}: expected {r:?}, got {o:?}"),
                }
                super::tenant_policy(&data);
            }
        }
    }
}
