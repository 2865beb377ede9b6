//! Helpers for cellvm-img's tests: a scratch directory, the tool and qemu-img.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("cellvm-img-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    pub fn p(&self, f: &str) -> String {
        self.0.join(f).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Run {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

fn run(mut c: Command) -> Run {
    use std::os::unix::process::ExitStatusExt;
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("the program runs");
    Run {
        code: status.code(),
        signal: status.signal(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

pub fn img(args: &[&str]) -> Run {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cellvm-img"));
    c.args(args);
    run(c)
}

/// qemu-img, tried again (up to 10 times) on the one failure a loaded host causes: a
/// LUKS image's creation times PBKDF2 from the thread's CPU time and gives up with
/// "Unable to get accurate CPU usage" when its first round was charged no tick.
pub fn qemu_img(args: &[&str]) -> Run {
    let mut tries = 0;
    loop {
        let mut c = Command::new("qemu-img");
        // Snapshot dates: cellvm-img prints UTC.
        c.env("TZ", "UTC").args(args);
        let r = run(c);
        tries += 1;
        if tries == 10 || !r.stderr.contains("Unable to get accurate CPU usage") {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn qemu_io(file: &str, cmds: &[&str]) -> Run {
    let mut c = Command::new("qemu-io");
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(file);
    run(c)
}

/// Runs and asserts exit 0, returning stdout.
pub fn ok(r: Run, what: &str) -> String {
    assert_eq!(
        r.code,
        Some(0),
        "{what}: exit {:?} signal {:?}\nstdout: {}\nstderr: {}",
        r.code,
        r.signal,
        r.stdout,
        r.stderr
    );
    r.stdout
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// `qemu-img check` must find the image clean.
pub fn qemu_clean(f: &str) {
    let r = qemu_img(&["check", f]);
    assert_eq!(
        r.code,
        Some(0),
        "qemu-img check {f}: {}\n{}",
        r.stdout,
        r.stderr
    );
}

pub fn qemu_same(a: &str, b: &str) {
    ok(
        qemu_img(&["compare", a, b]),
        &format!("qemu-img compare {a} {b}"),
    );
}

pub fn bytes(f: &str) -> Vec<u8> {
    std::fs::read(Path::new(f)).unwrap()
}

/// A raw file with random, text-like and zero regions, `mib` MiB long.
pub fn pattern_raw(path: &str, mib: usize) {
    let mut v = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, chunk) in v.chunks_mut(64 << 10).enumerate() {
        match i % 4 {
            0 => {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            1 => {
                let text = format!("cluster {i} of a compressible test pattern. ");
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = text.as_bytes()[j % text.len()];
                }
            }
            2 => {}
            _ => chunk[100..200].fill(0xee),
        }
    }
    std::fs::write(path, v).unwrap();
}

pub fn be64_at(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

pub fn put_be64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

pub fn put_be32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
