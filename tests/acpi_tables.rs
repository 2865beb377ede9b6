//! The ACPI platform as the built-in test guest finds it: the Generic Event Device that
//! carries the power button, located from the DSDT, and the guest's `ticks` mode that
//! watches it. (The DSDT bytes themselves, and iasl's view of them, are checked by the
//! unit tests in src/arch/x86_64/acpi.rs.)

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cellvm::arch::x86_64::layout;

/// Runs the test guest with `cmdline` until a line equal to `last` (or 20 s), then
/// kills it: every stdout line with the time it arrived.
fn lines_until(cmdline: &str, last: &str) -> Vec<(Instant, String)> {
    let mut child = common::cellvm()
        .args(["run", "--memory", "64", "--cmdline", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cellvm");
    let out = child.stdout.take().unwrap();
    let last = last.to_string();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_string();
            let done = line == last;
            lines.push((Instant::now(), line));
            if done {
                break;
            }
        }
        lines
    });
    let start = Instant::now();
    while !reader.is_finished() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap()
}

#[test]
fn ticks_mode_finds_the_ged_in_the_dsdt_and_ticks_every_50_ms() {
    let lines = lines_until("tests=ticks", "tick 8");
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    let header = format!(
        "cellvm-testguest: ticks every 50 ms; power button: GED gsi={} status=io:{:#x} routed=true irr=true",
        layout::GED_IRQ,
        layout::GED_PORT
    );
    assert!(
        text.contains(&header.as_str()),
        "no {header:?} in {text:#?}"
    );
    let ticks: Vec<_> = lines
        .iter()
        .filter(|(_, l)| l.starts_with("tick "))
        .collect();
    let numbers: Vec<&str> = ticks.iter().map(|(_, l)| &l[5..]).collect();
    assert_eq!(
        numbers,
        ["1", "2", "3", "4", "5", "6", "7", "8"],
        "{text:#?}"
    );
    // No press, no reaction (a VMM without the device makes the guest say so instead).
    assert!(
        !text
            .iter()
            .any(|l| l.starts_with("TEST power-button PASS") || l.contains("ignored")),
        "{text:#?}"
    );
    // Seven periods of guest time between tick 1 and tick 8, as the host sees them
    // arrive (lenient: the host is shared, and output is buffered on the way).
    let span = ticks[7].0 - ticks[0].0;
    assert!(
        span >= Duration::from_millis(250) && span <= Duration::from_secs(5),
        "tick 1 to tick 8 took {span:?}"
    );
}

/// A stopped VM (as a paused one) sees its TSC jump on resume: the guest prints one tick
/// and goes on at the period, instead of a burst of the ticks it missed.
#[test]
fn ticks_resume_at_the_period_after_the_vm_was_stopped() {
    let mut child = common::cellvm()
        .args(["run", "--memory", "64", "--cmdline", "tests=ticks"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cellvm");
    let pid = child.id() as i32;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx
                .send((Instant::now(), line.trim_end().to_string()))
                .is_err()
            {
                break;
            }
        }
    });
    let next_tick = |rx: &std::sync::mpsc::Receiver<(Instant, String)>| loop {
        let (at, line) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a tick within 20 s");
        if let Some(n) = line.strip_prefix("tick ") {
            break (at, n.parse::<u64>().unwrap());
        }
    };
    while next_tick(&rx).1 < 3 {}
    // SAFETY: kill(2) on the child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_millis(600));
    // Whatever was printed before the stop took effect.
    while rx.try_recv().is_ok() {}
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let (first_at, first) = next_tick(&rx);
    let after: Vec<(Instant, u64)> = (0..3).map(|_| next_tick(&rx)).collect();
    let _ = child.kill();
    let _ = child.wait();
    let numbers: Vec<u64> = after.iter().map(|t| t.1).collect();
    assert_eq!(
        numbers,
        [first + 1, first + 2, first + 3],
        "one number per line"
    );
    // 600 ms stopped is 12 periods: a catch-up would print them all at once.
    let burst = after
        .iter()
        .filter(|(at, _)| *at - first_at < Duration::from_millis(25))
        .count();
    assert!(
        burst <= 1,
        "{burst} ticks within 25 ms of the first after the stop"
    );
}

#[test]
fn hold_and_the_default_checks_do_not_tick() {
    let out = common::run(
        {
            let mut c = common::cellvm();
            c.args([
                "run",
                "--memory",
                "64",
                "--cmdline",
                "hold=1 ignore-power-button",
            ]);
            c.stdin(Stdio::null());
            c
        },
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.elapsed >= Duration::from_millis(900),
        "{:?}",
        out.elapsed
    );
    assert!(out.stdout.contains("9 passed, 0 failed"), "{}", out.stdout);
    assert!(!out.stdout.contains("tick"), "{}", out.stdout);
}
