//! One request to many API sockets at once, on one thread: `list` asks every VM of the
//! host for its `vm.info`. A pool of blocking clients spends more in thread switches,
//! socket timeouts and liveness reads than the requests themselves cost (about 28
//! syscalls per VM); here each VM costs a socket, a connect, a send, a receive and a
//! close, and every answer is gathered through one epoll within one deadline.
//!
//! Each VMM at the other end is untrusted: a response is bounded (`http::MAX_HEAD` and
//! the caller's body limit), one that never comes times out with the rest, and one that
//! is malformed fails alone.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::http::{parse_response, stream_socket, try_connect, unix_addr, Error, Response};

/// Events taken from the epoll per wait.
const EVENTS: usize = 256;
/// How often connects refused by a full backlog are tried again.
const RETRY: Duration = Duration::from_millis(1);

/// One exchange in flight.
struct Exchange {
    fd: Option<OwnedFd>,
    addr: Option<libc::sockaddr_un>,
    sent: usize,
    buf: Vec<u8>,
}

/// `GET target` on a fresh connection to each of `sockets`, all within `timeout`; each
/// result in the order of `sockets`. A body longer than `max_body` is refused.
pub fn get_all(
    sockets: &[PathBuf],
    target: &str,
    timeout: Duration,
    max_body: usize,
) -> Vec<Result<Response, Error>> {
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes();
    let mut results: Vec<Option<Result<Response, Error>>> = std::iter::repeat_with(|| None)
        .take(sockets.len())
        .collect();
    let shown = |i: usize| sockets[i].display().to_string();
    let epoll = match new_epoll() {
        Ok(e) => e,
        Err(source) => {
            return (0..sockets.len())
                .map(|i| {
                    Err(Error::Io {
                        path: shown(i),
                        source: std::io::Error::from_raw_os_error(
                            source.raw_os_error().unwrap_or(0),
                        ),
                    })
                })
                .collect()
        }
    };
    let deadline = Instant::now() + timeout;
    let mut exchanges: Vec<Exchange> = sockets
        .iter()
        .map(|_| Exchange {
            fd: None,
            addr: None,
            sent: 0,
            buf: Vec::new(),
        })
        .collect();
    let mut waiting: Vec<usize> = Vec::new();
    for (i, path) in sockets.iter().enumerate() {
        match open(path) {
            Ok((fd, addr)) => {
                exchanges[i].fd = Some(fd);
                exchanges[i].addr = Some(addr);
                waiting.push(i);
            }
            Err(source) => {
                results[i] = Some(Err(Error::Connect {
                    path: shown(i),
                    source,
                }))
            }
        }
    }
    let mut open_count = waiting.len();
    // SAFETY: an all-zero epoll_event array is valid for the kernel to fill.
    let mut events: [libc::epoll_event; EVENTS] = unsafe { std::mem::zeroed() };
    while open_count > 0 {
        // Connect what is not connected yet (a full backlog answers EAGAIN), send.
        waiting.retain(|&i| {
            let x = &mut exchanges[i];
            let (Some(fd), Some(addr)) = (x.fd.as_ref(), x.addr.as_ref()) else {
                return false;
            };
            match try_connect(fd, addr) {
                Ok(false) => return true,
                Ok(true) => {}
                Err(source) => {
                    x.fd = None;
                    results[i] = Some(Err(Error::Connect {
                        path: shown(i),
                        source,
                    }));
                    open_count -= 1;
                    return false;
                }
            }
            x.addr = None;
            // The request (a few dozen bytes) goes whole into the fresh socket's buffer
            // but for a rare partial send, which then also waits for room.
            let sent = match send_rest(x, &request) {
                Ok(sent) => sent,
                Err(source) => {
                    x.fd = None;
                    results[i] = Some(Err(Error::Io {
                        path: shown(i),
                        source,
                    }));
                    open_count -= 1;
                    return false;
                }
            };
            let Some(fd) = x.fd.as_ref() else {
                return false;
            };
            if let Err(source) = watch(&epoll, fd, i, !sent) {
                x.fd = None;
                results[i] = Some(Err(Error::Io {
                    path: shown(i),
                    source,
                }));
                open_count -= 1;
            }
            false
        });
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || open_count == 0 {
            break;
        }
        let wait = if waiting.is_empty() {
            left
        } else {
            left.min(RETRY)
        };
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: events is a valid array of EVENTS entries owned by this frame.
        let n =
            unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), EVENTS as i32, ms) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        for ev in &events[..n as usize] {
            let i = ev.u64 as usize;
            let Some(x) = exchanges.get_mut(i) else {
                continue;
            };
            if x.fd.is_none() {
                continue;
            }
            if let Some(r) = step(x, &request, &sockets[i], max_body) {
                // Closing the descriptor takes it out of the epoll.
                x.fd = None;
                results[i] = Some(r);
                open_count -= 1;
            }
        }
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                Err(Error::Timeout {
                    path: shown(i),
                    ms: timeout.as_millis(),
                })
            })
        })
        .collect()
}

fn new_epoll() -> std::io::Result<OwnedFd> {
    // SAFETY: epoll_create1 with a constant flag; the result is checked.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open(path: &Path) -> std::io::Result<(OwnedFd, libc::sockaddr_un)> {
    let addr = unix_addr(path)?;
    Ok((stream_socket()?, addr))
}

/// Watches `fd` for input, and for room to send when `output` (edge-triggered: `step`
/// reads and writes until EAGAIN), tagged with its index.
fn watch(epoll: &OwnedFd, fd: &OwnedFd, i: usize, output: bool) -> std::io::Result<()> {
    let mut events = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET;
    if output {
        events |= libc::EPOLLOUT;
    }
    let mut ev = libc::epoll_event {
        events: events as u32,
        u64: i as u64,
    };
    // SAFETY: both descriptors are open; ev is a valid epoll_event.
    let rc = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            &mut ev,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends what is left of the request and reads what has come of the response: Some
/// once the exchange is over (answered, refused or failed), None while it goes on.
fn step(
    x: &mut Exchange,
    request: &[u8],
    path: &Path,
    max_body: usize,
) -> Option<Result<Response, Error>> {
    let fd = x.fd.as_ref()?.as_raw_fd();
    let io = |source: std::io::Error| {
        Some(Err(Error::Io {
            path: path.display().to_string(),
            source,
        }))
    };
    match send_rest(x, request) {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => return io(e),
    }
    let mut chunk = [0u8; 4096];
    loop {
        // SAFETY: chunk is a valid buffer of its length; fd is open.
        let n = unsafe {
            libc::recv(
                fd,
                chunk.as_mut_ptr().cast(),
                chunk.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return None,
                _ => return io(e),
            }
        }
        if n == 0 {
            return Some(Err(Error::Closed {
                path: path.display().to_string(),
            }));
        }
        x.buf.extend_from_slice(&chunk[..n as usize]);
        match parse_response(&x.buf, "GET", max_body) {
            Ok(Some((response, _, _))) => return Some(Ok(response)),
            // parse_response bounds the head and the announced body, so the buffer
            // never holds more than both: a response is answered once they are in.
            Ok(None) => {}
            Err(why) => {
                return Some(Err(Error::Malformed {
                    path: path.display().to_string(),
                    why,
                }))
            }
        }
    }
}

/// Sends what is left of the request: Ok(true) once all of it is sent, Ok(false) when
/// the socket has no room for the rest yet.
fn send_rest(x: &mut Exchange, request: &[u8]) -> std::io::Result<bool> {
    let Some(fd) = x.fd.as_ref().map(|f| f.as_raw_fd()) else {
        return Ok(true);
    };
    while x.sent < request.len() {
        let rest = &request[x.sent..];
        // SAFETY: rest is a valid buffer of rest.len() bytes; fd is open.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(false),
                _ => return Err(e),
            }
        }
        x.sent += n as usize;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("cellvmctl-fanout-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A server that reads one request and answers it with `reply` in pieces of `piece`
    /// bytes (none at all when `reply` is None), then keeps the connection open a while.
    fn serve(
        path: &Path,
        reply: Option<Vec<u8>>,
        piece: usize,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            if let Some(reply) = reply {
                for c in reply.chunks(piece.max(1)) {
                    if s.write_all(c).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            std::thread::sleep(Duration::from_millis(600));
            buf[..n].to_vec()
        })
    }

    #[test]
    fn every_socket_gets_its_own_outcome_within_one_deadline() {
        let d = dir();
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"state\":\"ok\"}".to_vec();
        let paths: Vec<PathBuf> = ["a", "b", "silent", "bad", "big", "missing"]
            .iter()
            .map(|n| d.join(n))
            .collect();
        let servers = [
            serve(&paths[0], Some(ok.clone()), 1000),
            // Byte by byte: the response is put together across many reads.
            serve(&paths[1], Some(ok.clone()), 1),
            serve(&paths[2], None, 1),
            serve(&paths[3], Some(b"HTTP/1.1 2xx what\r\n\r\n".to_vec()), 1000),
            serve(
                &paths[4],
                Some(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec()),
                1000,
            ),
        ];
        let _ = std::fs::remove_file(&paths[5]);
        let t = Instant::now();
        let r = get_all(&paths, "/api/v1/vm.info", Duration::from_millis(400), 1024);
        let took = t.elapsed();
        assert!(took < Duration::from_millis(550), "{took:?}");
        assert_eq!(r.len(), 6);
        for ok in &r[..2] {
            let ok = ok.as_ref().unwrap();
            assert_eq!(ok.status, 200);
            assert_eq!(ok.json().unwrap()["state"], "ok");
        }
        assert!(matches!(r[2], Err(Error::Timeout { .. })), "{:?}", r[2]);
        assert!(matches!(r[3], Err(Error::Malformed { .. })), "{:?}", r[3]);
        match &r[4] {
            Err(Error::Malformed { why, .. }) => assert!(why.contains("1024-byte limit"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r[5].as_ref().unwrap_err().connect_errno(),
            Some(libc::ENOENT)
        );
        for s in servers {
            let got = s.join().unwrap();
            assert!(
                got.starts_with(b"GET /api/v1/vm.info HTTP/1.1\r\n"),
                "{got:?}"
            );
        }
    }

    #[test]
    fn a_full_backlog_is_connected_once_it_drains() {
        let p = dir().join("backlog");
        let _ = std::fs::remove_file(&p);
        let l = UnixListener::bind(&p).unwrap();
        // SAFETY: listen on the listener's own open descriptor: a backlog of 4.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 4) }, 0);
        // Nothing accepts for 100 ms: connects beyond the backlog get EAGAIN and are
        // tried again until the server drains it.
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            for _ in 0..300 {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
                s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
            }
        });
        let paths = vec![p; 300];
        let r = get_all(&paths, "/x", Duration::from_secs(5), 1024);
        assert!(r.iter().all(|r| r.as_ref().is_ok_and(|r| r.status == 204)));
        server.join().unwrap();
    }
}
