//! SIGKILL in the middle of writes: the engine writing scattered clusters of a qcow2
//! image (allocating as it goes, flushing now and then) is killed, and `qemu-img check`
//! must accept what is left: exit 0, or 3 (leaked clusters only), never corruption.
//! The writer is this test binary itself, started again with CELLVM_CRASH_WRITER set.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use block::{DiskImage, Qcow2, Slice};

const TEST: &str = "sigkill_in_the_middle_of_writes_leaves_an_image_qemu_img_check_accepts";

/// Writes 4 KiB at pseudo-random places until killed; flushes every 64 writes.
fn writer(path: &Path) -> ! {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let img = Qcow2::open(file, false, false, Vec::new(), None).unwrap();
    let blocks = img.size() / 4096;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    let mut buf = vec![0u8; 4096];
    for i in 0u64.. {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        buf.fill(i as u8);
        img.write((seed % blocks) * 4096, &[Slice::from(buf.as_mut_slice())])
            .unwrap();
        if i % 64 == 63 {
            img.flush().unwrap();
        }
    }
    unreachable!()
}

#[test]
fn sigkill_in_the_middle_of_writes_leaves_an_image_qemu_img_check_accepts() {
    if let Some(path) = std::env::var_os("CELLVM_CRASH_WRITER") {
        writer(Path::new(&path));
    }
    let dir = std::env::temp_dir().join(format!("cellvm-block-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (round, after_ms) in [37u64, 110, 260].into_iter().enumerate() {
        let img = dir.join(format!("crash{round}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("8G")
            .status()
            .expect("qemu-img (tests/setup.sh installs it)");
        assert!(st.success());
        let empty = std::fs::metadata(&img).unwrap().len();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
            .env("CELLVM_CRASH_WRITER", &img)
            .spawn()
            .unwrap();
        // Killed while writing: once the image has grown, a little later.
        let start = Instant::now();
        while std::fs::metadata(&img).unwrap().len() < empty + (1 << 20) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the writer never wrote"
            );
            assert!(child.try_wait().unwrap().is_none(), "the writer ended");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(after_ms));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(status.code().is_none(), "killed by a signal: {status}");
        let out = Command::new("qemu-img")
            .arg("check")
            .arg(&img)
            .output()
            .unwrap();
        let code = out.status.code();
        assert!(
            matches!(code, Some(0) | Some(3)),
            "round {round}: qemu-img check exit {code:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "round {round}: {} bytes written, qemu-img check exit {code:?}",
            std::fs::metadata(&img).unwrap().len() - empty
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
