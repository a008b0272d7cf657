//! `heartbeat`: `OUTBOARD_HEARTBEAT seq=<n> ns=<clock ns>` every `outboard.interval_ms=` (default
//! 100) milliseconds, forever or `outboard.count=` times. Busy-waits on the clock; after a stall
//! (a paused VM, a live update) it beats once, late, and keeps the interval from there, so a pause
//! shows as one long gap, never as a burst.

use super::Env;
use crate::println;

const NAME: &str = "heartbeat";

pub fn run(env: &Env) {
    let Some(interval_ms) = env.param_u64(NAME, "outboard.interval_ms", 100) else {
        return;
    };
    let Some(count) = env.param_u64(NAME, "outboard.count", u64::MAX) else {
        return;
    };
    if interval_ms == 0 {
        println!("OUTBOARD_GUEST_ERROR {NAME}: outboard.interval_ms must be at least 1");
        return;
    }
    let interval = interval_ms.saturating_mul(1_000_000);
    let Some(mut next) = env.clock.now_ns() else {
        println!("OUTBOARD_GUEST_ERROR {NAME}: no clock");
        return;
    };
    for seq in 0..count {
        let now = loop {
            match env.clock.now_ns() {
                Some(now) if now >= next => break now,
                Some(_) => crate::arch::pause(),
                None => {
                    println!("OUTBOARD_GUEST_ERROR {NAME}: clock stopped");
                    return;
                }
            }
        };
        println!("OUTBOARD_HEARTBEAT seq={seq} ns={now}");
        next = next.saturating_add(interval);
        if next <= now {
            next = now.saturating_add(interval);
        }
    }
}
