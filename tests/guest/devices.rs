//! Checks of the virtio devices, driven by the polling driver in virtio.rs.
//!
//! `blk` expects the image tests/virtio.rs lays out: at least 64 sectors, where byte
//! `o` of the first 64 sectors is `pattern(o)`. It reads, writes, flushes, discards and
//! zeroes fixed sectors that the host test then checks in the file.

use core::fmt::Write;

use crate::hw::{self, Buf};
use crate::virtio::{self as v, Device, Queue, Ring, NO_VECTOR, TYPE_BLOCK, TYPE_RNG};
use crate::Report;

static mut RING0: Ring = Ring::new();
static mut RING1: Ring = Ring::new();

#[repr(C, align(4096))]
struct Pages([u8; 16384]);
static mut DATA: Pages = Pages([0; 16384]);
static mut HDR: [u64; 2] = [0; 2];
static mut STATUS: [u8; 64] = [0; 64];

const BLK_F_SEG_MAX: u64 = 1 << 2;
const BLK_F_BLK_SIZE: u64 = 1 << 6;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_F_DISCARD: u64 = 1 << 13;
const BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const F_RING_PACKED: u64 = 1 << 34;

pub fn pattern(o: u64) -> u8 {
    ((o / 512) as u8).wrapping_mul(31) ^ (o as u8)
}

pub(crate) fn data() -> u64 {
    core::ptr::addr_of!(DATA) as u64
}

pub(crate) fn bytes(off: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: DATA is only used by the one check running at a time.
    unsafe { core::slice::from_raw_parts_mut((data() + off) as *mut u8, len) }
}

pub(crate) fn ring(i: usize) -> *mut Ring {
    if i == 0 {
        core::ptr::addr_of_mut!(RING0)
    } else {
        core::ptr::addr_of_mut!(RING1)
    }
}

/// One block request: header, optional data buffer, status byte. Returns (used length,
/// status byte); the status is preset to 0xee so an untouched one shows.
pub(crate) fn blk(q: &mut Queue, kind: u32, sector: u64, buf: Option<v::Buf>) -> (Option<u32>, u8) {
    // SAFETY: HDR and STATUS are only used by the one check running at a time.
    let (hdr, status) = unsafe {
        HDR = [kind as u64, sector];
        STATUS[0] = 0xee;
        (core::ptr::addr_of!(HDR) as u64, core::ptr::addr_of!(STATUS) as u64)
    };
    let mut chain = [(hdr, 16, false), (0, 0, false), (status, 1, true)];
    let used = match buf {
        Some(b) => {
            chain[1] = b;
            q.request(&chain)
        }
        None => q.request(&[chain[0], chain[2]]),
    };
    (used, unsafe { core::ptr::read_volatile(core::ptr::addr_of!(STATUS[0])) })
}

pub(crate) fn start(ty: u16, features: u64, queues: u16, vectors: [u16; 2]) -> Result<(Device, u64, [Option<Queue>; 2]), &'static str> {
    start_with(ty, features, queues, vectors, |_| {})
}

/// Like `start`, with `before_queues` run after feature negotiation (the reset) and
/// before the queues are set up: where a driver programs MSI-X.
fn start_with(
    ty: u16,
    features: u64,
    queues: u16,
    vectors: [u16; 2],
    before_queues: impl Fn(&Device),
) -> Result<(Device, u64, [Option<Queue>; 2]), &'static str> {
    let d = v::find(ty, 0).ok_or("no such virtio function on bus 0")?;
    let f = d.negotiate(v::F_VERSION_1 | features, 0).map_err(|_| "device refused FEATURES_OK")?;
    before_queues(&d);
    let mut qs = [None, None];
    for i in 0..queues.min(d.num_queues()).min(2) {
        qs[i as usize] = Some(d.setup_queue(i, ring(i as usize), vectors[i as usize]).ok_or("queue smaller than the driver's")?);
    }
    d.driver_ok();
    if d.status() & 0x40 != 0 {
        return Err("device set NEEDS_RESET at DRIVER_OK");
    }
    Ok((d, f, qs))
}

pub fn check_virtio(r: &mut Report) {
    let mut list = Buf::<320>::new();
    let (mut found, mut ok) = (0, true);
    for ty in [TYPE_BLOCK, TYPE_RNG, v::TYPE_NET] {
        let mut nth = 0;
        while let Some(d) = v::find(ty, nth) {
            nth += 1;
            found += 1;
            let offered = d.offered_features();
            // A feature the device did not offer, and a driver without VERSION_1, must
            // both be refused; the honest offer accepted.
            let forced = d.negotiate(v::F_VERSION_1, F_RING_PACKED).is_err();
            let legacy = d.negotiate(0, 0).is_err();
            let accepted = d.negotiate(v::F_VERSION_1, 0).is_ok();
            let shape = d.vectors == d.num_queues() + 1 && d.notify_mult == 4 && d.device != 0;
            d.set_status(0);
            ok &= forced && legacy && accepted && shape && offered & v::F_VERSION_1 != 0;
            let _ = write!(
                list,
                "{:02x}.0 type={} queues={} vectors={} features={:#x} refuses_unoffered={} refuses_legacy={} accepts={} ",
                d.slot, ty, d.num_queues(), d.vectors, offered, forced, legacy, accepted
            );
        }
    }
    ok &= found > 0;
    r.line("virtio", ok.then_some(()).ok_or(()), format_args!("functions={found}: {}", list.as_str()));
}

pub fn check_blk(r: &mut Report) {
    let wanted = BLK_F_FLUSH | BLK_F_DISCARD | BLK_F_WRITE_ZEROES | BLK_F_BLK_SIZE | BLK_F_SEG_MAX;
    let (d, features, mut qs) = match start(TYPE_BLOCK, wanted, 1, [NO_VECTOR; 2]) {
        Ok(x) => x,
        Err(why) => return r.line("blk", Err(()), format_args!("{why}")),
    };
    let q = qs[0].as_mut().expect("queue 0");
    let capacity = d.config64(0);
    let mut out = Buf::<256>::new();
    let mut ok = capacity >= 64;
    // GET_ID
    let (_, s) = blk(q, 8, 0, Some((data(), 20, true)));
    let id = core::str::from_utf8(bytes(0, 20)).unwrap_or("?").trim_end_matches('\0');
    let _ = write!(out, "capacity={capacity} features={features:#x} id={id:?}");
    ok &= s == 0;
    // Read the host's pattern.
    let (used, s) = blk(q, 0, 0, Some((data(), 4096, true)));
    let read_ok = s == 0 && used == Some(4097) && bytes(0, 4096).iter().enumerate().all(|(i, b)| *b == pattern(i as u64));
    let _ = write!(out, " read={read_ok}");
    ok &= read_ok;
    // Write, read back.
    for (i, b) in bytes(0, 4096).iter_mut().enumerate() {
        *b = 0xa5 ^ i as u8;
    }
    let (_, s1) = blk(q, 1, 16, Some((data(), 4096, false)));
    let (_, s2) = blk(q, 0, 16, Some((data() + 4096, 4096, true)));
    let write_ok = s1 == 0 && s2 == 0 && bytes(0, 4096) == bytes(4096, 4096);
    let (_, flush) = blk(q, 4, 0, None);
    let _ = write!(out, " write={write_ok} flush={flush}");
    ok &= write_ok && flush == 0;
    // Discard 32..40, write zeroes 40..48, read 32..48 back.
    let seg = |b: &mut [u8], sector: u64, n: u32| {
        b[0..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&n.to_le_bytes());
        b[12..16].copy_from_slice(&0u32.to_le_bytes());
    };
    seg(bytes(8192, 16), 32, 8);
    let (_, discard) = blk(q, 11, 0, Some((data() + 8192, 16, false)));
    seg(bytes(8192, 16), 40, 8);
    let (_, zeroes) = blk(q, 13, 0, Some((data() + 8192, 16, false)));
    let (_, s) = blk(q, 0, 32, Some((data(), 8192, true)));
    let zero_ok = discard == 0 && zeroes == 0 && s == 0 && bytes(0, 8192).iter().all(|b| *b == 0);
    let _ = write!(out, " discard={discard} write_zeroes={zeroes} zeroed={zero_ok}");
    ok &= zero_ok;
    // Errors the device must report: past the end, an unknown request type.
    let (_, past) = blk(q, 0, capacity, Some((data(), 512, true)));
    let (_, unknown) = blk(q, 99, 0, None);
    let _ = write!(out, " past_end={past} unknown_type={unknown}");
    ok &= past == 1 && unknown == 2;
    d.set_status(0);
    r.line("blk", ok.then_some(()).ok_or(()), format_args!("{}", out.as_str()));
}

/// A hostile request: a data buffer in the PCI hole, outside guest RAM. The device must
/// neither touch it nor fall over: the request comes back unused (no status can be
/// trusted) and the next good request is served.
pub fn check_blkbad(r: &mut Report) {
    let (d, _, mut qs) = match start(TYPE_BLOCK, 0, 1, [NO_VECTOR; 2]) {
        Ok(x) => x,
        Err(why) => return r.line("blkbad", Err(()), format_args!("{why}")),
    };
    let q = qs[0].as_mut().expect("queue 0");
    let (used_bad, bad) = blk(q, 0, 0, Some((0xd000_0000, 512, true)));
    let (used_after, after) = blk(q, 0, 0, Some((data(), 512, true)));
    let after_ok = after == 0 && bytes(0, 512).iter().enumerate().all(|(i, b)| *b == pattern(i as u64));
    let ok = used_bad == Some(0) && bad == 0xee && after_ok;
    let status = d.status();
    d.set_status(0);
    r.line(
        "blkbad",
        ok.then_some(()).ok_or(()),
        format_args!("outside_ram: used={used_bad:?} status={bad:#x}; next request: used={used_after:?} status={after} device_status={status:#x}"),
    );
}

/// MSI-X: queue 0's vector targets this CPU, queue 1's (a second queue, if the disk
/// has one) another CPU; each completion must raise exactly the programmed vector on
/// the programmed CPU. Then a masked vector must stay pending until unmasked.
pub fn check_msix(r: &mut Report) {
    if !hw::xapic_mmio_available() {
        return r.line("msix", Err(()), format_args!("LAPIC in x2APIC mode: IRR not readable from CPL 3"));
    }
    hw::write_phys::<u32>(hw::LAPIC_BASE + 0xf0, 0x1ff);
    let me = v::own_apic_id();
    let other = me + 1;
    let (va, vb, vm) = (0x51u8, 0x52u8, 0x53u8);
    // Queue 0 starts on a throwaway vector: a backend may signal once when its queue
    // starts (libvhost-user does), which the spec allows; then the real one.
    let program = |d: &Device| {
        d.msix_entry(0, me, 0x50, false);
        d.msix_entry(1, other, vb, false);
        d.msix_control(true, false);
    };
    let (d, _, mut qs) = match start_with(TYPE_BLOCK, BLK_F_MQ, 2, [0, 1], program) {
        Ok(x) => x,
        Err(why) => return r.line("msix", Err(()), format_args!("{why}")),
    };
    let wait_irr = |vector: u8, ms: u64| {
        let end = hw::rdtsc() + ms * (hw::tsc_hz() / 1000).max(1);
        while hw::rdtsc() < end {
            if v::irr(vector) {
                return true;
            }
        }
        false
    };
    let mut out = Buf::<320>::new();
    let spurious = wait_irr(0x50, 50);
    d.msix_entry(0, me, va, false);
    let before = v::irr(va) || v::irr(vb) || v::irr(vm);
    let _ = write!(out, "start_signal={spurious} ");
    let [q0, q1] = &mut qs;
    let q0 = q0.as_mut().expect("queue 0");
    let (_, s0) = blk(q0, 0, 0, Some((data(), 512, true)));
    let here = wait_irr(va, 1000);
    let qv = d.queue_vector(0);
    let _ = write!(out, "apic={me} pending_before={before} q0: msix entry {qv}, vector {va:#x} -> self: status={s0} irr={here}");
    let mut ok = !before && s0 == 0 && here && qv == 0;
    if let Some(q1) = q1.as_mut() {
        let (_, s1) = blk(q1, 0, 0, Some((data(), 512, true)));
        let leaked = wait_irr(vb, 100);
        let _ = write!(out, "; q1: vector {vb:#x} -> apic {other}: status={s1} seen_here={leaked}");
        ok &= s1 == 0 && !leaked;
    }
    // Masked: the completion must not interrupt, the PBA shows it pending, unmasking
    // delivers it.
    d.msix_entry(0, me, vm, true);
    let (_, s) = blk(q0, 0, 0, Some((data(), 512, true)));
    let early = wait_irr(vm, 100);
    let pending = d.msix_pending(0);
    d.msix_entry(0, me, vm, false);
    let late = wait_irr(vm, 1000);
    let _ = write!(out, "; masked: status={s} irr_while_masked={early} pba={pending} irr_after_unmask={late}");
    ok &= s == 0 && !early && pending && late;
    d.set_status(0);
    d.msix_control(false, false);
    r.line("msix", ok.then_some(()).ok_or(()), format_args!("{}", out.as_str()));
}

pub fn check_rng(r: &mut Report) {
    let (d, _, mut qs) = match start(TYPE_RNG, 0, 1, [NO_VECTOR; 2]) {
        Ok(x) => x,
        Err(why) => return r.line("rng", Err(()), format_args!("{why}")),
    };
    let q = qs[0].as_mut().expect("queue 0");
    bytes(0, 128).fill(0);
    let a = q.request(&[(data(), 64, true)]);
    let b = q.request(&[(data() + 64, 64, true)]);
    let first = bytes(0, 64);
    let varied = first.iter().any(|x| *x != first[0]);
    let differ = bytes(0, 64) != bytes(64, 64);
    let mut fnv = 0xcbf2_9ce4_8422_2325u64;
    for x in bytes(0, 64).iter() {
        fnv = (fnv ^ *x as u64).wrapping_mul(0x100_0000_01b3);
    }
    d.set_status(0);
    let ok = a == Some(64) && b == Some(64) && varied && differ;
    r.line("rng", ok.then_some(()).ok_or(()), format_args!("used={a:?},{b:?} varied={varied} differ={differ} fnv1a={fnv:#018x}"));
}

/// Block throughput from CPL 3, for cellvm-bench: for `bench_ms` each, 4 KiB reads at
/// random sectors with 32 in flight, 4 KiB writes at random sectors with 32 in flight
/// (the disk is the benchmark's scratch), then 1 MiB sequential reads with 4 in flight.
/// Prints IOPS and MB/s measured with the TSC.
pub fn check_blkbench(r: &mut Report, ms: u64) {
    let (d, _, mut qs) = match start(TYPE_BLOCK, 0, 1, [NO_VECTOR; 2]) {
        Ok(x) => x,
        Err(why) => return r.line("blkbench", Err(()), format_args!("{why}")),
    };
    let q = qs[0].as_mut().expect("queue 0");
    let capacity = d.config64(0);
    let hz = hw::tsc_hz().max(1);
    // SAFETY: BIG is only used here.
    let big = unsafe { core::ptr::addr_of_mut!(BIG) as u64 };
    let hdrs = unsafe { core::ptr::addr_of_mut!(HDRS) as u64 };
    let status = unsafe { core::ptr::addr_of!(STATUS) as u64 };
    let set_hdr = |k: usize, kind: u64, sector: u64| {
        // SAFETY: slot k's header is not in flight while it is rewritten.
        unsafe { HDRS[k] = [kind, sector] };
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand_sector = |span: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % (capacity / 8 - span)) * 8
    };
    // kind: 0 reads (VIRTIO_BLK_T_IN), 1 writes (VIRTIO_BLK_T_OUT).
    let run = |q: &mut Queue, kind: u64, depth: usize, bytes: u32, next: &mut dyn FnMut() -> u64| -> (u64, u64, bool) {
        let post = |q: &mut Queue, k: usize, sector: u64, kick: bool| {
            set_hdr(k, kind, sector);
            let data = big + (k as u64) * bytes as u64;
            q.post((3 * k) as u16, &[(hdrs + 16 * k as u64, 16, false), (data, bytes, kind == 0), (status + k as u64, 1, true)], kick);
        };
        for k in 0..depth {
            post(q, k, next(), k + 1 == depth);
        }
        let (start, mut done, mut errors) = (hw::rdtsc(), 0u64, false);
        let end = start + ms * hz / 1000;
        let mut now = start;
        while now < end {
            let mut posted = false;
            while let Some((head, _)) = q.poll() {
                let k = head as usize / 3;
                // SAFETY: the device finished with slot k.
                errors |= unsafe { core::ptr::read_volatile(core::ptr::addr_of!(STATUS[k])) } != 0;
                done += 1;
                post(q, k, next(), false);
                posted = true;
            }
            if posted {
                q.kick();
            }
            now = hw::rdtsc();
        }
        // Drain what is in flight before the next phase reuses the slots.
        let mut left = depth;
        let drain_end = hw::rdtsc() + 5 * hz;
        while left > 0 && hw::rdtsc() < drain_end {
            if q.poll().is_some() {
                left -= 1;
            }
        }
        (done, (now - start) * 1000 / hz, errors || left > 0)
    };
    let (ios, rms, rerr) = run(q, 0, 32, 4096, &mut || rand_sector(1));
    let (wios, wms, werr) = run(q, 1, 32, 4096, &mut || rand_sector(1));
    let mut seq = 0u64;
    let span = 2048u64;
    let mut next_seq = || {
        let s = seq;
        seq = (seq + span) % ((capacity / span) * span).max(span);
        s
    };
    let (mbs, sms, serr) = run(q, 0, 4, 1 << 20, &mut next_seq);
    d.set_status(0);
    let iops = ios * 1000 / rms.max(1);
    let wiops = wios * 1000 / wms.max(1);
    let mbps = mbs * 1000 / sms.max(1);
    let errors = rerr || werr || serr;
    let ok = !errors && ios > 0 && wios > 0 && mbs > 0 && capacity >= 4096;
    r.line("blkbench", ok.then_some(()).ok_or(()), format_args!("iops={iops} wiops={wiops} mbps={mbps} randread_ios={ios} in_ms={rms} randwrite_ios={wios} in_ms={wms} seqread_mib={mbs} in_ms={sms} errors={errors}"));
}

#[repr(C, align(4096))]
struct Big([u8; 4 << 20]);
static mut BIG: Big = Big([0; 4 << 20]);
static mut HDRS: [[u64; 2]; 42] = [[0; 2]; 42];

/// INTx: with MSI-X off, a completion raises the function's interrupt pin (config
/// 0x3c names the IOAPIC input), the ISR shows bit 0, and reading the ISR clears it.
pub fn check_intx(r: &mut Report) {
    if !hw::xapic_mmio_available() {
        return r.line("intx", Err(()), format_args!("LAPIC in x2APIC mode: IRR not readable from CPL 3"));
    }
    hw::write_phys::<u32>(hw::LAPIC_BASE + 0xf0, 0x1ff);
    let Some(d) = v::find(TYPE_BLOCK, 0) else {
        return r.line("intx", Err(()), format_args!("no virtio-blk function"));
    };
    let reg = v::cfg_read(d.slot, 0x3c);
    let (line, pin) = ((reg & 0xff) as u32, (reg >> 8) & 0xff);
    d.msix_control(false, false);
    let vector = 0x61u8;
    let ioapic = |index: u32, value: u32| {
        hw::write_phys::<u32>(0xfec0_0000, index);
        hw::write_phys::<u32>(0xfec0_0010, value);
    };
    let (d, _, mut qs) = match start(TYPE_BLOCK, 0, 1, [NO_VECTOR; 2]) {
        Ok(x) => x,
        Err(why) => return r.line("intx", Err(()), format_args!("{why}")),
    };
    let q = qs[0].as_mut().expect("queue 0");
    // A backend may signal once as its queue starts (libvhost-user does): let that
    // arrive and clear it through the ISR before the pin is unmasked.
    let settle = hw::rdtsc() + hw::tsc_hz() / 20;
    while hw::rdtsc() < settle {}
    let _ = d.isr_read();
    ioapic(0x10 + 2 * line + 1, v::own_apic_id() << 24);
    ioapic(0x10 + 2 * line, vector as u32 | 1 << 15); // level, unmasked
    let before = v::irr(vector);
    let (_, s) = blk(q, 0, 0, Some((data(), 512, true)));
    let end = hw::rdtsc() + hw::tsc_hz();
    let mut seen = false;
    while hw::rdtsc() < end && !seen {
        seen = v::irr(vector);
    }
    let isr1 = d.isr_read();
    let isr2 = d.isr_read();
    ioapic(0x10 + 2 * line, 1 << 16);
    d.set_status(0);
    let ok = pin == 1 && (16..24).contains(&line) && !before && s == 0 && seen && isr1 & 1 == 1 && isr2 == 0;
    r.line(
        "intx",
        ok.then_some(()).ok_or(()),
        format_args!("INT{} -> IOAPIC pin {line} -> vector {vector:#x}: status={s} irr={seen} isr={isr1:#x} then {isr2:#x}", (b'A' + pin.saturating_sub(1) as u8) as char),
    );
}
