//! A small HTTP/1.1 client over a Unix stream socket, for the VMs' API sockets: one
//! request at a time on a kept-alive connection, bodies framed by `Content-Length` only
//! (the API never sends chunked bodies, and a response that tries is refused), every
//! connect, write and read bounded by one deadline, the head by 8 KiB and the body by
//! 1 MiB. Hand-written rather than hyper: the API's handful of fixed requests need no
//! runtime, and what matters here is a client that cannot hang or grow without bound
//! whatever the (untrusted) VMM at the other end sends.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The longest response head read (status line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// The longest response body read.
pub const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no answer within {ms} ms")]
    Timeout { path: String, ms: u128 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: the connection closed before the whole response came")]
    Closed { path: String },
    #[error("{path}: malformed response: {why}")]
    Malformed { path: String, why: String },
}

impl Error {
    /// The errno of a failed connect (ENOENT, ECONNREFUSED, EACCES...), if that is what
    /// this is.
    pub fn connect_errno(&self) -> Option<i32> {
        match self {
            Error::Connect { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// One response: its status and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// What an error response says: the `error` field of its JSON body, else its text,
    /// at most 300 characters.
    pub fn message(&self) -> String {
        let text = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string());
        text.chars().take(300).collect()
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A connection to one API socket.
pub struct Client {
    stream: UnixStream,
    path: String,
    /// Bytes read past the end of the last response.
    pending: Vec<u8>,
    /// The server said `Connection: close`: no further request on this connection.
    closed: bool,
}

fn remaining(path: &str, deadline: Instant, total: Duration) -> Result<Duration, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout {
            path: path.into(),
            ms: total.as_millis(),
        });
    }
    Ok(left)
}

/// The socket address of `path`, or ENAMETOOLONG for a path that does not fit.
pub(crate) fn unix_addr(path: &Path) -> std::io::Result<libc::sockaddr_un> {
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address to fill in.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(addr)
}

/// A new non-blocking, close-on-exec Unix stream socket.
pub(crate) fn stream_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One non-blocking connect of `fd` to `addr`: Ok(true) connected, Ok(false) the
/// listener's backlog is full (it may drain: try again), else the error.
pub(crate) fn try_connect(fd: &OwnedFd, addr: &libc::sockaddr_un) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: addr is a valid sockaddr_un of the size passed.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Connects to a Unix stream socket, waiting at most `timeout` (a full listen backlog
/// makes a blocking connect wait for ever; this one retries a non-blocking connect).
pub fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, Error> {
    let shown = path.display().to_string();
    let fail = |source: std::io::Error| Error::Connect {
        path: shown.clone(),
        source,
    };
    let addr = unix_addr(path).map_err(fail)?;
    let fd = stream_socket().map_err(fail)?;
    let deadline = Instant::now() + timeout;
    while !try_connect(&fd, &addr).map_err(fail)? {
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                path: shown,
                ms: timeout.as_millis(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false).map_err(fail)?;
    Ok(stream)
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, Error> {
        Ok(Client {
            stream: connect(path, timeout)?,
            path: path.display().to_string(),
            pending: Vec::new(),
            closed: false,
        })
    }

    /// Sends one request and reads its whole response, all within `timeout`.
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Response, Error> {
        self.request_with_fds(method, target, body, &[], timeout)
    }

    /// The same, with `fds` sent along with the request's first bytes (SCM_RIGHTS): how
    /// a snapshot's files reach a VMM that opens no path.
    pub fn request_with_fds(
        &mut self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
        fds: &[std::os::fd::RawFd],
        timeout: Duration,
    ) -> Result<Response, Error> {
        if self.closed {
            return Err(Error::Closed {
                path: self.path.clone(),
            });
        }
        let deadline = Instant::now() + timeout;
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\n");
        if let Some(b) = body {
            req.push_str("Content-Type: application/json\r\n");
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        } else if method != "GET" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        let mut out = req.into_bytes();
        out.extend_from_slice(body.unwrap_or_default());
        let left = remaining(&self.path, deadline, timeout)?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| self.io(e))?;
        let sent = if fds.is_empty() {
            0
        } else {
            send_with_fds(&self.stream, &out, fds).map_err(|e| self.timeout_or(e, timeout))?
        };
        if let Err(e) = self.stream.write_all(&out[sent..]) {
            return Err(self.timeout_or(e, timeout));
        }
        let response = self.read_response(method, deadline, timeout);
        if response.is_err() {
            // Whatever is left of a broken response must not be read as the next one.
            self.closed = true;
        }
        response
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn timeout_or(&self, e: std::io::Error, total: Duration) -> Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout {
                path: self.path.clone(),
                ms: total.as_millis(),
            },
            _ => self.io(e),
        }
    }

    fn malformed(&self, why: impl Into<String>) -> Error {
        Error::Malformed {
            path: self.path.clone(),
            why: why.into(),
        }
    }

    /// Reads more bytes into `pending`; Ok(false) at end of stream.
    fn fill(&mut self, deadline: Instant, total: Duration) -> Result<bool, Error> {
        let left = remaining(&self.path, deadline, total)?;
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| self.io(e))?;
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.timeout_or(e, total)),
            }
        }
    }

    fn read_response(
        &mut self,
        method: &str,
        deadline: Instant,
        total: Duration,
    ) -> Result<Response, Error> {
        loop {
            match parse_response(&self.pending, method, MAX_BODY)
                .map_err(|why| self.malformed(why))?
            {
                Some((response, used, close)) => {
                    self.pending.drain(..used);
                    self.closed |= close;
                    return Ok(response);
                }
                None => {
                    if !self.fill(deadline, total)? {
                        return Err(Error::Closed {
                            path: self.path.clone(),
                        });
                    }
                }
            }
        }
    }
}

/// What `buf` holds of one response to `method`: `Ok(None)` while more bytes are
/// needed, else the response, the bytes it took and whether the server closes the
/// connection after it. A head over `MAX_HEAD` or a body over `max_body` is refused.
pub(crate) fn parse_response(
    buf: &[u8],
    method: &str,
    max_body: usize,
) -> Result<Option<(Response, usize, bool)>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(format!("head longer than {MAX_HEAD} bytes"));
        }
        return Ok(None);
    };
    if head_end + 4 > MAX_HEAD {
        return Err(format!("head longer than {MAX_HEAD} bytes"));
    }
    let head = parse_head(&buf[..head_end])?;
    let no_body = method == "HEAD" || head.status / 100 == 1 || matches!(head.status, 204 | 304);
    let len = match (no_body, head.content_length) {
        (true, _) => 0,
        (false, Some(n)) => n,
        (false, None) => return Err(format!("status {} without Content-Length", head.status)),
    };
    if len > max_body {
        return Err(format!(
            "Content-Length {len} exceeds the {max_body}-byte limit"
        ));
    }
    let start = head_end + 4;
    if buf.len() - start < len {
        return Ok(None);
    }
    let response = Response {
        status: head.status,
        body: buf[start..start + len].to_vec(),
    };
    Ok(Some((response, start + len, head.close)))
}

/// sendmsg of (the start of) `data` with `fds` as one SCM_RIGHTS message; returns the
/// bytes sent.
fn send_with_fds(
    stream: &UnixStream,
    data: &[u8],
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: the msghdr points at one live iovec and a control buffer of `space` bytes
    // (8-byte aligned), which holds exactly one cmsghdr with the descriptors.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, fds.len());
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One request on a fresh connection, connect included within `timeout`.
pub fn request(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, Error> {
    let start = Instant::now();
    let mut c = Client::connect(socket, timeout)?;
    let left = timeout.saturating_sub(start.elapsed());
    if left.is_zero() {
        return Err(Error::Timeout {
            path: socket.display().to_string(),
            ms: timeout.as_millis(),
        });
    }
    c.request(method, target, body, left).map_err(|e| match e {
        Error::Timeout { path, .. } => Error::Timeout {
            path,
            ms: timeout.as_millis(),
        },
        e => e,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    content_length: Option<usize>,
    close: bool,
}

/// The status line and the headers this client acts on.
fn parse_head(bytes: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .ok_or_else(|| format!("status line {:?} is not HTTP/1.x", clip(status_line)))?;
    let code = rest.get(..3).unwrap_or_default();
    if code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
        || rest.len() > 3 && !rest[3..].starts_with(' ')
    {
        return Err(format!(
            "status line {:?}: no 3-digit status",
            clip(status_line)
        ));
    }
    let status: u16 = code.parse().map_err(|_| "status".to_string())?;
    if !(100..=599).contains(&status) {
        return Err(format!("status {status} out of range"));
    }
    let mut head = Head {
        status,
        content_length: None,
        close: status_line.starts_with("HTTP/1.0"),
    };
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {:?} has no ':'", clip(line)))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) || value.len() > 12 {
                return Err(format!("Content-Length {:?} is not a number", clip(value)));
            }
            let n: usize = value.parse().map_err(|_| "Content-Length".to_string())?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err("two different Content-Length headers".into());
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!(
                "Transfer-Encoding {:?}: only Content-Length bodies are read",
                clip(value)
            ));
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(head)
}

/// At most 60 characters of untrusted text, for an error message.
fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    fn sock(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cellvmctl-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A server that answers each request on one connection with the next of `replies`,
    /// and hands back what it was sent.
    fn serve(path: &Path, replies: Vec<Vec<u8>>) -> std::thread::JoinHandle<Vec<u8>> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            for r in replies {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                s.write_all(&r).unwrap();
            }
            got
        })
    }

    #[test]
    fn reads_a_json_body_and_a_204_on_one_kept_alive_connection() {
        let p = sock("keepalive");
        let srv = serve(
            &p,
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 14\r\n\r\n{\"state\":\"ok\"}".to_vec(),
                b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            ],
        );
        let mut c = Client::connect(&p, Duration::from_secs(2)).unwrap();
        let r = c
            .request("GET", "/api/v1/vm.info", None, Duration::from_secs(2))
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json().unwrap()["state"], "ok");
        let r = c
            .request("PUT", "/api/v1/vm.pause", None, Duration::from_secs(2))
            .unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
        let sent = String::from_utf8(srv.join().unwrap()).unwrap();
        assert!(
            sent.starts_with("GET /api/v1/vm.info HTTP/1.1\r\n"),
            "{sent}"
        );
        assert!(
            sent.contains(
                "PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
            ),
            "{sent}"
        );
    }

    #[test]
    fn a_request_body_goes_with_its_length() {
        let p = sock("body");
        let srv = serve(
            &p,
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n{\"result\":\"powered-off\"}"
                    .to_vec(),
            ],
        );
        let r = request(
            &p,
            "PUT",
            "/api/v1/vm.shutdown",
            Some(br#"{"timeout_ms":5000}"#),
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(r.json().unwrap()["result"], "powered-off");
        let sent = String::from_utf8(srv.join().unwrap()).unwrap();
        assert!(
            sent.ends_with("Content-Length: 19\r\n\r\n{\"timeout_ms\":5000}"),
            "{sent}"
        );
    }

    #[test]
    fn an_error_response_gives_its_message() {
        let p = sock("err");
        let _srv = serve(
            &p,
            vec![b"HTTP/1.1 409 Conflict\r\nContent-Length: 31\r\n\r\n{\"error\":\"a job runs: snap-1\"}\n".to_vec()],
        );
        let r = request(&p, "PUT", "/api/v1/vm.pause", None, Duration::from_secs(2)).unwrap();
        assert_eq!(
            (r.status, r.message().as_str()),
            (409, "a job runs: snap-1")
        );
    }

    #[test]
    fn a_silent_server_times_out_instead_of_hanging() {
        let p = sock("silent");
        let l = UnixListener::bind(&p).unwrap();
        let start = Instant::now();
        let e = request(
            &p,
            "GET",
            "/api/v1/vm.info",
            None,
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Timeout { ms: 200, .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
        drop(l);
    }

    #[test]
    fn a_full_backlog_times_out_instead_of_blocking_in_connect() {
        let p = sock("backlog");
        let l = UnixListener::bind(&p).unwrap();
        // SAFETY: listen(2) on a socket this test owns.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::listen(l.as_raw_fd(), 0)
        };
        let mut held = Vec::new();
        let mut timed_out = false;
        for _ in 0..64 {
            match connect(&p, Duration::from_millis(50)) {
                Ok(s) => held.push(s),
                Err(Error::Timeout { .. }) => {
                    timed_out = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            timed_out,
            "a backlog of 0 filled after {} connects",
            held.len()
        );
    }

    #[test]
    fn oversized_and_malformed_responses_are_refused() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "big-head",
                {
                    let mut v = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
                    v.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
                    v
                },
                "head longer than",
            ),
            (
                "big-body",
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
                "exceeds the 1048576-byte limit",
            ),
            (
                "chunked",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
                "only Content-Length bodies",
            ),
            (
                "no-length",
                b"HTTP/1.1 200 OK\r\n\r\n{}".to_vec(),
                "status 200 without Content-Length",
            ),
            ("not-http", b"SSH-2.0-x\r\n\r\n".to_vec(), "is not HTTP/1.x"),
            (
                "bad-length",
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n".to_vec(),
                "is not a number",
            ),
            (
                "two-lengths",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(),
                "two different Content-Length",
            ),
        ];
        for (name, reply, want) in cases {
            let p = sock(name);
            let l = UnixListener::bind(&p).unwrap();
            let t = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(&reply);
                std::thread::sleep(Duration::from_millis(300));
            });
            let e = request(&p, "GET", "/api/v1/vm.info", None, Duration::from_secs(2))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{name}: {e}");
            t.join().unwrap();
        }
    }

    #[test]
    fn a_response_cut_short_is_an_error() {
        let p = sock("short");
        let l = UnixListener::bind(&p).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"a\"");
        });
        let e = request(&p, "GET", "/x", None, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(e, Error::Closed { .. }), "{e}");
    }

    #[test]
    fn a_missing_socket_is_a_connect_error_with_its_errno() {
        let p = sock("absent");
        let e = request(&p, "GET", "/x", None, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.connect_errno(), Some(libc::ENOENT), "{e}");
    }
}
