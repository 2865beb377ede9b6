//! Scenario 10 (`--fs-only`): virtio-fs from the test guest's CPL 3 FUSE client
//! (`fsbench`: sequential 128 KiB READs of a file, LOOKUP + GETATTR, CREATE + RELEASE +
//! UNLINK), through cellvm's vhost-user-fs frontend against QEMU's vhost-user-fs-pci
//! (microvm with its PCIe root, guest RAM a shared memfd), the same virtiofsd binary
//! with the same arguments on the same share, a fresh one for each run (virtiofsd
//! serves one connection).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{cellvm, guest_check, number, qemu, row, runner_command, Row};

/// Where tests/setup.sh installs virtiofsd.
const VIRTIOFSD: &str = "/usr/local/libexec/cellvm/virtiofsd";

/// The share: hello.txt for the metadata rows, big.bin (64 MiB quick, else 256 MiB of
/// pseudo-random bytes) for the read row.
fn share(work: &Path, quick: bool) -> PathBuf {
    let dir = work.join("fs-share");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hello.txt"),
        "hello from the host through virtiofsd\n",
    )
    .unwrap();
    let mib = if quick { 64 } else { 256 };
    let mut data = vec![0u8; mib << 20];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for chunk in data.chunks_exact_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    std::fs::write(dir.join("big.bin"), data).unwrap();
    dir
}

/// virtiofsd on `sock`, serving `dir`; returns once its socket exists.
fn virtiofsd(sock: &Path, dir: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(VIRTIOFSD)
        .arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", dir.display()))
        .args([
            "--sandbox=none",
            "--seccomp=none",
            "--inode-file-handles=never",
            "--cache=auto",
            "--log-level=error",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{VIRTIOFSD} (tests/setup.sh builds it): {e}"));
    for _ in 0..500 {
        if sock.exists() {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("virtiofsd never made {}", sock.display());
}

/// One `fsbench` run through a fresh virtiofsd: [MB/s, LOOKUP+GETATTR/s, CREATE/s].
fn one(vm: Command, sock: &Path, dir: &Path) -> [f64; 3] {
    let mut d = virtiofsd(sock, dir);
    let line = guest_check(vm, "fsbench");
    let _ = d.kill();
    let _ = d.wait();
    [
        number(&line, "read_mbps="),
        number(&line, "stat_ops="),
        number(&line, "create_ops="),
    ]
}

pub fn rows(bin: &Path, guest: &Path, work: &Path, quick: bool, runs: usize, rows: &mut Vec<Row>) {
    let dir = share(work, quick);
    let sock = work.join("fs.sock");
    let ms = if quick { 500 } else { 2000 };
    let cmdline = format!("tests=fsbench bench_ms={ms}");
    let (mut ours, mut peer): ([Vec<f64>; 3], [Vec<f64>; 3]) = Default::default();
    for _ in 0..runs.min(5) {
        let o = cellvm(bin, None, Some(&cmdline)).with_args([
            "--fs".to_string(),
            format!("tag=share,socket={}", sock.display()),
        ]);
        let q = qemu(guest, Some(&format!("{cmdline} ecam=0xe0000000")))
            .with_pcie()
            .with_shared_memory()
            .with_args([
                "-chardev".to_string(),
                format!("socket,id=fs0,path={}", sock.display()),
                "-device".into(),
                "vhost-user-fs-pci,chardev=fs0,tag=share".into(),
            ]);
        for (runner, out) in [(&o, &mut ours), (&q, &mut peer)] {
            let got = one(runner_command(runner), &sock, &dir);
            for (k, v) in got.into_iter().enumerate() {
                out[k].push(v);
            }
        }
    }
    let [or, os, oc] = ours;
    let [qr, qs, qc] = peer;
    let peer_name = "qemu vhost-user-fs-pci, same virtiofsd";
    rows.push(row(
        "10. virtio-fs, sequential 128 KiB reads",
        "MB/s",
        or,
        peer_name,
        qr,
    ));
    rows.push(row(
        "10. virtio-fs, LOOKUP + GETATTR",
        "ops/s",
        os,
        peer_name,
        qs,
    ));
    rows.push(row(
        "10. virtio-fs, CREATE + RELEASE + UNLINK",
        "ops/s",
        oc,
        peer_name,
        qc,
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
