//! `cellvm-device rng`: virtio-rng (entropy device) filled from getrandom(2).

use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::{segments, Memory, QueueState, MAX_QUEUE_SIZE};

/// At most this many bytes per request, so one guest cannot drain the host's pool in
/// one go.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Fills a chain's writable buffers with random bytes; returns the bytes written.
pub fn serve_chain<M: GuestMemoryBackend>(mem: &M, chain: DescriptorChain<&M>) -> u32 {
    let segs = match segments(mem, chain, MAX_QUEUE_SIZE) {
        Ok(s) => s,
        Err(e) => {
            crate::warn_limited(format_args!("rng: request dropped: {e:?}"));
            // Counted as a request (by the caller) that failed.
            super::counters::add(super::counters::Slot::Errors, 1);
            return 0;
        }
    };
    let mut written = 0usize;
    let mut buf = vec![0u8; 4096];
    for s in segs.iter().filter(|s| s.writable) {
        let mut at = 0usize;
        while at < s.len as usize && written < MAX_REQUEST {
            let n = (s.len as usize - at)
                .min(buf.len())
                .min(MAX_REQUEST - written);
            // SAFETY: getrandom writes at most n bytes into buf, which holds 4096.
            let got = unsafe { libc::getrandom(buf.as_mut_ptr() as *mut libc::c_void, n, 0) };
            if got <= 0 {
                return written as u32;
            }
            let got = got as usize;
            if mem
                .write_slice(&buf[..got], vm_memory::GuestAddress(s.addr.0 + at as u64))
                .is_err()
            {
                return written as u32;
            }
            at += got;
            written += got;
        }
    }
    written as u32
}

pub struct RngBackend {
    state: QueueState,
}

impl RngBackend {
    pub fn new() -> Arc<Self> {
        Arc::new(RngBackend {
            state: QueueState::default(),
        })
    }
}

impl VhostUserBackend for RngBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        super::COMMON_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state.set_event_idx(enabled)
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        self.state.update_memory(mem)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> std::io::Result<()> {
        self.state
            .handle_kick(device_event, evset, vrings, |m: &GuestMemoryMmap, chain| {
                let n = serve_chain(m, chain);
                super::counters::add(super::counters::Slot::Requests, 1);
                super::counters::add(super::counters::Slot::BytesToGuest, n as u64);
                n
            })
    }
}
