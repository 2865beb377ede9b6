//! SELinux: whether it is enforcing labels on this host, and what the policy's
//! requirement makes of that. Labelling itself (exec context, image labels) needs
//! SELinux active; our development hosts have it compiled in but not enabled.

use crate::mcs::McsPair;
use crate::policy::Requirement;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tenant {0}: selinux = \"required\" but SELinux is not enabled on this host (no /sys/fs/selinux)")]
    Required(String),
    #[error("tenant {0}: SELinux is enabled, but this cellvm build cannot set labels yet; refusing rather than running unlabelled")]
    Unsupported(String),
}

pub fn enabled() -> bool {
    std::path::Path::new("/sys/fs/selinux/enforce").exists()
}

/// What the cell gets for SELinux: a label to apply, or a logged downgrade.
pub fn plan(
    tenant: &str,
    requirement: Requirement,
    pair: McsPair,
) -> Result<Option<String>, Error> {
    match (enabled(), requirement) {
        (true, _) => Err(Error::Unsupported(tenant.into())),
        (false, Requirement::Required) => Err(Error::Required(tenant.into())),
        (false, Requirement::IfAvailable) => {
            eprintln!(
                "cellvm-jailer: warning: tenant {tenant}: SELinux is not enabled on this host; the cell runs without its label {} (policy: selinux = \"if-available\")",
                pair.process_label()
            );
            Ok(None)
        }
    }
}
