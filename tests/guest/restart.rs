//! `restartloop`: the devices keep working while their backends are killed and started
//! again. For `bench_ms` ms, one request after another: a 4 KiB write to the disk's
//! slot `k % SLOTS` (from sector FIRST_SECTOR) holding `slot_byte(k, i)`, a 16-byte
//! rng request, and every NET_EVERY-th round an ARP for 10.77.0.1 (each device only if
//! the VM has it). Every blk and rng request must complete (within the driver's 5 s)
//! with status 0; ARP answers may be lost while the net backend is down, but the last
//! ARP, after the loop, must be answered. Then every slot is read back and compared.
//! The report gives the writes made (the host test checks the file against them) and
//! the longest wait for one request of each kind (for the net, one answered ARP):
//! the time a restart cost.

use core::fmt::Write;

use crate::devices::{blk, bytes, data};
use crate::hw::{rdtsc, tsc_hz, Buf};
use crate::virtio::{self as v, Ring, NO_VECTOR, TYPE_BLOCK, TYPE_RNG};
use crate::Report;

static mut BLK_RING: Ring = Ring::new();
static mut RNG_RING: Ring = Ring::new();
static mut NET_RX: Ring = Ring::new();
static mut NET_TX: Ring = Ring::new();
#[repr(C, align(64))]
struct Random([u8; 16]);
static mut RANDOM: Random = Random([0; 16]);

pub const SLOTS: u64 = 64;
pub const FIRST_SECTOR: u64 = 1024;
const NET_EVERY: u64 = 8;

/// Byte `i` of write `k` (the host test computes the same).
pub fn slot_byte(k: u64, i: usize) -> u8 {
    if i < 8 {
        (k >> (8 * i)) as u8
    } else {
        (k as u8).wrapping_mul(29) ^ (i as u8) ^ ((i >> 8) as u8)
    }
}

fn fill(k: u64) {
    for (i, b) in bytes(0, 4096).iter_mut().enumerate() {
        *b = slot_byte(k, i);
    }
}

fn us(ticks: u64) -> u64 {
    ticks / (tsc_hz() / 1_000_000).max(1)
}

pub fn check_restartloop(r: &mut Report, ms: u64) {
    let ptr = |p: *mut Ring| p;
    let Some(bd) = v::find(TYPE_BLOCK, 0) else {
        return r.line("restartloop", Err(()), format_args!("no virtio-blk function"));
    };
    if bd.negotiate(v::F_VERSION_1, 0).is_err() {
        return r.line("restartloop", Err(()), format_args!("blk refused FEATURES_OK"));
    }
    // SAFETY: each ring belongs to one queue of this check alone.
    let Some(mut bq) = bd.setup_queue(0, ptr(unsafe { core::ptr::addr_of_mut!(BLK_RING) }), NO_VECTOR) else {
        return r.line("restartloop", Err(()), format_args!("blk queue smaller than the driver's"));
    };
    bd.driver_ok();
    let rng = v::find(TYPE_RNG, 0).and_then(|d| {
        d.negotiate(v::F_VERSION_1, 0).ok()?;
        // SAFETY: as above.
        let q = d.setup_queue(0, ptr(unsafe { core::ptr::addr_of_mut!(RNG_RING) }), NO_VECTOR)?;
        d.driver_ok();
        Some((d, q))
    });
    let mut rng = rng;
    // SAFETY: as above.
    let net = crate::net::start_on(0, unsafe { core::ptr::addr_of_mut!(NET_RX) }, unsafe { core::ptr::addr_of_mut!(NET_TX) }).ok();
    let mut net = net;
    r.say(format_args!("restartloop: running blk={} rng={} net={}", true, rng.is_some(), net.is_some()));

    let hz = tsc_hz().max(1);
    let end = rdtsc() + ms * hz / 1000;
    let (mut k, mut failed) = (0u64, None);
    let (mut max_blk, mut max_rng, mut rng_done) = (0u64, 0u64, 0u64);
    let (mut arp_ok, mut arp_lost, mut max_arp) = (0u64, 0u64, 0u64);
    while rdtsc() < end && failed.is_none() {
        fill(k);
        let t0 = rdtsc();
        let (used, s) = blk(&mut bq, 1, FIRST_SECTOR + (k % SLOTS) * 8, Some((data(), 4096, false)));
        max_blk = max_blk.max(rdtsc() - t0);
        if used.is_none() || s != 0 {
            failed = Some((k, "blk write", used, s));
            break;
        }
        k += 1;
        if let Some((_, q)) = rng.as_mut() {
            let t0 = rdtsc();
            // SAFETY: RANDOM is this check's alone.
            let used = q.request(&[(unsafe { core::ptr::addr_of!(RANDOM) } as u64, 16, true)]);
            max_rng = max_rng.max(rdtsc() - t0);
            if used != Some(16) {
                failed = Some((k, "rng", used, 0));
                break;
            }
            rng_done += 1;
        }
        if let Some((_, _, rxq, txq, mac, _)) = net.as_mut() {
            if k % NET_EVERY == 0 {
                let t0 = rdtsc();
                match crate::net::arp_within(rxq, txq, mac, 100) {
                    (_, Some(_)) => {
                        arp_ok += 1;
                        max_arp = max_arp.max(rdtsc() - t0);
                    }
                    _ => arp_lost += 1,
                }
            }
        }
    }
    let mut out = Buf::<320>::new();
    let _ = write!(out, "writes={k} rng={rng_done} max_blk_us={} max_rng_us={}", us(max_blk), us(max_rng));
    let mut ok = failed.is_none() && k > 0;
    if let Some((at, what, used, s)) = failed {
        let _ = write!(out, " failed_at={at} {what}: used={used:?} status={s}");
    }
    // Every slot holds its last write.
    let mut bad = 0u64;
    for slot in 0..SLOTS.min(k) {
        let last = slot + (k - 1 - slot) / SLOTS * SLOTS;
        let (_, s) = blk(&mut bq, 0, FIRST_SECTOR + slot * 8, Some((data() + 4096, 4096, true)));
        let good = s == 0 && bytes(4096, 4096).iter().enumerate().all(|(i, b)| *b == slot_byte(last, i));
        bad += u64::from(!good);
    }
    let _ = write!(out, " slots_bad={bad}");
    ok &= bad == 0;
    if let Some((d, rxq, txq, mac)) = net.as_mut().map(|(d, _, rxq, txq, mac, _)| (d, rxq, txq, mac)) {
        // After the loop: the device must work (a second try, in case one frame is lost).
        let answered = crate::net::arp_within(rxq, txq, mac, 1000).1.is_some() || crate::net::arp_within(rxq, txq, mac, 2000).1.is_some();
        let _ = write!(out, " arp_ok={arp_ok} arp_lost={arp_lost} max_arp_us={} arp_after={answered} net_status={:#x}", us(max_arp), d.status());
        ok &= answered;
        d.set_status(0);
    }
    if let Some((d, _)) = rng.as_ref() {
        let _ = write!(out, " rng_status={:#x}", d.status());
        d.set_status(0);
    }
    let _ = write!(out, " blk_status={:#x}", bd.status());
    ok &= bd.status() & 0x40 == 0;
    bd.set_status(0);
    r.line("restartloop", ok.then_some(()).ok_or(()), format_args!("{}", out.as_str()));
}
