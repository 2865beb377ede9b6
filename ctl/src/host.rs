//! The VMs on this host as cellvmctl finds them: the jailer's registry (read through
//! its library) for which VMs exist and who supervises them, each VM's run directory
//! for its API and console sockets, and the API for everything the VMM knows.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellvm_jailer::registry::{self, Entry, Registry};
use serde::{Deserialize, Serialize};

use crate::http;

pub use cellvm_jailer::rundir::{API_SOCKET, CONSOLE_LOG, CONSOLE_SOCKET};

/// What a refused connect or lookup tells the operator.
pub const DENIED: &str = "permission denied: root or the tenant's api_group";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no VM with id {0:?} on this host (`cellvmctl list` shows them)")]
    Unknown(String),
    #[error(
        "{0:?} is not a VM id (1 to 64 of letters, digits, '.', '_', '-', not starting with '.')"
    )]
    BadId(String),
    #[error("{DENIED} ({0})")]
    Denied(String),
    #[error("vm {id}: not running ({why})")]
    NotRunning { id: String, why: String },
    #[error("vm {id}: {what}: HTTP {status}: {message}")]
    Api {
        id: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error("vm {id}: {source}")]
    Http { id: String, source: http::Error },
    #[error("vm {id}: {what}")]
    Vm { id: String, what: String },
    #[error("{0}")]
    Registry(#[from] registry::Error),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// 2 for a usage error or an unknown id, 1 for every other failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Unknown(_) | Error::BadId(_) => 2,
            _ => 1,
        }
    }
}

/// A VM id as the jailer makes them: a file name in the registry and the run directory.
pub fn check_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadId(id.chars().take(80).collect()))
    }
}

/// What `vm.info` answers (every field optional: an older or newer VMM may lack some).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Info {
    pub id: String,
    pub tenant: String,
    pub state: String,
    pub reason: String,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub uptime_ms: u64,
    pub label: String,
    pub cgroup: String,
    pub devices: Vec<Device>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Device {
    pub id: String,
    pub kind: String,
    pub pid: Option<u64>,
    pub state: String,
}

/// The host: where its registry and run directories are.
#[derive(Debug, Clone)]
pub struct Host {
    pub run_dir: PathBuf,
}

/// One VM found on the host.
#[derive(Debug, Clone)]
pub struct Vm {
    pub id: String,
    /// Its registry entry; None when the caller is not root (the registry is root's,
    /// the run directory may be the tenant's group's).
    pub entry: Option<Entry>,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Host {
    pub fn new(run_dir: &Path) -> Host {
        Host {
            run_dir: run_dir.to_path_buf(),
        }
    }

    /// `RUN_DIR/vm/<id>/`.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        cellvm_jailer::rundir::path(&self.run_dir, id)
    }

    pub fn api_socket(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join(API_SOCKET)
    }

    /// Every registry entry (and the files that do not parse as one). Root only.
    pub fn scan(&self) -> Result<registry::Scan, Error> {
        if !is_root() {
            return Err(Error::Denied(format!(
                "{}: the registry is root's",
                self.run_dir.join("vms").display()
            )));
        }
        Ok(Registry::lock(&self.run_dir)?.scan()?)
    }

    /// Whether the registry still has an entry for `id`.
    pub fn has_entry(&self, id: &str) -> Result<bool, Error> {
        let scan = self.scan()?;
        Ok(scan.entries.iter().any(|e| e.id == id) || scan.broken.iter().any(|b| b.id == id))
    }

    /// The VM `id`, which must be running. Root finds it in the registry; anyone else
    /// by its run directory, which only root and the tenant's api_group can reach.
    pub fn find(&self, id: &str) -> Result<Vm, Error> {
        check_id(id)?;
        if !is_root() {
            let sock = self.api_socket(id);
            return match std::fs::symlink_metadata(&sock) {
                Ok(_) => Ok(Vm {
                    id: id.into(),
                    entry: None,
                }),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    Err(Error::Denied(format!("{}: {e}", sock.display())))
                }
                Err(_) => Err(Error::Unknown(id.into())),
            };
        }
        let scan = self.scan()?;
        let Some(entry) = scan.entries.into_iter().find(|e| e.id == id) else {
            if let Some(b) = scan.broken.iter().find(|b| b.id == id) {
                return Err(Error::Vm {
                    id: id.into(),
                    what: format!(
                        "its registry entry {} cannot be read: {}",
                        b.path.display(),
                        b.why
                    ),
                });
            }
            return Err(Error::Unknown(id.into()));
        };
        if !entry.is_live() {
            return Err(Error::NotRunning {
                id: id.into(),
                why: format!(
                    "its supervisor {} is gone; `cellvm-jailer gc` reclaims what it left",
                    entry.supervisor
                ),
            });
        }
        Ok(Vm {
            id: id.into(),
            entry: Some(entry),
        })
    }

    /// One API request to `vm`, bounded by `timeout`, connect included.
    pub fn call(
        &self,
        id: &str,
        method: &str,
        endpoint: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<http::Response, Error> {
        let sock = self.api_socket(id);
        let target = api_target(endpoint);
        answered(
            id,
            &sock,
            method,
            &target,
            http::request(&sock, method, &target, body, timeout),
        )
    }

    /// `GET vm.info`, as the VMM's JSON object and as typed fields.
    pub fn info(&self, id: &str, timeout: Duration) -> Result<(serde_json::Value, Info), Error> {
        info_of(id, self.call(id, "GET", "vm.info", None, timeout)?)
    }

    /// Waits until the registry entry of `id` is gone (its supervisor cleaned up), at
    /// most `limit`. Root only; without the registry it returns at once.
    pub fn wait_gone(&self, id: &str, limit: Duration) -> Result<bool, Error> {
        if !is_root() {
            return Ok(false);
        }
        let deadline = Instant::now() + limit;
        loop {
            if !self.has_entry(id)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The request target of an API endpoint.
pub fn api_target(endpoint: &str) -> String {
    format!("/api/v1/{endpoint}")
}

/// An exchange's outcome in the operator's words: a failed exchange as `api_error`
/// says, an error status with the VMM's message.
pub fn answered(
    id: &str,
    sock: &Path,
    method: &str,
    target: &str,
    r: Result<http::Response, http::Error>,
) -> Result<http::Response, Error> {
    let r = r.map_err(|e| api_error(id, sock, e))?;
    if r.status >= 400 {
        return Err(Error::Api {
            id: id.into(),
            what: format!("{method} {target}"),
            status: r.status,
            message: escape_line(&r.message()),
        });
    }
    Ok(r)
}

/// A `vm.info` answer as the VMM's JSON object and as typed fields.
pub fn info_of(id: &str, r: http::Response) -> Result<(serde_json::Value, Info), Error> {
    let bad = |why: String| Error::Vm {
        id: id.into(),
        what: format!("vm.info: {why}"),
    };
    let value: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|e| bad(format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    let info: Info = serde_json::from_value(value.clone()).map_err(|e| bad(format!("{e}")))?;
    Ok((value, info))
}

/// A failed API exchange in the operator's words: a socket that is not there or
/// refuses is a VM that is not running, EACCES is a refused permission.
pub fn api_error(id: &str, sock: &Path, e: http::Error) -> Error {
    match e.connect_errno() {
        Some(libc::EACCES) | Some(libc::EPERM) => Error::Denied(format!("{}", sock.display())),
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => Error::NotRunning {
            id: id.into(),
            why: format!("{e}"),
        },
        _ => Error::Http {
            id: id.into(),
            source: e,
        },
    }
}

/// Text from the VMM (untrusted) made safe for a terminal: one line, control bytes
/// escaped as the supervisor escapes them.
pub fn escape_line(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    cellvm_jailer::supervise::escape(s.as_bytes(), true, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_file_names_and_nothing_else() {
        for ok in ["vm1", "example-web1-123", "a.b_c", "X"] {
            check_id(ok).unwrap();
        }
        for bad in ["", ".hidden", "../etc", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(matches!(check_id(bad), Err(Error::BadId(_))), "{bad:?}");
        }
        assert_eq!(Error::BadId("x".into()).exit_code(), 2);
        assert_eq!(Error::Unknown("x".into()).exit_code(), 2);
        assert_eq!(Error::Denied("x".into()).exit_code(), 1);
    }

    #[test]
    fn info_takes_what_the_contract_names_and_tolerates_the_rest() {
        let v: Info = serde_json::from_str(
            r#"{"id":"vm1","tenant":"example","state":"running","reason":"booted","vcpus":1,"memory_mib":64,
               "uptime_ms":1234,"label":"system_u:system_r:cellvm_t:s0:c1,c2","cgroup":"/sys/fs/cgroup/cpu/cellvm/vm1",
               "devices":[{"id":"dev0","kind":"blk","pid":1234,"state":"connected"}],"future":true}"#,
        )
        .unwrap();
        assert_eq!(
            (v.state.as_str(), v.vcpus, v.memory_mib),
            ("running", 1, 64)
        );
        assert_eq!(v.devices[0].pid, Some(1234));
        let partial: Info = serde_json::from_str(r#"{"state":"paused"}"#).unwrap();
        assert_eq!(partial.state, "paused");
    }

    #[test]
    fn vmm_text_cannot_drive_the_terminal() {
        assert_eq!(escape_line("a\x1b[2Jb\nc"), "a\\x1b[2Jb\\x0ac");
    }
}
