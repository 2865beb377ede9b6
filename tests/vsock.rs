//! virtio-vsock end to end: host programs and the test guest's own stream-socket
//! driver talk through cellvm's vsock backend over host Unix sockets. Host to guest: a
//! program connects to the VM's socket and writes `CONNECT PORT`; guest to host: the
//! backend connects to `SOCKET_PORT` next to it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{
    cellvm, guest_spec, jailer_command, run, scratch_dir, stream_bytes, test_policy, wait_for,
};

/// Connects to the VM's socket and asks for guest port `port`; the reply line.
fn connect(sock: &Path, port: u32) -> (UnixStream, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&line).into_owned())
}

/// Sends `data` on a connection to the guest's echo service and reads until the guest
/// ends it: what came back.
fn echo(sock: &Path, data: Vec<u8>) -> (String, Vec<u8>) {
    let (s, ok) = connect(sock, 1234);
    let mut reader = s.try_clone().unwrap();
    let back = std::thread::spawn(move || {
        let mut got = Vec::new();
        if let Err(e) = reader.read_to_end(&mut got) {
            eprintln!("echo: reading back after {} bytes: {e}", got.len());
        }
        got
    });
    let mut w = s;
    if let Err(e) = w.write_all(&data) {
        // Reported by the caller, with what came back (the device's log says why).
        eprintln!("echo: sending after {ok:?}: {e}");
    }
    let _ = w.shutdown(std::net::Shutdown::Write);
    (ok, back.join().unwrap())
}

/// The host service the guest's `vsock` check connects to: reads its line, answers.
fn hello_service(hello: UnixListener) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (s, _) = hello.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(b"hello from the host\n").unwrap();
        line
    })
}

fn vsock_dir(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch_dir(name);
    let sock = dir.join("v.sock");
    (dir, sock)
}

#[test]
fn host_and_guest_connect_both_ways_four_streams_echo_byte_for_byte_and_an_unread_one_is_held_back()
{
    let (dir, sock) = vsock_dir("vsock");
    // The host service the guest connects to (host port 5000); 5001 has none.
    let hello = UnixListener::bind(dir.join("v.sock_5000")).unwrap();
    let service = hello_service(hello);
    let spec = format!("cid=3,uds={}", sock.display());
    let vm = std::thread::spawn(move || {
        let mut cmd = cellvm();
        cmd.args(["run", "--vsock", &spec, "--cmdline", "tests=vsock"]);
        run(cmd, Duration::from_secs(90))
    });
    wait_for(&sock);
    // A host peer that writes and never reads is held back after a bounded amount (its
    // writes stop being taken), and the other streams go on meanwhile.
    let (stuck, line) = connect(&sock, 1234);
    assert!(line.starts_with("OK "), "{line:?}");
    stuck.set_nonblocking(true).unwrap();
    let chunk = vec![0x5a; 64 << 10];
    let (mut taken, mut idle) = (0usize, 0);
    while idle < 50 {
        match (&stuck).write(&chunk) {
            Ok(n) => (taken, idle) = (taken + n, 0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                idle += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the unread connection failed after {taken} bytes: {e}"),
        }
        assert!(
            taken < 4 << 20,
            "an unread peer's writes were never held back"
        );
    }
    eprintln!("a peer that never reads was held back after {taken} bytes");
    let streams: Vec<_> = (0..4u64)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let data = stream_bytes(0x9e37_79b9_7f4a_7c15 ^ i, 256 << 10);
                let (ok, back) = echo(&sock, data.clone());
                (ok, back == data, back.len())
            })
        })
        .collect();
    let mut ports = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        let (ok, same, len) = s.join().unwrap();
        assert!(ok.starts_with("OK "), "stream {i}: {ok:?}");
        assert!(
            same,
            "stream {i}: {len} of 262144 bytes came back, or not the same"
        );
        ports.push(ok);
    }
    ports.sort();
    ports.dedup();
    assert_eq!(
        ports.len(),
        4,
        "each connection has its own host port: {ports:?}"
    );
    // The unread one goes away: the guest is told with a reset.
    drop(stuck);
    // The guest refuses port 4321: the stream ends without an OK.
    let (mut refused, line) = connect(&sock, 4321);
    assert_eq!(line, "", "a refused connection gets no OK line");
    assert_eq!(refused.read(&mut [0u8; 8]).unwrap_or(0), 0);
    // Not a CONNECT line: the backend says why and hangs up.
    let mut bad = UnixStream::connect(&sock).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"HELLO 1234\n").unwrap();
    let mut why = String::new();
    let _ = bad.read_to_string(&mut why);
    assert!(why.starts_with("ERR expected CONNECT"), "{why:?}");
    // Port 9 ends the guest's check.
    let (_end, line) = connect(&sock, 9);
    assert_eq!(line, "");
    let out = vm.join().unwrap();
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let line = out.passed("vsock");
    for want in [
        "cid=3 ",
        "client_connected=true reply_ok=true client_closed=true host_refused=true",
        "accepted=5 completed=4 aborted=1 echoed=1048576 refused=1 ended=true over_credit=0 bad_packets=0",
    ] {
        assert!(line.contains(want), "{want:?} in {line}");
    }
    assert_eq!(service.join().unwrap(), "hello from the guest\n");
}

#[test]
fn a_socket_left_by_an_ended_vm_is_replaced_and_one_in_use_is_refused() {
    let (dir, sock) = vsock_dir("vsock-stale");
    let spec = format!("cid=7,uds={}", sock.display());
    let up = |spec: &str| {
        let mut cmd = cellvm();
        cmd.args(["run", "--vsock", spec, "--cmdline", "tests=none"]);
        run(cmd, Duration::from_secs(30))
    };
    // A socket file nothing listens on any more.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let out = up(&spec);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("cellvm-testguest: up"),
        "{}",
        out.stdout
    );
    // One a live program listens on is not taken from it.
    std::fs::remove_file(&sock).unwrap();
    let _live = UnixListener::bind(&sock).unwrap();
    let out = up(&spec);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("in use"), "{}", out.stderr);
    // Nor is a file that is not a socket.
    let file = dir.join("plain");
    std::fs::write(&file, b"keep me").unwrap();
    let out = up(&format!("cid=7,uds={}", file.display()));
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn bad_vsock_arguments_are_refused_before_anything_runs() {
    for (spec, expect) in [
        ("cid=2,uds=/tmp/x", "cid=2: expected 3 to 4294967294"),
        ("cid=3", "give exactly one of uds=, socket= or fd="),
        ("uds=/tmp/x", "uds= needs cid=N"),
        ("fd=200,cid=3", "cid= belongs to the backend"),
        (
            "cid=3,uds=/nonexistent/dir/v.sock",
            "vsock /nonexistent/dir/v.sock",
        ),
    ] {
        let mut cmd = cellvm();
        cmd.args(["run", "--vsock", spec]).stdin(Stdio::null());
        let out = run(cmd, Duration::from_secs(10));
        assert_eq!(out.code, Some(2), "{spec}: {}", out.stderr);
        assert!(out.stderr.contains(expect), "{spec}: {}", out.stderr);
    }
    common::device_refuses(&[
        (
            &["vsock", "--socket", "/s", "--uds", "/tmp/x"][..],
            "vsock needs --cid",
        ),
        (
            &["vsock", "--socket", "/s", "--cid", "1", "--uds", "/tmp/x"][..],
            "--cid: expected 3 to",
        ),
        (
            &["vsock", "--socket", "/s", "--cid", "3", "--uds-fd", "0"][..],
            "--uds-fd needs --uds-dir-fd",
        ),
        (
            &[
                "vsock", "--socket", "/s", "--cid", "3", "--uds", "/a", "--uds-fd", "0",
            ][..],
            "give exactly one of --uds and --uds-fd",
        ),
        (
            &["vsock", "--cid", "3", "--uds", "/a"][..],
            "give exactly one of --socket and --listen-fd",
        ),
    ]);
}

/// The same both ways under the jailer: the vsock backend in a cell of its own, the
/// host side in the VM's run directory (`vsock.sock`, and `vsock/port_P` for the
/// guest's connections out, where a host agent that starts after the VM is reached
/// once it listens).
#[test]
fn a_jailed_vm_talks_vsock_through_its_run_directory() {
    let id = format!("vsock{}", std::process::id());
    let dir = scratch_dir("vsock-jailed");
    let vm = guest_spec(&dir, "vsockvm", "tests=vsock");
    let mut text = std::fs::read_to_string(&vm).unwrap();
    text.push_str("vsock_cid = 42\n");
    std::fs::write(&vm, text).unwrap();
    let policy = test_policy("cellvm-vsock");
    let mut cmd = jailer_command(&id, &policy, &vm);
    cmd.stdin(Stdio::null());
    let jailed = std::thread::spawn(move || run(cmd, Duration::from_secs(90)));
    let run_dir = PathBuf::from(format!("/run/cellvm/vm/{id}"));
    let sock = run_dir.join("vsock.sock");
    wait_for(&sock);
    // vsock/ is root's and the backend's group's: searchable by it, listable by no one
    // else.
    let ports = run_dir.join("vsock");
    let meta = std::fs::metadata(&ports).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o710, 0));
    assert_ne!(meta.gid(), 0, "the backend's group, not root's");
    // The host agent starts after the VM: the guest asks again until it listens.
    std::thread::sleep(Duration::from_millis(300));
    let hello = UnixListener::bind(ports.join("port_5000")).unwrap();
    std::fs::set_permissions(
        ports.join("port_5000"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let service = hello_service(hello);
    let streams: Vec<_> = (0..4u64)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let data = stream_bytes(0x5851_f42d_4c95_7f2d ^ i, 256 << 10);
                let (ok, back) = echo(&sock, data.clone());
                (ok, back == data)
            })
        })
        .collect();
    let results: Vec<(String, bool)> = streams.into_iter().map(|s| s.join().unwrap()).collect();
    assert_eq!(connect(&sock, 4321).1, "");
    assert_eq!(connect(&sock, 9).1, "");
    let out = jailed.join().unwrap();
    for (i, (ok, same)) in results.iter().enumerate() {
        assert!(
            ok.starts_with("OK ") && *same,
            "stream {i}: {ok:?}, same bytes: {same}\n{}\n{}",
            out.stdout,
            out.stderr
        );
    }
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    if !out.stdout.contains("TEST vsock PASS") {
        eprintln!("the jailer's log:\n{}", out.stderr);
    }
    let line = out.passed("vsock");
    for want in [
        "cid=42 ",
        "client_connected=true reply_ok=true client_closed=true host_refused=true",
        "accepted=4 completed=4 aborted=0 echoed=1048576 refused=1 ended=true over_credit=0 bad_packets=0",
    ] {
        assert!(line.contains(want), "{want:?} in {line}");
    }
    assert!(
        !line.contains("client_retries=0 "),
        "the agent started late: {line}"
    );
    assert_eq!(service.join().unwrap(), "hello from the guest\n");
    common::assert_cell_gone(&id);
}
