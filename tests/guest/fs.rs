//! virtio-fs from CPL 3: a FUSE client over the device's request queue (virtio 1.2,
//! 5.11; the FUSE wire format of Linux's include/uapi/linux/fuse.h, protocol 7.31).
//!
//! `fs` expects the share tests/virtio_fs.rs lays out: `hello.txt` holding
//! [`HELLO`], a symlink `out-abs` to `/etc` and `out-rel` to `../outside.txt`, a
//! character device `devnull` (1:3), and next to the share (outside it) `outside.txt`.
//! It reads `hello.txt`, creates `guest.txt` holding [`GUEST`], then tries to get out:
//! `..` of the root, then `outside.txt` beneath what that gave; `passwd` beneath
//! `out-abs`; opening `out-rel`; a hard link to a node id it was never given; making a
//! device node; reading `devnull`. Each attempt's answer is printed (an errno, or what
//! was reached) for the host test to judge: the same guest runs against a virtiofsd in
//! cellvm's cell and, as the control, against one outside any cell.
//!
//! `fsbench` (for cellvm-bench): for `bench_ms` each, sequential 128 KiB READs of
//! `big.bin` (from the start again at its end), then LOOKUP + GETATTR of `hello.txt`,
//! then CREATE + RELEASE + UNLINK of a fresh file; prints MB/s and operations per
//! second measured with the TSC.

use crate::devices::{self, bytes, data};
use crate::hw::{rdtsc, tsc_hz};
use crate::virtio::{Queue, NO_VECTOR};
use crate::Report;

const TYPE_FS: u16 = 26;

const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const READLINK: u32 = 5;
const MKNOD: u32 = 8;
const UNLINK: u32 = 10;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const RELEASE: u32 = 18;
const INIT: u32 = 26;
const CREATE: u32 = 35;

const ROOT: u64 = 1;
const ENOENT: i32 = 2;

/// What the host test wrote in `hello.txt`, and what the guest writes in `guest.txt`.
pub const HELLO: &[u8] = b"hello from the host through virtiofsd\n";
pub const GUEST: &[u8] = b"written by the guest over virtio-fs\n";

/// The request buffer (headers and arguments; the device reads it).
#[repr(C, align(4096))]
struct Req([u8; 8192]);
static mut REQ: Req = Req([0; 8192]);
/// A large reply buffer for `fsbench`'s READs.
#[repr(C, align(4096))]
struct Big([u8; BENCH_READ + 4096]);
static mut BIG: Big = Big([0; BENCH_READ + 4096]);
const BENCH_READ: usize = 128 * 1024;

struct Fuse {
    q: Queue,
    unique: u64,
}

/// A node's attributes (the fields this client looks at).
#[derive(Clone, Copy, Default)]
struct Attr {
    size: u64,
    mode: u32,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u32_at(b, o) as u64 | (u32_at(b, o + 4) as u64) << 32
}

impl Fuse {
    /// One request: `args` after the in-header, a reply of at most `max` bytes after the
    /// out-header into `out` (a guest address). Ok(reply length) or Err(errno).
    fn call_into(&mut self, opcode: u32, node: u64, args: &[&[u8]], out: u64, max: usize) -> Result<usize, i32> {
        // SAFETY: REQ is used by one request at a time, which completes before the next.
        let req = unsafe { &mut (*core::ptr::addr_of_mut!(REQ)).0 };
        let mut len = 40;
        for a in args {
            req[len..len + a.len()].copy_from_slice(a);
            len += a.len();
        }
        self.unique += 1;
        req[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        req[4..8].copy_from_slice(&opcode.to_le_bytes());
        req[8..16].copy_from_slice(&self.unique.to_le_bytes());
        req[16..24].copy_from_slice(&node.to_le_bytes());
        // uid 0, gid 0, pid 1, no extensions.
        req[24..40].fill(0);
        req[32..36].copy_from_slice(&1u32.to_le_bytes());
        // SAFETY: `out` is a buffer of at least 16 + max bytes the caller owns.
        let head = unsafe { core::slice::from_raw_parts_mut(out as *mut u8, 16) };
        head.fill(0);
        let used = self.q.request(&[(req.as_ptr() as u64, len as u32, false), (out, (16 + max) as u32, true)]);
        let Some(used) = used else { return Err(-1) };
        let (olen, error, unique) = (u32_at(head, 0) as usize, u32_at(head, 4) as i32, u64_at(head, 8));
        if unique != self.unique || olen < 16 || olen > 16 + max || (used as usize) < olen {
            return Err(-2);
        }
        if error != 0 {
            return Err(-error);
        }
        Ok(olen - 16)
    }

    /// As `call_into`, the reply in DATA (at most 4 KiB); Ok(the reply's bytes).
    fn call(&mut self, opcode: u32, node: u64, args: &[&[u8]]) -> Result<&'static [u8], i32> {
        let n = self.call_into(opcode, node, args, data(), 4096)?;
        Ok(&bytes(16, n)[..])
    }

    fn init(&mut self) -> Result<(u32, u32, u32), i32> {
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&7u32.to_le_bytes());
        a[4..8].copy_from_slice(&31u32.to_le_bytes());
        a[8..12].copy_from_slice(&(128u32 * 1024).to_le_bytes());
        let r = self.call(INIT, 0, &[&a])?;
        if r.len() < 24 {
            return Err(-3);
        }
        Ok((u32_at(r, 0), u32_at(r, 4), u32_at(r, 20)))
    }

    /// LOOKUP `name` in directory `dir`: (node id, attributes).
    fn lookup(&mut self, dir: u64, name: &[u8]) -> Result<(u64, Attr), i32> {
        let r = self.call(LOOKUP, dir, &[name, b"\0"])?;
        entry(r)
    }

    fn getattr(&mut self, node: u64) -> Result<Attr, i32> {
        let r = self.call(GETATTR, node, &[&[0u8; 16]])?;
        if r.len() < 16 + 88 {
            return Err(-3);
        }
        Ok(attr(&r[16..]))
    }

    fn open(&mut self, node: u64, flags: u32) -> Result<u64, i32> {
        let mut a = [0u8; 8];
        a[0..4].copy_from_slice(&flags.to_le_bytes());
        let r = self.call(OPEN, node, &[&a])?;
        if r.len() < 16 {
            return Err(-3);
        }
        Ok(u64_at(r, 0))
    }

    fn read_into(&mut self, node: u64, fh: u64, offset: u64, out: u64, size: usize) -> Result<usize, i32> {
        let mut a = [0u8; 40];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        a[8..16].copy_from_slice(&offset.to_le_bytes());
        a[16..20].copy_from_slice(&(size as u32).to_le_bytes());
        self.call_into(READ, node, &[&a], out, size)
    }

    fn write(&mut self, node: u64, fh: u64, offset: u64, bytes: &[u8]) -> Result<u32, i32> {
        let mut a = [0u8; 40];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        a[8..16].copy_from_slice(&offset.to_le_bytes());
        a[16..20].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        let r = self.call(WRITE, node, &[&a, bytes])?;
        if r.len() < 8 {
            return Err(-3);
        }
        Ok(u32_at(r, 0))
    }

    fn release(&mut self, node: u64, fh: u64) -> Result<(), i32> {
        let mut a = [0u8; 24];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        self.call(RELEASE, node, &[&a]).map(|_| ())
    }

    /// CREATE `name` in `dir` (write-only, truncated, mode 0644): (node id, fh).
    fn create(&mut self, dir: u64, name: &[u8]) -> Result<(u64, u64), i32> {
        let mut a = [0u8; 16];
        // O_WRONLY | O_CREAT | O_TRUNC, mode 0644, umask 0.
        a[0..4].copy_from_slice(&(0o1 | 0o100 | 0o1000u32).to_le_bytes());
        a[4..8].copy_from_slice(&(0o100644u32).to_le_bytes());
        let r = self.call(CREATE, dir, &[&a, name, b"\0"])?;
        if r.len() < 128 + 16 {
            return Err(-3);
        }
        let (node, _) = entry(r)?;
        Ok((node, u64_at(r, 128)))
    }

    fn unlink(&mut self, dir: u64, name: &[u8]) -> Result<(), i32> {
        self.call(UNLINK, dir, &[name, b"\0"]).map(|_| ())
    }
}

fn attr(b: &[u8]) -> Attr {
    Attr { size: u64_at(b, 8), mode: u32_at(b, 60) }
}

fn entry(r: &[u8]) -> Result<(u64, Attr), i32> {
    if r.len() < 128 {
        return Err(-3);
    }
    let node = u64_at(r, 0);
    // A zero node id is a negative entry: the name is not there.
    if node == 0 {
        return Err(ENOENT);
    }
    Ok((node, attr(&r[40..])))
}

/// The share's device: its tag (NUL-padded in the first 36 bytes of its configuration)
/// and a session on its first request queue.
fn session() -> Result<(crate::virtio::Device, [u8; 36], u32, Fuse), &'static str> {
    let (d, _, mut qs) = devices::start(TYPE_FS, 0, 2, [NO_VECTOR; 2])?;
    let mut tag = [0u8; 36];
    for (i, t) in tag.iter_mut().enumerate() {
        *t = d.config8(i as u64);
    }
    let queues = d.config32(36);
    let mut q = qs[1].take().ok_or("no request queue")?;
    q.poll_only();
    Ok((d, tag, queues, Fuse { q, unique: 0 }))
}

fn tag_str(tag: &[u8; 36]) -> &str {
    let n = tag.iter().position(|b| *b == 0).unwrap_or(36);
    core::str::from_utf8(&tag[..n]).unwrap_or("?")
}

/// An answer for the line: `e<errno>`, or what was reached.
struct Answer(Result<&'static str, i32>);

impl core::fmt::Display for Answer {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Ok(s) => f.write_str(s),
            Err(e) => write!(f, "e{e}"),
        }
    }
}

pub fn check_fs(r: &mut Report) {
    let (d, tag, queues, mut fs) = match session() {
        Ok(x) => x,
        Err(why) => return r.line("fs", Err(()), format_args!("{why}")),
    };
    let init = fs.init();
    let (major, minor) = match init {
        Ok((ma, mi, _)) => (ma, mi),
        Err(e) => {
            d.set_status(0);
            return r.line("fs", Err(()), format_args!("tag={} INIT: errno {e}", tag_str(&tag)));
        }
    };
    // Read what the host wrote.
    let hello = fs.lookup(ROOT, b"hello.txt");
    let mut read_ok = false;
    let mut size = 0;
    if let Ok((node, a)) = hello {
        size = a.size;
        let attr_ok = fs.getattr(node).is_ok_and(|g| g.size == a.size && g.mode & 0o170000 == 0o100000);
        if let Ok(fh) = fs.open(node, 0) {
            let got = fs.read_into(node, fh, 0, data(), 4096);
            read_ok = attr_ok && got == Ok(HELLO.len()) && bytes(16, HELLO.len()) == HELLO;
            let _ = fs.release(node, fh);
        }
    }
    // Write what the host will check.
    let wrote = fs.create(ROOT, b"guest.txt").and_then(|(node, fh)| {
        let w = fs.write(node, fh, 0, GUEST);
        let _ = fs.release(node, fh);
        w
    });
    let wrote_ok = wrote == Ok(GUEST.len() as u32);

    // The ways out. `..` of the root, and the file next to the share beneath it.
    let up = fs.lookup(ROOT, b"..");
    let dotdot = Answer(match up {
        Err(e) => Err(e),
        Ok((node, _)) => match fs.lookup(node, b"outside.txt") {
            Ok(_) => Ok("outside.txt"),
            Err(e) => Err(e),
        },
    });
    // A symlink to /etc: beneath it, passwd.
    let abs = Answer(match fs.lookup(ROOT, b"out-abs") {
        Err(e) => Err(e),
        Ok((node, a)) if a.mode & 0o170000 == 0o120000 => {
            let link = fs.call(READLINK, node, &[]).map(|t| t == b"/etc");
            match (link, fs.lookup(node, b"passwd")) {
                (_, Ok(_)) => Ok("passwd"),
                (Ok(true), Err(e)) => Err(e),
                (_, Err(_)) => Ok("readlink-wrong"),
            }
        }
        Ok(_) => Ok("not-a-symlink"),
    });
    // A symlink to ../outside.txt: opened as if it were the file.
    let rel = Answer(match fs.lookup(ROOT, b"out-rel") {
        Err(e) => Err(e),
        Ok((node, _)) => match fs.open(node, 0) {
            Err(e) => Err(e),
            Ok(fh) => {
                let got = fs.read_into(node, fh, 0, data(), 4096);
                let _ = fs.release(node, fh);
                match got {
                    Ok(n) if n > 0 => Ok("outside.txt"),
                    Ok(_) => Ok("empty"),
                    Err(e) => Err(e),
                }
            }
        },
    });
    // A hard link to a node id nobody gave the guest.
    let mut forged = [0u8; 8];
    forged.copy_from_slice(&0x4000_0000_dead_beefu64.to_le_bytes());
    let link = Answer(fs.call(LINK, ROOT, &[&forged, b"forged\0"]).map(|_| "linked"));
    // A device node the guest makes: /dev/null's numbers.
    let mut mk = [0u8; 16];
    mk[0..4].copy_from_slice(&(0o020666u32).to_le_bytes());
    mk[4..8].copy_from_slice(&((1u32 << 8) | 3).to_le_bytes());
    let mknod = Answer(fs.call(MKNOD, ROOT, &[&mk, b"made-null\0"]).map(|_| "made"));
    // A device node the host left in the share.
    let dev = Answer(match fs.lookup(ROOT, b"devnull") {
        Err(e) => Err(e),
        Ok((node, _)) => match fs.open(node, 2) {
            Err(e) => Err(e),
            Ok(fh) => {
                let _ = fs.release(node, fh);
                Ok("opened")
            }
        },
    });
    d.set_status(0);
    let ok = read_ok && wrote_ok && major == 7;
    r.line(
        "fs",
        ok.then_some(()).ok_or(()),
        format_args!(
            "tag={} queues={queues} fuse={major}.{minor} hello_size={size} read={read_ok} wrote={wrote:?} dotdot={dotdot} symlink_abs={abs} symlink_rel={rel} forged_link={link} mknod={mknod} devnode={dev}",
            tag_str(&tag)
        ),
    );
}

/// The TSC deadline `ms` from now.
fn deadline(ms: u64) -> u64 {
    rdtsc() + ms * (tsc_hz() / 1000).max(1)
}

fn seconds_since(start: u64) -> f64 {
    (rdtsc() - start) as f64 / tsc_hz().max(1) as f64
}

pub fn check_fsbench(r: &mut Report, ms: u64) {
    let (d, _, _, mut fs) = match session() {
        Ok(x) => x,
        Err(why) => return r.line("fsbench", Err(()), format_args!("{why}")),
    };
    if let Err(e) = fs.init() {
        d.set_status(0);
        return r.line("fsbench", Err(()), format_args!("INIT: errno {e}"));
    }
    let big = core::ptr::addr_of!(BIG) as u64;
    // Sequential reads of big.bin.
    let (mut read_bytes, mut read_s, mut errors) = (0u64, 0.0, 0u32);
    if let Ok((node, a)) = fs.lookup(ROOT, b"big.bin") {
        if let Ok(fh) = fs.open(node, 0) {
            let (start, end) = (rdtsc(), deadline(ms));
            let mut off = 0;
            while rdtsc() < end {
                match fs.read_into(node, fh, off, big, BENCH_READ) {
                    Ok(n) if n > 0 => {
                        read_bytes += n as u64;
                        off += n as u64;
                    }
                    Ok(_) => off = 0,
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
                if off >= a.size {
                    off = 0;
                }
            }
            read_s = seconds_since(start);
            let _ = fs.release(node, fh);
        }
    }
    // Metadata: LOOKUP + GETATTR.
    let (start, end) = (rdtsc(), deadline(ms));
    let mut stats = 0u64;
    while rdtsc() < end {
        match fs.lookup(ROOT, b"hello.txt").and_then(|(n, _)| fs.getattr(n)) {
            Ok(_) => stats += 1,
            Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    let stat_s = seconds_since(start);
    // Metadata: CREATE + RELEASE + UNLINK.
    let (start, end) = (rdtsc(), deadline(ms));
    let mut creates = 0u64;
    while rdtsc() < end {
        let ok = fs
            .create(ROOT, b"bench.tmp")
            .and_then(|(n, fh)| fs.release(n, fh))
            .and_then(|_| fs.unlink(ROOT, b"bench.tmp"));
        match ok {
            Ok(()) => creates += 1,
            Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    let create_s = seconds_since(start);
    d.set_status(0);
    let mbps = read_bytes as f64 / 1e6 / read_s.max(1e-9);
    let ok = errors == 0 && read_bytes > 0 && stats > 0 && creates > 0;
    r.line(
        "fsbench",
        ok.then_some(()).ok_or(()),
        format_args!(
            "read_mbps={} stat_ops={} create_ops={} errors={errors}",
            mbps as u64,
            (stats as f64 / stat_s.max(1e-9)) as u64,
            (creates as f64 / create_s.max(1e-9)) as u64
        ),
    );
}
