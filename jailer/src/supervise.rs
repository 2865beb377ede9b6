//! The supervisor's half: wait for the VMM while handling SIGTERM/SIGINT/SIGHUP
//! (passed on to the VM, then SIGKILL if it does not end), and turn the ending into an
//! exit status.

use std::time::{Duration, Instant};

/// How long the VM has to end after the supervisor passed it SIGTERM.
const GRACE: Duration = Duration::from_secs(5);

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

/// Waits for `pid`, forwarding termination requests; returns its exit status.
pub fn wait(pid: u32, signals: &Signals) -> i32 {
    let mut kill_at: Option<Instant> = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child, non-blocking.
        if unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) } == pid as i32 {
            return status_code(status);
        }
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: sigtimedwait with a valid set and timeout; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(&signals.set, std::ptr::null_mut(), &timeout) };
        if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGHUP) && kill_at.is_none() {
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
