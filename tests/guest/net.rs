//! The virtio-net check: the guest (10.77.0.2) talks to the host end of its tap
//! (10.77.0.1) through the device: ARP for the host's MAC, an ICMP echo it must get
//! back, and a UDP datagram to port 7777 whose checksum the device is asked to finish
//! (CSUM offload). A responder echoing it shows the receive side's offload flags; with
//! none, the host's ICMP port-unreachable still proves the checksum was right (Linux
//! drops UDP with a bad checksum before it looks for a socket). With HOST_TSO4 it then
//! opens a TCP connection to port 7778 and sends 3,000 bytes as one segment the device
//! must have the host cut into MSS-sized ones; a sink there shows they arrived whole.

use crate::hw::{rdtsc, tsc_hz};
use crate::virtio::{self as v, Queue, NO_VECTOR, TYPE_NET};
use crate::Report;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_HOST_TSO4: u64 = 1 << 11;
const F_STATUS: u64 = 1 << 16;
const HDR: usize = 12;
const BUF: usize = 2048;
const RX_BUFS: usize = 16;
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const UDP_PORT: u16 = 7777;
const PING_ID: u16 = 0x4356;
const TCP_PORT: u16 = 7778;
const GUEST_TCP_PORT: u16 = 40000;
/// The segment the guest hands the device whole (TSO): more than two MSS.
const TSO_BYTES: usize = 3000;
const TSO_MSS: u16 = 1448;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_FIN: u8 = 0x01;

#[repr(C, align(4096))]
struct Bufs([u8; RX_BUFS * BUF]);
static mut RX: Bufs = Bufs([0; RX_BUFS * BUF]);
#[repr(C, align(4096))]
struct Frame([u8; BUF + TSO_BYTES]);
static mut TX: Frame = Frame([0; BUF + TSO_BYTES]);

fn rx_buf(i: usize) -> &'static mut [u8] {
    let i = i % RX_BUFS;
    // SAFETY: RX is used only by this check; buffer i is the guest's while not posted.
    unsafe { core::slice::from_raw_parts_mut((core::ptr::addr_of_mut!(RX) as *mut u8).add(i * BUF), BUF) }
}

fn tx_buf() -> &'static mut [u8] {
    // SAFETY: TX is used only by this check, one frame at a time.
    unsafe { core::slice::from_raw_parts_mut(core::ptr::addr_of_mut!(TX) as *mut u8, BUF + TSO_BYTES) }
}

fn post_rx(q: &mut Queue, i: usize, kick: bool) {
    q.post(i as u16, &[(rx_buf(i).as_ptr() as u64, BUF as u32, true)], kick);
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for pair in data.chunks(2) {
        acc += (pair[0] as u32) << 8 | *pair.get(1).unwrap_or(&0) as u32;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Ethernet + IPv4 header for `proto` with `payload` bytes after it; returns the
/// offset of the payload in the frame (after the virtio-net header).
fn ipv4(f: &mut [u8], mac: &[u8; 6], dst: &[u8; 6], proto: u8, payload: usize) -> usize {
    f[HDR..HDR + 6].copy_from_slice(dst);
    f[HDR + 6..HDR + 12].copy_from_slice(mac);
    put16(f, HDR + 12, 0x0800);
    let ip = HDR + 14;
    f[ip] = 0x45;
    f[ip + 1] = 0;
    put16(f, ip + 2, (20 + payload) as u16);
    put16(f, ip + 4, 1);
    put16(f, ip + 6, 0x4000);
    f[ip + 8] = 64;
    f[ip + 9] = proto;
    put16(f, ip + 10, 0);
    f[ip + 12..ip + 16].copy_from_slice(&GUEST_IP);
    f[ip + 16..ip + 20].copy_from_slice(&HOST_IP);
    let c = !fold(sum16(&f[ip..ip + 20], 0));
    put16(f, ip + 10, c);
    ip + 20
}

/// Sends the `len`-byte frame in TX (header included); true once the device used it.
fn send(q: &mut Queue, len: usize) -> bool {
    q.request(&[(tx_buf().as_ptr() as u64, len as u32, false)]).is_some()
}

/// Waits up to `ms` for a received frame `want` accepts; re-posts every buffer.
fn receive<T>(q: &mut Queue, ms: u64, mut want: impl FnMut(&[u8]) -> Option<T>) -> Option<T> {
    let end = rdtsc() + ms * (tsc_hz() / 1000).max(1);
    while rdtsc() < end {
        let Some((head, len)) = q.poll() else {
            core::hint::spin_loop();
            continue;
        };
        let i = head as usize % RX_BUFS;
        let n = (len as usize).min(BUF);
        let got = if n >= HDR + 14 { want(&rx_buf(i)[..n]) } else { None };
        post_rx(q, i, true);
        if got.is_some() {
            return got;
        }
    }
    None
}

/// The byte at `i` of the TSO payload.
fn tso_byte(i: usize) -> u8 {
    (i % 251) as u8 ^ 0x3c
}

/// A TCP segment from GUEST_TCP_PORT to TCP_PORT with `len` payload bytes (already in
/// place after the header), its checksum done here, or with `tso`, left to the device
/// as one large segment it must cut into MSS-sized ones. Returns the frame length.
fn tcp(f: &mut [u8], mac: &[u8; 6], host_mac: &[u8; 6], seq: u32, ack: u32, flags: u8, len: usize, tso: bool) -> usize {
    f[..HDR].fill(0);
    let t = ipv4(f, mac, host_mac, 6, 20 + len);
    put16(f, t, GUEST_TCP_PORT);
    put16(f, t + 2, TCP_PORT);
    f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    f[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
    f[t + 12] = 5 << 4;
    f[t + 13] = flags;
    put16(f, t + 14, 65535);
    put16(f, t + 16, 0);
    put16(f, t + 18, 0);
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&GUEST_IP);
    pseudo[4..8].copy_from_slice(&HOST_IP);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&((20 + len) as u16).to_be_bytes());
    if tso {
        f[0] = 1; // NEEDS_CSUM
        f[1] = 1; // GSO_TCPV4
        f[2..4].copy_from_slice(&((t + 20 - HDR) as u16).to_le_bytes()); // hdr_len
        f[4..6].copy_from_slice(&TSO_MSS.to_le_bytes()); // gso_size
        f[6..8].copy_from_slice(&((t - HDR) as u16).to_le_bytes()); // csum_start
        f[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
        put16(f, t + 16, fold(sum16(&pseudo, 0)));
    } else {
        let c = !fold(sum16(&f[t..t + 20 + len], sum16(&pseudo, 0)));
        put16(f, t + 16, c);
    }
    t + 20 + len
}

/// With HOST_TSO4: a TCP connection to 10.77.0.1:7778 that sends TSO_BYTES in one
/// segment the device has the host cut up, then FIN. "sent" once the bytes went out on
/// an accepted connection; "refused" when nothing listens (RST).
fn tso_check(rxq: &mut Queue, txq: &mut Queue, mac: &[u8; 6], host_mac: &[u8; 6]) -> &'static str {
    let isn: u32 = 0x1000_0000;
    let n = tcp(tx_buf(), mac, host_mac, isn, 0, TCP_SYN, 0, false);
    send(txq, n);
    let answer = receive(rxq, 3000, |fr| {
        let ip = HDR + 14;
        let t = ip + 20;
        if fr.len() < t + 20 || get16(fr, HDR + 12) != 0x0800 || fr[ip + 9] != 6 || get16(fr, t) != TCP_PORT || get16(fr, t + 2) != GUEST_TCP_PORT {
            return None;
        }
        let seq = u32::from_be_bytes([fr[t + 4], fr[t + 5], fr[t + 6], fr[t + 7]]);
        Some((fr[t + 13], seq))
    });
    let server_seq = match answer {
        Some((flags, seq)) if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => seq,
        Some((flags, _)) if flags & TCP_RST != 0 => return "refused",
        _ => return "lost",
    };
    let ack = server_seq.wrapping_add(1);
    let n = tcp(tx_buf(), mac, host_mac, isn + 1, ack, TCP_ACK, 0, false);
    send(txq, n);
    let f = tx_buf();
    let payload_at = HDR + 14 + 20 + 20;
    for i in 0..TSO_BYTES {
        f[payload_at + i] = tso_byte(i);
    }
    let n = tcp(f, mac, host_mac, isn + 1, ack, TCP_PSH | TCP_ACK, TSO_BYTES, true);
    if !send(txq, n) {
        return "lost";
    }
    let n = tcp(tx_buf(), mac, host_mac, isn + 1 + TSO_BYTES as u32, ack, TCP_FIN | TCP_ACK, 0, false);
    send(txq, n);
    "sent"
}

/// The net device set up with `wanted` features: (device, features, rx, tx, MAC, link).
fn start(wanted: u64) -> Result<(v::Device, u64, Queue, Queue, [u8; 6], u8), &'static str> {
    start_on(wanted, super::devices::ring(0), super::devices::ring(1))
}

/// `start` on the rings given (for a check that drives other devices at the same time).
pub(crate) fn start_on(wanted: u64, rx: *mut v::Ring, tx: *mut v::Ring) -> Result<(v::Device, u64, Queue, Queue, [u8; 6], u8), &'static str> {
    let d = v::find(TYPE_NET, 0).ok_or("no virtio-net function on bus 0")?;
    let features = d.negotiate(v::F_VERSION_1 | wanted, 0).map_err(|_| "device refused FEATURES_OK")?;
    let (Some(mut rxq), Some(txq)) = (d.setup_queue(0, rx, NO_VECTOR), d.setup_queue(1, tx, NO_VECTOR)) else {
        return Err("queues smaller than the driver's");
    };
    d.driver_ok();
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = d.config8(i as u64);
    }
    let link = d.config8(6) & 1;
    for i in 0..RX_BUFS {
        post_rx(&mut rxq, i, i + 1 == RX_BUFS);
    }
    Ok((d, features, rxq, txq, mac, link))
}

/// An ARP request for 10.77.0.1 from `mac` in TX; its length.
fn arp_request(mac: &[u8; 6]) -> usize {
    let f = tx_buf();
    f[..HDR].fill(0);
    f[HDR..HDR + 6].fill(0xff);
    f[HDR + 6..HDR + 12].copy_from_slice(mac);
    put16(f, HDR + 12, 0x0806);
    let a = HDR + 14;
    f[a..a + 8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[a + 8..a + 14].copy_from_slice(mac);
    f[a + 14..a + 18].copy_from_slice(&GUEST_IP);
    f[a + 18..a + 24].fill(0);
    f[a + 24..a + 28].copy_from_slice(&HOST_IP);
    a + 28
}

/// The sender's MAC of an ARP reply from 10.77.0.1 to `mac`.
fn arp_reply(fr: &[u8], mac: &[u8; 6]) -> Option<[u8; 6]> {
    let a = HDR + 14;
    (fr.len() >= a + 28 && get16(fr, HDR + 12) == 0x0806 && get16(fr, a + 6) == 2 && fr[a + 14..a + 18] == HOST_IP && fr[a + 18..a + 24] == *mac).then(|| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&fr[a + 8..a + 14]);
        m
    })
}

/// ARP for 10.77.0.1: (request sent, the host's MAC if it answered).
fn arp(rxq: &mut Queue, txq: &mut Queue, mac: &[u8; 6]) -> (bool, Option<[u8; 6]>) {
    arp_within(rxq, txq, mac, 3000)
}

/// `arp`, waiting at most `ms` for the answer.
pub(crate) fn arp_within(rxq: &mut Queue, txq: &mut Queue, mac: &[u8; 6], ms: u64) -> (bool, Option<[u8; 6]>) {
    let len = arp_request(mac);
    let sent = send(txq, len);
    (sent, receive(rxq, ms, |fr| arp_reply(fr, mac)))
}

pub fn check_net(r: &mut Report) {
    let wanted = F_CSUM | F_GUEST_CSUM | F_MAC | F_STATUS | F_HOST_TSO4;
    let (d, features, mut rxq, mut txq, mac, link) = match start(wanted) {
        Ok(x) => x,
        Err(why) => return r.line("net", Err(()), format_args!("{why}")),
    };
    let (sent, host_mac) = arp(&mut rxq, &mut txq, &mac);
    let Some(host_mac) = host_mac else {
        d.set_status(0);
        return r.line("net", Err(()), format_args!("mac={} link={link} features={features:#x} arp_sent={sent} no ARP reply from 10.77.0.1", Mac(&mac)));
    };

    // ICMP echo with a 56-byte payload; the reply must carry it back.
    let f = tx_buf();
    f[..HDR].fill(0);
    let icmp = ipv4(f, &mac, &host_mac, 1, 8 + 56);
    f[icmp..icmp + 8].copy_from_slice(&[8, 0, 0, 0, 0, 0, 0, 1]);
    put16(f, icmp + 4, PING_ID);
    for (i, b) in f[icmp + 8..icmp + 64].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) ^ 0x5a;
    }
    let c = !fold(sum16(&f[icmp..icmp + 64], 0));
    put16(f, icmp + 2, c);
    let t0 = rdtsc();
    send(&mut txq, icmp + 64);
    let echoed = receive(&mut rxq, 3000, |fr| {
        let ip = HDR + 14;
        let ic = ip + 20;
        let ok = fr.len() >= ic + 64 && get16(fr, HDR + 12) == 0x0800 && fr[ip + 9] == 1 && fr[ic] == 0 && get16(fr, ic + 4) == PING_ID && fr[ic + 8..ic + 64].iter().enumerate().all(|(i, b)| *b == (i as u8).wrapping_mul(7) ^ 0x5a);
        ok.then_some(())
    });
    let rtt_us = (rdtsc() - t0) / (tsc_hz() / 1_000_000).max(1);

    // UDP to 10.77.0.1:7777; with CSUM the checksum is left to the device: the field
    // holds the pseudo-header sum and the header says where to finish it.
    let payload = b"cellvm-net offload check";
    let f = tx_buf();
    f[..HDR].fill(0);
    let udp = ipv4(f, &mac, &host_mac, 17, 8 + payload.len());
    let ulen = (8 + payload.len()) as u16;
    put16(f, udp, UDP_PORT);
    put16(f, udp + 2, UDP_PORT);
    put16(f, udp + 4, ulen);
    put16(f, udp + 6, 0);
    f[udp + 8..udp + 8 + payload.len()].copy_from_slice(payload);
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&GUEST_IP);
    pseudo[4..8].copy_from_slice(&HOST_IP);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&ulen.to_be_bytes());
    let offload = features & F_CSUM != 0;
    if offload {
        f[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        let start = (udp - HDR) as u16;
        f[6..8].copy_from_slice(&start.to_le_bytes());
        f[8..10].copy_from_slice(&6u16.to_le_bytes());
        put16(f, udp + 6, fold(sum16(&pseudo, 0)));
    } else {
        let c = !fold(sum16(&f[udp..udp + ulen as usize], sum16(&pseudo, 0)));
        put16(f, udp + 6, if c == 0 { 0xffff } else { c });
    }
    send(&mut txq, udp + ulen as usize);
    // Either the responder's echo (reporting the receive header's flags) or the
    // host's port-unreachable quoting our datagram.
    let answer = receive(&mut rxq, 3000, |fr| {
        let ip = HDR + 14;
        let body = ip + 20;
        if fr.len() < body + 8 || get16(fr, HDR + 12) != 0x0800 {
            return None;
        }
        match fr[ip + 9] {
            17 if get16(fr, body) == UDP_PORT && fr.get(body + 8..body + 8 + payload.len()) == Some(&payload[..]) => Some((1u8, fr[0])),
            1 if fr[body] == 3 && fr[body + 1] == 3 && fr.len() >= body + 8 + 28 && fr[body + 8 + 9] == 17 => Some((2, fr[0])),
            _ => None,
        }
    });
    let tso = if features & F_HOST_TSO4 != 0 { tso_check(&mut rxq, &mut txq, &mac, &host_mac) } else { "not-offered" };
    d.set_status(0);
    let udp_result = match answer {
        Some((1, _)) => "echoed",
        Some(_) => "port-unreachable",
        None => "lost",
    };
    let rx_flags = answer.map(|a| a.1).unwrap_or(0);
    let ok = sent && link == 1 && echoed.is_some() && answer.is_some() && features & F_MAC != 0 && tso != "lost";
    r.line(
        "net",
        ok.then_some(()).ok_or(()),
        format_args!(
            "mac={} link={link} features={features:#x} host_mac={} ping={} rtt_us={rtt_us} udp_csum_offload={offload} udp={udp_result} rx_hdr_flags={rx_flags} tso={tso}",
            Mac(&mac),
            Mac(&host_mac),
            if echoed.is_some() { "echoed" } else { "lost" }
        ),
    );
}

struct Mac<'a>(&'a [u8; 6]);

impl core::fmt::Display for Mac<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Transmit rate from CPL 3, for cellvm-bench: for `ms`, 1,400-byte UDP datagrams to
/// 10.77.0.1:9 with 64 in flight, each completion reposted at once. Prints frames per
/// second and MB/s of frames, measured with the TSC.
pub fn check_netbench(r: &mut Report, ms: u64) {
    const DEPTH: usize = 64;
    const PAYLOAD: usize = 1400;
    let (d, _, mut rxq, mut txq, mac, _) = match start(F_MAC) {
        Ok(x) => x,
        Err(why) => return r.line("netbench", Err(()), format_args!("{why}")),
    };
    let (_, host_mac) = arp(&mut rxq, &mut txq, &mac);
    let Some(host_mac) = host_mac else {
        d.set_status(0);
        return r.line("netbench", Err(()), format_args!("no ARP reply from 10.77.0.1"));
    };
    // One frame, checksummed once, sent again and again from the same buffer.
    let f = tx_buf();
    f[..HDR].fill(0);
    let udp = ipv4(f, &mac, &host_mac, 17, 8 + PAYLOAD);
    let ulen = (8 + PAYLOAD) as u16;
    put16(f, udp, UDP_PORT);
    put16(f, udp + 2, 9);
    put16(f, udp + 4, ulen);
    put16(f, udp + 6, 0);
    for (i, b) in f[udp + 8..udp + 8 + PAYLOAD].iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&GUEST_IP);
    pseudo[4..8].copy_from_slice(&HOST_IP);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&ulen.to_be_bytes());
    let c = !fold(sum16(&f[udp..udp + ulen as usize], sum16(&pseudo, 0)));
    put16(f, udp + 6, if c == 0 { 0xffff } else { c });
    let len = (udp + ulen as usize) as u32;
    let frame = f.as_ptr() as u64;
    let hz = tsc_hz().max(1);
    for k in 0..DEPTH {
        txq.post(k as u16, &[(frame, len, false)], k + 1 == DEPTH);
    }
    let (start_tsc, mut done) = (rdtsc(), 0u64);
    let end = start_tsc + ms * hz / 1000;
    let mut now = start_tsc;
    while now < end {
        let (mut posted, mut refilled) = (false, false);
        while let Some((head, _)) = txq.poll() {
            done += 1;
            txq.post(head as u16, &[(frame, len, false)], false);
            posted = true;
        }
        // Receive buffers back to the device (the host's ICMP answers land there).
        while let Some((head, _)) = rxq.poll() {
            post_rx(&mut rxq, head as usize % RX_BUFS, false);
            refilled = true;
        }
        if posted {
            txq.kick();
        }
        if refilled {
            rxq.kick();
        }
        now = rdtsc();
    }
    let elapsed_ms = ((now - start_tsc) * 1000 / hz).max(1);
    let mut left = DEPTH;
    let drain_end = rdtsc() + 5 * hz;
    while left > 0 && rdtsc() < drain_end {
        if txq.poll().is_some() {
            left -= 1;
        }
    }
    d.set_status(0);
    let fps = done * 1000 / elapsed_ms;
    let mbps = fps * len as u64 / 1_000_000;
    let ok = done > 0 && left == 0;
    r.line("netbench", ok.then_some(()).ok_or(()), format_args!("fps={fps} mbps={mbps} frames={done} in_ms={elapsed_ms} frame_bytes={len}"));
}

const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_MRG_RXBUF: u64 = 1 << 15;
/// Receive buffers for `netgso`: 4 KiB each, 40 of them (more than a 64 KiB segment
/// needs, which no single one holds).
const GSO_BUF: usize = 4096;
const GSO_BUFS: usize = 40;
/// What the host sends in `netgso` (tests/virtio.rs): one TCP segment of this many
/// payload bytes from 10.77.0.1:GSO_SPORT to 10.77.0.2:GSO_DPORT, payload byte i being
/// gso_byte(i), handed to the tap whole (gso_size GSO_MSS).
pub const GSO_PAYLOAD: usize = 65000;
const GSO_SPORT: u16 = 7780;
const GSO_DPORT: u16 = 40001;

fn gso_byte(i: usize) -> u8 {
    (i % 253) as u8 ^ 0xa7
}

#[repr(C, align(4096))]
struct GsoBufs([u8; GSO_BUFS * GSO_BUF]);
static mut GSO_RX: GsoBufs = GsoBufs([0; GSO_BUFS * GSO_BUF]);

fn gso_buf(i: usize) -> &'static mut [u8] {
    let i = i % GSO_BUFS;
    // SAFETY: GSO_RX is used only by this check; buffer i is the guest's while not posted.
    unsafe { core::slice::from_raw_parts_mut((core::ptr::addr_of_mut!(GSO_RX) as *mut u8).add(i * GSO_BUF), GSO_BUF) }
}

fn post_gso(q: &mut Queue, i: usize, kick: bool) {
    q.post(i as u16, &[(gso_buf(i).as_ptr() as u64, GSO_BUF as u32, true)], kick);
}

/// Mergeable receive buffers and guest TSO: negotiates MRG_RXBUF, GUEST_CSUM and
/// GUEST_TSO4/6, posts 4 KiB buffers, and waits (20 s) for the host's 64 KiB TCP segment
/// to arrive as one frame: num_buffers chains whose bytes, put together, are the whole
/// segment with its GSO header (TCPV4, the MSS) and the payload intact. Smaller frames
/// (the host's own IPv6 chatter, the segment cut up before the offloads were on) are
/// counted and skipped.
pub fn check_netgso(r: &mut Report) {
    let d = match v::find(TYPE_NET, 0) {
        Some(d) => d,
        None => return r.line("netgso", Err(()), format_args!("no virtio-net function on bus 0")),
    };
    let wanted = F_MAC | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_MRG_RXBUF;
    let Ok(features) = d.negotiate(v::F_VERSION_1 | wanted, 0) else {
        return r.line("netgso", Err(()), format_args!("device refused FEATURES_OK"));
    };
    let (Some(mut rxq), Some(_txq)) = (d.setup_queue(0, super::devices::ring(0), NO_VECTOR), d.setup_queue(1, super::devices::ring(1), NO_VECTOR)) else {
        return r.line("netgso", Err(()), format_args!("queues smaller than the driver's"));
    };
    d.driver_ok();
    for i in 0..GSO_BUFS {
        post_gso(&mut rxq, i, i + 1 == GSO_BUFS);
    }
    let want_len = HDR + 14 + 20 + 20 + GSO_PAYLOAD;
    let end = rdtsc() + 20_000 * (tsc_hz() / 1000).max(1);
    let next = |q: &mut Queue| -> Option<(u32, u32)> {
        while rdtsc() < end {
            if let Some(e) = q.poll() {
                return Some(e);
            }
            core::hint::spin_loop();
        }
        None
    };
    let (mut small, mut result) = (0u32, None);
    while let Some((head, len)) = next(&mut rxq) {
        let first = head as usize % GSO_BUFS;
        let hdr: [u8; HDR] = gso_buf(first)[..HDR].try_into().unwrap_or([0; HDR]);
        let buffers = u16::from_le_bytes([hdr[10], hdr[11]]) as usize;
        // Walk the frame's chains: the header's, then buffers - 1 more, in used order.
        let (mut total, mut chains, mut payload_ok, mut proto_ok) = (0usize, 0usize, true, true);
        let mut entry = Some((head, len));
        while let Some((h, l)) = entry {
            let i = h as usize % GSO_BUFS;
            let b = &gso_buf(i)[..(l as usize).min(GSO_BUF)];
            for (k, &byte) in b.iter().enumerate() {
                let at = total + k;
                let (ip, tcp, payload) = (HDR + 14, HDR + 34, HDR + 54);
                if at >= payload {
                    payload_ok &= byte == gso_byte(at - payload);
                } else if at == ip + 9 {
                    proto_ok &= byte == 6;
                } else if at == tcp || at == tcp + 2 {
                    let port = if at == tcp { GSO_SPORT } else { GSO_DPORT };
                    proto_ok &= b.get(k + 1).is_some_and(|&lo| u16::from_be_bytes([byte, lo]) == port);
                }
            }
            total += b.len();
            chains += 1;
            post_gso(&mut rxq, i, false);
            entry = if chains < buffers { next(&mut rxq) } else { None };
        }
        rxq.kick();
        if total < want_len || !proto_ok {
            small += 1;
            continue;
        }
        let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]);
        result = Some((total, chains, buffers, hdr[0], hdr[1], gso_size, payload_ok));
        break;
    }
    d.set_status(0);
    match result {
        Some((total, chains, buffers, flags, gso_type, gso_size, payload_ok)) => {
            let ok = total == want_len && chains == buffers && buffers > 1 && gso_type == 1 && payload_ok && features & F_MRG_RXBUF != 0;
            r.line(
                "netgso",
                ok.then_some(()).ok_or(()),
                format_args!("features={features:#x} frame_bytes={total} buffers={buffers} chains={chains} hdr_flags={flags} gso_type={gso_type} gso_size={gso_size} payload_ok={payload_ok} smaller_frames={small}"),
            )
        }
        None => r.line("netgso", Err(()), format_args!("features={features:#x} no {want_len}-byte frame within 20 s; smaller_frames={small}")),
    }
}

const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;
const MQ_PAIRS: usize = 2;
/// The guest's UDP source port on pair k is MQ_SPORT + k.
const MQ_SPORT: u16 = 6000;

static mut MQ_RINGS: [v::Ring; 2 * MQ_PAIRS + 1] = [const { v::Ring::new() }; 2 * MQ_PAIRS + 1];

fn mq_ring(i: usize) -> *mut v::Ring {
    // SAFETY: a pointer to one static ring, owned by queue i of this check alone.
    unsafe { core::ptr::addr_of_mut!(MQ_RINGS[i]) }
}

/// Polls every receive queue for a frame `want` accepts: (queue pair, answer).
fn receive_any<T>(rxq: &mut [Queue; MQ_PAIRS], ms: u64, mut want: impl FnMut(&[u8]) -> Option<T>) -> Option<(usize, T)> {
    let end = rdtsc() + ms * (tsc_hz() / 1000).max(1);
    while rdtsc() < end {
        for (k, q) in rxq.iter_mut().enumerate() {
            let Some((head, len)) = q.poll() else { continue };
            let i = head as usize % RX_BUFS;
            let n = (len as usize).min(BUF);
            let got = if n >= HDR + 14 { want(&rx_buf(i)[..n]) } else { None };
            post_rx(q, i, true);
            if let Some(g) = got {
                return Some((k, g));
            }
        }
        core::hint::spin_loop();
    }
    None
}

/// `netmq` in `tests=`: multiqueue. The driver takes VIRTIO_NET_F_MQ with the control
/// queue, sets two queue pairs (VQ_PAIRS_SET, which the device must ack), then sends a
/// UDP datagram to 10.77.0.1:7777 from port 6000 + k on pair k's transmit queue and
/// waits for the echo on any receive queue: the tap steers a flow's answer to the
/// queue it came from, so each pair's echo should come back on that pair.
pub fn check_netmq(r: &mut Report) {
    let Some(d) = v::find(TYPE_NET, 0) else {
        return r.line("netmq", Err(()), format_args!("no virtio-net function on bus 0"));
    };
    let Ok(features) = d.negotiate(v::F_VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ | F_MQ, 0) else {
        return r.line("netmq", Err(()), format_args!("device refused FEATURES_OK"));
    };
    let max_pairs = d.config8(8) as u16 | (d.config8(9) as u16) << 8;
    if features & (F_MQ | F_CTRL_VQ) != F_MQ | F_CTRL_VQ || (max_pairs as usize) < MQ_PAIRS {
        d.set_status(0);
        return r.line("netmq", Err(()), format_args!("features={features:#x} max_virtqueue_pairs={max_pairs}: no multiqueue"));
    }
    let ctrl_index = 2 * max_pairs;
    let queues = [d.setup_queue(0, mq_ring(0), NO_VECTOR), d.setup_queue(1, mq_ring(1), NO_VECTOR), d.setup_queue(2, mq_ring(2), NO_VECTOR), d.setup_queue(3, mq_ring(3), NO_VECTOR), d.setup_queue(ctrl_index, mq_ring(4), NO_VECTOR)];
    let [Some(rx0), Some(tx0), Some(rx1), Some(tx1), Some(mut ctrl)] = queues else {
        d.set_status(0);
        return r.line("netmq", Err(()), format_args!("queues smaller than the driver's"));
    };
    d.driver_ok();
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = d.config8(i as u64);
    }
    let mut rxq = [rx0, rx1];
    let mut txq = [tx0, tx1];
    for i in 0..RX_BUFS {
        post_rx(&mut rxq[i / (RX_BUFS / MQ_PAIRS)], i, i % (RX_BUFS / MQ_PAIRS) == RX_BUFS / MQ_PAIRS - 1);
    }
    // VIRTIO_NET_CTRL_MQ / VQ_PAIRS_SET 2, and the ack byte (0: OK).
    let cmd = tx_buf();
    cmd[..4].copy_from_slice(&[4, 0, MQ_PAIRS as u8, 0]);
    cmd[4] = 0xee;
    let base = cmd.as_ptr() as u64;
    let acked = ctrl.request(&[(base, 4, false), (base + 4, 1, true)]).is_some();
    let ack = tx_buf()[4];
    // ARP on pair 0 for the host's MAC (the answer may come on either pair).
    let len = arp_request(&mac);
    let sent = send(&mut txq[0], len);
    let host_mac = receive_any(&mut rxq, 3000, |fr| arp_reply(fr, &mac));
    let Some((_, host_mac)) = host_mac else {
        d.set_status(0);
        return r.line("netmq", Err(()), format_args!("pairs={MQ_PAIRS} ack={ack} acked={acked} arp_sent={sent}: no ARP reply"));
    };
    let mut came_back = [None; MQ_PAIRS];
    for k in 0..MQ_PAIRS {
        let payload = b"cellvm-mq pair ?";
        let f = tx_buf();
        f[..HDR].fill(0);
        let udp = ipv4(f, &mac, &host_mac, 17, 8 + payload.len());
        put16(f, udp, MQ_SPORT + k as u16);
        put16(f, udp + 2, UDP_PORT);
        put16(f, udp + 4, (8 + payload.len()) as u16);
        put16(f, udp + 6, 0); // no checksum (IPv4)
        f[udp + 8..udp + 8 + payload.len()].copy_from_slice(payload);
        f[udp + 8 + payload.len() - 1] = b'0' + k as u8;
        if !send(&mut txq[k], udp + 8 + payload.len()) {
            continue;
        }
        came_back[k] = receive_any(&mut rxq, 3000, |fr| {
            let ip = HDR + 14;
            let body = ip + 20;
            (fr.len() >= body + 8 + payload.len() && get16(fr, HDR + 12) == 0x0800 && fr[ip + 9] == 17 && get16(fr, body + 2) == MQ_SPORT + k as u16 && fr[body + 8 + payload.len() - 1] == b'0' + k as u8).then_some(())
        })
        .map(|(q, _)| q);
    }
    d.set_status(0);
    let ok = acked && ack == 0 && came_back.iter().all(|c| c.is_some());
    let q = |c: Option<usize>| c.map_or(-1, |q| q as i32);
    r.line(
        "netmq",
        ok.then_some(()).ok_or(()),
        format_args!("max_pairs={max_pairs} pairs={MQ_PAIRS} ack={ack} pair0_echo_on_rx={} pair1_echo_on_rx={}", q(came_back[0]), q(came_back[1])),
    );
}

/// `netrxbench` in `tests=`: receive rate. With mergeable receive buffers taken, the
/// driver keeps 16 buffers posted and counts the UDP datagrams to its port 9 the host
/// floods it with for `ms`, re-posting each buffer at once; it polls, with the device's
/// interrupts off (VIRTQ_AVAIL_F_NO_INTERRUPT).
pub fn check_netrxbench(r: &mut Report, ms: u64) {
    let (d, features, mut rxq, _txq, _mac, _) = match start(F_MAC | F_MRG_RXBUF) {
        Ok(x) => x,
        Err(why) => return r.line("netrxbench", Err(()), format_args!("{why}")),
    };
    // It polls, as a busy driver does (NAPI): no interrupt per pass of the device's.
    rxq.poll_only();
    let hz = tsc_hz().max(1);
    // The first datagram starts the clock: the host's flood may begin before the guest.
    let wait = rdtsc() + 10 * hz;
    let (mut frames, mut bytes, mut start_tsc) = (0u64, 0u64, 0u64);
    let mut now = rdtsc();
    while now < wait && (start_tsc == 0 || now < start_tsc + ms * hz / 1000) {
        let mut refilled = false;
        while let Some((head, len)) = rxq.poll() {
            let i = head as usize % RX_BUFS;
            let n = (len as usize).min(BUF);
            let f = &rx_buf(i)[..n];
            let ip = HDR + 14;
            if n >= ip + 28 && get16(f, HDR + 12) == 0x0800 && f[ip + 9] == 17 && get16(f, ip + 22) == 9 {
                if start_tsc == 0 {
                    start_tsc = rdtsc();
                } else {
                    frames += 1;
                    bytes += (n - HDR) as u64;
                }
            }
            post_rx(&mut rxq, i, false);
            refilled = true;
        }
        if refilled {
            rxq.kick();
        }
        now = rdtsc();
    }
    d.set_status(0);
    let elapsed_ms = (now.saturating_sub(start_tsc) * 1000 / hz).max(1);
    let fps = frames * 1000 / elapsed_ms;
    let mbps = bytes / 1000 / elapsed_ms;
    let ok = frames > 0;
    r.line("netrxbench", ok.then_some(()).ok_or(()), format_args!("fps={fps} mbps={mbps} frames={frames} in_ms={elapsed_ms} mrg_rxbuf={}", features & F_MRG_RXBUF != 0));
}
