//! Landlock: the highest ABI the kernel offers, every filesystem right handled, and
//! rules for exactly the cell's files; with ABI 6, signals and abstract unix sockets
//! are scoped to the cell too. A policy that requires Landlock refuses to launch on a
//! kernel without it.

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::policy::Requirement;

const ABI_USED: ABI = ABI::V6;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    #[error("landlock: {path}: {source}")]
    Path {
        path: String,
        source: landlock::PathFdError,
    },
    #[error("landlock = \"required\" but this kernel does not enforce Landlock")]
    Required,
}

/// (path inside the jail, rights) for the VMM's cell.
pub fn vmm_rules(kernel: bool, initrd: bool) -> Vec<(&'static str, BitFlags<AccessFs>)> {
    let mut rules = vec![
        ("/cellvm", AccessFs::Execute | AccessFs::ReadFile),
        (
            "/dev/kvm",
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
        ),
    ];
    if kernel {
        rules.push(("/kernel", AccessFs::ReadFile.into()));
    }
    if initrd {
        rules.push(("/initrd", AccessFs::ReadFile.into()));
    }
    rules
}

/// Restricts this process (and what it execs) to `rules`. Returns how fully the kernel
/// enforced it.
pub fn restrict(
    rules: &[(&str, BitFlags<AccessFs>)],
    requirement: Requirement,
) -> Result<&'static str, Error> {
    restrict_handling(AccessFs::from_all(ABI_USED), rules, requirement)
}

/// For a device backend: every filesystem right denied except executing and reading
/// files, which the jailer's execveat of the backend binary (by descriptor) needs. In
/// its empty root there is nothing to read; once running, the backend denies itself
/// those two as well (`cellvm-device` installs its own Landlock ruleset handling every
/// right, with no rule), and its seccomp profile has no execve or open at all.
pub fn deny_all_but_exec(requirement: Requirement) -> Result<&'static str, Error> {
    restrict_handling(
        AccessFs::from_all(ABI_USED) & !(AccessFs::Execute | AccessFs::ReadFile),
        &[],
        requirement,
    )
}

/// For a virtio-fs backend: as `deny_all_but_exec` (virtiofsd is exec'd by
/// descriptor, and reading is what it serves), and beneath `/share` listing directories
/// and, where the share is writable, what a file server does to files. Making a
/// character or block device is never granted (the mount is nodev as well, and the
/// backend's uid cannot make one).
pub fn share(writable: bool, requirement: Requirement) -> Result<&'static str, Error> {
    let mut access: BitFlags<AccessFs> = AccessFs::ReadDir.into();
    if writable {
        access |= AccessFs::WriteFile
            | AccessFs::RemoveDir
            | AccessFs::RemoveFile
            | AccessFs::MakeDir
            | AccessFs::MakeReg
            | AccessFs::MakeSock
            | AccessFs::MakeFifo
            | AccessFs::MakeSym
            | AccessFs::Refer
            | AccessFs::Truncate;
    }
    restrict_handling(
        AccessFs::from_all(ABI_USED) & !(AccessFs::Execute | AccessFs::ReadFile),
        &[("/share", access)],
        requirement,
    )
}

fn restrict_handling(
    handled: BitFlags<AccessFs>,
    rules: &[(&str, BitFlags<AccessFs>)],
    requirement: Requirement,
) -> Result<&'static str, Error> {
    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::BestEffort);
    ruleset = ruleset.handle_access(handled)?;
    ruleset = ruleset.scope(Scope::from_all(ABI_USED))?;
    let mut created = ruleset.create()?;
    for (path, access) in rules {
        let fd = PathFd::new(path).map_err(|source| Error::Path {
            path: path.to_string(),
            source,
        })?;
        created = created.add_rule(PathBeneath::new(fd, *access))?;
    }
    let status = created.restrict_self()?;
    match (status.ruleset, requirement) {
        (RulesetStatus::FullyEnforced, _) => Ok("fully enforced"),
        (RulesetStatus::PartiallyEnforced, _) => Ok("partially enforced (older kernel ABI)"),
        (RulesetStatus::NotEnforced, Requirement::Required) => Err(Error::Required),
        (RulesetStatus::NotEnforced, Requirement::IfAvailable) => {
            Ok("not available on this kernel (policy: if-available)")
        }
    }
}
