//! The virtio-console check (`tests=virtconsole`): the guest is a multiport driver
//! (virtio 1.2, 5.3) speaking the control protocol itself, as Linux does.
//!
//! - It says DEVICE_READY, answers every DEVICE_ADD with PORT_READY, and opens each
//!   port it is told of (PORT_OPEN): port 0 once the device says it is the console,
//!   a named port once it has its name.
//! - On the console (hvc0) it writes `hvc0: hello from the guest` and answers every
//!   line the host types with `hvc0 got: LINE`.
//! - On the first named port it echoes every byte back, for as long as the host
//!   program stays; once the host has connected, sent, and gone (PORT_OPEN 0 after
//!   bytes went both ways), and a console line was answered, the check ends.

use crate::hw::{rdtsc, tsc_hz};
use crate::virtio::{self as v, Queue, Ring, NO_VECTOR};
use crate::Report;

pub const TYPE_CONSOLE: u16 = 3;
const F_MULTIPORT: u64 = 1 << 1;

const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const CONSOLE_PORT: u16 = 4;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

/// Queues: port 0 rx/tx, control rx/tx, port 1 rx/tx.
const QUEUES: usize = 6;
const RX_BUFS: usize = 16;
const RX_BUF: usize = 4096;
const TX_SLOTS: usize = 16;
const TX_BUF: usize = 4096;

static mut RINGS: [Ring; QUEUES] = [const { Ring::new() }; QUEUES];

#[repr(C, align(4096))]
struct Bufs([u8; 3 * RX_BUFS * RX_BUF + 3 * TX_SLOTS * TX_BUF]);
static mut BUFS: Bufs = Bufs([0; 3 * RX_BUFS * RX_BUF + 3 * TX_SLOTS * TX_BUF]);

/// Buffer `i` of queue `q` (each queue has its own 16 buffers of 4 KiB).
fn buf(q: usize, i: usize) -> &'static mut [u8] {
    // SAFETY: BUFS is used only by this check; a buffer is the guest's while not posted.
    unsafe { core::slice::from_raw_parts_mut((core::ptr::addr_of_mut!(BUFS) as *mut u8).add((q * RX_BUFS + i) * RX_BUF), RX_BUF) }
}

fn ring(q: usize) -> *mut Ring {
    // SAFETY: a pointer to one static ring, owned by queue q alone.
    unsafe { core::ptr::addr_of_mut!(RINGS[q]) }
}

/// A transmit queue with its slots.
struct Tx {
    q: Queue,
    /// Index into BUFS' queues (3: port 0, 4: control, 5: port 1).
    bufs: usize,
    free: [bool; TX_SLOTS],
}

impl Tx {
    /// Sends `bytes` (at most 4 KiB); false if no slot frees up within 5 s.
    fn send(&mut self, bytes: &[u8]) -> bool {
        let end = rdtsc() + 5000 * (tsc_hz() / 1000).max(1);
        let k = loop {
            while let Some((head, _)) = self.q.poll() {
                if let Some(f) = self.free.get_mut(head as usize) {
                    *f = true;
                }
            }
            if let Some(k) = self.free.iter().position(|f| *f) {
                break k;
            }
            if rdtsc() > end {
                return false;
            }
            core::hint::spin_loop();
        };
        let b = buf(self.bufs, k);
        b[..bytes.len()].copy_from_slice(bytes);
        self.free[k] = false;
        self.q.post(k as u16, &[(b.as_ptr() as u64, bytes.len() as u32, false)], true);
        true
    }

    fn control(&mut self, id: u32, event: u16, value: u16) -> bool {
        let mut m = [0u8; 8];
        m[0..4].copy_from_slice(&id.to_le_bytes());
        m[4..6].copy_from_slice(&event.to_le_bytes());
        m[6..8].copy_from_slice(&value.to_le_bytes());
        self.send(&m)
    }
}

fn post_rx(q: &mut Queue, bufs: usize, i: usize, kick: bool) {
    q.post(i as u16, &[(buf(bufs, i).as_ptr() as u64, RX_BUF as u32, true)], kick);
}

#[derive(Default)]
struct Tally {
    added: u32,
    console_port: bool,
    name: [u8; 32],
    name_len: usize,
    host_opens: u32,
    host_closes: u32,
    line: [u8; 32],
    line_len: usize,
    lines: u32,
    echoed: u64,
    sessions: u32,
    send_failures: u32,
    bad: u32,
}

pub fn check_virtconsole(r: &mut Report) {
    let Some(d) = v::find(TYPE_CONSOLE, 0) else {
        return r.line("virtconsole", Err(()), format_args!("no virtio-console function on bus 0"));
    };
    if d.negotiate(v::F_VERSION_1 | F_MULTIPORT, 0).map(|f| f & F_MULTIPORT != 0) != Ok(true) {
        return r.line("virtconsole", Err(()), format_args!("no multiport feature, or FEATURES_OK refused"));
    }
    let ports = d.config32(4);
    if !(2..=4).contains(&ports) || (d.num_queues() as u32) < 2 * (ports + 1) {
        return r.line("virtconsole", Err(()), format_args!("max_nr_ports={ports} queues={}", d.num_queues()));
    }
    let mut qs = [const { None }; QUEUES];
    for (i, q) in qs.iter_mut().enumerate() {
        *q = d.setup_queue(i as u16, ring(i), NO_VECTOR);
    }
    let [Some(mut rx0), Some(tx0), Some(mut crx), Some(ctx), Some(mut rx1), Some(tx1)] = qs else {
        return r.line("virtconsole", Err(()), format_args!("queues smaller than the driver's"));
    };
    d.driver_ok();
    for i in 0..RX_BUFS {
        post_rx(&mut rx0, 0, i, i + 1 == RX_BUFS);
        post_rx(&mut crx, 1, i, i + 1 == RX_BUFS);
        post_rx(&mut rx1, 2, i, i + 1 == RX_BUFS);
    }
    let mut tx0 = Tx { q: tx0, bufs: 3, free: [true; TX_SLOTS] };
    let mut ctl = Tx { q: ctx, bufs: 4, free: [true; TX_SLOTS] };
    let mut tx1 = Tx { q: tx1, bufs: 5, free: [true; TX_SLOTS] };
    let mut t = Tally::default();
    t.send_failures += !ctl.control(0, DEVICE_READY, 1) as u32;

    let hz = (tsc_hz() / 1000).max(1);
    let deadline = rdtsc() + 60_000 * hz;
    let mut echoed_this_session = 0u64;
    while rdtsc() < deadline && !(t.lines >= 1 && t.sessions >= 1) {
        let mut idle = true;
        if let Some((head, used)) = crx.poll() {
            idle = false;
            let i = head as usize % RX_BUFS;
            let m = &buf(1, i)[..(used as usize).min(RX_BUF)];
            if m.len() < 8 {
                t.bad += 1;
            } else {
                let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
                let event = u16::from_le_bytes([m[4], m[5]]);
                let value = u16::from_le_bytes([m[6], m[7]]);
                match event {
                    DEVICE_ADD if id < ports => {
                        t.added += 1;
                        t.send_failures += !ctl.control(id, PORT_READY, 1) as u32;
                    }
                    CONSOLE_PORT if id == 0 && value == 1 => {
                        t.console_port = true;
                        t.send_failures += !ctl.control(0, PORT_OPEN, 1) as u32;
                        t.send_failures += !tx0.send(b"hvc0: hello from the guest\n") as u32;
                    }
                    PORT_NAME if id == 1 => {
                        let n = (m.len() - 8).min(t.name.len());
                        t.name[..n].copy_from_slice(&m[8..8 + n]);
                        t.name_len = n;
                        t.send_failures += !ctl.control(1, PORT_OPEN, 1) as u32;
                    }
                    PORT_NAME => {}
                    PORT_OPEN if id == 1 && value == 1 => {
                        t.host_opens += 1;
                        echoed_this_session = 0;
                    }
                    PORT_OPEN if id == 1 => {
                        t.host_closes += 1;
                        if echoed_this_session > 0 {
                            t.sessions += 1;
                        }
                    }
                    PORT_OPEN if id == 0 => {}
                    _ => t.bad += 1,
                }
            }
            post_rx(&mut crx, 1, i, true);
        }
        if let Some((head, used)) = rx0.poll() {
            idle = false;
            let i = head as usize % RX_BUFS;
            for &b in &buf(0, i)[..(used as usize).min(RX_BUF)] {
                if b == b'\n' || b == b'\r' {
                    if t.line_len > 0 {
                        let mut reply = [0u8; 48];
                        let prefix = b"hvc0 got: ";
                        reply[..prefix.len()].copy_from_slice(prefix);
                        reply[prefix.len()..prefix.len() + t.line_len].copy_from_slice(&t.line[..t.line_len]);
                        let n = prefix.len() + t.line_len;
                        reply[n] = b'\n';
                        t.send_failures += !tx0.send(&reply[..n + 1]) as u32;
                        t.lines += 1;
                        t.line_len = 0;
                    }
                } else if t.line_len < t.line.len() {
                    t.line[t.line_len] = b;
                    t.line_len += 1;
                }
            }
            post_rx(&mut rx0, 0, i, true);
        }
        if let Some((head, used)) = rx1.poll() {
            idle = false;
            let i = head as usize % RX_BUFS;
            let n = (used as usize).min(RX_BUF);
            let mut chunk = [0u8; RX_BUF];
            chunk[..n].copy_from_slice(&buf(2, i)[..n]);
            post_rx(&mut rx1, 2, i, true);
            if n > 0 && !tx1.send(&chunk[..n]) {
                t.send_failures += 1;
            }
            t.echoed += n as u64;
            echoed_this_session += n as u64;
        }
        if idle {
            core::hint::spin_loop();
        }
    }
    d.set_status(0);
    let name = core::str::from_utf8(&t.name[..t.name_len]).unwrap_or("?");
    let ok = t.added == ports && t.console_port && t.name_len > 0 && t.lines >= 1 && t.sessions >= 1 && t.send_failures == 0 && t.bad == 0;
    r.line(
        "virtconsole",
        ok.then_some(()).ok_or(()),
        format_args!(
            "ports={ports} added={} console_port={} name={name} lines={} host_opens={} host_closes={} sessions={} echoed={} send_failures={} bad={}",
            t.added, t.console_port, t.lines, t.host_opens, t.host_closes, t.sessions, t.echoed, t.send_failures, t.bad
        ),
    );
}
