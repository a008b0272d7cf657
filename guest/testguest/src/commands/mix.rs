//! `live-mix`: the heartbeat, a disk writer/verifier and a NIC exchange at once, for live
//! updates under load. One CPU interleaves them: a disk round (`blk_every` numbered blocks
//! written, flushed, read back and verified, as `blk-loop`), a batch of `outboard.net_batch=`
//! (8) sequence-numbered frames to the echo backend, all waited for, and a heartbeat whenever
//! its interval (`outboard.interval_ms=`, 100) has passed, for `outboard.mix_rounds=` rounds
//! (forever). Waits through stalls (a paused VM) instead of failing. `outboard.mix_net=0`
//! leaves the NIC out (a VM with a disk only).
//!
//! Lines: `OUTBOARD_HEARTBEAT seq=<n> ns=<clock>` (as `heartbeat`), per round
//! `OUTBOARD_BLK_PROGRESS round=<r> blocks=<verified> errors=<n> ns=<clock>` and
//! `OUTBOARD_NET_PROGRESS batch=<b> sent=<n> received=<n> lost=<n> duplicated=<n> unknown=<n>`
//! (running totals), and at the end or on the first failure `OUTBOARD_MIX_RESULT ok=<0|1>
//! blocks=<n> blk_errors=<n> sent=<n> received=<n> lost=<n> duplicated=<n> unknown=<n>`.

use super::blk::{open, params, plan};
use super::Env;
use crate::println;
use crate::virtio::blk::Op;
use crate::virtio::net::Net;
use crate::virtio::{Deadline, Error};
use outboard_testguest_parse::netframe::{self, Tracker};

const NAME: &str = "live-mix";

/// Frames of the whole run so far.
#[derive(Default)]
struct NetTotals {
    sent: u64,
    received: u64,
    lost: u64,
    duplicated: u64,
    unknown: u64,
}

/// The heartbeat's schedule.
struct Beat {
    interval: u64,
    next: u64,
    seq: u64,
}

impl Beat {
    fn tick(&mut self, env: &Env) {
        let Some(now) = env.clock.now_ns() else {
            return;
        };
        if now < self.next {
            return;
        }
        println!("OUTBOARD_HEARTBEAT seq={} ns={now}", self.seq);
        self.seq += 1;
        self.next = self.next.saturating_add(self.interval);
        if self.next <= now {
            self.next = now.saturating_add(self.interval);
        }
    }
}

/// Sends frames `base..base + n` and takes their echoes, beating meanwhile.
fn net_batch(
    net: &mut Net,
    env: &Env,
    beat: &mut Beat,
    base: u32,
    n: u32,
    timeout_ns: u64,
    totals: &mut NetTotals,
) -> Result<(), Error> {
    let mut tracker = Tracker::new(n);
    let mut sent = 0u32;
    let mut frame = [0u8; netframe::FRAME_LEN];
    let mut rx = [0u8; crate::virtio::packet::BUF_LEN as usize];
    let mut deadline = Deadline::new(env.clock, timeout_ns);
    loop {
        beat.tick(env);
        let mut progressed = false;
        if sent < n {
            netframe::build(
                &mut frame,
                netframe::BROADCAST,
                net.mac,
                base.wrapping_add(sent),
            );
            if net.send(&frame)? {
                sent += 1;
                progressed = true;
            }
        }
        if let Some(f) = net.recv(&mut rx)? {
            progressed = true;
            if let Some(seq) = netframe::parse(f) {
                tracker.record(seq.wrapping_sub(base));
            }
        }
        if progressed {
            deadline = Deadline::new(env.clock, timeout_ns);
        } else {
            crate::irq::wait();
        }
        let done = sent == n && tracker.received >= n && net.queues.tx_in_flight()? == 0;
        if done || deadline.expired() {
            break;
        }
    }
    totals.sent += u64::from(sent);
    totals.received += u64::from(tracker.received);
    totals.lost += u64::from(tracker.lost());
    totals.duplicated += u64::from(tracker.duplicated);
    totals.unknown += u64::from(tracker.unknown);
    Ok(())
}

pub fn run(env: &Env) {
    let Some(mut p) = params(env, NAME) else {
        return;
    };
    let (Some(interval_ms), Some(batch), Some(timeout_ms), Some(rounds)) = (
        env.param_u64(NAME, "outboard.interval_ms", 100),
        env.param_u64(NAME, "outboard.net_batch", 8),
        env.param_u64(NAME, "outboard.net_timeout_ms", 5000),
        env.param_u64(NAME, "outboard.mix_rounds", u64::MAX),
    ) else {
        return;
    };
    let Some(now) = env.clock.now_ns() else {
        println!("OUTBOARD_GUEST_ERROR {NAME}: no clock");
        return;
    };
    let mut beat = Beat {
        interval: interval_ms.max(1).saturating_mul(1_000_000),
        next: now,
        seq: 0,
    };
    let Some(mut blk) = open(NAME, &p) else {
        return;
    };
    let Some(use_net) = env.param_u64(NAME, "outboard.mix_net", 1) else {
        return;
    };
    let mut net = match use_net {
        0 => None,
        _ => match Net::open() {
            Ok(n) => Some(n),
            Err(e) => {
                println!("OUTBOARD_GUEST_ERROR {NAME}: {e}");
                return;
            }
        },
    };
    let batch = batch.clamp(1, 16) as u32;
    let timeout_ns = timeout_ms.saturating_mul(1_000_000);
    let base_seed = p.seed;
    let (mut verified, mut blk_errors) = (0u64, 0u64);
    let mut totals = NetTotals::default();
    let mut failure: Option<Error> = None;
    for round in 0..rounds {
        beat.tick(env);
        p.seed = base_seed.wrapping_add(round);
        let first = round.wrapping_mul(p.every);
        let count = p.sectors.max(p.every);
        let result = blk
            .transfer(&plan(Op::Write, &p, first, p.every, count, true), env.clock)
            .and_then(|_| {
                beat.tick(env);
                blk.flush(env.clock, p.timeout_ns, true)?;
                beat.tick(env);
                blk.transfer(
                    &plan(Op::ReadVerify, &p, first, p.every, count, true),
                    env.clock,
                )
            });
        match result {
            Ok(c) => {
                verified += c.verified;
                blk_errors += c.errors;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        println!(
            "OUTBOARD_BLK_PROGRESS round={round} blocks={verified} errors={blk_errors} ns={}",
            env.clock.now_ns().unwrap_or(0)
        );
        if let Some(net) = net.as_mut() {
            let base = (round as u32).wrapping_mul(batch);
            if let Err(e) = net_batch(net, env, &mut beat, base, batch, timeout_ns, &mut totals) {
                failure = Some(e);
                break;
            }
            println!(
                "OUTBOARD_NET_PROGRESS batch={round} sent={} received={} lost={} duplicated={} unknown={}",
                totals.sent, totals.received, totals.lost, totals.duplicated, totals.unknown
            );
        }
        if blk_errors != 0 || totals.lost != 0 || totals.duplicated != 0 || totals.unknown != 0 {
            break;
        }
    }
    let ok = failure.is_none()
        && blk_errors == 0
        && totals.lost == 0
        && totals.duplicated == 0
        && totals.unknown == 0;
    println!(
        "OUTBOARD_MIX_RESULT ok={} blocks={verified} blk_errors={blk_errors} sent={} received={} lost={} duplicated={} unknown={}",
        u8::from(ok),
        totals.sent,
        totals.received,
        totals.lost,
        totals.duplicated,
        totals.unknown
    );
    if let Some(e) = failure {
        println!("outboard-testguest: {NAME}: {e}");
    }
    let _ = blk.dev.reset();
    if let Some(net) = net {
        let _ = net.dev.reset();
    }
}
