//! `cargo xtask setup`: installs what a fresh Debian machine lacks. Idempotent and quiet when
//! everything is present.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// Debian packages the builds, tests and benchmarks need, keyed by a file each one provides.
const PACKAGES: &[(&str, &str)] = &[
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/bin/qemu-storage-daemon", "qemu-system-common"),
    ("/usr/bin/dpkg-deb", "dpkg"),
    ("/usr/bin/fio", "fio"),
];

pub fn run() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(file, _)| !std::path::Path::new(file).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            bail!(
                "Missing Debian packages {missing:?}: run `sudo apt-get install -y {}`",
                missing.join(" ")
            );
        }
        println!("xtask setup: installing {}", missing.join(" "));
        run_cmd(Command::new("apt-get").arg("update").arg("-q"))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(&missing),
        )?;
    }
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("Cannot run rustup")?;
    if !String::from_utf8_lossy(&targets.stdout).contains("x86_64-unknown-none") {
        println!("xtask setup: adding the x86_64-unknown-none target for the test guest");
        run_cmd(Command::new("rustup").args(["target", "add", "x86_64-unknown-none"]))?;
    }
    Ok(())
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("Cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
