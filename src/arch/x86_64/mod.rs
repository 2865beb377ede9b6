//! x86_64: memory layout, boot protocols, firmware tables, vCPU state.
pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;
