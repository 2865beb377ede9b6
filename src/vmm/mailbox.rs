//! A queue one thread waits on with epoll: `post` pushes a message and bumps an eventfd,
//! the owner's loop sees the eventfd readable and `drain`s. Never blocks the poster
//! (the lock is held only to push or to take the whole queue).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub struct Mailbox<T> {
    queue: Mutex<VecDeque<T>>,
    efd: EventFd,
}

impl<T> Mailbox<T> {
    pub fn new() -> std::io::Result<Self> {
        Ok(Mailbox {
            queue: Mutex::new(VecDeque::new()),
            efd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn post(&self, msg: T) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(msg);
        // The counter only saturates after 2^64 - 2 posts nobody read: cannot fail here.
        let _ = self.efd.write(1);
    }

    /// Every message posted so far, oldest first; resets the eventfd first so that a
    /// post racing with this drain leaves it readable.
    pub fn drain(&self) -> VecDeque<T> {
        let _ = self.efd.read();
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }
}
