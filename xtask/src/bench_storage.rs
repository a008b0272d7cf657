//! `cargo xtask bench storage [--seconds S] [--repeats N] [--dir D] [--ram]`: the card's storage
//! benchmark, side by side with qemu-storage-daemon through the same vhost-user-blk load
//! generator, in the same run (plain vs raw, encrypted vs LUKS, throttled vs a throttle group;
//! XTS per core; throttle accuracy, also at SCHED_FIFO). Each row is N interleaved rounds of
//! card and qsd runs; medians and per-round ratio ranges are printed. The work is done by
//! `outboard-card bench storage` from a release build; its last line is `RESULT storage …`.

use crate::util;
use anyhow::{bail, Context, Result};
use std::process::Command;

pub fn run(args: &[&str]) -> Result<()> {
    crate::setup::run()?;
    util::cargo(&["build", "--release", "-p", "outboard-card"])?;
    let card = util::cargo_target_dir().join("release/outboard-card");
    let status = Command::new(&card)
        .args(["bench", "storage"])
        .args(args)
        .status()
        .with_context(|| format!("Cannot run {}", card.display()))?;
    if !status.success() {
        bail!("outboard-card bench storage failed with {status}");
    }
    Ok(())
}
