//! The virtio-vsock check: the guest is a stream-socket peer of the host through the
//! device, speaking the packet protocol itself (virtio 1.2, 5.10).
//!
//! - It connects to host port 5000, sends `hello from the guest\n` and expects
//!   `hello from the host\n` back before the host ends the connection; its connection
//!   to host port 5001, where nothing listens, must be refused with a reset. (Port
//!   5000 refused is asked again, every 100 ms for 10 s: a host agent may start later.)
//! - It accepts host connections to port 1234 and echoes every byte back, never holding
//!   more than the receive buffer it announced (the device must respect that credit),
//!   sending only within the credit the device announces, and shutting down once the
//!   host has sent everything and got it back; a connection the host resets first
//!   counts as aborted.
//! - It refuses port 4321 with a reset, and a connection to port 9 ends the check.

use crate::hw::{rdtsc, tsc_hz};
use crate::virtio::{self as v, Queue, NO_VECTOR};
use crate::Report;

pub const TYPE_VSOCK: u16 = 19;
const HDR: usize = 44;
const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;
const SHUTDOWN_SEND: u32 = 2;

const RX_BUFS: usize = 32;
const RX_BUF: usize = HDR + 4096;
const TX_SLOTS: usize = 32;
const TX_DATA: usize = 4096;
/// The receive buffer the guest announces per connection, and holds at most.
const CAP: usize = 32 * 1024;
const CONNS: usize = 8;

const CLIENT_PORT: u32 = 7000;
const HOST_HELLO_PORT: u32 = 5000;
const PROBE_PORT: u32 = 7001;
const HOST_CLOSED_PORT: u32 = 5001;
const ECHO_PORT: u32 = 1234;
const REFUSED_PORT: u32 = 4321;
const END_PORT: u32 = 9;
const HELLO: &[u8] = b"hello from the guest\n";
const REPLY: &[u8] = b"hello from the host\n";

#[repr(C, align(4096))]
struct RxBufs([u8; RX_BUFS * RX_BUF]);
static mut RX: RxBufs = RxBufs([0; RX_BUFS * RX_BUF]);
#[repr(C, align(4096))]
struct TxBufs([u8; TX_SLOTS * (HDR + TX_DATA)]);
static mut TX: TxBufs = TxBufs([0; TX_SLOTS * (HDR + TX_DATA)]);
#[repr(C, align(4096))]
struct Backlogs([u8; CONNS * CAP]);
static mut BACKLOG: Backlogs = Backlogs([0; CONNS * CAP]);

fn rx_buf(i: usize) -> &'static mut [u8] {
    // SAFETY: RX is used only by this check; buffer i is the guest's while not posted.
    unsafe { core::slice::from_raw_parts_mut((core::ptr::addr_of_mut!(RX) as *mut u8).add(i * RX_BUF), RX_BUF) }
}

fn tx_slot(i: usize) -> &'static mut [u8] {
    // SAFETY: TX is used only by this check; slot i is the guest's while not in flight.
    unsafe { core::slice::from_raw_parts_mut((core::ptr::addr_of_mut!(TX) as *mut u8).add(i * (HDR + TX_DATA)), HDR + TX_DATA) }
}

fn backlog(i: usize) -> &'static mut [u8] {
    // SAFETY: BACKLOG is used only by this check; region i belongs to connection i.
    unsafe { core::slice::from_raw_parts_mut((core::ptr::addr_of_mut!(BACKLOG) as *mut u8).add(i * CAP), CAP) }
}

#[derive(Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    ty: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Hdr {
    fn parse(b: &[u8]) -> Hdr {
        let le64 = |at: usize| le32(b, at) as u64 | (le32(b, at + 4) as u64) << 32;
        let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Hdr { src_cid: le64(0), dst_cid: le64(8), src_port: le32(b, 16), dst_port: le32(b, 20), len: le32(b, 24), ty: le16(28), op: le16(30), flags: le32(b, 32), buf_alloc: le32(b, 36), fwd_cnt: le32(b, 40) }
    }

    fn write(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.ty.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }
}

/// One connection as the guest sees it.
#[derive(Clone, Copy, Default)]
struct Conn {
    live: bool,
    local: u32,
    peer: u32,
    /// Bytes received and not yet echoed: BACKLOG[slot][head..head + held], wrapping.
    head: usize,
    held: usize,
    /// Bytes consumed (echoed, or taken by the client), as the spec's fwd_cnt.
    fwd_cnt: u32,
    /// Bytes sent, and the device's receive buffer and consumption.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host sends no more; the guest sent its SHUTDOWN.
    peer_done: bool,
    shut_sent: bool,
    echoed: u64,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

struct Driver {
    cid: u64,
    rxq: Queue,
    txq: Queue,
    free: [bool; TX_SLOTS],
    in_flight: usize,
    sent: u64,
}

impl Driver {
    /// A free transmit slot, reclaiming used ones (waits while all are in flight).
    fn slot(&mut self) -> Option<usize> {
        let end = rdtsc() + 5000 * (tsc_hz() / 1000).max(1);
        loop {
            while let Some((head, _)) = self.txq.poll() {
                let k = head as usize / 2;
                if k < TX_SLOTS && !self.free[k] {
                    self.free[k] = true;
                    self.in_flight -= 1;
                }
            }
            if let Some(k) = self.free.iter().position(|f| *f) {
                return Some(k);
            }
            if rdtsc() > end {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Sends one packet for `c` with `payload` (at most TX_DATA bytes).
    fn send(&mut self, c: &mut Conn, op: u16, flags: u32, payload: &[u8]) -> bool {
        let Some(k) = self.slot() else { return false };
        let b = tx_slot(k);
        let h = Hdr { src_cid: self.cid, dst_cid: HOST_CID, src_port: c.local, dst_port: c.peer, len: payload.len() as u32, ty: TYPE_STREAM, op, flags, buf_alloc: CAP as u32, fwd_cnt: c.fwd_cnt };
        h.write(&mut b[..HDR]);
        b[HDR..HDR + payload.len()].copy_from_slice(payload);
        if op == OP_RW {
            c.tx_cnt = c.tx_cnt.wrapping_add(payload.len() as u32);
        }
        self.free[k] = false;
        self.in_flight += 1;
        self.sent += 1;
        let base = b.as_ptr() as u64;
        if payload.is_empty() {
            self.txq.post((2 * k) as u16, &[(base, HDR as u32, false)], true);
        } else {
            self.txq.post((2 * k) as u16, &[(base, HDR as u32, false), (base + HDR as u64, payload.len() as u32, false)], true);
        }
        true
    }

    /// A reset for a packet's connection that the guest never had (or refuses).
    fn refuse(&mut self, h: &Hdr) -> bool {
        let mut c = Conn { local: h.dst_port, peer: h.src_port, ..Conn::default() };
        self.send(&mut c, OP_RST, 0, &[])
    }
}

#[derive(Default)]
struct Tally {
    client_connected: bool,
    reply: [u8; 32],
    reply_len: usize,
    client_closed: bool,
    host_refused: bool,
    client_retries: u32,
    client_retry_at: u64,
    accepted: u32,
    completed: u32,
    aborted: u32,
    refused: u32,
    ended: bool,
    echoed: u64,
    over_credit: u32,
    bad_packets: u32,
    send_failures: u32,
    stray: u32,
}

fn post_rx(q: &mut Queue, i: usize, kick: bool) {
    q.post(i as u16, &[(rx_buf(i).as_ptr() as u64, RX_BUF as u32, true)], kick);
}

pub fn check_vsock(r: &mut Report) {
    let Some(d) = v::find(TYPE_VSOCK, 0) else {
        return r.line("vsock", Err(()), format_args!("no virtio-vsock function on bus 0"));
    };
    if d.negotiate(v::F_VERSION_1, 0).is_err() {
        return r.line("vsock", Err(()), format_args!("device refused FEATURES_OK"));
    }
    let (Some(mut rxq), Some(txq)) = (d.setup_queue(0, super::devices::ring(0), NO_VECTOR), d.setup_queue(1, super::devices::ring(1), NO_VECTOR)) else {
        return r.line("vsock", Err(()), format_args!("queues smaller than the driver's"));
    };
    d.driver_ok();
    let cid = d.config64(0);
    for i in 0..RX_BUFS {
        post_rx(&mut rxq, i, i + 1 == RX_BUFS);
    }
    let mut drv = Driver { cid, rxq, txq, free: [true; TX_SLOTS], in_flight: 0, sent: 0 };
    let mut conns = [Conn::default(); CONNS];
    let mut t = Tally::default();

    // The guest's own connection, slot 0.
    conns[0] = Conn { live: true, local: CLIENT_PORT, peer: HOST_HELLO_PORT, ..Conn::default() };
    let mut client = conns[0];
    if !drv.send(&mut client, OP_REQUEST, 0, &[]) {
        t.send_failures += 1;
    }
    conns[0] = client;
    let mut probe = Conn { local: PROBE_PORT, peer: HOST_CLOSED_PORT, ..Conn::default() };
    if !drv.send(&mut probe, OP_REQUEST, 0, &[]) {
        t.send_failures += 1;
    }

    let hz = (tsc_hz() / 1000).max(1);
    let deadline = rdtsc() + 60_000 * hz;
    while rdtsc() < deadline && !(t.ended && conns.iter().all(|c| !c.live)) {
        if t.client_retry_at != 0 && rdtsc() > t.client_retry_at {
            t.client_retry_at = 0;
            let mut client = conns[0];
            t.send_failures += !drv.send(&mut client, OP_REQUEST, 0, &[]) as u32;
            conns[0] = client;
        }
        let Some((head, used)) = drv.rxq.poll() else {
            core::hint::spin_loop();
            continue;
        };
        let i = head as usize % RX_BUFS;
        let n = (used as usize).min(RX_BUF);
        if n >= HDR {
            let b = rx_buf(i);
            let h = Hdr::parse(&b[..HDR]);
            let len = (h.len as usize).min(n - HDR);
            if h.src_cid != HOST_CID || h.dst_cid != cid || h.ty != TYPE_STREAM || len != h.len as usize {
                t.bad_packets += 1;
            } else {
                packet(&mut drv, &mut conns, &mut t, &h, &b[HDR..HDR + len]);
            }
        } else {
            t.bad_packets += 1;
        }
        post_rx(&mut drv.rxq, i, true);
        // Echo what the device has room for; shut down once all is back.
        for k in 1..CONNS {
            let mut c = conns[k];
            if !c.live {
                continue;
            }
            while c.held > 0 && c.credit() > 0 {
                let take = c.held.min(c.credit() as usize).min(TX_DATA).min(CAP - c.head);
                let mut chunk = [0u8; TX_DATA];
                chunk[..take].copy_from_slice(&backlog(k)[c.head..c.head + take]);
                c.head = (c.head + take) % CAP;
                c.held -= take;
                c.fwd_cnt = c.fwd_cnt.wrapping_add(take as u32);
                c.echoed += take as u64;
                if !drv.send(&mut c, OP_RW, 0, &chunk[..take]) {
                    t.send_failures += 1;
                    break;
                }
            }
            if c.peer_done && c.held == 0 && !c.shut_sent {
                c.shut_sent = true;
                if !drv.send(&mut c, OP_SHUTDOWN, SHUTDOWN_BOTH, &[]) {
                    t.send_failures += 1;
                }
            }
            conns[k] = c;
        }
    }
    d.set_status(0);
    let reply = &t.reply[..t.reply_len];
    let ok = cid >= 3
        && t.client_connected
        && reply == REPLY
        && t.client_closed
        && t.host_refused
        && t.completed >= 4
        && t.completed + t.aborted == t.accepted
        && t.refused == 1
        && t.ended
        && t.over_credit == 0
        && t.bad_packets == 0
        && t.send_failures == 0;
    r.line(
        "vsock",
        ok.then_some(()).ok_or(()),
        format_args!(
            "cid={cid} client_connected={} reply_ok={} client_closed={} host_refused={} client_retries={} accepted={} completed={} aborted={} echoed={} refused={} ended={} over_credit={} bad_packets={} send_failures={} stray={} packets_sent={}",
            t.client_connected, reply == REPLY, t.client_closed, t.host_refused, t.client_retries, t.accepted, t.completed, t.aborted, t.echoed, t.refused, t.ended, t.over_credit, t.bad_packets, t.send_failures, t.stray, drv.sent
        ),
    );
}

/// One packet from the device.
fn packet(drv: &mut Driver, conns: &mut [Conn; CONNS], t: &mut Tally, h: &Hdr, payload: &[u8]) {
    let slot = conns.iter().position(|c| c.live && c.local == h.dst_port && c.peer == h.src_port);
    let Some(k) = slot else {
        match h.op {
            OP_REQUEST if h.dst_port == ECHO_PORT => {
                let Some(k) = (1..CONNS).find(|&k| !conns[k].live) else {
                    t.send_failures += !drv.refuse(h) as u32;
                    return;
                };
                let mut c = Conn { live: true, local: h.dst_port, peer: h.src_port, peer_buf_alloc: h.buf_alloc, peer_fwd_cnt: h.fwd_cnt, ..Conn::default() };
                t.send_failures += !drv.send(&mut c, OP_RESPONSE, 0, &[]) as u32;
                conns[k] = c;
                t.accepted += 1;
            }
            OP_REQUEST => {
                if h.dst_port == REFUSED_PORT {
                    t.refused += 1;
                } else if h.dst_port == END_PORT {
                    t.ended = true;
                } else {
                    t.stray += 1;
                }
                t.send_failures += !drv.refuse(h) as u32;
            }
            OP_RST if h.dst_port == PROBE_PORT && h.src_port == HOST_CLOSED_PORT => t.host_refused = true,
            // A reset for a connection already gone needs no answer.
            OP_RST => {}
            _ => t.send_failures += !drv.refuse(h) as u32,
        }
        return;
    };
    let mut c = conns[k];
    c.peer_buf_alloc = h.buf_alloc;
    c.peer_fwd_cnt = h.fwd_cnt;
    match h.op {
        OP_RESPONSE if k == 0 => {
            t.client_connected = true;
            t.send_failures += !drv.send(&mut c, OP_RW, 0, HELLO) as u32;
        }
        OP_RW if k == 0 => {
            let room = t.reply.len() - t.reply_len;
            let take = payload.len().min(room);
            t.reply[t.reply_len..t.reply_len + take].copy_from_slice(&payload[..take]);
            t.reply_len += take;
            c.fwd_cnt = c.fwd_cnt.wrapping_add(payload.len() as u32);
        }
        // Refused before it was answered: nothing listens on port 5000 yet (a host
        // agent still starting); asked again every 100 ms, at most 100 times.
        OP_RST if k == 0 && !t.client_connected && t.client_retries < 100 => {
            t.client_retries += 1;
            t.client_retry_at = rdtsc() + 100 * (tsc_hz() / 1000).max(1);
        }
        OP_SHUTDOWN | OP_RST if k == 0 => {
            t.client_closed = true;
            if h.op == OP_SHUTDOWN {
                t.send_failures += !drv.send(&mut c, OP_RST, 0, &[]) as u32;
            }
            c.live = false;
        }
        OP_RW => {
            if c.held + payload.len() > CAP {
                // The device sent past the credit the guest gave it.
                t.over_credit += 1;
            } else {
                let buf = backlog(k);
                for (j, &byte) in payload.iter().enumerate() {
                    buf[(c.head + c.held + j) % CAP] = byte;
                }
                c.held += payload.len();
            }
        }
        OP_SHUTDOWN => c.peer_done |= h.flags & SHUTDOWN_SEND != 0,
        OP_RST => {
            // The end of an echo connection: complete once everything went back.
            if c.peer_done && c.held == 0 && c.shut_sent {
                t.completed += 1;
                t.echoed += c.echoed;
            } else {
                // The host ended it first (a peer that went away without reading).
                t.aborted += 1;
            }
            c.live = false;
        }
        OP_CREDIT_UPDATE => {}
        OP_CREDIT_REQUEST => t.send_failures += !drv.send(&mut c, OP_CREDIT_UPDATE, 0, &[]) as u32,
        _ => t.bad_packets += 1,
    }
    conns[k] = c;
}

/// The stream benchmark's payload: one buffer sent again and again.
const BENCH_PKT: usize = 32 * 1024;
#[repr(C, align(4096))]
struct BenchPayload([u8; BENCH_PKT]);
static mut BENCH: BenchPayload = BenchPayload([0x5a; BENCH_PKT]);
const SINK_PORT: u32 = 5002;
const PONG_PORT: u32 = 5003;

impl Driver {
    /// Sends `len` bytes of the benchmark payload on `c` without kicking.
    fn send_bench(&mut self, c: &mut Conn, len: usize) -> bool {
        let Some(k) = self.slot() else { return false };
        let b = tx_slot(k);
        let h = Hdr { src_cid: self.cid, dst_cid: HOST_CID, src_port: c.local, dst_port: c.peer, len: len as u32, ty: TYPE_STREAM, op: OP_RW, flags: 0, buf_alloc: CAP as u32, fwd_cnt: c.fwd_cnt };
        h.write(&mut b[..HDR]);
        c.tx_cnt = c.tx_cnt.wrapping_add(len as u32);
        self.free[k] = false;
        self.in_flight += 1;
        self.sent += 1;
        let payload = core::ptr::addr_of!(BENCH) as u64;
        self.txq.post((2 * k) as u16, &[(b.as_ptr() as u64, HDR as u32, false), (payload, len as u32, false)], false);
        true
    }

    /// Takes what the device sent for `c`: credit, data (counted), the end. Returns
    /// the data bytes seen; `open` goes false on a reset or shutdown.
    fn bench_rx(&mut self, c: &mut Conn, open: &mut bool, connected: &mut bool) -> usize {
        let mut data = 0;
        while let Some((head, used)) = self.rxq.poll() {
            let i = head as usize % RX_BUFS;
            let n = (used as usize).min(RX_BUF);
            if n >= HDR {
                let h = Hdr::parse(&rx_buf(i)[..HDR]);
                if h.dst_port == c.local && h.src_port == c.peer {
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                    match h.op {
                        OP_RESPONSE => *connected = true,
                        OP_RW => {
                            let len = (h.len as usize).min(n - HDR);
                            data += len;
                            c.fwd_cnt = c.fwd_cnt.wrapping_add(len as u32);
                        }
                        OP_RST | OP_SHUTDOWN => *open = false,
                        _ => {}
                    }
                }
            }
            post_rx(&mut self.rxq, i, false);
            self.rxq.kick();
        }
        data
    }

    /// Connects to host port `port` from `local`; None if the host never answers.
    fn bench_connect(&mut self, local: u32, port: u32) -> Option<Conn> {
        let mut c = Conn { live: true, local, peer: port, ..Conn::default() };
        let hz = (tsc_hz() / 1000).max(1);
        for _ in 0..100 {
            if !self.send(&mut c, OP_REQUEST, 0, &[]) {
                return None;
            }
            let (mut open, mut connected) = (true, false);
            let end = rdtsc() + 100 * hz;
            while rdtsc() < end && open && !connected {
                self.bench_rx(&mut c, &mut open, &mut connected);
            }
            if connected {
                return Some(c);
            }
        }
        None
    }
}

/// `vsockbench` in `tests=`: stream throughput guest -> host for `ms` (32 KiB packets
/// to host port 5002, as fast as the credit the device announces allows), then
/// round trips of one byte with host port 5003's echo for another `ms`.
pub fn check_vsockbench(r: &mut Report, ms: u64) {
    let Some(d) = v::find(TYPE_VSOCK, 0) else {
        return r.line("vsockbench", Err(()), format_args!("no virtio-vsock function on bus 0"));
    };
    if d.negotiate(v::F_VERSION_1, 0).is_err() {
        return r.line("vsockbench", Err(()), format_args!("device refused FEATURES_OK"));
    }
    let (Some(mut rxq), Some(txq)) = (d.setup_queue(0, super::devices::ring(0), NO_VECTOR), d.setup_queue(1, super::devices::ring(1), NO_VECTOR)) else {
        return r.line("vsockbench", Err(()), format_args!("queues smaller than the driver's"));
    };
    d.driver_ok();
    let cid = d.config64(0);
    for i in 0..RX_BUFS {
        post_rx(&mut rxq, i, i + 1 == RX_BUFS);
    }
    let mut drv = Driver { cid, rxq, txq, free: [true; TX_SLOTS], in_flight: 0, sent: 0 };
    let hz = tsc_hz().max(1);
    let Some(mut c) = drv.bench_connect(7100, SINK_PORT) else {
        d.set_status(0);
        return r.line("vsockbench", Err(()), format_args!("host port {SINK_PORT} never answered"));
    };
    let (mut open, mut connected) = (true, true);
    let start = rdtsc();
    let end = start + ms * hz / 1000;
    let mut bytes = 0u64;
    while rdtsc() < end && open {
        let mut posted = false;
        while c.credit() > 0 && drv.free.iter().any(|f| *f) {
            let len = (c.credit() as usize).min(BENCH_PKT);
            if !drv.send_bench(&mut c, len) {
                break;
            }
            bytes += len as u64;
            posted = true;
        }
        if posted {
            drv.txq.kick();
        }
        while let Some((head, _)) = drv.txq.poll() {
            let k = head as usize / 2;
            if k < TX_SLOTS && !drv.free[k] {
                drv.free[k] = true;
                drv.in_flight -= 1;
            }
        }
        drv.bench_rx(&mut c, &mut open, &mut connected);
    }
    let stream_ns = (rdtsc() - start) * 1_000_000_000 / hz;
    let _ = drv.send(&mut c, OP_SHUTDOWN, SHUTDOWN_BOTH, &[]);
    // Round trips.
    let Some(mut p) = drv.bench_connect(7101, PONG_PORT) else {
        d.set_status(0);
        return r.line("vsockbench", Err(()), format_args!("host port {PONG_PORT} never answered"));
    };
    let (mut open, mut connected) = (true, true);
    let (mut rounds, mut lost) = (0u64, 0u32);
    let start = rdtsc();
    let end = start + ms * hz / 1000;
    while rdtsc() < end && open {
        if !drv.send(&mut p, OP_RW, 0, b"x") {
            lost += 1;
            break;
        }
        let wait = rdtsc() + hz;
        let mut got = 0;
        while got == 0 && open && rdtsc() < wait {
            got = drv.bench_rx(&mut p, &mut open, &mut connected);
        }
        if got == 0 {
            lost += 1;
            break;
        }
        rounds += 1;
    }
    let rtt_ns = (rdtsc() - start) * 1_000_000_000 / hz / rounds.max(1);
    let _ = drv.send(&mut p, OP_SHUTDOWN, SHUTDOWN_BOTH, &[]);
    d.set_status(0);
    let mbps = bytes * 1000 / stream_ns.max(1);
    let ok = bytes > 0 && rounds > 0 && lost == 0;
    r.line(
        "vsockbench",
        ok.then_some(()).ok_or(()),
        format_args!("mbps={mbps} bytes={bytes} stream_ms={} rtt_us={}.{:03} rounds={rounds} lost={lost}", stream_ns / 1_000_000, rtt_ns / 1000, rtt_ns % 1000),
    );
}
