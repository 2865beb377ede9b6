//! The supervisor's half: one poll loop over the cell's pipes, the signals and the VMM.
//! It relays the console (the operator's stdin to the VMM's stdin, the VMM's stdout to
//! its own with control bytes escaped) and every cell's stderr (one line at a time,
//! prefixed with where it came from, escaped, capped), passes SIGTERM/SIGINT/SIGHUP on
//! to the VM (then SIGKILL if it does not end), and turns the ending into an exit
//! status. No cell ever holds the operator's terminal.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// How long the VM has to end after the supervisor passed it SIGTERM.
const GRACE: Duration = Duration::from_secs(5);
/// The longest stderr line relayed; the rest of a longer one is dropped.
pub const MAX_LINE: usize = 1024;

pub struct Signals {
    old: libc::sigset_t,
    set: libc::sigset_t,
}

/// Blocks the signals the supervisor waits for (before the child exists, so none is
/// lost); the child restores the old mask before it execs.
pub fn block_signals() -> Signals {
    // SAFETY: sigset manipulation on local, initialised sets.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        Signals { old, set }
    }
}

impl Signals {
    pub fn restore_in_child(&self) {
        // SAFETY: restores a mask saved by block_signals.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }

    /// A descriptor that becomes readable when one of the blocked signals is pending.
    fn fd(&self) -> Option<OwnedFd> {
        // SAFETY: signalfd with a valid, initialised set; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &self.set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        // SAFETY: a fresh descriptor, owned from here on.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn status_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

pub fn reap(pid: u32) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    status_code(status)
}

/// Escapes what a terminal would act on: every control byte but CR, LF and TAB (and
/// with `all`, those too), and DEL, as `\xNN`.
pub fn escape(bytes: &[u8], all: bool, out: &mut Vec<u8>) {
    for &b in bytes {
        let keep = matches!(b, b'\r' | b'\n' | b'\t') && !all;
        if (b < 0x20 || b == 0x7f) && !keep {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        } else {
            out.push(b);
        }
    }
}

/// One cell's stderr: whole lines, each written to the supervisor's stderr as
/// `PREFIX: line`.
pub struct Log {
    pub prefix: String,
    pub fd: OwnedFd,
    line: Vec<u8>,
    /// The current line passed MAX_LINE: drop the rest of it.
    cut: bool,
    open: bool,
}

impl Log {
    pub fn new(prefix: String, fd: OwnedFd) -> Log {
        set_nonblocking(fd.as_raw_fd());
        Log {
            prefix,
            fd,
            line: Vec::new(),
            cut: false,
            open: true,
        }
    }

    fn emit(&mut self) {
        let mut out = Vec::with_capacity(self.line.len() + self.prefix.len() + 16);
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(b": ");
        escape(&self.line, true, &mut out);
        if self.cut {
            out.extend_from_slice(b" [cut]");
        }
        out.push(b'\n');
        write_all(2, &out);
        self.line.clear();
        self.cut = false;
    }

    /// Reads what is there (never blocks); false once the pipe reached its end.
    fn pump(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        while self.open {
            match read(self.fd.as_raw_fd(), &mut buf) {
                Some(0) | None => {
                    if !self.line.is_empty() || self.cut {
                        self.emit();
                    }
                    self.open = false;
                }
                Some(n) if n < 0 => break,
                Some(n) => {
                    for &b in &buf[..n as usize] {
                        if b == b'\n' {
                            self.emit();
                        } else if self.line.len() < MAX_LINE {
                            self.line.push(b);
                        } else {
                            self.cut = true;
                        }
                    }
                }
            }
        }
        self.open
    }
}

/// What the supervisor relays: the VMM's console and every cell's stderr.
pub struct Relay {
    /// Our end of the VMM's stdin (operator input goes there), until either side ends.
    pub console_in: Option<OwnedFd>,
    /// Our end of the VMM's stdout.
    pub console_out: Option<OwnedFd>,
    pub logs: Vec<Log>,
    pending_in: Vec<u8>,
    stdin_open: bool,
}

impl Relay {
    pub fn new(console_in: Option<OwnedFd>, console_out: Option<OwnedFd>, logs: Vec<Log>) -> Relay {
        if let Some(f) = &console_in {
            set_nonblocking(f.as_raw_fd());
        }
        if let Some(f) = &console_out {
            set_nonblocking(f.as_raw_fd());
        }
        Relay {
            stdin_open: console_in.is_some(),
            console_in,
            console_out,
            logs,
            pending_in: Vec::new(),
        }
    }

    fn pump_console_out(&mut self) {
        let Some(fd) = self.console_out.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        loop {
            match read(fd, &mut buf) {
                Some(0) | None => {
                    self.console_out = None;
                    break;
                }
                Some(n) if n < 0 => break,
                Some(n) => {
                    out.clear();
                    escape(&buf[..n as usize], false, &mut out);
                    write_all(1, &out);
                }
            }
        }
    }

    fn pump_stdin(&mut self) {
        let mut buf = [0u8; 1024];
        // poll said readable: one read, which does not block.
        match read(0, &mut buf) {
            Some(n) if n > 0 => self.pending_in.extend_from_slice(&buf[..n as usize]),
            Some(n) if n < 0 => {}
            _ => {
                self.stdin_open = false;
                if self.pending_in.is_empty() {
                    self.console_in = None;
                }
            }
        }
    }

    fn pump_console_in(&mut self) {
        let Some(fd) = self.console_in.as_ref().map(|f| f.as_raw_fd()) else {
            self.pending_in.clear();
            return;
        };
        // SAFETY: write from a valid buffer to a descriptor we own.
        let n = unsafe {
            libc::write(
                fd,
                self.pending_in.as_ptr() as *const libc::c_void,
                self.pending_in.len(),
            )
        };
        if n > 0 {
            self.pending_in.drain(..n as usize);
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
            // The VMM closed its stdin (or ended): input goes nowhere.
            self.console_in = None;
            self.pending_in.clear();
            self.stdin_open = false;
        }
        if !self.stdin_open && self.pending_in.is_empty() {
            self.console_in = None;
        }
    }

    /// Relays whatever is there now, without waiting.
    pub fn drain(&mut self) {
        self.pump_console_out();
        for l in &mut self.logs {
            l.pump();
        }
    }
}

/// Waits for `pid`, relaying `relay` and forwarding termination requests; returns the
/// VMM's exit status.
pub fn wait(pid: u32, signals: &Signals, relay: &mut Relay) -> i32 {
    let sigfd = signals.fd();
    let mut kill_at: Option<Instant> = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child, non-blocking.
        if unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) } == pid as i32 {
            relay.drain();
            return status_code(status);
        }
        // What to wait for: (descriptor, events, what it is).
        let mut what: Vec<(RawFd, i16, usize)> = Vec::new();
        const SIG: usize = usize::MAX;
        const OUT: usize = usize::MAX - 1;
        const IN: usize = usize::MAX - 2;
        const TO_VMM: usize = usize::MAX - 3;
        if let Some(f) = &sigfd {
            what.push((f.as_raw_fd(), libc::POLLIN, SIG));
        }
        if let Some(f) = &relay.console_out {
            what.push((f.as_raw_fd(), libc::POLLIN, OUT));
        }
        if relay.console_in.is_some() {
            if relay.pending_in.is_empty() {
                if relay.stdin_open {
                    what.push((0, libc::POLLIN, IN));
                }
            } else {
                let fd = relay.console_in.as_ref().map_or(-1, |f| f.as_raw_fd());
                what.push((fd, libc::POLLOUT, TO_VMM));
            }
        }
        for (i, l) in relay.logs.iter().enumerate() {
            if l.open {
                what.push((l.fd.as_raw_fd(), libc::POLLIN, i));
            }
        }
        let mut fds: Vec<libc::pollfd> = what
            .iter()
            .map(|&(fd, events, _)| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        // Without a signalfd (or while a SIGTERM is being passed on) look again often.
        let timeout = if sigfd.is_none() || kill_at.is_some() {
            200
        } else {
            -1
        };
        // SAFETY: poll on a valid array of pollfds of its stated length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if rc < 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut term = false;
        for (p, &(_, _, kind)) in fds.iter().zip(&what) {
            if p.revents == 0 {
                continue;
            }
            match kind {
                SIG => {
                    let mut info = [0u8; 128];
                    while read(p.fd, &mut info).is_some_and(|n| n > 0) {
                        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                        if [libc::SIGTERM, libc::SIGINT, libc::SIGHUP].contains(&(signo as i32)) {
                            term = true;
                        }
                    }
                }
                OUT => relay.pump_console_out(),
                IN => relay.pump_stdin(),
                TO_VMM => relay.pump_console_in(),
                i => {
                    relay.logs[i].pump();
                }
            }
        }
        if sigfd.is_none() {
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: sigtimedwait with a valid set and timeout; no siginfo wanted.
            let sig = unsafe { libc::sigtimedwait(&signals.set, std::ptr::null_mut(), &zero) };
            term |= matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGHUP);
        }
        if term && kill_at.is_none() {
            kill_at = Some(Instant::now() + GRACE);
        }
        if kill_at.is_some() {
            // Passed on again at every turn of this loop: a VMM that is PID 1 of its
            // namespace drops a SIGTERM that arrives before it has installed its handler.
            // SAFETY: kill our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if kill_at.is_some_and(|t| Instant::now() > t) {
            // SAFETY: kill our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// One read: Some(n) with n < 0 for "nothing now" (EAGAIN), None for an error.
fn read(fd: RawFd, buf: &mut [u8]) -> Option<isize> {
    // SAFETY: read into a valid buffer of its stated length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n >= 0 {
        return Some(n);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Some(-1),
        _ => None,
    }
}

fn write_all(fd: RawFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: write from a valid buffer of its stated length.
        let n = unsafe { libc::write(fd, bytes.as_ptr() as *const libc::c_void, bytes.len()) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // The operator's side is gone: what the cell says goes nowhere.
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn console_output_keeps_newlines_and_escapes_terminal_controls() {
        let mut out = Vec::new();
        escape(b"ok\r\n\t\x1b[2J\x07\x7f", false, &mut out);
        assert_eq!(out, b"ok\r\n\t\\x1b[2J\\x07\\x7f");
        let mut out = Vec::new();
        escape(b"a\tb\rc\x1b", true, &mut out);
        assert_eq!(out, b"a\\x09b\\x0dc\\x1b");
    }
}
