//! Virtio devices end to end: the test guest's CPL 3 driver against cellvm's virtio-pci
//! transport and vhost-user backends, and against real peers on either side:
//! qemu-storage-daemon as the backend behind cellvm, and QEMU as the frontend in front
//! of cellvm's backend. Every block test checks the image file afterwards.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{cellvm, run, scratch_dir, wait_for, Daemon};

/// The image the guest's `blk` check expects: 1 MiB, byte `o` of the first 64 sectors
/// is `pattern(o)` (the same function as tests/guest/devices.rs).
fn pattern(o: usize) -> u8 {
    ((o / 512) as u8).wrapping_mul(31) ^ (o as u8)
}

fn make_image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    let mut b = vec![0u8; 1 << 20];
    for (o, x) in b.iter_mut().enumerate().take(64 * 512) {
        *x = pattern(o);
    }
    std::fs::write(&path, b).unwrap();
    path
}

/// What the guest's `blk` check leaves in the image: sectors 16..24 written with
/// 0xa5 ^ i, 32..48 discarded or zeroed, everything else untouched.
fn assert_image_after_blk(path: &Path) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(b.len(), 1 << 20, "the image kept its size");
    for (o, got) in b.iter().enumerate().take(64 * 512) {
        let want = match o / 512 {
            16..=23 => 0xa5 ^ (o - 16 * 512) as u8,
            32..=47 => 0,
            _ => pattern(o),
        };
        assert_eq!(*got, want, "image byte {o} (sector {})", o / 512);
    }
}

fn vm(args: &[&str]) -> common::Outcome {
    let mut cmd = cellvm();
    cmd.arg("run").args(args);
    run(cmd, Duration::from_secs(60))
}

#[test]
fn our_backends_pass_every_device_check_and_the_image_holds_what_the_guest_wrote() {
    let dir = scratch_dir("virtio-ours");
    let img = make_image(&dir);
    let disk = format!("path={},queues=2", img.display());
    let out = vm(&[
        "--cpus",
        "2",
        "--disk",
        &disk,
        "--rng",
        "--cmdline",
        "tests=pci,virtio,blk,blkbad,msix,intx,rng",
    ]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out
        .passed("pci")
        .contains("01.0 1af4:1042 class 018000 02.0 1af4:1044"));
    let virtio = out.passed("virtio");
    assert!(virtio.contains("functions=2"), "{virtio}");
    assert!(virtio.contains("refuses_unoffered=true refuses_legacy=true accepts=true"));
    let blk = out.passed("blk");
    assert!(
        blk.contains("capacity=2048") && blk.contains("id=\"cellvm-disk0\""),
        "{blk}"
    );
    assert!(out
        .passed("blkbad")
        .contains("used=Some(0) status=0xee; next request: used=Some(513) status=0"));
    let msix = out.passed("msix");
    assert!(
        msix.contains("irr=true")
            && msix.contains("seen_here=false")
            && msix.contains("pba=true irr_after_unmask=true"),
        "{msix}"
    );
    assert!(out
        .passed("intx")
        .contains("INTA -> IOAPIC pin 16 -> vector 0x61: status=0 irr=true isr=0x1 then 0x0"));
    out.passed("rng");
    assert!(
        out.stderr.contains("request dropped: OutsideRam"),
        "the hostile request is logged: {}",
        out.stderr
    );
    assert_image_after_blk(&img);
}

#[test]
fn two_runs_of_the_rng_see_different_bytes() {
    let fnv = || {
        let out = vm(&["--rng", "--cmdline", "tests=rng"]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        out.passed("rng")
            .split("fnv1a=")
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_ne!(fnv(), fnv());
}

#[test]
fn a_readonly_disk_refuses_writes_and_the_image_is_untouched() {
    let dir = scratch_dir("virtio-ro");
    let img = make_image(&dir);
    let before = std::fs::read(&img).unwrap();
    let disk = format!("path={},readonly=on", img.display());
    let out = vm(&["--disk", &disk, "--cmdline", "tests=blk"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let line = out
        .test_lines()
        .into_iter()
        .find(|l| l.starts_with("TEST blk "))
        .unwrap()
        .to_string();
    assert!(
        line.starts_with("TEST blk FAIL") && line.contains("read=true write=false"),
        "{line}"
    );
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

/// `cellvm run ARGS` exits 2 with `expect` in its error, before the guest runs.
fn assert_refused_before_running(args: &[&str], expect: &str) {
    let mut a = args.to_vec();
    a.extend(["--cmdline", "tests=none"]);
    let out = vm(&a);
    assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
    assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
    assert!(out.stdout.is_empty(), "{args:?} ran the guest");
}

#[test]
fn bad_disk_and_rng_arguments_are_refused_before_anything_runs() {
    for (args, expect) in [
        (
            vec!["--disk", "path=/nonexistent/disk.img"],
            "disk /nonexistent/disk.img: No such file",
        ),
        (
            vec!["--disk", "socket=/nonexistent/sock"],
            "backend socket /nonexistent/sock",
        ),
        (
            vec!["--disk", "path=/a,queues=99"],
            "queues=99: expected 1 to 16",
        ),
        (
            vec!["--disk", "fd=200"],
            "backend fd=200: not an open descriptor",
        ),
        (vec!["--rng=maybe"], "expected on, socket=PATH or fd=N"),
    ] {
        assert_refused_before_running(&args, expect);
    }
}

/// `direct=on`: the backend holds the image with O_DIRECT (seen in its fdinfo while the
/// guest holds), and the guest's block checks pass with the file holding what they
/// wrote (unaligned guest buffers go through the backend's aligned bounce buffer).
#[test]
fn a_direct_io_disk_passes_the_block_checks() {
    let dir = scratch_dir("virtio-direct");
    let img = make_image(&dir);
    let disk = format!("path={},direct=on", img.display());
    let mut cmd = cellvm();
    cmd.args([
        "run",
        "--disk",
        &disk,
        "--cmdline",
        "tests=blk,blkbad hold=2",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // The backend is the VMM's child; find the image among its descriptors.
    let start = std::time::Instant::now();
    let flags = loop {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
            .unwrap_or_default();
        let found = children.split_whitespace().find_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .ok()?
                .flatten()
                .find_map(|e| {
                    let target = std::fs::read_link(e.path()).ok()?;
                    if target != img {
                        return None;
                    }
                    let info = std::fs::read_to_string(format!(
                        "/proc/{pid}/fdinfo/{}",
                        e.file_name().to_string_lossy()
                    ))
                    .ok()?;
                    info.lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                })
        });
        if let Some(f) = found {
            break f;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no backend holding the image"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(flags & libc::O_DIRECT as u32, 0, "flags {flags:o}");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in ["blk", "blkbad"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("TEST {check} PASS"))),
            "{stdout}"
        );
    }
    assert_image_after_blk(&img);
}

#[test]
fn net_frames_cross_a_tap_in_a_namespace_the_test_creates() {
    let ns = common::NetNs::new("net");
    let echo = ns.udp_echo(1);
    let sink = ns.tcp_sink(7778);
    let mut cmd = cellvm();
    cmd.args([
        "run",
        "--net",
        &format!("tap={},mac=02:00:0a:4d:00:02", common::TAP),
        "--cmdline",
        "tests=virtio,net",
    ]);
    ns.wrap(&mut cmd);
    let out = run(cmd, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.passed("virtio").contains("type=1 queues=2 vectors=3"));
    let net = out.passed("net");
    // The MAC from the command line reached the guest's config space; ARP and ICMP
    // were answered by the host end of the tap; the UDP datagram whose checksum the
    // device finished reached the responder, and its echo arrived with NEEDS_CSUM
    // (the tap was told the guest accepts unfinished checksums).
    for want in [
        "mac=02:00:0a:4d:00:02 link=1",
        "ping=echoed",
        "udp_csum_offload=true udp=echoed rx_hdr_flags=1",
        "tso=sent",
    ] {
        assert!(net.contains(want), "{want:?} not in {net}");
    }
    let got = echo.join().unwrap();
    assert_eq!(got, vec![b"cellvm-net offload check".to_vec()]);
    // The 3,000 bytes the guest handed the device as one TCP segment (HOST_TSO4,
    // gso_size 1448) reached the host's socket whole and in order.
    let stream = sink.join().unwrap();
    let want: Vec<u8> = (0..3000).map(|i| (i % 251) as u8 ^ 0x3c).collect();
    assert_eq!(stream.len(), 3000, "bytes through TSO");
    assert!(stream == want, "the TSO payload arrived changed");
}

/// Sends, from inside namespace `ns` until `stop` is set, one 64 KiB TCP segment every
/// 100 ms through the tap as a GSO packet (an AF_PACKET socket with PACKET_VNET_HDR):
/// 10.77.0.1:7780 -> 10.77.0.2:40001, gso_size 1448, payload byte i = (i % 253) ^ 0xa7
/// (tests/guest/net.rs, `netgso`). Returns how many sends the kernel took.
fn send_gso_segments(
    ns: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
        // SAFETY: setns of this thread only, on a namespace descriptor we opened.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_IP as u16).to_be() as i32,
            )
        };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let on: libc::c_int = 1;
        // PACKET_VNET_HDR (15): every packet starts with a struct virtio_net_hdr.
        // SAFETY: the option value is a live c_int of the length given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                15,
                (&on as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(
            rc,
            0,
            "PACKET_VNET_HDR: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(common::TAP).unwrap();
        // SAFETY: a NUL-terminated name we own.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0, "no {} in the namespace", common::TAP);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: binds our socket to a sockaddr_ll that lives across the call.
        let rc = unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());

        const PAYLOAD: usize = 65000;
        let mut p = vec![0u8; 10 + 14 + 20 + 20 + PAYLOAD];
        // virtio_net_hdr: NEEDS_CSUM, GSO_TCPV4, hdr_len 54, gso_size 1448,
        // csum_start 34, csum_offset 16.
        p[0] = 1;
        p[1] = 1;
        p[2..4].copy_from_slice(&54u16.to_le_bytes());
        p[4..6].copy_from_slice(&1448u16.to_le_bytes());
        p[6..8].copy_from_slice(&34u16.to_le_bytes());
        p[8..10].copy_from_slice(&16u16.to_le_bytes());
        let e = 10;
        p[e..e + 6].copy_from_slice(&[0x02, 0, 0x0a, 0x4d, 0, 0x02]);
        p[e + 6..e + 12].copy_from_slice(&[0x02, 0, 0x0a, 0x4d, 0, 0x01]);
        p[e + 12..e + 14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = e + 14;
        p[ip] = 0x45;
        p[ip + 2..ip + 4].copy_from_slice(&((40 + PAYLOAD) as u16).to_be_bytes());
        p[ip + 6] = 0x40; // DF
        p[ip + 8] = 64;
        p[ip + 9] = 6;
        p[ip + 12..ip + 16].copy_from_slice(&[10, 77, 0, 1]);
        p[ip + 16..ip + 20].copy_from_slice(&[10, 77, 0, 2]);
        let sum = |b: &[u8], mut acc: u32| {
            for c in b.chunks(2) {
                acc += (c[0] as u32) << 8 | *c.get(1).unwrap_or(&0) as u32;
            }
            while acc > 0xffff {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            acc as u16
        };
        let c = !sum(&p[ip..ip + 20], 0);
        p[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
        let t = ip + 20;
        p[t..t + 2].copy_from_slice(&7780u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&40001u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&1u32.to_be_bytes());
        p[t + 12] = 5 << 4;
        p[t + 13] = 0x18; // PSH, ACK
        p[t + 14..t + 16].copy_from_slice(&65535u16.to_be_bytes());
        for i in 0..PAYLOAD {
            p[t + 20 + i] = (i % 253) as u8 ^ 0xa7;
        }
        // The pseudo-header sum, left for whoever finishes the checksum.
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&[10, 77, 0, 1]);
        pseudo[4..8].copy_from_slice(&[10, 77, 0, 2]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&((20 + PAYLOAD) as u16).to_be_bytes());
        let c = sum(&pseudo, 0);
        p[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        let mut sent = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: send from a buffer we own, of its length.
            let n = unsafe { libc::send(fd, p.as_ptr().cast(), p.len(), 0) };
            if n == p.len() as isize {
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        sent
    })
}

/// VIRTIO_NET_F_MRG_RXBUF and GUEST_TSO4: a 64 KiB TCP segment the host kernel hands the
/// tap whole reaches the guest as one frame spread over several 4 KiB receive buffers,
/// its GSO header and payload intact.
#[test]
fn a_64k_segment_reaches_the_guest_whole_in_mergeable_buffers() {
    let ns = common::NetNs::new("gso");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = send_gso_segments(&ns.name, stop.clone());
    let mut cmd = cellvm();
    cmd.args([
        "run",
        "--net",
        &format!("tap={},mac=02:00:0a:4d:00:02", common::TAP),
        "--cmdline",
        "tests=netgso",
    ]);
    ns.wrap(&mut cmd);
    let out = run(cmd, Duration::from_secs(60));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap();
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(sent > 0, "the kernel took none of the GSO sends");
    let line = out.passed("netgso");
    // 12-byte header + Ethernet + IPv4 + TCP + 65,000 payload bytes = 65,066 bytes:
    // 16 buffers of 4 KiB; gso_type 1 (TCPV4) with the sender's MSS.
    for want in [
        "frame_bytes=65066 buffers=16 chains=16",
        "gso_type=1 gso_size=1448 payload_ok=true",
    ] {
        assert!(line.contains(want), "{want:?} not in {line}");
    }
    let features = line
        .split("features=0x")
        .nth(1)
        .and_then(|f| u64::from_str_radix(f.split(' ').next()?, 16).ok())
        .unwrap();
    assert_ne!(features & (1 << 15), 0, "MRG_RXBUF negotiated: {line}");
    assert_ne!(features & (1 << 7), 0, "GUEST_TSO4 negotiated: {line}");
}

/// VIRTIO_NET_F_MQ: two queue pairs on a multi-queue tap, each served by its own
/// backend thread; the driver sets the pairs on the control queue and each pair's
/// datagram is echoed back on that pair (the tap steers a flow's answer to the queue
/// that sent it).
#[test]
fn two_queue_pairs_carry_their_own_flows_on_a_multi_queue_tap() {
    let ns = common::NetNs::new_multiqueue("netmq");
    let echo = ns.udp_echo(2);
    let mut cmd = cellvm();
    cmd.args([
        "run",
        "--cpus",
        "2",
        "--net",
        &format!("tap={},queues=2", common::TAP),
        "--cmdline",
        "tests=virtio,netmq",
    ]);
    ns.wrap(&mut cmd);
    let out = run(cmd, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    // Two pairs and the control queue.
    assert!(
        out.passed("virtio").contains("type=1 queues=5"),
        "{}",
        out.stdout
    );
    let line = out.passed("netmq");
    assert!(line.contains("max_pairs=2 pairs=2 ack=0"), "{line}");
    assert!(
        line.contains("pair0_echo_on_rx=0 pair1_echo_on_rx=1"),
        "each pair's flow comes back on that pair: {line}"
    );
    let got = echo.join().unwrap();
    assert_eq!(
        got,
        vec![b"cellvm-mq pair 0".to_vec(), b"cellvm-mq pair 1".to_vec()]
    );
    // The same tap opened as one queue is refused by the kernel: a multi-queue tap
    // takes only multi-queue opens, and the error says so.
    let mut cmd = cellvm();
    cmd.args([
        "run",
        "--net",
        &format!("tap={}", common::TAP),
        "--cmdline",
        "tests=none",
    ]);
    ns.wrap(&mut cmd);
    let out = run(cmd, Duration::from_secs(30));
    assert_eq!(out.code, Some(2), "{}", out.stderr);
}

/// The same under the jailer: `nets = [{ tap, queues = 2 }]` makes it open the tap's
/// two queues and hand both to the net backend's cell; more queues than vCPUs are
/// refused.
#[test]
fn a_jailed_vm_gets_two_queue_pairs_on_its_multi_queue_tap() {
    let ns = common::NetNs::new_multiqueue("jailmq");
    let echo = ns.udp_echo(2);
    let dir = common::scratch_dir("netmq-jailed");
    let vm = common::guest_spec(&dir, "mqvm", "tests=netmq");
    let text = std::fs::read_to_string(&vm)
        .unwrap()
        .replace("vcpus = 1", "vcpus = 2");
    std::fs::write(
        &vm,
        format!(
            "{text}nets = [{{ tap = \"{}\", queues = 2 }}]\n",
            common::TAP
        ),
    )
    .unwrap();
    let policy = common::test_policy(&ns.name);
    let id = format!("netmq{}", std::process::id());
    let mut cmd = common::jailer_command(&id, &policy, &vm);
    cmd.stdin(std::process::Stdio::null());
    let out = run(cmd, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let line = out.passed("netmq");
    assert!(line.contains("max_pairs=2 pairs=2 ack=0"), "{line}");
    assert!(
        line.contains("pair0_echo_on_rx=0 pair1_echo_on_rx=1"),
        "{line}"
    );
    assert_eq!(echo.join().unwrap().len(), 2);
    // Three pairs for two vCPUs: refused before anything is built.
    std::fs::write(
        &vm,
        format!(
            "{text}nets = [{{ tap = \"{}\", queues = 3 }}]\n",
            common::TAP
        ),
    )
    .unwrap();
    let mut cmd = common::jailer_command(&format!("{id}x"), &policy, &vm);
    cmd.stdin(std::process::Stdio::null());
    let out = run(cmd, Duration::from_secs(30));
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("nets[0].queues = 3 violates 1 to 2"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_net_arguments_are_refused_before_anything_runs() {
    for (args, expect) in [
        (vec!["--net", "tap="], "1 to 15 bytes"),
        (
            vec!["--net", "tap=x,mac=01:00:5e:00:00:01"],
            "not a unicast",
        ),
        (
            vec!["--net", "fd=200"],
            "backend fd=200: not an open descriptor",
        ),
        // An existing interface that is not a tap.
        (vec!["--net", "tap=lo"], "net lo: tap lo: Invalid argument"),
        (vec!["--net", "tap=x,queues=9"], "queues=9: expected 1 to 8"),
        (vec!["--net", "tap=x,queues=0"], "queues=0: expected 1 to 8"),
    ] {
        assert_refused_before_running(&args, expect);
    }
    // The backends' program alone refuses what it cannot serve, with status 2.
    for (args, expect) in [
        (
            &["net", "--socket", "/nonexistent/s", "--tap-fd", "0"][..],
            "tap: not an attached tap",
        ),
        (
            &["net", "--socket", "/s", "--tap", "x", "--tap-fd", "5"][..],
            "give exactly one of --tap and --tap-fd",
        ),
        (
            &[
                "net",
                "--socket",
                "/s",
                "--tap",
                "x",
                "--mac",
                "ff:ff:ff:ff:ff:ff",
            ][..],
            "not a unicast address",
        ),
        (
            &["blk", "--socket", "/s", "--image", "/nonexistent/img"][..],
            "/nonexistent/img: No such file",
        ),
        (
            &["blk", "--socket", "/s", "--image", "/i", "--queues", "0"][..],
            "--queues 0: expected 1 to 16",
        ),
        (
            &["blk", "--socket", "/s", "--image", "/i", "--bogus"][..],
            "unknown option --bogus",
        ),
        (&["rng"][..], "give exactly one of --socket and --listen-fd"),
        (
            &["rng", "--socket", "/s", "--seccomp", "maybe"][..],
            "--seccomp maybe: expected kill, log or off",
        ),
        (&["gpu", "--socket", "/s"][..], "unknown device \"gpu\""),
    ] {
        let mut c = common::cellvm_device();
        c.args(args).stdin(Stdio::null());
        let out = run(c, Duration::from_secs(10));
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
    }
}

fn storage_daemon(img: &Path, sock: &Path) -> Daemon {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f0,filename={},discard=unmap", img.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-storage-daemon (tests/setup.sh installs it)");
    wait_for(sock);
    Daemon(child)
}

#[test]
fn qemu_storage_daemon_behind_cellvm_passes_the_same_checks() {
    let dir = scratch_dir("virtio-qsd");
    let img = make_image(&dir);
    let sock = dir.join("qsd.sock");
    let _qsd = storage_daemon(&img, &sock);
    let disk = format!("socket={},queues=2", sock.display());
    let out = vm(&[
        "--cpus",
        "2",
        "--disk",
        &disk,
        "--cmdline",
        "tests=virtio,blk,msix,intx",
    ]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    out.passed("virtio");
    assert!(
        out.passed("blk").contains("id=\"vhost_user_blk\""),
        "the peer's own id"
    );
    out.passed("msix");
    out.passed("intx");
    assert_image_after_blk(&img);
}

/// qemu-storage-daemon answers a descriptor outside guest RAM by dropping the
/// connection (libvhost-user's vu_panic). cellvm must stay up: it logs the broken
/// backend, the guest's device fails (requests never complete, NEEDS_RESET at the next
/// start) and the VM still ends normally.
#[test]
fn a_backend_that_dies_leaves_the_vmm_running_and_the_device_failed() {
    let dir = scratch_dir("virtio-dead");
    let img = make_image(&dir);
    let sock = dir.join("qsd.sock");
    let _qsd = storage_daemon(&img, &sock);
    let disk = format!("socket={}", sock.display());
    let out = vm(&["--disk", &disk, "--cmdline", "tests=serial,blkbad,msix"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let lines = out.test_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("TEST blkbad FAIL outside_ram: used=None")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("TEST msix FAIL device set NEEDS_RESET")),
        "{lines:?}"
    );
    out.passed("serial");
    assert!(
        out.stderr.contains("vhost-user backend: SET_FEATURES")
            && out.stderr.contains("Broken pipe"),
        "{}",
        out.stderr
    );
}

#[test]
fn qemu_as_the_frontend_drives_our_blk_backend() {
    let dir = scratch_dir("virtio-qemu");
    let img = make_image(&dir);
    let elf = dir.join("guest.elf");
    let mut cmd = cellvm();
    cmd.args(["testguest", "--output"]).arg(&elf);
    assert_eq!(run(cmd, Duration::from_secs(30)).code, Some(0));
    let sock = dir.join("blk.sock");
    let backend = common::cellvm_device()
        .args(["blk", "--queues", "2", "--socket"])
        .arg(&sock)
        .arg("--image")
        .arg(&img)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _backend = Daemon(backend);
    wait_for(&sock);
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-enable-kvm",
        "-smp",
        "2",
        "-M",
        "microvm,pcie=on,memory-backend=mem",
    ])
    .args(["-cpu", "host,-arch-capabilities", "-m", "128"])
    .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
    .args(common::QEMU_HEADLESS)
    .arg("-chardev")
    .arg(format!("socket,id=c0,path={}", sock.display()))
    .args([
        "-device",
        "vhost-user-blk-pci,chardev=c0,num-queues=2,disable-legacy=on",
    ])
    .arg("-kernel")
    .arg(&elf)
    // microvm has an ECAM at 0xe0000000 but no MCFG table to say so.
    .args(["-append", "tests=blk,blkbad,msix ecam=0xe0000000"]);
    let out = run(qemu, Duration::from_secs(120));
    // isa-debug-exit with value 0: QEMU exits with 1.
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    out.passed("blk");
    out.passed("blkbad");
    out.passed("msix");
    assert_image_after_blk(&img);
}
