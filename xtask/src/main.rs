//! Developer commands for Outboard: `cargo xtask <command>`.
//!
//! | command | what it does |
//! |---|---|
//! | `setup` | installs what a fresh Debian machine lacks (apt packages, the guest Rust target) |
//! | `guest [--test-only\|--linux-only]` | builds `target/guest/{testguest,vmlinuz,initramfs.img}` |
//! | `guest --tiny-kernel` | builds only `target/guest/tiny-vmlinux` (a kernel PVM can run) |
//! | `run` | the README's main job: boots a guest under outboard-vmm |
//! | `test [--slow]` | the README's test command: set-up, guest images, fmt, clippy, all tests (`--slow`: also the tiny kernel and the ignored slow tests) |
//! | `bench boot` | boot benchmark against QEMU; ends with a `RESULT` line |
//! | `bench disk` | VMM CPU and wake-ups per I/O of a vhost-user disk, against QEMU; `RESULT disk` line |
//! | `bench attest` | phase-1 measurement and attestation document cost |
//! | `bench storage` | card storage vs qemu-storage-daemon through one load generator |
//! | `fuzz [--seconds N] [TARGET…]` | every cargo-fuzz target for N s each (nightly + cargo-fuzz) |
//! | `bench live-update` | live update pause and total time (128 MiB / 4 GiB, 1 / 2 vCPUs) against snapshot + restore; `RESULT live-update` line |
//! | `bench net` | card overlay (hash, spray, adaptive) vs the kernel's tunnel over two shaped paths |

mod bench_attest;
mod bench_boot;
mod bench_disk;
mod bench_live_update;
mod bench_net;
mod bench_storage;
mod fuzz;
mod guest_linux;
mod guest_test;
mod guest_tiny;
mod setup;
mod util;

use anyhow::{bail, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("guest") => guest(&rest),
        Some("run") => run_main_job(),
        Some("test") => test(&rest),
        Some("fuzz") => fuzz::run(&rest),
        Some("bench") => match rest.first().copied() {
            Some("boot") => bench_boot::run(&rest[1..]),
            Some("disk") => bench_disk::run(&rest[1..]),
            Some("attest") => bench_attest::run(&rest[1..]),
            Some("storage") => bench_storage::run(&rest[1..]),
            Some("net") => bench_net::run(&rest[1..]),
            Some("live-update") => bench_live_update::run(&rest[1..]),
            other => bail!(
                "Unknown benchmark {other:?}; known: boot, attest, storage, disk, net, live-update"
            ),
        },
        _ => {
            eprintln!("usage: cargo xtask <setup|guest|run|test|fuzz|bench NAME>");
            bail!("No command given")
        }
    }
}

fn guest(args: &[&str]) -> Result<()> {
    if args.contains(&"--tiny-kernel") {
        return guest_tiny::build();
    }
    let test_only = args.contains(&"--test-only");
    let linux_only = args.contains(&"--linux-only");
    if !linux_only {
        guest_test::build()?;
    }
    if !test_only {
        guest_linux::build()?;
    }
    Ok(())
}

/// The README's main job: boot a guest and show its console.
fn run_main_job() -> Result<()> {
    setup::run()?;
    guest(&[])?;
    util::cargo(&["build", "--release", "-p", "outboard-vmm"])?;
    let root = util::workspace_root();
    let vmm = util::cargo_target_dir().join("release/outboard-vmm");
    let guest_dir = root.join("target/guest");
    let hw_virt = util::host_has_hardware_virtualization();
    let mut cmd = std::process::Command::new(&vmm);
    if hw_virt {
        println!("xtask run: this host has hardware virtualization: booting the Debian Linux guest under outboard-vmm");
        cmd.arg("--kernel")
            .arg(guest_dir.join("vmlinuz"))
            .arg("--initrd")
            .arg(guest_dir.join("initramfs.img"))
            .args([
                "--cmdline",
                "console=ttyS0 outboard.poweroff",
                "--cpus",
                "2",
                "--memory",
                "512M",
            ]);
    } else {
        println!("xtask run: no vmx/svm on this host (/dev/kvm is PVM or absent), so a stock Linux kernel cannot run here: booting the test guest under outboard-vmm");
        cmd.arg("--kernel").arg(guest_dir.join("testguest")).args([
            "--cmdline",
            "outboard.run=poweroff",
            "--cpus",
            "2",
            "--memory",
            "128M",
        ]);
    }
    let status = cmd.status()?;
    if !status.success() {
        bail!("outboard-vmm exited with {status}");
    }
    println!("xtask run: the VM booted, printed its marker and powered off");
    Ok(())
}

/// The README's test command.
fn test(args: &[&str]) -> Result<()> {
    let slow = args.contains(&"--slow");
    setup::run()?;
    guest(&[])?;
    if slow {
        guest_tiny::build()?;
    }
    util::cargo(&["fmt", "--all", "--check"])?;
    util::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // Every failure is reported, not only the first test binary's.
    let mut test_args = vec!["test", "--workspace", "--no-fail-fast"];
    if slow {
        test_args.extend(["--", "--include-ignored"]);
    }
    util::cargo(&test_args)?;
    guest_test::clippy()?;
    println!("xtask test: all green");
    Ok(())
}
