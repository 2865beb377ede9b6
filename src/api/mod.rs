//! The VM's API: HTTP/1.1 with JSON bodies on a Unix stream socket (see api/openapi.yaml),
//! served by a thread of its own under its own seccomp profile (`vmm/api`). The thread
//! never blocks on a client: nonblocking sockets and one epoll. What it can answer from
//! the VM's shared status (info, counters, jobs, metrics) it answers itself; operations
//! (pause, resume, power button, shutdown, reboot) go to the main loop, whose replies come
//! back through a mailbox.
//!
//! Limits: a request head of at most 8 KiB (431), a body of at most 64 KiB (413, answered
//! without reading it), a request (head and body) complete within 5 s of the connection
//! waiting for one (408, then close; an idle keep-alive connection ends the same way), an
//! answer taken by the client within 5 s (else the connection is dropped), at most 64
//! connections (503 and close beyond).

pub mod http;
pub mod render;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::vmm::mailbox::Mailbox;
use crate::vmm::state::Status;
use crate::vmm::MainMsg;

/// The most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send a whole request, or to take an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An operation the main loop carries out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Pause,
    Resume,
    PowerButton,
    Shutdown {
        timeout_ms: u64,
    },
    Reboot,
    /// Ends a running job early (today: a shutdown's wait).
    Cancel {
        job: u64,
    },
    /// Saves the paused VM into the two files whose descriptors came with the request
    /// (SCM_RIGHTS: the state file, then the memory file); the VMM opens no path.
    /// `incremental`: the memory file is this VM's last snapshot's, and only the chunks
    /// the guest wrote since are written into it.
    Snapshot {
        incremental: bool,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Pause => "vm.pause",
            Op::Resume => "vm.resume",
            Op::PowerButton => "vm.power-button",
            Op::Shutdown { .. } => "vm.shutdown",
            Op::Reboot => "vm.reboot",
            Op::Cancel { .. } => "vm.jobs.cancel",
            Op::Snapshot { .. } => "vm.snapshot",
        }
    }
}

/// An operation from connection `conn`.
#[derive(Debug)]
pub struct ApiCall {
    pub conn: u64,
    pub op: Op,
    /// The descriptors that came with the request (at most MAX_FDS).
    pub fds: Vec<OwnedFd>,
}

/// The most descriptors one request may carry (a snapshot's two files).
pub const MAX_FDS: usize = 2;

/// The main loop's answer to `conn`; `then_exit`: the VMM exits once it is written, and
/// waits (briefly) for `MainMsg::Flushed(conn)`.
#[derive(Debug)]
pub struct ApiReply {
    pub conn: u64,
    pub response: Response,
    pub then_exit: bool,
}

/// An HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    pub fn no_content() -> Response {
        Response {
            status: 204,
            content_type: "",
            body: Vec::new(),
            allow: None,
        }
    }

    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: body.into_bytes(),
            allow: None,
        }
    }

    /// `{"error": message}`; the message names the field or part of the request.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, serde_json::json!({ "error": message }).to_string())
    }

    pub fn text(body: String) -> Response {
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: body.into_bytes(),
            allow: None,
        }
    }

    /// The bytes on the wire; `close` adds `Connection: close`.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            409 => "Conflict",
            413 => "Content Too Large",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            _ => "Unknown",
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        if self.status != 204 {
            head.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// Starts the API thread on `listener`.
pub fn spawn(
    listener: OwnedFd,
    status: Arc<Status>,
    main: Arc<Mailbox<MainMsg>>,
    replies: Arc<Mailbox<ApiReply>>,
    seccomp: crate::seccomp::Mode,
) -> std::io::Result<()> {
    set_nonblocking(listener.as_raw_fd())?;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        replies.fd(),
        EpollEvent::new(EventSet::IN, REPLIES),
    )?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Built before the filter: a HashMap's first use in a thread seeds it from
            // getrandom, which the profile does not have.
            let server = Server {
                epoll,
                listener,
                status,
                main,
                replies,
                conns: HashMap::new(),
                next: FIRST_CONN,
            };
            if let Err(e) = crate::seccomp::install("vmm", "api", seccomp) {
                log::error!("api: {e}");
                return;
            }
            server.run()
        })?;
    Ok(())
}

const LISTENER: u64 = 0;
const REPLIES: u64 = 1;
const FIRST_CONN: u64 = 2;
/// `Conn::interest` of a connection taken out of epoll.
const UNWATCHED: u32 = u32::MAX;

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    let mut on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one int from the pointer.
    if unsafe { libc::ioctl(fd, libc::FIONBIO, &mut on) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Default)]
struct Conn {
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Request (or, with output pending, answer) due by then.
    deadline: Option<Instant>,
    /// An operation is with the main loop.
    inflight: bool,
    /// Close once the output is written.
    close: bool,
    /// Tell the main loop once the output is written (the VMM exits after it).
    flush_note: bool,
    /// The client sent EOF.
    eof: bool,
    /// The current epoll interest.
    interest: u32,
    /// Descriptors received with the bytes in `rbuf` (SCM_RIGHTS), for the request
    /// they came with; more than MAX_FDS and the request is refused.
    fds: Vec<OwnedFd>,
    too_many_fds: bool,
}

struct Server {
    epoll: Epoll,
    listener: OwnedFd,
    status: Arc<Status>,
    main: Arc<Mailbox<MainMsg>>,
    replies: Arc<Mailbox<ApiReply>>,
    conns: HashMap<u64, (OwnedFd, Conn)>,
    next: u64,
}

impl Server {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let now = Instant::now();
            let timeout = self
                .conns
                .values()
                .filter_map(|(_, c)| c.deadline)
                .min()
                .map_or(-1, |d| {
                    d.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1
                });
            let ready = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => 0,
                Err(e) => {
                    log::error!("api: epoll: {e}");
                    return;
                }
            };
            for ev in &events[..ready] {
                match ev.data() {
                    LISTENER => self.accept(),
                    REPLIES => {
                        for reply in self.replies.drain() {
                            self.answer(reply);
                        }
                    }
                    id => self.ready(id, ev.event_set()),
                }
            }
            self.expire();
        }
    }

    fn accept(&mut self) {
        loop {
            // SAFETY: accept4 with no address buffers; the result is a new descriptor.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return;
            }
            // SAFETY: accept4 returned a descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if self.conns.len() >= MAX_CONNECTIONS {
                let r = Response::error(
                    503,
                    &format!("connections: {MAX_CONNECTIONS} already open; try again"),
                );
                write_some(fd.as_raw_fd(), &r.to_bytes(true));
                continue;
            }
            let id = self.next;
            self.next += 1;
            let interest = (EventSet::IN | EventSet::READ_HANG_UP).bits();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::from_bits_truncate(interest), id),
                )
                .is_err()
            {
                continue;
            }
            let conn = Conn {
                deadline: Some(Instant::now() + REQUEST_TIMEOUT),
                interest,
                ..Default::default()
            };
            self.conns.insert(id, (fd, conn));
        }
    }

    fn ready(&mut self, id: u64, events: EventSet) {
        let Some((fd, conn)) = self.conns.get_mut(&id) else {
            return;
        };
        if events.contains(EventSet::OUT) && !conn.wbuf.is_empty() {
            flush(fd.as_raw_fd(), conn);
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) && !conn.eof
        {
            read_into(fd.as_raw_fd(), conn);
        }
        if events.contains(EventSet::ERROR) {
            conn.eof = true;
            conn.wbuf.clear();
        }
        self.process(id);
    }

    /// Serves whatever requests the connection's buffer holds, one at a time.
    fn process(&mut self, id: u64) {
        let Some((fd, conn)) = self.conns.get_mut(&id) else {
            return;
        };
        while !conn.inflight && conn.wbuf.is_empty() && !conn.close {
            match http::parse(&conn.rbuf) {
                http::Parsed::Partial => break,
                http::Parsed::Reject(r) => {
                    conn.rbuf.clear();
                    queue(conn, &r, true);
                }
                http::Parsed::Request {
                    action,
                    consumed,
                    close,
                } => {
                    conn.rbuf.drain(..consumed);
                    conn.deadline = None;
                    if !matches!(action, http::Action::Op(_)) {
                        conn.fds.clear();
                        conn.too_many_fds = false;
                    }
                    let answer = match action {
                        http::Action::Info => render::info(&self.status),
                        http::Action::Counters => render::counters(&self.status),
                        http::Action::Jobs => render::jobs(&self.status),
                        http::Action::Metrics => render::metrics(&self.status),
                        http::Action::Respond(r) => r,
                        http::Action::Op(_) if std::mem::take(&mut conn.too_many_fds) => {
                            conn.fds.clear();
                            Response::error(
                                400,
                                &format!("descriptors: more than {MAX_FDS} came with the request"),
                            )
                        }
                        http::Action::Op(op) => {
                            conn.inflight = true;
                            conn.close = close;
                            // Descriptors go with the request that uses them; any other
                            // request's are closed.
                            let fds = if matches!(op, Op::Snapshot { .. }) {
                                std::mem::take(&mut conn.fds)
                            } else {
                                conn.fds.clear();
                                Vec::new()
                            };
                            self.main.post(MainMsg::Api(ApiCall { conn: id, op, fds }));
                            break;
                        }
                    };
                    queue(conn, &answer, close);
                }
            }
            flush(fd.as_raw_fd(), conn);
        }
        self.settle(id);
    }

    /// A reply from the main loop.
    fn answer(&mut self, reply: ApiReply) {
        let Some((fd, conn)) = self.conns.get_mut(&reply.conn) else {
            if reply.then_exit {
                self.main.post(MainMsg::Flushed(reply.conn));
            }
            return;
        };
        conn.inflight = false;
        conn.flush_note |= reply.then_exit;
        let close = conn.close || reply.then_exit;
        conn.close = false;
        queue(conn, &reply.response, close);
        flush(fd.as_raw_fd(), conn);
        self.process(reply.conn);
    }

    /// After any change: close a finished connection, or set what epoll watches.
    fn settle(&mut self, id: u64) {
        let Some((fd, conn)) = self.conns.get_mut(&id) else {
            return;
        };
        let done_writing = conn.wbuf.is_empty();
        if done_writing && conn.flush_note {
            conn.flush_note = false;
            self.main.post(MainMsg::Flushed(id));
        }
        // A connection that asked to close is closed once its operation has answered,
        // never while the main loop still runs it.
        if done_writing && !conn.inflight && (conn.close || conn.eof) {
            self.drop_conn(id);
            return;
        }
        if conn.eof && conn.inflight {
            // Gone while its operation runs: out of epoll (a hang-up is reported
            // for as long as it is watched), dropped when the reply comes.
            if conn.interest != UNWATCHED {
                conn.interest = UNWATCHED;
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    fd.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            return;
        }
        if done_writing && !conn.inflight && conn.deadline.is_none() {
            // Waiting for the next request from here.
            conn.deadline = Some(Instant::now() + REQUEST_TIMEOUT);
        }
        let want = if !done_writing {
            EventSet::OUT
        } else if conn.inflight || conn.eof {
            // Nothing to read now: only a hang-up (always reported) matters.
            EventSet::empty()
        } else {
            EventSet::IN | EventSet::READ_HANG_UP
        };
        if want.bits() != conn.interest {
            conn.interest = want.bits();
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                fd.as_raw_fd(),
                EpollEvent::new(want, id),
            );
        }
    }

    fn drop_conn(&mut self, id: u64) {
        if let Some((fd, conn)) = self.conns.remove(&id) {
            if conn.flush_note {
                self.main.post(MainMsg::Flushed(id));
            }
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                fd.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Connections past their deadline: 408 for a request not complete in time, a
    /// plain close for an answer the client does not take.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, (_, c))| c.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let Some((fd, conn)) = self.conns.get_mut(&id) else {
                continue;
            };
            if conn.wbuf.is_empty() && !conn.inflight {
                conn.rbuf.clear();
                let r = Response::error(
                    408,
                    &format!(
                        "request: not complete within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    ),
                );
                queue(conn, &r, true);
                flush(fd.as_raw_fd(), conn);
                // One more chance to take the 408, then gone.
                conn.wbuf.clear();
                self.drop_conn(id);
            } else if !conn.inflight {
                self.drop_conn(id);
            } else {
                conn.deadline = None;
            }
        }
    }
}

fn queue(conn: &mut Conn, r: &Response, close: bool) {
    conn.wbuf.extend_from_slice(&r.to_bytes(close));
    conn.close |= close;
    conn.deadline = Some(Instant::now() + REQUEST_TIMEOUT);
}

/// Writes what it can without blocking.
fn flush(fd: RawFd, conn: &mut Conn) {
    let n = write_some(fd, &conn.wbuf);
    match n {
        Some(n) => {
            conn.wbuf.drain(..n);
            if conn.wbuf.is_empty() {
                conn.deadline = None;
            }
        }
        None => {
            // The client is gone: nothing more will reach it.
            conn.wbuf.clear();
            conn.eof = true;
            conn.close = true;
        }
    }
}

/// Bytes written (maybe 0: would block), or None when the peer is gone.
fn write_some(fd: RawFd, mut data: &[u8]) -> Option<usize> {
    let mut total = 0;
    while !data.is_empty() {
        // SAFETY: sends from a live slice; MSG_NOSIGNAL: a gone peer is EPIPE, no signal.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr() as *const _,
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error();
            if e == Some(libc::EAGAIN) || e == Some(libc::EINTR) {
                return Some(total);
            }
            return None;
        }
        total += n as usize;
        data = &data[n as usize..];
    }
    Some(total)
}

/// Reads what is there, up to what one request may hold, with any descriptors sent
/// along (kept for the request, at most MAX_FDS; more are closed at once).
fn read_into(fd: RawFd, conn: &mut Conn) {
    const CAP: usize = http::MAX_HEAD + http::MAX_BODY;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let room = CAP.saturating_sub(conn.rbuf.len()).min(buf.len());
        if room == 0 {
            return;
        }
        let n = recv_with_fds(fd, &mut buf[..room], conn);
        if n == 0 {
            conn.eof = true;
            return;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error();
            if e != Some(libc::EAGAIN) && e != Some(libc::EINTR) {
                conn.eof = true;
                conn.wbuf.clear();
            }
            return;
        }
        conn.rbuf.extend_from_slice(&buf[..n as usize]);
        if conn.rbuf.len() >= CAP || (n as usize) < room {
            return;
        }
    }
}

/// recvmsg into `buf`, taking the descriptors of an SCM_RIGHTS message into `conn`
/// (close-on-exec). Returns what recvmsg returned.
fn recv_with_fds(fd: RawFd, buf: &mut [u8], conn: &mut Conn) -> isize {
    // Room for a few more than MAX_FDS, so that too many is seen (and all are closed).
    const ROOM: usize = 8;
    let mut control = [0u64; 8]; // >= CMSG_SPACE(ROOM * 4), 8-byte aligned
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr pointing at one live iovec and a live control buffer.
    let (n, msg) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT);
        (n, msg)
    };
    if n < 0 {
        return n;
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        conn.too_many_fds = true;
    }
    // SAFETY: the CMSG_* walk stays within msg_controllen bytes of `control`, which
    // recvmsg filled; each SCM_RIGHTS payload is an array of descriptors now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const libc::c_int;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count.min(ROOM) {
                    let owned = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if conn.fds.len() < MAX_FDS {
                        conn.fds.push(owned);
                    } else {
                        conn.too_many_fds = true;
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    n
}
