//! The virtio-blk commands. Parameters: `outboard.blk_sectors=` blocks to move (64; a block is the
//! disk's block size, 512 bytes unless it says otherwise), `outboard.blk_seed=` (1),
//! `outboard.blk_queues=` (1), `outboard.blk_depth=` requests in flight per queue (32),
//! `outboard.blk_timeout_ms=` time without a completion before failing (30000),
//! `outboard.blk_every=` blocks per progress line of `blk-loop` (64), `outboard.blk_rounds=`
//! rounds of `blk-loop` (forever).
//!
//! - `blk-verify`: write, FLUSH, read back, verify;
//! - `blk-write` / `blk-read-verify`: the two halves, for persistence across boots and restarts;
//! - `blk-loop`: rounds of write + verify of `blk_every` numbered blocks, with a progress line
//!   `OUTBOARD_BLK_PROGRESS round=<r> blocks=<total> errors=<n> ns=<clock>` per round; it waits
//!   through stalls (a restarting backend) instead of failing;
//! - `blk-bench`: timed passes without pattern work (see [`bench`]);
//! - `blk-grow`: waits for the disk to grow (see [`grow`]), then uses the new area.
//!
//! Result: `OUTBOARD_BLK_RESULT ok=<0|1> op=<command> written=<n> verified=<n> queues=<q>
//! errors=<n> unit=<bytes> capacity=<sectors> irqs=<n> [first_bad_sector=<s> offset=<o>
//! expected=<x> found=<y>] [io_sector=<s> io_status=<s>] [error="…"]`.

use super::Env;
use crate::println;
use crate::virtio::blk::{Blk, Counts, Op, Plan};
use crate::virtio::Deadline;
use outboard_testguest_parse::pattern::spread_sector;

const NS_PER_MS: u64 = 1_000_000;

pub(super) struct Params {
    pub(super) sectors: u64,
    pub(super) seed: u64,
    pub(super) queues: u64,
    pub(super) depth: u64,
    pub(super) timeout_ns: u64,
    pub(super) every: u64,
    pub(super) rounds: u64,
}

pub(super) fn params(env: &Env, name: &str) -> Option<Params> {
    Some(Params {
        sectors: env.param_u64(name, "outboard.blk_sectors", 64)?,
        seed: env.param_u64(name, "outboard.blk_seed", 1)?,
        queues: env.param_u64(name, "outboard.blk_queues", 1)?,
        depth: env.param_u64(name, "outboard.blk_depth", 32)?,
        timeout_ns: env
            .param_u64(name, "outboard.blk_timeout_ms", 30_000)?
            .saturating_mul(NS_PER_MS),
        every: env.param_u64(name, "outboard.blk_every", 64)?.max(1),
        rounds: env.param_u64(name, "outboard.blk_rounds", u64::MAX)?,
    })
}

pub(super) fn open(name: &str, p: &Params) -> Option<Blk> {
    let queues = p.queues.clamp(1, 8) as u16;
    match Blk::open(queues, p.depth.clamp(1, 32) as u16) {
        Ok(blk) => {
            println!(
                "outboard-testguest: blk {}: capacity={} unit={} queues={} msix={} features={:#x}",
                blk.dev.bdf,
                blk.capacity,
                blk.unit,
                blk.nqueues,
                blk.dev.msix.map_or(0, |m| m.cap.table_size),
                blk.dev.features
            );
            Some(blk)
        }
        Err(e) => {
            println!("OUTBOARD_GUEST_ERROR {name}: {e}");
            None
        }
    }
}

pub(super) fn plan(op: Op, p: &Params, first: u64, n: u64, count: u64, patient: bool) -> Plan {
    Plan {
        op,
        seed: p.seed,
        first,
        n,
        count,
        stall_ns: p.timeout_ns,
        patient,
    }
}

fn report(
    name: &str,
    blk: &Blk,
    written: u64,
    c: &Counts,
    failure: Option<&dyn core::fmt::Display>,
) {
    crate::irq::report();
    let ok = c.errors == 0 && failure.is_none();
    let mut tail = heapless_tail();
    if let Some((sector, m)) = c.first_mismatch {
        tail.push(format_args!(
            " first_bad_sector={sector} offset={} expected={:#x} found={:#x}",
            m.offset, m.expected, m.found
        ));
    }
    if let Some((sector, status)) = c.first_status {
        tail.push(format_args!(" io_sector={sector} io_status={status}"));
    }
    if let Some(f) = failure {
        tail.push(format_args!(" error=\"{f}\""));
    }
    println!(
        "OUTBOARD_BLK_RESULT ok={} op={name} written={written} verified={} queues={} errors={} unit={} capacity={} irqs={}{}",
        u8::from(ok),
        c.verified,
        blk.nqueues,
        c.errors,
        blk.unit,
        blk.capacity,
        crate::irq::device_interrupts(),
        tail.as_str()
    );
}

/// A fixed buffer for the optional tail of a result line.
struct Tail {
    buf: [u8; 256],
    len: usize,
}

fn heapless_tail() -> Tail {
    Tail {
        buf: [0; 256],
        len: 0,
    }
}

impl Tail {
    fn push(&mut self, args: core::fmt::Arguments<'_>) {
        let _ = core::fmt::Write::write_fmt(self, args);
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl core::fmt::Write for Tail {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn write_then_verify(env: &Env, name: &str, write: bool, verify: bool) {
    let Some(p) = params(env, name) else { return };
    let Some(mut blk) = open(name, &p) else {
        return;
    };
    let mut written = 0;
    let mut counts = Counts::default();
    if write {
        match blk.transfer(
            &plan(Op::Write, &p, 0, p.sectors, p.sectors, false),
            env.clock,
        ) {
            Ok(c) => {
                written = c.done - c.errors;
                counts = c;
            }
            Err(e) => return report(name, &blk, 0, &counts, Some(&e)),
        }
        if let Err(e) = blk.flush(env.clock, p.timeout_ns, false) {
            return report(name, &blk, written, &counts, Some(&e));
        }
    }
    if verify {
        match blk.transfer(
            &plan(Op::ReadVerify, &p, 0, p.sectors, p.sectors, false),
            env.clock,
        ) {
            Ok(c) => {
                counts.verified = c.verified;
                counts.errors += c.errors;
                counts.first_mismatch = c.first_mismatch;
                counts.first_status = counts.first_status.or(c.first_status);
            }
            Err(e) => return report(name, &blk, written, &counts, Some(&e)),
        }
    }
    report(name, &blk, written, &counts, None);
    let _ = blk.dev.reset();
}

pub fn verify(env: &Env) {
    write_then_verify(env, "blk-verify", true, true)
}

pub fn write(env: &Env) {
    write_then_verify(env, "blk-write", true, false)
}

pub fn read_verify(env: &Env) {
    write_then_verify(env, "blk-read-verify", false, true)
}

/// `blk-loop`: round `r` writes blocks `r * every ..` (spread over `blk_sectors` places on the
/// disk, so later rounds overwrite earlier places with a new seed), flushes, reads them back.
pub fn run_loop(env: &Env) {
    const NAME: &str = "blk-loop";
    let Some(mut p) = params(env, NAME) else {
        return;
    };
    let Some(mut blk) = open(NAME, &p) else {
        return;
    };
    let base_seed = p.seed;
    let mut total = Counts::default();
    let mut written = 0;
    for round in 0..p.rounds {
        p.seed = base_seed.wrapping_add(round);
        let first = round.wrapping_mul(p.every);
        let count = p.sectors.max(p.every);
        let result = blk
            .transfer(&plan(Op::Write, &p, first, p.every, count, true), env.clock)
            .and_then(|c| {
                written += c.done;
                blk.flush(env.clock, p.timeout_ns, true)?;
                blk.transfer(
                    &plan(Op::ReadVerify, &p, first, p.every, count, true),
                    env.clock,
                )
            });
        match result {
            Ok(c) => {
                total.verified += c.verified;
                total.errors += c.errors;
                total.first_mismatch = total.first_mismatch.or(c.first_mismatch);
                total.first_status = total.first_status.or(c.first_status);
            }
            Err(e) => return report(NAME, &blk, written, &total, Some(&e)),
        }
        println!(
            "OUTBOARD_BLK_PROGRESS round={round} blocks={} errors={} ns={}",
            total.verified,
            total.errors,
            env.clock.now_ns().unwrap_or(0)
        );
        if total.errors != 0 {
            break;
        }
    }
    report(NAME, &blk, written, &total, None);
}

/// `blk-bench`: `outboard.blk_ops=` (1000) requests of `outboard.blk_unit=` (4096) bytes, with
/// up to `blk_depth` (1) in flight on each of `blk_queues` (1) queues, over `blk_ops` places
/// spread on the disk; writes first (`outboard.blk_bench=write|read|both`, both), then reads
/// the same places. No pattern is generated or checked: guest CPU time goes to the I/O path.
/// One line per pass: `OUTBOARD_BLK_BENCH ok=<0|1> op=<write|read> ops=<n> unit=<bytes>
/// depth=<d> queues=<q> ns=<elapsed> iops=<n> errors=<n> irqs=<n>`.
pub fn bench(env: &Env) {
    const NAME: &str = "blk-bench";
    let Some(mut p) = params(env, NAME) else {
        return;
    };
    let (Some(ops), Some(unit)) = (
        env.param_u64(NAME, "outboard.blk_ops", 1000),
        env.param_u64(NAME, "outboard.blk_unit", 4096),
    ) else {
        return;
    };
    if env
        .cmdline()
        .get_u64("outboard.blk_depth")
        .ok()
        .flatten()
        .is_none()
    {
        p.depth = 1;
    }
    let which = env.cmdline().get("outboard.blk_bench").unwrap_or("both");
    let Some(mut blk) = open(NAME, &p) else {
        return;
    };
    if !blk.set_unit(unit) {
        println!(
            "OUTBOARD_GUEST_ERROR {NAME}: unit {unit} is not a power of two between the block size {} and 4096",
            blk.unit
        );
        return;
    }
    let places = ops.min(blk.capacity / blk.sectors_per_unit()).max(1);
    let passes: &[(Op, &str)] = match which {
        "write" => &[(Op::WriteRaw, "write")],
        "read" => &[(Op::Read, "read")],
        _ => &[(Op::WriteRaw, "write"), (Op::Read, "read")],
    };
    for &(op, label) in passes {
        let start = env.clock.now_ns().unwrap_or(0);
        let result = blk.transfer(&plan(op, &p, 0, ops, places, false), env.clock);
        let ns = env.clock.now_ns().unwrap_or(0).saturating_sub(start);
        let (c, failure) = match result {
            Ok(c) => (c, None),
            Err(e) => (Counts::default(), Some(e)),
        };
        let iops = (c.done as u128 * 1_000_000_000)
            .checked_div(u128::from(ns))
            .unwrap_or(0);
        println!(
            "OUTBOARD_BLK_BENCH ok={} op={label} ops={} unit={} depth={} queues={} ns={ns} iops={iops} errors={} irqs={}",
            u8::from(failure.is_none() && c.errors == 0 && c.done == ops),
            c.done,
            blk.unit,
            blk.depth,
            blk.nqueues,
            c.errors,
            crate::irq::device_interrupts()
        );
        if let Some(e) = failure {
            println!("outboard-testguest: {NAME}: {e}");
            break;
        }
    }
    let _ = blk.dev.reset();
}

/// `blk-grow` (needs `outboard.virtio_irq=1`): prints `OUTBOARD_BLK_CAPACITY sectors=<n>`, waits
/// up to `outboard.blk_grow_ms=` (120000) for the config-change interrupt and a larger capacity,
/// prints `OUTBOARD_BLK_GROWN old=<n> new=<n> config_irqs=<n> first_sector=<s>`, then writes,
/// flushes and verifies those of `blk_sectors` blocks spread over the new capacity that lie
/// beyond the old end (the first at `first_sector`).
pub fn grow(env: &Env) {
    const NAME: &str = "blk-grow";
    let Some(p) = params(env, NAME) else { return };
    let Some(grow_ms) = env.param_u64(NAME, "outboard.blk_grow_ms", 120_000) else {
        return;
    };
    let Some(mut blk) = open(NAME, &p) else {
        return;
    };
    let none = Counts::default();
    if !crate::irq::enabled() {
        return report(
            NAME,
            &blk,
            0,
            &none,
            Some(&"outboard.virtio_irq=1 is needed"),
        );
    }
    let old = blk.capacity;
    let irqs_before = crate::irq::entry_interrupts(0);
    println!("OUTBOARD_BLK_CAPACITY sectors={old}");
    let mut deadline = Deadline::new(env.clock, grow_ms.saturating_mul(NS_PER_MS));
    loop {
        let irqs = crate::irq::entry_interrupts(0);
        if irqs != irqs_before && blk.reread_capacity() > old {
            break;
        }
        if deadline.expired() {
            let why = "no config interrupt with a larger capacity";
            return report(NAME, &blk, 0, &none, Some(&why));
        }
        crate::irq::wait();
    }
    let count = p.sectors.max(2);
    let spu = blk.sectors_per_unit();
    let first =
        (0..count).find(|&b| spread_sector(b, count, blk.capacity, spu).is_some_and(|s| s >= old));
    let Some(first) = first else {
        let why = "no block of the spread lies in the grown area";
        return report(NAME, &blk, 0, &none, Some(&why));
    };
    println!(
        "OUTBOARD_BLK_GROWN old={old} new={} config_irqs={} first_sector={}",
        blk.capacity,
        crate::irq::entry_interrupts(0).wrapping_sub(irqs_before),
        spread_sector(first, count, blk.capacity, spu).unwrap_or(0)
    );
    let n = count - first;
    let mut counts = match blk.transfer(&plan(Op::Write, &p, first, n, count, false), env.clock) {
        Ok(c) => c,
        Err(e) => return report(NAME, &blk, 0, &none, Some(&e)),
    };
    let written = counts.done - counts.errors;
    if let Err(e) = blk.flush(env.clock, p.timeout_ns, false) {
        return report(NAME, &blk, written, &counts, Some(&e));
    }
    match blk.transfer(&plan(Op::ReadVerify, &p, first, n, count, false), env.clock) {
        Ok(c) => {
            counts.verified = c.verified;
            counts.errors += c.errors;
            counts.first_mismatch = c.first_mismatch;
            counts.first_status = counts.first_status.or(c.first_status);
        }
        Err(e) => return report(NAME, &blk, written, &counts, Some(&e)),
    }
    report(NAME, &blk, written, &counts, None);
    let _ = blk.dev.reset();
}
