//! What a VM is made of: the `cellvm run` flags, or the same fields from a TOML file.

use std::path::PathBuf;

use serde::Deserialize;

use crate::arch::x86_64::boot::BootProtocol;

pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 128;

/// Where the guest's COM1 output goes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum SerialOut {
    #[default]
    Stdio,
    File(PathBuf),
    Off,
}

impl std::str::FromStr for SerialOut {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialOut::Stdio),
            "off" => Ok(SerialOut::Off),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(SerialOut::File(p.into())),
                _ => Err(format!("serial = {s:?}: expected stdio, off or file=PATH")),
            },
        }
    }
}

impl<'de> Deserialize<'de> for SerialOut {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A VM's configuration. Every field is optional in the file; flags override the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF (PVH or 64-bit Linux) or bzImage; none: the built-in test guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub serial: Option<SerialOut>,
    pub boot_protocol: Option<BootProtocol>,
    /// What a seccomp violation does (default: kill).
    pub seccomp: Option<crate::seccomp::Mode>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
}

impl VmConfig {
    pub fn from_toml(path: &std::path::Path) -> Result<VmConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_toml(&text).map_err(|message| Error::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse_toml(text: &str) -> Result<VmConfig, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }

    /// Fields set in `over` replace those in `self`.
    pub fn merge(self, over: VmConfig) -> VmConfig {
        VmConfig {
            kernel: over.kernel.or(self.kernel),
            initrd: over.initrd.or(self.initrd),
            cmdline: over.cmdline.or(self.cmdline),
            cpus: over.cpus.or(self.cpus),
            memory_mib: over.memory_mib.or(self.memory_mib),
            serial: over.serial.or(self.serial),
            boot_protocol: over.boot_protocol.or(self.boot_protocol),
            seccomp: over.seccomp.or(self.seccomp),
        }
    }

    pub fn cpus(&self) -> u32 {
        self.cpus.unwrap_or(DEFAULT_CPUS)
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB)
    }

    /// The command line the guest gets. The built-in test guest learns what to expect
    /// (memory, vCPUs) from its command line; cellvm adds those words unless given.
    pub fn effective_cmdline(&self) -> String {
        let mut cmdline = self.cmdline.clone().unwrap_or_default();
        if self.kernel.is_none() {
            for (key, value) in [
                ("expect_mem", self.memory_mib().to_string()),
                ("expect_cpus", self.cpus().to_string()),
            ] {
                if !cmdline
                    .split_whitespace()
                    .any(|w| w.starts_with(&format!("{key}=")))
                {
                    if !cmdline.is_empty() {
                        cmdline.push(' ');
                    }
                    cmdline.push_str(&format!("{key}={value}"));
                }
            }
        }
        cmdline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_fields_parse_and_flags_override_them() {
        let file = VmConfig::parse_toml(
            "cpus = 2\nmemory_mib = 256\nserial = \"file=/tmp/x\"\ncmdline = \"a\"",
        )
        .unwrap();
        assert_eq!(file.serial, Some(SerialOut::File("/tmp/x".into())));
        let merged = file.merge(VmConfig {
            cpus: Some(4),
            ..Default::default()
        });
        assert_eq!((merged.cpus(), merged.memory_mib()), (4, 256));
        assert_eq!(merged.cmdline.as_deref(), Some("a"));
    }

    #[test]
    fn unknown_fields_and_bad_serial_are_errors() {
        assert!(VmConfig::parse_toml("cpu = 2")
            .unwrap_err()
            .contains("unknown field"));
        assert!(VmConfig::parse_toml("serial = \"tcp\"")
            .unwrap_err()
            .contains("expected stdio"));
    }

    #[test]
    fn test_guest_gets_its_expectations_unless_given() {
        let c = VmConfig {
            cpus: Some(3),
            memory_mib: Some(64),
            cmdline: Some("tests=e820".into()),
            ..Default::default()
        };
        assert_eq!(
            c.effective_cmdline(),
            "tests=e820 expect_mem=64 expect_cpus=3"
        );
        let c = VmConfig {
            cmdline: Some("expect_mem=1".into()),
            ..Default::default()
        };
        assert_eq!(c.effective_cmdline(), "expect_mem=1 expect_cpus=1");
        let c = VmConfig {
            kernel: Some("k".into()),
            cmdline: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(c.effective_cmdline(), "x");
    }
}
