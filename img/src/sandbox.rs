//! The sandbox cellvm-img enters once its files are open: Landlock limits the
//! filesystem to the named files (read, write, truncate; nothing can be created or
//! opened elsewhere), then a seccomp filter (seccomp.json, compiled by build.rs) allows
//! only the I/O on open descriptors the commands need and kills the process on any other
//! system call, `openat` included.

use std::path::PathBuf;

use seccompiler::sock_filter;

static PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-img.bpf"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("landlock is not enforced on this kernel ({0})")]
    NotEnforced(String),
    #[error("seccomp: {0}")]
    Seccomp(seccompiler::Error),
}

/// How much of the sandbox to enter (the partial modes exist for the tests' positive
/// controls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Full,
    LandlockOnly,
    None,
}

/// Restricts the filesystem to `paths` (files already opened).
pub fn landlock(paths: &[PathBuf]) -> Result<(), Error> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V6;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(paths, AccessFs::from_file(abi))))
        .and_then(|r| r.restrict_self())
        .map_err(|e| Error::Landlock(e.to_string()))?;
    match status.ruleset {
        RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => Ok(()),
        s => Err(Error::NotEnforced(format!("{s:?}"))),
    }
}

/// Installs the seccomp filter on this (the only) thread.
pub fn seccomp() -> Result<(), Error> {
    let prog: Vec<sock_filter> = PROGRAM
        .chunks_exact(8)
        .map(|c| sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    seccompiler::apply_filter(&prog).map_err(Error::Seccomp)
}

pub fn enter(paths: &[PathBuf], mode: Mode) -> Result<(), Error> {
    if mode == Mode::None {
        return Ok(());
    }
    landlock(paths)?;
    if mode == Mode::Full {
        seccomp()?;
    }
    Ok(())
}
