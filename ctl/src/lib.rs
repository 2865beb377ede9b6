//! cellvmctl: the host CLI of cellvm, a thin client of the VMs' API sockets and of the
//! jailer's registry. A library too, so that the benchmark and the tests reach the same
//! HTTP client and lookups.

pub mod commands;
pub mod console;
pub mod fanout;
pub mod host;
pub mod http;
pub mod stats;
pub mod table;
