//! The sandbox cellvm-img enters once its files are open, shown from inside with a
//! positive control: `x-probe FILE OTHER` (hidden) opens FILE, enters the sandbox on it,
//! then opens FILE again and OTHER.

mod common;
use common::*;

#[test]
fn only_the_named_files_can_be_opened() {
    let s = Scratch::new("sandbox");
    let (named, other) = (s.p("named.raw"), s.p("other.raw"));
    std::fs::write(&named, b"x").unwrap();
    std::fs::write(&other, b"y").unwrap();

    // Positive control: no sandbox, both open.
    let r = img(&["x-probe", "--x-sandbox=none", &named, &other]);
    let out = ok(r, "probe without sandbox");
    assert!(out.contains(&format!("open {named}: ok")), "{out}");
    assert!(out.contains(&format!("open {other}: ok")), "{out}");

    // Landlock alone: the named file opens, the other is denied.
    let out = ok(
        img(&["x-probe", "--x-sandbox=landlock", &named, &other]),
        "probe landlock",
    );
    assert!(out.contains(&format!("open {named}: ok")), "{out}");
    assert!(
        out.contains(&format!("open {other}: Permission denied")),
        "Landlock must deny the other file: {out}"
    );
    // /etc/passwd, a file any user may read, is denied too.
    let out = ok(
        img(&["x-probe", "--x-sandbox=landlock", &named, "/etc/passwd"]),
        "probe passwd",
    );
    assert!(out.contains("open /etc/passwd: Permission denied"), "{out}");

    // The full sandbox (the default): seccomp allows no open at all; the first one kills
    // the process with SIGSYS.
    let r = img(&["x-probe", &named, &other]);
    assert!(r.stdout.contains("sandbox: on (Full)"), "{}", r.stdout);
    assert!(
        !r.stdout.contains("open "),
        "no open may succeed: {}",
        r.stdout
    );
    assert_eq!(
        r.signal,
        Some(libc_sigsys()),
        "killed by seccomp: {:?} {}",
        r.code,
        r.stderr
    );
}

fn libc_sigsys() -> i32 {
    31
}

/// Every command works inside the full sandbox (the default): the profile allows what
/// they need, and they run as an unprivileged user on files that user owns.
#[test]
fn commands_run_unprivileged_in_the_sandbox() {
    let s = Scratch::new("unpriv");
    let have_setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok();
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        })
        .unwrap_or(false);
    let (f, raw, out) = (s.p("a.qcow2"), s.p("p.raw"), s.p("o.qcow2"));
    pattern_raw(&raw, 1);
    let run = |args: &[&str]| -> Run {
        let mut c = if is_root && have_setpriv {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_cellvm-img"),
            ]);
            c
        } else {
            std::process::Command::new(env!("CARGO_BIN_EXE_cellvm-img"))
        };
        c.args(args);
        let o = c.output().unwrap();
        use std::os::unix::process::ExitStatusExt;
        Run {
            code: o.status.code(),
            signal: o.status.signal(),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    };
    if is_root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&s.0, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::chown(&raw, Some(65534), Some(65534)).unwrap();
    }
    ok(run(&["create", "-f", "qcow2", &f, "8M"]), "create");
    ok(
        run(&["convert", "-c", "-O", "qcow2", &raw, &out]),
        "convert",
    );
    ok(run(&["info", "--output", "json", &out]), "info");
    ok(run(&["map", &out]), "map");
    ok(run(&["check", &out]), "check");
    ok(run(&["snapshot", "-c", "s", &out]), "snapshot -c");
    ok(run(&["snapshot", "-l", &out]), "snapshot -l");
    ok(run(&["snapshot", "-a", "s", &out]), "snapshot -a");
    ok(run(&["snapshot", "-d", "s", &out]), "snapshot -d");
    ok(run(&["resize", &out, "16M"]), "resize");
    qemu_clean(&out);
    qemu_same(&raw, &out);
    if is_root && have_setpriv {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&f).unwrap().uid(),
            65534,
            "created by the unprivileged user"
        );
        // A file the user does not own and may not write stays untouched.
        let root_file = s.p("root.qcow2");
        ok(
            qemu_img(&["create", "-f", "qcow2", &root_file, "1M"]),
            "root image",
        );
        let r = run(&["snapshot", "-c", "s", &root_file]);
        assert_eq!(r.code, Some(1), "{}", r.stderr);
    }
}
