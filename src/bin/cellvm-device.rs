//! `cellvm-device`: the device backends, a program of their own. A backend cell holds
//! only this binary: none of the VMM's code (and no argument-parsing library) is mapped
//! into it, which keeps each backend small (about 1.4 MiB resident while it serves) and
//! the code a compromised backend could reuse narrow.
//!
//! ```text
//! cellvm-device blk (--socket PATH | --listen-fd N) (--image PATH | --image-fd N)
//!                   [--readonly] [--direct] [--queues N] [--id SERIAL] [--seccomp MODE]
//! cellvm-device net (--socket PATH | --listen-fd N) (--tap NAME | --tap-fd N)
//!                   [--mac MAC] [--seccomp MODE]
//! cellvm-device rng (--socket PATH | --listen-fd N) [--seccomp MODE]
//! ```
//! MODE is kill (default), log or off. Each serves one vhost-user connection and exits
//! when the VMM hangs up.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use cellvm::backend::{self, Socket};
use cellvm::seccomp::Mode;

const USAGE: &str = "usage:
  cellvm-device blk (--socket PATH | --listen-fd N) (--image PATH | --image-fd N)
                    [--readonly] [--direct] [--queues N] [--id SERIAL] [--seccomp MODE]
  cellvm-device net (--socket PATH | --listen-fd N) (--tap NAME | --tap-fd N) [--mac MAC]
                    [--seccomp MODE]
  cellvm-device rng (--socket PATH | --listen-fd N) [--seccomp MODE]
MODE: kill (default), log or off.";

/// A usage error: the message and exit status 2.
type Usage = (String, u8);

fn usage(message: impl std::fmt::Display) -> Usage {
    (format!("{message}\n{USAGE}"), 2)
}

/// The options after the device kind: flags (`--readonly`) and `--key value` pairs, each
/// at most once, every one known to the kind.
struct Opts {
    values: Vec<(String, Option<String>)>,
}

impl Opts {
    fn parse(args: &[String], flags: &[&str], keys: &[&str]) -> Result<Opts, Usage> {
        let mut values: Vec<(String, Option<String>)> = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a
                .strip_prefix("--")
                .ok_or_else(|| usage(format!("unexpected argument {a:?}")))?;
            if values.iter().any(|(k, _)| k == name) {
                return Err(usage(format!("--{name} given twice")));
            }
            if flags.contains(&name) {
                values.push((name.into(), None));
            } else if keys.contains(&name) {
                let v = it
                    .next()
                    .ok_or_else(|| usage(format!("--{name} needs a value")))?;
                values.push((name.into(), Some(v.clone())));
            } else {
                return Err(usage(format!("unknown option --{name}")));
            }
        }
        Ok(Opts { values })
    }

    fn flag(&self, name: &str) -> bool {
        self.values.iter().any(|(k, _)| k == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Exactly one of `a` and `b`.
    fn one_of(&self, a: &str, b: &str) -> Result<(bool, &str), Usage> {
        match (self.value(a), self.value(b)) {
            (Some(v), None) => Ok((true, v)),
            (None, Some(v)) => Ok((false, v)),
            _ => Err(usage(format!("give exactly one of --{a} and --{b}"))),
        }
    }

    fn fd(&self, name: &str, v: &str) -> Result<i32, Usage> {
        v.parse()
            .ok()
            .filter(|fd: &i32| *fd >= 0)
            .ok_or_else(|| usage(format!("--{name} {v}: expected a descriptor number")))
    }

    fn socket(&self) -> Result<Socket, Usage> {
        Ok(match self.one_of("socket", "listen-fd")? {
            (true, path) => Socket::Path(path.into()),
            (false, fd) => Socket::ListenFd(self.fd("listen-fd", fd)?),
        })
    }

    fn seccomp(&self) -> Result<Mode, Usage> {
        match self.value("seccomp").unwrap_or("kill") {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(usage(format!(
                "--seccomp {other}: expected kill, log or off"
            ))),
        }
    }
}

const COMMON: [&str; 3] = ["socket", "listen-fd", "seccomp"];

fn keys(extra: &[&'static str]) -> Vec<&'static str> {
    COMMON.iter().chain(extra).copied().collect()
}

fn blk(opts: &Opts) -> Result<(), Usage> {
    let queues: u16 = match opts.value("queues") {
        None => 1,
        Some(q) => q
            .parse()
            .ok()
            .filter(|q| (1..=cellvm::vmm::config::MAX_DISK_QUEUES).contains(q))
            .ok_or_else(|| {
                usage(format!(
                    "--queues {q}: expected 1 to {}",
                    cellvm::vmm::config::MAX_DISK_QUEUES
                ))
            })?,
    };
    let readonly = opts.flag("readonly");
    let file = match opts.one_of("image", "image-fd")? {
        (true, path) => std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|e| (format!("{path}: {e}"), 2))?,
        // SAFETY: the descriptor was handed to this process to own.
        (false, fd) => unsafe { std::fs::File::from_raw_fd(opts.fd("image-fd", fd)?) },
    };
    let id = opts.value("id").unwrap_or("cellvm");
    let mut disk =
        backend::blk::Disk::new(file, readonly, id).map_err(|e| (format!("image: {e}"), 2))?;
    if opts.flag("direct") {
        disk.set_direct()
            .map_err(|e| (format!("image: O_DIRECT: {e}"), 2))?;
    }
    let b = backend::blk::BlkBackend::new(disk, queues as usize, 256);
    backend::serve("cellvm-blk", b, opts.socket()?, "blk", opts.seccomp()?, &[])
        .map_err(|e| (e.to_string(), 1))
}

fn net(opts: &Opts) -> Result<(), Usage> {
    let mac = match opts.value("mac") {
        Some(m) => backend::net::parse_mac(m).map_err(|e| (e, 2))?,
        None => backend::net::random_mac(),
    };
    let tap = match opts.one_of("tap", "tap-fd")? {
        (true, name) => backend::net::Tap::open(name),
        (false, fd) => {
            let fd = opts.fd("tap-fd", fd)?;
            // SAFETY: the descriptor was handed to this process to own.
            backend::net::Tap::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    }
    .map_err(|e| (format!("tap: {e}"), 2))?;
    let b = backend::net::NetBackend::new(tap, mac);
    let listener = b.tap_listener();
    backend::serve(
        "cellvm-net",
        b,
        opts.socket()?,
        "net",
        opts.seccomp()?,
        &[listener],
    )
    .map_err(|e| (e.to_string(), 1))
}

fn rng(opts: &Opts) -> Result<(), Usage> {
    backend::serve(
        "cellvm-rng",
        backend::rng::RngBackend::new(),
        opts.socket()?,
        "rng",
        opts.seccomp()?,
        &[],
    )
    .map_err(|e| (e.to_string(), 1))
}

fn run(args: &[String]) -> Result<u8, Usage> {
    let (kind, rest) = args
        .split_first()
        .ok_or_else(|| usage("which device? blk, net or rng"))?;
    match kind.as_str() {
        "blk" => blk(&Opts::parse(
            rest,
            &["readonly", "direct"],
            &keys(&["image", "image-fd", "queues", "id"]),
        )?)
        .map(|_| 0),
        "net" => net(&Opts::parse(rest, &[], &keys(&["tap", "tap-fd", "mac"]))?).map(|_| 0),
        "rng" => rng(&Opts::parse(rest, &[], &keys(&[]))?).map(|_| 0),
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            Ok(0)
        }
        "--version" | "-V" => {
            println!("cellvm-device {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        other => Err(usage(format!("unknown device {other:?}"))),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // Before any input: non-dumpable, and no memory may become executable.
    if let Err(e) = cellvm::hardening::lock_process() {
        eprintln!("cellvm-device: error: {e}");
        return ExitCode::from(1);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err((message, code)) => {
            eprintln!("cellvm-device: error: {message}");
            ExitCode::from(code)
        }
    }
}
