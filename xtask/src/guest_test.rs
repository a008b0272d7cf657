//! `cargo xtask guest` (test-guest part): builds `guest/testguest` (its own workspace and target
//! dir, target `x86_64-unknown-none`) and installs the ELF as `target/guest/testguest` once it
//! passes the checks in [`check`]: the load layout VMMs rely on, and no instruction PVM cannot
//! emulate. A run with no source newer than the installed ELF does nothing.
//!
//! `clippy()` is the test guest's share of `cargo xtask test`: clippy and rustfmt on the guest
//! workspace, and the host unit tests of its parsing library.

mod check;

use crate::util;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// The guest's Rust target (soft-float: no SSE, which PVM's emulator lacks).
const GUEST_TARGET: &str = "x86_64-unknown-none";
/// The host-testable parsing library inside the guest workspace.
const PARSE_CRATE: &str = "outboard-testguest-parse";
/// Directories under the guest that hold no build input.
const NOT_INPUTS: &[&str] = &["target", "fuzz", ".git"];

fn guest_dir() -> PathBuf {
    util::workspace_root().join("guest/testguest")
}

fn output_path() -> PathBuf {
    util::workspace_root().join("target/guest/testguest")
}

/// Builds, checks and installs the test guest.
pub fn build() -> Result<()> {
    let dir = guest_dir();
    let out = output_path();
    require_guest_target()?;
    if up_to_date(&dir, &out)? {
        println!("xtask guest: test guest up to date ({})", out.display());
        return Ok(());
    }
    guest_cargo(&dir, &["build", "--release"])?;
    let built = dir
        .join("target")
        .join(GUEST_TARGET)
        .join("release/testguest");
    let elf = std::fs::read(&built).with_context(|| format!("Cannot read {}", built.display()))?;
    let layout =
        check::layout(&elf).with_context(|| format!("Bad test guest ELF {}", built.display()))?;
    println!(
        "xtask guest: checking {} ({} bytes, entry {:#x}, PVH entry {:#x}, loads {:#x}..{:#x})",
        built.display(),
        elf.len(),
        layout.entry,
        layout.pvh_entry,
        layout.load_start,
        layout.load_end
    );
    check::instructions(&built)?;
    install(&built, &out)?;
    println!("xtask guest: wrote {}", out.display());
    Ok(())
}

/// The guest's lints, formatting and host unit tests.
pub fn clippy() -> Result<()> {
    let dir = guest_dir();
    require_guest_target()?;
    let host = host_triple()?;
    guest_cargo(&dir, &["clippy", "--release", "--", "-D", "warnings"])?;
    guest_cargo(
        &dir,
        &[
            "clippy",
            "-p",
            PARSE_CRATE,
            "--all-targets",
            "--target",
            &host,
            "--",
            "-D",
            "warnings",
        ],
    )?;
    guest_cargo(&dir, &["fmt", "--all", "--check"])?;
    guest_cargo(&dir, &["test", "-p", PARSE_CRATE, "--target", &host])?;
    Ok(())
}

/// Runs cargo in the guest workspace, isolated from settings meant for the main workspace: its
/// own target dir, and no RUSTFLAGS (they would replace the guest's `relocation-model=static`).
fn guest_cargo(dir: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask guest: cargo {} (in guest/testguest)", args.join(" "));
    let status = Command::new(cargo)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .context("Cannot run cargo")?;
    if !status.success() {
        bail!(
            "cargo {} in {} failed with {status}",
            args.join(" "),
            dir.display()
        );
    }
    Ok(())
}

fn rustc() -> String {
    std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into())
}

/// Fails with the fix when the guest's target has no standard library installed.
fn require_guest_target() -> Result<()> {
    let out = Command::new(rustc())
        .args(["--print", "sysroot"])
        .output()
        .context("Cannot run rustc")?;
    if !out.status.success() {
        bail!("rustc --print sysroot failed with {}", out.status);
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !sysroot.join("lib/rustlib").join(GUEST_TARGET).is_dir() {
        bail!("The Rust target {GUEST_TARGET} is not installed: run `rustup target add {GUEST_TARGET}` (or `cargo xtask setup`)");
    }
    Ok(())
}

fn host_triple() -> Result<String> {
    let out = Command::new(rustc())
        .arg("-vV")
        .output()
        .context("Cannot run rustc")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV names no host triple")
}

/// Whether `out` exists and is newer than every build input: the guest's files and this builder.
fn up_to_date(dir: &Path, out: &Path) -> Result<bool> {
    let Ok(built) = std::fs::metadata(out).and_then(|m| m.modified()) else {
        return Ok(false);
    };
    let mut newest = SystemTime::UNIX_EPOCH;
    newest_mtime(dir, &mut newest)?;
    let builder = util::workspace_root().join("xtask/src/guest_test");
    newest_mtime(&builder, &mut newest)?;
    newest_mtime(&builder.with_extension("rs"), &mut newest)?;
    Ok(newest < built)
}

fn newest_mtime(path: &Path, newest: &mut SystemTime) -> Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("Cannot stat {}", path.display())),
    };
    if meta.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("Cannot list {}", path.display()))?
        {
            let entry = entry.with_context(|| format!("Cannot list {}", path.display()))?;
            if !NOT_INPUTS.iter().any(|n| entry.file_name() == *n) {
                newest_mtime(&entry.path(), newest)?;
            }
        }
    } else {
        *newest = (*newest).max(
            meta.modified()
                .with_context(|| format!("Cannot stat {}", path.display()))?,
        );
    }
    Ok(())
}

/// Copies through a temporary file so a half-written ELF never looks up to date.
fn install(from: &Path, to: &Path) -> Result<()> {
    let parent = to.parent().context("Output path has no parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("Cannot create {}", parent.display()))?;
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).with_context(|| format!("Cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, to)
        .with_context(|| format!("Cannot rename {} to {}", tmp.display(), to.display()))?;
    Ok(())
}
