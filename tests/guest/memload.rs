//! `memload` in `tests=`: the workload snapshots (and migrations) are checked with.
//!
//! Pass after pass it fills every 4 KiB page of RAM from 16 MiB to the end of the first
//! e820 RAM range above 1 MiB (at most 3 GiB) with words `pass << 40 | page << 9 | word`,
//! checking every word first: a page must still hold what the previous pass wrote (zeros
//! before the first). A page lost, restored from another moment, or loaded late shows as
//! `TEST memload FAIL pass=P page=ADDR want=W got=G`, and the guest powers off. After each
//! pass: `memload pass P ok pages=N tsc=T`. With `passes=N` on the command line it ends
//! after N passes (`TEST memload PASS passes=N pages=M`); without, it goes on until the
//! host ends the VM. The pass counter lives in guest RAM like everything else, so a
//! restored guest goes on from the pass it was in.

use core::fmt::Write;

use crate::hw::{self, StartInfo};
use crate::Report;

const START: u64 = 16 << 20;
const PAGE: u64 = 4096;
const LIMIT: u64 = 0xc000_0000;

fn word(pass: u64, page: u64, w: u64) -> u64 {
    (pass << 40) | ((page & 0x7fff_ffff) << 9) | w
}

/// The end of the RAM range that holds START, from the e820 map.
fn ram_end(info: Option<StartInfo>) -> u64 {
    let Some(info) = info else { return 0 };
    let end = info
        .memmap()
        .find(|e| e.kind == 1 && e.addr <= START && e.addr + e.size > START)
        .map(|e| (e.addr + e.size).min(LIMIT))
        .unwrap_or(0);
    end
}

/// Which pass is running: in RAM, saved and restored with it.
static mut PASS: u64 = 0;

pub fn run(r: &mut Report, info: Option<StartInfo>, passes: u64) {
    let end = ram_end(info) & !(PAGE - 1);
    if end <= START {
        r.line("memload", Err(()), format_args!("no RAM above 16 MiB in the e820 map"));
        return;
    }
    let pages = (end - START) / PAGE;
    r.say(format_args!("memload: pages={pages} from={START:#x} to={end:#x}"));
    loop {
        // SAFETY: one thread (the BSP) touches PASS; volatile so it is in RAM when saved.
        let pass = unsafe { core::ptr::read_volatile(&raw const PASS) } + 1;
        unsafe { core::ptr::write_volatile(&raw mut PASS, pass) };
        for page in 0..pages {
            let base = (START + page * PAGE) as *mut u64;
            for w in 0..PAGE / 8 {
                let want = if pass == 1 { 0 } else { word(pass - 1, page, w) };
                // SAFETY: every address from START to `end` is RAM the e820 map gives,
                // identity-mapped and user-accessible, and nothing else uses it.
                let got = unsafe { base.add(w as usize).read_volatile() };
                if got != want {
                    r.line(
                        "memload",
                        Err(()),
                        format_args!("pass={pass} page={:#x} word={w} want={want:#x} got={got:#x}", base as u64),
                    );
                    return;
                }
                // SAFETY: as above.
                unsafe { base.add(w as usize).write_volatile(word(pass, page, w)) };
            }
        }
        let _ = writeln!(r.serial_mut(), "memload pass {pass} ok pages={pages} tsc={}", hw::rdtsc());
        if passes != 0 && pass >= passes {
            r.line("memload", Ok(()), format_args!("passes={pass} pages={pages}"));
            return;
        }
    }
}
