//! The channel from a jailed VM's supervisor (`--supervisor-fd`): a SOCK_SEQPACKET
//! socket whose other end the jailer keeps. Only the supervisor writes; the VMM reads.
//! Each message is 12 bytes, three little-endian u32s `kind, device, pid`:
//!
//! - kind 1, REPLACED: device `device`'s backend died and process `pid` replaces it; the
//!   message carries exactly one descriptor, the new backend's vhost-user connection.
//! - kind 2, GIVEN_UP: device `device`'s backend died and no other will come (it kept
//!   dying, or its kind cannot be restarted); no descriptor.
//!
//! Anything else is refused and its descriptors closed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

pub const REPLACED: u32 = 1;
pub const GIVEN_UP: u32 = 2;
const MESSAGE_LEN: usize = 12;
/// The most descriptors one message may bring (the rest would be closed unread).
const MAX_FDS: usize = 4;

#[derive(Debug)]
pub enum Message {
    Replaced {
        device: usize,
        pid: u32,
        stream: UnixStream,
    },
    GivenUp {
        device: usize,
    },
}

/// Checks that `fd` is what `--supervisor-fd` must be: an AF_UNIX SOCK_SEQPACKET socket.
pub fn check(fd: RawFd) -> Result<OwnedFd, String> {
    let opt = |name| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a local int of the stated size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0).then_some(v)
    };
    if fd < 3 {
        return Err(format!("--supervisor-fd {fd}: expected a descriptor >= 3"));
    }
    match (opt(libc::SO_DOMAIN), opt(libc::SO_TYPE)) {
        (Some(libc::AF_UNIX), Some(libc::SOCK_SEQPACKET)) => {
            // SAFETY: the descriptor was handed to this process to own.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        (None, _) => Err(format!("--supervisor-fd {fd}: not an open socket")),
        _ => Err(format!(
            "--supervisor-fd {fd}: not an AF_UNIX SOCK_SEQPACKET socket"
        )),
    }
}

/// One message, without blocking. Ok(None): nothing waiting. Err: the supervisor is
/// gone (end of file) or sent something malformed (its descriptors are closed).
pub fn receive(fd: &OwnedFd) -> Result<Option<Message>, String> {
    let mut data = [0u8; MESSAGE_LEN + 1];
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = control.len() * 8;
    // SAFETY: recvmsg into the buffers described by msg, all live for the call.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(format!("supervisor channel: {e}")),
        };
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: walking the control buffer recvmsg filled, with the kernel's macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c) as *const RawFd;
                for k in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(k))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 && fds.is_empty() {
        return Err("supervisor channel: closed".into());
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || n as usize != MESSAGE_LEN {
        return Err(format!(
            "supervisor channel: a message of {n} bytes (flags {:#x}) refused",
            msg.msg_flags
        ));
    }
    parse(&data[..MESSAGE_LEN], fds).map(Some)
}

/// The message in `data` with the descriptors that came with it.
fn parse(data: &[u8], mut fds: Vec<OwnedFd>) -> Result<Message, String> {
    let word = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let (kind, device, pid) = (word(0), word(4) as usize, word(8));
    match (kind, fds.len()) {
        (REPLACED, 1) => Ok(Message::Replaced {
            device,
            pid,
            stream: UnixStream::from(fds.remove(0)),
        }),
        (GIVEN_UP, 0) => Ok(Message::GivenUp { device }),
        _ => Err(format!(
            "supervisor channel: message kind {kind} with {} descriptors refused",
            fds.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills the array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: two fresh descriptors.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, data: &[u8], pass: &[RawFd]) {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: a zeroed msghdr pointing at live buffers; the cmsg fits in control.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if !pass.is_empty() {
                msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = libc::CMSG_SPACE((pass.len() * 4) as u32) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((pass.len() * 4) as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    pass.as_ptr(),
                    libc::CMSG_DATA(c) as *mut RawFd,
                    pass.len(),
                );
            }
            assert_eq!(libc::sendmsg(fd.as_raw_fd(), &msg, 0), data.len() as isize);
        }
    }

    fn message(kind: u32, device: u32, pid: u32) -> Vec<u8> {
        [kind, device, pid]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    #[test]
    fn a_replacement_brings_its_connection_and_a_give_up_none() {
        let (ours, theirs) = pair();
        assert!(receive(&ours).unwrap().is_none(), "nothing sent yet");
        let (a, b) = UnixStream::pair().unwrap();
        send(&theirs, &message(REPLACED, 2, 4321), &[a.as_raw_fd()]);
        drop(a);
        match receive(&ours).unwrap() {
            Some(Message::Replaced {
                device: 2,
                pid: 4321,
                stream,
            }) => {
                use std::io::{Read, Write};
                (&stream).write_all(b"x").unwrap();
                let mut got = [0u8; 1];
                (&b).read_exact(&mut got).unwrap();
                assert_eq!(&got, b"x", "the stream passed is the connection");
            }
            other => panic!("{other:?}"),
        }
        send(&theirs, &message(GIVEN_UP, 1, 0), &[]);
        assert!(matches!(
            receive(&ours).unwrap(),
            Some(Message::GivenUp { device: 1 })
        ));
        drop(theirs);
        assert!(receive(&ours).is_err(), "the supervisor gone is an error");
    }

    #[test]
    fn malformed_messages_are_refused_and_their_descriptors_closed() {
        let (ours, theirs) = pair();
        let (a, b) = UnixStream::pair().unwrap();
        // A give-up with a descriptor, a replacement without, a short message, an
        // unknown kind, a long message.
        send(&theirs, &message(GIVEN_UP, 0, 0), &[a.as_raw_fd()]);
        drop(a);
        send(&theirs, &message(REPLACED, 0, 1), &[]);
        send(&theirs, &message(REPLACED, 0, 1)[..8], &[]);
        send(&theirs, &message(9, 0, 0), &[]);
        let mut long = message(REPLACED, 0, 1);
        long.extend([0; 20]);
        send(&theirs, &long, &[]);
        for _ in 0..5 {
            assert!(receive(&ours).is_err());
        }
        // The descriptor that came with the refused give-up was closed: its peer sees
        // end of file.
        use std::io::Read;
        let mut buf = [0u8; 1];
        assert_eq!((&b).read(&mut buf).unwrap(), 0);
        assert!(receive(&ours).unwrap().is_none());
    }
}
