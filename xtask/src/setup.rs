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
    // The storage benchmark formats qemu-storage-daemon's LUKS peer image.
    ("/usr/bin/qemu-img", "qemu-utils"),
    // depmod indexes the guest kernel's modules (cargo xtask guest).
    ("/usr/sbin/depmod", "kmod"),
    // openssl-sys (card XTS, attestation keys) links Debian's libssl.
    ("/usr/include/openssl/evp.h", "libssl-dev"),
    ("/usr/bin/pkg-config", "pkg-config"),
    ("/usr/bin/objdump", "binutils"),
    // The overlay network tests and benchmark (crates/card-net): namespaces, ping, a TCP load,
    // and an outside Geneve decoder.
    ("/usr/bin/ip", "iproute2"),
    ("/usr/bin/ping", "iputils-ping"),
    ("/usr/bin/iperf3", "iperf3"),
    ("/usr/bin/tshark", "tshark"),
    // Random drop and ECN marking on one path (the lossy-path and ECN tests, bench net).
    ("/usr/sbin/nft", "nftables"),
];

/// Debian packages the tiny kernel (`cargo xtask guest --tiny-kernel`) needs: its source and
/// what building Linux takes. Installed only when that image is asked for.
const TINY_KERNEL_PACKAGES: &[(&str, &str)] = &[
    ("/usr/src/linux-source-6.1.tar.xz", "linux-source-6.1"),
    ("/usr/bin/bc", "bc"),
    ("/usr/bin/bison", "bison"),
    ("/usr/bin/flex", "flex"),
    ("/usr/include/libelf.h", "libelf-dev"),
    ("/usr/include/openssl/evp.h", "libssl-dev"),
    ("/usr/bin/make", "make"),
    ("/usr/bin/gcc", "gcc"),
    ("/usr/bin/xz", "xz-utils"),
];

/// Python packages of the outside attestation verifier, as (import name, pip name).
const PYTHON_PACKAGES: &[(&str, &str)] = &[("cbor2", "cbor2"), ("pycose", "pycose")];

pub fn run() -> Result<()> {
    install_missing(PACKAGES)?;
    let missing_py: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .filter(|(module, _)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing_py.is_empty() {
        println!("xtask setup: pip installing {}", missing_py.join(" "));
        run_cmd(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet"])
                .args(&missing_py),
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

/// Installs the tiny kernel's source and build dependencies where they are missing.
pub fn tiny_kernel_deps() -> Result<()> {
    install_missing(TINY_KERNEL_PACKAGES)
}

/// Installs (as root) the packages of `wanted` whose file is missing, or says what to install.
fn install_missing(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
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
                // tshark's debconf question must not wait for a terminal.
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q"])
                .args(&missing),
        )?;
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
