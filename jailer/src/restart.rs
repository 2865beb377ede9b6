//! Device backends that come back. When a backend cell dies while its VMM runs (a bug,
//! the OOM killer, a SIGKILL), the supervisor starts a fresh cell for it with the same
//! descriptors (image, tap, counters page) and sends the VMM the new connection over
//! the supervisor channel, a SOCK_SEQPACKET pair made for each life of the VM. The VMM
//! negotiates with the new backend and resumes every queue where the old one stopped.
//!
//! The channel carries 12-byte messages, three little-endian u32s `kind, device, pid`
//! (`cellvm::vmm::supervisor` reads them): kind 1 brings the new connection as its one
//! descriptor; kind 2 says no backend will come. The supervisor only writes to it.
//!
//! A restart's cost is mostly building the cell, and most of that is the cgroup
//! migration (on cgroup v1 a write to cgroup.procs waits for an RCU grace period: 8–15
//! ms measured here). So each restartable backend has a spare: its next cell, built
//! whole in the background (`SPARE_DELAY` after the VM starts or the last restart) and
//! held just before the exec. A death then costs the exec and the reconnection; a
//! backend that dies before its spare is ready is started cold.
//!
//! Only blk, net and rng backends are restarted: their state is all in the rings and
//! their descriptors. A vsock backend holds its connections and a console backend its
//! port sockets' peers; they are given up, and their device shows NEEDS_RESET.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// More deaths of one backend than this within WINDOW and it is given up.
pub const MAX_RESTARTS: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(60);

const REPLACED: u32 = 1;
const GIVEN_UP: u32 = 2;

/// Whether a backend of this kind can be started again under a running VM.
pub fn restartable(kind: &str) -> bool {
    matches!(kind, "blk" | "net" | "rng")
}

/// Whether a reaped backend's status is a death (a signal, or a failing status) rather
/// than the clean exit of a backend whose VMM closed the connection.
pub fn died(status: i32) -> bool {
    libc::WIFSIGNALED(status) || (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0)
}

/// The supervisor's end of the channel.
pub struct Channel(OwnedFd);

impl Channel {
    /// The channel for one life of the VM: ours, and the VMM's end (close-on-exec; the
    /// cell keeps it by number).
    pub fn pair() -> std::io::Result<(Channel, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array we own.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: two fresh descriptors nobody else owns.
        Ok(unsafe {
            (
                Channel(OwnedFd::from_raw_fd(fds[0])),
                OwnedFd::from_raw_fd(fds[1]),
            )
        })
    }

    /// Device `n`'s backend is now process `pid`, reached through `connection`.
    pub fn replaced(&self, n: usize, pid: u32, connection: &OwnedFd) -> std::io::Result<()> {
        self.send(REPLACED, n, pid, Some(connection.as_raw_fd()))
    }

    /// No backend will come for device `n`.
    pub fn given_up(&self, n: usize) -> std::io::Result<()> {
        self.send(GIVEN_UP, n, 0, None)
    }

    fn send(&self, kind: u32, n: usize, pid: u32, fd: Option<RawFd>) -> std::io::Result<()> {
        let data: Vec<u8> = [kind, n as u32, pid]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut control = [0u64; 4];
        // SAFETY: a zeroed msghdr pointing at live buffers; one descriptor's control
        // message fits in `control`.
        let rc = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if let Some(fd) = fd {
                let len = std::mem::size_of::<RawFd>() as u32;
                msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = libc::CMSG_SPACE(len) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(len) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
            }
            libc::sendmsg(
                self.0.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// How long spares wait after the VM starts or a backend is started again: building
/// one blocks the supervisor through the cgroup migration, which should not fall on a
/// boot or a restart still under way.
pub const SPARE_DELAY: Duration = Duration::from_millis(100);

/// One slot per backend for its spare (`T`: the cell and what goes with it).
pub struct Spares<T> {
    slots: Vec<Option<T>>,
    wanted: Vec<bool>,
    not_before: Instant,
}

impl<T> Spares<T> {
    /// `wanted[n]`: whether backend `n` has a spare (whether it is restarted at all).
    pub fn new(wanted: Vec<bool>, now: Instant) -> Spares<T> {
        Spares {
            slots: wanted.iter().map(|_| None).collect(),
            wanted,
            not_before: now + SPARE_DELAY,
        }
    }

    /// Backend `n`'s spare, if it has one ready; building the next waits SPARE_DELAY.
    pub fn take(&mut self, n: usize, now: Instant) -> Option<T> {
        self.not_before = now + SPARE_DELAY;
        self.slots.get_mut(n)?.take()
    }

    /// Backend `n` gets no more spares (given up, or its spare could not be built).
    pub fn stop(&mut self, n: usize) {
        if let Some(w) = self.wanted.get_mut(n) {
            *w = false;
        }
        if let Some(s) = self.slots.get_mut(n) {
            *s = None;
        }
    }

    /// Backend `n`'s spare is ready.
    pub fn put(&mut self, n: usize, spare: T) {
        if self.wanted.get(n) == Some(&true) {
            self.slots[n] = Some(spare);
        }
    }

    /// The spares that are ready, each with its backend's number.
    pub fn ready(&mut self) -> impl Iterator<Item = (usize, &mut Option<T>)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.is_some())
    }

    /// The backends whose spare is to be built at `now`; else when to look again
    /// (None: every wanted spare is there).
    pub fn due(&self, now: Instant) -> Result<Vec<usize>, Option<Instant>> {
        let missing: Vec<usize> = (0..self.slots.len())
            .filter(|&n| self.wanted[n] && self.slots[n].is_none())
            .collect();
        if missing.is_empty() {
            Err(None)
        } else if now < self.not_before {
            Err(Some(self.not_before))
        } else {
            Ok(missing)
        }
    }
}

/// Each backend's recent deaths, for the bound on restarts.
pub struct History(Vec<VecDeque<Instant>>);

impl History {
    pub fn new(backends: usize) -> History {
        History(vec![VecDeque::new(); backends])
    }

    /// Backend `n` died at `now`: whether it may be started again.
    pub fn allow(&mut self, n: usize, now: Instant) -> bool {
        let Some(deaths) = self.0.get_mut(n) else {
            return false;
        };
        deaths.push_back(now);
        while deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > WINDOW)
        {
            deaths.pop_front();
        }
        deaths.len() <= MAX_RESTARTS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_is_restarted_at_most_max_restarts_times_within_the_window() {
        let mut h = History::new(2);
        let t = Instant::now();
        for k in 0..MAX_RESTARTS {
            assert!(h.allow(0, t + Duration::from_secs(k as u64)), "death {k}");
        }
        assert!(
            !h.allow(0, t + Duration::from_secs(10)),
            "one death too many"
        );
        // Another backend has its own count; and past the window the first one's old
        // deaths no longer count.
        assert!(h.allow(1, t));
        assert!(h.allow(0, t + WINDOW + Duration::from_secs(20)));
        assert!(!h.allow(7, t), "no such backend");
    }

    #[test]
    fn spares_are_built_spare_delay_after_the_start_and_after_each_restart() {
        let t = Instant::now();
        let mut s: Spares<&str> = Spares::new(vec![true, false, true], t);
        // Not during the boot.
        assert_eq!(s.due(t), Err(Some(t + SPARE_DELAY)));
        // Then every backend that is restarted; the others never.
        assert_eq!(s.due(t + SPARE_DELAY), Ok(vec![0, 2]));
        s.put(0, "spare 0");
        s.put(1, "not wanted");
        s.put(2, "spare 2");
        assert_eq!(s.due(t + SPARE_DELAY), Err(None));
        assert_eq!(s.ready().count(), 2);
        // A restart takes the spare; the next waits SPARE_DELAY from then.
        let r = t + Duration::from_secs(5);
        assert_eq!(s.take(0, r), Some("spare 0"));
        assert_eq!(s.take(1, r), None);
        assert_eq!(s.due(r), Err(Some(r + SPARE_DELAY)));
        assert_eq!(s.due(r + SPARE_DELAY), Ok(vec![0]));
        // A backend given up gets none again, and its ready spare goes.
        s.stop(2);
        assert_eq!(s.ready().count(), 0);
        s.put(2, "late");
        assert_eq!(s.due(r + SPARE_DELAY), Ok(vec![0]));
        assert_eq!(s.take(2, r), None);
        assert_eq!(s.take(9, r), None, "no such backend");
    }

    #[test]
    fn a_signal_or_a_failing_status_is_a_death_a_clean_exit_is_not() {
        // Wait statuses as the kernel encodes them.
        let killed = libc::SIGKILL;
        let exited = |code: i32| code << 8;
        assert!(died(killed));
        assert!(died(exited(1)));
        assert!(!died(exited(0)));
    }

    #[test]
    fn only_backends_whose_state_is_in_their_rings_are_restarted() {
        assert!(restartable("blk") && restartable("net") && restartable("rng"));
        assert!(!restartable("vsock") && !restartable("console"));
    }
}
