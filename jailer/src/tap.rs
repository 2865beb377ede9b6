//! Attaching a VM's tap: the jailer (root) opens /dev/net/tun and attaches to a tap the
//! administrator created, in the tenant's network namespace, with the virtio-net header.
//! The net backend's cell receives only this descriptor: no /dev/net/tun, no network,
//! no way to reach any other interface.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// <linux/if_tun.h>
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tap {0:?}: not an interface name")]
    NotAnInterfaceName(String),
    #[error(
        "tap {0}: no such interface (the administrator creates taps; the jailer only attaches)"
    )]
    NoSuchInterface(String),
    #[error("/dev/net/tun: {0}")]
    Tun(std::io::Error),
    #[error("tap {0}: not a tap, or not made the way the spec asks (multi_queue with queues > 1, a plain tap without)")]
    NotATap(String),
    #[error("tap {0}: already attached to another VM")]
    Busy(String),
    #[error("tap {0}: {1}")]
    Attach(String, std::io::Error),
    #[error("{path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error("{source} (network namespace {ns})")]
    InNetns { ns: String, source: Box<Error> },
    #[error("tap thread panicked")]
    Panicked,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Opens tap `name` inside `/run/netns/NETNS` (or the jailer's own namespace). The tap
/// must exist: a missing one is an error, not a fresh interface nobody configured.
pub fn open(name: &str, netns: Option<&str>) -> Result<OwnedFd, Error> {
    in_netns(netns, || attach(name, 0))
}

/// Opens `queues` queues of multi-queue tap `name` (IFF_MULTI_QUEUE; the tap must have
/// been made with `multi_queue`), one descriptor each; one queue: as `open`.
pub fn open_queues(name: &str, queues: u16, netns: Option<&str>) -> Result<Vec<OwnedFd>, Error> {
    if queues <= 1 {
        return Ok(vec![open(name, netns)?]);
    }
    in_netns(netns, || {
        (0..queues).map(|_| attach(name, IFF_MULTI_QUEUE)).collect()
    })
}

/// Whether tap `name` exists where `open` would look for it (for `cellvm-jailer check`,
/// which attaches nothing).
pub fn exists(name: &str, netns: Option<&str>) -> Result<(), Error> {
    in_netns(netns, || interface_exists(name))
}

fn in_netns<T: Send>(
    netns: Option<&str>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> Result<T, Error> {
    let Some(ns) = netns else { return f() };
    let ns_path = format!("/run/netns/{ns}");
    let ns_file = std::fs::File::open(&ns_path).map_err(|source| Error::Netns {
        path: ns_path.clone(),
        source,
    })?;
    // setns changes only the calling thread's namespace: a short-lived thread enters
    // it, does `f`, and takes the namespace with it when it ends.
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a namespace descriptor we opened.
            if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(Error::Netns {
                    path: format!("{ns_path}: setns"),
                    source: std::io::Error::last_os_error(),
                });
            }
            f().map_err(|e| Error::InNetns {
                ns: ns.to_string(),
                source: Box::new(e),
            })
        })
        .join()
        .unwrap_or(Err(Error::Panicked))
    })
}

fn interface_exists(name: &str) -> Result<(), Error> {
    if !crate::policy::valid_ifname(name) {
        return Err(Error::NotAnInterfaceName(name.into()));
    }
    let cname = std::ffi::CString::new(name).map_err(|_| Error::NotAnInterfaceName(name.into()))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(Error::NoSuchInterface(name.into()));
    }
    Ok(())
}

fn attach(name: &str, extra: i16) -> Result<OwnedFd, Error> {
    interface_exists(name)?;
    // SAFETY: open of a constant, NUL-terminated path.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(Error::Tun(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads the ifreq we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &req) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) => Error::NotATap(name.into()),
            Some(libc::EBUSY) => Error::Busy(name.into()),
            _ => Error::Attach(name.into(), e),
        });
    }
    Ok(fd)
}
