//! `cellvmctl console ID`: attaches to the supervisor's console socket. What the guest
//! writes goes to stdout with terminal controls escaped (the guest is untrusted: it
//! must not drive the operator's terminal); what is typed goes to the guest. With a
//! terminal on stdin it is put in raw mode (restored on every exit path) and Ctrl-]
//! detaches, as in virsh; without one, input is passed until its end and the guest's
//! output is followed until the console closes (the VM ended) or Ctrl-] comes in.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::host::{self, Error};
use crate::http;

/// Ctrl-]: the detach key.
pub const DETACH: u8 = 0x1d;

/// How an attach ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The operator pressed Ctrl-].
    Detached,
    /// The supervisor closed the console (the VM ended).
    Closed,
}

/// The terminal's settings before raw mode, put back on drop.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: isatty on a descriptor number; no memory involved.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is valid storage for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal; saved is valid for writes.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: raw is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd is a terminal; raw is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Where input up to the detach key ends: Some(n) if byte n is Ctrl-].
pub fn detach_at(input: &[u8]) -> Option<usize> {
    input.iter().position(|&b| b == DETACH)
}

/// Guest output made safe for a terminal: newlines, carriage returns and tabs pass,
/// every other control byte (ESC first of all) is written as `\xNN`.
pub fn escape_output(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    cellvm_jailer::supervise::escape(bytes, false, &mut out);
    out
}

pub fn connect(host: &host::Host, id: &str) -> Result<UnixStream, Error> {
    let sock = host.vm_dir(id).join(host::CONSOLE_SOCKET);
    http::connect(&sock, Duration::from_secs(2)).map_err(|e| host::api_error(id, &sock, e))
}

/// Attaches stdin and stdout to the console of `id` until detach or close.
pub fn attach(host: &host::Host, id: &str) -> Result<End, Error> {
    let mut sock = connect(host, id)?;
    let raw = RawMode::enter(0);
    let nl = if raw.is_some() { "\r\n" } else { "\n" };
    eprint!("Connected to VM {id}{nl}Escape character is ^] (Ctrl + ]){nl}");
    let end = relay(&mut sock, 0, &mut std::io::stdout().lock())
        .map_err(|e| Error::Other(format!("vm {id}: console: {e}")))?;
    drop(raw);
    if end == End::Closed {
        eprintln!("\nVM {id}: console closed");
    }
    Ok(end)
}

/// Copies `input_fd` to the socket and the socket (escaped) to `out`.
pub fn relay(sock: &mut UnixStream, input_fd: i32, out: &mut dyn Write) -> std::io::Result<End> {
    let mut input_open = true;
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if input_open { input_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            match sock.read(&mut buf) {
                Ok(0) => return Ok(End::Closed),
                Ok(n) => {
                    out.write_all(&escape_output(&buf[..n]))?;
                    out.flush()?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(End::Closed)
                }
                Err(e) => return Err(e),
            }
        }
        if fds[1].revents != 0 {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::read(input_fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    input_open = false;
                }
                continue;
            }
            let typed = &buf[..n as usize];
            if typed.is_empty() {
                input_open = false;
                continue;
            }
            let send = detach_at(typed).map_or(typed, |at| &typed[..at]);
            if !send.is_empty() {
                if let Err(e) = sock.write_all(send) {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(End::Closed);
                    }
                    return Err(e);
                }
            }
            if detach_at(typed).is_some() {
                return Ok(End::Detached);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_close_bracket_detaches_and_what_came_before_it_is_sent() {
        assert_eq!(detach_at(b"ls\r"), None);
        assert_eq!(detach_at(b"ab\x1dcd"), Some(2));
    }

    #[test]
    fn guest_escape_sequences_never_reach_the_terminal() {
        assert_eq!(
            escape_output(b"tick 1\r\n\x1b]0;owned\x07\x1b[2J"),
            b"tick 1\r\n\\x1b]0;owned\\x07\\x1b[2J".to_vec()
        );
    }

    #[test]
    fn relay_passes_input_and_escaped_output_and_stops_at_ctrl_close_bracket() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let mut pipe = [0i32; 2];
        // SAFETY: pipe fills the two descriptors it creates.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        let guest = std::thread::spawn(move || {
            theirs.write_all(b"login: \x1b[31m").unwrap();
            let mut got = [0u8; 3];
            theirs.read_exact(&mut got).unwrap();
            got
        });
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: writes to the pipe's write end, owned by this test.
        unsafe { libc::write(pipe[1], b"me\n\x1dtail".as_ptr().cast(), 8) };
        let mut out = Vec::new();
        let end = relay(&mut ours, pipe[0], &mut out).unwrap();
        assert_eq!(end, End::Detached);
        assert_eq!(
            &guest.join().unwrap(),
            b"me\n",
            "input up to Ctrl-] reached the guest"
        );
        assert_eq!(out, b"login: \\x1b[31m".to_vec());
        // SAFETY: closes the pipe's two descriptors, owned by this test.
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
    }

    #[test]
    fn relay_ends_when_the_console_closes_even_with_input_at_its_end() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let closer = std::thread::spawn(move || {
            let mut theirs = theirs;
            theirs.write_all(b"bye\n").unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        let mut out = Vec::new();
        let end = relay(&mut ours, devnull.as_raw_fd(), &mut out).unwrap();
        closer.join().unwrap();
        assert_eq!((end, out), (End::Closed, b"bye\n".to_vec()));
    }
}
