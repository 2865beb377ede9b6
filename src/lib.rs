//! cellvm: a security-hardened KVM virtual machine monitor.
//!
//! Two programs share this library: the VMM (`cellvm`) and the device backends
//! (`cellvm-device`); tests and fuzz targets reach its parts directly. Nothing made for
//! tests ships in either program: the fuzz entry points exist only with the `fuzzing`
//! feature, and the escape probes are a test program of their own (tests/probe).

pub mod api;
pub mod arch;
pub mod backend;
pub mod devices;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hardening;
pub mod seccomp;
pub mod snapshot;
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
