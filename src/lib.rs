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
