//! Helpers shared by the live-update tests (`live_update_devices.rs`, `live_update_linux.rs`):
//! the second build, the API calls, qemu-storage-daemon's presence and its disk.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::Duration;

use outboard_guest_harness::{wait_for_path, ApiClient, Daemon};

/// qemu-storage-daemon exporting a fresh zero-filled `bytes`-byte raw image `<dir>/disk.raw`
/// as a one-queue vhost-user-blk disk on `<dir>/blk.sock` (its log in `<dir>/qsd.log`);
/// returns the daemon and the socket once it listens.
pub fn qsd_disk(dir: &Path, bytes: u64) -> (Daemon, PathBuf) {
    let image = dir.join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    let sock = dir.join("blk.sock");
    let qsd = Daemon::spawn(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},\
                 writable=on,num-queues=1",
                sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qsd.log")).unwrap()),
    )
    .unwrap();
    assert!(wait_for_path(&sock, Duration::from_secs(10)));
    (qsd, sock)
}

pub fn have_qsd(test: &str) -> bool {
    let found = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("SKIP: {test}: qemu-storage-daemon is not installed");
    }
    found
}

pub fn live_update(api: &ApiClient, binary: &Path) -> (u16, String) {
    let body = serde_json::json!({ "binary": binary }).to_string();
    api.request("PUT", "/live-update", Some(&body)).unwrap()
}

pub fn version(api: &ApiClient) -> Result<String, outboard_guest_harness::api::Error> {
    let (code, body) = api.request("GET", "/version", None)?;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    Ok(v["vmm_version"].as_str().unwrap().to_owned())
}

/// Pause lengths the successors printed, in ms.
pub fn pauses(stderr: &str) -> Vec<f64> {
    stderr
        .lines()
        .filter_map(|l| l.split("guest paused for ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The second build: outboard-vmm built with another `OUTBOARD_VERSION` into its own target
/// directory (`OUTBOARD_VMM_ALT` names a ready one instead).
pub fn alternate_build(version: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("OUTBOARD_VMM_ALT") {
        return PathBuf::from(path);
    }
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_outboard-vmm"));
    let profile_dir = ours.parent().unwrap();
    let release = profile_dir.ends_with("release");
    let target = profile_dir.parent().unwrap().join("alt");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "outboard-vmm", "--bin", "outboard-vmm"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &target)
        .env("OUTBOARD_VERSION", version);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo for the second build");
    assert!(status.success(), "the second build failed");
    target
        .join(if release { "release" } else { "debug" })
        .join("outboard-vmm")
}
