//! cellvm: a security-hardened KVM virtual machine monitor.
//!
//! The crate is one binary (`cellvm`) so every cell execs the same audited file; this
//! library holds its parts so tests and fuzz targets reach them directly.

pub mod arch;
pub mod backend;
pub mod devices;
pub mod fuzzing;
pub mod probe;
pub mod seccomp;
pub mod testguest;
pub mod virtio;
pub mod vmm;

/// Logs a warning a guest can provoke at will (a bad request, a device start that
/// fails): the first ten, then every 1000th, so a guest cannot flood the host's logs.
pub fn warn_limited(what: std::fmt::Arguments) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    if n < 10 || n % 1000 == 0 {
        log::warn!("{what} (warning #{} of its kind)", n + 1);
    }
}
