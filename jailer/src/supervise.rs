//! The supervisor's half: one poll loop over the cell's pipes, the signals and the VMM.
//! It relays the console (the operator's stdin to the VMM's stdin, the VMM's stdout to
//! its own with control bytes escaped) and every cell's stderr (one line at a time,
//! prefixed with where it came from, escaped, capped), passes SIGTERM/SIGINT/SIGHUP on
//! to the VM (then SIGKILL once the tenant's stop timeout passed), kills it at once on
//! SIGUSR1, and turns the ending into an exit status. The console also goes to
//! console.rs (log and readers). No cell ever holds the operator's terminal.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

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
        for s in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGUSR1,
        ] {
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
    /// The last line relayed, escaped (the VMM's reason for an early end).
    last: String,
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
            last: String::new(),
        }
    }

    /// The last line this cell wrote, escaped for a terminal.
    pub fn last_line(&self) -> &str {
        &self.last
    }

    /// Whether its cell may still write (a closed log has nothing more to relay).
    pub fn is_open(&self) -> bool {
        self.open
    }

    fn emit(&mut self) {
        let mut out = Vec::with_capacity(self.line.len() + self.prefix.len() + 16);
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(b": ");
        let start = out.len();
        escape(&self.line, true, &mut out);
        if self.cut {
            out.extend_from_slice(b" [cut]");
        }
        self.last = String::from_utf8_lossy(&out[start..]).into_owned();
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
    /// Our end of the VMM's stdin (operator and console-reader input goes there).
    pub console_in: Option<OwnedFd>,
    /// Our end of the VMM's stdout.
    pub console_out: Option<OwnedFd>,
    /// Our end of a virtio-console's hvc0 (a stream socket to its backend): its output
    /// joins the serial console's, and input goes to it instead of the serial port.
    pub hvc: Option<OwnedFd>,
    pub logs: Vec<Log>,
    /// The console's log and readers (console.sock); kept across a reset.
    pub console: crate::console::Console,
    /// Whether the supervisor's own stdin and stdout are the operator's (foreground):
    /// the console is then also relayed there, escaped.
    pub terminal: bool,
    pending_in: Vec<u8>,
    stdin_open: bool,
}

impl Relay {
    pub fn new(
        console_in: Option<OwnedFd>,
        console_out: Option<OwnedFd>,
        logs: Vec<Log>,
        console: crate::console::Console,
        terminal: bool,
    ) -> Relay {
        let mut r = Relay {
            console_in: None,
            console_out: None,
            hvc: None,
            logs,
            console,
            terminal,
            pending_in: Vec::new(),
            stdin_open: terminal,
        };
        r.attach(console_in, console_out, Vec::new());
        r
    }

    /// Connects the relay to a (new) VMM's console and cells' stderr; the console log
    /// and readers stay.
    pub fn attach(
        &mut self,
        console_in: Option<OwnedFd>,
        console_out: Option<OwnedFd>,
        logs: Vec<Log>,
    ) {
        if let Some(f) = &console_in {
            set_nonblocking(f.as_raw_fd());
        }
        if let Some(f) = &console_out {
            set_nonblocking(f.as_raw_fd());
        }
        self.console_in = console_in;
        self.console_out = console_out;
        if !logs.is_empty() {
            self.logs = logs;
        }
    }

    /// Connects the relay to this life's hvc0 (none: the VM has no virtio-console).
    pub fn attach_hvc(&mut self, hvc: Option<OwnedFd>) {
        if let Some(f) = &hvc {
            set_nonblocking(f.as_raw_fd());
        }
        self.hvc = hvc;
    }

    /// Where console input goes: hvc0 where the VM has one, else the serial port.
    fn input(&self) -> Option<&OwnedFd> {
        self.hvc.as_ref().or(self.console_in.as_ref())
    }

    fn pump_console_out(&mut self) {
        self.pump_out(false)
    }

    fn pump_hvc_out(&mut self) {
        self.pump_out(true)
    }

    /// Relays the serial console's output (or hvc0's) to the log, readers and terminal.
    fn pump_out(&mut self, hvc: bool) {
        let source = if hvc { &self.hvc } else { &self.console_out };
        let Some(fd) = source.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        loop {
            match read(fd, &mut buf) {
                Some(0) | None => {
                    if hvc {
                        self.hvc = None;
                    } else {
                        self.console_out = None;
                    }
                    break;
                }
                Some(n) if n < 0 => break,
                Some(n) => {
                    let bytes = &buf[..n as usize];
                    self.console.output(bytes);
                    if self.terminal {
                        out.clear();
                        escape(bytes, false, &mut out);
                        write_all(1, &out);
                    }
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
            // The operator's input ended; console readers may still type.
            _ => self.stdin_open = false,
        }
    }

    fn pump_console_in(&mut self) {
        let Some(fd) = self.input().map(|f| f.as_raw_fd()) else {
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
            // The VMM closed its stdin (or ended), or hvc0's backend is gone: input
            // goes nowhere.
            if self.hvc.is_some() {
                self.hvc = None;
            } else {
                self.console_in = None;
            }
            self.pending_in.clear();
        }
    }

    /// Relays whatever is there now, without waiting.
    pub fn drain(&mut self) {
        self.pump_console_out();
        self.pump_hvc_out();
        for l in &mut self.logs {
            l.pump();
        }
    }
}

/// How a supervised VMM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It exited by itself (or of a signal) with this status.
    Exited(i32),
    /// A graceful stop passed its timeout: killed.
    TimedOut,
    /// Destroyed on request (SIGUSR1): killed.
    Destroyed,
    /// Detached, it never reported running: killed, with why.
    NotReady(String),
}

/// Supervisor exit status for a stop that timed out (and killed the VM).
pub const EXIT_TIMED_OUT: i32 = 124;
/// Supervisor exit status for a destroyed VM.
pub const EXIT_DESTROYED: i32 = 137;

/// How long a detached launch waits for the guest to run.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an answer to `GET vm.info` read (the VMM is untrusted).
const READY_MAX: usize = 64 << 10;
/// How long one `vm.info` attempt may take.
const ATTEMPT: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_millis(5);

/// Asks the VM's API, without ever blocking, until it says the guest runs.
pub struct ReadyCheck {
    path: std::path::PathBuf,
    fd: Option<OwnedFd>,
    buf: Vec<u8>,
    next: Instant,
    attempt_end: Instant,
    deadline: Instant,
    timeout: Duration,
    /// Why the last attempt did not say running, for the error.
    last: String,
}

/// Whether `answer` (a whole HTTP response or as much as was read) is a 200 whose
/// body says `"state":"running"` (or `"paused"`: a launch with `--paused`). Looks at the
/// status line and that one field only.
pub fn says_running(answer: &[u8]) -> bool {
    let Some(head_end) = find(answer, b"\r\n\r\n") else {
        return false;
    };
    let status = answer[..head_end]
        .split(|b| *b == b'\n')
        .next()
        .unwrap_or(&[]);
    let ok = status.starts_with(b"HTTP/1.1 200") || status.starts_with(b"HTTP/1.0 200");
    ok && state_is_running(&answer[head_end + 4..])
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `"state"`, optional blanks, `:`, optional blanks, `"running"`, anywhere in the body.
fn state_is_running(body: &[u8]) -> bool {
    let key = b"\"state\"";
    let mut at = 0;
    while let Some(i) = find(&body[at..], key) {
        let mut rest = &body[at + i + key.len()..];
        let skip = |r: &mut &[u8]| {
            while let [b' ' | b'\t' | b'\r' | b'\n', tail @ ..] = *r {
                *r = tail;
            }
        };
        skip(&mut rest);
        if let [b':', tail @ ..] = rest {
            rest = tail;
            skip(&mut rest);
            // Paused: a launch with --paused is up, its vCPUs parked before they ran.
            if rest.starts_with(b"\"running\"") || rest.starts_with(b"\"paused\"") {
                return true;
            }
        }
        at += i + key.len();
    }
    false
}

/// Whether the response in `buf` is complete: its head and Content-Length bytes of body.
fn complete(buf: &[u8]) -> bool {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    buf.len() - (head_end + 4) >= len
}

const REQUEST: &[u8] =
    b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

pub enum Readiness {
    Waiting,
    Running,
    Failed(String),
}

impl ReadyCheck {
    pub fn new(path: std::path::PathBuf, timeout: Duration) -> ReadyCheck {
        let now = Instant::now();
        ReadyCheck {
            path,
            fd: None,
            buf: Vec::new(),
            next: now,
            attempt_end: now,
            deadline: now + timeout,
            timeout,
            last: "no answer".into(),
        }
    }

    /// The descriptor to poll for the answer, if an attempt is on.
    fn poll_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// When the loop must look again at the latest.
    fn wake(&self) -> Instant {
        let t = if self.fd.is_some() {
            self.attempt_end
        } else {
            self.next
        };
        t.min(self.deadline)
    }

    fn retry(&mut self, why: String) {
        self.fd = None;
        self.buf.clear();
        self.last = why;
        self.next = Instant::now() + RETRY;
    }

    /// Starts an attempt when one is due; gives up at the deadline.
    fn tick(&mut self) -> Readiness {
        let now = Instant::now();
        if now >= self.deadline {
            return Readiness::Failed(format!(
                "the VM did not report running within {} s ({}: {})",
                self.timeout.as_secs(),
                self.path.display(),
                self.last
            ));
        }
        if self.fd.is_some() {
            if now >= self.attempt_end {
                self.retry("no answer in time".into());
            }
            return Readiness::Waiting;
        }
        if now < self.next {
            return Readiness::Waiting;
        }
        match connect_nonblocking(&self.path) {
            Ok(fd) => {
                // A fresh socket's buffer takes the short request at once.
                // SAFETY: send from a valid buffer; MSG_NOSIGNAL against SIGPIPE.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        REQUEST.as_ptr() as *const libc::c_void,
                        REQUEST.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n != REQUEST.len() as isize {
                    self.retry(format!("send: {}", std::io::Error::last_os_error()));
                } else {
                    self.fd = Some(fd);
                    self.attempt_end = now + ATTEMPT;
                }
            }
            Err(e) => self.retry(format!("connect: {e}")),
        }
        Readiness::Waiting
    }

    /// The answer's descriptor is readable.
    fn readable(&mut self) -> Readiness {
        let Some(fd) = self.poll_fd() else {
            return Readiness::Waiting;
        };
        let mut chunk = [0u8; 4096];
        loop {
            let room = READY_MAX - self.buf.len();
            match read(fd, &mut chunk[..room.min(4096)]) {
                Some(n) if n > 0 => {
                    self.buf.extend_from_slice(&chunk[..n as usize]);
                    if self.buf.len() < READY_MAX && !complete(&self.buf) {
                        continue;
                    }
                }
                Some(n) if n < 0 => return Readiness::Waiting,
                _ => {}
            }
            break;
        }
        if says_running(&self.buf) {
            self.fd = None;
            return Readiness::Running;
        }
        let status = self
            .buf
            .split(|b| *b == b'\r' || *b == b'\n')
            .next()
            .map(|l| String::from_utf8_lossy(&l[..l.len().min(80)]).into_owned())
            .unwrap_or_default();
        let mut shown = Vec::new();
        escape(status.as_bytes(), true, &mut shown);
        self.retry(format!(
            "answer {:?}, not running",
            String::from_utf8_lossy(&shown)
        ));
        Readiness::Waiting
    }
}

fn connect_nonblocking(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket() with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: connect with a valid, initialised address of its stated size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// What a supervisor carries from one VMM to the next (a reset rebuilds the VM): the
/// stop in progress, and for a detached launch the check that the guest runs and the
/// pipe to the waiting parent.
pub struct Control {
    pub stop_timeout: Duration,
    /// A graceful stop was asked for: the VM is killed at this instant.
    pub kill_at: Option<Instant>,
    last_term: Option<Instant>,
    pub destroy: bool,
    killed: bool,
    timed_out: bool,
    pub ready: Option<ReadyCheck>,
    /// Written `notify_text` (and closed) once the guest runs.
    pub notify: Option<std::fs::File>,
    pub notify_text: String,
}

impl Control {
    pub fn new(stop_timeout: Duration) -> Control {
        Control {
            stop_timeout,
            kill_at: None,
            last_term: None,
            destroy: false,
            killed: false,
            timed_out: false,
            ready: None,
            notify: None,
            notify_text: "R".into(),
        }
    }

    /// Whether a stop or destroy was asked for (a reset then does not rebuild).
    pub fn stopping(&self) -> bool {
        self.kill_at.is_some() || self.destroy
    }
}

/// How often a graceful stop passes SIGTERM on again: a VMM that is PID 1 of its
/// namespace drops a SIGTERM that arrives before it has installed its handler.
const TERM_AGAIN: Duration = Duration::from_millis(500);

/// Waits for `pid`, relaying `relay`, forwarding stop requests and (detached) checking
/// that the guest runs; returns how the VMM ended. `tend` runs at every wake-up while
/// the VMM lives (a child's end is one): it looks after the VM's other cells.
pub fn wait(
    pid: u32,
    signals: &Signals,
    relay: &mut Relay,
    ctl: &mut Control,
    tend: &mut dyn FnMut(&mut Relay, &Control) -> Option<Instant>,
) -> Ending {
    #[derive(Clone, Copy)]
    enum Kind {
        Sig,
        Out,
        Hvc,
        In,
        ToVmm,
        Log(usize),
        Console(crate::console::Token),
        Ready,
    }
    let sigfd = signals.fd();
    ctl.killed = false;
    let mut not_ready: Option<String> = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child, non-blocking.
        if unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) } == pid as i32 {
            relay.drain();
            return if let Some(why) = not_ready {
                Ending::NotReady(why)
            } else if ctl.destroy {
                Ending::Destroyed
            } else if ctl.timed_out {
                Ending::TimedOut
            } else {
                Ending::Exited(status_code(status))
            };
        }
        let tend_again = tend(relay, ctl);
        let mut what: Vec<(RawFd, i16, Kind)> = Vec::new();
        if let Some(f) = &sigfd {
            what.push((f.as_raw_fd(), libc::POLLIN, Kind::Sig));
        }
        if let Some(f) = &relay.console_out {
            what.push((f.as_raw_fd(), libc::POLLIN, Kind::Out));
        }
        if let Some(f) = &relay.hvc {
            what.push((f.as_raw_fd(), libc::POLLIN, Kind::Hvc));
        }
        let room = relay.pending_in.len() < crate::console::INPUT_MAX;
        if let Some(input) = relay.input() {
            if relay.stdin_open && room {
                what.push((0, libc::POLLIN, Kind::In));
            }
            if !relay.pending_in.is_empty() {
                what.push((input.as_raw_fd(), libc::POLLOUT, Kind::ToVmm));
            }
        }
        for (i, l) in relay.logs.iter().enumerate() {
            if l.open {
                what.push((l.fd.as_raw_fd(), libc::POLLIN, Kind::Log(i)));
            }
        }
        let mut console = Vec::new();
        relay
            .console
            .poll_fds(room && relay.input().is_some(), &mut console);
        what.extend(
            console
                .into_iter()
                .map(|(f, e, t)| (f, e, Kind::Console(t))),
        );
        if let Some(fd) = ctl.ready.as_ref().and_then(|r| r.poll_fd()) {
            what.push((fd, libc::POLLIN, Kind::Ready));
        }
        let mut fds: Vec<libc::pollfd> = what
            .iter()
            .map(|&(fd, events, _)| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        // Without a signalfd (or while a stop or a kill is on) look again often.
        let mut wake: Option<Instant> = ctl.ready.as_ref().map(|r| r.wake());
        if let Some(t) = tend_again {
            wake = Some(wake.map_or(t, |w| w.min(t)));
        }
        if sigfd.is_none() || ctl.kill_at.is_some() || ctl.killed {
            let t = Instant::now() + Duration::from_millis(100);
            wake = Some(wake.map_or(t, |w| w.min(t)));
        }
        let timeout = wake.map_or(-1, |w| {
            let ms = w.saturating_duration_since(Instant::now()).as_millis();
            ms.min(1000) as i32 + i32::from(ms == 0 && w > Instant::now())
        });
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
                Kind::Sig => {
                    let mut info = [0u8; 128];
                    while read(p.fd, &mut info).is_some_and(|n| n > 0) {
                        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                        match signo as i32 {
                            libc::SIGTERM | libc::SIGINT | libc::SIGHUP => term = true,
                            libc::SIGUSR1 => ctl.destroy = true,
                            _ => {}
                        }
                    }
                }
                Kind::Out => relay.pump_console_out(),
                Kind::Hvc => relay.pump_hvc_out(),
                Kind::In => relay.pump_stdin(),
                Kind::ToVmm => relay.pump_console_in(),
                Kind::Log(i) => {
                    relay.logs[i].pump();
                }
                Kind::Console(t) => relay.console.ready(t, p.revents, &mut relay.pending_in),
                Kind::Ready => {
                    if let Some(r) = ctl.ready.as_mut() {
                        if let Readiness::Running = r.readable() {
                            ctl.ready = None;
                            if let Some(mut n) = ctl.notify.take() {
                                use std::io::Write;
                                let _ = n.write_all(ctl.notify_text.as_bytes());
                            }
                        }
                    }
                }
            }
        }
        relay.console.sweep();
        if sigfd.is_none() {
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: sigtimedwait with a valid set and timeout; no siginfo wanted.
            let sig = unsafe { libc::sigtimedwait(&signals.set, std::ptr::null_mut(), &zero) };
            term |= matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGHUP);
            ctl.destroy |= sig == libc::SIGUSR1;
        }
        if let Some(r) = ctl.ready.as_mut() {
            if let Readiness::Failed(why) = r.tick() {
                ctl.ready = None;
                not_ready = Some(why);
            }
        }
        let now = Instant::now();
        if term && ctl.kill_at.is_none() {
            ctl.kill_at = Some(now + ctl.stop_timeout);
        }
        if ctl.destroy || not_ready.is_some() || ctl.kill_at.is_some_and(|t| now > t) {
            if !ctl.destroy && not_ready.is_none() {
                ctl.timed_out = true;
            }
            if !ctl.killed {
                // SAFETY: kill our own child (not yet reaped).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                ctl.killed = true;
            }
        } else if ctl.kill_at.is_some() && ctl.last_term.is_none_or(|t| now >= t + TERM_AGAIN) {
            // SAFETY: kill our own child (not yet reaped).
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            ctl.last_term = Some(now);
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

pub fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

#[cfg(test)]
mod tests {
    use super::{complete, escape, says_running};

    /// Drives a check against `answers` (one per connection) until it says running or
    /// gives up; returns whether it ran and how many connections the server saw.
    fn check_against(answers: Vec<Vec<u8>>, timeout: std::time::Duration) -> (bool, usize) {
        use super::{Readiness, ReadyCheck};
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!(
            "cellvm-ready-{}-{}",
            std::process::id(),
            answers.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let mut n = 0;
            l.set_nonblocking(true).unwrap();
            for a in answers {
                let idle = std::time::Instant::now();
                let mut c = loop {
                    match l.accept() {
                        Ok((c, _)) => break Some(c),
                        Err(_) if idle.elapsed() < std::time::Duration::from_secs(1) => {
                            std::thread::sleep(std::time::Duration::from_millis(1))
                        }
                        Err(_) => break None,
                    }
                };
                let Some(mut c) = c.take() else { break };
                c.set_nonblocking(false).unwrap();
                n += 1;
                let mut req = [0u8; 512];
                let got = c.read(&mut req).unwrap_or(0);
                assert!(req[..got].starts_with(b"GET /api/v1/vm.info HTTP/1.1\r\n"));
                let _ = c.write_all(&a);
                // Held open: the check must not wait for the end of the stream.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            n
        });
        let mut r = ReadyCheck::new(path, timeout);
        let ran = loop {
            match r.tick() {
                Readiness::Failed(_) => break false,
                Readiness::Running => break true,
                Readiness::Waiting => {}
            }
            if let Some(fd) = r.poll_fd() {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll on one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 20) };
                if p.revents != 0 {
                    if let Readiness::Running = r.readable() {
                        break true;
                    }
                }
            } else {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        drop(r);
        let n = server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (ran, n)
    }

    #[test]
    fn the_ready_check_retries_until_running_and_bounds_what_it_reads() {
        let created =
            b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\n{\"state\":\"created\"}".to_vec();
        let running =
            b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\n{\"state\":\"running\"}".to_vec();
        // A hostile VMM: an endless head; the check reads at most READY_MAX of it.
        let endless = [b"HTTP/1.1 200 OK\r\nX: ".to_vec(), vec![b'a'; 1 << 20]].concat();
        let (ran, n) = check_against(
            vec![created.clone(), endless, running],
            std::time::Duration::from_secs(10),
        );
        assert!(ran);
        assert_eq!(n, 3);
        // Never running: it gives up at its deadline.
        let t = std::time::Instant::now();
        let (ran, _) = check_against(vec![created; 1000], std::time::Duration::from_millis(300));
        assert!(!ran);
        assert!(t.elapsed() < std::time::Duration::from_secs(3));
    }

    #[test]
    fn running_is_a_200_whose_state_field_says_so_and_nothing_else() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{\"id\":\"a\",\"state\" : \"running\",\"x\":1}";
        assert!(says_running(ok));
        assert!(says_running(
            b"HTTP/1.1 200 OK\r\n\r\n{\"devices\":[],\"state\":\"running\"}"
        ));
        // A launch with --paused is up once its vCPUs are parked.
        assert!(says_running(
            b"HTTP/1.1 200 OK\r\n\r\n{\"state\":\"paused\",\"reason\":\"user\"}"
        ));
        for no in [
            &b"HTTP/1.1 200 OK\r\n\r\n{\"state\":\"created\"}"[..],
            b"HTTP/1.1 200 OK\r\n\r\n{\"state\":\"ended\",\"reason\":\"running\"}",
            b"HTTP/1.1 503 Busy\r\n\r\n{\"state\":\"running\"}",
            b"HTTP/1.1 200 OK\r\nX-State: \"state\":\"running\"\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\n{\"state\":\"running\"}",
            b"garbage",
            b"",
        ] {
            assert!(!says_running(no), "{}", String::from_utf8_lossy(no));
        }
        assert!(!complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"
        ));
        assert!(complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n12345"
        ));
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"));
    }

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
