//! SELinux MCS category pairs and the labels built from them (sVirt's scheme): each VM
//! runs as `system_u:system_r:cellvm_t:s0:cA,cB`, its device backends as
//! `system_u:system_r:cellvm_device_t:s0:cA,cB` (the same pair: one per VM), its writable
//! images are `system_u:object_r:cellvm_image_t:s0:cA,cB`, and only a process with both
//! categories can touch them.

use std::fmt;
use std::str::FromStr;

pub const MAX_CATEGORY: u16 = 1023;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McsPair {
    a: u16,
    b: u16,
}

impl McsPair {
    pub fn new(a: u16, b: u16) -> Option<McsPair> {
        (a < b && b <= MAX_CATEGORY).then_some(McsPair { a, b })
    }

    /// Every pair within [lo, hi], in order.
    pub fn all_in(lo: u16, hi: u16) -> impl Iterator<Item = McsPair> {
        (lo..=hi.min(MAX_CATEGORY))
            .flat_map(move |a| (a + 1..=hi.min(MAX_CATEGORY)).map(move |b| McsPair { a, b }))
    }

    pub fn process_label(&self) -> String {
        format!("system_u:system_r:cellvm_t:s0:{self}")
    }

    /// The device backends' label: their own domain, the VM's categories.
    pub fn device_label(&self) -> String {
        format!("system_u:system_r:cellvm_device_t:s0:{self}")
    }

    pub fn image_label(&self) -> String {
        format!("system_u:object_r:cellvm_image_t:s0:{self}")
    }

    /// A guest RAM file's label: the type of the VMM's memfd, the VM's categories.
    pub fn ram_label(&self) -> String {
        format!("system_u:object_r:cellvm_tmpfs_t:s0:{self}")
    }
}

impl fmt::Display for McsPair {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "c{},c{}", self.a, self.b)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("MCS pair {0:?}: expected cA,cB with A < B <= 1023")]
pub struct ParseError(String);

impl FromStr for McsPair {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError(s.chars().take(64).collect());
        let (a, b) = s.split_once(',').ok_or_else(err)?;
        let num = |x: &str| -> Result<u16, ParseError> {
            let digits = x.strip_prefix('c').ok_or_else(err)?;
            if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return Err(err());
            }
            digits.parse().map_err(|_| err())
        };
        McsPair::new(num(a)?, num(b)?).ok_or_else(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_print_and_label() {
        let p: McsPair = "c3,c700".parse().unwrap();
        assert_eq!(p.to_string(), "c3,c700");
        assert_eq!(p.process_label(), "system_u:system_r:cellvm_t:s0:c3,c700");
        assert_eq!(
            p.device_label(),
            "system_u:system_r:cellvm_device_t:s0:c3,c700"
        );
        assert_eq!(
            p.image_label(),
            "system_u:object_r:cellvm_image_t:s0:c3,c700"
        );
        for bad in [
            "c5,c5",
            "c6,c5",
            "c1,c1024",
            "1,2",
            "c1",
            "c,c2",
            "c01234,c2",
            "c1,c2,c3",
            "c+1,c2",
        ] {
            assert!(bad.parse::<McsPair>().is_err(), "{bad}");
        }
    }

    #[test]
    fn all_in_enumerates_every_ordered_pair_once() {
        assert_eq!(McsPair::all_in(0, 3).count(), 6);
        assert_eq!(
            McsPair::all_in(1022, 2000)
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
            ["c1022,c1023"]
        );
    }
}
