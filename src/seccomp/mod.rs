//! Installing the seccomp profiles of policy/seccomp/ (compiled to BPF by build.rs).
//! Each thread installs its own before it touches guest input; the default action kills
//! the whole process.

use seccompiler::sock_filter;

/// (role, thread kind, variant, BPF bytes) for every compiled profile.
static PROFILES: &[(&str, &str, &str, &[u8])] =
    include!(concat!(env!("OUT_DIR"), "/seccomp_profiles.rs"));

/// What a violation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Kill the process (the default).
    #[default]
    Kill,
    /// Log the violation and let the call through (diagnosis only).
    Log,
    /// No filter at all (diagnosis only; a tenant policy must allow it).
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no seccomp profile {0}/{1}")]
    Missing(String, String),
    #[error("installing seccomp profile {0}/{1}: {2}")]
    Install(String, String, seccompiler::Error),
}

fn program(role: &str, thread: &str, variant: &str) -> Option<Vec<sock_filter>> {
    let (_, _, _, bytes) = PROFILES
        .iter()
        .find(|(r, t, v, _)| *r == role && *t == thread && *v == variant)?;
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| sock_filter {
                code: u16::from_le_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect(),
    )
}

/// Installs `role`'s profile for `thread` on the calling thread.
pub fn install(role: &str, thread: &str, mode: Mode) -> Result<(), Error> {
    let variant = match mode {
        Mode::Off => return Ok(()),
        Mode::Kill => "kill",
        Mode::Log => "log",
    };
    let prog =
        program(role, thread, variant).ok_or_else(|| Error::Missing(role.into(), thread.into()))?;
    seccompiler::apply_filter(&prog).map_err(|e| Error::Install(role.into(), thread.into(), e))
}

/// Installs `role`'s process-wide profile (thread kind `all`) on every thread of the
/// process, with a second filter that answers clone3 ENOSYS: clone3's flags live in
/// memory where BPF cannot read them, so thread creation is pushed to clone, whose
/// flags the profile checks. (Stacked filters: the strictest answer wins.)
pub fn install_process(role: &str, mode: Mode) -> Result<(), Error> {
    let variant = match mode {
        Mode::Off => return Ok(()),
        Mode::Kill => "kill",
        Mode::Log => "log",
    };
    let prog =
        program(role, "all", variant).ok_or_else(|| Error::Missing(role.into(), "all".into()))?;
    let err = |e| Error::Install(role.into(), "all".into(), e);
    let no_clone3: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        seccompiler::TargetArch::x86_64,
    )
    .and_then(|f| f.try_into())
    .map_err(|e| err(seccompiler::Error::Backend(e)))?;
    // The clone3 filter first: the profile itself does not allow seccomp().
    seccompiler::apply_filter_all_threads(&no_clone3).map_err(err)?;
    seccompiler::apply_filter_all_threads(&prog).map_err(err)
}

/// Every (role, thread kind) with a compiled profile.
pub fn profiles() -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = PROFILES
        .iter()
        .filter(|p| p.2 == "kill")
        .map(|p| (p.0, p.1))
        .collect();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_profiles_compile_in_both_variants() {
        for thread in ["main", "vcpu", "stdin"] {
            for variant in ["kill", "log"] {
                let p = program("vmm", thread, variant)
                    .unwrap_or_else(|| panic!("vmm/{thread}/{variant}"));
                assert!(p.len() > 10);
            }
        }
        assert!(profiles().contains(&("vmm", "vcpu")));
    }
}
