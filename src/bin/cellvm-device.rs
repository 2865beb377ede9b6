//! `cellvm-device`: the device backends, a program of their own. A backend cell holds
//! only this binary: none of the VMM's code (and no argument-parsing library) is mapped
//! into it, which keeps each backend small (about 1.4 MiB resident while it serves) and
//! the code a compromised backend could reuse narrow.
//!
//! ```text
//! cellvm-device blk (--socket PATH | --listen-fd N) (--image PATH | --image-fd N)
//!                   [--format raw|qcow2] [--backing FD:FMT,...] [--key-fd N]
//!                   [--readonly] [--direct] [--queues N] [--id SERIAL] [--seccomp MODE]
//! cellvm-device net (--socket PATH | --listen-fd N) (--tap NAME [--queues N] | --tap-fd N,...)
//!                   [--mac MAC] [--seccomp MODE]
//! cellvm-device rng (--socket PATH | --listen-fd N) [--seccomp MODE]
//! cellvm-device vsock (--socket PATH | --listen-fd N) --cid N
//!                   (--uds PATH | --uds-fd N --uds-dir-fd N --uds-name NAME)
//!                   [--seccomp MODE]
//! cellvm-device console (--socket PATH | --listen-fd N)
//!                   (--hvc-fd N | --hvc-listen-fd N) [--ports NAME:FD,...]
//!                   [--seccomp MODE]
//! cellvm-device virtiofsd --exec-fd N [--seccomp MODE] -- ARGS...
//! ```
//! `virtiofsd` serves no device itself: it installs the `virtiofsd` seccomp profile
//! (policy/seccomp/virtiofsd.json) and execs the virtiofsd binary open on `--exec-fd`
//! (statically linked; checked by the jailer) with ARGS and an empty environment, so
//! that a backend nobody here wrote runs under cellvm's own profile.
//! `console` is virtio-console with the multiport feature: port 0 (hvc0) has its host
//! end on `--hvc-fd` (a connected stream socket) or `--hvc-listen-fd` (a listening one,
//! one host program at a time), and each of `--ports` a named port whose host end is
//! the listening socket FD.
//! `vsock` takes host connections on the Unix socket `--uds` (bound here) or
//! `--uds-fd` (bound by the VMM, with `--uds-dir-fd` the directory it is in and
//! `--uds-name` its name); a guest's connection to host port P goes to `NAME_P` in
//! that directory and nowhere else.
//! `--format` (default raw) says what the image is; a raw image's header is never looked
//! at. A qcow2 image's header is checked and what cellvm does not implement refused (exit
//! 2, on stderr); `--backing` lists its chain, nearest layer first, as inherited
//! read-only descriptors: nothing is opened by name. `--key-fd` is a LUKS-encrypted
//! qcow2 image's key: the descriptor of a secret file, read once (its bytes are the
//! passphrase) and closed before the image is opened.
//! Every kind takes `--counters-fd N`: a sealed one-page memfd its VMM reads, where the
//! backend counts requests, errors and bytes (`cellvm::backend::counters`).
//! MODE is kill (default), log or off. Each serves one vhost-user connection and exits
//! when the VMM hangs up.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use cellvm::backend::{self, Socket};
use cellvm::seccomp::Mode;

const USAGE: &str = "usage:
  cellvm-device blk (--socket PATH | --listen-fd N) (--image PATH | --image-fd N)
                    [--format raw|qcow2] [--backing FD:FMT,...] [--key-fd N]
                    [--readonly] [--direct] [--queues N] [--id SERIAL] [--seccomp MODE]
  cellvm-device net (--socket PATH | --listen-fd N) (--tap NAME [--queues N] | --tap-fd N,...) [--mac MAC]
                    [--seccomp MODE]
  cellvm-device rng (--socket PATH | --listen-fd N) [--seccomp MODE]
  cellvm-device vsock (--socket PATH | --listen-fd N) --cid N
                    (--uds PATH | --uds-fd N --uds-dir-fd N --uds-name NAME)
                    [--seccomp MODE]
  cellvm-device console (--socket PATH | --listen-fd N)
                    (--hvc-fd N | --hvc-listen-fd N) [--ports NAME:FD,...]
                    [--seccomp MODE]
  cellvm-device virtiofsd --exec-fd N [--seccomp MODE] -- ARGS...
Every kind: [--counters-fd N], the page of counters its VMM reads.
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

    /// `--counters-fd N`: maps the page of counters the VMM reads (backend::counters).
    fn counters(&self) -> Result<(), Usage> {
        let Some(v) = self.value("counters-fd") else {
            return Ok(());
        };
        let fd = self.fd("counters-fd", v)?;
        backend::counters::attach(fd).map_err(|e| (format!("--counters-fd {fd}: {e}"), 2))
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

const COMMON: [&str; 4] = ["socket", "listen-fd", "seccomp", "counters-fd"];

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
    let format = match opts.value("format") {
        None => block::header::Format::Raw,
        Some(f) => f
            .parse()
            .map_err(|_| usage(format!("--format {f}: expected raw or qcow2")))?,
    };
    let backing = match opts.value("backing") {
        None => Vec::new(),
        Some(_) if format == block::header::Format::Raw => {
            return Err(usage(
                "--backing needs --format qcow2 (a raw image has no backing file)",
            ))
        }
        Some(list) => backing_layers(opts, list)?,
    };
    let mut key = match opts.value("key-fd") {
        None => None,
        Some(_) if format == block::header::Format::Raw => {
            return Err(usage(
                "--key-fd opens an encrypted qcow2 image (--format qcow2)",
            ))
        }
        Some(fd) => Some(read_key(owned_file(opts.fd("key-fd", fd)?, "--key-fd")?)?),
    };
    let file = match opts.one_of("image", "image-fd")? {
        (true, path) => std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|e| (format!("{path}: {e}"), 2))?,
        (false, fd) => owned_file(opts.fd("image-fd", fd)?, "--image-fd")?,
    };
    // A write past RLIMIT_FSIZE (the jailer sets it to what the image may grow to) fails
    // that request with EFBIG instead of killing the backend.
    // SAFETY: setting a signal's disposition to ignore; no handler runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let direct = opts.flag("direct");
    let image: Box<dyn block::DiskImage> = match format {
        // A raw image's header is never looked at: its bytes are the guest's.
        block::header::Format::Raw => {
            let mut raw = block::Raw::new(file).map_err(|e| (format!("image: {e}"), 2))?;
            if direct {
                raw.set_direct()
                    .map_err(|e| (format!("image: O_DIRECT: {e}"), 2))?;
            }
            Box::new(raw)
        }
        block::header::Format::Qcow2 => Box::new(
            block::Qcow2::open(file, readonly, direct, backing, key.as_deref())
                .map_err(|e| (format!("qcow2 {e}"), 2))?,
        ),
    };
    // The passphrase has done its work (the master key lives on in the cipher).
    if let Some(k) = key.as_mut() {
        k.fill(0);
    }
    opts.counters()?;
    let id = opts.value("id").unwrap_or("cellvm");
    let disk = backend::blk::Disk::with_image(image, readonly, id);
    let b = backend::blk::BlkBackend::new(disk, queues as usize, 256);
    let served = backend::serve(
        "cellvm-blk",
        b.clone(),
        opts.socket()?,
        "blk",
        opts.seccomp()?,
        &[],
    )
    .map_err(|e| (e.to_string(), 1));
    // The connection is over; the worker threads may still hold the disk, so it is
    // flushed here rather than dropped.
    b.flush()
        .map_err(|e| (format!("image: flush at exit: {e}"), 1))?;
    served
}

/// An inherited descriptor, checked to be open, as a file this process owns.
fn owned_file(fd: i32, what: &str) -> Result<std::fs::File, Usage> {
    // SAFETY: fcntl(F_GETFD) only checks the descriptor exists.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err((format!("{what} {fd}: not an open descriptor"), 2));
    }
    // SAFETY: the descriptor was handed to this process to own; the caller takes each
    // number once.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// A secret file's bytes, the passphrase exactly (no newline is taken off).
fn read_key(file: std::fs::File) -> Result<Vec<u8>, Usage> {
    use std::io::Read;
    let mut key = Vec::new();
    file.take(block::luks::MAX_KEY_LEN as u64 + 1)
        .read_to_end(&mut key)
        .map_err(|e| (format!("--key-fd: reading the key: {e}"), 2))?;
    if key.is_empty() || key.len() > block::luks::MAX_KEY_LEN {
        return Err((
            format!(
                "--key-fd: the key must be 1 to {} bytes, not {}",
                block::luks::MAX_KEY_LEN,
                if key.is_empty() {
                    "empty".to_string()
                } else {
                    "longer".to_string()
                }
            ),
            2,
        ));
    }
    Ok(key)
}

/// The most layers `--backing` may list.
const MAX_BACKING: usize = 32;

/// `--backing FD:FMT,...`: the chain below the top, nearest first, each an open
/// read-only descriptor and its format. No number twice, none of the other descriptors.
fn backing_layers(opts: &Opts, list: &str) -> Result<Vec<block::Layer>, Usage> {
    let mut seen: Vec<i32> = ["image-fd", "listen-fd", "counters-fd", "key-fd"]
        .iter()
        .filter_map(|k| opts.value(k).and_then(|v| v.parse().ok()))
        .collect();
    let mut pairs = Vec::new();
    for item in list.split(',') {
        let bad = || {
            usage(format!(
                "--backing {item:?}: expected FD:FORMAT (raw or qcow2)"
            ))
        };
        let (fd, fmt) = item.split_once(':').ok_or_else(bad)?;
        let fd: i32 = fd.parse().ok().filter(|fd| *fd >= 0).ok_or_else(bad)?;
        let format: block::header::Format = fmt.parse().map_err(|_| bad())?;
        if seen.contains(&fd) {
            return Err(usage(format!("--backing: descriptor {fd} given twice")));
        }
        seen.push(fd);
        pairs.push((fd, format));
    }
    if pairs.len() > MAX_BACKING {
        return Err(usage(format!("--backing: more than {MAX_BACKING} layers")));
    }
    pairs
        .into_iter()
        .map(|(fd, format)| {
            Ok(block::Layer {
                file: owned_file(fd, "--backing")?,
                format,
            })
        })
        .collect()
}

fn net(opts: &Opts) -> Result<(), Usage> {
    let mac = match opts.value("mac") {
        Some(m) => backend::net::parse_mac(m).map_err(|e| (e, 2))?,
        None => backend::net::random_mac(),
    };
    let taps = match opts.one_of("tap", "tap-fd")? {
        (true, name) => {
            let queues: usize = match opts.value("queues") {
                None => 1,
                Some(q) => q
                    .parse()
                    .ok()
                    .filter(|q| (1..=backend::net::MAX_QUEUE_PAIRS).contains(q))
                    .ok_or_else(|| {
                        usage(format!(
                            "--queues {q}: expected 1 to {}",
                            backend::net::MAX_QUEUE_PAIRS
                        ))
                    })?,
            };
            backend::net::Tap::open_queues(name, queues)
        }
        // One descriptor per queue pair: the queues of one multi-queue tap.
        (false, list) => {
            if opts.value("queues").is_some() {
                return Err(usage(
                    "--queues goes with --tap; --tap-fd lists one descriptor per queue",
                ));
            }
            let mut fds: Vec<i32> = Vec::new();
            for f in list.split(',') {
                let fd = opts.fd("tap-fd", f)?;
                if fds.contains(&fd) {
                    return Err(usage(format!("--tap-fd {fd}: descriptor given twice")));
                }
                fds.push(fd);
            }
            if fds.len() > backend::net::MAX_QUEUE_PAIRS {
                return Err(usage(format!(
                    "--tap-fd: at most {} queues",
                    backend::net::MAX_QUEUE_PAIRS
                )));
            }
            fds.into_iter()
                // SAFETY: each descriptor was handed to this process to own, once.
                .map(|fd| backend::net::Tap::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))
                .collect()
        }
    }
    .map_err(|e| (format!("tap: {e}"), 2))?;
    opts.counters()?;
    let b = backend::net::NetBackend::new(taps, mac);
    let listeners = b.tap_listeners();
    backend::serve_on_threads(
        "cellvm-net",
        b,
        opts.socket()?,
        "net",
        opts.seccomp()?,
        &listeners,
    )
    .map_err(|e| (e.to_string(), 1))
}

fn rng(opts: &Opts) -> Result<(), Usage> {
    opts.counters()?;
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

fn vsock(opts: &Opts) -> Result<(), Usage> {
    use backend::vsock::{HostPorts, Vsock, VsockBackend, MAX_GUEST_CID, MIN_GUEST_CID};
    use std::os::unix::net::UnixListener;
    let (socket, seccomp) = (opts.socket()?, opts.seccomp()?);
    let cid: u64 = opts
        .value("cid")
        .ok_or_else(|| usage("vsock needs --cid"))?
        .parse()
        .ok()
        .filter(|c| (MIN_GUEST_CID..=MAX_GUEST_CID).contains(c))
        .ok_or_else(|| {
            usage(format!(
                "--cid: expected {MIN_GUEST_CID} to {MAX_GUEST_CID}"
            ))
        })?;
    // The listening socket, and the directory guest connections to the host resolve in
    // (made the working directory: a guest port only ever names `NAME_P` there).
    let (listener, name) = match opts.one_of("uds", "uds-fd")? {
        (true, path) => {
            let path = std::path::Path::new(path);
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| usage(format!("--uds {}: no file name", path.display())))?
                .to_string();
            let listener = UnixListener::bind(path)
                .map_err(|e| (format!("--uds {}: {e}", path.display()), 2))?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            std::env::set_current_dir(dir)
                .map_err(|e| (format!("--uds {}: {e}", dir.display()), 2))?;
            (listener, name)
        }
        (false, fd) => {
            let fd = opts.fd("uds-fd", fd)?;
            let dir = opts
                .value("uds-dir-fd")
                .ok_or_else(|| usage("--uds-fd needs --uds-dir-fd and --uds-name"))?;
            let dir = opts.fd("uds-dir-fd", dir)?;
            let name = opts
                .value("uds-name")
                .filter(|n| !n.is_empty() && !n.contains('/'))
                .ok_or_else(|| usage("--uds-fd needs --uds-name, a file name"))?
                .to_string();
            let dir = owned_file(dir, "--uds-dir-fd")?;
            // SAFETY: fchdir on a descriptor this process owns.
            if unsafe { libc::fchdir(std::os::fd::AsRawFd::as_raw_fd(&dir)) } < 0 {
                let e = std::io::Error::last_os_error();
                return Err((format!("--uds-dir-fd: {e}"), 2));
            }
            let sock = owned_file(fd, "--uds-fd")?;
            // SAFETY: an inherited listening socket, owned from here on.
            let listener =
                unsafe { UnixListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(sock)) };
            (listener, name)
        }
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| (format!("--uds: {e}"), 2))?;
    let device = Vsock::new(cid, Some(listener), Some(HostPorts { name }))
        .map_err(|e| (format!("vsock: {e}"), 1))?;
    opts.counters()?;
    let b = VsockBackend::new(device, cid);
    let host = b.host_listener();
    backend::serve("cellvm-vsock", b, socket, "vsock", seccomp, &[host])
        .map_err(|e| (e.to_string(), 1))
}

fn console(opts: &Opts) -> Result<(), Usage> {
    use backend::console::{valid_name, Console, ConsoleBackend, HostEnd, PortSpec, MAX_PORTS};
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    let (socket, seccomp) = (opts.socket()?, opts.seccomp()?);
    // Every descriptor is owned once: the same number twice is a usage error.
    let mut used: Vec<i32> = Vec::new();
    let mut take = |name: &str, v: &str| -> Result<std::fs::File, Usage> {
        let fd = opts.fd(name, v)?;
        if used.contains(&fd) {
            return Err(usage(format!("--{name} {fd}: descriptor given twice")));
        }
        used.push(fd);
        owned_file(fd, &format!("--{name}"))
    };
    let hvc = match opts.one_of("hvc-fd", "hvc-listen-fd")? {
        (true, fd) => {
            let f = take("hvc-fd", fd)?;
            // SAFETY: an inherited connected stream socket, owned from here on.
            HostEnd::Connected(unsafe { UnixStream::from_raw_fd(f.into_raw_fd()) })
        }
        (false, fd) => {
            let f = take("hvc-listen-fd", fd)?;
            // SAFETY: an inherited listening socket, owned from here on.
            HostEnd::Listening(unsafe { UnixListener::from_raw_fd(f.into_raw_fd()) })
        }
    };
    let mut ports = vec![PortSpec {
        name: None,
        host: hvc,
    }];
    for item in opts
        .value("ports")
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (name, fd) = item
            .rsplit_once(':')
            .ok_or_else(|| usage(format!("--ports {item:?}: expected NAME:FD")))?;
        if !valid_name(name) || ports.iter().any(|p| p.name.as_deref() == Some(name)) {
            return Err(usage(format!(
                "--ports {name:?}: 1 to 64 letters, digits, '.', '_' or '-', not starting with '.', each name once"
            )));
        }
        if ports.len() >= MAX_PORTS {
            return Err(usage(format!(
                "--ports: at most {} named ports",
                MAX_PORTS - 1
            )));
        }
        let f = take("ports", fd)?;
        ports.push(PortSpec {
            name: Some(name.to_string()),
            // SAFETY: an inherited listening socket, owned from here on.
            host: HostEnd::Listening(unsafe { UnixListener::from_raw_fd(f.into_raw_fd()) }),
        });
    }
    let device = Console::new(ports).map_err(|e| (format!("console: {e}"), 2))?;
    opts.counters()?;
    let b = ConsoleBackend::new(device);
    let host = b.host_listener();
    backend::serve("cellvm-console", b, socket, "console", seccomp, &[host])
        .map_err(|e| (e.to_string(), 1))
}

/// Execs virtiofsd (open on `--exec-fd`) under cellvm's `virtiofsd` seccomp profile.
/// Returns only if it could not.
fn virtiofsd(args: &[String]) -> Result<u8, Usage> {
    let split = args
        .iter()
        .position(|a| a == "--")
        .ok_or_else(|| usage("virtiofsd: its own arguments follow --"))?;
    let opts = Opts::parse(&args[..split], &[], &["exec-fd", "seccomp"])?;
    let fd = opts
        .value("exec-fd")
        .ok_or_else(|| usage("virtiofsd needs --exec-fd N"))?;
    let binary = owned_file(opts.fd("exec-fd", fd)?, "--exec-fd")?;
    let argv = std::iter::once("virtiofsd")
        .chain(args[split + 1..].iter().map(String::as_str))
        .map(|a| {
            std::ffi::CString::new(a).map_err(|_| usage(format!("argument {a:?} holds a NUL")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut argp: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // The profile stays across the exec and binds every thread virtiofsd starts.
    cellvm::seccomp::install_process("virtiofsd", opts.seccomp()?)
        .map_err(|e| (e.to_string(), 1))?;
    use std::os::fd::AsRawFd;
    // SAFETY: execveat of an open descriptor with an empty path (AT_EMPTY_PATH) and
    // NULL-terminated arrays of NUL-terminated strings that outlive the call.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            binary.as_raw_fd(),
            c"".as_ptr(),
            argp.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    Err((
        format!("exec virtiofsd: {}", std::io::Error::last_os_error()),
        1,
    ))
}

fn run(args: &[String]) -> Result<u8, Usage> {
    let (kind, rest) = args
        .split_first()
        .ok_or_else(|| usage("which device? blk, net, rng, vsock, console or virtiofsd"))?;
    match kind.as_str() {
        "blk" => blk(&Opts::parse(
            rest,
            &["readonly", "direct"],
            &keys(&[
                "image", "image-fd", "format", "backing", "key-fd", "queues", "id",
            ]),
        )?)
        .map(|_| 0),
        "net" => net(&Opts::parse(
            rest,
            &[],
            &keys(&["tap", "tap-fd", "mac", "queues"]),
        )?)
        .map(|_| 0),
        "rng" => rng(&Opts::parse(rest, &[], &keys(&[]))?).map(|_| 0),
        "vsock" => vsock(&Opts::parse(
            rest,
            &[],
            &keys(&["cid", "uds", "uds-fd", "uds-dir-fd", "uds-name"]),
        )?)
        .map(|_| 0),
        "console" => console(&Opts::parse(
            rest,
            &[],
            &keys(&["hvc-fd", "hvc-listen-fd", "ports"]),
        )?)
        .map(|_| 0),
        "virtiofsd" => virtiofsd(rest),
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
