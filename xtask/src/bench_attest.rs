//! `cargo xtask bench attest [--kernel F] [--initrd F] [--cmdline S] [--runs N]`: what the
//! attested launch costs, in two parts.
//!
//! 1. In process, on the stock Debian kernel and initramfs by default: `outboard attest bench`
//!    (release build, so the xtask binary does not link OpenSSL) times hashing kernel, initrd,
//!    command line and configuration back from guest memory, then signing a document.
//! 2. Through the real VMM and API ([`vmm`]): release outboard-vmm with the test guest,
//!    unattested versus attested, and phase 1 of the stock kernel.
//!
//! The last line is `RESULT attest measure_ms=… sign_ms=… measure_ms_per_mib=… sha384_mib_s=…
//! measured_mib=… doc_bytes=…` (part 1) followed by part 2's figures (see [`vmm`]).

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

use crate::util;

mod vmm;

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
    crate::guest_test::build()?;
    util::cargo(&[
        "build",
        "--release",
        "-p",
        "outboard-cli",
        "-p",
        "outboard-vmm",
    ])?;
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
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("Cannot run outboard attest bench")?;
    if !out.status.success() {
        bail!("outboard attest bench failed with {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut in_process = None;
    for line in text.lines() {
        match line.strip_prefix("RESULT attest ") {
            Some(figures) => in_process = Some(figures.to_owned()),
            None => println!("{line}"),
        }
    }
    let in_process = in_process.context("outboard attest bench printed no RESULT line")?;
    println!("bench attest: in process (stock kernel): {in_process}");

    let runs: usize = runs.parse().context("--runs needs a number")?;
    let through_vmm = vmm::run(&target.join("release"), runs, &kernel, initrd.as_deref())?;
    println!("RESULT attest {in_process} {through_vmm}");
    Ok(())
}
