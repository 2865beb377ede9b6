//! The guest's serial console, owned by the supervisor: every byte the VMM writes goes
//! to `console.log` (capped, rotated to `console.log.1`) and to every reader attached
//! to `console.sock`; what readers send goes to the guest's serial input. Nothing here
//! ever blocks: each reader has a bounded backlog, and a reader that does not keep up
//! loses output (told by a `[cellvm: N bytes dropped]` line once it catches up), never
//! the guest its console.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

/// The largest console.log; beyond it the file becomes console.log.1 and a new one starts.
pub const LOG_CAP: u64 = 16 << 20;
/// What one reader may have waiting; beyond it, its output is dropped.
pub const BACKLOG: usize = 64 << 10;
/// Readers at once; one more is accepted and closed at once (descriptors are bounded).
pub const MAX_CLIENTS: usize = 64;
/// Input from readers (and the terminal) waiting for the guest; beyond it they are not
/// read until the guest takes some.
pub const INPUT_MAX: usize = 64 << 10;

/// The console log: appended, never more than `cap` bytes, one older generation kept.
pub struct ConsoleLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    cap: u64,
    mode: u32,
    gid: Option<u32>,
}

impl ConsoleLog {
    pub fn open(path: PathBuf, cap: u64, mode: u32, gid: Option<u32>) -> std::io::Result<Self> {
        let file = crate::rundir::open_log(&path, mode, gid).map_err(std::io::Error::other)?;
        let size = file.metadata()?.len();
        Ok(ConsoleLog {
            path,
            file: Some(file),
            size,
            cap,
            mode,
            gid,
        })
    }

    fn rotate(&mut self) {
        self.file = None;
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        let _ = std::fs::rename(&self.path, &old);
        self.file = crate::rundir::open_log(&self.path, self.mode, self.gid).ok();
        self.size = 0;
    }

    pub fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.size >= self.cap {
                self.rotate();
            }
            let Some(f) = self.file.as_mut() else { return };
            let room = (self.cap - self.size).min(bytes.len() as u64) as usize;
            if f.write_all(&bytes[..room]).is_err() {
                // A full disk loses log lines, never the guest.
                return;
            }
            self.size += room as u64;
            bytes = &bytes[room..];
        }
    }
}

struct Client {
    fd: OwnedFd,
    out: VecDeque<u8>,
    /// Bytes dropped since the backlog was last empty.
    dropped: u64,
    open: bool,
}

impl Client {
    fn queue(&mut self, bytes: &[u8]) {
        if self.dropped > 0 || self.out.len() + bytes.len() > BACKLOG {
            let room = if self.dropped > 0 {
                0
            } else {
                BACKLOG - self.out.len()
            };
            self.out.extend(&bytes[..room]);
            self.dropped += (bytes.len() - room) as u64;
        } else {
            self.out.extend(bytes);
        }
    }

    /// Sends what it can without blocking.
    fn flush(&mut self) {
        loop {
            if self.out.is_empty() {
                if self.dropped == 0 {
                    return;
                }
                let line = format!("\r\n[cellvm: {} bytes dropped]\r\n", self.dropped);
                self.dropped = 0;
                self.out.extend(line.as_bytes());
            }
            let (a, _) = self.out.as_slices();
            // SAFETY: send from a valid buffer of its stated length; MSG_NOSIGNAL: a
            // reader gone is an error here, never a SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    a.as_ptr() as *const libc::c_void,
                    a.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                self.out.drain(..n as usize);
                continue;
            }
            let e = std::io::Error::last_os_error().raw_os_error();
            if n < 0 && matches!(e, Some(libc::EAGAIN) | Some(libc::EINTR)) {
                return;
            }
            self.open = false;
            return;
        }
    }
}

/// What a descriptor of the console is, for the supervisor's poll loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    Listen,
    Client(usize),
}

pub struct Console {
    listener: Option<OwnedFd>,
    clients: Vec<Client>,
    log: Option<ConsoleLog>,
}

impl Console {
    pub fn new(listener: Option<OwnedFd>, log: Option<ConsoleLog>) -> Console {
        if let Some(l) = &listener {
            crate::supervise::set_nonblocking(l.as_raw_fd());
        }
        Console {
            listener,
            clients: Vec::new(),
            log,
        }
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Console bytes from the guest: logged, and queued (and sent where they can be)
    /// for every reader.
    pub fn output(&mut self, bytes: &[u8]) {
        if let Some(l) = &mut self.log {
            l.write(bytes);
        }
        for c in &mut self.clients {
            c.queue(bytes);
            c.flush();
        }
        self.clients.retain(|c| c.open);
    }

    /// The descriptors to poll: new readers always; a reader's input while `input_room`;
    /// its output while it has some waiting.
    pub fn poll_fds(&self, input_room: bool, out: &mut Vec<(RawFd, i16, Token)>) {
        if let Some(l) = &self.listener {
            out.push((l.as_raw_fd(), libc::POLLIN, Token::Listen));
        }
        for (i, c) in self.clients.iter().enumerate() {
            let mut ev = 0;
            if input_room {
                ev |= libc::POLLIN;
            }
            if !c.out.is_empty() || c.dropped > 0 {
                ev |= libc::POLLOUT;
            }
            // POLLHUP and POLLERR come whatever is asked.
            out.push((c.fd.as_raw_fd(), ev, Token::Client(i)));
        }
    }

    /// Handles what poll reported for `token`; reader input is appended to `input`
    /// (never beyond INPUT_MAX). Call `sweep` once all events of a turn are handled.
    pub fn ready(&mut self, token: Token, revents: i16, input: &mut Vec<u8>) {
        match token {
            Token::Listen => self.accept(),
            Token::Client(i) => {
                let Some(c) = self.clients.get_mut(i) else {
                    return;
                };
                if revents & libc::POLLOUT != 0 {
                    c.flush();
                }
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    let room = INPUT_MAX.saturating_sub(input.len()).min(4096);
                    if room == 0 {
                        // A reader that hung up while the guest takes no input: what it
                        // still had to send is lost (poll would report it forever).
                        if revents & libc::POLLIN == 0 {
                            c.open = false;
                        }
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    // SAFETY: read into a valid buffer, at most its length.
                    let n = unsafe {
                        libc::read(
                            c.fd.as_raw_fd(),
                            buf.as_mut_ptr() as *mut libc::c_void,
                            room,
                        )
                    };
                    if n > 0 {
                        input.extend_from_slice(&buf[..n as usize]);
                    } else if n == 0
                        || !matches!(
                            std::io::Error::last_os_error().raw_os_error(),
                            Some(libc::EAGAIN) | Some(libc::EINTR)
                        )
                    {
                        c.open = false;
                    }
                }
            }
        }
    }

    /// Forgets readers that went away.
    pub fn sweep(&mut self) {
        self.clients.retain(|c| c.open);
    }

    fn accept(&mut self) {
        let Some(l) = &self.listener else { return };
        loop {
            // SAFETY: accept4 on our listening socket; no address wanted.
            let fd = unsafe {
                libc::accept4(
                    l.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return;
            }
            // SAFETY: a fresh descriptor, owned from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if self.clients.len() >= MAX_CLIENTS {
                let mut c = Client {
                    fd,
                    out: VecDeque::new(),
                    dropped: 0,
                    open: true,
                };
                c.queue(
                    format!("[cellvm: {MAX_CLIENTS} console readers already attached]\r\n")
                        .as_bytes(),
                );
                c.flush();
                continue;
            }
            self.clients.push(Client {
                fd,
                out: VecDeque::new(),
                dropped: 0,
                open: true,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn the_log_is_capped_and_rotated_once() {
        let dir = std::env::temp_dir().join(format!("cellvm-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("console.log");
        let mut log = ConsoleLog::open(p.clone(), 10, 0o600, None).unwrap();
        log.write(b"0123456");
        log.write(b"789abcdef");
        assert_eq!(std::fs::read(&p).unwrap(), b"abcdef");
        assert_eq!(
            std::fs::read(dir.join("console.log.1")).unwrap(),
            b"0123456789"
        );
        log.write(b"ghijklmnopqrstu");
        assert_eq!(std::fs::read(&p).unwrap(), b"u");
        assert_eq!(
            std::fs::read(dir.join("console.log.1")).unwrap(),
            b"klmnopqrst"
        );
        // Reopened (a reset, a new supervisor): it goes on from the size it has.
        drop(log);
        let mut log = ConsoleLog::open(p.clone(), 10, 0o600, None).unwrap();
        log.write(b"vwxyz012345");
        assert_eq!(
            std::fs::read(dir.join("console.log.1")).unwrap(),
            b"uvwxyz0123"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"45");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn pair(console: &mut Console, l: &UnixListener) -> UnixStream {
        let addr = l.local_addr().unwrap();
        let s = UnixStream::connect(addr.as_pathname().unwrap()).unwrap();
        console.accept();
        s
    }

    #[test]
    fn a_reader_that_never_reads_loses_output_and_is_told_how_much() {
        let dir = std::env::temp_dir().join(format!("cellvm-console-r-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let l = UnixListener::bind(dir.join("c.sock")).unwrap();
        let l2 = l.try_clone().unwrap();
        let mut console = Console::new(Some(OwnedFd::from(l)), None);
        let mut slow = pair(&mut console, &l2);
        let mut fast = pair(&mut console, &l2);
        assert_eq!(console.clients(), 2);
        fast.set_nonblocking(true).unwrap();
        let chunk = vec![b'x'; 4096];
        let total = 8 << 20;
        let mut got_fast = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        for _ in 0..total / chunk.len() {
            console.output(&chunk); // never blocks, whoever does not read
            while let Ok(n) = fast.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got_fast += n;
            }
        }
        assert!(
            got_fast > total / 2,
            "a reader that reads gets the output: {got_fast}"
        );
        // The slow one: what fit, then the dropped line once it reads.
        slow.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(5) {
            match slow.read(&mut buf) {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => {
                    let mut input = Vec::new();
                    console.ready(Token::Client(0), libc::POLLOUT, &mut input);
                    if got.ends_with(b" bytes dropped]\r\n") {
                        break;
                    }
                }
            }
        }
        let text = String::from_utf8_lossy(&got);
        let line = text.rfind("\r\n[cellvm: ").expect("the dropped line");
        let n: usize = text[line + 11..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(line + n, total, "every byte is either delivered or counted");
        assert!(got[..line].iter().all(|b| *b == b'x'));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reader_input_is_bounded_and_a_closed_reader_is_forgotten() {
        let dir = std::env::temp_dir().join(format!("cellvm-console-i-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let l = UnixListener::bind(dir.join("c.sock")).unwrap();
        let l2 = l.try_clone().unwrap();
        let mut console = Console::new(Some(OwnedFd::from(l)), None);
        let mut s = pair(&mut console, &l2);
        use std::io::Write as _;
        s.write_all(b"hello").unwrap();
        let mut input = Vec::new();
        console.ready(Token::Client(0), libc::POLLIN, &mut input);
        assert_eq!(input, b"hello");
        let mut full = vec![0u8; INPUT_MAX];
        s.write_all(b"more").unwrap();
        console.ready(Token::Client(0), libc::POLLIN, &mut full);
        assert_eq!(full.len(), INPUT_MAX, "no room: nothing read");
        let mut fds = Vec::new();
        console.poll_fds(false, &mut fds);
        assert_eq!(
            fds[1].1 & libc::POLLIN,
            0,
            "not polled for input without room"
        );
        drop(s);
        let mut input = Vec::new();
        console.ready(Token::Client(0), libc::POLLIN, &mut input);
        assert_eq!(input, b"more");
        console.ready(Token::Client(0), libc::POLLIN, &mut input);
        console.sweep();
        assert_eq!(console.clients(), 0);
        // Writing to a reader that went away is no SIGPIPE.
        let s = pair(&mut console, &l2);
        drop(s);
        console.output(b"after");
        assert_eq!(console.clients(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
