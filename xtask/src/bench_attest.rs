//! `cargo xtask bench attest [--kernel F] [--initrd F] [--cmdline S] [--runs N]`: what the
//! attested launch adds to phase 1 (hashing kernel, initrd, command line and configuration,
//! then signing a document), on the stock Debian kernel and initramfs by default.
//!
//! Runs `outboard attest bench` from a release build, so the xtask binary does not link OpenSSL.
//! Its last line is `RESULT attest measure_ms=… sign_ms=… measure_ms_per_mib=… sha384_mib_s=…`.
//! Comparing against boot time (the issue's <5% target) is the next step, once `bench boot`
//! reports a boot figure for the same kernel.

use anyhow::{bail, Context, Result};
use std::process::Command;

use crate::util;

pub fn run(args: &[&str]) -> Result<()> {
    let root = util::workspace_root();
    let guest = root.join("target/guest");
    let mut kernel = guest.join("vmlinuz").display().to_string();
    let mut initrd = Some(guest.join("initramfs.img").display().to_string());
    let mut cmdline = "console=ttyS0 outboard.poweroff".to_owned();
    let mut runs = "15".to_owned();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .map(|v| v.to_string())
                .with_context(|| format!("{a} needs a value"))
        };
        match *a {
            "--kernel" => kernel = value()?,
            "--initrd" => initrd = Some(value()?),
            "--no-initrd" => initrd = None,
            "--cmdline" => cmdline = value()?,
            "--runs" => runs = value()?,
            other => bail!("Unknown option {other}; known: --kernel F --initrd F --no-initrd --cmdline S --runs N"),
        }
    }
    if !std::path::Path::new(&kernel).exists() {
        bail!("Kernel {kernel} is missing: run `cargo xtask guest` or pass --kernel F");
    }
    util::cargo(&["build", "--release", "-p", "outboard-cli"])?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    let mut cmd = Command::new(target.join("release/outboard"));
    cmd.args([
        "attest",
        "bench",
        "--kernel",
        &kernel,
        "--cmdline",
        &cmdline,
    ])
    .args(["--cpus", "2", "--memory", "512M", "--runs", &runs]);
    if let Some(initrd) = &initrd {
        cmd.args(["--initrd", initrd]);
    }
    let status = cmd.status().context("Cannot run outboard attest bench")?;
    if !status.success() {
        bail!("outboard attest bench failed with {status}");
    }
    Ok(())
}
