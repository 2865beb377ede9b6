//! The built-in test guest (tests/guest), built from source by build.rs.

/// The PVH ELF image.
pub static IMAGE: &[u8] = include_bytes!(env!("CELLVM_TESTGUEST"));
